"""The paths of a ``swift rlhf`` command line, checked before ms-swift resolves them, and the run folder a refusal
leaves behind. Framework-free, but in the adapter: a resume folder is read through :mod:`.checkpoints`, whose save
guards ``swift/run/`` imports (``megatron rlhf``'s launcher has its own path check, ``check_local_paths``).

ms-swift refuses a missing ``--model`` and a missing ``--external_plugins`` file itself, with 20-47 lines of
traceback; a ``--model`` or ``--teacher_model`` path that does not exist is taken for a hub id ("Downloading the model
from HuggingFace Hub ..."). Here each is one ``error:`` line naming the flag and the path, before anything is
resolved. The paths' rule is the datasets' (:func:`check_dataset_paths`): an
absolute, ``./`` or ``~`` path, or more than one ``/``, names a local folder; ``owner/name`` is left to the hub.
An existing model path must be a folder with a ``config.json``, and ``--output_dir`` a folder that can be written.

A refusal after ms-swift built its arguments comes after it created the run's folder (``--output_dir``, with a
``v<N>-<time>`` folder under ``--add_version``): :class:`CreatedDirs` remembers what that step created, and
:meth:`CreatedDirs.remove_empty` removes those folders again while they are empty.
"""
from __future__ import annotations

import os
from typing import List, Optional

from swift_gkd_plugin.options.flags import FlagError
from swift_gkd_plugin.options.local_paths import (adapter_path_problem, dataset_path, dataset_path_problem, looks_local,
                                          near_names, not_a_model_folder, write_probe_error)


def check_model_given(args) -> None:
    """``--model`` is given, unless ms-swift takes it from ``--adapters`` (their ``args.json``) or from
    ``--resume_from_checkpoint`` with ``--resume_only_model``."""
    if args.model is not None or args.adapters or (args.resume_from_checkpoint and args.resume_only_model):
        return
    raise FlagError('--model is required: the student to train, a local model folder or a hub id such as '
                    'Qwen/Qwen3-0.6B (or --adapters of a trained LoRA, whose args.json names its model)')


def check_model_paths(args) -> None:
    """``--model`` and ``--teacher_model`` values that name local folders exist, and an existing path (ms-swift takes
    any for a local model) is a folder with a ``config.json``: see :func:`not_a_model_folder`."""
    for flag, value, adapter_flag in (('--model', args.model, '--adapters'),
                                      ('--teacher_model', args.teacher_model, '--teacher_adapters')):
        if not isinstance(value, str):
            continue
        path = os.path.expanduser(value)
        if os.path.exists(path):
            problem = not_a_model_folder(path, adapter_flag)
            if problem:
                raise FlagError(f'{flag} {value}: {problem}')
            continue
        if not looks_local(value):
            continue
        where = '' if os.path.isabs(path) else f' (relative to {os.getcwd()})'
        raise FlagError(f'{flag} {value}: no such model folder {path!r}{where}{near_names(path)}; a local model '
                        'must exist (hub models are named owner/name)')


def check_adapter_paths(args) -> None:
    """Each ``--adapters`` value that names a local path is a folder (ms-swift's ``_init_adapters`` failed on a file
    with 48 lines of traceback)."""
    adapters = args.adapters or []
    for value in [adapters] if isinstance(adapters, str) else adapters:
        problem = adapter_path_problem('--adapters', value) if isinstance(value, str) else None
        if problem:
            raise FlagError(problem)


def check_dataset_paths(args) -> None:
    """``--dataset`` / ``--val_dataset`` entries that name local files exist (see
    :func:`~swift_gkd_plugin.options.local_paths.dataset_path_problem`): ms-swift took a missing one for a hub id, loaded both
    models, then failed to reach the hub (offline: hundreds of lines)."""
    for flag, entries in (('--dataset', args.dataset), ('--val_dataset', args.val_dataset)):
        for entry in [entries] if isinstance(entries, str) else entries or []:
            problem = dataset_path_problem(flag, entry)
            if problem:
                raise FlagError(problem)


def check_external_plugins(args) -> None:
    """Each ``--external_plugins`` file (and ms-swift 3's ``--custom_register_path``) exists."""
    for flag in ('external_plugins', 'custom_register_path'):
        files = getattr(args, flag, None) or []
        for value in [files] if isinstance(files, str) else files:
            path = os.path.abspath(os.path.expanduser(value))
            if not os.path.isfile(path):
                what = 'is a folder, not a Python file' if os.path.isdir(path) else 'no such file'
                raise FlagError(f'--{flag} {value}: {what} {path!r}{near_names(path)}; pass the .py file that '
                                'registers your plugins')


def check_resume_folder(args) -> None:
    """``--resume_from_checkpoint`` is a folder (ms-swift refuses a missing one with a traceback) and not a run's
    folder (the one holding its ``checkpoint-N``: the newest complete one is named); what a checkpoint holds is
    checked once the arguments are resolved
    (:func:`swift_gkd_plugin.swift.setup.checkpoints.check_resume_checkpoint`)."""
    path = args.resume_from_checkpoint
    if not path:
        return
    from swift_gkd_plugin.swift.setup.checkpoints import TRAINER_STATE, newest_hint, newest_in_run
    folder = os.path.expanduser(path)
    if os.path.isdir(folder):
        newest = None if os.path.exists(os.path.join(folder, TRAINER_STATE)) else newest_in_run(folder)
        if newest:
            raise FlagError(f'--resume_from_checkpoint {path} is a run\'s folder, not one of its checkpoints: resume '
                            f'from its newest complete checkpoint, --resume_from_checkpoint {newest}')
        return
    if os.path.islink(folder) and not os.path.exists(folder):  # its own name is the near name of a dangling link
        raise FlagError(f'--resume_from_checkpoint {path}: {folder!r} is a symbolic link to '
                        f'{os.readlink(folder)!r}, which does not exist; allowed: a checkpoint folder (checkpoint-N, '
                        f'with {TRAINER_STATE}): point the link at one, or pass the checkpoint itself. '
                        f'{newest_hint(os.path.dirname(os.path.abspath(folder)))}.')
    what = 'is a file, not a checkpoint folder' if os.path.exists(path) else 'no such checkpoint folder'
    raise FlagError(f'--resume_from_checkpoint {path}: {what}{near_names(path)}; '
                    f'{newest_hint(os.path.dirname(os.path.abspath(path)))}.')


