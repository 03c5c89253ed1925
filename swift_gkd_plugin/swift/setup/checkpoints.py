"""Checkpoints of a GKD run: which are complete, a resume from an incomplete one refused before any model loads,
and a save (or a step's log write) that fails for lack of space named as such.

The HF Trainer writes ``trainer_state.json`` last in each ``checkpoint-N`` (after the weights, optimizer, scheduler
and RNG states), and ms-swift points ``last-checkpoint`` at a checkpoint only once it is written: a checkpoint
without ``trainer_state.json`` is one whose save was cut short (a killed process, a full disk): a resume from it is
refused before loading (ms-swift would fail after both models loaded, with a raw ``FileNotFoundError``), and a full
disk during a save is named as such (torch says ``unexpected pos ...``).
"""
from __future__ import annotations

import errno
import json
import os
import re
import resource
import shutil
from typing import List, Optional

from swift_gkd_plugin.options.flags import FlagError

TRAINER_STATE = 'trainer_state.json'  # transformers.trainer.TRAINER_STATE_NAME, written last
LAST_CHECKPOINT = 'last-checkpoint'  # ms-swift's symlink to the newest complete checkpoint
LOGGING_FILE = 'logging.jsonl'  # the logs ms-swift appends each logged step to, in --output_dir
_CHECKPOINT = re.compile(r'^checkpoint-(\d+)$')
# what a failed write looks like: OSError's own errno, or the text of torch's and safetensors' writers
_SPACE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
# a folder that cannot be written: no permission, a read-only file system, a file where a folder goes
_WRITE_ERRNOS = _SPACE_ERRNOS | {errno.EACCES, errno.EPERM, errno.EROFS, errno.EEXIST, errno.ENOTDIR}
_WRITE_FAILED = re.compile(r'unexpected pos \d+ vs \d+|No space left on device|Disk quota exceeded|File too large|'
                           r'PytorchStreamWriter failed|file write failed', re.IGNORECASE)
LOW_SPACE = 64 * 2**20  # bytes: below this, a failed write is taken for a full disk


def is_complete(checkpoint: str) -> bool:
    """``checkpoint`` holds a readable ``trainer_state.json`` (the file the trainer writes last)."""
    try:
        with open(os.path.join(checkpoint, TRAINER_STATE), encoding='utf-8') as f:
            return isinstance(json.load(f), dict)
    except (OSError, ValueError):
        return False


def complete_checkpoints(output_dir: str) -> List[str]:
    """The complete ``checkpoint-N`` folders of ``output_dir``, by step."""
    try:
        names = os.listdir(output_dir)
    except OSError:
        return []
    found = [(int(m.group(1)), os.path.join(output_dir, name)) for name in names for m in [_CHECKPOINT.match(name)]
             if m and is_complete(os.path.join(output_dir, name))]
    return [path for _, path in sorted(found)]


def newest_complete(output_dir: str, refused: Optional[str] = None, args=None) -> Optional[str]:
    """``last-checkpoint`` where it points at a complete checkpoint, else the highest complete ``checkpoint-N``; with
    ``refused`` (a checkpoint just refused), the newest other one whose files ``args`` can resume from."""
    candidates = complete_checkpoints(output_dir)[::-1]
    link = os.path.join(output_dir, LAST_CHECKPOINT)
    if os.path.isdir(link) and is_complete(link):
        candidates.insert(0, os.path.join(output_dir, os.readlink(link)) if os.path.islink(link) else link)
    for path in candidates:
        if refused is None:
            return path
        if not os.path.samefile(path, refused) and checkpoint_files_problem(path, args) is None:
            return path
    return None


def newest_hint(output_dir: str, refused: Optional[str] = None, args=None) -> str:
    """Where to resume from instead: :func:`newest_complete`, never ``refused`` itself."""
    newest = newest_complete(output_dir, refused if refused and os.path.isdir(refused) else None, args)
    if newest is None:
        other = ' other' if refused and os.path.isdir(refused) else ''
        return f'{output_dir} holds no{other} complete checkpoint to resume from'
    return f'the newest complete checkpoint is {newest} (--resume_from_checkpoint {newest})'


