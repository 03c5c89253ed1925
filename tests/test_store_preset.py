"""``bench_quality.py --preset store`` (issue 80): live forward KL against a teacher-score store's top-k and sampled
tokens.  The methods' and the score's command lines, the check that a store run was answered by the store on every
step, the paired comparison with ``live``; and the preset's pipeline once on the small workspace: ``swift-gkd score``'s
command line, then one step of ``store_sampled`` from it (real ``swift rlhf``, as the default preset's methods run in
test_quality_bench.py)."""
from __future__ import annotations

import json
import os

import pytest
from test_quality_bench import ROOT, _as_the_suite_runs, bench, quality_ws  # noqa: F401 - quality_ws: the fixture

store = bench.store
WS = {'student': 's', 'teacher': 't', 'train': 'train.jsonl', 'teacher_eval': {'exact_match': 0.9},
      'student_eval': {'exact_match': 0.1}}


def _flag(argv, name):
    return argv[argv.index(f'--{name}') + 1] if f'--{name}' in argv else None


def _pairs(argv):
    assert argv[1] == 'rlhf' and len(argv) % 2 == 0
    return {k[2:]: v for k, v in zip(argv[2::2], argv[3::2])}


def test_every_method_is_off_policy_forward_kl_and_differs_from_live_only_in_where_the_teacher_answers():
    methods = store.store_methods('/ws/store')
    assert list(methods) == list(store.STORE_METHOD_NAMES) == list(bench.parse_args(['--preset', 'store']).methods
                                                                   [-len(methods):])
    assert methods['live'] == ('rlhf', dict(bench.METHODS['supkd'][1], seq_kd='false'))  # the default's supkd
    cfg = store.STORE_PRESETS['quick']
    live = bench.method_command('live', WS, cfg, 0, 'out', methods)
    assert (_flag(live, 'lmbda'), _flag(live, 'seq_kd'), _flag(live, 'beta')) == ('0', 'false', '0')
    assert _flag(live, 'gkd_logits_topk') is None and _flag(live, 'teacher_scores') is None  # the full vocabulary
    extra = {'store_topk': {'teacher_scores': '/ws/store', 'gkd_logits_topk': '8'},
             'store_topk_tail': {'teacher_scores': '/ws/store', 'gkd_logits_topk': '8', 'gkd_topk_tail': 'true'},
             'store_sampled': {'teacher_scores': '/ws/store', 'teacher_scores_samples': '12'}}
    base = _pairs(live)
    for method, flags in extra.items():
        pairs = _pairs(bench.method_command(method, WS, cfg, 0, 'out', methods))
        assert {k: v for k, v in pairs.items() if k not in base} == flags, method
        assert {k: v for k, v in pairs.items() if k in base} == base  # the teacher flag stays: not loaded (covered)
    assert store.STORE_PRESETS['full']['seeds'] == [0, 1, 2]
    assert store.STORE_PRESETS['quick']['steps'] < store.STORE_PRESETS['full']['steps']


def test_the_score_encodes_the_rows_as_the_methods_do():
    cfg = store.STORE_PRESETS['quick']
    flags = store.score_flags(bench, WS, cfg, '/ws/store')
    live = bench.method_command('live', WS, cfg, 0, 'out', store.store_methods('/ws/store'))
    for name in ('dataset', 'template', 'max_length', 'model_type', 'temperature'):
        assert _flag(flags, name) == _flag(live, name), name
    assert (_flag(flags, 'gkd_logits_topk'), _flag(flags, 'teacher_scores_samples')) == ('8', '12')
    assert _flag(flags, 'teacher_model') == 't' and _flag(flags, 'output_dir') == '/ws/store'
    argv = store.score_command_line(flags)
    assert argv[1] == 'rlhf' and _flag(argv, 'gkd_score_only') == 'true' and _flag(argv, 'model') == 't'
    assert _flag(argv, 'save_teacher_scores') == '/ws/store'


def _write_log(output_dir, values, steps):
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, 'logging.jsonl'), 'w') as f:
        for step, value in zip(steps, values):
            f.write(json.dumps({'loss': 1.0, 'grad_norm': 0.5, 'gkd/teacher_store_rows': value,
                                'global_step/max_steps': f'{step}/{steps[-1]}'}) + '\n')
        f.write(json.dumps({'train_loss': 1.0, 'global_step/max_steps': f'{steps[-1]}/{steps[-1]}'}) + '\n')


