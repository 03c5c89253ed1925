"""A frozen teacher LoRA adapter living next to the student's trainable one on the same base weights."""
from __future__ import annotations

from contextlib import contextmanager

import torch
from peft.tuners.tuners_utils import BaseTunerLayer

TEACHER_ADAPTER = 'gkd_teacher'


def load_frozen_adapter(peft_model, path: str, name: str = TEACHER_ADAPTER) -> None:
    """Load ``path`` as an extra, frozen adapter of ``peft_model``; the student's adapter stays the active one."""
    layers = [m for m in peft_model.modules() if isinstance(m, BaseTunerLayer)]
    saved = [m._active_adapter for m in layers]
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    # peft initialises the new layers at random before loading the saved weights over them: keep the training's
    # random stream (seeded by the Trainer before this runs) as if nothing had been drawn, as with a teacher loaded
    # before the Trainer
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        peft_model.load_adapter(path, adapter_name=name, is_trainable=False)  # may re-freeze/re-activate adapters
    for m, value in zip(layers, saved):
        m._active_adapter = value
    for param_name, param in peft_model.named_parameters():
        param.requires_grad_(param_name in trainable)  # the student's trainable set, exactly as before


@contextmanager
def active_adapter(model, name: str):
    """Run ``model`` with adapter ``name`` active on every LoRA layer, without touching ``requires_grad``.

    peft's ``set_adapter`` also flips ``requires_grad``, which DDP and ZeRO must not see change mid-training; the
    active adapter of a layer is only its ``_active_adapter`` attribute, which this restores afterwards.
    """
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    saved = [m._active_adapter for m in layers]
    for m in layers:
        m._active_adapter = [name]
    try:
        yield model
    finally:
        for m, value in zip(layers, saved):
            m._active_adapter = value


@contextmanager
def eval_mode(model):
    """Run ``model`` in eval mode (no LoRA, attention or hidden dropout), restoring each module's own mode after.

    A teacher is frozen: when the student's module plays it (adapter off, or the teacher adapter on), it must not
    drop out as the training student does. ``train()`` / ``eval()`` would flip every module alike; restoring module
    by module keeps whatever mix of modes the student had.
    """
    modes = [(m, m.training) for m in model.modules()]
    for m, _ in modes:
        m.training = False
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training
