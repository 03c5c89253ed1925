"""Every divergence of the registry, through every loss path, against float64 references written from the
definitions (values and gradients); the skew divergences' endpoints; the precision of the shared Bregman form."""
from __future__ import annotations

import math

import pytest
import torch

from swift_gkd_plugin.core.divergence import generalized_jsd
from swift_gkd_plugin.core.fused_loss import fused_linear_jsd
from swift_gkd_plugin.core.teacher_signal import TeacherHead, TeacherTopK
from swift_gkd_plugin.core.row_divergence import DIVERGENCES, Divergence
from swift_gkd_plugin.core.tensor_parallel import vocab_parallel_generalized_jsd, vocab_parallel_topk_jsd
from swift_gkd_plugin.core.topk import bucket_divergence

pytestmark = pytest.mark.quick  # core math: part of `pytest -m quick`

SPECS = ([Divergence('jsd', beta=b) for b in (0.0, 0.3, 0.5, 1.0)]
         + [Divergence(name, alpha=a) for name in ('skew_kl', 'skew_rkl') for a in (0.0, 0.1, 0.5, 1.0)])
IDS = [str(d) for d in SPECS]


def reference64(student, teacher, div: Divergence, temperature):
    """Float64, from the definitions in probabilities; zero-probability entries of the first argument of a KL
    contribute 0."""
    p_s = torch.softmax(student.double() / temperature, -1)
    p_t = torch.softmax(teacher.double() / temperature, -1)

    def kl(p, q):
        keep = p > 0
        return torch.where(keep, p * (torch.where(keep, p, 1).log() - torch.where(keep, q, 1).log()), 0).sum(-1)

    if div.name == 'skew_kl':
        return kl(p_t, div.alpha * p_t + (1 - div.alpha) * p_s)
    if div.name == 'skew_rkl':
        return kl(p_s, (1 - div.alpha) * p_t + div.alpha * p_s)
    if div.beta == 0:
        return kl(p_t, p_s)
    if div.beta == 1:
        return kl(p_s, p_t)
    m = div.beta * p_t + (1 - div.beta) * p_s
    return div.beta * kl(p_t, m) + (1 - div.beta) * kl(p_s, m)


def value_and_grad(fn, student, weights):
    z = student.detach().clone().requires_grad_()
    d = fn(z)
    (g, ) = torch.autograd.grad((d * weights.to(d.dtype)).sum(), z)
    return d.detach().double(), g.double()


def rel(x, ref):
    return float((x.double() - ref).norm() / ref.norm().clamp_min(1e-30))


def inputs(seed, n=19, v=61, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, v, generator=g) * scale, torch.randn(n, v, generator=g) * scale,
            torch.rand(n, generator=g))


def test_registry_names_the_three_divergences():
    assert DIVERGENCES == ('jsd', 'skew_kl', 'skew_rkl')
    with pytest.raises(ValueError, match="divergence must be one of .*'fkl'"):
        Divergence('fkl')
    with pytest.raises(ValueError, match=r'alpha must be in \[0, 1\], got 1.5'):
        Divergence('skew_kl', alpha=1.5)
    with pytest.raises(ValueError, match=r'beta must be in \[0, 1\], got nan'):
        Divergence('jsd', beta=float('nan'))


@pytest.mark.parametrize('div', SPECS, ids=IDS)
@pytest.mark.parametrize('temperature', [0.7, 1.0, 2.0])
def test_dense_and_vocab_parallel_match_float64_reference(div, temperature):
    student, teacher, w = inputs(int(temperature * 10) + len(str(div)))
    ref, ref_grad = value_and_grad(lambda z: reference64(z, teacher, div, temperature), student.double(), w)
    paths = {
        'dense': lambda z: generalized_jsd(z, teacher, div, temperature, chunk_size=7),
        'vocab_parallel': lambda z: vocab_parallel_generalized_jsd(z, teacher, div, temperature, chunk_size=5),
    }
    for name, fn in paths.items():
        d, g = value_and_grad(fn, student, w)
        torch.testing.assert_close(d, ref, rtol=2e-5, atol=1e-7, msg=name)
        assert rel(g, ref_grad) <= 2e-5, name


