"""The divergences of the distillation loss, each written once, as math on rows of log-probabilities.

Every loss path calls :func:`divergence_rows` here: the dense loss (:mod:`.divergence`), the fused loss (full head
and top-k buckets, :mod:`.fused.loss`, :mod:`.topk`), the vocabulary-parallel loss (:mod:`.tensor_parallel`, whose
rows are split across ranks: it passes a ``row_sum`` that all-reduces) and the cross-tokenizer hybrid's shared part.
A divergence is a :class:`Divergence` (name + parameters); its row function is registered by name in
:data:`REGISTRY` (with its Triton kernel form, :class:`KernelForm`) and returns the value and the hand-derived
gradient with respect to the student's tempered logits (hand-derived: one pass less than autograd over ``[chunk, V]``
rows, and a form accurate in float32).
Derivations: ``docs_en/fused_loss.md``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, NamedTuple, Optional, Tuple, Union

import torch

__all__ = ['DIVERGENCES', 'REGISTRY', 'Divergence', 'KernelForm', 'RowBuffers', 'as_divergence', 'divergence_rows',
           'entropy_gate', 'gated_row_count', 'kernel_form', 'log_softmax_into']

_FAR = 40.0  # nats: past it the smaller of two probabilities is < 5e-18 of the larger, far below float32 rounding

RowSum = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Divergence:
    """Which divergence, with its parameter: ``jsd`` (generalized JSD, ``beta`` in [0, 1]: 0 = ``KL(t || s)``,
    1 = ``KL(s || t)``), ``skew_kl`` (``KL(t || a t + (1 - a) s)``) or ``skew_rkl`` (``KL(s || (1 - a) t + a s)``),
    ``a = alpha`` in [0, 1] (DistiLLM, Ko et al. 2024); ``t``, ``s``: teacher and student at the loss temperature.

    ``fkl_above_entropy`` (``--gkd_entropy_fkl_threshold``, None = off): the entropy-aware mix (Jin et al. 2026,
    arXiv 2603.07079): each row whose teacher entropy ``H(t)`` exceeds it adds ``KL(t || s)``,
    ``D'(row) = D(row) + 1[H(t) > tau] KL(t || s)`` (:func:`entropy_gate`), in nats over the row's support.
    """
    name: str = 'jsd'
    beta: float = 0.5
    alpha: float = 0.1
    fkl_above_entropy: Optional[float] = None

    def __post_init__(self):
        if self.name not in ROW_FUNCTIONS:
            raise ValueError(f'divergence must be one of {DIVERGENCES}, got {self.name!r}')
        for key in ('beta', 'alpha'):
            if not 0.0 <= getattr(self, key) <= 1.0:  # NaN too
                raise ValueError(f'{key} must be in [0, 1], got {getattr(self, key)}')
        tau = self.fkl_above_entropy
        if tau is not None and not 0.0 <= tau < math.inf:
            raise ValueError(f'fkl_above_entropy must be None or a finite number >= 0 (nats), got {tau}')

    @property
    def needs_flags(self) -> bool:
        """Whether :attr:`RowBuffers.flags` (a bool row buffer) is used."""
        return self.name != 'jsd' or self.beta in (0, 1)

    @property
    def needs_extra(self) -> bool:
        """Whether :attr:`RowBuffers.extra` (one more float row buffer) is used: the skew forms inside (0, 1)."""
        return self.name != 'jsd' and 0 < self.alpha < 1

    def __str__(self):
        text = f'jsd(beta={self.beta})' if self.name == 'jsd' else f'{self.name}(alpha={self.alpha})'
        return text if self.fkl_above_entropy is None else f'{text} + KL(t||s) where H(t) > {self.fkl_above_entropy:g}'


def as_divergence(spec: Union[float, Divergence]) -> Divergence:
    """A :class:`Divergence` from one, or from a number: the generalized JSD with that ``beta``."""
    return spec if isinstance(spec, Divergence) else Divergence('jsd', beta=float(spec))


@dataclass
class RowBuffers:
    """The ``[C, V]`` rows a divergence works in, in place (float32, or float64 for float64 callers).

    On entry ``s``, ``t`` hold the student's and teacher's log-probabilities and ``p_s``, ``p_t`` their
    probabilities (see :func:`log_softmax_into`). On return ``s`` holds ``dD/du / sign`` (``u`` the student's
    tempered logits) and ``p_s`` is unchanged; ``t``, ``p_t``, ``flags`` (bool, needed when
    :attr:`Divergence.needs_flags`) and ``extra`` (float, used when :attr:`Divergence.needs_extra`; allocated on
    demand when ``None``) are scratch.
    """
    s: torch.Tensor
    t: torch.Tensor
    p_s: torch.Tensor
    p_t: torch.Tensor
    flags: Optional[torch.Tensor] = None
    extra: Optional[torch.Tensor] = None


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


def divergence_rows(buf: RowBuffers, divergence: Union[float, Divergence],
                    row_sum: RowSum = _row_sum) -> Tuple[torch.Tensor, float]:
    """Per-row divergence of the rows in ``buf`` and its gradient: returns ``(D [C], sign)`` and leaves
    ``dD/du / sign`` in ``buf.s`` (see :class:`RowBuffers`). ``row_sum`` sums the last dimension
    (vocabulary-parallel callers all-reduce it).

    Why this form: a KL summed as ``sum p (log p - log q)`` adds first-order terms that cancel to a second-order
    result, so its rounding (and any rounding of a log-normaliser, which shifts a whole row of ``t - s``) lands on
    ``D`` at first order. Each row is instead summed as per-entry Bregman terms ``p log(p/q) + q - p`` that are each
    ``>= 0`` and second order in ``d = t - s``, formed with ``expm1``/``log1p`` (exactly 0 at ``d = 0``): identical
    rows give exactly 0, never a negative value, and a normaliser shift moves ``D`` only at second order.
    """
    div = as_divergence(divergence)
    if div.fkl_above_entropy is not None:
        return _entropy_aware_rows(buf, div, row_sum)
    return ROW_FUNCTIONS[div.name](buf, div, row_sum)


def entropy_gate(teacher_entropy: torch.Tensor, threshold: float) -> torch.Tensor:
    """The entropy-aware mix's per-row weight of ``KL(t || s)``: ``1[H(t) > threshold]`` (bool, ``[C]``)."""
    return teacher_entropy > threshold


