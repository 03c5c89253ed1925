"""Which data source a GKD step trains on: student samples, teacher samples, or dataset responses.

The decision is a pure function of ``(seed, step, lmbda, seq_kd)``: every rank computes the same answer without
talking to the others, the sequence is reproducible from the seed, and a run resumed at step ``k`` continues with
exactly the decisions an uninterrupted run would have made.
"""
from __future__ import annotations

import json
import os
import random
from enum import Enum
from typing import Optional

__all__ = ['DATA_SOURCES', 'Mode', 'choose_mode', 'mode_draw', 'mode_log_path', 'record_mode', 'sampling_seed',
           'step_mode']


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


def step_mode(args, step: int, training: bool, log_path: Optional[str] = None) -> 'Mode':
    """The mode a trainer takes at generation step ``step``, logged to ``log_path`` while training.

    :func:`choose_mode` on the arguments' ``seed``, ``lmbda`` and ``seq_kd`` while training; evaluation always scores
    the dataset responses. Both trainers call it, so ``swift rlhf`` and ``megatron rlhf`` decide (and log) alike.
    """
    mode = choose_mode(args.seed, step, args.lmbda, args.seq_kd) if training else Mode.OFF_POLICY
    if training and log_path is not None:
        record_mode(log_path, args.seed, step, mode)
    return mode


#: The value of ms-swift's ``DataSource`` (``swift.rlhf_trainers.gkd_loss``) that each mode trains on.
DATA_SOURCES = {Mode.ON_POLICY: 'student', Mode.SEQ_KD: 'teacher', Mode.OFF_POLICY: 'dataset'}


def mode_log_path(output_dir: str, rank: int) -> str:
    """Where rank ``rank`` logs its modes: ``<output_dir>/gkd_modes/rank<rank>.jsonl``."""
    return os.path.join(output_dir, 'gkd_modes', f'rank{rank}.jsonl')


def record_mode(path: str, seed: int, step: int, mode: 'Mode') -> None:
    """Append ``{"step", "mode", "draw"}`` for a training step to the mode log ``path`` (one JSON line per step)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'a') as f:
        f.write(json.dumps({'step': step, 'mode': mode.value, 'draw': mode_draw(seed, step)}) + '\n')


def sampling_seed(seed: int, step: int, rank: int, stream: str = 'sampling') -> int:
    """The seed of rank ``rank``'s sampler at generation step ``step``: a 63-bit integer, distinct per rank (and per
    ``stream``, for samplers that must not share draws, e.g. SKD's teacher).

    With several completions per prompt, the copies of one prompt may sit on different ranks; a common random
    stream would give them the same completion. Seeding from ``(seed, step, rank)`` gives every rank its own stream,
    and a run resumed at step ``k`` samples what the uninterrupted run sampled there.
    """
    return random.Random(f'swift-gkd-{stream}:{int(seed)}:{int(step)}:{int(rank)}').getrandbits(63)
