"""The Triton kernel of the fused loss's full-teacher-head path (``core/kernels``), on CPU tensors in Triton's
interpreter or on a CUDA device compiled (``kernel_devices``: one of the two per process): values and
gradients (hidden, weight, bias) against the float64 definitions and against the PyTorch chunk path, for every
divergence form, ragged chunks, masked vocabulary entries, temperatures, vocabulary padding, the label term,
the entropy, half-precision inputs. Shapes are small: the interpreter runs each program's block ops in numpy. The
references and comparisons run on the CPU."""
from __future__ import annotations

import functools
import os
import sys

import pytest
import torch

pytest.importorskip('triton', reason='triton is not installed (the dev extra pins it)')

sys.path.insert(0, os.path.dirname(__file__))
import large_logits  # noqa: E402
import test_fused_loss as tf  # noqa: E402  (the float64 reference of the fused loss)
from kernel_devices import DEVICES, compile_ahead_of_time  # noqa: E402

from swift_gkd_plugin.core.fused import kernels  # noqa: E402
from swift_gkd_plugin.core.fused.loss import fused_linear_jsd  # noqa: E402
from swift_gkd_plugin.core.row_divergence import Divergence  # noqa: E402
from swift_gkd_plugin.core.teacher_signal import TeacherHead  # noqa: E402

pytestmark = pytest.mark.filterwarnings('ignore::RuntimeWarning')  # numpy's log(0) in discarded where-branches


@pytest.fixture(params=DEVICES)
def device(request):
    """Where the kernels run: ``cpu`` (interpreted) or ``cuda`` (compiled); see ``kernel_devices``."""
    return request.param


@pytest.fixture(params=kernels.KERNEL_BACKENDS)
def kernel(request):
    """The kernel design: ``triton`` (``kernels/full_rows.py``). The GPU kit's experiment runs the tests that take
    this fixture on its own design too (``tests/gpu/experiments/triton2/test_kernels_triton2.py``)."""
    return request.param


def divergence64(zs, zt, div: Divergence, temperature):
    """Float64 definition at ``temperature``, log-space mixtures (``large_logits.divergence64``)."""
    return large_logits.divergence64(torch.log_softmax(zs / temperature, -1), torch.log_softmax(zt / temperature, -1),
                                     div)


def run_both(x, divergence, device, kernel='triton', **kw):
    """The fused loss with the ``kernel`` design and with the PyTorch path on ``device``: ``{'triton' | 'torch':
    (loss, grads, stats)}`` on the CPU."""
    return {name: tf.run(x, divergence=divergence, backend=backend, device=device, **kw)
            for name, backend in (('triton', kernel), ('torch', 'torch'))}


def reference_grads(x, divergence, temperature, mask):
    hs = x['hs'].double().requires_grad_()
    w = x['w'].double().requires_grad_()
    b = x['b'].double().requires_grad_()
    zs = hs @ w.T + b
    zt = x['ht'].double() @ x['wt'].double().T + x['bt'].double()
    d = divergence64(zs, zt, divergence, temperature)
    loss = d[mask].sum() / mask.sum() + 0 * zs.clamp_min(-1e30).sum()  # (skew at alpha 1: no zs)
    loss.backward()
    return loss.detach(), (hs.grad, w.grad, b.grad), d.detach()


def assert_same(got, want, tol):
    (loss, grads, stats), (w_loss, w_grads, w_stats) = got, want
    assert abs(float(loss) - float(w_loss)) <= tol * abs(float(w_loss)) + 1e-12, (float(loss), float(w_loss))
    for name, g, wg in zip(('hidden', 'weight', 'bias'), grads, w_grads):
        assert torch.isfinite(g).all(), name
        assert tf.rel_err(g, wg) <= tol or float(wg.abs().max()) == float(g.abs().max()) == 0, name


