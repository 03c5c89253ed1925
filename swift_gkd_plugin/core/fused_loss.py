"""Fused ``lm_head`` + divergence distillation loss, computed chunk by chunk on hidden states.

:func:`fused_linear_jsd` never materialises the ``[N, V]`` logits. For each chunk of active tokens it forms the
student logits (one matmul), the teacher logits (one matmul, no grad) or uses the teacher's top-k, computes the
divergence and its closed-form gradient with respect to the student logits, and immediately turns that gradient
into the chunk's ``grad_hidden`` and accumulates ``grad_weight`` / ``grad_bias``. The extra memory is
``O(chunk x V)`` float32 scratch (reused across chunks) plus the ``[V, H]`` weight gradient every method needs;
the work is the four matmuls of a plain ``lm_head`` forward/backward plus a fixed number of elementwise passes.

The divergence of each row (the generalized JSD of ``beta`` or any registered one) and its closed-form gradient
with respect to the student logits come from :func:`~swift_gkd_plugin.core.row_divergence.divergence_rows`, as in
every other loss path; the forms and their derivations are in ``docs_en/fused_loss.md`` (Divergences). Masked
vocabulary entries (``-inf`` in a bias) become a finite ``-1e30`` first, so probabilities there are exactly 0 and the
value and gradient never hold NaN or Inf (a true infinite KL comes out as a huge finite number).

Top-k teachers and the optional tail bucket are defined in :mod:`swift_gkd_plugin.core.topk`.

Beside the divergence, the same chunk pass optionally computes:

* a label term ``sum_i w_i CE_i`` with ``CE_i = -log_softmax(z_i / T_l)[y_i]`` over the student's own vocabulary:
  the SFT cross-entropy (``w = 1``, ``T_l = 1``) or, on on-policy steps, the policy-gradient term (``y`` the sampled
  tokens, ``w`` their advantages, of any sign, ``T_l`` the sampling temperature); its gradient is
  ``w_i (softmax(z_i / T_l) - onehot(y_i)) / T_l``;
* the entropy of the student's tempered distribution ``softmax(z / T)`` (a detached statistic).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, NamedTuple, Optional, Tuple, Union

import torch

from .constants import IGNORE_INDEX
from .constants import NEG_LOGIT as _NEG_LOGIT
from .kernels import entry_function, resolve_backend
from .row_divergence import Divergence, RowBuffers, as_divergence, divergence_rows, kernel_form, log_softmax_into
from .teacher_signal import TeacherHead, TeacherTopK
from .topk import bucket_divergence, teacher_tail_logmass

__all__ = ['fused_linear_jsd', 'default_chunk_size']

_SCRATCH_BYTES = 2**30  # float32 scratch targeted by the automatic chunk size
_KERNEL_LOGIT_BYTES = 2**30  # the Triton path's logit buffers (matmul dtype), see kernel_chunk_size
_MAX_CHUNK = 1024

Number = Union[float, int, torch.Tensor]


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


def fused_linear_jsd(student_hidden: torch.Tensor,
                     student_weight: torch.Tensor,
                     student_bias: Optional[torch.Tensor] = None,
                     *,
                     teacher: Union[TeacherHead, TeacherTopK, None] = None,
                     mask: Optional[torch.Tensor] = None,
                     labels: Optional[torch.Tensor] = None,
                     beta: float = 0.5,
                     temperature: float = 1.0,
                     sft_alpha: float = 0.0,
                     topk_tail: bool = False,
                     chunk_size: Optional[int] = None,
                     normalizer: Optional[Number] = None,
                     sft_normalizer: Optional[Number] = None,
                     label_weights: Optional[torch.Tensor] = None,
                     label_temperature: float = 1.0,
                     return_entropy: bool = False,
                     divergence: Optional[Divergence] = None,
                     backend: Optional[str] = None) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    r"""Distillation loss of a linear head (the generalized JSD or any registered divergence), fused and chunked
    over tokens: the ``[N, V]`` logits are never held (why: they dominate the memory of a dense loss).

    The teacher gets no gradient. Leading dimensions of the hidden states (e.g. ``[B, S, H]``) are flattened to
    ``N`` tokens; ``mask``, ``labels`` and the teacher's tensors follow the same layout.

    Args:
        student_hidden: ``[N, Hs]`` hidden states feeding the student's ``lm_head``.
        student_weight: ``[V, Hs]`` student ``lm_head`` weight.
        student_bias: optional ``[V]`` bias; ``-inf`` entries mask vocabulary entries.
        teacher: a :class:`~swift_gkd_plugin.core.teacher_signal.TeacherHead` (hidden states ``[N, Ht]``, ``Ht``
            may differ from ``Hs``, and a ``[Vt, Ht]`` head with its head resolved: if ``Vt != V`` the smaller side is
            padded with the other side's logits, ms-swift's rule, so the extra entries appear identically in both
            distributions) or a :class:`~swift_gkd_plugin.core.teacher_signal.TeacherTopK` (ids ``< V``,
            ``[N, k]``; rows with no finite log-probability are treated as inactive).
        mask: ``[N]`` bool, the tokens that take part (default: all).
        labels: ``[N]`` token ids of the label term (next tokens for SFT, sampled tokens for the policy
            gradient), ``-100`` to ignore; required when ``sft_alpha > 0``.
        beta: interpolation in ``[0, 1]``: 0 is ``KL(teacher || student)``, 1 is ``KL(student || teacher)``.
        temperature: ``T > 0``, applied to both distributions (not to the label term).
        sft_alpha: ``>= 0``, weight of the label term: the cross-entropy of ``z / label_temperature`` against
            ``labels``, weighted by ``label_weights``, over the active tokens whose label is not ``-100``.
        topk_tail: with a top-k teacher, add the bucket of the remaining mass on both sides
            (see :mod:`swift_gkd_plugin.core.topk`).
        chunk_size: tokens per chunk; default :func:`default_chunk_size` (about 1 GiB of float32 scratch).
        normalizer: divides the summed divergence (float or 0-dim tensor, read once on the host); default: the
            number of active tokens. A zero normalizer (e.g. no active token) gives a zero loss and zero gradients.
        sft_normalizer: divides the summed cross-entropy; default: the number of active tokens with a label.
        label_weights: ``[N]`` finite per-token weights of the label term (same layout as ``labels``), of any sign
            (the advantages of sampled tokens); default 1.
        label_temperature: ``T_l > 0`` (finite), the label term's temperature: its cross-entropy is that of
            ``log_softmax(z / T_l)`` (the sampling temperature for the policy gradient; 1 for SFT).
        return_entropy: also return ``stats['entropy_sum']``.
        divergence: a :class:`~swift_gkd_plugin.core.row_divergence.Divergence` other than the generalized JSD of
            ``beta`` (e.g. ``skew_kl``); ``beta`` is then unused.

    Returns:
        ``(loss, stats)``. ``loss`` is a float32 scalar,
        ``sum_active D / normalizer + sft_alpha * sum_labelled w CE / sft_normalizer`` with
        ``CE = -log_softmax(z / T_l)[label]`` over the student's vocabulary, whose gradient with respect to ``z``
        is ``sft_alpha * w * (softmax(z / T_l) - onehot(label)) / T_l / sft_normalizer``; its gradients flow to
        ``student_hidden``, ``student_weight`` and ``student_bias`` in their own dtypes. ``stats`` holds detached
        per-call sums: ``num_tokens`` (active tokens), ``divergence_sum``, ``top1_agree`` (active tokens where the
        teacher's argmax, for a top-k teacher the top-1 id of its top-k, is also an argmax of the student logits;
        ties count as agreement), ``num_sft_tokens`` and ``sft_sum`` (the weighted sum ``sum w CE``, not scaled by
        ``sft_alpha``), and with ``return_entropy`` ``entropy_sum``: the summed entropy of ``softmax(z / T)``, the
        student's tempered distribution, over the active tokens (float32).

    Shapes may be in any float dtype; all reductions accumulate in float32. The matmuls run in the weights' dtype
    and are upcast chunk by chunk; ``grad_weight`` is accumulated in float32.
    """
    divergence = as_divergence(beta if divergence is None else divergence)
    if not 0 < temperature < float('inf'):  # NaN too; at T = inf both distributions are uniform
        raise ValueError(f'temperature must be a finite number > 0, got {temperature}')
    full = isinstance(teacher, TeacherHead)
    if not full and not isinstance(teacher, TeacherTopK):
        raise ValueError(f'teacher must be a TeacherHead or a TeacherTopK, got {type(teacher).__name__}')
    if full and teacher.uses_student_head:
        raise ValueError('TeacherHead without a weight: resolve the student\'s head first (TeacherHead.with_head)')
    if not sft_alpha >= 0:  # NaN too; the trainers treat 0 as "no SFT term" and never pass a negative weight
        raise ValueError(f'sft_alpha must be >= 0, got {sft_alpha}')
    if sft_alpha > 0 and labels is None:
        raise ValueError('sft_alpha > 0 needs labels')
    _check_label_weights(labels, label_weights, label_temperature)

    hidden = student_hidden.reshape(-1, student_hidden.shape[-1])
    n_all, vocab, dev = hidden.shape[0], student_weight.shape[0], hidden.device
    plan = _Plan(divergence=divergence, temperature=float(temperature), tail=bool(topk_tail), vocab=vocab,
                 label_temperature=float(label_temperature), entropy=bool(return_entropy),
                 backend=resolve_backend(backend, dev))
    if full:
        plan.teacher_weight = teacher.weight
        plan.teacher_bias = None if teacher.bias is None else _finite_bias(teacher.bias)
    else:
        logprobs = _token_rows(teacher.logprobs, n_all).float()
    # Host syncs: none for a full teacher without a mask. Selecting the active rows (a mask, or top-k rows with no
    # teacher information) sizes a tensor: one read, which also carries the top-k ids' range check.
    if full and mask is None:
        idx, everyone = None, True
    else:
        active = torch.ones(n_all, dtype=torch.bool, device=dev) if mask is None else mask.reshape(-1).bool()
        outside = torch.zeros((), dtype=torch.long, device=dev)
        if not full:
            valid = logprobs > float('-inf')
            active = active & valid.any(-1)  # no teacher information: nothing to distil
            ids_all = _token_rows(teacher.ids, n_all)
            outside = ((valid & ((ids_all < 0) | (ids_all >= vocab))).any(-1) & active).sum()
        n_active, n_outside = torch.stack([active.sum(), outside]).tolist()  # the one read
        if n_outside:
            raise ValueError(f'teacher top-k ids must lie in [0, {vocab}) (the student vocabulary)')
        idx = torch.nonzero_static(active, size=n_active).squeeze(1)
        everyone = n_active == n_all  # then skip the gathers (and their scatter in backward)

    def rows(t):
        t = _token_rows(t, n_all)
        return t if everyone else t.index_select(0, idx)

    if full:
        plan.teacher_hidden = rows(teacher.hidden)
    else:
        plan.topk_ids = rows(teacher.ids).long()  # in range: checked with the selection's read
        plan.topk_logprobs = rows(logprobs)
    num_tokens = n_all if idx is None else idx.numel()
    if sft_alpha:
        plan.labels = rows(labels).reshape(-1).long()
        if label_weights is not None:
            plan.label_weights = rows(label_weights).reshape(-1).float()
        num_sft = (plan.labels != IGNORE_INDEX).sum()  # read only as the default normaliser
        plan.sft_scale = _inverse(sft_normalizer if sft_normalizer is not None else num_sft) * float(sft_alpha)
    else:
        num_sft = torch.zeros((), dtype=torch.long, device=dev)
    plan.div_scale = _inverse(normalizer if normalizer is not None else num_tokens)
    plan.chunk_size = int(chunk_size) if chunk_size else None
    plan.grad_enabled = torch.is_grad_enabled()

    loss = _FusedLinearJSD.apply(rows(hidden), student_weight, student_bias, plan)
    stats = {k: v.detach() for k, v in plan.stats.items()}
    stats['num_tokens'] = torch.full((), num_tokens, dtype=torch.long, device=dev)  # filled on the device: no copy
    stats['num_sft_tokens'] = num_sft
    return loss, stats


@dataclass
class _Plan:
    """Everything the autograd function needs besides its differentiable inputs; ``stats`` is filled in."""
    divergence: Divergence
    temperature: float
    tail: bool
    vocab: int
    teacher_hidden: Optional[torch.Tensor] = None
    teacher_weight: Optional[torch.Tensor] = None
    teacher_bias: Optional[torch.Tensor] = None
    topk_ids: Optional[torch.Tensor] = None
    topk_logprobs: Optional[torch.Tensor] = None
    labels: Optional[torch.Tensor] = None
    label_weights: Optional[torch.Tensor] = None
    label_temperature: float = 1.0
    entropy: bool = False
    div_scale: float = 0.0
    sft_scale: float = 0.0
    chunk_size: Optional[int] = None
    grad_enabled: bool = True
    backend: str = 'torch'
    stats: Dict[str, torch.Tensor] = field(default_factory=dict)


def _check_label_weights(labels, label_weights, label_temperature) -> None:
    if not 0 < label_temperature < float('inf'):  # NaN too
        raise ValueError(f'label_temperature must be a finite number > 0, got {label_temperature}')
    if label_weights is None:
        return
    if labels is None:
        raise ValueError('label_weights needs labels (one weight per label)')
    if label_weights.shape != labels.shape:
        raise ValueError(f'label_weights {tuple(label_weights.shape)} must have the shape of labels '
                         f'{tuple(labels.shape)}')
    if not bool(torch.isfinite(label_weights).all()):
        raise ValueError('label_weights must be finite (got NaN or inf)')


def _token_rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """``t`` as ``[n, width]``, its leading (token) dimensions flattened.

    With no token at all (a batch without response tokens) ``reshape(0, -1)`` is ambiguous and raises, so the width
    is then read from the last dimension.
    """
    if n:
        return t.reshape(n, -1)
    return t.reshape(0, t.shape[-1] if t.dim() > 1 else 1)


def _inverse(x: Number) -> float:
    x = float(x)
    return 0.0 if x == 0 else 1.0 / x


def _finite_bias(bias: torch.Tensor) -> torch.Tensor:
    # float32 so that the -1e30 stand-in survives fp16, where it would overflow back to -inf
    return bias.detach().float().clamp_min(_NEG_LOGIT)


class _FusedLinearJSD(torch.autograd.Function):
    """Forward computes the loss and all gradients; backward only rescales them by the incoming gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, plan):
        need = [plan.grad_enabled and bool(n) for n in ctx.needs_input_grad[:3]]
        loss, grads = _run(hidden, weight, bias, plan, *need)
        ctx.save_for_backward(*grads)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        # Always scaled, in place: testing ``grad_loss != 1`` would read it on the host (a sync per micro-batch), and
        # the saved gradients serve this one backward (a second one, with retain_graph, raises: they were modified).
        grads = [None if g is None else g.mul_(grad_loss.to(g.dtype)) for g in ctx.saved_tensors]
        return grads[0], grads[1], grads[2], None


