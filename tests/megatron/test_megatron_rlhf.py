"""``megatron rlhf --rlhf_type gkd`` end to end: the real launcher, torchrun ranks on gloo, megatron-core and
mcore-bridge building and training the tiny Qwen3 pair on CPU (the test-only harness of
:mod:`swift_gkd_plugin.testing.megatron_cpu` stands in for CUDA and transformer-engine only).

Every run is started once per test session (``shared_runs``) and asserted on by the tests below it: the plugin's
trainer active, rc 0, a finite non-zero loss at every iteration, and the mode log equal to ``choose_mode``."""
import glob
import json
import math
import os
import re
import shutil

import pytest
import torch

from conftest import base_args, run_swift
from megatron_runs import ACTIVE, megatron_args, run_megatron, train_rows

from swift_gkd_plugin.core import choose_mode

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason='the CPU harness does nothing where CUDA is '
                                'present: tests/gpu/run_megatron_gkd.sh runs Megatron-SWIFT there')

MIXED_SEED = 41  # lmbda 0.5 with seq_kd: on_policy, seq_kd, on_policy, seq_kd at steps 0-3
OFF_ON_SEED = 43  # lmbda 0.5 without seq_kd: off_policy, on_policy, on_policy
assert [choose_mode(MIXED_SEED, s, 0.5, True).value for s in range(4)] == ['on_policy', 'seq_kd'] * 2
assert [choose_mode(OFF_ON_SEED, s, 0.5, False).value for s in range(3)] == ['off_policy', 'on_policy', 'on_policy']


def _starts(ws, runs):
    """name -> start(output_dir) -> SwiftRun; ``runs`` gives the runs a start builds on."""

    def mixed(out, **flags):  # both sampling modes, the teacher offloaded, completions logged, a resumable save
        return run_megatron(megatron_args(
            ws, out, seed=MIXED_SEED, lmbda=0.5, seq_kd='true', offload_teacher_model='true',
            log_completions='true', save_steps=2, save_safetensors='false', **flags))

    def resumed(out):
        first = runs['mixed']
        shutil.copytree(first.output_dir, out)
        return mixed(out, train_iters=4, mcore_model=os.path.join(out, 'checkpoint-2'), finetune='false',
                     no_load_optim='true')

    def fixed_rows(out, nproc=1, **flags):  # the 4 fixed rows in one step at lr 0: the loss of exactly those rows
        return run_megatron(megatron_args(ws, out, dataset=ws.fixed, lmbda=0, train_iters=1, micro_batch_size=4,
                                          global_batch_size=4, lr=0, **flags), nproc=nproc)

    return {
        'mixed': mixed,
        'resumed': resumed,
        'off_policy': fixed_rows,
        'tp2': lambda out: fixed_rows(out, nproc=2, tensor_model_parallel_size=2),
        'topk_tail_eval': lambda out: run_megatron(megatron_args(
            ws, out, lmbda=0, gkd_logits_topk=8, gkd_topk_tail='true', split_dataset_ratio=0.25, eval_steps=1,
            eval_iters=1)),
        'tp2_sampling': lambda out: run_megatron(megatron_args(
            ws, out, seed=OFF_ON_SEED, lmbda=0.5, train_iters=3, tensor_model_parallel_size=2), nproc=2),
        'pp2': lambda out: run_megatron(megatron_args(
            ws, out, seed=MIXED_SEED, lmbda=0.5, seq_kd='true', pipeline_model_parallel_size=2), nproc=2),
        'dp2': lambda out: run_megatron(megatron_args(
            ws, out, seed=MIXED_SEED, lmbda=0.5, seq_kd='true', micro_batch_size=1), nproc=2),
    }


@pytest.fixture(scope='module')
def runs(tiny_ws, shared_runs):
    starts = {}
    shared = shared_runs('megatron_rlhf', starts)
    starts.update(_starts(tiny_ws, shared))
    return shared


def assert_trained(run, modes, seed, lmbda, seq_kd, ranks=(0, )):
    """rc 0, the plugin's trainer, a finite non-zero loss at every iteration, and the mode log of every rank equal
    to ``choose_mode`` step by step."""
    assert run.returncode == 0 and ACTIVE in run.output, run.output[-3000:]
    rows = train_rows(run)
    assert len(rows) == len(modes), rows
    for row, mode in zip(rows, modes):
        assert math.isfinite(row['loss']) and row['loss'] > 0, row
        assert math.isfinite(row['grad_norm']), row
        assert row[f'gkd/mode_{mode}'] == 1.0 and row[f'gkd/loss_{mode}'] > 0, row
    for rank in ranks:
        logged = run.modes(rank)
        assert [r['mode'] for r in logged] == list(modes), logged
        assert [r['step'] for r in logged] == list(range(len(modes)))
        assert all(choose_mode(seed, r['step'], lmbda, seq_kd).value == r['mode'] for r in logged)