DIVS = ([Divergence('jsd', beta=b) for b in (0.0, 0.3, 1.0)]
        + [Divergence('skew_kl', alpha=a) for a in (0.0, 1e-9, 0.1, 0.9, 1.0)]
        + [Divergence('skew_rkl', alpha=a) for a in (0.0, 1e-300, 1e-6, 0.5, 1.0)])


@pytest.mark.parametrize('div', DIVS, ids=str)
def test_every_divergence_matches_float64_and_the_torch_path(div, device, kernel):
    """Ragged chunks (7 tokens, 5 active, chunks of 3 and 2), -inf bias entries on both heads and on the student's
    alone where the divergence stays finite, temperature 0.8. (Each row is one program of the interpreter: ~0.1 s a
    row and call; the edge cases are the divergences' parameters, the masked entries and rows and the ragged chunk.)"""
    x = tf.make_inputs(seed=len(str(div)), n=7, v=320, vt=320, scale=4.0)
    x['b'][[5, 77]] = float('-inf')
    x['bt'][[5, 77]] = float('-inf')
    masked = [5, 77]
    if not ((div.name == 'jsd' and div.beta == 0) or (div.name == 'skew_kl' and div.alpha == 0)):  # stays finite
        masked.append(200)
        x['b'][200] = float('-inf')
    mask = torch.ones(7, dtype=torch.bool)
    mask[[1, 4]] = False
    got = run_both(x, div, device, kernel, mask=mask, temperature=0.8, chunk_size=3)
    loss, grads, d = reference_grads(x, div, 0.8, mask)
    assert_same(got['triton'], (loss, grads, None), 2e-5)
    assert_same(got['triton'], got['torch'], 1e-5)
    assert float(got['triton'][1][1][masked].abs().max()) == 0.0  # masked entries get no gradient
    stats, ref_stats = got['triton'][2], got['torch'][2]
    assert int(stats['top1_agree']) == int(ref_stats['top1_agree'])
    assert tf.rel_err(stats['divergence_sum'], d[mask].sum()) <= 2e-5


@pytest.mark.parametrize('name', ['skew_kl', 'skew_rkl'])
@pytest.mark.parametrize('alpha', [1e-300, 1e-7])
def test_skew_far_apart_distributions_tiny_alpha(name, alpha, device, kernel):
    """Issue 27's case through the kernel: distributions > 17 nats apart and alpha far below float32's ``1 - a``
    resolution; the logits are exact (identity hidden states), so float32 can match float64 to its rounding."""
    v, n = 64, 3
    g = torch.Generator().manual_seed(3)
    student, teacher = torch.randn(n, v, generator=g) * 2, torch.randn(n, v, generator=g) * 2
    student[:, :4] -= 45.0
    teacher[:, 4:8] -= 45.0
    eye = torch.eye(v)[:n]
    head, head_t = torch.zeros(v, v), torch.zeros(v, v)
    head[:, :n], head_t[:, :n] = student.T, teacher.T
    div = Divergence(name, alpha=alpha)
    z64 = student.double().requires_grad_()
    ref = divergence64(z64, teacher.double(), div, 1.3)
    ref.sum().backward()
    for backend in (kernel, 'torch'):
        w = head.clone().to(device).requires_grad_()
        loss, stats = fused_linear_jsd(eye.to(device), w, teacher=TeacherHead(eye.to(device), head_t.to(device)),
                                       divergence=div, temperature=1.3, normalizer=1.0, backend=backend)
        loss.backward()
        assert abs(float(loss) - float(ref.sum().detach())) <= 1e-5 * float(ref.sum().detach()), backend
        assert tf.rel_err(w.grad[:, :n].T.cpu(), z64.grad) <= 1e-5, backend


CASES = [  # (teacher vocabulary offset, divergence, temperature, label temperature)
    (37, Divergence('jsd', beta=0.5), 1.5, 0.7),
    (-29, Divergence('jsd', beta=0.0), 0.7, 0.7),
    (0, Divergence('jsd', beta=1.0), 1.5, 1.5),
    (37, Divergence('jsd', beta=1.0), 1.0, 1.0),
    (0, Divergence('skew_rkl', alpha=0.1), 1.0, 0.7),
    (-29, Divergence('skew_kl', alpha=0.1), 1.0, 1.0),
]


