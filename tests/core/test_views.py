"""The teacher's and the student's views of a multi-turn trajectory (core/views.py), on ms-swift's own GKDSample."""
import pytest
from swift.rl_core.data import GKDSample

from swift_gkd_plugin.core.views import (check_privileged_columns, generated_turns, prepare_teacher_view,
                                         student_trajectory, trajectory_start, without_history_loss)

HISTORY = [{'role': 'user', 'content': 'earlier'}, {'role': 'assistant', 'content': 'earlier answer'}]
PROMPT = HISTORY + [{'role': 'user', 'content': 'Add: 2 + 3'}]
TRAJECTORY = [{'role': 'assistant', 'content': '<calc>2+3</calc>'}, {'role': 'user', 'content': '= 5'},
              {'role': 'assistant', 'content': '5'}]


def sample(**fields):
    return GKDSample(messages=[dict(m) for m in PROMPT + TRAJECTORY], response_token_ids=[[1, 2], [3]], **fields)


def test_the_trajectory_starts_at_the_first_sampled_turn():
    s = sample()
    assert generated_turns(s) == 2 and trajectory_start(s.messages, 2) == len(PROMPT)
    assert trajectory_start(PROMPT, 0) == len(PROMPT)
    single = GKDSample(messages=PROMPT + TRAJECTORY[-1:], response_token_ids=[7, 8])
    assert generated_turns(single) == 1 and trajectory_start(single.messages, 1) == len(PROMPT)
    assert generated_turns(GKDSample(messages=PROMPT)) == 0
    with pytest.raises(ValueError, match='reported 5 assistant turns but its conversation holds 3'):
        trajectory_start(s.messages, 5)


def test_teacher_prompt_replaces_the_prompts_last_user_message_not_a_tool_result():
    s = sample(teacher_prompt='Add carefully: 2 + 3')
    prepare_teacher_view(s)
    assert s.teacher_messages == HISTORY + [{'role': 'user', 'content': 'Add carefully: 2 + 3'}] + TRAJECTORY
    assert s.messages == PROMPT + TRAJECTORY  # the student's view is untouched


def test_teacher_messages_get_the_whole_trajectory():
    teacher_prompt = [{'role': 'system', 'content': 'You know the answers.'}, {'role': 'user', 'content': 'Add'}]
    s = sample(teacher_messages=[dict(m) for m in teacher_prompt])
    prepare_teacher_view(s)
    assert s.teacher_messages == teacher_prompt + TRAJECTORY
    prepare_teacher_view(s)  # idempotent: the view ends with the assistant's turn
    assert s.teacher_messages == teacher_prompt + TRAJECTORY


def test_a_rows_earlier_answers_are_not_targets():
    messages = without_history_loss(PROMPT + TRAJECTORY, 2)
    assert messages[1] == dict(HISTORY[1], loss=False)
    assert [m.get('loss') for m in messages[len(PROMPT):]] == [None, None, None]


def test_seq_kd_trajectories_continue_the_students_prompt():
    teacher_view = [{'role': 'user', 'content': 'privileged'}] + TRAJECTORY
    assert student_trajectory(PROMPT, teacher_view, [[1, 2], [3]]) == PROMPT + TRAJECTORY
    assert student_trajectory(None, teacher_view, [[1, 2], [3]]) is teacher_view


@pytest.mark.parametrize('column,value,message', [
    ('teacher_prompt', 7, 'dataset column teacher_prompt must hold strings'),
    ('teacher_messages', 'just a string', 'dataset column teacher_messages must hold lists'),
])
def test_privileged_columns_of_another_type_are_refused_by_the_trainer(column, value, message):
    """The trainer's own check, for datasets that are not read before loading (hub datasets, other formats)."""
    from datasets import Dataset
    check_privileged_columns(Dataset.from_list([{'teacher_prompt': 'x',
                                                  'teacher_messages': [{'role': 'user', 'content': 'x'}]}]))
    with pytest.raises(ValueError, match=message):
        check_privileged_columns(Dataset.from_list([{column: value}]))
