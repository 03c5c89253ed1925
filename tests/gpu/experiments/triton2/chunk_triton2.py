"""The second Triton chunk backend (the experiment ``triton2``, :mod:`triton2_backend`): the package's Triton chunk
backend's contract (``swift_gkd_plugin/core/fused/chunk_triton.py``) with each cost of a chunk beside the matmuls cut
where it can be. Per choice, what it saves (V = 151,936, H = 896,
bf16, C rows a chunk):

* the full-head kernel: :mod:`full_rows2` (two reads of a row instead of three for KL in either
  direction, fewer exp / log per logit for every form; its docstring has the table);
* the weight gradient accumulated in float32 by the matmul itself (``addmm`` with ``out_dtype=float32``, cuBLAS's
  epilogue): no bf16 ``[V, H]`` product written and read back (2 x 0.27 GB) nor a separate read-modify-write of the
  float32 buffer (2 x 0.54 GB) per chunk;
* the input gradient ``g @ W`` (``K = V`` long, only ``C x H`` outputs: at C = 1,536 some 40 output tiles for 132
  SMs) split over ``K`` into a batched product that fills the GPU (:func:`split_k`), summed in float32;
* on CUDA, two streams: the next chunk's logit matmuls run on a side stream under this chunk's kernel (the
  kernel is bound by the special-function units and memory, the matmuls by the tensor cores). Two chunks' logits
  are then alive, so a chunk has half the rows of the first backend's rule: the same peak memory. An explicit
  ``chunk_size`` (``fused_linear_jsd``'s argument) is kept as given: two chunks of that size are alive, twice the
  first backend's logit memory at the same setting (``SWIFT_GKD_TRITON2_OVERLAP=0``: one).

The float32-output matmuls are probed once per device in the real call's layout
(:func:`triton2_matmuls.float32_output_matmuls`); where they fail or are missing (CPU, older torch), the first
backend's bf16 products are used, and :func:`triton2_backend.describe_backend` says which
(:func:`triton2_matmuls.weight_grad_path`).
``SWIFT_GKD_TRITON2_OVERLAP=0`` turns the second stream off (for measurements).
"""
from __future__ import annotations

import os
from typing import Dict, Optional

import torch

from swift_gkd_plugin.core.fused.chunk_triton import TritonChunks, kernel_chunk_size
from swift_gkd_plugin.core.fused.plan import Plan, backprop_matmuls
from triton2_matmuls import float32_output_matmuls

__all__ = ['OVERLAP_ENV', 'Triton2Chunks', 'split_k']

OVERLAP_ENV = 'SWIFT_GKD_TRITON2_OVERLAP'
#: rows x columns of an output tile in cuBLAS's Hopper kernels for these shapes (tst_128x256 in the H100 profile)
_TILE = (128, 256)
#: forced split of ``g @ W`` (tests); None: :func:`split_k`'s rule
SPLIT_K: Optional[int] = None
_SIDE_STREAMS: Dict[str, 'torch.cuda.Stream'] = {}


def side_stream(device: torch.device) -> 'torch.cuda.Stream':
    """This process's side stream on ``device`` (one, reused by every call)."""
    key = str(device)
    if key not in _SIDE_STREAMS:
        _SIDE_STREAMS[key] = torch.cuda.Stream(device)
    return _SIDE_STREAMS[key]