def newest_in_run(folder: str) -> Optional[str]:
    """The newest complete checkpoint of a run's folder (``--output_dir``), or of its ``v<N>-<time>`` runs (ms-swift's
    ``--add_version``): the one whose ``trainer_state.json`` was written last; None where it holds none."""
    runs = [folder]
    try:
        runs += [os.path.join(folder, name) for name in os.listdir(folder) if re.match(r'^v\d+-', name)]
    except OSError:
        return None
    found = [path for path in map(newest_complete, runs) if path]
    return max(found, key=lambda path: os.path.getmtime(os.path.join(path, TRAINER_STATE)), default=None)


#: The arguments that ms-swift saves beside the weights of each checkpoint (a copy of the run's args.json).
ARGS_FILE = 'args.json'


#: the other flags that define the loss (its temperature, the teacher's support), compared on resume
LOSS_FLAGS = ('temperature', 'gkd_logits_topk', 'gkd_topk_tail')


def loss_changes(saved: dict, args) -> List[str]:
    """The loss settings of ``args`` that differ from those ``saved`` in a checkpoint's args.json: the divergence,
    then the parameter of the divergence in use (--beta for jsd, --gkd_skew_alpha for the skew ones), then the
    temperature and the teacher's top-k support (:data:`LOSS_FLAGS`)."""
    names = ['gkd_divergence', 'beta' if args.gkd_divergence == 'jsd' else 'gkd_skew_alpha']
    if saved.get('gkd_divergence', 'jsd') != args.gkd_divergence:
        names = names[:1]
    names += list(LOSS_FLAGS)
    return [f'--{name} {saved[name]} -> {getattr(args, name)}' for name in names
            if name in saved and hasattr(args, name) and saved[name] != getattr(args, name)]


def warn_resume_changes(args) -> None:
    """Resuming with another divergence or divergence parameter than the checkpoint was trained with is allowed (a
    deliberate curriculum), but said: the loss switches silently otherwise."""
    path = os.path.join(args.resume_from_checkpoint or '', ARGS_FILE)
    if not args.resume_from_checkpoint or not os.path.isfile(path):
        return
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return
    changes = loss_changes(saved, args) if isinstance(saved, dict) else []
    if changes:
        from swift.utils import get_logger
        get_logger().warning(f'swift_gkd_plugin: --resume_from_checkpoint {args.resume_from_checkpoint} was trained '
                             f'with another loss ({"; ".join(changes)}, checkpoint\'s -> this run\'s): training '
                             'goes on with this run\'s. Pass the checkpoint\'s values to continue its loss.')


#: what a checkpoint holds besides trainer_state.json: the weights (any of them) and the training state
WEIGHTS = ('model.safetensors', 'model.safetensors.index.json', 'pytorch_model.bin', 'pytorch_model.bin.index.json')
ADAPTER_WEIGHTS = ('adapter_model.safetensors', 'adapter_model.bin')
TRAINING_STATE = {'optimizer.pt': 'the optimizer state (AdamW moments)', 'scheduler.pt': 'the learning-rate schedule'}
RNG_STATE = re.compile(r'^rng_state(_\d+)?\.pth$')


def unreadable(path: str) -> Optional[str]:
    """Why the file ``path`` cannot be what its name says (a cut-short safetensors file or torch zip archive), else
    None. Reads the safetensors header and the zip directory only, never the tensors."""
    size = os.path.getsize(path)
    try:
        if path.endswith('.safetensors'):
            with open(path, 'rb') as f:
                header_len = int.from_bytes(f.read(8), 'little')
                header = json.loads(f.read(header_len)) if 8 + header_len <= size else None
            if header is None:
                return f'its header runs past the end of the file ({size} bytes)'
            end = max([t['data_offsets'][1] for k, t in header.items() if k != '__metadata__'] or [0])
            return None if 8 + header_len + end <= size else f'{size} bytes, its tensors need {8 + header_len + end}'
        if path.endswith(('.pt', '.pth', '.bin')) and not path.endswith('training_args.bin'):
            import zipfile
            zipfile.ZipFile(path).close()
    except Exception as exc:  # noqa: BLE001: json, struct and zipfile errors alike
        return f'{size} bytes, not readable ({type(exc).__name__}: {exc})'
    return None


