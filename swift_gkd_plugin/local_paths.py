"""Whether a command-line value names a local file or folder, and the near names of one that does not exist (a typo).

Shared by the pre-load checks of ``swift rlhf`` and of ``swift-gkd serve-teacher``: the standard library only."""
from __future__ import annotations

import difflib
import os

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
