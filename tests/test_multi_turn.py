"""Multi-turn rollouts (``--multi_turn_scheduler``) in real ``swift rlhf --rlhf_type gkd`` runs on the tiny models:
only the tokens the student wrote are targets, the teacher scores them in the context of the whole trajectory (tool
results included), seq_kd's teacher drives the turns from its own prompt, and a scheduler's bad masks are named.

The scheduler and the probe are ``tests/multi_turn_plugin.py`` (``--external_plugins``): after the first turn the
"tool" answers with a user message, the second turn ends the trajectory; the first sampled token is masked."""
from __future__ import annotations

import json
import os

import pytest
import torch

from conftest import base_args, run_swift

PLUGIN = os.path.join(os.path.dirname(__file__), 'multi_turn_plugin.py')
TOOL_RESULT = 'Tool: h h h h'
HISTORY = 'a b c d'  # an earlier assistant answer in some dataset rows: context, never a target
TEACHER_PROMPT = 'Reverse the letters: '
IGNORE = -100
MAX_LENGTH = 128  # conftest.base_args
# a scheduler's bad return values: (run, its class, the refusal)
BAD_RETURNS = [
    ('step_none', 'StepNoneScheduler', "step() returned NoneType None; allowed: a dict with the keys 'infer_request' "
     '(required)'),
    ('int_content', 'IntContentScheduler', "step() left the content of message 2 (role 'user') of "
     "infer_request.messages as int 42; allowed: a string (a tool's result as text)"),
    ('oov_ids', 'OutOfVocabularyScheduler', "step() returned 'response_token_ids' with ids outside the vocabulary: "
     '[1000000]; allowed: ids in [0, '),
    ('finished_none', 'FinishedNoneScheduler', 'check_finished() returned NoneType None; allowed: True (the '
     'trajectory ends) or False'),
]


def _dataset(tiny_ws, name: str, edit) -> str:
    path = os.path.join(tiny_ws.root, f'multi_turn_{name}.jsonl')
    with open(tiny_ws.train) as src, open(path + '.partial', 'w') as dst:
        for i, line in enumerate(src):
            dst.write(json.dumps(edit(i, json.loads(line))) + '\n')
    os.replace(path + '.partial', path)
    return path


def _with_history(i, row):
    """Every other row opens with an earlier exchange (the dataset's own user/assistant turn)."""
    if i % 2 == 0:
        row['messages'] = [{'role': 'user', 'content': 'Reverse: d c b a'}, {'role': 'assistant', 'content': HISTORY},
                           *row['messages']]
    return row


def _with_teacher_prompt(i, row):
    user = row['messages'][0]['content']
    row['teacher_prompt'] = TEACHER_PROMPT + user.split(': ', 1)[1]
    return row


def _run(tiny_ws, out, dataset, log, **flags):
    if os.path.exists(log):
        os.remove(log)
    flags = dict(dict(multi_turn_scheduler='gkd_test_tool', max_turns=3), **flags)
    argv = base_args(tiny_ws, out, dataset=dataset, external_plugins=PLUGIN, **flags)
    return run_swift(argv, env={'GKD_TEST_TRAJ_LOG': log}, check=False)


