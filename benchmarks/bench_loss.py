#!/usr/bin/env python
"""Time and peak extra memory of GKD loss implementations, forward + backward through the student ``lm_head``.

Usage::

    python benchmarks/bench_loss.py                 # CPU, H=896, V=151936, float32, N in {1024, 2048}
    python benchmarks/bench_loss.py --full          # adds N = 4096 and 8192
    python benchmarks/bench_loss.py --device cuda   # on a GPU, N in {4096, 8192, 16384}

Every (method, N) runs in its own subprocess (``--worker METHOD N``) on identical seeded inputs: student hidden
states ``[N, H]`` and ``lm_head`` ``[V, H]`` (both trainable), teacher hidden states and ``lm_head`` (frozen).
Methods:

* ``floor``: only the matmuls: student logits forward + backward of ``logits.sum()``, teacher logits forward.
* ``dense``: both full logits, then ``swift_gkd_plugin.core.divergence.generalized_jsd`` (this repository).
* ``swift``: both full logits, then ms-swift's ``swift.rlhf_trainers.gkd_loss.gkd_loss``.
* ``trl``: both full logits, then TRL's ``GKDTrainer.generalized_jsd_loss`` (``trl.experimental.gkd``).
* ``liger``: ``liger_kernel.chunked_loss.LigerFusedLinearJSDLoss`` (its defaults: chunks of 1024 rows,
  ``torch.compile``); skipped with a note if it does not import.
* ``fused``: ``swift_gkd_plugin.core.fused.loss.fused_linear_jsd`` (default chunk size; on CUDA backend ``triton``,
  the first kernel ``full_rows_kernel``, pinned so that a change of ``auto`` does not change what it measures; on
  CPU ``auto``: the PyTorch chunk path).
* ``fused2``: the same with ``backend='triton2'``, the GPU kit's experiment (``tests/gpu/experiments/triton2``, the
  second kernel design ``full_rows2_kernel``, enabled in the worker; not in the package); ``unavailable`` with the
  reason where that experiment is not in this checkout or cannot run here (CPU tensors).
* ``fused2_serial``: ``fused2`` without its side stream (``SWIFT_GKD_TRITON2_OVERLAP=0``: chunks of the first
  backend's rows, one stream), to tell the overlap's share from the kernel's.
* ``fused_torch``: the same with ``backend='torch'`` (the PyTorch chunk path, the reference).
* ``fused_topk`` / ``fused_topk_torch`` (on request): ``fused`` / ``fused_torch`` against the teacher's top-64 with
  the tail bucket (``--gkd_logits_topk 64 --gkd_topk_tail true``, a teacher server's signal), taken from the teacher
  logits before timing.
* ``fused_pg`` (on request): ``fused`` plus the policy-gradient label term (random sampled tokens, signed
  advantages, at the loss temperature) and ``return_entropy``, the on-policy RL step's loss.

Timing: one warm-up step (on ``min(N, 64)`` rows; ``liger`` on ``min(N, 1024)`` rows, the shape of its compiled
chunk, so that the measured steps do not include compilation), then at least one measured step and more while the
worker's time budget lasts (up to ``--max-repeats``); the median wall time is reported, with the median CPU time
(user + system, all threads) of the worker beside it, which is less sensitive to other load on the machine. The
budget of each worker is its share of the remaining total budget (``--time-budget-s``), in proportion to its ``N``
and three times larger at the largest ``N``, which decides the final comparison line; the dense baselines take a
single step well over their share, which is why the three fast methods run first at each ``N``.

Peak extra memory: on CPU, the kernel's peak resident set size of the worker (``VmHWM`` in ``/proc/self/status``)
during the measured steps, minus its resident size just before them (inputs allocated, gradients cleared). The
peak is reset with ``/proc/self/clear_refs`` after the warm-up, so it covers only the measured steps (if that file
is not writable, a thread samples ``VmRSS`` every millisecond instead). Every method allocates its own
``[V, H]`` float32 weight gradient within that figure. On CUDA: ``torch.cuda.max_memory_allocated()`` minus the
allocation before the steps, and ``peak_reserved_extra_mib``: ``max_memory_reserved()`` minus the reserve before
them (what the caching allocator held: blocks it could not reuse, e.g. ones recorded on a running stream, show here
and not in the allocated figure). ``fused2`` rows that ran the first design's weight-gradient products (the
float32-output matmuls failed their probe) or the PyTorch path (the self-check) have status ``fallback``: not the
second design's time. A worker that runs out of memory (CPU: the address-space limit ``--mem-limit-gb``
that keeps the machine usable, default the available memory minus 1 GiB) or gets killed is reported as OOM.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import threading
import time

# also the run order within each N
METHODS = ['floor', 'fused', 'fused2', 'fused2_serial', 'fused_torch', 'liger', 'dense', 'swift', 'trl']
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRITON2 = os.path.join(REPO, 'tests', 'gpu', 'experiments', 'triton2')  # the GPU kit's experiment: method fused2


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--device', default='cpu', choices=['cpu', 'cuda'])
    p.add_argument('--full', action='store_true', help='also N = 4096 and 8192')
    p.add_argument('--ns', type=lambda s: [int(x) for x in s.split(',')], help='comma-separated token counts')
    p.add_argument('--methods', type=lambda s: s.split(','), default=METHODS)
    p.add_argument('--hidden', type=int, default=896)
    p.add_argument('--vocab', type=int, default=151936)
    p.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16', 'float16'])
    p.add_argument('--beta', type=float, default=0.5)
    p.add_argument('--temperature', type=float, default=1.0)
    p.add_argument('--chunk-size', type=int, default=None, help='fused chunk size (default: automatic)')
    p.add_argument('--time-budget-s', type=float, default=None,
                   help='total time budget (default 720 s, or 3600 s with --full)')
    p.add_argument('--max-repeats', type=int, default=5)
    p.add_argument('--mem-limit-gb', type=float, default=None, help='CPU address-space headroom per worker')
    p.add_argument('--json-out', default=None, help='also write the results there')
    p.add_argument('--worker', nargs=2, metavar=('METHOD', 'N'), help=argparse.SUPPRESS)
    p.add_argument('--budget-s', type=float, default=60.0, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------------------------
# worker
# ----------------------------------------------------------------------------------------------------------------


def _status_mib(key):
    with open('/proc/self/status') as f:
        return int(re.search(key + r':\s+(\d+)', f.read()).group(1)) / 1024


def _memory_baseline(cuda: bool, sync) -> float:
    """Garbage collected, the device idle, its peak reset: what a measured call starts from (CUDA: bytes allocated;
    CPU: resident MiB)."""
    import gc

    import torch
    gc.collect()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    return _status_mib('VmRSS')


class _PeakRSS:
    """Peak resident memory of this process from now on: the kernel's VmHWM after a reset, else sampling."""

    def __init__(self):
        try:
            with open('/proc/self/clear_refs', 'w') as f:
                f.write('5')
            self.thread = None
        except OSError:
            self.peak, self.stop = _status_mib('VmRSS'), threading.Event()
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()

    def _sample(self):
        while not self.stop.wait(0.001):
            self.peak = max(self.peak, _status_mib('VmRSS'))

    def read(self):
        if self.thread is None:
            return _status_mib('VmHWM')
        self.stop.set()
        self.thread.join()
        return self.peak


