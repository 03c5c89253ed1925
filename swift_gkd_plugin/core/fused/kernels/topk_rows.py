"""Triton kernels for a chunk against a top-k teacher (with or without the tail bucket): the ``[C, V]`` student side.

With a top-k teacher the divergence lives on ``k (+1)`` buckets per row (:func:`~swift_gkd_plugin.core.topk.
bucket_divergence`, in PyTorch on ``[C, k+1]``, the one place for the math); what touches the ``[C, V]`` student
logits ``z`` is: the logsumexp over the complement of the top-k ids (the student's tail bucket), the full row's
logsumexp at the label temperature ``T_l`` and at the loss temperature ``T`` (the label term, the entropy
statistic), the row max (top-1 agreement) and the gradient. Two passes, one program per row:

0. (PyTorch, ``[C, k]``) gather ``z`` at the ids and at the label, then write ``-inf`` at the ids (``k`` writes per
   row; duplicate ids of unused slots write the same value): the complement is what stays finite;
1. :func:`_complement_stats_kernel` reads the row once: online max ``m_c`` and sums ``sum exp(z - m_c)``,
   ``sum exp((z - m_c) / T)``, ``sum exp((z - m_c) / T_l)`` over the complement (each shifted by the complement's
   own max, so a peaked student cannot underflow its tail). The full row's logsumexps add the top-k entries on
   ``[C, k]``; the buckets' divergence and gradient come from :func:`bucket_divergence`;
2. :func:`_grad_kernel` reads the row once more and writes, once, in the output's dtype (the matmul's)::

       g = c_tail exp(z - m_c) + w_l exp(z / T_l - lse_l) - w_l [v == label]

   (zero at the top-k ids, whose ``z`` is ``-inf`` now) with ``c_tail = scale dD/dy_tail / sum exp(z - m_c)``
   (``d y_tail / d z_v = softmax`` over the complement), and the entropy's per-entry terms ``p (lse_T - u) >= 0``
   over the complement (no cancellation). Then (PyTorch) ``k`` values per row are added at the ids: the buckets'
   gradient, the label's softmax there, ``-w_l`` when the label is one of them.

Bytes per ``[C, V]`` entry: pass 1 reads 2 (bf16 logits) or 4, pass 2 reads as much and writes as much; the PyTorch
path makes ~8-12 passes of 8 bytes. Its speed on a GPU is not measured (docs_en/gpu_results.md says what ran where).

Dispatch: :func:`~swift_gkd_plugin.core.fused.kernels.choose_backend` (``--gkd_fused_backend``; on CPU tensors only under
``TRITON_INTERPRET=1``, Triton's interpreter, set before this module is first imported, as the tests do).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from swift_gkd_plugin.core.constants import NEG_LOGIT
from swift_gkd_plugin.core.row_divergence import Divergence
from swift_gkd_plugin.core.topk import bucket_divergence, teacher_tail_logmass

__all__ = ['TopKRows', 'topk_rows']

@triton.jit
def _complement_stats_kernel(Z, B, STATS, stride_z, inv_t, inv_tl, neg, V: tl.constexpr, HAS_B: tl.constexpr,
                             ENTROPY: tl.constexpr, LABEL_T: tl.constexpr, BLOCK: tl.constexpr):
    """``STATS[row] = (m_c, sum exp(x - m_c), sum exp((x - m_c) inv_t), sum exp((x - m_c) inv_tl))`` over a row of
    ``x = z (+ b)``; ``m_c`` starts at ``neg`` (-1e30), so an empty complement gives 0 sums, not NaN."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    zero = tl.sum(tl.zeros([BLOCK], tl.float32), 0)
    m = zero + neg
    s1, st, sl = zero, zero, zero
    for start in range(0, V, BLOCK):
        cols = start + offs
        inside = cols < V
        x = tl.load(Z + row * stride_z + cols, mask=inside, other=float('-inf')).to(tl.float32)
        if HAS_B:
            x += tl.load(B + cols, mask=inside, other=0.0)
        m_new = tl.maximum(m, tl.max(x, 0))
        d = x - m_new
        s1 = s1 * tl.exp(m - m_new) + tl.sum(tl.exp(d), 0)
        if ENTROPY:
            st = st * tl.exp((m - m_new) * inv_t) + tl.sum(tl.exp(d * inv_t), 0)
        if LABEL_T:
            sl = sl * tl.exp((m - m_new) * inv_tl) + tl.sum(tl.exp(d * inv_tl), 0)
        m = m_new
    tl.store(STATS + row * 4, m)
    tl.store(STATS + row * 4 + 1, s1)
    tl.store(STATS + row * 4 + 2, st)
    tl.store(STATS + row * 4 + 3, sl)


