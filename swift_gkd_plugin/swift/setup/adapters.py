"""LoRA adapters: a teacher adapter checked against its base before any model loads (``--teacher_adapters``: shapes read
from the adapter's safetensors header and the base built on the meta device, no weights loaded); and a student's LoRA
that leaves a mixture-of-experts model's fused expert weights out, said once the model is built."""
from __future__ import annotations

import json
import os

import torch


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


def unadapted_experts(model) -> list:
    """The fused expert weights of a LoRA model that carry no adapter, as ``--target_parameters`` names them (e.g.
    ``mlp.experts.gate_up_proj``): transformers 5 stores a MoE layer's experts as 3-D parameters, not linear layers,
    so ``--target_modules`` (``all-linear`` too) puts LoRA on attention only. Empty for a model without LoRA, without
    fused experts, or whose experts carry adapters (``--target_parameters``)."""
    names = [name for name, _ in model.named_parameters()]
    if not any('lora_' in name for name in names) or any('.experts.' in n and 'lora_' in n for n in names):
        return []
    fused = {'.'.join(name.split('.')[-3:]) for name, p in model.named_parameters()
             if p.dim() == 3 and '.experts.' in name}
    return sorted(fused)


def warn_unadapted_experts(trainer) -> None:
    """One warning (rank 0) where the student's LoRA leaves a mixture-of-experts model's fused experts out."""
    experts = unadapted_experts(trainer.accelerator.unwrap_model(trainer.model))
    if experts and trainer.args.process_index == 0:
        from swift.utils import get_logger
        get_logger().warning(
            f'swift_gkd_plugin: the LoRA adapter leaves the experts out: this mixture-of-experts model keeps them as '
            f'fused weights ({", ".join(experts)}), which --target_modules does not reach (all-linear neither), so only '
            f'attention and the other linear layers learn. To adapt the experts too, pass --target_parameters '
            f'{" ".join(experts)} (with --lora_dropout 0: peft\'s LoRA on parameters takes no dropout)')
