"""Issue 74 item 2: ``--max_length`` bounds what the training forwards receive, in every mode and truncation strategy.

ms-swift's GKD encoded its micro-batches with the template's ``max_length`` unset: ``--truncation_strategy right`` or
``left`` cut nothing (``--max_length 16`` logged the loss of ``--max_length 128`` on 20-token rows). The rows are now
cut as ``swift sft`` cuts them (``swift_gkd_plugin/swift/rollout/max_length.py``); a probe plugin
(``max_length_probe_plugin.py``) records the tokens of every student and teacher forward of the loss."""
import json
import os

import pytest
from conftest import base_args, run_swift

from swift_gkd_plugin.core.views import response_ids

HERE = os.path.dirname(os.path.abspath(__file__))
PROBE = os.path.join(HERE, 'max_length_probe_plugin.py')


def _template(model):
    from swift import get_template
    from swift.model import get_processor
    template = get_template(get_processor(model, model_type='qwen3'), template_type='qwen3_nothinking')
    template.set_mode('train')
    return template


def _rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def _teacher_prompt(row):
    """A privileged prompt naming the answer: longer than the student's."""
    user, answer = row['messages'][0]['content'], row['messages'][1]['content']
    return f'Reverse (the answer is {answer}): {user.split(": ", 1)[1]}'


@pytest.mark.parametrize('strategy', ['right', 'left'])
def test_the_cut_is_swift_sfts_and_the_teacher_view_scores_the_same_tokens(tiny_ws, strategy):
    """Each row cut here equals the template's own cut (``swift sft``'s) at every length, and a privileged teacher
    view cut with it scores exactly the student's remaining response tokens."""
    from swift_gkd_plugin.swift.rollout.max_length import LengthCap
    template = _template(tiny_ws.student)
    template.truncation_strategy = strategy
    rows = _rows(tiny_ws.train)[:3]
    for max_length in (4, 10, 15, 17, 19):
        for row in rows:
            template.max_length = None
            student = template.encode(row, return_length=True)
            view = {'messages': [{'role': 'user', 'content': _teacher_prompt(row)}, row['messages'][1]]}
            teacher = template.encode(view, return_length=True)
            template.max_length = max_length
            sft = template.encode(row, return_length=True)
            cap = LengthCap(template)
            students, teachers = [student], [teacher]
            cap.cut([None], students, teachers, own_view=True)
            assert (students[0]['input_ids'], students[0]['labels']) == (sft['input_ids'], sft['labels'])
            assert students[0]['length'] == len(sft['input_ids']) <= max_length
            assert response_ids(teachers[0]) == response_ids(students[0]), (strategy, max_length)
            if strategy == 'right':  # the teacher keeps its own prompt whole
                assert teachers[0]['input_ids'][:10] == teacher['input_ids'][:10]


def _forwards(run, path):
    with open(path) as f:
        lines = [json.loads(line) for line in f]
    assert lines, run.output[-3000:]
    return {who: [line for line in lines if line['who'] == who] for who in ('student', 'teacher')}


def _teacher_prompt_dataset(tiny_ws, tmp_path):
    rows = _rows(tiny_ws.train)[:16]
    for row in rows:
        row['teacher_prompt'] = _teacher_prompt(row)
    path = tmp_path / 'privileged.jsonl'
    path.write_text(''.join(json.dumps(row) + '\n' for row in rows))
    return str(path)


RUNS = {  # seed 0: steps off-policy then on-policy (lmbda 0.5), seq_kd then on-policy (with --seq_kd)
    'right': dict(truncation_strategy='right', max_length=16, lmbda=0.5, seed=0),
    'left': dict(truncation_strategy='left', max_length=12, lmbda=0.5, seq_kd='true', seed=0),
    'delete': dict(max_length=16, lmbda=1, seed=0),
}


