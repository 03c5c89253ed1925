"""The distillation divergence over a vocabulary split across tensor-parallel ranks (pure ``torch.distributed``).

Megatron's output layer is column-parallel: each of the ``tp`` ranks of a tensor-parallel group holds the logits of
the *same* ``N`` tokens for a contiguous slice ``[vocab_start, vocab_start + V_r)`` of the vocabulary (slices may
have different widths, e.g. when ``V`` is not divisible by ``tp``). Everything a full-vocabulary quantity needs is
recovered with a few all-reduces over that group:

* the log-normaliser ``lse = max + log(sum exp(u - max))``: one all-reduce ``MAX`` and one ``SUM`` (student and
  teacher share them);
* the per-token divergence: the per-rank partial sums of the KL terms, one all-reduce ``SUM``.

The divergence is that of every other loss path (:mod:`swift_gkd_plugin.core.row_divergence`: the generalized
JSD or any registered one), its row sums all-reduced; zero-probability entries (``-inf`` logits, e.g. padded
vocabulary) contribute 0 to the value and the gradient.

Autograd conventions (Megatron's): a tensor that is identical on every rank of the group ("replicated", e.g. the
``[N]`` divergence) receives the full gradient of the (identical) per-rank loss on every rank; the backward of an
all-reduce-SUM that produced it is therefore the identity (:func:`reduce_from_tensor_parallel_region`), and each rank
ends up with the gradient of its own vocabulary shard. ``torch.distributed.all_reduce`` itself is not differentiable;
the autograd functions below place the collectives explicitly. Every rank of the group must call these functions with
the same ``N`` (and the same ``mask`` / top-k tensors), and must run the backward (the loss is the same everywhere):
the collectives are matched one for one, also for ``N == 0`` (empty all-reduces are still issued, so ranks never
wait on each other).

Precision: float32 whatever the input dtype, except that float64 inputs are computed (and returned) in float64.

Context parallelism (different tokens on different ranks of a CP group) needs nothing here: the Megatron trainer's
``loss_func`` returns each micro-batch's summed loss and token count, and Megatron divides the sums over the data- and
context-parallel ranks.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.distributed as dist

from swift_gkd_plugin.core.constants import NEG_LOGIT as _NEG_LOGIT
from swift_gkd_plugin.core.divergence import RowwiseDivergence
from swift_gkd_plugin.core.entropy import entropy_terms_
from swift_gkd_plugin.core.row_divergence import Divergence, RowBuffers, as_divergence, divergence_rows
from swift_gkd_plugin.core.topk import bucket_divergence, teacher_tail_logmass

__all__ = [
    'reduce_from_tensor_parallel_region',
    'vocab_parallel_entropy',
    'vocab_parallel_generalized_jsd',
    'vocab_parallel_log_softmax',
    'vocab_parallel_logsumexp',
    'vocab_parallel_topk_jsd',
]

Group = Optional['dist.ProcessGroup']


# ----------------------------------------------------------------------------------------------------------------
# collectives


def _group_size(group: Group) -> int:
    """Ranks in ``group``; 1 when ``torch.distributed`` is not initialised (then every function is single-process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def _all_reduce(t: torch.Tensor, op, group: Group) -> torch.Tensor:
    """In-place all-reduce of a contiguous tensor, a no-op on a one-rank group. Returns ``t``."""
    if _group_size(group) > 1:
        dist.all_reduce(t, op=op, group=group)
    return t


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _row_max(u: torch.Tensor) -> torch.Tensor:
    """``amax`` over the last dimension, ``-inf`` for an empty shard."""
    if u.shape[-1] == 0:
        return u.new_full(u.shape[:-1], float('-inf'))
    return u.amax(-1)


def _vocab_parallel_lse(tensors: Sequence[torch.Tensor], group: Group) -> torch.Tensor:
    """Full-vocabulary ``logsumexp`` of several ``[N, V_r]`` shards with one ``MAX`` and one ``SUM`` all-reduce.

    Returns ``[len(tensors), N]``; a row whose entries are all ``-inf`` (on every rank) gives ``-inf``.
    """
    mx = torch.stack([_row_max(u) for u in tensors]).contiguous()
    _all_reduce(mx, dist.ReduceOp.MAX, group)
    mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))  # all -inf rows: exp(-inf - 0) = 0, no nan
    sums = torch.stack([(u - m.unsqueeze(-1)).exp().sum(-1) for u, m in zip(tensors, mx)]).contiguous()
    _all_reduce(sums, dist.ReduceOp.SUM, group)
    return mx + sums.log()


