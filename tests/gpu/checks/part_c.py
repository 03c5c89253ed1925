"""Part c: teacher offload (``swift_gkd_plugin.core.weights.offload.TeacherOffloader``) against a resident teacher.

Ten training steps of the real-shape student (forward, fused GKD loss against the teacher's hidden states and head,
backward) with the 1.5B-shaped teacher resident on the GPU, offloaded with its prefetch started before the student's
forward, and offloaded without prefetch (the copy waited for). Per scenario: median step time, peak allocated and
reserved memory, and ``num_alloc_retries`` (cudaMalloc retries after freeing the cache: a fragmented pool); the
prefetch's overlap = (time without prefetch - time with) / time of the copy alone. Issue 21 item 1 (offload copies
allocated in the side stream's pool, which the compute stream cannot reuse) shows as reserved - allocated and
retries of the prefetch scenario. Memory statistics need CUDA: on CPU the offloader is a no-op and only times run.

These three run SGD at learning rate 0 with the teacher resident through the loss's backward: their peak is the
forward's, which holds the teacher in every scenario, so offload shows no saving there (5.91 vs 5.91 GiB on the
first H100 run). Two AdamW scenarios (learning rate 1e-5, ``adamw_resident`` and ``adamw_offload_prefetch``) follow
the trainer's order instead: the teacher's forward inside ``resident()``, its head detached there (as
``swift/trainer.py`` does), then the loss, the backward and the AdamW step with the teacher's other weights gone from
the device; each starts from a freshly loaded student, so their losses must agree.
"""
from __future__ import annotations

import json
import os
import statistics
import time

from common import Results, build_workspace


