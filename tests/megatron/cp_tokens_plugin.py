"""What each rank of a real ``megatron rlhf`` run holds under context parallelism (``--external_plugins``): appends,
per rank, one json line per micro-batch the trainer prepares (``_prepare_batch``: its ``input_ids`` positions before
the split over the CP ranks and on this rank after it) and per decoder-layer forward (``TransformerLayer``: the
``S x B`` positions of its hidden states), to the file named by ``GKD_TEST_CP_LOG``."""
import functools
import json
import os

import torch
from megatron.core.transformer.transformer_layer import TransformerLayer

from swift_gkd_plugin.megatron.trainer import GKDPluginMegatronTrainer

_LOG = os.environ['GKD_TEST_CP_LOG']


def _write(record):
    with open(_LOG, 'a') as f:
        f.write(json.dumps(dict(record, rank=int(os.environ.get('RANK', '0')))) + '\n')


_prepare = GKDPluginMegatronTrainer._prepare_batch


@functools.wraps(_prepare)
def _prepare_batch(self, data, *args, **kwargs):
    whole = data['input_ids'].numel() if data.get('input_ids') is not None else None
    out = _prepare(self, data, *args, **kwargs)
    if whole is not None and out.get('input_ids') is not None:
        _write({'batch': whole, 'local': out['input_ids'].numel()})
    return out


def _after_layer(module, args, output):
    """A decoder layer (megatron-core's ``TransformerLayer`` or a subclass) returns its hidden states ``[S, B, H]``
    first."""
    if isinstance(module, TransformerLayer):
        hidden = output[0] if isinstance(output, tuple) else output
        _write({'layer': hidden.shape[0] * hidden.shape[1]})


torch.nn.modules.module.register_module_forward_hook(_after_layer)
GKDPluginMegatronTrainer._prepare_batch = _prepare_batch