def _run(hidden, weight, bias, plan: _Plan, need_h: bool, need_w: bool, need_b: bool):
    """The chunk loop. Returns ``(loss, (grad_hidden, grad_weight, grad_bias))``, unneeded grads ``None``."""
    n, dev, f32 = hidden.shape[0], hidden.device, torch.float32
    vocab = weight.shape[0]
    full = plan.teacher_weight is not None
    vmax = max(vocab, plan.teacher_weight.shape[0]) if full else vocab
    want_grad = need_h or need_w or need_b
    sft = plan.labels is not None and plan.sft_scale != 0

    grad_h = torch.empty(n, hidden.shape[1], dtype=f32, device=dev) if need_h else None
    grad_w = torch.empty(weight.shape, dtype=f32, device=dev) if need_w else None  # first chunk overwrites
    grad_b = torch.zeros(vocab, dtype=f32, device=dev) if need_b else None
    div_sum = torch.zeros((), dtype=f32, device=dev)
    sft_sum = torch.zeros((), dtype=f32, device=dev)
    entropy_sum = torch.zeros((), dtype=f32, device=dev)
    agree = torch.zeros((), dtype=torch.long, device=dev)

    if n and full and plan.backend == 'triton':
        div_sum, sft_sum, agree, entropy_sum = _run_kernel(hidden, weight, bias, plan, sft, want_grad,
                                                           grad_h, grad_w, grad_b)
    elif n:
        scratch = _Scratch.allocate(plan, full, sft, n, vmax, weight.dtype if want_grad else f32, dev)
        rows = scratch.logits.shape[0]
        bias_f = None if bias is None else _finite_bias(bias)
        chunk = _full_chunk if full else _topk_chunk
        for start in range(0, n, rows):
            sl = slice(start, min(start + rows, n))
            h = hidden[sl].to(weight.dtype)
            view = scratch.rows(h.shape[0])
            res = chunk(view, h, weight, bias_f, plan, sl, sft)
            div_sum += res.divergence_sum
            sft_sum += res.label_sum
            agree += res.top1_agree
            entropy_sum += res.entropy_sum
            if want_grad:
                _backprop_chunk(view, h, weight, res.grad_scale, sl, grad_h, grad_w, grad_b, first=start == 0,
                                grad_in_half=res.grad_in_half)
        del scratch, view
    elif grad_w is not None:
        grad_w.zero_()

    plan.stats.update(divergence_sum=div_sum, sft_sum=sft_sum, top1_agree=agree)
    if plan.entropy:
        plan.stats['entropy_sum'] = entropy_sum
    loss = div_sum * plan.div_scale + sft_sum * plan.sft_scale
    grads = (None if grad_h is None else grad_h.to(hidden.dtype),
             None if grad_w is None else grad_w.to(weight.dtype),
             None if grad_b is None else grad_b.to(bias.dtype))
    return loss, grads


