"""The second design of the full-teacher-head kernel (the experiment ``triton2``, :mod:`triton2_backend`): the
contract of the package's ``full_rows`` (``swift_gkd_plugin/core/fused/kernels/full_rows.py``: same arguments, same
per-row results, the gradient written once over the student's logits), with fewer passes over a row and fewer
transcendentals per entry. The per-entry math is the same ``ENTRY`` function of the package's ``entry_math`` (the
same precision); what changes is which pass computes what.

With ``u``, ``ut`` the tempered student / teacher logits and one program per row, as in ``full_rows``:

1. *statistics* (one read of ``z``, ``zt``): the online logsumexps, the teacher's argmax, the student's max (and the
   entropy's and label term's own normalisers when on); for ``KL(s || t)`` also the online moment
   ``A = sum exp(u - m) (ut - u)``, rescaled as the running max ``m`` grows (no transcendental of its own);
2. *sums* (one read), only where the gradient's centring shift has no closed form (``0 < beta < 1``, the skew
   forms): ``sum p_s``, the row statistic, ``sum g_near``, ``sum g_far``. The value's terms, the teacher's
   probability and the entropy are not computed here (dead code, removed by the compiler);
3. *final* (one read + one write): the value's terms, the entropy and ``grad = coef (g - p_s shift) + label term``,
   in the gradient form the row statistic picked (a branch per row: the other form is not computed).

The shift in closed form (pass 2 skipped, two reads instead of three): ``KL(t || s)`` (beta 0, skew_kl at alpha 0)
has ``g = p_s - p_t``, whose sum is ``1 - 1 = 0``; ``KL(s || t)`` (beta 1, skew_rkl at alpha 0) has ``g = p_s d``
with ``d = t - s``, shift ``sum p_s d = A / S + (lse_s - lse_t)`` from pass 1.

What it saves per ``[C, V]`` entry against ``full_rows`` (bf16 logits: 4 bytes of student + teacher per read;
MUFU = ``ex2``-class special-function ops, libdevice = ``expm1`` / ``log1p`` calls, several instructions each):

=====================  ===========  =============  ====================================
divergence             bytes read   MUFU exp       libdevice
=====================  ===========  =============  ====================================
KL(t || s), beta 0     8 (was 12)   4 (was 6)      1 expm1 (as before)
KL(s || t), beta 1     8 (was 12)   4 (was 5)      1 expm1 (as before)
JSD, 0 < beta < 1      12 (same)    6 (was 7)      2 expm1 + 3 log1p (was 2 + 4), near rows
skew forms             12 (same)    the final pass computes only the gradient form the row needs
=====================  ===========  =============  ====================================

(counted after the compiler drops the results a pass does not use; far rows of the JSD cost as before.)
Writes: the gradient once (2 bytes), as before. Not folded: ``log2(e)`` into the raw logits (``exp2(x log2 e -
m')``): ``x log2 e`` rounds at ``|x|`` (5e-4 nats at ``|z / T| = 1e4``) where ``u - m`` is exact, which would cost
the large-logit exactness (``tests/core/large_logits.py``); ``tl.exp`` already multiplies after the subtraction.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from swift_gkd_plugin.core.fused.kernels.full_rows import RowResults, _entries, _entropy_terms, _statistics, launch

__all__ = ['GENERIC', 'KL_FORWARD', 'KL_REVERSE', 'full_rows2', 'mode_of']

GENERIC, KL_FORWARD, KL_REVERSE = 0, 1, 2  # the shift: from pass 2, zero, from pass 1's moment


def mode_of(entry_name: str) -> int:
    """The kernel's ``MODE`` for a :class:`~swift_gkd_plugin.core.row_divergence.KernelForm`'s entry name."""
    return {'kl_forward_entry': KL_FORWARD, 'kl_reverse_entry': KL_REVERSE}.get(entry_name.split(':')[-1], GENERIC)


@triton.jit
def _final_pass(ZS, ZT, BS, BT, G, zs_row, zt_row, g_row, V, VT, inv_t, inv_tl, coef, k0, k1, k2, k3,
                m_s, log_ss, inv_ss, m_t, log_st, inv_st, m_o, s_o, m_q, s_q, m_l, inv_sl, lab, w_lab, shift,
                VMAX: tl.constexpr, ENTRY: tl.constexpr, HAS_BS: tl.constexpr, HAS_BT: tl.constexpr,
                LABEL: tl.constexpr, ENTROPY: tl.constexpr, OWN: tl.constexpr, TOWN: tl.constexpr,
                WANT_GRAD: tl.constexpr, FAR: tl.constexpr, BLOCK: tl.constexpr):
    """The value's terms and the entropies summed over the row; the gradient (form ``g_far`` if ``FAR``, else
    ``g_near``) written over the student's own ``V`` entries. Returns ``(value, entropy, teacher entropy)``."""
    offs = tl.arange(0, BLOCK)
    zero = tl.sum(tl.zeros([BLOCK], tl.float32), 0)
    acc_div, acc_ent, acc_tent = zero, zero, zero
    for start in range(0, VMAX, BLOCK):
        cols = start + offs
        inside = cols < VMAX
        z, u, ut, ps, pt, s, t, term, stat, g_near, g_far = _entries(
            ZS, ZT, BS, BT, zs_row, zt_row, cols, inside, V, VT, inv_t, m_s, log_ss, inv_ss, m_t, log_st, inv_st, k0,
            k1, k2, k3, ENTRY, HAS_BS, HAS_BT)
        acc_div += tl.sum(tl.where(inside, term, 0.0), 0)
        if ENTROPY:
            acc_ent += _entropy_terms(cols < V, ps, s, u, m_o, s_o, OWN)
            acc_tent += _entropy_terms(cols < VT, pt, t, ut, m_q, s_q, TOWN)
        if WANT_GRAD:
            if FAR:
                g = coef * (g_far - ps * shift)
            else:
                g = coef * (g_near - ps * shift)
            if LABEL:
                g += w_lab * (tl.exp(z * inv_tl - m_l) * inv_sl - tl.where(cols == lab, 1.0, 0.0))
            tl.store(G + g_row + cols, g.to(G.dtype.element_ty), mask=cols < V)
    return acc_div, acc_ent, acc_tent


