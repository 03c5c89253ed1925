"""Whether a command-line value names a local file or folder, and the near names of one that does not exist (a typo).

Shared by the pre-load checks of ``swift rlhf`` and of ``swift-gkd serve-teacher``: the standard library only, and
``datasets``' own resolution of a dataset folder's files (imported for a folder only)."""
from __future__ import annotations

import difflib
import functools
import importlib.util
import json
import os
import tempfile
from typing import Dict, List, NamedTuple, Optional

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
#: a compressed data file (``train.jsonl.gz``) or an archive of them: ``datasets`` reads them in a folder, ms-swift not
#: as a ``--dataset`` file
ARCHIVE_SUFFIXES = ('.gz', '.bz2', '.xz', '.zst', '.lz4', '.zip', '.7z')


def lz4_installed() -> bool:
    """The lz4 package, which ``datasets`` needs to read a ``.lz4`` file (not an ms-swift dependency), is importable."""
    return importlib.util.find_spec('lz4') is not None


def _is_data_file(name: str) -> bool:
    """Whether a file name ends as a data file (:data:`DATA_FILE_SUFFIXES`, or a compressed one)."""
    suffixes = [f'.{s.lower()}' for s in name.split('.')[1:]]
    return any(s in DATA_FILE_SUFFIXES or s in ARCHIVE_SUFFIXES for s in suffixes)


def _data_files_under(folder: str) -> List[str]:
    """The data files under ``folder`` at any depth, hidden ones included, as sorted absolute paths (``datasets``'
    ``dataset_infos.json`` aside: ms-swift renames it before loading)."""
    return sorted(os.path.realpath(os.path.join(root, name)) for root, _, names in os.walk(folder)
                  for name in names if _is_data_file(name) and name != 'dataset_infos.json')


class FolderFiles(NamedTuple):
    """What ``datasets.load_dataset(folder)`` reads of a folder (ms-swift's ``--dataset FOLDER``: its config
    ``default``, its split ``train``): ``module`` (the format of the folder's most common ending: ``json``, ``csv``,
    ...; None where it finds no data), ``splits`` (split -> files), ``error`` (what ``datasets`` raised, else '')."""
    module: Optional[str]
    splits: Dict[str, List[str]]
    error: str

    @property
    def read(self) -> List[str]:
        return self.splits.get('train', [])


@functools.lru_cache(maxsize=16)
def folder_files(folder: str) -> FolderFiles:
    """The files of ``folder`` that ``datasets`` reads, resolved by ``datasets`` itself (its data-file patterns, a
    README's ``configs``, hidden files and folders skipped, the format inferred from the most common ending), without
    reading them; imports ``datasets`` (1.7 s), for folders only."""
    from datasets.load import LocalDatasetModuleFactory
    try:
        module = LocalDatasetModuleFactory(folder).get_module()
    except Exception as exc:  # noqa: BLE001 -- datasets' own words, for the refusal
        return FolderFiles(None, {}, f'{type(exc).__name__}: {str(exc).strip()}')
    params = module.builder_configs_parameters
    configs = {config.name: config for config in params.builder_configs}
    config = configs.get('default') or configs.get(params.default_config_name) or params.builder_configs[0]
    resolve = getattr(config, '_resolve_data_files', None)
    if resolve is not None:  # a README card's configs hold patterns, relative to the folder (datasets' builder does this)
        from datasets import DownloadConfig
        try:
            resolve(base_path=module.builder_kwargs.get('base_path') or folder, download_config=DownloadConfig())
        except Exception as exc:  # noqa: BLE001 -- a pattern that matches nothing: datasets' own words
            return FolderFiles(None, {}, f'{type(exc).__name__}: {str(exc).strip()}')
    splits = {str(split): [os.path.realpath(f) for f in files] for split, files in (config.data_files or {}).items()}
    return FolderFiles(module.module_path.rsplit('.', 1)[-1], splits, '')


def _shown_files(folder: str, files: List[str]) -> str:
    names = [os.path.relpath(f, folder) for f in files]
    return ', '.join(names[:6]) + (f' (and {len(names) - 6} more)' if len(names) > 6 else '')


def _left_out_why(folder: str, path: str, found: FolderFiles) -> str:
    """Why ``datasets`` does not read ``path`` of ``folder`` as ms-swift's training rows."""
    relative = os.path.relpath(path, folder)
    if any(part.startswith(('.', '__')) for part in relative.split(os.sep)):
        return f'{relative} (hidden: datasets skips names starting with "." or "__")'
    split = next((split for split, files in found.splits.items() if path in files), None)
    if split:
        return f'{relative} (split {split!r}: ms-swift reads the split train only)'
    from datasets.packaged_modules import _MODULE_TO_EXTENSIONS
    if not any(f'.{s.lower()}' in _MODULE_TO_EXTENSIONS.get(found.module, ()) for s in relative.split('.')[1:]):
        return f'{relative} (not {found.module}: datasets reads one format, the most common ending\'s)'
    return f'{relative} (named after no split, where other files are: datasets then reads only those)'