@pytest.fixture(scope='module')
def runs(tiny_ws, adapters, shared_runs):
    history = _dataset(tiny_ws, 'history', _with_history)
    privileged = _dataset(tiny_ws, 'teacher_prompt', _with_teacher_prompt)

    def start(dataset, **flags):
        return lambda out: _run(tiny_ws, out, dataset, out + '.probe.jsonl', **flags)

    return shared_runs('multi_turn', {
        'on_policy': start(history, lmbda=1, gkd_loss_impl='dense'),
        'on_policy_fused': start(history, lmbda=1, gkd_loss_impl='fused'),
        'seq_kd': start(privileged, lmbda=0, seq_kd='true', gkd_loss_impl='dense'),
        # the shared base: --teacher_model is --model, the LoRA student starts from a non-zero adapter (a fresh one
        # makes student = teacher and the loss 0)
        'shared_base': start(history, lmbda=1, tuner_type='lora', teacher_model=tiny_ws.student,
                             adapters=adapters['fit'], gkd_loss_impl='dense', max_steps=2),
        'bad_mask': start(tiny_ws.train, lmbda=1, multi_turn_scheduler='gkd_test_bad_mask', max_steps=1),
        'no_tokens': start(tiny_ws.train, lmbda=1, multi_turn_scheduler='gkd_test_no_tokens', max_steps=1),
        # past --max_length: no --max_turns and a scheduler that never stops; a huge tool result after turn 1
        'endless': start(tiny_ws.train, lmbda=1, multi_turn_scheduler='gkd_test_endless', max_turns=None,
                         max_steps=2),
        'huge_tool': start(tiny_ws.train, lmbda=1, multi_turn_scheduler='gkd_test_huge_tool', max_steps=2),
        'endless_seq_kd': start(tiny_ws.train, lmbda=0, seq_kd='true', multi_turn_scheduler='gkd_test_endless',
                                max_turns=None, max_steps=2),
        # (the engine would cut the beginning off the next turn's prompt, no longer the context it is trained in, and
        # the trajectory would never end)
        'endless_left': start(tiny_ws.train, lmbda=1, multi_turn_scheduler='gkd_test_endless', max_turns=None,
                              truncation_strategy='left', max_steps=2),
        # --max_length past the tiny models' context (512): the engine refused the prompt that left no room
        'endless_context': start(tiny_ws.train, lmbda=1, multi_turn_scheduler='gkd_test_endless', max_turns=None,
                                 max_length=1024, max_completion_length=32, max_steps=2),
        'empty_ids': start(tiny_ws.train, lmbda=1, multi_turn_scheduler='gkd_test_empty_ids', max_steps=2),
        'empty_last_ids': start(tiny_ws.train, lmbda=1, multi_turn_scheduler='gkd_test_empty_last_ids', max_steps=2),
        **{name: start(tiny_ws.train, lmbda=1, multi_turn_scheduler=f'gkd_test_{name}', max_steps=1)
           for name, _, _ in BAD_RETURNS},
    })


def _records(run, kind):
    with open(run.output_dir + '.probe.jsonl') as f:
        return [r for r in map(json.loads, f) if r['kind'] == kind]


def _find(row, piece, start=0):
    for i in range(start, len(row) - len(piece) + 1):
        if row[i:i + len(piece)] == piece:
            return i
    raise AssertionError(f'{piece} not in {row}')


@pytest.fixture(scope='module')
def tokenizer(tiny_ws):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tiny_ws.student)


def _turns(ids):
    return ids if ids and isinstance(ids[0], list) else [ids]


def test_only_the_students_tokens_are_targets(runs, tokenizer):
    """Tool results, the dataset's earlier answer and tokens the scheduler masked never carry a label; every token
    the student wrote in either turn does (the turn's end marker is the template's, as in ms-swift's SFT)."""
    run = runs['on_policy']
    assert run.returncode == 0, run.output[-3000:]
    samples, batches = _records(run, 'samples'), _records(run, 'batch')
    assert samples and batches and all(b['mode'] == 'Mode.ON_POLICY' for b in batches)
    tool = tokenizer.encode(TOOL_RESULT, add_special_tokens=False)
    history = tokenizer.encode(HISTORY, add_special_tokens=False)
    rows = [(ids, labels) for b in batches for ids, labels in zip(b['input_ids'], b['labels'])]
    trajectories = [(ids, mask) for s in samples for ids, mask in zip(s['response_token_ids'], s['response_loss_mask'])]
    assert len(rows) == len(trajectories) >= 6
    seen_history = 0
    for (ids, labels), (turns, masks) in zip(rows, trajectories):
        assert len(turns) == 2 and masks[0][0] == 0 and all(masks[0][1:]) and all(masks[1])
        at = _find(ids, tool)
        assert all(label == IGNORE for label in labels[at:at + len(tool)])
        if _holds(ids, history):
            seen_history += 1
            h = _find(ids, history)
            assert all(label == IGNORE for label in labels[h:h + len(history)])
        # the targets: the unmasked sampled tokens, and the first turn's end marker (<|im_end|> and its newline)
        assert _targets(labels) == _expected_targets(ids, turns, masks)
    assert seen_history >= 2
    logs = run.logs
    assert [r['gkd/num_turns'] for r in logs] == [2.0] * 3
    assert [r['gkd/empty_trajectories'] for r in logs] == [0.0] * 3