def gated_row_count(teacher_entropy: torch.Tensor, divergence: Union[float, Divergence]) -> Optional[torch.Tensor]:
    """How many of the rows with teacher entropies ``[C]`` the entropy-aware mix gates (a device scalar), None when
    ``divergence`` has no mix: ``gkd/entropy_fkl_fraction``'s numerator."""
    tau = as_divergence(divergence).fkl_above_entropy
    return None if tau is None else entropy_gate(teacher_entropy, tau).sum()


def _entropy_aware_rows(buf: RowBuffers, div: Divergence, row_sum: RowSum):
    """``D + 1[H(t) > tau] KL(t || s)`` (see :class:`Divergence`): the base divergence on every row, forward KL on a
    copy of the gated rows only, their gradients added. ``H(t)`` is summed with ``row_sum``, so vocabulary-parallel
    ranks gate the same rows."""
    base = Divergence(div.name, beta=div.beta, alpha=div.alpha)
    entropy = row_sum(torch.special.entr(buf.p_t))
    rows = entropy_gate(entropy, div.fkl_above_entropy).nonzero().squeeze(-1)
    gated = None
    if rows.numel():  # forward KL (sign +1: buffers hold dKL/du) on copies of the gated rows
        sub = RowBuffers(buf.s[rows], buf.t[rows], buf.p_s[rows], buf.p_t[rows],
                         torch.empty(rows.numel(), buf.s.shape[-1], dtype=torch.bool, device=buf.s.device))
        fkl, _ = _jsd_rows(sub, Divergence('jsd', beta=0.0), row_sum)
        gated = sub.s
    d, sign = ROW_FUNCTIONS[base.name](buf, base, row_sum)
    if gated is None:
        return d, sign
    if sign == 0:  # a divergence identically 0 (skew at alpha 1): only the forward KL's gradient
        buf.s.zero_()
        sign = 1.0
    buf.s.index_add_(0, rows, gated, alpha=1.0 / sign)  # sign * buf.s = dD/du + 1[gate] dKL/du
    return d.index_add(0, rows, fkl), sign


