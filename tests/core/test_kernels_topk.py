"""The top-k Triton kernels (``core/fused/kernels/topk_rows.py``) against the float64 reference and the PyTorch chunk path,
on CPU tensors in Triton's interpreter or on a CUDA device compiled (``kernel_devices``: one of the two per process,
chosen by ``tests/conftest.py`` before triton is imported). The references and comparisons run on the CPU.
"""
from __future__ import annotations

import math
import os

import pytest
import torch

pytest.importorskip('triton', reason='the kernels need triton (pip install triton==3.6.0)')

from swift_gkd_plugin.core.row_divergence import Divergence  # noqa: E402
from swift_gkd_plugin.core.teacher_signal import TeacherTopK  # noqa: E402
from test_divergences import reference64  # noqa: E402
from test_fused_loss import (assert_close, make_inputs, ref_of, ref_topk_buckets, rel_err, run, to_device,  # noqa: E402
                             topk_of)
from kernel_devices import DEVICES, compile_ahead_of_time  # noqa: E402

NEG_INF = float('-inf')
BACKEND = 'SWIFT_GKD_FUSED_BACKEND'


@pytest.fixture(params=DEVICES)
def backend(request, monkeypatch):
    """``backend('torch' | 'triton')`` switches the fused loss's top-k chunk path; ``backend.device`` is where the
    kernels run (``cpu`` interpreted, ``cuda`` compiled)."""
    def choose(name):
        monkeypatch.setenv(BACKEND, name)
    choose.device = request.param
    return choose


def both(backend, x, topk, **kw):
    """The fused loss on the kernels and on the PyTorch path: ``(triton, torch)`` results of ``run``, on the CPU."""
    backend('triton')
    got = run(x, topk=topk, device=backend.device, **kw)
    backend('torch')
    return got, run(x, topk=topk, device=backend.device, **kw)


def assert_same(got, want, tol):
    """Kernel path vs PyTorch path: loss, gradients and stats."""
    assert rel_err(got[0], want[0]) <= tol, (float(got[0]), float(want[0]))
    for g, w in zip(got[1], want[1]):
        if w is not None:
            assert g.dtype == w.dtype and rel_err(g, w) <= tol, rel_err(g, w)
    for key in ('divergence_sum', 'sft_sum', 'entropy_sum'):
        if key in want[2]:
            assert abs(float(got[2][key]) - float(want[2][key])) <= tol * max(1.0, abs(float(want[2][key]))), key
    for key in ('top1_agree', 'num_tokens', 'num_sft_tokens'):
        assert int(got[2][key]) == int(want[2][key]), key


DIVERGENCES = [Divergence('jsd', beta=0.0), Divergence('jsd', beta=0.5), Divergence('jsd', beta=1.0),
               Divergence('skew_kl', alpha=0.1), Divergence('skew_rkl', alpha=0.1)]


def reference_any(x, ids, lp, div, *, mask, labels, label_weights, temperature, topk_tail, sft_alpha,
                  label_temperature):
    """Float64 autograd reference for any registered divergence: the buckets of ``ref_topk_buckets``, the divergence
    of ``reference64`` (both written from the definitions), the weighted label term. Returns ``(loss, grads,
    per-token D, active, the size of the loss's terms)``."""
    params = [t.detach().double().requires_grad_() for t in (x['hs'], x['w'], x['b'])]
    z = params[0] @ params[1].T + params[2]
    lp64 = lp.double()
    covered = (lp64 > NEG_INF).any(-1)
    lp64 = torch.where(covered[:, None], lp64, torch.full_like(lp64, math.log(0.5 / lp64.shape[1])))
    y, t = ref_topk_buckets(z, ids.long(), lp64, topk_tail)
    d = reference64(y, t, div, temperature)
    active = covered & mask
    keep = active & (labels != -100)
    ce = torch.nn.functional.cross_entropy(z[keep] / label_temperature, labels[keep], reduction='none')
    weighted = ce * label_weights[keep].double()
    loss = d[active].sum() / active.sum() + sft_alpha * weighted.sum() / keep.sum()
    loss.backward()
    size = float(d[active].detach().mean() + sft_alpha * weighted.detach().abs().mean())
    return loss.detach(), [p.grad for p in params], d.detach(), active, size


