"""Fused ``lm_head`` + divergence distillation loss, computed chunk by chunk on hidden states.

:func:`fused_linear_jsd` never materialises the ``[N, V]`` logits. For each chunk of active tokens it forms the
student logits (one matmul), the teacher logits (one matmul, no grad) or uses the teacher's top-k, computes the
divergence and its closed-form gradient with respect to the student logits, and immediately turns that gradient
into the chunk's ``grad_hidden`` and accumulates ``grad_weight`` / ``grad_bias``. The extra memory is
``O(chunk x V)`` (reused across chunks) plus the ``[V, H]`` weight gradient every method needs; the work is the four
matmuls of a plain ``lm_head`` forward/backward plus the chunk backend's passes over the logits.

This file holds the API, the chunk loop and ``auto``'s self-check; a chunk is computed by one of two backends
(``core/fused/plan.py`` says what one is): ``core/fused/chunk_torch.py`` (PyTorch ops on float32 scratch, the reference)
or ``core/fused/chunk_triton.py`` (Triton kernels on the matmul-dtype logits, the default on CUDA). The choice:
:func:`~swift_gkd_plugin.core.fused.kernels.choose_backend` (``--gkd_fused_backend``).

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
* the entropy of the student's tempered distribution ``softmax(z / T)`` and the teacher's at the same rows (detached
  statistics: ``gkd/entropy`` and ``gkd/teacher_entropy``).
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Dict, Optional, Tuple, Union

import torch

from swift_gkd_plugin.core.constants import IGNORE_INDEX
from swift_gkd_plugin.core.fused.plan import Plan, finite_bias
from swift_gkd_plugin.core.fused.chunk_torch import TorchChunks, default_chunk_size
from swift_gkd_plugin.core.fused.chunk_triton import TritonChunks, kernel_chunk_size
from swift_gkd_plugin.core.fused.kernels import KERNEL_BACKENDS, choose_backend
from swift_gkd_plugin.core.row_divergence import Divergence, as_divergence, gated_row_count, kernel_form
from swift_gkd_plugin.core.teacher_signal import TeacherHead, TeacherTopK
from swift_gkd_plugin.core.topk import topk_teacher_entropy

__all__ = ['fused_linear_jsd', 'default_chunk_size', 'kernel_chunk_size']

Number = Union[float, int, torch.Tensor]
logger = logging.getLogger('swift_gkd_plugin')
#: the chunk backends (``core/fused/plan.py`` says what one is)
BACKENDS = {'torch': TorchChunks, 'triton': TritonChunks}


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
        return_entropy: also return ``stats['entropy_sum']`` and ``stats['teacher_entropy_sum']``.
        divergence: a :class:`~swift_gkd_plugin.core.row_divergence.Divergence` other than the generalized JSD of
            ``beta`` (e.g. ``skew_kl``); ``beta`` is then unused.
        backend: ``auto`` / ``torch`` / ``triton`` (:func:`~swift_gkd_plugin.core.fused.kernels.choose_backend`);
            default ``$SWIFT_GKD_FUSED_BACKEND``, else ``auto``. ``auto`` checks each kernel variant once per process
            against the PyTorch path (:func:`_self_checked_backend`).

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
        student's tempered distribution, over the active tokens (float32), and ``teacher_entropy_sum``: the
        teacher's at the same tokens and temperature, over its own vocabulary for a full head (before any padding to
        the student's), and for a top-k teacher that of the bucket distribution the loss compares
        (:func:`~swift_gkd_plugin.core.topk.topk_teacher_entropy`); with an entropy-aware ``divergence``
        (``fkl_above_entropy``) also ``entropy_fkl_rows``: the active tokens whose teacher entropy as
        ``teacher_entropy_sum`` counts it exceeds the gate's threshold.

    Shapes may be in any float dtype; all reductions accumulate in float32. The matmuls run in the weights' dtype
    and are upcast chunk by chunk; ``grad_weight`` is accumulated in float32.
    """
    divergence = as_divergence(beta if divergence is None else divergence)
    _check_arguments(teacher, temperature, sft_alpha, labels, label_weights, label_temperature)
    full = isinstance(teacher, TeacherHead)

    backend_name, self_check = choose_backend(backend, student_hidden.device)
    if backend_name in KERNEL_BACKENDS and as_divergence(divergence).fkl_above_entropy is not None:
        if not self_check:  # forced: no entropy-aware mix (kernel_form says so)
            kernel_form(divergence)
        backend_name, self_check = 'torch', False  # auto: the PyTorch path computes it
    hidden = student_hidden.reshape(-1, student_hidden.shape[-1])
    n_all, vocab, dev = hidden.shape[0], student_weight.shape[0], hidden.device
    plan = Plan(divergence=divergence, temperature=float(temperature), tail=bool(topk_tail), vocab=vocab,
                 label_temperature=float(label_temperature), entropy=bool(return_entropy),
                 backend=backend_name)
    if full:
        plan.teacher_weight = teacher.weight
        plan.teacher_bias = None if teacher.bias is None else finite_bias(teacher.bias)
    else:
        logprobs = _token_rows(teacher.logprobs, n_all).float()
    idx, everyone = _active_rows(mask, None if full else (teacher.ids, logprobs), n_all, vocab, dev)

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

    hidden = rows(hidden)
    if self_check:
        plan.backend = _self_checked_backend(hidden, student_weight, student_bias, plan)
    loss = _FusedLinearJSD.apply(hidden, student_weight, student_bias, plan)
    if plan.entropy and not full:
        t_rows = topk_teacher_entropy(plan.topk_logprobs, plan.temperature, plan.tail, vocab)
        plan.stats['teacher_entropy_sum'] = t_rows.sum()
        gated = gated_row_count(t_rows, plan.divergence)
        if gated is not None:
            plan.stats['entropy_fkl_rows'] = gated
    stats = {k: v.detach() for k, v in plan.stats.items()}
    stats['num_tokens'] = torch.full((), num_tokens, dtype=torch.long, device=dev)  # filled on the device: no copy
    stats['num_sft_tokens'] = num_sft
    return loss, stats


