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
                              log_completions='true', seed=5, gkd_loss_impl='dense', **RL),
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
