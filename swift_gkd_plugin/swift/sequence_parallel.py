"""Sequence parallelism (``--sequence_parallel_size N``, ms-swift's Ulysses) for the GKD trainer.

As in ``swift sft``: the N ranks of a group read the same rows (the data-parallel size is ``world / N``) and each
trains on its slice ``[B, ceil(L / N)]`` of every row: ms-swift's forward hook splits the inputs of the student and of
the teacher alike, so both models' outputs are this rank's slice, and the labels are split here the same way. The
loss of a rank is the sum over its slice's tokens; the group's ranks together hold each token once (the normaliser,
:meth:`BatchesMixin._count_step_tokens`, counts each group once). Samples (on-policy, seq_kd) and a served teacher's
answers are made once per group: each rank takes its share of the rows (:func:`share`) and the group gathers them
(:func:`gather_shares`).

A row whose teacher reads a view of its own (``teacher_prompt`` / ``teacher_messages``: other positions than the
student's) has its teacher run on the whole row, unsplit (:func:`whole_sequences`), and the teacher's signal taken at
the response tokens of this rank's slice of the student's row (:func:`teacher_positions_of_slice`). Memory: each rank
holds the teacher's outputs for its whole rows (logits ``[B, S_teacher, V]``, or hidden states for the fused loss),
not a slice of them.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import List

import torch
import torch.distributed as dist
from swift.sequence_parallel import sequence_parallel
from swift.utils import get_logger

from swift_gkd_plugin.core.constants import IGNORE_INDEX
from swift_gkd_plugin.core.views import check_same_response_count, response_positions, shift_labels

logger = get_logger()


def group_size() -> int:
    """The ranks of one sequence-parallel group (1 without sequence parallelism)."""
    return sequence_parallel.world_size if sequence_parallel.enabled() else 1


def group_rank() -> int:
    """This rank's index in its sequence-parallel group (0 without sequence parallelism)."""
    return sequence_parallel.sp_rank if sequence_parallel.enabled() else 0


def data_parallel_size(world_size: int) -> int:
    """The data-parallel size: the number of groups, each reading its own rows (``world_size`` without sequence
    parallelism)."""
    return world_size // group_size()


def shard_over_data_parallel(dataloader, evaluation: bool = False) -> None:
    """Make a dataloader that accelerate prepared (its ``BatchSamplerShard`` hands rank r batches r, r + world, ...)
    hand each data-parallel group its batches instead, the same on every rank of the group (ms-swift's
    ``SequenceParallelSampler`` does so for ``swift sft``). ``evaluation``: a lone group's last batch is left short,
    as one process's is (accelerate completes it with the first rows where it shards, and an evaluation's metrics
    would count them)."""
    from accelerate.data_loader import BatchSamplerShard
    shard = getattr(dataloader, 'batch_sampler', None)
    if not isinstance(shard, BatchSamplerShard):  # (an iterable dataset: accelerate dispatches its batches)
        raise TypeError(f'--sequence_parallel_size {group_size()}: a dataloader is not sharded by batches '
                        f'({type(shard).__name__}); a dataset of known length is needed (--streaming false)')
    shard.num_processes, shard.process_index = sequence_parallel.dp_world_size, sequence_parallel.dp_rank
    if evaluation and shard.num_processes == 1:
        shard.even_batches = False


def share(items: List) -> List:
    """This rank's share of a list every rank of its group holds alike: items ``r, r + N, ...`` for group rank ``r``
    (empty where the list is shorter than the group)."""
    n = group_size()
    return items if n == 1 else items[group_rank()::n]


