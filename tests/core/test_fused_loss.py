"""fused_linear_jsd against a float64 autograd reference that materialises the full logits."""
from __future__ import annotations

import math

import pytest
import torch

from swift_gkd_plugin.core.divergence import align_vocab, generalized_jsd
from swift_gkd_plugin.core.fused.loss import fused_linear_jsd
from swift_gkd_plugin.core.row_divergence import Divergence
from swift_gkd_plugin.core.teacher_signal import TeacherHead, TeacherTopK
from swift_gkd_plugin.core.policy_gradient import policy_gradient_loss, sampled_token_stats

pytestmark = pytest.mark.quick  # core math: part of `pytest -m quick`

N, HS, HT, V = 37, 16, 12, 50
NEG_INF = float('-inf')


# --------------------------------------------------------------------------------------------------------------
# reference: dense float64, autograd, written from the definitions
# --------------------------------------------------------------------------------------------------------------


def _terms(p, x, y):
    """sum_v p (x - y), zero where p == 0 (double where: no NaN in the value or the gradient)."""
    keep = p > 0
    return (p * torch.where(keep, x - torch.where(keep, y, torch.zeros_like(y)), torch.zeros_like(x))).sum(-1)


def ref_divergence(s_logits, t_logits, beta, temperature):
    s = torch.log_softmax(s_logits / temperature, -1)
    t = torch.log_softmax(t_logits / temperature, -1)
    ps, pt = s.exp(), t.exp()
    if beta == 0:
        return _terms(pt, t, s)
    if beta == 1:
        return _terms(ps, s, t)
    both = (ps == 0) & (pt == 0)
    zero = torch.zeros_like(s)
    m = torch.logaddexp(torch.where(both, zero, s) + math.log1p(-beta), torch.where(both, zero, t) + math.log(beta))
    m = torch.where(both, torch.full_like(m, NEG_INF), m)
    return beta * _terms(pt, t, m) + (1 - beta) * _terms(ps, s, m)


def ref_align(zs, zt):
    vs, vt = zs.shape[-1], zt.shape[-1]
    if vs < vt:
        zs = torch.cat([zs, zt[:, vs:]], -1)
    elif vs > vt:
        zt = torch.cat([zt, zs[:, vt:].detach()], -1)
    return zs, zt


def ref_topk_buckets(z, ids, lp, tail):
    """Student and teacher bucket logits for a top-k teacher, from the module docstring."""
    valid = lp > NEG_INF
    y = torch.where(valid, z.gather(1, ids), torch.full_like(lp, NEG_INF))
    if not tail:
        return y, lp
    # unused slots may repeat a valid id: count instead of writing booleans
    in_k = torch.zeros_like(z, dtype=torch.long).scatter_add(1, torch.where(valid, ids, 0), valid.long()) > 0
    empty = in_k.all(-1, keepdim=True)
    comp = torch.where(in_k, torch.full_like(z, NEG_INF), z)
    comp = torch.where(empty, torch.zeros_like(z), comp)  # keep logsumexp's gradient finite on empty rows
    y_tail = torch.where(empty, torch.full_like(y[:, :1], NEG_INF), comp.logsumexp(-1, keepdim=True))
    mass = lp.exp().sum(-1, keepdim=True)
    t_tail = torch.where(empty | (mass >= 1), torch.full_like(mass, NEG_INF), torch.log1p(-mass.clamp(max=1)))
    return torch.cat([y, y_tail], 1), torch.cat([lp, t_tail], 1)


def reference(hs, w, b=None, *, ht=None, wt=None, bt=None, ids=None, lp=None, mask=None, labels=None, beta=0.5,
              temperature=1.0, sft_alpha=0.0, topk_tail=False, normalizer=None, label_weights=None,
              label_temperature=1.0):
    """Returns (loss, grads of hs, w, b in float64, per-token divergences)."""
    hs64 = hs.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    b64 = None if b is None else b.detach().double().requires_grad_()
    z = hs64 @ w64.T + (0 if b64 is None else b64)
    if wt is not None:
        zt = ht.double() @ wt.double().T + (0 if bt is None else bt.double())
        zs_al, zt_al = ref_align(z, zt)
        d = ref_divergence(zs_al, zt_al, beta, temperature)
        covered = torch.ones(z.shape[0], dtype=torch.bool)
    else:
        lp64 = lp.double()
        covered = (lp64 > NEG_INF).any(-1)
        # uncovered rows are dropped below; give them a harmless finite teacher (half the mass) meanwhile
        lp64 = torch.where(covered[:, None], lp64, torch.full_like(lp64, math.log(0.5 / lp64.shape[1])))
        y, tl = ref_topk_buckets(z, ids.long(), lp64, topk_tail)
        d = ref_divergence(y, tl, beta, temperature)
    active = covered if mask is None else covered & mask
    d_act = d[active]
    norm = active.sum() if normalizer is None else normalizer
    loss = d_act.sum() / norm if float(norm) != 0 else d_act.sum() * 0
    if sft_alpha:
        keep = active & (labels != -100)
        ce = torch.nn.functional.cross_entropy(z[keep] / label_temperature, labels[keep], reduction='none')
        ce = (ce * (1 if label_weights is None else label_weights[keep].double())).sum()
        if keep.any():
            loss = loss + sft_alpha * ce / keep.sum()
    loss.backward()
    grads = (hs64.grad, w64.grad, None if b64 is None else b64.grad)
    return loss.detach(), grads, d.detach(), active