def _check_arguments(teacher, temperature, sft_alpha, labels, label_weights, label_temperature) -> None:
    """The errors of :func:`fused_linear_jsd`'s arguments, before any work."""
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


def _active_rows(mask, topk, n_all: int, vocab: int, dev):
    """``(idx, everyone)``: the flat indices of the tokens that take part (``None`` with ``everyone`` True: all of
    them, no gather needed). A token takes part where ``mask`` is set (default: every one) and, for a top-k teacher
    (``topk``: its ``(ids, float32 log-probabilities)``), where the teacher has a finite log-probability.

    Host syncs: none for a full teacher (``topk`` None) without a mask. Otherwise one read sizes the selection and
    also carries the top-k ids' range check (ids of finite entries must lie in ``[0, vocab)``: ``ValueError``)."""
    if topk is None and mask is None:
        return None, True
    active = torch.ones(n_all, dtype=torch.bool, device=dev) if mask is None else mask.reshape(-1).bool()
    outside = torch.zeros((), dtype=torch.long, device=dev)
    if topk is not None:
        ids, logprobs = topk
        valid = logprobs > float('-inf')
        active = active & valid.any(-1)  # no teacher information: nothing to distil
        ids_all = _token_rows(ids, n_all)
        outside = ((valid & ((ids_all < 0) | (ids_all >= vocab))).any(-1) & active).sum()
    n_active, n_outside = torch.stack([active.sum(), outside]).tolist()  # the one read
    if n_outside:
        raise ValueError(f'teacher top-k ids must lie in [0, {vocab}) (the student vocabulary)')
    return torch.nonzero_static(active, size=n_active).squeeze(1), n_active == n_all  # all: skip the gathers


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


