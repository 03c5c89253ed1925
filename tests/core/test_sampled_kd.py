"""Random-sampling KD against float64 references: the draws' frequencies against ``softmax(logits / T)``, and the
mean over many independent draws of the sampled loss, its KL estimate and its autograd gradient against the exact
full-vocabulary cross-entropy, forward KL and forward-KL gradient of the project's dense loss (``beta = 0``), within
4.5 standard errors computed from the draws. A top-k renormalised teacher fails the same check, so it can fail."""
import math

import pytest
import torch

from swift_gkd_plugin.core.divergence import generalized_jsd, tempered_divergence_rows
from swift_gkd_plugin.core.row_divergence import Divergence
from swift_gkd_plugin.core.scores.sampled_kd import draw_teacher_samples, sampled_forward_kl

pytestmark = pytest.mark.quick  # core math: part of `pytest -m quick`

DRAWS, SAMPLES = 20000, 12
FORWARD_KL = Divergence('jsd', beta=0.0)


def exact_forward_kl(student, teacher, temperature):
    """``(KL(p_T || q_T) [N], its gradient in the student logits [N, V])``: the dense loss's own rows, float64."""
    return tempered_divergence_rows(student.double(), teacher.double(), FORWARD_KL, temperature)


def mean_and_standard_error(samples):
    """Mean over the draws (dim 0) and its standard error, from the draws' own spread."""
    return samples.mean(0), samples.std(0) / math.sqrt(samples.shape[0])


def within(mean, standard_error, exact, sigmas=4.5):
    return bool(((mean - exact).abs() <= sigmas * standard_error + 1e-12).all())


def sampled_draws(student_row, teacher_row, temperature, seed, draws=DRAWS, samples=SAMPLES):
    """One draw of ``samples`` ids for each of ``draws`` copies: ``(loss [D], estimate [D], grad [D, V])``."""
    gen = torch.Generator().manual_seed(seed)
    vocab = student_row.shape[-1]
    ids = draw_teacher_samples(teacher_row.expand(draws, vocab), samples, temperature, generator=gen)
    student = student_row.expand(draws, vocab).clone().requires_grad_()
    p_t = torch.softmax(teacher_row / temperature, -1)
    entropy = -torch.xlogy(p_t, p_t).sum().expand(draws)
    loss, estimate = sampled_forward_kl(student, ids, temperature, teacher_entropy=entropy)
    (grad, ) = torch.autograd.grad(loss.sum(), student)
    return loss.detach(), estimate, grad


def logit_pair(vocab, seed):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(vocab, generator=gen, dtype=torch.float64),
            torch.randn(vocab, generator=gen, dtype=torch.float64) * 1.5)


@pytest.mark.parametrize('vocab', [7, 50])
@pytest.mark.parametrize('temperature', [1.0, 0.7, 2.0])
def test_mean_gradient_is_the_forward_kl_gradient(vocab, temperature):
    """Unbiased: the mean per-draw gradient matches ``d KL(p_T || q_T) / d student`` (no ``T^2``) entry by entry, and
    the mean loss (estimate) matches the exact cross-entropy (KL)."""
    student, teacher = logit_pair(vocab, seed=vocab + int(10 * temperature))
    loss, estimate, grad = sampled_draws(student, teacher, temperature, seed=1)
    assert loss.dtype == grad.dtype == estimate.dtype == torch.float64

    kl, kl_grad = exact_forward_kl(student[None], teacher[None], temperature)
    # the rows used are the dense loss's: generalized_jsd (float32) applies the same gradient through autograd
    s32 = student[None].float().requires_grad_()
    (dense_grad, ) = torch.autograd.grad(generalized_jsd(s32, teacher[None].float(), 0.0, temperature).sum(), s32)
    torch.testing.assert_close(dense_grad.double(), kl_grad, rtol=1e-5, atol=1e-7)

    mean, se = mean_and_standard_error(grad)
    assert within(mean, se, kl_grad[0]), ((mean - kl_grad[0]) / se).abs().max()

    p_t = torch.softmax(teacher / temperature, -1)
    cross_entropy = -(p_t * torch.log_softmax(student / temperature, -1)).sum()
    assert within(*mean_and_standard_error(loss), cross_entropy)
    assert within(*mean_and_standard_error(estimate), kl[0])
    torch.testing.assert_close(estimate, loss - (cross_entropy - kl[0]), rtol=0, atol=1e-12)


