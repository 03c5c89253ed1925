"""GKD + RL through the real ``swift rlhf``: rewards of the student's samples, group advantages, the
policy-gradient term beside the divergence, several completions per prompt, ranks and resume."""
import json
import os
import re
import statistics

import pytest
from conftest import RL_REWARD_PLUGIN, base_args, run_swift

RL = dict(lmbda=1, reward_funcs='tiny_letter_match', gkd_rl_coef=1, external_plugins=RL_REWARD_PLUGIN, temperature=1.0)
RL_COEF = 0.5  # the grouped runs' --gkd_rl_coef: an ordinary weight, so that a term that drops it shows


def _reward_calls(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def _completion_tables(run):
    with open(os.path.join(run.output_dir, 'completions.jsonl')) as f:
        return [json.loads(line) for line in f]


def _advantages(rewards, group):
    out = []
    for g in range(0, len(rewards), group):
        chunk = rewards[g:g + group]
        mean, std = statistics.mean(chunk), statistics.stdev(chunk)
        out += [(r - mean) / (std + 1e-4) for r in chunk]
    return out


@pytest.fixture(scope='module')
def grouped_runs(tiny_ws, solution_dataset, shared_runs):
    """G = 4 with micro-batches of 2 rows (each generation batch is one prompt sampled 4 times, split over the two
    micro-batches of the step), sampling temperature 1.5, ``--gkd_rl_coef 0.5``, learning rate 0 (both runs draw the
    same samples), with the
    fused and the dense loss, in the dataset's order (``--dataset_shuffle false --train_dataloader_shuffle false``);
    shared by the test session."""
    def start(impl):
        return lambda out: run_swift(
            base_args(tiny_ws, out, dataset=solution_dataset, num_generations=4,
                      per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=3, learning_rate=0,
                      log_completions='true', seed=5, gkd_loss_impl=impl, dataset_shuffle='false',
                      train_dataloader_shuffle='false',
                      **dict(RL, temperature=1.5, gkd_rl_coef=RL_COEF)),
            env={'GKD_TEST_REWARD_LOG': out + '.rewards.jsonl'})
    shared = shared_runs('rl_grouped', {impl: start(impl) for impl in ('fused', 'dense')})
    runs = {}
    for impl in ('fused', 'dense'):
        runs[impl] = shared[impl]
        runs[impl].reward_log = runs[impl].output_dir + '.rewards.jsonl'
    return runs


def test_every_completion_is_scored_once_in_groups_that_span_micro_batches(grouped_runs):
    run = grouped_runs['fused']
    assert 'GKD loss implementation: fused' in run.output
    calls = _reward_calls(run.reward_log)
    assert len(calls) == 3 and all(len(c['completions']) == 4 for c in calls)  # one call per step, 4 completions
    for call in calls:
        assert len(set(call['prompts'])) == 1, 'a group is one prompt, four times'
        assert len(set(call['completions'])) > 1, 'the four samples of a prompt differ'
    tables = _completion_tables(run)
    assert len(tables) == 3
    for call, table, row in zip(calls, tables, run.logs):
        assert table['completion'] == call['completions']
        assert table['tiny_letter_match'] == pytest.approx(call['rewards'], abs=1e-6)
        assert table['advantage'] == pytest.approx(_advantages(call['rewards'], 4), abs=1e-4)
        assert row['gkd/reward'] == pytest.approx(statistics.mean(call['rewards']), abs=1e-6)
        assert row['gkd/rewards/tiny_letter_match/mean'] == pytest.approx(statistics.mean(call['rewards']), abs=1e-6)
        for key in ('gkd/pg_loss', 'gkd/distill_loss', 'gkd/entropy', 'gkd/completion_length', 'gkd/reward_std'):
            assert key in row, sorted(row)
        assert 0 < row['gkd/entropy'] < 6.2  # at most log(448) nats
    assert any(abs(r['gkd/pg_loss']) > 1e-4 for r in run.logs)


def test_groups_follow_the_dataset_order_without_shuffling(grouped_runs, solution_dataset):
    """``--train_dataloader_shuffle false`` holds with several completions per prompt too (the plugin's sampler)."""
    with open(solution_dataset) as f:
        users = [[m['content'] for m in json.loads(line)['messages'] if m['role'] == 'user'][-1] for line in f]
    for run in grouped_runs.values():
        steps = [str(call['prompts'][0]) for call in _reward_calls(run.reward_log)]
        assert [[u for u in users if u in step] for step in steps] == [[u] for u in users[:3]]


def test_fused_and_dense_losses_agree_with_rewards(grouped_runs):
    """The policy-gradient term and the entropy out of the fused chunked pass equal the dense ones (same samples),
    at a sampling temperature != 1; so do the gradients."""
    fused, dense = grouped_runs['fused'], grouped_runs['dense']
    assert _reward_calls(fused.reward_log) == _reward_calls(dense.reward_log)
    for a, b in zip(fused.logs, dense.logs):
        for key in ('loss', 'grad_norm', 'gkd/pg_loss', 'gkd/distill_loss', 'gkd/entropy', 'gkd/reward'):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key


@pytest.mark.parametrize('impl', ['fused', 'dense'])
def test_the_loss_is_the_divergence_plus_the_coefficient_times_the_policy_gradient_term(grouped_runs, impl):
    """Each step's loss = gkd/distill_loss + --gkd_rl_coef x gkd/pg_loss (the term's token mean before its weight);
    with the fused and dense runs' agreement on the loss (above), a path that drops the weight fails one of the two."""
    run = grouped_runs[impl]
    assert len(run.logs) == 3
    assert any(abs(row['gkd/pg_loss']) > 1e-3 for row in run.logs), run.logs  # a term whose weight shows
    for row in run.logs:  # both per response token
        assert row['loss'] == pytest.approx(row['gkd/distill_loss'] + RL_COEF * row['gkd/pg_loss'], rel=1e-5,
                                            abs=2e-8), row


@pytest.mark.parametrize('impl', ['fused', 'dense'])
def test_policy_gradient_term_is_at_the_sampling_temperature(grouped_runs, tiny_ws, solution_dataset, tmp_path, impl):
    """The label of the policy-gradient term is the sampled token, drawn at the sampling temperature: with the loss at
    --temperature 1 and sampling at --gkd_sampling_temperature 1.5, the samples and the policy-gradient term are those
    of the run that does both at 1.5; the divergence (at the loss temperature) differs."""
    log = str(tmp_path / 'rewards.jsonl')
    run = run_swift(
        base_args(tiny_ws, str(tmp_path / 'out'), dataset=solution_dataset, num_generations=4,
                  per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=3, learning_rate=0,
                  log_completions='true', seed=5, gkd_loss_impl=impl, gkd_sampling_temperature=1.5,
                  dataset_shuffle='false', train_dataloader_shuffle='false', **dict(RL, gkd_rl_coef=RL_COEF)),
        env={'GKD_TEST_REWARD_LOG': log})
    both = grouped_runs[impl]
    assert _reward_calls(log) == _reward_calls(both.reward_log)
    for a, b in zip(run.logs, both.logs):
        # pg_loss sums advantage-weighted terms of both signs: compared at the precision of its terms (~1e-3)
        for key in ('gkd/pg_loss', 'gkd/reward'):
            assert a[key] == pytest.approx(b[key], abs=1e-6), key
        assert a['gkd/distill_loss'] != pytest.approx(b['gkd/distill_loss'], rel=1e-3)


GROUPED = dict(num_generations=4, per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=3,
               learning_rate=0, log_completions='true', seed=5)


def test_a_sampler_that_is_the_policy_gets_weights_of_one(tiny_ws, solution_dataset, tmp_path):
    """--rollout_importance_sampling_mode with ms-swift's transformers engine sampling at 1.5 from the weights it
    trains, over the whole vocabulary (--top_k 448 = the vocabulary, what the plugin makes of --top_k -1: ms-swift's
    engine alone would turn -1 into transformers' default top-50): the engine's log-probabilities (asked for, at the sampling temperature) are the
    policy's, so the mismatch is ~0, every weight is 1 and none is truncated."""
    run = run_swift(
        base_args(tiny_ws, str(tmp_path / 'out'), dataset=solution_dataset, gkd_loss_impl='fused', top_k=448,
                  rollout_importance_sampling_mode='token_truncate', **GROUPED, **dict(RL, temperature=1.5)),
        env={'GKD_TEST_REWARD_LOG': str(tmp_path / 'rewards.jsonl')})
    assert 'importance weights min(pi / mu, 2)' in run.output and 'transformers engine' in run.output
    assert 'reported no per-token log-probabilities' not in run.output
    assert len(run.logs) == 3
    for row in run.logs:
        assert row['gkd/rollout_logprob_diff'] < 1e-5, row  # float32, KV-cached sampling vs one full forward
        assert row['gkd/rollout_k3_kl'] < 1e-9
        assert row['gkd/rollout_is_weight'] == pytest.approx(1.0, abs=1e-5)
        assert row['gkd/rollout_is_truncated'] == 0
    print('mismatch with the same weights:', [(r['gkd/rollout_logprob_diff'], r['gkd/rollout_k3_kl']) for r in run.logs])


@pytest.fixture(scope='module')
def mismatched_runs(tiny_ws, solution_dataset, tmp_path_factory):
    """A sampler that is not the policy: --repetition_penalty 3 lowers what the transformers engine gives the tokens
    already in the sequence, prompt included (the policy has no penalty), over the whole vocabulary (--top_k 448):
    penalised tokens that are sampled have pi / mu > 1, the others slightly < 1. Per sequence (the geometric mean of
    its ratios, the mode that needs each token's row) truncated at C = 1 (the lowest allowed: every ratio above 1 is
    cut), with both loss implementations; and the same samples measured without a
    correction (--log_rollout_offpolicy_metrics true)."""
    root = tmp_path_factory.mktemp('mismatched')
    runs = {}
    for name, impl, mode in (('fused', 'fused', 'sequence_truncate'), ('dense', 'dense', 'sequence_truncate'),
                             ('none', 'fused', None)):
        measure = 'true' if mode is None else None
        log = str(root / f'rewards_{name}.jsonl')
        runs[name] = run_swift(
            base_args(tiny_ws, str(root / name), dataset=solution_dataset, gkd_loss_impl=impl, repetition_penalty=3,
                      top_k=448, rollout_importance_sampling_mode=mode, rollout_importance_sampling_threshold=1,
                      log_rollout_offpolicy_metrics=measure,
                      **GROUPED,
                      **dict(RL, temperature=1.5)),
            env={'GKD_TEST_REWARD_LOG': log})
        runs[name].reward_log = log
    return runs


def test_a_mismatched_sampler_is_corrected_by_truncated_weights(mismatched_runs):
    """The weights depart from 1 and some sequences truncate at C; the policy-gradient term is the weighted one (it
    differs from the uncorrected run on the same samples), equal in the fused and the dense loss."""
    fused, dense, none = mismatched_runs['fused'], mismatched_runs['dense'], mismatched_runs['none']
    assert _reward_calls(fused.reward_log) == _reward_calls(dense.reward_log) == _reward_calls(none.reward_log)
    assert 'no sampler/policy mismatch correction' in none.output
    for a, b in zip(fused.logs, none.logs):  # measured alike; no weights without a mode
        assert 'gkd/rollout_is_weight' not in b and 'gkd/rollout_is_truncated' not in b
        assert b['gkd/rollout_k3_kl'] == pytest.approx(a['gkd/rollout_k3_kl'], rel=1e-4, abs=1e-9)
    for a, b in zip(fused.logs, dense.logs):
        assert a['gkd/rollout_logprob_diff'] > 1e-4 and a['gkd/rollout_k3_kl'] > 0, a
        for key in ('loss', 'grad_norm', 'gkd/pg_loss', 'gkd/rollout_logprob_diff', 'gkd/rollout_k3_kl',
                    'gkd/rollout_is_weight', 'gkd/rollout_is_truncated'):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    assert any(row['gkd/rollout_is_truncated'] > 0 for row in fused.logs)
    assert any(row['gkd/rollout_is_weight'] != pytest.approx(1.0, abs=1e-6) for row in fused.logs)
    assert any(a['gkd/pg_loss'] != pytest.approx(b['gkd/pg_loss'], abs=1e-6) for a, b in zip(fused.logs, none.logs))
    print('mismatched sampler:', [{k.split('/')[-1]: row[k] for k in row if 'rollout' in k} for row in fused.logs])


@pytest.fixture(scope='module')
def zero3_runs(tiny_ws, adapters, solution_dataset, shared_runs):
    """G = 4 over 2 ranks with 2 rows each (every group spans both ranks), shared-base LoRA (the teacher is the base
    with the adapter off) under ZeRO-3, learning rate 0 (both runs draw the same samples), with the fused and the
    dense loss; shared by the test session."""
    pytest.importorskip('deepspeed')

    def start(impl):
        return lambda out: run_swift(
            base_args(tiny_ws, out, dataset=solution_dataset, num_generations=4, per_device_train_batch_size=2,
                      max_steps=2, seed=8, use_cpu='true', deepspeed='zero3', fp16='false', learning_rate=0,
                      tuner_type='lora', lora_dropout=0, teacher_model=tiny_ws.student,
                      adapters=adapters['student_start'], log_completions='true', gkd_loss_impl=impl, **RL),
            env={'GKD_TEST_REWARD_LOG': out + '.rewards.jsonl'}, nproc=2)
    return shared_runs('rl_zero3', {impl: start(impl) for impl in ('fused', 'dense')})


def test_two_processes_share_groups_and_agree(zero3_runs):
    """G = 4 over 2 ranks with 2 rows each: every group spans both ranks. Each rank samples from its own stream,
    the rewards are gathered and every rank computes the same advantages; mode decisions agree."""
    run = zero3_runs['fused']
    assert run.modes(0) == run.modes(1)
    calls = _reward_calls(run.output_dir + '.rewards.jsonl')
    by_rank = {r: [c for c in calls if c['rank'] == r] for r in (0, 1)}
    assert [len(by_rank[r]) for r in (0, 1)] == [2, 2]
    tables = _completion_tables(run)
    for step, table in enumerate(tables):
        mine, theirs = by_rank[0][step], by_rank[1][step]
        assert mine['prompts'] == theirs['prompts'] and len(set(mine['prompts'])) == 1, 'one group over two ranks'
        assert mine['completions'] != theirs['completions'], 'the ranks sample from different streams'
        rewards = mine['rewards'] + theirs['rewards']
        assert table['completion'] == mine['completions'] + theirs['completions']  # rank order
        assert table['advantage'] == pytest.approx(_advantages(rewards, 4), abs=1e-4)
        assert run.logs[step]['gkd/reward'] == pytest.approx(statistics.mean(rewards), abs=1e-6)


def test_resume_samples_scores_and_trains_as_the_uninterrupted_run(tiny_ws, solution_dataset, tmp_path):
    common = dict(dataset=solution_dataset, num_generations=2, per_device_train_batch_size=4, max_steps=4, seed=4,
                  save_strategy='steps', save_steps=2, save_only_model='false', learning_rate=1e-3, **RL)
    full = run_swift(base_args(tiny_ws, str(tmp_path / 'full'), **common))
    ckpt = [c for c in full.checkpoints() if c.endswith('checkpoint-2')]
    resumed = run_swift(base_args(tiny_ws, str(tmp_path / 'resumed'), resume_from_checkpoint=ckpt[0], **common))
    assert len(resumed.logs) == 2
    for a, b in zip(resumed.logs, full.logs[2:]):
        for key in ('loss', 'gkd/reward', 'gkd/pg_loss', 'gkd/entropy'):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-7), key