def test_sampling_modes_with_an_offloaded_teacher_and_logged_completions(runs):
    """On-policy (the student samples) and seq_kd (the teacher, offloaded to CPU between uses, samples), with
    ``--log_completions true``: ms-swift's completion logging once stripped the response from the very samples
    being trained on (rc 0, no loss): every step must learn."""
    run = runs['mixed']
    assert_trained(run, ['on_policy', 'seq_kd'], MIXED_SEED, 0.5, True)
    completions = glob.glob(os.path.join(run.output_dir, '**', 'completions*.jsonl'), recursive=True)
    assert completions, os.listdir(run.output_dir)


def test_resume_continues_the_iteration_and_the_mode_sequence(runs):
    """A run resumed from its step-2 checkpoint (``--mcore_model``, ``--finetune false``) trains steps 2 and 3 with
    the modes ``choose_mode`` gives them, appended to the same mode log."""
    run = runs['resumed']
    assert run.returncode == 0 and ACTIVE in run.output
    rows = train_rows(run)
    assert [r['iteration'] for r in rows] == ['1/2', '2/2', '3/4', '4/4'], rows  # the first two: the copied log
    assert [r['mode'] for r in run.modes()] == ['on_policy', 'seq_kd', 'on_policy', 'seq_kd']
    assert all(math.isfinite(r['loss']) and r['loss'] > 0 for r in rows)


def test_off_policy_loss_equals_swift_rlhf_on_the_same_rows(runs, tiny_ws, tmp_path):
    """One step on the same 4 rows: ``megatron rlhf``'s per-token loss equals ``swift rlhf``'s."""
    run = runs['off_policy']
    assert_trained(run, ['off_policy'], 42, 0.0, False)
    swift = run_swift(base_args(tiny_ws, str(tmp_path / 'swift'), dataset=tiny_ws.fixed, lmbda=0, max_steps=1,
                                per_device_train_batch_size=4, learning_rate=0, seed=42))
    assert train_rows(run)[0]['loss'] == pytest.approx(swift.losses[0], rel=1e-4)


def test_tensor_parallel_loss_and_gradient_equal_one_rank(runs):
    """TP = 2 (the vocabulary-parallel divergence on logit shards): the same loss and gradient norm as TP = 1."""
    one, two = train_rows(runs['off_policy'])[0], train_rows(runs['tp2'])[0]
    assert two['loss'] == pytest.approx(one['loss'], rel=1e-5)
    assert two['grad_norm'] == pytest.approx(one['grad_norm'], rel=1e-4)


def test_tensor_parallel_sampling(runs):
    """TP = 2 with on-policy steps: the student samples from its vocabulary-parallel logits on both ranks."""
    assert_trained(runs['tp2_sampling'], ['off_policy', 'on_policy', 'on_policy'], OFF_ON_SEED, 0.5, False,
                   ranks=(0, 1))


def test_pipeline_parallel_sampling_modes(runs):
    """PP = 2: the last stage samples and broadcasts; the teacher is computed per train step."""
    assert_trained(runs['pp2'], ['on_policy', 'seq_kd'], MIXED_SEED, 0.5, True, ranks=(0, 1))


def test_data_parallel_sampling_modes(runs):
    """DP = 2: every rank takes the same mode at every step."""
    assert_trained(runs['dp2'], ['on_policy', 'seq_kd'], MIXED_SEED, 0.5, True, ranks=(0, 1))


def test_teacher_topk_with_tail_and_evaluation(runs):
    """``--gkd_logits_topk 8 --gkd_topk_tail true`` trains, and evaluation scores the held-out rows."""
    run = runs['topk_tail_eval']
    assert_trained(run, ['off_policy', 'off_policy'], 42, 0.0, False)
    evals = [r for r in run.logs if 'eval_loss' in r]
    assert len(evals) == 2 and all(math.isfinite(r['eval_loss']) and r['eval_loss'] > 0 for r in evals), evals