# --------------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------------


def make_inputs(seed=0, n=N, hs=HS, ht=HT, v=V, vt=V, bias=True, dtype=torch.float32, scale=2.0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, s=1.0):
        return (torch.randn(*shape, generator=g) * s).to(dtype)

    x = dict(hs=r(n, hs), w=r(v, hs, s=scale / math.sqrt(hs)), ht=r(n, ht), wt=r(vt, ht, s=scale / math.sqrt(ht)))
    x['b'] = r(v, s=0.5) if bias else None
    x['bt'] = r(vt, s=0.5) if bias else None
    x['mask'] = torch.rand(n, generator=g) > 0.25
    x['labels'] = torch.randint(0, v, (n, ), generator=g)
    x['labels'][torch.rand(n, generator=g) < 0.3] = -100
    return x


def topk_of(x, k, unused=0, drop_row=True):
    """Teacher top-k from the teacher head: full-vocab log-probs at T=1; ``unused`` trailing slots of every third
    row are -inf (with garbage ids), and with ``drop_row`` row 5 has no information at all."""
    zt = (x['ht'].double() @ x['wt'].double().T + x['bt'].double()).float()
    lp, ids = torch.log_softmax(zt, -1).topk(k, -1)
    if unused:
        lp[::3, k - unused:] = NEG_INF
        ids[::3, k - unused:] = 0
    if drop_row:
        lp[5] = NEG_INF
    return ids, lp


def run(x, *, topk=None, device=None, **kw):
    """The fused loss and its gradients on ``x``; with ``device``, run there (inputs and tensor arguments moved) and
    returned on the CPU."""
    if device is not None:
        x, topk = {k: None if v is None else v.to(device) for k, v in x.items()}, to_device(topk, device)
        kw = {k: to_device(v, device) for k, v in kw.items()}
    hs = x['hs'].clone().requires_grad_()
    w = x['w'].clone().requires_grad_()
    b = None if x['b'] is None else x['b'].clone().requires_grad_()
    if topk is None:
        loss, stats = fused_linear_jsd(hs, w, b, teacher=TeacherHead(x['ht'], x['wt'], x['bt']), **kw)
    else:
        loss, stats = fused_linear_jsd(hs, w, b, teacher=TeacherTopK(topk[0], topk[1]), **kw)
    loss.backward()
    out = loss.detach(), (hs.grad, w.grad, None if b is None else b.grad), stats
    return out if device is None else to_device(out, 'cpu')