@pytest.mark.parametrize('temperature', [1.0, 0.7, 2.0])
def test_a_top_k_teacher_is_biased_and_fails_the_same_check(temperature):
    """Draws from the teacher renormalised over its top 3 of 7 (ms-swift's top-k) miss the gradient by far more than
    the standard error: the check above can fail."""
    student, teacher = logit_pair(7, seed=7 + int(10 * temperature))
    top = teacher.topk(3).indices
    top_k_teacher = torch.full_like(teacher, -math.inf)
    top_k_teacher[top] = teacher[top]  # softmax over the top k: the teacher renormalised over them
    _, _, grad = sampled_draws(student, top_k_teacher, temperature, seed=2)
    _, kl_grad = exact_forward_kl(student[None], teacher[None], temperature)
    mean, se = mean_and_standard_error(grad)
    assert not within(mean, se, kl_grad[0])
    drawn = se > 0  # the top-k ids: outside them every draw gives the same gradient
    assert drawn.sum() == 3
    assert ((mean - kl_grad[0]).abs()[drawn] / se[drawn]).max() > 20


@pytest.mark.parametrize('temperature', [0.5, 1.0, 2.0])
def test_draws_follow_the_tempered_distribution(temperature):
    gen = torch.Generator().manual_seed(11)
    rows = torch.randn(3, 7, generator=gen, dtype=torch.float64) * 1.5
    rows[2, 4] = -math.inf  # a masked entry: never drawn
    repeats, samples = 2000, 16
    ids = draw_teacher_samples(rows.repeat_interleave(repeats, 0), samples, temperature, generator=gen)
    assert ids.shape == (3 * repeats, samples) and ids.dtype == torch.long
    n = repeats * samples
    for r in range(3):
        freq = torch.bincount(ids[r * repeats:(r + 1) * repeats].flatten(), minlength=7).double() / n
        p = torch.softmax(rows[r] / temperature, -1)
        assert within(freq, (p * (1 - p) / n).sqrt(), p), (freq, p)
        if temperature != 1.0:  # the temperature is applied: the untempered distribution is far off
            p1 = torch.softmax(rows[r], -1)
            assert not within(freq, (p1 * (1 - p1) / n).sqrt(), p1, sigmas=10)
    assert (ids[2 * repeats:] != 4).all()


def test_chunking_sorting_and_dtypes():
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(37, 50, generator=gen)
    seeded = [draw_teacher_samples(logits, 9, 0.8, generator=torch.Generator().manual_seed(3), chunk_size=c)
              for c in (1, 5, 37, 1024)]
    for other in seeded[1:]:
        assert torch.equal(other, seeded[0])
    ids = seeded[0]
    assert ids.shape == (37, 9) and ids.dtype == torch.long
    assert (ids[:, 1:] >= ids[:, :-1]).all() and ids.min() >= 0 and ids.max() < 50
    # float64 and bfloat16 logits, and a 151,936-token vocabulary with one dominant entry per row
    assert draw_teacher_samples(logits.double(), 4, 1.0, generator=gen).shape == (37, 4)
    assert draw_teacher_samples(logits.bfloat16(), 4, 1.0, generator=gen).max() < 50
    big = torch.randn(3, 151936, generator=gen)
    big[torch.arange(3), torch.tensor([0, 77777, 151935])] = 60.0
    assert torch.equal(draw_teacher_samples(big, 8, 1.0, generator=gen, chunk_size=2),
                       torch.tensor([0, 77777, 151935]).repeat_interleave(8).view(3, 8))
    assert draw_teacher_samples(torch.randn(0, 50), 3, 1.0).shape == (0, 3)


