"""LoRA under DeepSpeed ZeRO-3: warned about before loading, with the measured cost and the faster configuration.

Counted per step on CPU (tiny Qwen3, 2 ranks, gloo, ``tests/step_probe_plugin.py``, ``tests/test_zero3_lora.py``):
ZeRO-3 issues 2.3x the all-gather calls of a full-model ZeRO-3 run on the same base (231 against 100 per step), with
the same forwards (one teacher, one student, one recomputation under gradient checkpointing). About 90 of the extra
calls come with LoRA itself (PEFT's wrapped linears are fetched module by module; a LoRA student with a separate
teacher makes 190), the rest is the shared-base teacher pass, which gathers the base again (0.75x of it, 38 calls)
where a separate ZeRO-3 teacher's partitions stay gathered after its first use. ms-swift's ZeRO-3 presets do not
overlap communication (``overlap_comm: false``): every call is on the step's critical path. None of it is a redundant
forward of the plugin's. For LoRA the frozen base is what ZeRO-3 partitions, and the optimizer state is the
adapter's only: ZeRO-2 or no DeepSpeed keeps the base whole at little memory cost.
"""
from __future__ import annotations

from typing import List

from swift_gkd_plugin.swift.setup.compile_cost import deepspeed_name, zero_stage

# part d of the GPU kit, one H100, 0.5B-shaped student, 4 steps (docs_en/gpu_results.md)
_H100 = ('on one H100 (0.5B-shaped student) shared-base LoRA took 10.0 s/step under ZeRO-3 against 3.2 s/step '
         'without DeepSpeed, and reserved more memory (1.72 against 1.48 GiB)')


def zero3_lora_warnings(args) -> List[str]:
    """The warning of ``--tuner_type lora`` with ``--deepspeed`` at ZeRO stage 3 (before any model is loaded)."""
    if getattr(args, 'tuner_type', None) != 'lora' or zero_stage(getattr(args, 'deepspeed', None)) != 3:
        return []
    return [f'--tuner_type lora with --deepspeed {deepspeed_name(args.deepspeed)} is slow: ZeRO-3 partitions the frozen base '
            'and gathers it module by module in every forward and backward (2.3x the all-gather calls of full-model '
            'ZeRO-3 on the same base, counted on CPU), and a shared-base teacher gathers it once more; '
            f'{_H100}. Faster: --deepspeed zero2, or no --deepspeed (the optimizer state is the adapter\'s only)']