def _make_inputs(torch, n, args, device, dtype):
    """Seeded inputs, generated in place (no temporaries that would inflate the memory baseline)."""
    g = torch.Generator(device=device).manual_seed(0)
    h, v = args.hidden, args.vocab

    def normal(*shape, std):
        return torch.empty(*shape, device=device, dtype=dtype).normal_(0.0, std, generator=g)

    # logits with a standard deviation of about 2, as for a trained lm_head
    x = dict(w=normal(v, h, std=2 / math.sqrt(h)), wt=normal(v, h, std=2 / math.sqrt(h)), h=normal(n, h, std=1.0),
             ht=normal(n, h, std=1.0))
    x['w'].requires_grad_()
    x['h'].requires_grad_()
    x['labels'] = torch.zeros(n, dtype=torch.long, device=device)
    return x


class Unavailable(Exception):
    """The method cannot run here (a backend missing or not for this device): reported as ``unavailable``."""


def _triton2():
    """The GPU kit's experiment ``triton2`` (``tests/gpu/experiments/triton2/triton2_backend.py``), its folder put on
    the path; ImportError where this checkout has none."""
    if TRITON2 not in sys.path:
        sys.path.insert(0, TRITON2)
    import triton2_backend
    return triton2_backend


def _kernel_backend(name, device):
    """``name`` if ``fused_linear_jsd(backend=name)`` can run on ``device`` in this checkout, else Unavailable with
    the reason. ``triton2``, the experiment, is enabled in this process first."""
    from swift_gkd_plugin.core.fused import kernels
    choose = kernels.choose_backend
    if name == 'triton2':
        try:
            experiment = _triton2()
        except ImportError as exc:
            raise Unavailable(f'backend {name!r}: the experiment is not in this checkout ({exc})') from None
        experiment.enable()
        choose = experiment.choose_backend
    elif name not in kernels.BACKENDS:
        raise Unavailable(f'backend {name!r} is not in this checkout (swift_gkd_plugin.core.fused.kernels.BACKENDS '
                          f'= {kernels.BACKENDS})')
    try:
        choose(name, device)
    except ValueError as exc:
        raise Unavailable(f'backend {name!r}: {exc}') from None
    return name


