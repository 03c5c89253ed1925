"""The dense generalized JSD against a float64 reference written from the definitions, values and gradients."""
import math

import pytest
import torch

from swift_gkd_plugin.core import align_vocab, generalized_jsd

pytestmark = pytest.mark.quick  # core math: part of `pytest -m quick`

BETAS = [0.0, 0.1, 0.5, 0.9, 1.0]
TEMPERATURES = [0.5, 1.0, 2.0]


def reference_jsd(student, teacher, beta, temperature):
    """Float64, straight from the definitions (probabilities, not log-space tricks)."""
    p_s = torch.softmax(student.double() / temperature, -1)
    p_t = torch.softmax(teacher.double() / temperature, -1)
    return jsd_of_probabilities(p_s, p_t, beta)


def jsd_of_probabilities(p_s, p_t, beta):
    """The generalized JSD of two probability vectors, from its definition (``0 log 0 = 0``)."""

    def kl(p, q):
        return (torch.xlogy(p, p) - torch.xlogy(p, q)).sum(-1)

    if beta == 0:
        return kl(p_t, p_s)
    if beta == 1:
        return kl(p_s, p_t)
    m = beta * p_t + (1 - beta) * p_s
    return beta * kl(p_t, m) + (1 - beta) * kl(p_s, m)


@pytest.mark.parametrize('beta', BETAS)
@pytest.mark.parametrize('temperature', TEMPERATURES)
def test_values_and_gradients_match_float64_reference(beta, temperature):
    gen = torch.Generator().manual_seed(int(beta * 100 + temperature * 10))
    student = (torch.randn(23, 57, generator=gen) * 3).requires_grad_()
    teacher = torch.randn(23, 57, generator=gen) * 3
    weights = torch.rand(23, generator=gen)  # a random cotangent exercises every row of the gradient

    ours = generalized_jsd(student, teacher, beta, temperature, chunk_size=10)
    assert ours.dtype == torch.float32
    (grad, ) = torch.autograd.grad((ours * weights).sum(), student)

    student64 = student.detach().double().requires_grad_()
    ref = reference_jsd(student64, teacher, beta, temperature)
    (ref_grad, ) = torch.autograd.grad((ref * weights.double()).sum(), student64)

    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-7)
    assert relative_error(grad, ref_grad) <= 1e-5


def relative_error(x, ref):
    """Norm-wise relative error: float32 rounding makes element-wise ratios meaningless for near-zero entries."""
    return float((x.double() - ref).norm() / ref.norm().clamp_min(1e-30))


def test_endpoints_are_the_two_kls():
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 11, generator=gen), torch.randn(5, 11, generator=gen)
    ls, lt = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
    kl_ts = (lt.exp() * (lt - ls)).sum(-1)
    kl_st = (ls.exp() * (ls - lt)).sum(-1)
    torch.testing.assert_close(generalized_jsd(s, t, 0.0), kl_ts)
    torch.testing.assert_close(generalized_jsd(s, t, 1.0), kl_st)
    # near the ends the mixture form behaves like beta * KL(teacher||student) and (1 - beta) * KL(student||teacher)
    torch.testing.assert_close(generalized_jsd(s, t, 1e-3) / 1e-3, kl_ts, rtol=2e-2, atol=1e-4)
    torch.testing.assert_close(generalized_jsd(s, t, 1 - 1e-3) / 1e-3, kl_st, rtol=2e-2, atol=1e-4)
    # the symmetric JSD is bounded by log 2
    assert torch.all(generalized_jsd(s, t, 0.5) <= math.log(2) + 1e-6)


def test_identical_distributions_give_zero_loss_and_gradient():
    s = torch.randn(4, 9).requires_grad_()
    for beta in BETAS:
        d = generalized_jsd(s, s.detach(), beta, 1.3)
        (g, ) = torch.autograd.grad(d.sum(), s)
        assert torch.allclose(d, torch.zeros_like(d), atol=1e-6)
        assert torch.allclose(g, torch.zeros_like(g), atol=1e-6)


@pytest.mark.parametrize('beta', BETAS)
def test_masked_vocabulary_entries_give_no_nan(beta):
    s = torch.randn(6, 8)
    t = torch.randn(6, 8)
    s[:, -2:] = float('-inf')  # e.g. vocabulary entries a model masks out
    t[:, -2:] = float('-inf')
    s.requires_grad_()
    d = generalized_jsd(s, t, beta, 0.7)
    (g, ) = torch.autograd.grad(d.sum(), s)
    assert torch.isfinite(d).all() and torch.isfinite(g).all()
    torch.testing.assert_close(d.double(), reference_jsd(s[:, :-2].detach(), t[:, :-2], beta, 0.7), rtol=1e-5,
                               atol=1e-7)


def test_bf16_inputs_are_accumulated_in_float32():
    gen = torch.Generator().manual_seed(3)
    s, t = torch.randn(16, 40, generator=gen), torch.randn(16, 40, generator=gen)
    d = generalized_jsd(s.bfloat16(), t.bfloat16(), 0.5, 1.0)
    assert d.dtype == torch.float32
    torch.testing.assert_close(d.double(), reference_jsd(s.bfloat16().double(), t.bfloat16().double(), 0.5, 1.0),
                               rtol=1e-5, atol=1e-6)


def test_empty_input_keeps_the_graph():
    s = torch.randn(0, 7, requires_grad=True)
    d = generalized_jsd(s, torch.randn(0, 7), 0.5)
    assert d.shape == (0, )
    d.sum().backward()
    assert s.grad is not None and s.grad.shape == (0, 7)


@pytest.mark.parametrize('beta,temperature', [(-0.1, 1.0), (1.1, 1.0), (0.5, 0.0), (0.5, -2.0)])
def test_bad_parameters_are_refused(beta, temperature):
    with pytest.raises(ValueError):
        generalized_jsd(torch.randn(2, 3), torch.randn(2, 3), beta, temperature)


def test_align_vocab_pads_the_smaller_side_with_the_others_logits():
    s, t = torch.randn(3, 5), torch.randn(3, 8)
    s2, t2 = align_vocab(s, t)
    assert s2.shape == t2.shape == (3, 8)
    assert torch.equal(s2[:, 5:], t[:, 5:]) and torch.equal(s2[:, :5], s)
    t3, s3 = align_vocab(t, s)  # student larger than teacher
    assert torch.equal(s3[:, 5:], t[:, 5:])