@dataclass
class _Scratch:
    """The ``[chunk, V]`` rows reused by every chunk (float32 unless said otherwise).

    ``logits``: the student's logits, then its log-probabilities, then d loss / d logits (what
    :func:`_backprop_chunk` reads). Full teacher only: ``teacher`` (its logits, then log-probabilities), ``p_s`` and
    ``p_t`` (the probabilities), for the KL forms ``flags`` (bool) and for the skew forms ``div_extra``.
    ``extra``: the label term's and the entropy's own pass where they cannot share the divergence's rows. ``half``:
    the gradient in a half-precision matmul dtype.
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
    def allocate(plan: '_Plan', full: bool, sft: bool, n: int, vmax: int, grad_dtype, dev) -> '_Scratch':
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


class _ChunkResult(NamedTuple):
    """One chunk's detached sums; d loss / d student logits is ``grad_scale * scratch.logits``."""
    divergence_sum: torch.Tensor
    label_sum: torch.Tensor  # the weighted cross-entropy sum of the label term
    top1_agree: torch.Tensor
    grad_scale: float
    entropy_sum: torch.Tensor
    grad_in_half: bool = False  # the gradient is in ``scratch.half`` (a kernel wrote it in the matmul dtype)


def _student_row_is_own(plan: _Plan, full: bool) -> bool:
    # The full path's s / p_s are the student's own tempered distribution unless padded to a larger teacher head.
    return full and plan.teacher_weight.shape[0] <= plan.vocab