def _fallbacks():
    """Kernel variants that this process's self-check (``core/fused/loss.py``) sent to the PyTorch path: a time
    measured on them is not the kernel's."""
    loss = sys.modules.get('swift_gkd_plugin.core.fused.loss')
    return sorted(f'{k[0]} {k[2]}' for k, v in getattr(loss, '_CHECKED', {}).items() if v != k[0])


def _make_step(torch, method, x, args):
    """A closure running forward + backward of ``method`` on the first ``n`` tokens; returns the loss."""
    w, wt, beta, temp = x['w'], x['wt'], args.beta, args.temperature

    def logits(n):
        z = x['h'][:n] @ w.t()
        with torch.no_grad():
            zt = x['ht'][:n] @ wt.t()
        return z, zt

    if method == 'floor':

        def loss_of(n):
            z, zt = logits(n)
            return z.sum()
    elif method == 'dense':
        from swift_gkd_plugin.core.divergence import generalized_jsd

        def loss_of(n):
            z, zt = logits(n)
            return generalized_jsd(z, zt, beta, temp).sum() / n
    elif method == 'swift':
        from swift.rlhf_trainers.gkd_loss import TeacherOutput, gkd_loss

        def loss_of(n):
            z, zt = logits(n)
            labels = x['labels'][:n]
            total, num = gkd_loss(z, TeacherOutput(full_logits=zt, labels=labels), labels, beta, temp)
            return total / num
    elif method == 'trl':
        from trl.experimental.gkd import GKDTrainer

        def loss_of(n):
            z, zt = logits(n)
            return GKDTrainer.generalized_jsd_loss(z, zt, beta=beta, temperature=temp)
    elif method == 'liger':
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
        fn = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=beta, temperature=temp)

        def loss_of(n):
            return fn(x['h'][:n], w, x['ht'][:n], wt, x['labels'][:n])
    elif method in ('fused', 'fused2', 'fused2_serial', 'fused_pg', 'fused_torch'):
        from swift_gkd_plugin.core.fused.loss import fused_linear_jsd
        from swift_gkd_plugin.core.teacher_signal import TeacherHead
        backend = None  # fused_pg: auto
        if method == 'fused_torch':
            backend = 'torch'
        elif method in ('fused2', 'fused2_serial'):
            backend = _kernel_backend('triton2', w.device)
            os.environ['SWIFT_GKD_TRITON2_OVERLAP'] = '0' if method == 'fused2_serial' else '1'
        elif method == 'fused' and w.device.type == 'cuda':
            backend = _kernel_backend('triton', w.device)
        pg = {}
        if method == 'fused_pg':
            g = torch.Generator(device=w.device).manual_seed(1)
            tokens = torch.randint(0, w.shape[0], x['labels'].shape, generator=g, device=w.device)
            advantages = torch.randn(tokens.shape, generator=g, device=w.device)
            pg = dict(labels=tokens, label_weights=advantages, sft_alpha=1.0, label_temperature=temp,
                      return_entropy=True)

        def loss_of(n):
            extra = {k: v[:n] if torch.is_tensor(v) else v for k, v in pg.items()}
            return fused_linear_jsd(x['h'][:n], w, teacher=TeacherHead(x['ht'][:n], wt), beta=beta,
                                    temperature=temp, chunk_size=args.chunk_size, backend=backend, **extra)[0]
    elif method in ('fused_topk', 'fused_topk_torch'):
        from swift_gkd_plugin.core.fused.loss import fused_linear_jsd
        from swift_gkd_plugin.core.teacher_signal import TeacherTopK
        from swift_gkd_plugin.core.topk import topk_of_logits
        with torch.no_grad():  # the teacher's top-64 (a server's answer): given, not timed
            parts = [topk_of_logits(x['ht'][i:i + 1024] @ wt.T, 64) for i in range(0, x['ht'].shape[0], 1024)]
        ids, lp = torch.cat([p.ids for p in parts]), torch.cat([p.logprobs for p in parts])
        backend = 'torch' if method == 'fused_topk_torch' else None

        def loss_of(n):
            return fused_linear_jsd(x['h'][:n], w, teacher=TeacherTopK(ids[:n], lp[:n]), beta=beta, temperature=temp,
                                    topk_tail=True, chunk_size=args.chunk_size, backend=backend)[0]
    else:
        raise ValueError(f'unknown method {method}')

    def step(n):
        loss = loss_of(n)
        loss.backward()
        return float(loss)

    return step


