"""Random-sampling KD (Anshumann et al. 2025, "Sparse Logit Sampling", arXiv 2503.16870): the forward KL from a few
token ids drawn from the teacher.

In: ``[N, V]`` teacher logits (once, to draw ``S`` ids per position from ``p_T = softmax(teacher / T)``); later the
``[N, V]`` student logits and those ``[N, S]`` ids. Out: the ids, and per position the sampled cross-entropy
``-(1/S) sum_j log q_T(y_j)``, ``q_T = softmax(student / T)``. Why: its expectation is ``H(p_T, q_T)``, so its gradient
is an unbiased estimate of the gradient of ``KL(p_T || q_T)`` (``beta = 0``), with no teacher log-probability stored.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from swift_gkd_plugin.core.constants import NEG_LOGIT
from swift_gkd_plugin.core.divergence import RowwiseDivergence

__all__ = ['draw_teacher_samples', 'sampled_forward_kl']


def _check_temperature(temperature: float) -> None:
    if not 0 < temperature < math.inf:  # NaN too
        raise ValueError(f'temperature must be a finite number > 0, got {temperature}')


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def draw_teacher_samples(logits: torch.Tensor,
                         num_samples: int,
                         temperature: float,
                         generator: Optional[torch.Generator] = None,
                         chunk_size: int = 1024) -> torch.Tensor:
    """``[N, num_samples]`` int64 ids drawn with replacement from ``softmax(logits / temperature)``, row by row,
    sorted ascending per row (the order carries no information; sorted ids compress).

    Inverse-CDF sampling: the uniforms are drawn in one ``torch.rand`` call (so any ``chunk_size`` gives the same ids
    for the same generator state, on any device), then each chunk of rows is tempered, exponentiated and cumulated in
    one ``[chunk_size, V]`` float32 buffer (float64 for float64 logits). ``-inf`` logits are never drawn; a row with no
    finite logit raises.
    """
    if logits.dim() != 2:
        raise ValueError(f'logits must be 2-D [N, V], got shape {tuple(logits.shape)}')
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f'num_samples must be an int >= 1, got {num_samples!r}')
    _check_temperature(temperature)
    n, vocab = logits.shape
    if vocab == 0:
        raise ValueError('logits have an empty vocabulary')
    cd = _compute_dtype(logits.dtype)
    uniforms = torch.rand(n, num_samples, generator=generator, dtype=cd, device=logits.device)
    out = torch.empty(n, num_samples, dtype=torch.long, device=logits.device)
    step = max(1, int(chunk_size))
    for start in range(0, n, step):
        sl = slice(start, start + step)
        cdf = logits[sl].detach().to(cd, copy=True).div_(temperature)
        top = cdf.amax(-1, keepdim=True)
        if not torch.isfinite(top).all():
            raise ValueError(f'a row of logits[{start}:{start + step}] has no finite maximum (all -inf, or inf/NaN)')
        cdf.sub_(top).exp_().cumsum_(-1)  # unnormalised: the targets below are scaled by each row's total instead
        total = cdf[:, -1:]
        # u * total < total (clamped below it, against rounding up), so the id found has a positive probability
        target = torch.minimum(uniforms[sl] * total, torch.nextafter(total, torch.zeros_like(total)))
        out[sl] = torch.searchsorted(cdf, target.contiguous(), right=True).clamp_(max=vocab - 1)
    return out.sort(dim=-1).values


def _sampled_cross_entropy_rows(student: torch.Tensor, ids: torch.Tensor, temperature: float, want_grad: bool
                                ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(L [C], dL/d student [C, V] or None)`` of one chunk: ``L = lse(u) - mean_valid u[id]``, ``u = student / T``;
    ``dL/d student = (softmax(u) - counts / S_valid) / T``, zero on rows with no valid slot."""
    cd = _compute_dtype(student.dtype)
    u = (student.detach().to(cd) / temperature).clamp_min_(NEG_LOGIT)  # a private copy; -inf -> finite
    valid = ids >= 0
    safe = ids.clamp_min(0)
    count = valid.sum(-1)
    weight = valid.to(cd) / count.clamp_min(1).to(cd).unsqueeze(-1)  # [C, S]: 1/S_valid per valid slot, else 0
    lse = torch.logsumexp(u, -1)
    loss = torch.where(count > 0, lse - (u.gather(-1, safe) * weight).sum(-1), torch.zeros_like(lse))
    if not want_grad:
        return loss, None
    grad = u.sub_(lse.unsqueeze(-1)).exp_()  # softmax(u), in place
    grad.scatter_add_(-1, safe, -weight)
    grad.mul_(((count > 0).to(cd) / temperature).unsqueeze(-1))
    return loss, grad