def _holds(row, piece) -> bool:
    return any(row[i:i + len(piece)] == piece for i in range(len(row) - len(piece) + 1))


def _positions(ids, turns, masks):
    out, start = [], 0
    for turn, mask in zip(turns, masks):
        t = _find(ids, turn, start)
        out += [t + i for i, m in enumerate(mask) if m]
        start = t + len(turn)
    return out


def _kept_prefix(ids, turns) -> int:
    """How many of the last turn's tokens the encoding holds after the earlier turns (all of it unless cut)."""
    start = 0
    for turn in turns[:-1]:
        start = _find(ids, turn, start) + len(turn)
    for n in range(len(turns[-1]), 0, -1):
        try:
            _find(ids, turns[-1][:n], start)
            return n
        except AssertionError:
            continue
    return 0


def _targets(labels):
    return {p for p, label in enumerate(labels) if label != IGNORE}


def _expected_targets(ids, turns, masks):
    """The unmasked sampled tokens of every turn, and the end marker (<|im_end|> and its newline) of every turn but
    the last whose last token is a target (ms-swift labels an end marker that follows a label)."""
    ends, start = set(), 0
    for turn, mask in zip(turns[:-1], masks):
        end = _find(ids, turn, start) + len(turn)
        ends |= {end, end + 1} if mask[-1] else set()
        start = end
    return set(_positions(ids, turns, masks)) | ends


def test_the_teacher_scores_each_turn_in_the_whole_trajectory(runs, tiny_ws, tokenizer):
    """The teacher's input is the prompt, turn 1, the tool result and turn 2; its log-probabilities at the
    student's tokens equal a direct forward of the teacher on that trajectory, built here from the sampled ids."""
    from transformers import AutoModelForCausalLM
    run = runs['on_policy']
    teacher = AutoModelForCausalLM.from_pretrained(tiny_ws.teacher, torch_dtype=torch.float32).eval()
    samples, batches, scored = _records(run, 'samples'), _records(run, 'batch'), _records(run, 'teacher')
    trajectories = [(m, ids) for s in samples for m, ids in zip(s['messages'], s['response_token_ids'])]
    assert len(scored) == len(batches)
    checked = 0
    for batch, teacher_out in zip(batches, scored):
        assert teacher_out['input_ids'] == batch['teacher_input_ids']
        length = len(batch['teacher_input_ids'][0])
        keep = teacher_out['logits_to_keep']
        kept = list(range(length - keep, length)) if isinstance(keep, int) else [p for p, k in enumerate(keep) if k]
        for row, (ids, labels, logprobs) in enumerate(zip(batch['teacher_input_ids'], batch['teacher_labels'],
                                                          teacher_out['logprobs'])):
            messages, turns = trajectories.pop(0)
            expected = _render(tokenizer, messages, _turns(turns))
            offset = _find(ids, expected)
            with torch.no_grad():
                direct = torch.log_softmax(teacher(torch.tensor([expected])).logits[0].double(), -1)
            for p, label in enumerate(labels):
                if label == IGNORE or p - offset >= len(expected):
                    continue
                got = torch.tensor(logprobs[kept.index(p - 1)], dtype=torch.float64)
                torch.testing.assert_close(got, direct[p - offset - 1], atol=2e-5, rtol=0)
                checked += 1
    assert checked >= 40


def _render(tokenizer, messages, turns):
    """The token ids of the trajectory up to the end of its last sampled turn: the template's text around each
    message (ChatML, as qwen3_nothinking renders it) and the sampled ids of each assistant turn."""
    ids, turn = [], 0
    first_turn = len([m for m in messages if m['role'] == 'assistant']) - len(turns)
    assistant_seen = 0
    for message in messages:
        header = tokenizer.encode(f'<|im_start|>{message["role"]}\n', add_special_tokens=False)
        end = tokenizer.encode('<|im_end|>\n', add_special_tokens=False)
        if message['role'] == 'assistant' and assistant_seen >= first_turn:
            ids += header + turns[turn]
            turn += 1
            if turn == len(turns):
                return ids
            ids += end
        else:
            ids += header + tokenizer.encode(message['content'], add_special_tokens=False) + end
        assistant_seen += message['role'] == 'assistant'
    raise AssertionError('no sampled turn in the trajectory')


