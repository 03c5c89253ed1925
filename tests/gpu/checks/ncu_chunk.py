"""Part b's Nsight Compute pass (issue 56): ONE chunk of each full-teacher-head kernel at the real shapes, under
``ncu``: the first kernel (``full_rows_kernel``, method ``fused``) and the second (``full_rows2_kernel``, method
``fused2``, also at beta 0), for achieved DRAM bandwidth and the special-function (XU) pipe's use.

    ncu ... python tests/gpu/checks/ncu_chunk.py --rows 1536 --variants fused:0.5,fused2:0.5,fused2:0

As a program it builds ``bench_loss``'s seeded inputs, runs each variant once outside the profiled range (Triton
compiles there), prints one JSON line (the variants in profiling order, the unavailable ones with the reason), then
runs each once more between ``cudaProfilerStart`` / ``cudaProfilerStop`` (``ncu --profile-from-start off``).
:func:`profile` runs ncu over it with a bounded timeout; :func:`parse_ncu_csv` reads ncu's ``--csv`` output.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
KERNELS = 'regex:full_rows'  # full_rows_kernel and full_rows2_kernel, not the top-k kernels
# Nsight Compute metric names (the ComputeWorkloadAnalysis / MemoryWorkloadAnalysis sections' own)
TIME, DRAM_PCT = 'gpu__time_duration.sum', 'dram__throughput.avg.pct_of_peak_sustained_elapsed'
READ, WRITE = 'dram__bytes_read.sum', 'dram__bytes_write.sum'
XU_ISSUE = 'sm__inst_executed_pipe_xu.avg.pct_of_peak_sustained_active'  # XU instructions / the pipe's peak rate
XU_ACTIVE = 'sm__pipe_xu_cycles_active.avg.pct_of_peak_sustained_active'  # cycles the XU pipe was busy
METRICS = (TIME, DRAM_PCT, READ, WRITE, XU_ISSUE, XU_ACTIVE)
VARIANTS = 'fused:0.5,fused2:0.5,fused2:0'
_SCALE = {'nsecond': 1e-9, 'usecond': 1e-6, 'msecond': 1e-3, 'second': 1.0, 'byte': 1.0, 'Kbyte': 1e3,
          'Mbyte': 1e6, 'Gbyte': 1e9, 'Tbyte': 1e12, 'KB': 1e3, 'MB': 1e6, 'GB': 1e9}


def find_ncu() -> Optional[str]:
    """``ncu`` on PATH, else the CUDA toolkit's; None when neither is there."""
    path = shutil.which('ncu')
    for p in ([path] if path else []) + ['/usr/local/cuda/bin/ncu']:
        if os.path.isfile(p) and os.access(p, os.X_OK):
            return p
    return None


def _number(text: str) -> Optional[float]:
    try:
        return float(text.replace(',', '').strip())
    except ValueError:
        return None


def si(value: Optional[float], unit: str) -> Optional[float]:
    """``value`` in seconds or bytes when ``unit`` is a time or size unit ncu prints, else as it is."""
    return None if value is None else value * _SCALE.get(unit, 1.0)


def parse_ncu_csv(text: str, metrics=None) -> List[Dict]:
    """Rows ``{id, kernel, metric, unit, value}`` (value a float, None when not a number) from ncu's ``--csv``
    output: the details page (one metric a line: ``Metric Name``, ``Metric Unit``, ``Metric Value``) or
    ``--page raw`` (one kernel a line, a units line under the header; ``metrics`` picks its columns, default every
    ``unit__counter`` column). ncu's own ``==PROF==`` / ``==WARNING==`` lines are skipped."""
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith('==')]
    table = list(csv.reader(lines))
    start = next((i for i, r in enumerate(table) if 'ID' in r and 'Kernel Name' in r), None)
    if start is None:
        return []
    header, body, out = table[start], table[start + 1:], []
    if 'Metric Name' in header:
        for r in body:
            d = dict(zip(header, r))
            if not d.get('ID', '').strip().isdigit():
                continue
            out.append(dict(id=int(d['ID']), kernel=d['Kernel Name'], metric=d['Metric Name'],
                            unit=d.get('Metric Unit', ''), value=_number(d.get('Metric Value', ''))))
        return out
    cols = [c for c in header if (c in metrics if metrics else '__' in c)]
    units: Dict[str, str] = {}
    if body and not body[0][header.index('ID')].strip().isdigit():  # the units line
        units, body = dict(zip(header, body[0])), body[1:]
    for r in body:
        d = dict(zip(header, r))
        if d.get('ID', '').strip().isdigit():
            out += [dict(id=int(d['ID']), kernel=d['Kernel Name'], metric=c, unit=units.get(c, ''),
                         value=_number(d.get(c, ''))) for c in cols]
    return out


