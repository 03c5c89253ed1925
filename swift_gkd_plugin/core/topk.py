"""Generalized JSD over a teacher's top-k support, with an optional tail bucket.

A teacher that only reports its ``k`` most likely tokens (a vLLM server, a cached top-k dump) gives, per position,
ids ``K`` and their full-vocabulary log-probabilities ``l_j`` at temperature 1; unused slots hold ``-inf``. The
student's logits ``z`` cover the whole vocabulary. Both sides are reduced to the same small support ("buckets"),
tempered there, and compared with the divergence of :mod:`swift_gkd_plugin.core.row_divergence`:

**Without tail** (ms-swift's rule): the buckets are the valid ids of ``K``,

* teacher ``q = softmax(l_K / T)``, student ``p = softmax(z_K / T)``,

i.e. both distributions are renormalised over ``K``. Mass the student puts outside ``K`` is invisible to the loss.

**With tail** (``topk_tail=True``): one more bucket holds everything outside ``K``. Its temperature-1 log-masses are

* teacher ``a_tail = log(1 - sum_{j in K} exp(l_j))`` (``-inf`` when ``K`` covers the vocabulary; evaluated in
  float64 and floored at the reported values' own rounding: :func:`teacher_tail_logmass`),
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

from typing import Tuple, Union

import torch

from swift_gkd_plugin.core.divergence import generalized_jsd, tempered_divergence_rows
from swift_gkd_plugin.core.entropy import tempered_entropy
from swift_gkd_plugin.core.row_divergence import Divergence, as_divergence
from swift_gkd_plugin.core.teacher_signal import TeacherTopK

__all__ = ['bucket_divergence', 'drop_ids_outside_vocab', 'teacher_tail_logmass', 'topk_divergence_dense',
           'topk_of_logits', 'topk_teacher_entropy']

def teacher_tail_logmass(logprobs: torch.Tensor, num_valid: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """The log of the teacher's mass outside its top-k, as the reported log-probabilities define it.

    Defined as ``log(max(1 - sum_j exp(l_j), r))`` with ``r = sum_j exp(l_j) ulp(l_j) / 2``: the mass the reported
    values ``l_j`` leave, taken as exact numbers, but never below the uncertainty that storing them in their dtype
    leaves in their summed mass (half an ulp of each ``l_j``). Evaluated in float64 as
    ``-expm1(l_1) - sum_{j > 1} exp(l_j)`` (``l_1`` the largest) so that a confident teacher's tail (``l_1 = -1e-8``)
    keeps its digits: a float32 ``log1mexp(logsumexp(l))`` loses them (``1 + 1e-9`` rounds to 1) and gave ``-inf``
    or values nats off. A report whose mass reaches 1 (a top-1 rounded to 0 by a float32 ``log_softmax``) leaves the
    tail undetermined below ``r``: ``log(r)`` keeps the reverse KL finite where ``-inf`` made it ~1e30. Details:
    ``docs_en/fused_loss.md`` (the tail mass).

    Args:
        logprobs: ``[C, k]`` full-vocabulary log-probabilities at temperature 1 (``-inf`` = unused slot).
        num_valid: ``[C]`` number of finite slots per row.
        vocab_size: vocabulary size; a row whose valid slots cover it has an empty tail (``-inf``), whatever
            rounding says about the reported mass.

    Returns:
        ``[C]`` in ``logprobs``' dtype; ``-inf`` where the tail is empty; ``0`` for a row without a valid slot.
    """
    if not logprobs.shape[-1]:  # no slot: all the mass is outside
        return logprobs.new_zeros(logprobs.shape[:-1])
    valid = logprobs > float('-inf')
    mag = logprobs.abs()
    half_ulp = torch.where(valid, torch.nextafter(mag, torch.full_like(mag, float('inf'))) - mag, 0).double() / 2
    lp = logprobs.double()
    top, first = lp.max(-1, keepdim=True)
    p = lp.exp().scatter(-1, first, 0.0)  # the other slots' masses (0 on unused ones)
    mass = -torch.expm1(top.squeeze(-1)) - p.sum(-1)  # 1 - sum_j exp(l_j), without the cancellation of 1 - p_1
    floor = (lp.exp() * half_ulp).sum(-1)
    tail = torch.maximum(mass, floor).log()
    return tail.masked_fill(num_valid >= vocab_size, float('-inf')).to(logprobs.dtype)


@torch.no_grad()
def topk_teacher_entropy(logprobs: torch.Tensor, temperature: float, tail: bool, vocab_size: int) -> torch.Tensor:
    """Per-row entropy of the teacher distribution a top-k loss compares: ``softmax(l_K / T)`` over the valid slots
    (renormalised), or with ``tail`` the ``(k+1)``-bucket ``softmax([l_K, a_tail] / T)``
    (:func:`teacher_tail_logmass`). Not the teacher's full-vocabulary entropy, which top-k does not determine: at
    ``T = 1`` the tail version is a lower bound of it (lumping the tail into one bucket), the renormalised one is too
    wherever the top-k holds nearly all the mass. ``[C]`` float32 (float64 for float64 input); 0 for a row without a
    valid slot."""
    if tail:
        logprobs = torch.cat([logprobs, teacher_tail_logmass(logprobs, (logprobs > float('-inf')).sum(-1),
                                                             vocab_size).unsqueeze(-1)], -1)
    return tempered_entropy(logprobs, temperature)


def bucket_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      divergence: Union[float, Divergence], temperature: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """The divergence on a small support, with its closed-form gradient.

    ``s = log_softmax(student_logits / T)``, ``t = log_softmax(teacher_logits / T)``; ``D`` from
    :func:`~swift_gkd_plugin.core.row_divergence.divergence_rows`, as on full rows. ``-inf`` entries are buckets of
    probability zero and contribute 0 (an entry where one side is ``-inf`` and the other is not gives a huge
    finite divergence for the KLs, as a masked logit does on full rows).

    Computed in float64 whatever the inputs' dtype (``[C, k+1]`` is small): a confident student's tail bucket, or
    bucket logits of magnitude 1e4, lose the gradient's digits in float32. Callers that form a bucket logit (the
    student's tail ``m + log S``) should form it in float64 too.

    Args:
        student_logits: ``[C, K]`` float32 or float64.
        teacher_logits: ``[C, K]``; each row needs one finite entry.
        divergence: a :class:`~swift_gkd_plugin.core.row_divergence.Divergence`, or the generalized JSD's
            ``beta`` in ``[0, 1]``.
        temperature: ``T > 0``.

    Returns:
        ``(D [C], dD/d student_logits [C, K])``, in the student's dtype; the gradient includes the ``1 / T``.
    """
    d, g = tempered_divergence_rows(student_logits.double(), teacher_logits.double(), as_divergence(divergence),
                                    temperature)
    return d.to(student_logits.dtype), g.to(student_logits.dtype)


def drop_ids_outside_vocab(ids: torch.Tensor, logprobs: torch.Tensor, limit: int
                           ) -> Tuple[torch.Tensor, torch.Tensor]:
    """A top-k teacher without the ids ``>= limit`` (the student has no such token, e.g. a served teacher with a
    larger vocabulary): their slots become unused (``-inf``), their mass goes to the tail like any other mass
    outside the top-k. Shared by ``swift rlhf`` and ``megatron rlhf`` (where no rank would own them and the
    student's logit there would read 0)."""
    outside = ids >= limit  # no host synchronisation: masked whether or not any id is outside
    return ids.masked_fill(outside, 0), logprobs.masked_fill(outside, float('-inf'))


def topk_divergence_dense(student_logits: torch.Tensor, ids: torch.Tensor, logprobs: torch.Tensor,
                          divergence: Union[float, Divergence], temperature: float
                          ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The divergence over a top-k teacher's support on full student logits (the dense loss's top-k path): both
    sides renormalised over the valid ids (ms-swift's definition; the fused loss without the tail).

    Ids outside the student's vocabulary (a served teacher's padded rows) are dropped as
    :func:`drop_ids_outside_vocab` drops them for the fused loss, so both losses see one support; unused slots
    (``-inf``) are buckets of probability 0 on both sides.

    Args:
        student_logits: ``[N, V]`` (differentiable).
        ids: ``[N, k]`` teacher ids; logprobs: ``[N, k]`` their log-probabilities at temperature 1.
        divergence: a :class:`~swift_gkd_plugin.core.row_divergence.Divergence` or the generalized JSD's ``beta``.
        temperature: ``T > 0``.

    Returns:
        ``(per-token divergence [N], top-1 agreement [N] bool, covered [N] bool)``: a row without a valid id is not
        covered, its divergence 0 and never in agreement.
    """
    ids, logprobs = drop_ids_outside_vocab(ids.clamp_min(0), logprobs.float(), student_logits.shape[-1])
    valid = logprobs > float('-inf')
    covered = valid.any(-1)
    teacher_k = logprobs.masked_fill(~covered[:, None], 0.0)
    student_k = student_logits.gather(-1, ids).masked_fill(~valid & covered[:, None], float('-inf'))
    per_token = generalized_jsd(student_k, teacher_k, divergence, temperature).masked_fill(~covered, 0.0)
    top1 = ids.gather(-1, teacher_k.argmax(-1, keepdim=True))[:, 0]
    agree = (student_logits.argmax(-1) == top1) & covered
    return per_token, agree, covered


def topk_of_logits(logits: torch.Tensor, k: int, chunk_size: int = 1024) -> TeacherTopK:
    """A local teacher's top-k from its full logits ``[N, V]``: ids and log-probabilities at temperature 1.

    Each log-probability is accurate to its own float32 rounding, the top-1 included: it is formed as
    ``(z_j - m) - log1p(sum_{v != top-1} exp(z_v - m))``, where ``log_softmax`` rounds ``1 + 1e-9`` to 1 and
    reports a confident teacher's top-1 as exactly 0, losing the mass outside the top-1 that the tail bucket needs
    (:func:`teacher_tail_logmass`). Chunked: float32 rows of at most ``chunk_size x V`` at a time (an unchunked
    float32 copy is about 5 GB at N = 8k, V = 152k).
    """
    parts = [_precise_topk(logits[i:i + chunk_size].float(), k) for i in range(0, logits.shape[0], chunk_size)]
    if not parts:
        empty = logits.new_zeros(0, k)
        return TeacherTopK(empty.long(), empty.float())
    return TeacherTopK(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))


def _precise_topk(z: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    top, ids = z.topk(k, dim=-1)  # the same ids as the log-probabilities' top-k
    m = top[:, :1]
    rest = torch.sub(z, m).exp_().scatter_(1, ids[:, :1], 0.0)  # the top-1's own term, exactly 1, left out
    return ids, top - m - torch.log1p(rest.sum(-1, keepdim=True))
