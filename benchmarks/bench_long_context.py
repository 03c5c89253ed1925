#!/usr/bin/env python
"""The GKD loss on one long row, sequence parallel 1 against 2: peak memory per rank and step time.

Usage::

    python benchmarks/bench_long_context.py                     # CPU: N in {4096, 8192}, H=128, V=151936
    python benchmarks/bench_long_context.py --tokens 1024,4096,8192,16384
    python benchmarks/bench_long_context.py --device cuda       # one process per GPU, N in {4096, 8192, 16384}

One row of N tokens, student and teacher hidden states ``[N, H]`` and heads ``[V, H]`` (student trainable, teacher
frozen), forward + backward of the loss, as ``swift rlhf --rlhf_type gkd --sequence_parallel_size SP`` computes it.
Each (method, N, SP) runs in SP processes (``torch.multiprocessing``; gloo on CPU, NCCL on CUDA): on CPU forks of
the driver, which imported torch, accelerate, ms-swift and the plugin's loss once (:func:`preload`: ~6 s a process
saved, nothing measured moves: the step alone is timed, its memory taken from the rank's resident size just before
it); on CUDA fresh processes (CUDA cannot be forked once the driver has asked it for free memory):

* every rank takes its slice of the row as ms-swift's Ulysses gives it (ms-swift's ``sequence_parallel`` set up for
  real: its device mesh, ``pad`` and ``split``; the labels through the plugin's ``local_slice``);
* the normaliser is the trainer's: ``BatchesMixin._count_step_tokens`` (an all-reduce over the ranks through
  accelerate, divided by the group size) and ``_loss_setup``'s ``step tokens / processes``;
* ``fused``: the plugin's ``fused_linear_jsd`` on the slice's hidden states (never holds ``[N, V]`` logits);
  ``dense``: both heads' full ``[N, V]`` logits, then ms-swift's built-in ``gkd_loss`` (its generalized JSD);
* then the student head's gradient is averaged over the ranks, as DDP does.

Peak memory per rank: CPU: the kernel's peak resident set size of the rank's process (``VmHWM``, reset through
``/proc/self/clear_refs`` after a warm-up step; the same measurement as ``bench_loss.py``) minus its resident size
just before the measured step; CUDA: ``torch.cuda.max_memory_allocated()`` minus the allocation before the step.
Both include the ``[V, H]`` float32 weight gradient. Time: wall time of the step (the slowest rank) and the CPU time
of each rank (user + system). A ``dense`` run whose estimated need does not fit is skipped with the reason.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.dirname(os.path.abspath(__file__))]

from bench_loss import _PeakRSS, _available_gib, _is_oom, _loadavg, _machine, _memory_baseline  # noqa: E402

METHODS = ['fused', 'dense']
DENSE_BYTES_PER_LOGIT = 14 * 4  # ms-swift's gkd_loss holds ~14 float32 [N, V] tensors at its peak (bench_loss.py)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ints = lambda s: [int(x) for x in s.split(',')]  # noqa: E731
    p.add_argument('--device', default='cpu', choices=['cpu', 'cuda'])
    p.add_argument('--tokens', type=ints, default=None, help='row lengths (default CPU 4096,8192; CUDA adds 16384)')
    p.add_argument('--hidden', type=int, default=128)
    p.add_argument('--vocab', type=int, default=151936)
    p.add_argument('--sp', type=ints, default=[1, 2], help='sequence-parallel sizes (ranks per row)')
    p.add_argument('--methods', type=lambda s: s.split(','), default=METHODS)
    p.add_argument('--prompt-tokens', type=int, default=0, help='leading positions without a label (the prompt)')
    p.add_argument('--beta', type=float, default=0.5)
    p.add_argument('--temperature', type=float, default=1.0)
    p.add_argument('--repeats', type=int, default=None, help='measured steps (default 1 on CPU, 3 on CUDA)')
    p.add_argument('--quick', action='store_true', help='N=4096 only, fused and dense where it fits')
    p.add_argument('--json-out', default=None, help='also write the results there')
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------------------------
# one rank
# ----------------------------------------------------------------------------------------------------------------


def _trainer_normalizer(full_labels, accelerator):
    """The trainer's normaliser of this step: ``_count_step_tokens`` on the group's pooled row (each rank of a
    group holds it whole), then ``_loss_setup``'s ``max(step tokens, 1) / processes``."""
    from types import SimpleNamespace

    from swift_gkd_plugin.core import Mode
    from swift_gkd_plugin.swift.rollout.batches import BatchesMixin
    trainer = SimpleNamespace(model=SimpleNamespace(training=True), accelerator=accelerator,
                              teacher=SimpleNamespace(xtok=None),
                              args=SimpleNamespace(gradient_accumulation_steps=1), _gkd_mode=Mode.OFF_POLICY)
    batch = {'model_inputs': {'labels': full_labels}, 'teacher_model_inputs': {'labels': full_labels}}
    BatchesMixin._count_step_tokens(trainer, [batch])
    return max(batch['gkd_step_tokens'], 1.0) / accelerator.num_processes