@pytest.mark.parametrize('offset, div, temperature, label_temperature', CASES,
                         ids=[f'vt{o:+d}-{d}-T{t}-Tl{tl_}' for o, d, t, tl_ in CASES])
def test_padding_label_term_and_entropy(offset, div, temperature, label_temperature, device, kernel):
    """Teacher vocabulary larger / smaller (padded by the other side), the signed weighted label term at its own
    temperature and the entropy: the kernel equals the PyTorch path, and the float64 reference for the jsd. 8 rows
    (seeded: masked rows and ignored labels among the active rows in every case), chunks of 3."""
    v = 300
    x = tf.make_inputs(seed=abs(offset) + 1, n=8, v=v, vt=v + offset, ht=10)
    assert not x['mask'].all() and ((x['labels'] == -100) & x['mask']).any() and (x['labels'] != -100).any()
    weights = torch.randn(8, generator=torch.Generator().manual_seed(2)) * 2
    kw = dict(mask=x['mask'], labels=x['labels'], temperature=temperature, sft_alpha=0.6, label_weights=weights,
              label_temperature=label_temperature, return_entropy=True, chunk_size=3)
    got = run_both(x, div, device, kernel, **kw)
    assert_same(got['triton'], got['torch'], 1e-5)
    stats, ref_stats = got['triton'][2], got['torch'][2]
    for key in ('divergence_sum', 'sft_sum', 'entropy_sum', 'teacher_entropy_sum'):
        assert abs(float(stats[key]) - float(ref_stats[key])) <= 1e-5 * abs(float(ref_stats[key])), key
    assert int(stats['top1_agree']) == int(ref_stats['top1_agree'])
    if div.name == 'jsd':
        kw.pop('chunk_size'), kw.pop('return_entropy')
        ref = tf.ref_of(x, beta=div.beta, **kw)
        active = ref[3]
        keep = active & (x['labels'] != -100)
        z = tf.student_logits64(x)
        ce = torch.nn.functional.cross_entropy(z[keep] / label_temperature, x['labels'][keep], reduction='none')
        scale = float(ref[2][active].mean() + 0.6 * (weights[keep].double().abs() * ce).mean())
        tf.assert_close(got['triton'], ref, loss_scale=scale)
        entropy = torch.special.entr(torch.softmax(z[active] / temperature, -1)).sum()
        assert tf.rel_err(stats['entropy_sum'], entropy) <= 1e-5
        t_entropy = tf.teacher_entropy64(x, None, False, active, temperature)  # its own Vt entries
        assert tf.rel_err(stats['teacher_entropy_sum'], t_entropy) <= 1e-5


@pytest.mark.parametrize('div', [Divergence('jsd', beta=0.5), Divergence('skew_kl', alpha=1e-9),
                                 Divergence('skew_rkl', alpha=0.3), Divergence('jsd', beta=0.0),
                                 Divergence('jsd', beta=1.0)], ids=str)