def kernel_form(divergence: Union[float, Divergence]) -> KernelForm:
    """The Triton kernels' form of a divergence (see :class:`KernelForm`), from the registry. The entropy-aware mix
    has none (the kernels run one divergence per row): ValueError."""
    div = as_divergence(divergence)
    if div.fkl_above_entropy is not None:
        raise ValueError(f'the Triton kernels do not compute the entropy-aware mix ({div}): use the PyTorch backend '
                         '(--gkd_fused_backend torch)')
    return REGISTRY[div.name].kernel(div)


def _jsd_rows(buf: RowBuffers, div: Divergence, row_sum: RowSum):
    """Generalized JSD: ``beta KL(t || M) + (1 - beta) KL(s || M)``, ``M = beta p_t + (1 - beta) p_s``; the two
    KLs at ``beta`` in {0, 1}."""
    a, b, p, q, beta = buf.s, buf.t, buf.p_s, buf.p_t, div.beta
    if beta == 0:  # D = KL(t || s)
        torch.sub(a, b, out=b)  # log(p_s / p_t)
        _difference_into(a, q, p, b, buf.flags)  # p_s - p_t
        div_rows = row_sum(torch.addcmul(a, q, b, value=-1, out=b))  # terms (p_s - p_t) - p_t log(p_s / p_t)
        torch.sub(p, q, out=a)  # dD/du: from the probabilities, whose rounding is not correlated across a row
        _centre(a, p, row_sum)
        return div_rows, 1.0
    b.sub_(a)  # d = log(p_t / p_s)
    if beta == 1:  # D = KL(s || t)
        _difference_into(a, p, q, b, buf.flags)  # p_t - p_s
        div_rows = row_sum(torch.addcmul(a, p, b, value=-1, out=a))  # terms (p_t - p_s) - p_s d
        torch.mul(p, b, out=a)
        _centre(a, p, row_sum)  # p_s (d - sum p_s d) = -dD/du
        return div_rows, -1.0
    # 0 < beta < 1. Past |d| = _FAR each term has converged to its limit to float32 resolution: clamp, so that masked
    # entries (d = +-1e30) keep the limit's value and nothing overflows.
    b.clamp_(-_FAR, _FAR)
    torch.expm1(b, out=a).mul_(beta).log1p_()  # L = log(M / p_s), exactly 0 at d = 0
    torch.sub(b, a, out=a)  # log(p_t / M)
    q.mul_(beta).add_(p, alpha=1 - beta)  # M
    # beta p_t log(p_t / M) + (1 - beta) p_s log(p_s / M) = M log(p_t / M) - (1 - beta) p_s d
    div_rows = row_sum(a.mul_(q).addcmul_(p, b, value=-(1 - beta)))
    # dD/du = -(1 - beta) p_s (L - sum p_s L), any constant added to L cancelling. Where p_t << p_s, L sits near
    # log(1 - beta) and float32 cannot resolve its variation there: rows closer to that side take
    # L - log(1 - beta) = log1p(beta / (1 - beta) e^d), the others (student ~ teacher) L itself.
    torch.exp(b, out=a).mul_(beta / (1 - beta)).log1p_().mul_(p)
    torch.expm1(b, out=q).mul_(beta).log1p_().mul_(p)
    near = row_sum(q) > 0.5 * math.log1p(-beta)  # sum p_s L = -KL(s || M), in [log(1 - beta), 0]
    torch.where(near.unsqueeze(-1), q, a, out=a)
    _centre(a, p, row_sum)
    return div_rows, -(1 - beta)


