"""The format section of docs_en/teacher_store.md holds: its numpy reader (safetensors.numpy, zlib and numpy, no
torch, no plugin) reads a store written by :class:`StoreWriter` exactly as :meth:`TeacherStore.get` does, for every
row, in float16, bfloat16 and float32; docs_zh/teacher_store.md carries the same code block. No model is loaded."""
from __future__ import annotations

import os
import re

import numpy as np
import pytest
import torch

from swift_gkd_plugin.core.scores.store import DTYPES, RowScores, StoreIdentity, StoreWriter, TeacherStore, row_key

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = {lang: os.path.join(ROOT, f'docs_{lang}', 'teacher_store.md') for lang in ('en', 'zh')}
VOCAB, K = 448, 8


def reader_block(lang: str) -> str:
    """The page's python code block that defines ``read_row``."""
    with open(PAGES[lang], encoding='utf-8') as f:
        blocks = [b for b in re.findall(r'```python\n(.*?)```', f.read(), re.S) if 'def read_row(' in b]
    assert len(blocks) == 1, f'docs_{lang}/teacher_store.md has {len(blocks)} python blocks defining read_row'
    return blocks[0]


def read_row_from_the_docs():
    namespace = {}
    exec(compile(reader_block('en'), 'docs_en/teacher_store.md', 'exec'), namespace)  # noqa: S102 (our own page)
    return namespace['read_row']


def test_the_reader_is_short_and_the_same_in_both_languages():
    code = reader_block('en')
    assert len(code.splitlines()) <= 20, code
    assert not re.search(r'^\s*(?:import|from)\s+(?:torch|swift|swift_gkd_plugin)\b', code, re.M), code
    assert reader_block('zh') == code


def _random_row(gen: torch.Generator, n: int, with_tail: bool, with_token: bool) -> RowScores:
    """``n`` positions of top-K ids (distinct within a position) and log-probs; the last slot of every other
    position unused (id 0, -inf), as a teacher that answered fewer than K entries leaves it."""
    ids = torch.stack([torch.randperm(VOCAB, generator=gen)[:K] for _ in range(n)])
    logits = torch.randn(n, VOCAB, generator=gen) * 3
    logprobs = logits.log_softmax(-1).gather(-1, ids.long())
    ids, logprobs = ids.long(), logprobs.clone()
    ids[::2, -1], logprobs[::2, -1] = 0, float('-inf')
    tail = torch.rand(n, generator=gen).log() if with_tail else None
    token = -torch.rand(n, generator=gen) * 20 if with_token else None
    return RowScores(ids, logprobs, tail, token)


def _write_store(root: str, dtype: str):
    """Two writers (ranks 0 and 1), small shards: rows spread over several files, as several processes leave them."""
    gen = torch.Generator().manual_seed(sorted(DTYPES).index(dtype))
    identity = StoreIdentity(teacher='tiny-teacher', teacher_hash='', tokenizer='t' * 32, template='qwen3',
                             topk=K, samples=0, dtype=dtype, temperature=1.0, vocab_size=VOCAB)
    written = {}
    for rank in (0, 1):
        writer = StoreWriter(root, identity, rank=rank, shard_bytes=600)
        for i in range(12):
            n = [2, 3, 5, 17][i % 4]  # (0 and 1 positions: reported, the store cannot decode them yet)
            input_ids = torch.randint(VOCAB, (n + 3, ), generator=gen).tolist()
            key = row_key(input_ids, list(range(2, 2 + n)))
            written[key] = _random_row(gen, n, with_tail=i % 3 != 0, with_token=i % 2 == 0)
            writer.add(key, written[key])
        writer.flush()
    return written


@pytest.mark.parametrize('dtype', ['float16', 'bfloat16', 'float32'])
def test_the_documented_reader_reads_what_the_store_reads(tmp_path, dtype):
    read_row = read_row_from_the_docs()
    root = str(tmp_path / 'store')
    written = _write_store(root, dtype)
    store = TeacherStore(root)
    assert len(os.listdir(os.path.join(root, 'shards'))) > 2 and sorted(store.keys()) == sorted(written)
    for key, original in written.items():
        ids, logprobs, tail, token_logprobs = read_row(root, key)
        row = store.get(key)
        assert ids.dtype == np.int64 and logprobs.dtype == tail.dtype == token_logprobs.dtype == np.float32
        assert (np.diff(ids, axis=1) >= 0).all()  # ascending within a position
        assert np.array_equal(ids, row.ids.numpy())
        assert np.array_equal(logprobs, row.logprobs.numpy(), equal_nan=True)
        assert np.array_equal(tail, row.tail.numpy(), equal_nan=True)
        assert np.array_equal(token_logprobs, row.token_logprobs.numpy(), equal_nan=True)
        # and both are the row written, its log-probs in the store's dtype, each id with its own log-prob
        rounded = original.logprobs.to(DTYPES[dtype]).float().numpy()
        for p in range(ids.shape[0]):
            given = sorted(zip(original.ids[p].tolist(), rounded[p].tolist()))
            assert sorted(zip(ids[p].tolist(), logprobs[p].tolist())) == given
        assert (np.isneginf(logprobs).sum(1) == (np.arange(ids.shape[0]) % 2 == 0)).all()  # the unused slots
        if original.tail is None:
            assert np.isnan(tail).all()
    absent = row_key([1, 2, 3], [0, 1])
    assert absent not in written and read_row(root, absent) is None and store.get(absent) is None