def folder_problem(flag: str, entry: str, folder: str) -> Optional[str]:
    """Why ``datasets`` would fail on, or drop rows of, the ``flag`` folder ``folder`` (:func:`folder_files`): no data
    file; data in hidden files or folders only, or no split train (it raised after both models loaded); data files
    it leaves out (another format than the most common ending's, hidden, another split: trained without them, exit
    0); a file it reads that is empty (a bare StopIteration after both models loaded); a ``.lz4`` file it reads
    without the lz4 package (it raised after both models loaded). None for a folder read whole."""
    everything = _data_files_under(folder)
    if not everything:
        names = sorted(os.listdir(folder))
        held = ', '.join(names[:6]) + (', ...' if len(names) > 6 else '') if names else 'nothing'
        return (f'{flag} {entry}: the folder {folder!r} holds no data file (it holds {held}); allowed: a data file '
                '(.jsonl, .json, .csv, .parquet, .arrow), or a folder holding such files, which ms-swift loads as one '
                'dataset')
    found, real = folder_files(os.path.realpath(folder)), os.path.realpath(folder)
    allowed = ('allowed: a folder whose data files datasets reads all (one format, none hidden, no split but train), '
               'or each file as its own --dataset entry')
    left = [path for path in everything if path not in found.read]
    if not found.read:
        why = found.error or f'it finds the splits {", ".join(found.splits)} and ms-swift reads train'
        return (f'{flag} {entry}: datasets reads no training rows from the folder {folder!r} ({why}): '
                f'{"; ".join(_left_out_why(real, path, found) for path in left[:6])}; {allowed}')
    if left:
        return (f'{flag} {entry}: datasets would read {len(found.read)} file(s) of the folder {folder!r} '
                f'({_shown_files(real, found.read)}) and leave out {len(left)}, whose rows would not be trained on: '
                f'{"; ".join(_left_out_why(real, path, found) for path in left[:6])}'
                f'{f" (and {len(left) - 6} more)" if len(left) > 6 else ""}; {allowed}')
    lz4 = [path for path in found.read if path.lower().endswith('.lz4')]
    if lz4 and not lz4_installed():
        first = os.path.relpath(lz4[0], real)
        more = f' (and {len(lz4) - 1} more .lz4 file(s))' if len(lz4) > 1 else ''
        return (f'{flag} {entry}: the folder {folder!r} holds {first}{more}, which datasets reads only with the lz4 '
                'package, not installed here (ms-swift does not install it: datasets failed after both models loaded, '
                f'"Compression type lz4 not supported"); allowed: decompress it (lz4 -d {first}, or lz4 -dm *.lz4 in '
                'its folder) and remove the .lz4 file, or pip install lz4 (its rows are then checked as the folder\'s '
                'other files)')
    empty = [path for path in found.read if _empty(path)]
    if empty:
        return (f'{flag} {entry}: the folder {folder!r} holds {len(empty)} empty data file(s) '
                f'({_shown_files(real, empty)}): datasets fails on an empty file after both models loaded; allowed: '
                'data files with rows (remove the empty ones)')
    return None


def _empty(path: str) -> bool:
    """An empty file, or one of white space only (text formats)."""
    size = os.path.getsize(path)
    if size == 0 or size > 4096:
        return size == 0
    with open(path, 'rb') as f:
        return not f.read().strip()


def dataset_path_problem(flag: str, entry: str) -> Optional[str]:
    """Why the ``flag`` entry (``--dataset``, ``--val_dataset``) cannot be read: a bad ``#N`` row count
    (:func:`dataset_sample_problem`); a local-looking path (see :func:`looks_local`) that does not exist, which
    ms-swift would take for a hub id after loading both models; a folder that ``datasets`` fails on or reads only in
    part (:func:`folder_problem`). None for a readable path or a hub id."""
    problem = dataset_sample_problem(flag, entry)
    if problem:
        return problem
    path = dataset_path(entry)
    if os.path.isdir(path):
        return folder_problem(flag, entry, path)
    ending = os.path.splitext(path)[1]
    if os.path.isfile(path) and ending.lower() in ARCHIVE_SUFFIXES:
        inner = os.path.basename(path)[:-len(ending)]
        return (f'{flag} {entry}: ms-swift reads a local file with the datasets loader named by its last ending '
                f'({ending[1:]!r}), which does not exist (it failed after loading both models, looking for {ending[1:]!r} '
                f'on the Hub); allowed: the decompressed file ({inner}), or a folder holding {os.path.basename(path)} '
                '(datasets reads the compressed files of a folder)')
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


def write_probe_error(folder: str) -> Optional[str]:
    """Why no file can be made in ``folder`` now (a probe file made and removed), or None where one can."""
    try:
        fd, probe = tempfile.mkstemp(prefix='.swift_gkd_write_probe_', dir=folder)
        os.close(fd)
        os.remove(probe)
    except OSError as exc:
        return str(exc.strerror or exc)
    return None
