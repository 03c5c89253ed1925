"""Local dataset files by format: ``.jsonl``, ``.json`` (lines or an array), ``.csv``, ``.parquet``, ``.arrow``.
In: ``--dataset``-style entries, a file path. Out: the local files to read; ``(Where, row)`` per row, or a FlagError
naming the flag, the file and the line; whether a student-itself teacher has a privileged prompt to read. Read by the
checks of both adapters before any model loads (``swift rlhf``'s, and the ``megatron`` launcher's)."""
from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
import os
from typing import Iterator, List, NamedTuple, Optional, Tuple

from swift.dataset.dataset_syntax import DatasetSyntax
from swift.dataset.preprocessor import AutoPreprocessor

from swift_gkd_plugin.core.constants import PRIVILEGED_COLUMNS
from swift_gkd_plugin.options.flags import FlagError
from swift_gkd_plugin.options.local_paths import folder_files, lz4_installed


def _zstd_open(path: str, mode: str = 'rb', **kwargs):
    """A ``.zst`` file (zstandard, an ms-swift dependency) opened as ``open`` would: line by line, in text too."""
    import zstandard
    raw = io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, 'rb'), closefd=True))
    return io.TextIOWrapper(raw, **kwargs) if 't' in mode else raw


def _lz4_open(path: str, mode: str = 'rb', **kwargs):
    """A ``.lz4`` file (an LZ4 frame, as ``datasets`` reads it) opened as ``open`` would; needs the lz4 package."""
    import lz4.frame
    return lz4.frame.open(path, mode, **kwargs)


#: compressed text files of a folder, which ``datasets`` reads decompressed (a ``--dataset`` file of them is refused:
#: ms-swift takes its last ending for the loader's name); ``.lz4`` where the lz4 package is installed (not an ms-swift
#: dependency: without it ``datasets`` cannot read such a file, and a folder holding one is refused,
#: :func:`~swift_gkd_plugin.options.local_paths.folder_problem`)
COMPRESSIONS = {'.gz': gzip.open, '.bz2': bz2.open, '.xz': lzma.open, '.zst': _zstd_open,
                **({'.lz4': _lz4_open} if lz4_installed() else {})}
#: the local files read here before loading (ms-swift reads them with the ``datasets`` loader of their ending)
CHECKED_SUFFIXES = ('.jsonl', '.json', '.csv', '.parquet', '.arrow') + tuple(
    text + compression for text in ('.jsonl', '.json', '.csv') for compression in COMPRESSIONS)
TABLE_SUFFIXES = ('.parquet', '.arrow')  # columnar files, read with pyarrow


def _open(path: str, mode: str = 'rb', **kwargs):
    """``path`` opened as ``open`` would, decompressed where it ends as one of :data:`COMPRESSIONS`."""
    opener = COMPRESSIONS.get(os.path.splitext(path)[1].lower())
    if opener is None:
        return open(path, mode, **kwargs)
    return opener(path, mode if 'b' in mode else mode.replace('r', 'rt'), **kwargs)


def _format(path: str) -> str:
    """The ending that names the format of ``path`` (``.jsonl`` of ``rows.jsonl.gz``), lower-cased."""
    stem, ending = os.path.splitext(path.lower())
    return os.path.splitext(stem)[1] if ending in COMPRESSIONS else ending


def local_dataset_files(entries: List[str], use_hf: Optional[bool]) -> List[Tuple[str, bool]]:
    """``(path, standard_format)`` for each local file of a checked format (``CHECKED_SUFFIXES``) among
    ``--dataset``-style entries (``path``, ``path#N``, ``path:subset``), a folder's being the files ``datasets`` reads
    of it (:func:`~swift_gkd_plugin.options.local_paths.folder_files`). ``standard_format`` is False for files
    registered with a preprocessor of their own, whose columns this check cannot interpret."""
    return [file for entry in entries or [] for file in _entry_files(entry, use_hf) or []]