@triton.jit
def full_rows2_kernel(ZS, ZT, BS, BT, G, LAB, LW, CW, DIV, CE, ENT, TENT, AGREE,
                      stride_zs, stride_zt, stride_g, V, VT, inv_t, inv_tl, coef, k0, k1, k2, k3, threshold,
                      VMAX: tl.constexpr, ENTRY: tl.constexpr, MODE: tl.constexpr, HAS_BS: tl.constexpr,
                      HAS_BT: tl.constexpr, LABEL: tl.constexpr, ENTROPY: tl.constexpr, OWN: tl.constexpr,
                      TOWN: tl.constexpr, WANT_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    zs_row = row * stride_zs
    zt_row = row * stride_zt
    offs = tl.arange(0, BLOCK)
    zero = tl.sum(tl.zeros([BLOCK], tl.float32), 0)
    m_s, s_s, m_t, s_t, m_o, s_o, m_q, s_q, m_l, s_l, lab, moment = _statistics(  # pass 1
        ZS, ZT, BS, BT, LAB, CW, CE, AGREE, row, zs_row, zt_row, V, VT, inv_t, inv_tl, VMAX, HAS_BS, HAS_BT, LABEL,
        ENTROPY, OWN, TOWN, MODE == 2, BLOCK)
    log_ss = tl.log(s_s)
    log_st = tl.log(s_t)
    inv_ss = 1.0 / s_s
    inv_st = 1.0 / s_t
    w_lab = zero
    inv_sl = zero
    if LABEL:
        w_lab = tl.load(LW + row)
        inv_sl = 1.0 / s_l
    # the centring shift: closed form (KL modes) or pass 2
    far = zero != zero
    if MODE == 1:
        shift = zero
    elif MODE == 2:
        shift = moment * inv_ss + ((m_s - m_t) + (log_ss - log_st))
    else:
        acc_p, acc_stat, acc_near, acc_far = zero, zero, zero, zero
        if WANT_GRAD:
            for start in range(0, VMAX, BLOCK):  # pass 2: sums
                cols = start + offs
                inside = cols < VMAX
                z, u, ut, ps, pt, s, t, term, stat, g_near, g_far = _entries(
                    ZS, ZT, BS, BT, zs_row, zt_row, cols, inside, V, VT, inv_t, m_s, log_ss, inv_ss, m_t, log_st,
                    inv_st, k0, k1, k2, k3, ENTRY, HAS_BS, HAS_BT)
                acc_p += tl.sum(ps, 0)
                acc_stat += tl.sum(tl.where(inside, stat, 0.0), 0)
                acc_near += tl.sum(tl.where(inside, g_near, 0.0), 0)
                acc_far += tl.sum(tl.where(inside, g_far, 0.0), 0)
        far = acc_stat <= threshold
        shift = tl.where(far, acc_far, acc_near) / tl.where(acc_p > 0.0, acc_p, 1.0)
    g_row = row * stride_g
    if MODE == 0 and far:  # one branch per row: the other gradient form is never computed
        acc_div, acc_ent, acc_tent = _final_pass(
            ZS, ZT, BS, BT, G, zs_row, zt_row, g_row, V, VT, inv_t, inv_tl, coef, k0, k1, k2, k3, m_s, log_ss, inv_ss,
            m_t, log_st, inv_st, m_o, s_o, m_q, s_q, m_l, inv_sl, lab, w_lab, shift, VMAX, ENTRY, HAS_BS, HAS_BT,
            LABEL, ENTROPY, OWN, TOWN, WANT_GRAD, True, BLOCK)
    else:
        acc_div, acc_ent, acc_tent = _final_pass(
            ZS, ZT, BS, BT, G, zs_row, zt_row, g_row, V, VT, inv_t, inv_tl, coef, k0, k1, k2, k3, m_s, log_ss, inv_ss,
            m_t, log_st, inv_st, m_o, s_o, m_q, s_q, m_l, inv_sl, lab, w_lab, shift, VMAX, ENTRY, HAS_BS, HAS_BT,
            LABEL, ENTROPY, OWN, TOWN, WANT_GRAD, False, BLOCK)
    tl.store(DIV + row, acc_div)
    if ENTROPY:
        tl.store(ENT + row, acc_ent)
        tl.store(TENT + row, acc_tent)


def full_rows2(zs: torch.Tensor, zt: torch.Tensor, bias_s, bias_t, *, entry, mode: int, constants, threshold: float,
               coef: float, temperature: float, grad, labels=None, label_weight=None, ce_weight=None,
               label_temperature: float = 1.0, entropy: bool = False, block=None, num_warps: int = 8) -> RowResults:
    """Launch :func:`full_rows2_kernel` on a chunk: the arguments and results of the package's ``full_rows``, plus
    ``mode`` (:func:`mode_of` the entry)."""
    return launch(full_rows2_kernel, zs, zt, bias_s, bias_t, entry=entry, constants=constants, threshold=threshold,
                  coef=coef, temperature=temperature, grad=grad, labels=labels, label_weight=label_weight,
                  ce_weight=ce_weight, label_temperature=label_temperature, entropy=entropy, block=block,
                  num_warps=num_warps, MODE=mode)
