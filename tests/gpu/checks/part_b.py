"""Part b: the loss alone, forward + backward from hidden states: fused (the Triton kernel on CUDA) vs fused_torch
(the PyTorch chunk path) vs dense vs Liger's LigerFusedLinearJSD vs a matmul-only floor at N = 4k, 8k, 16k tokens,
and a sweep of the fused loss's chunk size.

Reuses ``benchmarks/bench_loss.py`` (one subprocess per method and N, the same seeded inputs; on CUDA the peak
is ``max_memory_allocated`` minus the allocation before the steps). Goals (issue 18): fused memory at or below
Liger's, fused time within 1.2x of the floor; Liger's published anchor is 6.2x less memory and 3.5x faster than a
dense JSD at 8k tokens on an H100; issue 25: the kernel within 1.5x of the floor at 8k and 16k tokens.
"""
from __future__ import annotations

import os
import sys

from common import REPO, Results, finite, fmt, ratio

sys.path.insert(0, os.path.join(REPO, 'benchmarks'))
import bench_loss  # noqa: E402

METHODS = ('floor', 'fused', 'fused_torch', 'fused_topk', 'fused_topk_torch', 'liger', 'dense')


def run(args) -> Results:
    res = Results('b', 'GKD loss forward + backward from hidden states: fused, dense, Liger, matmul floor')
    if args.tiny:
        hidden, vocab, dtype, ns, chunks = 64, 1024, 'float32', [64, 128], [16, 32, 64]
    else:
        hidden, vocab, dtype = 896, 151936, 'bfloat16'
        ns, chunks = [4096, 8192, 16384], [128, 256, 512, 1024, 2048, 4096]
    ns = args.ns or ns
    sweep_n = ns[len(ns) // 2]  # the sweep runs at the middle N (8192 at real shapes)
    from swift_gkd_plugin.core.fused.loss import default_chunk_size, kernel_chunk_size
    from swift_gkd_plugin.core.fused.kernels import resolve_backend
    import torch
    kernel = resolve_backend(None, torch.device(args.device)) == 'triton'
    torch_default = default_chunk_size(vocab)
    default = kernel_chunk_size(vocab, vocab, 2 if dtype == 'bfloat16' else 4) if kernel else torch_default
    chunk_of = {'fused': default, 'fused_torch': torch_default,
                'fused_topk': kernel_chunk_size(vocab, 0, 2 if dtype == 'bfloat16' else 4) if kernel else None}
    base = ['--device', args.device, '--hidden', str(hidden), '--vocab', str(vocab), '--dtype', dtype,
            '--max-repeats', str(args.repeats)]
    bargs = bench_loss.parse_args(base)
    budget = 5.0 if args.tiny else 25.0
    for n in ns:
        for method in args.methods or METHODS:
            r = bench_loss._spawn(bargs, method, n, budget)
            res.add(kind='method', method=method, n=n, chunk=chunk_of.get(method),
                    status=r['status'], time_ms=1e3 * r['time_s'] if 'time_s' in r else None,
                    peak_extra_mib=r.get('peak_extra_mib'), loss=r.get('loss'), error=r.get('error'))
    for chunk in args.chunks or chunks:
        r = bench_loss._spawn(bench_loss.parse_args(base + ['--chunk-size', str(chunk)]), 'fused', sweep_n, budget)
        res.add(kind='chunk_sweep', method='fused', n=sweep_n, chunk=chunk, status=r['status'],
                time_ms=1e3 * r['time_s'] if 'time_s' in r else None, peak_extra_mib=r.get('peak_extra_mib'),
                loss=r.get('loss'), error=r.get('error'))
    by = {(r['method'], r['n']): r for r in res.rows if r['kind'] == 'method' and r['status'] == 'ok'}
    for (method, n), r in by.items():
        fused = by.get(('fused', n))
        if fused and method != 'fused':
            r['fused_time_ratio'] = ratio(fused['time_ms'], r['time_ms'])  # below 1: fused faster
            r['mem_ratio_vs_fused'] = ratio(r['peak_extra_mib'], fused['peak_extra_mib'])  # above 1: fused smaller
    for n in sorted({n for _, n in by}):
        f, fl, li, de, ft = (by.get((m, n)) for m in ('fused', 'floor', 'liger', 'dense', 'fused_torch'))
        if f and fl:
            res.note(f'N={n}: fused/floor time {fmt(ratio(f["time_ms"], fl["time_ms"]))}x (goal <= 1.5x, stretch 1.2x; '
                     f'fused = {"Triton kernel" if kernel else "PyTorch path"})')
        if ft and fl:
            res.note(f'N={n}: fused_torch/floor time {fmt(ratio(ft["time_ms"], fl["time_ms"]))}x'
                     + (f', fused/fused_torch {fmt(ratio(f["time_ms"], ft["time_ms"]))}x' if f else ''))
        if f and li:
            res.note(f'N={n}: fused memory {f["peak_extra_mib"]:.0f} MiB vs Liger {li["peak_extra_mib"]:.0f} MiB '
                     f'(goal: at or below), time fused/Liger {fmt(ratio(f["time_ms"], li["time_ms"]))}x')
        if li and de:
            res.note(f'N={n}: Liger vs dense: memory {fmt(ratio(de["peak_extra_mib"], li["peak_extra_mib"]), ".1f")}x '
                     f'less, {fmt(ratio(de["time_ms"], li["time_ms"]), ".1f")}x faster (published anchor at 8k on '
                     'H100: 6.2x, 3.5x)')
    sweep = [r for r in res.rows if r['kind'] == 'chunk_sweep' and r['status'] == 'ok' and finite(r['time_ms'])]
    if sweep:
        best = min(sweep, key=lambda r: r['time_ms'])
        at_default = by.get(('fused', sweep_n))
        res.note(f'chunk sweep at N={sweep_n}: fastest chunk {best["chunk"]} ({best["time_ms"]:.1f} ms, '
                 f'{best["peak_extra_mib"]:.0f} MiB); default rule gives {default}'
                 + (f' ({at_default["time_ms"]:.1f} ms)' if at_default else ''))
    if any(r['status'] not in ('ok', 'unavailable', 'oom') for r in res.rows):
        res.status = 'partial'
    return res
