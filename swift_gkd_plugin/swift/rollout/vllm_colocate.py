"""vLLM colocate sampling where ms-swift's own weight sync fails: vLLM's layerwise reload, and the engine shut down
before the process groups go.

ms-swift syncs the student into a colocated vLLM by calling ``model.load_weights`` on the engine's model and then
``process_weights_after_loading``. That needs every linear layer's parameter to keep its ``weight_loader``. vLLM's
CPU build (and any kernel that repacks weights after loading) replaces the weight by a packed buffer and an empty
``Parameter`` without one: the first sync fails (``'Parameter' object has no attribute 'weight_loader'``), in
ms-swift's own GKD too. There the sync goes through vLLM's own in-place reload (``initialize_layerwise_reload`` ->
``load_weights`` -> ``finalize_layerwise_reload``, what vLLM's ``reload_weights`` does), which restores each layer
in checkpoint format, loads it and repacks it; elsewhere ms-swift's path is kept as it is.

At exit the engine is shut down before the trainer destroys the process groups (:func:`shutdown_engine`): vLLM's own
exit handler tears down its groups and the default one, and failed when ours had run first.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from swift.utils import get_logger

logger = get_logger()


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


class VllmSyncError(RuntimeError):
    """A weight sync to a colocated vLLM engine failed part-way."""


def shutdown_engine(engine) -> None:
    """Shut down a colocated vLLM engine (ms-swift's ``VllmEngine``) now, while the process groups it tears down
    still exist; its own exit handler is then detached. Nothing if there is none or it is already down."""
    core = getattr(getattr(engine, 'engine', None), 'engine_core', None)
    if core is not None and hasattr(core, 'shutdown'):
        core.shutdown()