@pytest.mark.parametrize('name', list(RUNS))
def test_every_training_forward_holds_at_most_max_length_tokens(tiny_ws, tmp_path, name):
    """``right`` (dataset and on-policy steps, rows with a longer teacher prompt), ``left`` (seq_kd and on-policy
    steps) and ``delete`` (on-policy: the prompts fit, a sampled response's end is cut): every row of every student
    forward holds at most ``--max_length`` tokens, and so does the teacher's, but where its own prompt is longer (it
    keeps its prompt whole and the student's response tokens). Before: 20 tokens at ``--max_length`` 12 and 16."""
    flags = dict(RUNS[name])
    cap = flags['max_length']
    if name == 'right':
        flags['dataset'] = _teacher_prompt_dataset(tiny_ws, tmp_path)
    log = str(tmp_path / 'forwards.jsonl')
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'out'), max_steps=2, external_plugins=PROBE, **flags),
                    env={'GKD_TEST_MAXLEN_LOG': log})
    assert run.returncode == 0, run.output[-3000:]
    modes = {'right': ['off_policy', 'on_policy'], 'left': ['seq_kd', 'on_policy'], 'delete': ['on_policy'] * 2}
    assert [m['mode'] for m in run.modes()] == modes[name]
    forwards = _forwards(run, log)
    student = [n for line in forwards['student'] for n in line['rows']]
    assert student and max(student) <= cap, forwards['student']
    assert max(max(line['shape'][1] for line in forwards['student']), cap) == cap
    teacher = [n for line in forwards['teacher'] for n in line['rows']]
    if name == 'right':  # its longer prompt whole: more than the cap, and at most its extra prompt tokens more
        assert max(teacher) > cap, forwards['teacher']
    else:
        assert teacher and max(teacher) <= cap, forwards['teacher']
    cut = [row['gkd/cut_rows'] for row in run.logs]
    assert cut[-1] > 0 and 'counted in gkd/cut_rows' in run.output, run.logs
    assert all(loss > 0 for loss in run.losses), run.losses


def test_text_rows_all_over_max_length_are_refused_before_loading_with_the_longest(tiny_ws, tmp_path):
    """``--truncation_strategy delete`` with every row longer than ``--max_length``: one line, before loading, saying
    how many rows and the longest."""
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'out'), max_length=8, lmbda=0), check=False)
    assert run.returncode == 2, run.output[-3000:]
    lengths = [len(_template(tiny_ws.student).encode(row)['input_ids']) for row in _rows(tiny_ws.train)]
    assert (f'(every row ({len(lengths)}) longer than --max_length 8, the longest {max(lengths)} tokens)'
            in run.output), run.output[-3000:]
    assert 'Loading weights' not in run.output


# ------------------------------------------------------------- issue 81 item 3: a cut that leaves no response token
@pytest.mark.parametrize('flag,value,needle', [
    ('max_length', '0', '--max_length 0: allowed a positive number of tokens'),
    ('max_length', '-1', '--max_length -1: allowed a positive number of tokens'),
    ('predict_with_generate', 'true', "--predict_with_generate true: GKD's evaluation scores the dataset's responses "
                                      'with the loss and never generates')], ids=['max_length_0', 'max_length_-1', 'generate'])
def test_a_max_length_of_no_token_and_generation_in_evaluation_are_refused_by_the_launcher(tiny_ws, tmp_path, flag,
                                                                                           value, needle):
    """``--max_length 0`` was refused only at the first batch, after both models loaded; ``--predict_with_generate
    true`` beside evaluation was taken and ignored, and ms-swift's generation metric asked every rank for ``jieba``."""
    from test_hardening_launcher import assert_refused_by_launcher
    flags = {flag: value, **({'val_dataset': tiny_ws.fixed, 'eval_steps': 1} if flag != 'max_length' else {})}
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'out'), **flags), launcher=True, check=False)
    assert_refused_by_launcher(run, [needle], ranks_started=False)


CUT_AWAY = {  # the tiny rows' prompts are 14 tokens with the template: --max_length 14 keeps none of a response
    'off_policy': dict(lmbda=0),
    'on_policy': dict(lmbda=1),
    'privileged': dict(lmbda=0.5, teacher_model=None, teacher_model_type=None),
}


@pytest.mark.parametrize('name', list(CUT_AWAY))
def test_text_rows_cut_to_no_response_are_refused_before_loading(tiny_ws, tmp_path, name):
    """``--truncation_strategy right`` with every prompt at least ``--max_length`` tokens: each step trained on
    nothing (loss 0, ``gkd/cut_rows`` 2), and the run-end guard blamed the teacher (or asked rows that have a
    ``teacher_prompt`` for one). Refused before loading, dataset steps, on-policy ones and privileged rows alike."""
    from test_activation_and_bad_input import assert_refused_in_one_line
    flags = dict(CUT_AWAY[name])
    if name == 'privileged':
        flags['dataset'] = _teacher_prompt_dataset(tiny_ws, tmp_path)
    rows = 16 if name == 'privileged' else len(_rows(tiny_ws.train))
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'out'), truncation_strategy='right', max_length=14, **flags),
                    check=False)  # (refused by the process, which measures the rows: the launcher lets it through)
    assert_refused_in_one_line(run, [
        f'(every row ({rows}) with a prompt of at least --max_length 14, the longest 14 tokens)',
        'its prompt is 14 tokens with the template, at least --max_length 14: --truncation_strategy right keeps its '
        'first 14 tokens, none of its response'])
    assert 'Loading weights' not in run.output


