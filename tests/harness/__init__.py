"""The test suite's harness (not installed): the test zygote (:mod:`.zygote`), the CPU stand-ins for Megatron and
``swift rollout`` (:mod:`.megatron_cpu`, :mod:`.rollout_cpu`) and the fixtures only tests and benchmarks use. Imported
as ``harness`` with ``tests/`` on ``sys.path`` (pytest puts it there; the site folders and the zygote's start add it
for their processes; the benchmarks add it themselves). The demo's fixtures stay in :mod:`swift_gkd_plugin.demo`.

Below, the import hooks the test-only CPU harnesses' patches register with (:mod:`.megatron_cpu`, :mod:`.rollout_cpu`):
``_after(name)`` runs a function on module ``name`` once it has executed; ``around`` is a context its execution runs
in. Standard library only: every process of a harness's environment imports them at start-up (torch.compile's
instruction-set probes too, which exist to spare themselves torch's import).
"""
from __future__ import annotations

import contextlib
import importlib.abc
import sys
from typing import Callable, Dict


class _Loader(importlib.abc.Loader):

    def __init__(self, inner, around, after):
        self._inner, self._around, self._after = inner, around, after

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module):
        with (self._around() if self._around else contextlib.nullcontext()):
            self._inner.exec_module(module)
        if self._after:
            self._after(module)


class _Finder(importlib.abc.MetaPathFinder):
    """Runs ``after[name](module)`` once module ``name`` has executed; ``around[name]()`` is a context manager its
    execution runs in."""

    def __init__(self):
        self.after: Dict[str, Callable] = {}
        self.around: Dict[str, Callable] = {}
        self._looking: set = set()

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in self.after and fullname not in self.around or fullname in self._looking:
            return None  # (re-entered from another post-import finder hooking the same module, e.g. the plugin's)
        self._looking.add(fullname)
        try:
            return self._find_spec(fullname, path, target)
        finally:
            self._looking.discard(fullname)

    def _find_spec(self, fullname, path, target):
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, 'find_spec'):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, 'exec_module'):
                    spec.loader = _Loader(spec.loader, self.around.get(fullname), self.after.get(fullname))
                return spec
        return None


_FINDER = _Finder()


def _after(name: str):
    def register(fn):
        _FINDER.after[name] = fn
        return fn
    return register
