"""``--external_plugins`` of ``bench_score_loop.py``: every batch a ``swift-gkd score`` run's teacher forwards (its
tensors, on the CPU, as the loop made them) and the seconds of each forward, saved when the score finishes to the file
named by ``BENCH_SCORE_BATCHES``."""
import functools
import os
import time

import torch

from swift_gkd_plugin.swift.trainer import GKDPluginTrainer

_batches, _seconds = [], []
_forward, _finish = GKDPluginTrainer._teacher_forward, GKDPluginTrainer._finish_score_only


@functools.wraps(_forward)
def _recorded_forward(self, model, teacher_inputs, *args, **kwargs):
    _batches.append({k: v.detach().cpu().clone() for k, v in teacher_inputs.items() if isinstance(v, torch.Tensor)})
    start = time.perf_counter()
    out = _forward(self, model, teacher_inputs, *args, **kwargs)
    _seconds.append(time.perf_counter() - start)
    return out


@functools.wraps(_finish)
def _finish_and_save(self, *args, **kwargs):
    result = _finish(self, *args, **kwargs)
    torch.save({'batches': _batches, 'forward_s': _seconds}, os.environ['BENCH_SCORE_BATCHES'])
    return result


GKDPluginTrainer._teacher_forward = _recorded_forward
GKDPluginTrainer._finish_score_only = _finish_and_save
