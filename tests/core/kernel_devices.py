"""Where the kernel tests run: CPU tensors under Triton's interpreter, CUDA tensors with compiled kernels.

Triton reads ``TRITON_INTERPRET`` when a kernel is decorated (when its module is first imported), so one process runs
the kernels one way: on a machine without an NVIDIA GPU ``tests/conftest.py`` sets ``TRITON_INTERPRET=1`` and the
``cpu`` cases run; on a GPU machine it is left unset and the ``cuda`` cases run. The float64 references and every
comparison stay on the CPU: the results of a CUDA run are copied back first.
"""
from __future__ import annotations

import os

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

