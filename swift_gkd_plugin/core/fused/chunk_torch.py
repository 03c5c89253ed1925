"""The PyTorch chunk backend of the fused loss (the reference; CPU, and CUDA where the kernels do not run).

A chunk is a few elementwise passes over float32 ``[C, V]`` scratch rows (``_Scratch``, allocated once per call and
reused by every chunk): the student's logits, then its log-probabilities, then ``d loss / d z`` in place; with a full
teacher head the teacher's rows beside them. The divergence of each row and its closed-form gradient come from
:func:`~swift_gkd_plugin.core.row_divergence.divergence_rows` (full rows) or
:func:`~swift_gkd_plugin.core.topk.bucket_divergence` (top-k buckets), as on every other loss path.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

from swift_gkd_plugin.core.constants import NEG_LOGIT as _NEG_LOGIT
from swift_gkd_plugin.core.entropy import entropy_terms_
from swift_gkd_plugin.core.fused.plan import ChunkBackend, ChunkResult, Plan, finite_bias, label_rows
from swift_gkd_plugin.core.row_divergence import RowBuffers, divergence_rows, gated_row_count, log_softmax_into
from swift_gkd_plugin.core.topk import bucket_divergence, teacher_tail_logmass

_SCRATCH_BYTES = 2**30  # float32 scratch targeted by the automatic chunk size
_MAX_CHUNK = 1024


def default_chunk_size(vocab_size: int, num_buffers: float = 4) -> int:
    """Rows per chunk so that ``num_buffers`` float32 ``[chunk, vocab_size]`` buffers take about 1 GiB.

    Each chunk re-reads (and the BLAS re-packs) both ``[V, H]`` weights and read-modify-writes the float32
    ``[V, H]`` weight gradient, so chunks of a few hundred rows keep that per-chunk cost small next to the matmuls
    (on 2 CPU cores, 416 rows ran within ~5% of the bare matmuls' CPU time, 208 rows ~15%), while the scratch stays
    independent of ``N``. At ``V = 151936`` and the 4 buffers of a full teacher this gives 416 rows (``beta`` in
    ``{0, 1}`` adds a bool buffer: 384 rows).
    """
    rows = _SCRATCH_BYTES // (4 * num_buffers * max(vocab_size, 1))
    return int(max(32, min(_MAX_CHUNK, rows // 32 * 32)))


class TorchChunks(ChunkBackend):
    """The chunk backend on PyTorch ops: ``rows`` per chunk, :meth:`chunk` per chunk (see ``core/fused/plan.py``)."""

    def __init__(self, plan: Plan, weight: torch.Tensor, bias: Optional[torch.Tensor], hidden: torch.Tensor,
                 want_grad: bool):
        self.plan, self.weight, self.want_grad = plan, weight, want_grad
        n = hidden.shape[0]
        self.bias = None if bias is None else finite_bias(bias)
        vmax = max(plan.vocab, plan.teacher_weight.shape[0]) if plan.full else plan.vocab
        grad_dtype = weight.dtype if want_grad else torch.float32
        self.scratch = _Scratch.allocate(plan, plan.full, plan.sft, n, vmax, grad_dtype, weight.device)
        self.rows = self.scratch.logits.shape[0]

    def chunk(self, h: torch.Tensor, sl: slice) -> ChunkResult:
        """The chunk of rows ``sl`` (hidden states ``h`` in the matmul dtype)."""
        view = self.scratch.rows(h.shape[0])
        step = _full_chunk if self.plan.full else _topk_chunk
        sums = step(view, h, self.weight, self.bias, self.plan, sl, self.plan.sft)
        grad = bias_grad = None
        if self.want_grad:
            grad = bias_grad = view.logits[:, :self.plan.vocab]
            if view.half is not None:  # the backward matmuls run in the weights' dtype
                grad = view.half.copy_(grad)
        return ChunkResult(sums.divergence_sum, sums.label_sum, sums.top1_agree, sums.entropy_sum,
                           sums.teacher_entropy_sum, grad, sums.grad_scale, bias_grad, sums.gated_rows)


@dataclass
class _Scratch:
    """The ``[chunk, V]`` rows reused by every chunk (float32 unless said otherwise).

    ``logits``: the student's logits, then its log-probabilities, then d loss / d logits. Full teacher only:
    ``teacher`` (its logits, then log-probabilities), ``p_s`` and ``p_t`` (the probabilities), for the KL forms
    ``flags`` (bool) and for the skew forms ``div_extra``. ``extra``: the label term's and the entropy's own pass
    where they cannot share the divergence's rows. ``half``: the gradient in a half-precision matmul dtype.
    """
    logits: torch.Tensor
    teacher: Optional[torch.Tensor] = None
    p_s: Optional[torch.Tensor] = None
    p_t: Optional[torch.Tensor] = None
    flags: Optional[torch.Tensor] = None
    extra: Optional[torch.Tensor] = None
    div_extra: Optional[torch.Tensor] = None
    half: Optional[torch.Tensor] = None

    @staticmethod
    def allocate(plan: Plan, full: bool, sft: bool, n: int, vmax: int, grad_dtype, dev) -> '_Scratch':
        """The buffers a configuration needs, as many rows as :func:`default_chunk_size` allows (or
        ``plan.chunk_size``)."""
        names = ['logits', 'teacher', 'p_s', 'p_t'] if full else ['logits']
        if (sft and _separate_label(plan, full)) or (plan.entropy and not _student_row_is_own(plan, full)):
            names.append('extra')
        flags = full and plan.divergence.needs_flags  # a bool buffer: a quarter of a float32 one
        if full and plan.divergence.needs_extra:  # the skew forms: one more row, and about one more transient
            names.append('div_extra')
        transient = 1.0 if full and plan.divergence.needs_extra else 0.0
        rows = min(n, plan.chunk_size or default_chunk_size(vmax, len(names) + 0.25 * flags + transient))
        bufs = {k: torch.empty(rows, vmax, dtype=torch.float32, device=dev) for k in names}
        if flags:
            bufs['flags'] = torch.empty(rows, vmax, dtype=torch.bool, device=dev)
        if grad_dtype != torch.float32:  # the gradient in the matmul dtype, reused across chunks
            bufs['half'] = torch.empty(rows, plan.vocab, dtype=grad_dtype, device=dev)
        return _Scratch(**bufs)

    def rows(self, c: int) -> '_Scratch':
        """The first ``c`` rows of every buffer (the last chunk may be shorter)."""
        return _Scratch(**{k: None if v is None else v[:c] for k, v in vars(self).items()})

    def divergence_rows(self) -> RowBuffers:
        return RowBuffers(s=self.logits, t=self.teacher, p_s=self.p_s, p_t=self.p_t, flags=self.flags,
                          extra=self.div_extra)


class _Sums(NamedTuple):
    """One chunk's detached sums; d loss / d student logits is ``grad_scale * scratch.logits``."""
    divergence_sum: torch.Tensor
    label_sum: torch.Tensor
    top1_agree: torch.Tensor
    grad_scale: float
    entropy_sum: torch.Tensor
    teacher_entropy_sum: torch.Tensor  # a full teacher head's (0 on the top-k path: see fused_linear_jsd)
    gated_rows: Optional[torch.Tensor] = None  # with the entropy and the entropy-aware mix: rows past its gate


def _student_row_is_own(plan: Plan, full: bool) -> bool:
    # The full path's s / p_s are the student's own tempered distribution unless padded to a larger teacher head.
    return full and plan.teacher_weight.shape[0] <= plan.vocab


def _separate_label(plan: Plan, full: bool) -> bool:
    """Whether the label term needs its own ``log_softmax`` pass (in the scratch ``e``).

    The full path reuses the student's ``s = log_softmax(z / T)`` when the label temperature is ``T`` and the row is
    unpadded; the top-k path folds the untempered (``label_temperature == 1``) term into its own passes.
    """
    if full:
        return plan.label_temperature != plan.temperature or not _student_row_is_own(plan, full)
    return plan.label_temperature != 1


def _entropy_into(e: torch.Tensor, u: torch.Tensor, scale: float) -> torch.Tensor:
    """Summed entropy of ``softmax(u * scale)`` over the rows (:func:`~swift_gkd_plugin.core.entropy.entropy_terms_`);
    ``e`` (same shape) is scratch."""
    return _row_entropies_into(e, u, scale).sum()


def _row_entropies_into(e: torch.Tensor, u: torch.Tensor, scale: float) -> torch.Tensor:
    """:func:`_entropy_into` per row ``[C]``."""
    return entropy_terms_(torch.mul(u, scale, out=e))


def _separate_label_term(e: torch.Tensor, u: torch.Tensor, scale: float, lab, ce_weight):
    """``sum ce_weight * CE`` of ``softmax(u * scale)`` against ``lab``; leaves that softmax in ``e``."""
    torch.mul(u, scale, out=e)
    torch.log_softmax(e, -1, out=e)
    ce = -(e.gather(1, lab).squeeze(1) * ce_weight).sum()
    return ce, e.exp_()


def _add_label_grad(g: torch.Tensor, probs: torch.Tensor, lab, w) -> None:
    """``g += w (probs - onehot(lab))`` row by row: the label term's gradient (``w`` holds its scale and ``1 / T``)."""
    g.addcmul_(probs, w.unsqueeze(1))
    g.scatter_add_(1, lab, -w.unsqueeze(1))


def _logits_into(out, hidden, weight, bias_f, scale: float):
    """``out <- (hidden @ weight.T + bias) * scale`` in float32 (``out`` may be a column slice)."""
    if weight.dtype == torch.float32:
        if bias_f is None:
            torch.addmm(out, hidden, weight.t(), beta=0, alpha=scale, out=out)
        else:
            torch.addmm(bias_f * scale if scale != 1 else bias_f, hidden, weight.t(), alpha=scale, out=out)
    else:  # half matmul, upcast and bias in one pass
        prod = hidden @ weight.t()
        if bias_f is None:
            torch.mul(prod, scale, out=out)
        else:
            torch.add(bias_f * scale, prod, alpha=scale, out=out)


def _full_chunk(buf: '_Scratch', h, weight, bias_f, plan: Plan, sl, sft: bool) -> _Sums:
    """One chunk against a teacher head. Leaves the gradient w.r.t. the student logits in ``buf.logits``."""
    a, b = buf.logits, buf.teacher
    vocab, vt = plan.vocab, plan.teacher_weight.shape[0]
    inv_t = 1.0 / plan.temperature
    _logits_into(a[:, :vocab], h, weight, bias_f, inv_t)
    with torch.no_grad():
        _logits_into(b[:, :vt], plan.teacher_hidden[sl].to(plan.teacher_weight.dtype), plan.teacher_weight,
                     plan.teacher_bias, inv_t)
    # the teacher's argmax is a student argmax when the student's logit there is maximal (no second argmax pass)
    t_arg = b[:, :vt].argmax(-1, keepdim=True)
    s_at = a[:, :vocab].gather(1, t_arg.clamp(max=vocab - 1))
    agree = ((t_arg < vocab) & (s_at >= a[:, :vocab].amax(-1, keepdim=True))).sum()
    # the teacher's own tempered distribution, before any padding, on p_t (free until then); a pass of its own: after
    # log_softmax_into no [C, Vt] row is free, and a row dot product (bmm) loses digits at a large vocabulary
    t_ent, gated = agree.new_zeros((), dtype=a.dtype), None
    if plan.entropy:
        t_rows = _row_entropies_into(buf.p_t[:, :vt], b[:, :vt], 1.0)
        t_ent, gated = t_rows.sum(), gated_row_count(t_rows, plan.divergence)
    if vt > vocab:  # align: the student's missing entries take the teacher's logits, so they cancel
        a[:, vocab:].copy_(b[:, vocab:])
    elif vocab > vt:
        b[:, vt:].copy_(a[:, vt:])

    lab, ce_weight, w = label_rows(plan, sl) if sft else (None, None, None)
    ent, ce, p1 = _full_prepass(buf, plan, lab, ce_weight)

    log_softmax_into(a, buf.p_s)  # s, p_s
    if plan.entropy and _student_row_is_own(plan, True):  # p_t is still free: per-entry terms, cascade-summed
        ent = torch.mul(buf.p_s, a, out=buf.p_t).sum().neg()
    log_softmax_into(b, buf.p_t)  # t, p_t
    if sft and p1 is None:
        ce = -(a.gather(1, lab).squeeze(1) * ce_weight).sum()
    # leaves dD/du / sign in a (u = z / T: dD/dz = dD/du / T)
    div, sign = divergence_rows(buf.divergence_rows(), plan.divergence)
    grad_scale = plan.div_scale * sign * inv_t

    if not sft:
        return _Sums(div.sum(), ce, agree, grad_scale, ent, t_ent, gated)
    a.mul_(grad_scale)
    _add_label_grad(a[:, :vocab], (buf.p_s if p1 is None else p1)[:, :vocab], lab, w)
    return _Sums(div.sum(), ce, agree, 1.0, ent, t_ent, gated)


def _full_prepass(buf: '_Scratch', plan: Plan, lab, ce_weight):
    """The entropy and label term that the row's shared ``s = log_softmax(z / T)`` cannot give, before it is formed
    (``buf.logits`` holds ``z / T`` and ``buf.p_s`` is still free): on a row padded to a larger teacher vocabulary, or
    at a label temperature other than ``T``. Returns ``(entropy sum, cross-entropy sum, label probabilities or
    None)``; what is left to the shared pass comes back as zero / ``None``.
    """
    u = buf.logits[:, :plan.vocab]
    ent, ce, p1 = u.new_zeros(()), u.new_zeros(()), None
    sft = lab is not None
    if plan.entropy and not _student_row_is_own(plan, True):
        e, p_own = buf.extra[:, :plan.vocab], buf.p_s[:, :plan.vocab]
        log_softmax_into(e.copy_(u), p_own)
        shared = sft and plan.label_temperature == plan.temperature  # the label term shares that pass
        if shared:
            ce = -(e.gather(1, lab).squeeze(1) * ce_weight).sum()
        ent = e.mul_(p_own).sum().neg()  # per-entry terms, cascade-summed
        if shared:
            p1 = e.copy_(p_own)
    if sft and p1 is None and _separate_label(plan, True):
        ce, p1 = _separate_label_term(buf.extra[:, :plan.vocab], u, plan.temperature / plan.label_temperature, lab,
                                      ce_weight)
    return ent, ce, p1


def _topk_chunk(buf: '_Scratch', h, weight, bias_f, plan: Plan, sl, sft: bool) -> _Sums:
    """One chunk against a top-k teacher; same contract as :func:`_full_chunk`."""
    a = buf.logits[:, :plan.vocab]
    _logits_into(a, h, weight, bias_f, 1.0)  # untempered: the temperature applies on the bucket support
    lp = plan.topk_logprobs[sl]
    valid = lp > float('-inf')
    top1 = plan.topk_ids[sl].gather(1, lp.argmax(-1, keepdim=True))  # a valid slot: rows are covered
    ids = torch.where(valid, plan.topk_ids[sl], top1)  # unused slots point at a harmless, valid id
    mx = a.amax(-1, keepdim=True)
    agree = (a.gather(1, top1) >= mx).sum()
    y = a.gather(1, ids).masked_fill_(~valid, float('-inf'))  # student bucket logits on the top-k
    ent = _entropy_into(buf.extra, a, 1.0 / plan.temperature) if plan.entropy else a.new_zeros(())
    ce, p1 = a.new_zeros(()), None
    if sft:
        lab, ce_weight, w = label_rows(plan, sl)
        if _separate_label(plan, False):
            ce, p1 = _separate_label_term(buf.extra, a, 1.0 / plan.label_temperature, lab, ce_weight)
        else:
            z_lab = a.gather(1, lab).squeeze(1)
    fold = sft and p1 is None  # the untempered label term rides on the passes below

    if not plan.tail:
        div, dy = bucket_divergence(y, lp, plan.divergence, plan.temperature)
        if fold:
            a.sub_(mx).exp_()
            total = a.sum(-1, keepdim=True)
            ce = -((z_lab - (mx + total.log()).squeeze(1)) * ce_weight).sum()
            a.mul_(w.unsqueeze(1) / total)  # w softmax(z)
        else:
            a.zero_()
        a.scatter_add_(1, ids, dy * plan.div_scale)
    else:
        # student tail logit: logsumexp over the complement of the top-k, shifted by the complement's own max so
        # that it cannot underflow however peaked the student is
        a.scatter_(1, ids, float('-inf'))  # duplicates from unused slots write -inf too: deterministic
        mx_tail = a.amax(-1, keepdim=True).clamp_min(_NEG_LOGIT)  # clamp: an empty complement is all -inf
        a.sub_(mx_tail).exp_()
        tail_sum = a.sum(-1)
        y_tail64 = mx_tail.squeeze(1).double() + tail_sum.double().log()  # float64: mx_tail may be ~1e4
        y_tail = y_tail64.float()
        t_tail = teacher_tail_logmass(lp, valid.sum(-1), plan.vocab)
        div, dy = bucket_divergence(torch.cat([y.double(), y_tail64.unsqueeze(1)], 1),
                                    torch.cat([lp, t_tail.unsqueeze(1)], 1), plan.divergence, plan.temperature)
        div, dy = div.float(), dy.float()
        # d y_tail / d z_v = exp(z_v - y_tail) = a_v / tail_sum on the complement (a is 0 on the top-k)
        coef = torch.where(tail_sum > 0, dy[:, -1] / tail_sum, 0.0) * plan.div_scale
        k_grad = dy[:, :-1] * plan.div_scale
        if fold:  # softmax(z) = a * exp(mx_tail - lse) on the complement, exp(y - lse) on the top-k
            lse = torch.logaddexp(y_tail, torch.logsumexp(y, -1))
            ce = -((z_lab - lse) * ce_weight).sum()
            coef = coef + w * torch.exp(mx_tail.squeeze(1) - lse)
            k_grad = k_grad + torch.exp(y - lse.unsqueeze(1)) * w.unsqueeze(1)
        a.mul_(coef.unsqueeze(1))
        a.scatter_add_(1, ids, k_grad.masked_fill_(~valid, 0.0))
    if fold:
        a.scatter_add_(1, lab, -w.unsqueeze(1))
    elif p1 is not None:
        _add_label_grad(a, p1, lab, w)
    return _Sums(div.sum(), ce, agree, 1.0, ent, ent.new_zeros(()))
