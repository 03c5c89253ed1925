"""TEST-ONLY: ``swift rollout`` (vLLM server mode) and its weight sync on a machine without CUDA.

ms-swift sends the trained weights to a ``swift rollout`` server over NCCL: the trainer and every vLLM worker build a
``PyNcclCommunicator`` over vLLM's ``StatelessProcessGroup`` (``rlhf_trainers/vllm_client.py``,
``pipelines/infer/rollout.py``), exactly where ms-swift already swaps in Ascend's and Kunlun's communicators. Here
that class becomes :class:`GlooCommunicator`, the same broadcasts over a gloo group on the same store, and
``swift rollout``'s device count check accepts the CPU. Nothing else changes: the server, the client, the tensors
sent, their order and names are ms-swift's and vLLM's.

Installed only by ``tests/rollout_cpu_site/sitecustomize.py`` (on ``PYTHONPATH`` of the tests' servers and trainers,
so that vLLM's engine-core processes get it too); nothing in a user's process imports this module.
"""
from __future__ import annotations

from datetime import timedelta

# (no torch at import: every Python process of a test server's environment runs this, torch.compile's instruction-set
# probes too, which exist to spare themselves torch's import; the patches import it when their targets load)
from harness import _after, _FINDER


class GlooCommunicator:
    """The part of vLLM's ``PyNcclCommunicator`` that ms-swift's weight sync uses (``broadcast``, ``group``,
    ``device``, ``rank``, ``world_size``), over gloo on the stateless group's own store."""

    def __init__(self, group, device=None):
        import torch
        from torch.distributed import PrefixStore
        from vllm.distributed.utils import init_gloo_process_group
        self.group, self.rank, self.world_size = group, group.rank, group.world_size
        self.device = torch.device('cpu')
        self._pg = init_gloo_process_group(PrefixStore('gkd_test_gloo_sync', group.store), group.rank,
                                           group.world_size, timedelta(seconds=300))

    def broadcast(self, tensor, src: int, stream=None) -> None:
        import torch
        opts = torch.distributed.BroadcastOptions()
        opts.rootRank = src
        self._pg.broadcast([tensor], opts).wait()


def _deploy_args(module):
    def check_device_count(self):  # vLLM's CPU build runs the engine on the host
        return None
    module.DeployArguments._check_device_count = check_device_count
    if hasattr(module, 'RolloutArguments'):
        module.RolloutArguments._check_device_count = check_device_count


def _cpu_synchronize(module):
    """``swift.utils.synchronize`` calls ``torch.cuda.synchronize`` on any machine but NPU and MUSA; on the CPU the
    work is done when a call returns. The client's broadcast also enters ``get_torch_device().device(...)``, which
    ``torch.cpu`` lacks."""
    import torch
    original = module.synchronize

    def synchronize(device=None):
        if torch.cuda.is_available():
            original(device)
    module.synchronize = synchronize
    if not hasattr(torch.cpu, 'device'):
        import contextlib
        torch.cpu.device = lambda device: contextlib.nullcontext()


def _swap(module):
    module.PyNcclCommunicator = GlooCommunicator


def _allow_server_mode(module):  # the plugin's check that --vllm_mode server has CUDA: this process needs none
    module.allow_server_mode_without_cuda()


# where each patch applies: the modules that define what ms-swift's server and client import by name
_PATCHES = {
    'swift.arguments.deploy_args': _deploy_args,
    'swift.utils.torch_utils': _cpu_synchronize,
    'vllm.distributed.device_communicators.pynccl': _swap,
    'swift_gkd_plugin.swift.setup.vllm': _allow_server_mode,
}


def install() -> None:
    import sys
    for name, patch in _PATCHES.items():
        _after(name)(patch)
        if name in sys.modules:
            patch(sys.modules[name])
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)