def to_device(obj, device):
    """``obj`` (a tensor, or a dict / list / tuple of them; anything else kept) on ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def ref_of(x, *, topk=None, **kw):
    kw = dict(kw)
    kw.pop('chunk_size', None)
    kw['topk_tail'] = kw.get('topk_tail', False)
    if topk is None:
        return reference(x['hs'], x['w'], x['b'], ht=x['ht'], wt=x['wt'], bt=x['bt'], **kw)
    return reference(x['hs'], x['w'], x['b'], ids=topk[0], lp=topk[1], **kw)


def rel_err(got, want):
    got, want = got.double(), want.double()
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))


def assert_close(got, ref, tol=1e-5, loss_scale=0.0):
    """``loss_scale``: the size of the terms that make up the loss, when signed terms may cancel to near 0."""
    loss, grads, _ = got
    rloss, rgrads, _, _ = ref
    assert torch.isfinite(loss)
    assert abs(float(loss) - float(rloss)) <= tol * max(abs(float(rloss)), loss_scale), (float(loss), float(rloss))
    for name, g, rg in zip(('hidden', 'weight', 'bias'), grads, rgrads):
        if rg is None:
            assert g is None
            continue
        assert torch.isfinite(g).all(), name
        assert rel_err(g, rg) <= tol, (name, rel_err(g, rg))


BETAS = [0.0, 0.1, 0.5, 0.9, 1.0]
TEMPS = [0.5, 1.0, 2.0]

# --------------------------------------------------------------------------------------------------------------
# full-vocabulary teacher
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize('temperature', TEMPS)
@pytest.mark.parametrize('beta', BETAS)
def test_full_vocab_matches_reference(beta, temperature):
    x = make_inputs(seed=int(beta * 10) + int(temperature * 4))
    chunk_size = 64 if temperature == 1 else 6  # 6 does not divide the active count, 64 exceeds it
    kw = dict(mask=x['mask'], beta=beta, temperature=temperature)
    got = run(x, chunk_size=chunk_size, **kw)
    ref = ref_of(x, **kw)
    assert_close(got, ref)
    _, _, stats = got
    _, _, d, active = ref
    assert int(stats['num_tokens']) == int(active.sum())
    assert rel_err(stats['divergence_sum'], d[active].sum()) <= 1e-5


@pytest.mark.parametrize('beta', [0.0, 0.5, 1.0])
def test_no_mask_no_bias_divisible_chunks(beta):
    x = make_inputs(seed=3, n=36, bias=False)
    kw = dict(beta=beta, temperature=1.0)
    assert_close(run(x, chunk_size=12, **kw), ref_of(x, **kw))


@pytest.mark.parametrize('vt', [V + 7, V - 5])
@pytest.mark.parametrize('beta', [0.0, 0.5, 1.0])
def test_vocab_mismatch_and_teacher_hidden_size(vt, beta):
    x = make_inputs(seed=4, vt=vt, ht=24)
    kw = dict(mask=x['mask'], beta=beta, temperature=2.0)
    assert_close(run(x, chunk_size=8, **kw), ref_of(x, **kw))


@pytest.mark.parametrize('temperature', [1.0, 2.0])
@pytest.mark.parametrize('beta', [0.0, 0.5, 1.0])
@pytest.mark.parametrize('vt', [V, V + 7])
def test_sft_term(beta, temperature, vt):
    x = make_inputs(seed=5, vt=vt)
    kw = dict(mask=x['mask'], labels=x['labels'], beta=beta, temperature=temperature, sft_alpha=0.7)
    got = run(x, chunk_size=10, **kw)
    assert_close(got, ref_of(x, **kw))
    stats = got[2]
    keep = x['mask'] & (x['labels'] != -100)
    z = x['hs'].double() @ x['w'].double().T + x['b'].double()
    ce = torch.nn.functional.cross_entropy(z[keep], x['labels'][keep], reduction='sum')
    assert int(stats['num_sft_tokens']) == int(keep.sum())
    assert rel_err(stats['sft_sum'], ce) <= 1e-5


def test_top1_agreement_and_custom_normalizer():
    x = make_inputs(seed=6)
    norm = torch.tensor(11.0)
    kw = dict(mask=x['mask'], beta=0.5, normalizer=norm)
    got = run(x, chunk_size=7, **kw)
    assert_close(got, ref_of(x, **kw))
    m = x['mask']
    zs = x['hs'] @ x['w'].T + x['b']
    zt = x['ht'] @ x['wt'].T + x['bt']
    assert int(got[2]['top1_agree']) == int((zs.argmax(-1) == zt.argmax(-1))[m].sum())


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
@pytest.mark.parametrize('beta', [0.0, 0.5, 1.0])
def test_half_inputs(dtype, beta):
    x = make_inputs(seed=7, dtype=dtype)
    kw = dict(mask=x['mask'], labels=x['labels'], beta=beta, temperature=1.0, sft_alpha=0.3)
    loss, grads, _ = run(x, chunk_size=9, **kw)
    assert loss.dtype == torch.float32
    assert [g.dtype for g in grads] == [dtype] * 3
    assert_close((loss, grads, None), ref_of(x, **kw), tol=2e-2)


@pytest.mark.parametrize('beta', BETAS)
def test_masked_vocab_entries_no_nan(beta):
    """-inf bias entries (on both heads, as for padded vocabularies) must not produce NaN or Inf."""
    x = make_inputs(seed=8)
    x['b'][[3, 17, 40]] = NEG_INF
    x['bt'][[3, 17, 40]] = NEG_INF
    x['labels'][torch.isin(x['labels'], torch.tensor([3, 17, 40]))] = 4  # a masked label is an infinite CE
    kw = dict(mask=x['mask'], labels=x['labels'], beta=beta, temperature=0.5, sft_alpha=0.5)
    loss, grads, _ = got = run(x, chunk_size=8, **kw)
    assert_close(got, ref_of(x, **kw))
    assert float(grads[1][[3, 17, 40]].abs().max()) == 0.0


@pytest.mark.parametrize('beta', [0.1, 0.5, 0.9])
def test_student_only_masked_entries(beta):
    """Only the student masks entries: the mixture keeps the divergence finite for 0 < beta < 1."""
    x = make_inputs(seed=9)
    x['b'][[0, 1, 2, 30]] = NEG_INF
    kw = dict(mask=x['mask'], beta=beta, temperature=1.0)
    assert_close(run(x, chunk_size=8, **kw), ref_of(x, **kw))


def test_empty_chunk_and_empty_batch():
    x = make_inputs(seed=10)
    mask = x['mask'].clone()
    mask[:16] = False  # the first chunks of 8 tokens hold no active token
    kw = dict(mask=mask, beta=0.5, labels=x['labels'], sft_alpha=0.5)
    assert_close(run(x, chunk_size=8, **kw), ref_of(x, **kw))

    for topk in (None, topk_of(x, 5)):
        loss, grads, stats = run(x, topk=topk, mask=torch.zeros(N, dtype=torch.bool), beta=0.5,
                                 labels=x['labels'], sft_alpha=0.5)
        assert float(loss) == 0.0 and int(stats['num_tokens']) == 0
        for g in grads:
            assert torch.equal(g, torch.zeros_like(g))


def test_grad_output_scaling_no_grad_and_batch_dims():
    x = make_inputs(seed=11)
    hs = x['hs'].clone().requires_grad_()
    loss, _ = fused_linear_jsd(hs.view(1, N, HS), x['w'], teacher=TeacherHead(x['ht'].view(1, N, HT), x['wt']),
                               mask=x['mask'].view(1, N), beta=0.5)
    (3 * loss).backward()
    _, (g_ref, _, _), _ = run(dict(x, b=None, bt=None), mask=x['mask'], beta=0.5)
    assert rel_err(hs.grad, 3 * g_ref) <= 1e-6
    with torch.no_grad():
        loss2, _ = fused_linear_jsd(hs, x['w'], teacher=TeacherHead(x['ht'], x['wt']), mask=x['mask'],
                                    beta=0.5)
    assert not loss2.requires_grad and rel_err(loss2, loss.detach()) <= 1e-6


# --------------------------------------------------------------------------------------------------------------
# top-k teacher
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize('bad_id', [-1, 16])
def test_topk_ids_outside_the_vocabulary_are_refused_where_they_count(bad_id):
    """An id outside [0, V) in a slot with a finite log-probability of an active row is refused; the same id in an
    unused slot (-inf), or in a row the mask leaves out, is not read."""
    torch.manual_seed(0)
    n, h, v, k = 4, 8, 16, 3
    hidden, weight = torch.randn(n, h), torch.randn(v, h)
    ids = torch.randint(0, v, (n, k))
    logprobs = torch.log_softmax(torch.randn(n, k), -1)
    ids[1, 2] = bad_id
    with pytest.raises(ValueError, match=r'teacher top-k ids must lie in \[0, 16\)'):
        fused_linear_jsd(hidden, weight, teacher=TeacherTopK(ids, logprobs))
    unused = logprobs.clone()
    unused[1, 2] = float('-inf')
    fused_linear_jsd(hidden, weight, teacher=TeacherTopK(ids, unused))
    fused_linear_jsd(hidden, weight, teacher=TeacherTopK(ids, logprobs), mask=torch.tensor([True, False, True, True]))


@pytest.mark.parametrize('tail', [False, True])
@pytest.mark.parametrize('temperature', TEMPS)
@pytest.mark.parametrize('beta', BETAS)
def test_topk_matches_reference(beta, temperature, tail):
    x = make_inputs(seed=12 + int(beta * 10))
    topk = topk_of(x, 8, unused=3)
    kw = dict(mask=x['mask'], beta=beta, temperature=temperature, topk_tail=tail)
    got = run(x, topk=topk, chunk_size=7, **kw)
    ref = ref_of(x, topk=topk, **kw)
    assert_close(got, ref)
    assert int(got[2]['num_tokens']) == int(ref[3].sum())  # the uncovered row is inactive


@pytest.mark.parametrize('tail', [False, True])
@pytest.mark.parametrize('beta', [0.0, 0.5, 1.0])
def test_topk_sft_and_masked_entries(beta, tail):
    x = make_inputs(seed=13)
    x['b'][[3, 17]] = NEG_INF
    x['bt'][[3, 17]] = NEG_INF  # the teacher never reports a token the student cannot produce
    x['labels'][torch.isin(x['labels'], torch.tensor([3, 17]))] = 4
    topk = topk_of(x, 6, unused=2)
    kw = dict(mask=x['mask'], labels=x['labels'], beta=beta, temperature=2.0, topk_tail=tail, sft_alpha=0.4)
    assert_close(run(x, topk=topk, chunk_size=10, **kw), ref_of(x, topk=topk, **kw))


def test_topk_top1_agreement():
    x = make_inputs(seed=14)
    topk = topk_of(x, 4)
    _, _, stats = run(x, topk=topk, mask=x['mask'], beta=0.5)
    zs = x['hs'] @ x['w'].T + x['b']
    active = x['mask'] & (topk[1] > NEG_INF).any(-1)
    assert int(stats['top1_agree']) == int((zs.argmax(-1) == topk[0][:, 0])[active].sum())


@pytest.mark.parametrize('temperature', TEMPS)
@pytest.mark.parametrize('beta', [0.0, 0.5, 1.0])
def test_tail_with_full_support_equals_full_loss(beta, temperature):
    """k == V: the tail is empty on both sides and the loss is the full-vocabulary one (at every T)."""
    x = make_inputs(seed=15)
    topk = topk_of(x, V, drop_row=False)
    kw = dict(mask=x['mask'], beta=beta, temperature=temperature)
    got = run(x, topk=topk, topk_tail=True, chunk_size=9, **kw)
    full = run(x, chunk_size=9, **kw)
    assert rel_err(got[0], full[0]) <= 1e-5
    for g, fg in zip(got[1], full[1]):
        assert rel_err(g, fg) <= 1e-5


def test_tail_error_decreases_with_k():
    x = make_inputs(seed=16, scale=4.0)
    kw = dict(mask=x['mask'], beta=0.5, temperature=1.0)
    full = float(run(x, **kw)[0])
    errs = []
    for k in (2, 5, 10, 20, 35, V):
        topk = topk_of(x, k, drop_row=False)
        errs.append(abs(float(run(x, topk=topk, topk_tail=True, **kw)[0]) - full))
    assert all(b < a for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] <= 1e-5 * full


def test_argument_errors():
    x = make_inputs()
    with pytest.raises(ValueError):
        fused_linear_jsd(x['hs'], x['w'])
    with pytest.raises(ValueError):
        fused_linear_jsd(x['hs'], x['w'], teacher=TeacherHead(x['ht'], x['wt']), beta=1.5)
    with pytest.raises(ValueError):
        fused_linear_jsd(x['hs'], x['w'], teacher=TeacherHead(x['ht'], x['wt']), sft_alpha=1.0)
    ids, lp = topk_of(x, 4)
    with pytest.raises(ValueError):
        fused_linear_jsd(x['hs'], x['w'], teacher=TeacherTopK(ids + V, lp))


@pytest.mark.parametrize('bad', [dict(sft_alpha=-1.0), dict(sft_alpha=float('nan')), dict(temperature=float('inf')),
                                 dict(temperature=float('nan'))],
                         ids=['sft_alpha=-1', 'sft_alpha=nan', 'temperature=inf', 'temperature=nan'])
def test_non_finite_or_negative_weights_are_refused(bad):
    """A negative SFT weight would train the student away from the labels (the dense loss ignores it); an infinite
    temperature makes both distributions uniform: a zero loss with zero gradients."""
    x = make_inputs()
    name = next(iter(bad))
    with pytest.raises(ValueError, match=name):
        fused_linear_jsd(x['hs'], x['w'], teacher=TeacherHead(x['ht'], x['wt']), labels=x['labels'], **bad)
    if name == 'temperature':
        with pytest.raises(ValueError, match=name):
            logits = x['hs'] @ x['w'].t()
            generalized_jsd(logits, logits, 0.5, **bad)


# --------------------------------------------------------------------------------------------------------------
# the label term with signed per-token weights at its own temperature (the policy-gradient term of on-policy
# steps: labels = sampled tokens, label_weights = advantages), and the entropy of the student's tempered rows
# --------------------------------------------------------------------------------------------------------------

TEACHERS = ['head', 'head_larger', 'head_smaller', 'topk', 'topk_tail']


def teacher_case(teacher, seed):
    """Inputs with signed advantages, and the top-k table / tail flag of the teacher kind."""
    x = make_inputs(seed=seed, vt={'head_larger': V + 7, 'head_smaller': V - 5}.get(teacher, V))
    x['advantages'] = torch.randn(N, generator=torch.Generator().manual_seed(seed)) * 2
    topk = topk_of(x, 8, unused=3) if teacher.startswith('topk') else None
    return x, topk, dict(topk_tail=teacher == 'topk_tail')


def student_logits64(x):
    return x['hs'].double() @ x['w'].double().T + x['b'].double()


def teacher_entropy64(x, topk, tail, active, temperature):
    """Float64 sum over ``active`` rows of the teacher's entropy at ``temperature``: its own head's
    ``softmax(z_t / T)``, or a top-k teacher's bucket distribution (renormalised top-k, or with the tail bucket)."""
    return teacher_row_entropies64(x, topk, tail, active, temperature).sum()


