"""Per-row generalized JSD of two log-probability rows, and its gradient, in a form accurate at large vocabularies.

Shared by the fused loss (:mod:`swift_gkd_plugin.core.fused_loss`, one row at a time in ``[chunk, V]`` buffers) and
the vocabulary-parallel loss (:mod:`swift_gkd_plugin.core.tensor_parallel`, whose rows are split across ranks: it
passes a ``row_sum`` that all-reduces). Everything works in place on caller-owned buffers.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Tuple

import torch

__all__ = ['divergence_rows', 'log_softmax_into']

_FAR = 40.0  # nats: past it the smaller of two probabilities is < 5e-18 of the larger, far below float32 rounding

RowSum = Callable[[torch.Tensor], torch.Tensor]


def _row_sum(x: torch.Tensor) -> torch.Tensor:
    return x.sum(-1)  # cascade summation: error ~ eps log(V), where a sequential float32 sum grows with V


def log_softmax_into(logits: torch.Tensor, probs: torch.Tensor) -> None:
    """``logits <- log_softmax(logits)``, ``probs <- softmax(logits)``, in place, rows of any length.

    The normaliser is summed by ``torch.sum`` (cascade summation). ``torch.log_softmax``'s CPU kernel accumulates it
    sequentially in float32: off by ~1e-6 relative at V = 151,936, an error shared by every entry of the row, which
    reaches a divergence's gradient at first order; and ``probs`` divided by the normaliser carry only their own
    rounding, where ``exp(log_softmax)`` carries ``|log p|`` times more.
    """
    logits.sub_(logits.amax(-1, keepdim=True))
    torch.exp(logits, out=probs)
    total = probs.sum(-1, keepdim=True)
    probs.div_(total)
    logits.sub_(total.log_())


def divergence_rows(buf: Dict[str, torch.Tensor], beta: float,
                    row_sum: RowSum = _row_sum) -> Tuple[torch.Tensor, float]:
    """Per-row divergence of ``s = buf['a']``, ``t = buf['b']`` (log-probabilities; ``buf['p']``, ``buf['q']``:
    their probabilities), and its gradient.

    Leaves ``sign * dD/du`` in ``buf['a']`` and ``p_s`` in ``buf['p']``; returns ``(D [C], sign)``. ``buf['b']``
    and ``buf['q']`` are scratch; ``buf['far']`` (bool, same shape) too for beta in {0, 1}. ``row_sum`` sums the
    last dimension (vocabulary-parallel callers all-reduce it).

    Why this form: a KL summed as ``sum p (log p - log q)`` adds first-order terms that cancel to a second-order
    result, so its rounding (and any rounding of a log-normaliser, which shifts a whole row of ``t - s``) lands on
    ``D`` at first order. Each row is instead summed as per-entry terms that are each ``>= 0`` and second order in
    ``d = t - s`` (Bregman form of the KL, ``beta p_t log(p_t/M) + (1 - beta) p_s log(p_s/M)`` for the mixture),
    formed with ``expm1``/``log1p`` so that they are accurate near ``d = 0``, and exactly 0 there, then summed by
    ``row_sum``. Identical rows give exactly 0, never a negative value, and a normaliser
    shift moves ``D`` only at second order. The gradients are centred with ``sum p_s (...)`` sums formed the same way.
    """
    a, b, p, q = buf['a'], buf['b'], buf['p'], buf['q']
    if beta == 0:  # D = KL(t || s)
        torch.sub(a, b, out=b)  # log(p_s / p_t)
        _kl_bregman_into(a, q, p, b, buf['far'])  # p_s - p_t
        div = row_sum(torch.addcmul(a, q, b, value=-1, out=b))  # terms (p_s - p_t) - p_t log(p_s / p_t)
        torch.sub(p, q, out=a)  # dD/du: from the probabilities, whose rounding is not correlated across a row
        _centre(a, p, row_sum)
        return div, 1.0
    b.sub_(a)  # d = log(p_t / p_s)
    if beta == 1:  # D = KL(s || t)
        _kl_bregman_into(a, p, q, b, buf['far'])  # p_t - p_s
        div = row_sum(torch.addcmul(a, p, b, value=-1, out=a))  # terms (p_t - p_s) - p_s d
        torch.mul(p, b, out=a)
        _centre(a, p, row_sum)  # p_s (d - sum p_s d) = -dD/du
        return div, -1.0
    # 0 < beta < 1. Past |d| = _FAR each term has converged to its limit to float32 resolution: clamp, so that masked
    # entries (d = +-1e30) keep the limit's value and nothing overflows.
    b.clamp_(-_FAR, _FAR)
    torch.expm1(b, out=a).mul_(beta).log1p_()  # L = log(M / p_s), exactly 0 at d = 0
    torch.sub(b, a, out=a)  # log(p_t / M)
    q.mul_(beta).add_(p, alpha=1 - beta)  # M
    # beta p_t log(p_t / M) + (1 - beta) p_s log(p_s / M) = M log(p_t / M) - (1 - beta) p_s d
    div = row_sum(a.mul_(q).addcmul_(p, b, value=-(1 - beta)))
    # dD/du = -(1 - beta) p_s (L - sum p_s L), any constant added to L cancelling. Where p_t << p_s, L sits near
    # log(1 - beta) and float32 cannot resolve its variation there: rows closer to that side take
    # L - log(1 - beta) = log1p(beta / (1 - beta) e^d), the others (student ~ teacher) L itself.
    torch.exp(b, out=a).mul_(beta / (1 - beta)).log1p_().mul_(p)
    torch.expm1(b, out=q).mul_(beta).log1p_().mul_(p)
    near = row_sum(q) > 0.5 * math.log1p(-beta)  # sum p_s L = -KL(s || M), in [log(1 - beta), 0]
    torch.where(near.unsqueeze(-1), q, a, out=a)
    _centre(a, p, row_sum)
    return div, -(1 - beta)


def _centre(g: torch.Tensor, p: torch.Tensor, row_sum: RowSum) -> None:
    """``g <- g - p sum(g) / sum(p)``: the ``log_softmax`` Jacobian applied to ``g = p * x``, as ``p (x - E_p[x])``.

    Dividing by the computed ``sum(p)`` (1 up to rounding) makes the result sum to 0 whatever constant ``x`` holds,
    so that neither a rounding error shared by a whole row nor a constant in ``x`` (``log(1 - beta)`` above) biases
    the gradient.
    """
    g.addcmul_(p, (row_sum(g) / row_sum(p)).unsqueeze(-1), value=-1)


def _kl_bregman_into(out, ref, other, log_ratio, far):
    """``out <- other - ref`` accurate to rounding of the difference itself, from ``log_ratio = log(other / ref)``.

    ``ref * expm1(log_ratio)`` is exact near ``log_ratio = 0`` (where the plain difference cancels); beyond
    ``_FAR`` (e.g. ``ref`` masked) ``ref`` is below float32 resolution next to ``other`` and the difference is
    ``other`` (there expm1 would overflow).
    """
    torch.clamp(log_ratio, max=_FAR, out=out).expm1_().mul_(ref)
    torch.gt(log_ratio, _FAR, out=far)
    torch.where(far, other, out, out=out)
