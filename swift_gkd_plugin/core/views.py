"""Privileged teacher prompts: the teacher's view of a GKD sample, shared by the transformers and Megatron trainers.

Framework-free (duck-typed on ms-swift's ``GKDSample`` and encoded rows; no ms-swift import), so that both adapters
import it from the core."""
from __future__ import annotations

from typing import List

import torch

from swift_gkd_plugin.core.constants import IGNORE_INDEX


def response_positions(mask: torch.Tensor, count: int) -> torch.Tensor:
    """The flat indices of ``mask``'s ``count`` true entries, in order, without reading the mask on the host
    (``nonzero_static``; a boolean selection ``x[mask]`` waits for the device to size its result)."""
    return torch.nonzero_static(mask.reshape(-1), size=count).squeeze(1)


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Labels aligned with the logits that predict them (position i predicts token i + 1); -100 = no loss."""
    return torch.nn.functional.pad(labels[..., 1:], (0, 1), value=IGNORE_INDEX)


def turn_ids(response_token_ids) -> list:
    """``response_token_ids`` as one list per turn (a single-turn rollout reports one flat list)."""
    ids = response_token_ids or []
    return list(ids) if ids and isinstance(ids[0], (list, tuple)) else ([list(ids)] if ids else [])


def generated_turns(sample) -> int:
    """The number of assistant messages a rollout wrote at the end of ``sample.messages``: one per turn of
    ``response_token_ids`` (a list per turn after a multi-turn rollout), else one when the last message is the
    assistant's (a single-turn sample or a dataset response), else none (a prompt)."""
    ids = sample.response_token_ids
    if ids and isinstance(ids[0], (list, tuple)):
        return len(ids)  # (a flat list is one turn: the last message's, counted below)
    return int(bool(sample.messages) and sample.messages[-1].get('role') == 'assistant')


def trajectory_start(messages, turns: int) -> int:
    """Index of the first message of the trajectory whose ``turns`` assistant messages end ``messages`` (the
    ``turns``-th assistant message from the end, where ms-swift puts the sampled ids); ``len(messages)`` for 0 turns.
    Everything before it is the prompt; after it come the student's turns and the tool results between them."""
    if turns == 0:
        return len(messages)
    assistant = [i for i, m in enumerate(messages) if m.get('role') == 'assistant']
    if len(assistant) < turns:
        raise ValueError(f'a rollout reported {turns} assistant turns but its conversation holds {len(assistant)} '
                         'assistant messages: the multi-turn scheduler must append every turn to the messages')
    return assistant[-turns]


def prepare_teacher_view(sample) -> None:
    """Privileged teacher prompts: ``teacher_prompt`` (replaces the last user message of the prompt, ms-swift's
    OPSD) or ``teacher_messages`` (the teacher's whole prompt conversation). The student's trajectory (its response,
    or every turn and tool result of a multi-turn rollout) is appended to the teacher's prompt."""
    start = trajectory_start(sample.messages, generated_turns(sample))
    trajectory = [dict(m) for m in sample.messages[start:]]
    teacher_messages = sample.teacher_messages
    if teacher_messages and teacher_messages[-1].get('role') != 'assistant':
        if trajectory:
            sample.teacher_messages = [dict(m) for m in teacher_messages] + trajectory
    elif teacher_messages is None and sample.teacher_prompt:
        # the prompt's last user message, never a tool result inside the trajectory
        prompt = [dict(m) for m in sample.messages[:start]]
        users = [m for m in prompt if m.get('role') == 'user']
        if users:
            users[-1]['content'] = sample.teacher_prompt
            sample.teacher_messages = prompt + trajectory
    sample.build_teacher_view()


def student_trajectory(prompt, rollout_messages, response_token_ids) -> list:
    """The student's view of a trajectory the teacher sampled from its privileged prompt (seq_kd): the student's
    ``prompt`` messages followed by the rollout's trajectory (its turns and tool results). Without a privileged
    prompt (``prompt`` None) the rollout's own messages, whose prompt a scheduler's ``on_trajectory_start`` may have
    rewritten (an environment's first observation), are the student's too."""
    if prompt is None:
        return rollout_messages
    turns = max(len(turn_ids(response_token_ids)), 1)
    return [dict(m) for m in prompt] + rollout_messages[trajectory_start(rollout_messages, turns):]