def test_fused_and_dense_losses_agree_on_trajectories(runs):
    dense, fused = runs['on_policy'], runs['on_policy_fused']
    assert fused.returncode == 0, fused.output[-3000:]
    assert len(fused.losses) == 3
    assert fused.losses == pytest.approx(dense.losses, rel=1e-4, abs=1e-6)


def test_seq_kd_teacher_drives_the_turns_from_its_own_prompt(runs, tokenizer):
    """seq_kd: the teacher samples both turns from its privileged prompt; the student learns them after its own
    prompt; both views hold the tool result and score the same tokens."""
    run = runs['seq_kd']
    assert run.returncode == 0, run.output[-3000:]
    samples, batches = _records(run, 'samples'), _records(run, 'batch')
    assert all(s['mode'] == 'Mode.SEQ_KD' for s in samples)
    for s in samples:
        for messages, teacher_messages in zip(s['messages'], s['teacher_messages']):
            assert [m['role'] for m in messages] == ['user', 'assistant', 'user', 'assistant']
            assert messages[0]['content'].startswith('Reverse: ')
            assert teacher_messages[0]['content'].startswith(TEACHER_PROMPT)
            assert messages[1:] == teacher_messages[1:] and messages[2]['content'] == TOOL_RESULT
    tool = tokenizer.encode(TOOL_RESULT, add_special_tokens=False)
    for b in batches:
        for side in ('', 'teacher_'):
            for ids, labels in zip(b[f'{side}input_ids'], b[f'{side}labels']):
                at = _find(ids, tool)
                assert all(label == IGNORE for label in labels[at:at + len(tool)])
        student = [[t for t, label in zip(ids, labels) if label != IGNORE]
                   for ids, labels in zip(b['input_ids'], b['labels'])]
        teacher = [[t for t, label in zip(ids, labels) if label != IGNORE]
                   for ids, labels in zip(b['teacher_input_ids'], b['teacher_labels'])]
        assert student == teacher and all(student)
    assert [r['gkd/num_turns'] for r in run.logs] == [2.0] * 3
    assert [r['gkd/mode_seq_kd'] for r in run.logs] == [1.0] * 3


def test_shared_base_lora_teacher_scores_the_trajectories(runs, tokenizer):
    """Self-distillation of a LoRA student (the teacher is its base, adapter off) over two-turn trajectories."""
    run = runs['shared_base']
    assert run.returncode == 0, run.output[-3000:]
    assert [r['gkd/num_turns'] for r in run.logs] == [2.0] * 2
    tool = tokenizer.encode(TOOL_RESULT, add_special_tokens=False)
    for b in _records(run, 'batch'):
        for ids, labels in zip(b['teacher_input_ids'], b['teacher_labels']):
            at = _find(ids, tool)
            assert all(label == IGNORE for label in labels[at:at + len(tool)])
    assert len(_records(run, 'teacher')) == len(_records(run, 'batch'))  # the teacher pass ran on each


def test_a_mask_of_the_wrong_length_names_the_scheduler(runs):
    run = runs['bad_mask']
    assert run.returncode != 0
    assert "--multi_turn_scheduler gkd_test_bad_mask (class BadMaskScheduler in " in run.output
    assert "step() returned a 'response_loss_mask' of list [1, 1, 1, 1, 1, 1, 1] for 8 token ids; allowed: one 0/1 " \
        'value per token of response_token_ids' in run.output


@pytest.mark.parametrize('name,cls,refusal', BAD_RETURNS, ids=[b[0] for b in BAD_RETURNS])
def test_a_schedulers_bad_return_value_is_refused_naming_it(runs, name, cls, refusal):
    """``step`` returning None, a tool result that is not text, ids past the vocabulary, ``check_finished`` returning
    None: one error naming the scheduler's class, the method, what it returned and what is allowed (they were a bare
    TypeError / IndexError, or for None from check_finished, silently False)."""
    run = runs[name]
    assert run.returncode != 0
    assert f'SchedulerError: --multi_turn_scheduler gkd_test_{name} (class {cls} in ' in run.output
    assert f'multi_turn_plugin.py): {refusal}' in run.output


