"""The student's rollout server (``--vllm_mode server``, ``swift rollout``): the weight sync's loads in each vLLM
worker and their failures told to the trainer (in the server's process), and the trainer's side of it.

ms-swift's server sends every weight bucket to its workers fire-and-forget and answers the trainer's closing
``/process_weights_after_loading/`` with 200 whatever happened: a load that failed in a worker (a layout vLLM
repacked, a name it does not know) left the server sampling from the old weights while training went on, exit code 0
(found on vLLM's CPU build, where every sync failed so). Here each worker loads a whole sync through vLLM's in-place
layerwise reload where vLLM repacked its weights (as :mod:`swift_gkd_plugin.rollout.colocated_vllm` does in colocate mode),
keeps the sync's first failure, and the closing request answers 500 with it, which ms-swift's client raises.
"""
from __future__ import annotations

import functools
import logging

_OK = 'swift_gkd_plugin: sync ok'
MARK = 'swift_gkd_plugin'  # in the patched server's answer to the sync's end
logger = logging.getLogger('swift')


def _loads(method):
    """A worker's bucket load: the whole sync inside vLLM's layerwise reload where vLLM repacked its weights; a failure
    is kept for the sync's end (the bucket has been received by then, so the trainer's broadcasts stay in step)."""

    @functools.wraps(method)
    def load(self, *args, **kwargs):
        model = self.model_runner.model
        if not getattr(self, '_gkd_reloading', False) and getattr(self, '_gkd_error', None) is None:
            from swift_gkd_plugin.rollout.colocated_vllm import weights_repacked
            if weights_repacked(model):
                from vllm.model_executor.model_loader.reload import initialize_layerwise_reload
                initialize_layerwise_reload(model)
                self._gkd_reloading = True
        try:
            return method(self, *args, **kwargs)
        except Exception as exc:
            if getattr(self, '_gkd_error', None) is None:
                self._gkd_error = f'{type(exc).__name__}: {exc}'
    return load


def _closes(method):
    """The sync's end in a worker: ms-swift's post-load pass, the layerwise reload finished, and the sync's outcome
    returned (:data:`_OK` or the first failure), for the server's answer."""

    @functools.wraps(method)
    def close(self, *args, **kwargs):
        try:
            method(self, *args, **kwargs)
        except Exception as exc:
            self._gkd_error = getattr(self, '_gkd_error', None) or f'{type(exc).__name__}: {exc}'
        finally:
            if getattr(self, '_gkd_reloading', False):
                from vllm.model_executor.model_loader.reload import finalize_layerwise_reload
                self._gkd_reloading = False
                finalize_layerwise_reload(self.model_runner.model, self.model_runner.model_config)
        error, self._gkd_error = getattr(self, '_gkd_error', None), None
        return error or _OK
    return close


def _answers(endpoint):
    """The server's ``/process_weights_after_loading/``: 500 naming the first worker failure of the sync."""

    @functools.wraps(endpoint)
    async def process_weights_after_loading(self):
        import asyncio

        from fastapi import HTTPException
        kwargs = {'method': 'process_weights_after_loading', 'args': ()}
        for connection in self.connections:
            connection.send({'type': 'call', 'method': 'collective_rpc', 'kwargs': kwargs})
        loop = asyncio.get_running_loop()
        results = await asyncio.gather(*(loop.run_in_executor(None, c.recv) for c in self.connections))
        failures = [r for result in results for r in (result or ['the worker\'s call failed (see the server log)'])
                    if r != _OK]
        if failures:
            raise HTTPException(status_code=500, detail=f'the weight sync failed on the rollout server: {failures[0]}; '
                                'it holds a mix of the old and the new weights')
        from swift_gkd_plugin import __version__
        return {'message': 'Weights processed after loading', MARK: __version__}
    return process_weights_after_loading


def patch_rollout_server(module) -> None:
    """Patches ``swift.pipelines.infer.rollout`` (its worker extension and server class) once."""
    worker = module.WeightSyncWorkerExtension
    if getattr(worker, '_gkd_patched', False):
        return
    worker._gkd_patched = True
    for name in ('update_named_param', 'update_flattened_params'):
        setattr(worker, name, _loads(getattr(worker, name)))
    worker.process_weights_after_loading = _closes(worker.process_weights_after_loading)
    server = module.SwiftRolloutDeploy
    server.process_weights_after_loading = _answers(server.process_weights_after_loading)


# --- the trainer's side ---------------------------------------------------------------------------------------------

class RolloutServerError(RuntimeError):
    """The student's rollout server failed, went away or answered a weight sync with an error."""


_CLIENT_CALLS = ('infer', 'update_named_param', 'update_flattened_params', 'update_adapter_flattened_param',
                 'update_adapter_param', 'reset_prefix_cache')


def watch_rollout_client(client) -> None:
    """ms-swift's ``VLLMClient`` (rank 0's) with each call's failure raised as one :class:`RolloutServerError` naming
    the server, and the sync's end read for the server's answer: an error (a patched server's 500) stops the run; a
    server without the plugin (whose 200 says nothing of its workers' loads) is warned once."""
    if client is None or getattr(client, '_gkd_watched', False):
        return
    client._gkd_watched = True
    servers = ', '.join(client.base_urls)
    for name in _CLIENT_CALLS:
        method = getattr(client, name, None)
        if method is not None:
            setattr(client, name, _named_failures(method, name, servers))
    client.process_weights_after_loading = _named_failures(
        functools.partial(_end_sync, client), 'process_weights_after_loading', servers)


def _named_failures(method, name, servers):
    @functools.wraps(method)
    def call(*args, **kwargs):
        try:
            return method(*args, **kwargs)
        except RolloutServerError:
            raise
        except Exception as exc:
            raise RolloutServerError(f'the rollout server ({servers}) failed at {name}: {type(exc).__name__}: '
                                     f'{exc}') from exc
    return call


def _end_sync(client) -> None:
    for i, url in enumerate(client.base_urls):
        response = client.sessions[i].post(f'{url}/process_weights_after_loading/')
        if response.status_code != 200:
            try:
                detail = response.json().get('detail', response.text)
            except ValueError:
                detail = response.text
            raise RolloutServerError(f'the rollout server {url} answered the weight sync with {response.status_code}: '
                                     f'{detail}')
        try:
            marked = MARK in response.json()
        except ValueError:
            marked = False
        if not marked and not getattr(client, '_gkd_warned_unmarked', False):
            client._gkd_warned_unmarked = True
            logger.warning(f'swift_gkd_plugin: the rollout server {url} runs without swift_gkd_plugin: ms-swift\'s '
                           'server answers a weight sync whose loads failed in its vLLM workers as one that '
                           'succeeded (its samples would then come from stale weights). Install the plugin where '
                           'swift rollout runs: its server reports such a failure and the run stops')
