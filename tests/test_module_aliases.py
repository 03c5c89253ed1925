"""The top-level modules moved into rooms (entry/, runtime/, options/, data/, rollout/); their old names keep working
for one release: what a user's script, an old ``swift_gkd_plugin.pth``, an old ``swift-gkd`` console script or a
pickle made before the move names."""
import importlib
import pickle
import subprocess
import sys
import warnings

import pytest

import swift_gkd_plugin


@pytest.mark.parametrize('old,new', sorted(swift_gkd_plugin.MOVED_MODULES.items()))
def test_an_old_name_is_the_moved_module_with_a_warning(old, new):
    sys.modules.pop(f'swift_gkd_plugin.{old}', None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        aliased = importlib.import_module(f'swift_gkd_plugin.{old}')
    moved = importlib.import_module(f'swift_gkd_plugin.{new}')
    assert aliased is moved
    assert moved.__spec__.name == moved.__name__ == f'swift_gkd_plugin.{new}'  # the alias left the module its own
    assert [str(w.message) for w in caught if w.category is DeprecationWarning] == [
        f'swift_gkd_plugin.{old} moved to swift_gkd_plugin.{new}; the old name is kept for one release']


def test_an_unknown_top_level_name_is_still_an_import_error():
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module('swift_gkd_plugin.no_such_module')


def test_a_pickle_naming_an_old_module_loads_the_moved_class():
    """A pickle made before the move (``swift_gkd_plugin.flag_checks.FlagError``; protocol 0 spells the name out, so
    the test can write the old one) loads the class of the room."""
    from swift_gkd_plugin.options.flag_checks import FlagError
    old = pickle.dumps(FlagError('x'), protocol=0).replace(b'swift_gkd_plugin.options.flag_checks', b'swift_gkd_plugin.flag_checks')
    assert b'swift_gkd_plugin.flag_checks' in old
    assert type(pickle.loads(old)) is FlagError


def test_the_old_start_up_line_and_console_script_still_work():
    """An old ``.pth`` line (``import swift_gkd_plugin._bootstrap``) installs the start-up hooks, and an old console
    script's target (``swift_gkd_plugin.cli:main``) runs the command, in a fresh interpreter."""
    code = ('import sys, swift_gkd_plugin._bootstrap\n'
            'print(sum(type(f).__name__ == "_PostImportFinder" for f in sys.meta_path))\n'
            'from swift_gkd_plugin.cli import main\n'
            'sys.argv = ["swift-gkd", "--version"]\n'
            'main()\n')
    assert _fresh_python(code) == ['1', 'swift-gkd-plugin', swift_gkd_plugin.__version__]


def test_a_submodule_of_a_renamed_package_is_the_moved_submodule():
    """``testing/`` became ``demo/``: ``swift_gkd_plugin.testing.tiny`` (the examples' and users' scripts named it) is
    ``swift_gkd_plugin.demo.tiny`` itself, not a second copy loaded from the package's path, in a fresh interpreter."""
    code = ('import warnings; warnings.simplefilter("error", DeprecationWarning)\n'
            'import swift_gkd_plugin.demo.tiny as new\n'
            'warnings.simplefilter("ignore", DeprecationWarning)\n'
            'import swift_gkd_plugin.testing.tiny as old\n'
            'from swift_gkd_plugin.testing.tiny import build_warm_workspace\n'
            'print(old is new, build_warm_workspace is new.build_warm_workspace)\n')
    assert _fresh_python(code) == ['True', 'True']


def _fresh_python(code: str) -> list:
    """The words ``code`` prints in a fresh interpreter, which must exit 0."""
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()