def _separate_label(plan: _Plan, full: bool) -> bool:
    """Whether the label term needs its own ``log_softmax`` pass (in the scratch ``e``).

    The full path reuses the student's ``s = log_softmax(z / T)`` when the label temperature is ``T`` and the row is
    unpadded; the top-k path folds the untempered (``label_temperature == 1``) term into its own passes.
    """
    if full:
        return plan.label_temperature != plan.temperature or not _student_row_is_own(plan, full)
    return plan.label_temperature != 1


def _entropy_into(e: torch.Tensor, u: torch.Tensor, scale: float) -> torch.Tensor:
    """Summed entropy of ``softmax(u * scale)`` over the rows; ``e`` (same shape) is scratch.

    Summed as per-entry ``-p log p >= 0`` terms (no cancellation, unlike ``logsumexp - E_p[u]``).
    """
    torch.mul(u, scale, out=e)
    e.sub_(e.amax(-1, keepdim=True)).exp_()
    e.div_(e.sum(-1, keepdim=True))
    torch.special.entr(e, out=e)
    return e.sum()


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


def _label_rows(plan: _Plan, sl):
    """``[C, 1]`` labels (ignored ones replaced by 0), ``[C]`` cross-entropy weights (0 where ignored) and
    ``[C]`` gradient weights (the cross-entropy weights times the term's scale and ``1 / label_temperature``)."""
    lab = plan.labels[sl]
    keep = lab != IGNORE_INDEX
    ce_weight = keep.float() if plan.label_weights is None else torch.where(keep, plan.label_weights[sl], 0.0)
    w = ce_weight * (plan.sft_scale / plan.label_temperature)
    return torch.where(keep, lab, 0).unsqueeze(1), ce_weight, w


