"""Every divergence of the registry, through every loss path, against float64 references written from the
definitions (values and gradients); the skew divergences' endpoints; the precision of the shared Bregman form."""
from __future__ import annotations

import math

import pytest
import torch

from swift_gkd_plugin.core.divergence import generalized_jsd
from swift_gkd_plugin.core.fused.loss import fused_linear_jsd
from swift_gkd_plugin.core.teacher_signal import TeacherHead, TeacherTopK
from swift_gkd_plugin.core.row_divergence import DIVERGENCES, Divergence
from swift_gkd_plugin.core.tensor_parallel import vocab_parallel_generalized_jsd, vocab_parallel_topk_jsd
from swift_gkd_plugin.core.topk import bucket_divergence

pytestmark = pytest.mark.quick  # core math: part of `pytest -m quick`

SPECS = ([Divergence('jsd', beta=b) for b in (0.0, 0.3, 0.5, 1.0)]
         + [Divergence(name, alpha=a) for name in ('skew_kl', 'skew_rkl') for a in (0.0, 0.1, 0.5, 1.0)]
         # the entropy-aware mix (--gkd_entropy_fkl_threshold): thresholds inside the test rows' entropies (part of
         # the rows gated), 0 (every row) and past log V (none)
         + [Divergence('jsd', beta=b, fkl_above_entropy=1.6) for b in (0.0, 0.5, 1.0)]
         + [Divergence('skew_rkl', alpha=0.1, fkl_above_entropy=0.9),
            Divergence('jsd', beta=1.0, fkl_above_entropy=0.0), Divergence('jsd', beta=0.5, fkl_above_entropy=50.0),
            Divergence('skew_kl', alpha=1.0, fkl_above_entropy=1.2)])
IDS = [str(d) for d in SPECS]


def reference64(student, teacher, div: Divergence, temperature):
    """Float64, from the definitions in probabilities; zero-probability entries of the first argument of a KL
    contribute 0."""
    p_s = torch.softmax(student.double() / temperature, -1)
    p_t = torch.softmax(teacher.double() / temperature, -1)

    def kl(p, q):
        keep = p > 0
        return torch.where(keep, p * (torch.where(keep, p, 1).log() - torch.where(keep, q, 1).log()), 0).sum(-1)

    if div.fkl_above_entropy is not None:  # D + 1[H(t) > tau] KL(t || s)
        entropy = -torch.where(p_t > 0, p_t * torch.where(p_t > 0, p_t, 1).log(), 0).sum(-1)
        base = Divergence(div.name, beta=div.beta, alpha=div.alpha)
        gate = (entropy > div.fkl_above_entropy).double()
        return reference64(student, teacher, base, temperature) + gate * kl(p_t, p_s)

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

    from swift_gkd_plugin.options.flags import GKD_DIVERGENCES, GKDPluginArgumentsMixin
    hint = typing.get_type_hints(GKDPluginArgumentsMixin)['gkd_divergence']
    assert typing.get_args(hint) == GKD_DIVERGENCES == DIVERGENCES


SKEW_ALPHAS = [1e-300, 1e-9, 1e-7, 1e-6, 0.1, 0.9]


def skew_log_space64(student, teacher, name, alpha, temperature=1.0):
    """Float64 skew divergences written in log space (``log M`` by ``logaddexp`` of ``log a`` and ``log1p(-a)``):
    exact for every ``a`` in (0, 1), where ``1 - a`` and the mixture of probabilities round away ``a < 1e-16``."""
    s = torch.log_softmax(student.double() / temperature, -1)
    t = torch.log_softmax(teacher.double() / temperature, -1)
    la, l1a = math.log(alpha), math.log1p(-alpha)
    if name == 'skew_kl':
        log_m = torch.logaddexp(la + t, l1a + s)
        return (t.exp() * (t - log_m)).sum(-1)
    log_m = torch.logaddexp(l1a + t, la + s)
    return (s.exp() * (s - log_m)).sum(-1)


def far_apart_inputs(seed, n=9, v=40):
    """Student and teacher that differ by far more than 17 nats on some entries (both directions)."""
    student, teacher, w = inputs(seed, n=n, v=v, scale=2.0)
    student[:, :3] -= 45.0  # the teacher has mass where the student has ~none
    teacher[:, 3:6] -= 45.0  # and the other way round
    teacher[0] = student[0] + 1e-3 * torch.randn(v, generator=torch.Generator().manual_seed(seed))  # near row
    return student, teacher, w


