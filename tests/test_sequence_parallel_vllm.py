"""``--sequence_parallel_size 2`` (ms-swift's Ulysses) with rows that give the teacher a view of its own, and with
vLLM colocate sampling, on two gloo ranks: each trains as one rank without it (issue 55).

A privileged view (``teacher_prompt``) puts the teacher's response tokens at other positions than the student's: the
teacher reads its whole rows, unsplit, and each rank takes its signal at the response tokens of its slice.
"""
import importlib.util
import json
import os

import pytest
from conftest import Workspace, _free_port
from test_sequence_parallel import _odd_rows, _one_rank_and_group

VLLM = dict(use_vllm='true', vllm_mode='colocate', vllm_enforce_eager='true', vllm_max_model_len=256)


def _with_teacher_prompts(path, tmp_path) -> str:
    """``_odd_rows`` with a ``teacher_prompt`` of its own length for each row (0 to 7 more tokens than the student's
    prompt), so the teacher's response tokens are shifted by a different amount in every row."""
    out = tmp_path / 'privileged.jsonl'
    with open(path) as src, open(out, 'w') as f:
        for i, line in enumerate(src):
            row = json.loads(line)
            hint = ' '.join('abcdefgh'[:i])
            f.write(json.dumps({**row, 'teacher_prompt': row['messages'][0]['content'] + (' ' + hint if hint else '')})
                    + '\n')
    return str(out)


TEACHER_VIEW_RUNS = {
    'dense': dict(lmbda=0, gkd_loss_impl='dense'),
    'fused': dict(lmbda=0, gkd_loss_impl='fused'),
    # greedy samples: the student's on its own prompt, the teacher's (seq_kd) on its privileged one
    'on_policy_seq_kd': dict(lmbda=0.5, seq_kd='true', top_k=1, max_completion_length=6),
    # ms-swift's OPSD: the teacher is the student's base (its adapter off) reading the privileged prompt
    'shared_base': dict(lmbda=0, tuner_type='lora', lora_dropout=0),
}


@pytest.mark.parametrize('name', list(TEACHER_VIEW_RUNS))
def test_sequence_parallel_teacher_view_equals_one_rank(tiny_ws, tmp_path, name):
    """Every step's loss (the teacher's privileged prompt decides its signal) is the one-rank run's."""
    dataset = _with_teacher_prompts(_odd_rows(tmp_path / 'odd.jsonl'), tmp_path)
    flags = dict(TEACHER_VIEW_RUNS[name], **({'teacher_model': tiny_ws.student} if name == 'shared_base' else {}))
    one, group = _one_rank_and_group(tiny_ws, tmp_path, dataset=dataset, **flags)
    impl = TEACHER_VIEW_RUNS[name].get('gkd_loss_impl')
    assert impl is None or f'GKD loss implementation: {impl}' in group.output
    if impl:  # the same rows at every step: the weights moved
        assert one.losses[-1] < one.logs[0]['loss']


@pytest.fixture(scope='module')
def sp_vllm_ws(tmp_path_factory) -> Workspace:
    """Tiny models that both vLLM's CPU attention (heads of 32) and a group of 2 (2 key-value heads) can run."""
    from swift_gkd_plugin.demo import tiny
    root = str(tmp_path_factory.mktemp('sp_vllm_ws'))
    tok = tiny.build_tokenizer(os.path.join(root, 'tok'))
    student, teacher = os.path.join(root, 'student'), os.path.join(root, 'teacher')
    tiny.build_model(student, tok, seed=0, hidden_size=64, num_heads=2, num_kv_heads=2)
    tiny.build_model(teacher, tok, seed=1, hidden_size=128, num_heads=4, num_kv_heads=2, intermediate_size=256)
    return Workspace(root, student, teacher, '', '', '')


@pytest.mark.skipif(importlib.util.find_spec('vllm') is None, reason='vLLM is not installed (tests/test_vllm.py)')
def test_sequence_parallel_vllm_colocate_equals_one_rank(sp_vllm_ws, tmp_path):
    """On-policy steps sampled greedily (``--top_k 1``) by vLLM colocate, the student synced into it after each
    update, one row a step: the group's first rank samples it on its engine, the second's share is empty (its engine
    is synced and asked nothing), both train on the row, and every step's loss is that of one rank whose engine
    samples the row."""
    launcher = {'NPROC_PER_NODE': '1', 'MASTER_PORT': str(_free_port())}  # colocate mode runs under one
    one, group = _one_rank_and_group(sp_vllm_ws, tmp_path, one_env=launcher, timeout=900, **VLLM, lmbda=1, top_k=1,
                                     max_completion_length=6, per_device_train_batch_size=1,
                                     gradient_accumulation_steps=1)
    assert all(row['gkd/mode_on_policy'] == 1 for row in one.logs + group.logs), one.logs
    assert 'use_vllm=True' in group.output