def checkpoint_files_problem(path: str, args) -> Optional[str]:
    """What ``--resume_from_checkpoint path`` lacks to resume (its weights or adapter, the optimizer and scheduler
    unless ``--resume_only_model``), or a file of it that was cut short; a DeepSpeed checkpoint (``global_step*``)
    keeps its own files and is left to DeepSpeed."""
    names = os.listdir(path)
    if any(name.startswith('global_step') for name in names):
        return None
    adapter = os.path.isfile(os.path.join(path, 'adapter_config.json'))
    weights = ADAPTER_WEIGHTS if adapter else WEIGHTS
    if not any(name in names for name in weights):
        return f'holds no {"adapter" if adapter else "model"} weights (none of {", ".join(weights)})'
    needed = [] if args.resume_only_model else list(TRAINING_STATE)
    missing = [name for name in needed if name not in names]
    if missing:
        what = ' and '.join(TRAINING_STATE[name] for name in missing)
        return (f'has no {" or ".join(missing)}: resuming would silently start {what} afresh. Pass --resume_only_model '
                'true to start from its weights only')
    for name in sorted(names):
        problem = unreadable(os.path.join(path, name)) if os.path.isfile(os.path.join(path, name)) else None
        if problem:
            return f'has a cut-short {name} ({problem})'
    return None


#: config.json keys that fix the weights' shapes (at the top and in each ``*_config`` section of a multimodal one)
SHAPE_KEYS = ('model_type', 'vocab_size', 'hidden_size', 'intermediate_size', 'moe_intermediate_size',
              'num_hidden_layers', 'num_attention_heads', 'num_key_value_heads', 'head_dim', 'num_experts',
              'num_local_experts', 'n_routed_experts', 'tie_word_embeddings')


def shape_config(model_dir: str) -> Optional[dict]:
    """The :data:`SHAPE_KEYS` of ``model_dir/config.json`` (``text_config.hidden_size`` for a section's), or None
    without a readable one."""
    try:
        with open(os.path.join(model_dir, 'config.json'), encoding='utf-8') as f:
            config = json.load(f)
    except (OSError, ValueError):
        return None
    sections = [('', config)] + [(f'{key}.', value) for key, value in config.items()
                                 if key.endswith('_config') and isinstance(value, dict)]
    return {prefix + key: section[key] for prefix, section in sections for key in SHAPE_KEYS if key in section}


def shape_changes(checkpoint_dir: str, model_dir: str) -> List[str]:
    """``key checkpoint's vs model's`` for each :data:`SHAPE_KEYS` value that differs between the two config.json; a
    larger ``vocab_size`` in the checkpoint is no difference (ms-swift resizes the embeddings on every load for
    ``--new_special_tokens`` and some model types, and saves the resized size)."""
    ours, theirs = shape_config(checkpoint_dir), shape_config(model_dir)
    if ours is None or theirs is None:
        return []

    def differs(key):
        if key.endswith('vocab_size') and isinstance(ours[key], int) and isinstance(theirs[key], int):
            return ours[key] < theirs[key]
        return ours[key] != theirs[key]

    return [f'{key} {ours[key]} vs {theirs[key]}' for key in ours if key in theirs and differs(key)]