@pytest.mark.parametrize('div', SPECS, ids=IDS)
@pytest.mark.parametrize('temperature', [0.7, 2.0])
def test_fused_full_head_matches_float64_reference(div, temperature):
    g = torch.Generator().manual_seed(5)
    n, h, v = 23, 8, 47
    hs, ht = torch.randn(n, h, generator=g), torch.randn(n, h, generator=g)
    w, wt = torch.randn(v, h, generator=g), torch.randn(v, h, generator=g)
    teacher = ht.double() @ wt.double().T
    hs64, w64 = hs.double().requires_grad_(), w.double().requires_grad_()
    ref = reference64(hs64 @ w64.T, teacher, div, temperature)
    ref.mean().backward()
    hs32, w32 = hs.clone().requires_grad_(), w.clone().requires_grad_()
    loss, stats = fused_linear_jsd(hs32, w32, teacher=TeacherHead(ht, wt), divergence=div,
                                   temperature=temperature, chunk_size=6)
    loss.backward()
    torch.testing.assert_close(stats['divergence_sum'].double(), ref.sum(), rtol=2e-5, atol=1e-6)
    assert rel(hs32.grad, hs64.grad) <= 2e-5 and rel(w32.grad, w64.grad) <= 2e-5


def _buckets64(z, ids, lp, tail):
    """Student and teacher bucket logits of the top-k definition (:mod:`swift_gkd_plugin.core.topk`)."""
    y = z.gather(1, ids)
    if not tail:
        return y, lp
    outside = torch.ones_like(z, dtype=torch.bool).scatter_(1, ids, False)
    y_tail = torch.where(outside, z, float('-inf')).logsumexp(-1, keepdim=True)
    return torch.cat([y, y_tail], 1), torch.cat([lp, torch.log1p(-lp.exp().sum(-1, keepdim=True))], 1)


