"""The fused loss's backend choice and ``auto``'s self-check of the Triton kernels, with its fallback to the PyTorch
path: a kernel that fails or disagrees on its first chunk costs speed, not the run; a forced ``triton`` never falls
back. The seam: ``kernels.auto_backend`` made to pick the kernels for CPU tensors (under Triton's interpreter), and
an injected failing or wrong kernel."""
from __future__ import annotations

import logging
import os
import sys

import pytest
import torch

pytest.importorskip('triton', reason='the kernels need triton (the dev extra pins it)')

sys.path.insert(0, os.path.dirname(__file__))
import test_fused_loss as tf  # noqa: E402
from kernel_devices import DEVICES  # noqa: E402

from swift_gkd_plugin.core.fused import kernels  # noqa: E402
from swift_gkd_plugin.core.fused import chunk_triton as fused_triton  # noqa: E402
from swift_gkd_plugin.core.fused import loss as fused_loss  # noqa: E402
from swift_gkd_plugin.core.fused.kernels import full_rows as full_rows_module  # noqa: E402
from swift_gkd_plugin.core.row_divergence import Divergence  # noqa: E402


@pytest.fixture(params=DEVICES)
def auto_kernels(request, monkeypatch):
    """``auto`` picks the kernels on this device (CPU: interpreted), with a fresh self-check cache; yields the
    device."""
    monkeypatch.setattr(kernels, 'auto_backend', lambda device: ('triton', 'test'))
    monkeypatch.setattr(fused_loss, '_CHECKED', {})
    monkeypatch.delenv(kernels.BACKEND_ENV, raising=False)
    return request.param


def warnings_of(caplog):
    return [r.getMessage() for r in caplog.records if 'Triton kernel of the fused loss' in r.getMessage()]


def inputs(topk: bool):
    x = tf.make_inputs(seed=31, n=40, v=300, vt=300)
    return x, (tf.topk_of(x, 6) if topk else None)


def run(x, topk, device, backend=None, **kw):
    return tf.run(x, topk=topk, device=device, backend=backend, mask=x['mask'], labels=x['labels'], sft_alpha=0.4,
                  beta=0.5, topk_tail=topk is not None, chunk_size=16, **kw)


def same(a, b, tol=1e-6):
    assert tf.rel_err(a[0], b[0]) <= tol
    for g, h in zip(a[1], b[1]):
        assert tf.rel_err(g, h) <= tol


@pytest.mark.parametrize('topk', [False, True], ids=['full', 'topk_tail'])
def test_fallback_when_the_kernel_fails_to_run(auto_kernels, topk, monkeypatch, caplog):
    """A kernel that raises (a compile or launch error on an unknown device): one warning naming the cause and the
    flag, the run goes on with the PyTorch path's results; the next call does not try again."""
    def broken(self, h, sl):
        raise RuntimeError('ptxas fatal: unsupported GPU architecture')
    monkeypatch.setattr(fused_triton.TritonChunks, 'chunk', broken)
    x, k = inputs(topk)
    with caplog.at_level(logging.WARNING, logger='swift_gkd_plugin'):
        got = run(x, k, auto_kernels)
        again = run(x, k, auto_kernels)
    found = warnings_of(caplog)
    assert len(found) == 1, found
    assert 'failed: RuntimeError: ptxas fatal' in found[0] and '--gkd_fused_backend torch' in found[0]
    want = run(x, k, auto_kernels, backend='torch')
    same(got, want)
    same(again, want)
    assert set(fused_loss._CHECKED.values()) == {'torch'}


def test_fallback_when_the_kernel_is_wrong(auto_kernels, monkeypatch, caplog):
    """A kernel that runs but writes a wrong gradient (a miscompile): the first-chunk comparison catches it."""
    real = full_rows_module.full_rows

    def wrong(*args, **kw):
        out = real(*args, **kw)
        if kw.get('grad') is not None:
            kw['grad'].mul_(1.5)
        return out
    monkeypatch.setattr(full_rows_module, 'full_rows', wrong)
    x, _ = inputs(False)
    with caplog.at_level(logging.WARNING, logger='swift_gkd_plugin'):
        got = run(x, None, auto_kernels)
    found = warnings_of(caplog)
    assert len(found) == 1 and 'differs from the PyTorch path on its first 33 rows' in found[0], found
    assert 'grad_hidden 3.3e-01' in found[0]
    same(got, run(x, None, auto_kernels, backend='torch'))