def _saved(path: str, name: str, key: str) -> Optional[str]:
    """The text under ``key`` in the JSON file ``name`` of the checkpoint ``path``, else None."""
    try:
        with open(os.path.join(path, name), encoding='utf-8') as f:
            value = json.load(f).get(key)
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def other_model_problem(path: str, args) -> Optional[str]:
    """Why the checkpoint ``path`` cannot resume this run's ``--tuner_type`` on ``--model``, else None: an adapter
    for a full run, full weights for an adapter run, another model's config.json (a full checkpoint's own, an
    adapter's base's), or a LoRA tensor that does not fit a text-only ``--model`` (:func:`adapter_base_mismatch`).
    ms-swift resumes an adapter with its own adapter_config.json (its r and target modules) on ``--model``."""
    names = os.listdir(path)
    adapter = 'adapter_config.json' in names
    full = any(name in names for name in WEIGHTS)
    flag = f'--resume_from_checkpoint {path}'
    if args.tuner_type == 'full' and adapter and not full:
        tuner = _saved(path, ARGS_FILE, 'tuner_type') or 'lora'
        return (f'{flag} holds an adapter (adapter_config.json) and --tuner_type full resumes full weights: pass '
                f'--tuner_type {tuner} to resume it (its r and target modules come from the checkpoint), or merge it '
                f'(swift export --adapters {path} --merge_lora true) and pass the merged model as --model without '
                '--resume_from_checkpoint')
    if args.tuner_type != 'full' and full and not adapter:
        return (f'{flag} holds full weights ({", ".join(n for n in names if n in WEIGHTS)}, no adapter_config.json) '
                f'and --tuner_type {args.tuner_type} resumes an adapter: pass --tuner_type full to resume it, or '
                f'--model {path} without --resume_from_checkpoint to start a new adapter on its weights')
    model_dir = getattr(args, 'model_dir', None) or args.model
    base = _saved(path, 'adapter_config.json', 'base_model_name_or_path') if adapter else None
    base = base or _saved(path, ARGS_FILE, 'model')
    changes = shape_changes(base if adapter and base else path, model_dir)
    whose = f'the config.json of its base {base}' if adapter and base else 'its config.json'
    problem = f'{whose} has {", ".join(changes)} (checkpoint\'s vs --model\'s)' if changes else None
    multimodal = getattr(getattr(args, 'model_meta', None), 'is_multimodal', False)  # module names differ there
    if problem is None and adapter and not multimodal and 'adapter_model.safetensors' in names:
        from swift_gkd_plugin.swift.setup.adapters import adapter_base_mismatch
        try:
            problem = adapter_base_mismatch(path, model_dir)
        except Exception:  # noqa: BLE001: a config transformers cannot build on the meta device: peft will say
            problem = None
    if problem is None:
        return None
    trained = f'the --model it was trained from ({base})' if base else 'the --model it was trained from'
    return (f'{flag} is a checkpoint of another model than --model {args.model}: {problem}. Pass {trained}, or a '
            f'checkpoint of --model {args.model}')


def past_max_steps_problem(path: str, args) -> Optional[str]:
    """A checkpoint whose step (trainer_state.json's ``global_step``) is at or past ``--max_steps``, or whose epoch is
    at or past ``--num_train_epochs`` when epochs decide: the trainer took one more step past ``--max_steps``, off
    its learning-rate schedule, and exited 0."""
    try:
        with open(os.path.join(path, TRAINER_STATE), encoding='utf-8') as f:
            state = json.load(f)
        step, epoch = int(state['global_step']), float(state.get('epoch') or 0)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    flag = f'--resume_from_checkpoint {path}'
    if args.max_steps > 0 and step >= args.max_steps:
        return (f'{flag} is at step {step} ({TRAINER_STATE}\'s global_step) and --max_steps is {args.max_steps}: '
                'nothing is left to train (the trainer would still take one step past it, off its learning-rate '
                f'schedule, and exit 0). Pass --max_steps larger than {step} to train on from it')
    if args.max_steps <= 0 and epoch >= args.num_train_epochs:
        return (f'{flag} is at epoch {epoch:g} ({TRAINER_STATE}\'s epoch) and --num_train_epochs is '
                f'{args.num_train_epochs:g}: nothing is left to train. Pass --num_train_epochs larger than {epoch:g} '
                'to train on from it')
    return None