def teacher_row_entropies64(x, topk, tail, active, temperature):
    """:func:`teacher_entropy64` per ``active`` row."""
    if topk is None:
        zt = x['ht'].double() @ x['wt'].double().T + x['bt'].double()
        return torch.special.entr(torch.softmax(zt[active] / temperature, -1)).sum(-1)
    lp = topk[1][active].double()
    if tail:
        lp = torch.cat([lp, torch.log1p(-lp.exp().sum(-1, keepdim=True))], -1)
    return torch.special.entr(torch.softmax(lp / temperature, -1)).sum(-1)


@pytest.mark.parametrize('temperature, label_temperature', [(1.0, 1.0), (1.0, 0.7), (1.5, 1.0), (1.5, 0.7),
                                                            (1.5, 1.5)])
@pytest.mark.parametrize('beta', [0.0, 0.5, 1.0])
@pytest.mark.parametrize('teacher', TEACHERS)
def test_weighted_label_term_and_entropy(teacher, beta, temperature, label_temperature):
    x, topk, kw = teacher_case(teacher, seed=30 + int(beta * 2))
    kw.update(mask=x['mask'], labels=x['labels'], beta=beta, temperature=temperature, sft_alpha=0.6,
              label_weights=x['advantages'], label_temperature=label_temperature)
    got = run(x, topk=topk, chunk_size=6 if beta == 0.5 else 16, return_entropy=True, **kw)
    ref = ref_of(x, topk=topk, **kw)
    stats, active, z = got[2], ref[3], student_logits64(x)
    keep = active & (x['labels'] != -100)
    ce = torch.nn.functional.cross_entropy(z[keep] / label_temperature, x['labels'][keep], reduction='none')
    weights = x['advantages'][keep].double()
    # advantages of both signs: the loss may cancel to near 0, so its error is measured against its terms' size
    assert_close(got, ref, loss_scale=float(ref[2][active].mean() + 0.6 * (weights.abs() * ce).mean()))
    assert abs(float(stats['sft_sum']) - float((ce * weights).sum())) <= 1e-5 * float((ce * weights.abs()).sum())
    entropy = torch.special.entr(torch.softmax(z[active] / temperature, -1)).sum()
    assert stats['entropy_sum'].dtype == torch.float32 and not stats['entropy_sum'].requires_grad
    assert rel_err(stats['entropy_sum'], entropy) <= 1e-5
    # the teacher's entropy at the same rows and temperature (gkd/teacher_entropy)
    t_entropy = teacher_entropy64(x, topk, kw['topk_tail'], active, temperature)
    assert stats['teacher_entropy_sum'].dtype == torch.float32 and not stats['teacher_entropy_sum'].requires_grad
    assert rel_err(stats['teacher_entropy_sum'], t_entropy) <= 1e-5


