"""One-step smoke runs of every method of ``benchmarks/bench_quality.py`` and of the RL methods of
``benchmarks/bench_rl.py`` (quick presets' configuration, real ``swift sft`` / ``swift rlhf``)."""
from __future__ import annotations

import importlib.util
import json
import os

import pytest
from conftest import run_swift

from swift_gkd_plugin.demo import quality_task, tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_bench(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, 'benchmarks', f'{name}.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _load_bench('bench_quality')
rl_bench = _load_bench('bench_rl')
xtok_bench = _load_bench('bench_xtok')


def _as_the_suite_runs(argv):
    """The bench's ``swift`` command line, started as the suite starts every run (``conftest.run_swift``: a fork of
    the warm interpreter, the suite's offline environment) instead of a fresh process (``bench.run_command``)."""
    run = run_swift(argv[2:], command=argv[1], check=False)
    return run.returncode, run.output


@pytest.fixture(scope='module')
def quality_ws(tmp_path_factory):
    root = str(tmp_path_factory.mktemp('quality_ws'))
    return quality_task.build_workspace(root, n_train=64, n_test=8, teacher_steps=2, student_steps=2, batch_size=8,
                                        log=lambda msg: None)


def _modes(output_dir):
    with open(os.path.join(output_dir, 'gkd_modes', 'rank0.jsonl')) as f:
        return [json.loads(line)['mode'] for line in f]


EXPECTED_MODE = {'seqkd': 'seq_kd', 'supkd': 'off_policy', 'onpolicy_beta0': 'on_policy',
                 'onpolicy_beta0.5': 'on_policy', 'onpolicy_beta1': 'on_policy', 'skd': 'on_policy'}


@pytest.mark.parametrize('method', list(bench.METHODS))
def test_each_method_runs_one_step_and_is_scored(method, quality_ws, tmp_path):
    cfg = dict(bench.PRESETS['quick'], steps=1, eval_every=1)
    checkpoints = bench.run_method(method, quality_ws, cfg, 0, str(tmp_path), run=_as_the_suite_runs)
    assert [os.path.basename(c) for c in checkpoints] == ['checkpoint-1']
    if method in EXPECTED_MODE:  # the mode schedule: lmbda 0 / 1 decide every step
        assert _modes(os.path.dirname(checkpoints[0])) == [EXPECTED_MODE[method]]
    rows = tiny.read_dataset(quality_ws['test'])
    curve = bench.evaluate_curve(checkpoints, quality_ws, rows, tiny.load_tokenizer(quality_ws['tokenizer']))
    assert [p['step'] for p in curve] == [0, 1]
    assert all(0.0 <= curve[-1][m] <= 1.0 for m in bench.METRICS)
    assert ('skd_replaced_fraction' in curve[-1]) == (method == 'skd')  # SKD reports its replaced fraction
    if method == 'skd':
        assert 0.0 <= curve[-1]['skd_replaced_fraction'] <= 1.0


def test_closing_line_names_skd_and_the_gap_closed_by_the_better_of_onpolicy_and_skd():
    em = {'sft': 0.5, 'seqkd': 0.45, 'supkd': 0.52, 'onpolicy_beta0': 0.2, 'onpolicy_beta0.5': 0.3,
          'onpolicy_beta1': 0.25, 'mixed': 0.4, 'skd': 0.6}
    summary = {m: {'exact_match': (v, 0.0)} for m, v in em.items()}
    ws = {'teacher_eval': {'exact_match': 0.9}, 'student_eval': {'exact_match': 0.1}}
    assert bench.closing_line(summary, ws) == ('quality: teacher 0.900, start 0.100, sft 0.500, seqkd 0.450, supkd '
                                               '0.520, onpolicy 0.300 (beta 0.5), mixed 0.400, skd 0.600, gap closed '
                                               '62%')
    summary['skd'] = {'exact_match': (0.2, 0.0)}  # on-policy better: its gap, (0.3 - 0.1) / 0.8
    assert bench.closing_line(summary, ws).endswith('skd 0.200, gap closed 25%')


def test_a_saved_curve_is_reused_only_with_the_same_settings(tmp_path, monkeypatch):
    """Runs are cached under a hash of their whole configuration: a run of other settings (a step count, a learning
    rate, a temperature, a method flag) in the same work directory is cached beside the first, never over it."""
    cfg = dict(bench.PRESETS['quick'])
    ws = {'student': '/ws/student', 'teacher': '/ws/teacher', 'train': '/ws/train.jsonl'}
    curve = [{'step': 0, 'exact_match': 0.5}]
    bench.save_curve(str(tmp_path), 'onpolicy_beta1', ws, cfg, 0, curve)
    assert bench.cached_curve(str(tmp_path), 'onpolicy_beta1', ws, cfg, 0) == curve
    assert bench.cached_curve(str(tmp_path), 'onpolicy_beta1', ws, dict(cfg, seeds=[0, 1, 2]), 0) == curve
    assert bench.cached_curve(str(tmp_path), 'onpolicy_beta1', ws, dict(cfg, steps=cfg['steps'] + 1), 0) is None
    assert bench.cached_curve(str(tmp_path), 'onpolicy_beta1', ws, cfg, 1) is None
    assert bench.cached_curve(str(tmp_path), 'onpolicy_beta1', dict(ws, teacher='/ws/other'), cfg, 0) is None
    methods = dict(bench.METHODS, onpolicy_beta1=('rlhf', dict(bench.METHODS['onpolicy_beta1'][1], beta='0.9')))
    assert bench.cached_curve(str(tmp_path), 'onpolicy_beta1', ws, cfg, 0, methods) is None
    for name, value in (('LEARNING_RATE', '3e-4'), ('TEMPERATURE', '0.7')):
        with monkeypatch.context() as patched:
            patched.setattr(bench, name, value)
            assert bench.cached_curve(str(tmp_path), 'onpolicy_beta1', ws, cfg, 0) is None
            other = [{'step': 0, 'exact_match': 0.25}]
            bench.save_curve(str(tmp_path), 'onpolicy_beta1', ws, cfg, 0, other)
            assert bench.cached_curve(str(tmp_path), 'onpolicy_beta1', ws, cfg, 0) == other
        assert bench.cached_curve(str(tmp_path), 'onpolicy_beta1', ws, cfg, 0) == curve  # the first one is kept
    assert len(os.listdir(tmp_path / 'runs')) == 3
    assert bench.run_key('onpolicy_beta1', ws, cfg, 0).startswith('onpolicy_beta1_seed0-')


def _logs(output_dir):
    with open(os.path.join(output_dir, 'logging.jsonl')) as f:
        rows = [json.loads(line) for line in f]
    return [row for row in rows if 'loss' in row]  # the training steps' rows, not the closing summary


@pytest.mark.parametrize('method,reward_key', [('grpo', 'rewards/SortExactMatch/mean'),
                                               ('gkd_rl_c1', 'gkd/rewards/sort_exact_match/mean')])
def test_rl_methods_run_with_the_exact_match_reward(method, reward_key, quality_ws, tmp_path):
    """GRPO (ms-swift's trainer) and GKD + RL (the plugin's) score G = 4 samples per prompt with the reward file."""
    cfg = dict(rl_bench.PRESETS['quick'], steps=1, eval_every=1)
    methods = rl_bench.rl_methods(['1'])
    checkpoints = bench.run_method(method, quality_ws, cfg, 0, str(tmp_path), methods, run=_as_the_suite_runs)
    assert [os.path.basename(c) for c in checkpoints] == ['checkpoint-1']
    output_dir = os.path.dirname(checkpoints[0])
    with open(os.path.join(output_dir, 'args.json')) as f:
        args = json.load(f)
    assert args['rlhf_type'] == ('grpo' if method == 'grpo' else 'gkd') and args['num_generations'] == 4
    if method == 'grpo':
        assert args['teacher_model'] is None  # no OPD-RL teacher signal: plain GRPO
    else:
        assert args['gkd_rl_coef'] == 1.0
    [row] = _logs(output_dir)
    assert 0.0 <= row[reward_key] <= 1.0


def test_rl_closing_line_and_checkpoint_table():
    curve = [{'step': 0, 'exact_match': 0.4}, {'step': 20, 'exact_match': 0.6}]
    curves = {m: {0: curve, 1: [curve[0], dict(curve[1], exact_match=0.8)]}
              for m in ('gkd', 'grpo', 'gkd_rl_c0.5', 'gkd_rl_c2', 'sft')}
    curves['gkd_rl_c2'][0] = [curve[0], dict(curve[1], exact_match=0.9)]
    summary = {m: {'exact_match': bench.mean_std([c[-1]['exact_match'] for c in by_seed.values()])}
               for m, by_seed in curves.items()}
    ws = {'teacher_eval': {'exact_match': 0.67}, 'student_eval': {'exact_match': 0.45}}
    line = rl_bench.closing_line(summary, ws, '0.5')  # the coefficient chosen beforehand, not the best one (2)
    assert line.startswith('rl: teacher 0.670, start 0.450, gkd 0.700+-0.141, grpo 0.700+-0.141, gkd_rl 0.700+-0.141, '
                           'sft 0.700+-0.141 (gkd_rl: c 0.5;')
    table = rl_bench.checkpoint_table(curves).splitlines()
    assert table[0] == '| method | step 0 | step 20 |'
    assert table[2] == '| gkd | 0.400 ± 0.000 | 0.700 ± 0.141 |'


def test_xtok_methods_differ_from_gkd_same_only_in_the_teacher_and_the_flag():
    methods = xtok_bench.xtok_methods({'xtok_teacher': '/ws/xtok_teacher'}, '1', '0.5')
    assert methods['sft'] == ('sft', {}) and methods['gkd_same'] == ('rlhf', {'lmbda': '1', 'beta': '0.5'})
    for kind in ('uld', 'hybrid'):
        assert methods[f'gkd_xtok_{kind}'] == ('rlhf', dict(methods['gkd_same'][1], teacher_model='/ws/xtok_teacher',
                                                            gkd_cross_tokenizer=kind))
    assert methods['gkd_xtok_uld_sft'] == ('rlhf', dict(methods['gkd_xtok_uld'][1], sft_alpha='1'))
    assert 'gkd_xtok_uld_sft' not in xtok_bench.parse_args([]).methods  # an extra, run on request
    seq_kd = xtok_bench.xtok_methods({'xtok_teacher': '/ws/xtok_teacher'}, '0', '0.5', seq_kd=True)
    assert seq_kd['gkd_same'] == ('rlhf', {'lmbda': '0', 'beta': '0.5', 'seq_kd': 'true'})
    assert seq_kd['gkd_xtok_hybrid'][1]['seq_kd'] == 'true'


def test_xtok_closing_line_reports_the_kept_share_of_the_same_tokenizer_gain():
    final = {'sft': 0.5, 'gkd_same': 0.4, 'gkd_xtok_uld': 0.2, 'gkd_xtok_hybrid': 0.37}
    summary = {m: {'exact_match': (em, 0.01)} for m, em in final.items()}
    ws = {'student_eval': {'exact_match': 0.1}, 'teacher_eval': {'exact_match': 0.985},
          'xtok_teacher_eval': {'exact_match': 0.995}}
    line = xtok_bench.closing_line(summary, ws, '1', '0.5')
    assert line.startswith('xtok: same-tokenizer gain 0.300+-0.010, uld keeps 33% (gain 0.100), '
                           'hybrid keeps 90% (gain 0.270), sft gain 0.400; start 0.100, teachers 0.985 (same) / '
                           '0.995 (xtok); lmbda 1, beta 0.5, T ')


@pytest.fixture(scope='module')
def xtok_ws(quality_ws):
    root = os.path.dirname(quality_ws['teacher'])
    return {**quality_ws, **quality_task.build_xtok_teacher(root, teacher_steps=2, batch_size=8, log=lambda msg: None)}


def test_xtok_hybrid_runs_one_on_policy_step_through_the_other_family_teacher(xtok_ws, tmp_path):
    """bench_xtok's cross-tokenizer command line works end to end (needs the --gkd_cross_tokenizer wiring)."""
    cfg = dict(xtok_bench.PRESETS['quick'], steps=1, eval_every=1)
    methods = xtok_bench.xtok_methods(xtok_ws, '1', '0.5')
    checkpoints = xtok_bench.bq.run_method('gkd_xtok_hybrid', xtok_ws, cfg, 0, str(tmp_path), methods,
                                             run=_as_the_suite_runs)
    assert [os.path.basename(c) for c in checkpoints] == ['checkpoint-1']
    with open(os.path.join(os.path.dirname(checkpoints[0]), 'run.log')) as f:
        log = f.read()
    assert "'gkd/xtok_exact_fraction'" in log and "'gkd/mode_on_policy': '1'" in log
