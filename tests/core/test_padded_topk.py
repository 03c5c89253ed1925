"""Issue 74 item 9: a top-k teacher's padded and ``-inf`` entries (a served teacher answering fewer than ``k`` ids,
``-inf`` log-probabilities, duplicate ids, a row with none) give no NaN value and no NaN gradient in any divergence
(generalized JSD at beta 0, 0.5, 1; the dense top-k loss, the fused loss's chunk math with and without the tail
bucket; the dense full-vocabulary loss on masked teacher logits), and the values are the definitions', in float64."""
import math

import pytest
import torch

from swift_gkd_plugin.core.divergence import align_vocab, generalized_jsd
from swift_gkd_plugin.core.fused.loss import fused_linear_jsd
from swift_gkd_plugin.core.teacher_signal import TeacherTopK
from swift_gkd_plugin.core.topk import topk_divergence_dense

NEG = float('-inf')
V, H, T = 11, 6, 1.3


def _teacher():
    """Rows: 0 a full top-4; 1 two ids answered, two padded slots (id 0, -inf); 2 a -inf log-prob inside; 3 a
    duplicate id; 4 nothing (every slot -inf)."""
    g = torch.Generator().manual_seed(0)
    full = torch.log_softmax(torch.randn(5, V, generator=g, dtype=torch.float64) * 2, -1)
    ids = torch.tensor([[2, 5, 7, 1], [4, 9, 0, 0], [3, 6, 8, 10], [3, 3, 5, 2], [0, 0, 0, 0]])
    lps = full.gather(-1, ids)
    lps[1, 2:] = NEG
    lps[2, 1] = NEG
    lps[4] = NEG
    return ids, lps


def _jsd(p_log, q_log, beta):
    """The generalized JSD of two log-distributions on one support (``-inf`` = probability 0), by its definition."""
    p, q = p_log.exp(), q_log.exp()

    def kl(a, a_log, b_log):
        return torch.where(a > 0, a * (a_log - b_log), torch.zeros_like(a)).sum(-1)

    if beta == 0:
        return kl(q, q_log, p_log)
    if beta == 1:
        return kl(p, p_log, q_log)
    m_log = torch.logaddexp(math.log(beta) + q_log, math.log(1 - beta) + p_log)
    return beta * kl(q, q_log, m_log) + (1 - beta) * kl(p, p_log, m_log)


def _reference(z, ids, lps, beta, tail):
    """Each row's divergence over the teacher's valid slots (renormalised), or with the tail bucket (its mass
    ``1 - sum exp(l)`` on the teacher's side, the student's mass outside the slots on its side), tempered."""
    out = []
    for r in range(z.shape[0]):
        valid = lps[r] > NEG
        if not valid.any():
            out.append(z.new_zeros(()))
            continue
        a, b = lps[r][valid], z[r][ids[r][valid]]
        if tail:
            outside = torch.ones(V, dtype=torch.bool)
            outside[ids[r][valid]] = False
            a = torch.cat([a, torch.log1p(-a.exp().sum()).reshape(1)])
            b = torch.cat([b, torch.logsumexp(z[r][outside], -1).reshape(1)])
        out.append(_jsd(torch.log_softmax(b / T, -1), torch.log_softmax(a / T, -1), beta))
    return torch.stack(out)


def _student():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(5, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64).requires_grad_()
    return hidden, weight


