"""A teacher-score store: the teacher's top-k per scored token, written once, read by later epochs, runs and students.

In: per row, the teacher view's token ids and scored positions (the key, :func:`row_key`) and a :class:`RowScores`.
Out: ``DIR/manifest.json`` (what scored: teacher, its weights' and adapters' fingerprints, tokenizer, template, k,
samples, dtype, temperature) and ``DIR/shards/*.safetensors`` (rows, never pickle), read back by :class:`TeacherStore`.

Why a row is keyed by its token ids and positions, not by its index in a seeded order: the same row encoded the same
way finds its scores whatever the order, the ranks, the epoch or the student; a row encoded otherwise (another
``--max_length``, template or system prompt) finds none instead of someone else's. Each row's payload is compressed on
its own (zlib over byte planes: ids sorted per position and delta-coded, log-probabilities in the store's dtype), so a
lookup reads only its row's bytes (safetensors slices are memory-mapped) and a CRC32 checks them. The format and a
20-line numpy reader: ``docs_en/teacher_store.md``.
"""
from __future__ import annotations

import hashlib
import json
import os
import queue
import threading
import time
import uuid
import zlib
from array import array
from dataclasses import asdict, dataclass, fields
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

__all__ = ['FORMAT', 'VERSION', 'DTYPES', 'StoreIdentity', 'RowScores', 'StoreError', 'row_key', 'encode_row',
           'decode_row', 'StoreWriter', 'TeacherStore', 'weights_fingerprint', 'tokenizer_fingerprint', 'read_manifest',
           'write_json_atomic', 'identity_differences', 'same_weights',
           'sampled_weights_fingerprint', 'file_digest', 'file_sha256', 'FULL_HASH', 'adapters_fingerprint',
           'same_adapters']

FORMAT = 'swift-gkd-teacher-scores'
VERSION = 1
MANIFEST = 'manifest.json'
SHARDS = 'shards'
DTYPES = {'bfloat16': torch.bfloat16, 'float16': torch.float16, 'float32': torch.float32}
_INT_VIEW = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}
#: a shard is closed once its compressed rows pass this size (a finished shard survives a killed writer); the
#: environment variable SWIFT_GKD_STORE_SHARD_BYTES sets another (a smaller one loses fewer rows to a kill)
SHARD_BYTES = 64 * 2**20
#: rows a background writer holds before its caller waits (memory stays flat: a 4k-token top-64 row is ~3 MB)
QUEUE_ROWS = 32


class StoreError(ValueError):
    """A store that cannot be read as asked: another format, a damaged shard, a row from another tokenization."""


@dataclass(frozen=True)
class StoreIdentity:
    """What scored a store, kept in its manifest; a reader compares it with its own run before loading anything."""
    teacher: str  # the --teacher_model path or id, or the --teacher_model_server URL
    teacher_hash: str  # weights_fingerprint of the teacher's folder: a local one's, or a served one's reported ('': none)
    tokenizer: str  # tokenizer_fingerprint of the tokenizer that made the rows' ids
    template: str  # the chat template's name
    topk: int  # top-k entries a scored token (0: none)
    samples: int  # tokens drawn from the teacher a scored token (0: none)
    dtype: str  # of the stored log-probabilities: a key of DTYPES
    temperature: float  # the samples' temperature (top-k log-probabilities are at temperature 1 whatever it is)
    vocab_size: int  # the teacher's output rows
    processor: str = ''  # a multimodal processor's settings, '' for text
    # adapters_fingerprint of the teacher's adapters ('': none); None: not known (a store written before issue 96,
    # whose teacher_hash is its base's with or without an adapter, or a served teacher that reported none)
    teacher_adapters_hash: Optional[str] = None


@dataclass
class RowScores:
    """One row's teacher answer at its ``n`` scored positions (the row's own order)."""
    ids: torch.Tensor  # [n, k] int64
    logprobs: torch.Tensor  # [n, k] float32, at temperature 1; -inf: an unused slot
    tail: Optional[torch.Tensor] = None  # [n] log of the mass outside the top-k
    token_logprobs: Optional[torch.Tensor] = None  # [n] the next token's log-prob (nan: unknown)
    samples: Optional[torch.Tensor] = None  # [n, S] int64 ids drawn from the tempered teacher, sorted
    entropy: Optional[torch.Tensor] = None  # [n] the tempered teacher's entropy (with samples: KL = CE - entropy)

    @property
    def num_tokens(self) -> int:
        return int(self.ids.shape[0] if self.ids is not None else self.samples.shape[0])


