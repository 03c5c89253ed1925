"""A teacher server for GKD without vLLM: top-k teacher log-probabilities over HTTP.

``swift-gkd serve-teacher --model PATH ...`` serves a transformers causal LM with dynamic batching:

* ``POST /infer/`` speaks ms-swift's teacher protocol (``--teacher_model_server URL --gkd_logits_topk K``);
* ``POST /v1/topk`` is a compact endpoint (packed arrays, optional tail mass) used by :class:`TeacherClient`.

See :mod:`.protocol` for the wire formats, :mod:`.backend` for batching and scoring, :mod:`.app` for the routes.
Importing this package is cheap: the client and the server are loaded on first use.
"""
from __future__ import annotations

__all__ = ['TeacherClient', 'TeacherServerError', 'TopKResult', 'create_app', 'ServerConfig', 'TransformersTeacher']

_LAZY = {
    'TeacherClient': 'client', 'TeacherServerError': 'client', 'TopKResult': 'client',
    'create_app': 'app', 'ServerConfig': 'app', 'TransformersTeacher': 'backend',
}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        module = importlib.import_module(f'{__name__}.{_LAZY[name]}')
        return getattr(module, name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
