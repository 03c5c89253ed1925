"""The GPU kit's experiment ``triton2`` (the second kernel design, ``triton2_backend.py``): the package's tests of
its own design (``tests/core/test_kernels_full.py``, those that take its ``kernel`` fixture: every divergence form,
padding, the label term, the entropy, many blocks per row, half inputs, large tempered logits, against float64 and the
PyTorch path) run here on the second design, unchanged; then its chunk backend's split-K and float32-output matmuls,
the passes it saves (read off the compiled code, every divergence form compiled), its self-check and fallback, its
choice and description. Kernels run on CPU tensors in Triton's interpreter or compiled on CUDA
(``tests/core/kernel_devices.py``)."""
from __future__ import annotations

import inspect
import logging
import os
import re
import sys

import pytest
import torch

pytest.importorskip('triton', reason='triton is not installed (the dev extra pins it)')

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, '..', '..', '..', 'core'))
import test_fused_loss as tf  # noqa: E402
import test_kernels_full  # noqa: E402
from kernel_devices import DEVICES, compile_ahead_of_time  # noqa: E402

import chunk_triton2  # noqa: E402
import full_rows2  # noqa: E402
import triton2_backend  # noqa: E402
from swift_gkd_plugin.core.fused import kernels  # noqa: E402
from swift_gkd_plugin.core.fused import loss as fused_loss  # noqa: E402
from swift_gkd_plugin.core.row_divergence import Divergence  # noqa: E402

pytestmark = pytest.mark.filterwarnings('ignore::RuntimeWarning')  # numpy's inf - inf in discarded where-branches


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture
def enabled(monkeypatch):
    """``fused_linear_jsd(backend='triton2')`` runs the experiment, for this test."""
    triton2_backend.enable(monkeypatch.setattr)


@pytest.fixture
def kernel(enabled):
    """The design that the package's tests below run: the experiment."""
    return triton2_backend.NAME


# the package's tests that take ``kernel``, collected here as this module's own
globals().update({name: test for name, test in vars(test_kernels_full).items()
                  if name.startswith('test_') and 'kernel' in inspect.signature(test).parameters})


def test_split_k_rule():
    """``g @ W`` is split over K until the output tiles fill the SMs, up to 8 parts, only where K divides."""
    assert chunk_triton2.split_k(1536, 896, 151936, 132) == 4  # 48 tiles -> 192
    assert chunk_triton2.split_k(768, 896, 151936, 132) == 8  # 24 tiles -> 192
    assert chunk_triton2.split_k(4096, 896, 151936, 132) == 2  # 128 tiles -> 256
    assert chunk_triton2.split_k(8192, 896, 151936, 132) == 1  # 256 tiles already
    assert chunk_triton2.split_k(768, 896, 151935, 132) == 1  # an odd vocabulary: no even split
    assert chunk_triton2.split_k(768, 896, 151936, None) == 1  # no GPU


_FIRST_DESIGN = {}  # (dtype, device): the first design's result on test_split_input_gradient_matches_float64's rows


@pytest.mark.parametrize('parts', [1, 4])
@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float32])
def test_split_input_gradient_matches_float64(parts, dtype, device, monkeypatch, enabled):
    """The input gradient split over K into ``parts`` (batched, summed in float32) equals the float64 reference and
    the first design; ragged chunks (6 active rows of 8, chunks of 5 and 1), the label term (one ignored label), masked
    rows. The first design's result does not depend on ``parts``: run once per dtype."""
    monkeypatch.setattr(chunk_triton2, 'SPLIT_K', parts)
    x = tf.make_inputs(seed=5, n=8, v=256, vt=256, dtype=dtype)
    assert int(x['mask'].sum()) == 6 and ((x['labels'] == -100) & x['mask']).any()
    kw = dict(mask=x['mask'], labels=x['labels'], temperature=0.9, sft_alpha=0.3, chunk_size=5)
    got = tf.run(x, divergence=Divergence('jsd', beta=0.5), backend='triton2', device=device, **kw)
    key = (dtype, device)
    if key not in _FIRST_DESIGN:
        _FIRST_DESIGN[key] = tf.run(x, divergence=Divergence('jsd', beta=0.5), backend='triton', device=device, **kw)
    first = _FIRST_DESIGN[key]
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    tf.assert_close(got, tf.ref_of(x, beta=0.5, **kw), tol=tol)
    for a, b in zip(got[1], first[1]):
        assert tf.rel_err(a, b) <= (1e-2 if dtype == torch.bfloat16 else 1e-6)