def row_key(input_ids: Sequence[int], positions: Sequence[int], media: str = '') -> str:
    """The key of a row: BLAKE2b-128 of its token ids and scored positions (int64, each list with its length), and of
    ``media`` where the row has any (:func:`~swift_gkd_plugin.core.scores.media.media_digest`: the ids hold an image
    only as placeholders)."""
    h = hashlib.blake2b(digest_size=16)
    for values in (input_ids, positions):
        h.update(array('q', [len(values)]).tobytes())
        h.update(array('q', values).tobytes())
    if media:  # (a text row's key is unchanged: the stores written before media were keyed)
        h.update(b'media:' + media.encode())
    return h.hexdigest()


def _planes(x: torch.Tensor) -> bytes:
    """``x``'s bytes, byte 0 of every element first, then byte 1, ...: the high bytes of small numbers are runs."""
    b = x.contiguous().view(torch.uint8).reshape(-1, x.element_size())
    return b.t().contiguous().numpy().tobytes()


def _from_planes(data: memoryview, count: int, dtype: torch.dtype) -> torch.Tensor:
    if count == 0:  # (frombuffer refuses an empty buffer)
        return torch.empty(0, dtype=dtype)
    size = torch.empty((), dtype=dtype).element_size()
    b = torch.frombuffer(bytearray(data[:count * size]), dtype=torch.uint8).reshape(size, count)
    return b.t().reshape(-1).clone().view(dtype)


def _sorted_deltas(ids: torch.Tensor) -> torch.Tensor:
    """Ids sorted along the last dimension, each after the first its distance to the one before (int32)."""
    ids = ids.to(torch.int64).sort(-1).values
    return torch.cat([ids[..., :1], ids[..., 1:] - ids[..., :-1]], -1).to(torch.int32)


def encode_row(scores: RowScores, k: int, samples: int, dtype: torch.dtype) -> bytes:
    """One row's payload: its top-k (ids ascending within a position, delta-coded; log-probabilities in ``dtype``
    in the same order), tail, next-token log-probs, and with samples their ids (delta-coded) and the teacher's
    entropy, as byte planes, zlib-compressed."""
    n = scores.num_tokens
    parts = []
    if k:
        order = scores.ids.to(torch.int64).argsort(-1)
        parts.append(_planes(_sorted_deltas(scores.ids)))
        parts.append(_planes(scores.logprobs.float().gather(-1, order).to(dtype).view(_INT_VIEW[dtype])))
    nan = torch.full((n, ), float('nan'))
    for values in (scores.tail, scores.token_logprobs):
        parts.append(_planes((values.float() if values is not None else nan).to(dtype).view(_INT_VIEW[dtype])))
    if samples:
        parts.append(_planes(_sorted_deltas(scores.samples)))
        entropy = scores.entropy.float() if scores.entropy is not None else nan
        parts.append(_planes(entropy.to(dtype).view(_INT_VIEW[dtype])))
    return zlib.compress(b''.join(parts), 6)


def decode_row(payload: bytes, n: int, k: int, samples: int, dtype: torch.dtype) -> RowScores:
    """:func:`encode_row`'s inverse (ids ascending within a position)."""
    data = memoryview(zlib.decompress(payload))
    size = torch.empty((), dtype=dtype).element_size()
    at, out = 0, {}
    if k:
        out['ids'] = _from_planes(data[at:], n * k, torch.int32).reshape(n, k).to(torch.int64).cumsum(-1)
        at += n * k * 4
        out['logprobs'] = _from_planes(data[at:], n * k, _INT_VIEW[dtype]).view(dtype).reshape(n, k).float()
        at += n * k * size
    for name in ('tail', 'token_logprobs'):
        out[name] = _from_planes(data[at:], n, _INT_VIEW[dtype]).view(dtype).float()
        at += n * size
    if samples:
        out['samples'] = _from_planes(data[at:], n * samples, torch.int32).reshape(n, samples).to(
            torch.int64).cumsum(-1)
        at += n * samples * 4
        out['entropy'] = _from_planes(data[at:], n, _INT_VIEW[dtype]).view(dtype).float()
        at += n * size
    if at != len(data):
        raise StoreError(f'a row decoded to {len(data)} bytes where its layout holds {at}')
    return RowScores(out.get('ids'), out.get('logprobs'), out['tail'], out['token_logprobs'], out.get('samples'),
                     out.get('entropy'))


