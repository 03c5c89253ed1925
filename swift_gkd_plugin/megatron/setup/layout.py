"""``megatron rlhf --rlhf_type gkd``: the parallel layout against the ranks and the models, before any rank starts.

Flags in (the launcher's parse of the command line, or ms-swift's Megatron arguments in the ranks), the local models'
``config.json``; out: nothing, or one ``FlagError`` naming the flag, its value and what megatron-core accepts (each
of these failed every rank: a ``ZeroDivisionError``, an assertion once the student loaded, the MoE layer's error at
the first training step). Framework-free: no Megatron import.
"""
from __future__ import annotations

import json
import math
import os
from typing import Optional, Sequence

from swift_gkd_plugin.options.flags import FlagError


def world_size() -> Optional[int]:
    """The ranks of the run: ``WORLD_SIZE`` in a rank; in the launcher, the ones its torchrun starts,
    ``NPROC_PER_NODE`` x ``NNODES`` (1 each when unset); None where one is not a number (``gpu``, an elastic
    ``1:4``)."""
    try:
        if os.environ.get('WORLD_SIZE'):
            return int(os.environ['WORLD_SIZE'])
        return int(os.environ.get('NPROC_PER_NODE') or 1) * int(os.environ.get('NNODES') or 1)
    except ValueError:
        return None


def check_parallel_sizes(args) -> None:
    """Tensor x pipeline x context parallel sizes divide the ranks (each rank's ``ZeroDivisionError`` otherwise: no
    data-parallel group fits), and so does expert tensor x expert x pipeline (megatron-core's expert layout); every
    size is positive, and virtual pipeline stages need a pipeline (megatron-core's ``initialize_model_parallel``)."""
    sizes = [(flag, _size(args, flag)) for flag in
             ('tensor_model_parallel_size', 'pipeline_model_parallel_size', 'context_parallel_size')]
    expert = _size(args, 'expert_model_parallel_size')
    expert_tp = _size(args, 'expert_tensor_parallel_size')
    for flag, size in sizes + [('expert_model_parallel_size', expert), ('expert_tensor_parallel_size', expert_tp)]:
        if size < 1:  # 0 divided every rank's layout by zero (ZeroDivisionError)
            raise FlagError(f'--{flag} {size}: allowed a positive integer (1: not split)')
    vpp, pp = getattr(args, 'virtual_pipeline_model_parallel_size', None), dict(sizes)['pipeline_model_parallel_size']
    if vpp is not None and vpp < 1:  # 0 reached megatron-core, which divided the layers per stage by it
        raise FlagError(f'--virtual_pipeline_model_parallel_size {vpp}: allowed a positive integer or unset (1 or '
                        'unset: no virtual stages)')
    if vpp is not None and vpp > 1 and pp == 1:
        raise FlagError(f'--virtual_pipeline_model_parallel_size {vpp} needs --pipeline_model_parallel_size > 1 '
                        '(virtual stages interleave the pipeline\'s stages; megatron-core refused it in every rank): '
                        'pass --pipeline_model_parallel_size, or leave --virtual_pipeline_model_parallel_size unset')
    world = world_size()
    if world is None:
        return
    ranks = f'{world} rank{"s" if world != 1 else ""} (NPROC_PER_NODE x NNODES)'
    model_parallel = math.prod(size for _, size in sizes)
    given = ' x '.join(f'--{flag} {size}' for flag, size in sizes if size > 1) or 'the model-parallel sizes'
    if world % model_parallel:
        raise FlagError(f'{given} = {model_parallel} ranks a model copy, which does not divide the {ranks}: pass '
                        'sizes whose product divides them')
    if world % expert:
        raise FlagError(f'--expert_model_parallel_size {expert} does not divide the {ranks}')
    if world % (expert_tp * expert * pp):
        raise FlagError(f'--expert_tensor_parallel_size {expert_tp} x --expert_model_parallel_size {expert} x '
                        f'--pipeline_model_parallel_size {pp} = {expert_tp * expert * pp} ranks an expert layout, '
                        f'which does not divide the {ranks} (megatron-core\'s expert groups): pass sizes whose '
                        'product divides them')


def _size(args, flag: str) -> int:
    """A parallel size as given; unset (None) is 1. Not ``or 1``, which turned a given 0 into 1."""
    size = getattr(args, flag, None)
    return 1 if size is None else size


