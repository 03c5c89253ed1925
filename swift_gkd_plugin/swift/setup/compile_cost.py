"""The costs warned about before loading: ``--torch_compile`` (what the plugin keeps out of the compiled model, and the
configuration it warns about) and LoRA under DeepSpeed ZeRO-3 (:func:`zero3_lora_warnings`). Their measured costs, on
CPU and on a GPU, are in docs_en/scale_results.md, docs_en/teacher_results.md and docs_en/gpu_results.md (part d).

- Under DeepSpeed, accelerate compiles the engine's module in place (``engine.compile`` -> ``nn.Module.compile``), so
  everything that calls the student module runs through dynamo, sampling included. Sampling calls it once per new
  token with a growing KV cache: each new shape is a recompilation of the model's forward, and those count against the
  same per-function limit (``torch._dynamo.config.recompile_limit``, 8) as the training forward's own variants. So
  sampling runs eager (:func:`eager_sampling`).
- ZeRO-3 itself: DeepSpeed registers a forward and a backward hook on every submodule (parameter fetch and release).
  The compiled module traces them: they break the graph (``parameter_offload.py``) and are recompiled per submodule
  type, output type and grad mode until each reaches the recompile limit, after which they run eager. That cost is
  DeepSpeed's and dynamo's, not the plugin's: :func:`torch_compile_warnings` warns before loading.

LoRA under DeepSpeed ZeRO-3: warned about before loading, with the measured cost and the faster configuration. ZeRO-3
fetches PEFT's wrapped linears module by module, and a shared-base teacher pass gathers the base again where a separate
ZeRO-3 teacher's partitions stay gathered after its first use; ms-swift's ZeRO-3 presets do not overlap communication
(``overlap_comm: false``), so every call is on the step's critical path. None of it is a redundant forward of the
plugin's. For LoRA the frozen base is what ZeRO-3 partitions, and the optimizer state is the adapter's only: ZeRO-2 or
no DeepSpeed keeps the base whole at little memory cost.
"""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from typing import List, Optional

import torch

# measured by part d of the GPU kit (one H100, 0.5B/1.5B-shaped models, 4 steps, bf16), see docs_en/gpu_results.md
_H100 = ('on one H100 (0.5B-shaped student) the first step took 140 s and 4 steps did not finish in 330 s, against '
         '3.8 s/step for ZeRO-3 without --torch_compile and 1.7 s/step for ZeRO-2')


@contextmanager
def eager_sampling():
    """Every ``torch.compile`` directive ignored while the block lasts (``torch.compiler.set_stance('force_eager')``).

    For sampling: a compiled model's decoding would be recompiled at every new sequence length and use up the
    recompile budget of the training forward (see the module docstring)."""
    with torch.compiler.set_stance('force_eager'):
        yield


def zero_stage(deepspeed) -> Optional[int]:
    """The ZeRO stage of ``--deepspeed`` (ms-swift's preset name such as ``zero3_offload``, a JSON file, or the
    parsed dict), or None without DeepSpeed or when it cannot be read."""
    if not deepspeed:
        return None
    config = deepspeed
    if isinstance(config, str):
        name = os.path.basename(config)
        if name.startswith('zero') and name[4:5].isdigit() and not os.path.isfile(config):
            return int(name[4])
        try:
            with open(config) as f:
                config = json.load(f)
        except (OSError, ValueError):
            return None
    if not isinstance(config, dict):
        return None
    stage = (config.get('zero_optimization') or {}).get('stage')
    return stage if isinstance(stage, int) else None


def deepspeed_name(deepspeed) -> str:
    """``--deepspeed`` as the user may have given it: ms-swift has replaced a preset name by its parsed JSON."""
    return deepspeed if isinstance(deepspeed, str) else f'(a ZeRO-{zero_stage(deepspeed)} config)'


def torch_compile_warnings(args) -> List[str]:
    """The warnings of ``--torch_compile`` with the flags given (before any model is loaded): ZeRO-3."""
    if not getattr(args, 'torch_compile', False) or zero_stage(getattr(args, 'deepspeed', None)) != 3:
        return []
    return [f'--torch_compile true with --deepspeed {deepspeed_name(args.deepspeed)} is slow: dynamo traces DeepSpeed\'s '
            'parameter hooks on every submodule, breaks the graph there and recompiles them until its recompile '
            f'limit; {_H100}. Faster: --deepspeed zero2 with --torch_compile true, or ZeRO-3 with --torch_compile '
            'false']

# part d of the GPU kit, one H100, 0.5B-shaped student, 4 steps (docs_en/gpu_results.md)
_H100_ZERO3_LORA = ('on one H100 (0.5B-shaped student) shared-base LoRA took 10.0 s/step under ZeRO-3 against '
                    '3.2 s/step without DeepSpeed, and reserved more memory (1.72 against 1.48 GiB)')


def zero3_lora_warnings(args) -> List[str]:
    """The warning of ``--tuner_type lora`` with ``--deepspeed`` at ZeRO stage 3 (before any model is loaded)."""
    if getattr(args, 'tuner_type', None) != 'lora' or zero_stage(getattr(args, 'deepspeed', None)) != 3:
        return []
    return [f'--tuner_type lora with --deepspeed {deepspeed_name(args.deepspeed)} is slow: ZeRO-3 partitions the frozen base '
            'and gathers it module by module in every forward and backward (2.3x the all-gather calls of full-model '
            'ZeRO-3 on the same base, counted on CPU), and a shared-base teacher gathers it once more; '
            f'{_H100_ZERO3_LORA}. Faster: --deepspeed zero2, or no --deepspeed (the optimizer state is the adapter\'s '
            'only)']
