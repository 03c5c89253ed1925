"""ULD and GOLD's hybrid loss against float64 references written from the definitions, values and gradients."""
import pytest
import torch

from swift_gkd_plugin.core import generalized_jsd
from swift_gkd_plugin.core.cross_tokenizer.loss import hybrid_loss, uld_loss

from test_divergence import jsd_of_probabilities, relative_error

BETAS = [0.0, 0.3, 1.0]


def reference_uld(student, teacher, temperature):
    """Float64: sorted probabilities, the shorter zero-padded, L1 (Boizard et al. 2024)."""
    p_s = torch.softmax(student.double() / temperature, -1).sort(-1, descending=True).values
    p_t = torch.softmax(teacher.double() / temperature, -1).sort(-1, descending=True).values
    width = max(p_s.shape[-1], p_t.shape[-1])
    p_s = torch.cat([p_s, p_s.new_zeros(len(p_s), width - p_s.shape[-1])], -1)
    p_t = torch.cat([p_t, p_t.new_zeros(len(p_t), width - p_t.shape[-1])], -1)
    return (p_s - p_t).abs().sum(-1)


def reference_hybrid(student, teacher, s_ids, t_ids, beta, temperature, w_shared, w_rest):
    """Float64: JSD over the shared entries of the full distributions plus one bucket with each side's mass outside
    the shared set; ULD on the un-normalised probabilities of the rest."""
    p_s = torch.softmax(student.double() / temperature, -1)
    p_t = torch.softmax(teacher.double() / temperature, -1)
    rest_s = [i for i in range(student.shape[-1]) if i not in set(s_ids.tolist())]
    rest_t = [i for i in range(teacher.shape[-1]) if i not in set(t_ids.tolist())]
    buckets_s = torch.cat([p_s[:, s_ids], p_s[:, rest_s].sum(-1, keepdim=True)], -1)
    buckets_t = torch.cat([p_t[:, t_ids], p_t[:, rest_t].sum(-1, keepdim=True)], -1)
    jsd = jsd_of_probabilities(buckets_s, buckets_t, beta)
    s = p_s[:, rest_s].sort(-1, descending=True).values
    t = p_t[:, rest_t].sort(-1, descending=True).values
    width = max(s.shape[-1], t.shape[-1])
    s = torch.cat([s, s.new_zeros(len(s), width - s.shape[-1])], -1)
    t = torch.cat([t, t.new_zeros(len(t), width - t.shape[-1])], -1)
    return w_shared * jsd + w_rest * (s - t).abs().sum(-1)


def random_case(seed, n=19, vs=37, vt=53):
    gen = torch.Generator().manual_seed(seed)
    student = (torch.randn(n, vs, generator=gen) * 3).requires_grad_()
    teacher = torch.randn(n, vt, generator=gen) * 3
    weights = torch.rand(n, generator=gen)
    return student, teacher, weights, gen


def check_against(ours, ref_fn, student, weights):
    """Values to float32 rounding, gradients norm-wise, against ``ref_fn(float64 student)``."""
    (grad, ) = torch.autograd.grad((ours * weights).sum(), student)
    student64 = student.detach().double().requires_grad_()
    ref = ref_fn(student64)
    (ref_grad, ) = torch.autograd.grad((ref * weights.double()).sum(), student64)
    assert ours.dtype == torch.float32 and ours.shape == ref.shape
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-6)
    assert relative_error(grad, ref_grad) <= 1e-5


@pytest.mark.parametrize('temperature', [0.5, 1.0, 2.0])
@pytest.mark.parametrize('vs, vt', [(37, 53), (53, 37), (41, 41)])
def test_uld_matches_float64_reference(temperature, vs, vt):
    student, teacher, weights, _ = random_case(vs * 7 + vt, vs=vs, vt=vt)
    ours = uld_loss(student, teacher, temperature, chunk_size=4)
    check_against(ours, lambda s: reference_uld(s, teacher, temperature), student, weights)


def test_uld_of_identical_distributions_is_zero():
    student, _, _, gen = random_case(1)
    loss = uld_loss(student, student.detach())
    (grad, ) = torch.autograd.grad(loss.sum(), student)
    assert torch.all(loss == 0) and torch.all(grad == 0)
    # the same distribution over a permuted vocabulary, and over one padded with zero-probability entries: 0 up to
    # the rounding of the two softmaxes (the L1 gradient there is a sign of rounding noise, as for any L1 at 0)
    permutation = torch.randperm(student.shape[-1], generator=gen)
    padded = torch.cat([student.detach(), torch.full((len(student), 9), -float('inf'))], -1)
    for teacher in (student.detach()[:, permutation], padded):
        assert torch.all(uld_loss(student, teacher).abs() <= 1e-6)