def check_resume_checkpoint(args) -> None:
    """``--resume_from_checkpoint`` (a folder: :func:`swift_gkd_plugin.swift.setup.paths.check_resume_folder`) is a
    complete checkpoint (:func:`checkpoint_files_problem`; its
    trainer state unless only its weights are loaded: ``--resume_only_model true --ignore_data_skip true`` never reads
    it) of this run's model and tuner (:func:`other_model_problem`) with steps left (:func:`past_max_steps_problem`);
    a loss that differs from the checkpoint's, and a checkpoint without its RNG state, are warned about. A refusal
    names an earlier complete checkpoint to resume from, or says none is left."""
    path = args.resume_from_checkpoint
    if not path:
        return
    parent = os.path.dirname(os.path.abspath(path))
    warn_resume_changes(args)
    state_read = not (args.resume_only_model and args.ignore_data_skip)
    if state_read and not is_complete(path):
        state = os.path.join(path, TRAINER_STATE)
        problem = 'has no' if not os.path.exists(state) else 'has an unreadable'
        raise FlagError(f'--resume_from_checkpoint {path} {problem} {TRAINER_STATE}, which the trainer writes last in '
                         'a checkpoint: its save was cut short (a killed process, a full disk); '
                         f'{newest_hint(parent, path, args)}.')
    problem = checkpoint_files_problem(path, args)
    if problem:
        raise FlagError(f'--resume_from_checkpoint {path} {problem}; {newest_hint(parent, path, args)}.')
    problem = other_model_problem(path, args) or (past_max_steps_problem(path, args) if state_read else None)
    if problem:
        raise FlagError(problem)
    if args.resume_only_model:
        return
    from swift.utils import get_logger
    if not any(RNG_STATE.match(name) for name in os.listdir(path)):
        get_logger().warning(f'swift_gkd_plugin: --resume_from_checkpoint {path} has no rng_state.pth: the run resumes '
                             'with other random draws than an uninterrupted run (dropout, on-policy samples), so its '
                             'losses will differ from it')
        return
    problem = rng_state_problem(path, int(os.environ.get('WORLD_SIZE') or 1))
    if problem:
        get_logger().warning(f'swift_gkd_plugin: --resume_from_checkpoint {path} {problem}')


def rng_state_problem(path: str, processes: int) -> Optional[str]:
    """What a resume on ``processes`` processes cannot restore of the random number generator states in checkpoint
    ``path`` (HF's Trainer reads ``rng_state.pth`` on one process, ``rng_state_<rank>.pth`` on several, and only
    logs an info line where its file is missing), or None where every process finds the file it saved: one phrase
    of a warning. The rows' order does not depend on it (a function of the seed and the epoch:
    :mod:`swift_gkd_plugin.swift.rollout.epoch_sampler`)."""
    names = os.listdir(path)
    ranks = sorted(int(m.group(1)[1:]) for m in map(RNG_STATE.match, names) if m and m.group(1))
    saved = len(ranks) if ranks else 1 if 'rng_state.pth' in names else 0
    if not saved or saved == processes:
        return None
    files = ', '.join(f'rng_state_{r}.pth' for r in ranks) if ranks else 'rng_state.pth'
    head = (f'was saved by {saved} process{"es" if saved > 1 else ""} ({files}) and this run has {processes}: it '
            'could not restore ')
    tail = ': they resume with other random draws than an uninterrupted run (dropout, on-policy samples)'
    if processes == 1:
        return head + 'their random number generator states (rng_state.pth is what one process reads)' + tail
    if not ranks:
        return head + f'the random number generator states of its {processes} processes (rng_state_<rank>.pth)' + tail
    shared = min(saved, processes)
    what = (f'the random number generator states of ranks {shared}-{processes - 1} (no rng_state_<rank>.pth), and '
            if processes > saved else '')
    return (head + what + f'an uninterrupted run\'s states of ranks 0-{shared - 1}: they take those of the saved ranks '
            'of the same index, which drew for another layout' + tail)


