"""``--sequence_parallel_size 2`` (ms-swift's Ulysses) on two gloo ranks trains as one rank without it (issue 55).

Both runs take the same flags, ``--per_device_train_batch_size`` included: the two ranks of the group read the same
rows as the one rank (ms-swift's batch semantics, as in ``swift sft``) and each trains on half of every sequence. Step 1's loss is computed at the initial weights (what a run
at learning rate 0 logs); the later steps' losses and the saved weights follow the updates.
"""
import glob
import json
import os

import pytest
import torch
from conftest import RL_REWARD_PLUGIN, base_args, run_swift
from test_activation_and_bad_input import assert_refused_in_one_line
from test_host_syncs import _theirs

SP = dict(sequence_parallel_size=2, ddp_backend='gloo', use_cpu='true')
PROBE = __file__.replace('test_sequence_parallel.py', 'step_probe_plugin.py')
SYNCS = __file__.replace('test_sequence_parallel.py', 'host_sync_plugin.py')


def _not_ours(where) -> bool:
    """A host sync outside the plugin (:data:`test_host_syncs.NOT_OURS`), or in ms-swift's Ulysses split."""
    return _theirs(where) or 'swift/sequence_parallel/' in where


def _odd_rows(path, lengths=(3, 4, 5, 6, 6, 5, 4, 3)) -> str:
    """Eight rows of different lengths, every one odd (19 to 25 tokens: each letter is one token of the prompt and
    one of the answer, and the answer has one more), so every batch is padded before its split in two."""
    letters = 'abcdefgh'
    with open(path, 'w') as f:
        for i, n in enumerate(lengths):
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


def _eval_logs(run):
    """The ``eval_*`` rows of a run's logging.jsonl."""
    rows = []
    for path in sorted(glob.glob(os.path.join(run.output_dir, '**', 'logging.jsonl'), recursive=True)):
        with open(path) as f:
            rows += [row for row in map(json.loads, f) if 'eval_loss' in row]
    return rows


def _one_rank_and_group(tiny_ws, tmp_path, one_env=None, timeout=600, probes=False, evaluate=False, **flags):
    """The same flags, ``--per_device_train_batch_size`` included, on one rank and on a group of two ranks. With
    ``probes`` both runs also count their work (``tests/step_probe_plugin.py``: ``run.probe``, ``{(rank, step):
    record}``) and host syncs (``tests/host_sync_plugin.py``: ``run.syncs``, one record per micro-batch). With
    ``evaluate`` both evaluate after every step on 5 rows of odd lengths, 2 a batch (the last batch holds one row),
    and log the same ``eval_loss`` (issue 74 item 1: the group's first evaluation aborted in gloo)."""
    flags = {'dataset': _odd_rows(tmp_path / 'odd.jsonl'), 'max_steps': 3, 'gradient_accumulation_steps': 2,
             'per_device_train_batch_size': 2, 'learning_rate': 1e-3, 'save_strategy': 'steps', 'save_steps': 3,
             'seed': 3, **flags}
    if evaluate:
        flags.update(val_dataset=_odd_rows(tmp_path / 'val.jsonl', (5, 3, 6, 4, 5)), eval_strategy='steps',
                     eval_steps=1, per_device_eval_batch_size=2)
    envs = {'one': dict(one_env or {}), 'sp2': {}}
    if probes:
        flags['external_plugins'] = [PROBE, SYNCS]
        for name, env in envs.items():
            env.update(GKD_TEST_PROBE_LOG=str(tmp_path / f'{name}_probe.jsonl'),
                       GKD_TEST_SYNC_LOG=str(tmp_path / f'{name}_syncs.jsonl'))
    one = run_swift(base_args(tiny_ws, str(tmp_path / 'one'), **flags), env=envs['one'], timeout=timeout)
    group = run_swift(base_args(tiny_ws, str(tmp_path / 'sp2'), **SP, **flags), nproc=2, env=envs['sp2'],
                      timeout=timeout)
    assert len(one.logs) == len(group.logs) == flags['max_steps'], (one.logs, group.logs)
    for a, b in zip(one.logs, group.logs):
        assert _rel(a['loss'], b['loss']) < 1e-5, (one.losses, group.losses)
    if evaluate:
        evals = _eval_logs(one), _eval_logs(group)
        assert len(evals[0]) == len(evals[1]) == flags['max_steps'], evals
        for a, b in zip(*evals):
            for key in ('eval_loss', 'eval_gkd/distill_loss'):
                assert _rel(a[key], b[key]) < 1e-5, (key, evals)
    group.flags = flags
    if probes:
        for name, run in (('one', one), ('sp2', group)):
            run.probe = {(r['rank'], r['step']): r for r in map(json.loads, open(tmp_path / f'{name}_probe.jsonl'))}
            run.syncs = [json.loads(line) for line in open(tmp_path / f'{name}_syncs.jsonl')]
        _assert_each_rank_holds_half(one, group, flags['max_steps'])
        assert len(group.syncs) == 2 * flags['max_steps'] * flags['gradient_accumulation_steps']
        for record in group.syncs:  # the loss and its backward read nothing from the device
            assert [where for _, where in record['loss'] + record['backward'] if not _not_ours(where)] == [], record
    return one, group


