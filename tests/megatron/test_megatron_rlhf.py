"""``megatron rlhf --rlhf_type gkd`` end to end: the real launcher, torchrun ranks on gloo, megatron-core and
mcore-bridge building and training the tiny Qwen3 pair on CPU (the test-only harness of
:mod:`harness.megatron_cpu` stands in for CUDA and transformer-engine only).

Every run is started once per test session (``shared_megatron_runs``, some shared with other modules) and asserted
on by the tests below it: the plugin's trainer active, rc 0, a finite non-zero loss at every iteration, and the mode
log equal to ``choose_mode``."""
import glob
import json
import math
import os
import shutil

import pytest
import torch

from conftest import base_args, run_swift
from megatron_runs import (ACTIVE, MIXED, MIXED_SEED, megatron_args, run_megatron, shared_megatron_runs, spawn_ranks,
                          train_rows)

from swift_gkd_plugin.core import choose_mode

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason='the CPU harness does nothing where CUDA is '
                                'present: tests/gpu/run_megatron_gkd.sh runs Megatron-SWIFT there')

OFF_ON_SEED = 43  # lmbda 0.5 without seq_kd: off_policy, on_policy, on_policy
assert [choose_mode(MIXED_SEED, s, 0.5, True).value for s in range(4)] == ['on_policy', 'seq_kd'] * 2
assert [choose_mode(OFF_ON_SEED, s, 0.5, False).value for s in range(3)] == ['off_policy', 'on_policy', 'on_policy']
OFF_ON = dict(seed=OFF_ON_SEED, lmbda=0.5, train_iters=3)


def _starts(ws, runs):
    """name -> start(output_dir) -> SwiftRun; ``runs`` gives the runs a start builds on (and the shared ``mixed``
    and ``fixed_rows``)."""

    def resumed(out):
        first = runs['mixed']
        shutil.copytree(first.output_dir, out)
        return run_megatron(megatron_args(ws, out, **MIXED, train_iters=4, finetune='false', no_load_optim='true',
                                          mcore_model=os.path.join(out, 'checkpoint-2')))

    return {
        'resumed': resumed,
        'off_on': lambda out: run_megatron(megatron_args(ws, out, **OFF_ON)),
        'tp2_sampling': lambda out: run_megatron(megatron_args(ws, out, **OFF_ON, tensor_model_parallel_size=2),
                                                 nproc=2),
        'pp2': lambda out: run_megatron(megatron_args(
            ws, out, seed=MIXED_SEED, lmbda=0.5, seq_kd='true', pipeline_model_parallel_size=2), nproc=2),
        # self-distillation: the student's base with its (fresh) adapter disabled is the teacher; its top-8 logits
        # with the tail, an evaluation after each step on a quarter of the rows
        'lora_privileged': lambda out: run_megatron(megatron_args(
            ws, out, teacher_model=ws.student, tuner_type='lora', dataset=_privileged(ws), seed=MIXED_SEED, lmbda=0.5,
            seq_kd='true', gkd_logits_topk=8, gkd_topk_tail='true', split_dataset_ratio=0.25, eval_steps=1,
            eval_iters=1)),
        'lora_nothing_to_learn': lambda out: run_megatron(megatron_args(
            ws, out, teacher_model=ws.student, tuner_type='lora', lmbda=0), check=False, launcher=False),
    }


def _privileged(ws) -> str:
    """The training rows with a ``teacher_prompt`` that holds the answer: what the teacher sees and the student
    does not."""
    path = os.path.join(ws.root, 'privileged.jsonl')
    if not os.path.exists(path):
        with open(ws.train) as src, open(path + '.partial', 'w') as dst:
            for row in map(json.loads, src):
                question, answer = row['messages'][0]['content'], row['messages'][1]['content']
                dst.write(json.dumps({**row, 'teacher_prompt': f'{question} The answer is {answer}.'}) + '\n')
        os.replace(path + '.partial', path)
    return path


@pytest.fixture(scope='module')
def runs(tiny_ws, shared_runs):
    shared = shared_megatron_runs(tiny_ws, shared_runs)
    shared.starts.update(_starts(tiny_ws, shared))
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
    """One step on the same 4 rows: ``megatron rlhf``'s per-token loss equals ``swift rlhf``'s (step 1 of
    ``fixed_rows``: logged before its update)."""
    run = runs['fixed_rows']
    assert_trained(run, ['off_policy'] * 3, 42, 0.0, False)
    swift = run_swift(base_args(tiny_ws, str(tmp_path / 'swift'), dataset=tiny_ws.fixed, lmbda=0, max_steps=1,
                                per_device_train_batch_size=4, learning_rate=0, seed=42))
    assert train_rows(run)[0]['loss'] == pytest.approx(swift.losses[0], rel=1e-4)


