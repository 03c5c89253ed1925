"""Where the kernel tests run: CPU tensors under Triton's interpreter, CUDA tensors with compiled kernels.

Triton reads ``TRITON_INTERPRET`` when a kernel is decorated (when its module is first imported), so one process runs
the kernels one way: on a machine without an NVIDIA GPU ``tests/conftest.py`` sets ``TRITON_INTERPRET=1`` and the
``cpu`` cases run; on a GPU machine it is left unset and the ``cuda`` cases run. The float64 references and every
comparison stay on the CPU: the results of a CUDA run are copied back first.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

INTERPRETED = os.environ.get('TRITON_INTERPRET') == '1'
CUDA = torch.cuda.is_available() and not INTERPRETED

DEVICES = [
    pytest.param('cpu', marks=pytest.mark.skipif(not INTERPRETED, reason='CPU tensors need Triton\'s interpreter '
                                                 '(TRITON_INTERPRET=1 before triton is imported)')),
    pytest.param('cuda', marks=pytest.mark.skipif(not CUDA, reason='no CUDA device (or TRITON_INTERPRET=1 in this '
                                                  'process: the kernels are interpreted)')),
]



def compile_ahead_of_time(script: str) -> str:
    """Run ``script`` (it compiles kernels for a GPU target with Triton's bundled ptxas; no GPU needed) in a process
    without the interpreter; its stdout. Skips where triton has no ptxas."""
    env = dict(os.environ, TRITON_INTERPRET='0')
    proc = subprocess.run([sys.executable, '-c', script], env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode and 'ptxas' in proc.stderr and 'not found' in proc.stderr.lower():
        pytest.skip('triton has no ptxas here')
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout
