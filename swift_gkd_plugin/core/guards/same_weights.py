"""A teacher that is a copy of the student: every step's loss is 0 (the first exactly, the next ones only from
weight decay), so the run learns nothing. Decided from the weights at train begin, not from a zero gradient norm."""
from __future__ import annotations

from typing import TYPE_CHECKING, Dict, Optional, Tuple

from swift_gkd_plugin.core.constants import PRIVILEGED_COLUMNS

if TYPE_CHECKING:
    import torch


def same_parameters(ours: Dict[str, 'torch.Tensor'], theirs: Dict[str, 'torch.Tensor']) -> bool:
    """Whether two models' named parameters (or the local shards of two models in one parallel layout) are equal:
    the same names, shapes and values. Stops at the first difference (a real teacher differs at its first
    parameter)."""
    return bool(ours) and ours.keys() == theirs.keys() and all(
        p.shape == theirs[n].shape and p.numel() > 0 and bool((p.detach() == theirs[n].detach().to(p.device)).all())
        for n, p in ours.items())


#: the name pieces of a PEFT LoRA model that the plain model does not have
_PEFT_PREFIX, _BASE_LAYER = 'base_model.model.', '.base_layer'


def computed_parameters(named: Dict[str, 'torch.Tensor']) -> Optional[Dict[str, 'torch.Tensor']]:
    """The parameters a model computes with, under the plain model's names. A model without LoRA: ``named`` itself.
    A PEFT LoRA model whose every ``lora_B`` is zero (a fresh adapter, which adds nothing): its base weights, named as
    in the plain model (``base_model.model.`` and ``.base_layer`` dropped). None where the model computes something
    else (a non-zero adapter) or a layout not read here (``modules_to_save``). Why: a LoRA student's names never
    equal a plain teacher's, so a copy of its base as teacher passed the copy check."""
    if not any('lora_' in name for name in named):
        return named
    base = {}
    for name, p in named.items():
        if 'modules_to_save' in name or 'original_module' in name:
            return None
        if 'lora_' in name:
            if ('lora_B' in name or 'lora_embedding_B' in name) and bool(p.detach().ne(0).any()):
                return None
            continue
        plain = name[len(_PEFT_PREFIX):] if name.startswith(_PEFT_PREFIX) else name
        base[plain.replace(_BASE_LAYER, '')] = p
    return base


def copy_of_the_student(teacher: Dict[str, 'torch.Tensor'], student: Dict[str, 'torch.Tensor']) -> bool:
    """Whether the teacher's named parameters (or local shards) are what the student computes with
    (:func:`computed_parameters`): every step's divergence would be 0, with a zero gradient."""
    computed = computed_parameters(student)
    return computed is not None and same_parameters(teacher, computed)


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