def _full_chunk(buf: _Scratch, h, weight, bias_f, plan: _Plan, sl, sft: bool) -> _ChunkResult:
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
    if vt > vocab:  # align: the student's missing entries take the teacher's logits, so they cancel
        a[:, vocab:].copy_(b[:, vocab:])
    elif vocab > vt:
        b[:, vt:].copy_(a[:, vt:])

    lab, ce_weight, w = _label_rows(plan, sl) if sft else (None, None, None)
    ent, ce, p1 = _full_prepass(buf, plan, lab, ce_weight)

    log_softmax_into(a, buf.p_s)  # s, p_s
    if plan.entropy and _student_row_is_own(plan, True):  # p_t is still free: per-entry terms, cascade-summed
        ent = torch.mul(buf.p_s, a, out=buf.p_t).sum().neg()
    log_softmax_into(b, buf.p_t)  # t, p_t
    if sft and p1 is None:
        ce = -(a.gather(1, lab).squeeze(1) * ce_weight).sum()
    # leaves sign * dD/du in a (u = z / T: dD/dz = dD/du / T)
    div, sign = divergence_rows(buf.divergence_rows(), plan.divergence)
    grad_scale = plan.div_scale * sign * inv_t

    if not sft:
        return _ChunkResult(div.sum(), ce, agree, grad_scale, ent)
    a.mul_(grad_scale)
    _add_label_grad(a[:, :vocab], (buf.p_s if p1 is None else p1)[:, :vocab], lab, w)
    return _ChunkResult(div.sum(), ce, agree, 1.0, ent)


