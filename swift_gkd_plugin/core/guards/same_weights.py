"""A teacher that is a copy of the student: every step's loss is 0 (the first exactly, the next ones only from
weight decay), so the run learns nothing. Decided from the weights at train begin, not from a zero gradient norm."""
from __future__ import annotations

from typing import Dict, Optional, Tuple

from swift_gkd_plugin.core.constants import PRIVILEGED_COLUMNS


def same_parameters(ours: Dict[str, 'torch.Tensor'], theirs: Dict[str, 'torch.Tensor']) -> bool:
    """Whether two models' named parameters (or the local shards of two models in one parallel layout) are equal:
    the same names, shapes and values. Stops at the first difference (a real teacher differs at its first
    parameter)."""
    return bool(ours) and ours.keys() == theirs.keys() and all(
        p.shape == theirs[n].shape and p.numel() > 0 and bool((p.detach() == theirs[n].detach().to(p.device)).all())
        for n, p in ours.items())


def copy_of_the_student_cause(teacher: str) -> str:
    """The cause, for the messages of both trainers."""
    return f'--teacher_model {teacher} has the student\'s weights exactly (a copy of --model): distil from another model'


def privileged_row_count(dataset) -> Optional[Tuple[int, int]]:
    """``(rows with a teacher_prompt or teacher_messages, rows)`` of a training set with columns (a ``datasets``
    table), else None (unknown): a copy of the student that reads such a prompt is a teacher with something to
    add."""
    if not hasattr(dataset, '__len__') or not hasattr(dataset, 'column_names'):
        return None
    names = [name for name in PRIVILEGED_COLUMNS if name in (dataset.column_names or [])]
    return sum(1 for name in names for value in dataset[name] if value), len(dataset)