@pytest.mark.parametrize('tail', [False, True], ids=['topk', 'topk_tail'])
@pytest.mark.parametrize('div', DIVERGENCES, ids=str)
def test_every_divergence_matches_float64_and_the_torch_path(backend, div, tail):
    """V = 600, k = 8 with unused slots (duplicate ids), a row without information, ragged chunks, masked (-inf
    bias) vocabulary entries, signed label weights, label temperatures 1 and 0.6, the entropy."""
    seed = 50 + DIVERGENCES.index(div) + 7 * tail
    x = make_inputs(seed=seed, v=600, vt=600)
    x['b'][[3, 17, 400]] = NEG_INF
    x['bt'][[3, 17, 400]] = NEG_INF
    x['labels'][torch.isin(x['labels'], torch.tensor([3, 17, 400]))] = 4
    adv = torch.randn(x['labels'].shape[0], generator=torch.Generator().manual_seed(seed)) * 2
    ids, lp = topk_of(x, 8, unused=3)
    temperature, label_temperature = (0.7, 1.0) if seed % 2 else (1.5, 0.6)
    kw = dict(mask=x['mask'], labels=x['labels'], temperature=temperature, topk_tail=tail, sft_alpha=0.6,
              label_weights=adv, label_temperature=label_temperature)
    got, torch_path = both(backend, x, (ids, lp), chunk_size=10, return_entropy=True, divergence=div, **kw)
    loss, grads, d, active, size = reference_any(x, ids, lp, div, **kw)
    assert_close(got, (loss, grads, d, active), loss_scale=size)
    assert rel_err(got[2]['divergence_sum'], d[active].sum()) <= 1e-5
    z = x['hs'].double() @ x['w'].double().T + x['b'].double()
    entropy = torch.special.entr(torch.softmax(z[active] / temperature, -1)).sum()
    assert rel_err(got[2]['entropy_sum'], entropy) <= 1e-5
    assert_same(got, torch_path, tol=2e-5)


@pytest.mark.parametrize('k, v', [(1, 2000), (16, 300), (5, 257)])
@pytest.mark.parametrize('tail', [False, True], ids=['topk', 'topk_tail'])
def test_k_and_vocabulary_sizes(backend, k, v, tail):
    """k from 1 to 16, V not a multiple of the block, the untempered label term (folded into the passes on the
    PyTorch path), one chunk and a ragged last chunk."""
    x = make_inputs(seed=60 + k, v=v, vt=v, n=23)
    topk = topk_of(x, k, drop_row=False)
    kw = dict(mask=x['mask'], labels=x['labels'], beta=0.5, temperature=1.0, topk_tail=tail, sft_alpha=0.3)
    got, torch_path = both(backend, x, topk, chunk_size=16, **kw)
    assert_close(got, ref_of(x, topk=topk, **kw))
    assert_same(got, torch_path, tol=2e-5)


@pytest.mark.parametrize('beta', [0.0, 1.0])
def test_bf16_gradient_written_in_the_matmul_dtype(backend, beta):
    """bf16 weights: the kernel writes d loss / d z in bf16 once (no float32 copy); gradients in bf16 within the
    half-precision tolerance of float64, and equal to the PyTorch path's to bf16 rounding."""
    x = make_inputs(seed=70, v=500, vt=500, dtype=torch.bfloat16)
    topk = topk_of(x, 6, unused=2)
    kw = dict(mask=x['mask'], labels=x['labels'], beta=beta, temperature=1.0, topk_tail=True, sft_alpha=0.3)
    got, torch_path = both(backend, x, topk, chunk_size=12, **kw)
    assert [g.dtype for g in got[1]] == [torch.bfloat16] * 3
    assert_close(got, ref_of(x, topk=topk, **kw), tol=2e-2)
    assert_same(got, torch_path, tol=2e-2)


