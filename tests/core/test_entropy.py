"""``core/entropy.py``: the per-row entropy of a tempered distribution behind ``gkd/entropy`` and
``gkd/teacher_entropy``, against float64 on random inputs. A detached statistic: no gradient to check."""
import math

import pytest
import torch

from swift_gkd_plugin.core.entropy import entropy_terms_, tempered_entropy
from swift_gkd_plugin.core.topk import topk_teacher_entropy


def entropy64(z: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.special.entr(torch.softmax(z.double() / temperature, -1)).sum(-1)


@pytest.mark.parametrize('temperature', [0.3, 1.0, 2.5])
@pytest.mark.parametrize('scale', [0.1, 3.0, 40.0])
def test_tempered_entropy_matches_float64(temperature, scale):
    g = torch.Generator().manual_seed(int(scale * 10 + temperature * 7))
    z = torch.randn(3, 5, 1000, generator=g) * scale
    z[0, 1, ::7] = float('-inf')  # masked entries: probability 0
    got = tempered_entropy(z, temperature, chunk_rows=4)  # several chunks, a ragged last one
    want = entropy64(z, temperature)
    assert got.shape == (3, 5) and got.dtype == torch.float32 and not got.requires_grad
    assert float((got.double() - want).abs().max()) <= 1e-5 * max(1.0, float(want.abs().max()))
    assert float(got.min()) >= 0 and float(got.max()) <= math.log(1000) + 1e-5


def test_tempered_entropy_edge_rows():
    z = torch.tensor([[0.0, 0.0, 0.0, 0.0], [5.0, float('-inf'), float('-inf'), float('-inf')],
                      [float('-inf')] * 4, [1e4, 0.0, -1e30, 1e4]], dtype=torch.float64)
    got = tempered_entropy(z, 1.0)
    assert got.dtype == torch.float64  # float64 in, float64 out
    assert got.tolist() == pytest.approx([math.log(4), 0.0, 0.0, math.log(2)], abs=1e-12)
    assert not torch.isnan(got).any()
    with pytest.raises(ValueError, match='temperature'):
        tempered_entropy(z, 0.0)


def test_entropy_terms_of_vocabulary_slices_add_up():
    """With the row's log-normaliser given (vocabulary-parallel shards), the slices' sums add up to the entropy."""
    g = torch.Generator().manual_seed(3)
    u = torch.randn(6, 900, generator=g, dtype=torch.float64) * 4
    lse = torch.logsumexp(u, -1)
    parts = sum(entropy_terms_(u[:, a:b].clone(), lse) for a, b in ((0, 100), (100, 650), (650, 900)))
    assert torch.allclose(parts, entropy64(u, 1.0), rtol=1e-12, atol=1e-12)
    assert torch.allclose(entropy_terms_(u.clone()), entropy64(u, 1.0), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('tail', [False, True])
@pytest.mark.parametrize('temperature', [0.5, 1.0, 2.0])
def test_topk_teacher_entropy_is_that_of_the_buckets(tail, temperature):
    """The entropy of the distribution a top-k loss compares: the renormalised top-k, or with the tail bucket; at
    T = 1 with the tail it is at most the full entropy (lumping), and equals it when k covers the vocabulary."""
    g = torch.Generator().manual_seed(5)
    z = torch.randn(7, 300, generator=g, dtype=torch.float64) * 3
    lp, _ = torch.log_softmax(z, -1).topk(12, -1)
    lp[::3, 10:] = float('-inf')  # unused slots
    got = topk_teacher_entropy(lp, temperature, tail, 300)
    buckets = torch.cat([lp, torch.log1p(-lp.exp().sum(-1, keepdim=True))], -1) if tail else lp
    assert torch.allclose(got, entropy64(buckets, temperature), rtol=1e-10, atol=1e-12)
    if tail and temperature == 1.0:
        assert bool((got <= entropy64(z, 1.0) + 1e-12).all())
    full = torch.log_softmax(z, -1)
    assert torch.allclose(topk_teacher_entropy(full, temperature, tail, 300), entropy64(z, temperature), rtol=1e-10)