def _is_oom(exc):
    text = f'{type(exc).__name__}: {exc}'.lower()
    return isinstance(exc, MemoryError) or 'out of memory' in text or "can't allocate memory" in text


def run_worker(args):
    method, n = args.worker[0], int(args.worker[1])
    t_start = time.perf_counter()
    result = dict(method=method, n=n)
    try:
        import torch
        device, dtype = torch.device(args.device), getattr(torch, args.dtype)
        cuda = device.type == 'cuda'
        x = _make_inputs(torch, n, args, device, dtype)
        try:
            step = _make_step(torch, method, x, args)
        except (ImportError, Unavailable) as exc:
            result.update(status='unavailable', error=f'{type(exc).__name__}: {exc}')
            print(json.dumps(result), flush=True)
            return

        def clear():
            x['w'].grad = None
            x['h'].grad = None

        def sync():
            if cuda:
                torch.cuda.synchronize()

        step(min(n, 1024 if method == 'liger' else 64))  # warm-up (liger: its compiled chunk shape)
        clear()
        base = _memory_baseline(cuda, sync)
        base_reserved = torch.cuda.memory_reserved() if cuda else None
        if not cuda:
            if args.mem_limit_gb:
                import resource
                limit = int(_status_mib('VmSize') * 2**20 + args.mem_limit_gb * 2**30)
                resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
            peak_rss = _PeakRSS()
        times, cpu = [], []
        for _ in range(max(1, args.max_repeats)):
            clear()
            sync()
            t0, c0 = time.perf_counter(), time.process_time()
            loss = step(n)
            sync()
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
            if time.perf_counter() - t_start + times[-1] > args.budget_s:
                break
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else peak_rss.read() - base
        result.update(status='ok', time_s=statistics.median(times), times=[round(t, 3) for t in times],
                      cpu_s=statistics.median(cpu), peak_extra_mib=peak, loss=loss)
        if cuda:
            result['peak_reserved_extra_mib'] = (torch.cuda.max_memory_reserved() - base_reserved) / 2**20
        if method in ('fused2', 'fused2_serial'):
            from triton2_matmuls import float32_output_matmuls, weight_grad_path  # (the experiment's folder)
            result['weight_grad_path'] = weight_grad_path(device, dtype)
            if cuda and dtype != torch.float32 and not float32_output_matmuls(device, dtype):
                result.update(status='fallback', error=f'weight gradient: {result["weight_grad_path"]}: not the '
                                                       'second design\'s time')
        if _fallbacks():
            result.update(status='fallback', error=f'the self-check sent {_fallbacks()} to the PyTorch path (its '
                                                   'warning says why): not the kernel\'s time')
    except Exception as exc:  # report, never crash the table
        result.update(status='oom' if _is_oom(exc) else 'error', error=f'{type(exc).__name__}: {exc}'[:300])
    print(json.dumps(result), flush=True)