def check_expert_counts(args, model_dirs: Sequence[tuple]) -> None:
    """``--expert_model_parallel_size`` divides the routed experts of each mixture-of-experts model among
    ``model_dirs`` (``(flag, local dir)`` pairs: the student and the teacher, built in the same layout): megatron-core
    asserted it in every rank after the student had loaded ("num_moe_experts must be divisible by
    expert_model_parallel_size")."""
    expert = _size(args, 'expert_model_parallel_size')
    if expert <= 1:
        return
    for flag, path in model_dirs:
        experts = routed_experts(path) if isinstance(path, str) and os.path.isdir(path) else None
        if experts and experts % expert:
            allowed = [n for n in range(1, experts + 1) if experts % n == 0]
            raise FlagError(f'--expert_model_parallel_size {expert} does not divide the {experts} routed experts of '
                            f'{flag} {path}: each expert-parallel rank holds an equal share of every MoE layer\'s '
                            f'experts (the teacher is built in the student\'s layout); allowed: {allowed}')


#: the config.json keys that count a model's routed experts (mcore-bridge's ``config/parser.py``, ``num_moe_experts``)
EXPERT_KEYS = ('num_experts', 'n_routed_experts', 'moe_num_experts', 'num_local_experts')


def routed_experts(model_dir: str) -> Optional[int]:
    """The routed experts of the model in the local directory ``model_dir``: the largest of :data:`EXPERT_KEYS` in its
    ``config.json``, nested configs included (a multimodal model keeps them in its text config); 0 for a dense model,
    None when there is no readable ``config.json``."""
    try:
        with open(os.path.join(model_dir, 'config.json'), encoding='utf-8') as f:
            config = json.load(f)
    except (OSError, ValueError):
        return None
    found, stack = 0, [config]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            found = max([found] + [v for k, v in node.items() if k in EXPERT_KEYS and isinstance(v, int)])
            stack.extend(v for v in node.values() if isinstance(v, dict))
    return found


def decoder_layers(model_dir: str) -> Optional[int]:
    """The decoder layers of the model in the local directory ``model_dir``: ``num_hidden_layers`` of its
    ``config.json``, or of its text config (a multimodal model; mcore-bridge's ``num_layers``); None when unreadable."""
    try:
        with open(os.path.join(model_dir, 'config.json'), encoding='utf-8') as f:
            config = json.load(f)
    except (OSError, ValueError):
        return None
    for node in (config, config.get('text_config'), config.get('llm_config'), config.get('language_config')):
        if isinstance(node, dict) and isinstance(node.get('num_hidden_layers'), int):
            return node['num_hidden_layers']
    return None