# ------------------------------------------------ issue 96 item 5: --max_length against the seq_kd teacher's context
def short_context_copy(model: str, folder, positions: int) -> str:
    """A copy of the model folder ``model`` whose ``config.json`` allows ``positions`` positions (the weights are the
    same: a rotary model has no table of positions)."""
    import shutil
    shutil.copytree(model, folder)
    config = json.loads((folder / 'config.json').read_text())
    config['max_position_embeddings'] = positions
    (folder / 'config.json').write_text(json.dumps(config))
    return str(folder)


def test_max_length_above_the_seq_kd_teachers_context_is_refused_before_loading(tiny_ws, tmp_path):
    """A teacher of 256 positions beside a student of 512 and ``--max_length 384``: seq_kd steps have the teacher
    answer prompts of up to 384 tokens, and ms-swift's engine refused the first one longer than its context after
    both models had loaded ("leaves no room for generation"); only the student's context was checked. At
    ``--max_length 256`` the run trains."""
    from test_activation_and_bad_input import assert_refused_in_one_line
    teacher = short_context_copy(tiny_ws.teacher, tmp_path / 'teacher256', 256)
    flags = dict(teacher_model=teacher, seq_kd='true', lmbda=0, max_steps=1)
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'out'), max_length=384, **flags), check=False)
    assert_refused_in_one_line(run, [
        f"--max_length 384 is longer than the teacher's context (--teacher_model {teacher}: 256 positions, "
        'config.json): seq_kd steps (--seq_kd true) have the teacher answer prompts of up to --max_length tokens',
        'pass --max_length 256 or less, or --seq_kd false'])
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'fits'), max_length=256, **flags))
    assert len(run.losses) == 1


def test_the_sampling_contexts_each_mode_checks():
    """Which context bounds ``--max_length`` (:func:`swift_gkd_plugin.options.model_context.check_sampling_context`,
    shared by ``swift rlhf`` and ``megatron rlhf``'s launcher): the student's on on-policy steps unless another
    engine's context applies, the teacher's (or the student's, its own teacher) on seq_kd steps."""
    from types import SimpleNamespace

    from swift_gkd_plugin.options.flags import FlagError
    from swift_gkd_plugin.options.model_context import check_sampling_context

    def refused(student=512, teacher=None, **flags):
        args = SimpleNamespace(**{**dict(max_length=1024, lmbda=0.5, seq_kd=False, model='s', teacher_model=None,
                                         vllm_max_model_len=None, use_vllm=False, vllm_mode=None,
                                         multi_turn_scheduler=None), **flags})
        try:
            check_sampling_context(args, student, teacher)
        except FlagError as exc:
            return str(exc)
        return None

    assert "longer than the student's context (--model s: 512 positions" in refused()
    assert refused(max_length=512) is None and refused(student=None) is None and refused(lmbda=0) is None
    assert refused(vllm_max_model_len=1024) is None  # (checked against --max_length on its own)
    assert refused(use_vllm=True, vllm_mode='server') is None  # the rollout server's own context
    assert refused(multi_turn_scheduler='math_tip_trick') is None  # trajectories cut at the context
    assert "longer than the student's context" in refused(use_vllm=True, vllm_mode='colocate')
    assert "the teacher's context (--teacher_model t: 256 positions" in refused(
        lmbda=0, seq_kd=True, teacher_model='t', teacher=256, max_length=384)
    assert refused(lmbda=0, seq_kd=True, teacher_model='t', teacher=None, max_length=384) is None  # a hub teacher
    assert 'the student, its own seq_kd teacher (--model s: 512 positions' in refused(lmbda=0, seq_kd=True)
    assert refused(lmbda=0, seq_kd=False, teacher_model='t', teacher=256, max_length=384) is None