def _cut_trajectories_learn_up_to_the_limit(run, tokenizer, limit=MAX_LENGTH):
    """Each cut trajectory ends with an assistant turn, every turn's unmasked tokens are targets, and the prompt of
    its last turn fit in --max_length; returns the trajectories' message lists."""
    samples, batches = _records(run, 'samples'), _records(run, 'batch')
    trajectories = [(m, ids, mask) for s in samples
                    for m, ids, mask in zip(s['messages'], s['response_token_ids'], s['response_loss_mask'])]
    rows = [(ids, labels) for b in batches for ids, labels in zip(b['input_ids'], b['labels'])]
    assert len(rows) == len(trajectories) == 4
    pad = tokenizer.pad_token_id
    for (ids, labels), (messages, turns, masks) in zip(rows, trajectories):
        assert messages[-1]['role'] == 'assistant'
        assert len(turns) == len([m for m in messages if m['role'] == 'assistant'])
        length = len(ids) - ids.index(next(t for t in ids if t != pad))  # left padding
        # the encoding is cut at --max_length (issue 74 item 2): the last turn learns the tokens that fit, its start
        # at the least (its prompt fit)
        kept = _kept_prefix(ids, turns)
        assert kept and (kept == len(turns[-1]) or length <= limit), (kept, length, limit)
        turns, masks = turns[:-1] + [turns[-1][:kept]], masks[:-1] + [masks[-1][:kept]]
        assert _targets(labels) == _expected_targets(ids, turns, masks)
        assert length - len(turns[-1]) <= limit < length + 200
    return [m for m, _, _ in trajectories]


@pytest.mark.parametrize('name', ['endless', 'endless_seq_kd', 'endless_left', 'endless_context'])
def test_a_scheduler_that_never_stops_is_cut_at_max_length(runs, tokenizer, name):
    """No --max_turns and a scheduler that never says a trajectory is finished (the student's turns, or on seq_kd
    steps the teacher's): each trajectory ends where the next turn's prompt would pass --max_length (it used to stop
    the run with the engine's MaxLengthError; with --truncation_strategy left the engine cut the prompt's beginning
    and the trajectory never ended: the run hung); with a --max_length past the model's context, where the prompt
    leaves no room for a token (the engine refused it). The trajectory learns all its turns, and is counted and
    warned."""
    run = runs[name]
    assert run.returncode == 0, run.output[-3000:]
    context = name == 'endless_context'
    messages = _cut_trajectories_learn_up_to_the_limit(run, tokenizer, 511 if context else MAX_LENGTH)
    assert all(len(m) >= 7 for m in messages)  # three turns and more
    assert [r['gkd/truncated_trajectories'] for r in run.logs] == [1.0, 1.0]
    assert [r['gkd/num_turns'] >= 3 for r in run.logs] == [True, True]
    limit = "the model's context (max_model_len 512, under --max_length 1024)" if context else '--max_length 128'
    assert f'2 of 2 trajectories of step 0 were cut at {limit}: --multi_turn_scheduler gkd_test_endless went on ' \
        '(no --max_turns)' in run.output


def test_a_huge_tool_result_ends_the_trajectory_before_it(runs, tokenizer):
    """A tool result that does not fit in --max_length is dropped and the trajectory ends with the turn before it."""
    run = runs['huge_tool']
    assert run.returncode == 0, run.output[-3000:]
    messages = _cut_trajectories_learn_up_to_the_limit(run, tokenizer)
    assert all([m['role'] for m in ms] == ['user', 'assistant'] for ms in messages)
    assert [r['gkd/truncated_trajectories'] for r in run.logs] == [1.0, 1.0]
    assert [r['gkd/num_turns'] for r in run.logs] == [1.0, 1.0]
    assert 'were cut at --max_length 128: --multi_turn_scheduler gkd_test_huge_tool went on (--max_turns 3)' \
        in run.output


