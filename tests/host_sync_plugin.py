"""Counts the host syncs of every micro-batch's loss and backward in a real ``swift rlhf`` run (``--external_plugins``).

Runs the plugin trainer's ``compute_loss``, accelerate's ``Accelerator.backward`` and the backward of the plugin's
autograd functions (autograd's engine runs those without the caller's torch-function mode) under
:class:`harness.host_syncs.HostSyncCounter`, and appends one json line per training micro-batch
(its mode and the would-be syncs of its loss and of its backward, each with its caller) to the file named by
``GKD_TEST_SYNC_LOG``.
"""
import functools
import json
import os

from accelerate import Accelerator

from swift_gkd_plugin.core.divergence import RowwiseDivergence
from swift_gkd_plugin.core.fused.loss import _FusedLinearJSD
from swift_gkd_plugin.swift.trainer import GKDPluginTrainer
from harness.host_syncs import HostSyncCounter

_LOG = os.environ['GKD_TEST_SYNC_LOG']
_current = {}  # the micro-batch being counted


def _counted(method, key):

    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        if key not in _current:
            return method(*args, **kwargs)
        with HostSyncCounter() as counter:
            out = method(*args, **kwargs)
        _current[key] += counter.events
        return out

    return wrapper


def _compute_loss(compute_loss):

    @functools.wraps(compute_loss)
    def wrapper(self, model, inputs, *args, **kwargs):
        if not self.model.training:
            return compute_loss(self, model, inputs, *args, **kwargs)
        _current.clear()
        _current.update(mode=inputs['gkd_mode'].value, loss=[])
        out = _counted(compute_loss, 'loss')(self, model, inputs, *args, **kwargs)
        _current['backward'] = []
        return out

    return wrapper


def _backward(backward):

    @functools.wraps(backward)
    def wrapper(self, *args, **kwargs):
        out = _counted(backward, 'backward')(self, *args, **kwargs)
        if 'backward' in _current:
            with open(_LOG, 'a') as f:
                f.write(json.dumps(_current) + '\n')
            _current.clear()
        return out

    return wrapper


GKDPluginTrainer.compute_loss = _compute_loss(GKDPluginTrainer.compute_loss)
Accelerator.backward = _backward(Accelerator.backward)
for function in (_FusedLinearJSD, RowwiseDivergence):
    function.backward = staticmethod(_counted(function.backward, 'backward'))
