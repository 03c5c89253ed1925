"""``--sequence_parallel_size N`` (ms-swift's Ulysses): what the GKD trainer runs under it, and what it refuses.

It runs dataset, on-policy and seq_kd steps with every teacher placement (local, offloaded or served, the LoRA
student's base, a teacher adapter; full or top-k), under DDP or DeepSpeed, dense and fused loss, rows
with a teacher view of their own, and transformers or vLLM sampling (each rank of a group samples its share of the
rows on whole sequences, the group gathers them): the ranks of a group read the same rows and each trains on its
slice of every sequence (see :mod:`swift_gkd_plugin.swift.sequence_parallel`).
"""
from __future__ import annotations

import os
from typing import Dict, Optional

from swift_gkd_plugin.rollout.colocated_vllm import text_config_of
from swift_gkd_plugin.options.flags import FlagError


def resolve_sequence_parallel(args) -> None:
    """ms-swift pads GKD's training batches on the left; its sequence split needs them padded on the right."""
    if (args.sequence_parallel_size or 1) > 1:
        args.padding_side = 'right'


def check_sequence_parallel(args) -> None:
    """A size of at least 1 that divides the training processes, and what the GKD trainer does not run under
    ``--sequence_parallel_size > 1`` yet."""
    size = args.sequence_parallel_size
    if size is not None and size < 1:  # (it failed in the ranks with a TypeError once both models were loaded)
        raise FlagError(f'--sequence_parallel_size {size} must be at least 1: the number of ranks that split each row '
                        '(1: no sequence parallelism)')
    size = size or 1
    if size <= 1:
        return
    flag = f'--sequence_parallel_size {size}'
    unsupported = [
        (args.gkd_sampled_kl_coef > 0, f'--gkd_sampled_kl_coef {args.gkd_sampled_kl_coef:g}',
         '--gkd_sampled_kl_coef 0'),
        (bool(args.multi_turn_scheduler), f'--multi_turn_scheduler {args.multi_turn_scheduler}',
         'no --multi_turn_scheduler'),
        (args.padding_free or args.packing, '--padding_free / --packing', '--padding_free false --packing false'),
        (args.gkd_cross_tokenizer is not None, '--gkd_cross_tokenizer', 'a teacher with the student\'s tokenizer'),
        (args.gkd_ref_kl_coef > 0, f'--gkd_ref_kl_coef {args.gkd_ref_kl_coef:g}', '--gkd_ref_kl_coef 0'),
        # ms-swift derives the micro-batches of a generation batch from it over every rank, not over the groups
        (args.generation_batch_size is not None, f'--generation_batch_size {args.generation_batch_size}',
         '--steps_per_generation, or neither'),
        (bool(args.streaming), '--streaming true', '--streaming false'),
    ]
    for refused, what, allowed in unsupported:
        if refused:
            raise FlagError(f'{flag} is not supported with {what} yet (allowed: {allowed}, or '
                            '--sequence_parallel_size 1)')
    processes = int(os.environ.get('WORLD_SIZE') or 1)  # torchrun's (the launcher sets rank 0's), 1 without one
    if processes % size:
        divisors = [d for d in range(1, processes + 1) if processes % d == 0]
        start = (f'; start {size} processes or a multiple, e.g. NPROC_PER_NODE={size} swift rlhf ... (with '
                 '--use_cpu true on a machine without GPUs)') if processes == 1 else ''
        raise FlagError(f'{flag} does not divide the {processes} training process{"es" if processes > 1 else ""} '
                        f'(NPROC_PER_NODE x NNODES): each group of {size} ranks splits the sequences (allowed: '
                        f'{", ".join(map(str, divisors))}){start}')


def check_sequence_parallel_heads(size: int, model_dirs: Dict[str, Optional[str]]) -> None:
    """Ulysses splits each model's attention heads over the group: a size that does not divide the student's
    key-value heads needs ms-swift's ring attention (``--padding_free``, refused above), and one that does not divide
    a model's heads fails in its first forward; both only once the models are loaded. ``model_dirs``: flag -> folder."""
    for flag, model_dir in model_dirs.items():
        config = text_config_of(model_dir) if model_dir else {}
        for key in ('num_key_value_heads', 'num_attention_heads'):
            heads = config.get(key)
            if heads and int(heads) % size:
                divisors = ', '.join(str(d) for d in range(1, int(heads) + 1) if int(heads) % d == 0)
                raise FlagError(f'--sequence_parallel_size {size} does not divide the {heads} attention heads of '
                                f'{flag} ({key} in its config.json), which each rank of a group splits (allowed: '
                                f'{divisors})')


def check_local_model_heads(args) -> None:
    """``--sequence_parallel_size`` against the attention heads of ``--model`` and ``--teacher_model`` where they are
    local folders (the ranks check the resolved ones again): a size that does not divide them was refused only once
    every rank had started."""
    if (args.sequence_parallel_size or 1) > 1:
        dirs = {flag: os.path.expanduser(value) for flag, value in (('--model', args.model),
                                                                    ('--teacher_model', args.teacher_model))
                if isinstance(value, str) and os.path.isdir(os.path.expanduser(value))}
        check_sequence_parallel_heads(args.sequence_parallel_size, dirs)
