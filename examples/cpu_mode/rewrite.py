"""The tiny CPU mode of the example scripts: rewrites one program's command line for the tiny offline models.

``python rewrite.py PROGRAM ARG...`` prints the command line to run instead, NUL-separated (``cpu_mode.sh`` calls it
from its ``swift`` / ``swift-gkd`` shell functions when ``GKD_EXAMPLE_TINY`` names a workspace). Standard library
only: it runs once per command of a script. Why: one rule set for every script instead of a CPU copy of each.
"""
import glob
import json
import os
import sys

WS = os.path.abspath(os.environ['GKD_EXAMPLE_TINY'])
STEPS = os.environ.get('GKD_EXAMPLE_TINY_STEPS', '10')
RUNS = os.path.join(WS, 'runs')  # where relative --output_dir go
TINY = {'model_type': 'qwen3', 'template': 'qwen3_nothinking', 'torch_dtype': 'float32'}
# the same cuts for every script: short completions, few steps, small batches, the demo's learning rate (the
# scripts' rates are for real models: a tiny model learns nothing in 10 steps at 1e-6)
CUTS = {'max_completion_length': '16', 'max_length': '256', 'max_steps': STEPS, 'save_steps': STEPS,
        'eval_steps': STEPS, 'per_device_train_batch_size': '4', 'per_device_eval_batch_size': '4',
        'gradient_accumulation_steps': '1', 'learning_rate': '1e-3', 'logging_steps': '1', 'report_to': 'none',
        'dataloader_num_workers': '0', 'dataset_num_proc': '1', 'check_model': 'false', 'use_cpu': 'true',
        'use_vllm': 'false'}
# GPU-only settings, dropped: DeepSpeed, flash attention, vLLM's engine, its sleep mode
DROPPED = ('deepspeed', 'attn_impl', 'sleep_level')


def parse(argv):
    """``['rlhf', '--a', '1', '--b', 'x', 'y']`` -> ``(['rlhf'], {'a': ['1'], 'b': ['x', 'y']})`` (order kept)."""
    head, flags, name = [], {}, None
    for arg in argv:
        if arg.startswith('--') and len(arg) > 2:
            name = arg[2:]
            flags[name] = []
        elif name is None:
            head.append(arg)
        else:
            flags[name].append(arg)
    return head, flags


def unparse(head, flags):
    argv = list(head)
    for name, values in flags.items():
        argv += [f'--{name}', *values]
    return argv


def solution_dataset():
    """The tiny train set with each answer also in a ``solution`` column (the RL example's reward reads it)."""
    path = os.path.join(WS, 'train_solution.jsonl')
    if not os.path.exists(path):
        with open(os.path.join(WS, 'train.jsonl')) as src, open(f'{path}.tmp', 'w') as dst:
            for line in src:
                row = json.loads(line)
                dst.write(json.dumps({**row, 'solution': row['messages'][-1]['content']}) + '\n')
        os.replace(f'{path}.tmp', path)
    return path


def model_path(model):
    """The tiny student, or the last checkpoint of an earlier step of the same script (``$OUT/sft/checkpoint-200``
    -> the last checkpoint its cut run saved in ``runs/$OUT/sft``)."""
    earlier = os.path.dirname(os.path.join(RUNS, model))
    if os.path.basename(model).startswith('checkpoint-') and os.path.isdir(earlier):
        found = glob.glob(os.path.join(earlier, '**', 'checkpoint-*'), recursive=True)
        if found:
            return max(found, key=lambda p: int(p.rsplit('-', 1)[1]))
    return os.path.join(WS, 'student')


def swift(argv):
    head, flags = parse(argv)
    model = flags.get('model', [''])[0]
    teacher = flags.get('teacher_model', [None])[0]
    flags['model'] = [model_path(model)]
    if teacher is not None:  # a self-distillation script (teacher = model) keeps one base: the student's
        flags['teacher_model'] = [flags['model'][0] if teacher == model else os.path.join(WS, 'teacher')]
        flags['teacher_model_type'] = [TINY['model_type']]
    flags.update({name: [value] for name, value in TINY.items()})
    if 'dataset' in flags:  # local files the script wrote are kept; hub datasets become the tiny train set
        train = solution_dataset() if 'reward_funcs' in flags else os.path.join(WS, 'train.jsonl')
        kept = [d for d in flags['dataset'] if os.path.isfile(d)]
        flags['dataset'] = kept or [train]
    for name in list(flags):
        if name in DROPPED or name.startswith('vllm_'):
            del flags[name]
    flags.update({name: [value] for name, value in CUTS.items()})
    if head == ['sft']:  # swift sft has no sampling flags
        del flags['use_vllm'], flags['max_completion_length']
    if 'num_generations' in flags:  # G completions per prompt: the generation batch (4) must hold whole groups
        flags['num_generations'] = ['4']
    out = flags.get('output_dir', ['output'])[0]
    flags['output_dir'] = [out if os.path.isabs(out) else os.path.join(RUNS, out)]
    return head, flags


def swift_gkd(argv):
    head, flags = parse(argv)
    if head[:1] == ['serve-teacher']:  # the tiny teacher, served on CPU on this machine only
        flags.update({'model': [os.path.join(WS, 'teacher')], 'device': ['cpu'], 'host': ['127.0.0.1'],
                      'num_threads': ['1'], **{name: [value] for name, value in TINY.items()}})
    return head, flags


def main():
    program, argv = sys.argv[1], sys.argv[2:]
    rewrite = {'swift': swift, 'swift-gkd': swift_gkd}[program]
    sys.stdout.write(''.join(f'{arg}\0' for arg in unparse(*rewrite(argv))))


if __name__ == '__main__':
    main()