def run(args) -> Results:
    import torch
    from transformers import AutoModelForCausalLM

    from swift_gkd_plugin.core.fused.loss import fused_linear_jsd
    from swift_gkd_plugin.core.teacher_signal import TeacherHead
    from swift_gkd_plugin.core.weights.offload import TeacherOffloader
    res = Results('c', 'teacher offload: memory, allocator retries and prefetch overlap against a resident teacher')
    cuda = args.device == 'cuda'
    dev = torch.device('cuda' if cuda else 'cpu')
    ws = build_workspace(os.path.join(args.work, 'ws'), args.tiny, dev.type)
    dtype = getattr(torch, ws.dtype)
    batch, seq = (2, 32) if args.tiny else (4, 1024)
    steps = args.steps or (3 if args.tiny else 10)
    state = {}

    def load_student(optimizer):
        state.clear()
        if cuda:
            torch.cuda.empty_cache()
        student = AutoModelForCausalLM.from_pretrained(ws.student, dtype=dtype).to(dev)
        student.gradient_checkpointing_enable()
        student.train()  # checkpointing acts in training mode only (Qwen2 has no dropout)
        opt = (torch.optim.SGD(student.parameters(), lr=0.0) if optimizer == 'sgd_lr0' else
               torch.optim.AdamW(student.parameters(), lr=1e-5, weight_decay=0.0))
        state.update(student=student, opt=opt)

    g = torch.Generator().manual_seed(0)
    with open(os.path.join(ws.student, 'config.json')) as f:
        vocab = json.load(f)['vocab_size']
    batches = [torch.randint(0, vocab, (batch, seq), generator=g).to(dev) for _ in range(steps)]

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def one_step(teacher, ids, offloader=None, prefetch=False, trainer_order=False):
        student, opt = state['student'], state['opt']
        if offloader is not None and prefetch:
            offloader.prefetch()
        sh = student.model(input_ids=ids).last_hidden_state.flatten(0, 1)
        ctx = offloader.resident() if offloader is not None else _nullcontext(teacher)
        if trainer_order:  # the teacher's weights leave the device before the loss; its head is kept, detached
            with ctx as t, torch.no_grad():
                th = t.model(input_ids=ids).last_hidden_state.flatten(0, 1)
                head = t.lm_head.weight.detach()
            loss = fused_linear_jsd(sh, student.lm_head.weight, teacher=TeacherHead(th, head), beta=0.5,
                                    temperature=1.0)[0]
            loss.backward()
        else:
            with ctx as t:
                with torch.no_grad():
                    th = t.model(input_ids=ids).last_hidden_state.flatten(0, 1)
                loss = fused_linear_jsd(sh, student.lm_head.weight, teacher=TeacherHead(th, t.lm_head.weight),
                                        beta=0.5, temperature=1.0)[0]
                loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    for scenario, optimizer in SCENARIOS:
        load_student(optimizer)
        teacher = AutoModelForCausalLM.from_pretrained(ws.teacher, dtype=dtype).to(dev).eval()
        offloader = TeacherOffloader(teacher, dev) if 'offload' in scenario else None
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            retries0 = torch.cuda.memory_stats().get('num_alloc_retries', 0)
        times, losses = [], []
        for ids in batches:
            sync()
            t0 = time.perf_counter()
            losses.append(one_step(teacher, ids, offloader, prefetch=scenario.endswith('offload_prefetch'),
                                   trainer_order=optimizer == 'adamw'))
            sync()
            times.append(time.perf_counter() - t0)
        row = res.add(scenario=scenario, optimizer=optimizer, steps=steps,
                      step_ms=1e3 * statistics.median(times[1:] or times),
                      first_step_ms=1e3 * times[0], loss=losses[-1],
                      teacher_gib=(offloader.num_bytes if offloader else
                                   sum(p.numel() * p.element_size() for p in teacher.parameters())) / 2**30,
                      offload_active=bool(offloader and offloader.enabled))
        if cuda:
            stats = torch.cuda.memory_stats()
            row.update(peak_allocated_gib=torch.cuda.max_memory_allocated() / 2**30,
                       peak_reserved_gib=torch.cuda.max_memory_reserved() / 2**30,
                       num_alloc_retries=stats.get('num_alloc_retries', 0) - retries0)
        if offloader is not None and cuda:
            host = offloader._host  # the pinned master copies: the copy alone, for the overlap
            sync()
            t0 = time.perf_counter()
            copies = [h.to(dev, non_blocking=True) for h in host]
            sync()
            row['copy_alone_ms'] = 1e3 * (time.perf_counter() - t0)
            row['h2d_gbps'] = offloader.num_bytes / (row['copy_alone_ms'] / 1e3) / 1e9
            del copies
        del teacher, offloader
        if cuda:
            torch.cuda.empty_cache()
    state.clear()
    by = {r['scenario']: r for r in res.rows}
    pre, nopre = by.get('offload_prefetch'), by.get('offload_no_prefetch')
    if cuda and pre and nopre and pre.get('copy_alone_ms'):
        overlap = (nopre['step_ms'] - pre['step_ms']) / pre['copy_alone_ms']
        pre['prefetch_overlap'] = max(0.0, min(1.0, overlap))
        res.note(f"prefetch hides {100 * pre['prefetch_overlap']:.0f}% of the {pre['copy_alone_ms']:.0f} ms copy "
                 f"({pre['h2d_gbps']:.1f} GB/s)")
        res.note(f"offload vs resident: peak allocated {pre['peak_allocated_gib']:.2f} vs "
                 f"{by['resident']['peak_allocated_gib']:.2f} GiB, reserved {pre['peak_reserved_gib']:.2f} vs "
                 f"{by['resident']['peak_reserved_gib']:.2f} GiB, alloc retries {pre['num_alloc_retries']}")
    ar, ao = by.get('adamw_resident'), by.get('adamw_offload_prefetch')
    if ar and ao:
        ao['loss_diff_vs_resident'] = abs(ao['loss'] - ar['loss'])
        if cuda:
            ao['saved_allocated_gib'] = ar['peak_allocated_gib'] - ao['peak_allocated_gib']
            res.note(f"AdamW, trainer order: peak allocated {ao['peak_allocated_gib']:.2f} GiB offloaded vs "
                     f"{ar['peak_allocated_gib']:.2f} GiB resident (saved {ao['saved_allocated_gib']:.2f} GiB of a "
                     f"{ar['teacher_gib']:.2f} GiB teacher), reserved {ao['peak_reserved_gib']:.2f} vs "
                     f"{ar['peak_reserved_gib']:.2f} GiB")
    if not cuda:
        res.status = 'skipped'
        res.note('no CUDA: the offloader is a no-op on CPU; memory statistics and the overlap need a GPU (times only)')
    res.note(f'batch {batch} x {seq} tokens, {steps} steps, gradient checkpointing on the student; sgd_lr0: SGD at '
             'lr 0, teacher resident through the backward; adamw: AdamW at lr 1e-5 in the trainer\'s order')
    return res


# (scenario, optimizer): the first run's three, then the two where offload's saving can show
SCENARIOS = [('resident', 'sgd_lr0'), ('offload_prefetch', 'sgd_lr0'), ('offload_no_prefetch', 'sgd_lr0'),
             ('adamw_resident', 'adamw'), ('adamw_offload_prefetch', 'adamw')]


class _nullcontext:
    def __init__(self, value):
        self.value = value

    def __enter__(self):
        return self.value

    def __exit__(self, *exc):
        return False