@pytest.mark.parametrize('beta', [0.0, 0.5, 1.0])
def test_dense_topk_loss_on_padded_answers_is_the_definition_without_nan(beta):
    ids, lps = _teacher()
    hidden, weight = _student()
    z = hidden @ weight.T
    per_token, _, covered = topk_divergence_dense(z, ids, lps, beta, T)
    assert covered.tolist() == [True, True, True, True, False]
    per_token.sum().backward()
    assert torch.isfinite(per_token).all() and torch.isfinite(weight.grad).all(), (per_token, weight.grad)
    keep = [0, 1, 2, 4]  # (row 3's duplicate: no NaN; its buckets below)
    expected = _reference(z.detach(), ids, lps, beta, tail=False)
    torch.testing.assert_close(per_token.detach()[keep].double(), expected[keep], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize('tail', [False, True])
@pytest.mark.parametrize('beta', [0.0, 0.5, 1.0])
def test_fused_topk_loss_on_padded_answers_is_the_definition_without_nan(beta, tail):
    ids, lps = _teacher()
    hidden, weight = _student()
    loss, _ = fused_linear_jsd(hidden, weight, teacher=TeacherTopK(ids, lps), beta=beta, temperature=T,
                               topk_tail=tail, chunk_size=2, normalizer=1.0, backend='torch')
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(weight.grad).all(), (loss, weight.grad)
    z = (hidden @ weight.detach().T)
    keep = [0, 1, 2, 4]
    mask = torch.tensor([True, True, True, False, True])
    ref_loss, _ = fused_linear_jsd(hidden, weight.detach(), teacher=TeacherTopK(ids, lps), mask=mask, beta=beta,
                                   temperature=T, topk_tail=tail, normalizer=1.0, backend='torch')
    expected = _reference(z, ids, lps, beta, tail)[keep].sum()
    torch.testing.assert_close(ref_loss.double(), expected, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize('beta', [0.0, 0.5, 1.0])
def test_dense_loss_on_masked_teacher_logits_has_no_nan(beta):
    """Full-vocabulary rows whose teacher logits are ``-inf`` on part of the vocabulary (a masked or padded head)."""
    hidden, weight = _student()
    z = hidden @ weight.T
    teacher = torch.log_softmax(torch.randn(5, V, dtype=torch.float64), -1)
    teacher[:, 7:] = NEG
    d = generalized_jsd(z, teacher, beta, T)
    d.sum().backward()
    assert not torch.isnan(d).any() and not torch.isnan(weight.grad).any(), (d, weight.grad)
    if beta == 0:  # KL(t || s): the masked entries carry no teacher mass, the definition is finite
        expected = _jsd(torch.log_softmax(z.detach() / T, -1), torch.log_softmax(teacher / T, -1), 0.0)
        torch.testing.assert_close(d.detach().double(), expected, rtol=1e-5, atol=1e-7)


def test_a_teacher_with_a_larger_vocabulary():
    """A teacher head of more rows than the student's (Qwen2.5-7B's 152,064 against 0.5B's 151,936; here 11 + 2):
    with ~0 mass on its extra rows the loss is the loss on the shared vocabulary; with mass there, the dense and
    fused losses compare ``[z_s, z_t extra]`` with ``z_t`` (ms-swift's rule: the extra logits are the same on both
    sides and get no gradient), and a top-k teacher's ids beyond the student's vocabulary are dropped to unused
    slots (their mass goes to the tail bucket)."""
    hidden, weight = _student()
    z = hidden @ weight.T
    teacher = torch.randn(5, V + 2, dtype=torch.float64)
    for extra, shared in ((-1e4, True), (3.0, False)):
        teacher[:, V:] = extra
        s, t = align_vocab(z, teacher)
        d = generalized_jsd(s, t, 0.5, T)
        if shared:
            torch.testing.assert_close(d, generalized_jsd(z, teacher[:, :V], 0.5, T), rtol=1e-12, atol=1e-15)
        else:
            expected = _jsd(torch.log_softmax(torch.cat([z, teacher[:, V:]], -1) / T, -1),
                            torch.log_softmax(teacher / T, -1), 0.5)
            torch.testing.assert_close(d.double(), expected.detach(), rtol=1e-5, atol=1e-7)
    ids = torch.tensor([[1, V + 1, 4, V]] * 5)
    lps = torch.log_softmax(torch.randn(5, V + 2, dtype=torch.float64), -1).gather(-1, ids)
    for tail in (False, True):
        dropped = lps.clone()
        dropped[:, [1, 3]] = NEG
        a, _ = fused_linear_jsd(hidden, weight.detach(), teacher=TeacherTopK(ids.clamp_max(V - 1), dropped),
                                beta=0.5, temperature=T, topk_tail=tail, normalizer=1.0, backend='torch')
        expected = _reference(z.detach(), ids.clamp_max(V - 1), dropped, 0.5, tail).sum()
        torch.testing.assert_close(a.double(), expected, rtol=1e-6, atol=1e-9)
        per_token, _, _ = topk_divergence_dense(z.detach(), ids, lps, 0.5, T)
        if not tail:
            torch.testing.assert_close(per_token.sum().double(), expected, rtol=1e-5, atol=1e-7)
