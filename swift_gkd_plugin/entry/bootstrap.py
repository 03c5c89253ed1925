"""Start-up hook, imported by ``swift_gkd_plugin.pth`` in every Python process of the environment.

It must cost nothing: it imports neither torch nor ms-swift. It only registers post-import hooks so that, when a
process imports ms-swift's rlhf pipeline or trainer factory, the plugin's arguments and trainer are put in place
(see :mod:`swift_gkd_plugin.entry.activation`). ``SWIFT_GKD_PLUGIN=0`` leaves ms-swift untouched, but for one line naming
the variable where a command line holds a flag of the plugin (ms-swift's own error was a ``remaining_argv``
traceback).

It also sets how the process ends (:mod:`swift_gkd_plugin.runtime.process_exit`): a torchrun worker's last ``atexit``
handler, the launcher's child exiting with the launcher, and torchrun quiet after a rank's refusal.
"""
import atexit
import importlib.abc
import importlib.util
import os
import sys

from swift_gkd_plugin.runtime.process_exit import exit_after_clean_finish, exit_with_launcher, quiet_torchrun_after_refusal

_OFF_VALUES = {'0', 'false', 'no', 'off'}

# module name -> function name in swift_gkd_plugin.entry.activation, called right after that module has executed
_HOOKS = {
    'swift.arguments.rlhf_args': 'on_rlhf_arguments_imported',
    'swift.pipelines.train.rlhf': 'on_rlhf_pipeline_imported',
    'swift.trainers.trainer_factory': 'on_trainer_factory_imported',
    'swift.megatron.pipelines.train.rlhf': 'on_megatron_rlhf_pipeline_imported',
    'swift.cli._megatron.main': 'on_megatron_cli_imported',
    'swift.cli.main': 'on_swift_cli_imported',
    'mcore_bridge.model.rope': 'on_mcore_bridge_rope_imported',
    'swift.pipelines.infer.rollout': 'on_rollout_server_imported',
}
_OFF_HOOKS = {'swift.pipelines.base': 'on_pipeline_base_imported_while_off'}  # with SWIFT_GKD_PLUGIN=0


def auto_activation_enabled() -> bool:
    return os.environ.get('SWIFT_GKD_PLUGIN', '1').strip().lower() not in _OFF_VALUES


class _Loader(importlib.abc.Loader):
    """Delegates to the real loader, then runs the plugin's hook on the fresh module."""

    def __init__(self, inner, hook_name):
        self._inner = inner
        self._hook_name = hook_name

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module):
        self._inner.exec_module(module)
        from swift_gkd_plugin.entry import activation
        getattr(activation, self._hook_name)(module)


class _PostImportFinder(importlib.abc.MetaPathFinder):

    def __init__(self, hooks):
        self.hooks = hooks

    def find_spec(self, fullname, path=None, target=None):
        hook_name = self.hooks.get(fullname)
        if hook_name is None:
            return None
        for finder in sys.meta_path:  # the real spec, from the finders after us
            if finder is self or not hasattr(finder, 'find_spec'):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, 'exec_module'):
                    spec.loader = _Loader(spec.loader, hook_name)
                return spec
        return None


def install() -> None:
    if 'TORCHELASTIC_RUN_ID' in os.environ:  # a torchrun worker
        atexit.register(exit_after_clean_finish)
    quiet_torchrun_after_refusal()  # before exit_with_launcher() removes the launcher's variable
    exit_with_launcher()
    hooks = _HOOKS if auto_activation_enabled() else _OFF_HOOKS
    if any(isinstance(f, _PostImportFinder) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _PostImportFinder(hooks))
    # Modules imported before this point (unusual: the .pth runs at start-up) are patched right away.
    already = [name for name in hooks if name in sys.modules]
    if already:
        from swift_gkd_plugin.entry import activation
        for name in already:
            getattr(activation, hooks[name])(sys.modules[name])


try:
    install()
except Exception as exc:  # never break an unrelated Python process because of the plugin
    sys.stderr.write(f'swift_gkd_plugin: auto-activation failed: {exc!r}\n')
