"""Issue 58 item 4 for ``swift-gkd serve-teacher``: a ``--model`` folder without ``config.json`` failed after the load
started with transformers' traceback (and exit code 0), and a ``--model`` / ``--adapters`` file was called "no such
folder (did you mean <the same path>?)". Each is now one error line naming the flag, exit code 2, nothing loaded."""
from __future__ import annotations

import os
import shutil
from types import SimpleNamespace

import pytest
from conftest import run_swift_gkd


def _serve_refusal(argv) -> str:
    """The one error line of ``swift-gkd serve-teacher argv``, which must exit 2 without a traceback or a load."""
    proc = run_swift_gkd(['serve-teacher', *argv, '--port', '0', '--device', 'cpu'])
    errors = [line for line in proc.stderr.splitlines() if line.startswith('swift-gkd serve-teacher: error: ')]
    assert proc.returncode == 2 and len(errors) == 1 and 'Traceback' not in proc.stderr, proc.stderr[-3000:]
    assert 'loaded in' not in proc.stderr and 'Loading weights' not in proc.stderr
    return errors[0]


@pytest.mark.parametrize('keep', ['weights', 'tokenizer'])
def test_serve_teacher_refuses_a_model_folder_without_config_json(tiny_ws, tmp_path, keep):
    folder = tmp_path / keep
    folder.mkdir()
    for name in os.listdir(tiny_ws.teacher):
        if name.endswith('.safetensors') if keep == 'weights' else name.startswith('tokenizer'):
            shutil.copy(os.path.join(tiny_ws.teacher, name), folder / name)
    error = _serve_refusal(['--model', str(folder)])
    assert f'--model {folder}: the folder {str(folder)!r} has no config.json' in error


@pytest.mark.parametrize('flag', ['--model', '--adapters'])
def test_serve_teacher_says_a_file_is_a_file(tiny_ws, flag):
    weights = os.path.join(tiny_ws.teacher, 'model.safetensors')
    argv = ['--model', weights] if flag == '--model' else ['--model', tiny_ws.teacher, '--adapters', weights]
    error = _serve_refusal(argv)
    assert f'{flag} {weights}: {weights!r} is a file, not ' in error and 'did you mean' not in error


def test_serve_teacher_refuses_a_model_type_of_several_templates_without_template(tiny_ws):
    """Issue 81 item 8: ``--model_type qwen3`` without ``--template`` on a folder whose name picks no template loaded
    the model, then failed in ms-swift's template lookup with a traceback; the same lookup now runs before the load
    and its error is the line ``swift rlhf`` prints. With ``--template`` the check passes."""
    from swift_gkd_plugin.server.cli import _template_problem
    error = _serve_refusal(['--model', tiny_ws.teacher, '--model_type', 'qwen3'])
    assert (f'--model {tiny_ws.teacher}: ms-swift cannot tell its template type from the folder (it fits [\'qwen3\', '
            in error and "'qwen3_nothinking']): pass --template" in error), error
    parsed = SimpleNamespace(model=tiny_ws.teacher, model_type='qwen3', template='qwen3_nothinking')
    assert _template_problem(parsed) is None
    assert _template_problem(SimpleNamespace(model=tiny_ws.teacher, model_type=None, template=None)) is None  # (plain
    # transformers: ms-swift does not know the folder)
