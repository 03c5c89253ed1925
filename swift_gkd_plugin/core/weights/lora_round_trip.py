"""Exact LoRA merge/unmerge round trips for the weight syncs to vLLM: the frozen base and the adapters come out as
they went in.

Without ``--vllm_enable_lora`` ms-swift sends a LoRA student to vLLM by merging the adapter into the base weights **in
place**, exporting them, and unmerging: ``W + d - d``. In bf16 that is not ``W`` (each step rounds), so the frozen base
drifts at every sync (7.5% of the entries of a bf16 layer changed after 100 round trips): the student's own base in
every LoRA run, and the distillation target when the teacher reads that base (``--teacher_model`` equal to
``--model`` with ``--tuner_type lora``, or ``--teacher_adapters``). ms-swift's merge also moves each adapter to the base
layer's dtype first (peft's ``_move_adapter_to_device_of_base_layer``): float32 adapters on a bf16 base are rounded to
bf16 at every sync and train on in bf16. The adapter-only sync (``--vllm_enable_lora``) merges and unmerges too, for
nothing: it sends only the adapter.

* :func:`exact_lora_sync` (``swift rlhf``) wraps each LoRA layer's merge and unmerge for the duration of a sync: the
  layer's base weights are copied to the host when it merges and written back when it unmerges, so only the layers
  merged at once are held: one parameter group (``--move_model_batches`` N: about 1/N of the base). The host buffer is
  reused from sync to sync (pinned on CUDA, for asynchronous copies), and the adapters get their own tensors back
  (their values and dtype) after the sync.
* :func:`lora_merges_skipped` makes merge and unmerge no-ops, for the adapter-only sync;
  :func:`adapter_tensors_copied` gives a colocated vLLM copies of the adapter (it scales what it gets in place).
* :class:`BaseWeightsKeeper` (``megatron rlhf``, which merges every layer at once) saves all LoRA base weights before
  the merge and restores them after the unmerge, in the same reused buffer.

Parameters partitioned by DeepSpeed ZeRO-3 are skipped: the merge edits a gathered copy that ZeRO-3 drops without
writing it back. Works with peft's ``LoraLayer`` and its subclasses (mcore-bridge's ``LoraParallelLinear`` in
``megatron rlhf`` is one). Pure PyTorch and peft: no ms-swift import.
"""
from __future__ import annotations

from contextlib import contextmanager
from types import MethodType
from typing import Dict, Iterable, Iterator, List, Tuple

import torch
from peft.tuners.lora import LoraLayer

__all__ = ['BaseWeightsKeeper', 'HostBuffer', 'adapter_tensors_copied', 'exact_lora_sync', 'lora_merges_skipped']

_ALIGN = 64  # bytes: every slot starts aligned for any dtype
_MIN_CHUNK = 16 << 20


def _lora_layers(models: Iterable[torch.nn.Module]) -> List[LoraLayer]:
    return [m for model in models for m in model.modules() if isinstance(m, LoraLayer)]


def _base_params(layer: LoraLayer) -> List[torch.nn.Parameter]:
    return [p for p in layer.get_base_layer().parameters() if not hasattr(p, 'ds_id')]  # ds_id: a ZeRO-3 partition


def _adapter_params(layer: LoraLayer) -> List[torch.nn.Parameter]:
    base = {id(p) for p in layer.get_base_layer().parameters()}
    return [p for p in layer.parameters() if id(p) not in base and not hasattr(p, 'ds_id')]