@triton.jit
def _grad_kernel(Z, B, G, ROWS, ENT, stride_z, stride_g, inv_t, inv_tl, V: tl.constexpr, HAS_B: tl.constexpr,
                 TAIL: tl.constexpr, LABEL: tl.constexpr, ENTROPY: tl.constexpr, WRITE: tl.constexpr,
                 BLOCK: tl.constexpr):
    """``G[row] = c_tail exp(x - m_c) + w (exp(x inv_tl - lse_l) - [v == label])`` and ``ENT[row]`` = the entropy
    terms ``p (lse_t - x inv_t)`` over the finite entries; ``ROWS[row] = (m_c, c_tail, w, lse_l, label, lse_t)``."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    m_c = tl.load(ROWS + row * 6)
    c_tail = tl.load(ROWS + row * 6 + 1)
    w = tl.load(ROWS + row * 6 + 2)
    lse_l = tl.load(ROWS + row * 6 + 3)
    lab = tl.load(ROWS + row * 6 + 4).to(tl.int64)
    lse_t = tl.load(ROWS + row * 6 + 5)
    ent = tl.sum(tl.zeros([BLOCK], tl.float32), 0)
    for start in range(0, V, BLOCK):
        cols = start + offs
        inside = cols < V
        x = tl.load(Z + row * stride_z + cols, mask=inside, other=float('-inf')).to(tl.float32)
        if HAS_B:
            x += tl.load(B + cols, mask=inside, other=0.0)
        if WRITE:
            g = tl.zeros([BLOCK], tl.float32)
            if TAIL:
                g += c_tail * tl.exp(x - m_c)
            if LABEL:
                g += w * (tl.exp(x * inv_tl - lse_l) - tl.where(cols == lab, 1.0, 0.0))
            tl.store(G + row * stride_g + cols, g.to(G.dtype.element_ty), mask=inside)
        if ENTROPY:
            u = tl.where(x > float('-inf'), x * inv_t, lse_t)  # the top-k ids' (-inf) terms: exactly 0, no 0 * inf
            ent += tl.sum(tl.exp(u - lse_t) * (lse_t - u), 0)
    if ENTROPY:
        tl.store(ENT + row, ent)


class TopKRows(NamedTuple):
    """One chunk's sums (0-dim float32 tensors; ``agree`` int64)."""
    divergence: torch.Tensor
    label: torch.Tensor
    agree: torch.Tensor
    entropy: torch.Tensor


def _lse_with_topk(m_c, s_c, y, scale: float):
    """``log(sum exp(x scale))`` over the row: the complement's ``(m_c, s_c = sum exp((x - m_c) scale))`` and the
    valid top-k logits ``y`` (``-inf`` on unused slots)."""
    return torch.logaddexp(m_c * scale + s_c.log(), torch.logsumexp(y * scale, -1))