def test_several_samples_per_prompt_without_rewards(tiny_ws, tmp_path):
    """--num_generations without rewards (divergence only): on seq_kd steps the teacher samples each prompt twice."""
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'out'), lmbda=0, seq_kd='true', num_generations=2,
                              per_device_train_batch_size=4, max_steps=2, log_completions='true'))
    for table in _completion_tables(run):
        prompts, completions = table['prompt'], table['completion']
        assert prompts[0::2] == prompts[1::2] and len(set(prompts)) == 2
        assert 'advantage' not in table
    assert all('gkd/pg_loss' not in r and 'gkd/reward' not in r for r in run.logs)


def test_rewards_score_the_students_samples_only(tiny_ws, solution_dataset, tmp_path):
    """--lmbda 0.5 --seq_kd true (a seq_kd step, then an on-policy one): the reward functions score the student's
    samples, not the teacher's; the seq_kd step's loss is its divergence alone, the on-policy step's adds the term."""
    from swift_gkd_plugin.core import choose_mode
    assert [choose_mode(0, s, 0.5, True).value for s in range(2)] == ['seq_kd', 'on_policy']
    log = str(tmp_path / 'rewards.jsonl')
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'out'), dataset=solution_dataset, num_generations=2,
                              per_device_train_batch_size=2, max_steps=2, learning_rate=0, seed=0,
                              **dict(RL, lmbda=0.5, seq_kd='true', gkd_rl_coef=RL_COEF)),
                    env={'GKD_TEST_REWARD_LOG': log})
    assert len(_reward_calls(log)) == 1  # the on-policy step's
    seq_kd, on_policy = run.logs
    assert seq_kd['gkd/mode_seq_kd'] == 1 and 'gkd/reward' not in seq_kd and 'gkd/pg_loss' not in seq_kd, seq_kd
    assert seq_kd['loss'] == pytest.approx(seq_kd['gkd/distill_loss'], rel=1e-6), seq_kd
    assert on_policy['gkd/mode_on_policy'] == 1 and 'gkd/reward' in on_policy, on_policy
    assert on_policy['loss'] == pytest.approx(on_policy['gkd/distill_loss'] + RL_COEF * on_policy['gkd/pg_loss'],
                                              rel=1e-5, abs=2e-8), on_policy