class HostBuffer:
    """Host memory for copies of device tensors, reused: :meth:`take` hands out slots until :meth:`release`, after
    which the same memory is handed out again. It grows (in chunks) to the most held at once and keeps that.

    Pinned when CUDA is available, so that the copies in and out are asynchronous on the current stream; the copies
    are stream-ordered with the in-place merge and unmerge, which run on the same stream.
    """

    def __init__(self, pin: bool = None, min_chunk: int = _MIN_CHUNK):
        self.pin = torch.cuda.is_available() if pin is None else pin
        self.min_chunk = min_chunk
        self._chunks: List[torch.Tensor] = []
        self._cursor = (0, 0)  # (chunk, byte offset) of the next free byte

    @property
    def num_bytes(self) -> int:
        return sum(c.numel() for c in self._chunks)

    def take(self, like: torch.Tensor) -> torch.Tensor:
        """An uninitialised host tensor with ``like``'s shape and dtype."""
        nbytes = like.numel() * like.element_size()
        chunk, offset = self._cursor
        while chunk < len(self._chunks) and offset + nbytes > self._chunks[chunk].numel():
            chunk, offset = chunk + 1, 0
        if chunk == len(self._chunks):
            self._chunks.append(torch.empty(max(nbytes, self.min_chunk), dtype=torch.uint8, pin_memory=self.pin))
        self._cursor = (chunk, offset + -(-nbytes // _ALIGN) * _ALIGN)
        raw = self._chunks[chunk][offset:offset + nbytes]
        return raw.view(like.dtype).view(like.shape) if nbytes else torch.empty_like(like, device='cpu')

    def release(self) -> None:
        self._cursor = (0, 0)

    def save(self, tensor: torch.Tensor) -> torch.Tensor:
        slot = self.take(tensor)
        slot.copy_(tensor.detach(), non_blocking=self.pin)
        return slot


def _load(param: torch.nn.Parameter, saved: torch.Tensor, pinned: bool) -> None:
    param.data.copy_(saved, non_blocking=pinned)


class _AdapterTensors:
    """The adapters' own tensors, to give back after a sync that cast them (no copy: references)."""

    def __init__(self, layers: Iterable[LoraLayer]):
        self._held = [(p, p.data, None if p.grad is None else p.grad.data) for layer in layers
                      for p in _adapter_params(layer)]

    def give_back(self) -> None:
        for param, data, grad in self._held:
            if _moved(param, data):
                param.data = data
            if grad is not None and param.grad is not None and _moved(param.grad, grad):
                param.grad.data = grad


def _moved(tensor: torch.Tensor, original: torch.Tensor) -> bool:
    return tensor.data_ptr() != original.data_ptr() or tensor.dtype != original.dtype


class BaseWeightsKeeper:
    """``save`` before merging the adapters, ``restore`` after unmerging them (every LoRA layer at once)."""

    def __init__(self, buffer: HostBuffer = None):
        self.buffer = buffer or HostBuffer()
        self._saved: List[Tuple[LoraLayer, torch.nn.Parameter, torch.Tensor]] = []
        self._adapters = None

    @torch.no_grad()
    def save(self, models: Iterable[torch.nn.Module]) -> None:
        self.buffer.release()
        self._saved = []
        seen = set()
        layers = _lora_layers(models)
        for layer in layers:
            for param in _base_params(layer):
                if id(param) not in seen:
                    seen.add(id(param))
                    self._saved.append((layer, param, self.buffer.save(param)))
        self._adapters = _AdapterTensors(layers)

    @torch.no_grad()
    def restore(self) -> None:
        """Write the saved weights back into the layers that are unmerged again (a layer still merged keeps its
        merged weights: its ``merged`` flag says so, and its own unmerge will follow)."""
        for layer, param, saved in self._saved:
            if not layer.merged:
                _load(param, saved, self.buffer.pin)
        if self._adapters is not None:
            self._adapters.give_back()
        self._saved, self._adapters = [], None


@contextmanager
def _patched(layers: List[LoraLayer], name: str, make):
    """Replace ``layer.<name>`` by ``make(layer, original)`` for the block (an instance attribute, removed after)."""
    had: Dict[int, object] = {}
    for layer in layers:
        if name in layer.__dict__:
            had[id(layer)] = layer.__dict__[name]
        setattr(layer, name, MethodType(make(layer, getattr(layer, name)), layer))
    try:
        yield
    finally:
        for layer in layers:
            if id(layer) in had:
                setattr(layer, name, had[id(layer)])
            else:
                layer.__dict__.pop(name, None)


@contextmanager
def exact_lora_sync(models: Iterable[torch.nn.Module], buffer: HostBuffer = None, enabled: bool = True):
    """Around a sync that merges LoRA layers in place and unmerges them (any number at a time, e.g. one parameter
    group after another): every base weight and adapter comes out bit-for-bit unchanged, and what is merged in
    between is what the in-place merge gives. A layer's base is held on the host only while it is merged.

    ``buffer``: the host buffer to reuse across syncs (one per trainer); a fresh one if not given.
    """
    if not enabled:
        yield
        return
    layers = _lora_layers(models)
    buffer = buffer if buffer is not None else HostBuffer()
    held: Dict[int, List[Tuple[torch.nn.Parameter, torch.Tensor]]] = {}
    adapters = _AdapterTensors(layers)

    def merge(layer, original):

        def merge(self, *args, **kwargs):
            if id(self) not in held and not self.merged:
                with torch.no_grad():
                    held[id(self)] = [(p, buffer.save(p)) for p in _base_params(self)]
            return original(*args, **kwargs)

        return merge

    def unmerge(layer, original):

        def unmerge(self, *args, **kwargs):
            out = original(*args, **kwargs)
            if not self.merged and id(self) in held:
                with torch.no_grad():
                    for param, saved in held.pop(id(self)):
                        _load(param, saved, buffer.pin)
                if not held:  # stream order: the next save is queued after these loads
                    buffer.release()
            return out

        return unmerge

    try:
        with _patched(layers, 'merge', merge), _patched(layers, 'unmerge', unmerge):
            yield
    finally:
        adapters.give_back()
        if not held:
            buffer.release()


@contextmanager
def lora_merges_skipped(models: Iterable[torch.nn.Module]):
    """Merge and unmerge do nothing inside the block (the adapter-only sync sends the adapter, not merged weights);
    the adapters get their own tensors back afterwards (ms-swift casts them to the base dtype before merging)."""
    layers = _lora_layers(models)
    adapters = _AdapterTensors(layers)

    def nothing(layer, original):
        return lambda self, *args, **kwargs: None

    try:
        with _patched(layers, 'merge', nothing), _patched(layers, 'unmerge', nothing):
            yield
    finally:
        adapters.give_back()


@contextmanager
def adapter_tensors_copied(llm_engine) -> Iterator[None]:
    """Adapter syncs (``--vllm_enable_lora``) inside the block hand vLLM copies of the adapter's tensors.

    vLLM folds the LoRA scaling into ``lora_B`` in place when it loads an adapter (``LoRALayerWeights.optimize``:
    ``lora_b *= scaling``), and ms-swift's colocate sync gives it views of the trainer's own parameters
    (``param.detach()``): where no cast copies them (vLLM's dtype is the adapter's), every sync multiplied the trained
    ``lora_B`` by ``lora_alpha / r`` (measured: vLLM and the student disagreed from the first trained step on)."""
    original = llm_engine.add_lora

    def add_lora(request):
        tensors = getattr(request, 'lora_tensors', None)
        if tensors:
            request.lora_tensors = {name: tensor.detach().clone() for name, tensor in tensors.items()}
        return original(request)

    llm_engine.add_lora = add_lora
    try:
        yield
    finally:
        del llm_engine.add_lora  # the class's method again