@pytest.mark.parametrize('teacher', TEACHERS)
def test_entropy_fkl_rows_count_the_gated_positions(teacher):
    """``stats['entropy_fkl_rows']`` (``gkd/entropy_fkl_fraction``'s numerator): with the entropy-aware mix and
    ``return_entropy``, the active rows whose float64 teacher entropy (``teacher_entropy_sum``'s) exceeds the
    threshold, over several chunks; without the mix the key is absent."""
    x, topk, kw = teacher_case(teacher, seed=52)
    temperature = 1.3
    active = ref_of(x, topk=topk, mask=x['mask'], temperature=temperature, **kw)[3]
    h = teacher_row_entropies64(x, topk, kw['topk_tail'], active, temperature).sort(descending=True).values
    tau = float(h[4] + h[5]) / 2  # gates 5 of the active rows, none of them near the threshold
    gate = Divergence('jsd', beta=0.5, fkl_above_entropy=tau)
    stats = run(x, topk=topk, mask=x['mask'], temperature=temperature, divergence=gate, chunk_size=5,
                return_entropy=True, backend='torch', **kw)[2]
    assert int(stats['entropy_fkl_rows']) == 5 < int(active.sum())
    plain = run(x, topk=topk, mask=x['mask'], temperature=temperature, chunk_size=5, return_entropy=True, **kw)[2]
    assert 'entropy_fkl_rows' not in plain


