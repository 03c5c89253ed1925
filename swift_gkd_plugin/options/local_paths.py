"""Whether a command-line value names a local file or folder, and the near names of one that does not exist (a typo).

Shared by the pre-load checks of ``swift rlhf`` and of ``swift-gkd serve-teacher``: the standard library only."""
from __future__ import annotations

import difflib
import json
import os
from typing import Optional

LOCAL_SUFFIXES = ('.jsonl', '.json', '.csv', '.txt', '.parquet', '.arrow', '.tsv')
# the files transformers (and ms-swift's GGUF route) read weights from; a trainer checkpoint's other states are not
WEIGHT_SUFFIXES = ('.safetensors', '.bin', '.pt', '.pth', '.ckpt', '.h5', '.msgpack', '.gguf')
NOT_WEIGHTS = ('training_args.bin', 'optimizer.pt', 'scheduler.pt', 'scaler.pt', 'rng_state')


def looks_local(path: str) -> bool:
    return (os.path.isabs(path) or path.startswith(('.', '~')) or path.lower().endswith(LOCAL_SUFFIXES)
            or path.count('/') > 1)


def near_names(path: str) -> str:
    """`` (did you mean X?)`` for a file of the same folder whose name is close (a typo), else ``''``."""
    folder = os.path.dirname(path) or '.'
    try:
        names = os.listdir(folder)
    except OSError:
        return f'; the folder {folder!r} does not exist either' if os.path.dirname(path) else ''
    close = difflib.get_close_matches(os.path.basename(path), names, n=1, cutoff=0.75)
    return f' (did you mean {os.path.join(os.path.dirname(path), close[0])}?)' if close else ''


def not_a_model_folder(path: str, adapter_flag: str = '--adapters') -> Optional[str]:
    """Why the existing ``path`` cannot be a model folder (a file; a folder without ``config.json``, from which
    transformers and ms-swift read the model's type: without it they fail with a traceback that never names the file;
    a ``config.json`` that is not a JSON object, or no weight files: a download or copy cut short, which failed after
    the other model loaded), as words to follow ``'<flag> <value>: '``; None for a model folder or a path that does
    not exist. A LoRA adapter's folder is told to go to ``adapter_flag``."""
    if os.path.isfile(path):
        folder = os.path.dirname(os.path.abspath(path))
        hint = f': pass its folder {folder!r}' if os.path.isfile(os.path.join(folder, 'config.json')) else ''
        return f'{path!r} is a file, not a model folder{hint}'
    if not os.path.isdir(path):
        return None
    names = sorted(os.listdir(path))
    if 'config.json' in names:
        return _config_problem(os.path.join(path, 'config.json')) or _weights_problem(path, names)
    held = ', '.join(names[:6]) + (', ...' if len(names) > 6 else '') if names else 'nothing'
    adapter = (f' (adapter_config.json: a LoRA adapter, to pass as {adapter_flag} beside its base model)'
               if 'adapter_config.json' in names else '')
    return (f'the folder {path!r} has no config.json (it holds {held}){adapter}; a model folder holds the config.json '
            'that transformers saves beside the weights and tokenizer')


def _config_problem(config: str) -> Optional[str]:
    try:
        with open(config, encoding='utf-8') as f:
            value = json.load(f)
    except ValueError as exc:
        decode = isinstance(exc, json.JSONDecodeError)
        where = f' ({exc.msg} at line {exc.lineno}, column {exc.colno})' if decode else ''
        return (f'{config!r} is not valid JSON{where}: a download or copy cut short? Fetch or copy the model '
                'folder again')
    except OSError as exc:
        return f'{config!r} cannot be read ({exc.strerror or exc})'
    return None if isinstance(value, dict) else f'{config!r} holds a JSON {type(value).__name__}, not an object'


