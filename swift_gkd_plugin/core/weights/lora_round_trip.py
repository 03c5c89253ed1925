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

* :func:`exact_lora_sync` (``swift rlhf``) wraps each LoRA layer's merge and unmerge for the duration of a sync. Out of
  place (what ``swift rlhf`` uses): a merge writes nothing and the sender swaps each base weight for its merged value
  as it sends it (:meth:`LoraSync.merged_chunks`: a few hundred MB of temporaries at a time, on the weights' device),
  so the base is never written and nothing goes to the host. In place (layers whose merge is more than an addition:
  DoRA, LoRA bias, quantized layers; or a sync that transforms the weights on their way): the layer's base weights
  are copied to the host when it merges and written back when it unmerges, so only the layers merged at once are
  held: one parameter group (``--move_model_batches`` N: about 1/N of the base), in a host buffer reused from sync to
  sync (pinned on CUDA, for asynchronous copies). Either way the adapters get their own tensors back (their values
  and dtype) after the sync.
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

__all__ = ['BaseWeightsKeeper', 'HostBuffer', 'LoraSync', 'adapter_tensors_copied', 'exact_lora_sync',
           'lora_merges_skipped']

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


def _out_of_place_mergeable(layer: LoraLayer, adapters: List[str]) -> bool:
    """peft's merge of ``adapters`` into ``layer`` is ``weight += get_delta_weight(a)`` per adapter, nothing else:
    a plain ``lora.Linear`` (not quantized), no LoRA variant (DoRA, ...), no LoRA bias, no ZeRO-3 partition."""
    from peft.tuners.lora import Linear
    return (type(layer) is Linear and not hasattr(layer.get_base_layer().weight, 'ds_id')
            and all(a not in getattr(layer, 'lora_variant', {}) for a in adapters)
            and not any(getattr(layer, 'lora_bias', {}).get(a, False) for a in adapters)
            and not any(getattr(layer, 'use_dora', {}).get(a, False) for a in adapters))


def _key(tensor: torch.Tensor) -> Tuple[int, Tuple[int, ...], torch.dtype]:
    return tensor.data_ptr(), tuple(tensor.shape), tensor.dtype


class LoraSync:
    """The merges and unmerges of one weight sync (see :func:`exact_lora_sync`): out of place where peft's merge is a
    plain addition and ``out_of_place`` is set, else in place with the layer's base held on the host while merged."""

    def __init__(self, buffer: HostBuffer, out_of_place: bool):
        self.buffer, self.out_of_place = buffer, out_of_place
        self.merged_out_of_place = 0  # base weights sent merged out of place, this sync
        self._held: Dict[int, List[Tuple[torch.nn.Parameter, torch.Tensor]]] = {}  # merged in place
        self._pending: Dict[Tuple, Tuple[LoraLayer, List[str]]] = {}  # merged out of place, not yet sent
        self._merge_of: Dict[int, object] = {}  # id(layer) -> the merge it had

    @property
    def pending(self) -> bool:
        """Whether some layer is merged out of place and its merged weight not computed yet."""
        return bool(self._pending)

    def unsent(self, tensors: Iterable[torch.Tensor]) -> List[LoraLayer]:
        """The layers merged out of place whose base weight is none of ``tensors`` (the state dict about to be sent):
        a sync that transforms the weights on the way, so that the merged value cannot replace them."""
        present = {_key(t) for t in tensors if isinstance(t, torch.Tensor)}
        return [layer for key, (layer, _) in self._pending.items() if key not in present]

    @torch.no_grad()
    def merged(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor``'s merged value, a new tensor, if it is the base weight of a layer merged out of place: what
        peft's in-place merge would leave in it, bit for bit (the same operations on a copy); else ``tensor``."""
        entry = self._pending.pop(_key(tensor), None)
        if entry is None:
            return tensor
        layer, adapters = entry
        out = tensor.clone()
        for adapter in adapters:
            out += layer.get_delta_weight(adapter)
        self.merged_out_of_place += 1
        return out

    def merged_chunks(self, state_dict: Dict[str, torch.Tensor], max_bytes: int) -> Iterator[Dict[str, torch.Tensor]]:
        """``state_dict`` in consecutive parts, each base weight of a layer merged out of place replaced by its merged
        value (:meth:`merged`); a part ends once its merged temporaries reach ``max_bytes``, so that a sender that
        drops each part before asking for the next holds about ``max_bytes`` of them at a time."""
        chunk, size = {}, 0
        for name, tensor in state_dict.items():
            chunk[name] = value = self.merged(tensor)
            if value is not tensor:
                size += value.numel() * value.element_size()
            if size >= max_bytes:
                yield chunk
                chunk, size = {}, 0
        if chunk:
            yield chunk

    def merge_pending_in_place(self) -> None:
        """Merge the layers still pending in place after all (held on the host), and every later layer of this sync:
        for a sync that transforms the base weights on their way."""
        self.out_of_place = False
        pending, self._pending = list(self._pending.values()), {}
        for layer, adapters in pending:
            self._merge_in_place(layer, adapters)

    @torch.no_grad()
    def _merge_in_place(self, layer: LoraLayer, adapters: List[str]) -> None:
        if id(layer) not in self._held and not layer.merged:
            self._held[id(layer)] = [(p, self.buffer.save(p)) for p in _base_params(layer)]
        self._merge_of[id(layer)](adapter_names=adapters)

    def patched_merge(self, layer: LoraLayer, original):
        self._merge_of[id(layer)] = original
        sync = self

        def merge(self, safe_merge: bool = False, adapter_names=None):
            from peft.tuners.tuners_utils import check_adapters_to_merge
            adapters = [a for a in check_adapters_to_merge(self, adapter_names) or [] if a in self.lora_A]
            if not adapters:
                return
            if sync.out_of_place and _out_of_place_mergeable(self, adapters):  # nothing written: merged on sending
                sync._pending[_key(self.get_base_layer().weight.data)] = (self, adapters)
            else:
                sync._merge_in_place(self, adapters)

        return merge

    def patched_unmerge(self, layer: LoraLayer, original):
        sync = self

        def unmerge(self, *args, **kwargs):
            out = original(*args, **kwargs)
            if not self.merged and id(self) in sync._held:
                with torch.no_grad():
                    for param, saved in sync._held.pop(id(self)):
                        _load(param, saved, sync.buffer.pin)
                if not sync._held:  # stream order: the next save is queued after these loads
                    sync.buffer.release()
            return out

        return unmerge


@contextmanager
def exact_lora_sync(models: Iterable[torch.nn.Module], buffer: HostBuffer = None, enabled: bool = True,
                    out_of_place: bool = False) -> Iterator[LoraSync]:
    """Around a sync that merges LoRA layers and unmerges them (any number at a time, e.g. one parameter group after
    another): every base weight and adapter comes out bit-for-bit unchanged, and what is sent in between is what
    the in-place merge gives. Yields the :class:`LoraSync` (None if not ``enabled``).

    ``out_of_place=False``: merges run in place and a layer's base is held on the host only while it is merged
    (``buffer``: the host buffer to reuse across syncs, one per trainer; a fresh one if not given).
    ``out_of_place=True``: a merge writes nothing; the sender replaces each base weight it sends by
    :meth:`LoraSync.merged` (a temporary, one tensor at a time), so nothing is copied to the host and the student's
    weights are never written. A layer merged out of place whose weight was not sent by the end is an error (vLLM
    would hold its unmerged weight). Layers whose merge is not a plain addition (DoRA and other variants, LoRA bias,
    quantized layers) merge in place, held on the host.
    """
    if not enabled:
        yield None
        return
    layers = _lora_layers(models)
    sync = LoraSync(buffer if buffer is not None else HostBuffer(), out_of_place)
    adapters = _AdapterTensors(layers)
    try:
        with _patched(layers, 'merge', sync.patched_merge), _patched(layers, 'unmerge', sync.patched_unmerge):
            yield sync
        if sync.pending:
            raise RuntimeError(f'swift_gkd_plugin: {len(sync._pending)} LoRA layer(s) merged out of place were never '
                               'sent merged: vLLM holds their unmerged weights')
    finally:
        adapters.give_back()
        if not sync._held:
            sync.buffer.release()


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
