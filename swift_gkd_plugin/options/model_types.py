"""ms-swift's model and template types as the flags name them: its "cannot tell the model / template type" error of a
local model folder, as one line naming the flag to pass (shared by ``swift rlhf``, its arguments' ``ValueError``, and
``swift-gkd serve-teacher``, the same ms-swift function called before the load); a type it does not register, named
with its close matches; a model type that contradicts the folder's ``config.json`` (a warning). Shared by ``swift
rlhf`` and ``megatron rlhf``'s launcher. ms-swift's tables are imported inside the functions that read them (or passed
in)."""
from __future__ import annotations

import difflib
import json
import os
import re
from typing import Callable, Iterable, List, Mapping, Optional, Tuple

#: ms-swift's message (``swift/model/model_meta.py``, ``swift/template/register.py``)
_UNDETECTED = re.compile(r'Failed to automatically match `(model_type|template_type)` for `(.*?)`\. '
                         r'(?:Multiple possible types found: (\[.*?\])\. )?')


def undetected_type_message(error: str, flags_of: Callable[[str], Tuple[str, str]]) -> Optional[str]:
    """One line for ms-swift's error ``error`` when a model folder's ``config.json`` fits several model types or
    templates (a folder whose name does not say which, e.g. ``./student``): the flag to pass and its candidates; None
    for another error. ``flags_of(folder)`` gives the folder's flag and its model-type flag (``('--model',
    '--model_type')``)."""
    match = _UNDETECTED.search(error)
    if match is None:
        return None
    what, folder, candidates = match.groups()
    model_flag, type_flag = flags_of(folder)
    flag = type_flag if what == 'model_type' else '--template'
    found = f' (it fits {candidates})' if candidates else ''
    return (f'{model_flag} {folder}: ms-swift cannot tell its {what.split("_")[0]} type from the folder{found}: pass '
            f'{flag}')


def _unregistered_message(flag: str, name: str, what: str, choices_flag: str, known: Iterable[str],
                          prog: str = 'swift rlhf') -> str:
    """One line for a ``flag`` naming ``name``, which is not one of ms-swift's registered ``what`` types ``known``: its
    close matches (the whole list where none is close)."""
    known = list(known)
    close = difflib.get_close_matches(name, known, n=5)
    allowed = f'close matches: {close}' if close else f'allowed: {sorted(known)}'
    return (f'{flag} {name!r} is not a registered ms-swift {what} type ({allowed}; the {choices_flag} choices of '
            f'`{prog} --help`)')


def unknown_template_message(flag: str, name: str, known: Iterable[str]) -> str:
    """One line for a ``flag`` (``--template``, ``--teacher_template``) naming ``name``, which is not one of ms-swift's
    registered template types ``known``: its close matches (the whole list where none is close)."""
    return _unregistered_message(flag, name, 'template', '--template', known)


#: ms-swift's error for a model type it does not register (``swift/model/model_meta.py``, ``_get_model_info``)
UNREGISTERED_MODEL_TYPE = re.compile(r"model_type: '.*?' not in \[")
#: the flags that name an ms-swift model type, each with the flag of the model it types
MODEL_TYPE_FLAGS = (('model_type', 'model'), ('teacher_model_type', 'teacher_model'))


def types_may_be_registered_later(args) -> bool:
    """Whether ``--custom_register_path`` or ``--external_plugins`` are given: ms-swift imports them in its arguments'
    ``__post_init__``, and they may register model types that its table lacks until then."""
    return bool(getattr(args, 'custom_register_path', None) or getattr(args, 'external_plugins', None))


def unknown_model_type_message(args, mapping: Mapping[str, object], prog: str = 'swift rlhf') -> Optional[str]:
    """One line for the first of ``--model_type`` / ``--teacher_model_type`` that names no model type of ``mapping``
    (ms-swift's ``MODEL_MAPPING``), with its close matches; None where both are unset or registered. ms-swift raised
    ``model_type: 'qwen_3' not in [...]`` with every registered type (a 56-line traceback), the teacher's after the
    student had loaded."""
    for flag, _ in MODEL_TYPE_FLAGS:
        name = getattr(args, flag, None)
        if name is not None and name not in mapping:
            return _unregistered_message(f'--{flag}', name, 'model', '--model_type', mapping, prog)
    return None


