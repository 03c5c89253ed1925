"""benchmarks/bench_teacher_store.py's pure parts (no swift run): the bytes a token it prints are the shard files it
wrote over the tokens they hold, the stores it writes read back as the rows' top-k, tail and samples, and the step
time and loss comparisons it prints are what its helpers compute."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import load_benchmark


@pytest.fixture(scope='module')
def bench():
    return load_benchmark('bench_teacher_store')


def test_bytes_per_token_is_the_written_shards_over_their_tokens(bench, tmp_path):
    from swift_gkd_plugin.core.scores.store import TeacherStore, row_key
    vocab, rows, tokens = 1000, 3, 20
    results, dist = bench.measure_formats(str(tmp_path), bench.synthetic_rows(vocab, rows, tokens, seed=5), vocab)
    assert sorted(results) == sorted(name for name, *_ in bench.FORMATS)
    assert dist['positions'] == rows * tokens and 0 < dist['top64_mass'] < 1 and 0 < dist['entropy'] < math.log(vocab)
    for name, r in results.items():
        folder = next(p for p in tmp_path.iterdir() if p.name == name.replace(' ', '_').replace('+', '_'))
        shards = list((folder / 'shards').glob('*.safetensors'))
        assert shards and r['bytes'] == sum(p.stat().st_size for p in shards)
        assert (r['tokens'], r['rows']) == (rows * tokens, rows)
        assert r['bytes_per_token'] == r['bytes'] / (rows * tokens)
    by = {name: r['bytes_per_token'] for name, r in results.items()}
    assert by['top64+tail float32'] > by['top64+tail float16'] > by['12 samples']

    # what was written is the rows' own top-64 (float32: exact), tail and 12 in-vocabulary samples a position
    source = list(bench.synthetic_rows(vocab, rows, tokens, seed=5))
    top = TeacherStore(str(tmp_path / 'top64_tail_float32'))
    samples = TeacherStore(str(tmp_path / '12_samples'))
    entropic = TeacherStore(str(tmp_path / '12_samples___entropy')) if '12 samples + entropy' in results else None
    assert (top.identity.topk, samples.identity.topk, samples.identity.samples) == (64, 0, 12)
    for ids, positions, logits, next_ids in source:
        key = row_key(ids, positions)
        got = top.get(key)
        logp = torch.log_softmax(logits, -1)
        values, want = logp.topk(64, -1)
        assert torch.equal(got.ids, want.sort(-1).values)
        assert torch.equal(got.logprobs, logp.gather(-1, got.ids))
        assert torch.allclose(got.tail.double(), (1 - values.double().exp().sum(-1)).log(), rtol=1e-5)
        assert torch.equal(got.token_logprobs, logp.gather(-1, next_ids[:, None])[:, 0])
        drawn = samples.get(key)
        assert drawn.ids is None and drawn.samples.shape == (tokens, 12)
        assert int(drawn.samples.min()) >= 0 and int(drawn.samples.max()) < vocab
        if entropic is not None:  # float16: 11 significant bits
            entropy = -(logp.exp() * logp).sum(-1)
            assert torch.allclose(entropic.get(key).entropy, entropy, rtol=2e-3)


def test_step_times_and_loss_differences(bench):
    stamps = [{'step': 0, 't': 0.0, 'cpu': 0.0}, {'step': 1, 't': 5.0, 'cpu': 4.0}, {'step': 2, 't': 6.0, 'cpu': 4.5},
              {'step': 3, 't': 8.0, 'cpu': 5.5}, {'step': 4, 't': 9.0, 'cpu': 6.0}]
    # step 1 (start-up) left out: intervals 1, 2, 1 s wall and 0.5, 1, 0.5 s CPU
    assert bench.steady(stamps) == {'step_s': 1.0, 'step_mean_s': 4 / 3, 'step_cpu_s': 0.5}
    assert bench.steady(stamps[:3])['step_s'] is None
    assert bench.max_rel([1.0, 2.2], [1.0, 2.0]) == pytest.approx(0.1)
    with pytest.raises(ValueError):
        bench.max_rel([1.0], [1.0, 2.0])
    probe = [{'step': 1, 'phases': {'teacher': {'seconds': 9.0}}},
             {'step': 2, 'phases': {'teacher': {'seconds': 0.3}, 'loss': {'seconds': 0.2}}},
             {'step': 3, 'phases': {'teacher': {'seconds': 0.5}}}, {'step': 'eval3', 'phases': {}}]
    assert bench.phase_medians(probe) == {'loss': pytest.approx(0.1), 'teacher': pytest.approx(0.4)}


def test_score_loop_padding_share_counts_the_padding_positions():
    """bench_score_loop.py (issue 90): the padding share is the padding positions over all positions forwarded."""
    loop = load_benchmark('bench_score_loop')
    batches = []
    for group in ([5, 1, 4], [2, 3, 6]):
        mask = torch.zeros(len(group), max(group), dtype=torch.long)
        for i, n in enumerate(group):
            mask[i, max(group) - n:] = 1
        batches.append({'attention_mask': mask})
    assert loop.padding_share(batches) == pytest.approx(1 - 21 / 33)  # (widths 5 and 6, 3 rows each)
