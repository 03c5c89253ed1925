"""Sampled-token on-policy distillation against float64 references written from the definitions: the discounted
returns against a double loop, the gradient against the hand-derived one, and the expected gradient against the exact
gradient of the reverse KL, per token and per sequence, by enumerating every outcome."""
import itertools
import math

import pytest
import torch

from swift_gkd_plugin.core.policy_gradient import policy_gradient_loss
from swift_gkd_plugin.core.sampled_kl import (discounted_returns, other_rows_baseline, sampled_kl_loss,
                                              token_log_ratios)

pytestmark = pytest.mark.quick  # core math: part of `pytest -m quick`


def naive_returns(values, mask, discount, starts=None):
    """The definition, one term at a time: ``A_t = sum_{k >= t kept, same sequence} gamma^(kept in [t, k)) v_k``."""
    out = torch.zeros(values.shape, dtype=torch.float64)
    for b in range(values.shape[0]):
        for t in range(values.shape[1]):
            if not mask[b, t]:
                continue
            total, steps = 0.0, 0
            for k in range(t, values.shape[1]):
                if k > t and starts is not None and starts[b, k]:
                    break  # a new sequence starts at k
                if mask[b, k]:
                    total += discount**steps * float(values[b, k])
                    steps += 1
            out[b, t] = total
    return out