def all_read_here(entries: List[str], use_hf: Optional[bool], standard_only: bool = True) -> bool:
    """Whether every entry is a local file, or a folder of files, of a checked format (``standard_only``: in ms-swift's
    standard format): its rows are all read before loading."""
    files = [_entry_files(entry, use_hf) for entry in entries or []]
    return bool(files) and all(f and (not standard_only or all(standard for _, standard in f)) for f in files)


def _entry_files(entry: str, use_hf: Optional[bool]) -> Optional[List[Tuple[str, bool]]]:
    """The checked files of one entry; None for a hub id, a folder with other files, or another format."""
    syntax = DatasetSyntax.parse(entry)
    if os.path.isdir(syntax.dataset):
        paths = folder_files(os.path.realpath(syntax.dataset)).read
    else:
        paths = [syntax.dataset] if os.path.isfile(syntax.dataset) else []
    if not paths or not all(path.endswith(CHECKED_SUFFIXES) for path in paths):
        return None  # a hub id, a folder ms-swift reads alone, or another format
    preprocess = syntax.get_dataset_meta(use_hf).preprocess_func
    standard = isinstance(preprocess, AutoPreprocessor) and not preprocess.columns
    return [(path, standard) for path in paths]


def no_privileged_view(entries: List[str], use_hf: Optional[bool], columns=None) -> bool:
    """True when every ``--dataset`` entry is a local file in ms-swift's standard format and no row of them has a
    teacher_prompt or teacher_messages (``--columns`` mapped): the student-itself teacher then sees what the student
    sees. False when a row has one, or when some entry cannot be read here (a hub id, a registered preprocessor)."""
    if not all_read_here(entries, use_hf):
        return False
    return first_privileged_row(entries, use_hf, columns) is None


def first_privileged_row(entries: List[str], use_hf: Optional[bool], columns=None) -> Optional[str]:
    """``'PATH line N'`` (or ``index N``) of the first row with a teacher_prompt or teacher_messages (``--columns``
    mapped) among the local ``--dataset`` files in ms-swift's standard format; None when they have none."""
    columns = columns if isinstance(columns, dict) else {}
    names = set(PRIVILEGED_COLUMNS) | {k for k, v in columns.items() if v in PRIVILEGED_COLUMNS}
    for path, standard in local_dataset_files(list(entries or []), use_hf):
        if standard:
            for where, row in dataset_rows('--dataset', path):
                if any(row.get(name) for name in names):
                    return f'{path} {where}'
    return None


def check_teacher_given(args, teacher_flags: Tuple[str, ...], ways_out: str) -> None:
    """Without any of ``teacher_flags`` (``--teacher_model``, ``--teacher_model_server``, ...) the teacher is the
    student itself (ms-swift's self-distillation): unless a row gives it a privileged prompt, teacher and student see
    the same input, every divergence and its gradient are exactly 0, and the run learns nothing (with exit 0).
    Refused when every ``--dataset`` is a local file without such a column (:func:`no_privileged_view`) and no other
    term learns (``--sft_alpha``, ``--gkd_rl_coef``); ``ways_out`` names the teacher flags that work. Other datasets
    cannot be read here: the trainers stop a run whose loss stays 0."""
    if any(getattr(args, flag, None) for flag in teacher_flags):
        return
    if (args.sft_alpha or 0) > 0 or (getattr(args, 'gkd_rl_coef', 0) or 0) > 0:
        return
    if no_privileged_view(args.dataset, args.use_hf, args.columns):
        names = [f'--{flag}' for flag in teacher_flags]
        given = ' or '.join([', '.join(names[:-1]), names[-1]] if len(names) > 1 else names)
        raise FlagError(f'no teacher: without {given} the teacher is the student itself, and no row of --dataset has '
                        'a teacher_prompt or teacher_messages column to give it a view of its own, so the loss and its '
                        f'gradient are exactly 0 and the run would learn nothing. Pass {ways_out}, add a '
                        'teacher_prompt column, or set --sft_alpha > 0')


