"""Exact LoRA merge/unmerge round trips for the weight syncs to vLLM, when the teacher reads the student's base.

Without ``--vllm_enable_lora`` (and, in ``swift rlhf``, for the adapter-only sync too) ms-swift sends a LoRA student
to vLLM by merging the adapter into the base weights **in place**, exporting them, and unmerging: ``W + d - d``.
In bf16 that is not ``W`` (each step rounds), so the frozen base drifts a little at every sync (7.5% of the entries
of a bf16 layer changed after 100 round trips). When the teacher *is* that base (``--teacher_model`` equal to
``--model`` with ``--tuner_type lora``: the base with the adapter disabled; or a frozen ``--teacher_adapters``
adapter on the student's base) the distillation target silently moves. :class:`BaseWeightsKeeper` keeps a CPU copy
of the base weights of every LoRA layer across the round trip and writes it back after the unmerge, so the base is
bit-for-bit the same afterwards. The copy exists only during the sync.

Parameters partitioned by DeepSpeed ZeRO-3 are skipped: the merge edits a gathered copy that ZeRO-3 drops without
writing it back. Works with peft's ``LoraLayer`` and its subclasses (mcore-bridge's ``LoraParallelLinear`` in
``megatron rlhf`` is one). Pure PyTorch and peft: no ms-swift import.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, List, Tuple

import torch
from peft.tuners.lora import LoraLayer


def _lora_layers(models: Iterable[torch.nn.Module]) -> List[LoraLayer]:
    return [m for model in models for m in model.modules() if isinstance(m, LoraLayer)]


class BaseWeightsKeeper:
    """``save`` before merging the adapters, ``restore`` after unmerging them."""

    def __init__(self):
        self._saved: List[Tuple[LoraLayer, torch.nn.Parameter, torch.Tensor]] = []

    @torch.no_grad()
    def save(self, models: Iterable[torch.nn.Module]) -> None:
        self._saved = []
        seen = set()
        for layer in _lora_layers(models):
            for param in layer.get_base_layer().parameters():
                if id(param) in seen or hasattr(param, 'ds_id'):  # ds_id: a ZeRO-3 partition, see above
                    continue
                seen.add(id(param))
                self._saved.append((layer, param, param.detach().to('cpu', copy=True)))

    @torch.no_grad()
    def restore(self) -> None:
        """Write the saved weights back into the layers that are unmerged again (a layer still merged keeps its
        merged weights: its ``merged`` flag says so, and its own unmerge will follow)."""
        for layer, param, saved in self._saved:
            if not layer.merged:
                param.data.copy_(saved)
        self._saved = []


@contextmanager
def exact_lora_round_trip(models: Iterable[torch.nn.Module], enabled: bool = True):
    """Around code that merges LoRA adapters in place and unmerges them: the base weights come out unchanged."""
    if not enabled:
        yield
        return
    models = list(models)
    keeper = BaseWeightsKeeper()
    keeper.save(models)
    try:
        yield
    finally:
        keeper.restore()