def save_safetensors_atomic(tensors: Dict[str, torch.Tensor], path: str, metadata: Optional[Dict[str, str]] = None
                            ) -> None:
    """``tensors`` as the safetensors file ``path``: written to a temporary file, synced, renamed (a kill leaves the
    old file or none, never half of one)."""
    from safetensors.torch import save_file
    tmp = path + '.tmp'
    save_file(tensors, tmp, metadata=metadata)
    os.chmod(tmp, 0o666 & ~_umask())  # (safetensors writes 0600: the mode open() gives, as the manifest's)
    with open(tmp, 'rb+') as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _umask() -> int:
    """This process's umask (read by setting it back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_json_atomic(path: str, doc: dict) -> None:
    tmp = f'{path}.{uuid.uuid4().hex}.tmp'
    with open(tmp, 'w') as f:
        json.dump(doc, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_manifest(root: str) -> dict:
    path = os.path.join(root, MANIFEST)
    try:
        with open(path) as f:
            doc = json.load(f)
    except FileNotFoundError:
        raise StoreError(f'{root} is not a teacher-score store: it has no {MANIFEST} (write one with '
                         '`swift-gkd score` or --save_teacher_scores)') from None
    except (OSError, ValueError) as e:
        raise StoreError(f'{path} cannot be read as JSON: {e}') from None
    if not isinstance(doc, dict) or doc.get('format') != FORMAT:
        raise StoreError(f'{path} is not a teacher-score manifest (format {doc.get("format")!r}, expected {FORMAT!r})')
    if doc.get('version') != VERSION:
        raise StoreError(f'{path} has format version {doc.get("version")!r}; this plugin reads version {VERSION}')
    return doc


def identity_of(doc: dict) -> StoreIdentity:
    names = {f.name for f in fields(StoreIdentity)}
    try:
        return StoreIdentity(**{k: v for k, v in doc['identity'].items() if k in names})
    except (KeyError, TypeError) as e:
        raise StoreError(f'the manifest\'s identity cannot be read: {e}') from None


def identity_differences(stored: StoreIdentity, wanted: StoreIdentity,
                         fields_: Iterable[str] = ('tokenizer', 'template', 'teacher_hash', 'dtype', 'samples',
                                                   'temperature', 'processor')) -> List[Tuple[str, object, object]]:
    """``(field, stored, wanted)`` for each of ``fields_`` where the two differ."""
    return [(name, getattr(stored, name), getattr(wanted, name)) for name in fields_
            if getattr(stored, name) != getattr(wanted, name)]


class StoreWriter:
    """Appends rows to a store: this writer's shards (``r{rank}-{session}-{n}.safetensors``), each written whole
    under a temporary name and renamed when done, so a killed writer leaves only finished shards. The manifest is
    made by the first writer; a writer whose identity differs from an existing manifest's is refused.

    ``background=True``: :meth:`add` hands the row to one worker thread that encodes it and writes full shards, so
    the caller's next forward overlaps them; at most ``queue_rows`` rows wait (``add`` blocks beyond:
    memory stays flat). Rows are encoded in the order added, so the shards hold what the synchronous writer's would.
    :meth:`get`, ``in`` and :meth:`flush` see every row added; a worker's failure is raised by the next call."""

    def __init__(self, root: str, identity: StoreIdentity, rank: int = 0, shard_bytes: Optional[int] = None,
                 background: bool = False, queue_rows: int = QUEUE_ROWS):
        if shard_bytes is None:
            shard_bytes = int(os.environ.get('SWIFT_GKD_STORE_SHARD_BYTES') or SHARD_BYTES)
        self.root, self.identity, self.rank, self.shard_bytes = root, identity, rank, shard_bytes
        self.dtype = DTYPES[identity.dtype]
        os.makedirs(os.path.join(root, SHARDS), exist_ok=True)
        path = os.path.join(root, MANIFEST)
        if os.path.exists(path):
            stored = identity_of(read_manifest(root))
            diff = identity_differences(stored, identity, ('teacher', 'teacher_hash', 'teacher_adapters_hash',
                                                             'tokenizer', 'template', 'topk', 'samples', 'dtype',
                                                             'temperature', 'vocab_size', 'processor'))
            if diff:
                name, old, new = diff[0]
                raise StoreError(f'{root} holds scores of another {name} ({old!r}; this run: {new!r}): write to '
                                 'another folder')
        else:
            write_json_atomic(path, {'format': FORMAT, 'version': VERSION, 'identity': asdict(identity),
                                      'created': time.strftime('%Y-%m-%dT%H:%M:%S')})
        self.session = f'{time.strftime("%Y%m%d%H%M%S")}-{uuid.uuid4().hex[:6]}'
        self._count = 0
        self._reset()
        self.rows_written = self.tokens_written = self.bytes_written = 0
        self.reader = TeacherStore(root)  # what the folder holds, this writer's finished shards added as they come
        self._lock = threading.Lock()  # the buffer, the reader and the counters: the worker's and the caller's
        self._queue = queue.Queue(maxsize=queue_rows) if background else None
        self._queued: Dict[bytes, int] = {}  # rows added and not yet encoded (background), by key
        self._worker: Optional[threading.Thread] = None
        self._failure: Optional[BaseException] = None

    def _reset(self) -> None:
        self._keys, self._tokens, self._payloads, self._size = [], [], [], 0
        self._pending: Dict[bytes, int] = {}

    def get(self, key: str) -> Optional[RowScores]:
        """A row this folder holds or this writer buffered, else None: a later epoch reuses what an earlier one
        scored."""
        raw = bytes.fromhex(key)
        if raw in self._queued:
            self._drain()
        with self._lock:
            at = self._pending.get(raw)
            if at is not None:
                identity = self.identity
                return decode_row(self._payloads[at], self._tokens[at], identity.topk, identity.samples, self.dtype)
            return self.reader.get(key)

    def __contains__(self, key: str) -> bool:
        """Whether this folder holds the row or this writer was given it."""
        raw = bytes.fromhex(key)
        with self._lock:
            return raw in self._queued or raw in self._pending or key in self.reader

    def add(self, key: str, scores: RowScores) -> None:
        """Buffer one row (background: queue it); a full buffer becomes a shard."""
        self._raise_failure()
        if self._queue is None:
            self._append(key, scores)
            return
        if self._worker is None:
            self._worker = threading.Thread(target=self._work, name=f'store-writer-r{self.rank}', daemon=True)
            self._worker.start()
        raw = bytes.fromhex(key)
        with self._lock:
            self._queued[raw] = self._queued.get(raw, 0) + 1
        self._queue.put((key, scores))

    def _append(self, key: str, scores: RowScores) -> None:
        payload = encode_row(scores, self.identity.topk, self.identity.samples, self.dtype)
        raw = bytes.fromhex(key)
        with self._lock:
            self._pending[raw] = len(self._keys)
            self._keys.append(raw)
            self._tokens.append(scores.num_tokens)
            self._payloads.append(payload)
            self._size += len(payload)
            if self._size >= self.shard_bytes:
                self._write_shard()

    def _work(self) -> None:
        """The background worker: encode each queued row (after a failure: drop them, so a drain still ends)."""
        while True:
            key, scores = self._queue.get()
            try:
                if self._failure is None:
                    self._append(key, scores)
            except BaseException as exc:  # raised to the caller by its next add, get or flush
                self._failure = exc
            finally:
                raw = bytes.fromhex(key)
                with self._lock:
                    left = self._queued.pop(raw) - 1
                    if left:
                        self._queued[raw] = left
                self._queue.task_done()

    def _drain(self) -> None:
        """Wait until every row added is encoded (background)."""
        if self._queue is not None:
            self._queue.join()
        self._raise_failure()

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise StoreError(f'{self.root}: writing the store failed ({type(self._failure).__name__}: '
                             f'{self._failure}); the rows of its finished shards are kept') from self._failure

    def flush(self) -> Optional[str]:
        """Write the buffered rows as one shard (every row added first encoded); its path, or None when nothing
        was buffered."""
        self._drain()
        with self._lock:
            return self._write_shard()

    def _write_shard(self) -> Optional[str]:
        if not self._keys:
            return None
        lengths = torch.tensor([len(p) for p in self._payloads], dtype=torch.int64)
        blob = torch.frombuffer(bytearray(b''.join(self._payloads)), dtype=torch.uint8)
        tensors = {
            'keys': torch.frombuffer(bytearray(b''.join(self._keys)), dtype=torch.uint8).reshape(-1, 16),
            'tokens': torch.tensor(self._tokens, dtype=torch.int64),
            'offsets': torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]),
            'crc32': torch.tensor([zlib.crc32(p) for p in self._payloads], dtype=torch.int64),
            'payload': blob,
        }
        name = f'r{self.rank:04d}-{self.session}-{self._count:05d}.safetensors'
        path = os.path.join(self.root, SHARDS, name)
        save_safetensors_atomic(tensors, path, {'format': FORMAT, 'version': str(VERSION),
                                                'rows': str(len(self._keys))})
        self.reader.add_shard(path)
        self._count += 1
        self.rows_written += len(self._keys)
        self.tokens_written += sum(self._tokens)
        self.bytes_written += os.path.getsize(path)
        self._reset()
        return path