def test_float64_log_space_reference_agrees_with_mpmath():
    """The log-space reference above against mpmath at 50 digits on a few rows (the tests below trust it)."""
    mpmath = pytest.importorskip('mpmath')
    mpmath.mp.dps = 50
    student, teacher, _ = far_apart_inputs(1, n=2, v=12)
    for name in ('skew_kl', 'skew_rkl'):
        for alpha in SKEW_ALPHAS:
            got = skew_log_space64(student, teacher, name, alpha)
            for i in range(2):
                s = [mpmath.mpf(float(x)) for x in student[i]]
                t = [mpmath.mpf(float(x)) for x in teacher[i]]
                ls, lt = mpmath.log(sum(mpmath.exp(x) for x in s)), mpmath.log(sum(mpmath.exp(x) for x in t))
                ps, pt = [mpmath.exp(x - ls) for x in s], [mpmath.exp(x - lt) for x in t]
                a = mpmath.mpf(alpha)
                if name == 'skew_kl':
                    ref = sum(q * mpmath.log(q / (a * q + (1 - a) * p)) for p, q in zip(ps, pt))
                else:
                    ref = sum(p * mpmath.log(p / ((1 - a) * q + a * p)) for p, q in zip(ps, pt))
                assert abs(float(got[i]) - float(ref)) <= 1e-12 * max(1.0, abs(float(ref))), (name, alpha, i)


@pytest.mark.parametrize('alpha', SKEW_ALPHAS)
@pytest.mark.parametrize('name', ['skew_kl', 'skew_rkl'])
def test_skew_divergences_are_precise_for_tiny_and_large_alpha(name, alpha):
    """Issue 27: at a = 1e-9 (1e-300) float32 rounded ``1 - a`` to 1 and ``log1p(-1)`` gave an infinite loss and
    NaN gradients where the distributions differ by > 17 nats; values were 4% off at 1e-7 and 2.4e-3 at 1e-6.
    Dense, vocabulary-parallel and fused paths, float32, against the float64 log-space definition."""
    student, teacher, w = far_apart_inputs(2)
    div = Divergence(name, alpha=alpha)
    ref, ref_grad = value_and_grad(lambda z: skew_log_space64(z, teacher, name, alpha, 1.3), student.double(), w)
    paths = {
        'dense': lambda z: generalized_jsd(z, teacher, div, 1.3, chunk_size=4),
        'vocab_parallel': lambda z: vocab_parallel_generalized_jsd(z, teacher, div, 1.3, chunk_size=5),
    }
    for label, fn in paths.items():
        d, g = value_and_grad(fn, student, w)
        assert torch.isfinite(d).all() and torch.isfinite(g).all(), label
        torch.testing.assert_close(d, ref, rtol=1e-5, atol=1e-7, msg=label)
        assert rel(g, ref_grad) <= 1e-5, label
    # the fused loss on a linear head whose logits are exactly the inputs: hidden states = identity rows
    n, v = student.shape
    eye = torch.eye(v)[:n]
    head = torch.zeros(v, v)
    head[:, :n] = student.T
    head_t = torch.zeros(v, v)
    head_t[:, :n] = teacher.T
    head.requires_grad_()
    loss, stats = fused_linear_jsd(eye, head, teacher=TeacherHead(eye, head_t), divergence=div, temperature=1.3,
                                   normalizer=1.0, chunk_size=4)
    loss.backward()
    torch.testing.assert_close(stats['divergence_sum'].double(), ref.sum(), rtol=1e-5, atol=1e-7)
    _, ref_grad1 = value_and_grad(lambda z: skew_log_space64(z, teacher, name, alpha, 1.3), student.double(),
                                  torch.ones(n))
    assert rel(head.grad[:, :n].T, ref_grad1) <= 1e-5


def test_entropy_aware_mix_is_validated_and_has_no_kernel_form():
    from swift_gkd_plugin.core.row_divergence import entropy_gate, kernel_form
    with pytest.raises(ValueError, match=r'fkl_above_entropy must be None or a finite number >= 0 \(nats\), got -1'):
        Divergence('jsd', beta=1.0, fkl_above_entropy=-1.0)
    with pytest.raises(ValueError, match='fkl_above_entropy must be None or a finite number'):
        Divergence('jsd', beta=1.0, fkl_above_entropy=float('nan'))
    with pytest.raises(ValueError, match=r'do not compute the entropy-aware mix .*\(--gkd_fused_backend torch\)'):
        kernel_form(Divergence('jsd', beta=1.0, fkl_above_entropy=2.0))
    assert entropy_gate(torch.tensor([0.5, 2.0, 2.5]), 2.0).tolist() == [False, False, True]  # strictly above


def test_entropy_aware_mix_without_gated_rows_is_the_base_bit_for_bit():
    student, teacher, w = inputs(12)
    base = value_and_grad(lambda z: generalized_jsd(z, teacher, Divergence('jsd', beta=0.5), 1.1), student, w)
    none = value_and_grad(lambda z: generalized_jsd(z, teacher, Divergence('jsd', beta=0.5, fkl_above_entropy=50.0),
                                                    1.1), student, w)
    assert torch.equal(base[0], none[0]) and torch.equal(base[1], none[1])
