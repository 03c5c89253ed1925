"""ms-swift's "cannot tell the model / template type" error of a local model folder, as one line naming the flag to
pass. Shared by ``swift rlhf`` (its arguments' ``ValueError``) and ``swift-gkd serve-teacher`` (the same ms-swift
function, called before the load). The standard library only."""
from __future__ import annotations

import re
import difflib
from typing import Callable, Iterable, Optional, Tuple

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


def unknown_template_message(flag: str, name: str, known: Iterable[str]) -> str:
    """One line for a ``flag`` (``--template``, ``--teacher_template``) naming ``name``, which is not one of ms-swift's
    registered template types ``known``: its close matches (the whole list where none is close)."""
    known = list(known)
    close = difflib.get_close_matches(name, known, n=5)
    allowed = f'close matches: {close}' if close else f'allowed: {sorted(known)}'
    return (f'{flag} {name!r} is not a registered ms-swift template type ({allowed}; the --template choices of '
            '`swift rlhf --help`)')