@pytest.mark.parametrize('temperature', [0.7, 1.0])
@pytest.mark.parametrize('vt', [V, V + 7])
def test_fused_equals_dense_policy_gradient(vt, temperature):
    """``fused_linear_jsd`` with sampled tokens as labels and advantages as weights is the dense divergence plus
    ``policy_gradient_loss(sampled_token_stats(z, y, T))``, in value, gradients and entropy."""
    x, _, _ = teacher_case('head_larger' if vt > V else 'head', seed=41)
    y, advantages, c, n = x['labels'], x['advantages'], 0.3, 29.0  # n: the trainer's token count, not N
    params = [t.clone().requires_grad_() for t in (x['hs'], x['w'], x['b'])]
    loss, stats = fused_linear_jsd(*params, teacher=TeacherHead(x['ht'], x['wt'], x['bt']),
                                   labels=y, beta=0.5, temperature=temperature, sft_alpha=c,
                                   label_weights=advantages, label_temperature=temperature, normalizer=n,
                                   sft_normalizer=n, return_entropy=True)
    grads = torch.autograd.grad(loss, params)

    z = params[0] @ params[1].T + params[2]
    zs, zt = align_vocab(z, x['ht'] @ x['wt'].T + x['bt'])
    logprobs, entropy = sampled_token_stats(z, y, temperature)
    dense = (generalized_jsd(zs, zt, 0.5, temperature).sum() / n
             + c * policy_gradient_loss(logprobs, advantages).sum() / n)
    dense_grads = torch.autograd.grad(dense, params)
    assert rel_err(loss.detach(), dense.detach()) <= 1e-5
    for g, dg in zip(grads, dense_grads):
        assert rel_err(g, dg) <= 1e-5
    assert rel_err(stats['entropy_sum'], entropy.sum()) <= 1e-5


@pytest.mark.parametrize('bad, message', [
    (dict(label_weights=torch.ones(N - 1)), 'label_weights'),
    (dict(label_weights=torch.full((N, ), float('nan'))), 'label_weights'),
    (dict(label_weights=torch.tensor([float('inf')] * N)), 'label_weights'),
    (dict(label_weights=torch.ones(N), labels=None, sft_alpha=0.0), 'label_weights'),
    (dict(label_temperature=0.0), 'label_temperature'),
    (dict(label_temperature=-1.0), 'label_temperature'),
    (dict(label_temperature=float('inf')), 'label_temperature'),
    (dict(label_temperature=float('nan')), 'label_temperature'),
], ids=['shape', 'nan', 'inf', 'no_labels', 't=0', 't<0', 't=inf', 't=nan'])
def test_bad_label_weights_and_temperature_are_refused(bad, message):
    x = make_inputs()
    kw = {**dict(labels=x['labels'], sft_alpha=0.5), **bad}
    with pytest.raises(ValueError, match=message):
        fused_linear_jsd(x['hs'], x['w'], teacher=TeacherHead(x['ht'], x['wt']), **kw)


