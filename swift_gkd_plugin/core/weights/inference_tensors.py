"""A model that sampled under ``torch.inference_mode()`` while DeepSpeed ZeRO-3 gathered its weights layer by layer
(``--ds3_gather_for_generation false``), made ready to train again.

ms-swift's transformers engine samples under ``torch.inference_mode()``. Without the gather of every weight before
sampling, ZeRO-3's hooks gather each layer's weights inside that mode, so two things outlive the sampling:

* every parameter's ``data`` is an inference tensor (the gathered weights ZeRO-3 keeps, such as those under its
  persistence threshold, and the empty placeholders of the released ones): the next training forward cannot save
  them for backward (``RuntimeError: Inference tensors cannot be saved for backward``, or its ``requires_grad``
  variant);
* ZeRO-3's fetch trace, recorded on the sampling forwards, where the output head runs as its own module: it then
  orders the releases of the training step, in which the fused loss reads the head outside its module (an external
  parameter), and the head was found released (empty) in the loss's backward.

:func:`reclaim_after_inference_sampling` puts ordinary copies in place of the inference tensors and, where there were
any, drops the trace (ZeRO-3 records a new one on the training step, as on its first step).
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ['reclaim_after_inference_sampling']


def reclaim_after_inference_sampling(model: nn.Module) -> int:
    """Replace each parameter's data that is an inference tensor by an ordinary copy of it, and drop ZeRO-3's fetch
    trace where there was one (``model``: as prepared, a DeepSpeed engine or a module); the number replaced. A flag
    read per parameter where none is."""
    replaced = 0
    with torch.inference_mode(False):
        for param in model.parameters():
            if param.data.is_inference():
                param.data = param.data.clone()
                replaced += 1
    optimizer = getattr(model, 'optimizer', None)  # a ZeRO-3 engine's: its parameter offload (a frozen model's: itself)
    offload = getattr(optimizer, 'parameter_offload', optimizer)
    if replaced and hasattr(offload, 'get_param_coordinator'):
        coordinator = offload.get_param_coordinator()
        if not coordinator.is_invalid_trace():
            coordinator._invalidate_trace()  # (DeepSpeed's own call where a step leaves its trace)
    return replaced