def test_many_blocks_per_row(div, monkeypatch, device, kernel):
    """Blocks of 128 entries over a 300 + 50 entry row (3 blocks each side, the last ragged: 44 and 94 entries): the
    online logsumexp across blocks (and the online moment of KL(s || t), in a design that has it); -inf bias entries
    at a block's first, a block's second and the row's last entry; 3 rows, labels in blocks 0 and 1 and one
    ignored."""
    from swift_gkd_plugin.core.fused.kernels import full_rows
    monkeypatch.setattr(full_rows, 'BLOCK', 128)  # the launcher of every full-row kernel
    x = tf.make_inputs(seed=12, n=3, v=300, vt=350, scale=6.0)
    assert x['labels'].tolist() == [254, -100, 66]
    x['b'][[0, 129, 299]] = float('-inf')
    kw = dict(mask=torch.ones(3, dtype=torch.bool), labels=x['labels'], sft_alpha=0.5, return_entropy=True,
              temperature=0.9, label_temperature=1.1)
    got = run_both(x, div, device, kernel, **kw)
    assert_same(got['triton'], got['torch'], 1e-5)
    for key in ('entropy_sum', 'teacher_entropy_sum'):
        assert tf.rel_err(got['triton'][2][key], got['torch'][2][key]) <= 1e-5, key


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_half_inputs(dtype, device, kernel):
    """bf16 / fp16 heads: logits in the matmul dtype, float32 inside the kernel, the gradient written in the
    matmul dtype; the tolerance of the PyTorch path's half-input test."""
    x = tf.make_inputs(seed=7, n=10, v=256, vt=256, dtype=dtype)
    kw = dict(mask=x['mask'], labels=x['labels'], temperature=1.0, sft_alpha=0.3, chunk_size=4)
    got = tf.run(x, divergence=Divergence('jsd', beta=0.5), backend=kernel, device=device, **kw)
    assert got[0].dtype == torch.float32 and [g.dtype for g in got[1]] == [dtype] * 3
    tf.assert_close(got, tf.ref_of(x, beta=0.5, **kw), tol=2e-2)


def test_identical_student_and_teacher(device, kernel):
    """Teacher = student: every row agrees on the argmax, the divergence and its gradient are ~0."""
    x = tf.make_inputs(seed=9, n=7, v=200, vt=200)
    x['ht'], x['wt'], x['bt'] = x['hs'], x['w'], x['b']
    loss, grads, stats = tf.run(x, divergence=Divergence('jsd', beta=0.5), backend=kernel, chunk_size=4,
                                mask=torch.ones(7, dtype=torch.bool), device=device)
    assert int(stats['top1_agree']) == 7
    assert abs(float(loss)) <= 1e-7 and float(grads[0].abs().max()) <= 1e-6


@pytest.mark.skipif(os.environ.get('TRITON_INTERPRET') != '1', reason='the CPU choices under the interpreter')
def test_backend_choice(monkeypatch):
    cpu = torch.device('cpu')
    assert kernels.resolve_backend('triton', cpu) == 'triton'  # under the interpreter
    assert kernels.resolve_backend(None, cpu) == 'torch'  # auto: CPU tensors take the PyTorch path
    monkeypatch.setenv(kernels.BACKEND_ENV, 'torch')
    assert kernels.resolve_backend(None, torch.device('cuda')) == 'torch'
    assert kernels.resolve_backend('triton', cpu) == 'triton'  # the argument wins over the variable
    monkeypatch.setenv(kernels.BACKEND_ENV, 'cuda')
    with pytest.raises(ValueError, match=r"SWIFT_GKD_FUSED_BACKEND must be one of "
                                         r"\('auto', 'torch', 'triton'\), "
                                         r"got 'cuda'"):
        kernels.resolve_backend(None, cpu)
    monkeypatch.setenv('TRITON_INTERPRET', '0')
    with pytest.raises(ValueError, match='backend=triton runs on CUDA tensors, or on CPU tensors under '
                                         'TRITON_INTERPRET=1'):
        kernels.resolve_backend('triton', cpu)


