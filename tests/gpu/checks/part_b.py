"""Part b: the loss alone, forward + backward from hidden states, at N = 4k, 8k, 16k tokens: the package's kernel
(``fused``, backend ``triton``) against the second design (``fused2``, ``triton2``: the experiment of
``tests/gpu/experiments/triton2``, outside the package), Liger's LigerFusedLinearJSD
and a matmul-only floor at every N; dense at 4k/8k; fused2_serial (no side stream), fused_torch and fused_topk at
8k; a 3-point sweep of the chunk size; then one chunk of each kernel under Nsight Compute (``ncu_chunk.py``). One
GPU call, ~2.5 minutes.

Reuses ``benchmarks/bench_loss.py`` (one subprocess per method and N, the same seeded inputs; on CUDA the peak
is ``max_memory_allocated`` minus the allocation before the steps). Goals (issue 18): fused memory at or below
Liger's, fused time within 1.2x of the floor; Liger's published anchor is 6.2x less memory and 3.5x faster than a
dense JSD at 8k tokens on an H100; issue 25: the kernel within 1.5x of the floor at 8k and 16k tokens; issues 56
and 95: ``triton2`` comes into the package, as the CUDA default, only if faster than ``triton`` at every N with no
more memory (allocated and reserved); issue 67: its peak within one chunk of ``triton``'s (bounded), and a
``fused2`` row that ran a fallback (the PyTorch path, or the first design's weight-gradient products) is not timed as
the kernel.
"""
from __future__ import annotations

import os
import sys
import time

import ncu_chunk
from common import REPO, Results, finite, fmt, ratio

sys.path.insert(0, os.path.join(REPO, 'benchmarks'))
import bench_loss  # noqa: E402

CORE = ('floor', 'fused', 'fused2', 'liger')  # at every N: what the verdict and the goals compare
MEM_SLACK = 1.01  # "no more memory": the new kernel's peak at most 1% above the old one's