def check_fresh_adapter_teacher(args, shared_base: bool, starts: Tuple[str, ...]) -> None:
    """A LoRA student whose teacher is its own base (``shared_base``: ``--teacher_model`` = ``--model`` with
    ``--tuner_type lora``, the teacher being the student with its adapter off) and whose adapter is fresh (none of
    ``starts``, the flags that load a trained one: ``--adapters``, ``--resume_from_checkpoint``): a fresh adapter adds
    nothing (its B matrices are 0), so the student is its teacher and every divergence and its gradient are exactly 0
    from step 1. Refused where no row gives the teacher a view of its own (:func:`no_privileged_view`) and no other
    term learns (``--sft_alpha``, ``--gkd_rl_coef``); other datasets are left to the trainers' run guards."""
    if not shared_base or any(getattr(args, flag, None) for flag in starts):
        return
    if (args.sft_alpha or 0) > 0 or (getattr(args, 'gkd_rl_coef', 0) or 0) > 0:
        return
    if no_privileged_view(args.dataset, args.use_hf, args.columns):
        ways = ' or '.join(f'--{flag}' for flag in starts)
        raise FlagError(f'--teacher_model {args.model} is --model with --tuner_type lora: the teacher is the '
                        'student\'s base with its LoRA adapter off, and a fresh adapter adds nothing (its B '
                        'matrices start at 0), so the student is its teacher; no row of --dataset has a '
                        'teacher_prompt or teacher_messages column to give the teacher a view of its own, so the '
                        'loss and its gradient would be exactly 0 from step 1 and the run would learn nothing. Start '
                        f'from a trained adapter ({ways}), add a teacher_prompt column, set --sft_alpha > 0, or pass '
                        'another --teacher_model')


class Where(NamedTuple):
    """Where a row is in its file: ``line`` (jsonl, csv: the line it starts on) or ``index`` (a JSON array, from 0)."""
    kind: str
    number: int

    def __str__(self):
        return f'{self.kind} {self.number}'


def dataset_rows(flag: str, path: str) -> Iterator[Tuple[Where, dict]]:
    """``(where, row)`` for each row of a local ``.jsonl`` / ``.json`` (one object per line, or an array of objects, as
    the ``datasets`` json loader reads both) or ``.csv`` file; a FlagError naming the flag, the file and the line (or
    array index) for what cannot be read, and for a file without rows."""
    found = False
    if _format(path) in TABLE_SUFFIXES:
        rows = table_rows(flag, path)
    else:
        try:
            rows = csv_rows(flag, path) if _format(path) == '.csv' else (
                json_array_rows(flag, path) if _first_byte(path) == b'[' else jsonl_rows(flag, path))
        except (OSError, EOFError, lzma.LZMAError) as exc:
            raise FlagError(f'{flag} {path}: not a readable {os.path.splitext(path)[1][1:]} file ({exc})') from None
    for where, row in _decompressed(flag, path, rows):
        if not isinstance(row, dict):
            raise FlagError(f'{flag} {path}: {where} is a JSON {type(row).__name__}, not an object (one row per '
                            'line, or an array of rows: {"messages": [...]})')
        found = True
        yield where, row
    if not found:
        raise FlagError(f'{flag} {path}: the file has no rows (a dataset needs one JSON object per line, an array of '
                        'them, or a csv header and rows)')


def _decompressed(flag: str, path: str, rows):
    """``rows``, with a compressed file's read error (a cut or damaged file) as a FlagError naming it."""
    try:
        yield from rows
    except (OSError, EOFError, lzma.LZMAError) as exc:
        raise FlagError(f'{flag} {path}: not a readable {os.path.splitext(path)[1][1:]} file ({exc})') from None


