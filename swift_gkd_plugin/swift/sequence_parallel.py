"""Sequence parallelism (``--sequence_parallel_size N``, ms-swift's Ulysses) for the GKD trainer.

The ranks of a sequence-parallel group pool their rows and train on all of them, each on its slice of every
sequence: ms-swift's forward hook splits the inputs of the student and of the teacher alike, so both models' outputs
are this rank's slice, and the labels are split here the same way. The loss of a rank is the sum over its slice's
tokens; the group's ranks together hold each token once (the normaliser, :meth:`BatchesMixin._count_step_tokens`,
counts each group once).

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

from swift_gkd_plugin.core.constants import IGNORE_INDEX


def group_size() -> int:
    """The ranks of one sequence-parallel group (1 without sequence parallelism)."""
    return sequence_parallel.world_size if sequence_parallel.enabled() else 1


def pooled_samples(samples: List) -> List:
    """The samples of every rank of this rank's group, in rank order (the same list on each of its ranks)."""
    gathered = [None] * sequence_parallel.sp_world_size
    dist.all_gather_object(gathered, samples, group=sequence_parallel.sp_group)
    return [sample for part in gathered for sample in part]


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


def teacher_positions_of_slice(student_labels: torch.Tensor, teacher_labels: torch.Tensor) -> torch.Tensor:
    """Flat indices into the teacher's whole rows ``[B, S_teacher]`` of the response tokens of this rank's slice of
    the student's rows (``local_slice``), in the slice's order. Both take shifted labels; the k-th response token of
    a student row is the k-th of its teacher row (``check_views_aligned``). One host sync (the slice's count)."""
    student_mask = student_labels != IGNORE_INDEX
    ordinal = (torch.cumsum(student_mask.reshape(-1), 0) - 1).view_as(student_labels)  # each token's rank, row-major
    local = local_slice(ordinal.masked_fill(~student_mask, IGNORE_INDEX))
    teacher_index = torch.nonzero((teacher_labels != IGNORE_INDEX).reshape(-1)).squeeze(1)
    return teacher_index[local[local != IGNORE_INDEX]]