def config_of(model_dir: str) -> Optional[dict]:
    """A model folder's ``config.json``, or None where it cannot be read as a JSON object."""
    try:
        with open(os.path.join(model_dir, 'config.json'), encoding='utf-8') as f:
            config = json.load(f)
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def model_type_mismatch(type_flag: str, name: str, model_flag: str, model: str, model_dir: str,
                        mapping: Mapping[str, object]) -> Optional[str]:
    """A warning where the registered model type ``name`` given to ``type_flag`` contradicts the ``config.json`` of
    ``model_dir`` (``model_flag`` ``model``'s folder): ms-swift matches a folder to its model types by the config's
    first architecture (each ``ModelMeta``'s ``architectures``; its own ``model_type`` names differ from the
    config's), and ``name``'s type is for other architectures while ms-swift registers types for this one. The weights
    load by the config all the same, with ``name``'s template, loader and layer names: the run trained without a
    word. None where they agree, or where nothing can be told (no config or architecture, a type registered without
    architectures, an architecture no ms-swift type is for: what ``--model_type`` is for)."""
    meta = mapping.get(name)
    config = config_of(model_dir)
    if meta is None or not getattr(meta, 'architectures', None) or config is None:
        return None
    architectures = config.get('architectures')
    if not isinstance(architectures, list) or not architectures:
        return None
    arch = architectures[0]
    if arch in meta.architectures:
        return None
    fitting = [t for t, m in mapping.items() if arch in (getattr(m, 'architectures', None) or ())]
    if not fitting:
        return None
    config_type = config.get('model_type')
    suggested = config_type if config_type in fitting else fitting[0]
    return (f'{type_flag} {name} contradicts {model_flag} {model}: its config.json has model_type {config_type!r} '
            f'(architecture {arch}, which ms-swift loads as {", ".join(fitting)}), and ms-swift\'s {name} is for '
            f'{", ".join(meta.architectures)}. The weights load by the config, but with {name}\'s settings (its '
            f'default template, loader and layer names): pass {type_flag} {suggested}')



def check_model_types(args, prog: str = 'swift rlhf') -> None:
    """Refuse (:class:`~swift_gkd_plugin.options.flag_checks.FlagError`) a ``--model_type`` / ``--teacher_model_type``
    that ms-swift does not register (:func:`unknown_model_type_message`, ms-swift's table imported here)."""
    from swift.model.model_meta import MODEL_MAPPING

    from swift_gkd_plugin.options.flag_checks import FlagError
    message = unknown_model_type_message(args, MODEL_MAPPING, prog)
    if message:
        raise FlagError(message)


def check_given_model_types(args, prog: str = 'swift rlhf') -> None:
    """:func:`check_model_types` on the command line's flags, unless ``--custom_register_path`` / ``--external_plugins``
    may register the types later (:func:`types_may_be_registered_later`: ms-swift's own refusal has the last word
    then)."""
    if not types_may_be_registered_later(args):
        check_model_types(args, prog)


def model_type_warnings(args, resolved: bool) -> List[str]:
    """:func:`model_type_mismatch` of ``--model_type`` / ``--teacher_model_type`` where set. ``resolved``: the folders
    ms-swift resolved (``swift rlhf`` once its arguments are built: ``args.model_dir``, the teacher's folder, hub
    models' too); else the local folders given (``megatron rlhf``'s launcher)."""
    from swift.model.model_meta import MODEL_MAPPING

    from swift_gkd_plugin.options.hub_models import model_dir_of
    warnings = []
    for type_flag, model_flag in MODEL_TYPE_FLAGS:
        name, model = getattr(args, type_flag, None), getattr(args, model_flag, None)
        if not name or not isinstance(model, str):
            continue
        if not resolved:
            folder = os.path.expanduser(model) if os.path.isdir(os.path.expanduser(model)) else None
        elif model_flag == 'model':
            folder = args.model_dir
        else:
            folder = model_dir_of(f'--{model_flag}', model, args.teacher_model_revision, args)
        warning = folder and model_type_mismatch(f'--{type_flag}', name, f'--{model_flag}', model, folder,
                                                 MODEL_MAPPING)
        if warning:
            warnings.append(warning)
    return warnings