def gather_shares(done: List) -> List:
    """The inverse of :func:`share`: every rank's ``done`` (its share, processed) put back in the list's order, on
    every rank of the group (one ``all_gather_object`` in the group)."""
    n = group_size()
    if n == 1:
        return done
    parts = [None] * n
    dist.all_gather_object(parts, done, group=sequence_parallel.sp_group)
    return [parts[i % n][i // n] for i in range(sum(len(p) for p in parts))]


def group_mean(value: torch.Tensor) -> torch.Tensor:
    """The mean of ``value`` over this rank's group (an evaluation loss: each rank's is its slice's share), the same
    on every rank of the group; ``value`` itself without sequence parallelism."""
    if group_size() == 1:
        return value
    total = value.detach().clone()
    dist.all_reduce(total, group=sequence_parallel.sp_group)
    return total / group_size()


def gather_once_per_group(accelerator, data: torch.Tensor) -> torch.Tensor:
    """accelerate's ``gather_for_metrics`` of a tensor that every rank of a group holds alike (:func:`group_mean`):
    each group's once, in the groups' order, and the last batch's rows past the dataset's end dropped as for
    ``world / N`` data-parallel ranks (the evaluation dataloader is sharded over the groups:
    :func:`shard_over_data_parallel`)."""
    gathered = accelerator.gather(data).view(-1, group_size(), *data.shape)[:, 0].flatten(0, 1)  # [world x n, ...]
    state = accelerator.gradient_state
    if state.end_of_dataloader and state.remainder > 0:
        gathered = gathered[:state.remainder]
    return gathered


@contextmanager
def whole_sequences(on: bool = True):
    """Forwards on whole sequences of this rank (sampling; a teacher's own view): ms-swift's forward hook and
    attention leave a forward alone while its group size reads 1. ``on=False``: a no-op."""
    if not on or not sequence_parallel.enabled():
        yield
        return
    size, sequence_parallel.world_size = sequence_parallel.world_size, 1
    try:
        yield
    finally:
        sequence_parallel.world_size = size


def setup_sequence_parallel(args, template) -> None:
    """Under ``--sequence_parallel_size`` the ranks of a group read one set of rows
    (:meth:`~swift_gkd_plugin.swift.rollout.sampling.RolloutMixin.get_train_dataloader`): a generation batch
    (``args.generation_batch_size``) holds the rows of the groups, not of every rank; the padding masks are dropped
    (:func:`drop_right_padding_masks`)."""
    size = template.sequence_parallel_size
    if size <= 1:
        return
    args.generation_batch_size //= size
    drop_right_padding_masks()
    world = args.world_size
    if args.process_index == 0:
        logger.info(f'swift_gkd_plugin: sequence parallelism on: {world // size} group(s) of {size} ranks '
                    f'(--sequence_parallel_size {size}, {world} processes); each rank holds 1/{size} of every '
                    f'row, and a step covers {args.per_device_train_batch_size} x {world // size} x '
                    f'{args.gradient_accumulation_steps} rows (per device x groups x accumulation)')


def drop_right_padding_masks() -> None:
    """Under sequence parallelism ms-swift's Ulysses builds, for SDPA, each forward's ``[B, 1, L, L]`` mask over the
    whole row on every rank wherever a row is padded (it pads every row to a multiple of N): memory that grows as
    ``L^2`` and that the split does not divide (72 MiB less per rank at 16k tokens without it, measured in
    ``benchmarks/bench_sp_pipeline.py``). The GKD trainer's rows are padded on the right
    (:func:`~swift_gkd_plugin.swift.setup.sequence_parallel.resolve_sequence_parallel`, and ms-swift's own padding
    to a multiple of N), where a causal mask needs no padding term: a token attends to earlier positions only, all
    real, and a pad's output has no label. So the padding mask is left out of a plain causal mask (not of a sliding
    window's, a chunked one's or a model's own mask function) while the split runs, and SDPA runs causal without a
    mask. Installed once, over ms-swift's mask function (after ``sequence_parallel.prepare``)."""
    try:
        from transformers import masking_utils
    except ImportError:
        return
    mapping = masking_utils.ALL_MASK_ATTENTION_FUNCTIONS._global_mapping
    sdpa_mask = mapping.get('sdpa')
    if sdpa_mask is None or getattr(sdpa_mask, '_gkd_right_padding', False):
        return

    def without_right_padding(*args, **kwargs):
        if (sequence_parallel.enabled() and kwargs.get('mask_function') is masking_utils.causal_mask_function
                and kwargs.get('local_size') is None):
            kwargs['attention_mask'] = None
        return sdpa_mask(*args, **kwargs)

    without_right_padding._gkd_right_padding = True
    mapping['sdpa'] = without_right_padding


def announce_batch(model_inputs) -> None:
    """Tell ms-swift's forward hook the batch the next forwards read: it pads and splits each forward's inputs by
    the positions of the batch it was last told about (ms-swift's trainers do so in ``_prepare_inputs``)."""
    keys = ('input_ids', 'position_ids', 'text_position_ids')
    sequence_parallel.prepare_inputs({k: model_inputs[k] for k in keys if model_inputs.get(k) is not None})


def local_slice(shifted_labels: torch.Tensor) -> torch.Tensor:
    """This rank's slice ``[B, S_padded / N]`` of labels already aligned with the logits (``shift_labels``): padded
    with ``IGNORE_INDEX`` to a multiple of N and split as ms-swift's hook splits the inputs."""
    padded = sequence_parallel.pad(shifted_labels, padding_value=IGNORE_INDEX)
    return sequence_parallel.split(padded, dim=1)


def response_token_counts(labels: torch.Tensor, teacher_labels: torch.Tensor) -> torch.Tensor:
    """``[student, teacher, this rank's slice of the student's]`` response tokens of a micro-batch's (unshifted)
    labels, on their device, not read; the slice is the whole row without sequence parallelism."""
    student = shift_labels(labels)
    whole = (student != IGNORE_INDEX).sum()
    sliced = (local_slice(student) != IGNORE_INDEX).sum() if sequence_parallel.enabled() else whole
    return torch.stack([whole, (shift_labels(teacher_labels) != IGNORE_INDEX).sum(), sliced])


def token_counts_entries(counts: List[int], own_view: bool, check_views: bool = True) -> dict:
    """A micro-batch's entries for the loss from :func:`response_token_counts` (read): ``gkd_tokens`` (the student's
    and the teacher's response tokens on this rank: the slice's, both, under sequence parallelism),
    ``gkd_whole_tokens`` (the student's in whole rows) and ``gkd_own_view`` (a privileged teacher view). With
    ``check_views`` the two views must have as many response tokens."""
    whole, teacher, sliced = (int(c) for c in counts)
    if check_views:
        check_same_response_count(whole, teacher)
    tokens = (sliced, sliced) if group_size() > 1 else (whole, teacher)
    return {'gkd_tokens': tokens, 'gkd_whole_tokens': whole, 'gkd_own_view': own_view}


def teacher_positions_of_slice(student_labels: torch.Tensor, teacher_labels: torch.Tensor, n_slice: int,
                               n_whole: int) -> torch.Tensor:
    """Flat indices into the teacher's whole rows ``[B, S_teacher]`` of the response tokens of this rank's slice of
    the student's rows (``local_slice``), in the slice's order. Both take shifted labels; the k-th response token of
    a student row is the k-th of its teacher row (``check_views_aligned``). ``n_slice``, ``n_whole``: the response
    tokens of the slice and of the whole rows, known beforehand (no host sync)."""
    student_mask = student_labels != IGNORE_INDEX
    ordinal = (torch.cumsum(student_mask.reshape(-1), 0) - 1).view_as(student_labels)  # each token's rank, row-major
    local = local_slice(ordinal.masked_fill(~student_mask, IGNORE_INDEX)).reshape(-1)
    local = local.index_select(0, response_positions(local != IGNORE_INDEX, n_slice))
    return response_positions(teacher_labels != IGNORE_INDEX, n_whole).index_select(0, local)
