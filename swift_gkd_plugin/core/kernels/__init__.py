"""Triton kernels of the fused loss (``core/fused_loss.py``), one file per stage; triton is imported only when a
kernel runs, so CPU users without triton are unaffected.

* :mod:`.entry_math`: the divergences' per-entry math (named by the registry in ``core/row_divergence.py``);
* :mod:`.full_rows`: ``[C, V]`` student + ``[C, Vt]`` teacher logits -> per-row values and the gradient;
* :mod:`.topk_rows`: a chunk against a top-k teacher (with or without the tail bucket), the ``[C, V]`` student side.

Backend choice (:func:`resolve_backend`): ``auto`` uses the kernels on CUDA tensors when triton imports and the
PyTorch chunk path (the reference) otherwise; ``torch`` forces the PyTorch path; ``triton`` forces the kernels
(on CPU tensors only under ``TRITON_INTERPRET=1``, Triton's interpreter, which the tests use). The
``backend=`` argument of :func:`~swift_gkd_plugin.core.fused_loss.fused_linear_jsd` wins over the environment
variable ``SWIFT_GKD_FUSED_BACKEND``.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from typing import Optional

import torch

__all__ = ['BACKENDS', 'BACKEND_ENV', 'entry_function', 'resolve_backend', 'triton_available']

BACKEND_ENV = 'SWIFT_GKD_FUSED_BACKEND'
BACKENDS = ('auto', 'torch', 'triton')


def triton_available() -> bool:
    """Whether triton can be imported (without importing it)."""
    return importlib.util.find_spec('triton') is not None


def resolve_backend(backend: Optional[str], device: torch.device) -> str:
    """``'triton'`` or ``'torch'`` for tensors on ``device``: ``backend`` if given, else ``$SWIFT_GKD_FUSED_BACKEND``,
    else ``auto``. Raises on an unknown name or a forced ``triton`` that cannot run."""
    source = 'backend' if backend is not None else BACKEND_ENV
    choice = backend if backend is not None else os.environ.get(BACKEND_ENV, 'auto')
    if choice not in BACKENDS:
        raise ValueError(f'{source} must be one of {BACKENDS}, got {choice!r}')
    interpreted = os.environ.get('TRITON_INTERPRET', '0') == '1'
    if choice == 'auto':
        return 'triton' if device.type == 'cuda' and triton_available() and not interpreted else 'torch'
    if choice == 'triton':
        if not triton_available():
            raise ValueError(f'{source}=triton needs the triton package (pip install triton)')
        if device.type != 'cuda' and not interpreted:
            raise ValueError(f'{source}=triton runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 '
                             f'(Triton\'s interpreter, set before triton is imported); got {device.type} tensors')
    return choice


def entry_function(path: str):
    """The ``@triton.jit`` function named ``module:function`` (a :class:`~swift_gkd_plugin.core.row_divergence.
    KernelForm`'s ``entry``)."""
    module, name = path.split(':')
    return getattr(importlib.import_module(module), name)