# ----------------------------------------------------------------------------------------------------------------
# differentiable building blocks


class _ReduceFromTensorParallelRegion(torch.autograd.Function):
    """All-reduce SUM of per-rank partials; backward is the identity (the output is replicated)."""

    @staticmethod
    def forward(ctx, partial, group):
        return _all_reduce(partial.contiguous().clone(), dist.ReduceOp.SUM, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def reduce_from_tensor_parallel_region(partial: torch.Tensor, group: Group = None) -> torch.Tensor:
    """Sum of ``partial`` over the ranks of ``group`` (replicated result); gradient: identity to every rank."""
    return _ReduceFromTensorParallelRegion.apply(partial, group)


class _VocabParallelLogSoftmax(torch.autograd.Function):

    @staticmethod
    def forward(ctx, logits, group):
        u = logits.to(_compute_dtype(logits.dtype))
        lse = _vocab_parallel_lse([u], group)[0]
        out = u - lse.unsqueeze(-1)
        ctx.group = group
        ctx.in_dtype = logits.dtype
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        (out, ) = ctx.saved_tensors
        # d s_w / d z_v = delta_vw - p_v: grad_z = g - p * sum_w g_w, where the sum runs over the full vocabulary
        total = _all_reduce(grad.sum(-1).contiguous(), dist.ReduceOp.SUM, ctx.group)
        grad_in = grad - out.exp() * total.unsqueeze(-1)
        return grad_in.to(ctx.in_dtype), None


def vocab_parallel_log_softmax(logits_shard: torch.Tensor, group: Group = None) -> torch.Tensor:
    """``log_softmax`` over a vocabulary split across ``group``; returns this rank's ``[N, V_r]`` slice.

    Forward: all-reduce ``MAX`` of the local maxima, all-reduce ``SUM`` of the local ``sum exp``. Backward:
    ``grad - softmax * all_reduce_SUM(grad.sum(-1))`` (one all-reduce, so every rank must run the backward).
    Computed in float32 (float64 for float64 input); the gradient comes back in the input's dtype.
    """
    return _VocabParallelLogSoftmax.apply(logits_shard, group)


class _VocabParallelLogSumExp(torch.autograd.Function):

    @staticmethod
    def forward(ctx, logits, group):
        u = logits.to(_compute_dtype(logits.dtype))
        lse = _vocab_parallel_lse([u], group)[0]
        ctx.in_dtype = logits.dtype
        ctx.save_for_backward(u, lse)
        return lse

    @staticmethod
    def backward(ctx, grad):
        u, lse = ctx.saved_tensors
        # d lse / d z_v = exp(z_v - lse), local; rows with lse == -inf (all -inf) get no gradient
        finite = torch.isfinite(lse)
        p = (u - torch.where(finite, lse, torch.zeros_like(lse)).unsqueeze(-1)).exp()
        coef = torch.where(finite, grad, torch.zeros_like(grad))
        return (p * coef.unsqueeze(-1)).to(ctx.in_dtype), None


def vocab_parallel_logsumexp(logits_shard: torch.Tensor, group: Group = None) -> torch.Tensor:
    """Full-vocabulary ``logsumexp`` (``[N]``, replicated) of a vocabulary split across ``group``.

    The backward needs no communication (``d lse / d z_v = softmax_v`` is local); rows that are ``-inf`` everywhere
    give ``-inf`` and a zero gradient.
    """
    return _VocabParallelLogSumExp.apply(logits_shard, group)


# ----------------------------------------------------------------------------------------------------------------
# full-vocabulary generalized JSD


def _gjsd_chunk(student, teacher, divergence: Divergence, temperature: float, group: Group, cd, want_grad: bool):
    """One chunk: rows normalised by the group's log-normaliser, then the shared
    :func:`~swift_gkd_plugin.core.row_divergence.divergence_rows` with all-reduced row sums (full-vocabulary ``D``
    and centring sums). Returns ``(D, dD/d student or None)``."""
    inv_t = 1.0 / temperature
    u = (student.detach().to(cd) * inv_t).clamp_min(_NEG_LOGIT)
    v = (teacher.detach().to(cd) * inv_t).clamp_min(_NEG_LOGIT)
    lse = _vocab_parallel_lse([u, v], group)
    s = u.sub_(lse[0].unsqueeze(-1))  # in place: u is a private copy
    t = v.sub_(lse[1].unsqueeze(-1))
    flags = torch.empty(s.shape, dtype=torch.bool, device=s.device) if divergence.needs_flags else None
    buf = RowBuffers(s=s, t=t, p_s=s.exp(), p_t=t.exp(), flags=flags)
    div, sign = divergence_rows(buf, divergence, lambda x: _all_reduce(x.sum(-1), dist.ReduceOp.SUM, group))
    return div, buf.s.mul_(sign * inv_t) if want_grad else None


def _check(divergence: Union[float, Divergence], temperature: float) -> Divergence:
    if not temperature > 0:
        raise ValueError(f'temperature must be > 0, got {temperature}')
    return as_divergence(divergence)


def _select_rows(mask: Optional[torch.Tensor], n: int):
    """Indices of the active rows, or ``None`` when every row is active (no gather/scatter)."""
    if mask is None:
        return None
    mask = mask.reshape(-1).bool()
    if mask.numel() != n:
        raise ValueError(f'mask has {mask.numel()} entries for {n} rows')
    if bool(mask.all()):
        return None
    return mask.nonzero().squeeze(1)


def _scatter_rows(values: torch.Tensor, idx: Optional[torch.Tensor], n: int) -> torch.Tensor:
    if idx is None:
        return values
    return values.new_zeros(n).index_put((idx, ), values)  # differentiable; inactive rows are 0 with 0 gradient


def vocab_parallel_generalized_jsd(student_shard: torch.Tensor,
                                   teacher_shard: torch.Tensor,
                                   divergence: Union[float, Divergence],
                                   temperature: float = 1.0,
                                   group: Group = None,
                                   *,
                                   mask: Optional[torch.Tensor] = None,
                                   chunk_size: Optional[int] = None) -> torch.Tensor:
    """Per-token generalized JSD of logits whose vocabulary is split across the ranks of ``group``.

    Args:
        student_shard: ``[N, V_r]`` this rank's slice of the student logits (differentiable, any float dtype).
        teacher_shard: ``[N, V_r]`` the teacher logits of the same slice (no gradient). Student and teacher must be
            split the same way (align padded vocabularies before splitting).
        divergence: a :class:`~swift_gkd_plugin.core.row_divergence.Divergence`, or the generalized JSD's divergence in
            ``[0, 1]`` (0 is ``KL(teacher || student)``, 1 is ``KL(student || teacher)``).
        temperature: ``T > 0``, divides both logits.
        group: the tensor-parallel group (``None``: the default group; a one-rank group or an uninitialised
            ``torch.distributed`` gives the dense single-process result).
        mask: optional ``[N]`` bool, the same on every rank; inactive rows get 0 and no gradient, and are never read
            (they may hold garbage).
        chunk_size: rows per pass (bounds the ``[chunk, V_r]`` temporaries; 3 all-reduces per pass);
            default: all rows at once.

    Returns:
        ``[N]`` divergences, identical on every rank, float32 (float64 for float64 input). The gradient flows to
        ``student_shard`` only, computed in closed form during the forward; the backward issues no collective.
    """
    divergence = _check(divergence, temperature)
    if student_shard.shape != teacher_shard.shape or student_shard.dim() != 2:
        raise ValueError(f'student {tuple(student_shard.shape)} and teacher {tuple(teacher_shard.shape)} shards must '
                         'be [N, V_r] of the same shape')
    n = student_shard.shape[0]
    idx = _select_rows(mask, n)
    s, t = (student_shard, teacher_shard) if idx is None else (student_shard[idx], teacher_shard[idx])
    want_grad = torch.is_grad_enabled() and student_shard.requires_grad
    cd = _compute_dtype(student_shard.dtype)

    def chunk(student, teacher, want):  # closed-form gradient; D and its centring sums all-reduced
        return _gjsd_chunk(student, teacher, divergence, float(temperature), group, cd, want)

    rows = max(1, int(chunk_size)) if chunk_size else max(n, 1)
    div = RowwiseDivergence.apply(s, t.detach(), chunk, rows, want_grad)
    return _scatter_rows(div, idx, n)


@torch.no_grad()
def vocab_parallel_entropy(logits_shard: torch.Tensor, temperature: float = 1.0, group: Group = None,
                           chunk_size: int = 512) -> torch.Tensor:
    """Per-row entropy of ``softmax(z / T)`` over a vocabulary split across ``group``
    (:func:`~swift_gkd_plugin.core.entropy.entropy_terms_` on this rank's slice with the row's full log-normaliser,
    the slices' shares all-reduced): ``[N]`` from ``[N, V_r]``, replicated, detached. ``-inf`` entries (Megatron's
    padded vocabulary, masked) contribute 0. ``chunk_size`` rows per pass (3 all-reduces each; every rank runs the
    same passes, also for ``N == 0``). Float32 (float64 for float64 input)."""
    if not 0 < temperature < float('inf'):  # NaN too
        raise ValueError(f'temperature must be a finite number > 0, got {temperature}')
    rows = logits_shard.reshape(-1, logits_shard.shape[-1])
    cd = _compute_dtype(rows.dtype)
    parts = []
    for start in range(0, max(rows.shape[0], 1), chunk_size):
        u = rows[start:start + chunk_size].to(cd, copy=True).div_(temperature)
        lse = _vocab_parallel_lse([u], group)[0]
        parts.append(_all_reduce(entropy_terms_(u, lse).contiguous(), dist.ReduceOp.SUM, group))
    return torch.cat(parts).reshape(logits_shard.shape[:-1])


# ----------------------------------------------------------------------------------------------------------------
# top-k teacher


class _BucketJSD(torch.autograd.Function):
    """:func:`~swift_gkd_plugin.core.topk.bucket_divergence` with its closed-form gradient (student side only)."""

    @staticmethod
    def forward(ctx, student_buckets, teacher_buckets, divergence, temperature):
        div, grad = bucket_divergence(student_buckets.detach(), teacher_buckets, divergence, temperature)
        ctx.save_for_backward(grad)
        return div

    @staticmethod
    def backward(ctx, grad_out):
        (grad, ) = ctx.saved_tensors
        return grad * grad_out.unsqueeze(-1), None, None, None


def vocab_parallel_topk_jsd(student_shard: torch.Tensor,
                            vocab_start: int,
                            teacher_topk_ids: torch.Tensor,
                            teacher_topk_logprobs: torch.Tensor,
                            divergence: Union[float, Divergence],
                            temperature: float = 1.0,
                            group: Group = None,
                            tail: bool = False,
                            *,
                            vocab_size: Optional[int] = None,
                            mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-token generalized JSD against a top-k teacher, the student's vocabulary split across ``group``.

    The definition is the single-process one of :mod:`swift_gkd_plugin.core.topk` (as used by
    :func:`~swift_gkd_plugin.core.fused.loss.fused_linear_jsd`): both sides renormalised over the valid top-k ids
    (``tail=False``), or with one more bucket holding the remaining mass on both sides (``tail=True``: teacher
    ``log(1 - sum_K exp(l))``, student ``logsumexp`` of its logits outside ``K``), tempered on the buckets.

    Communication: the student logits at the top-k ids are gathered from the ranks that own them (masked local
    gather + all-reduce ``SUM``); with ``tail``, the complement's ``logsumexp`` costs one ``MAX`` and one ``SUM``
    all-reduce more (and one scalar all-reduce for ``vocab_size`` when it is not given).

    Args:
        student_shard: ``[N, V_r]`` this rank's slice of the student logits, covering the global ids
            ``[vocab_start, vocab_start + V_r)`` (differentiable, any float dtype; slices may differ in width).
        vocab_start: first global id of this rank's slice.
        teacher_topk_ids: ``[N, k]`` global token ids (the same on every rank).
        teacher_topk_logprobs: ``[N, k]`` their full-vocabulary log-probabilities at temperature 1; ``-inf`` marks
            unused slots. Rows without a finite entry carry no teacher information: they get 0 and no gradient.
        divergence, temperature: as in :func:`vocab_parallel_generalized_jsd`.
        group: the tensor-parallel group.
        tail: add the tail bucket.
        vocab_size: the student's full vocabulary size (sum of the slice widths); only used with ``tail`` (a row
            whose valid ids cover it has an empty teacher tail); computed with an all-reduce when not given.
        mask: optional ``[N]`` bool, the same on every rank; inactive rows get 0 and no gradient.

    Returns:
        ``[N]`` divergences, identical on every rank, float32 (float64 for float64 input).
    """
    divergence = _check(divergence, temperature)
    if student_shard.dim() != 2 or teacher_topk_ids.shape != teacher_topk_logprobs.shape \
            or teacher_topk_ids.shape[0] != student_shard.shape[0]:
        raise ValueError(f'student shard {tuple(student_shard.shape)}, ids {tuple(teacher_topk_ids.shape)} and '
                         f'logprobs {tuple(teacher_topk_logprobs.shape)} must be [N, V_r], [N, k], [N, k]')
    n, width = student_shard.shape
    cd = _compute_dtype(student_shard.dtype)
    lp = teacher_topk_logprobs.detach().to(device=student_shard.device, dtype=cd)
    ids = teacher_topk_ids.to(student_shard.device).long()
    valid = lp > float('-inf')
    active = valid.any(-1)
    if mask is not None:
        active = active & mask.reshape(-1).to(active.device).bool()
    if n and ids.shape[1]:  # unused slots point at the row's top-1 id: a valid id, and nothing is gathered twice
        top1 = ids.gather(1, lp.argmax(-1, keepdim=True))
        ids = torch.where(valid, ids, top1)
    local = ids - int(vocab_start)
    own = (local >= 0) & (local < width) & valid
    local = local.clamp(0, max(width - 1, 0))

    if width:  # the same -1e30 stand-in for -inf logits as the fused loss
        picked = student_shard.gather(1, local).to(cd).clamp_min(_NEG_LOGIT)
        picked = torch.where(own, picked, torch.zeros((), dtype=cd, device=picked.device))
    else:
        picked = student_shard.new_zeros(ids.shape, dtype=cd) + student_shard.sum().to(cd) * 0  # keeps the graph
    y = reduce_from_tensor_parallel_region(picked, group).masked_fill(~valid, float('-inf'))
    teacher = lp
    if tail:
        if vocab_size is None:
            vs = torch.tensor([width], dtype=torch.int64, device=student_shard.device)
            vocab_size = int(_all_reduce(vs, dist.ReduceOp.SUM, group).item())
        # the student's complement of K: its top-k ids masked out on the rank that owns them (ids owned elsewhere
        # write into a dummy last column; every write is True, so duplicates are deterministic)
        hit = torch.zeros(n, width + 1, dtype=torch.bool, device=student_shard.device)
        hit.scatter_(1, torch.where(own, local, width), True)
        y_tail = vocab_parallel_logsumexp(student_shard.to(cd).masked_fill(hit[:, :width], float('-inf')), group)
        y = torch.cat([y, y_tail.unsqueeze(1)], 1)
        teacher = torch.cat([lp, teacher_tail_logmass(lp, valid.sum(-1), int(vocab_size)).unsqueeze(1)], 1)

    idx = None if bool(active.all()) else active.nonzero().squeeze(1)
    if idx is not None:
        y, teacher = y[idx], teacher[idx]
    div = _BucketJSD.apply(y, teacher, divergence, float(temperature))
    return _scatter_rows(div, idx, n)
