"""Counts, for every training step of a real ``swift rlhf`` run (``--external_plugins``), what each phase of the step
did, and appends one json line per step and rank to the file named by ``GKD_TEST_PROBE_LOG``.

Phases (the innermost one running gets the event): ``generate`` (sampling and encoding a generation batch:
``_generate_and_score_completions``), ``teacher`` (``TeacherModel.forward``), ``loss`` (the rest of ``compute_loss``:
student's forward and the loss), ``backward`` (``Accelerator.backward``), ``step`` (the rest of ``training_step``).
Events, each per phase:

- ``forwards``: forwards of a causal LM, counted once per outermost call of a ``*ForCausalLM`` module: a PEFT wrapper
  (``PeftModelForCausalLM``) and the model it calls are one forward, whether the wrapper reaches the model through
  ``forward`` (peft 0.20, no hooks run) or ``__call__`` (peft 0.21);
- ``layer_tokens``: the token positions the decoder layers ran on (one layer forward of ``B x S`` counts ``B * S``),
  the measure of how much model work a phase did, whatever its batch shapes;
- ``gathers``, ``gathered``: DeepSpeed all-gather calls and the elements they returned (ZeRO-3 parameter fetches:
  ``gathered`` over the model's parameter count is the number of full-model gathers);
- ``flops`` (``GKD_TEST_PROBE_FLOPS=1``): matmul and attention floating-point operations (torch's
  ``FlopCounterMode``), backward included;
- ``trace_invalidations``: DeepSpeed ZeRO-3 dropping its recorded module order (it then fetches each submodule's
  parameters on demand, without prefetching, and records the order again);
- ``dynamo_frames``: frames dynamo converted (traced or retraced into a graph, ``--torch_compile``);
- ``seconds``: wall time.

Also per step: ``response_tokens`` (the step's student response tokens on this rank) and the optimizer step's index.
An evaluation (``evaluation_loop``) is not part of a step: it writes a line of its own, ``step`` ``eval<N>`` after
optimizer step N.
"""
import functools
import json
import os
import time
from collections import defaultdict

import torch
from accelerate import Accelerator

from swift_gkd_plugin.swift.teacher.placement import TeacherModel
from swift_gkd_plugin.swift.trainer import GKDPluginTrainer

_LOG = os.environ['GKD_TEST_PROBE_LOG']
_FLOPS = os.environ.get('GKD_TEST_PROBE_FLOPS') == '1'
_stack = []  # running phases, innermost last
_counts = defaultdict(lambda: defaultdict(float))  # phase -> event -> count, for the step being recorded
_step = {'tokens': 0.0}


def _add(event, value=1.0):
    if _stack:
        _counts[_stack[-1]][event] += value


def _phase(name):
    """A method decorator: the call runs as phase ``name`` (its own time excludes inner phases' time)."""

    def decorate(method):

        @functools.wraps(method)
        def wrapper(*args, **kwargs):
            outer = _stack[-1] if _stack else None
            start, frames = time.perf_counter(), _dynamo_frames()
            _stack.append(name)
            flops = None
            if _FLOPS:
                from torch.utils.flop_counter import FlopCounterMode
                flops = FlopCounterMode(display=False)
                flops.__enter__()
            try:
                return method(*args, **kwargs)
            finally:
                if flops is not None:
                    flops.__exit__(None, None, None)
                    _counts[name]['flops'] += flops.get_total_flops()
                    if outer is not None:
                        _counts[outer]['flops'] -= flops.get_total_flops()
                _stack.pop()
                spent, traced = time.perf_counter() - start, _dynamo_frames() - frames
                _counts[name]['seconds'] += spent
                _counts[name]['dynamo_frames'] += traced
                if outer is not None:
                    _counts[outer]['seconds'] -= spent
                    _counts[outer]['dynamo_frames'] -= traced

        return wrapper

    return decorate


def _dynamo_frames() -> int:
    from torch._dynamo.utils import counters
    return counters['frames']['total']


_lm_depth = [0]  # causal-LM calls running (a PEFT wrapper's call and the model's inside it: 2)


