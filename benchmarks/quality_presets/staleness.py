"""``--preset staleness``: on-policy GKD sampled on a ``swift rollout`` server (``--vllm_mode server``), synchronously
against ``--async_generate true`` (each step trains samples drawn one weight version earlier), at beta 0 (forward
KL) and beta 1 (reverse KL).  Does a stale sample cost quality, and does forward KL tolerate it where reverse KL does
not (AsyncOPD, arXiv 2606.24143)?

The default preset's task, teacher, data, learning rate and scoring (greedy exact match on the held-out prompts); the
student has the default's sizes but heads of 32 (2 heads, 1 KV head: the same parameter count), because vLLM's CPU
build takes no smaller head.  One server for all runs, started on the warm-started student: every run syncs its
weights before its first sample (the rollout tests check it), so runs sharing the server start from the same weights.
Without a GPU the server is vLLM's CPU build and the weight sync runs over the tests' gloo stand-in for ms-swift's
NCCL communicator (``tests/rollout_cpu_site``, on both processes' ``PYTHONPATH``: test-only), as in
``bench_async.py``.  Results under ``<workdir>/staleness`` (``staleness_lr<rate>`` at another ``--learning_rate``);
the last line is ``quality[staleness]: ...``.
"""
from __future__ import annotations

import json
import os
import signal
import statistics
from typing import Any, Dict, List

from swift_gkd_plugin.options.flags import PLUGIN_FLAGS
from swift_gkd_plugin.demo import tiny

from quality_presets.common import log, mean_std
from quality_presets.default import DEFAULT_LEARNING_RATE
from quality_presets.default import workspace as default_workspace

#: the default preset's student with heads of 32 (hidden 64 = 2 heads x 32, one KV head of 32: same parameters)
STALENESS_STUDENT = dict(tiny.STUDENT_KWARGS, num_heads=2, num_kv_heads=1)
_COMMON = dict(batch_size=16, n_train=4000, n_test=200, teacher_steps=300, student_steps=60, eval_every=20)
STALENESS_PRESETS = {
    'quick': dict(_COMMON, seeds=[0, 1, 2], steps=60),
    'full': dict(_COMMON, seeds=[0, 1, 2, 3, 4], steps=120),
}
#: the server flags every method shares; the port and the weight-sync port are added per run (not in the cache key)
SERVER_FLAGS = {'use_vllm': 'true', 'vllm_mode': 'server', 'vllm_server_host': '127.0.0.1',
                'vllm_server_timeout': '300'}
BETAS = ('0', '1')
#: ``--async_generate``'s depths measured: 0 = synchronous, 1 = one version stale (ms-swift's one step), 4 =
#: ``--gkd_max_staleness 4`` where the plugin has the flag (a sync every 4 steps: samples 1 to 4 versions old)
DEPTHS = (0, 1, 4) if 'gkd_max_staleness' in PLUGIN_FLAGS else (0, 1)


def method_name(beta: str, depth: int) -> str:
    return f"{'sync' if depth == 0 else f'async{depth}'}_beta{beta}"


def _flags(beta: str, depth: int) -> Dict[str, str]:
    flags = {'lmbda': '1', 'beta': beta, **SERVER_FLAGS, 'async_generate': 'true' if depth else 'false'}
    if depth > 1:
        flags['gkd_max_staleness'] = str(depth)
    return flags


#: method -> (swift command, flags), as ``default.METHODS``
STALENESS_METHODS: Dict[str, tuple] = {method_name(b, d): ('rlhf', _flags(b, d)) for b in BETAS for d in DEPTHS}


def staleness_workspace(workdir: str, cfg: Dict[str, Any]) -> Dict[str, Any]:
    """The default preset's task and teacher, the heads-of-32 student (its own folder: the default's stays cached)."""
    return default_workspace(workdir, cfg, 'workspace_heads32', student_kwargs=STALENESS_STUDENT)


def _server_runner(bq, port: int):
    """Runs a command line against the server on ``port``: its ports appended, the gloo stand-in on the path."""
    from bench_async import _env, _free_port

    def run(argv: List[str]):
        return bq.run_command(argv + ['--vllm_server_port', str(port),
                                      '--vllm_server_group_port', str(_free_port())], env=_env())
    return run


def gap_closed(score: float, ws: Dict[str, Any]) -> float:
    """The share of the start-to-teacher gap in exact match that ``score`` closes, in percent (bench_quality's)."""
    teacher, start = ws['teacher_eval']['exact_match'], ws['student_eval']['exact_match']
    return (score - start) / (teacher - start) * 100 if teacher != start else float('nan')