def table_rows(flag: str, path: str) -> Iterator[Tuple[Where, dict]]:
    """The rows of a ``.parquet`` or ``.arrow`` (stream or file) table as the ``datasets`` loaders read them
    (pyarrow), each named by its row number; a file pyarrow cannot read is refused."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    try:
        if path.lower().endswith('.parquet'):
            table = pq.read_table(path)
        else:
            try:
                table = pa.ipc.open_stream(pa.OSFile(path)).read_all()
            except pa.ArrowInvalid:
                table = pa.ipc.open_file(pa.OSFile(path)).read_all()
    except (pa.ArrowException, OSError) as exc:
        kind = os.path.splitext(path)[1][1:]
        raise FlagError(f'{flag} {path}: not a readable {kind} file ({str(exc).strip()})') from None
    for i, row in enumerate(table.to_pylist()):
        yield Where('row', i + 1), row


def _first_byte(path: str) -> bytes:
    """The first byte that is not white space or a UTF-8 byte order mark."""
    with _open(path, 'rb') as f:
        head = f.read(4096).lstrip(b'\xef\xbb\xbf \t\r\n')
    return head[:1]


def _utf8(flag: str, path: str, raw: bytes, line_no: int = 1) -> str:
    """``raw`` (the whole file, or its line ``line_no``) as text, or a FlagError naming the line of a bad byte."""
    try:
        return raw.decode('utf-8-sig' if line_no == 1 else 'utf-8')
    except UnicodeDecodeError as exc:
        line_no += raw.count(b'\n', 0, exc.start)
        raise FlagError(f'{flag} {path}: line {line_no} is not UTF-8 text (byte {exc.start}: '
                        f'{raw[exc.start:exc.start + 1]!r}); save the file as UTF-8') from None


def jsonl_rows(flag: str, path: str) -> Iterator[Tuple[Where, object]]:
    """One JSON value per non-blank line; a line that is not UTF-8 or not JSON is refused by its number."""
    with _open(path, 'rb') as f:
        for line_no, raw in enumerate(f, 1):
            text = _utf8(flag, path, raw, line_no)
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as exc:
                if _one_object(path):
                    raise FlagError(f'{flag} {path}: the file is one JSON object over several lines, not rows: a '
                                    'dataset is one object per line, or an array of them ([{"messages": [...]}, '
                                    '...])') from None
                raise FlagError(f'{flag} {path}: line {line_no} is not valid JSON ({exc.msg}, column '
                                f'{exc.colno})') from None
            yield Where('line', line_no), row


def _one_object(path: str) -> bool:
    try:
        with _open(path, 'rb') as f:
            return isinstance(json.loads(f.read()), dict)
    except ValueError:
        return False


def json_array_rows(flag: str, path: str) -> Iterator[Tuple[Where, object]]:
    """The items of a file that is one JSON array, each named by its index; a file that does not parse is refused
    with the parser's line and column."""
    with _open(path, 'rb') as f:
        text = _utf8(flag, path, f.read())
    try:
        items = json.loads(text)
    except json.JSONDecodeError as exc:
        raise FlagError(f'{flag} {path}: not valid JSON at line {exc.lineno}, column {exc.colno} ({exc.msg}); a '
                        'JSON dataset is an array of row objects, or one object per line') from None
    for index, item in enumerate(items):
        yield Where('index', index), item


def csv_rows(flag: str, path: str) -> Iterator[Tuple[Where, dict]]:
    """The rows of a csv file as the ``datasets`` csv loader reads them for ms-swift (pandas, ``na_filter=False``, in
    chunks of 10,000 rows, so a column of numbers only holds numbers), each named by the line it starts on."""
    import csv

    import pandas as pd
    with _open(path, 'rb') as f:
        _utf8(flag, path, f.read())
    with _open(path, 'r', newline='', encoding='utf-8-sig') as f:
        reader, starts = csv.reader(f), []
        try:
            while True:
                start = reader.line_num + 1
                if next(reader):
                    starts.append(start)
        except StopIteration:
            pass
        except csv.Error as exc:
            raise FlagError(f'{flag} {path}: line {reader.line_num} is not valid csv ({exc})') from None
    try:
        chunks = pd.read_csv(path, na_filter=False, chunksize=10_000)
        frames = list(chunks)
    except pd.errors.EmptyDataError:
        return
    except (pd.errors.ParserError, ValueError) as exc:
        raise FlagError(f'{flag} {path}: not a valid csv file ({str(exc).strip()})') from None
    rows = [row for frame in frames for row in frame.to_dict('records')]
    lines = starts[1:] if len(starts) == len(rows) + 1 else None  # the header's line first
    for i, row in enumerate(rows):
        yield (Where('line', lines[i]) if lines else Where('row', i + 1)), row