def _full_prepass(buf: _Scratch, plan: _Plan, lab, ce_weight):
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


def _topk_chunk(buf: _Scratch, h, weight, bias_f, plan: _Plan, sl, sft: bool) -> _ChunkResult:
    """One chunk against a top-k teacher; same contract as :func:`_full_chunk`."""
    a = buf.logits[:, :plan.vocab]
    _logits_into(a, h, weight, bias_f, 1.0)  # untempered: the temperature applies on the bucket support
    lp = plan.topk_logprobs[sl]
    valid = lp > float('-inf')
    top1 = plan.topk_ids[sl].gather(1, lp.argmax(-1, keepdim=True))  # a valid slot: rows are covered
    ids = torch.where(valid, plan.topk_ids[sl], top1)  # unused slots point at a harmless, valid id
    if plan.backend == 'triton':
        return _topk_chunk_kernel(buf, a, ids, valid, lp, plan, sl, sft)
    mx = a.amax(-1, keepdim=True)
    agree = (a.gather(1, top1) >= mx).sum()
    y = a.gather(1, ids).masked_fill_(~valid, float('-inf'))  # student bucket logits on the top-k
    ent = _entropy_into(buf.extra, a, 1.0 / plan.temperature) if plan.entropy else a.new_zeros(())
    ce, p1 = a.new_zeros(()), None
    if sft:
        lab, ce_weight, w = _label_rows(plan, sl)
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
    return _ChunkResult(div.sum(), ce, agree, 1.0, ent)


