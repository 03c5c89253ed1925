"""The suite's shared start-up (``harness.zygote``, used by ``run_swift`` for one-process runs and
for torchrun's ranks) changes nothing a run does: the same run forked from the zygote and started as a fresh process
(or under torchrun) logs the same losses, modes and metrics, and a refusal gives the same one line and exit code."""
import json
import os
import subprocess

import pytest
from conftest import (OFFLINE_ENV, SWIFT_GKD, _ZYGOTE, _free_port, _run_env, _zygote_for, base_args,
                      launcher_child_command, run_swift, run_swift_gkd)
from test_pipeline_consistency import TWO_RANKS, two_ranks_launched  # noqa: F401 (its shared launcher run)

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
    assert _ZYGOTE['swift'].runs  # the first run went through it
    assert forked.modes() == fresh.modes() and len(forked.logs) == 3
    for a, b in zip(forked.logs, fresh.logs):
        assert all(k in a for k in METRICS) and {k: a[k] for k in METRICS} == {k: b[k] for k in METRICS}


@pytest.mark.parametrize('flags,env', [({'beta': 1.5}, {}),
                                       # the plugin off at import: a zygote started with SWIFT_GKD_PLUGIN=0
                                       # (conftest.ZYGOTE_VARIANTS), whose start-up hooks refuse the plugin's flag
                                       ({'gkd_skd_top_k': 1}, {'SWIFT_GKD_PLUGIN': '0'})], ids=['plugin', 'plugin_off'])
def test_a_refusal_is_the_same_line_and_exit_code(tiny_ws, tmp_path, monkeypatch, flags, env):
    forked, fresh = _both(monkeypatch, lambda name: base_args(tiny_ws, str(tmp_path / name), **flags), check=False,
                          timeout=120, env=env)
    if env:
        assert _ZYGOTE['swift SWIFT_GKD_PLUGIN=0'].runs  # the forked run went through it
    assert forked.returncode == fresh.returncode == 2
    errors = [[line for line in run.output.splitlines() if line.startswith('swift rlhf: error: ')]
              for run in (forked, fresh)]
    assert errors[0] == errors[1] and len(errors[0]) == 1, forked.output[-2000:]


def test_a_swift_gkd_refusal_forked_is_the_fresh_processs(tiny_ws):
    """``run_swift_gkd`` (the serve-teacher refusals) forks ``swift-gkd`` from the ``'swift-gkd launcher'`` zygote:
    the same stdout, stderr and exit code as the console script started fresh."""
    argv = ['serve-teacher', '--model', tiny_ws.teacher, '--port', '70000']
    forked = run_swift_gkd(argv)
    assert _ZYGOTE['swift-gkd launcher'].runs  # it went through it
    fresh = subprocess.run([SWIFT_GKD, *argv], env=dict(os.environ, **OFFLINE_ENV), capture_output=True, text=True,
                           timeout=120)
    assert (forked.returncode, forked.stdout, forked.stderr) == (fresh.returncode, fresh.stdout, fresh.stderr) and \
        fresh.returncode == 2 and '--port must be in [0, 65535]' in fresh.stderr, (forked, fresh)


def test_a_run_past_its_timeout_is_stopped(tiny_ws, tmp_path):
    import subprocess
    with pytest.raises(subprocess.TimeoutExpired):
        run_swift(base_args(tiny_ws, str(tmp_path / 'out'), max_steps=1000), timeout=3)
    # the zygote serves the next run
    runs = _ZYGOTE['swift'].runs
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'next'), beta=1.5), check=False, timeout=120)
    assert run.returncode == 2 and _ZYGOTE['swift'].runs == runs + 1


def test_two_ranks_forked_from_the_zygote_equal_torchrun(tiny_ws, tmp_path, two_ranks_launched):
    """Two ranks (DDP on gloo, on-policy and seq_kd steps) forked from the torchrun zygote log what torchrun's two
    fresh ranks log, on both ranks: those started by the ``swift`` launcher in test_pipeline_consistency's shared run
    (``two_ranks_launched``, whose test checks that the launcher started the command ``run_swift`` forks)."""
    fresh = two_ranks_launched
    forked = run_swift(base_args(tiny_ws, str(tmp_path / 'forked'), **TWO_RANKS), nproc=2)
    assert _ZYGOTE['swift torchrun'].runs  # the forked run went through it
    assert forked.modes(0) == fresh.modes(0) and forked.modes(1) == fresh.modes(1)
    assert len(forked.logs) == len(fresh.logs) == 6
    for a, b in zip(forked.logs, fresh.logs):
        assert {k: a[k] for k in METRICS} == {k: b[k] for k in METRICS}


