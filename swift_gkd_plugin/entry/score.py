"""``swift-gkd score``: a teacher scores a dataset once into a teacher-score store.

In: ``swift rlhf``'s teacher flags (``--teacher_model``, or ``--teacher_model_server`` with the ``--model`` whose
tokenizer and template make the rows), ``--dataset``, ``--template``, ``--max_length``, ``--gkd_logits_topk``,
``--output_dir``. Out: the store in ``--output_dir`` (``manifest.json``, ``shards/``), made by a ``swift rlhf`` run
with ``--gkd_score_only true``: every row encoded exactly as training encodes it, scored by the teacher as training
scores it, nothing trained. Other flags go to ``swift rlhf`` as they are (``--torch_dtype``, ``--device_map``, ...);
``NPROC_PER_NODE`` splits the rows over processes. The model is loaded bare (``--tuner_type full`` unless given: no
adapter wraps it; no backward runs, so no gradient is made and the optimizer keeps no state), and the rows are batched
by length (``--group_by_length true`` unless given: a store is keyed by content, so the order is free and a batch pads
little). Run it again after a kill: the finished shards are kept, their rows found in the store and not scored again.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from typing import List

#: ``swift rlhf`` flags a score run sets itself
OWN = ('rlhf_type', 'gkd_score_only', 'save_teacher_scores', 'teacher_scores', 'lmbda', 'seq_kd', 'num_train_epochs',
       'max_steps', 'split_dataset_ratio', 'save_strategy', 'eval_strategy', 'teacher_model', 'num_generations')


#: with ``--teacher_model``: the teacher's flags that name the model a score run loads, and its own flag for it
TEACHER_FLAGS = {'teacher_model_type': 'model_type', 'teacher_model_revision': 'model_revision'}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--teacher_model', default=None, help='the teacher (a folder or hub id); it is the model the '
                        'run loads, and its tokenizer makes the rows (--teacher_model_type and '
                        '--teacher_model_revision name it too)')
    parser.add_argument('--teacher_model_server', default=None,
                        help='a served teacher (`swift-gkd serve-teacher`, `vllm serve`) instead; then --model gives '
                        'the tokenizer and template (the student)')
    parser.add_argument('--model', default=None, help='with --teacher_model_server: the model whose tokenizer and '
                        'template make the rows (loaded, not trained)')
    parser.add_argument('--dataset', nargs='+', required=True, help='the rows to score, as swift rlhf reads them')
    parser.add_argument('--output_dir', required=True, help='the store\'s folder (made; an existing store of the same '
                        'teacher, tokenizer, template, k and dtype is completed, not rewritten)')
    parser.add_argument('--gkd_logits_topk', type=int, default=64, help='top-k entries kept a scored token')
    parser.add_argument('--teacher_scores_dtype', default='float16', choices=['float16', 'bfloat16', 'float32'],
                        help='dtype of the stored log-probabilities')
    parser.add_argument('--per_device_train_batch_size', type=int, default=8, help='rows scored at once a process (of '
                        'about one length: --group_by_length true unless given)')
    parser.add_argument('--sample_with', default=None,
                        help='offline on-policy distillation: this model (the student, e.g. after SFT) samples '
                        '--num_samples completions of each --dataset prompt once, the teacher scores them, and the '
                        'finished ones are written as OUTPUT_DIR/samples.jsonl beside their scores (train on it with '
                        '--dataset OUTPUT_DIR/samples.jsonl --teacher_scores OUTPUT_DIR); sampling flags (e.g. '
                        '--max_completion_length, --use_vllm true) go to swift rlhf')
    parser.add_argument('--num_samples', type=int, default=1, help='with --sample_with: completions a prompt')


def score_command(args, rest: List[str]) -> List[str]:
    """The ``swift rlhf`` command line of a score run (``rest``: the flags passed through)."""
    given = {a[2:].split('=')[0] for a in rest if a.startswith('--')}
    clash = sorted(given & set(OWN))
    if clash:
        raise ValueError(f'--{clash[0]} is set by swift-gkd score itself (it scores every row once, trains nothing): '
                         'leave it out')
    if (args.teacher_model is None) == (args.teacher_model_server is None):
        raise ValueError('pass one teacher: --teacher_model PATH, or --teacher_model_server URL with --model PATH')
    if args.num_samples < 1 or (args.num_samples > 1 and args.sample_with is None):
        raise ValueError(f'--num_samples {args.num_samples}: a positive integer, with --sample_with')
    if args.sample_with is not None and args.model is not None:
        raise ValueError('--sample_with is the model whose samples are scored (and whose tokenizer makes the rows): '
                         'leave --model out')
    if args.sample_with is not None:
        return _sample_command(args, rest, given)
    if args.teacher_model_server is not None and args.model is None:
        raise ValueError('--teacher_model_server needs --model: the model whose tokenizer and template make the rows '
                         '(the student you will train)')
    if args.teacher_model is not None and args.model is not None:
        raise ValueError('--model is for --teacher_model_server only: with --teacher_model the teacher\'s own '
                         'tokenizer makes the rows (a student must share it to read the store)')
    if args.gkd_logits_topk < 1:
        raise ValueError(f'--gkd_logits_topk {args.gkd_logits_topk}: a positive integer')
    if args.per_device_train_batch_size < 1:
        raise ValueError(f'--per_device_train_batch_size {args.per_device_train_batch_size}: a positive integer')
    if args.teacher_model is not None:
        rest = _teacher_flags_as_the_models(rest)
    out = os.path.abspath(args.output_dir)
    cmd = ['rlhf', '--rlhf_type', 'gkd', '--gkd_score_only', 'true', '--save_teacher_scores', out,
           '--model', args.teacher_model or args.model, '--dataset', *args.dataset,
           '--gkd_logits_topk', str(args.gkd_logits_topk), '--teacher_scores_dtype', args.teacher_scores_dtype,
           '--per_device_train_batch_size', str(args.per_device_train_batch_size),
           '--lmbda', '0', '--seq_kd', 'false', '--num_train_epochs', '1', '--split_dataset_ratio', '0',
           '--save_strategy', 'no', '--eval_strategy', 'no']
    if args.teacher_model_server is not None:
        cmd += ['--teacher_model_server', args.teacher_model_server]
    if os.path.exists(os.path.join(out, 'manifest.json')):  # a run before this one: its finished rows are kept
        cmd += ['--teacher_scores', out]
    return cmd + _defaults(given, out) + rest


def _teacher_flags_as_the_models(rest: List[str]) -> List[str]:
    """With ``--teacher_model`` the teacher is the model the score run loads (``--model``): the teacher's own flags
    (:data:`TEACHER_FLAGS`) name it, as ``--model_type`` / ``--model_revision``; both for one model, differing, are
    refused."""
    out, given = [], {}
    for i, token in enumerate(rest):
        name, _, value = token[2:].partition('=') if token.startswith('--') else ('', '', '')
        if name in TEACHER_FLAGS or name in TEACHER_FLAGS.values():
            given.setdefault(TEACHER_FLAGS.get(name, name), []).append((name, value or (
                rest[i + 1] if i + 1 < len(rest) and not rest[i + 1].startswith('--') else '')))
        if name in TEACHER_FLAGS:
            out.append(token.replace(f'--{name}', f'--{TEACHER_FLAGS[name]}', 1))
        else:
            out.append(token)
    for model_flag, values in given.items():
        if len({v for _, v in values}) > 1:
            shown = ', '.join(f'--{n} {v}' for n, v in values)
            raise ValueError(f'{shown}: with --teacher_model the teacher is the model scored; give its '
                             f'--{model_flag} once (--teacher_{model_flag} or --{model_flag})')
    return out


def _sample_command(args, rest: List[str], given) -> List[str]:
    """``--sample_with``: a score-only run of on-policy steps (the model samples, the teacher scores)."""
    out = os.path.abspath(args.output_dir)
    cmd = ['rlhf', '--rlhf_type', 'gkd', '--gkd_score_only', 'true', '--save_teacher_scores', out,
           '--model', args.sample_with, '--dataset', *args.dataset,
           '--gkd_logits_topk', str(args.gkd_logits_topk), '--teacher_scores_dtype', args.teacher_scores_dtype,
           '--per_device_train_batch_size', str(args.per_device_train_batch_size),
           '--num_generations', str(args.num_samples),
           '--lmbda', '1', '--seq_kd', 'false', '--num_train_epochs', '1', '--split_dataset_ratio', '0',
           '--save_strategy', 'no', '--eval_strategy', 'no']
    cmd += ['--teacher_model', args.teacher_model] if args.teacher_model else ['--teacher_model_server',
                                                                             args.teacher_model_server]
    return cmd + _defaults(given, out) + rest


def _defaults(given, out: str) -> List[str]:
    """The flags a score run sets unless given: its logs under the store, no reporting, the model bare (nothing
    is trained; ms-swift's default LoRA wrapped every linear) and rows batched by length (a store is keyed by
    content, so the order is free: less padding)."""
    defaults = {'output_dir': os.path.join(out, 'runs'), 'report_to': 'none', 'tuner_type': 'full',
                'group_by_length': 'true'}
    return [x for name, value in defaults.items() if name not in given for x in (f'--{name}', value)]


def run(args, rest: List[str]) -> int:
    """Run the score as ``swift rlhf`` (its launcher: ``NPROC_PER_NODE`` processes) and return its exit code."""
    cmd = score_command(args, rest)
    swift = shutil.which('swift') or os.path.join(os.path.dirname(sys.executable), 'swift')
    print(f'swift-gkd score: swift {" ".join(cmd)}', flush=True)
    return subprocess.call([swift, *cmd])
