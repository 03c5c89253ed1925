"""``--external_plugins`` of ``bench_score_loop.py``: every batch a ``swift-gkd score`` run's teacher forwards (its
tensors, on the CPU, as the loop made them) and the seconds of each forward, saved when the score finishes to the file
named by ``BENCH_SCORE_BATCHES``, with the CPU seconds the store's writer thread spent encoding and writing rows
(``writer_cpu_s``: on a CPU it shares the cores with the forward)."""
import functools
import os
import time

import torch

from swift_gkd_plugin.core.scores.store import StoreWriter
from swift_gkd_plugin.swift.teacher.placement import TeacherModel
from swift_gkd_plugin.swift.teacher.store import ScoreStore

_batches, _seconds, _writer_cpu = [], [], [0.0]
_forward, _finish, _append = TeacherModel.forward, ScoreStore.finish_score_only, StoreWriter._append


@functools.wraps(_append)
def _timed_append(self, *args, **kwargs):
    start = time.thread_time()  # this thread's CPU: the writer's worker, whatever the forward does meanwhile
    try:
        return _append(self, *args, **kwargs)
    finally:
        _writer_cpu[0] += time.thread_time() - start


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
    torch.save({'batches': _batches, 'forward_s': _seconds, 'writer_cpu_s': _writer_cpu[0]},
               os.environ['BENCH_SCORE_BATCHES'])
    return result


TeacherModel.forward = _recorded_forward
ScoreStore.finish_score_only = _finish_and_save
StoreWriter._append = _timed_append