_PTX = f'import sys; sys.path.insert(0, {HERE!r})\n' + r'''
import re, triton
from triton.backends.compiler import GPUTarget
import full_rows2
from swift_gkd_plugin.core.fused.kernels import entry_math, full_rows
from swift_gkd_plugin.core.row_divergence import Divergence, kernel_form
sig = dict(ZS='*bf16', ZT='*bf16', BS='*fp32', BT='*fp32', G='*bf16', LAB='*i64', LW='*fp32', CW='*fp32', DIV='*fp32',
           CE='*fp32', ENT='*fp32', TENT='*fp32', AGREE='*i32', stride_zs='i32', stride_zt='i32', stride_g='i32',
           V='i32', VT='i32')
sig.update({k: 'fp32' for k in ('inv_t', 'inv_tl', 'coef', 'k0', 'k1', 'k2', 'k3', 'threshold')})
for beta in (0.0, 1.0):
    form = kernel_form(Divergence('jsd', beta=beta))
    base = dict(VMAX=151936, ENTRY=getattr(entry_math, form.entry.split(':')[1]), HAS_BS=False, HAS_BT=False,
                LABEL=False, ENTROPY=False, OWN=True, TOWN=True, WANT_GRAD=True, BLOCK=2048)
    for name, fn, const in (('v1', full_rows.full_rows_kernel, dict(base, VOWN=151936)),
                            ('v2', full_rows2.full_rows2_kernel, dict(base, MODE=full_rows2.mode_of(form.entry)))):
        src = triton.compiler.ASTSource(fn=fn, signature={**sig, **dict.fromkeys(const, 'constexpr')}, constexprs=const)
        ptx = triton.compile(src, target=GPUTarget('cuda', 90, 32), options=dict(num_warps=8)).asm['ptx']
        print(beta, name, len(re.findall(r'ld\.global', ptx)), len(re.findall(r'ex2\.approx', ptx)))
'''


def test_kl_rows_are_read_twice_not_three_times():
    """Compiled for sm_90 (no GPU needed): for KL in either direction the second design has one loop over the row
    fewer, so fewer global loads and fewer ``ex2`` (the special-function unit's exp) in its code than the first
    (the counts are static, per compiled kernel; the loops run over the same blocks)."""
    counts = {}
    for line in compile_ahead_of_time(_PTX).split('\n'):
        if line.strip():
            beta, name, loads, exps = line.split()
            counts[beta, name] = int(loads), int(exps)
    for beta in ('0.0', '1.0'):
        (l1, e1), (l2, e2) = counts[beta, 'v1'], counts[beta, 'v2']
        assert l2 < l1 and e2 < e1, counts


def test_full_rows2_compiles_for_h100():
    """The package's ahead-of-time compilation to sm_90 cubin (``test_kernels_full.py``: every divergence form, with
    and without the label term / entropy / padding; no GPU needed) of the second design's kernel, whose ``MODE``
    stands where the first's ``VOWN`` does."""
    script = f'import sys; sys.path.insert(0, {HERE!r})\nimport full_rows2\n' + test_kernels_full._AOT
    for old, new in (('fn=full_rows.full_rows_kernel', 'fn=full_rows2.full_rows2_kernel'),
                     ('VOWN=151936, ', 'MODE=full_rows2.mode_of(kernel_form(div).entry), ')):
        assert old in script, old
        script = script.replace(old, new)
    assert 'compiled 14' in compile_ahead_of_time(script)


