"""The teacher's tail log-mass of a top-k report (issue 27: reverse KL with a confident teacher gave a 1e30 loss),
against mpmath, and the top-k losses that use it (fused, vocabulary-parallel) on a confident teacher."""
from __future__ import annotations

import math

import mpmath
import pytest
import torch

from swift_gkd_plugin.core.fused.loss import fused_linear_jsd
from swift_gkd_plugin.core.row_divergence import Divergence
from swift_gkd_plugin.core.teacher_signal import TeacherTopK
from swift_gkd_plugin.core.tensor_parallel import vocab_parallel_topk_jsd
from swift_gkd_plugin.core.topk import teacher_tail_logmass, topk_of_logits
from test_divergences import reference64

NEG_INF = float('-inf')


def mp_tail(row) -> float:
    """``log(1 - sum exp(l))`` of the float32 values taken as exact, in 60-digit arithmetic."""
    with mpmath.workdps(60):
        mass = 1 - mpmath.fsum(mpmath.exp(mpmath.mpf(float(x))) for x in row if x > NEG_INF)
        return float(mpmath.log(mass)) if mass > 0 else NEG_INF


def confident_logits(n=12, v=600, seed=0):
    """Float64 logits whose top-1 leads by 14-32 nats (top-1 log-probs -1e-6 .. -1e-14), as a sharp teacher's."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, v, generator=g, dtype=torch.float64) * 2
    z[:, 0] += torch.linspace(14, 32, n, dtype=torch.float64)
    return z


def test_confident_rows_match_mpmath():
    """Top-1 log-probs down to -1e-14 and random rows: the log tail mass within float32 rounding (1e-7 relative) of
    mpmath (before: ``-inf`` on some rows, others up to nats off from the float32 ``logsumexp``)."""
    lp = torch.tensor([[-1e-8, -19.0, -20.5, -22.0],
                       [-1e-12, -28.5, -30.0, -31.0],
                       [-3e-7, -15.5, -16.0, NEG_INF],
                       [-0.5, -1.7, -3.0, -4.5],
                       [-2e-14, -32.5, NEG_INF, NEG_INF]], dtype=torch.float32)
    lp = torch.cat([lp, torch.log_softmax(confident_logits(), -1).topk(4, -1).values.float()])
    got = teacher_tail_logmass(lp, (lp > NEG_INF).sum(-1), 600)
    want = torch.tensor([mp_tail(r) for r in lp.tolist()], dtype=torch.float64)
    assert got.dtype == torch.float32 and torch.isfinite(want).all()
    assert float(((got.double() - want) / want).abs().max()) <= 1e-7, (got, want)


def test_reports_that_reach_mass_one_and_empty_tails():
    """A top-1 rounded to exactly 0 (a float32 ``log_softmax``) reports a mass >= 1: the tail is undetermined below
    the values' own rounding and comes out as that bound, finite; a top-k covering the vocabulary has an empty tail;
    a row without a valid slot has all its mass outside."""
    lp = torch.tensor([[0.0, -20.0, -21.0], [0.0, NEG_INF, NEG_INF], [-1.0, -2.0, -3.0], [NEG_INF] * 3])
    got = teacher_tail_logmass(lp, (lp > NEG_INF).sum(-1), 50)
    bound = (math.exp(-20) + math.exp(-21)) * 2.0**-20 + 2.0**-150  # half float32 ulps: 2^-19 at 20 and 21, 2^-149 at 0
    assert math.isclose(float(got[0]), math.log(bound), rel_tol=1e-6)
    assert math.isfinite(float(got[1])) and float(got[1]) < -100  # 1.4e-45 / 2: a float32 top-1 of exactly 0
    assert float(got[3]) == 0.0
    assert math.isclose(float(got[2]), mp_tail(lp[2].tolist()), rel_tol=1e-6)
    assert float(teacher_tail_logmass(lp[2:3], torch.tensor([3]), 3)) == NEG_INF


def test_local_teacher_topk_keeps_the_top1_digits():
    """``topk_of_logits`` reports a confident top-1 to its float32 rounding (before: exactly 0 where the top-1
    leads by more than ~17 nats), so the tail mass it implies is the float64 one."""
    z = confident_logits()
    top = topk_of_logits(z.float(), 4)
    assert torch.equal(top.ids, z.topk(4, -1).indices)
    with mpmath.workdps(40):  # log-probabilities of the float32 logits, the top-1's -1e-14 included
        want = [[float(x - r[0] - mpmath.log(mpmath.fsum(mpmath.exp(mpmath.mpf(y) - r[0]) for y in r)))
                 for x in r[:4]] for r in z.float().double().sort(-1, descending=True).values.tolist()]
    want = torch.tensor(want, dtype=torch.float64)
    assert float(((top.logprobs.double() - want) / want).abs().max()) <= 1e-6
    tail = teacher_tail_logmass(top.logprobs, torch.full((z.shape[0], ), 4), z.shape[1])
    exact = torch.tensor([mp_tail(r) for r in want.tolist()], dtype=torch.float64)
    assert float((tail.double() - exact).abs().max()) <= 1e-5, (tail, exact)


def _bucket_reference(z64, ids, lp64, div, temperature):
    """Float64 top-k + tail loss per row (from the definitions, autograd) for a teacher given in float64."""
    y = z64.gather(1, ids)
    outside = torch.ones_like(z64, dtype=torch.bool).scatter_(1, ids, False)
    y_tail = torch.where(outside, z64, NEG_INF).logsumexp(-1, keepdim=True)
    t_tail = torch.log1p(-lp64.exp().sum(-1, keepdim=True))
    return reference64(torch.cat([y, y_tail], 1), torch.cat([lp64, t_tail], 1), div, temperature)


@pytest.mark.parametrize('div', [Divergence('jsd', beta=1.0), Divergence('skew_rkl', alpha=0.0),
                                 Divergence('jsd', beta=0.5), Divergence('skew_rkl', alpha=0.1)], ids=str)
def test_reverse_kl_with_a_confident_teacher_is_finite_and_exact(div):
    """Issue 27: top-k + tail with reverse KL and a confident teacher gave a loss of ~1e30 and an infinite gradient
    (fused and vocabulary-parallel paths). Now both match float64 in value and gradient."""
    g = torch.Generator().manual_seed(3)
    n, h, v, k, temperature = 12, 8, 600, 4, 1.0
    hs, w = torch.randn(n, h, generator=g), torch.randn(v, h, generator=g) * 0.5
    zt = confident_logits(n, v, seed=3)
    top = topk_of_logits(zt.float(), k)
    lp64 = torch.log_softmax(zt.float().double(), -1).gather(1, top.ids)
    hs64 = hs.double().requires_grad_()
    ref = _bucket_reference(hs64 @ w.double().T, top.ids, lp64, div, temperature)
    (ref_g, ) = torch.autograd.grad(ref.sum(), hs64)
    ref = ref.detach()

    x = hs.clone().requires_grad_()
    loss, _ = fused_linear_jsd(x, w, teacher=top, divergence=div, temperature=temperature, topk_tail=True,
                               normalizer=1.0)
    (grad, ) = torch.autograd.grad(loss, x)
    loss = float(loss.detach())
    assert math.isfinite(loss) and torch.isfinite(grad).all()
    assert abs(loss - float(ref.sum())) <= 1e-5 * float(ref.sum()), (loss, float(ref.sum()))
    assert float((grad.double() - ref_g).abs().max() / ref_g.abs().max()) <= 1e-4

    z = (hs @ w.T).requires_grad_()
    d = vocab_parallel_topk_jsd(z, 0, top.ids, top.logprobs, div, temperature, tail=True, vocab_size=v)
    (gz, ) = torch.autograd.grad(d.sum(), z)
    assert torch.isfinite(d).all() and torch.isfinite(gz).all()
    torch.testing.assert_close(d.double(), ref.detach(), rtol=1e-5, atol=1e-7)


def test_reverse_kl_stays_finite_on_a_report_rounded_to_mass_one():
    """A served teacher's float32 ``log_softmax`` reports a confident top-1 as exactly 0 (mass 1, no tail left): the
    tail bucket takes the report's rounding bound instead of ``-inf``, so reverse KL stays finite."""
    g = torch.Generator().manual_seed(4)
    n, h, v = 6, 8, 300
    hs, w = torch.randn(n, h, generator=g), torch.randn(v, h, generator=g) * 0.5
    lp, ids = torch.log_softmax(confident_logits(n, v, seed=4).float(), -1).topk(4, -1)
    lp[:, 0] = 0.0
    x = hs.clone().requires_grad_()
    loss, _ = fused_linear_jsd(x, w, teacher=TeacherTopK(ids, lp), beta=1.0, topk_tail=True)
    (grad, ) = torch.autograd.grad(loss, x)
    assert math.isfinite(float(loss.detach())) and float(loss.detach()) < 1e3 and torch.isfinite(grad).all()
