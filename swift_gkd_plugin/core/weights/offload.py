"""Keeping a frozen model's weights on the CPU except while it runs, with the upload overlapped on CUDA.

The teacher is frozen, so its weights never need to travel back: the CPU copy is the master copy (pinned, so that
host-to-device copies can be asynchronous), the GPU copy is made for one use and simply dropped afterwards. On
CUDA, :meth:`TeacherOffloader.prefetch` starts the upload on a side stream so that it overlaps the student's
forward; :meth:`TeacherOffloader.resident` makes the compute stream wait for it, points the module at the GPU
tensors, and drops them when the block ends. Without CUDA every method is a no-op.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import List, Optional

import torch
from torch import nn

__all__ = ['TeacherOffloader', 'is_partitioned']


def is_partitioned(model: nn.Module) -> bool:
    """Whether ``model`` (as prepared: engine or wrapper included) holds only shards of its weights on this rank:
    DeepSpeed ZeRO-3 parameters (their shard is ``ds_tensor``), FSDP1 wrappers or FSDP2 ``DTensor`` parameters.

    Such a model is not the whole set of tensors :class:`TeacherOffloader` moves; it is told by what was prepared,
    not by the flags that asked for it (a teacher without its own DeepSpeed config is prepared from the student's).
    """
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.tensor import DTensor
    if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
        return True
    return any(hasattr(p, 'ds_tensor') or isinstance(p, DTensor) for p in model.parameters())


class TeacherOffloader:
    """Offloads the parameters and buffers of a frozen ``module`` to pinned CPU memory.

    Args:
        module: the frozen model; its tensors are moved to the CPU on construction.
        device: where it runs (``cuda:N``); a CPU device makes the offloader a no-op.
    """

    def __init__(self, module: nn.Module, device: torch.device):
        self.module = module
        self.device = torch.device(device)
        self.enabled = self.device.type == 'cuda'
        self._tensors: List[torch.Tensor] = []  # the module's parameters and buffers, in a fixed order
        self._host: List[torch.Tensor] = []  # their pinned CPU master copies
        self._staged: Optional[List[torch.Tensor]] = None  # device copies in flight or in use
        self._event = None
        self._stream = torch.cuda.Stream(device=self.device) if self.enabled else None
        if not self.enabled:
            return
        with torch.no_grad():
            for tensor in list(module.parameters()) + [b for b in module.buffers() if b is not None]:
                host = tensor.data.to('cpu')
                self._tensors.append(tensor)
                self._host.append(host.pin_memory())
                tensor.data = self._host[-1]
        torch.cuda.empty_cache()

    @property
    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._host)

    def prefetch(self) -> None:
        """Start copying the weights to the device on a side stream (returns at once; idempotent).

        The device copies are allocated here, on the compute stream, and only filled on the side stream: blocks
        allocated inside ``torch.cuda.stream(side)`` would belong to the side stream's pool, which the student's
        forward and backward (on the compute stream) cannot reuse once the teacher is dropped, short of a full
        allocator flush. ``record_stream(side)`` keeps a copy's block from being reused before its copy has run.
        """
        if not self.enabled or self._staged is not None:
            return
        staged = [torch.empty_like(h, device=self.device) for h in self._host]
        # The side stream must not start before the compute stream has finished with the memory just allocated.
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._stream):
            for dev, host in zip(staged, self._host):
                dev.copy_(host, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record(self._stream)
        for dev in staged:
            dev.record_stream(self._stream)
        self._staged = staged

    @contextmanager
    def resident(self):
        """The module's weights live on the device inside this block and return to the CPU copy afterwards."""
        if not self.enabled:
            yield self.module
            return
        self.prefetch()  # no-op when already prefetched
        compute = torch.cuda.current_stream(self.device)
        compute.wait_event(self._event)
        staged = self._staged
        try:
            for tensor, dev in zip(self._tensors, staged):
                tensor.data = dev  # allocated on the compute stream: dropped after the block, it is reused there
            yield self.module
        finally:
            for tensor, host in zip(self._tensors, self._host):
                tensor.data = host
            self._staged = None
            self._event = None