@pytest.mark.parametrize('temperature', [0.5, 2.0])
def test_full_support_tail_is_the_full_loss(backend, temperature):
    """k == V: the complement is empty on every row (its sums are 0, not NaN) and the loss is the full one."""
    x = make_inputs(seed=71, v=50, vt=50)
    topk = topk_of(x, 50, drop_row=False)
    kw = dict(mask=x['mask'], beta=0.5, temperature=temperature, topk_tail=True, labels=x['labels'], sft_alpha=0.2,
              return_entropy=True)
    got, torch_path = both(backend, x, topk, chunk_size=9, **kw)
    assert_same(got, torch_path, tol=2e-5)


def test_confident_teacher_reverse_kl(backend):
    """Top-k + tail with reverse KL and a confident teacher (tails of 1e-8 .. 1e-13): finite and equal on both
    paths (issue 27's defect, on the kernel path)."""
    x = make_inputs(seed=72, v=400, vt=400, scale=1.0)
    x['bt'] = x['bt'].clone()
    x['bt'][0] += 30.0
    topk = topk_of(x, 4, drop_row=False)
    assert float(topk[1][:, 0].max()) > -1e-7
    got, torch_path = both(backend, x, topk, chunk_size=16, beta=1.0, topk_tail=True)
    assert math.isfinite(float(got[0])) and float(got[0]) < 1e3
    assert_same(got, torch_path, tol=2e-5)


def test_no_grad_statistics(backend):
    """Under ``torch.no_grad`` (an evaluation step) the values and statistics are those of the PyTorch path."""
    x = make_inputs(seed=73, v=300, vt=300)
    ids, lp = topk_of(x, 5)
    out = {}
    x, ids, lp = to_device((x, ids, lp), backend.device)
    for name in ('triton', 'torch'):
        backend(name)
        with torch.no_grad():
            out[name] = to_device(__import__('swift_gkd_plugin.core.fused.loss', fromlist=['fused_linear_jsd'])
                                  .fused_linear_jsd(x['hs'], x['w'], x['b'], teacher=TeacherTopK(ids, lp),
                                                    mask=x['mask'], beta=0.5, topk_tail=True, return_entropy=True,
                                                    chunk_size=8), 'cpu')
    assert rel_err(out['triton'][0], out['torch'][0]) <= 2e-5
    assert rel_err(out['triton'][1]['entropy_sum'], out['torch'][1]['entropy_sum']) <= 2e-5


def test_kernel_with_the_bias_and_bf16_logits_in_the_kernel(backend):
    """``topk_rows`` reading bf16 logits and adding a float32 bias itself (-1e30 entries masked) gives what it
    gives on the float32 logits with the bias already added."""
    from swift_gkd_plugin.core.fused.kernels.topk_rows import topk_rows
    g = torch.Generator().manual_seed(74)
    c, v, k = 9, 700, 6
    z = (torch.randn(c, v, generator=g) * 3).bfloat16()
    bias = torch.randn(v, generator=g).clamp_min(-1.5)
    bias[[5, 99]] = -1e30
    lp, ids = torch.log_softmax(torch.randn(c, v, generator=g) * 3, -1).topk(k, -1)
    valid = torch.ones_like(lp, dtype=torch.bool)
    labels = torch.randint(0, v, (c, ), generator=g)
    labels[0] = ids[0, 2]  # a label among the top-k ids
    kw = dict(divergence=Divergence('jsd', beta=0.3), temperature=1.3, tail=True, vocab=v, scale=0.5, labels=labels,
              ce_weight=torch.ones(c), label_weight=torch.full((c, ), 0.25), label_temperature=0.8, entropy=True)
    z, bias, lp, ids, valid, kw = to_device((z, bias, lp, ids, valid, kw), backend.device)
    grad_a = torch.empty(c, v, dtype=torch.bfloat16, device=backend.device)
    a = topk_rows(z.clone(), ids, valid, lp, grad=grad_a, bias=bias, **kw)
    zf = z.float() + bias
    b = topk_rows(zf, ids, valid, lp, grad=zf, **kw)
    for x, y in zip(a, b):
        assert rel_err(x.cpu(), y.cpu()) <= 1e-5
    assert rel_err(grad_a.cpu(), zf.bfloat16().cpu()) <= 1e-2 and float(grad_a[:, [5, 99]].abs().max()) == 0.0