def _run(hidden, weight, bias, plan: Plan, need_h: bool, need_w: bool, need_b: bool):
    """The chunk loop. Returns ``(loss, (grad_hidden, grad_weight, grad_bias))``, unneeded grads ``None``."""
    n, dev, f32 = hidden.shape[0], hidden.device, torch.float32
    want_grad = need_h or need_w or need_b
    grad_h = torch.empty(n, hidden.shape[1], dtype=f32, device=dev) if need_h else None
    grad_w = torch.empty(weight.shape, dtype=f32, device=dev) if need_w else None  # first chunk overwrites
    grad_b = torch.zeros(weight.shape[0], dtype=f32, device=dev) if need_b else None
    sums = torch.zeros(4, dtype=f32, device=dev)  # divergence, label term, the student's and the teacher's entropy
    agree = torch.zeros((), dtype=torch.long, device=dev)
    gated = torch.zeros((), dtype=torch.long, device=dev)
    if n:
        chunks = BACKENDS[plan.backend](plan, weight, bias, hidden, want_grad)
        for start in range(0, n, chunks.rows):
            sl = slice(start, min(start + chunks.rows, n))
            h = hidden[sl].to(weight.dtype)
            res = chunks.chunk(h, sl)
            sums += torch.stack([res.divergence_sum, res.label_sum, res.entropy_sum, res.teacher_entropy_sum]).float()
            agree += res.top1_agree
            if res.gated_rows is not None:
                gated += res.gated_rows
            if want_grad:
                if grad_b is not None:
                    grad_b.add_(res.bias_grad.sum(0, dtype=f32), alpha=res.grad_scale)
                chunks.backprop(res.grad, h, res.grad_scale, sl, grad_h, grad_w, first=start == 0)
        del chunks, res
    elif grad_w is not None:
        grad_w.zero_()

    div_sum, sft_sum, entropy_sum, teacher_entropy_sum = sums.unbind()
    plan.stats.update(divergence_sum=div_sum, sft_sum=sft_sum, top1_agree=agree)
    if plan.entropy:
        plan.stats['entropy_sum'] = entropy_sum
        if plan.full:  # a top-k teacher's: fused_linear_jsd, from its log-probabilities
            plan.stats['teacher_entropy_sum'] = teacher_entropy_sum
            if plan.divergence.fkl_above_entropy is not None:
                plan.stats['entropy_fkl_rows'] = gated
    loss = div_sum * plan.div_scale + sft_sum * plan.sft_scale
    grads = (None if grad_h is None else grad_h.to(hidden.dtype),
             None if grad_w is None else grad_w.to(weight.dtype),
             None if grad_b is None else grad_b.to(bias.dtype))
    return loss, grads


# ---- auto's self-check of the kernels -----------------------------------------------------------------------------

#: rows of the first chunk that the self-check runs on both backends
SELF_CHECK_ROWS = 64
#: the backend each kernel variant runs on in this process, once checked
_CHECKED: Dict[tuple, str] = {}


def _variant(plan: Plan, weight: torch.Tensor) -> tuple:
    """What selects a compiled kernel variant (and so what one self-check covers)."""
    form = plan.divergence.name if plan.full else 'topk'
    return (plan.backend, plan.full, form, plan.divergence.needs_flags, plan.tail, plan.sft,
            plan.label_temperature != 1.0, plan.entropy, weight.dtype, str(weight.device), weight.requires_grad)


def _self_checked_backend(hidden, weight, bias, plan: Plan) -> str:
    """``'triton'``, or ``'torch'`` for a kernel variant that failed or disagreed with the PyTorch path on its first
    chunk in this process (one warning). Why: the kernels are the default on every CUDA device, and a device, driver
    or compiler they have not run on must cost speed, not the run."""
    key = _variant(plan, weight)
    if key not in _CHECKED and hidden.shape[0]:
        _CHECKED[key] = _self_check(hidden, weight, bias, plan)
    return _CHECKED.get(key, plan.backend)