class TeacherStore:
    """A store opened for reading: every finished shard's keys indexed; a row's bytes read and checked on demand."""

    def __init__(self, root: str):
        self.root = root
        self.manifest = read_manifest(root)
        self.identity = identity_of(self.manifest)
        if self.identity.dtype not in DTYPES:
            raise StoreError(f'{root}: unknown dtype {self.identity.dtype!r} in its manifest')
        self.dtype = DTYPES[self.identity.dtype]
        self._index: Dict[bytes, Tuple[int, int]] = {}
        self._shards: List[dict] = []
        self.tokens = 0
        self.bytes = 0
        self._open_shards()

    def _open_shards(self) -> None:
        folder = os.path.join(self.root, SHARDS)
        names = sorted(n for n in os.listdir(folder) if n.endswith('.safetensors')) if os.path.isdir(folder) else []
        for name in names:
            self.add_shard(os.path.join(folder, name))

    def add_shard(self, path: str) -> None:
        """Index one finished shard (a later one's rows replace an earlier one's of the same key)."""
        from safetensors import safe_open
        try:
            handle = safe_open(path, framework='pt')
            if handle.metadata().get('format') != FORMAT:
                raise StoreError(f'format {handle.metadata().get("format")!r}')
            keys = handle.get_tensor('keys')
            shard = {'path': path, 'handle': handle, 'tokens': handle.get_tensor('tokens'),
                     'offsets': handle.get_tensor('offsets'), 'crc32': handle.get_tensor('crc32'),
                     'payload': handle.get_slice('payload')}
        except StoreError as e:
            raise StoreError(f'{path} is not a shard of this store ({e})') from None
        except Exception as e:  # safetensors' own errors: a truncated or foreign file
            raise StoreError(f'{path} cannot be read as a safetensors shard ({type(e).__name__}: {e}); a '
                             'killed writer leaves only *.tmp files: remove this one, or score its rows again')
        if keys.dim() != 2 or keys.shape[1] != 16 or shard['tokens'].shape[0] != keys.shape[0] or \
                shard['offsets'].shape[0] != keys.shape[0] + 1:
            raise StoreError(f'{path}: its tensors do not describe the same rows')
        s = len(self._shards)
        self._shards.append(shard)
        for r, key in enumerate(keys.numpy()):
            replaced = self._index.get(key.tobytes())
            if replaced is not None:  # (a row two ranks scored, a filled last batch: its tokens counted once)
                self.tokens -= int(self._shards[replaced[0]]['tokens'][replaced[1]])
            self._index[key.tobytes()] = (s, r)
        self.tokens += int(shard['tokens'].sum())
        self.bytes += os.path.getsize(path)

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, key: str) -> bool:
        return bytes.fromhex(key) in self._index

    def keys(self) -> List[str]:
        return [k.hex() for k in self._index]

    def get(self, key: str) -> Optional[RowScores]:
        """The row's scores, or None when the store has no such row; a damaged row raises :class:`StoreError`."""
        where = self._index.get(bytes.fromhex(key))
        if where is None:
            return None
        shard = self._shards[where[0]]
        r = where[1]
        start, end = int(shard['offsets'][r]), int(shard['offsets'][r + 1])
        payload = shard['payload'][start:end].numpy().tobytes()
        if zlib.crc32(payload) != int(shard['crc32'][r]):
            raise StoreError(f'{shard["path"]}: row {r} (key {key}) fails its CRC32 check: the shard is damaged; '
                             'remove it and score its rows again')
        try:
            return decode_row(payload, int(shard['tokens'][r]), self.identity.topk, self.identity.samples, self.dtype)
        except (zlib.error, RuntimeError, StoreError) as e:
            raise StoreError(f'{shard["path"]}: row {r} (key {key}) cannot be decoded ({e})') from None