@pytest.mark.skipif(os.environ.get('TRITON_INTERPRET') != '1', reason='the CPU refusals under the interpreter')
def test_bad_backend_is_refused(backend, monkeypatch):
    x = make_inputs(seed=75, v=100, vt=100)
    topk = topk_of(x, 4)
    backend('cuda')
    with pytest.raises(ValueError, match=r"SWIFT_GKD_FUSED_BACKEND must be one of .*'triton'.*got 'cuda'"):
        run(x, topk=topk, beta=0.5)
    backend('triton')
    monkeypatch.setenv('TRITON_INTERPRET', '0')
    with pytest.raises(ValueError, match='SWIFT_GKD_FUSED_BACKEND=triton runs on CUDA tensors'):
        run(x, topk=topk, beta=0.5)


_AOT = r'''
import triton
from triton.backends.compiler import GPUTarget
from swift_gkd_plugin.core.fused.kernels import topk_rows
n = 0
for z in ('*bf16', '*fp32'):
    for extras in (False, True):
        flags = dict(V=151936, HAS_B=extras, BLOCK=4096)
        sig = dict(Z=z, B='*fp32', STATS='*fp32', stride_z='i32', inv_t='fp32', inv_tl='fp32', neg='fp32')
        const = dict(flags, ENTROPY=extras, LABEL_T=extras)
        src = triton.compiler.ASTSource(fn=topk_rows._complement_stats_kernel,
                                        signature={**sig, **dict.fromkeys(const, 'constexpr')}, constexprs=const)
        n += bool(triton.compile(src, target=GPUTarget('cuda', 90, 32), options=dict(num_warps=8)).asm['cubin'])
        sig = dict(Z=z, B='*fp32', G=z, ROWS='*fp32', ENT='*fp32', stride_z='i32', stride_g='i32', inv_t='fp32',
                   inv_tl='fp32')
        const = dict(flags, TAIL=extras, LABEL=extras, ENTROPY=extras, WRITE=True)
        src = triton.compiler.ASTSource(fn=topk_rows._grad_kernel, signature={**sig, **dict.fromkeys(const,
                                        'constexpr')}, constexprs=const)
        n += bool(triton.compile(src, target=GPUTarget('cuda', 90, 32), options=dict(num_warps=8)).asm['cubin'])
print('compiled', n)
'''


def test_topk_rows_compiles_for_h100():
    """Ahead-of-time compilation to sm_90 cubin (Triton's bundled ptxas; no GPU needed) of both top-k kernels, bf16
    and float32 logits, with and without the bias, tail, label term and entropy. (On 2026-11-24 they also ran on an
    H100: tests/gpu/results/2026-11-24-h100.)"""
    assert 'compiled 8' in compile_ahead_of_time(_AOT)


@pytest.mark.parametrize('div', [Divergence('jsd', beta=1.0), Divergence('jsd', beta=0.9),
                                 Divergence('skew_rkl', alpha=0.1)], ids=str)
@pytest.mark.parametrize('confidence', [12.0, 25.0])
def test_confident_student_in_the_tail_matches_float64(backend, div, confidence):
    """Issue 37's case: the student is confident on a token outside the teacher's top-k (its mass is in the tail
    bucket) under a reverse-type divergence. The buckets were in float32: the largest gradient entry was up to 56%
    off; now in float64 (the student's tail logit too), within 1e-5 of the float64 reference on both backends."""
    import large_logits
    g = torch.Generator().manual_seed(int(confidence))
    zs = torch.randn(6, 200, generator=g)
    zt = torch.randn(6, 200, generator=g) * 2
    lp, ids = torch.log_softmax(zt.double(), -1).float().topk(8, -1)
    outside = torch.ones(6, 200, dtype=torch.bool).scatter_(1, ids, False).float().argmax(-1)
    zs[torch.arange(6), outside] += confidence  # the student's top-1 is in the tail
    want = large_logits.reference_topk(zs, ids, lp, div, 1.0, True)
    for name in ('triton', 'torch'):
        backend(name)
        got = large_logits.fused_topk(zs, ids, lp, div, 1.0, True, None, backend.device)
        assert max(large_logits.errors(got, want)) <= 1e-5, (name, large_logits.errors(got, want))