@pytest.fixture
def self_checked_triton2(monkeypatch, enabled):
    """``triton2`` chosen with its self-check (as on CUDA), on CPU tensors under the interpreter."""
    if os.environ.get('TRITON_INTERPRET') != '1':
        pytest.skip('the seam runs CPU tensors under the interpreter')
    monkeypatch.setattr(fused_loss, 'choose_backend', lambda backend, device: ('triton2', True))
    monkeypatch.setattr(fused_loss, '_CHECKED', {})


def _run(x, backend=None):
    return tf.run(x, backend=backend, mask=x['mask'], labels=x['labels'], sft_alpha=0.4, beta=0.5, chunk_size=16)


def _warnings(caplog):
    return [r.getMessage() for r in caplog.records if 'Triton kernel of the fused loss' in r.getMessage()]


def test_self_check_falls_back_when_the_second_design_is_wrong(self_checked_triton2, monkeypatch, caplog):
    """A wrong gradient from the second design (a miscompile): one warning naming it, the PyTorch path's results."""
    real = full_rows2.full_rows2

    def wrong(*args, **kw):
        out = real(*args, **kw)
        if kw.get('grad') is not None:
            kw['grad'].mul_(1.5)
        return out
    monkeypatch.setattr(full_rows2, 'full_rows2', wrong)
    x = tf.make_inputs(seed=31, n=40, v=300, vt=300)
    with caplog.at_level(logging.WARNING, logger='swift_gkd_plugin'):
        got = _run(x)
    found = _warnings(caplog)
    assert len(found) == 1 and 'the second design' in found[0] and 'differs from the PyTorch path' in found[0], found
    assert set(fused_loss._CHECKED.values()) == {'torch'}
    want = _run(x, backend='torch')
    assert tf.rel_err(got[0], want[0]) <= 1e-6 and tf.rel_err(got[1][0], want[1][0]) <= 1e-6


