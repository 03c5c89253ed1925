"""The generalized Jensen-Shannon divergence of GKD on logits (dense reference implementation).

With ``s = log_softmax(student_logits / T)`` and ``t = log_softmax(teacher_logits / T)``, computed in float32
whatever the input dtype:

* ``beta == 0``: ``D = KL(teacher || student) = sum_v p_t (t - s)``
* ``beta == 1``: ``D = KL(student || teacher) = sum_v p_s (s - t)``
* ``0 < beta < 1``: ``D = beta * KL(teacher || M) + (1 - beta) * KL(student || M)`` with
  ``M = beta * p_t + (1 - beta) * p_s`` (formed in log space).

The endpoints are computed as single KLs rather than as limits of the mixture formula, so they are exact.
Terms whose probability is zero (``-inf`` logits, e.g. masked vocabulary entries) contribute exactly zero to the
value and to the gradient.
"""
from __future__ import annotations

import math

import torch

__all__ = ['align_vocab', 'generalized_jsd', 'kl_from_log_probs']

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
                    beta: float,
                    temperature: float = 1.0,
                    chunk_size: int = 1024) -> torch.Tensor:
    """Per-token generalized JSD between teacher and student distributions.

    Args:
        student_logits: ``[N, V]`` student logits (any float dtype; differentiable).
        teacher_logits: ``[N, V]`` teacher logits (no gradient is needed; any float dtype).
        beta: interpolation in ``[0, 1]``; 0 is ``KL(teacher||student)``, 1 is ``KL(student||teacher)``.
        temperature: ``T > 0``, divides both logits before the softmax.
        chunk_size: positions processed at a time, to bound the float32 temporaries to ``chunk_size x V``.

    Returns:
        ``[N]`` float32 divergences, one per position.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f'beta must be in [0, 1], got {beta}')
    if not 0 < temperature < float('inf'):  # NaN too; at T = inf both distributions are uniform
        raise ValueError(f'temperature must be a finite number > 0, got {temperature}')
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f'student {tuple(student_logits.shape)} and teacher {tuple(teacher_logits.shape)} logits '
                         'must have the same shape (align the vocabularies first)')
    n = student_logits.shape[0]
    out = []
    for start in range(0, n, chunk_size):
        s = torch.log_softmax(student_logits[start:start + chunk_size].float() / temperature, -1)
        t = torch.log_softmax(teacher_logits[start:start + chunk_size].float() / temperature, -1)
        s, t = s.clamp(min=LOG_PROB_FLOOR), t.clamp(min=LOG_PROB_FLOOR)
        if beta == 0:
            d = kl_from_log_probs(t, s)
        elif beta == 1:
            d = kl_from_log_probs(s, t)
        else:
            m = torch.logaddexp(t + math.log(beta), s + math.log1p(-beta))
            d = beta * kl_from_log_probs(t, m) + (1 - beta) * kl_from_log_probs(s, m)
        out.append(d)
    if not out:  # no position: an empty result that still belongs to the student's graph
        return student_logits.float().sum(-1)
    return torch.cat(out)


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
