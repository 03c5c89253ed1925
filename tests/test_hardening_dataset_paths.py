"""Issue 74 item 4: dataset and run paths that ms-swift failed on after loading both models (or that trained on the
wrong rows) are refused by ``swift``'s launcher, before the route's process starts, in one line naming the flag, the
value and what is allowed: a ``#N`` row count that is not a whole number >= 1, a dataset folder without a data file,
an ``--output_dir`` inside a dataset folder (``--output_dir ''`` being the current folder, as in ms-swift), and a
dangling symbolic link given to ``--resume_from_checkpoint``. Issue 81 item 2: a dataset folder is read as
``datasets.load_dataset(folder)`` reads it (the same files, resolved by ``datasets`` itself), and a folder it would
fail on (data in hidden files only, an empty file) or read only in part (another format than the most common
ending's, another split) is refused, naming the files."""
import importlib.util
import json
import os
import pathlib
import shutil

import pytest
from conftest import base_args, run_swift
from test_activation_and_bad_input import assert_refused_in_one_line, launch_only
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


def _rows(n: int, start: int = 0) -> list:
    return [{'messages': [{'role': 'user', 'content': f'q{i}'}, {'role': 'assistant', 'content': f'a{i}'}]}
            for i in range(start, start + n)]


def _write(path, rows) -> None:
    """``rows`` as a jsonl, a JSON array or a query/response csv, by ``path``'s ending (compressed under ``.gz`` and
    ``.zst``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix in ('.gz', '.zst'):
        import gzip

        import zstandard
        compress = gzip.compress if path.suffix == '.gz' else zstandard.ZstdCompressor().compress
        _write(path.with_suffix(''), rows)
        path.write_bytes(compress(path.with_suffix('').read_bytes()))
        path.with_suffix('').unlink()
    elif path.suffix == '.json':
        path.write_text(json.dumps(rows))
    elif path.suffix == '.csv':
        path.write_text('query,response\n' + ''.join(f'{r["messages"][0]["content"]},{r["messages"][1]["content"]}\n'
                                                      for r in rows))
    else:
        path.write_text(''.join(json.dumps(r) + '\n' for r in rows))


#: folder -> {file: rows (None: empty)}, and the words of its refusal
BAD_FOLDERS = {
    'formats': ({'a.jsonl': 8, 'b.json': 8, 'c.csv': 16}, ["datasets would read 2 file(s) of the folder", '(a.jsonl, '
                'b.json) and leave out 1', "c.csv (not json: datasets reads one format, the most common ending's)"]),
    'hidden': ({'.cache/x.jsonl': 8}, ['datasets reads no training rows from the folder', 'EmptyDatasetError',
                                       '.cache/x.jsonl (hidden: datasets skips names starting with "." or "__")']),
    'hidden_beside': ({'x.jsonl': 8, '.old/y.jsonl': 8}, ['leave out 1', '.old/y.jsonl (hidden']),
    'empty': ({'x.jsonl': None}, ['holds 1 empty data file(s) (x.jsonl): datasets fails on an empty file']),
    'split': ({'train.jsonl': 8, 'test.jsonl': 4}, ["test.jsonl (split 'test': ms-swift reads the split train only)"]),
    'no_split': ({'train.jsonl': 8, 'more.jsonl': 4}, ['more.jsonl (named after no split, where other files are']),
}


@pytest.mark.parametrize('case', sorted(BAD_FOLDERS))
def test_a_dataset_folder_that_datasets_reads_in_part_or_fails_on_is_refused(tiny_ws, tmp_path, case):
    """Before: the folder of ``formats`` trained on its 16 JSON rows (the csv's 16 left out), exit 0; ``hidden`` and
    ``empty`` loaded both models, then failed in ``datasets`` with a traceback."""
    files, needles = BAD_FOLDERS[case]
    folder = tmp_path / 'data'
    for name, count in files.items():
        _write(folder / name, [] if count is None else _rows(count))
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'out'), dataset=str(folder)), launcher=True, check=False,
                    timeout=180)
    assert_refused_by_launcher(run, [f'--dataset {folder}: '] + needles, ranks_started=False)


def test_the_files_of_a_folder_are_those_datasets_reads():
    """What the check takes ``datasets`` to read of a folder is what ``load_dataset(folder, split='train')`` (ms-swift's
    call) loads: the rows of those files, in number, for folders of one format, of several, with a hidden folder."""
    import tempfile

    from datasets import load_dataset
    from swift_gkd_plugin.options.local_paths import folder_files
    layouts = [{'a.jsonl': 3, 'b.json': 5}, {'a.jsonl': 3, 'b.json': 5, 'c.csv': 16, 'd.csv': 2},
               {'x.jsonl': 4, '.cache/y.jsonl': 6, 'sub/z.jsonl': 2}, {'train.jsonl': 3, 'test.jsonl': 7},
               # issue 89 item 10: a README card's configs (its patterns are the folder's), compressed files
               {'README.md': CARD, 'rows/a.jsonl': 3, 'rows/b.jsonl.gz': 4, 'other/c.jsonl': 5},
               {'a.jsonl.gz': 2, 'b.jsonl': 6}, {'a.jsonl.zst': 3, 'b.jsonl': 2}]
    with tempfile.TemporaryDirectory() as tmp:
        for i, layout in enumerate(layouts):
            folder = os.path.join(tmp, f'd{i}')
            for name, count in layout.items():
                if name == 'README.md':
                    pathlib.Path(folder).mkdir(parents=True, exist_ok=True)
                    pathlib.Path(folder, name).write_text(count)
                    continue
                _write(pathlib.Path(folder, name), _rows(count))
            read = folder_files(os.path.realpath(folder)).read
            expected = sum(count for name, count in layout.items() if os.path.join(os.path.realpath(folder), name)
                           in read and name != 'README.md')
            loaded = load_dataset(folder, name='default', split='train', cache_dir=os.path.join(tmp, 'cache'))
            assert len(loaded) == expected and expected > 0, (layout, read)


def test_the_rows_of_a_folder_are_checked_as_a_file_s(tiny_ws, tmp_path):
    """The rows of the files a folder is read from go through the checks of a file's (before: a folder was left to
    ms-swift): a line that is not JSON is named by file and line, before loading."""
    folder = tmp_path / 'data'
    _write(folder / 'a.jsonl', _rows(4))
    (folder / 'b.jsonl').write_text(json.dumps(_rows(1)[0]) + '\n{"messages": [\n')
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'out'), dataset=str(folder)), check=False, timeout=300)
    assert_refused_in_one_line(run, [f'--dataset {os.path.realpath(folder / "b.jsonl")}: line 2 is not valid JSON'])


#: a dataset card whose configs read the files under rows/ (the other data files are not the dataset's)
CARD = '---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: "rows/*"\n---\n# rows\n'


@pytest.mark.parametrize('compression', ['gz', 'zst', 'lz4'])
def test_a_card_folder_and_its_compressed_rows_are_checked_as_datasets_reads_them(tiny_ws, tmp_path, compression):
    """Issue 89 item 10: a folder whose README.md card lists ``configs`` was refused, its patterns resolved against the
    working directory (the message named a wrong path), and a bad row of its ``.jsonl.gz`` was dropped silently:
    the card's files are the folder's, and the compressed file's rows are checked as any file's (``.zst`` too:
    zstandard is an ms-swift dependency; such a folder was left unchecked; ``.lz4`` where the lz4 package is
    installed, which ms-swift does not install: without it such a folder is refused, the next test)."""
    import gzip

    import zstandard
    if compression == 'lz4':
        lz4_frame = pytest.importorskip('lz4.frame', reason='lz4 is not installed here: the folder is refused')
    compress = {'gz': gzip.compress, 'zst': zstandard.ZstdCompressor().compress,
                'lz4': lambda data: lz4_frame.compress(data)}[compression]
    folder = tmp_path / 'data'
    _write(folder / 'rows' / 'a.jsonl', _rows(4))
    bad = json.dumps(_rows(1)[0]) + '\n{"messages": [\n'
    (folder / 'rows' / f'b.jsonl.{compression}').write_bytes(compress(bad.encode()))
    (folder / 'README.md').write_text(CARD)
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'out'), dataset=str(folder)), check=False, timeout=300)
    assert_refused_in_one_line(run, [f'--dataset {os.path.realpath(folder / "rows" / f"b.jsonl.{compression}")}: '
                                     'line 2 is not valid JSON'])


@pytest.mark.skipif(importlib.util.find_spec('lz4') is not None, reason='lz4 is installed here: its rows are checked')
def test_a_folder_with_an_lz4_file_is_refused_without_the_lz4_package(tiny_ws, tmp_path):
    """Issue 96 item 5: ``datasets`` reads a folder's ``.lz4`` files only with the lz4 package, which ms-swift does not
    install: such a folder was neither checked nor refused, and ``datasets`` failed after both models loaded
    ("Compression type lz4 not supported"). Refused by the launcher, naming the file and the two fixes (the file's
    bytes are never read)."""
    folder = tmp_path / 'data'
    _write(folder / 'a.jsonl', _rows(4))
    (folder / 'b.jsonl.lz4').write_bytes(b'\x04\x22\x4d\x18 not read')
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'out'), dataset=str(folder)), launcher=True, check=False,
                    timeout=180)
    assert_refused_by_launcher(run, [f"--dataset {folder}: the folder '{folder}' holds b.jsonl.lz4, which datasets "
                                     'reads only with the lz4 package, not installed here', 'allowed: decompress it '
                                     '(lz4 -d b.jsonl.lz4', 'or pip install lz4'], ranks_started=False)


@pytest.mark.parametrize('suffix', ['', '#4'])
def test_a_compressed_dataset_file_is_refused_by_name(tiny_ws, tmp_path, suffix):
    """``--dataset FILE.jsonl.gz``: ms-swift asked the Hub for a loader named 'gz' after loading both models."""
    path = tmp_path / 'rows.jsonl.gz'
    _write(path, _rows(8))
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'out'), dataset=f'{path}{suffix}'), launcher=True, check=False,
                    timeout=180)
    assert_refused_by_launcher(run, [f"--dataset {path}{suffix}: ms-swift reads a local file with the datasets loader "
                                     "named by its last ending ('gz'), which does not exist", 'allowed: the '
                                     'decompressed file (rows.jsonl), or a folder holding rows.jsonl.gz'],
                               ranks_started=False)


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
    argv = base_args(tiny_ws, '', gkd_logits_topk=100000)
    assert 'is a file, not a folder' not in launch_only(argv).output  # the launcher starts the run
    run = run_swift(argv, check=False, timeout=300)
    assert_refused_in_one_line(run, ['--gkd_logits_topk 100000 is larger than the vocabulary'])
    assert 'is a file, not a folder' not in run.output


def test_a_dangling_link_to_resume_from_is_named_as_a_link(tiny_ws, tmp_path):
    """The refusal's "did you mean" named the link itself (its own name is in its folder)."""
    link = tmp_path / 'latest'
    os.symlink(tmp_path / 'gone' / 'checkpoint-3', link)
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'out'), resume_from_checkpoint=str(link)), launcher=True,
                    check=False, timeout=180)
    assert_refused_by_launcher(run, [f"--resume_from_checkpoint {link}: '{link}' is a symbolic link to "
                                     f"'{tmp_path}/gone/checkpoint-3', which does not exist"], ranks_started=False)
    assert 'did you mean' not in run.output
