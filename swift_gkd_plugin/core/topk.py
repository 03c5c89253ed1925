"""Generalized JSD over a teacher's top-k support, with an optional tail bucket.

A teacher that only reports its ``k`` most likely tokens (a vLLM server, a cached top-k dump) gives, per position,
ids ``K`` and their full-vocabulary log-probabilities ``l_j`` at temperature 1; unused slots hold ``-inf``. The
student's logits ``z`` cover the whole vocabulary. Both sides are reduced to the same small support ("buckets"),
tempered there, and compared with the generalized JSD of :mod:`swift_gkd_plugin.core.divergence`:

**Without tail** (ms-swift's rule): the buckets are the valid ids of ``K``,

* teacher ``q = softmax(l_K / T)``, student ``p = softmax(z_K / T)``,

i.e. both distributions are renormalised over ``K``. Mass the student puts outside ``K`` is invisible to the loss.

**With tail** (``topk_tail=True``): one more bucket holds everything outside ``K``. Its temperature-1 log-masses are

* teacher ``a_tail = log(1 - sum_{j in K} exp(l_j))`` (``-inf`` when ``K`` covers the vocabulary, or when rounding
  makes the reported mass reach 1),
* student ``b_tail = logsumexp_{v not in K} z_v``, i.e. ``b_tail - logsumexp(z) = log(1 - sum_{j in K} p_s(j))``,
  the student's exact tail mass (computed over the complement, so without the cancellation of ``1 - sum``),

and, with ``a_j = l_j`` and ``b_j = z_j`` on ``K``, the ``(k+1)``-bucket distributions are tempered as categoricals:
``q = softmax(a / T)``, ``p = softmax(b / T)``.

Why the tail is tempered as one bucket on *both* sides: with ``T != 1`` the teacher's tempered tail mass,
``sum_{v not in K} p_t(v)^(1/T) / Z_T``, depends on how the tail mass is spread, which top-k does not say. Using the
student's exact tempered tail against any estimate of the teacher's would make ``student == teacher`` a non-zero,
non-stationary point of the loss; applying one rule to both sides keeps the loss zero exactly when the lumped
distributions agree, for every ``T``. Consequences:

* ``T == 1``: ``p`` and ``q`` are the exact lumped (bucketed) full distributions, so the loss is the divergence of
  the lumped distributions, which tends to the full-vocabulary loss as ``k -> V`` and equals it at ``k == V``.
* ``k == V`` (tail empty on both sides): ``softmax(l / T)`` and ``softmax(z / T)`` are the exact tempered
  distributions, so the loss is the full-vocabulary loss for every ``T``.
* tail mass -> 0: the loss tends to the no-tail loss.

When to use the tail: with a small ``k`` (tens of ids, typical of teacher servers), where the teacher's top-k mass is
well below 1; without it, the student can move mass outside the teacher's support at no cost. With a large ``k``
covering nearly all of a peaked teacher's mass, both variants agree and the tail only costs one reduction.

Rows whose logprobs are all ``-inf`` carry no teacher information; :func:`fused_linear_jsd` treats them as inactive
(ms-swift drops them too).
"""
from __future__ import annotations

import math
from typing import Tuple

import torch

__all__ = ['bucket_divergence', 'drop_ids_outside_vocab', 'log1mexp', 'teacher_tail_logmass']

_LOG_HALF = -math.log(2.0)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x <= 0``, accurate on both ends (Maechler, 2012); ``x >= 0`` gives ``-inf``."""
    x = x.clamp(max=0.0)
    # near 0, 1 - exp(x) cancels: use expm1; far below 0, exp(x) is tiny: use log1p
    return torch.where(x > _LOG_HALF, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def teacher_tail_logmass(logprobs: torch.Tensor, num_valid: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """``log(1 - sum_j exp(logprobs_j))`` per row: the log of the teacher's mass outside its top-k.

    Args:
        logprobs: ``[C, k]`` float32 full-vocabulary log-probabilities at temperature 1 (``-inf`` = unused slot).
        num_valid: ``[C]`` number of finite slots per row.
        vocab_size: vocabulary size; a row whose valid slots cover it has an empty tail (``-inf``), whatever
            rounding says about the reported mass.

    Returns:
        ``[C]`` float32, ``-inf`` where the tail is empty or the reported mass reaches 1.
    """
    tail = log1mexp(torch.logsumexp(logprobs, dim=-1))
    return tail.masked_fill(num_valid >= vocab_size, float('-inf'))


def bucket_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float,
                      temperature: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Generalized JSD on a small support, with its closed-form gradient.

    ``s = log_softmax(student_logits / T)``, ``t = log_softmax(teacher_logits / T)``; ``D`` as in
    :mod:`swift_gkd_plugin.core.divergence`. ``-inf`` entries are buckets of probability zero and contribute 0
    (entries where one side is ``-inf`` and the other is not give the true, possibly infinite, divergence for
    ``beta in {0, 1}``). Meant for ``[C, k]`` tensors, so clarity wins over in-place tricks here.

    Args:
        student_logits: ``[C, K]`` float32.
        teacher_logits: ``[C, K]`` float32; each row needs one finite entry.
        beta: in ``[0, 1]``.
        temperature: ``T > 0``.

    Returns:
        ``(D [C], dD/d student_logits [C, K])``, both float32; the gradient includes the ``1 / T`` factor.
    """
    s = torch.log_softmax(student_logits / temperature, dim=-1)
    t = torch.log_softmax(teacher_logits / temperature, dim=-1)
    ps, pt = s.exp(), t.exp()
    zero = s.new_zeros(())
    if beta == 0:
        # D = sum p_t (t - s);  dD/du = p_s - p_t  (u = z / T)
        div = torch.where(pt > 0, pt * (t - s), zero).sum(-1)
        grad = ps - pt
    elif beta == 1:
        # D = sum p_s (s - t);  dD/du = p_s (s - t - D)
        diff = torch.where(ps > 0, s - t, zero)
        div = (ps * diff).sum(-1)
        grad = torch.where(ps > 0, ps * (diff - div[:, None]), zero)
    else:
        # D = b KL(t||m) + (1-b) KL(s||m);  dD/ds (s free) = (1-b) p_s (s - m), then through log_softmax:
        # dD/du = (1-b) p_s (s - m - KL(s||m))
        m = torch.logaddexp(s + math.log1p(-beta), t + math.log(beta))
        ds = torch.where(ps > 0, s - m, zero)
        dt = torch.where(pt > 0, t - m, zero)
        ks = (ps * ds).sum(-1)
        div = beta * (pt * dt).sum(-1) + (1 - beta) * ks
        grad = (1 - beta) * ps * (ds - ks[:, None])
    return div, grad / temperature


def drop_ids_outside_vocab(ids: torch.Tensor, logprobs: torch.Tensor, limit: int
                           ) -> Tuple[torch.Tensor, torch.Tensor]:
    """A top-k teacher without the ids ``>= limit`` (the student has no such token, e.g. a served teacher with a
    larger vocabulary): their slots become unused (``-inf``), their mass goes to the tail like any other mass
    outside the top-k. Shared by ``swift rlhf`` and ``megatron rlhf`` (where no rank would own them and the
    student's logit there would read 0)."""
    outside = ids >= limit  # no host synchronisation: masked whether or not any id is outside
    return ids.masked_fill(outside, 0), logprobs.masked_fill(outside, float('-inf'))
