"""``--sequence_parallel_size 2`` (ms-swift's Ulysses) on two gloo ranks trains as one rank without it (issue 55).

The two ranks of the group pool their rows (1 each per micro-batch) and each trains on half of every sequence; the
one-rank run reads the same rows (2 per micro-batch). Step 1's loss is computed at the initial weights (what a run
at learning rate 0 logs); the later steps' losses and the saved weights follow the updates.
"""
import glob
import json
import os

import pytest
import torch
from conftest import base_args, run_swift
from test_activation_and_bad_input import assert_refused_in_one_line

SP = dict(sequence_parallel_size=2, ddp_backend='gloo', use_cpu='true')


def _odd_rows(path) -> str:
    """Eight rows of different lengths, every one odd (19 to 25 tokens: each letter is one token of the prompt and
    one of the answer, and the answer has one more), so every batch is padded before its split in two."""
    letters = 'abcdefgh'
    with open(path, 'w') as f:
        for i, n in enumerate([3, 4, 5, 6, 6, 5, 4, 3]):
            prompt = [letters[(i + 3 * j) % 8] for j in range(n)]
            answer = prompt[::-1] + [letters[i]]
            f.write(json.dumps({'messages': [{'role': 'user', 'content': 'Reverse: ' + ' '.join(prompt)},
                                             {'role': 'assistant', 'content': ' '.join(answer)}]}) + '\n')
    return str(path)


def _rel(a, b):
    return abs(a - b) / max(abs(a), abs(b), 1e-7)


def _weights(run):
    from safetensors.torch import load_file
    files = glob.glob(os.path.join(run.output_dir, '**', 'checkpoint-3', 'model.safetensors'), recursive=True)
    assert len(files) == 1, files
    return load_file(files[0])


def _one_rank_and_group(tiny_ws, tmp_path, one_env=None, timeout=600, **flags):
    flags = {'dataset': _odd_rows(tmp_path / 'odd.jsonl'), 'max_steps': 3, 'gradient_accumulation_steps': 2,
             'learning_rate': 1e-3, 'save_strategy': 'steps', 'save_steps': 3, 'seed': 3, **flags}
    one = run_swift(base_args(tiny_ws, str(tmp_path / 'one'), per_device_train_batch_size=2, **flags), env=one_env,
                    timeout=timeout)
    group = run_swift(base_args(tiny_ws, str(tmp_path / 'sp2'), per_device_train_batch_size=1, **SP, **flags),
                      nproc=2, timeout=timeout)
    assert len(one.logs) == len(group.logs) == 3, (one.logs, group.logs)
    for a, b in zip(one.logs, group.logs):
        assert _rel(a['loss'], b['loss']) < 1e-5, (one.losses, group.losses)
    return one, group


@pytest.mark.parametrize('impl', ['dense', 'fused'])
def test_sequence_parallel_equals_one_rank_off_policy(tiny_ws, tmp_path, impl):
    one, group = _one_rank_and_group(tiny_ws, tmp_path, lmbda=0, gkd_loss_impl=impl)
    assert f'GKD loss implementation: {impl}' in group.output
    start = one.logs[0]['loss']
    assert one.losses[-1] < start  # the weights moved
    before, after = _weights(one), _weights(group)
    assert before.keys() == after.keys()
    for name, value in before.items():
        torch.testing.assert_close(after[name], value, rtol=1e-5, atol=1e-5, msg=name)


def test_sequence_parallel_on_policy_and_seq_kd_share_the_samples(tiny_ws, tmp_path):
    """Greedy sampling (``--top_k 1``): the group's ranks sample their own rows on whole sequences and both train on
    all of them, so every step's loss is the one-rank run's (on-policy, seq_kd and dataset steps alike)."""
    one, _ = _one_rank_and_group(tiny_ws, tmp_path, lmbda=0.5, seq_kd='true', top_k=1, max_completion_length=6)
    modes = [next(m for m in ('on_policy', 'seq_kd', 'off_policy') if row[f'gkd/mode_{m}'] == 1) for row in one.logs]
    assert {'on_policy', 'seq_kd'} <= set(modes), modes


REFUSED = [
    (dict(padding_free='true'), '--padding_free / --packing'),
    (dict(gkd_ref_kl_coef=0.1), '--gkd_ref_kl_coef 0.1'),
    (dict(lmbda=1, gkd_sampled_kl_coef=1), '--gkd_sampled_kl_coef 1'),
]


@pytest.mark.parametrize('flags,what', REFUSED, ids=[w for _, w in REFUSED])
def test_sequence_parallel_refusals_before_loading(tiny_ws, tmp_path, flags, what):
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'out'), sequence_parallel_size=2, **flags), check=False,
                    timeout=120)
    assert_refused_in_one_line(run, [f'--sequence_parallel_size 2 is not supported with {what} yet (allowed: '])


def test_sequence_parallel_size_must_divide_processes_and_heads(tiny_ws, tmp_path):
    """Both were ms-swift tracebacks once the models were loaded (its device mesh, its Ulysses attention)."""
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'a'), sequence_parallel_size=2, lmbda=0), check=False,
                    timeout=120)
    assert_refused_in_one_line(run, ['--sequence_parallel_size 2 does not divide the 1 training process '
                                     '(NPROC_PER_NODE x NNODES)', '(allowed: 1)'])
    # four processes (WORLD_SIZE, as torchrun sets it), and the tiny models' 2 key-value heads
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'b'), sequence_parallel_size=4, lmbda=0),
                    env={'WORLD_SIZE': '4'}, check=False, timeout=120)
    assert_refused_in_one_line(run, ['--sequence_parallel_size 4 does not divide the 2 attention heads of --model '
                                     '(num_key_value_heads in its config.json)', '(allowed: 1, 2)'])
