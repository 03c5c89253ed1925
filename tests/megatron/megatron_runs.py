"""Runs of the real ``megatron rlhf --rlhf_type gkd`` (ms-swift's launcher, torchrun, megatron-core, mcore-bridge) on
the tiny offline models, on CPU: the test-only harness :mod:`harness.megatron_cpu` is put on the
ranks' ``PYTHONPATH`` (``cpu_site/sitecustomize.py``); the plugin itself is active as for any user."""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import time
from typing import Dict, List, Optional

from conftest import (MEGATRON, OFFLINE_ENV, SharedRuns, SwiftRun, _free_port, _zygote_for, launch,
                      launcher_child_command, log_run, without_import_side_effects)

CPU_SITE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'cpu_site')
ACTIVE = 'GKD trainer active (megatron'


def megatron_args(ws, output_dir: str, **overrides) -> List[str]:
    """A CPU ``megatron rlhf --rlhf_type gkd`` command line on the tiny pair; ``overrides`` replace or add flags (None
    removes one). The flags after ``dataset_num_proc`` are what a CPU run needs (gloo, float32, no packed sequences:
    see the harness)."""
    flags: Dict[str, object] = {
        'rlhf_type': 'gkd', 'model': ws.student, 'model_type': 'qwen3', 'teacher_model': ws.teacher,
        'teacher_model_type': 'qwen3', 'template': 'qwen3_nothinking', 'dataset': ws.train, 'tuner_type': 'full',
        'torch_dtype': 'float32', 'check_model': 'false', 'max_completion_length': 8, 'max_length': 128,
        'train_iters': 2, 'micro_batch_size': 2, 'global_batch_size': 2, 'logging_steps': 1, 'lr': 1e-4,
        'use_vllm': 'false', 'seed': 42, 'save_steps': 1000, 'output_dir': output_dir, 'add_version': 'false',
        'split_dataset_ratio': 0, 'dataset_num_proc': 1, 'dataloader_num_workers': 0,
        'ddp_backend': 'gloo', 'padding_free': 'false', 'fp16': 'false', 'bf16': 'false',
        'masked_softmax_fusion': 'false',
    }
    for key, value in overrides.items():
        if value is None:
            flags.pop(key, None)
        else:
            flags[key] = value
    argv = []
    for key, value in flags.items():
        argv += [f'--{key}', *map(str, value)] if isinstance(value, (list, tuple)) else [f'--{key}', str(value)]
    return argv


def _megatron_env(nproc: int) -> Dict[str, str]:
    """The environment of a run's ranks, as the launcher passes it on (its import of ms-swift's CLI sets one)."""
    import swift.cli.main  # noqa: F401 - it sets VLLM_LOGGING_LEVEL in this process's environment when imported
    env = dict(without_import_side_effects(os.environ), **OFFLINE_ENV, NPROC_PER_NODE=str(nproc),
               MASTER_PORT=str(_free_port()))
    env.pop('SWIFT_GKD_PLUGIN', None)
    env.pop('TRITON_INTERPRET', None)  # the ranks run as a user's would
    env['PYTHONPATH'] = os.pathsep.join(p for p in (CPU_SITE, os.environ.get('PYTHONPATH')) if p)
    return env


def run_megatron(argv: List[str], *, nproc: int = 1, timeout: int = 600, check: bool = True,
                 env: Dict[str, str] = None, launcher: Optional[bool] = None) -> SwiftRun:
    """``megatron rlhf argv`` on ``nproc`` CPU ranks (torchrun, gloo). ``launcher`` (the default where ``check`` is
    False: runs that may be refused): through ms-swift's ``megatron`` launcher; otherwise the ranks it would start,
    forked from the test worker's Megatron zygote (``tests/megatron/test_megatron_zygote.py``: both log the same
    run)."""
    full_env = _megatron_env(nproc)
    full_env.update(env or {})
    if launcher is None:
        launcher = not check
    child = launcher_child_command('rlhf', argv, full_env, megatron=True)
    zygote, ranks = (None, 0) if launcher else _zygote_for(child, full_env, 'megatron', _megatron_env(nproc))
    started, forked = time.time(), False
    if zygote is not None:
        import tempfile
        with tempfile.TemporaryDirectory(prefix='run_megatron_') as workdir:
            rc, stdout, stderr = zygote.run(child[7], child[8:], full_env, timeout, workdir, nproc=ranks,
                                            port=full_env['MASTER_PORT'])
        proc = subprocess.CompletedProcess(child, rc, stdout, stderr)
    else:
        proc, forked = launch(MEGATRON, ['rlhf', *argv], full_env, timeout)
    how = 'zygote fork (torchrun)' if zygote else 'launcher forked' if forked else 'launcher'
    log_run(f'megatron rlhf, {nproc} process(es), {how}', time.time() - started)
    output = proc.stdout + proc.stderr
    output_dir = argv[argv.index('--output_dir') + 1]
    if check and proc.returncode != 0:
        raise AssertionError(f'megatron rlhf failed ({proc.returncode}):\n{output[-8000:]}')
    logs = []
    for path in sorted(glob.glob(os.path.join(output_dir, 'logging.jsonl'))):
        with open(path) as f:
            logs += [row for row in map(json.loads, f) if 'loss' in row or 'eval_loss' in row]
    return SwiftRun(proc.returncode, output, output_dir, logs)