# --------------------------------------------------------------------------------------------------------------
# precision at a real vocabulary size (V = 151,936). The inputs are dyadic (hidden states k/16, weights m/2^12,
# small integers k, m) so that the float32 logits are exact: the float64 reference then sees the very logits the
# loss sees, and the errors measured are the loss's own.
# --------------------------------------------------------------------------------------------------------------

V_BIG, N_BIG, H_BIG = 151936, 64, 32
W_UNIT = 2.0**-12


def _dyadic_hidden(g):
    return torch.randint(-32, 33, (N_BIG, H_BIG), generator=g).float() / 16


def _dyadic_weight_units(g):
    return (torch.randn(V_BIG, H_BIG, generator=g) / math.sqrt(H_BIG) / W_UNIT).round()


@pytest.fixture(scope='module')
def big_inputs():
    """Student, an unrelated teacher and a teacher whose head differs from the student's by ~1% (same hidden)."""
    g = torch.Generator().manual_seed(0)
    hs, units = _dyadic_hidden(g), _dyadic_weight_units(g)
    near_units = units + (0.01 * units.abs().mean() * torch.randn(V_BIG, H_BIG, generator=g)).round()
    exact = hs.double() @ (units * W_UNIT).double().T
    assert torch.equal(exact.float().double(), exact)  # float32 logits are exact
    return dict(hs=hs, w=units * W_UNIT, ht=_dyadic_hidden(g), wt=_dyadic_weight_units(g) * W_UNIT,
                w_near=near_units * W_UNIT)


def _fused_and_reference(hs, w, ht, wt, beta):
    got = run(dict(hs=hs, w=w, b=None, ht=ht, wt=wt, bt=None), beta=beta)
    return got, reference(hs, w, ht=ht, wt=wt, beta=beta)


def _errors(got, ref):
    (loss, grads, _), (rloss, rgrads, _, _) = got, ref
    return rel_err(loss, rloss), rel_err(grads[0], rgrads[0]), rel_err(grads[1], rgrads[1])


@pytest.mark.parametrize('beta', [0.0, 0.5, 1.0])
def test_large_vocab_matches_float64(big_inputs, beta):
    """Unrelated teacher: value and gradients against float64 (measured: value <= 7e-8, gradients <= 1.2e-6;
    before: 1.4e-6 and 2e-5)."""
    x = big_inputs
    value, hidden, weight = _errors(*_fused_and_reference(x['hs'], x['w'], x['ht'], x['wt'], beta))
    assert value <= 1e-6 and hidden <= 1e-5 and weight <= 1e-5, (value, hidden, weight)


@pytest.mark.parametrize('beta', [0.0, 0.5, 1.0])
def test_large_vocab_near_identical_matches_float64(big_inputs, beta):
    """Student ~ teacher (D ~ 1e-5): every first-order term cancels, so any rounding shared by a row shows here.

    Measured: value <= 4e-8, gradients <= 3e-5 relative (before: value up to 3.5e-2, gradients up to 2.3e-2).
    """
    x = big_inputs
    value, hidden, weight = _errors(*_fused_and_reference(x['hs'], x['w'], x['hs'], x['w_near'], beta))
    assert value <= 1e-6 and hidden <= 2e-4 and weight <= 2e-4, (value, hidden, weight)


@pytest.mark.parametrize('beta', [0.0, 0.3, 0.5, 1.0])
def test_identical_distributions_give_exact_zero(big_inputs, beta):
    x = big_inputs
    loss, grads, stats = run(dict(hs=x['hs'], w=x['w'], b=None, ht=x['hs'], wt=x['w'], bt=None), beta=beta)
    assert float(loss) == 0.0 and float(stats['divergence_sum']) == 0.0
    assert float(grads[0].abs().max()) == 0.0 and float(grads[1].abs().max()) == 0.0


@pytest.mark.parametrize('beta, side', [(0.0, 'teacher'), (1.0, 'student')])
def test_far_apart_and_masked_entries_at_the_kl_endpoints(beta, side):
    """Entries where one side is 60 nats below the other (past the 40-nat switch) or masked, on the side whose
    zero probability keeps the KL finite: the value and gradients still match float64."""
    x = make_inputs(seed=21)
    bias = x['bt'] if side == 'teacher' else x['b']
    bias[[2, 9, 33]] -= 60.0
    bias[[5, 40]] = float('-inf')
    kw = dict(mask=x['mask'], beta=beta, temperature=0.5)
    got, ref = run(x, chunk_size=8, **kw), reference(x['hs'], x['w'], x['b'], ht=x['ht'], wt=x['wt'], bt=x['bt'],
                                                       mask=x['mask'], beta=beta, temperature=0.5)
    value, hidden, weight = _errors(got, ref)
    assert value <= 1e-5 and hidden <= 1e-5 and weight <= 1e-5, (value, hidden, weight)


