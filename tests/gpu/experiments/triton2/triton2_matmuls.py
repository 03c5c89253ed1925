"""The float32-output matmuls of the second kernel design (:mod:`chunk_triton2`): whether they work on a device
(probed once, in the real call's layout), and how the weight gradient is formed, for the backend's description
(:func:`triton2_backend.describe_backend`) and the benchmark's rows. A leaf: it imports neither the chunk backend
nor the kernel."""
from __future__ import annotations

from typing import Dict

import torch

__all__ = ['float32_output_matmuls', 'weight_grad_path']

_FLOAT32_OUT: Dict[str, bool] = {}


def float32_output_matmuls(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the matmuls with ``out_dtype=torch.float32`` that :meth:`Triton2Chunks.backprop` calls work for
    ``dtype`` inputs on ``device``, probed once per device and dtype in the real call's layout: the weight gradient
    ``addmm(grad_w, g.t(), h)`` accumulated over two chunks into one float32 buffer (``beta`` 0 first, over NaN,
    then 1; ``g.t()`` a transposed view), the input gradient ``addmm(.., g, W)`` and its split over K (``bmm`` of
    strided parts), each against float32 math. Why: a wrong result would be silent."""
    key = f'{device} {dtype}'
    if key not in _FLOAT32_OUT:
        ok = False
        if device.type == 'cuda':
            try:
                ok = _probe_float32_outputs(device, dtype)
            except Exception:  # no out_dtype in this torch, or not for this device / dtype
                ok = False
        _FLOAT32_OUT[key] = ok
    return _FLOAT32_OUT[key]


def _probe_float32_outputs(device: torch.device, dtype: torch.dtype, rows: int = 384, vocab: int = 4096,
                           hidden: int = 256, parts: int = 4) -> bool:
    gen = torch.Generator(device=device).manual_seed(0)

    def rand(*shape):
        return torch.randn(shape, generator=gen, device=device).to(dtype)

    def close(got, want):
        return bool(torch.isfinite(got).all()) and float((got - want).abs().max()) <= 1e-3 * float(want.abs().max())

    g, h, w = [rand(rows, vocab) for _ in range(2)], [rand(rows, hidden) for _ in range(2)], rand(vocab, hidden)
    grad_w = torch.full((vocab, hidden), float('nan'), device=device)  # beta 0 must not read it
    for i in range(2):
        torch.addmm(grad_w, g[i].t(), h[i], beta=0 if i == 0 else 1, alpha=0.5, out_dtype=torch.float32, out=grad_w)
    want_w = 0.5 * (g[0].float().t() @ h[0].float() + g[1].float().t() @ h[1].float())
    grad_h = torch.full((rows, hidden), float('nan'), device=device)
    torch.addmm(grad_h, g[0], w, beta=0, alpha=0.5, out_dtype=torch.float32, out=grad_h)
    want_h = g[0].float() @ w.float()
    k = vocab // parts
    split = torch.bmm(g[0].unflatten(1, (parts, k)).transpose(0, 1), w.view(parts, k, hidden),
                      out_dtype=torch.float32).sum(0)
    return close(grad_w, want_w) and close(grad_h, 0.5 * want_h) and close(split, want_h)


def weight_grad_path(device: torch.device, dtype: torch.dtype) -> str:
    """How :class:`Triton2Chunks` forms the weight gradient for ``dtype`` weights on ``device``, for the log."""
    if dtype == torch.float32:
        return 'float32 matmuls (float32 weights)'
    if float32_output_matmuls(device, dtype):
        return 'accumulated in float32 by the matmul (out_dtype=float32, probed here)'
    why = 'off CUDA' if device.type != 'cuda' else 'the float32-output matmuls failed their probe here'
    return f'the first design\'s {str(dtype).replace("torch.", "")} products ({why})'