def _rank(rank, world, method, n, args, out_dir, store):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    result = dict(method=method, n=n, sp=world, rank=rank)
    try:
        import torch
        import torch.distributed as dist
        cuda = args.device == 'cuda'
        if cuda:
            torch.cuda.set_device(rank)
        else:  # the cores shared between the ranks
            threads = max(1, (os.cpu_count() or 1) // world)
            os.environ['OMP_NUM_THREADS'] = str(threads)
            torch.set_num_threads(threads)
        device = torch.device(f'cuda:{rank}' if cuda else 'cpu')
        from accelerate import Accelerator
        # a file rendezvous: a free TCP port picked here could be taken by a parallel job before the ranks bind it
        dist.init_process_group('nccl' if cuda else 'gloo', init_method=f'file://{store}', rank=rank, world_size=world)
        accelerator = Accelerator(cpu=not cuda)  # adopts the process group above
        from swift.rlhf_trainers.gkd_loss import TeacherOutput, gkd_loss
        from swift.sequence_parallel import sequence_parallel

        from swift_gkd_plugin.core.constants import IGNORE_INDEX
        from swift_gkd_plugin.core.fused.loss import fused_linear_jsd
        from swift_gkd_plugin.core.teacher_signal import TeacherHead
        from swift_gkd_plugin.swift.sequence_parallel import local_slice
        from swift_gkd_plugin.core.views import response_positions, shift_labels
        if world > 1:  # ms-swift's Ulysses state as SequenceParallel.prepare sets it (no model to patch here)
            sequence_parallel.world_size, sequence_parallel.num_heads = world, world
            sequence_parallel._init_device_mesh()

        g = torch.Generator(device=device).manual_seed(0)
        h, v = args.hidden, args.vocab

        def normal(*shape, std):
            return torch.empty(*shape, device=device).normal_(0.0, std, generator=g)

        w, wt = normal(v, h, std=2 / math.sqrt(h)), normal(v, h, std=2 / math.sqrt(h))  # logits of std ~2
        hidden, t_hidden = normal(1, n, h, std=1.0), normal(1, n, h, std=1.0)  # the whole row, same on every rank
        ids = torch.randint(0, v, (1, n), generator=g, device=device)
        full_labels = ids.clone()
        full_labels[:, :args.prompt_tokens] = IGNORE_INDEX
        normalizer = _trainer_normalizer(full_labels, accelerator)
        labels = shift_labels(full_labels)
        if world > 1:  # this rank's slice, as ms-swift's forward hook leaves the models' outputs
            pad = torch.zeros(h, device=device)
            hidden, t_hidden = (sequence_parallel.split(sequence_parallel.pad(x, padding_value=pad), dim=1)
                                for x in (hidden, t_hidden))
            labels = local_slice(labels)
        mask = labels != IGNORE_INDEX
        index = response_positions(mask, int(mask.sum()))
        hidden = hidden.flatten(0, 1).index_select(0, index).contiguous().requires_grad_()
        t_hidden = t_hidden.flatten(0, 1).index_select(0, index).contiguous()
        labels = labels.flatten().index_select(0, index)
        w.requires_grad_()
        del ids, full_labels, mask

        def step(rows):
            x, xt, y = hidden[:rows], t_hidden[:rows], labels[:rows]
            if method == 'fused':
                loss = fused_linear_jsd(x, w, teacher=TeacherHead(xt, wt), beta=args.beta,
                                        temperature=args.temperature, normalizer=normalizer)[0]
            else:
                z = x @ w.t()
                with torch.no_grad():
                    zt = xt @ wt.t()
                total, _ = gkd_loss(z, TeacherOutput(full_logits=zt, labels=y), y, args.beta, args.temperature)
                loss = total / normalizer
            loss.backward()
            if world > 1:  # DDP's gradient average over the ranks
                dist.all_reduce(w.grad)
                w.grad /= world
            return loss.detach()

        def sync():
            if cuda:
                torch.cuda.synchronize()
            dist.barrier()

        step(min(64, hidden.shape[0]))  # warm-up
        times, cpus = [], []
        for _ in range(args.repeats):
            w.grad = hidden.grad = None
            base = _memory_baseline(cuda, sync)
            peak_rss = None if cuda else _PeakRSS()
            t0, c0 = time.perf_counter(), time.process_time()
            loss = step(hidden.shape[0])
            sync()
            times.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else peak_rss.read() - base
        total = loss.clone()
        dist.all_reduce(total)  # the mean over ranks of the rank losses: the loss of the whole row
        result.update(status='ok', rows=int(hidden.shape[0]), normalizer=normalizer, peak_mib=peak,
                      time_s=min(times), cpu_s=min(cpus), loss=float(total) / world)
    except Exception as exc:  # report, never crash the table
        result.update(status='oom' if _is_oom(exc) else 'error', error=f'{type(exc).__name__}: {exc}'[:300])
    with open(os.path.join(out_dir, f'rank{rank}.json'), 'w') as f:
        json.dump(result, f)


# ----------------------------------------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------------------------------------


def dense_skip_reason(n, sp, args):
    """Why ``dense`` at (n, sp) would not fit (None if it may): ~14 float32 ``[rows, V]`` tensors per rank."""
    need = DENSE_BYTES_PER_LOGIT * math.ceil(n / sp) * args.vocab / 2**30
    if args.device == 'cuda':
        import torch
        free = torch.cuda.mem_get_info(0)[0] / 2**30
        if need > free:
            return f'needs ~{need:.1f} GiB per rank, the GPU has {free:.1f} GiB free'
        return None
    avail = _available_gib()
    if avail is not None and need * sp > avail - 1.0:
        return f'needs ~{need:.1f} GiB per rank x {sp}, {avail:.1f} GiB available'
    return None


def preload() -> None:
    """Import what a rank imports (:func:`_rank`), in the driver: the CPU ranks are forked from it. Imports only: no
    tensor op, no thread, no process group (a fork must stay safe)."""
    import accelerate  # noqa: F401
    import swift.rlhf_trainers.gkd_loss  # noqa: F401
    import swift.sequence_parallel  # noqa: F401
    import torch.distributed  # noqa: F401

    import swift_gkd_plugin.core.fused.loss  # noqa: F401
    import swift_gkd_plugin.swift.rollout.batches  # noqa: F401
    import swift_gkd_plugin.swift.sequence_parallel  # noqa: F401


def run_case(method, n, sp, args):
    """One (method, N, SP): SP rank processes (forks of the driver on CPU, fresh on CUDA); the per-rank results
    merged (max memory and time over ranks)."""
    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as out_dir, tempfile.TemporaryDirectory() as store_dir:
        try:
            mp.start_processes(_rank, args=(sp, method, n, args, out_dir, os.path.join(store_dir, 'store')),
                               nprocs=sp, join=True, start_method='spawn' if args.device == 'cuda' else 'fork')
        except Exception as exc:  # a rank killed (the OOM killer) or crashed
            status = 'oom' if 'SIGKILL' in str(exc) else 'error'
            return dict(method=method, n=n, sp=sp, status=status, error=str(exc)[-200:])
        ranks = [json.load(open(os.path.join(out_dir, f))) for f in sorted(os.listdir(out_dir))]
    bad = [r for r in ranks if r['status'] != 'ok']
    if bad:
        return dict(method=method, n=n, sp=sp, status=bad[0]['status'], error=bad[0].get('error', ''))
    return dict(method=method, n=n, sp=sp, status='ok', rows=[r['rows'] for r in ranks],
                peak_mib=max(r['peak_mib'] for r in ranks), time_s=max(r['time_s'] for r in ranks),
                cpu_s=max(r['cpu_s'] for r in ranks), loss=ranks[0]['loss'], normalizer=ranks[0]['normalizer'])


def fmt(r):
    head = f"{r['method']:>6} {r['n']:>6} {r['sp']:>3}"
    if r['status'] != 'ok':
        return f"{head}  {r['status'].upper():>10}  {r.get('error', '')[:90]}"
    return (f"{head}  {max(r['rows']):>9}  {r['peak_mib']:>13.1f}  {r['time_s']:>8.2f}  {r['cpu_s']:>8.2f}  "
            f"{r['loss']:>10.6f}  {r['normalizer']:>10.1f}")


def ratio(a, b):
    return f'{a / b:.2f}x' if b > 0 else 'n/a'


def ratio_lines(results):
    """From the measured rows only: SP=k against SP=1 (memory per rank, time, loss) and dense against fused."""
    by = {(r['method'], r['n'], r['sp']): r for r in results if r['status'] == 'ok'}
    lines = []
    for (m, n, sp), r in sorted(by.items()):
        one = by.get((m, n, 1))
        if sp > 1 and one:
            lines.append(f"# {m} N={n}: SP={sp}/SP=1 memory per rank {ratio(r['peak_mib'], one['peak_mib'])}, "
                         f"time {ratio(r['time_s'], one['time_s'])}, "
                         f"loss difference {abs(r['loss'] - one['loss']):.2e}")
    for (m, n, sp), r in sorted(by.items()):
        f = by.get(('fused', n, sp))
        if m == 'dense' and f:
            lines.append(f"# N={n} SP={sp}: dense/fused memory per rank {ratio(r['peak_mib'], f['peak_mib'])}, "
                         f"time {ratio(r['time_s'], f['time_s'])}")
    return lines


def main(argv=None):
    args = parse_args(argv)
    if args.tokens is None:
        args.tokens = [4096] if args.quick else [4096, 8192] + ([16384] if args.device == 'cuda' else [])
    args.repeats = args.repeats or (3 if args.device == 'cuda' else 1)
    print(f'# device={args.device} H={args.hidden} V={args.vocab} N={args.tokens} SP={args.sp} beta={args.beta} '
          f'T={args.temperature} prompt={args.prompt_tokens} repeats={args.repeats} float32', flush=True)
    print(f'# {_machine()}', flush=True)
    print('# memory: ' + ('torch.cuda.max_memory_allocated() - allocated before the step' if args.device == 'cuda'
                          else 'peak RSS (VmHWM, reset after warm-up) - RSS before the step, per rank process'))
    print(f"{'method':>6} {'N':>6} {'SP':>3}  {'rows/rank':>9}  {'peak_MiB/rank':>13}  {'time_s':>8}  {'cpu_s':>8}  "
          f"{'loss':>10}  {'normaliser':>10}", flush=True)
    if args.device == 'cpu':
        preload()
    results, start = [], time.perf_counter()
    for n in args.tokens:
        for method in args.methods:
            for sp in args.sp:
                reason = dense_skip_reason(n, sp, args) if method == 'dense' else None
                r = (dict(method=method, n=n, sp=sp, status='skipped', error=reason) if reason
                     else run_case(method, n, sp, args))
                results.append(r)
                print(fmt(r), flush=True)
    print(f'# total {time.perf_counter() - start:.0f} s; load average at the end {_loadavg()}', flush=True)
    for line in ratio_lines(results):
        print(line, flush=True)
    if args.json_out:
        with open(args.json_out, 'w') as f:
            json.dump(results, f, indent=1)


if __name__ == '__main__':
    main()