def pipeline_split_problem(layers: int, args) -> Optional[str]:
    """Why megatron-core cannot split ``layers`` decoder layers over the pipeline stages of ``args`` (its
    ``TransformerConfig`` and ``get_num_layers_to_build`` rules: equal stages, or ``--decoder_first/last_pipeline_num_
    layers`` for the outer stages and equal middle ones; each stage's layers a multiple of the virtual stages), or
    None when it can."""
    pp = _size(args, 'pipeline_model_parallel_size')
    vpp = getattr(args, 'virtual_pipeline_model_parallel_size', None) or 1
    first = getattr(args, 'decoder_first_pipeline_num_layers', None)
    last = getattr(args, 'decoder_last_pipeline_num_layers', None)
    if first is None and last is None:
        extra = int(bool(getattr(args, 'account_for_embedding_in_pipeline_split', False))) + \
            int(bool(getattr(args, 'account_for_loss_in_pipeline_split', False)))
        if (layers + extra) % pp:
            split = f'{layers + extra} (with the embedding and loss stages counted)' if extra else str(layers)
            fix = ''
            if layers >= pp and not extra and pp > 1:
                outer = layers - (pp - 1) * (layers // pp)
                fix = (f'pass --decoder_first_pipeline_num_layers {outer} (the other stages then hold '
                       f'{layers // pp} each), or ')
            divisors = [n for n in range(1, layers + extra + 1) if (layers + extra) % n == 0]
            return (f'megatron-core splits them into {pp} equal stages and {split} is not a multiple of {pp}: {fix}'
                    f'a --pipeline_model_parallel_size that divides it (allowed: {divisors})')
        per_stage = [(layers + extra) // pp]
    else:
        outer = [(flag, n) for flag, n in (('--decoder_first_pipeline_num_layers', first),
                                           ('--decoder_last_pipeline_num_layers', last)) if n is not None]
        for flag, n in outer:
            if n <= 0:
                return f'{flag} {n}: allowed a positive integer'
        middle_layers, middle_stages = layers - sum(n for _, n in outer), pp - len(outer)
        given = ' and '.join(f'{flag} {n}' for flag, n in outer)
        if middle_layers < 0 or bool(middle_layers) != bool(middle_stages) or (
                middle_stages and middle_layers % middle_stages):
            return (f'{given} leave {middle_layers} layers for the {middle_stages} middle stage(s) of '
                    f'--pipeline_model_parallel_size {pp}, and megatron-core needs them split equally, at least one '
                    'layer a stage (and no layers left over without middle stages): pass outer stage sizes that '
                    'leave a multiple of the middle stages')
        per_stage = [n for _, n in outer] + ([middle_layers // middle_stages] if middle_stages else [])
    if vpp > 1 and any(n % vpp for n in per_stage):
        return (f'the stages hold {sorted(set(per_stage))} layers, and each must be a multiple of '
                f'--virtual_pipeline_model_parallel_size {vpp}')
    return None


def check_pipeline_layers(args, model_dirs: Sequence[tuple]) -> None:
    """The decoder layers of each local model among ``model_dirs`` (``(flag, local dir)`` pairs: the student and the
    teacher, built in the same layout) split over the pipeline stages as megatron-core splits them: a 3-layer model
    under ``--pipeline_model_parallel_size 2`` failed every rank's assertion after the ranks started
    ("num_layers should be divisible by pipeline_model_parallel_size"); uneven splits are megatron-core's
    ``--decoder_first_pipeline_num_layers`` / ``--decoder_last_pipeline_num_layers``."""
    if _size(args, 'pipeline_model_parallel_size') <= 1 or getattr(args, 'pipeline_model_parallel_layout', None):
        return  # (a layout string is megatron-core's to validate)
    for flag, path in model_dirs:
        layers = decoder_layers(path) if isinstance(path, str) and os.path.isdir(path) else None
        problem = pipeline_split_problem(layers, args) if layers else None
        if problem:
            raise FlagError(f'--pipeline_model_parallel_size {args.pipeline_model_parallel_size} with the {layers} '
                            f'decoder layers of {flag} {path} (config.json num_hidden_layers): {problem}')


def check_moe_sequence_parallel(args, model_dir) -> None:
    """A mixture-of-experts student (the local ``model_dir``) under tensor parallelism trains only with
    ``--sequence_parallel true``: megatron-core's ``MoELayer.forward`` raised in every rank at the first training
    forward, after both models had loaded (the teacher runs in eval mode, where it is not asked)."""
    tp = _size(args, 'tensor_model_parallel_size')
    if tp <= 1 or getattr(args, 'sequence_parallel', False):
        return
    experts = routed_experts(model_dir) if isinstance(model_dir, str) and os.path.isdir(model_dir) else None
    if experts:
        raise FlagError(f'--tensor_model_parallel_size {tp} with --model {model_dir}, a mixture of experts ({experts} '
                        'routed experts), needs --sequence_parallel true: megatron-core\'s MoE layer refuses to train '
                        'under tensor parallelism without sequence parallelism (it failed in every rank at the first '
                        'step, after both models loaded). Pass --sequence_parallel true, or '
                        '--tensor_model_parallel_size 1')


def check_grouped_experts(args, model_dirs: Sequence[tuple]) -> None:
    """``--moe_grouped_gemm false`` with a mixture-of-experts model among ``model_dirs`` (``(flag, local dir)``
    pairs): megatron-core then builds ``SequentialMLP`` experts, which mcore-bridge (ms-swift's default
    ``--bridge_backend``) can neither load nor export: each rank failed after building the model with
    ``'SequentialMLP' object has no attribute 'linear_fc1'``."""
    if getattr(args, 'moe_grouped_gemm', True) or getattr(args, 'bridge_backend', 'mcore-bridge') != 'mcore-bridge':
        return
    for flag, path in model_dirs:
        experts = routed_experts(path) if isinstance(path, str) and os.path.isdir(path) else None
        if experts:
            raise FlagError(f'--moe_grouped_gemm false: {flag} {path} is a mixture of experts ({experts} routed '
                            'experts), and mcore-bridge loads and exports experts only as grouped linears '
                            "(megatron-core's TEGroupedMLP); with false megatron-core builds SequentialMLP experts, "
                            'which it cannot fill. Allowed: --moe_grouped_gemm true (the default)')