# ---- Triton kernels for the top-k chunk (core/kernels/topk_rows.py) --------------------------------------------


def _topk_chunk_kernel(buf: _Scratch, a, ids, valid, lp, plan: _Plan, sl, sft: bool) -> _ChunkResult:
    """:func:`_topk_chunk` on the kernels: ``a`` holds the chunk's logits; the gradient goes to ``buf.half`` (the
    matmul dtype) when there is one, else over ``a``."""
    from .kernels.topk_rows import topk_rows
    lab, ce_weight, w = _label_rows(plan, sl) if sft else (None, None, None)
    half = buf.half is not None
    res = topk_rows(a, ids, valid, lp, divergence=plan.divergence, temperature=plan.temperature, tail=plan.tail,
                    vocab=plan.vocab, scale=plan.div_scale, grad=buf.half[:a.shape[0]] if half else a,
                    labels=None if lab is None else lab.squeeze(1), ce_weight=ce_weight, label_weight=w,
                    label_temperature=plan.label_temperature, entropy=plan.entropy)
    return _ChunkResult(res.divergence, res.label, res.agree, 1.0, res.entropy, grad_in_half=half)


def _backprop_chunk(buf: _Scratch, h, weight, alpha: float, sl, grad_h, grad_w, grad_b, first: bool,
                    grad_in_half: bool = False):
    """Turn ``alpha * buf.logits`` (d loss / d student logits of the chunk; ``buf.half`` with ``grad_in_half``) into
    hidden, weight and bias grads."""
    g = buf.logits[:, :weight.shape[0]]
    if grad_in_half:
        g = buf.half[:g.shape[0]]
    if grad_b is not None:
        grad_b.add_(g.sum(0, dtype=torch.float32), alpha=alpha)
    if weight.dtype != torch.float32 and not grad_in_half:
        g = buf.half[:g.shape[0]].copy_(g)
    _backprop_matmuls(g, h, weight, alpha, sl, grad_h, grad_w, first)


def _backprop_matmuls(g, h, weight, alpha: float, sl, grad_h, grad_w, first: bool):
    """``grad_h[sl] = alpha g @ weight``, ``grad_w (+)= alpha g.T @ h`` (``g`` in the matmul dtype).

    The first chunk overwrites ``grad_w`` (allocated uninitialised: no separate zero-fill pass over ``[V, H]``).
    """
    if weight.dtype == torch.float32:
        if grad_h is not None:
            torch.addmm(grad_h[sl], g, weight, beta=0, alpha=alpha, out=grad_h[sl])
        if grad_w is not None:
            torch.addmm(grad_w, g.t(), h, beta=0 if first else 1, alpha=alpha, out=grad_w)
        return
    if grad_h is not None:
        torch.mul(g @ weight, alpha, out=grad_h[sl])
    if grad_w is not None:  # rounded once per chunk, accumulated in float32
        if first:
            torch.mul(g.t() @ h, alpha, out=grad_w)
        else:
            grad_w.add_(g.t() @ h, alpha=alpha)