def _skew_kl_rows(buf: RowBuffers, div: Divergence, row_sum: RowSum):
    """Skew KL: ``KL(t || M)``, ``M = a p_t + (1 - a) p_s``; ``a = 0`` is ``KL(t || s)`` (jsd at beta 0, exactly).

    Terms ``p_t log(p_t / M) + M - p_t = p_t e + (1 - a)(p_s - p_t)`` with ``e = log(p_t / M)``, from
    :func:`skew_log_ratio` (precise for every ``a`` in (0, 1), 1e-300 included). Gradient:
    ``dD/du = -(1 - a) p_s (r - E_ps[r])``, ``r = p_t / M = exp(e)``, with ``p_s r = exp(s + e) <= p_t / (1 - a)``
    formed in log space (``r`` itself reaches ``1 / a``).
    """
    alpha = div.alpha
    if alpha in (0, 1):
        return _skew_endpoint(buf, alpha, 0.0, row_sum)
    a, b, p, q, x = buf.s, buf.t, buf.p_s, buf.p_t, _extra(buf)
    b.sub_(a)  # d = log(p_t / p_s)
    skew_log_ratio(b, x, SkewConstants.of(alpha), reverse=False)  # x = e
    torch.neg(b, out=b)
    a.add_(x)  # s + e = log(p_s r)
    _difference_into(b, q, p, b, buf.flags)  # p_s - p_t
    div_rows = row_sum(b.mul_(1 - alpha).addcmul_(q, x))
    torch.exp(a, out=q)  # p_s r
    near = row_sum(q) > 0.5
    # rows near the teacher (r ~ 1 where the mass is) take p_s (r - 1): p_s expm1(e) where e is small, else
    # p_s r - p_s (no cancellation there, and no overflow of expm1 at e up to -log a)
    torch.clamp(x, max=1.0, out=a).expm1_().mul_(p)
    torch.where(torch.gt(x, 1.0, out=buf.flags), torch.sub(q, p, out=b), a, out=a)
    torch.where(near.unsqueeze(-1), a, q, out=a)
    _centre(a, p, row_sum)
    return div_rows, -(1 - alpha)


def _skew_rkl_rows(buf: RowBuffers, div: Divergence, row_sum: RowSum):
    """Skew reverse KL: ``KL(s || M)``, ``M = (1 - a) p_t + a p_s``; ``a = 0`` is ``KL(s || t)`` (jsd at beta 1).

    Terms ``p_s log(p_s / M) + M - p_s = -p_s L + (1 - a)(p_t - p_s)`` with ``L = log(M / p_s)`` from
    :func:`skew_log_ratio`. Gradient: ``dD/du = -p_s (x - E_ps[x])``, ``x = L + a expm1(-L)`` (``a e^-L <= 1``
    is formed as ``exp(log a - L)`` when ``a`` is below float32's normal range).
    """
    alpha = div.alpha
    if alpha in (0, 1):
        return _skew_endpoint(buf, alpha, 1.0, row_sum)
    k = SkewConstants.of(alpha)
    a, b, p, q, x = buf.s, buf.t, buf.p_s, buf.p_t, _extra(buf)
    b.sub_(a)  # d = log(p_t / p_s)
    _difference_into(x, p, q, b, buf.flags)  # p_t - p_s
    skew_log_ratio(b, q, k, reverse=True)  # q = L
    div_rows = row_sum(x.mul_(1 - alpha).addcmul_(p, q, value=-1))
    # Where p_s >> p_t, L sits near log(a) and x near log(a) + 1 - a, whose variation float32 cannot resolve: rows
    # closer to that side take x - (log(a) + 1 - a) = w + expm1(-w), w = L - log(a) = softplus(d + log((1-a)/a)),
    # the others x.
    near = row_sum(torch.mul(p, q, out=a)) > 0.5 * k.log_a  # sum p_s L = -KL(s || M), in [log a, 0]
    if k.tiny:
        torch.sub(k.log_a, q, out=a).exp_()  # a e^-L (the constant -a dropped: centring removes it)
    else:
        torch.neg(q, out=a).expm1_().mul_(alpha)
    a.add_(q)  # x
    torch.add(b, k.log_ratio, out=b)
    torch.nn.functional.softplus(b, out=x)  # w
    torch.neg(x, out=q).expm1_().add_(x)  # w + expm1(-w)
    torch.where(near.unsqueeze(-1), a, q, out=a).mul_(p)
    _centre(a, p, row_sum)
    return div_rows, -1.0