@pytest.mark.parametrize('topk', [False, True], ids=['full', 'topk_tail'])
def test_self_check_passes_and_the_kernels_run(auto_kernels, topk, monkeypatch, caplog):
    """Correct kernels: no warning, the variant is recorded as checked, and the later chunks run on the kernels."""
    calls = []
    real = fused_triton.TritonChunks.chunk
    monkeypatch.setattr(fused_triton.TritonChunks, 'chunk', lambda self, h, sl: calls.append(sl) or real(self, h, sl))
    x, k = inputs(topk)
    with caplog.at_level(logging.WARNING, logger='swift_gkd_plugin'):
        got = run(x, k, auto_kernels)
    assert warnings_of(caplog) == []
    assert list(fused_loss._CHECKED.values()) == ['triton']
    active = calls[-1].stop  # the self-check's active rows in two chunks (grad_w accumulates), then chunks of 16
    half = -(-active // 2)
    assert calls[:2] == [slice(0, half), slice(half, active)] and len(calls) == 2 + -(-active // 16), calls
    assert active > 16
    same(got, run(x, k, auto_kernels, backend='torch'), tol=2e-5)


def test_forced_triton_never_falls_back(auto_kernels, monkeypatch):
    def broken(self, h, sl):
        raise RuntimeError('no kernel image is available for execution on the device')
    monkeypatch.setattr(fused_triton.TritonChunks, 'chunk', broken)
    x, _ = inputs(False)
    with pytest.raises(RuntimeError, match='no kernel image'):
        run(x, None, auto_kernels, backend='triton')
    monkeypatch.setenv(kernels.BACKEND_ENV, 'triton')
    with pytest.raises(RuntimeError, match='no kernel image'):
        run(x, None, auto_kernels)
    assert fused_loss._CHECKED == {}


def test_auto_backend_reasons(monkeypatch):
    """``auto``: CPU tensors, ROCm, the interpreter and a triton that does not import all take the PyTorch path, with
    the reason; an empty variable is ``auto``; a bad one is refused naming the allowed values."""
    assert kernels.auto_backend(torch.device('cpu')) == ('torch', 'cpu tensors')
    cuda = torch.device('cuda')
    monkeypatch.delenv('TRITON_INTERPRET', raising=False)
    monkeypatch.setattr(torch.version, 'hip', '6.2', raising=False)
    assert kernels.auto_backend(cuda)[0] == 'torch' and 'ROCm' in kernels.auto_backend(cuda)[1]
    monkeypatch.setattr(torch.version, 'hip', None, raising=False)
    monkeypatch.setitem(sys.modules, 'triton', None)  # import triton raises ImportError
    name, why = kernels.auto_backend(cuda)
    assert name == 'torch' and why.startswith('triton does not import (ModuleNotFoundError')
    monkeypatch.setenv(kernels.BACKEND_ENV, '')
    assert kernels.requested_backend() == ('auto', kernels.BACKEND_ENV)
    monkeypatch.setenv(kernels.BACKEND_ENV, 'cuda')
    with pytest.raises(ValueError, match=r"SWIFT_GKD_FUSED_BACKEND must be one of "
                                         r"\('auto', 'torch', 'triton'\), "
                                         r"got 'cuda'"):
        kernels.requested_backend()
    assert kernels.requested_backend('torch') == ('torch', 'backend')  # the argument wins over the variable
    assert fused_loss.BACKENDS.keys() == {'torch', 'triton'}
    # one Triton design for users: the second is an experiment of the GPU kit (tests/gpu/experiments/triton2)
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'torch', 'triton'\), got 'triton2'"):
        kernels.requested_backend('triton2')


_INTERPRET_AFTER_IMPORT = r'''
import os
import torch
import triton  # imported (as a library may import it) before the variable is set
os.environ['TRITON_INTERPRET'] = '1'
from swift_gkd_plugin.core.fused.loss import fused_linear_jsd
from swift_gkd_plugin.core.teacher_signal import TeacherHead
g = torch.Generator().manual_seed(0)
h, w, ht, wt = (torch.randn(*shape, generator=g) for shape in ((4, 8), (16, 8), (4, 8), (16, 8)))
fused_linear_jsd(h, w, teacher=TeacherHead(ht, wt), backend='triton')
'''


def test_interpreter_set_after_triton_was_imported_is_named(tmp_path):
    """``TRITON_INTERPRET=1`` set in a process that had imported triton (issue 37 item 9): Triton's own error was an
    ``InterpreterError`` about a jit function called outside a kernel; the plugin names the variable and the fix."""
    import subprocess
    env = {k: v for k, v in os.environ.items() if k != 'TRITON_INTERPRET'}
    proc = subprocess.run([sys.executable, '-c', _INTERPRET_AFTER_IMPORT], env=env, capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 1 and 'InterpreterError:' not in last, proc.stderr[-3000:]
    assert last.startswith('ValueError: backend=triton: TRITON_INTERPRET=1 was set after triton was imported') and \
        'before anything imports triton' in last
