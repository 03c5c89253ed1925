"""What each rank of a real ``swift rlhf`` run holds while it trains (``--external_plugins``, for
``bench_sp_pipeline.py``): appends one json line per rank, at the end of training, to the file named by
``GKD_BENCH_MEMORY_LOG``:

- ``peak_mib``: the peak resident set size of the process during its training steps (the kernel's ``VmHWM``, reset
  through ``/proc/self/clear_refs`` when the first step starts) minus its resident size just before that step: the
  memory training adds to a loaded run (activations, gradients, optimizer states, the loss);
- ``tokens``: the most token positions one decoder-layer forward of a training step ran on (``B x S`` of its input:
  a rank's share of a row under sequence parallelism), and ``forwards``: how many such layer forwards there were;
- ``steps``: the training steps counted.

Sampling is not a training step here: the benchmark trains on dataset rows (``--lmbda 0``).
"""
import functools
import json
import os

import torch

from swift_gkd_plugin.swift.trainer import GKDPluginTrainer

_LOG = os.environ['GKD_BENCH_MEMORY_LOG']
_state = {'base_kib': None, 'peak_kib': 0, 'tokens': 0, 'forwards': 0, 'steps': 0, 'in_step': False}


def _status_kib(field: str) -> int:
    with open('/proc/self/status') as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ':'))


def _on_layer(module, args):
    if _state['in_step'] and type(module).__name__.endswith('DecoderLayer') and args and torch.is_tensor(args[0]):
        _state['tokens'] = max(_state['tokens'], args[0].numel() // args[0].shape[-1])
        _state['forwards'] += 1


torch.nn.modules.module.register_module_forward_pre_hook(_on_layer)
_training_step = GKDPluginTrainer.training_step
_train = GKDPluginTrainer.train


@functools.wraps(_training_step)
def training_step(self, *args, **kwargs):
    if _state['base_kib'] is None:
        _state['base_kib'] = _status_kib('VmRSS')
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')  # VmHWM := VmRSS
    _state['in_step'] = True
    try:
        return _training_step(self, *args, **kwargs)
    finally:
        _state['in_step'] = False
        _state['steps'] += 1
        _state['peak_kib'] = max(_state['peak_kib'], _status_kib('VmHWM'))


@functools.wraps(_train)
def train(self, *args, **kwargs):
    out = _train(self, *args, **kwargs)
    record = {'rank': int(os.environ.get('RANK', '0')), 'steps': _state['steps'], 'tokens': _state['tokens'],
              'forwards': _state['forwards'],
              'peak_mib': round((_state['peak_kib'] - (_state['base_kib'] or 0)) / 1024, 1)}
    with open(_LOG, 'a') as f:
        f.write(json.dumps(record) + '\n')
    return out


GKDPluginTrainer.training_step = training_step
GKDPluginTrainer.train = train
