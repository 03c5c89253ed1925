"""Which data source a GKD step trains on: student samples, teacher samples, or dataset responses.

The decision is a pure function of ``(seed, step, lmbda, seq_kd)``: every rank computes the same answer without
talking to the others, the sequence is reproducible from the seed, and a run resumed at step ``k`` continues with
exactly the decisions an uninterrupted run would have made.
"""
from __future__ import annotations

import random
from enum import Enum

__all__ = ['Mode', 'choose_mode', 'mode_draw', 'sampling_seed']


class Mode(str, Enum):
    """Where the response tokens of a step come from."""
    ON_POLICY = 'on_policy'  # the student samples (probability lmbda)
    SEQ_KD = 'seq_kd'  # the teacher samples (seq_kd=True and not on-policy)
    OFF_POLICY = 'off_policy'  # the dataset's responses

    @property
    def needs_generation(self) -> bool:
        return self is not Mode.OFF_POLICY


def mode_draw(seed: int, step: int) -> float:
    """The uniform number in ``[0, 1)`` that decides step ``step``.

    A string seed is hashed with SHA-512 by :class:`random.Random` (stable across processes and Python runs,
    unlike ``hash()``), and keeping seed and step apart avoids ``seed + step`` collisions between runs whose seeds
    differ by a few units.
    """
    return random.Random(f'swift-gkd-mode:{int(seed)}:{int(step)}').random()


def choose_mode(seed: int, step: int, lmbda: float, seq_kd: bool) -> Mode:
    """The GKD mode of generation step ``step`` (one optimizer step's batch).

    With probability ``lmbda`` the student samples; otherwise the teacher samples if ``seq_kd``, else the dataset
    response is used. ``lmbda = 0`` never and ``lmbda = 1`` always chooses on-policy.
    """
    if not 0.0 <= lmbda <= 1.0:
        raise ValueError(f'lmbda must be in [0, 1], got {lmbda}')
    if mode_draw(seed, step) < lmbda:
        return Mode.ON_POLICY
    return Mode.SEQ_KD if seq_kd else Mode.OFF_POLICY


def sampling_seed(seed: int, step: int, rank: int) -> int:
    """The seed of rank ``rank``'s sampler at generation step ``step``: a 63-bit integer, distinct per rank.

    With several completions per prompt, the copies of one prompt may sit on different ranks; a common random
    stream would give them the same completion. Seeding from ``(seed, step, rank)`` gives every rank its own stream,
    and a run resumed at step ``k`` samples what the uninterrupted run sampled there.
    """
    return random.Random(f'swift-gkd-sampling:{int(seed)}:{int(step)}:{int(rank)}').getrandbits(63)
