"""``bench_quality.py --preset staleness`` (issue 73 item 8): the grid the docs report, runs keyed without the server's
ports, and the paired comparison with the synchronous runs.  No run: the measurement itself is a benchmark, not CI."""
from __future__ import annotations

import os

from test_quality_bench import ROOT, bench

from swift_gkd_plugin.options.flags import PLUGIN_FLAGS
from swift_gkd_plugin.rollout.colocated_vllm import cpu_head_sizes
from swift_gkd_plugin.demo import tiny

staleness = bench.staleness

GRID = {'sync_beta0': ('0', 'false'), 'async1_beta0': ('0', 'true'),
        'sync_beta1': ('1', 'false'), 'async1_beta1': ('1', 'true')}
if 'gkd_max_staleness' in PLUGIN_FLAGS:  # the deeper queue: a sync every 4 steps
    GRID.update({'async4_beta0': ('0', 'true'), 'async4_beta1': ('1', 'true')})
WS = {'student': 's', 'teacher': 't', 'train': 'train.jsonl', 'teacher_eval': {'exact_match': 0.9},
      'student_eval': {'exact_match': 0.1}}


def _flag(argv, name):
    return argv[argv.index(f'--{name}') + 1]


def test_the_grid_is_on_policy_sync_against_async_at_beta_0_and_1_on_a_server():
    assert set(staleness.STALENESS_METHODS) == set(GRID)
    for preset in staleness.STALENESS_PRESETS.values():
        assert len(preset['seeds']) >= 3
    cfg = staleness.STALENESS_PRESETS['quick']
    for method, (beta, asynchronous) in GRID.items():
        argv = bench.method_command(method, WS, cfg, 0, 'out', staleness.STALENESS_METHODS)
        assert (_flag(argv, 'lmbda'), _flag(argv, 'beta'), _flag(argv, 'async_generate')) == ('1', beta, asynchronous)
        assert (_flag(argv, 'use_vllm'), _flag(argv, 'vllm_mode')) == ('true', 'server')
        depth = method.split('_')[0][len('async'):]
        assert ('--gkd_max_staleness' in argv) == (depth not in ('', '1'))
        if depth not in ('', '1'):
            assert _flag(argv, 'gkd_max_staleness') == depth
        # the server's ports are added per run (staleness._server_runner), so a rerun's cache key does not change
        assert '--vllm_server_port' not in argv and '--vllm_server_group_port' not in argv


def test_the_student_has_heads_vllms_cpu_build_takes_and_the_defaults_size():
    kwargs = staleness.STALENESS_STUDENT
    assert kwargs['hidden_size'] // kwargs['num_heads'] in cpu_head_sizes()
    default = tiny.STUDENT_KWARGS
    for key in ('hidden_size', 'num_layers', 'intermediate_size'):
        assert kwargs[key] == default[key]
    # q, k, v widths equal the default student's: the same parameter count
    assert kwargs['num_kv_heads'] * kwargs['hidden_size'] // kwargs['num_heads'] == \
        default['num_kv_heads'] * default['hidden_size'] // default['num_heads']


def test_async_runs_are_compared_with_the_synchronous_run_of_the_same_seed_and_beta():
    def curve(em):
        return [{'exact_match': 0.1}, {'exact_match': em}]
    curves = {'sync_beta1': {0: curve(0.5), 1: curve(0.7), 2: curve(0.6)},
              'async1_beta1': {0: curve(0.4), 1: curve(0.7), 2: curve(0.4)}}
    summary = {m: {'exact_match': staleness.mean_std([c[-1]['exact_match'] for c in by_seed.values()])}
               for m, by_seed in curves.items()}
    rows = {r['method']: r for r in staleness.versus_sync(summary, curves, WS)}
    assert 'minus_sync' not in rows['sync_beta1']
    diff, std = rows['async1_beta1']['minus_sync']
    assert abs(diff - (-0.1 - 0.0 - 0.2) / 3) < 1e-12 and abs(std - 0.1) < 1e-12
    assert abs(rows['sync_beta1']['gap_closed'] - (0.6 - 0.1) / 0.8 * 100) < 1e-9
    line = staleness.staleness_closing_line(list(rows.values()), WS)
    assert line.startswith('quality[staleness]: teacher 0.900, start 0.100, ') and 'async1_beta1 0.500' in line


def test_the_docs_report_every_method_of_the_grid():
    for page in ('docs_en/vllm.md', 'docs_zh/vllm.md', 'benchmarks/README.md'):
        with open(os.path.join(ROOT, page), encoding='utf-8') as f:
            text = f.read()
        assert '--preset staleness' in text, page
        for method in GRID:
            assert f'`{method}`' in text or f'| {method} |' in text, (page, method)


def test_a_deep_queue_under_reverse_kl_is_warned_at_start_up_with_the_measured_loss():
    from types import SimpleNamespace

    from swift_gkd_plugin.swift.setup.vllm import STALE_FKL_LOSS, STALE_RKL_LOSS, stale_sample_warnings

    def warnings(**flags):
        return stale_sample_warnings(SimpleNamespace(**dict(dict(async_generate=True, gkd_max_staleness=4,
                                                                 gkd_divergence='jsd', beta=1.0), **flags)))
    [warning] = warnings()
    assert '--gkd_max_staleness 4' in warning and '--beta 1 ' in warning and STALE_RKL_LOSS in warning
    assert len(warnings(gkd_divergence='skew_rkl', beta=None)) == 1
    assert warnings(beta=0.0) == warnings(beta=0.5) == warnings(gkd_divergence='skew_kl') == []
    assert warnings(gkd_max_staleness=1) == warnings(async_generate=False) == []
    # the figures the warning quotes are the docs' measurement
    with open(os.path.join(ROOT, 'docs_en', 'vllm.md'), encoding='utf-8') as f:
        text = f.read()
    assert STALE_RKL_LOSS in text and STALE_FKL_LOSS in text
