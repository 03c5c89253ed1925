"""Records, for every training micro-batch of the fused loss in a real ``swift rlhf`` run (``--external_plugins``),
the ``forward`` the student module's call dispatches to and torch.compile's graph counters, as one json line in the
file named by ``GKD_TEST_COMPILE_LOG``."""
import json
import os

from swift_gkd_plugin.swift.trainer import GKDPluginTrainer

_LOG = os.environ['GKD_TEST_COMPILE_LOG']
_apply = GKDPluginTrainer._fused_apply


def _fused_apply(self, student, *args, **kwargs):
    from torch._dynamo.utils import counters
    loss = _apply(self, student, *args, **kwargs)
    record = {'rank': int(os.environ.get('RANK', '0')), 'forward': id(student.__dict__.get('forward')),
              'unique_graphs': counters['stats']['unique_graphs'], 'frames': counters['frames']['total']}
    with open(_LOG, 'a') as f:
        f.write(json.dumps(record) + '\n')
    return loss


GKDPluginTrainer._fused_apply = _fused_apply