def without_history_loss(messages, turns: int) -> list:
    """``messages`` with every assistant message before the sampled trajectory marked ``loss: False``: a multi-turn
    rollout trains every assistant turn (ms-swift's ``--loss_scale default``), and a dataset row's earlier assistant
    turns were not written by the student."""
    start = trajectory_start(messages, turns)
    return [dict(m, loss=False) if i < start and m.get('role') == 'assistant' else m for i, m in enumerate(messages)]


def check_privileged_columns(dataset) -> None:
    """``teacher_prompt`` holds strings; ``teacher_messages`` holds lists of {role, content} messages."""
    features = getattr(dataset, 'features', None)
    if not features:
        return
    prompt = features.get('teacher_prompt')
    if prompt is not None and getattr(prompt, 'dtype', None) not in ('string', 'large_string'):
        raise ValueError(f'dataset column teacher_prompt must hold strings (the teacher\'s version of the last user '
                         f'message), got {prompt}')
    messages = features.get('teacher_messages')
    if messages is not None:
        inner = getattr(messages, 'feature', None)
        if not isinstance(inner, dict) or 'role' not in inner or 'content' not in inner:
            raise ValueError('dataset column teacher_messages must hold lists of {"role": ..., "content": ...} '
                             f'messages (the teacher\'s prompt conversation), got {messages}')


def response_ids(encoded: dict) -> List[int]:
    """The token ids an encoded row scores (its labels are not ``IGNORE_INDEX``)."""
    return [t for t, label in zip(encoded['input_ids'], encoded['labels']) if label != IGNORE_INDEX]


def scored_turns(encoded: dict) -> List[List[int]]:
    """The token ids an encoded row scores, one list per run of consecutive scored positions: a template scores each
    assistant turn it trains on as one run (the answer and its end tokens), the prompt between two turns never."""
    runs, previous = [], False
    for token, label in zip(encoded['input_ids'], encoded['labels']):
        scored = label != IGNORE_INDEX
        if scored and not previous:
            runs.append([])
        if scored:
            runs[-1].append(token)
        previous = scored
    return runs


def row_name(sample) -> str:
    user = [m['content'] for m in sample.messages if m['role'] == 'user']
    text = user[-1] if user else ''
    text = text if isinstance(text, str) else str(text)
    return f'the dataset row whose last user message is {text[:120]!r}'


def check_views_aligned(sample, student: dict, teacher: dict) -> None:
    """The teacher view must score exactly the student's response tokens, in the same order."""
    s_ids, t_ids = response_ids(student), response_ids(teacher)
    if s_ids != t_ids:
        raise ValueError(f'cannot align the teacher prompt with the student response for {row_name(sample)}: the '
                         f'teacher view scores {len(t_ids)} response tokens, the student view {len(s_ids)}'
                         f'{"" if len(s_ids) != len(t_ids) else " (different tokens)"}. Check its teacher_prompt / '
                         'teacher_messages column: it must hold only the prompt, not a response, and the assistant '
                         'turns the student scores (--loss_scale) as its messages hold them.')


def with_teacher_prompt(sample, request):
    """``request`` (the sample's inference request) with the teacher's prompt, when the sample has a teacher view:
    the teacher samples from its own prompt (its response removed) and images."""
    if sample.teacher_messages:
        messages = [dict(m) for m in sample.teacher_messages]
        if messages[-1].get('role') == 'assistant':  # the prompt only (as ms-swift's ``remove_response``)
            messages.pop()
        request.messages = messages
        if sample.teacher_images is not None:
            request.images = sample.teacher_images
    return request


def check_same_response_count(n_student: int, n_teacher: int, student_mask=None, teacher_mask=None) -> None:
    """Both views of a batch must hold the same number of response tokens (the teacher scores the student's). With
    the views' ``[B, S]`` response masks the error names the first row whose counts differ, and both."""
    if n_student == n_teacher:
        return
    where = ''
    if student_mask is not None and teacher_mask is not None and student_mask.dim() == teacher_mask.dim() == 2:
        rows = student_mask.sum(-1).tolist(), teacher_mask.sum(-1).tolist()
        row = next((i for i, (s, t) in enumerate(zip(*rows)) if s != t), None)
        if row is not None:
            where = (f'; row {row} of the micro-batch: the teacher view {rows[1][row]}, the student view '
                     f'{rows[0][row]}')
    raise ValueError(f'teacher and student views hold different numbers of response tokens ({n_teacher} vs '
                     f'{n_student}{where}): the teacher must score exactly the student response tokens')
