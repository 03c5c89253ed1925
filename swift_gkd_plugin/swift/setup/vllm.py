"""``swift rlhf --use_vllm true`` before anything loads: the checks that only ``swift rlhf`` needs (a launcher for
colocate mode, a GPU for server mode); the checks and the environment resolver shared with ``megatron rlhf`` are in
:mod:`swift_gkd_plugin.colocated_vllm`.
"""
from __future__ import annotations

import os

from swift_gkd_plugin.flags import FlagError


def check_vllm_launcher(args) -> None:
    """Colocate mode builds vLLM in every training process with torchrun's rank variables (ms-swift's
    ``external_launcher``): without a launcher it fails with ``KeyError: 'RANK'`` after the models loaded."""
    if args.use_vllm and args.vllm_mode == 'colocate' and 'RANK' not in os.environ:
        raise FlagError('--use_vllm true --vllm_mode colocate runs vLLM inside each training process, started by '
                        'torchrun: set NPROC_PER_NODE (e.g. NPROC_PER_NODE=1 swift rlhf ..., or the number of '
                        'GPUs) so that swift launches it')


def check_vllm_server_mode(args) -> None:
    """ms-swift 4.6 syncs the student's weights to a ``swift rollout`` server through NCCL (``PyNcclCommunicator``),
    and ``swift rollout`` refuses to start without a GPU."""
    if not (args.use_vllm and args.vllm_mode == 'server'):
        return
    import torch
    if not torch.cuda.is_available():
        raise FlagError('--vllm_mode server needs a CUDA GPU here: ms-swift syncs the student\'s weights to the '
                        'rollout server over NCCL, and swift rollout needs a GPU too. On this machine use '
                        '--vllm_mode colocate (vLLM\'s CPU build) or --use_vllm false')


def check_vllm_tensor_parallel_size(args) -> None:
    """Colocate mode splits the training processes into vLLM groups of ``--vllm_tensor_parallel_size``, and ms-swift
    refuses a size that does not divide their number (``rlhf_trainers/rollout_mixin.py``, a traceback once both
    models are loaded). The number is torchrun's ``WORLD_SIZE`` (the launcher sets rank 0's), 1 without a launcher."""
    if not (args.use_vllm and args.vllm_mode == 'colocate'):
        return
    size, processes = args.vllm_tensor_parallel_size, int(os.environ.get('WORLD_SIZE') or 1)
    if processes % size:
        divisors = [d for d in range(1, processes + 1) if processes % d == 0]
        raise FlagError(f'--vllm_tensor_parallel_size {size} does not divide the {processes} training process'
                        f'{"es" if processes > 1 else ""} (NPROC_PER_NODE x NNODES): colocate mode splits them into '
                        f'vLLM groups of that size (allowed: {", ".join(map(str, divisors))})')
