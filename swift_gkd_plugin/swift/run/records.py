"""What a run leaves for its reader: the model card of the run folder, and the line that names the checkpoint and the
step a resumed run continues from.

TRL's trainer (ms-swift's GKD trainer derives from it) writes ``README.md`` into ``--output_dir`` before each
checkpoint save (``SFTTrainer._save_checkpoint`` -> ``create_model_card``): "a fine-tuned version of [None]" for a
local student, with a usage snippet on ``device="cuda"``. :func:`model_card` is the plugin's instead (the trainer's
``create_model_card``): the student, the teacher, the GKD settings, the versions, and a snippet that runs on a CPU.
"""
from __future__ import annotations

import json
import os
from typing import Optional

from swift.utils import get_logger
from transformers import TrainerCallback

import swift_gkd_plugin
from swift_gkd_plugin.swift.setup.checkpoints import ARGS_FILE

logger = get_logger()


class LogResume(TrainerCallback):
    """At the start of a resumed run (``--resume_from_checkpoint``), once the trainer has read the checkpoint's
    state: the checkpoint and the global step it continues from (rank 0)."""

    def on_train_begin(self, args, state, control, **kwargs):
        checkpoint = getattr(args, 'resume_from_checkpoint', None)
        if checkpoint and state.is_world_process_zero:
            only = ' (its weights only: --resume_only_model true)' if getattr(args, 'resume_only_model', False) else ''
            logger.info(f'swift_gkd_plugin: resuming from --resume_from_checkpoint {checkpoint}{only} at global step '
                        f'{state.global_step} of {state.max_steps}: the next step is {state.global_step + 1}')


def _given(output_dir: str) -> dict:
    """ms-swift's copy of the run's arguments (``args.json`` in the run folder), or {}."""
    try:
        with open(os.path.join(output_dir, ARGS_FILE), encoding='utf-8') as f:
            given = json.load(f)
        return given if isinstance(given, dict) else {}
    except (OSError, ValueError):
        return {}


def _teacher(given: dict) -> str:
    if given.get('teacher_model_server'):
        return f'served at `{given["teacher_model_server"]}` (--teacher_model_server)'
    adapters = given.get('teacher_adapters') or []
    if adapters and not given.get('teacher_model'):
        return f'the student\'s base with the adapter `{adapters[0]}` (--teacher_adapters)'
    return f'`{given.get("teacher_model")}` (--teacher_model)'


def _ms_swift_version() -> str:
    from swift_gkd_plugin.options.ms_swift_flag_table import installed_ms_swift
    return installed_ms_swift() or 'unknown'


SNIPPET = '''```python
{imports}

path = {path!r}  # or the hub id you pushed it to
tokenizer = AutoTokenizer.from_pretrained(path)
model = {auto_class}.from_pretrained(path)  # on the CPU; model.to('cuda') on a GPU
messages = [{{'role': 'user', 'content': 'Hello!'}}]
inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors='pt', return_dict=True)
output = model.generate(**inputs, max_new_tokens=64)
print(tokenizer.decode(output[0, inputs['input_ids'].shape[1]:], skip_special_tokens=True))
```'''


def model_card(trainer, checkpoint: str) -> str:
    """The card of the run whose newest checkpoint is ``checkpoint`` (the one being saved)."""
    args, given = trainer.args, _given(trainer.args.output_dir)

    def value(name):
        return given.get(name, getattr(args, name, None))

    student = given.get('model') or getattr(getattr(trainer.model, 'model_info', None), 'model_dir', None)
    lora = value('tuner_type') not in (None, 'full')
    divergence = getattr(trainer, '_divergence', None) or value('gkd_divergence')
    fused = getattr(trainer, '_fused', None)
    loss = f'{divergence} on the {"fused" if fused else "dense"} loss path' if fused is not None else f'{divergence}'
    topk = value('gkd_logits_topk')
    rows = [
        ('student (--model)', f'`{student}`'),
        ('teacher', _teacher(given)),
        ('--lmbda', f'{value("lmbda")} (the probability of an on-policy step: the student samples)'),
        ('--seq_kd', f'{value("seq_kd")} (true: the teacher samples the other steps; false: dataset responses)'),
        ('--beta', f'{value("beta")} (the generalized JSD\'s weight: 0 KL(teacher || student), 1 the reverse)'),
        ('--temperature', f'{value("temperature")} (of the loss)'),
        ('loss', f'{loss} (--gkd_divergence {value("gkd_divergence")}, --gkd_loss_impl {value("gkd_loss_impl")}'
                 f'{f", --gkd_logits_topk {topk}" if topk else ""})'),
        ('tuner', f'{value("tuner_type")}'),
        ('dataset', ', '.join(f'`{d}`' for d in (given.get('dataset') or [])) or 'unknown'),
        ('steps', f'{trainer.state.global_step} of {trainer.state.max_steps} (written with '
                  f'{os.path.basename(checkpoint)})'),
        ('versions', f'swift-gkd-plugin {swift_gkd_plugin.__version__}, ms-swift {_ms_swift_version()}'),
    ]
    auto_class = 'AutoPeftModelForCausalLM' if lora else 'AutoModelForCausalLM'
    imports = ('from peft import AutoPeftModelForCausalLM\nfrom transformers import AutoTokenizer' if lora else
               'from transformers import AutoModelForCausalLM, AutoTokenizer')
    table = '\n'.join(f'| {name} | {text} |' for name, text in rows)
    base = f'base_model: {student}\n' if isinstance(student, str) and not os.path.exists(student) else ''
    return (f'---\n{base}library_name: {"peft" if lora else "transformers"}\ntags:\n- swift-gkd-plugin\n- gkd\n'
            f'- knowledge-distillation\n- ms-swift\n---\n\n'
            f'# {os.path.basename(os.path.abspath(args.output_dir))}\n\n'
            f'This model is the student `{student}` distilled from the teacher {_teacher(given)} with Generalized '
            f'Knowledge Distillation (GKD, '
            f'Agarwal et al., *On-Policy Distillation of Language Models*) by '
            f'swift-gkd-plugin {swift_gkd_plugin.__version__} through '
            f'`swift rlhf --rlhf_type gkd`.\n\n| setting | value |\n| --- | --- |\n{table}\n\n'
            f'## Use\n\n{SNIPPET.format(imports=imports, auto_class=auto_class, path=os.path.abspath(checkpoint))}\n')


def write_model_card(trainer) -> Optional[str]:
    """``README.md`` of the run folder (rank 0), for the checkpoint being saved; returns its path."""
    if not trainer.is_world_process_zero():
        return None
    checkpoint = os.path.join(trainer.args.output_dir, f'checkpoint-{trainer.state.global_step}')
    path = os.path.join(trainer.args.output_dir, 'README.md')
    with open(path, 'w', encoding='utf-8') as f:
        f.write(model_card(trainer, checkpoint))
    return path
