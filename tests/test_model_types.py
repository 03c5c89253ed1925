"""``--model_type`` / ``--teacher_model_type`` (issue 96 item 4): a type ms-swift does not register is refused in one
line naming the flag and its close matches, before any model loads (ms-swift's 59-line traceback listed every type, the
teacher's after the student had loaded), by the ``swift`` launcher under torchrun and by ``megatron rlhf``'s launcher;
a registered type that contradicts the folder's ``config.json`` is warned about (it trained without a word)."""
import os

import pytest
from conftest import OFFLINE_ENV, base_args, run_megatron_launcher, run_swift, without_import_side_effects
from test_activation_and_bad_input import assert_refused_in_one_line
from test_hardening_launcher import CPU_RANKS, assert_refused_by_launcher

UNKNOWN = [
    ('model_type', 'qwen_3', "close matches: ['qwen3', "),
    ('teacher_model_type', 'llama3', "close matches: ['llama', 'llama4', "),
]


def unknown_needles(flag, value, close, prog='swift rlhf'):
    return [f"--{flag} '{value}' is not a registered ms-swift model type", close,
            f'the --model_type choices of `{prog} --help`']


@pytest.mark.parametrize('flag,value,close', UNKNOWN, ids=[flag for flag, _, _ in UNKNOWN])
def test_an_unknown_model_type_is_refused_in_one_line(tiny_ws, tmp_path, flag, value, close):
    """Under torchrun by the ``swift`` launcher, before any rank starts; in one process by the process, before ms-swift
    resolves the models."""
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'out'), **{flag: value}, **CPU_RANKS), nproc=2, launcher=True,
                    check=False, timeout=180)
    assert_refused_by_launcher(run, unknown_needles(flag, value, close), ranks_started=False)
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'out1'), **{flag: value}), check=False, timeout=180)
    assert_refused_in_one_line(run, unknown_needles(flag, value, close))
    assert "not in ['" not in run.output  # ms-swift's list of every type


@pytest.mark.parametrize('flag,value,close', UNKNOWN, ids=[flag for flag, _, _ in UNKNOWN])
def test_an_unknown_model_type_beside_a_register_file_is_refused_in_one_line(tiny_ws, tmp_path, flag, value, close):
    """``--custom_register_path`` may register a type that ms-swift's table lacks until ms-swift imports it: checked
    after that (the student's: ms-swift's own error, turned into the same line)."""
    register = tmp_path / 'register_nothing.py'
    register.write_text('# registers no model type\n')
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'out'), **{flag: value}, custom_register_path=str(register)),
                    check=False, timeout=180)
    assert_refused_in_one_line(run, unknown_needles(flag, value, close))


def test_a_model_type_that_contradicts_the_config_is_warned_about(tiny_ws, tmp_path):
    """``qwen2`` for the tiny Qwen3 folders (config.json: model_type 'qwen3', Qwen3ForCausalLM): the run trains, and
    says so once for each flag."""
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'out'), model_type='qwen2', teacher_model_type='qwen2',
                              max_steps=1), timeout=300)
    for type_flag, model_flag, model in (('--model_type', '--model', tiny_ws.student),
                                         ('--teacher_model_type', '--teacher_model', tiny_ws.teacher)):
        lines = [line for line in run.output.splitlines() if f'swift_gkd_plugin: {type_flag} qwen2 contradicts' in line]
        assert len(lines) == 1, run.output[-3000:]
        assert (f"{type_flag} qwen2 contradicts {model_flag} {model}: its config.json has model_type 'qwen3' "
                '(architecture Qwen3ForCausalLM, which ms-swift loads as qwen3, qwen3_emb, qwen3_reranker), and '
                "ms-swift's qwen2 is for Qwen2ForCausalLM") in lines[0]
        assert lines[0].endswith(f'pass {type_flag} qwen3')
    assert len(run.logs) == 1


@pytest.mark.parametrize('model_type', ['qwen3', 'qwen3_emb', 'qwen3_reranker', 'qwen2'])
def test_only_a_type_of_other_architectures_is_warned_about(tiny_ws, model_type):
    """ms-swift's own table decides: the types it registers for the folder's architecture agree with it."""
    from swift.model.model_meta import MODEL_MAPPING

    from swift_gkd_plugin.options.model_types import model_type_mismatch
    warning = model_type_mismatch('--model_type', model_type, '--model', tiny_ws.student, tiny_ws.student,
                                  MODEL_MAPPING)
    assert (warning is not None) == (model_type == 'qwen2'), warning


# the ranks the megatron launcher starts exit at once (tests/megatron/stop_site)
STOP_RANKS = {'PYTHONPATH': os.path.join(os.path.dirname(__file__), 'megatron', 'stop_site')}


def megatron_rlhf(tiny_ws, *flags):
    env = dict(without_import_side_effects(os.environ), **OFFLINE_ENV, **STOP_RANKS)
    env.pop('SWIFT_GKD_PLUGIN', None)
    proc = run_megatron_launcher(['rlhf', '--rlhf_type', 'gkd', '--model', tiny_ws.student, '--teacher_model',
                                  tiny_ws.teacher, '--dataset', tiny_ws.train, '--use_vllm', 'false', *flags], env)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.mark.parametrize('flag,value,close', UNKNOWN, ids=[flag for flag, _, _ in UNKNOWN])
def test_megatron_launcher_refuses_an_unknown_model_type(tiny_ws, flag, value, close):
    code, output = megatron_rlhf(tiny_ws, f'--{flag}', value)
    errors = [line for line in output.splitlines() if line.startswith('megatron rlhf: error: ')]
    assert code == 2 and len(errors) == 1 and 'Traceback' not in output, output[-3000:]
    for needle in unknown_needles(flag, value, close, prog='megatron rlhf'):
        assert needle in errors[0], errors[0]
    assert 'run sh: `' not in output  # no rank started


def test_megatron_launcher_warns_of_a_model_type_that_contradicts_the_config(tiny_ws):
    code, output = megatron_rlhf(tiny_ws, '--model_type', 'qwen2')
    warnings = [line for line in output.splitlines() if 'swift_gkd_plugin: --model_type qwen2 contradicts' in line]
    assert len(warnings) == 1 and warnings[0].endswith('pass --model_type qwen3'), output[-3000:]
    assert 'megatron rlhf: error: --model_type' not in output
