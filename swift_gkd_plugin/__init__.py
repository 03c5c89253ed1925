"""swift-gkd-plugin: a Generalized Knowledge Distillation trainer for ms-swift (`swift rlhf --rlhf_type gkd`).

Rooms (docs_en/architecture.md): entry/ (what Python, ms-swift and the shell run first), runtime/ (how a process
ends, ms-swift's shared state), options/ (flags and the checks before loading), data/ (dataset rows and files),
rollout/ (sampling pieces both adapters use), then swift/, megatron/, server/, core/ and demo/ (the tiny offline models and tasks of `swift-gkd demo` and the
examples).
"""
import importlib
import importlib.abc
import importlib.util
import sys
import warnings

__version__ = '0.1.0'

# 0.1.0 moved the top-level modules into rooms and renamed testing/ to demo/; their old names import the new modules
# (a package's submodules too: swift_gkd_plugin.testing.tiny is swift_gkd_plugin.demo.tiny), with a
# DeprecationWarning, for one release (a user's script, an old console script or a checkpoint's pickle may still name
# them).
MOVED_MODULES = {
    '_bootstrap': 'entry.bootstrap', 'activation': 'entry.activation', 'cli': 'entry.cli',
    'process_exit': 'runtime.process_exit', 'ms_swift_state': 'runtime.ms_swift_state',
    'flags': 'options.flags', 'flag_checks': 'options.flag_checks', '_ms_swift_flags': 'options._ms_swift_flags',
    'ms_swift_flag_table': 'options.ms_swift_flag_table', 'local_paths': 'options.local_paths',
    'hub_models': 'options.hub_models', 'dataset_files': 'data.dataset_files', 'dataset_rows': 'data.dataset_rows',
    'colocated_vllm': 'rollout.colocated_vllm', 'completion_stats': 'rollout.completion_stats',
    'testing': 'demo',
}


class _MovedModuleLoader(importlib.abc.Loader):
    """Hands out the moved module itself (one object under both names, so patches and pickles agree)."""

    def __init__(self, new_name):
        self.new_name = new_name

    def create_module(self, spec):
        warnings.warn(f'{spec.name} moved to {self.new_name}; the old name is kept for one release',
                      DeprecationWarning, stacklevel=2)
        module = importlib.import_module(self.new_name)
        self.spec = module.__spec__
        return module

    def exec_module(self, module):
        module.__spec__ = self.spec  # importlib set the alias's spec on the shared module: give it its own back


class _MovedModuleFinder(importlib.abc.MetaPathFinder):
    """Resolves ``swift_gkd_plugin.<old name>[.<submodule>]`` to the module in its room. It runs before the path
    finder: a moved package's submodule would otherwise load a second time, under the old name, from the package's
    path."""

    def find_spec(self, fullname, path=None, target=None):
        if not fullname.startswith(__name__ + '.'):
            return None
        old, _, rest = fullname[len(__name__) + 1:].partition('.')
        if old not in MOVED_MODULES:
            return None
        new = f'{__name__}.{MOVED_MODULES[old]}' + (f'.{rest}' if rest else '')
        return importlib.util.spec_from_loader(fullname, _MovedModuleLoader(new))


if not any(isinstance(f, _MovedModuleFinder) for f in sys.meta_path):
    sys.meta_path.insert(0, _MovedModuleFinder())
