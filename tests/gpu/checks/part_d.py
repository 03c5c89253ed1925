"""Part d: DeepSpeed ZeRO-2 and ZeRO-3 on one GPU, with and without ``--offload_teacher_model``, shared-base LoRA
self-distillation (``--teacher_model`` = ``--model``, ``--tuner_type lora``), and ZeRO-3 with ``--torch_compile``
and the fused loss (issue 21 item 9), through ``swift rlhf``."""
from __future__ import annotations

import os

from common import Results, build_workspace, finite, free_port, rlhf_argv, run_rlhf

CASES = {
    'zero2': dict(deepspeed='zero2'),
    'zero2_offload_teacher': dict(deepspeed='zero2', offload_teacher_model='true'),
    'zero3': dict(deepspeed='zero3'),
    'zero3_offload_teacher': dict(deepspeed='zero3', offload_teacher_model='true'),
    'shared_base_lora': dict(tuner_type='lora', lmbda=0.5, seq_kd='true'),
    'shared_base_lora_zero3': dict(tuner_type='lora', deepspeed='zero3'),
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
        res.add(case=case, ok=ok, rc=r['rc'], plugin_active=r['plugin_active'], losses=r['losses'],
                step_s=r['step_s'], reserved_gib=r['reserved_gib'], device_peak_gib=r['device_peak_gib'],
                wall_s=r['wall_s'], error=r['error'], **extra)
    if any(not r['ok'] for r in res.rows):
        res.status = 'partial'
    res.note(f'{steps} steps per run; reserved_gib = ms-swift memory(GiB); device_peak_gib = NVML peak in use')
    return res
