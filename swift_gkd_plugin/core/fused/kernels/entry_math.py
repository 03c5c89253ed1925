"""Per-entry math of the divergences for the Triton kernels: one ``@triton.jit`` function per divergence form.

Imported only when a kernel runs (it imports triton). Each ``*_entry`` function takes one block of a row:
``s``, ``t`` (the student's and teacher's log-probabilities at the loss temperature), ``ps``, ``pt`` (their
probabilities) and the four host constants ``k0..k3`` of :class:`~swift_gkd_plugin.core.row_divergence.KernelForm`,
and returns ``(term, stat, g_near, g_far)``: the per-entry value term (a Bregman term ``>= 0``), the entry's share
of the row statistic that picks the gradient form, and ``p_s * x`` in the two forms (before centring by
``g - p_s sum(g) / sum(p_s)``). The forms, constants and derivations are those of the torch row functions in
:mod:`swift_gkd_plugin.core.row_divergence` (see ``docs_en/fused_loss.md``); a registry entry there names its
function here.

``expm1`` / ``log1p`` come from libdevice on a GPU (correctly rounded to an ulp or two; Triton's ``tl.log`` is the
fast ``lg2.approx``, whose absolute error near 1 would ruin them) and, under ``TRITON_INTERPRET=1`` (where
libdevice is not available), from Kahan's and Goldberg's exact-rounding tricks on numpy's ``exp`` / ``log``.
"""
from __future__ import annotations

import os

import triton
import triton.language as tl
from triton.language.extra import libdevice

INTERPRETED = tl.constexpr(os.environ.get('TRITON_INTERPRET', '0') == '1')
FAR = tl.constexpr(40.0)  # nats, as row_divergence._FAR
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def expm1(x):
    if INTERPRETED:  # Kahan: (u - 1) x / log(u) is exact to a few ulp wherever exp rounds
        u = tl.exp(x)
        um1 = u - 1.0
        r = tl.where(um1 == 0.0, x, um1 * x / tl.log(tl.where(um1 == 0.0, 2.0, u)))
        r = tl.where(um1 == -1.0, -1.0, r)
        r = tl.where(x > 80.0, u, r)  # u = inf there: keep inf, not inf / inf
    else:
        r = libdevice.expm1(x)
    return r


@triton.jit
def log1p(x):
    if INTERPRETED:  # Goldberg: log(u) x / (u - 1) with u = 1 + x
        u = 1.0 + x
        um1 = u - 1.0
        r = tl.where(um1 == 0.0, x, tl.log(u) * x / tl.where(um1 == 0.0, 1.0, um1))
        r = tl.where(x > 1e30, tl.log(u), r)
    else:
        r = libdevice.log1p(x)
    return r


@triton.jit
def logaddexp(x, y):
    m = tl.maximum(x, y)
    return m + log1p(tl.exp(-tl.abs(x - y)))


@triton.jit
def difference(ref, other, log_ratio):
    """``other - ref`` from ``log_ratio = log(other / ref)``: ``ref expm1(log_ratio)`` (exact near 0), or ``other``
    beyond FAR nats (``ref`` below float32 resolution there)."""
    return tl.where(log_ratio > FAR, other, ref * expm1(tl.minimum(log_ratio, FAR)))


@triton.jit
def jsd_entry(s, t, ps, pt, k0, k1, k2, k3):
    """Generalized JSD, ``0 < beta < 1``: ``k0 = beta``, ``k1 = 1 - beta``, ``k2 = beta / (1 - beta)``."""
    d = tl.minimum(tl.maximum(t - s, -FAR), FAR)
    big_l = log1p(k0 * expm1(d))  # log(M / p_s)
    m = k0 * pt + k1 * ps
    term = m * (d - big_l) - k1 * ps * d
    g_near = ps * big_l
    g_far = ps * log1p(k2 * tl.exp(d))
    return term, g_near, g_near, g_far


@triton.jit
def kl_forward_entry(s, t, ps, pt, k0, k1, k2, k3):
    """``KL(t || s)`` (jsd at beta 0, skew_kl at alpha 0)."""
    lr = s - t
    term = difference(pt, ps, lr) - pt * lr
    g = ps - pt
    return term, 0.0 * ps, g, g


@triton.jit
def kl_reverse_entry(s, t, ps, pt, k0, k1, k2, k3):
    """``KL(s || t)`` (jsd at beta 1, skew_rkl at alpha 0)."""
    d = t - s
    term = difference(ps, pt, d) - ps * d
    g = ps * d
    return term, 0.0 * ps, g, g


@triton.jit
def zero_entry(s, t, ps, pt, k0, k1, k2, k3):
    """A skew divergence at alpha 1: ``D = 0``."""
    z = 0.0 * ps
    return z, z, z, z


@triton.jit
def skew_kl_entry(s, t, ps, pt, k0, k1, k2, k3):
    """``KL(t || a p_t + (1 - a) p_s)``: ``k0 = 1 - a``, ``k1 = log a``, ``k2 = log(1 - a)`` (float64 on the host).
    ``e = log(p_t / M)``; ``p_s r = exp(s + e)``."""
    d = t - s
    dn = tl.minimum(tl.maximum(d, -LN2), LN2)
    e = -tl.where(tl.abs(d) <= LN2, log1p(k0 * expm1(-dn)), logaddexp(k2 - d, k1))
    term = k0 * difference(pt, ps, -d) + pt * e
    v = tl.exp(s + e)
    g_near = tl.where(e > 1.0, v - ps, ps * expm1(tl.minimum(e, 1.0)))
    return term, v, g_near, v


@triton.jit
def skew_rkl_entry(s, t, ps, pt, k0, k1, k2, k3):
    """``KL(s || (1 - a) p_t + a p_s)``: ``k0 = 1 - a``, ``k1 = log a``, ``k2 = log(1 - a)``, ``k3 = a`` (0 when
    ``a < 1e-30``: then ``a e^-L = exp(log a - L)``). ``L = log(M / p_s)``, ``w = L - log a``."""
    d = t - s
    dn = tl.minimum(tl.maximum(d, -LN2), LN2)
    big_l = tl.where(tl.abs(d) <= LN2, log1p(k0 * expm1(dn)), logaddexp(d + k2, k1))
    term = k0 * difference(ps, pt, d) - ps * big_l
    a_e = tl.where(k3 > 0.0, k3 * expm1(-big_l), tl.exp(k1 - big_l))
    w = logaddexp(d + (k2 - k1), 0.0 * d)
    return term, ps * big_l, ps * (big_l + a_e), ps * (w + expm1(-w))
