"""Issue 58 items 4, 9 and 11: model folders without ``config.json``, an ``--output_dir`` that cannot be written, and
bf16 on a machine that transformers refuses it on. Each was a traceback from ms-swift or transformers; each is now one
``swift rlhf: error:`` line, exit code 2, before any model is loaded."""
from __future__ import annotations

import json
import os
import shutil

import pytest
from conftest import base_args, run_swift
from test_activation_and_bad_input import assert_refused_in_one_line


def _partial_copy(src: str, dst, keep) -> str:
    """A copy of the model folder ``src`` holding only the files for which ``keep(name)`` is true."""
    dst.mkdir()
    for name in os.listdir(src):
        if keep(name):
            shutil.copy(os.path.join(src, name), dst / name)
    return str(dst)


PARTIAL_FOLDERS = {  # (flag, the flags that go with it, which files the folder keeps)
    # ms-swift guessed a type from the file names: "Multiple possible types found: ['bert', ...]"
    'teacher_weights_only': ('teacher_model', {'teacher_model_type': None}, lambda n: n.endswith('.safetensors')),
    # transformers: "Unrecognized model in ... Should have a `model_type` key in its config.json"
    'teacher_tokenizer_only': ('teacher_model', {}, lambda n: n.startswith('tokenizer')),
    'student_weights_and_tokenizer': ('model', {'model_type': None}, lambda n: n != 'config.json'),
}


@pytest.mark.parametrize('name', list(PARTIAL_FOLDERS))
def test_model_folder_without_config_json_is_refused_naming_it(tiny_ws, tmp_path, name):
    flag, flags, keep = PARTIAL_FOLDERS[name]
    folder = _partial_copy(tiny_ws.teacher if flag == 'teacher_model' else tiny_ws.student, tmp_path / name, keep)
    out = tmp_path / 'out'
    run = run_swift(base_args(tiny_ws, str(out), **{flag: folder}, **flags), check=False, timeout=120)
    assert_refused_in_one_line(run, [f'--{flag} {folder}: the folder {folder!r} has no config.json'])
    assert not out.exists()  # refused before ms-swift resolved anything


def test_model_flag_naming_a_file_is_refused_as_a_file(tiny_ws, tmp_path):
    weights = os.path.join(tiny_ws.teacher, 'model.safetensors')
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'out'), teacher_model=weights), check=False, timeout=120)
    assert_refused_in_one_line(run, [f'--teacher_model {weights}: {weights!r} is a file, not a model folder'])


def test_output_dir_that_is_a_file_is_refused(tiny_ws, tmp_path):
    """ms-swift's os.makedirs raised FileExistsError (or NotADirectoryError below a file) with a traceback."""
    afile = tmp_path / 'notes.txt'
    afile.write_text('keep me\n')
    run = run_swift(base_args(tiny_ws, str(afile)), check=False, timeout=120)
    assert_refused_in_one_line(run, [f'--output_dir {afile}: {str(afile)!r} is a file, not a folder'])
    below = afile / 'run1'
    run = run_swift(base_args(tiny_ws, str(below)), check=False, timeout=120)
    assert_refused_in_one_line(run, [f'--output_dir {below}: {str(afile)!r} is a file, not a folder'])
    assert afile.read_text() == 'keep me\n'


@pytest.mark.skipif(not os.path.isdir('/sys/kernel'), reason='a Linux /sys')
def test_output_dir_that_cannot_be_written_is_refused(tiny_ws, tmp_path):
    """Nothing can be created in sysfs's folders, by root either (EPERM/EACCES, or EROFS where /sys is mounted
    read-only, as in most containers): unlike a folder made read-only by chmod, which root writes in anyway, it fails
    for whoever runs the tests, as a read-only file system does."""
    out = '/sys/kernel/gkd_out/run1'
    run = run_swift(base_args(tiny_ws, out), check=False, timeout=120)
    assert_refused_in_one_line(run, [f"--output_dir {out}: cannot create anything in '/sys/kernel'",
                                     'pass a writable --output_dir'])


def _bf16_capable() -> bool:
    from transformers.utils import is_torch_bf16_gpu_available
    return is_torch_bf16_gpu_available()


