"""Sampled-token on-policy distillation: the reverse KL to the teacher as a per-token policy-gradient advantage.

In: the student's log-probabilities of the tokens it sampled (differentiable), the teacher's of the same tokens (one
number per token, no vocabulary), a mask. Out: ``A_t = sum_{k >= t} gamma^(k - t) r_k`` over kept tokens, with
``r_t = log pi_T(y_t) - log pi_S(y_t)`` constant, and the loss ``-sum w_t A_t log pi_S(y_t) / N`` (the REINFORCE
surrogate of :mod:`.policy_gradient`) with its metrics. Why: a teacher that gives only sampled-token log-probabilities
(an API, a server) still yields an unbiased gradient of ``KL(pi_S || pi_T)``, per token at ``gamma = 0``, per
sequence at ``gamma = 1`` (Tinker's ``kl_penalty_coef`` / ``kl_discount_factor``, veRL's OPD, TRL's sampled KL).
"""
from __future__ import annotations

import functools
import math
from typing import Dict, Optional, Tuple, Union

import torch

from swift_gkd_plugin.core.policy_gradient import _at_least_float32 as at_least_float32
from swift_gkd_plugin.core.policy_gradient import policy_gradient_loss

__all__ = ['discounted_returns', 'other_rows_baseline', 'sampled_kl_loss', 'token_log_ratios']

#: positions per block of :func:`discounted_returns`: each block is one ``[B, L, L]`` product (2 MiB of float64 per
#: row at 512), and a 32k-token row takes 64 blocks.
_BLOCK = 512


def _check_same_shape(name: str, tensor: Optional[torch.Tensor], like: torch.Tensor, like_name: str) -> None:
    if tensor is not None and tensor.shape != like.shape:
        raise ValueError(f'{name} has shape {tuple(tensor.shape)}, it must have the shape of {like_name} '
                         f'{tuple(like.shape)}')


def _check_2d(name: str, tensor: torch.Tensor) -> None:
    if tensor.dim() != 2:
        raise ValueError(f'{name} must be 2-D [batch, seq], got shape {tuple(tensor.shape)}')


def _kept(mask: torch.Tensor) -> torch.Tensor:
    return mask if mask.dtype == torch.bool else mask != 0


def _at_least_float32(*tensors: torch.Tensor) -> torch.dtype:
    return at_least_float32(functools.reduce(torch.promote_types, (t.dtype for t in tensors)))


def token_log_ratios(teacher_logprobs: torch.Tensor, student_logprobs: torch.Tensor,
                     mask: torch.Tensor) -> torch.Tensor:
    """``r_t = log pi_T(y_t) - log pi_S(y_t)`` at the kept positions, 0 elsewhere; detached (no gradient).

    ``-r_t`` is the single-sample estimate of the reverse KL ``KL(pi_S(.|y_<t) || pi_T(.|y_<t))`` at ``t`` (its
    expectation over ``y_t ~ pi_S``).

    Args:
        teacher_logprobs: ``[...]`` the teacher's log-probabilities of the sampled tokens (constant).
        student_logprobs: ``[...]`` the student's log-probabilities of the same tokens, at the sampling temperature;
            read, never differentiated.
        mask: ``[...]`` bool (or 0/1: nonzero = kept), the positions that count. The other positions' inputs are
            never read (NaN or -inf there is harmless).

    Returns:
        ``[...]`` the ratios in the promoted dtype of the inputs, float32 at least (float64 stays float64).
    """
    _check_same_shape('student_logprobs', student_logprobs, teacher_logprobs, 'teacher_logprobs')
    _check_same_shape('mask', mask, teacher_logprobs, 'teacher_logprobs')
    dtype = _at_least_float32(teacher_logprobs, student_logprobs)
    r = teacher_logprobs.detach().to(dtype) - student_logprobs.detach().to(dtype)
    return torch.where(_kept(mask), r, 0.0)