def test_tensor_parallel_loss_and_gradient_equal_one_rank(runs):
    """TP = 2 (the vocabulary-parallel divergence on logit shards): the same loss and gradient norm as TP = 1 at
    every step: an off-policy step on the dataset's rows, then two on-policy steps (the same samples on both)."""
    assert_trained(runs['off_on'], ['off_policy', 'on_policy', 'on_policy'], OFF_ON_SEED, 0.5, False)
    ones, twos = train_rows(runs['off_on']), train_rows(runs['tp2_sampling'])
    assert len(ones) == len(twos) == 3, (ones, twos)
    for step, (one, two) in enumerate(zip(ones, twos), 1):
        assert two['loss'] == pytest.approx(one['loss'], rel=1e-5), (step, one, two)
        assert two['grad_norm'] == pytest.approx(one['grad_norm'], rel=1e-4), (step, one, two)


def test_tensor_parallel_sampling(runs):
    """TP = 2 with on-policy steps: the student samples from its vocabulary-parallel logits on both ranks."""
    assert_trained(runs['tp2_sampling'], ['off_policy', 'on_policy', 'on_policy'], OFF_ON_SEED, 0.5, False,
                   ranks=(0, 1))


def test_pipeline_parallel_sampling_modes(runs):
    """PP = 2: the last stage samples and broadcasts; the teacher is computed per train step."""
    assert_trained(runs['pp2'], ['on_policy', 'seq_kd'], MIXED_SEED, 0.5, True, ranks=(0, 1))


def test_data_parallel_sampling_modes(runs):
    """DP = 2: every rank takes the same mode at every step (the shared ``dp2`` run: its rollouts are cut, which
    test_metrics_documented.py checks)."""
    assert_trained(runs['dp2'], ['on_policy', 'seq_kd'], MIXED_SEED, 0.5, True, ranks=(0, 1))


def test_teacher_topk_with_tail_and_evaluation(runs):
    """``--gkd_logits_topk 8 --gkd_topk_tail true`` trains (``lora_privileged``: on-policy and seq_kd, the teacher the
    student's base), and evaluation scores the held-out rows after each step."""
    run = runs['lora_privileged']
    assert_trained(run, ['on_policy', 'seq_kd'], MIXED_SEED, 0.5, True)
    with open(os.path.join(run.output_dir, 'args.json')) as f:
        args = json.load(f)
    assert (args['gkd_logits_topk'], args['gkd_topk_tail']) == (8, True), args
    evals = [r for r in run.logs if 'eval_loss' in r]
    assert len(evals) == 2 and all(math.isfinite(r['eval_loss']) and r['eval_loss'] > 0 for r in evals), evals


def test_shared_base_lora_self_distillation_with_a_privileged_teacher_prompt(runs):
    """``--teacher_model`` = ``--model`` with LoRA: one copy of the weights, the teacher is the base with the adapter
    disabled and sees the ``teacher_prompt``; on-policy and seq_kd (the adapter-off base samples) both learn (its
    top-8 logits with the tail: test_teacher_topk_with_tail_and_evaluation)."""
    run = runs['lora_privileged']
    assert_trained(run, ['on_policy', 'seq_kd'], MIXED_SEED, 0.5, True)
    assert os.path.exists(os.path.join(run.output_dir, 'checkpoint-2', 'adapter_model.safetensors'))


def test_a_run_that_learns_nothing_ends_with_an_error(runs):
    """A fresh adapter (B = 0) on the student's own base, no teacher_prompt: the teacher is the student, every step
    has loss and gradient exactly 0. Each such step is a counted warning; the run ends with an error, not exit 0,
    after saving its checkpoint."""
    run = runs['lora_nothing_to_learn']
    assert run.returncode != 0, run.output[-3000:]
    assert 'none of the 2 training step(s) learnt anything' in run.output, run.output[-3000:]
    assert 'step 2 learnt nothing (loss and gradient exactly 0): 2 of 2 steps so far' in run.output
    assert os.path.exists(os.path.join(run.output_dir, 'checkpoint-2', 'adapter_model.safetensors'))


def _rope_probe(rank, model_dir):
    """In a ``megatron rlhf`` rank (``spawn_ranks``): a Qwen3 model built by transformers before and after
    mcore-bridge's RoPE table went into transformers' (what its ``GPTModel`` does when it is built) has the same
    inverse frequencies."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    config = AutoConfig.from_pretrained(model_dir)
    expected = AutoModelForCausalLM.from_config(config).model.rotary_emb.inv_freq.clone()
    import mcore_bridge.model.rope as rope
    ROPE_INIT_FUNCTIONS.update(rope.EXTENDED_ROPE_INIT_FUNCTIONS)
    after = AutoModelForCausalLM.from_config(config).model.rotary_emb.inv_freq
    assert torch.equal(after, expected), (after, expected)


def test_transformers_models_build_after_mcore_bridge_built_a_model(tiny_ws):
    """mcore-bridge puts a ``'default'`` RoPE initialisation that reads ``config.rope_theta`` into transformers'
    global table; transformers 5 keeps the theta in ``rope_parameters`` and prefers that table in ``_init_weights``,
    so building a Qwen3 model afterwards (ms-swift's final save did) raised ``AttributeError: 'Qwen3Config' object
    has no attribute 'rope_theta'``. With the plugin active it builds, with the same inverse frequencies: in a
    ``megatron rlhf`` rank's process (``spawn_ranks``, forked from the Megatron zygote; a fresh ``python`` importing
    transformers and mcore-bridge took ~20 s of CPU)."""
    spawn_ranks(_rope_probe, (tiny_ws.student, ), 1)