def versus_sync(summary, curves, ws) -> List[Dict[str, Any]]:
    """Per method: exact match mean ± std over seeds, the gap closed, and (async) the difference from the synchronous
    run of the same beta, paired by seed (mean ± std of the per-seed differences)."""
    rows = []
    for method, stats in summary.items():
        mean, std = stats['exact_match']
        row = {'method': method, 'exact_match': mean, 'std': std, 'gap_closed': gap_closed(mean, ws),
               'per_seed': {s: c[-1]['exact_match'] for s, c in sorted(curves[method].items())}}
        sync = 'sync_' + method.split('_', 1)[1]
        if method != sync and sync in curves:
            seeds = sorted(set(curves[method]) & set(curves[sync]))
            row['minus_sync'] = mean_std([curves[method][s][-1]['exact_match'] - curves[sync][s][-1]['exact_match']
                                          for s in seeds])
        rows.append(row)
    return rows


def staleness_table(rows, n_seeds: int, steps: int) -> str:
    lines = [f'| method ({n_seeds} seeds, {steps} steps) | exact match | gap closed | minus sync (paired by seed) '
             '| per seed |', '|---|---|---|---|---|']
    for r in rows:
        diff = f"{r['minus_sync'][0]:+.3f} ± {r['minus_sync'][1]:.3f}" if 'minus_sync' in r else ''
        seeds = ' / '.join(f'{v:.3f}' for v in r['per_seed'].values())
        lines.append(f"| {r['method']} | {r['exact_match']:.3f} ± {r['std']:.3f} | {r['gap_closed']:.0f}% | {diff} "
                     f"| {seeds} |")
    return '\n'.join(lines)


def staleness_closing_line(rows, ws) -> str:
    cells = ', '.join(f"{r['method']} {r['exact_match']:.3f} ± {r['std']:.3f} ({r['gap_closed']:.0f}%)"
                      for r in rows)
    return (f"quality[staleness]: teacher {ws['teacher_eval']['exact_match']:.3f}, "
            f"start {ws['student_eval']['exact_match']:.3f}, {cells}")


def staleness_main(bq, args) -> int:
    """The staleness preset from ``bq`` (bench_quality.py's runner; its learning rate already the default's)."""
    from bench_async import start_server

    cfg, workdir, t0 = bq.start(args, STALENESS_PRESETS, 'staleness ')
    ws = staleness_workspace(workdir, cfg)
    names = [m for m in args.methods if m in STALENESS_METHODS]
    # another learning rate (--learning_rate) keeps its results beside the preset's
    outdir = os.path.join(workdir, 'staleness' + ('' if bq.LEARNING_RATE == DEFAULT_LEARNING_RATE
                                                   else f'_lr{bq.LEARNING_RATE}'))
    os.makedirs(outdir, exist_ok=True)
    missing = [(m, s) for m in names for s in cfg['seeds']
               if bq.cached_curve(workdir, m, ws, cfg, s, STALENESS_METHODS) is None]
    server = None
    port = 0
    if missing:
        from bench_async import _free_port
        port = _free_port()
        log(f'starting swift rollout on {ws["student"]} (port {port}) for {len(missing)} run(s)')
        server = start_server(ws['student'], port, None, os.path.join(outdir, f'server_{port}.log'))
    try:
        curves = bq.collect_curves(names, ws, cfg, workdir, STALENESS_METHODS, run=_server_runner(bq, port))
    finally:
        if server is not None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
    summary = bq.summarise(curves)
    rows = versus_sync(summary, curves, ws)
    staleness = {m: _logged_staleness(workdir, m, ws, cfg, bq) for m in names}
    bq.write_results(outdir, cfg, ws, curves, summary, t0, preset='staleness', versus_sync=rows,
                     logged_staleness=staleness)
    print(bq.markdown_table(summary, ws, len(cfg['seeds']), cfg['steps']))
    print(staleness_table(rows, len(cfg['seeds']), cfg['steps']))
    log(f'wrote results.json, results.csv and the plots to {outdir}')
    print(staleness_closing_line(rows, ws))
    return 0


def _logged_staleness(workdir: str, method: str, ws, cfg, bq) -> Dict[str, Any]:
    """The mean of the logged ``gkd/staleness`` over each seed's run (0 synchronous, 1 one version stale): what the
    runs actually trained on."""
    out = {}
    for seed in cfg['seeds']:
        path = os.path.join(workdir, 'runs', bq.run_key(method, ws, cfg, seed, STALENESS_METHODS), 'logging.jsonl')
        if os.path.exists(path):
            with open(path) as f:
                values = [r['gkd/staleness'] for r in map(json.loads, f) if 'gkd/staleness' in r]
            out[seed] = statistics.fmean(values) if values else 0.0
    return out