@pytest.mark.parametrize('beta', [0.0, 0.5, 1.0])
@pytest.mark.parametrize('teacher', ['head', 'topk', 'topk_tail'])
@pytest.mark.parametrize('shape', [(0, ), (1, 0), (2, 0)])
def test_batch_without_any_token(teacher, beta, shape):
    """No response token at all (N = 0, with or without batch dims): a zero loss with zero gradients, no error."""
    x = make_inputs(seed=22)
    hs = torch.zeros(*shape, x['hs'].shape[1]).requires_grad_()
    w = x['w'].clone().requires_grad_()
    b = x['b'].clone().requires_grad_()
    labels = torch.zeros(shape, dtype=torch.long)
    if teacher == 'head':
        side = dict(teacher=TeacherHead(torch.zeros(*shape, x['ht'].shape[1]), x['wt'], x['bt']))
    else:
        ids, lp = topk_of(x, 5, drop_row=False)
        side = dict(teacher=TeacherTopK(ids[:0].reshape(*shape, 5), lp[:0].reshape(*shape, 5)))
    loss, stats = fused_linear_jsd(hs, w, b, **side, mask=torch.ones(shape, dtype=torch.bool), labels=labels,
                                   beta=beta, temperature=2.0, sft_alpha=0.5, topk_tail=teacher == 'topk_tail',
                                   label_weights=torch.ones(shape), label_temperature=0.7, return_entropy=True)
    loss.backward()
    assert float(loss.detach()) == 0.0 and int(stats['num_tokens']) == 0 and int(stats['num_sft_tokens']) == 0
    assert float(stats['entropy_sum']) == 0.0 and float(stats['sft_sum']) == 0.0
    assert hs.grad.shape == hs.shape
    assert float(w.grad.abs().max()) == 0.0 and float(b.grad.abs().max()) == 0.0


@pytest.mark.parametrize('teacher', ['head', 'head_larger', 'topk'])
def test_entropy_metric_is_precise_at_a_large_vocabulary(teacher):
    """Issue 21 item 16: the fused entropy metric (``gkd/entropy``) at V = 151,936 is within 1e-5 of float64 on every
    teacher path (a float32 ``bmm`` row-dot was 1.9e-4 off on the full head)."""
    g = torch.Generator().manual_seed(16)
    n, h, v, temperature = 8, 16, 151936, 0.9
    hs, w = torch.randn(n, h, generator=g), torch.randn(v, h, generator=g) * 0.5
    vt = v + 64 if teacher == 'head_larger' else v
    wt = torch.randn(vt, h, generator=g) * 0.5
    ref = torch.special.entr(torch.softmax((hs.double() @ w.double().T) / temperature, -1)).sum()
    t_ref = torch.special.entr(torch.softmax((hs.double() @ wt.double().T) / temperature, -1)).sum()
    if teacher == 'topk':
        lp, ids = torch.log_softmax(hs @ wt.T, -1).topk(8, -1)
        side = TeacherTopK(ids, lp)
    else:
        side = TeacherHead(hs, wt)
    _, stats = fused_linear_jsd(hs, w, teacher=side, temperature=temperature, return_entropy=True)
    assert abs(float(stats['entropy_sum']) - float(ref)) / float(ref) < 1e-5
    if teacher != 'topk':  # the teacher's entropy (gkd/teacher_entropy), on its own head
        assert abs(float(stats['teacher_entropy_sum']) - float(t_ref)) / float(t_ref) < 1e-5


@pytest.mark.parametrize('beta', [0.0, 0.5, 1.0])
def test_dense_topk_treats_ids_outside_the_vocabulary_as_the_fused_loss(beta):
    """A served teacher's padded rows give ids >= V: the dense top-k path drops them as the fused path does (it used
    to clamp them to V - 1, putting their mass on the last token), and unused slots are empty on both sides; values
    and gradients equal the fused loss's (no tail), rows of dropped-only ids uncovered on both."""
    from swift_gkd_plugin.core.topk import drop_ids_outside_vocab, topk_divergence_dense
    x = make_inputs(seed=91, n=12, v=80, vt=80)
    ids, lp = topk_of(x, 5, unused=2, drop_row=False)
    ids[0, 1], ids[4, 0], ids[7, :] = 80, 85, 83  # outside: one slot, the top-1, and a whole row
    z = (x['hs'] @ x['w'].T + x['b']).detach().requires_grad_()
    per_token, agree, covered = topk_divergence_dense(z, ids, lp, beta, 0.8)
    per_token.sum().backward()
    assert not bool(covered[7]) and float(per_token[7]) == 0.0 and int(covered.sum()) == 11
    eye = torch.eye(80)[:12]
    head = torch.zeros(80, 80)
    head[:, :12] = z.detach().T
    w = head.requires_grad_()
    loss, stats = fused_linear_jsd(eye, w, teacher=TeacherTopK(*drop_ids_outside_vocab(ids, lp, 80)), beta=beta,
                                   temperature=0.8, normalizer=1.0, backend='torch')
    loss.backward()
    assert rel_err(per_token.sum().detach(), loss.detach()) <= 1e-5
    assert rel_err(z.grad, w.grad[:, :12].T) <= 1e-5
    assert int(stats['num_tokens']) == 11 and int(agree.sum()) == int(stats['top1_agree'])