def _weights_problem(path: str, names) -> Optional[str]:
    """No weight file beside ``config.json``, or a shard that its ``*.index.json`` names missing."""
    weights = [n for n in names if n.endswith(WEIGHT_SUFFIXES) and not n.startswith(NOT_WEIGHTS)]
    for index in [n for n in names if n.endswith('.index.json')]:
        try:
            with open(os.path.join(path, index), encoding='utf-8') as f:
                shards = sorted(set(json.load(f)['weight_map'].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return f'its {index} is not a readable weight index (a download cut short?)'
        missing = [shard for shard in shards if shard not in names]
        if missing:
            return (f'its {index} names {len(shards)} weight file(s), and {len(missing)} are missing ({missing[0]}'
                    f'{", ..." if len(missing) > 1 else ""}): a download cut short? Fetch the model folder again')
    if weights:
        return None
    held = ', '.join(names[:6]) + (', ...' if len(names) > 6 else '')
    return (f'the folder {path!r} has a config.json but no weight files (it holds {held}): a download cut short? A '
            f'model folder holds its weights ({", ".join("*" + s for s in WEIGHT_SUFFIXES[:2])}) beside config.json')


def dataset_path(entry: str) -> str:
    """The file or folder of a ``--dataset`` entry, as ms-swift's ``DatasetSyntax.parse`` reads it (``hf::`` / ``ms::``
    prefix, ``#N`` sample count, ``:subset1/subset2`` suffix), without importing ``swift.dataset`` (6 s)."""
    if os.path.exists(entry):
        return entry.strip()
    head, sep, tail = entry.partition('::')
    path = tail if sep else entry
    if not os.path.exists(path):
        path = path.rsplit('#', 1)[0]
    if not os.path.exists(path):
        path = path.split(':', 1)[0]
    return path.strip()


def dataset_sample_problem(flag: str, entry: str) -> Optional[str]:
    """Why the ``#N`` of a ``flag`` entry (``path#N``: N rows drawn from it) cannot be ms-swift's row count: what
    follows the last ``#`` of an entry that is not itself a path must be a whole number of at least 1 (ms-swift's
    ``DatasetSyntax.parse`` raised a bare ValueError on ``#abc``; ``#0`` and ``#-1`` loaded both models, then failed
    a bare ``assert dataset_sample > 0``). None for an entry without one, or a good one."""
    if os.path.exists(entry):
        return None
    _, sep, tail = entry.partition('::')
    path = tail if sep else entry
    if os.path.exists(path) or '#' not in path:
        return None
    count = path.rsplit('#', 1)[1]
    try:
        rows = int(count)  # ms-swift's own reading of it
    except ValueError:
        rows = None
    if rows is not None and rows >= 1:
        return None
    base = entry.rsplit('#', 1)[0]
    return (f'{flag} {entry}: the row count after \'#\' must be a whole number >= 1, got {count!r}; allowed: '
            f'{base}#N (N >= 1 rows drawn from it), or {base} (all its rows)')


#: the endings of the files the ``datasets`` library loads from a folder (``datasets.packaged_modules``'
#: ``_EXTENSION_TO_MODULE``, lower-cased; tests/test_hardening_dataset_paths.py compares them): ms-swift loads a
#: ``--dataset`` folder with ``datasets.load_dataset(folder)``, which finds no data in a folder without one of them
DATA_FILE_SUFFIXES = frozenset((
    '.arrow', '.csv', '.eval', '.geoparquet', '.gpq', '.h5', '.hdf5', '.json', '.jsonl', '.lance', '.ndjson',
    '.parquet', '.pdf', '.tar', '.tsv', '.txt', '.xml',
    # images (imagefolder)
    '.apng', '.blp', '.bmp', '.bufr', '.bw', '.cur', '.dcx', '.dds', '.dib', '.emf', '.eps', '.fit', '.fits', '.flc',
    '.fli', '.ftc', '.ftu', '.gbr', '.gif', '.grib', '.icb', '.icns', '.ico', '.iim', '.im', '.j2c', '.j2k', '.jfif',
    '.jp2', '.jpc', '.jpe', '.jpeg', '.jpf', '.jpg', '.jpx', '.msp', '.pbm', '.pcd', '.pcx', '.pgm', '.png', '.pnm',
    '.ppm', '.ps', '.psd', '.pxr', '.ras', '.rgb', '.rgba', '.sgi', '.tga', '.tif', '.tiff', '.vda', '.webp', '.wmf',
    '.xbm', '.xpm',
    # audio and video (audiofolder, videofolder), NIfTI
    '.3g2', '.3gp', '.aiff', '.asf', '.au', '.avi', '.avr', '.caf', '.f4v', '.flac', '.flv', '.htk', '.ircam',
    '.m4v', '.mat4', '.mat5', '.mkv', '.mov', '.mp3', '.mp4', '.mpc2k', '.mpeg', '.mpg', '.mxf', '.nii', '.nist',
    '.nut', '.ogg', '.ogm', '.opus', '.paf', '.pvf', '.raw', '.rf64', '.sd2', '.sds', '.svx', '.voc', '.vst', '.w64',
    '.wav', '.wavex', '.webm', '.wma', '.wmv', '.wve', '.xi'))
#: a compressed data file (``train.jsonl.gz``) or an archive of them: left to ``datasets``
ARCHIVE_SUFFIXES = ('.gz', '.bz2', '.xz', '.zst', '.lz4', '.zip', '.7z')


def _holds_a_data_file(folder: str) -> bool:
    """Whether a file under ``folder`` (at any depth) ends as a data file (:data:`DATA_FILE_SUFFIXES`, or a compressed
    one); stops at the first."""
    for _, _, names in os.walk(folder):
        for name in names:
            suffixes = [s.lower() for s in name.split('.')[1:]]
            if any(f'.{s}' in DATA_FILE_SUFFIXES or f'.{s}' in ARCHIVE_SUFFIXES for s in suffixes):
                return True
    return False


def dataset_path_problem(flag: str, entry: str) -> Optional[str]:
    """Why the ``flag`` entry (``--dataset``, ``--val_dataset``) cannot be read: a bad ``#N`` row count
    (:func:`dataset_sample_problem`); a local-looking path (see :func:`looks_local`) that does not exist, which
    ms-swift would take for a hub id after loading both models; a folder without a data file (``datasets`` raised
    ``EmptyDatasetError`` after both models loaded). None for a readable path or a hub id."""
    problem = dataset_sample_problem(flag, entry)
    if problem:
        return problem
    path = dataset_path(entry)
    if os.path.isdir(path) and not _holds_a_data_file(path):
        names = sorted(os.listdir(path))
        held = ', '.join(names[:6]) + (', ...' if len(names) > 6 else '') if names else 'nothing'
        return (f'{flag} {entry}: the folder {path!r} holds no data file (it holds {held}); allowed: a data file '
                '(.jsonl, .json, .csv, .parquet, .arrow), or a folder holding such files, which ms-swift loads as one '
                'dataset')
    if os.path.exists(path) or not looks_local(path):
        return None
    where = '' if os.path.isabs(path) else f' (relative to {os.getcwd()})'
    return (f'{flag} {entry}: no such file {path!r}{where}{near_names(path)}; a local dataset must exist (hub '
            'datasets are named owner/name)')


def adapter_path_problem(flag: str, value: str) -> Optional[str]:
    """Why ``value`` given to ``flag`` (``--adapters``: a LoRA adapter's folder) cannot be one, as one line: a file,
    or a local-looking path that does not exist (otherwise taken for a hub id); None otherwise."""
    path = os.path.expanduser(value)
    if os.path.isfile(path):
        folder = os.path.dirname(os.path.abspath(path))
        return f'{flag} {value}: {path!r} is a file, not an adapter folder (pass the folder that holds it, {folder!r})'
    if not os.path.isdir(path) and looks_local(value):
        where = '' if os.path.isabs(path) else f' (relative to {os.getcwd()})'
        return f'{flag} {value}: no such folder {path!r}{where}{near_names(path)} (hub models are named owner/name)'
    return None