def plan(ns, methods=None):
    """``[(method, N)]`` in run order: ``methods`` at every N when given, else :data:`CORE` at every N, dense below
    the largest N (its 16k row cost the most and says nothing new), fused2_serial (triton2 without its side stream),
    fused_torch and fused_topk at the middle N."""
    if methods:
        return [(m, n) for n in ns for m in methods]
    mid = ns[len(ns) // 2]
    return [(m, n) for n in ns for m in CORE + (('dense', ) if n < max(ns) else ()) +
            (('fused2_serial', 'fused_torch', 'fused_topk') if n == mid else ())]


def _measure(res, kind, method, n, chunk, bargs, budget):
    t0 = time.perf_counter()
    r = bench_loss._spawn(bargs, method, n, budget)
    return res.add(kind=kind, method=method, n=n, chunk=chunk, status=r['status'],
                   time_ms=1e3 * r['time_s'] if 'time_s' in r else None, peak_extra_mib=r.get('peak_extra_mib'),
                   peak_reserved_extra_mib=r.get('peak_reserved_extra_mib'), weight_grad_path=r.get('weight_grad_path'),
                   loss=r.get('loss'), error=r.get('error'), wall_s=round(time.perf_counter() - t0, 1))


def run(args) -> Results:
    res = Results('b', 'GKD loss forward + backward: triton vs triton2 vs Liger vs matmul floor, ncu of one chunk')
    if args.tiny:
        hidden, vocab, dtype, ns, chunks = 64, 1024, 'float32', [64, 128], [16, 32, 64]
    else:
        hidden, vocab, dtype = 896, 151936, 'bfloat16'
        # around triton2's own rule (half the first kernel's 1,536 rows: two chunks' logits alive); 1,536 = fused's
        ns, chunks = [4096, 8192, 16384], [512, 1536, 3072]
    ns = args.ns or ns
    sweep_n = ns[len(ns) // 2]  # the sweep runs at the middle N (8192 at real shapes)
    from swift_gkd_plugin.core.fused.loss import default_chunk_size, kernel_chunk_size
    from swift_gkd_plugin.core.fused.kernels import resolve_backend
    import torch
    itemsize = 2 if dtype == 'bfloat16' else 4
    kernel = resolve_backend(None, torch.device(args.device)) != 'torch'
    torch_default = default_chunk_size(vocab)
    default = kernel_chunk_size(vocab, vocab, itemsize) if kernel else torch_default
    # fused2: its backend's own rule (None: not known here)
    chunk_of = {'fused': default, 'fused_torch': torch_default,
                'fused_topk': kernel_chunk_size(vocab, 0, itemsize) if kernel else None}
    base = ['--device', args.device, '--hidden', str(hidden), '--vocab', str(vocab), '--dtype', dtype,
            '--max-repeats', str(args.repeats)]
    bargs = bench_loss.parse_args(base)
    budget = 5.0 if args.tiny else 25.0
    for method, n in plan(ns, args.methods):
        _measure(res, 'method', method, n, chunk_of.get(method), bargs, budget)
    by = {(r['method'], r['n']): r for r in res.rows if r['kind'] == 'method' and r['status'] == 'ok'}
    # the sweep tunes the kernel that would be the default: the new one where it ran
    swept = 'fused2' if any(m == 'fused2' for m, _ in by) else 'fused'
    for chunk in args.chunks or chunks:
        _measure(res, 'chunk_sweep', swept, sweep_n, chunk,
                 bench_loss.parse_args(base + ['--chunk-size', str(chunk)]), budget)
    for (method, n), r in by.items():
        fused = by.get(('fused', n))
        if fused and method != 'fused':
            r['fused_time_ratio'] = ratio(fused['time_ms'], r['time_ms'])  # below 1: fused faster
            r['mem_ratio_vs_fused'] = ratio(r['peak_extra_mib'], fused['peak_extra_mib'])  # above 1: fused smaller
    for n in sorted({n for _, n in by}):
        f, f2, fl, li, de, ft = (by.get((m, n)) for m in ('fused', 'fused2', 'floor', 'liger', 'dense', 'fused_torch'))
        if f and fl:
            res.note(f'N={n}: fused/floor time {fmt(ratio(f["time_ms"], fl["time_ms"]))}x (goal <= 1.5x, stretch 1.2x; '
                     f'fused = {"Triton kernel" if kernel else "PyTorch path"})')
        if f2 and fl:
            res.note(f'N={n}: fused2/floor time {fmt(ratio(f2["time_ms"], fl["time_ms"]))}x')
        if f2 and f:
            reserved = (f', reserved {f2["peak_reserved_extra_mib"]:.0f} vs {f["peak_reserved_extra_mib"]:.0f} MiB'
                        if finite(f2.get('peak_reserved_extra_mib')) and finite(f.get('peak_reserved_extra_mib'))
                        else '')
            res.note(f'N={n}: fused2/fused time {fmt(ratio(f2["time_ms"], f["time_ms"]))}x '
                     f'({f2["time_ms"]:.1f} vs {f["time_ms"]:.1f} ms), peak memory '
                     f'{fmt(ratio(f2["peak_extra_mib"], f["peak_extra_mib"]))}x '
                     f'({f2["peak_extra_mib"]:.0f} vs {f["peak_extra_mib"]:.0f} MiB{reserved}); weight gradient: '
                     f'{f2.get("weight_grad_path")}')
        f2s = by.get(('fused2_serial', n))
        if f2 and f2s:
            res.note(f'N={n}: fused2 with / without its side stream: {fmt(ratio(f2["time_ms"], f2s["time_ms"]))}x '
                     f'time ({f2s["time_ms"]:.1f} ms one stream), peak {f2["peak_extra_mib"]:.0f} vs '
                     f'{f2s["peak_extra_mib"]:.0f} MiB')
        if f2 and li:
            res.note(f'N={n}: fused2/Liger time {fmt(ratio(f2["time_ms"], li["time_ms"]))}x, memory '
                     f'{f2["peak_extra_mib"]:.0f} vs {li["peak_extra_mib"]:.0f} MiB')
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
        at_default = by.get((swept, sweep_n))
        res.note(f'chunk sweep of {swept} at N={sweep_n}: fastest chunk {best["chunk"]} ({best["time_ms"]:.1f} ms, '
                 f'{best["peak_extra_mib"]:.0f} MiB); default rule '
                 + (f'gives {default}' if swept == 'fused' else 'of triton2')
                 + (f' ({at_default["time_ms"]:.1f} ms)' if at_default else ''))
    verdicts(res, ns, args.device, one_chunk_mib(vocab, vocab, itemsize))
    ncu_pass(res, args, hidden, vocab, dtype, kernel_chunk_size(vocab, vocab, itemsize))
    workers = [r['wall_s'] for r in res.rows if r['kind'] != 'ncu' and finite(r.get('wall_s'))]
    res.note(f'time: {len(workers)} workers {sum(workers):.0f} s (slowest {max(workers, default=0):.0f} s), part '
             f'{time.time() - res.started:.0f} s')
    if any(r['status'] not in ('ok', 'unavailable', 'oom') for r in res.rows):
        res.status = 'partial'
    return res


def one_chunk_mib(vocab: int, teacher_vocab: int, itemsize: int) -> float:
    """The logits of one triton2 chunk (student and teacher rows, its own rule: half the first design's rows)."""
    from swift_gkd_plugin.core.fused.chunk_triton import kernel_chunk_size
    rows = max(128, kernel_chunk_size(vocab, teacher_vocab, itemsize) // 2)
    return rows * (vocab + teacher_vocab) * itemsize / 2**20


def _mib(row, key):
    value = row.get(key)
    return value if finite(value) else None


def verdicts(res: Results, ns, device: str, chunk_mib: float = None):
    """A line per N and one overall. Bounded: triton2's peak (allocated, and reserved where measured) at most one
    chunk (``chunk_mib``) above triton's, else its memory grows with the chunks (issue 67: buffers the allocator
    cannot reuse). Default: triton2 faster than triton AND no larger in peak memory (<= :data:`MEM_SLACK`), at
    every N."""
    rows = {(r['method'], r['n']): r for r in res.rows if r['kind'] == 'method'}
    missing = next((r for (m, _), r in rows.items() if m == 'fused2' and r['status'] != 'ok'), None)
    if device != 'cuda':
        why = f'; fused2: {missing["status"]}: {missing.get("error")}' if missing else ''
        res.note(f'make triton2 the CUDA default: no verdict: no GPU measured it (device {device}: fused is the '
                 f'PyTorch path{why})')
        return
    fails = []
    for n in ns:
        old, new = rows.get(('fused', n)), rows.get(('fused2', n))
        if not (old and new and old['status'] == new['status'] == 'ok'):
            bad = next((r for r in (old, new) if r and r['status'] != 'ok'), None)
            why = f'{bad["method"]} {bad["status"]}: {bad.get("error")}' if bad else 'not run'
            res.note(f'N={n}: verdict: not measured ({why})')
            fails.append(f'not measured at {n}')
            continue
        faster = new['time_ms'] < old['time_ms']
        pairs = [(kind, _mib(new, key), _mib(old, key)) for kind, key in
                 (('allocated', 'peak_extra_mib'), ('reserved', 'peak_reserved_extra_mib'))]
        pairs = [(kind, a, b) for kind, a, b in pairs if a is not None and b is not None]
        lean = all(a <= b * MEM_SLACK for _, a, b in pairs)
        bounded = chunk_mib is None or all(a <= b + chunk_mib for _, a, b in pairs)
        memory = ', '.join(f'{kind} {a:.0f} vs {b:.0f} MiB' for kind, a, b in pairs)
        bound = '' if chunk_mib is None else (
            f'; within one chunk ({chunk_mib:.0f} MiB) of triton' if bounded else
            f'; MORE than one chunk ({chunk_mib:.0f} MiB) above triton: memory grows with the chunks')
        res.note(f'N={n}: verdict: triton2 {"faster" if faster else "NOT faster"} '
                 f'({new["time_ms"]:.1f} vs {old["time_ms"]:.1f} ms) and {"no more" if lean else "MORE"} memory '
                 f'({memory}){bound}: ' + ('yes' if faster and lean else 'no'))
        fails += ([] if faster else [f'slower at {n}']) + ([] if lean else [f'more memory at {n}']) + (
            [] if bounded else [f'memory beyond one chunk at {n}'])
    at = ', '.join(str(n) for n in ns)
    res.note('make triton2 the CUDA default: ' + (f'no, because {"; ".join(fails)}' if fails else
             f'yes, because faster than triton at N = {at} with no memory regression (<= {MEM_SLACK:g}x)'))


def ncu_pass(res: Results, args, hidden: int, vocab: int, dtype: str, rows: int):
    """One chunk of each kernel under ncu: a row per (variant, metric), notes of bandwidth and XU use."""
    if args.device != 'cuda' or args.ncu_timeout <= 0:
        why = 'no CUDA device (ncu profiles GPU kernels)' if args.device != 'cuda' else '--ncu-timeout 0'
        res.add(kind='ncu', method='ncu', status='unavailable', error=why)
        res.note(f'ncu: not run: {why}')
        return
    out = ncu_chunk.profile(os.path.join(args.work, 'ncu'), rows, hidden, vocab, dtype, timeout=args.ncu_timeout)
    for label, why in (out.get('unavailable') or {}).items():
        res.add(kind='ncu', method=label, n=rows, status='unavailable', error=why)
    if out['status'] != 'ok':
        res.add(kind='ncu', method='ncu', n=rows, status=out['status'], error=out.get('error'),
                wall_s=out.get('wall_s'))
        res.note(f'ncu: {out["status"]}: {out.get("error")}')
        return
    for m in out['metrics']:
        res.add(kind='ncu', method=m['variant'], n=rows, status='ok', kernel=m['kernel'], metric=m['metric'],
                value=m['value'], unit=m['unit'])
    res.note(f'ncu: {len(out["order"])} kernels, one chunk of {rows} rows each, {out["wall_s"]} s'
             + (f'; metrics ncu refused: {out["dropped"]}' if out['dropped'] else '')
             + (f'; {out["error"]}' if out.get('error') else ''))
    minimum = 3 * rows * vocab * (2 if dtype == 'bfloat16' else 4)  # read zs and zt, write the gradient, once
    per = ncu_chunk.summary(out['metrics'], minimum)
    for label, v in per.items():
        res.note(f'ncu {label} ({v["kernel"]}): {fmt(v["time_us"], ".0f")} us; DRAM {fmt(v["dram_pct"], ".0f")}% of '
                 f'peak, {fmt(v["gb_per_s"], ".0f")} GB/s, {fmt(v["gbytes"])} GB moved ({fmt(v["x_minimum"])}x the '
                 f'minimum {minimum / 1e9:.2f} GB); XU pipe {fmt(v["xu_issue_pct"], ".0f")}% of peak issue, '
                 f'{fmt(v["xu_active_pct"], ".0f")}% of cycles active')
    old, new = per.get('fused beta=0.5'), per.get('fused2 beta=0.5')
    if old and new:
        res.note(f'ncu fused2/fused at beta 0.5: kernel time {fmt(ratio(new["time_us"], old["time_us"]))}x, DRAM '
                 f'bytes {fmt(ratio(new["gbytes"], old["gbytes"]))}x, XU issue {fmt(new["xu_issue_pct"], ".0f")}% vs '
                 f'{fmt(old["xu_issue_pct"], ".0f")}%')
