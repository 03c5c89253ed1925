"""The Triton chunk backend of the fused loss (the default on CUDA; ``core/kernels``).

A chunk is the student's logits in the matmul dtype (one matmul; the teacher's too with a full head), one kernel
launch that reads them and writes ``d loss / d z`` over the student's logits in the same buffer, in the same dtype,
and the backward matmuls of the loop. No float32 ``[C, V]`` scratch: the kernels accumulate in float32 in
registers. Full teacher head: :mod:`.kernels.full_rows`; top-k teacher: :mod:`.kernels.topk_rows`.
"""
from __future__ import annotations

from typing import Optional

import torch

from swift_gkd_plugin.core.fused.plan import ChunkBackend, ChunkResult, Plan, finite_bias, label_rows
from swift_gkd_plugin.core.fused.kernels import entry_function
from swift_gkd_plugin.core.row_divergence import kernel_form

_KERNEL_LOGIT_BYTES = 2**30  # the logit buffers of a chunk (matmul dtype), see kernel_chunk_size


def kernel_chunk_size(vocab: int, teacher_vocab: int, itemsize: int) -> int:
    """Rows per chunk: the logit buffers ``[chunk, V]`` (+ ``[chunk, Vt]`` with a full teacher head) in the matmul
    dtype take about 1 GiB, in [256, 4096] rows, a multiple of 256.

    Why: on a GPU the per-chunk fixed cost is the read-modify-write of the float32 ``[V, H]`` weight gradient
    (0.5 GB at V = 151,936, H = 896) and the matmuls' efficiency, which both favour large chunks; the kernel's own
    cost does not depend on the chunk. About 1 GiB keeps most of the large chunks' speed at half their peak memory
    (the measurements: docs_en/gpu_results.md).
    """
    rows = _KERNEL_LOGIT_BYTES // (itemsize * max(vocab + teacher_vocab, 1))
    return int(max(256, min(4096, rows // 256 * 256)))


class TritonChunks(ChunkBackend):
    """The chunk backend on the Triton kernels: ``rows`` per chunk, :meth:`chunk` per chunk."""

    def __init__(self, plan: Plan, weight: torch.Tensor, bias: Optional[torch.Tensor], hidden: torch.Tensor,
                 want_grad: bool):
        self.plan, self.weight, self.want_grad = plan, weight, want_grad
        n = hidden.shape[0]
        self.bias = None if bias is None else finite_bias(bias)
        vt = plan.teacher_weight.shape[0] if plan.full else 0
        self.rows = min(n, plan.chunk_size or kernel_chunk_size(plan.vocab, vt, weight.element_size()))
        if plan.full:
            self.form = kernel_form(plan.divergence)
            self.entry = entry_function(self.form.entry)

    def chunk(self, h: torch.Tensor, sl: slice) -> ChunkResult:
        zs, zt = self.logits(h, sl)  # [C, V] in the matmul dtype; the kernels write the gradient over zs
        lab, ce_weight, w = label_rows(self.plan, sl) if self.plan.sft else (None, None, None)
        labels = None if lab is None else lab.squeeze(1)
        grad = zs if self.want_grad else None
        sums = self._full(zs, zt, labels, w, ce_weight, grad) if self.plan.full else \
            self._topk(zs, sl, labels, w, ce_weight, grad)
        return ChunkResult(*sums, grad=grad, grad_scale=1.0, bias_grad=grad)

    def logits(self, h: torch.Tensor, sl: slice):
        """The chunk's student logits and, with a full head, the teacher's (else None), in the matmul dtype."""
        zs = h @ self.weight.t()
        zt = None
        if self.plan.full:
            with torch.no_grad():
                zt = self.plan.teacher_hidden[sl].to(self.plan.teacher_weight.dtype) @ self.plan.teacher_weight.t()
        return zs, zt

    def _full_rows(self, zs, zt, **kw):
        from swift_gkd_plugin.core.fused.kernels.full_rows import full_rows
        return full_rows(zs, zt, **kw)

    def _full(self, zs, zt, labels, w, ce_weight, grad):
        plan = self.plan
        coef = self.form.sign * plan.div_scale / plan.temperature
        res = self._full_rows(zs, zt, bias_s=self.bias, bias_t=plan.teacher_bias, entry=self.entry,
                              constants=self.form.constants, threshold=self.form.threshold, coef=coef,
                              temperature=plan.temperature, grad=grad, labels=labels, label_weight=w,
                              ce_weight=ce_weight, label_temperature=plan.label_temperature, entropy=plan.entropy)
        zero = res.divergence.new_zeros(())
        return (res.divergence.sum(), zero if res.label is None else res.label.sum(), res.agree.sum(),
                *(zero if e is None else e.sum() for e in (res.entropy, res.teacher_entropy)))

    def _topk(self, zs, sl, labels, w, ce_weight, grad):
        from swift_gkd_plugin.core.fused.kernels.topk_rows import topk_rows
        plan = self.plan
        lp = plan.topk_logprobs[sl]
        valid = lp > float('-inf')
        top1 = plan.topk_ids[sl].gather(1, lp.argmax(-1, keepdim=True))  # a valid slot: rows are covered
        ids = torch.where(valid, plan.topk_ids[sl], top1)  # unused slots point at a harmless, valid id
        res = topk_rows(zs, ids, valid, lp, divergence=plan.divergence, temperature=plan.temperature, tail=plan.tail,
                        vocab=plan.vocab, scale=plan.div_scale, grad=grad, bias=self.bias, labels=labels,
                        ce_weight=ce_weight, label_weight=w, label_temperature=plan.label_temperature,
                        entropy=plan.entropy)
        return res.divergence, res.label, res.agree, res.entropy, res.divergence.new_zeros(())  # teacher: the plan's