def sampled_forward_kl(student_logits: torch.Tensor,
                       sample_ids: torch.Tensor,
                       temperature: float,
                       teacher_entropy: Optional[torch.Tensor] = None,
                       chunk_size: int = 1024) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Per-row sampled cross-entropy ``L = -(1/S_valid) sum_{valid j} log_softmax(student / T)[id_j]``.

    Convention (matched to :func:`~swift_gkd_plugin.core.divergence.generalized_jsd` at ``beta = 0``, which is plain
    ``KL(p_T || q_T)`` with no ``T^2`` factor): ``E[dL/d student] = d KL(p_T || q_T) / d student`` exactly, the
    ``1/T`` of the chain rule included and nothing else. The gradient is formed chunk by chunk in the forward (as the
    dense loss does, one ``[N, V]`` buffer) and applied by autograd.

    Args:
        student_logits: ``[N, V]`` student logits (any float dtype; differentiable).
        sample_ids: ``[N, S]`` ids drawn from ``p_T`` (:func:`draw_teacher_samples`); an id ``< 0`` is an unused slot.
            A row with no valid slot gives 0 and no gradient.
        temperature: ``T > 0``, the one the ids were drawn at.
        teacher_entropy: optional ``[N]`` entropy of ``p_T`` (nats).
        chunk_size: rows at a time.

    Returns:
        ``(loss [N], estimate [N] or None)``, in float32 (float64 for float64 students). ``estimate = loss -
        teacher_entropy``, detached: the unbiased per-row estimate of ``KL(p_T || q_T)``, for logging.
    """
    _check_temperature(temperature)
    if student_logits.dim() != 2 or sample_ids.dim() != 2 or sample_ids.shape[0] != student_logits.shape[0]:
        raise ValueError(f'student_logits must be [N, V] and sample_ids [N, S], got {tuple(student_logits.shape)} '
                         f'and {tuple(sample_ids.shape)}')
    if sample_ids.dtype.is_floating_point or sample_ids.dtype == torch.bool:
        raise ValueError(f'sample_ids must be an integer tensor, got {sample_ids.dtype}')
    if sample_ids.numel() and int(sample_ids.max()) >= student_logits.shape[1]:
        raise ValueError(f'sample_ids hold id {int(sample_ids.max())}, outside the vocabulary of '
                         f'{student_logits.shape[1]}')
    if teacher_entropy is not None and teacher_entropy.shape != (student_logits.shape[0], ):
        raise ValueError(f'teacher_entropy must be [N] = [{student_logits.shape[0]}], got '
                         f'{tuple(teacher_entropy.shape)}')
    want_grad = torch.is_grad_enabled() and student_logits.requires_grad

    def chunk(student, ids, want):
        return _sampled_cross_entropy_rows(student, ids, float(temperature), want)

    loss = RowwiseDivergence.apply(student_logits, sample_ids.to(device=student_logits.device, dtype=torch.long),
                                   chunk, max(1, int(chunk_size)), want_grad)
    if teacher_entropy is None:
        return loss, None
    return loss, loss.detach() - teacher_entropy.detach().to(loss)