def output_dir_used(value: Optional[str]):
    """``(how to name it, the folder)`` of ``--output_dir`` as ms-swift resolves it (``sft_args.py``): not given,
    ``output/<model>`` (here its first folder, ``output``); given, the absolute path of the value, so ``''`` is the
    current folder."""
    if value is None:
        return '--output_dir (not given: ms-swift\'s output/<model>)', os.path.abspath('output')
    folder = os.path.abspath(os.path.expanduser(value))
    name = f'--output_dir {value}' if value else f"--output_dir '' (ms-swift's: the current folder, {folder!r})"
    return name, folder


def check_output_dir_outside_datasets(args) -> None:
    """``--output_dir`` is not a ``--dataset`` / ``--val_dataset`` folder nor inside one: ms-swift loads a folder with
    every data file in it, and the run writes ``args.json``, ``logging.jsonl`` and its checkpoints' JSON files there,
    so the next run on that folder trained on the first one's logs."""
    flag, output = output_dir_used(args.output_dir)
    output = os.path.realpath(output)
    for data_flag, entries in (('--dataset', args.dataset), ('--val_dataset', args.val_dataset)):
        for entry in [entries] if isinstance(entries, str) else entries or []:
            path = dataset_path(entry)
            if not os.path.isdir(path):
                continue
            folder = os.path.realpath(path)
            if output == folder or output.startswith(folder.rstrip(os.sep) + os.sep):
                raise FlagError(f'{flag}: the run\'s folder {output!r} is inside the {data_flag} folder {path!r}, '
                                'which ms-swift reads whole: the run writes args.json, logging.jsonl and checkpoints '
                                'there, and the next run on that folder would train on them as rows; allowed: an '
                                f'--output_dir outside {folder!r}')


def check_output_dir(args) -> None:
    """``--output_dir`` (ms-swift's default ``output/<model>`` when not given) is a folder, or can be made (no dangling
    symbolic link on the way), in which
    this process can create files: ms-swift's ``os.makedirs`` raised a traceback for a file there, or below one, or on
    a read-only file system. Write access is tried (a probe file made and removed in the nearest existing folder):
    ``os.access`` says yes to root where creating fails (sysfs, root-squashed network mounts)."""
    flag, existing = output_dir_used(args.output_dir)
    while not os.path.exists(existing):
        if os.path.islink(existing):  # ms-swift's os.makedirs fails on it with a traceback
            raise FlagError(f'{flag}: {existing!r} is a symbolic link to {os.readlink(existing)!r}, which does not '
                            'exist: create the folder it points to, or pass another --output_dir')
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise FlagError(f'{flag}: {existing!r} is a file, not a folder; the run\'s checkpoints and logs go in '
                        '--output_dir: pass a folder (or a path to create)')
    cause = write_probe_error(existing)
    if cause:
        raise FlagError(f'{flag}: cannot create anything in {existing!r} ({cause}); the run\'s '
                        'checkpoints and logs go in --output_dir: pass a writable --output_dir')


def check_early_paths(args) -> None:
    """The checks of the paths as given, needing no default of ms-swift's (also run in ``swift``'s launcher)."""
    check_model_paths(args)
    check_adapter_paths(args)
    check_dataset_paths(args)
    check_external_plugins(args)
    check_resume_folder(args)
    check_output_dir(args)
    check_output_dir_outside_datasets(args)


def check_command_line_paths(args) -> None:
    """Every check of this module, in this order."""
    check_model_given(args)
    check_early_paths(args)


class CreatedDirs:
    """The folders that one step creates at and above ``output_dir`` (its ``v<N>-<time>`` child included)."""

    def __init__(self, output_dir: Optional[str]):
        self.base = os.path.abspath(output_dir) if output_dir else None
        self.missing: List[str] = []  # the base and its ancestors that do not exist yet, deepest first
        path = self.base
        while path and not os.path.exists(path):
            self.missing.append(path)
            path = os.path.dirname(path)
        self.listing = set(os.listdir(self.base)) if self.base and os.path.isdir(self.base) else set()
        self.created: List[str] = []

    def after(self, output_dir: Optional[str]) -> 'CreatedDirs':
        """Record what exists now that did not before, ``output_dir`` being where the step put the run."""
        if self.base is None or not output_dir:
            return self
        output_dir = os.path.abspath(output_dir)
        new_child = (os.path.dirname(output_dir) == self.base and os.path.basename(output_dir) not in self.listing)
        self.created = [output_dir] if new_child else []
        self.created += [path for path in self.missing if os.path.isdir(path)]
        return self

    def remove_empty(self) -> None:
        """Remove the recorded folders, deepest first, while each is empty (a folder with any file stays)."""
        for path in self.created:
            try:
                os.rmdir(path)  # only an empty folder
            except OSError:
                return