def topk_rows(z: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor, logprobs: torch.Tensor, *,
              divergence: Divergence, temperature: float, tail: bool, vocab: int, scale: float,
              grad: Optional[torch.Tensor], bias: Optional[torch.Tensor] = None,
              labels: Optional[torch.Tensor] = None, ce_weight: Optional[torch.Tensor] = None,
              label_weight: Optional[torch.Tensor] = None, label_temperature: float = 1.0, entropy: bool = False,
              block: int = 4096, num_warps: int = 8) -> TopKRows:
    """One top-k chunk: the divergence on the buckets, the label term, the entropy and the gradient over ``z``.

    Args:
        z: ``[C, V]`` student logits (any float dtype, unit stride along ``V``; ``-1e30`` for masked entries);
            overwritten with ``-inf`` at ``ids``.
        ids: ``[C, k]`` teacher ids in ``[0, V)``, unused slots pointing at a valid id of the row (the top-1).
        valid: ``[C, k]`` bool, the slots with a finite ``logprobs``; every row has one.
        logprobs: ``[C, k]`` float32 teacher log-probabilities at temperature 1.
        divergence, temperature, tail, vocab: as :func:`~swift_gkd_plugin.core.fused.loss.fused_linear_jsd`.
        scale: the divergence's normaliser (``1 / normalizer``), folded into the gradient.
        grad: ``[C, V]`` output (``z`` itself, or a buffer in the matmul dtype) for d loss / d z, or None.
        bias: optional ``[V]`` float32 added to ``z`` (``-1e30`` entries mask), None when ``z`` holds it.
        labels: ``[C]`` label ids (ignored ones: any id with weight 0), with ``ce_weight [C]`` the cross-entropy
            weights and ``label_weight [C]`` the gradient's (scale and ``1 / T_l`` included).
        entropy: also sum the entropy of ``softmax(z / T)``.
    """
    c, v = z.shape
    dev, f32 = z.device, torch.float32
    zero = torch.zeros((), dtype=f32, device=dev)
    if c == 0:
        return TopKRows(zero, zero.clone(), zero.long(), zero.clone())
    rows = torch.arange(c, device=dev)
    y = z.gather(1, ids).float()
    if bias is not None:
        y += bias[ids]
    y = y.masked_fill(~valid, float('-inf'))
    lab = None if labels is None else labels.long()
    z_lab = None
    if lab is not None:
        z_lab = z[rows, lab].float() + (0 if bias is None else bias[lab])
    z[rows.unsqueeze(1), ids] = float('-inf')  # the complement stays finite; duplicates write the same value

    inv_t, inv_tl = 1.0 / temperature, 1.0 / label_temperature
    block = min(block, triton.next_power_of_2(v))
    dummy = y
    stats = torch.empty(c, 4, dtype=f32, device=dev)
    flags = dict(V=v, HAS_B=bias is not None, BLOCK=block, num_warps=num_warps)  # V constexpr: one variant per head
    _complement_stats_kernel[(c, )](z, dummy if bias is None else bias, stats, z.stride(0), inv_t, inv_tl, NEG_LOGIT,
                                    ENTROPY=entropy, LABEL_T=lab is not None and inv_tl != 1, **flags)
    m_c, s_c = stats[:, 0], stats[:, 1]
    s_t = s_c if inv_t == 1 else stats[:, 2]
    s_l = s_c if inv_tl == 1 else stats[:, 3]

    row_max = torch.maximum(m_c, y.amax(-1))
    top1 = y.gather(1, logprobs.argmax(-1, keepdim=True)).squeeze(1)
    agree = (top1 >= row_max).sum()
    if tail:  # the student's tail bucket: the complement's logsumexp (-inf when empty), in float64 (m_c ~ 1e4)
        y_tail = m_c.double() + s_c.double().log()
        t_tail = teacher_tail_logmass(logprobs, valid.sum(-1), vocab)
        div, dy = bucket_divergence(torch.cat([y.double(), y_tail.unsqueeze(1)], 1),
                                    torch.cat([logprobs, t_tail.unsqueeze(1)], 1), divergence, temperature)
        div, dy = div.float(), dy.float()
        c_tail = torch.where(s_c > 0, dy[:, -1] / s_c, 0.0) * scale
        k_grad = dy[:, :-1] * scale
    else:
        div, dy = bucket_divergence(y, logprobs, divergence, temperature)
        c_tail, k_grad = torch.zeros_like(m_c), dy * scale

    ce = zero
    lse_l = lse_t = zero.expand(c)
    w = torch.zeros_like(m_c)
    lab_col = torch.full_like(m_c, -1.0)
    if lab is not None:
        lse_l = _lse_with_topk(m_c, s_l, y, inv_tl)
        ce = -((z_lab * inv_tl - lse_l) * ce_weight).sum()
        w = label_weight.float()
        in_k = valid & (ids == lab.unsqueeze(1))
        k_grad = k_grad + w.unsqueeze(1) * (torch.exp(y * inv_tl - lse_l.unsqueeze(1)) - in_k.float())
        lab_col = torch.where(in_k.any(-1), -1, lab).float()  # a label among the ids gets its -w there
    if entropy:
        lse_t = _lse_with_topk(m_c, s_t, y, inv_t)
        u = y * inv_t
        ent_k = torch.where(valid, torch.exp(u - lse_t.unsqueeze(1)) * (lse_t.unsqueeze(1) - u), 0.0).sum()
    if grad is not None or entropy:
        per_row = torch.stack([m_c, c_tail, w, lse_l, lab_col, lse_t], 1).contiguous()
        ent_rows = torch.empty(c, dtype=f32, device=dev) if entropy else dummy
        g = z if grad is None else grad
        _grad_kernel[(c, )](z, dummy if bias is None else bias, g, per_row, ent_rows, z.stride(0), g.stride(0),
                            inv_t, inv_tl, TAIL=tail, LABEL=lab is not None, ENTROPY=entropy,
                            WRITE=grad is not None, **flags)
        if grad is not None:
            grad.scatter_add_(1, ids, k_grad.masked_fill(~valid, 0.0).to(grad.dtype))
    ent = ent_rows.sum() + ent_k if entropy else zero
    return TopKRows(div.sum(), ce, agree, ent)