def test_a_rank_sees_torchruns_environment(tmp_path):
    """Each forked rank's environment is what torchrun gives its worker (this torch's torchrun, run here), but for the
    agent's own store and error-file paths."""
    script = tmp_path / 'dump_env.py'
    script.write_text('import json, os\n'
                      'path = os.path.join(os.environ["GKD_TEST_DUMP_DIR"], os.environ["RANK"])\n'
                      'json.dump(dict(os.environ), open(path, "w"))\n')
    env = dict(_run_env(), NPROC_PER_NODE='2', MASTER_PORT=str(_free_port()))
    dumps = {}
    for how in ('torchrun', 'forked'):
        env['GKD_TEST_DUMP_DIR'] = str(tmp_path / how)
        os.makedirs(env['GKD_TEST_DUMP_DIR'])
        child = launcher_child_command('rlhf', [], env)
        child[7] = str(script)
        if how == 'torchrun':
            subprocess.run(child, env=env, check=True, capture_output=True, timeout=120)
        else:
            zygote, nproc = _zygote_for(child, env)
            assert nproc == 2
            rc, out, err = zygote.run(child[7], [], env, 120, str(tmp_path), nproc=nproc, port=env['MASTER_PORT'])
            assert rc == 0, err
        dumps[how] = [json.load(open(os.path.join(env['GKD_TEST_DUMP_DIR'], str(rank)))) for rank in (0, 1)]
    agent_only = {'TORCHELASTIC_USE_AGENT_STORE', 'TORCHELASTIC_ERROR_FILE', 'GKD_TEST_DUMP_DIR'}
    for rank in (0, 1):
        torchrun, forked = ({k: v for k, v in d[rank].items() if k not in agent_only} for d in (dumps['torchrun'],
                                                                                                dumps['forked']))
        assert torchrun == forked, (set(torchrun.items()) ^ set(forked.items()))
        assert dumps['forked'][rank]['RANK'] == str(rank) and 'TORCHELASTIC_ERROR_FILE' in dumps['forked'][rank]


def test_a_failing_rank_stops_the_other_and_the_run_exits_1(tiny_ws, tmp_path):
    """As torchrun: rank 1 fails before the first collective, rank 0 (waiting there) is stopped, exit code 1."""
    script = tmp_path / 'fail_one.py'
    script.write_text('import os, time, sys\n'
                      'if os.environ["RANK"] == "1":\n    sys.exit(3)\n'
                      'time.sleep(600)\n')
    env = dict(_run_env(), NPROC_PER_NODE='2', MASTER_PORT=str(_free_port()))
    child = launcher_child_command('rlhf', [], env)
    zygote, nproc = _zygote_for(child, env)
    import time
    started = time.time()
    rc, _, _ = zygote.run(str(script), [], env, 120, str(tmp_path), nproc=nproc, port=env['MASTER_PORT'])
    assert rc == 1 and time.time() - started < 60


def test_what_an_import_sets_in_the_test_process_reaches_no_run(monkeypatch):
    """vLLM's import sets TORCHINDUCTOR_COMPILE_THREADS (and more) in the test process: a run's environment is still a
    user's (without it), so the runs after a vLLM test still fork from the zygote."""
    from conftest import IMPORT_SIDE_EFFECTS, _SHELL_HAD
    for name in IMPORT_SIDE_EFFECTS:
        if name not in _SHELL_HAD:
            monkeypatch.setenv(name, '1')
    env = _run_env()
    assert not any(name in env for name in IMPORT_SIDE_EFFECTS if name not in _SHELL_HAD)
    zygote, nproc = _zygote_for(launcher_child_command('rlhf', [], env), env)
    assert zygote is _ZYGOTE['swift'] and nproc == 1


def test_a_fork_inherits_deepspeed_and_a_heap_its_collections_skip(tmp_path):
    """The zygote imported deepspeed (every run's trainer does) and froze what its imports left (``gc.freeze``): a
    fork's ``gc.collect()`` does not walk the inherited heap."""
    script = tmp_path / 'heap.py'
    script.write_text('import gc, sys\nprint("deepspeed" in sys.modules, gc.get_freeze_count() > 100000)\n')
    env = _run_env()
    zygote, _ = _zygote_for(launcher_child_command('rlhf', [], env), env)
    rc, out, err = zygote.run(str(script), [], env, 120, str(tmp_path))
    assert rc == 0 and out.split() == ['True', 'True'], err


