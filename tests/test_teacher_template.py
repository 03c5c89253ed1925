"""``--teacher_template``: the template a teacher with another tokenizer (``--gkd_cross_tokenizer``) reads every
conversation through, and privileged teacher prompts that only the teacher's own template encodes.

The student here uses ms-swift's ``dummy`` template, which (like Gemma's) has no system turn; the privileged
``teacher_messages`` open with a system message that only the teacher's template (``qwen3_nothinking``) can encode.
Without the flag the ``sp_teacher`` (model type qwen3: several candidate templates) would fall back to the student's
template, which refuses the system message.
"""
import math

import pytest
from conftest import base_args, run_swift
from test_activation_and_bad_input import \
    test_bad_input_is_refused_before_any_model_is_loaded as refused_before_loading
from test_teacher_placement import _question, _with_columns

from swift_gkd_plugin.megatron.setup.checks import check_megatron_command_line

STUDENT_TEMPLATE = 'dummy'  # no system turn
TEACHER_TEMPLATE = 'qwen3_nothinking'
SYSTEM = 'You reverse sequences of letters.'


def _privileged_rows(tiny_ws, path):
    return _with_columns(tiny_ws, path, lambda r: {'teacher_messages': [
        {'role': 'system', 'content': SYSTEM}, {'role': 'user', 'content': _question(r)}]})


def test_privileged_system_prompt_reaches_the_named_teacher_template(tiny_ws, sp_teacher, tmp_path):
    """A real run: the teacher reads its privileged prompt (with the system turn the student's template lacks)
    through the template named by --teacher_template; no teacher view is encoded with the student's template."""
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'out'), dataset=_privileged_rows(tiny_ws, tmp_path / 'tm.jsonl'),
                              teacher_model=sp_teacher, gkd_cross_tokenizer='uld', template=STUDENT_TEMPLATE,
                              teacher_template=TEACHER_TEMPLATE, lmbda=0, max_steps=2, per_device_train_batch_size=4))
    assert f'cross-tokenizer distillation (uld): teacher template {TEACHER_TEMPLATE},' in run.output
    assert 'cannot choose the teacher\'s template' not in run.output
    assert len(run.losses) == 2 and all(math.isfinite(x) and x > 0 for x in run.losses), run.losses
    assert all(0 < row['gkd/xtok_exact_fraction'] <= 1 for row in run.logs)


def test_teacher_row_holds_the_privileged_system_prompt(tiny_ws, sp_teacher):
    """The teacher's encoding of a row with ``teacher_messages`` is its template's rendering of them (ms-swift's own
    templates and encoding; no model loaded)."""
    from swift.model import get_processor
    from swift.rl_core.data import GKDSample
    from swift.rlhf_trainers.utils import encode_sample
    from swift.template import get_template

    from swift_gkd_plugin.swift.teacher.cross_tokenizer import CrossTokenizerTeacher
    from swift_gkd_plugin.core.views import prepare_teacher_view
    student_template = get_template(get_processor(tiny_ws.student, model_type='qwen3'),
                                    template_type=STUDENT_TEMPLATE, max_length=128)
    student_template.set_mode('train')
    xtok = CrossTokenizerTeacher('uld', sp_teacher, 'qwen3', student_template, TEACHER_TEMPLATE)
    assert xtok.template.template_meta.template_type == TEACHER_TEMPLATE
    sample = GKDSample(messages=[{'role': 'user', 'content': 'Reverse: a b'}, {'role': 'assistant', 'content': 'b a'}],
                       teacher_messages=[{'role': 'system', 'content': SYSTEM},
                                         {'role': 'user', 'content': 'Reverse: a b'}])
    prepare_teacher_view(sample)
    (teacher, ), (row, ) = xtok.encode_and_align([sample], [encode_sample(sample, student_template)])
    text = xtok.tokenizer.decode(teacher['input_ids'])
    assert f'<|im_start|>system\n{SYSTEM}<|im_end|>' in text and text.count('Reverse: a b') == 1
    assert row.alignment is not None and row.alignment.exact.any()


@pytest.mark.parametrize('flags,needles', [
    (dict(teacher_template='chatml'), ['--teacher_template chatml only applies to a teacher with another tokenizer',
                                       '--gkd_cross_tokenizer']),
    (dict(teacher_template='qwen3_nothinkin', gkd_cross_tokenizer='uld'),
     ["--teacher_template 'qwen3_nothinkin' is not a registered ms-swift template type", "'qwen3_nothinking'"]),
    (dict(teacher_template='chatml', gkd_cross_tokenizer='uld'),
     ['--teacher_template chatml only applies to a teacher with another tokenizer', "student's tokenizer",
      '--template qwen3_nothinking']),
], ids=['without_cross_tokenizer', 'unknown_template', 'same_tokenizer_teacher'])
def test_bad_teacher_template_is_refused_before_any_model_is_loaded(tiny_ws, tmp_path, flags, needles):
    refused_before_loading(tiny_ws, tmp_path, flags, needles)


def test_megatron_launcher_refuses_teacher_template():
    """megatron rlhf has no cross-tokenizer distillation: the flag would be ignored there."""
    with pytest.raises(ValueError, match='--teacher_template chatml is supported by swift rlhf only'):
        check_megatron_command_line(['--rlhf_type', 'gkd', '--teacher_template', 'chatml'])
