"""GKD + RL through the real ``swift rlhf``: rewards of the student's samples, group advantages, the
policy-gradient term beside the divergence, several completions per prompt, ranks and resume."""
import json
import os
import statistics

import pytest
from conftest import base_args, run_swift

PLUGIN = os.path.join(os.path.dirname(__file__), 'rl_reward_plugin.py')
RL = dict(lmbda=1, reward_funcs='tiny_letter_match', gkd_rl_coef=1, external_plugins=PLUGIN, temperature=1.0)


@pytest.fixture(scope='module')
def solution_dataset(tiny_ws, tmp_path_factory):
    """The tiny training rows with their answer also in a ``solution`` column (read by the reward)."""
    path = tmp_path_factory.mktemp('rl') / 'train_solution.jsonl'
    with open(tiny_ws.train) as src, open(path, 'w') as dst:
        for line in src:
            row = json.loads(line)
            row['solution'] = row['messages'][-1]['content']
            dst.write(json.dumps(row) + '\n')
    return str(path)


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


def test_every_completion_is_scored_once_in_groups_that_span_micro_batches(tiny_ws, solution_dataset, tmp_path):
    """G = 4 with micro-batches of 2 rows: each generation batch is one prompt sampled 4 times, split over the two
    micro-batches of the step; the advantages are normalised over the whole group."""
    log = str(tmp_path / 'rewards.jsonl')
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'out'), dataset=solution_dataset, num_generations=4,
                              per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=3,
                              log_completions='true', seed=5, **RL),
                    env={'GKD_TEST_REWARD_LOG': log})
    calls = _reward_calls(log)
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
        # the step loss is the divergence plus the policy-gradient term, both per response token
        assert row['loss'] == pytest.approx(row['gkd/distill_loss'] + row['gkd/pg_loss'], rel=1e-4, abs=1e-7)
        assert 0 < row['gkd/entropy'] < 6.2  # at most log(448) nats
    assert any(abs(r['gkd/pg_loss']) > 1e-4 for r in run.logs)


def test_two_processes_share_groups_and_agree(tiny_ws, solution_dataset, tmp_path):
    """G = 4 over 2 ranks with 2 rows each: every group spans both ranks. Each rank samples from its own stream,
    the rewards are gathered and every rank computes the same advantages; mode decisions agree."""
    log = str(tmp_path / 'rewards.jsonl')
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'out'), dataset=solution_dataset, num_generations=4,
                              per_device_train_batch_size=2, max_steps=2, use_cpu='true', log_completions='true',
                              seed=9, **RL),
                    env={'GKD_TEST_REWARD_LOG': log}, nproc=2)
    assert run.modes(0) == run.modes(1)
    calls = _reward_calls(log)
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


@pytest.mark.parametrize('how,needles', [
    ('raise', ["reward function 'tiny_broken_reward' raised", 'KeyError', 'no_such_column', 'first row: prompt']),
    ('short', ["reward function 'tiny_broken_reward' returned 3 values for 4 completions"]),
    ('nan', ["reward function 'tiny_broken_reward' returned nan for row 3", 'prompt', 'must be finite']),
])
def test_a_broken_reward_function_is_named_with_its_row(tiny_ws, tmp_path, how, needles):
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'out'), num_generations=2, per_device_train_batch_size=4,
                              max_steps=1, **dict(RL, reward_funcs='tiny_broken_reward')),
                    env={'GKD_TEST_BROKEN_REWARD': how}, check=False)
    assert run.returncode != 0
    for needle in needles:
        assert needle in run.output, f'{needle!r} missing from:\n{run.output[-3000:]}'


@pytest.mark.parametrize('extra', [{}, {'gkd_logits_topk': 8, 'gkd_topk_tail': 'true'}], ids=['full', 'topk_tail'])
def test_fused_and_dense_losses_agree_with_rewards(tiny_ws, solution_dataset, tmp_path, extra):
    """The policy-gradient term and the entropy out of the fused chunked pass equal the dense ones (same samples:
    G > 1 seeds the sampler per step; learning rate 0 keeps the weights), at a sampling temperature != 1."""
    common = dict(dataset=solution_dataset, num_generations=2, per_device_train_batch_size=4, max_steps=2,
                  learning_rate=0, seed=2, **dict(RL, temperature=1.5), **extra)
    fused = run_swift(base_args(tiny_ws, str(tmp_path / 'fused'), gkd_loss_impl='fused', **common))
    dense = run_swift(base_args(tiny_ws, str(tmp_path / 'dense'), gkd_loss_impl='dense', **common)) if not extra \
        else None
    assert 'GKD loss implementation: fused' in fused.output
    for row in fused.logs:
        assert row['loss'] == pytest.approx(row['gkd/distill_loss'] + row['gkd/pg_loss'], rel=1e-4, abs=1e-7)
        assert abs(row['gkd/pg_loss']) > 0 and row['gkd/entropy'] > 0
    if dense is not None:
        for a, b in zip(fused.logs, dense.logs):
            for key in ('loss', 'gkd/pg_loss', 'gkd/distill_loss', 'gkd/entropy', 'gkd/reward'):
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
