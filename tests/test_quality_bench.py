"""One-step smoke runs of every method of ``benchmarks/bench_quality.py`` (quick preset's configuration, real
``swift sft`` / ``swift rlhf``), and ``swift-gkd demo`` refusing a run that did not use the plugin."""
from __future__ import annotations

import glob
import importlib.util
import json
import os

import pytest

from swift_gkd_plugin import cli
from swift_gkd_plugin.testing import quality_task, tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_bench():
    spec = importlib.util.spec_from_file_location('bench_quality', os.path.join(ROOT, 'benchmarks', 'bench_quality.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _load_bench()


@pytest.fixture(scope='module')
def quality_ws(tmp_path_factory):
    root = str(tmp_path_factory.mktemp('quality_ws'))
    return quality_task.build_workspace(root, n_train=64, n_test=8, teacher_steps=2, student_steps=2, batch_size=8,
                                        log=lambda msg: None)


def _modes(output_dir):
    with open(os.path.join(output_dir, 'gkd_modes', 'rank0.jsonl')) as f:
        return [json.loads(line)['mode'] for line in f]


EXPECTED_MODE = {'seqkd': 'seq_kd', 'supkd': 'off_policy', 'onpolicy_beta0': 'on_policy',
                 'onpolicy_beta0.5': 'on_policy', 'onpolicy_beta1': 'on_policy'}


@pytest.mark.parametrize('method', list(bench.METHODS))
def test_each_method_runs_one_step_and_is_scored(method, quality_ws, tmp_path):
    cfg = dict(bench.PRESETS['quick'], steps=1, eval_every=1)
    checkpoints = bench.run_method(method, quality_ws, cfg, 0, str(tmp_path))
    assert [os.path.basename(c) for c in checkpoints] == ['checkpoint-1']
    if method in EXPECTED_MODE:  # the mode schedule: lmbda 0 / 1 decide every step
        assert _modes(os.path.join(tmp_path, f'{method}_seed0')) == [EXPECTED_MODE[method]]
    rows = tiny.read_dataset(quality_ws['test'])
    curve = bench.evaluate_curve(checkpoints, quality_ws, rows, tiny.load_tokenizer(quality_ws['tokenizer']))
    assert [p['step'] for p in curve] == [0, 1]
    assert all(0.0 <= curve[-1][m] <= 1.0 for m in bench.METRICS)


def test_demo_fails_loudly_when_the_plugin_did_not_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv('SWIFT_GKD_PLUGIN', '0')  # ms-swift's own GKD trainer runs
    code = cli.main(['demo', '--workdir', str(tmp_path), '--steps', '1', '--teacher_steps', '2'])
    err = capsys.readouterr().err
    assert code != 0
    assert 'did not use swift-gkd-plugin' in err and 'GKD trainer active' in err
    assert not glob.glob(os.path.join(tmp_path, 'output', '**', 'gkd_modes'), recursive=True)


def test_a_saved_curve_is_reused_only_with_the_same_settings(tmp_path):
    cfg = dict(bench.PRESETS['quick'])
    os.makedirs(tmp_path / 'runs')
    curve = [{'step': 0, 'exact_match': 0.5}]
    bench.save_curve(str(tmp_path), 'onpolicy_beta1', 0, cfg, curve)
    assert bench.cached_curve(str(tmp_path), 'onpolicy_beta1', 0, cfg) == curve
    assert bench.cached_curve(str(tmp_path), 'onpolicy_beta1', 0, dict(cfg, seeds=[0, 1, 2])) == curve
    assert bench.cached_curve(str(tmp_path), 'onpolicy_beta1', 0, dict(cfg, steps=cfg['steps'] + 1)) is None
    assert bench.cached_curve(str(tmp_path), 'onpolicy_beta1', 1, cfg) is None