@pytest.mark.parametrize('div', SPECS, ids=IDS)
@pytest.mark.parametrize('tail', [False, True], ids=['no_tail', 'tail'])
def test_topk_paths_match_float64_reference(div, tail):
    g = torch.Generator().manual_seed(7)
    n, h, v, k, temperature = 17, 8, 40, 6, 1.5
    hs, w = torch.randn(n, h, generator=g), torch.randn(v, h, generator=g)
    full_lp = torch.log_softmax(torch.randn(n, v, generator=g).double() * 2, -1)
    lp, ids = full_lp.topk(k, -1)
    weights = torch.rand(n, generator=g)

    hs64, w64 = hs.double().requires_grad_(), w.double().requires_grad_()
    y, t = _buckets64(hs64 @ w64.T, ids, lp, tail)
    ref = reference64(y, t, div, temperature)
    (ref_hs, ) = torch.autograd.grad((ref * weights.double()).sum(), hs64, retain_graph=True)

    # the fused loss
    hs32, w32 = hs.clone().requires_grad_(), w.clone()
    loss, stats = fused_linear_jsd(hs32, w32, teacher=TeacherTopK(ids, lp.float()), divergence=div,
                                   temperature=temperature, topk_tail=tail, normalizer=1.0)
    (g_hs, ) = torch.autograd.grad(loss, hs32)
    (ref_sum_hs, ) = torch.autograd.grad(ref.sum(), hs64)
    torch.testing.assert_close(stats['divergence_sum'].double(), ref.sum().detach(), rtol=2e-5, atol=1e-6)
    assert rel(g_hs, ref_sum_hs) <= 2e-5
    # the vocabulary-parallel top-k loss (one rank) and the bucket function itself
    z = (hs @ w.T)
    d, gz = value_and_grad(lambda x: vocab_parallel_topk_jsd(x, 0, ids, lp.float(), div, temperature, tail=tail,
                                                              vocab_size=v), z, weights)
    torch.testing.assert_close(d, ref.detach(), rtol=2e-5, atol=1e-7)
    assert rel(gz @ w.double(), ref_hs) <= 2e-5
    yb, tb = _buckets64(z.double(), ids, lp, tail)
    db, gb = bucket_divergence(yb.float(), tb.float(), div, temperature)
    torch.testing.assert_close(db.double(), ref.detach(), rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize('name,beta', [('skew_kl', 0.0), ('skew_rkl', 1.0)])
def test_skew_at_alpha_zero_is_the_kl_exactly(name, beta):
    student, teacher, w = inputs(11)
    skew = value_and_grad(lambda z: generalized_jsd(z, teacher, Divergence(name, alpha=0.0), 1.3), student, w)
    kl = value_and_grad(lambda z: generalized_jsd(z, teacher, beta, 1.3), student, w)
    assert torch.equal(skew[0], kl[0]) and torch.equal(skew[1], kl[1])


@pytest.mark.parametrize('div', SPECS, ids=IDS)
def test_identical_inputs_give_exactly_zero_everywhere(div):
    student, _, w = inputs(3)
    for fn in (lambda z: generalized_jsd(z, z.detach(), div, 0.9),
               lambda z: vocab_parallel_generalized_jsd(z, z.detach(), div, 0.9)):
        d, g = value_and_grad(fn, student, w)
        assert torch.equal(d, torch.zeros_like(d))
        assert float(g.abs().max()) < 1e-7
    d, g = bucket_divergence(student, student, div, 0.9)
    assert torch.equal(d, torch.zeros_like(d)) and float(g.abs().max()) < 1e-7


@pytest.mark.parametrize('div', SPECS, ids=IDS)
def test_masked_entries_contribute_nothing(div):
    student, teacher, w = inputs(4, v=20)
    student[:, -3:] = float('-inf')
    teacher[:, -3:] = float('-inf')
    d, g = value_and_grad(lambda z: generalized_jsd(z, teacher, div, 0.8), student, w)
    assert torch.isfinite(d).all() and torch.isfinite(g).all() and torch.equal(g[:, -3:], torch.zeros_like(g[:, -3:]))
    ref, ref_g = value_and_grad(lambda z: reference64(z, teacher[:, :-3], div, 0.8), student[:, :-3].double(), w)
    torch.testing.assert_close(d, ref, rtol=2e-5, atol=1e-7)
    assert rel(g[:, :-3], ref_g) <= 2e-5


@pytest.mark.parametrize('div', [Divergence('jsd', beta=0.5), Divergence('jsd', beta=0.0),
                                 Divergence('skew_kl', alpha=0.1), Divergence('skew_rkl', alpha=0.1)],
                         ids=lambda d: str(d))
def test_student_close_to_teacher_is_precise_at_large_vocabulary(div):
    """Student ~ teacher at V = 32k: the dense and top-k paths, which summed first-order terms before, are within
    1e-4 relative of float64, as the fused loss is (the first-order form was 2e-3 to 2e-2 off here)."""
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(8, 32768, generator=g) * 2
    student = teacher + torch.randn(8, 32768, generator=g) * 1e-3
    ref = reference64(student, teacher, div, 1.0)
    assert rel(generalized_jsd(student, teacher, div, 1.0), ref) <= 1e-4
    lp, ids = torch.log_softmax(teacher, -1).topk(4096, -1)
    y = student.gather(1, ids)
    ref_k = reference64(y, lp, div, 1.0)
    assert rel(bucket_divergence(y, lp, div, 1.0)[0], ref_k) <= 1e-4


def test_skew_divergences_are_finite_where_the_student_masks_teacher_mass():
    """The point of skewing: a student entry at -inf where the teacher has mass gives KL(t || s) = inf, but the
    skew KL stays finite (M keeps a * p_t there)."""
    student, teacher, w = inputs(8, v=12)
    student[:, 0] = float('-inf')
    div = Divergence('skew_kl', alpha=0.1)
    d, g = value_and_grad(lambda z: generalized_jsd(z, teacher, div, 1.0), student, w)
    ref = reference64(student, teacher, div, 1.0)
    assert torch.isfinite(ref).all()
    torch.testing.assert_close(d, ref, rtol=2e-5, atol=1e-7)
    assert torch.isfinite(g).all()



def test_flag_values_are_the_registry():
    """The flag's Literal (argparse's choices) and the checks' tuple name exactly the registered divergences."""
    import typing

    from swift_gkd_plugin.flags import GKD_DIVERGENCES, GKDPluginArgumentsMixin
    hint = typing.get_type_hints(GKDPluginArgumentsMixin)['gkd_divergence']
    assert typing.get_args(hint) == GKD_DIVERGENCES == DIVERGENCES