#: the prefix of a fingerprint of every weight byte (:func:`weights_fingerprint`); a stored ``teacher_hash`` without it
#: is the sampled fingerprint of the stores written before (:func:`sampled_weights_fingerprint`)
FULL_HASH = 'sha256-all:'
WEIGHT_FILES = ('.safetensors', '.bin', '.pt', '.pth', '.gguf')


def _weight_files(model_dir: str) -> List[str]:
    """``config.json`` and the weight files of a model folder, sorted; [] where it has no weight file."""
    names = sorted(n for n in os.listdir(model_dir) if n.endswith(WEIGHT_FILES) or n == 'config.json')
    return names if any(n != 'config.json' for n in names) else []


def weights_fingerprint(model_dir: str, like: str = '') -> str:
    """A fingerprint of a model folder's weights: ``sha256-all:`` and SHA-256 (32 hex digits) over ``config.json``
    and, per weight file (sorted), its name, size and the SHA-256 of all its bytes, so a change to any tensor changes
    it. A file's hash is cached by its identity (path, size, mtime_ns, inode: :func:`file_digest`), so a large teacher
    is read whole once per machine, not once per run. '' where the folder has no weight file (a hub id, a server).
    ``like``: a stored fingerprint without the prefix (a store written before) makes this the sampled one of
    :func:`sampled_weights_fingerprint`, which compares with it."""
    if like and not like.startswith(FULL_HASH):
        return sampled_weights_fingerprint(model_dir)
    if not model_dir or not os.path.isdir(model_dir):
        return ''
    names = _weight_files(model_dir)
    if not names:
        return ''
    h = hashlib.sha256()
    _hash_files(h, model_dir, names)
    return FULL_HASH + h.hexdigest()[:32]