@pytest.mark.skipif(_bf16_capable(), reason='a machine whose GPU trains in bf16')
def test_bfloat16_without_use_cpu_on_a_cpu_machine_is_refused(tiny_ws, tmp_path):
    """transformers' TrainingArguments refused it after 30 lines of traceback; --use_cpu true trains."""
    out = tmp_path / 'out'
    run = run_swift(base_args(tiny_ws, str(out), torch_dtype='bfloat16'), check=False, timeout=120)
    assert_refused_in_one_line(run, ['--torch_dtype bfloat16', '--use_cpu true', '--torch_dtype float32'])
    assert not out.exists()
    run = run_swift(base_args(tiny_ws, str(out), torch_dtype='bfloat16', use_cpu='true', max_steps=1), timeout=300)
    assert len(run.losses) == 1


@pytest.mark.skipif(_bf16_capable(), reason='a machine whose GPU trains in bf16')
def test_bfloat16_from_the_models_config_is_refused_naming_where_it_came_from(tiny_ws, tmp_path):
    """Without --torch_dtype ms-swift takes the dtype of --model's config.json (bfloat16 for most hub models)."""
    student = _partial_copy(tiny_ws.student, tmp_path / 'bf16_student', lambda n: True)
    config_path = os.path.join(student, 'config.json')
    with open(config_path) as f:
        config = json.load(f)
    config['dtype'] = 'bfloat16'  # transformers 5's name of torch_dtype
    with open(config_path, 'w') as f:
        json.dump(config, f)
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'out'), model=student, torch_dtype=None), check=False,
                    timeout=120)
    assert_refused_in_one_line(run, ["--torch_dtype bfloat16 (not given: --model's config.json)", '--use_cpu true'])


def _cut_config(folder):
    config = os.path.join(folder, 'config.json')
    text = open(config).read()
    with open(config, 'w') as f:
        f.write(text[:len(text) // 2])


def _sharded(folder):
    """The weights renamed to the first of two shards, an index naming both: the second never arrived."""
    os.rename(os.path.join(folder, 'model.safetensors'), os.path.join(folder, 'model-00001-of-00002.safetensors'))
    with open(os.path.join(folder, 'model.safetensors.index.json'), 'w') as f:
        json.dump({'metadata': {}, 'weight_map': {'a': 'model-00001-of-00002.safetensors',
                                                  'b': 'model-00002-of-00002.safetensors'}}, f)


BROKEN_FOLDERS = {  # issue 66 item 4: name -> (how the teacher's copy is broken, the words of the refusal)
    'config_cut_short': (_cut_config, "config.json' is not valid JSON (Unterminated string"),
    'no_weight_files': (lambda f: [os.remove(os.path.join(f, n)) for n in os.listdir(f) if n.endswith('.safetensors')],
                        'has a config.json but no weight files (it holds chat_template.jinja, config.json'),
    'missing_shard': (_sharded, 'its model.safetensors.index.json names 2 weight file(s), and 1 are missing '
                                '(model-00002-of-00002.safetensors)'),
}


@pytest.mark.parametrize('name', list(BROKEN_FOLDERS))
def test_a_broken_model_folder_is_refused_naming_the_file(tiny_ws, tmp_path, name):
    """A download or copy cut short: a config.json cut in half was a 119-line double traceback; a folder without its
    weights loaded the other model first, then failed."""
    breaks, needle = BROKEN_FOLDERS[name]
    folder = str(tmp_path / name)
    shutil.copytree(tiny_ws.teacher, folder)
    breaks(folder)
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'out'), teacher_model=folder), check=False, timeout=120)
    assert_refused_in_one_line(run, [f'--teacher_model {folder}: ', needle])


def test_adapters_naming_a_file_and_an_output_dir_through_a_dangling_link_are_refused(tiny_ws, adapters, tmp_path):
    """Issue 66 items 4 and 5: ms-swift's ``_init_adapters`` and ``_add_version`` failed with 48- and 49-line
    tracebacks."""
    adapter_file = os.path.join(adapters['fit'], 'adapter_model.safetensors')
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'out'), tuner_type='lora', adapters=adapter_file), check=False,
                    timeout=120)
    assert_refused_in_one_line(run, [f"--adapters {adapter_file}: {adapter_file!r} is a file, not an adapter folder "
                                     f"(pass the folder that holds it, {adapters['fit']!r})"])
    link = tmp_path / 'runs'
    os.symlink(tmp_path / 'gone' / 'runs', link)
    run = run_swift(base_args(tiny_ws, str(link / 'gkd')), check=False, timeout=120)
    assert_refused_in_one_line(run, [f"--output_dir {link}/gkd: '{link}' is a symbolic link to "
                                     f"'{tmp_path}/gone/runs', which does not exist"])
