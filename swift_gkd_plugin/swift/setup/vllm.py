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
