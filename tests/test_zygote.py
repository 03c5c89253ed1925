"""The suite's shared start-up (``swift_gkd_plugin.testing.zygote``, used by ``run_swift`` for one-process runs)
changes nothing a run does: the same run forked from the zygote and started as a fresh process logs the same losses,
modes and metrics, and a refusal gives the same one line and exit code."""
import os

import pytest
from conftest import _ZYGOTE, base_args, run_swift

METRICS = ('loss', 'grad_norm', 'gkd/distill_loss', 'gkd/top1_agreement')


def _both(monkeypatch, argv_of, **kwargs):
    forked = run_swift(argv_of('forked'), **kwargs)
    with monkeypatch.context() as m:
        m.setenv('GKD_TESTS_FRESH_PROCESSES', '1')
        fresh = run_swift(argv_of('fresh'), **kwargs)
    return forked, fresh


def test_a_run_forked_from_the_zygote_equals_a_fresh_process(tiny_ws, tmp_path, monkeypatch):
    forked, fresh = _both(monkeypatch, lambda name: base_args(tiny_ws, str(tmp_path / name), max_steps=3, lmbda=0.5,
                                                              seed=3, sft_alpha=0.5))
    assert _ZYGOTE['zygote'].proc is not None  # the first run went through it
    assert forked.modes() == fresh.modes() and len(forked.logs) == 3
    for a, b in zip(forked.logs, fresh.logs):
        assert all(k in a for k in METRICS) and {k: a[k] for k in METRICS} == {k: b[k] for k in METRICS}


def test_a_refusal_is_the_same_line_and_exit_code(tiny_ws, tmp_path, monkeypatch):
    forked, fresh = _both(monkeypatch, lambda name: base_args(tiny_ws, str(tmp_path / name), beta=1.5), check=False,
                          timeout=120)
    assert forked.returncode == fresh.returncode == 2
    errors = [[line for line in run.output.splitlines() if line.startswith('swift rlhf: error: ')]
              for run in (forked, fresh)]
    assert errors[0] == errors[1] and len(errors[0]) == 1, forked.output[-2000:]


def test_a_run_past_its_timeout_is_stopped(tiny_ws, tmp_path):
    import subprocess
    with pytest.raises(subprocess.TimeoutExpired):
        run_swift(base_args(tiny_ws, str(tmp_path / 'out'), max_steps=1000), timeout=3)
    # the zygote serves the next run
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'next'), beta=1.5), check=False, timeout=120)
    assert run.returncode == 2 and os.getpid() != _ZYGOTE['zygote'].proc.pid