@pytest.mark.parametrize('name,empty', [('empty_ids', 0), ('empty_last_ids', 1)])
def test_an_empty_id_list_keeps_the_turn_as_context_and_is_counted(runs, tokenizer, name, empty):
    """``step`` returning ``response_token_ids: []`` for turn 1, or ``on_turn_end`` for the last turn: the turn
    stays, as the ids the model sampled, all masked 0 (no target); the other turn is learnt; counted in
    gkd/empty_turns and warned. (ms-swift dropped the turn from the ids: turn 1 was then re-encoded from its text as
    part of the prompt, uncounted; the last turn's text stayed with turn 1's ids.)"""
    run = runs[name]
    assert run.returncode == 0, run.output[-3000:]
    samples, batches = _records(run, 'samples'), _records(run, 'batch')
    trajectories = [(ids, mask) for s in samples for ids, mask in zip(s['response_token_ids'], s['response_loss_mask'])]
    rows = [(ids, labels) for b in batches for ids, labels in zip(b['input_ids'], b['labels'])]
    assert len(rows) == len(trajectories) == 4
    for (ids, labels), (turns, masks) in zip(rows, trajectories):
        assert len(turns) == 2 and len(turns[empty]) == 8 and masks[empty] == [0] * 8 and any(masks[1 - empty])
        assert _targets(labels) == _expected_targets(ids, turns, masks)
    assert [r['gkd/empty_turns'] for r in run.logs] == [0.5, 0.5]
    assert [r['gkd/empty_trajectories'] for r in run.logs] == [0.0, 0.0]
    assert f'--multi_turn_scheduler gkd_test_{name} returned an empty response_token_ids for 2 of the 4 turns of 2 ' \
        'trajectories of step 0' in run.output


def test_a_trajectory_with_nothing_to_learn_is_counted_and_warned(runs):
    """Every trajectory empty: each step is warned about, and a run that learnt nothing on its first logged steps
    stops with an error (it used to exit 0 after a loss of exactly 0)."""
    run = runs['no_tokens']
    assert '2 of 2 trajectories of step 0 have no token to learn from (--multi_turn_scheduler gkd_test_no_tokens' \
        in run.output
    assert run.returncode != 0
    assert 'the run ended after 1 step(s) with loss 0 exactly' in run.output and 'Traceback' not in run.output
    # the cause named: no token to learn from, not a teacher that agrees with the student (issue 96 item 1)
    assert 'Cause: those steps held no response token to learn from' in run.output, run.output[-2000:]
    assert 'the teacher gives the student' not in run.output


def test_the_guard_takes_numpy_bools_and_refuses_other_values():
    """The checks themselves, on a scheduler object (no run): numpy's bool is a bool (a gym env's ``done``); a
    float mask, ``rollout_infos`` that is not a dict and ``done: None`` are refused naming the method."""
    import asyncio
    from types import SimpleNamespace

    import numpy as np

    from swift_gkd_plugin.swift.rollout.scheduler_guard import SchedulerError, SchedulerGuard

    class Scheduler:
        result, finished = {}, np.True_

        def step(self, request, choice, turn):
            return dict(self.result, infer_request=request)

        def check_finished(self, request, choice, turn):
            return self.finished

        async def on_turn_end(self, request, choice, turn):
            return self.result

    scheduler = Scheduler()
    guard = SchedulerGuard(scheduler, 'probe', 100, SimpleNamespace(max_length=None, set_mode=lambda mode: None))
    request, choice = SimpleNamespace(messages=[{'role': 'user', 'content': 'x'}]), SimpleNamespace(token_ids=[1, 2])
    assert scheduler.check_finished(request, choice, 1) is True
    scheduler.result = {'done': np.False_}
    assert asyncio.run(scheduler.on_turn_end(request, choice, 1)) == {'done': np.False_}
    for result, method, refusal in [
            ({'response_loss_mask': [1.0, 0.0]}, 'step', "returned a 'response_loss_mask' of list [1.0, 0.0] for 2"),
            ({'rollout_infos': ['a']}, 'step', "returned 'rollout_infos': list ['a']; allowed: a dict"),
            ({'done': None}, 'on_turn_end', "returned 'done': NoneType None; allowed: True or False")]:
        scheduler.result = result
        with pytest.raises(SchedulerError) as refused:
            if method == 'step':
                scheduler.step(request, choice, 1)
            else:
                asyncio.run(scheduler.on_turn_end(request, choice, 1))
        assert str(refused.value).startswith('--multi_turn_scheduler probe (class ')
        assert f'{method}() {refusal}' in str(refused.value)