def reference_loss(student, ids, temperature):
    """The definition: ``-mean over valid slots of log_softmax(student / T)[id]``, 0 on rows with none, by autograd."""
    log_q = torch.log_softmax(student / temperature, -1)
    valid = ids >= 0
    picked = log_q.gather(-1, ids.clamp_min(0)) * valid
    count = valid.sum(-1)
    return torch.where(count > 0, -picked.sum(-1) / count.clamp_min(1), torch.zeros_like(log_q[:, 0]))


@pytest.mark.parametrize('temperature', [0.7, 1.0, 2.0])
def test_value_and_gradient_match_the_autograd_definition(temperature):
    """The chunked, hand-formed gradient against autograd of the definition (float64), with unused slots (-1), a row
    of none, repeated ids and a random cotangent."""
    gen = torch.Generator().manual_seed(21)
    student = (torch.randn(11, 30, generator=gen, dtype=torch.float64) * 2).requires_grad_()
    ids = torch.randint(0, 30, (11, 6), generator=gen)
    ids[torch.rand(11, 6, generator=gen) < 0.3] = -1
    ids[4] = -1
    ids[5] = 3
    weights = torch.rand(11, generator=gen, dtype=torch.float64)
    loss, estimate = sampled_forward_kl(student, ids, temperature, chunk_size=3)
    assert estimate is None and loss.dtype == torch.float64
    (grad, ) = torch.autograd.grad((loss * weights).sum(), student)
    ref = reference_loss(student, ids, temperature)
    (ref_grad, ) = torch.autograd.grad((ref * weights).sum(), student)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-12)
    assert loss[4] == 0 and (grad[4] == 0).all()


def test_unused_slots_are_ignored_and_dtypes_kept():
    gen = torch.Generator().manual_seed(8)
    student = torch.randn(3, 20, generator=gen).requires_grad_()
    ids = torch.tensor([[2, 5, 5, -1, -1], [2, 5, 5, 17, 0], [-1, -1, -1, -1, -1]])
    loss, _ = sampled_forward_kl(student, ids, 1.3)
    compact, _ = sampled_forward_kl(student[:1], ids[:1, :3], 1.3)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss[:1], compact)
    (grad, ) = torch.autograd.grad(loss.sum(), student)
    assert grad.dtype == torch.float32
    assert loss[2] == 0 and (grad[2] == 0).all() and (grad[:2] != 0).all()
    # bf16 students are computed in float32; -inf entries never drawn stay finite
    masked = student.detach().clone()
    masked[:, -3:] = -math.inf
    loss16, _ = sampled_forward_kl(masked.bfloat16().requires_grad_(), ids, 1.0)
    assert loss16.dtype == torch.float32 and torch.isfinite(loss16).all()
    # no rows
    empty = torch.randn(0, 20, requires_grad=True)
    loss0, _ = sampled_forward_kl(empty, torch.zeros(0, 4, dtype=torch.long), 1.0)
    loss0.sum().backward()
    assert loss0.shape == (0, ) and empty.grad.shape == (0, 20)


@pytest.mark.parametrize('call,match', [
    (lambda: sampled_forward_kl(torch.randn(2, 5), torch.tensor([[0, 5], [1, 1]]), 1.0), 'outside the vocabulary'),
    (lambda: sampled_forward_kl(torch.randn(2, 5), torch.zeros(3, 2, dtype=torch.long), 1.0), 'sample_ids'),
    (lambda: sampled_forward_kl(torch.randn(2, 5), torch.zeros(2, 2), 1.0), 'integer'),
    (lambda: sampled_forward_kl(torch.randn(2, 5), torch.zeros(2, 2, dtype=torch.long), 0.0), 'temperature'),
    (lambda: sampled_forward_kl(torch.randn(2, 5), torch.zeros(2, 2, dtype=torch.long), 1.0, torch.zeros(3)),
     'teacher_entropy'),
    (lambda: draw_teacher_samples(torch.randn(2, 5), 0, 1.0), 'num_samples'),
    (lambda: draw_teacher_samples(torch.randn(2, 5), 3, float('nan')), 'temperature'),
    (lambda: draw_teacher_samples(torch.full((2, 5), -math.inf), 3, 1.0), 'finite'),
])
def test_argument_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()
