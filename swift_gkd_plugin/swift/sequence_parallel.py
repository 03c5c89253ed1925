"""Sequence parallelism (``--sequence_parallel_size N``, ms-swift's Ulysses) for the GKD trainer.

The ranks of a sequence-parallel group pool their rows and train on all of them, each on its slice of every
sequence: ms-swift's forward hook splits the inputs of the student and of the teacher alike, so both models' outputs
are this rank's slice, and the labels are split here the same way. The loss of a rank is the sum over its slice's
tokens; the group's ranks together hold each token once (the normaliser, :meth:`BatchesMixin._count_step_tokens`,
counts each group once).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import List

import torch
import torch.distributed as dist
from swift.sequence_parallel import sequence_parallel

from swift_gkd_plugin.core.constants import IGNORE_INDEX
from swift_gkd_plugin.swift.run.guards import RunError


def group_size() -> int:
    """The ranks of one sequence-parallel group (1 without sequence parallelism)."""
    return sequence_parallel.world_size if sequence_parallel.enabled() else 1


def pooled_samples(samples: List) -> List:
    """The samples of every rank of this rank's group, in rank order (the same list on each of its ranks)."""
    gathered = [None] * sequence_parallel.sp_world_size
    dist.all_gather_object(gathered, samples, group=sequence_parallel.sp_group)
    return [sample for part in gathered for sample in part]


@contextmanager
def whole_sequences():
    """Forwards on whole sequences of this rank (sampling): ms-swift's forward hook and attention leave a forward
    alone while its group size reads 1. Each rank samples its own rows; :func:`pooled_samples` then shares them."""
    if not sequence_parallel.enabled():
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


def check_one_view(student_labels: torch.Tensor, teacher_labels: torch.Tensor, size: int) -> None:
    """The teacher reads the student's rows: a row with a teacher view of its own (``teacher_messages``,
    ``teacher_images``) would put its response tokens in other slices than the student's."""
    if not torch.equal(student_labels, teacher_labels):
        raise RunError(f'--sequence_parallel_size {size} is not supported with rows that give the teacher a view of '
                       'their own (teacher_messages / teacher_images) yet (allowed: --sequence_parallel_size 1)')
