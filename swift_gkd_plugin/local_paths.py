"""Whether a command-line value names a local file or folder, and the near names of one that does not exist (a typo).

Shared by the pre-load checks of ``swift rlhf`` and of ``swift-gkd serve-teacher``: the standard library only."""
from __future__ import annotations

import difflib
import os
from typing import Optional

LOCAL_SUFFIXES = ('.jsonl', '.json', '.csv', '.txt', '.parquet', '.arrow', '.tsv')


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
    transformers and ms-swift read the model's type: without it they fail with a traceback that never names the file),
    as words to follow ``'<flag> <value>: '``; None for a model folder or a path that does not exist. A LoRA adapter's
    folder is told to go to ``adapter_flag``."""
    if os.path.isfile(path):
        folder = os.path.dirname(os.path.abspath(path))
        hint = f': pass its folder {folder!r}' if os.path.isfile(os.path.join(folder, 'config.json')) else ''
        return f'{path!r} is a file, not a model folder{hint}'
    if not os.path.isdir(path) or os.path.isfile(os.path.join(path, 'config.json')):
        return None
    names = sorted(os.listdir(path))
    held = ', '.join(names[:6]) + (', ...' if len(names) > 6 else '') if names else 'nothing'
    adapter = (f' (adapter_config.json: a LoRA adapter, to pass as {adapter_flag} beside its base model)'
               if 'adapter_config.json' in names else '')
    return (f'the folder {path!r} has no config.json (it holds {held}){adapter}; a model folder holds the config.json '
            'that transformers saves beside the weights and tokenizer')
