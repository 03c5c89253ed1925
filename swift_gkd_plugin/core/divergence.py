"""The dense distillation divergence on ``[N, V]`` logits, and the alignment of two vocabularies.

:func:`generalized_jsd` (any registered divergence, :mod:`.row_divergence`) tempers both logits by ``T``, computes
in float32 whatever the input dtype, and turns ``-inf`` logits (masked vocabulary entries) into zero-probability
entries that contribute exactly zero to the value and the gradient. ``kl_from_log_probs`` is the plain
definition, kept as a readable reference.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from swift_gkd_plugin.core.constants import NEG_LOGIT
from swift_gkd_plugin.core.row_divergence import Divergence, RowBuffers, as_divergence, divergence_rows, log_softmax_into

__all__ = ['RowwiseDivergence', 'align_vocab', 'generalized_jsd', 'kl_from_log_probs', 'tempered_divergence_rows']


# Log-probabilities are floored here: exp() of it is exactly 0 in float32 (as of anything below about -104), and
# unlike -inf it keeps logaddexp() and its backward finite for entries both models mask out.
LOG_PROB_FLOOR = -1e4


def kl_from_log_probs(target_log_probs: torch.Tensor, input_log_probs: torch.Tensor) -> torch.Tensor:
    """``KL(target || input)`` over the last dimension, from log-probabilities.

    Entries where the target has zero probability contribute 0 (no ``0 * inf`` NaN, in value or gradient).
    """
    p = target_log_probs.exp()
    diff = target_log_probs - input_log_probs
    # where(): zero-probability entries may hold -inf - (-inf) = nan; select them away and keep their gradient 0.
    present = p > 0
    terms = torch.where(present, p * torch.where(present, diff, torch.zeros_like(diff)), torch.zeros_like(p))
    return terms.sum(-1)


def generalized_jsd(student_logits: torch.Tensor,
                    teacher_logits: torch.Tensor,
                    divergence: Union[float, Divergence],
                    temperature: float = 1.0,
                    chunk_size: int = 1024) -> torch.Tensor:
    """Per-token divergence between teacher and student distributions (dense logits).

    Computed by :func:`~swift_gkd_plugin.core.row_divergence.divergence_rows`, as every other loss path, with its
    hand-derived gradient (formed in the forward, chunk by chunk; the backward only rescales it).

    Args:
        student_logits: ``[N, V]`` student logits (any float dtype; differentiable).
        teacher_logits: ``[N, V]`` teacher logits (no gradient is needed; any float dtype).
        divergence: any :class:`~swift_gkd_plugin.core.row_divergence.Divergence`, or the generalized JSD's
            interpolation ``beta`` in ``[0, 1]`` (0 is ``KL(teacher||student)``, 1 is ``KL(student||teacher)``).
        temperature: ``T > 0``, divides both logits before the softmax.
        chunk_size: positions processed at a time, to bound the float32 temporaries to ``chunk_size x V``.

    Returns:
        ``[N]`` float32 divergences, one per position.
    """
    divergence = as_divergence(divergence)
    if not 0 < temperature < float('inf'):  # NaN too; at T = inf both distributions are uniform
        raise ValueError(f'temperature must be a finite number > 0, got {temperature}')
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f'student {tuple(student_logits.shape)} and teacher {tuple(teacher_logits.shape)} logits '
                         'must have the same shape (align the vocabularies first)')
    want_grad = torch.is_grad_enabled() and student_logits.requires_grad

    def chunk(student, teacher, want):  # float32 whatever the input dtype
        return tempered_divergence_rows(student.float(), teacher, divergence, float(temperature), want)

    return RowwiseDivergence.apply(student_logits, teacher_logits.detach(), chunk, max(1, int(chunk_size)),
                                   want_grad)


class RowwiseDivergence(torch.autograd.Function):
    """``[N]`` per-row divergences from ``chunk_fn(student_rows, teacher_rows, want_grad) -> (D, dD/dstudent)``,
    chunk by chunk; the gradient is formed in the forward and the backward only rescales it (no collective, so
    vocabulary-parallel callers may all-reduce inside ``chunk_fn``). ``chunk_fn`` runs at least once, also for
    ``N = 0``, so that every rank issues the same collectives."""

    @staticmethod
    def forward(ctx, student, teacher, chunk_fn, chunk_size: int, want_grad: bool):
        n, grad, out = student.shape[0], None, []
        for start in range(0, max(n, 1), chunk_size):
            sl = slice(start, start + chunk_size)
            d, g = chunk_fn(student[sl], teacher[sl], want_grad)
            out.append(d)
            if want_grad:
                if grad is None:
                    grad = torch.empty(student.shape, dtype=g.dtype, device=student.device)
                grad[sl] = g
        ctx.in_dtype = student.dtype
        ctx.save_for_backward(grad)
        return torch.cat(out)

    @staticmethod
    def backward(ctx, grad_out):
        (grad, ) = ctx.saved_tensors
        return (grad * grad_out.to(grad.dtype).unsqueeze(-1)).to(ctx.in_dtype), None, None, None, None


def tempered_divergence_rows(student: torch.Tensor, teacher: torch.Tensor, divergence: Divergence,
                             temperature: float, want_grad: bool = True, row_sum=None
                             ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(D [C], dD/d student [C, V] or None)`` of two ``[C, V]`` logit rows at ``temperature``, in float32 (float64
    for float64 students). ``-inf`` logits become a finite ``-1e30``: zero probability, no NaN. ``row_sum``: as in
    :func:`~swift_gkd_plugin.core.row_divergence.divergence_rows` (default: the local sum)."""
    cd = torch.float64 if student.dtype == torch.float64 else torch.float32
    inv_t = 1.0 / temperature
    s = (student.detach().to(cd) * inv_t).clamp_min_(NEG_LOGIT)  # a private copy (the product allocates)
    t = (teacher.detach().to(cd) * inv_t).clamp_min_(NEG_LOGIT)
    p_s, p_t = torch.empty_like(s), torch.empty_like(t)
    log_softmax_into(s, p_s)
    log_softmax_into(t, p_t)
    flags = torch.empty(s.shape, dtype=torch.bool, device=s.device) if divergence.needs_flags else None
    extra = {} if row_sum is None else dict(row_sum=row_sum)
    d, sign = divergence_rows(RowBuffers(s, t, p_s, p_t, flags), divergence, **extra)
    return d, (s.mul_(sign * inv_t) if want_grad else None)


def align_vocab(student_logits: torch.Tensor, teacher_logits: torch.Tensor):
    """Pad the smaller vocabulary with the other side's logits so the extra entries cancel (ms-swift's rule).

    A teacher whose ``lm_head`` is larger than the student's (same tokenizer, padded embedding) is common; the
    padded ids are never produced by the tokenizer, so copying the other side's logits there makes them agree.
    """
    vs, vt = student_logits.shape[-1], teacher_logits.shape[-1]
    if vs == vt:
        return student_logits, teacher_logits
    if vs < vt:
        student_logits = torch.cat([student_logits, teacher_logits[..., vs:].to(student_logits.dtype)], dim=-1)
    else:
        teacher_logits = torch.cat([teacher_logits, student_logits[..., vt:].detach().to(teacher_logits.dtype)], -1)
    return student_logits, teacher_logits