RANK_MAIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'rank_main.py')


def spawn_ranks(fn, args: tuple, nprocs: int, timeout: int = 600) -> None:
    """``torch.multiprocessing.spawn(fn, args, nprocs)`` for a module-level ``fn`` of a test module of this folder and
    JSON arguments: ``fn(rank, *args)`` in ``nprocs`` processes, here forked from the test worker's Megatron zygote as
    the ranks of a torchrun run (``rank_main.py``): a spawned process imported torch, megatron-core and ms-swift
    itself, ~15 s of CPU each. Spawned as before where no zygote can start them (CUDA present, or
    ``GKD_TESTS_FRESH_PROCESSES=1``); raises with the ranks' output if one fails."""
    import torch
    env = _megatron_env(nproc=nprocs)
    child = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', str(nprocs), '--master_port',
             env['MASTER_PORT'], RANK_MAIN, fn.__module__, fn.__name__, json.dumps(list(args))]
    zygote = None if torch.cuda.is_available() else _zygote_for(child, env, 'megatron', _megatron_env(nprocs))[0]
    if zygote is None:
        torch.multiprocessing.spawn(fn, args=args, nprocs=nprocs, join=True)
        return
    import tempfile
    started = time.time()
    with tempfile.TemporaryDirectory(prefix='spawn_ranks_') as workdir:
        rc, stdout, stderr = zygote.run(child[7], child[8:], env, timeout, workdir, nproc=nprocs,
                                        port=env['MASTER_PORT'])
    log_run(f'{nprocs} spawned rank(s), zygote fork', time.time() - started)
    assert rc == 0, f'{fn.__module__}.{fn.__name__}: a rank failed ({rc}):\n{(stdout + stderr)[-8000:]}'


def train_rows(run: SwiftRun) -> List[dict]:
    """The logged training rows (one per iteration with ``--logging_steps 1``)."""
    return [row for row in run.logs if 'loss' in row]


# ----------------------------------------------------------------- the runs that several test modules compare with
MIXED_SEED = 41  # lmbda 0.5 with seq_kd: on_policy, seq_kd, on_policy, seq_kd at steps 0-3
# both sampling modes, the teacher offloaded, completions logged, a resumable save at step 2
MIXED = dict(seed=MIXED_SEED, lmbda=0.5, seq_kd='true', offload_teacher_model='true', log_completions='true',
             save_steps=2, save_safetensors='false')
# both sampling modes on two data-parallel ranks, the rollouts cut (--gkd_rollout_max_tokens on on-policy steps,
# --max_completion_length on seq_kd ones): test_megatron_rlhf.py and test_metrics_documented.py
DP2 = dict(seed=MIXED_SEED, lmbda=0.5, seq_kd='true', micro_batch_size=1, max_completion_length=6,
           gkd_rollout_max_tokens=3)


def fixed_rows(ws) -> Dict[str, object]:
    """The 4 fixed rows in one batch, off-policy, 3 steps at lr 1e-3: step 1 is the loss of exactly those rows (it is
    logged before the update), the later steps show the weights after the updates."""
    return dict(dataset=ws.fixed, lmbda=0, train_iters=3, micro_batch_size=4, global_batch_size=4, lr=1e-3)


def shared_megatron_runs(ws, shared_runs, starts: Optional[Dict[str, object]] = None) -> SharedRuns:
    """The megatron runs of this test session (``conftest.shared_runs``: each started once, for all xdist workers):
    ``starts`` (name -> start(output_dir)), the one-rank runs that the TP, CP and SP tests compare with
    (``fixed_rows``, ``mixed``) and ``dp2`` (their flags above). Starting a CPU ``megatron rlhf`` costs ~30 s a
    rank: a run is shared, not rerun by each module that asserts on it."""
    runs = shared_runs('megatron', {})
    runs.starts.update({'fixed_rows': lambda out: run_megatron(megatron_args(ws, out, **fixed_rows(ws))),
                        'mixed': lambda out: run_megatron(megatron_args(ws, out, **MIXED)),
                        'dp2': lambda out: run_megatron(megatron_args(ws, out, **DP2), nproc=2)}, **(starts or {}))
    return runs