# ----------------------------------------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------------------------------------


def _available_gib():
    try:
        with open('/proc/meminfo') as f:
            return int(re.search(r'MemAvailable:\s+(\d+)', f.read()).group(1)) / 2**20
    except OSError:
        return None


def _loadavg():
    try:
        return ' '.join(open('/proc/loadavg').read().split()[:3])
    except OSError:
        return 'n/a'


def _machine():
    import platform
    cpu = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo') as f:
            cpu = re.search(r'model name\s*:\s*(.*)', f.read()).group(1)
    except (OSError, AttributeError):
        pass
    total = None
    try:
        with open('/proc/meminfo') as f:
            total = int(re.search(r'MemTotal:\s+(\d+)', f.read()).group(1)) / 2**20
    except (OSError, AttributeError):
        pass
    mem = f'{total:.0f} GiB RAM' if total else 'RAM n/a'
    return f'{cpu}, {os.cpu_count()} CPUs, {mem}, load average at the start {_loadavg()}'


def ratio_lines(results):
    """Per N: each method's time over the matmul floor's and over Liger's, measured in the same run."""
    by = {(r['method'], r['n']): r for r in results if r['status'] == 'ok'}
    lines = []
    for n in sorted({r['n'] for r in results}):
        for ref in ('floor', 'liger'):
            base = by.get((ref, n))
            if base is None:
                continue
            parts = [f"{m} {r['time_s'] / base['time_s']:.2f}x" for (m, k), r in by.items() if k == n and m != ref]
            lines.append(f'# N={n} time / {ref}: ' + ', '.join(parts))
    return lines


def _spawn(args, method, n, budget):
    cmd = [sys.executable, os.path.abspath(__file__), '--worker', method, str(n), '--budget-s', f'{budget:.1f}',
           '--device', args.device, '--hidden', str(args.hidden), '--vocab', str(args.vocab), '--dtype', args.dtype,
           '--beta', str(args.beta), '--temperature', str(args.temperature), '--max-repeats', str(args.max_repeats)]
    if args.chunk_size:
        cmd += ['--chunk-size', str(args.chunk_size)]
    if args.mem_limit_gb:
        cmd += ['--mem-limit-gb', str(args.mem_limit_gb)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get('PYTHONPATH')])),
               TORCHINDUCTOR_COMPILE_THREADS='1', TOKENIZERS_PARALLELISM='false')
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=max(900.0, 4 * budget))
    except subprocess.TimeoutExpired:
        return dict(method=method, n=n, status='timeout')
    for line in reversed(proc.stdout.strip().splitlines()):
        if line.startswith('{'):
            return json.loads(line)
    # no result line: killed (the OOM killer sends SIGKILL) or crashed
    status = 'oom' if proc.returncode in (-9, 137) else 'error'
    return dict(method=method, n=n, status=status, error=(proc.stderr or '')[-300:])


def _fmt(r):
    if r['status'] != 'ok':
        return f"{r['method']:>6} {r['n']:>6}  {r['status'].upper():>9}  {'':>8}  {'':>12}  {'':>10}  {r.get('error', '')[:70]}"
    return (f"{r['method']:>6} {r['n']:>6}  {r['time_s']:>9.2f}  {r['cpu_s']:>8.2f}  {r['peak_extra_mib']:>12.0f}  "
            f"{r['loss']:>10.6f}  {len(r['times'])} ({', '.join(f'{t:.2f}' for t in r['times'])})")


