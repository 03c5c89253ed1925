"""``--torch_compile``: what the plugin keeps out of the compiled model, and the configuration it warns about.

Measured on CPU (tiny Qwen3, 2 ranks, gloo, dynamo with the ``eager`` backend: tracing and guards without kernels;
``tests/test_compile_cost.py``) and on one H100 (part d of the GPU kit, inductor, 0.5B-shaped student):

- Under DeepSpeed, accelerate compiles the engine's module in place (``engine.compile`` -> ``nn.Module.compile``), so
  everything that calls the student module runs through dynamo, sampling included. Sampling calls it once per new
  token with a growing KV cache: each new shape is a recompilation of the model's forward, and those count against the
  same per-function limit (``torch._dynamo.config.recompile_limit``, 8) as the training forward's own variants.
  Before sampling ran eager, ZeRO-3 + compile spent 21 s and 26 s of dynamo time in the sampling of steps 1 and 2
  (CPU, 8 tokens per sample) and 25 s in step 1's training forward.
- ZeRO-3 itself: DeepSpeed registers a forward and a backward hook on every submodule (parameter fetch and release).
  The compiled module traces them: they break the graph (``parameter_offload.py``) and are recompiled per submodule
  type, output type and grad mode until each reaches the recompile limit, after which they run eager. That cost is
  DeepSpeed's and dynamo's, not the plugin's: :func:`torch_compile_warnings` warns before loading.
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