def label(rows: List[Dict], order: List[str]) -> List[Dict]:
    """Each row's ``variant``: the k-th profiled launch is the k-th variant the program ran in the profiled range;
    ``launch <id>`` when the counts differ (a kernel launched more or less often than once a variant)."""
    ids = sorted({r['id'] for r in rows})
    for r in rows:
        r['variant'] = order[ids.index(r['id'])] if len(ids) == len(order) else f'launch {r["id"]}'
    return rows


def summary(rows: List[Dict], minimum_bytes: float) -> Dict[str, Dict]:
    """Per variant (or kernel): ``kernel``, ``time_us``, ``dram_pct``, ``gbytes`` (read + written), ``gb_per_s``,
    ``x_minimum`` (the bytes over ``minimum_bytes``, what the chunk must move), ``xu_issue_pct``, ``xu_active_pct``;
    None where ncu gave no number."""
    raw: Dict[str, Dict] = {}
    for r in rows:
        raw.setdefault(r.get('variant', r['kernel']), {'kernel': r['kernel']})[r['metric']] = si(r['value'], r['unit'])
    out = {}
    for label, v in raw.items():
        t, rd, wr = v.get(TIME), v.get(READ), v.get(WRITE)
        moved = rd + wr if rd is not None and wr is not None else None
        out[label] = dict(kernel=v['kernel'], time_us=None if t is None else t * 1e6, dram_pct=v.get(DRAM_PCT),
                          gbytes=None if moved is None else moved / 1e9,
                          gb_per_s=moved / t / 1e9 if moved is not None and t else None,
                          x_minimum=moved / minimum_bytes if moved is not None and minimum_bytes else None,
                          xu_issue_pct=v.get(XU_ISSUE), xu_active_pct=v.get(XU_ACTIVE))
    return out


