"""The Megatron trainer's mode decisions agree on every rank of a real ``torch.distributed`` job.

The trainer (``GKDPluginMegatronTrainer``) cannot be built without Megatron-SWIFT's GPU stack, so the ranks run the
exact call its ``_generate_and_score_completions`` makes (checked below from its source): ``step_mode(self.args,
step, training, self._mode_log)`` with the mode log at ``mode_log_path(output_dir, rank)``. Each rank has its own
global random state; the logs the ranks write must be identical and equal a fresh single-process ``choose_mode``.
"""
import ast
import datetime
import importlib.util
import json
import os
import random
from types import SimpleNamespace

import torch
import torch.distributed as dist
from megatron_runs import spawn_ranks

from swift_gkd_plugin.core import choose_mode
from swift_gkd_plugin.core.modes import mode_log_path, step_mode

CONFIGS = [(42, 0.5, False), (42, 0.5, True), (7, 0.1, True), (0, 1.0, False)]
STEPS = range(200)
WORLD = 4


def _trainer_args(seed, lmbda, seq_kd):
    """The fields of the Megatron trainer's arguments that the decision reads."""
    return SimpleNamespace(seed=seed, lmbda=lmbda, seq_kd=seq_kd)


def _worker(rank, world, init_file, out_dir):
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        random.seed(rank)  # each rank's global random state differs, as after data shuffling or dropout
        torch.manual_seed(rank)
        for i, config in enumerate(CONFIGS):
            args = _trainer_args(*config)
            log = mode_log_path(os.path.join(out_dir, f'config{i}'), dist.get_rank())
            for step in STEPS:
                step_mode(args, step, True, log)
                random.random()  # the trainer's own use of the global streams between steps
                torch.rand(3)
            evaluation = [step_mode(args, step, False, log).value for step in range(5)]
            assert evaluation == ['off_policy'] * 5
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _read(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_every_rank_takes_and_logs_the_same_decisions(tmp_path):
    spawn_ranks(_worker, (WORLD, str(tmp_path / 'init'), str(tmp_path)), WORLD)
    seen = set()
    for i, (seed, lmbda, seq_kd) in enumerate(CONFIGS):
        expected = [choose_mode(seed, step, lmbda, seq_kd).value for step in STEPS]
        logs = [_read(mode_log_path(str(tmp_path / f'config{i}'), rank)) for rank in range(WORLD)]
        for log in logs:  # evaluation steps are not logged
            assert [r['step'] for r in log] == list(STEPS)
            assert [r['mode'] for r in log] == expected
        assert all(log == logs[0] for log in logs)
        seen.update(expected)
    assert seen == {'on_policy', 'seq_kd', 'off_policy'}  # the draws exercise every mode


def test_the_megatron_trainer_decides_with_this_call():
    """The call the ranks above run is the one the trainer makes (its source, parsed: the module itself needs
    Megatron-SWIFT to import)."""
    with open(importlib.util.find_spec('swift_gkd_plugin.megatron.trainer').origin) as f:
        tree = ast.parse(f.read())
    method = next(node for node in ast.walk(tree)
                  if isinstance(node, ast.FunctionDef) and node.name == '_generate_and_score_completions')
    calls = [ast.unparse(node) for node in ast.walk(method)
             if isinstance(node, ast.Call) and getattr(node.func, 'id', None) == 'step_mode']
    assert calls == ['step_mode(self.args, step, training, self._mode_log)']
    init = next(node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef) and node.name == '__init__')
    assert 'self._mode_log = mode_log_path(args.output_dir, rank)' in [ast.unparse(n) for n in ast.walk(init)
                                                                       if isinstance(n, ast.Assign)]
