"""core/scores/store.py's StoreWriter with ``background=True`` (issue 90): the rows encoded and written off the
caller's thread, the same shards as the synchronous writer's, every row added visible at once, a bounded queue, and
a worker's failure raised by the caller's next call."""
import glob
import os
import threading

import pytest
import torch
from safetensors import safe_open

from swift_gkd_plugin.core.scores import store as st
from swift_gkd_plugin.core.scores.store import RowScores, StoreError, StoreIdentity, StoreWriter, TeacherStore

IDENTITY = StoreIdentity(teacher='t', teacher_hash='h', tokenizer='tok', template='tpl', topk=4, samples=0,
                         dtype='float16', temperature=1.0, vocab_size=50)


def rows(n: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    for i in range(n):
        tokens = 1 + i % 5
        ids = torch.stack([torch.randperm(50, generator=gen)[:4] for _ in range(tokens)])
        yield f'{i:032x}', RowScores(ids, torch.randn(tokens, 4, generator=gen).log_softmax(-1),
                                     torch.full((tokens, ), -3.0), torch.randn(tokens, generator=gen))


def shard_rows(root: str):
    """(key, tokens, payload) of every row, shard by shard in name order (sessions aside: the writer's count)."""
    out = []
    for path in sorted(glob.glob(os.path.join(root, 'shards', '*.safetensors')), key=lambda p: p[-19:]):
        with safe_open(path, 'pt') as h:
            offsets, blob = h.get_tensor('offsets'), h.get_tensor('payload')
            for r, (key, tokens) in enumerate(zip(h.get_tensor('keys'), h.get_tensor('tokens').tolist())):
                out.append((key.numpy().tobytes().hex(), tokens,
                            blob[int(offsets[r]):int(offsets[r + 1])].numpy().tobytes()))
    return out


def test_the_background_writer_writes_the_synchronous_writers_shards(tmp_path):
    sync = StoreWriter(str(tmp_path / 'sync'), IDENTITY, shard_bytes=900)
    background = StoreWriter(str(tmp_path / 'bg'), IDENTITY, shard_bytes=900, background=True, queue_rows=3)
    for key, scores in rows(40):
        sync.add(key, scores)
        background.add(key, scores)
    sync.flush()
    background.flush()
    written = shard_rows(str(tmp_path / 'sync'))
    assert len(written) == 40 and len(glob.glob(str(tmp_path / 'sync' / 'shards' / '*'))) > 2  # (several shards)
    assert shard_rows(str(tmp_path / 'bg')) == written
    assert (background.rows_written, background.tokens_written) == (sync.rows_written, sync.tokens_written)
    assert len(TeacherStore(str(tmp_path / 'bg'))) == 40


def test_a_row_just_added_is_found_and_read_back(tmp_path, monkeypatch):
    """``in`` sees a row still queued; ``get`` waits for its encoding and reads it as the store will."""
    release = threading.Event()
    encode = st.encode_row

    def slow_encode(*args, **kwargs):
        release.wait(10)
        return encode(*args, **kwargs)

    monkeypatch.setattr(st, 'encode_row', slow_encode)
    writer = StoreWriter(str(tmp_path), IDENTITY, background=True)
    (key, scores), = rows(1, seed=3)
    writer.add(key, scores)
    assert key in writer and f'{1:032x}' not in writer
    threading.Timer(0.2, release.set).start()
    got = writer.get(key)
    assert torch.equal(got.ids, scores.ids.sort(-1).values)
    assert torch.equal(got.logprobs, scores.logprobs.gather(-1, scores.ids.argsort(-1)).half().float())
    assert key in writer and writer.flush() is not None and key in TeacherStore(str(tmp_path))


def test_the_queue_is_bounded(tmp_path, monkeypatch):
    """A caller adding faster than the worker encodes waits once ``queue_rows`` rows are queued."""
    release = threading.Event()
    encode = st.encode_row
    monkeypatch.setattr(st, 'encode_row', lambda *a, **k: (release.wait(10), encode(*a, **k))[1])
    writer = StoreWriter(str(tmp_path), IDENTITY, background=True, queue_rows=2)
    added = []
    adder = threading.Thread(target=lambda: [added.append(writer.add(k, s)) for k, s in rows(6)], daemon=True)
    adder.start()
    adder.join(0.5)
    assert len(added) == 3  # one taken by the worker (waiting), two queued, the fourth add waits
    release.set()
    adder.join(10)
    assert len(added) == 6 and writer.flush() is not None and len(TeacherStore(str(tmp_path))) == 6


def test_a_worker_failure_is_raised_by_the_next_call(tmp_path):
    writer = StoreWriter(str(tmp_path), IDENTITY, background=True)
    (key, scores), = rows(1)
    writer.add(key, RowScores(scores.ids, scores.logprobs[:, :2], scores.tail, scores.token_logprobs))  # k 2 != 4
    with pytest.raises(StoreError, match='writing the store failed'):
        writer.flush()
    with pytest.raises(StoreError, match='writing the store failed'):
        writer.add(*next(iter(rows(1, seed=1))))