def gappy_batch(rows, length, seed):
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(rows, length, generator=gen, dtype=torch.float64)
    mask = torch.rand(rows, length, generator=gen) < 0.7
    mask[0] = False  # an empty row
    mask[1, :length // 2] = False  # left padding
    mask[2, length // 2:] = False  # right padding
    values[~mask] = float('nan')  # never read
    return values, mask


@pytest.mark.parametrize('discount', [0.0, 0.3, 0.9, 1.0])
def test_discounted_returns_match_the_double_loop(discount):
    """Masks with gaps, padding on either side and an empty row; masked positions hold NaN, which is never read."""
    values, mask = gappy_batch(5, 23, seed=1)
    ours = discounted_returns(values, mask, discount)
    torch.testing.assert_close(ours, naive_returns(values, mask, discount), rtol=1e-12, atol=1e-12)
    assert (ours[~mask] == 0).all()


@pytest.mark.parametrize('discount', [0.5, 1.0])
def test_packed_sequences_break_the_chain(discount):
    """``sequence_starts`` splits a row: nothing flows from a sequence into the one before it, gaps or not."""
    values, mask = gappy_batch(4, 19, seed=2)
    gen = torch.Generator().manual_seed(3)
    starts = torch.rand(4, 19, generator=gen) < 0.2
    starts[:, 0] = True
    starts[3, 5] = True
    mask[3, 5] = False  # a sequence that starts on a masked position
    ours = discounted_returns(values, mask, discount, sequence_starts=starts)
    torch.testing.assert_close(ours, naive_returns(values, mask, discount, starts), rtol=1e-12, atol=1e-12)


def test_a_masked_gap_is_cut_out_and_blocks_join():
    """The kept values of a row laid end to end give the same returns (the gap does not age the discount), and rows
    longer than one block (512) chain their blocks; gamma = 0.5 over 1500 positions underflows to 0, never NaN."""
    gen = torch.Generator().manual_seed(4)
    length = 1500
    values = torch.randn(2, length, generator=gen, dtype=torch.float64)
    mask = torch.rand(2, length, generator=gen) < 0.6
    mask[1, 500:530] = False  # a gap across the first block boundary (from the end: 1500 - 512 = 988)
    mask[1, 970:1000] = False
    for discount in (0.5, 0.999, 1.0):
        ours = discounted_returns(values, mask, discount)
        assert torch.isfinite(ours).all() and torch.isfinite(discounted_returns(values.float(), mask, discount)).all()
        for b in range(2):
            kept = values[b][mask[b]]
            compact = discounted_returns(kept[None], torch.ones_like(kept, dtype=torch.bool)[None], discount)[0]
            ref = torch.zeros(kept.shape[0], dtype=torch.float64)
            running = 0.0
            for i in reversed(range(kept.shape[0])):
                running = float(kept[i]) + discount * running
                ref[i] = running
            torch.testing.assert_close(ours[b][mask[b]], ref, rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(compact, ref, rtol=1e-10, atol=1e-10)


def test_token_log_ratios_are_detached_and_masked():
    student = torch.tensor([[-1.0, -2.0, float('-inf')]], dtype=torch.float64, requires_grad=True)
    teacher = torch.tensor([[-1.5, -0.5, float('nan')]], dtype=torch.float64)
    mask = torch.tensor([[True, True, False]])
    r = token_log_ratios(teacher, student, mask)
    assert not r.requires_grad and r.dtype == torch.float64
    torch.testing.assert_close(r, torch.tensor([[-0.5, 1.5, 0.0]], dtype=torch.float64))
    assert token_log_ratios(teacher.bfloat16(), student.detach().bfloat16(), mask).dtype == torch.float32


@pytest.mark.parametrize('discount', [0.0, 0.7, 1.0])
def test_gradient_matches_the_hand_derived_one(discount):
    """``dL/dz_t = -(w_t A_t / N) (onehot(y_t) - softmax(z_t))`` at kept positions, 0 elsewhere, with importance
    weights, a given normaliser and a masked gap; the metrics are the kept-position means."""
    gen = torch.Generator().manual_seed(5)
    rows, length, vocab = 3, 7, 6
    z = torch.randn(rows, length, vocab, generator=gen, dtype=torch.float64, requires_grad=True)
    teacher_all = torch.log_softmax(torch.randn(rows, length, vocab, generator=gen, dtype=torch.float64), -1)
    y = torch.randint(0, vocab, (rows, length), generator=gen)
    mask = torch.ones(rows, length, dtype=torch.bool)
    mask[0, 2:4] = False
    mask[1, -2:] = False
    weights = torch.rand(rows, length, generator=gen, dtype=torch.float64) * 2
    student = torch.log_softmax(z, -1).gather(-1, y[..., None])[..., 0]
    teacher = teacher_all.gather(-1, y[..., None])[..., 0]
    loss, metrics = sampled_kl_loss(student, teacher, mask, discount, weights=weights, normaliser=2.5)
    (grad, ) = torch.autograd.grad(loss, z)

    r = (teacher - student.detach()).masked_fill(~mask, 0.0)
    advantages = naive_returns(r, mask, discount)
    p = torch.softmax(z.detach(), -1)
    onehot = torch.nn.functional.one_hot(y, vocab).double()
    expected = -(weights * advantages / 2.5).masked_fill(~mask, 0.0)[..., None] * (onehot - p)
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(loss, -(weights * advantages * student.detach())[mask].sum() / 2.5)
    torch.testing.assert_close(metrics['reverse_kl'], -r[mask].mean())
    torch.testing.assert_close(metrics['advantage'], advantages[mask].mean())
    assert metrics['tokens'] == mask.sum()
    default_loss, _ = sampled_kl_loss(student, teacher, mask, discount)  # N = the kept positions
    torch.testing.assert_close(default_loss, -(advantages * student.detach())[mask].sum() / mask.sum())


def test_expected_gradient_is_the_per_token_reverse_kl_gradient():
    """THE property at gamma = 0: sum_y pi_S(y) grad L(y) = grad sum_t KL(pi_S(.|t) || pi_T(.|t)) exactly (V = 5,
    every token enumerated at each of four positions, one of them masked out of both sides)."""
    gen = torch.Generator().manual_seed(6)
    positions, vocab = 4, 5
    z = torch.randn(positions, vocab, generator=gen, dtype=torch.float64, requires_grad=True)
    teacher = torch.log_softmax(torch.randn(positions, vocab, generator=gen, dtype=torch.float64) * 2, -1)
    mask = torch.tensor([[True, True, False, True]])
    log_s = torch.log_softmax(z, -1)
    p = log_s.detach().exp()
    expected_grad = torch.zeros_like(z)
    for y in range(vocab):  # token y sampled at every position; positions are independent at gamma = 0
        loss, _ = sampled_kl_loss(log_s[:, y][None], teacher[:, y][None], mask, normaliser=1.0)
        (g, ) = torch.autograd.grad(loss, z, retain_graph=True)
        expected_grad += p[:, y:y + 1] * g
    kl = (log_s.exp() * (log_s - teacher)).sum(-1)[mask[0]].sum()
    (kl_grad, ) = torch.autograd.grad(kl, z)
    torch.testing.assert_close(expected_grad, kl_grad, rtol=1e-12, atol=1e-12)
    assert kl_grad.abs().max() > 1e-2  # not vacuous
    # and the metric's expectation is the KL itself
    expected_metric = sum((p[:, y] * (log_s[:, y] - teacher[:, y]).detach())[mask[0]].sum() for y in range(vocab))
    torch.testing.assert_close(expected_metric, kl.detach())


def test_other_rows_baseline_is_the_mean_over_the_other_rows():
    """The definition, token by token, in float64: the mean of the values of every token of another row; 0 where
    no other row has a token (one row, or every other row empty)."""
    gen = torch.Generator().manual_seed(3)
    values = torch.randn(9, generator=gen, dtype=torch.float64)
    rows = torch.tensor([0, 0, 2, 2, 2, 3, 0, 3, 2])  # row 1 has no token
    got = other_rows_baseline(values, rows, 4)
    for i in range(9):
        others = [float(values[j]) for j in range(9) if rows[j] != rows[i]]
        assert math.isclose(float(got[i]), sum(others) / len(others), rel_tol=1e-14, abs_tol=1e-15)
    assert got.dtype == torch.float64 and not got.requires_grad
    torch.testing.assert_close(other_rows_baseline(values[:2], rows[:2], 4), torch.zeros(2, dtype=torch.float64))
    assert other_rows_baseline(values[:0], rows[:0], 4).shape == (0, )
    with pytest.raises(ValueError, match=r'values \(9,\) and rows \(8,\)'):
        other_rows_baseline(values, rows[:8], 4)


def test_the_baseline_keeps_the_expected_gradient_and_lowers_its_spread():
    """Three rows sampled independently (one token each, V = 4), every joint outcome enumerated in float64: with the
    other rows' mean subtracted from each advantage the expected gradient is still exactly that of the summed reverse
    KL; and where the teacher puts its mass on a token the student rarely samples (so every token the student does
    sample has about the same negative log-ratio: the offset the baseline removes) its spread is much smaller."""
    gen = torch.Generator().manual_seed(11)
    n_rows, vocab = 3, 4
    logits = torch.randn(n_rows, vocab, generator=gen, dtype=torch.float64)
    logits[:, 3] = -3.0  # the token the student rarely samples
    z = logits.clone().requires_grad_(True)
    teacher = torch.log_softmax(logits + torch.tensor([0.0, 0.0, 0.0, 6.0], dtype=torch.float64), -1)
    log_s = torch.log_softmax(z, -1)
    p = log_s.detach().exp()
    rows = torch.arange(n_rows)
    grads = {False: [], True: []}
    for ys in itertools.product(range(vocab), repeat=n_rows):
        y = torch.tensor(ys)
        weight = float(p[rows, y].prod())
        logp = log_s[rows, y]
        advantages = token_log_ratios(teacher[rows, y], logp, torch.ones(n_rows, dtype=torch.bool))
        for centred in (False, True):
            a = advantages - other_rows_baseline(advantages, rows, n_rows) if centred else advantages
            (g, ) = torch.autograd.grad(policy_gradient_loss(logp, a).sum(), z, retain_graph=True)
            grads[centred].append((weight, g))
    kl = (log_s.exp() * (log_s - teacher)).sum()
    (kl_grad, ) = torch.autograd.grad(kl, z)
    spread = {}
    for centred, outcomes in grads.items():
        mean = sum(w * g for w, g in outcomes)
        torch.testing.assert_close(mean, kl_grad, rtol=1e-12, atol=1e-12)
        spread[centred] = sum(w * float(((g - mean)**2).sum()) for w, g in outcomes)
    assert kl_grad.abs().max() > 1e-2 and float((p * (teacher - log_s.detach())).sum()) < -1  # far from the teacher
    assert spread[True] < 0.5 * spread[False], spread


class TinyAutoregressive:
    """A table of logits per prefix: vocabulary ``V``, sequences of length ``T``, every prefix its own row."""

    def __init__(self, vocab, length, seed, scale=1.0, requires_grad=False):
        self.vocab, self.length = vocab, length
        self.index = {prefix: i for i, prefix in enumerate(p for n in range(length)
                                                            for p in itertools.product(range(vocab), repeat=n))}
        gen = torch.Generator().manual_seed(seed)
        self.logits = (torch.randn(len(self.index), vocab, generator=gen, dtype=torch.float64) * scale)
        self.logits.requires_grad_(requires_grad)

    def token_logprobs(self, sequence):
        """``[T]`` ``log p(y_t | y_<t)`` of one whole sequence."""
        log_p = torch.log_softmax(self.logits, -1)
        return torch.stack([log_p[self.index[tuple(sequence[:t])], sequence[t]] for t in range(self.length)])


@pytest.mark.parametrize('length', [2, 3])
def test_expected_gradient_at_discount_one_is_the_sequence_reverse_kl_gradient(length):
    """THE property at gamma = 1: over all 3^T sequences, sum_y pi_S(y) grad L(y) = grad KL(pi_S(y_1..T) ||
    pi_T(y_1..T)) exactly; the return-to-go carries the later tokens' log-ratios back to the earlier decisions (with
    gamma = 0 the two differ)."""
    student = TinyAutoregressive(3, length, seed=7, requires_grad=True)
    teacher = TinyAutoregressive(3, length, seed=8, scale=2.0)
    mask = torch.ones(1, length, dtype=torch.bool)
    expected = {0.0: torch.zeros_like(student.logits), 1.0: torch.zeros_like(student.logits)}
    kl = 0.0
    for sequence in itertools.product(range(3), repeat=length):
        log_s = student.token_logprobs(sequence)
        log_t = teacher.token_logprobs(sequence).detach()
        prob = log_s.sum().detach().exp()
        kl = kl + log_s.sum().exp() * (log_s.sum() - log_t.sum())
        for discount in expected:
            loss, _ = sampled_kl_loss(log_s[None], log_t[None], mask, discount, normaliser=1.0)
            (g, ) = torch.autograd.grad(loss, student.logits, retain_graph=True)
            expected[discount] += prob * g
    (kl_grad, ) = torch.autograd.grad(kl, student.logits)
    torch.testing.assert_close(expected[1.0], kl_grad, rtol=1e-11, atol=1e-12)
    assert (expected[0.0] - kl_grad).abs().max() > 1e-3  # the per-token estimator misses the future terms


@pytest.mark.parametrize('discount', [0.0, 0.5, 1.0])
def test_teacher_equal_to_student_gives_zero(discount):
    """pi_T = pi_S: every log-ratio, advantage, metric and gradient is exactly 0, for every sampled sequence."""
    model = TinyAutoregressive(3, 3, seed=9, requires_grad=True)
    mask = torch.tensor([[True, False, True]])
    for sequence in itertools.product(range(3), repeat=3):
        log_s = model.token_logprobs(sequence)[None]
        loss, metrics = sampled_kl_loss(log_s, log_s.detach().clone(), mask, discount)
        (g, ) = torch.autograd.grad(loss, model.logits)
        assert (g == 0).all() and metrics['reverse_kl'] == 0 and metrics['advantage'] == 0
        assert (discounted_returns(token_log_ratios(log_s, log_s, mask), mask, discount) == 0).all()


def test_gradient_flows_only_into_the_student_and_only_at_kept_positions():
    """Teacher log-probabilities and weights are constants; a masked position's student log-probability (even -inf)
    gets gradient 0 and leaves the loss finite."""
    student = torch.tensor([[-0.3, float('-inf'), -2.0]], dtype=torch.float64, requires_grad=True)
    teacher = torch.tensor([[-1.0, float('nan'), -0.1]], dtype=torch.float64, requires_grad=True)
    weights = torch.tensor([[1.0, float('nan'), 0.5]], dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 0, 1]])
    loss, _ = sampled_kl_loss(student, teacher, mask, 0.5, weights=weights)
    loss.backward()
    assert torch.isfinite(loss) and teacher.grad is None and weights.grad is None
    # A = [r0 + 0.5 r2, ., r2], r = [-0.7, ., 1.9]; N = 2
    torch.testing.assert_close(student.grad, torch.tensor([[-(-0.7 + 0.95) / 2, 0.0, -0.5 * 1.9 / 2]],
                                                          dtype=torch.float64))


@pytest.mark.parametrize('bad,match', [
    (dict(discount=-0.1), r'discount must be a number in \[0, 1\], got -0.1'),
    (dict(discount=1.5), r'discount must be a number in \[0, 1\], got 1.5'),
    (dict(discount=math.nan), r'discount must be a number in \[0, 1\], got nan'),
    (dict(normaliser=0.0), r'normaliser must be a finite number > 0.*got 0.0'),
    (dict(normaliser=math.inf), r'normaliser must be a finite number > 0.*got inf'),
    (dict(normaliser=torch.ones(2)), r'normaliser must be a scalar tensor, got shape \(2,\)'),
    (dict(teacher_logprobs=torch.zeros(2, 4)), r'teacher_logprobs has shape \(2, 4\).*student_logprobs \(2, 3\)'),
    (dict(mask=torch.ones(3, 2, dtype=torch.bool)), r'mask has shape \(3, 2\)'),
    (dict(weights=torch.ones(2, 3, 1)), r'weights has shape \(2, 3, 1\)'),
    (dict(student_logprobs=torch.zeros(6), teacher_logprobs=torch.zeros(6), mask=torch.ones(6, dtype=torch.bool)),
     r'student_logprobs must be 2-D \[batch, seq\], got shape \(6,\)'),
    (dict(sequence_starts=torch.ones(2, 4, dtype=torch.bool)), r'sequence_starts has shape \(2, 4\)'),
])
def test_argument_errors_name_the_argument_and_the_value(bad, match):
    args = dict(student_logprobs=torch.zeros(2, 3), teacher_logprobs=torch.zeros(2, 3),
                mask=torch.ones(2, 3, dtype=torch.bool))
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        sampled_kl_loss(**args)


def test_discounted_returns_argument_errors():
    with pytest.raises(ValueError, match=r'discount must be a number in \[0, 1\], got 2'):
        discounted_returns(torch.zeros(1, 2), torch.ones(1, 2, dtype=torch.bool), 2)
    with pytest.raises(ValueError, match=r'values must be 2-D'):
        discounted_returns(torch.zeros(2), torch.ones(2, dtype=torch.bool), 0.5)
    with pytest.raises(ValueError, match=r'student_logprobs has shape \(1, 3\).*teacher_logprobs \(1, 2\)'):
        token_log_ratios(torch.zeros(1, 2), torch.zeros(1, 3), torch.ones(1, 2, dtype=torch.bool))