def test_inductors_python_subprocesses_leave_the_megatron_harness_out(monkeypatch):
    """The Megatron harness's ``sitecustomize`` keeps its folder off the ``PYTHONPATH`` of inductor's python
    subprocesses (the CPU instruction-set probe's ~10, each of which imported torch and the harness through it, ~28 s
    of CPU a Megatron zygote or rank): they get the rest of ``sys.path``."""
    import sys

    from harness import megatron_cpu
    site = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'megatron', 'cpu_site')
    monkeypatch.setattr(sys, 'path', [site, *sys.path])
    monkeypatch.setenv('TORCH_CUSTOM_PYTHONPATH', '')
    monkeypatch.delenv('TORCH_CUSTOM_PYTHONPATH')  # restored (unset) after the test
    megatron_cpu._probes_without(site)
    # inductor's subprocesses' PYTHONPATH (torch._inductor.utils.python_subprocess_env) where it is set
    assert os.environ['TORCH_CUSTOM_PYTHONPATH'].split(os.pathsep) == sys.path[1:]
    assert 'megatron_cpu.install(site_folder=' in open(os.path.join(site, 'sitecustomize.py')).read()


def test_a_preload_entry_with_a_function_runs_it_once_for_every_fork(tmp_path):
    """``module:function`` in the preload is called in the zygote: the Megatron zygote runs inductor's CPU
    instruction-set probe (a ``python`` subprocess per candidate, cached per process) once, and each fork inherits
    the answer instead of probing again. (Against a fork of the worker's ``'swift'`` zygote, whose preload of
    modules alone, torch's included, leaves that cache empty.)"""
    from harness.zygote import MEGATRON_PRELOAD, PRELOAD, Zygote
    assert 'torch._inductor.cpu_vec_isa:pick_vec_isa' in MEGATRON_PRELOAD and not any(':' in p for p in PRELOAD)
    script = tmp_path / 'probed.py'
    script.write_text('from torch._inductor.cpu_vec_isa import valid_vec_isa_list\n'
                      'print("cached", valid_vec_isa_list.cache_info().currsize)\n')
    env = _run_env()
    outputs = []
    for n in range(2):
        workdir = tmp_path / str(n)
        workdir.mkdir()
        zygote = _zygote_for(launcher_child_command('rlhf', [], env), env)[0] if n == 0 else \
            Zygote(env, ('torch._inductor.cpu_vec_isa:pick_vec_isa', ))
        try:
            rc, out, err = zygote.run(str(script), [], env, 120, str(workdir))
        finally:
            if n:
                zygote.close()
        assert rc == 0, err
        outputs.append(out.strip())
    assert outputs == ['cached 0', 'cached 1']


def test_one_zygote_serves_several_workers_at_once(tmp_path):
    """A shared zygote (``shared_dir``: the session's xdist workers) starts once for every client of the same
    environment and preload, and serves their runs at the same time: two runs that each wait for the other's file
    end only if both run together."""
    import threading

    from harness.zygote import Zygote
    script = tmp_path / 'meet.py'
    script.write_text('import os, sys, time\n'
                      'me, other = sys.argv[1:]\n'
                      'open(me, "w").close()\n'
                      'while not os.path.exists(other):\n    time.sleep(0.05)\n'
                      'print(os.getpid())\n')
    env, started = _run_env(), []
    clients = [Zygote(env, ('json', ), shared_dir=str(tmp_path), on_start=started.append) for _ in range(2)]
    results = {}

    def run(n):
        workdir = tmp_path / f'run{n}'
        workdir.mkdir()
        results[n] = clients[n].run(str(script), [str(tmp_path / f'm{n}'), str(tmp_path / f'm{1 - n}')], env, 60,
                                    str(workdir))
    try:
        run_first = threading.Thread(target=run, args=(0, ))
        run_first.start()
        run(1)
        run_first.join()
    finally:
        os.killpg(clients[0].pid, 9)
    assert len(started) == 1 and clients[0].pid == clients[1].pid  # one start-up for both
    assert [results[n][0] for n in (0, 1)] == [0, 0], results
    assert results[0][1] != results[1][1]  # two forks