def test_rows_that_do_not_encode_are_replaced_with_their_whole_group(tiny_ws, solution_dataset, tmp_path):
    """G = 2 over 2 ranks with 3 rows each: the middle group of every generation batch spans both ranks. Half of the
    prompts are longer than --max_length (--truncation_strategy delete; --gkd_drop_bad_rows true, else they are refused
    before loading): each one is replaced in place, by the same prompt on both ranks, so every group still holds one
    prompt twice (ms-swift's per-rank backup iterator gave the two halves of a spanning group different prompts, and
    appended replacements at the end of the batch)."""
    with open(solution_dataset) as f:
        rows = [json.loads(line) for line in f]
    for i, row in enumerate(rows):
        if i % 2:
            row['messages'][0]['content'] = f'Reverse: {i} ' + ' '.join(['a b c'] * 200)
    path = tmp_path / 'half_too_long.jsonl'
    path.write_text(''.join(json.dumps(r) + '\n' for r in rows))
    log = str(tmp_path / 'rewards.jsonl')
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'out'), dataset=str(path), num_generations=2,
                              per_device_train_batch_size=3, max_steps=3, use_cpu='true', seed=3,
                              truncation_strategy='delete', gkd_drop_bad_rows='true', **RL),
                    env={'GKD_TEST_REWARD_LOG': log}, nproc=2)
    calls = _reward_calls(log)
    by_rank = {r: [c for c in calls if c['rank'] == r] for r in (0, 1)}
    assert [len(by_rank[r]) for r in (0, 1)] == [3, 3]
    for mine, theirs in zip(by_rank[0], by_rank[1]):
        prompts = mine['prompts'] + theirs['prompts']  # the generation batch in rank order
        assert prompts[0::2] == prompts[1::2], prompts
        assert all(len(p) < 200 for p in prompts), 'a prompt longer than --max_length was scored'
    assert 'Encoding failed for one sample' in run.output, 'no prompt was too long: the test tests nothing'