def test_self_check_runs_two_chunks_then_the_second_design(self_checked_triton2, monkeypatch, caplog):
    """Correct kernels: no warning; the self-check ran the second design on two chunks (the hand-over between
    chunks that the side stream does on CUDA), then every chunk runs on it."""
    calls = []
    real = chunk_triton2.Triton2Chunks.logits
    monkeypatch.setattr(chunk_triton2.Triton2Chunks, 'logits',
                        lambda self, h, sl: calls.append(sl) or real(self, h, sl))
    x = tf.make_inputs(seed=31, n=40, v=300, vt=300)
    with caplog.at_level(logging.WARNING, logger='swift_gkd_plugin'):
        got = _run(x)
    assert _warnings(caplog) == [] and list(fused_loss._CHECKED.values()) == ['triton2']
    active = int(x['mask'].sum())
    half = -(-active // 2)
    assert calls[:2] == [slice(0, half), slice(half, active)], calls
    assert len(calls) == 2 + -(-active // 16)
    want = _run(x, backend='torch')
    assert tf.rel_err(got[0], want[0]) <= 2e-5 and tf.rel_err(got[1][0], want[1][0]) <= 2e-5


def test_self_check_catches_a_weight_gradient_that_does_not_accumulate(self_checked_triton2, monkeypatch, caplog):
    """Issue 67 item 2: a weight gradient that each chunk overwrites instead of accumulating (the float32-output
    ``addmm`` at beta 0 on every chunk), the hidden-state gradient right: the self-check compares ``grad_w @ r``
    over its two chunks, names it, and the run gets the PyTorch path's gradients."""
    real = chunk_triton2.backprop_matmuls
    monkeypatch.setattr(chunk_triton2, 'backprop_matmuls', lambda g, h, w, alpha, sl, grad_h, grad_w, first:
                        real(g, h, w, alpha, sl, grad_h, grad_w, True))
    x = tf.make_inputs(seed=31, n=40, v=300, vt=300)
    with caplog.at_level(logging.WARNING, logger='swift_gkd_plugin'):
        got = _run(x)
    found = _warnings(caplog)
    assert len(found) == 1 and 'differs from the PyTorch path' in found[0], found
    errors = dict(re.findall(r'(grad_hidden|grad_weight @ r) ([0-9.e+-]+)', found[0]))
    assert float(errors['grad_hidden']) < 1e-4 < float(errors['grad_weight @ r']), found[0]
    want = _run(x, backend='torch')
    assert tf.rel_err(got[1][1], want[1][1]) <= 1e-6


def test_a_frozen_head_is_self_checked_without_a_weight_gradient(self_checked_triton2, monkeypatch):
    """A frozen head (a LoRA student's): the run forms no weight gradient, so neither does the self-check (a
    ``[V, H]`` float32 buffer, GBs at real vocabularies, that the run itself never allocates); the accumulation bug of
    the test above then has nothing to show and the second design runs."""
    from swift_gkd_plugin.core.fused.loss import fused_linear_jsd
    from swift_gkd_plugin.core.teacher_signal import TeacherHead
    real, seen = chunk_triton2.backprop_matmuls, []
    monkeypatch.setattr(chunk_triton2, 'backprop_matmuls', lambda g, h, w, alpha, sl, grad_h, grad_w, first:
                        seen.append(grad_w) or real(g, h, w, alpha, sl, grad_h, grad_w, True))
    x = tf.make_inputs(seed=31, n=40, v=300, vt=300)
    hs = x['hs'].clone().requires_grad_()
    loss, _ = fused_linear_jsd(hs, x['w'], None, teacher=TeacherHead(x['ht'], x['wt'], x['bt']), beta=0.5,
                               chunk_size=16)
    loss.backward()
    assert seen and all(grad_w is None for grad_w in seen)
    assert list(fused_loss._CHECKED.values()) == ['triton2']


def test_weight_gradient_path_is_said(monkeypatch):
    """Issue 67 item 2: the backend's line says how triton2 forms the weight gradient."""
    monkeypatch.delenv(kernels.BACKEND_ENV, raising=False)
    text = triton2_backend.describe_backend('triton2', torch.device('cpu'), torch.bfloat16)
    assert "weight gradient: the first design's bfloat16 products (off CUDA)" in text, text
    assert 'weight gradient: float32 matmuls' in triton2_backend.describe_backend('triton2', torch.device('cpu'),
                                                                                  torch.float32)
    assert 'weight gradient' not in triton2_backend.describe_backend('triton', torch.device('cpu'), torch.bfloat16)


def test_backend_choice_and_description(monkeypatch):
    monkeypatch.delenv(kernels.BACKEND_ENV, raising=False)
    choose = triton2_backend.choose_backend
    assert choose('triton2', torch.device('cuda')) == ('triton2', True)  # self-checked on CUDA
    if os.environ.get('TRITON_INTERPRET') == '1':
        assert choose('triton2', torch.device('cpu')) == ('triton2', False)
    text = triton2_backend.describe_backend('triton2', torch.device('cuda'))
    assert text.startswith('triton2, the second kernel design') and 'falling back' in text
    assert choose('torch', torch.device('cuda')) == kernels.choose_backend('torch', torch.device('cuda'))
    monkeypatch.setenv('TRITON_INTERPRET', '0')
    with pytest.raises(ValueError, match='backend=triton2 runs on CUDA tensors'):
        choose('triton2', torch.device('cpu'))
    with pytest.raises(ValueError, match="got 'triton2'"):  # the package's own choice: not a user's
        kernels.choose_backend('triton2', torch.device('cuda'))


def test_mode_of_entries():
    assert full_rows2.mode_of('m:kl_forward_entry') == full_rows2.KL_FORWARD
    assert full_rows2.mode_of('m:kl_reverse_entry') == full_rows2.KL_REVERSE
    assert full_rows2.mode_of('m:jsd_entry') == full_rows2.GENERIC
