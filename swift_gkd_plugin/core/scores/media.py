"""What a multimodal row's store key adds to its token ids: its media's content, and the processor that read them.

A row's token ids hold an image only as placeholder tokens: two rows with the same text and other images have the same
ids. :func:`media_digest` hashes what the row's images, videos and audios ARE (a file's bytes, not its path; a decoded
image's pixels, mode and size), so such rows get other keys and a changed file finds no stale scores;
:func:`processor_fingerprint` names the settings that turn them into the model's inputs (a store scored with another
resize or patch size is refused, not matched).
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
from typing import Dict, Iterable, Optional, Tuple

__all__ = ['media_digest', 'processor_fingerprint', 'PROCESSOR_FILES']

#: the files of a model folder whose settings turn media into inputs (transformers' names)
PROCESSOR_FILES = ('preprocessor_config.json', 'processor_config.json', 'video_preprocessor_config.json')

_FILE_DIGESTS: Dict[Tuple[str, int, int], bytes] = {}  # (path, size, mtime_ns) -> digest: a step rereads no file


def _file_digest(path: str) -> bytes:
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if key not in _FILE_DIGESTS:
        h = hashlib.blake2b(digest_size=16)
        with open(path, 'rb') as f:
            for block in iter(lambda: f.read(1 << 22), b''):
                h.update(block)
        if len(_FILE_DIGESTS) > 65536:
            _FILE_DIGESTS.clear()
        _FILE_DIGESTS[key] = h.digest()
    return _FILE_DIGESTS[key]


def _item_bytes(item) -> bytes:
    """One medium as bytes that differ where its content does (prefixed by its kind)."""
    if isinstance(item, dict):  # datasets' / ms-swift's {'bytes': ..., 'path': ...}
        if item.get('bytes') is not None:
            return _item_bytes(item['bytes'])
        if item.get('path') is not None:
            return _item_bytes(item['path'])
    if isinstance(item, (bytes, bytearray, memoryview)):
        return b'b' + hashlib.blake2b(bytes(item), digest_size=16).digest()
    if isinstance(item, str):
        if os.path.isfile(item):
            return b'f' + _file_digest(item)
        if item.startswith('data:') and ',' in item:  # an inline base64 medium: its decoded bytes
            try:
                return _item_bytes(base64.b64decode(item.split(',', 1)[1], validate=True))
            except ValueError:
                pass
        return b's' + item.encode()  # a URL or a name the processor resolves: the string is all a row holds
    if hasattr(item, 'tobytes') and hasattr(item, 'mode') and hasattr(item, 'size'):  # a decoded PIL image
        head = f'{item.mode}:{item.size}'.encode()
        return b'i' + head + hashlib.blake2b(item.tobytes(), digest_size=16).digest()
    if hasattr(item, 'tobytes') and hasattr(item, 'shape') and hasattr(item, 'dtype'):  # an array (audio, frames)
        head = f'{item.dtype}:{tuple(item.shape)}'.encode()
        return b'a' + head + hashlib.blake2b(item.tobytes(), digest_size=16).digest()
    if hasattr(item, 'numpy') and hasattr(item, 'shape'):  # a tensor
        return _item_bytes(item.detach().cpu().contiguous().numpy())
    if isinstance(item, (list, tuple)):  # a video given as frames, an audio as (array, rate)
        return b'l' + b''.join(_item_bytes(x) for x in item)
    if isinstance(item, (int, float)):
        return b'n' + repr(item).encode()
    raise TypeError(f'a medium of type {type(item).__name__} cannot be keyed (a path, bytes, a base64 data URL, a '
                    'PIL image or an array can)')


def media_digest(images: Optional[Iterable] = None, videos: Optional[Iterable] = None,
                 audios: Optional[Iterable] = None) -> str:
    """BLAKE2b-128 of a row's media in order, each kind with its count; '' for a row without media (a text row's key
    is then its ids' alone). Raises TypeError for a medium it cannot read as content."""
    parts = [list(x or []) for x in (images, videos, audios)]
    if not any(parts):
        return ''
    h = hashlib.blake2b(digest_size=16)
    for kind, items in zip((b'images', b'videos', b'audios'), parts):
        h.update(kind + str(len(items)).encode())
        for item in items:
            data = _item_bytes(item)
            h.update(str(len(data)).encode() + b':' + data)
    return h.hexdigest()


def processor_fingerprint(model_dir: Optional[str]) -> str:
    """SHA-256 (32 hex digits) of a model folder's processor settings (:data:`PROCESSOR_FILES`, their JSON with
    sorted keys); '' where the folder has none (a text model, a hub id)."""
    if not model_dir or not os.path.isdir(model_dir):
        return ''
    docs = {}
    for name in PROCESSOR_FILES:
        path = os.path.join(model_dir, name)
        if os.path.isfile(path):
            with open(path) as f:
                docs[name] = json.load(f)
    if not docs:
        return ''
    return hashlib.sha256(json.dumps(docs, sort_keys=True, separators=(',', ':')).encode()).hexdigest()[:32]