@dataclass(frozen=True)
class SkewConstants:
    """Host constants of a skew divergence's mixture, computed in float64: ``log a``, ``log(1 - a)``,
    ``log((1 - a) / a)`` and whether ``a`` is below float32's normal range (then ``a`` itself is not used)."""
    alpha: float
    log_a: float
    log_1ma: float
    log_ratio: float
    tiny: bool

    @staticmethod
    def of(alpha: float) -> 'SkewConstants':
        log_a, log_1ma = math.log(alpha), math.log1p(-alpha)
        return SkewConstants(alpha, log_a, log_1ma, log_1ma - log_a, alpha < 1e-30)


_LN2 = math.log(2.0)


def skew_log_ratio(d: torch.Tensor, out: torch.Tensor, k: SkewConstants, reverse: bool) -> torch.Tensor:
    """``out <- log((1 - a) e^{d} + a)`` (``reverse``: ``L = log(M / p_s)`` of skew_rkl) or
    ``out <- -log((1 - a) e^{-d} + a)`` (``e = log(p_t / M)`` of skew_kl), ``d = log(p_t / p_s)`` unchanged.

    Within ``|d| <= log 2`` the ``log1p((1 - a) expm1(+-d))`` form (exactly 0 at ``d = 0``); elsewhere the
    log of the mixture as ``logaddexp(log(1 - a) +- d, log a)`` with both logs from float64: no rounding of
    ``1 - a`` (1 in float32 below a = 6e-8) and no clamp, so masked entries (``d = +-1e30``) stay finite and
    exact. ``out`` must not be ``d``.
    """
    sign = 1.0 if reverse else -1.0
    torch.mul(d, sign, out=out).add_(k.log_1ma)
    torch.logaddexp(out, out.new_tensor(k.log_a), out=out)
    near = (d >= -_LN2) & (d <= _LN2)  # transient: a float and three bool rows
    mid = torch.clamp(d, -_LN2, _LN2).mul_(sign).expm1_().mul_(1 - k.alpha).log1p_()
    torch.where(near, mid, out, out=out)
    return out if reverse else out.neg_()


def _extra(buf: RowBuffers) -> torch.Tensor:
    if buf.extra is None:
        buf.extra = torch.empty_like(buf.s)
    return buf.extra


def _skew_endpoint(buf: RowBuffers, alpha: float, kl_beta: float, row_sum: RowSum):
    """A skew divergence at ``alpha = 0``, the plain KL (the jsd code at ``beta = kl_beta``, so bit for bit), or at
    ``alpha = 1``, where ``M`` is the KL's first distribution: ``D = 0`` and no gradient."""
    if alpha == 0:
        return _jsd_rows(buf, Divergence('jsd', beta=kl_beta), row_sum)
    return row_sum(buf.s.zero_()), 1.0


@dataclass(frozen=True)
class KernelForm:
    """How the Triton kernels (:mod:`swift_gkd_plugin.core.fused.kernels`) compute a divergence: ``entry`` names its
    per-entry ``@triton.jit`` function (``module:function``, imported when a kernel runs), ``constants`` its four host
    constants (computed in float64), ``threshold`` the row statistic above which the gradient takes the "near" form,
    ``sign`` the factor of the centred gradient (as the row function's)."""
    entry: str
    constants: Tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    threshold: float = 1e30
    sign: float = 1.0