def test_a_raising_reward_function_stops_the_run_naming_it(tiny_ws, tmp_path):
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'out'), num_generations=2, per_device_train_batch_size=4,
                              max_steps=1, **dict(RL, reward_funcs='tiny_broken_reward')),
                    env={'GKD_TEST_BROKEN_REWARD': 'raise'}, check=False)
    assert run.returncode != 0
    for needle in ["reward function 'tiny_broken_reward' raised", 'KeyError', 'no_such_column', 'first row: prompt']:
        assert needle in run.output, f'{needle!r} missing from:\n{run.output[-3000:]}'


@pytest.mark.timeout(300)
def test_an_async_reward_returning_nan_stops_the_run_naming_it_and_the_row(tiny_ws, tmp_path):
    """An async reward function (ms-swift's ``AsyncORM``, awaited by ms-swift's own scoring) gets the same row checks
    as a sync one: a NaN stops the run naming the function and the row (it was taken as "does not apply", and the run
    trained and exited 0)."""
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'out'), num_generations=2, per_device_train_batch_size=4,
                              max_steps=1, **dict(RL, reward_funcs='tiny_broken_async_reward')),
                    env={'GKD_TEST_BROKEN_REWARD': 'nan'}, check=False)
    assert run.returncode != 0 and not run.losses
    needle = "reward function 'tiny_broken_async_reward' returned nan for row 3 of the generation batch (prompt "
    assert needle in run.output, run.output[-3000:]


