"""An experiment of the GPU kit: ``triton2``, a second design of the fused loss's Triton kernels, outside the package.

The package offers one Triton design to users (``--gkd_fused_backend triton``, and ``auto`` on CUDA:
``swift_gkd_plugin/core/fused/chunk_triton.py``). This one keeps its contract and cuts the costs of a chunk beside the
matmuls (:mod:`chunk_triton2`: the kernel :mod:`full_rows2` with fewer passes over a row, the float32-output backward
matmuls of :mod:`triton2_matmuls`, ``g @ W`` split over K, the next chunk's logits on a side stream). No GPU has timed
it yet: it comes into the package only when kit part b (``bash tests/gpu/kit.sh run b``: the methods ``fused2`` and
``fused2_serial`` of ``benchmarks/bench_loss.py`` beside ``fused``, the package's ``triton``) says
``make triton2 the CUDA default: yes``.

:func:`enable` plugs it into the package's fused loss from outside, for this process (or a test):
``fused_linear_jsd(..., backend='triton2')`` then runs it, checked against the PyTorch path on its first two chunks
on CUDA as ``auto`` checks ``triton`` (a failure or mismatch: one warning naming the second design, then the PyTorch
path). The package's flag and environment variable do not name it. Import this folder first
(``sys.path.insert(0, <this folder>)``): its modules import each other by name.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch

from swift_gkd_plugin.core.fused import kernels

__all__ = ['FOLDER', 'NAME', 'choose_backend', 'describe_backend', 'enable']

NAME = 'triton2'
FOLDER = os.path.dirname(os.path.abspath(__file__))


def choose_backend(backend: Optional[str], device: torch.device) -> Tuple[str, bool]:
    """The package's ``choose_backend`` with ``triton2`` beside its backends: ``(backend that runs, whether it is
    self-checked)``, ``triton2`` self-checked on CUDA. Raises ValueError where its kernels cannot run."""
    if backend != NAME:
        return kernels.choose_backend(backend, device)
    if not kernels.triton_available():
        raise ValueError(f'backend={NAME} needs the triton package (pip install triton)')
    if device.type != 'cuda' and os.environ.get('TRITON_INTERPRET', '0') != '1':
        raise ValueError(f'backend={NAME} runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (Triton\'s '
                         f'interpreter, set before triton is imported); got {device.type} tensors')
    mismatch = kernels.interpreter_mismatch()
    if mismatch:
        raise ValueError(f'backend={NAME}: {mismatch}')
    return NAME, device.type == 'cuda'


def describe_backend(backend: Optional[str], device: Optional[torch.device] = None,
                     dtype: Optional[torch.dtype] = None) -> str:
    """The package's ``describe_backend`` with ``triton2``, whose line says, for weights of ``dtype`` (given), how it
    forms the weight gradient: the float32 epilogue, or the first design's products where the probe failed."""
    if backend != NAME:
        return kernels.describe_backend(backend, device)
    if device is None:
        device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    from triton2_matmuls import weight_grad_path
    grad_w = '' if dtype is None else f'; weight gradient: {weight_grad_path(device, dtype)}'
    return (f'triton2, the second kernel design (backend={NAME}, an experiment of tests/gpu; checked against the '
            f'PyTorch path on its first two chunks on CUDA, falling back to it with a warning{grad_w})')


def enable(setattr_=setattr) -> None:
    """Let the package's fused loss run ``backend='triton2'``: its chunk backend beside the package's, its name
    through :func:`choose_backend`, its self-check's warning naming the second design. ``setattr_``: how to set the
    loss module's attributes (``monkeypatch.setattr`` in a test: undone after it); by default for the process, once."""
    from swift_gkd_plugin.core.fused import loss
    if getattr(loss.choose_backend, '__module__', None) == __name__:
        return  # already enabled
    from chunk_triton2 import Triton2Chunks
    key_text = loss._key_text

    def named_key_text(plan, weight):
        return key_text(plan, weight) + (', the second design' if plan.backend == NAME else '')

    setattr_(loss, 'BACKENDS', {**loss.BACKENDS, NAME: Triton2Chunks})
    setattr_(loss, 'choose_backend', choose_backend)
    setattr_(loss, '_key_text', named_key_text)
