"""Count the calls that make the host wait for the device (host syncs), on any machine, CPU included.

On a GPU these calls block the CPU until every queued kernel has run, so the next kernels cannot be queued ahead:
a loss path with a handful of them per micro-batch leaves the GPU idle between them. A CPU run cannot time that, but
it runs the same Python: :class:`HostSyncCounter` is a ``TorchFunctionMode`` that records each call which would wait
on a CUDA device (a tensor read as a Python number or list, a boolean-mask selection or ``nonzero`` whose result
size depends on the values) with the first caller outside torch, so a test can assert how many a loss path makes and
where. ``nonzero_static`` and index tensors do not wait and are not counted.
"""
from __future__ import annotations

import os
import sys
from collections import Counter
from typing import Dict, List, Tuple

import torch
from torch.overrides import TorchFunctionMode

__all__ = ['HostSyncCounter']

# the result is a Python value (or a size) that only the device's data can give
_READS = {'item', 'tolist', 'numpy', '__bool__', '__int__', '__float__', '__index__', 'is_nonzero', 'equal',
          'nonzero', 'argwhere', 'masked_select', 'unique', 'unique_consecutive'}
_TORCH_DIR = os.path.dirname(torch.__file__)


def _is_bool_index(index) -> bool:
    items = index if isinstance(index, tuple) else (index, )
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


def _would_sync(name: str, args) -> bool:
    if name in _READS:
        return True
    if name in ('__getitem__', '__setitem__') and len(args) > 1:
        return _is_bool_index(args[1])
    if name == 'where':  # the one-argument form is nonzero
        return len(args) == 1
    return False


class HostSyncCounter(TorchFunctionMode):
    """While active, records every call that would be a host sync on a GPU: ``events`` holds ``(call, where)`` with
    ``where`` the ``file:line (function)`` of the first frame outside torch (the code that asked for the value).
    Not active inside autograd's backward pass (the engine runs it without the mode): enter one inside a custom
    ``Function.backward`` to count there."""

    def __init__(self):
        super().__init__()
        self.events: List[Tuple[str, str]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, '__name__', '')
        if _would_sync(name, args):
            self.events.append((name, _caller()))
        return func(*args, **(kwargs or {}))

    def summary(self) -> Dict[str, int]:
        return dict(Counter(f'{name} at {where}' for name, where in self.events))


def _caller() -> str:
    frame = sys._getframe(2)
    while frame is not None and (frame.f_code.co_filename.startswith(_TORCH_DIR)
                                 or frame.f_code.co_filename == __file__):
        frame = frame.f_back
    return 'unknown' if frame is None else f'{frame.f_code.co_filename}:{frame.f_lineno} ({frame.f_code.co_name})'
