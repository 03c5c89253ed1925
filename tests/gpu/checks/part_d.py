"""Part d: DeepSpeed ZeRO-2 and ZeRO-3 on one GPU, with and without ``--offload_teacher_model``, shared-base LoRA
self-distillation (``--teacher_model`` = ``--model``, ``--tuner_type lora``), and ZeRO-3 with ``--torch_compile``
and the fused loss (issue 21 item 9), through ``swift rlhf``.

Shared-base LoRA starts from a zero adapter (LoRA's B), so the student equals its base, the teacher, and the
divergence is exactly 0: the first run's losses were 0 at every step and checked nothing. These cases train the
adapter at a real learning rate with an SFT term (``--sft_alpha``, which moves it at the first step), so that from
the second step the student differs from the base; ``separate_base_lora`` runs the same with the teacher loaded as a
separate model (a copy of the base's folder), and its losses must equal ``shared_base_lora``'s step by step: the
adapter-off teacher pass is checked against a separate base model. Each needs a non-zero divergence
(``gkd/loss_<mode>``) after the first step.
"""
from __future__ import annotations

import os

import shutil

from common import Results, build_workspace, finite, free_port, rlhf_argv, run_rlhf

# a LoRA that moves from its first step (the SFT term) at a real learning rate: from step 2 the student is not its base
LORA_TRAINS = dict(tuner_type='lora', lmbda=0, sft_alpha=0.5, learning_rate=1e-3, lr_scheduler_type='constant',
                   warmup_ratio=0)

CASES = {
    'zero2': dict(deepspeed='zero2'),
    'zero2_offload_teacher': dict(deepspeed='zero2', offload_teacher_model='true'),
    'zero3': dict(deepspeed='zero3'),
    'zero3_offload_teacher': dict(deepspeed='zero3', offload_teacher_model='true'),
    'shared_base_lora': dict(LORA_TRAINS),
    'separate_base_lora': dict(LORA_TRAINS),
    'shared_base_lora_seq_kd': dict(LORA_TRAINS, lmbda=0.5, seq_kd='true'),
    'shared_base_lora_zero3': dict(LORA_TRAINS, deepspeed='zero3'),
    # the fused loss runs inside the compiled student's forward under ZeRO-3 (inductor on a GPU; on CPU the eager
    # backend: dynamo's tracing and guards without building kernels)
    'zero3_torch_compile': dict(deepspeed='zero3', torch_compile='true', gradient_checkpointing='false',
                                gkd_loss_impl='fused'),
}


def run(args) -> Results:
    res = Results('d', 'DeepSpeed ZeRO-2/3 on one GPU, teacher offload, shared-base LoRA self-distillation')
    ws = build_workspace(os.path.join(args.work, 'ws'), args.tiny, 'cuda' if args.device == 'cuda' else 'cpu')
    steps = args.steps or (2 if args.tiny else 4)
    for case in args.cases or list(CASES):
        flags = dict(CASES[case])
        if case.startswith('shared_base'):
            flags['teacher_model'] = ws.student
        elif case.startswith('separate_base'):
            flags['teacher_model'] = separate_copy(ws.student)
        if args.device == 'cpu':
            flags.update(use_cpu='true')
        if 'deepspeed' in flags:
            flags.update(fp16='false', bf16='false' if ws.dtype == 'float32' else 'true')
        if 'torch_compile' in flags and args.device == 'cpu':
            flags.update(torch_compile_backend='eager')
        out = os.path.join(args.work, f'd_{case}')
        # one rank under torchrun, as a one-GPU DeepSpeed run is launched (without its environment DeepSpeed
        # looks for MPI to find its rank)
        env = dict(NPROC_PER_NODE='1', MASTER_PORT=str(free_port()))
        left = res.seconds_left(args.part_budget_s)
        if left < 60:
            res.add(case=case, ok=False, rc='not run', error=f'part budget: {left:.0f} s left')
            continue
        log_path = os.path.join(args.work, f'd_{case}.log')
        r = run_rlhf(rlhf_argv(ws, out, steps, **flags), env=env, timeout=min(args.run_timeout, left),
                     log_path=log_path)
        ok = r['rc'] == 0 and r['plugin_active'] and bool(r['losses']) and all(map(finite, r['losses']))
        extra = {}
        if 'torch_compile' in flags:
            with open(log_path) as f:
                log = f.read()
            # the fused loss must apply; dynamo's recompile-limit warnings (DeepSpeed's hooks hit it too) are counted
            extra = dict(fused='GKD loss implementation: fused' in log,
                         recompile_limit_hits=log.count('recompile_limit'))
            ok = ok and extra['fused']
        if 'sft_alpha' in flags:
            div = [max((v for k, v in x.items() if k.startswith('gkd/loss_') and finite(v)), default=None)
                   for x in r['logs']][1:]
            extra['divergence_after_step1'] = div
            ok = ok and any(finite(d) and d > 0 for d in div)
        res.add(case=case, ok=ok, rc=r['rc'], plugin_active=r['plugin_active'], losses=r['losses'],
                step_s=r['step_s'], reserved_gib=r['reserved_gib'], device_peak_gib=r['device_peak_gib'],
                wall_s=r['wall_s'], error=r['error'], **extra)
    by = {r['case']: r for r in res.rows}
    shared, separate = by.get('shared_base_lora'), by.get('separate_base_lora')
    if shared and separate and shared.get('losses') and separate.get('losses'):
        diff = max_rel_diff(shared['losses'], separate['losses'])
        separate['max_rel_loss_diff_vs_shared'] = diff
        same = diff is not None and diff < SHARED_TOLERANCE and len(shared['losses']) == len(separate['losses'])
        separate['ok'] = separate['ok'] and same
        res.note(f'shared-base teacher pass against a separate base model: largest relative loss difference '
                 f'{diff:.3g} (tolerance {SHARED_TOLERANCE:g})')
    if any(not r['ok'] for r in res.rows):
        res.status = 'partial'
    res.note(f'{steps} steps per run; reserved_gib = ms-swift memory(GiB); device_peak_gib = NVML peak in use')
    return res


SHARED_TOLERANCE = 1e-3  # the same computation either way; bf16 kernels may differ in the last bits


def separate_copy(model_dir: str) -> str:
    """A copy of ``model_dir`` at another path: loaded as a separate teacher, not recognised as the shared base."""
    dest = model_dir.rstrip('/') + '_separate_copy'
    if not os.path.exists(os.path.join(dest, 'config.json')):
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(model_dir, dest)
    return dest


def max_rel_diff(a, b):
    n = min(len(a), len(b))
    if not n or not all(map(finite, a[:n] + b[:n])):
        return None
    return max(abs(x - y) / max(abs(y), 1e-6) for x, y in zip(a[:n], b[:n]))
