"""One Triton kernel for a chunk against a full teacher head: ``[C, V]`` student and ``[C, Vt]`` teacher logits
in, per-row divergence / label term / entropy / top-1 agreement and the gradient ``[C, V]`` out.

One program per row, three passes over the row in blocks of ``BLOCK`` entries (the math, with ``u = (z + b) / T``
the student's and ``ut`` the teacher's tempered logits, padded to ``max(V, Vt)`` by the other side's logits as in
:func:`~swift_gkd_plugin.core.fused.loss.fused_linear_jsd`):

1. online logsumexp (running max ``m``, sum ``S`` rescaled as ``m`` grows) of ``u`` and ``ut`` (and of the
   student's own ``V`` entries at ``T`` when padded, and at the label temperature ``T_l`` when the label term is
   on); the teacher's argmax and the student's max;
2. with ``s = u - m - log S``, ``p_s = exp(u - m) / S`` (teacher alike): the divergence's per-entry terms summed
   (the value), the sums ``sum p_s``, ``sum stat``, ``sum g_near``, ``sum g_far`` (the centring and the switch
   between the two gradient forms), the entropy terms ``-p log p`` (student's and teacher's);
3. ``grad = coef * (g - p_s sum(g) / sum(p_s)) + w_l (softmax(z / T_l) - onehot(y))`` with ``g`` the form picked
   by the row statistic, written once, in the gradient buffer's dtype (it may be the student logits' own buffer:
   each entry is read before it is overwritten).

The divergence's per-entry math is a ``@triton.jit`` function passed as the constexpr ``ENTRY`` (one generic
kernel, one compiled variant per divergence form; see :mod:`.entry_math`). Reads per entry: 3 x (student +
teacher) logits; writes: the gradient once.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl



@triton.jit
def _online(m, total, x):
    """Online logsumexp step: fold the block ``x`` into the running ``(max, sum of exp(. - max))``."""
    m_new = tl.maximum(m, tl.max(x, 0))
    total = total * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
    return m_new, total


@triton.jit
def _tempered(ZS, ZT, BS, BT, zs_row, zt_row, cols, V, VT, inv_t, HAS_BS: tl.constexpr, HAS_BT: tl.constexpr):
    """The block's raw student logits ``z + b`` (0 outside ``V``), tempered ``u`` and ``ut`` over ``max(V, Vt)``
    (padded by the other side's), ``-inf`` beyond both."""
    in_s = cols < V
    in_t = cols < VT
    z = tl.load(ZS + zs_row + cols, mask=in_s, other=0.0).to(tl.float32)
    if HAS_BS:
        z += tl.load(BS + cols, mask=in_s, other=0.0)
    zt = tl.load(ZT + zt_row + cols, mask=in_t, other=0.0).to(tl.float32)
    if HAS_BT:
        zt += tl.load(BT + cols, mask=in_t, other=0.0)
    u = z * inv_t
    ut = zt * inv_t
    u_pad = tl.where(in_s, u, tl.where(in_t, ut, float('-inf')))
    ut_pad = tl.where(in_t, ut, tl.where(in_s, u, float('-inf')))
    return z, u_pad, ut_pad


@triton.jit
def _entropy_terms(own_cols, p, logp, x, m, total, OWN: tl.constexpr):
    """One side's entropy terms ``-p log p`` summed over the block's ``own_cols``: from the row's shared ``p`` and
    ``logp`` when the row is that side's own (``OWN``), else from the side's own normaliser ``(m, total)`` of its
    tempered logits ``x`` (a row padded by the other side's logits)."""
    if OWN:
        acc = tl.sum(tl.where(own_cols, -p * logp, 0.0), 0)
    else:
        q = tl.where(own_cols, tl.exp(x - m) / total, 0.0)
        acc = tl.sum(tl.where(own_cols, -q * (x - m - tl.log(total)), 0.0), 0)
    return acc


@triton.jit
def _probs(u, ut, inside, m_s, log_ss, inv_ss, m_t, log_st, inv_st):
    """``(p_s, p_t, s, t)`` of a block: probabilities and log-probabilities as ``(u - m) - log S`` (0 outside)."""
    ps = tl.where(inside, tl.exp(u - m_s) * inv_ss, 0.0)
    pt = tl.where(inside, tl.exp(ut - m_t) * inv_st, 0.0)
    s = tl.where(inside, (u - m_s) - log_ss, 0.0)
    t = tl.where(inside, (ut - m_t) - log_st, 0.0)
    return ps, pt, s, t


@triton.jit
def _entries(ZS, ZT, BS, BT, zs_row, zt_row, cols, inside, V, VT, inv_t, m_s, log_ss, inv_ss, m_t, log_st, inv_st,
             k0, k1, k2, k3, ENTRY: tl.constexpr, HAS_BS: tl.constexpr, HAS_BT: tl.constexpr):
    """One block read and its per-entry math: ``(z, u, ut, p_s, p_t, s, t)`` and ``ENTRY``'s ``(term, stat, g_near,
    g_far)`` (what a pass does not use, the compiler drops)."""
    z, u, ut = _tempered(ZS, ZT, BS, BT, zs_row, zt_row, cols, V, VT, inv_t, HAS_BS, HAS_BT)
    ps, pt, s, t = _probs(u, ut, inside, m_s, log_ss, inv_ss, m_t, log_st, inv_st)
    term, stat, g_near, g_far = ENTRY(s, t, ps, pt, k0, k1, k2, k3)
    return z, u, ut, ps, pt, s, t, term, stat, g_near, g_far


@triton.jit
def _statistics(ZS, ZT, BS, BT, LAB, CW, CE, AGREE, row, zs_row, zt_row, V, VT, inv_t, inv_tl,
                VMAX: tl.constexpr, HAS_BS: tl.constexpr, HAS_BT: tl.constexpr, LABEL: tl.constexpr,
                ENTROPY: tl.constexpr, OWN: tl.constexpr, TOWN: tl.constexpr, MOMENT: tl.constexpr,
                BLOCK: tl.constexpr):
    """Pass 1, one read of the row: the online logsumexps ``(m, S)`` of the student, the teacher, the entropies'
    own sides and the label term, the top-1 agreement and the label's cross-entropy (stored), and with ``MOMENT``
    the online ``sum exp(u - m_s) (ut - u)`` (rescaled with ``S_s``: KL(s || t)'s centring shift without a pass of its
    own, for a kernel that reads the row twice). Returns
    ``(m_s, S_s, m_t, S_t, m_o, S_o, m_q, S_q, m_l, S_l, label, moment)``."""
    offs = tl.arange(0, BLOCK)
    zero = tl.sum(tl.zeros([BLOCK], tl.float32), 0)
    m_s, s_s, m_t, s_t = zero - float('inf'), zero, zero - float('inf'), zero
    m_o, s_o, m_l, s_l = zero - float('inf'), zero, zero - float('inf'), zero
    m_q, s_q = zero - float('inf'), zero  # the teacher's own Vt entries, when its row is padded (not TOWN)
    moment = zero
    t_best, s_best = zero - float('inf'), zero - float('inf')
    t_arg = tl.sum(tl.zeros([BLOCK], tl.int32), 0)
    for start in range(0, VMAX, BLOCK):
        cols = start + offs
        z, u, ut = _tempered(ZS, ZT, BS, BT, zs_row, zt_row, cols, V, VT, inv_t, HAS_BS, HAS_BT)
        if MOMENT:
            m_new = tl.maximum(m_s, tl.max(u, 0))
            rescale = tl.exp(m_s - m_new)
            e = tl.exp(u - m_new)  # shared by S_s and the moment: no exp of its own
            s_s = s_s * rescale + tl.sum(e, 0)
            moment = moment * rescale + tl.sum(tl.where(cols < VMAX, e * (ut - u), 0.0), 0)
            m_s = m_new
        else:
            m_s, s_s = _online(m_s, s_s, u)
        m_t, s_t = _online(m_t, s_t, ut)
        in_s = cols < V
        u_own = tl.where(in_s, u, float('-inf'))
        s_best = tl.maximum(s_best, tl.max(u_own, 0))
        ut_own = tl.where(cols < VT, ut, float('-inf'))
        b_max = tl.max(ut_own, 0)
        b_arg = tl.min(tl.where(ut_own == b_max, cols, 2147483647), 0)
        t_arg = tl.where(b_max > t_best, b_arg, t_arg)
        t_best = tl.maximum(t_best, b_max)
        if ENTROPY and not OWN:
            m_o, s_o = _online(m_o, s_o, u_own)
        if ENTROPY and not TOWN:
            m_q, s_q = _online(m_q, s_q, ut_own)
        if LABEL:
            m_l, s_l = _online(m_l, s_l, tl.where(in_s, z * inv_tl, float('-inf')))
    # the teacher's argmax is a student argmax when the student's logit there is maximal
    at = tl.minimum(t_arg, V - 1)
    z_at = tl.load(ZS + zs_row + at).to(tl.float32)
    if HAS_BS:
        z_at += tl.load(BS + at)
    tl.store(AGREE + row, ((t_arg < V) & (z_at * inv_t >= s_best)).to(tl.int32))
    lab = 0
    if LABEL:
        lab = tl.load(LAB + row)
        z_lab = tl.load(ZS + zs_row + lab).to(tl.float32)
        if HAS_BS:
            z_lab += tl.load(BS + lab)
        tl.store(CE + row, -tl.load(CW + row) * (z_lab * inv_tl - m_l - tl.log(s_l)))
    return m_s, s_s, m_t, s_t, m_o, s_o, m_q, s_q, m_l, s_l, lab, moment


@triton.jit
def full_rows_kernel(ZS, ZT, BS, BT, G, LAB, LW, CW, DIV, CE, ENT, TENT, AGREE,
                     stride_zs, stride_zt, stride_g, V, VT, inv_t, inv_tl, coef, k0, k1, k2, k3, threshold,
                     VMAX: tl.constexpr, VOWN: tl.constexpr, ENTRY: tl.constexpr, HAS_BS: tl.constexpr,
                     HAS_BT: tl.constexpr, LABEL: tl.constexpr,
                     ENTROPY: tl.constexpr, OWN: tl.constexpr, TOWN: tl.constexpr, WANT_GRAD: tl.constexpr,
                     BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    zs_row = row * stride_zs
    zt_row = row * stride_zt
    offs = tl.arange(0, BLOCK)
    zero = tl.sum(tl.zeros([BLOCK], tl.float32), 0)
    m_s, s_s, m_t, s_t, m_o, s_o, m_q, s_q, m_l, s_l, lab, _ = _statistics(
        ZS, ZT, BS, BT, LAB, CW, CE, AGREE, row, zs_row, zt_row, V, VT, inv_t, inv_tl, VMAX, HAS_BS, HAS_BT, LABEL,
        ENTROPY, OWN, TOWN, False, BLOCK)
    # log-probabilities as (u - m) - log S: u - m is exact near the max, whereas m + log S rounded to float32 carries
    # half an ulp of |m| (5e-4 at |u| = 1e4) into every entry
    log_ss = tl.log(s_s)
    log_st = tl.log(s_t)
    inv_ss = 1.0 / s_s
    inv_st = 1.0 / s_t
    # pass 2: the value, the centring and switch sums, the entropy
    acc_div, acc_p, acc_stat, acc_near, acc_far, acc_ent, acc_tent = zero, zero, zero, zero, zero, zero, zero
    for start in range(0, VMAX, BLOCK):
        cols = start + offs
        inside = cols < VMAX
        z, u, ut, ps, pt, s, t, term, stat, g_near, g_far = _entries(
            ZS, ZT, BS, BT, zs_row, zt_row, cols, inside, V, VT, inv_t, m_s, log_ss, inv_ss, m_t, log_st, inv_st, k0,
            k1, k2, k3, ENTRY, HAS_BS, HAS_BT)
        acc_div += tl.sum(tl.where(inside, term, 0.0), 0)
        acc_p += tl.sum(ps, 0)
        acc_stat += tl.sum(tl.where(inside, stat, 0.0), 0)
        acc_near += tl.sum(tl.where(inside, g_near, 0.0), 0)
        acc_far += tl.sum(tl.where(inside, g_far, 0.0), 0)
        if ENTROPY:
            acc_ent += _entropy_terms(cols < V, ps, s, u, m_o, s_o, OWN)
            acc_tent += _entropy_terms(cols < VT, pt, t, ut, m_q, s_q, TOWN)
    tl.store(DIV + row, acc_div)
    if ENTROPY:
        tl.store(ENT + row, acc_ent)
        tl.store(TENT + row, acc_tent)
    if WANT_GRAD:
        near = acc_stat > threshold
        shift = tl.where(near, acc_near, acc_far) / acc_p
        if LABEL:
            w_lab = tl.load(LW + row)
            inv_sl = 1.0 / s_l
        # pass 3: the gradient, written once
        for start in range(0, VOWN, BLOCK):
            cols = start + offs
            in_s = cols < V
            z, u, ut, ps, pt, s, t, term, stat, g_near, g_far = _entries(
                ZS, ZT, BS, BT, zs_row, zt_row, cols, in_s, V, VT, inv_t, m_s, log_ss, inv_ss, m_t, log_st, inv_st,
                k0, k1, k2, k3, ENTRY, HAS_BS, HAS_BT)
            g = coef * (tl.where(near, g_near, g_far) - ps * shift)
            if LABEL:
                g += w_lab * (tl.exp(z * inv_tl - m_l) * inv_sl - tl.where(cols == lab, 1.0, 0.0))
            tl.store(G + row * stride_g + cols, g.to(G.dtype.element_ty), mask=in_s)


#: Entries per block of a row (a power of 2): 2,048 float32 lanes = 8 per thread of 8 warps; tests lower it to
#: exercise many blocks on small vocabularies.
BLOCK = 2048


class RowResults(NamedTuple):
    """Per-row results of :func:`full_rows` (float32, ``[C]``; ``agree`` int32)."""
    divergence: torch.Tensor
    label: Optional[torch.Tensor]
    entropy: Optional[torch.Tensor]
    agree: torch.Tensor
    teacher_entropy: Optional[torch.Tensor] = None  # with ``entropy``: the teacher's, over its own ``Vt`` entries


def full_rows(zs: torch.Tensor, zt: torch.Tensor, bias_s: Optional[torch.Tensor], bias_t: Optional[torch.Tensor],
              *, entry, constants, threshold: float, coef: float, temperature: float, grad: Optional[torch.Tensor],
              labels: Optional[torch.Tensor] = None, label_weight: Optional[torch.Tensor] = None,
              ce_weight: Optional[torch.Tensor] = None, label_temperature: float = 1.0, entropy: bool = False,
              block: Optional[int] = None, num_warps: int = 8) -> RowResults:
    """Launch :func:`full_rows_kernel` on a chunk: ``zs [C, V]``, ``zt [C, Vt]`` raw logits (any float dtype,
    unit stride along the vocabulary), biases ``[V]`` / ``[Vt]`` float32 (``-1e30`` for masked entries) or None.

    ``entry`` / ``constants`` / ``threshold``: the divergence's per-entry function and host constants (a
    :class:`~swift_gkd_plugin.core.row_divergence.KernelForm`); ``coef`` scales its centred gradient (``sign x
    normaliser x 1 / T``); ``grad`` (``[C, V]``, may be ``zs`` itself) receives d loss / d z, or None for values only.
    The label term (``labels [C]`` in range, ``ce_weight [C]`` the cross-entropy weights, ``label_weight [C]`` the
    gradient weights including ``1 / T_l`` and the term's scale) and the entropies are optional (``entropy``: the
    student's over its own ``V`` entries and the teacher's over its own ``Vt``, each of ``softmax(. / T)``).
    """
    return launch(full_rows_kernel, zs, zt, bias_s, bias_t, entry=entry, constants=constants, threshold=threshold,
                  coef=coef, temperature=temperature, grad=grad, labels=labels, label_weight=label_weight,
                  ce_weight=ce_weight, label_temperature=label_temperature, entropy=entropy, block=block,
                  num_warps=num_warps, VOWN=zs.shape[1])


def launch(kernel, zs, zt, bias_s, bias_t, *, entry, constants, threshold, coef, temperature, grad, labels,
           label_weight, ce_weight, label_temperature, entropy, block, num_warps, **constexprs) -> RowResults:
    """Allocate the per-row results and launch ``kernel`` (one program per row) with :func:`full_rows`'s arguments,
    which every full-row kernel takes, and the kernel's own ``constexprs``."""
    c, v = zs.shape
    vt = zt.shape[1]
    dev = zs.device
    f32 = torch.float32
    div = torch.empty(c, dtype=f32, device=dev)
    agree = torch.empty(c, dtype=torch.int32, device=dev)
    ce = torch.empty(c, dtype=f32, device=dev) if labels is not None else None
    ent = torch.empty(c, dtype=f32, device=dev) if entropy else None
    t_ent = torch.empty(c, dtype=f32, device=dev) if entropy else None
    if c == 0:
        return RowResults(div, ce, ent, agree, t_ent)
    dummy = div
    block = min(block or BLOCK, triton.next_power_of_2(max(v, vt)))
    kernel[(c, )](
        zs, zt, dummy if bias_s is None else bias_s, dummy if bias_t is None else bias_t,
        dummy if grad is None else grad, dummy if labels is None else labels,
        dummy if label_weight is None else label_weight, dummy if ce_weight is None else ce_weight,
        div, dummy if ce is None else ce, dummy if ent is None else ent, dummy if t_ent is None else t_ent, agree,
        zs.stride(0), zt.stride(0), 0 if grad is None else grad.stride(0), v, vt, 1.0 / temperature,
        1.0 / label_temperature, coef, *[float(k) for k in constants], float(threshold),
        VMAX=max(v, vt), ENTRY=entry, HAS_BS=bias_s is not None, HAS_BT=bias_t is not None, LABEL=labels is not None,
        ENTROPY=bool(entropy), OWN=vt <= v, TOWN=vt >= v, WANT_GRAD=grad is not None, BLOCK=block,
        num_warps=num_warps, **constexprs)
    return RowResults(div, ce, ent, agree, t_ent)
