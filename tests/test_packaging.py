"""Both install kinds ship the activation file: the regular wheel and the PEP 660 editable wheel (``pip install -e``).

The wheels are built offline with setuptools' own PEP 517/660 hooks (the ones pip calls) from a copy of the project,
then unpacked into a directory that a bare interpreter (``python -S``) adds as a site directory, as pip's install
would: the plugin's start-up hook must be active in that interpreter.
"""
import os
import re
import shutil
import subprocess
import sys
import zipfile

import pytest

PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PTH = 'swift_gkd_plugin.pth'
PROJECT_FILES = ['setup.py', 'pyproject.toml', 'README.md', 'MANIFEST.in', PTH]


@pytest.fixture(scope='module')
def project_copy(tmp_path_factory):
    """The project's build inputs in a scratch directory, so that building leaves no egg-info/build in the tree."""
    root = tmp_path_factory.mktemp('project')
    for name in PROJECT_FILES:
        shutil.copy(os.path.join(PROJECT, name), root / name)
    shutil.copytree(os.path.join(PROJECT, 'swift_gkd_plugin'), root / 'swift_gkd_plugin',
                    ignore=shutil.ignore_patterns('__pycache__'))
    for docs in ('docs_en', 'docs_zh'):
        shutil.copytree(os.path.join(PROJECT, docs), root / docs)
    return root


def build(project_dir, hook: str, out_dir) -> str:
    """Runs setuptools' PEP 517/660 hook ``build_wheel`` or ``build_editable``; returns the wheel's path."""
    os.makedirs(out_dir)
    code = f'import sys; from setuptools import build_meta; print(build_meta.{hook}(sys.argv[1]))'
    done = subprocess.run([sys.executable, '-c', code, str(out_dir)], cwd=project_dir, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return os.path.join(out_dir, done.stdout.strip().splitlines()[-1])


def record_paths(wheel: zipfile.ZipFile):
    record = next(n for n in wheel.namelist() if n.endswith('.dist-info/RECORD'))
    return {line.split(',')[0] for line in wheel.read(record).decode().splitlines()}


def bootstrap_active_in(site_dir) -> str:
    """``python -I -S`` (no site-packages, no PYTHONPATH, no working directory on sys.path) with ``site_dir`` added
    as a site directory, as pip's install into site-packages would."""
    code = ('import site, sys; site.addsitedir(sys.argv[1]); '
            'import swift_gkd_plugin.entry.bootstrap as b; '
            'print(any(isinstance(f, b._PostImportFinder) for f in sys.meta_path), b.__file__)')
    done = subprocess.run([sys.executable, '-I', '-S', '-c', code, str(site_dir)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip()


@pytest.mark.parametrize('hook', ['build_wheel', 'build_editable'])
def test_wheel_ships_the_activation_file(project_copy, tmp_path, hook):
    wheel_path = build(project_copy, hook, tmp_path / 'dist')
    with zipfile.ZipFile(wheel_path) as wheel:
        assert PTH in wheel.namelist(), f'{hook}: {PTH} is not at the top of {os.path.basename(wheel_path)}'
        assert wheel.read(PTH) == open(os.path.join(PROJECT, PTH), 'rb').read()
        assert PTH in record_paths(wheel), f'{hook}: {PTH} is not in RECORD, pip uninstall would leave it behind'
        wheel.extractall(tmp_path / 'site')
    active, bootstrap_file = bootstrap_active_in(tmp_path / 'site').split(' ', 1)
    assert active == 'True'
    # the editable install must import the project's own source, the regular one its installed copy
    expected_root = project_copy if hook == 'build_editable' else tmp_path / 'site'
    assert os.path.realpath(bootstrap_file).startswith(os.path.realpath(expected_root) + os.sep)


def test_wheel_ships_the_docs_that_help_texts_cite(project_copy, tmp_path):
    """Help texts and errors cite docs_en/*.md pages: the regular wheel carries them inside the package, where
    ``swift-gkd docs`` finds them."""
    wheel_path = build(project_copy, 'build_wheel', tmp_path / 'dist')
    with zipfile.ZipFile(wheel_path) as wheel:
        names = set(wheel.namelist())
        pages = sorted(n for n in os.listdir(os.path.join(PROJECT, 'docs_en')) if n.endswith('.md'))
        assert pages and {f'swift_gkd_plugin/docs_en/{page}' for page in pages} <= names
        assert 'swift_gkd_plugin/docs_en/skd.md' in record_paths(wheel)
        # links out of docs_en (examples/, tests/gpu/) would be dead in the package: named by their source-tree path
        rl = wheel.read('swift_gkd_plugin/docs_en/rl.md').decode()
        assert '](../' not in rl and '`examples/gkd_rl_reward.sh` (in the source tree)' in rl
        for page in pages:
            assert '](../' not in wheel.read(f'swift_gkd_plugin/docs_en/{page}').decode(), page
        # the wheel ships what users run: the demo's and the examples' fixtures, never the test harness (tests/harness/)
        assert sorted(n for n in names if n.startswith('swift_gkd_plugin/demo/')) == [
            f'swift_gkd_plugin/demo/{m}.py' for m in
            ('__init__', 'quality_task', 'tiny', 'tiny_text', 'tool_scheduler', 'tool_task')]
        harness = {n[:-3] for n in os.listdir(os.path.join(PROJECT, 'tests', 'harness')) if n.endswith('.py')}
        assert harness - {'__init__'} and not {n for n in names if os.path.basename(n)[:-3] in harness - {'__init__'}}
        wheel.extractall(tmp_path / 'site')
    code = 'import site, sys; site.addsitedir(sys.argv[1]); from swift_gkd_plugin.entry import cli; print(cli.docs_dir())'
    done = subprocess.run([sys.executable, '-I', '-S', '-c', code, str(tmp_path / 'site')], capture_output=True,
                          text=True, timeout=120)
    assert done.stdout.strip() == str(tmp_path / 'site' / 'swift_gkd_plugin' / 'docs_en'), done.stderr[-3000:]


def test_swift_gkd_version_help_and_docs():
    """``--version`` as well as ``version``; help in plain text with the demo's folder and its flags' defaults."""
    swift_gkd = os.path.join(os.path.dirname(sys.executable), 'swift-gkd')

    def run(*argv):
        done = subprocess.run([swift_gkd, *argv], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    from swift_gkd_plugin import __version__
    assert run('--version').strip() == f'swift-gkd-plugin {__version__}' and run('version').strip() == __version__
    top = run('--help')
    assert '``' not in top and './swift_gkd_demo' in top and 'swift-gkd docs' in top
    # every command argparse lists under 'positional arguments' is described in the overview above it
    commands = re.findall(r'^    ([a-z][a-z-]+)\b', top.split('positional arguments:')[1], re.M)
    assert 'score' in commands and 'serve-teacher' in commands
    for name in commands:
        assert f'  swift-gkd {name}' in top.split('positional arguments:')[0], f'swift-gkd --help omits {name}'
    demo = run('demo', '--help')
    assert '(default: swift_gkd_demo)' in demo and '(default: 80)' in demo
    assert '(default: 64)' in run('serve-teacher', '--help')
    assert os.path.isfile(run('docs', 'skd').strip())