def test_uld_is_invariant_to_permuting_either_vocabulary():
    student, teacher, _, gen = random_case(2)
    loss = uld_loss(student, teacher)
    ps, pt = torch.randperm(student.shape[-1], generator=gen), torch.randperm(teacher.shape[-1], generator=gen)
    torch.testing.assert_close(uld_loss(student[:, ps], teacher[:, pt]), loss, rtol=1e-6, atol=1e-7)
    assert torch.all(loss > 0) and torch.all(loss <= 2)


@pytest.mark.parametrize('loss_fn', ['uld', 'hybrid'])
def test_chunked_equals_unchunked(loss_fn):
    student, teacher, weights, gen = random_case(3)
    s_ids, t_ids = shared_ids(gen)
    run = {
        'uld': lambda chunk: uld_loss(student, teacher, 1.3, chunk_size=chunk),
        'hybrid': lambda chunk: hybrid_loss(student, teacher, s_ids, t_ids, 0.3, 1.3, chunk_size=chunk),
    }[loss_fn]
    grads = []
    for chunk in (1, 5, 1000):
        loss = run(chunk)
        grads.append((loss, torch.autograd.grad((loss * weights).sum(), student)[0]))
    for loss, grad in grads[1:]:
        torch.testing.assert_close(loss, grads[0][0], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(grad, grads[0][1], rtol=1e-6, atol=1e-7)


def shared_ids(gen, vs=37, vt=53, k=23):
    """A random one-to-one mapping of ``k`` student ids onto ``k`` teacher ids."""
    return torch.randperm(vs, generator=gen)[:k], torch.randperm(vt, generator=gen)[:k]


@pytest.mark.parametrize('beta', BETAS)
@pytest.mark.parametrize('temperature', [0.5, 2.0])
def test_hybrid_matches_float64_reference(beta, temperature):
    student, teacher, weights, gen = random_case(int(beta * 10 + temperature * 100))
    s_ids, t_ids = shared_ids(gen)
    ours = hybrid_loss(student, teacher, s_ids, t_ids, beta, temperature, chunk_size=6)
    w_shared = len(s_ids) / teacher.shape[-1]  # GOLD's adaptive weights
    check_against(
        ours, lambda s: reference_hybrid(s, teacher, s_ids, t_ids, beta, temperature, w_shared, 1 - w_shared),
        student, weights)
    fixed = hybrid_loss(student, teacher, s_ids, t_ids, beta, temperature, shared_weight=0.7, rest_weight=2.0)
    check_against(fixed, lambda s: reference_hybrid(s, teacher, s_ids, t_ids, beta, temperature, 0.7, 2.0),
                  student, weights)


@pytest.mark.parametrize('beta', [0.0, 0.5, 0.9, 1.0])
def test_hybrid_with_everything_shared_is_the_generalized_jsd(beta):
    student, _, _, gen = random_case(4, vt=37)
    teacher = torch.randn(student.shape, generator=gen) * 3
    every = torch.arange(student.shape[-1])
    # same order: exactly the project's generalized JSD, values and gradients
    ours = hybrid_loss(student, teacher, every, every, beta, 1.7)
    (grad, ) = torch.autograd.grad(ours.sum(), student)
    ref = generalized_jsd(student, teacher, beta, 1.7)
    (ref_grad, ) = torch.autograd.grad(ref.sum(), student)
    assert torch.equal(ours, ref) and torch.equal(grad, ref_grad)
    # the teacher's vocabulary in another order, mapped back by the shared ids: the same up to rounding
    order = torch.randperm(len(every), generator=gen)
    permuted = hybrid_loss(student, teacher[:, order], every, torch.argsort(order), beta, 1.7)
    torch.testing.assert_close(permuted, ref, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize('beta', BETAS)
def test_hybrid_counts_the_students_mass_outside_a_teacher_vocabulary_it_covers(beta):
    """Every teacher entry shared (``w_rest = 1 - K / V_t = 0``) and the student puts 0.97 of its mass on its own
    extra entries: the loss is the divergence of that mass, not ~0 (1.9e-8 when the shared set was renormalised)."""
    gen = torch.Generator().manual_seed(7)
    vt, extra = 30, 10
    teacher = torch.randn(5, vt, generator=gen) * 2
    student = torch.cat([teacher.clone(), torch.full((5, extra), 0.0)], -1)
    s_ids = t_ids = torch.arange(vt)
    # the student: the teacher's shape on the shared entries, 0.97 of its mass on the extra ones
    shared_mass = torch.softmax(student, -1)[:, :vt].sum(-1, keepdim=True)
    student[:, vt:] += torch.log(0.97 / (1 - 0.97) * shared_mass / (1 - shared_mass))
    student.requires_grad_()
    assert torch.allclose(torch.softmax(student, -1)[:, vt:].sum(-1), torch.full((5, ), 0.97))
    ours = hybrid_loss(student, teacher, s_ids, t_ids, beta)
    if beta == 1:  # KL(student || teacher) with student mass where the teacher has none: infinite, floored finite
        assert torch.isfinite(ours).all() and ours.min() > 100
        return
    check_against(ours, lambda s: reference_hybrid(s, teacher, s_ids, t_ids, beta, 1.0, 1.0, 0.0), student,
                  torch.rand(5, generator=gen))
    buckets = jsd_of_probabilities(torch.tensor([0.03, 0.97], dtype=torch.float64),
                                   torch.tensor([1.0, 0.0], dtype=torch.float64), beta)
    torch.testing.assert_close(ours.double(), buckets.expand(5), rtol=1e-5, atol=1e-6)
    assert ours.min() > 0.3


def test_bad_arguments_are_named():
    student, teacher, _, gen = random_case(5)
    s_ids, t_ids = shared_ids(gen)
    with pytest.raises(ValueError, match='temperature must be a finite number > 0'):
        uld_loss(student, teacher, temperature=0.0)
    with pytest.raises(ValueError, match=r'one row per aligned position'):
        uld_loss(student, teacher[:-1])
    with pytest.raises(ValueError, match='one-to-one: 23 student ids, 22 teacher ids'):
        hybrid_loss(student, teacher, s_ids, t_ids[:-1], 0.5)
    with pytest.raises(ValueError, match='give both shared_weight and rest_weight'):
        hybrid_loss(student, teacher, s_ids, t_ids, 0.5, shared_weight=1.0)
    with pytest.raises(ValueError, match=r'beta must be in \[0, 1\]'):
        hybrid_loss(student, teacher, s_ids, t_ids, 1.5)


def test_no_rows_and_no_gradient():
    student, teacher, _, _ = random_case(6)
    empty = uld_loss(student[:0], teacher[:0])
    assert empty.shape == (0, ) and empty.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(uld_loss(student, teacher), uld_loss(student.detach(), teacher))


@pytest.mark.parametrize('loss_fn', ['uld', 'hybrid'])
def test_backward_keeps_only_views_of_the_inputs(loss_fn):
    """Memory: each chunk is recomputed in backward, so the graph holds no probabilities, sorts or indices (no
    [N, V] float32 pair beyond one chunk), only the caller's logits."""
    student, teacher, _, gen = random_case(7)
    s_ids, t_ids = shared_ids(gen)
    inputs = {student.untyped_storage().data_ptr(), teacher.untyped_storage().data_ptr()}
    kept = []

    def pack(tensor):
        if tensor.untyped_storage().nbytes():  # torch 2.11's checkpointing saves an empty placeholder: no memory
            kept.append(tensor.untyped_storage().data_ptr())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        if loss_fn == 'uld':
            loss = uld_loss(student, teacher, chunk_size=5)
        else:
            loss = hybrid_loss(student, teacher, s_ids, t_ids, 0.5, chunk_size=5)
    assert kept and set(kept) <= inputs
    assert torch.autograd.grad(loss.sum(), student)[0].shape == student.shape


@pytest.mark.parametrize('method', ['uld', 'hybrid'])
def test_teacher_index_gathers_rows_chunk_by_chunk(method):
    """``teacher_index``: student row n against teacher row index[n] (repeats and skipped rows included), in small
    chunks, equals the float64 reference on the gathered rows, values and gradients."""
    student, teacher, weights, gen = random_case(31)
    pool = torch.randn(7, teacher.shape[-1], generator=gen) * 3  # fewer teacher rows than student rows
    index = torch.randint(0, len(pool), (len(student), ), generator=gen)
    if method == 'uld':
        ours = uld_loss(student, pool, 1.5, chunk_size=4, teacher_index=index)
        check_against(ours, lambda s: reference_uld(s, pool[index], 1.5), student, weights)
    else:
        s_ids, t_ids = shared_ids(gen)
        w = len(s_ids) / pool.shape[-1]
        ours = hybrid_loss(student, pool, s_ids, t_ids, 0.3, 1.5, chunk_size=4, teacher_index=index)
        check_against(ours, lambda s: reference_hybrid(s, pool[index], s_ids, t_ids, 0.3, 1.5, w, 1 - w), student,
                      weights)
    with pytest.raises(ValueError, match='teacher_index'):
        uld_loss(student, pool, teacher_index=index[:-1])