def _hash_files(h, folder: str, names: List[str]) -> None:
    """Each of ``folder``'s files ``names``, in order, into ``h``: its name, size and SHA-256 (:func:`file_digest`,
    the files hashed in parallel)."""
    paths = [os.path.join(folder, name) for name in names]
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(max(1, min(8, len(paths), os.cpu_count() or 1))) as pool:  # (hashlib frees the GIL)
        digests = list(pool.map(file_digest, paths))
    for name, path, digest in zip(names, paths, digests):
        h.update(f'{name}\0{os.path.getsize(path)}\0{digest}\0'.encode())


def adapters_fingerprint(adapters: Sequence[str]) -> str:
    """A fingerprint of a teacher's adapters (``--teacher_adapters``, a server's ``--adapters``), in their order:
    ``sha256-all:`` and SHA-256 (32 hex digits) over, per adapter folder, its ``adapter_config.json`` (its rank, scale
    and target modules) and ``adapter_model*`` weight files, each by name, size and the SHA-256 of all its bytes
    (:func:`file_digest`, cached); a checkpoint's other files (optimizer, trainer state) are not the adapter. '' for no
    adapter."""
    if not adapters:
        return ''
    h = hashlib.sha256()
    for i, adapter in enumerate(adapters):
        h.update(f'adapter {i}\0'.encode())
        folder = os.path.expanduser(adapter)
        if not os.path.isdir(folder):  # (a hub id: its name only; the flags' checks want folders)
            h.update(f'{adapter}\0'.encode())
            continue
        _hash_files(h, folder, sorted(n for n in os.listdir(folder) if n == 'adapter_config.json' or (
            n.startswith('adapter_model') and n.endswith(WEIGHT_FILES))))
    return FULL_HASH + h.hexdigest()[:32]