@pytest.mark.parametrize('reward', ['tiny_broken_reward', 'tiny_broken_async_reward'])
@pytest.mark.parametrize('how,message', [
    ('short', "reward function '{}' returned 3 values for 4 completions"),
    ('nan', "reward function '{}' returned nan for row 3 of the generation batch (prompt 'Reverse: a e'"),
    ('inf', "reward function '{}' returned inf for row 3 of the generation batch (prompt 'Reverse: a e'"),
    ('string', "reward function '{}' returned '1.0' for row 0 of the generation batch (prompt 'Reverse: a b'"),
    ('scalar', "reward function '{}' returned float 1.0: it must return a list of 4 values"),
    ('raise', "reward function '{}' raised on a batch of 4 completions (KeyError: 'no_such_column'); first row"),
])
def test_a_reward_function_with_a_wrong_answer_is_named_with_its_row(monkeypatch, reward, how, message):
    """ms-swift's own samples and reward code (its event loop for the async function), through the plugin's checks:
    the same checks, naming the function and the row, for sync and async functions."""
    import importlib.util

    import torch
    from swift.rl_core.data import GKDSample

    from swift_gkd_plugin.swift.step.rewards import score_completions
    spec = importlib.util.spec_from_file_location('rl_reward_plugin', RL_REWARD_PLUGIN)
    plugin = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plugin)
    monkeypatch.setenv('GKD_TEST_BROKEN_REWARD', how)
    samples = [GKDSample.from_row({'messages': [{'role': 'user', 'content': f'Reverse: a {c}'},
                                                {'role': 'assistant', 'content': f'{c} a'}]}) for c in 'bcde']
    func = {'tiny_broken_reward': plugin.TinyBrokenReward, 'tiny_broken_async_reward': plugin.TinyBrokenAsyncReward}
    with pytest.raises((ValueError, RuntimeError), match=re.escape(message.format(reward))):
        score_completions(samples, [func[reward]()], [reward], torch.device('cpu'), None)


