"""``--external_plugins`` for ``swift-gkd score``: where its teacher forward's time goes (issue 90's forward gap).

On each batch the loop forwards, the unwrapped teacher is also called directly on the same inputs under
``torch.inference_mode`` (with its head, then its base alone), in the loop's own process; ``SCORE_PROBE_ORDER=direct``
makes the direct calls go first. Every 8 batches a ``score probe:`` line on stderr gives the summed seconds. It doubles
the forward work: a diagnostic, not a throughput figure (``bench_score_loop.py`` gives those).

    swift-gkd score ... --external_plugins benchmarks/score_forward_probe_plugin.py
"""
import functools
import os
import sys
import time

import torch

from swift_gkd_plugin.swift.teacher.placement import TeacherModel

_forward = TeacherModel.forward
_DIRECT_FIRST = os.environ.get('SCORE_PROBE_ORDER') == 'direct'
_seconds = {'loop': 0.0, 'direct': 0.0, 'direct_base': 0.0, 'batches': 0}


def _timed(key, call):
    start = time.perf_counter()
    out = call()
    _seconds[key] += time.perf_counter() - start
    return out


@functools.wraps(_forward)
def _probed_forward(self, model, teacher_inputs, *args, **kwargs):
    trainer = self.trainer
    unwrapped = trainer.accelerator.unwrap_model(trainer.teacher_model if trainer.teacher_model is not None else model)
    inputs = {k: v for k, v in teacher_inputs.items() if k != 'labels'}

    def direct():
        with torch.inference_mode():
            _timed('direct', lambda: unwrapped(**inputs))
            _timed('direct_base', lambda: getattr(unwrapped, 'model', unwrapped)(**inputs))

    if _DIRECT_FIRST:
        direct()
    out = _timed('loop', lambda: _forward(self, model, teacher_inputs, *args, **kwargs))
    if not _DIRECT_FIRST:
        direct()
    _seconds['batches'] += 1
    if _seconds['batches'] % 8 == 0:
        print('score probe: ' + ', '.join(f'{k} {v:.2f}' for k, v in _seconds.items()), file=sys.stderr, flush=True)
    return out


TeacherModel.forward = _probed_forward