def same_weights(model_dir: str, stored: str) -> bool:
    """Whether ``model_dir``'s weights are those a store's ``teacher_hash`` ``stored`` fingerprinted (in its
    scheme: a store written before the full fingerprint is compared by its sampled windows)."""
    return weights_fingerprint(model_dir, like=stored) == stored


def same_adapters(adapters: Sequence[str], stored: Optional[str]) -> bool:
    """Whether ``adapters`` are those a store's ``teacher_adapters_hash`` ``stored`` fingerprinted; True where the
    store keeps none (None: written before adapters were fingerprinted, compared by its base alone)."""
    return stored is None or adapters_fingerprint(adapters) == stored


def sampled_weights_fingerprint(model_dir: str, sample_bytes: int = 1 << 16) -> str:
    """The fingerprint of the stores written before :data:`FULL_HASH`: SHA-256 over ``config.json`` and, per weight
    file, its name, size and three ``sample_bytes`` windows (start, middle, end). A teacher changed elsewhere (one
    layer of a LoRA merge) passes it: kept only to compare with those stores."""
    if not model_dir or not os.path.isdir(model_dir):
        return ''
    names = _weight_files(model_dir)
    if not names:
        return ''
    h = hashlib.sha256()
    for name in names:
        path = os.path.join(model_dir, name)
        size = os.path.getsize(path)
        h.update(f'{name}\0{size}\0'.encode())
        with open(path, 'rb') as f:
            for at in sorted({0, max(0, size // 2 - sample_bytes // 2), max(0, size - sample_bytes)}):
                f.seek(at)
                h.update(f.read(sample_bytes))
    return h.hexdigest()[:32]


def digest_cache_dir() -> str:
    """Where :func:`file_digest` keeps a file's SHA-256: ``SWIFT_GKD_CACHE``, else ``$XDG_CACHE_HOME/swift_gkd_plugin``
    (``~/.cache/swift_gkd_plugin``), folder ``file_sha256``."""
    root = os.environ.get('SWIFT_GKD_CACHE') or os.path.join(
        os.environ.get('XDG_CACHE_HOME') or os.path.expanduser('~/.cache'), 'swift_gkd_plugin')
    return os.path.join(root, 'file_sha256')


def file_digest(path: str) -> str:
    """SHA-256 (hex) of a file's bytes, read whole once per file identity (real path, device, inode, size,
    mtime_ns): the answer is cached in :func:`digest_cache_dir`, one small file a key, under a lock, so several
    processes of a run read a file once between them. A folder that cannot be written: no cache, the file is read."""
    real = os.path.realpath(path)
    st = os.stat(real)
    identity = f'{real}\0{st.st_dev}\0{st.st_ino}\0{st.st_size}\0{st.st_mtime_ns}'
    folder = digest_cache_dir()
    entry = os.path.join(folder, hashlib.blake2b(identity.encode(), digest_size=16).hexdigest())
    cached = _read_text(entry)
    if cached:
        return cached
    try:
        os.makedirs(folder, exist_ok=True)
        lock = open(entry + '.lock', 'a')
    except OSError:
        return file_sha256(real)
    with lock:
        import fcntl
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)  # (another process hashing it: wait, then read its answer)
        except OSError:  # (a file system without locks: each process reads the file)
            pass
        cached = _read_text(entry)
        if cached:
            return cached
        digest = file_sha256(real)
        try:
            tmp = f'{entry}.{uuid.uuid4().hex}.tmp'
            with open(tmp, 'w') as f:
                f.write(digest)
            os.replace(tmp, entry)
        except OSError:
            pass
    return digest


def _read_text(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ''


def file_sha256(path: str) -> str:
    """SHA-256 (hex) of a file's bytes, read now."""
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 22), b''):
            h.update(block)
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """SHA-256 of what makes a tokenizer's ids: its vocabulary (token -> id) and its special tokens' ids."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    special = {name: getattr(tokenizer, f'{name}_token_id', None) for name in ('bos', 'eos', 'pad', 'unk')}
    doc = json.dumps({'vocab': vocab, 'special': special}, ensure_ascii=False, separators=(',', ':'))
    return hashlib.sha256(doc.encode()).hexdigest()[:32]