def _killpg(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def profile(work: str, rows: int, hidden: int, vocab: int, dtype: str, variants: str = VARIANTS,
            timeout: float = 90.0, ncu: Optional[str] = None) -> Dict:
    """Run ncu over this program, at most ``timeout`` seconds in all (a metric ncu does not know is dropped and the
    run retried once, within that time). Returns ``status`` (ok | unavailable | timeout | error), ``error``,
    ``order`` (the profiled variants), ``unavailable`` ({variant: why}), ``metrics`` (parsed rows, each with its
    ``variant``), ``dropped`` (metrics ncu refused), ``wall_s``."""
    ncu = ncu or find_ncu()
    if ncu is None:
        return dict(status='unavailable', error='ncu not found (not on PATH, no /usr/local/cuda/bin/ncu)')
    t0, metrics, dropped = time.perf_counter(), list(METRICS), []
    count = len(variants.split(','))
    os.makedirs(work, exist_ok=True)
    while True:
        log = os.path.join(work, 'ncu_chunk.csv')
        if os.path.exists(log):
            os.remove(log)
        cmd = [ncu, '--csv', '--print-units', 'base', '--log-file', log, '--profile-from-start', 'off',
               '--kernel-name', KERNELS, '--launch-count', str(count), '--metrics', ','.join(metrics),
               sys.executable, os.path.abspath(__file__), '--rows', str(rows), '--hidden', str(hidden),
               '--vocab', str(vocab), '--dtype', dtype, '--variants', variants]
        left = timeout - (time.perf_counter() - t0)
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)  # its own group: a timeout ends the profiled python too
        try:
            out, _ = proc.communicate(timeout=max(left, 1.0))
        except subprocess.TimeoutExpired:
            _killpg(proc)
            proc.communicate()
            return dict(status='timeout', error=f'ncu ran past {timeout:.0f} s', dropped=dropped,
                        wall_s=round(time.perf_counter() - t0, 1))
        text = open(log).read() if os.path.exists(log) else ''
        errors = [ln for ln in (text + '\n' + out).splitlines() if ln.startswith('==ERROR==')]
        refused = [m for m in metrics if any(m in ln for ln in errors)]
        if refused and len(refused) < len(metrics) and not dropped and timeout - (time.perf_counter() - t0) > 20:
            dropped = refused
            metrics = [m for m in metrics if m not in refused]
            continue
        break
    info = next((json.loads(ln) for ln in out.splitlines() if ln.startswith('{"order"')), {})
    order, rows_ = info.get('order', []), label(parse_ncu_csv(text, metrics), info.get('order', []))
    ids = sorted({r['id'] for r in rows_})
    status = 'ok' if rows_ and proc.returncode == 0 else 'error'
    error = None
    if status != 'ok':
        tail = errors or [ln for ln in out.splitlines() if ln.strip()][-3:]
        error = f'ncu exit {proc.returncode}, {len(rows_)} metric rows: ' + ' / '.join(tail)[-400:]
    elif len(ids) != len(order):
        error = f'{len(ids)} kernels profiled for {len(order)} variants {order}: labelled by launch'
    return dict(status=status, error=error, order=order, unavailable=info.get('unavailable', {}), metrics=rows_,
                dropped=dropped, wall_s=round(time.perf_counter() - t0, 1))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--rows', type=int, default=1536)
    p.add_argument('--hidden', type=int, default=896)
    p.add_argument('--vocab', type=int, default=151936)
    p.add_argument('--dtype', default='bfloat16')
    p.add_argument('--variants', default=VARIANTS, help='method:beta,... (methods fused, fused2)')
    args = p.parse_args(argv)
    import torch
    sys.path.insert(0, os.path.join(HERE, '..', '..', '..', 'benchmarks'))
    import bench_loss
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    base = bench_loss.parse_args(['--device', device.type, '--hidden', str(args.hidden), '--vocab',
                                  str(args.vocab), '--dtype', args.dtype, '--chunk-size', str(args.rows)])
    x = bench_loss._make_inputs(torch, args.rows, base, device, getattr(torch, args.dtype))
    steps, unavailable = [], {}
    for spec in args.variants.split(','):
        method, beta = spec.split(':')
        label = f'{method} beta={float(beta):g}'
        try:
            step = bench_loss._make_step(torch, method, x, argparse.Namespace(**{**vars(base), 'beta': float(beta)}))
        except (ImportError, bench_loss.Unavailable) as exc:
            unavailable[label] = f'{type(exc).__name__}: {exc}'
            continue
        before = set(bench_loss._fallbacks())
        step(args.rows)  # compiled and run once outside the profiled range
        fell = set(bench_loss._fallbacks()) - before
        if fell:  # the kernel failed its self-check: it would not launch
            unavailable[label] = f'self-check fell back to the PyTorch path: {sorted(fell)}'
            continue
        steps.append((label, step))
    print(json.dumps(dict(order=[label for label, _ in steps], unavailable=unavailable)), flush=True)
    if device.type == 'cuda':
        torch.cuda.synchronize()
        torch.cuda.profiler.start()
    for _, step in steps:
        x['w'].grad = x['h'].grad = None
        step(args.rows)  # one chunk: one launch of the variant's kernel
    if device.type == 'cuda':
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()


if __name__ == '__main__':
    main()