def discounted_returns(values: torch.Tensor, mask: torch.Tensor, discount: float,
                       sequence_starts: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Discounted sums of ``values`` over the following kept positions of the same sequence, row by row.

    ``A_t = sum_{k >= t, k kept, k in t's sequence} discount^(n(t, k)) * values_k`` for a kept ``t``, where
    ``n(t, k)`` is the number of KEPT positions in ``[t, k)``, and ``A_t = 0`` where ``t`` is masked. A masked
    position adds nothing and does not age the discount: the chain runs across a masked gap as if the gap's positions
    were cut out of the row, so the result at the kept positions equals the plain discounted return of the kept values
    laid end to end (left or right padding, or a masked tool answer inside a multi-turn row, change nothing).
    (Tinker's ``kl_discount_factor`` discounts by ``k - t``, masked positions included; the two agree wherever a
    sequence's kept positions are contiguous.) A sequence boundary always breaks the chain: each row is a sequence,
    and ``sequence_starts`` splits a packed row further. ``discount = 0`` gives ``values`` (masked to 0),
    ``discount = 1`` the return-to-go.

    Vectorised over the batch; the row is processed in blocks of 512 positions from its end (a ``[B, 512, 512]``
    product per block, the carry between blocks scaled by ``discount^n``), so a 32k-token row takes 64 steps. Every
    power has an exponent >= 0 (no overflow; far terms underflow to 0 as they should).

    Args:
        values: ``[B, T]`` floating point; read at the kept positions only (NaN elsewhere is harmless).
        mask: ``[B, T]`` bool (or 0/1: nonzero = kept), any pattern (gaps, left or right padding, empty rows).
        discount: ``gamma`` in ``[0, 1]``.
        sequence_starts: optional ``[B, T]`` bool (or 0/1), True at the first position of each sequence of a packed
            row: no value flows from a sequence into the one before it. None: one sequence per row.

    Returns:
        ``[B, T]`` in the dtype of ``values``, float32 at least; differentiable in ``values`` (the callers pass
        constants).
    """
    _check_discount(discount)
    _check_2d('values', values)
    _check_same_shape('mask', mask, values, 'values')
    _check_same_shape('sequence_starts', sequence_starts, values, 'values')
    kept = _kept(mask)
    dtype = _at_least_float32(values)
    v = torch.where(kept, values.to(dtype), 0.0)
    if discount == 0.0:
        return v
    batch, length = v.shape
    before = torch.cumsum(kept, dim=1, dtype=torch.long) - kept.long()  # kept positions before t
    if sequence_starts is None:
        segment = torch.zeros_like(before)
    else:
        segment = torch.cumsum(_kept(sequence_starts), dim=1, dtype=torch.long)
    out = torch.zeros_like(v)
    carry = v.new_zeros(batch)  # the return entering the block from its right (at position `end`)
    carry_before = before[:, -1] + kept[:, -1]  # kept positions before T (the exponents below stay >= 0)
    carry_segment = segment.new_full((batch, ), -1)  # matches no segment: nothing enters the last block
    upper = torch.ones(_BLOCK, _BLOCK, dtype=torch.bool, device=v.device).triu()
    powers = torch.pow(discount, torch.arange(_BLOCK, dtype=dtype, device=v.device))  # gamma^0 .. gamma^511
    for start in reversed(range(0, length, _BLOCK)):
        end = min(start + _BLOCK, length)
        n = before[:, start:end]
        seg = segment[:, start:end]
        # gamma^(kept positions in [t, k)) for k >= t in t's sequence; 0 elsewhere
        exponent = (n.unsqueeze(1) - n.unsqueeze(2)).clamp_(min=0)  # < _BLOCK
        link = upper[:end - start, :end - start] & (seg.unsqueeze(1) == seg.unsqueeze(2))
        weight = torch.where(link, powers[exponent], 0.0)
        block = torch.bmm(weight, v[:, start:end].unsqueeze(2)).squeeze(2)
        into = seg == carry_segment.unsqueeze(1)
        scale = torch.pow(discount, (carry_before.unsqueeze(1) - n).to(dtype))
        block = block + torch.where(into, scale * carry.unsqueeze(1), 0.0)
        out[:, start:end] = block
        carry, carry_before, carry_segment = block[:, 0], n[:, 0], seg[:, 0]
    return torch.where(kept, out, 0.0)


def other_rows_baseline(values: torch.Tensor, rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Each token's baseline: the mean of ``values`` over the tokens of the OTHER rows, 0 where no other row has one.

    Subtracted from the advantages of a policy gradient whose rows are sampled independently, it leaves the
    expectation unchanged (``b`` does not depend on the row's own tokens, and ``E[grad log p(y)] = 0``) and removes the
    advantages' common offset. A mean that included the row itself would not be independent of its tokens.

    Args:
        values: ``[N]`` one value per token (the advantages; read, never differentiated).
        rows: ``[N]`` integer, each token's row in ``[0, n_rows)``.
        n_rows: the number of rows.

    Returns:
        ``[N]`` detached, in the dtype of ``values``, float32 at least.
    """
    if values.dim() != 1 or rows.shape != values.shape:
        raise ValueError(f'values {tuple(values.shape)} and rows {tuple(rows.shape)} must be [N] and [N]')
    v = values.detach().to(_at_least_float32(values))
    rows = rows.long()
    sums = v.new_zeros(n_rows).index_add_(0, rows, v)
    counts = v.new_zeros(n_rows).index_add_(0, rows, torch.ones_like(v))
    others = counts.sum() - counts[rows]
    return torch.where(others > 0, (sums.sum() - sums[rows]) / others.clamp(min=1), 0.0)


def sampled_kl_loss(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, mask: torch.Tensor,
                    discount: float = 0.0, weights: Optional[torch.Tensor] = None,
                    normaliser: Union[None, float, torch.Tensor] = None,
                    sequence_starts: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """The sampled-token on-policy distillation loss ``L = -sum_t w_t A_t log pi_S(y_t) / N`` over kept positions.

    ``A = discounted_returns(token_log_ratios(...), mask, discount, sequence_starts)`` (constant). The gradient with
    respect to ``student_logprobs`` is ``-w_t A_t / N`` at kept positions and 0 elsewhere; on-policy (``y ~ pi_S``,
    ``w = 1``) its expectation is ``grad sum_t KL(pi_S(.|y_<t) || pi_T(.|y_<t)) / N`` at ``discount = 0`` and
    ``grad KL(pi_S(y) || pi_T(y)) / N`` over whole sequences at ``discount = 1``. Minimising ``L`` lowers the
    reverse KL; the metric needs no vocabulary.

    Args:
        student_logprobs: ``[B, T]`` ``log pi_S(y_t | y_<t)`` of the sampled tokens at the sampling temperature;
            the only input that carries gradient.
        teacher_logprobs: ``[B, T]`` ``log pi_T(y_t | y_<t)`` of the same tokens (constant).
        mask: ``[B, T]`` bool (or 0/1: nonzero = kept): the student's sampled tokens that count. The other tensors
            are not read at masked positions (NaN or -inf there is harmless).
        discount: ``gamma`` in ``[0, 1]`` (see :func:`discounted_returns` for the chain across masked gaps).
        weights: optional ``[B, T]`` constant importance weights ``w`` (the ``weights`` of
            :func:`~swift_gkd_plugin.core.policy_gradient.rollout_importance_weights`, viewed ``[B, T]``); they multiply
            the advantage after the discounting. None: 1.
        normaliser: ``N``, a number > 0 or a scalar tensor (not read on the host: no synchronisation); None: the
            number of kept positions (1 if none).
        sequence_starts: optional ``[B, T]`` starts of the sequences of packed rows (see :func:`discounted_returns`).

    Returns:
        ``(loss, metrics)``: ``loss`` a scalar in the dtype of ``student_logprobs``, float32 at least; ``metrics``
        detached scalar tensors: ``reverse_kl`` the mean of ``-r_t`` over kept positions (the per-token reverse-KL
        estimate), ``advantage`` the mean of ``A_t`` over kept positions, ``tokens`` the number of kept positions.
    """
    _check_2d('student_logprobs', student_logprobs)
    _check_same_shape('teacher_logprobs', teacher_logprobs, student_logprobs, 'student_logprobs')
    _check_same_shape('mask', mask, student_logprobs, 'student_logprobs')
    _check_same_shape('weights', weights, student_logprobs, 'student_logprobs')
    if isinstance(normaliser, (int, float)) and not 0 < normaliser < math.inf:
        raise ValueError(f'normaliser must be a finite number > 0 (or a scalar tensor, or None), got {normaliser}')
    if isinstance(normaliser, torch.Tensor) and normaliser.numel() != 1:
        raise ValueError(f'normaliser must be a scalar tensor, got shape {tuple(normaliser.shape)}')
    _check_discount(discount)
    kept = _kept(mask)
    r = token_log_ratios(teacher_logprobs, student_logprobs, kept)
    advantages = discounted_returns(r, kept, discount, sequence_starts)
    scaled = advantages if weights is None else advantages * torch.where(kept, weights.detach().to(r.dtype), 0.0)
    per_token = policy_gradient_loss(torch.where(kept, student_logprobs, 0.0), scaled)
    tokens = kept.sum().to(per_token.dtype)
    count = tokens.clamp(min=1)
    norm = count if normaliser is None else normaliser
    loss = per_token.sum() / norm  # 0 at masked positions: both factors are
    metrics = {'reverse_kl': (-r).sum() / count, 'advantage': advantages.sum() / count, 'tokens': tokens}
    return loss, {name: value.detach() for name, value in metrics.items()}


def _check_discount(discount: float) -> None:
    if not isinstance(discount, (int, float)) or not 0.0 <= discount <= 1.0:  # NaN too
        raise ValueError(f'discount must be a number in [0, 1], got {discount!r}')