def test_a_store_run_whose_teacher_scored_a_row_or_that_logged_too_little_stops_the_benchmark(tmp_path):
    out = str(tmp_path / 'run')
    _write_log(out, [1.0] * 4, [5, 10, 15, 20])
    store.check_store_rows(out, 20)
    _write_log(out, [1.0, 0.875, 1.0, 1.0], [5, 10, 15, 20])
    with pytest.raises(SystemExit, match=r'not 1.0 at \(step, value\) \[\(10, 0.875\)\].*invalid'):
        store.check_store_rows(out, 20)
    _write_log(out, [1.0, 1.0, 1.0], [5, 15, 20])
    with pytest.raises(SystemExit, match=r'missing \[10\]'):
        store.check_store_rows(out, 20)
    with pytest.raises(SystemExit, match='do not cover steps 1 to 25'):
        _write_log(out, [1.0] * 4, [5, 10, 15, 20])
        store.check_store_rows(out, 25)
    with pytest.raises(SystemExit, match='no logged training step'):
        store.check_store_rows(str(tmp_path / 'none'), 20)


def test_store_methods_are_compared_with_live_by_seed():
    def curve(em):
        return [{'exact_match': 0.1}, {'exact_match': em}]
    curves = {'live': {0: curve(0.5), 1: curve(0.7), 2: curve(0.6)},
              'store_sampled': {0: curve(0.4), 1: curve(0.7), 2: curve(0.4)}}
    summary = {m: {'exact_match': store.mean_std([c[-1]['exact_match'] for c in by_seed.values()])}
               for m, by_seed in curves.items()}
    logs = {m: {s: {'grad_norm': g} for s, g in enumerate((1.0, 2.0, 3.0))} for m in curves}
    gaps = {'start': {'student_mass_outside_topk': 0.25, 'forward_kl': 1.0},
            'live': {s: {'student_mass_outside_topk': 0.1, 'forward_kl': 0.4} for s in range(3)}}
    rows = {r['method']: r for r in store.versus_live(summary, curves, WS, logs, gaps)}
    assert 'minus_live' not in rows['live'] and rows['live']['grad_norm'] == (2.0, 1.0)
    assert rows['live']['forward_kl'] == pytest.approx((0.4, 0.0)) and 'forward_kl' not in rows['store_sampled']
    table = store.store_table(list(rows.values()), 3, 120, gaps).splitlines()
    assert table[2] == '| start | | | | | | 0.2500 | 1.0000 |'
    assert table[4].startswith('| store_sampled | 0.500 ± 0.173 | 50% | -0.100 ± 0.100 | 0.400 / 0.700 / 0.400 |')
    diff, std = rows['store_sampled']['minus_live']
    assert abs(diff - (-0.1 - 0.0 - 0.2) / 3) < 1e-12 and abs(std - 0.1) < 1e-12
    assert rows['store_sampled']['per_seed'] == {0: 0.4, 1: 0.7, 2: 0.4}
    line = store.store_closing_line(list(rows.values()), WS, {'topk': 8, 'vocab_size': 448, 'topk_mass_mean': 0.5,
                                                              'samples': 12})
    assert line.startswith('quality[store]: teacher 0.900, start 0.100, live 0.600 ± 0.100 (62%), store_sampled '
                           '0.500 ± 0.173 (50%, -0.100 vs live), top-8 of 448 holds 50.00%')


def test_the_store_is_scored_once_and_a_sampled_run_reads_every_row_from_it(quality_ws, tmp_path):  # noqa: F811
    """The preset's own pipeline on the small workspace: the score (its swift rlhf command line) covers the training
    file, a one-step ``store_sampled`` run finds every row (``gkd/teacher_store_rows`` 1.0) without the teacher, and
    a second call reuses the store."""
    cfg = dict(store.STORE_PRESETS['quick'], steps=1, eval_every=1)
    workdir = str(tmp_path)
    info = store.ensure_store(bench, quality_ws, cfg, workdir, run=_as_the_suite_runs)
    assert info['rows'] == 64 and (info['topk'], info['samples'], info['vocab_size']) == (8, 12, 448)
    assert 0.0 < info['topk_mass_min'] <= info['topk_mass_mean'] <= 1.0
    assert store.ensure_store(bench, quality_ws, cfg, workdir, run=None)['store'] == info['store']  # not run again
    methods = store.store_methods(info['store'])
    checkpoints = bench.run_method('store_sampled', quality_ws, cfg, 0, os.path.join(workdir, 'runs'), methods,
                                   run=_as_the_suite_runs)
    assert [os.path.basename(c) for c in checkpoints] == ['checkpoint-1']
    [entry] = store.run_logs(bench, workdir, quality_ws, cfg, methods, ['store_sampled'])['store_sampled'].values()
    assert entry['teacher_loaded'] is False and entry['grad_norm'] > 0
    gaps = store.distribution_gaps(bench, workdir, quality_ws, cfg, methods, ['store_sampled'])
    for gap in (gaps['start'], gaps['store_sampled'][0]):
        assert 0.0 <= gap['student_mass_outside_topk'] <= 1.0 and gap['forward_kl'] >= 0.0


def test_the_benchmarks_readme_reports_every_method():
    with open(os.path.join(ROOT, 'benchmarks', 'README.md'), encoding='utf-8') as f:
        text = f.read()
    assert '--preset store' in text
    for method in store.STORE_METHOD_NAMES:
        assert f'| `{method}` |' in text, method