def split_k(rows: int, hidden: int, vocab: int, sm_count: Optional[int]) -> int:
    """Parts over ``K = vocab`` of ``g @ W`` (``[rows, vocab] @ [vocab, hidden]``): doubled (up to 8, while it
    divides ``vocab``) until the output tiles times the parts reach the SM count. 1 without a GPU."""
    if SPLIT_K is not None:
        return SPLIT_K
    if not sm_count:
        return 1
    tiles = -(-rows // _TILE[0]) * -(-hidden // _TILE[1])
    parts = 1
    while parts < 8 and tiles * parts < sm_count and vocab % (2 * parts) == 0:
        parts *= 2
    return parts


class Triton2Chunks(TritonChunks):
    """The second chunk backend: the package's ``TritonChunks`` with the second full-head kernel, the
    float32-output backward matmuls, split-K and, on CUDA, the next chunk's logits on a side stream."""

    def __init__(self, plan: Plan, weight: torch.Tensor, bias: Optional[torch.Tensor], hidden: torch.Tensor,
                 want_grad: bool):
        super().__init__(plan, weight, bias, hidden, want_grad)
        self.hidden, self.n = hidden, hidden.shape[0]
        dev = weight.device
        cuda = dev.type == 'cuda'
        self.side = side_stream(dev) if cuda and os.environ.get(OVERLAP_ENV, '1') != '0' else None
        if self.side is not None and not plan.chunk_size:  # two chunks alive: half the rows, the same memory
            vt = plan.teacher_weight.shape[0] if plan.full else 0
            self.rows = min(self.n, max(128, kernel_chunk_size(plan.vocab, vt, weight.element_size()) // 2))
        if self.side is not None and self.rows >= self.n:
            self.side = None  # one chunk: nothing to overlap
        self.f32_out = weight.dtype != torch.float32 and float32_output_matmuls(dev, weight.dtype)
        sms = torch.cuda.get_device_properties(dev).multi_processor_count if cuda else None
        self.parts = split_k(self.rows, weight.shape[1], weight.shape[0], sms)
        self.pending = None  # (start row, student logits, teacher logits) computed ahead on the side stream
        if plan.full:
            from full_rows2 import mode_of
            self.mode = mode_of(self.form.entry)

    def logits(self, h: torch.Tensor, sl: slice):
        """The chunk's student logits (and teacher logits with a full head) in the matmul dtype: the ones the side
        stream computed ahead, or computed now; then the next chunk's are started on the side stream.

        The memory rule: every buffer the side stream touches is allocated on the main stream and stays referenced
        until the main stream has waited for the side stream, so the caching allocator never hands it out while the
        side stream may still use it, and no ``record_stream`` is needed (with it, blocks freed while the host ran
        ahead could not be reused: memory grew with every chunk). At most two chunks' logits are alive."""
        if self.pending is not None and self.pending[0] == sl.start:
            _, zs, zt, _inputs = self.pending
            self.pending = None
            torch.cuda.current_stream(zs.device).wait_stream(self.side)  # then _inputs may go
        else:
            zs, zt = TritonChunks.logits(self, h, sl)
        nxt = slice(sl.stop, min(sl.stop + self.rows, self.n))
        if self.side is not None and nxt.start < nxt.stop:
            self.pending = (nxt.start, *self._ahead(nxt))
        return zs, zt

    def _ahead(self, sl: slice):
        """``(student logits, teacher logits or None, inputs)`` of rows ``sl``, enqueued on the side stream into
        buffers allocated (with the inputs' casts) on the main stream; see :meth:`logits` for the rule."""
        main, dev = torch.cuda.current_stream(self.weight.device), self.weight.device
        rows = sl.stop - sl.start
        h = self.hidden[sl].to(self.weight.dtype)
        zs = torch.empty(rows, self.weight.shape[0], dtype=self.weight.dtype, device=dev)
        zt = th = None
        if self.plan.full:
            tw = self.plan.teacher_weight
            th = self.plan.teacher_hidden[sl].to(tw.dtype)
            zt = torch.empty(rows, tw.shape[0], dtype=tw.dtype, device=dev)
        self.side.wait_stream(main)  # the buffers and inputs exist before the side stream reads or writes them
        with torch.cuda.stream(self.side):
            torch.mm(h, self.weight.t(), out=zs)
            if zt is not None:
                torch.mm(th, self.plan.teacher_weight.t(), out=zt)
        return zs, zt, (h, th)

    def _full_rows(self, zs, zt, **kw):
        from full_rows2 import full_rows2
        return full_rows2(zs, zt, mode=self.mode, **kw)

    def backprop(self, g, h, alpha: float, sl, grad_h, grad_w, first: bool) -> None:
        """As the package's ``backprop_matmuls`` (``core/fused/plan.py``), with float32 outputs from the matmuls and
        ``g @ W`` split over K."""
        w = self.weight
        if w.dtype == torch.float32 or (not self.f32_out and self.parts == 1):
            return backprop_matmuls(g, h, w, alpha, sl, grad_h, grad_w, first)
        if grad_h is not None:
            if self.parts == 1:
                torch.addmm(grad_h[sl], g, w, beta=0, alpha=alpha, out_dtype=torch.float32, out=grad_h[sl])
            else:
                k = g.shape[1] // self.parts
                gs = g.unflatten(1, (self.parts, k)).transpose(0, 1)  # [parts, C, k], strided: no copy
                ws = w.view(self.parts, k, w.shape[1])
                prod = torch.bmm(gs, ws, out_dtype=torch.float32) if self.f32_out else torch.bmm(gs, ws)
                torch.sum(prod, 0, dtype=torch.float32, out=grad_h[sl])
                grad_h[sl].mul_(alpha)
        if grad_w is not None:
            if self.f32_out:
                torch.addmm(grad_w, g.t(), h, beta=0 if first else 1, alpha=alpha, out_dtype=torch.float32,
                            out=grad_w)
            else:
                backprop_matmuls(g, h, w, alpha, sl, None, grad_w, first)
