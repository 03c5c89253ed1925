"""A ``--model`` / ``--teacher_model`` value that is no local folder and that the hub did not give: one line naming
the flag, the value and why (the hub cannot be reached: an offline variable set, no network; or the hub's own
error). ms-swift downloads from ModelScope, or from the Hugging Face Hub with ``--use_hf true`` / ``USE_HF=1``; a
``--model`` hub id offline was a 107-line traceback. ms-swift is imported inside :func:`model_dir_of` only."""
from __future__ import annotations

import os
from typing import List, Optional

from swift_gkd_plugin.options.flags import FlagError

#: the exceptions (by class name, in the chain of what the download raised) of a hub that cannot be reached:
#: huggingface_hub offline or without a cached copy, httpx / requests / urllib3 / socket failing to connect,
#: ModelScope's NetworkError
UNREACHABLE = {'OfflineModeIsEnabled', 'LocalEntryNotFoundError', 'ConnectError', 'ConnectTimeout', 'ConnectionError',
               'NameResolutionError', 'MaxRetryError', 'NewConnectionError', 'NetworkError', 'gaierror', 'Timeout',
               'ReadTimeout', 'TimeoutException'}
#: the variables that keep the hubs offline
OFFLINE_VARIABLES = ('HF_HUB_OFFLINE', 'TRANSFORMERS_OFFLINE', 'MODELSCOPE_OFFLINE')


def _chain(exc: BaseException) -> List[BaseException]:
    seen = []
    while exc is not None and all(exc is not e for e in seen):
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__
    return seen


def hub_unreachable(exc: BaseException) -> bool:
    """``exc`` (or an exception it came from) says that the hub cannot be reached."""
    return any(type(e).__name__ in UNREACHABLE for e in _chain(exc))


def hub_lookup_failed(flag: str, model_id: str, exc: BaseException, args) -> FlagError:
    """The refusal of ``model_id`` that the hub of ``args`` (``use_hf``) did not give when asked, raising ``exc``."""
    use_hf = bool(getattr(args, 'use_hf', False)) or os.environ.get('USE_HF', '').strip().lower() in ('1', 'true')
    hub = 'the Hugging Face Hub' if use_hf else 'ModelScope (the hub ms-swift uses unless --use_hf true / USE_HF=1)'
    if hub_unreachable(exc):
        offline = [name for name in OFFLINE_VARIABLES
                   if os.environ.get(name, '').strip().lower() in ('1', 'true', 'yes', 'on')]
        if offline:
            why = f'{", ".join(f"{name}={os.environ[name]}" for name in offline)} set: offline'
            fix = (f'unset {" and ".join(offline)} on a machine that reaches the hub (once it is cached, they can '
                   'stay set)')
        else:
            why, fix = 'no network', 'run once where the hub can be reached (it is cached then)'
        return FlagError(f'{flag} {model_id}: not a local folder, and {hub} cannot be reached ({why}) to fetch it: '
                         f'pass the path of a local model folder (one with its config.json), or {fix}')
    first = (str(exc).strip().splitlines() or [''])[0]
    return FlagError(f'{flag} {model_id!r} cannot be found: not a local directory, and the hub lookup failed '
                     f'({type(exc).__name__}: {first})')


def model_dir_of(flag: str, model_id: str, revision: Optional[str], args) -> str:
    """A local directory for ``model_id`` (a path, or a hub id: its config and tokenizer fetched, never its weights),
    or a :class:`FlagError` that names ``flag``."""
    path = os.path.abspath(os.path.expanduser(model_id))
    if os.path.isdir(path):
        return path
    if model_id.startswith(('/', './', '../', '~')) or os.path.exists(path):
        raise FlagError(f'{flag} {model_id!r}: no such model directory')
    from swift.utils import safe_snapshot_download
    try:  # config and tokenizer files only, never the weights
        return safe_snapshot_download(
            model_id, revision=revision, download_model=False, use_hf=args.use_hf, hub_token=args.hub_token)
    except Exception as exc:
        raise hub_lookup_failed(flag, model_id, exc, args) from exc


def is_modelscope_download(folder: str) -> bool:
    """A folder ModelScope's ``snapshot_download`` wrote (its ``.mdl`` model meta) or a git clone of a hub repo."""
    return any(os.path.exists(os.path.join(folder, name)) for name in ('.mdl', '.git'))


def resolve_check_model(args) -> None:
    """``--check_model`` (ms-swift's, on by default) asks the ModelScope hub whether the student's folder is the latest
    revision of the model it was downloaded as. A folder ModelScope did not download names no model (ModelScope reads
    its id as ``unknown``): the question only waits on the hub, offline for its whole timeout. Off for such a folder,
    said once; kept for a ModelScope download."""
    folder = getattr(args, 'model_dir', None)
    if not getattr(args, 'check_model', False) or not folder or not os.path.isdir(folder):
        return
    if is_modelscope_download(folder):
        return
    args.check_model = False
    training = getattr(args, 'training_args', None)  # ms-swift built the trainer's copy before the plugin's resolvers
    if training is not None and hasattr(training, 'check_model'):
        training.check_model = False
    from swift.utils import get_logger
    get_logger().info(f'swift_gkd_plugin: --check_model false: --model {folder} is not a ModelScope download, so there '
                      'is no hub revision to compare it with (ms-swift would ask the hub and wait)')
