"""The GKD loss of ``megatron rlhf`` on logit shards: the Megatron trainer's loss, framework-free.

Megatron's output layer is column-parallel: every rank of a tensor-parallel group holds the logits of the same
positions over its slice ``[vocab_start, vocab_start + V_r)`` of the *padded* vocabulary (Megatron rounds the
vocabulary up; the rows past the model's own vocabulary are not tokens). This module turns a micro-batch's logit
shards, its labels and the teacher's signal into the divergence sum and the token count that Megatron's schedule
expects, with :mod:`swift_gkd_plugin.core.tensor_parallel` doing the collectives; and the local teacher's top-k
signal, cut micro-batch by micro-batch. Pure ``torch.distributed``: tested on CPU with gloo processes.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, Optional, Tuple, Union

import torch
import torch.distributed as dist

from swift_gkd_plugin.core.constants import IGNORE_INDEX
from swift_gkd_plugin.core.row_divergence import Divergence, gated_row_count
from swift_gkd_plugin.core.tensor_parallel import (vocab_parallel_entropy, vocab_parallel_generalized_jsd,
                                                   vocab_parallel_log_softmax, vocab_parallel_topk_jsd)
from swift_gkd_plugin.core.topk import drop_ids_outside_vocab, topk_teacher_entropy
from swift_gkd_plugin.core.views import check_same_response_count

Group = Optional['dist.ProcessGroup']


def mask_padded_vocab(shard: torch.Tensor, vocab_start: int, vocab_size: Optional[int]) -> torch.Tensor:
    """``shard`` with ``-inf`` at the global ids ``>= vocab_size`` (Megatron's padding): no probability there.

    Differentiable (masked entries get no gradient); returns ``shard`` itself when nothing is padded.
    """
    if vocab_size is None:
        return shard
    ids = torch.arange(vocab_start, vocab_start + shard.shape[-1], device=shard.device)
    padded = ids >= vocab_size
    return shard.masked_fill(padded, float('-inf')) if bool(padded.any()) else shard


def vocab_parallel_topk(values: torch.Tensor, k: int, vocab_start: int, group: Group = None
                        ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Global top-k over a vocabulary split across ``group``: ``(values [N, k], global ids [N, k])``, replicated.

    Each rank offers its local top-``min(k, V_r)``; one all-gather, then the top-k of the candidates. Ties are broken
    towards the lower rank, so every rank returns the same ids.
    """
    n, width = values.shape
    local_k = min(k, width)
    vals, ids = values.topk(local_k, dim=-1) if local_k else (values.new_zeros(n, 0), values.new_zeros(
        n, 0, dtype=torch.long))
    ids = ids + vocab_start
    if local_k < k:  # a narrow shard pads its offer with -inf candidates
        vals = torch.cat([vals, vals.new_full((n, k - local_k), float('-inf'))], 1)
        ids = torch.cat([ids, ids.new_zeros(n, k - local_k)], 1)
    world = dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1
    if world > 1:
        all_vals = [torch.empty_like(vals) for _ in range(world)]
        all_ids = [torch.empty_like(ids) for _ in range(world)]
        dist.all_gather(all_vals, vals.contiguous(), group=group)
        dist.all_gather(all_ids, ids.contiguous(), group=group)
        vals, ids = torch.cat(all_vals, 1), torch.cat(all_ids, 1)
    top, pick = vals.topk(k, dim=-1)
    return top, ids.gather(1, pick)


@torch.no_grad()
def teacher_topk_logprobs(teacher_shard: torch.Tensor, k: int, vocab_start: int, vocab_size: Optional[int],
                          group: Group = None, chunk_size: int = 1024) -> Tuple[torch.Tensor, torch.Tensor]:
    """The teacher's top-k **log-probabilities** (full-vocabulary normaliser, padding excluded) and global ids.

    ``teacher_shard`` is ``[..., V_r]``, e.g. a micro-batch's ``[B, S, V_r]`` logits as Megatron's forward returns
    them; the results are ``[..., k]``, replicated on the group. ms-swift takes the top-k of raw logits, which is
    enough when both sides are renormalised over the top-k; the tail bucket (``--gkd_topk_tail``) needs the true
    log-probabilities. Float32 (float64 for float64 input), ``chunk_size`` rows at a time: the float32 temporaries
    are ``[chunk_size, V_r]``, not a copy of the whole shard (every rank of the group holds the same rows, so all
    run the same number of chunks and collectives).
    """
    lead = teacher_shard.shape[:-1]
    rows = teacher_shard.reshape(-1, teacher_shard.shape[-1])
    tops, ids = [], []
    for start in range(0, max(rows.shape[0], 1), chunk_size):
        chunk = rows[start:start + chunk_size]
        logits = chunk if chunk.dtype == torch.float64 else chunk.float()
        logprobs = vocab_parallel_log_softmax(mask_padded_vocab(logits, vocab_start, vocab_size), group)
        top, top_ids = vocab_parallel_topk(logprobs, k, vocab_start, group)
        tops.append(top)
        ids.append(top_ids)
    return torch.cat(tops).reshape(*lead, k), torch.cat(ids).reshape(*lead, k)


def shard_vocab_start(shard: torch.Tensor, group: Group = None) -> int:
    """First global vocabulary id of this rank's logit slice: Megatron splits the padded vocabulary evenly, in
    tensor-parallel rank order."""
    rank = dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0
    return rank * shard.shape[-1]


def teacher_topk_per_micro_batch(micro_batches: Iterable, forward: Callable[[Any], Tuple[Optional[torch.Tensor], Any]],
                                 k: int, vocab_size: Optional[int], group: Group = None
                                 ) -> Iterator[Tuple[Optional[Tuple[torch.Tensor, torch.Tensor]], Any]]:
    """The local teacher's top-k signal, one micro-batch at a time: ``(topk or None, labels)`` per micro-batch.

    ``forward(micro_batch)`` returns the teacher's ``[B, S, V_r]`` logit shard (``None`` off the last pipeline stage)
    and its labels. Each shard is cut to :func:`teacher_topk_logprobs` before the next forward, so the full logits of
    only one micro-batch exist at a time, not those of a whole generation batch (16 micro-batches of 4k tokens over a
    152k vocabulary are ~20 GB per TP rank in bf16).
    """
    for micro_batch in micro_batches:
        logits, labels = forward(micro_batch)
        if logits is None:
            yield None, labels
            continue
        topk = teacher_topk_logprobs(logits, k, shard_vocab_start(logits, group), vocab_size, group)
        del logits
        yield topk, labels


class _Deferred:
    """The value of a micro-batch's ``teacher_output`` until :func:`teacher_on_demand` computes it."""

    def __repr__(self):
        return 'DEFERRED_TEACHER'


DEFERRED_TEACHER = _Deferred()


def defer_teacher(micro_batches: Iterable[dict]) -> None:
    """Mark each micro-batch's full-vocabulary teacher output as to be computed when the micro-batch is consumed."""
    for micro_batch in micro_batches:
        micro_batch['teacher_output'] = DEFERRED_TEACHER


def has_deferred_teacher(micro_batches: Iterable[dict]) -> bool:
    return any(mb.get('teacher_output') is DEFERRED_TEACHER for mb in micro_batches)


def fill_deferred_teacher(micro_batches: Iterable[dict], compute: Callable[[dict], Any]) -> None:
    """Compute every deferred teacher output of ``micro_batches`` now (outside a pipeline schedule)."""
    for micro_batch in micro_batches:
        if micro_batch.get('teacher_output') is DEFERRED_TEACHER:
            micro_batch['teacher_output'] = compute(micro_batch)


def teacher_on_demand(micro_batches: Iterator[dict], compute: Callable[[dict], Any]) -> Iterator[dict]:
    """The micro-batches of a schedule, each with its deferred teacher output computed (``compute(micro_batch)``)
    just before the micro-batch is handed out.

    ``micro_batches`` is an iterator in the ``next()`` sense only: Megatron's schedules hand ``forward_step``
    megatron-core's ``RerunDataIterator``, which has ``__next__`` and no ``__iter__``.

    ms-swift computes the full-vocabulary teacher logits of a whole generation batch before training on it: 16
    micro-batches of 4k tokens over a 152k vocabulary are ~20 GB per TP rank in bf16. Handed out one at a time, and
    dropped by the consumer (ms-swift's ``forward_step`` pops ``teacher_output``; its loss drops it after the
    micro-batch's backward), only the micro-batch being trained on holds teacher logits. The teacher runs inside the
    student's schedule, so this is for schedules without pipeline stages (a pipelined teacher would exchange
    activations inside the student's pipeline): with PP > 1 use :func:`fill_deferred_teacher` per train step.
    """
    return _TeacherOnDemand(micro_batches, compute)


class _TeacherOnDemand:

    def __init__(self, micro_batches, compute):
        self._source, self._compute = micro_batches, compute

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        micro_batch = next(self._source)
        fill_deferred_teacher((micro_batch, ), self._compute)
        return micro_batch


def check_views_split_alike(labels: torch.Tensor, teacher_labels: Optional[torch.Tensor], group: Group) -> None:
    """Under context parallelism, the student's and the teacher's response positions on this rank must coincide.

    Megatron-SWIFT cuts every sequence into 2 CP chunks at its own length (``get_batch_on_this_cp_rank``), the
    teacher's view as well: a teacher prompt of another length (``teacher_prompt`` / ``teacher_messages``) puts the
    teacher's response rows on other ranks than the student's, and the loss would pair other positions (silently
    where the counts happen to agree). One all-reduce over ``group`` (the CP group): every rank decides alike.
    """
    if teacher_labels is None:
        return
    differ = teacher_labels.shape != labels.shape or not torch.equal(teacher_labels != IGNORE_INDEX,
                                                                    labels != IGNORE_INDEX)
    flag = torch.tensor([float(differ)], device=labels.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    if flag.item():
        raise ValueError('a teacher view with a prompt of its own (a teacher_prompt or teacher_messages row) is not '
                         'supported with --context_parallel_size > 1 in megatron rlhf: context parallelism cuts the '
                         "student's and the teacher's sequences at their own lengths, so the teacher's response "
                         "tokens are not on the ranks of the student's. Use --context_parallel_size 1 for such rows, "
                         'or swift rlhf')


def _full_width(width: int, device: torch.device, group: Group) -> int:
    """The padded vocabulary: the sum of the slice widths over ``group``."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return width
    total = torch.tensor([width], dtype=torch.long, device=device)
    dist.all_reduce(total, group=group)
    return int(total.item())


def gkd_loss_on_shards(student_shard: torch.Tensor,
                       labels: torch.Tensor,
                       *,
                       divergence: Union[float, Divergence],
                       temperature: float,
                       vocab_start: int,
                       vocab_size: Optional[int] = None,
                       teacher_shard: Optional[torch.Tensor] = None,
                       teacher_topk_ids: Optional[torch.Tensor] = None,
                       teacher_topk_logprobs: Optional[torch.Tensor] = None,
                       teacher_labels: Optional[torch.Tensor] = None,
                       tail: bool = False,
                       group: Group = None,
                       chunk_size: int = 512) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """Sum over the response positions of the divergence, from a micro-batch's logit shards.

    Args:
        student_shard: ``[B, S, V_r]`` (or ``[1, T, V_r]`` packed) this rank's slice of the student logits.
        labels: ``[B, S]`` labels aligned with the logits (``labels[b, s]`` is the token predicted at ``s``), -100 off.
        divergence, temperature: the divergence (a :class:`~swift_gkd_plugin.core.row_divergence.Divergence`, or
            the generalized JSD's beta: 0 = KL(teacher || student), 1 = KL(student || teacher)) and its temperature.
        vocab_start: the first global id of this rank's slice.
        vocab_size: the model's own vocabulary; Megatron's padded ids ``>= vocab_size`` are masked out of both sides.
        teacher_shard: ``[B', S', V_r]`` the teacher's logits over the same slice, or
        teacher_topk_ids, teacher_topk_logprobs: ``[B', S', k]`` a top-k teacher (global ids, log-probabilities,
            ``-inf`` for unused slots), replicated on the group; ids the student does not have (``>= vocab_size``,
            or beyond the padded vocabulary when ``vocab_size`` is None) are dropped.
        teacher_labels: the teacher view's labels when it has its own prompt (privileged prompts); its response
            positions must hold as many tokens as the student's, in the same order. ``None``: the student's.
        tail: with a top-k teacher, the bucket holding the mass outside the top-k on both sides.
        group: the tensor-parallel group.
        chunk_size: rows per pass of the full-vocabulary divergence.

    Returns:
        ``(divergence_sum, per_token [N], N)``: the sum (replicated, differentiable with respect to this rank's
        slice), the per-token divergences and the number of response positions.
    """
    student_mask = labels != IGNORE_INDEX
    teacher_mask = student_mask if teacher_labels is None else teacher_labels != IGNORE_INDEX
    n_student = int(student_mask.sum())
    check_same_response_count(n_student, int(teacher_mask.sum()), student_mask, teacher_mask)
    student = mask_padded_vocab(student_shard[student_mask], vocab_start, vocab_size)
    if teacher_topk_ids is not None:
        limit = vocab_size if vocab_size is not None else _full_width(student.shape[-1], student.device, group)
        ids, logprobs = drop_ids_outside_vocab(teacher_topk_ids[teacher_mask], teacher_topk_logprobs[teacher_mask],
                                               limit)
        per_token = vocab_parallel_topk_jsd(student, vocab_start, ids, logprobs, divergence, temperature, group,
                                            tail=tail, vocab_size=limit)
    else:
        teacher = teacher_shard[teacher_mask]
        if teacher.shape[-1] != student.shape[-1]:
            raise ValueError(f'teacher and student logit shards differ in width ({teacher.shape[-1]} vs '
                             f'{student.shape[-1]}): in megatron rlhf teacher and student must have the same '
                             'padded vocabulary (the same tokenizer and vocabulary size)')
        per_token = vocab_parallel_generalized_jsd(student, mask_padded_vocab(teacher, vocab_start, vocab_size),
                                                   divergence, temperature, group, chunk_size=chunk_size)
    return per_token.sum(), per_token, n_student


@torch.no_grad()
def entropies_on_shards(student_shard: torch.Tensor, labels: torch.Tensor, *, temperature: float,
                        divergence: Union[float, Divergence, None] = None, **shards
                        ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """The summed entropies of ``softmax(. / temperature)`` over a micro-batch's response positions: the student's
    (``gkd/entropy``) and the teacher's at the same positions (``gkd/teacher_entropy``), as in ``swift rlhf``; and,
    when ``divergence`` has the entropy-aware mix, how many of those positions its gate passes
    (``gkd/entropy_fkl_fraction``'s numerator, else None).

    ``shards``: the keyword arguments of :func:`gkd_loss_on_shards` but ``divergence`` (the same masks and
    padded-vocabulary rule). The teacher's entropy: over its logit shards, or for a top-k teacher that of the bucket
    distribution the loss compares (:func:`~swift_gkd_plugin.core.topk.topk_teacher_entropy`, on the ids the loss
    keeps). Replicated on the group.
    """
    vocab_start, vocab_size = shards['vocab_start'], shards.get('vocab_size')
    group, chunk_size = shards.get('group'), shards.get('chunk_size', 512)
    student_mask = labels != IGNORE_INDEX
    teacher_labels = shards.get('teacher_labels')
    teacher_mask = student_mask if teacher_labels is None else teacher_labels != IGNORE_INDEX
    student = mask_padded_vocab(student_shard[student_mask], vocab_start, vocab_size)
    entropy = vocab_parallel_entropy(student, temperature, group, chunk_size).sum()
    if shards.get('teacher_topk_ids') is not None:
        limit = vocab_size if vocab_size is not None else _full_width(student.shape[-1], student.device, group)
        _, logprobs = drop_ids_outside_vocab(shards['teacher_topk_ids'][teacher_mask],
                                             shards['teacher_topk_logprobs'][teacher_mask], limit)
        teacher_rows = topk_teacher_entropy(logprobs, temperature, shards.get('tail', False), limit)
    else:
        teacher = mask_padded_vocab(shards['teacher_shard'][teacher_mask], vocab_start, vocab_size)
        teacher_rows = vocab_parallel_entropy(teacher, temperature, group, chunk_size)
    gated = None if divergence is None else gated_row_count(teacher_rows, divergence)
    return entropy, teacher_rows.sum(), gated
