"""Issue 74 item 4: dataset and run paths that ms-swift failed on after loading both models (or that trained on the
wrong rows) are refused by ``swift``'s launcher, before the route's process starts, in one line naming the flag, the
value and what is allowed: a ``#N`` row count that is not a whole number >= 1, a dataset folder without a data file,
an ``--output_dir`` inside a dataset folder (``--output_dir ''`` being the current folder, as in ms-swift), and a
dangling symbolic link given to ``--resume_from_checkpoint``."""
import os
import shutil

import pytest
from conftest import base_args, run_swift
from test_activation_and_bad_input import assert_refused_in_one_line
from test_hardening_launcher import assert_refused_by_launcher


@pytest.mark.parametrize('flag,count', [('dataset', '0'), ('dataset', '-1'), ('dataset', 'abc'),
                                        ('val_dataset', '0')])
def test_a_row_count_that_is_not_a_whole_number_from_1_is_refused(tiny_ws, tmp_path, flag, count):
    """``#0`` and ``#-1`` loaded both models, then a bare AssertionError from ms-swift; ``#abc`` a 55-line traceback
    from the plugin's own read of the dataset syntax (dataset_files.py)."""
    entry = f'{tiny_ws.train}#{count}'
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'out'), **{flag: entry}), launcher=True, check=False,
                    timeout=180)
    assert_refused_by_launcher(run, [f"--{flag} {entry}: the row count after '#' must be a whole number >= 1, got "
                                     f"'{count}'; allowed: {tiny_ws.train}#N"], ranks_started=False)


def test_a_dataset_folder_without_a_data_file_is_refused(tiny_ws, tmp_path):
    """``datasets`` raised EmptyDatasetError after both models were loaded."""
    folder = tmp_path / 'data'
    folder.mkdir()
    (folder / 'README.md').write_text('the rows are elsewhere\n')
    (folder / 'make_rows.py').write_text('print(1)\n')
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'out'), dataset=str(folder)), launcher=True, check=False,
                    timeout=180)
    assert_refused_by_launcher(run, [f"--dataset {folder}: the folder '{folder}' holds no data file (it holds "
                                     'README.md, make_rows.py); allowed: a data file'], ranks_started=False)


def test_the_data_file_endings_are_those_datasets_loads_from_a_folder():
    from datasets.packaged_modules import _EXTENSION_TO_MODULE
    from swift_gkd_plugin.options.local_paths import DATA_FILE_SUFFIXES
    assert DATA_FILE_SUFFIXES == {suffix.lower() for suffix in _EXTENSION_TO_MODULE}


def _data_folder(tiny_ws, tmp_path) -> str:
    folder = tmp_path / 'data'
    folder.mkdir()
    shutil.copy(tiny_ws.train, folder / 'train.jsonl')
    return str(folder)


def test_an_output_dir_inside_a_dataset_folder_is_refused(tiny_ws, tmp_path):
    """The second run on that folder read the first run's args.json and logging.jsonl as rows."""
    folder = _data_folder(tiny_ws, tmp_path)
    out = os.path.join(folder, 'runs', 'gkd')
    run = run_swift(base_args(tiny_ws, out, dataset=folder), launcher=True, check=False, timeout=180)
    assert_refused_by_launcher(run, [f"--output_dir {out}: the run's folder '{out}' is inside the --dataset folder "
                                     f"'{folder}'", f'allowed: an --output_dir outside {folder!r}'],
                               ranks_started=False)
    assert not os.path.exists(os.path.join(folder, 'runs'))


def test_an_empty_output_dir_is_the_current_folder(tiny_ws, tmp_path, monkeypatch):
    """ms-swift makes ``--output_dir ''`` the current folder; the check looked at ``./output`` (ms-swift's default
    when the flag is not given): a file named ``output`` there was refused, a current folder that is the dataset
    folder was not."""
    folder = _data_folder(tiny_ws, tmp_path)
    monkeypatch.chdir(folder)
    run = run_swift(base_args(tiny_ws, '', dataset=folder, max_steps=1), launcher=True, check=False, timeout=300)
    assert_refused_by_launcher(run, [f"--output_dir '' (ms-swift's: the current folder, '{folder}'): the run's "
                                     f"folder '{folder}' is inside the --dataset folder"], ranks_started=False)
    elsewhere = tmp_path / 'elsewhere'
    elsewhere.mkdir()
    (elsewhere / 'output').write_text('not a folder\n')
    monkeypatch.chdir(elsewhere)
    # the paths pass; the run goes on to a refusal that needs the resolved model (its vocabulary), before loading
    run = run_swift(base_args(tiny_ws, '', gkd_logits_topk=100000), launcher=True, check=False, timeout=300)
    assert_refused_in_one_line(run, ['--gkd_logits_topk 100000 is larger than the vocabulary'])
    assert run.launched is not None and 'is a file, not a folder' not in run.output


def test_a_dangling_link_to_resume_from_is_named_as_a_link(tiny_ws, tmp_path):
    """The refusal's "did you mean" named the link itself (its own name is in its folder)."""
    link = tmp_path / 'latest'
    os.symlink(tmp_path / 'gone' / 'checkpoint-3', link)
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'out'), resume_from_checkpoint=str(link)), launcher=True,
                    check=False, timeout=180)
    assert_refused_by_launcher(run, [f"--resume_from_checkpoint {link}: '{link}' is a symbolic link to "
                                     f"'{tmp_path}/gone/checkpoint-3', which does not exist"], ranks_started=False)
    assert 'did you mean' not in run.output