def _write_failure(exc: BaseException) -> bool:
    """``exc`` (or an exception it was raised from) is a failed file write."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _WRITE_ERRNOS or _WRITE_FAILED.search(str(exc)):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _cause(exc: BaseException, folder: str) -> tuple:
    """``(errno, words)`` naming why a write into ``folder`` failed: a full filesystem, the file-size limit of the
    process (``ulimit -f``), else the error itself."""
    folder = _existing(folder)
    usage = shutil.disk_usage(folder)
    if usage.free < LOW_SPACE:
        return errno.ENOSPC, (f'no space left on device: the filesystem of {folder} has {usage.free / 2**20:.1f} MiB '
                              f'free of {usage.total / 2**20:.1f} MiB')
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY:
        return errno.EFBIG, f'file too large: this process may write files of at most {limit} bytes (ulimit -f)'
    code = exc.errno if isinstance(exc, OSError) and exc.errno else errno.EIO
    return code, f'a write failed ({type(exc).__name__}: {exc}); {usage.free / 2**20:.1f} MiB free in {folder}'


def _existing(path: str) -> str:
    """``path``, or its nearest ancestor that exists (a folder removed under the run)."""
    while path and not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path or os.sep


def _failed_write(exc: BaseException, what: str, folder: str, output_dir: str, incomplete: str = '') -> str:
    """The one line of a failed write of ``what`` into ``folder``: the cause, where to resume from, the remedy."""
    code, cause = _cause(exc, folder)
    remedy = ('Free space (or pass another --output_dir)' if code in _SPACE_ERRNOS else
              f'Make {output_dir} writable (or pass another --output_dir)')
    return f'{what} failed, {cause}.{incomplete} {newest_hint(output_dir)}. {remedy} and resume.'


def _failed_file(exc: BaseException) -> Optional[str]:
    """The file (or folder) a failed write named, in ``exc`` or an exception it was raised from."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.filename:
            return os.fspath(exc.filename)
        exc = exc.__cause__ or exc.__context__
    return None


def guard_checkpoint_saves(trainer, error: type) -> None:
    """A checkpoint save that fails writing a file (no space left, the file-size limit, a folder that cannot be
    written) raises ``error`` (the run guards' ``RunError``: one ``swift rlhf: error:`` line at exit, exit code 1)
    naming the checkpoint, the cause and the newest complete checkpoint, instead of the writer's tracebacks."""
    original = trainer._save_checkpoint

    def _save_checkpoint(*args, **kwargs):
        try:
            return original(*args, **kwargs)
        except Exception as exc:
            if not _write_failure(exc):
                raise
            output_dir = trainer.args.output_dir
            checkpoint = os.path.join(output_dir, f'checkpoint-{trainer.state.global_step}')
            folder = checkpoint if os.path.isdir(checkpoint) else output_dir
            incomplete = f' That checkpoint is incomplete (no {TRAINER_STATE});'
            raise error(_failed_write(exc, f'saving {checkpoint}', folder, output_dir, incomplete)) from exc

    trainer._save_checkpoint = _save_checkpoint


def guard_log_writes(trainer, error: type) -> None:
    """A step's logs that cannot be written raise ``error`` as a failed checkpoint save does (one line, exit code 1),
    naming the file, the cause and the newest complete checkpoint. ms-swift appends every logged step to
    ``logging.jsonl`` in ``--output_dir`` (the last step's too, before its checkpoint is saved): a disk that filled up
    or an output folder that went away after the last step ended the run in a traceback."""
    log = trainer.log

    def log_or_stop(logs, *args, **kwargs):
        try:
            return log(logs, *args, **kwargs)
        except Exception as exc:
            if not _write_failure(exc):
                raise
            output_dir = trainer.args.output_dir
            path = _failed_file(exc)
            if path is None or os.path.abspath(path) == os.path.abspath(output_dir):  # (the folder: ms-swift's makedirs)
                path = os.path.join(output_dir, LOGGING_FILE)
            what = f'writing the logs of step {trainer.state.global_step} ({path})'
            raise error(_failed_write(exc, what, output_dir, output_dir)) from exc

    trainer.log = log_or_stop
