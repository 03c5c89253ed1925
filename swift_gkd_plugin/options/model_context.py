"""``--max_length`` against the contexts of the models that sample: the student on on-policy steps, the teacher on
seq_kd steps. A prompt may be ``--max_length`` tokens long; a sampler whose context (ms-swift's ``max_model_len``: the
fewest positions its ``config.json`` allows) is shorter has no room left to sample after it: ms-swift's engine failed
at the first such prompt, after both models loaded ("Input length (569) leaves no room for generation"). Shared by
``swift rlhf`` (the student's context as ms-swift resolved it, the teacher's from its folder) and ``megatron rlhf``'s
launcher (local folders' ``config.json``). ms-swift is imported inside :func:`model_context` only."""
from __future__ import annotations

import json
import math
import os
from types import SimpleNamespace
from typing import Optional

from swift_gkd_plugin.options.flags import FlagError


def model_context(model_dir: Optional[str]) -> Optional[int]:
    """The context of the model in the folder ``model_dir`` as ms-swift reads it (``ModelInfo.max_model_len``: the
    smallest of ``max_position_embeddings``, ``seq_length``, ... of its ``config.json``, the text model's for a
    multimodal one); None without a folder, a readable ``config.json`` or such a key."""
    if not model_dir or not os.path.isdir(model_dir):
        return None
    try:
        with open(os.path.join(model_dir, 'config.json')) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    from swift.utils import HfConfigFactory
    try:
        limit = HfConfigFactory.get_max_model_len(config)
    except (TypeError, ValueError):  # a key of another type: left to ms-swift
        return None
    return limit if isinstance(limit, int) and limit > 0 else None


def check_sampling_context(args, student_context: Optional[int], teacher_context: Optional[int] = None) -> None:
    """``--max_length`` within the context of each model that samples (contexts of None are not checked):

    * the student's (``student_context``) on on-policy steps (``--lmbda`` > 0), unless ``--vllm_max_model_len`` sets
      the engine's own (checked against ``--max_length`` on its own) or a rollout server samples (``--vllm_mode
      server``: its own context);
    * on seq_kd steps (``--seq_kd true``) the teacher's: ``teacher_context`` for a ``--teacher_model``, else the
      student's (the student is its own teacher, or its base with the adapter off is).

    A multi-turn run (``--multi_turn_scheduler``) is not refused: its trajectories are cut at the engines' context
    (``swift/rollout/scheduler_guard.py``)."""
    length = args.max_length
    if not length or getattr(args, 'multi_turn_scheduler', None):
        return
    server = getattr(args, 'use_vllm', False) and getattr(args, 'vllm_mode', None) == 'server'
    if (args.lmbda and getattr(args, 'vllm_max_model_len', None) is None and not server and student_context
            and length > student_context):
        raise FlagError(f'--max_length {length} is longer than the student\'s context (--model {args.model}: '
                        f'{student_context} positions, config.json): on-policy sampling (--lmbda {args.lmbda:g}) '
                        'continues prompts of up to --max_length tokens, and one that fills the context leaves no '
                        f'room for generation; pass --max_length {student_context} or less, or --lmbda 0')
    if not getattr(args, 'seq_kd', False):
        return
    teacher = getattr(args, 'teacher_model', None)
    context, whose = (teacher_context, f'the teacher\'s context (--teacher_model {teacher}') if teacher else (
        student_context, f'the context of the student, its own seq_kd teacher (--model {args.model}')
    if context and length > context:
        raise FlagError(f'--max_length {length} is longer than {whose}: {context} positions, config.json): seq_kd '
                        'steps (--seq_kd true) have the teacher answer prompts of up to --max_length tokens and score '
                        'its answers, and a prompt that fills its context leaves no room for generation; pass '
                        f'--max_length {context} or less, or --seq_kd false')


# --- megatron rlhf's launcher: its local folders' contexts and vocabularies ---

def padded_vocab_size(model_dir: str, tensor_parallel: int) -> Optional[int]:
    """The rows of the output layer Megatron-SWIFT builds for the model in the local directory ``model_dir``: its
    config's ``vocab_size`` (of the language model) rounded up to a multiple of the tensor-parallel size, as
    mcore-bridge's ``GPTModel`` does. None when the config cannot be read (the first step still compares widths)."""
    from transformers import AutoConfig
    try:
        size = AutoConfig.from_pretrained(model_dir, trust_remote_code=True).get_text_config().vocab_size
    except Exception:  # an unusual config, or not a model directory: left to the ranks
        return None
    return math.ceil(size / tensor_parallel) * tensor_parallel if size else None


def check_vocab_sizes(args) -> None:
    """A local ``--teacher_model`` whose (padded) vocabulary differs from the local ``--model``'s: refused here, not at
    the first step after both models are loaded. Hub ids are left to that step (the launcher does not download)."""
    teacher, student = args.teacher_model, args.model
    if teacher is None or args.teacher_model_server is not None or student is None:
        return
    if not (os.path.isdir(teacher) and os.path.isdir(student)):
        return
    tp = args.tensor_model_parallel_size or 1
    sizes = {flag: padded_vocab_size(path, tp) for flag, path in (('--model', student), ('--teacher_model', teacher))}
    if None in sizes.values() or len(set(sizes.values())) == 1:
        return
    raise FlagError(f'--teacher_model {teacher} has {sizes["--teacher_model"]} output rows and --model {student} '
                     f'{sizes["--model"]} (config.json vocab_size, padded to a multiple of '
                     f'--tensor_model_parallel_size {tp}): megatron rlhf compares teacher and student logits row by row over one vocabulary, so '
                     'they must be equal (allowed: a teacher with the student\'s vocab_size). swift rlhf aligns a '
                     'teacher with a larger head, and distils across tokenizers with --gkd_cross_tokenizer')


def check_sampling_contexts(args, vllm_installed: bool) -> None:
    """``--max_length`` within the student's context on on-policy steps and the teacher's on seq_kd steps, read from
    the local folders' ``config.json`` (:func:`swift_gkd_plugin.options.model_context.check_sampling_context`, as
    ``swift rlhf`` checks it; hub ids are left to the ranks): a prompt that fills a sampler's context leaves it no
    room to sample (vLLM's engine refused it at its first rollout; the model's own sampler ran past its positions).
    ``--use_vllm true`` samples with vLLM only where it is installed (``megatron.setup.checks.resolve_sampler``)."""
    if not args.max_length:
        return

    def local(path):
        return os.path.expanduser(path) if isinstance(path, str) else None

    view = SimpleNamespace(**{**vars(args), 'use_vllm': args.use_vllm and vllm_installed})
    check_sampling_context(view, model_context(local(args.model)), model_context(local(args.teacher_model)))