def _assert_each_rank_holds_half(one, group, steps):
    """At every step, and at every evaluation, the token positions the student's decoder layers ran on (its forward
    in the loss) and the teacher's are, on each rank of the group, half the one rank's (up to the padding of odd rows
    to an even length): before issue 63 the group pooled its rows and each rank held as many tokens as one rank
    without the group."""
    evals = sorted({step for _, step in one.probe if isinstance(step, str)})
    assert len(one.probe) == steps + len(evals) and len(group.probe) == 2 * (steps + len(evals)), \
        (one.probe.keys(), group.probe.keys())
    for step in list(range(1, steps + 1)) + evals:
        for phase in ('loss', 'teacher'):
            tokens = one.probe[(0, step)]['phases'][phase]['layer_tokens']
            for rank in (0, 1):
                half = group.probe[(rank, step)]['phases'][phase]['layer_tokens']
                assert tokens / 2 <= half <= tokens / 2 * 1.1, (step, phase, rank, tokens, half)


@pytest.mark.parametrize('impl', ['dense', 'fused'])
def test_sequence_parallel_equals_one_rank_off_policy(tiny_ws, tmp_path, impl):
    """Dataset rows, two a micro-batch (of different lengths, padded before the split): each rank holds half of
    every row in every forward, and no host sync is added to the loss; an evaluation after every step logs the one
    rank's; the weights are compared at step 3. With the dense loss, 5 steps over the 8 rows (4 a step: 2.5 epochs)
    and a checkpoint every step: the group also resumes from its step-1 checkpoint (in the middle of the first epoch:
    the batches it skips are its group's) and logs the uninterrupted run's steps 2 to 5, across two epoch boundaries.
    (Not from step 3: a resume past a whole epoch replays the first epoch's order, on one rank as on a group: TRL's
    ``RepeatSampler`` draws each epoch's order from a generator seeded once, and the skipped epochs are not drawn.)
    With the fused loss, 3 steps (across the first epoch boundary) and a checkpoint at step 3, and the SFT term
    (``--sft_alpha 0.005``: its cross-entropy, ~6 a token here, weighs about as much as the divergence, so an error in
    either shows at the comparison's 1e-5) over each rank's half of the response tokens."""
    steps = (dict(max_steps=5, save_steps=1) if impl == 'dense' else
             dict(max_steps=3, save_steps=3, sft_alpha=0.005))
    one, group = _one_rank_and_group(tiny_ws, tmp_path, lmbda=0, gkd_loss_impl=impl, probes=True, evaluate=True,
                                     **steps)
    assert f'GKD loss implementation: {impl}' in group.output
    assert group.output.count('sequence parallelism on: 1 group(s) of 2 ranks (--sequence_parallel_size 2, 2 '
                              'processes); each rank holds 1/2 of every row') == 1, group.output[-3000:]
    start = one.logs[0]['loss']
    assert one.losses[-1] < start  # the weights moved
    before, after = _weights(one), _weights(group)
    assert before.keys() == after.keys()
    for name, value in before.items():
        torch.testing.assert_close(after[name], value, rtol=1e-5, atol=1e-5, msg=name)
    if impl != 'dense':
        return
    checkpoint = os.path.dirname(glob.glob(os.path.join(group.output_dir, '**', 'checkpoint-1', 'model.safetensors'),
                                           recursive=True)[0])
    flags = {k: v for k, v in group.flags.items() if k != 'external_plugins'}
    resumed = run_swift(base_args(tiny_ws, str(tmp_path / 'resumed'), **SP, **flags,
                                  resume_from_checkpoint=checkpoint), nproc=2)
    assert len(resumed.logs) == 4, resumed.logs
    for a, b in zip(group.logs[1:], resumed.logs):
        assert _rel(a['loss'], b['loss']) < 1e-5, (group.losses, resumed.losses)


