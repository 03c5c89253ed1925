"""A frozen teacher LoRA adapter living next to the student's trainable one on the same base weights."""
from __future__ import annotations

import json
import os
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


def adapter_base_mismatch(adapter_dir: str, model_dir: str) -> str | None:
    """Why the LoRA adapter in ``adapter_dir`` cannot sit on the model in ``model_dir``, or None if it fits.

    Checked without loading weights: the model is built on the meta device from its config and every ``lora_A``
    / ``lora_B`` tensor of the adapter (shapes read from the safetensors header) must match its target module.
    """
    from accelerate import init_empty_weights
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    weights = os.path.join(adapter_dir, 'adapter_model.safetensors')
    if not os.path.exists(os.path.join(adapter_dir, 'adapter_config.json')) or not os.path.exists(weights):
        return f'{adapter_dir} holds no adapter_config.json and adapter_model.safetensors'
    with open(os.path.join(adapter_dir, 'adapter_config.json')) as f:
        peft_type = json.load(f).get('peft_type', 'LORA')
    if peft_type != 'LORA':
        return None  # only LoRA shapes are checked here; peft reports other mismatches when loading
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=True)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=True)
    modules = dict(model.named_modules())
    with safe_open(weights, framework='pt') as f:
        for key in f.keys():
            if '.lora_A.' not in key and '.lora_B.' not in key:
                continue
            module_name = key.split('.lora_')[0]
            for prefix in ('base_model.model.', ''):
                if module_name.startswith(prefix) and module_name[len(prefix):] in modules:
                    target = modules[module_name[len(prefix):]]
                    break
            else:
                return f'its tensor {key} targets a module the base model does not have'
            shape = f.get_slice(key).get_shape()
            weight = getattr(target, 'weight', None)
            if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
                continue
            out_features, in_features = weight.shape
            expected = in_features if '.lora_A.' in key else out_features
            got = shape[1] if '.lora_A.' in key else shape[0]
            if got != expected:
                return (f'its tensor {key} has shape {list(shape)}, but the base module has '
                        f'{in_features} inputs and {out_features} outputs')
    return None