def summary_lines(results):
    """Per N: fused against every other method that finished there (memory: other/fused, time: fused/other)."""
    by = {(r['method'], r['n']): r for r in results if r['status'] == 'ok'}
    lines = []
    for n in sorted({r['n'] for r in results}):
        f = by.get(('fused', n))
        if f is None:
            continue
        parts = [f"{m} mem {o['peak_extra_mib'] / f['peak_extra_mib']:.2f}x less, time {f['time_s'] / o['time_s']:.2f}x "
                 f"(cpu {f['cpu_s'] / o['cpu_s']:.2f}x)" for (m, k), o in by.items() if k == n and m != 'fused']
        lines.append(f'# N={n} fused vs ' + '; '.join(parts))
    return lines


def final_line(results, methods):
    """The comparison line for the largest N at which every (available) method finished."""
    by = {(r['method'], r['n']): r for r in results}
    avail = [m for m in methods if not all(r['status'] == 'unavailable' for r in results if r['method'] == m)]
    ns = sorted({r['n'] for r in results}, reverse=True)
    n = next((n for n in ns if all(by.get((m, n), {}).get('status') == 'ok' for m in avail)), None)
    if n is None or 'fused' not in avail:
        return 'fused vs dense: n/a (no N where every method finished)'
    f = by[('fused', n)]

    def mem(m):
        return f"{by[(m, n)]['peak_extra_mib'] / f['peak_extra_mib']:.2f}x" if (m, n) in by and m in avail else 'n/a'

    def tim(m):
        return f"{f['time_s'] / by[(m, n)]['time_s']:.2f}x" if (m, n) in by and m in avail else 'n/a'

    return (f'fused vs dense: memory {mem("dense")} less, time {tim("dense")}; '
            f'fused vs liger: memory {mem("liger")} less, time {tim("liger")}; fused vs floor: time {tim("floor")}')


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        return run_worker(args)
    if args.ns:
        ns = args.ns
    elif args.device == 'cuda':  # issue 25's shapes: 4k / 8k / 16k tokens
        ns = [4096, 8192, 16384]
    else:
        ns = [1024, 2048, 4096, 8192] if args.full else [1024, 2048]
    budget_total = args.time_budget_s or (3600.0 if args.full else 720.0)
    if args.device == 'cpu' and args.mem_limit_gb is None:
        avail = _available_gib()
        args.mem_limit_gb = round(avail - 1.0, 1) if avail and avail > 2 else None
    print(f'# device={args.device} H={args.hidden} V={args.vocab} dtype={args.dtype} beta={args.beta} '
          f'T={args.temperature} N={ns} cpus={os.cpu_count()} mem_limit_gb={args.mem_limit_gb}', flush=True)
    print(f'# {_machine()}', flush=True)
    print(f"{'method':>6} {'N':>6}  {'time_s':>9}  {'cpu_s':>8}  {'peak_MiB':>12}  {'loss':>10}  repeats (wall s)",
          flush=True)
    results, start = [], time.perf_counter()
    jobs = [(m, n) for n in ns for m in args.methods]
    for i, (method, n) in enumerate(jobs):
        left = budget_total - (time.perf_counter() - start)
        weight = {k: k * (3 if k == max(ns) else 1) for k in ns}
        share = weight[n] / sum(weight[k] for _, k in jobs[i:])
        r = _spawn(args, method, n, max(left * share, 1.0))
        results.append(r)
        print(_fmt(r), flush=True)
        if r['status'] == 'unavailable':
            print(f'# {method} is unavailable: {r.get("error", "")}', flush=True)
    print(f'# total {time.perf_counter() - start:.0f} s; load average at the end {_loadavg()}', flush=True)
    fused = {r['n']: r for r in results if r['method'] == 'fused' and r['status'] == 'ok'}
    if len(fused) > 1:
        n0, n1 = sorted(fused)[:2]
        growth = fused[n1]['peak_extra_mib'] / fused[n0]['peak_extra_mib'] - 1
        print(f'# fused peak extra memory grows {100 * growth:+.1f}% from N={n0} to N={n1}', flush=True)
    for line in summary_lines(results) + ratio_lines(results):
        print(line, flush=True)
    if args.json_out:
        with open(args.json_out, 'w') as f:
            json.dump(results, f, indent=1)
    print(final_line(results, args.methods), flush=True)


if __name__ == '__main__':
    main()