_AOT = r'''
import triton
from triton.backends.compiler import GPUTarget
from swift_gkd_plugin.core.fused.kernels import entry_math, full_rows
from swift_gkd_plugin.core.row_divergence import REGISTRY, Divergence, kernel_form
sig = dict(ZS='*bf16', ZT='*bf16', BS='*fp32', BT='*fp32', G='*bf16', LAB='*i64', LW='*fp32', CW='*fp32', DIV='*fp32',
           CE='*fp32', ENT='*fp32', TENT='*fp32', AGREE='*i32', stride_zs='i32', stride_zt='i32', stride_g='i32',
           V='i32', VT='i32')
sig.update({k: 'fp32' for k in ('inv_t', 'inv_tl', 'coef', 'k0', 'k1', 'k2', 'k3', 'threshold')})
specs = [Divergence('jsd', beta=b) for b in (0.0, 0.5, 1.0)] + [
    Divergence(n, alpha=a) for n in ('skew_kl', 'skew_rkl') for a in (0.1, 1.0)]
assert {d.name for d in specs} == set(REGISTRY)
for i, div in enumerate(specs):
    entry = getattr(entry_math, kernel_form(div).entry.split(':')[1])
    for extras in (False, True):
        # TOWN alternates: both teacher-entropy branches compile (OWN=TOWN=False never runs, but compiles both)
        const = dict(VMAX=151936 + 64, VOWN=151936, ENTRY=entry, HAS_BS=True, HAS_BT=extras, LABEL=extras,
                     ENTROPY=extras, OWN=False, TOWN=i % 2 == 0, WANT_GRAD=True, BLOCK=2048)
        src = triton.compiler.ASTSource(fn=full_rows.full_rows_kernel, signature={**sig, **dict.fromkeys(const,
                                        'constexpr')}, constexprs=const)
        kernel = triton.compile(src, target=GPUTarget('cuda', 90, 32), options=dict(num_warps=8))
        assert kernel.asm['cubin'], div
print('compiled', len(specs) * 2)
'''


def test_full_rows_compiles_for_h100():
    """Ahead-of-time compilation to sm_90 cubin (Triton's bundled ptxas; no GPU needed) of every divergence form,
    with and without the label term / entropy / padding: what the interpreter cannot check (libdevice calls,
    constexpr function arguments, types). Not a run on a GPU."""
    assert 'compiled 14' in compile_ahead_of_time(_AOT)


@functools.cache
def large_case(scale, family, device):
    """A ``large_logits`` case of 2 rows (each row is one program of the interpreter; the rows are alike) with its
    float64 references and the PyTorch path's results, per divergence: ``(case, top-k, {div: {form: (reference,
    torch)}})``, the forms ``full``, top-k without (``False``) and with (``True``) the tail. Shared by every design."""
    zs, zt, temperature = large_logits.case(scale, seed=int(scale) % 97, family=family, n=2)
    lp, ids = torch.log_softmax(zt.double(), -1).float().topk(8, -1)
    forms = {}
    for div in large_logits.DIVS:
        forms[div] = {'full': (large_logits.reference_full(zs, zt, div, temperature),
                               large_logits.fused_full(zs, zt, div, temperature, 'torch', device))}
        for tail in (False, True):
            forms[div][tail] = (large_logits.reference_topk(zs, ids, lp, div, temperature, tail),
                                large_logits.fused_topk(zs, ids, lp, div, temperature, tail, 'torch', device))
    return (zs, zt, temperature), (lp, ids), forms


@pytest.mark.parametrize('family', ['peaked', 'offset'])
@pytest.mark.parametrize('scale', large_logits.SCALES, ids=lambda s: f'zT{s:g}')
def test_large_tempered_logits_match_float64(scale, family, device, kernel):
    """``|z / T|`` up to 1e4 (logits 20 at T = 0.02 is 1e3): value and gradient within 2e-5 of float64 for every
    divergence form, on both backends, with a full teacher head and a top-k teacher with and without the tail.
    Before the log-probabilities were formed as ``(u - m) - log S`` (and the buckets in float64), the kernel's
    gradient was 4e-4 off at 1e4 and the tail bucket's 1e-3 on both backends."""
    (zs, zt, temperature), (lp, ids), forms = large_case(scale, family, device)
    for div in large_logits.DIVS:
        for form, (want, torch_path) in forms[div].items():
            if form == 'full':
                got = large_logits.fused_full(zs, zt, div, temperature, kernel, device)
            else:
                got = large_logits.fused_topk(zs, ids, lp, div, temperature, form, kernel, device)
            for backend, result in ((kernel, got), ('torch', torch_path)):
                assert max(large_logits.errors(result, want)) <= 2e-5, (str(div), backend, form)