def _self_check(hidden, weight, bias, plan: Plan) -> str:
    """Run the first :data:`SELF_CHECK_ROWS` rows on both backends, in two chunks (the weight gradient accumulates
    over chunks); compare the loss, the divergence, the hidden, weight and bias gradients (``grad_hidden = g @ W``
    sees every entry of the kernel's ``d loss / d z``; ``grad_weight`` is the backend's accumulation over chunks).
    The weight gradient only where the run forms one (a trainable head): a frozen head (LoRA) would pay a ``[V, H]``
    float32 buffer it never uses."""
    c = min(hidden.shape[0], SELF_CHECK_ROWS)
    need_w = weight.requires_grad and plan.grad_enabled
    rowwise = ('teacher_hidden', 'topk_ids', 'topk_logprobs', 'labels', 'label_weights')
    sub = {k: getattr(plan, k)[:c] for k in rowwise if getattr(plan, k) is not None}
    kernel = plan.backend
    probe = torch.randn(weight.shape[1], generator=torch.Generator(device=weight.device).manual_seed(0),
                        device=weight.device)
    out = {}
    for name in ('torch', kernel):
        run = dataclasses.replace(plan, backend=name, stats={}, chunk_size=-(-c // 2), **sub)
        try:
            with torch.no_grad():  # _run forms the gradients itself
                loss, grads = _run(hidden[:c].detach(), weight.detach(), None if bias is None else bias.detach(), run,
                                   True, need_w, bias is not None)
        except Exception as exc:  # a compile / launch / driver error: any exception type
            if name == 'torch':
                raise
            return _fall_back(_key_text(plan, weight), f'failed: {type(exc).__name__}: {str(exc)[:300]}')
        out[name] = {'loss': loss, 'divergence': run.stats['divergence_sum'], 'grad_hidden': grads[0]}
        if need_w:
            out[name]['grad_weight @ r'] = _projected(grads[1], probe)
        if bias is not None:
            out[name]['grad_bias'] = grads[2]
        del grads  # the [V, H] weight gradient: only its projection is kept
    tol = 1e-3 if weight.dtype == torch.float32 else 3e-2
    errors = {n: _mismatch(out[kernel][n].float(), out['torch'][n].float()) for n in out['torch']}
    if not all(e <= tol for e in errors.values()):  # NaN too
        found = ', '.join(f'{n} {e:.1e}' for n, e in errors.items())
        return _fall_back(_key_text(plan, weight), f'differs from the PyTorch path on its first {c} rows (relative '
                          f'errors {found}; allowed {tol:g})')
    return kernel


def _projected(grad_w: torch.Tensor, r: torch.Tensor, block: int = 4096) -> torch.Tensor:
    """``grad_w @ r`` in float32, a block of rows at a time (no float32 copy of a ``[V, H]`` gradient): a random
    ``r`` mixes every entry of a row, so a wrong entry shows."""
    return torch.cat([grad_w[i:i + block].float() @ r for i in range(0, grad_w.shape[0], block)])


def _mismatch(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference over the larger of the two largest magnitudes (NaN if either is not finite)."""
    if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())):
        return float('nan')
    return float((a - b).abs().max() / torch.maximum(a.abs().max(), b.abs().max()).clamp_min(1e-12))


def _key_text(plan: Plan, weight: torch.Tensor) -> str:
    teacher = 'a full teacher head' if plan.full else f'a top-k teacher{" with the tail" if plan.tail else ""}'
    return f'{plan.divergence} against {teacher}, {str(weight.dtype).replace("torch.", "")} on {weight.device}'


def _fall_back(what: str, why: str) -> str:
    logger.warning(f'swift_gkd_plugin: the Triton kernel of the fused loss ({what}) {why}. This variant runs on the '
                   'PyTorch path for the rest of the process: the same loss, slower. --gkd_fused_backend torch skips '
                   'the kernels (and this check); --gkd_fused_backend triton forces them.')
    return 'torch'