def test_sequence_parallel_on_policy_and_seq_kd_share_the_samples(tiny_ws, tmp_path):
    """Greedy sampling (``--top_k 1``), one row a step (``--per_device_train_batch_size 1``, no accumulation): the
    group samples each row once (its first rank; the second's share is empty) on whole sequences, and both ranks train
    on it, each on its half, so every step's loss is the one-rank run's (on-policy and seq_kd steps), and so is the
    evaluation after each step; each rank holds half of the row in the student's and the teacher's forward."""
    one, _ = _one_rank_and_group(tiny_ws, tmp_path, lmbda=0.5, seq_kd='true', top_k=1, max_completion_length=6,
                                 per_device_train_batch_size=1, gradient_accumulation_steps=1, max_steps=4,
                                 save_steps=4, probes=True, evaluate=True)
    modes = [next(m for m in ('on_policy', 'seq_kd', 'off_policy') if row[f'gkd/mode_{m}'] == 1) for row in one.logs]
    assert {'on_policy', 'seq_kd'} <= set(modes), modes


def test_sequence_parallel_rewards_score_each_completion_once(tiny_ws, solution_dataset, tmp_path):
    """``--reward_funcs`` under sequence parallelism: a group of 2 reads one prompt a step, sampled twice
    (``--num_generations 2``); each rank samples and scores its share (one completion), and the group's two ranks train
    on both with the same advantages: the reward function sees each completion once (2 a step, not 4), and the
    completions log holds each once."""
    log = tmp_path / 'rewards.jsonl'
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'sp2'), **SP, dataset=solution_dataset, num_generations=2,
                              per_device_train_batch_size=2, max_steps=2, log_completions='true', temperature=1.5,
                              lmbda=1, reward_funcs='tiny_letter_match', gkd_rl_coef=1,
                              external_plugins=RL_REWARD_PLUGIN),
                    nproc=2, env={'GKD_TEST_REWARD_LOG': str(log)})
    calls = [json.loads(line) for line in open(log)]
    assert sorted(c['rank'] for c in calls) == [0, 0, 1, 1] and all(len(c['completions']) == 1 for c in calls), calls
    assert len(run.logs) == 2 and all(row['gkd/mode_on_policy'] == 1 for row in run.logs), run.logs
    table = glob.glob(os.path.join(run.output_dir, '**', 'completions.jsonl'), recursive=True)
    if table:  # ms-swift writes it where a reward was logged
        steps = [step for line in open(table[0]) for step in json.loads(line)['step']]
        assert sorted(steps) == ['1', '1', '2', '2'], steps  # 2 steps x 2 completions, each once


REFUSED = [
    (dict(padding_free='true'), '--padding_free / --packing'),
    (dict(gkd_ref_kl_coef=0.1), '--gkd_ref_kl_coef 0.1'),
    (dict(lmbda=1, gkd_sampled_kl_coef=1), '--gkd_sampled_kl_coef 1'),
    (dict(generation_batch_size=4), '--generation_batch_size 4'),
    (dict(streaming='true', max_steps=2), '--streaming true'),
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
                                     '(NPROC_PER_NODE x NNODES)', '(allowed: 1); start 2 processes or a multiple, e.g. '
                                     'NPROC_PER_NODE=2 swift rlhf ... (with --use_cpu true'])
    # four ranks (started without the launcher: the ranks' own check of the resolved model), and the tiny models' 2
    # key-value heads
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'b'), sequence_parallel_size=4, lmbda=0, use_cpu='true',
                              ddp_backend='gloo'), nproc=4, check=False, timeout=300)
    errors = {line for line in run.output.splitlines() if line.startswith('swift rlhf: error: ')}
    assert run.returncode != 0 and len(errors) == 1 and 'Traceback' not in run.output, run.output[-3000:]
    assert ('--sequence_parallel_size 4 does not divide the 2 attention heads of --model (num_key_value_heads in its '
            'config.json), which each rank of a group splits (allowed: 1, 2)') in errors.pop()


@pytest.mark.parametrize('size,nproc,needle', [
    (-2, 2, '--sequence_parallel_size -2 must be at least 1'),  # a TypeError in each rank, after loading
    (4, 4, '--sequence_parallel_size 4 does not divide the 2 attention heads of --model'),  # after 4 ranks started
])
def test_sequence_parallel_size_refused_in_the_launcher(tiny_ws, tmp_path, size, nproc, needle):
    """Issue 66 item 7: both passed the launcher's checks."""
    from test_hardening_launcher import CPU_RANKS, assert_refused_by_launcher
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'out'), sequence_parallel_size=size, lmbda=0, **CPU_RANKS),
                    nproc=nproc, launcher=True, check=False, timeout=180)
    assert_refused_by_launcher(run, [needle], ranks_started=False)
