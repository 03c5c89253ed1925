"""``--max_length`` against the contexts of the models that sample: the student on on-policy steps, the teacher on
seq_kd steps. A prompt may be ``--max_length`` tokens long; a sampler whose context (ms-swift's ``max_model_len``: the
fewest positions its ``config.json`` allows) is shorter has no room left to sample after it: ms-swift's engine failed
at the first such prompt, after both models loaded ("Input length (569) leaves no room for generation"). Shared by
``swift rlhf`` (the student's context as ms-swift resolved it, the teacher's from its folder) and ``megatron rlhf``'s
launcher (local folders' ``config.json``). ms-swift is imported inside :func:`model_context` only."""
from __future__ import annotations

import json
import os
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