def test_rewards_of_any_real_number_type_are_taken():
    """Python, NumPy and one-element tensor numbers (and None) pass the checks, sync and async alike."""
    import asyncio

    import numpy as np
    import torch
    from swift.rl_core.data import GKDSample

    from swift_gkd_plugin.swift.step.rewards import score_completions
    samples = [GKDSample.from_row({'messages': [{'role': 'user', 'content': f'q{i}'},
                                                {'role': 'assistant', 'content': 'a'}]}) for i in range(5)]
    values = [1, 0.5, np.float32(0.25), torch.tensor(2.0), None]

    def sync(completions, **kwargs):
        return list(values)

    async def later(completions, **kwargs):
        await asyncio.sleep(0)
        return list(values[::-1])

    rewards = score_completions(samples, [sync, later], ['sync', 'later'], torch.device('cpu'), None)
    expected = torch.tensor([1, 0.5, 0.25, 2.0, float('nan')])
    torch.testing.assert_close(rewards[:, 0], expected, equal_nan=True)
    torch.testing.assert_close(rewards[:, 1], expected.flip(0), equal_nan=True)


def test_lora_self_distillation_under_zero3_on_two_processes(zero3_runs):
    """Shared-base LoRA (the teacher is the base with the adapter off), ZeRO-3 on 2 ranks, a group of 4 over both
    ranks: the fused loss's policy-gradient term equals the dense one (learning rate 0: the same samples)."""
    dense, fused = zero3_runs['dense'], zero3_runs['fused']
    assert 'Teacher model: base_model with LoRA disabled' in fused.output
    assert len(fused.logs) == len(dense.logs) == 2
    for a, b in zip(fused.logs, dense.logs):
        for key in ('loss', 'grad_norm', 'gkd/pg_loss', 'gkd/entropy', 'gkd/reward'):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    assert any(abs(r['gkd/pg_loss']) > 0 for r in fused.logs)