_ENTRIES = 'swift_gkd_plugin.core.fused.kernels.entry_math:'


def _jsd_kernel(div: Divergence) -> KernelForm:
    beta = div.beta
    if beta == 0:
        return KernelForm(_ENTRIES + 'kl_forward_entry')
    if beta == 1:
        return KernelForm(_ENTRIES + 'kl_reverse_entry', sign=-1.0)
    return KernelForm(_ENTRIES + 'jsd_entry', (beta, 1 - beta, beta / (1 - beta), 0.0), 0.5 * math.log1p(-beta),
                      -(1 - beta))


def _skew_kernel(div: Divergence) -> KernelForm:
    alpha, reverse = div.alpha, div.name == 'skew_rkl'
    if alpha == 0:
        return _jsd_kernel(Divergence('jsd', beta=1.0 if reverse else 0.0))
    if alpha == 1:
        return KernelForm(_ENTRIES + 'zero_entry')
    k = SkewConstants.of(alpha)
    if reverse:
        return KernelForm(_ENTRIES + 'skew_rkl_entry', (1 - alpha, k.log_a, k.log_1ma, 0.0 if k.tiny else alpha),
                          0.5 * k.log_a, -1.0)
    return KernelForm(_ENTRIES + 'skew_kl_entry', (1 - alpha, k.log_a, k.log_1ma, 0.0), 0.5, -(1 - alpha))


class Registered(NamedTuple):
    """A divergence's two implementations: the torch row function (every path; the reference) and its kernel form."""
    rows: Callable[[RowBuffers, Divergence, RowSum], Tuple[torch.Tensor, float]]
    kernel: Callable[[Divergence], KernelForm]


#: The registry: adding a divergence is one entry here (a row function and a kernel form, whose per-entry Triton
#: function lives in ``core/fused/kernels/entry_math.py``); every loss path and the kernels then have it.
REGISTRY: Dict[str, Registered] = {
    'jsd': Registered(_jsd_rows, _jsd_kernel),
    'skew_kl': Registered(_skew_kl_rows, _skew_kernel),
    'skew_rkl': Registered(_skew_rkl_rows, _skew_kernel),
}
ROW_FUNCTIONS = {name: entry.rows for name, entry in REGISTRY.items()}
DIVERGENCES = tuple(ROW_FUNCTIONS)


def _centre(g: torch.Tensor, p: torch.Tensor, row_sum: RowSum) -> None:
    """``g <- g - p sum(g) / sum(p)``: the ``log_softmax`` Jacobian applied to ``g = p * x``, as ``p (x - E_p[x])``.

    Dividing by the computed ``sum(p)`` (1 up to rounding) makes the result sum to 0 whatever constant ``x`` holds,
    so that neither a rounding error shared by a whole row nor a constant in ``x`` (``log(1 - beta)`` above) biases
    the gradient.
    """
    g.addcmul_(p, (row_sum(g) / row_sum(p)).unsqueeze(-1), value=-1)


def _difference_into(out, ref, other, log_ratio, far):
    """``out <- other - ref`` accurate to rounding of the difference itself, from ``log_ratio = log(other / ref)``
    (``out`` may be ``log_ratio``).

    ``ref * expm1(log_ratio)`` is exact near ``log_ratio = 0`` (where the plain difference cancels); beyond
    ``_FAR`` (e.g. ``ref`` masked) ``ref`` is below float32 resolution next to ``other`` and the difference is
    ``other`` (there expm1 would overflow).
    """
    torch.gt(log_ratio, _FAR, out=far)
    torch.clamp(log_ratio, max=_FAR, out=out).expm1_().mul_(ref)
    torch.where(far, other, out, out=out)