def kernel_chunk_size(vocab: int, teacher_vocab: int, itemsize: int) -> int:
    """Rows per chunk of the Triton path: the two logit buffers ``[chunk, V]`` + ``[chunk, Vt]`` in the matmul
    dtype (the gradient is written over the student's) take about :data:`_KERNEL_LOGIT_BYTES`, in [256, 4096] rows,
    a multiple of 256.

    Why: on a GPU the per-chunk fixed cost is the read-modify-write of the float32 ``[V, H]`` weight gradient
    (0.5 GB at V = 151,936, H = 896: ~0.35 ms at 3 TB/s) and the matmuls' efficiency, which both favour large
    chunks (the PyTorch path's sweep on an H100 at 8k tokens: 416 rows 170 ms, 1,024 rows 157 ms, 4,096 rows
    152 ms); the kernel's own cost does not depend on the chunk. 1 GiB of bf16 logits is 1,792 rows at
    V = Vt = 151,936 (1,536 after rounding), a peak below Liger's measured 2,685 MiB with the weight gradient.
    Not measured on a GPU yet.
    """
    rows = _KERNEL_LOGIT_BYTES // (itemsize * max(vocab + teacher_vocab, 1))
    return int(max(256, min(4096, rows // 256 * 256)))


def _run_kernel(hidden, weight, bias, plan: _Plan, sft: bool, want_grad: bool, grad_h, grad_w, grad_b):
    """The chunk loop of a full teacher head with the Triton kernel (:mod:`.kernels.full_rows`): two matmuls, one
    kernel writing d loss / d z over the student logits in the matmul dtype, the backward matmuls. Returns the
    summed ``(divergence, label term, top-1 agreement, entropy)``."""
    from .kernels.full_rows import full_rows
    form = kernel_form(plan.divergence)
    entry = entry_function(form.entry)
    n, dev, f32 = hidden.shape[0], hidden.device, torch.float32
    wt = plan.teacher_weight
    rows = min(n, plan.chunk_size or kernel_chunk_size(weight.shape[0], wt.shape[0], weight.element_size()))
    bias_f = None if bias is None else _finite_bias(bias)
    coef = form.sign * plan.div_scale / plan.temperature
    sums = torch.zeros(4, dtype=f32, device=dev)
    agree = torch.zeros((), dtype=torch.long, device=dev)
    for start in range(0, n, rows):
        sl = slice(start, min(start + rows, n))
        h = hidden[sl].to(weight.dtype)
        zs = h @ weight.t()
        with torch.no_grad():
            zt = plan.teacher_hidden[sl].to(wt.dtype) @ wt.t()
        lab, ce_weight, w = _label_rows(plan, sl) if sft else (None, None, None)
        res = full_rows(zs, zt, bias_f, plan.teacher_bias, entry=entry, constants=form.constants,
                        threshold=form.threshold, coef=coef, temperature=plan.temperature,
                        grad=zs if want_grad else None, labels=None if lab is None else lab.squeeze(1),
                        label_weight=w, ce_weight=ce_weight, label_temperature=plan.label_temperature,
                        entropy=plan.entropy)
        sums[0] += res.divergence.sum()
        if res.label is not None:
            sums[1] += res.label.sum()
        if res.entropy is not None:
            sums[3] += res.entropy.sum()
        agree += res.agree.sum()
        if want_grad:
            if grad_b is not None:
                grad_b.add_(zs.sum(0, dtype=f32))
            _backprop_matmuls(zs, h, weight, 1.0, sl, grad_h, grad_w, first=start == 0)
    return sums[0], sums[1], agree, sums[3]
