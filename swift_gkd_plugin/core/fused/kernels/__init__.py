"""Triton kernels of the fused loss (``core/fused/loss.py``), one file per stage; triton is imported only when a
kernel runs, so CPU users without triton are unaffected.

* :mod:`.entry_math`: the divergences' per-entry math (named by the registry in ``core/row_divergence.py``);
* :mod:`.full_rows`: ``[C, V]`` student + ``[C, Vt]`` teacher logits -> per-row values and the gradient;
* :mod:`.topk_rows`: a chunk against a top-k teacher (with or without the tail bucket), the ``[C, V]`` student side.

Backend choice (:func:`choose_backend`): ``auto`` (the default) uses the kernels on CUDA tensors when triton
imports and the device is not ROCm, after a self-check of each kernel variant against the PyTorch path on its first
chunk (``core/fused/loss.py``; a failure or mismatch logs one warning and that variant runs on the PyTorch path);
``torch`` forces the PyTorch chunk path (the reference); ``triton`` forces the kernels, never falls back (on CPU
tensors only under ``TRITON_INTERPRET=1``, Triton's interpreter, which the CPU tests use). The ``backend=`` argument
of :func:`~swift_gkd_plugin.core.fused.loss.fused_linear_jsd` (``--gkd_fused_backend``) wins over the environment
variable ``SWIFT_GKD_FUSED_BACKEND``; an empty variable means ``auto``.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from typing import Optional, Tuple

import torch

__all__ = ['BACKENDS', 'BACKEND_ENV', 'auto_backend', 'choose_backend', 'describe_backend', 'entry_function',
           'interpreter_mismatch', 'KERNEL_BACKENDS', 'requested_backend', 'resolve_backend', 'triton_available']

BACKEND_ENV = 'SWIFT_GKD_FUSED_BACKEND'
BACKENDS = ('auto', 'torch', 'triton')
KERNEL_BACKENDS = ('triton', )  # the forced kernels


def triton_available() -> bool:
    """Whether triton is installed (without importing it)."""
    return importlib.util.find_spec('triton') is not None


def requested_backend(backend: Optional[str] = None) -> Tuple[str, str]:
    """``(choice, where it came from)``: ``backend`` if given, else ``$SWIFT_GKD_FUSED_BACKEND`` (empty or unset:
    ``auto``). Raises ValueError on a name outside :data:`BACKENDS`."""
    if backend is not None:
        choice, source = backend, 'backend'
    else:
        choice, source = os.environ.get(BACKEND_ENV, '').strip() or 'auto', BACKEND_ENV
    if choice not in BACKENDS:
        raise ValueError(f'{source} must be one of {BACKENDS}, got {choice!r}')
    return choice, source


def auto_backend(device: torch.device) -> Tuple[str, str]:
    """What ``auto`` runs on tensors of ``device``, and why (a short reason for logs)."""
    if device.type != 'cuda':
        return 'torch', f'{device.type} tensors'
    if getattr(torch.version, 'hip', None):
        return 'torch', 'ROCm: the kernels have not run there (--gkd_fused_backend triton forces them)'
    if os.environ.get('TRITON_INTERPRET', '0') == '1':
        return 'torch', 'TRITON_INTERPRET=1 (the interpreter runs CPU tensors only)'
    try:
        importlib.import_module('triton')
    except Exception as exc:  # ImportError, or a broken install raising anything at import
        return 'torch', f'triton does not import ({type(exc).__name__}: {exc})'
    mismatch = interpreter_mismatch()
    if mismatch:
        return 'torch', mismatch
    return 'triton', 'CUDA with triton; each kernel variant is checked against the PyTorch path on its first chunk'


def choose_backend(backend: Optional[str], device: torch.device) -> Tuple[str, bool]:
    """``(backend that runs, whether it is self-checked)``: ``auto``'s kernels are, a forced backend is not. Raises
    ValueError on an unknown name or a forced kernel backend that cannot run."""
    choice, source = requested_backend(backend)
    if choice == 'auto':
        name = auto_backend(device)[0]
        return name, name == 'triton'
    if choice in KERNEL_BACKENDS:
        if not triton_available():
            raise ValueError(f'{source}={choice} needs the triton package (pip install triton)')
        if device.type != 'cuda' and os.environ.get('TRITON_INTERPRET', '0') != '1':
            raise ValueError(f'{source}={choice} runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 '
                             f'(Triton\'s interpreter, set before triton is imported); got {device.type} tensors')
        mismatch = interpreter_mismatch()
        if mismatch:
            raise ValueError(f'{source}={choice}: {mismatch}')
    return choice, False


def interpreter_mismatch() -> Optional[str]:
    """Why the kernels cannot run as ``TRITON_INTERPRET`` now asks, or None. Triton reads the variable once, when
    it is imported (its standard library is compiled or interpreted then): one changed afterwards in this process
    ends in Triton's obscure ``InterpreterError`` ("Cannot call @triton.jit'd outside of the scope of a kernel") or a
    compile error at the first kernel. Nothing is imported here: triton not imported yet is fine."""
    standard = sys.modules.get('triton.language.standard')
    if standard is None or not hasattr(standard, 'max'):
        return None
    interpreted = type(standard.max).__name__ == 'InterpretedFunction'
    wanted = os.environ.get('TRITON_INTERPRET', '0') == '1'
    if interpreted == wanted:
        return None
    now = 'TRITON_INTERPRET=1' if wanted else f'TRITON_INTERPRET={os.environ.get("TRITON_INTERPRET", "")!r}'
    then = 'without it' if wanted else 'under TRITON_INTERPRET=1'
    return (f'{now} was set after triton was imported {then} in this process; triton reads it only at import, so its '
            'kernels would fail (InterpreterError). Set TRITON_INTERPRET in the environment before the process '
            'starts, or before anything imports triton')


def describe_backend(backend: Optional[str], device: Optional[torch.device] = None) -> str:
    """One line for the start-up log: the backend that runs on ``device`` (default: CUDA if visible) and why."""
    if device is None:
        device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    choice, source = requested_backend(backend)
    given = '--gkd_fused_backend' if source == 'backend' else (
        f'{BACKEND_ENV}' if os.environ.get(BACKEND_ENV, '').strip() else 'the default')
    if choice != 'auto':
        return f'{choice} (forced by {given}; no fallback)' if choice == 'triton' else f'torch ({given})'
    name, why = auto_backend(device)
    return f'{"Triton kernels" if name == "triton" else "PyTorch chunk path"} (auto, {given}: {why})'


def resolve_backend(backend: Optional[str], device: torch.device) -> str:
    """``'triton'`` or ``'torch'`` for tensors on ``device`` (see :func:`choose_backend`)."""
    return choose_backend(backend, device)[0]


def entry_function(path: str):
    """The ``@triton.jit`` function named ``module:function`` (a :class:`~swift_gkd_plugin.core.row_divergence.
    KernelForm`'s ``entry``)."""
    module, name = path.split(':')
    return getattr(importlib.import_module(module), name)