def _on_forward(module, args, kwargs):
    name = type(module).__name__
    if name.endswith('ForCausalLM'):
        if not _lm_depth[0]:
            _add('forwards')
        _lm_depth[0] += 1
    elif name.endswith('DecoderLayer'):
        hidden = args[0] if args else kwargs.get('hidden_states')
        if isinstance(hidden, torch.Tensor):
            _add('layer_tokens', hidden.numel() // hidden.shape[-1])


def _after_forward(module, args, output):
    if type(module).__name__.endswith('ForCausalLM'):
        _lm_depth[0] -= 1


torch.nn.modules.module.register_module_forward_pre_hook(lambda m, a: _on_forward(m, a, {}))
torch.nn.modules.module.register_module_forward_hook(_after_forward, always_call=True)


def _count_gathers():
    try:
        from deepspeed.comm.torch import TorchBackend
    except ImportError:
        return
    for method in ('all_gather_into_tensor', 'all_gather'):
        original = getattr(TorchBackend, method)

        def counted(self, *args, _original=original, _method=method, **kwargs):
            out = kwargs.get('output_tensor', args[0] if args else None)
            if _method == 'all_gather':
                out = kwargs.get('tensor_list', args[0] if args else [])
                _add('gathered', sum(t.numel() for t in out))
            else:
                _add('gathered', out.numel())
            _add('gathers')
            return _original(self, *args, **kwargs)

        setattr(TorchBackend, method, counted)
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator
    invalidate = PartitionedParameterCoordinator._invalidate_trace

    def counted_invalidate(self):
        _add('trace_invalidations')
        return invalidate(self)

    PartitionedParameterCoordinator._invalidate_trace = counted_invalidate


_count_gathers()

GKDPluginTrainer._generate_and_score_completions = _phase('generate')(GKDPluginTrainer._generate_and_score_completions)
TeacherModel.forward = _phase('teacher')(TeacherModel.forward)
Accelerator.backward = _phase('backward')(Accelerator.backward)
_compute_loss = _phase('loss')(GKDPluginTrainer.compute_loss)


def compute_loss(self, model, inputs, *args, **kwargs):
    if self.model.training and 'gkd_tokens' in inputs:
        _step['tokens'] += inputs['gkd_tokens'][0]
    return _compute_loss(self, model, inputs, *args, **kwargs)


GKDPluginTrainer.compute_loss = compute_loss
_training_step = _phase('step')(GKDPluginTrainer.training_step)


def training_step(self, *args, **kwargs):
    out = _training_step(self, *args, **kwargs)
    # the last micro-batch of the optimizer step: write the step's counts (the generation of the step's batch ran
    # inside its first micro-batch's training_step)
    if (self.accelerator.gradient_state.sync_gradients if hasattr(self.accelerator, 'gradient_state') else True):
        record = {'rank': int(os.environ.get('RANK', '0')), 'step': self.state.global_step + 1,
                  'mode': getattr(self, '_gkd_mode', None) and self._gkd_mode.value,
                  'response_tokens': _step['tokens'],
                  'params': sum(getattr(p, 'ds_numel', p.numel()) for p in self.model.parameters()),
                  'phases': {k: dict(v) for k, v in _counts.items()}}
        with open(_LOG, 'a') as f:
            f.write(json.dumps(record) + '\n')
        _counts.clear()
        _step['tokens'] = 0.0
    return out


GKDPluginTrainer.training_step = training_step


_evaluation_loop = GKDPluginTrainer.evaluation_loop


def evaluation_loop(self, *args, **kwargs):
    held = {k: dict(v) for k, v in _counts.items()}  # the step running (an evaluation runs between steps: none)
    _counts.clear()
    try:
        return _evaluation_loop(self, *args, **kwargs)
    finally:
        record = {'rank': int(os.environ.get('RANK', '0')), 'step': f'eval{self.state.global_step}',
                  'phases': {k: dict(v) for k, v in _counts.items()}}
        with open(_LOG, 'a') as f:
            f.write(json.dumps(record) + '\n')
        _counts.clear()
        for phase, events in held.items():
            _counts[phase].update(events)


GKDPluginTrainer.evaluation_loop = evaluation_loop
