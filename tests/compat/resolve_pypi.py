"""Resolve the README's two set-up commands against PyPI alone, and the ``dev`` extra beside each end of the torch range.

CI's machine (and a developer's) has a pip configuration that adds a local wheel folder holding a CPU build of torch
that PyPI does not have; a pin only that folder satisfies once hid a conflict every user met first (torch 2.13.0 from
PyPI requires triton 3.7.1; the constraints pinned 3.6.0). Here pip runs with every configuration file and ``PIP_*``
variable that adds a source turned off, ``--dry-run --ignore-installed``: it reads PyPI's metadata and installs nothing.

The commands are read from the README's first code block, so they cannot drift from what users copy:
each ``pip install`` of one command is resolved together (a later ``pip install`` of the same command sees what the
earlier installed: resolving them at once is the stricter check); a ``--no-deps`` install is resolved on its own.
Then ``.[dev]`` with ``torch==<end>`` for both ends of ``setup.py``'s torch range, unconstrained: the extra must
install beside the torch a user already has, never replace it.

Exit 0 when everything resolves; otherwise 1, after pip's own lines naming the conflict.
Usage: ``python tests/compat/resolve_pypi.py [--pip PYTHON]`` (``.ci/run`` runs it on every run).
"""
import argparse
import concurrent.futures
import os
import re
import shlex
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# the pip options that name a source or a constraint: set on this machine by its configuration, not by users
PIP_SOURCE_VARIABLES = ('PIP_FIND_LINKS', 'PIP_EXTRA_INDEX_URL', 'PIP_INDEX_URL', 'PIP_CONSTRAINT', 'PIP_NO_INDEX',
                        'PIP_CONFIG_FILE', 'PIP_REQUIREMENT')
# options of a user's install that change nothing in what is resolved
IGNORED_OPTIONS = ('--no-compile', '-q', '--quiet', '-U', '--upgrade')


def readme_commands(readme: str) -> list:
    """The README's two set-up commands: the first two lines of its first ``bash`` block."""
    block = re.search(r'```bash\n(.*?)```', readme, re.S)
    if block is None:
        raise SystemExit('README.md: no ```bash block with the set-up commands')
    lines = [line for line in block.group(1).splitlines() if line.strip()]
    if len(lines) < 2:
        raise SystemExit('README.md: its first bash block should start with the two set-up commands')
    return lines[:2]


def pip_installs(command: str) -> list:
    """The argument lists of each ``pip install`` in a ``&&`` chain, options that change nothing left out."""
    installs = []
    for part in command.split('&&'):
        words = shlex.split(part)
        if words[:2] == ['pip', 'install']:
            installs.append([w for w in words[2:] if w not in IGNORED_OPTIONS])
    return installs


def resolutions(command: str) -> list:
    """What to resolve for one command: its ``pip install`` argument lists merged, ``--no-deps`` ones apart."""
    merged, apart = [], []
    for args in pip_installs(command):
        (apart.append(args) if '--no-deps' in args else merged.extend(args))
    return ([merged] if merged else []) + apart


def torch_range_ends() -> list:
    """``torch==LOW`` and the newest release below ``setup.py``'s upper bound, as ``setup.py`` declares them."""
    with open(os.path.join(ROOT, 'setup.py'), encoding='utf-8') as f:
        found = re.search(r"'torch>=([\d.]+),<([\d.]+)'", f.read())
    if found is None:
        raise SystemExit("setup.py: install_requires declares no 'torch>=LOW,<HIGH' range")
    return [found.group(1), found.group(2)]


def newest_release(python: str, name: str, below: str) -> str:
    """The newest release of ``name`` on PyPI below version ``below`` (``pip index versions``)."""
    done = subprocess.run([python, '-m', 'pip', 'index', 'versions', name, '--disable-pip-version-check'],
                          env=pypi_only_environment(), capture_output=True, text=True)
    listed = re.search(r'Available versions: (.*)', done.stdout)
    if listed is None:
        raise SystemExit(f'resolve_pypi: pip index versions {name} listed nothing: {done.stderr.strip()[-300:]}')
    key = lambda v: tuple(int(x) for x in re.findall(r'\d+', v)[:3])  # noqa: E731
    versions = [v.strip() for v in listed.group(1).split(',') if re.fullmatch(r'[\d.]+', v.strip())]
    return max((v for v in versions if key(v) < key(below)), key=key)


def pypi_only_environment() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in PIP_SOURCE_VARIABLES}
    env['PIP_CONFIG_FILE'] = os.devnull  # pip reads no configuration file at all (global, user, site)
    return env


def resolve(python: str, args: list, what: str) -> tuple:
    """``(resolved, report)``: pip's dry run of ``pip install ARGS`` with PyPI alone."""
    cmd = [python, '-m', 'pip', 'install', '--dry-run', '--ignore-installed',
           '--disable-pip-version-check'] + args
    started = time.time()
    done = subprocess.run(cmd, cwd=ROOT, env=pypi_only_environment(), capture_output=True, text=True)
    seconds = time.time() - started
    if done.returncode == 0:
        return True, f'resolve_pypi: {what}: resolves with PyPI alone ({seconds:.0f} s): pip install {shlex.join(args)}'
    # pip's closing lines (the conflict and what caused it), without the progress of the resolution
    lines = [line for line in (done.stdout + done.stderr).splitlines()
             if line.strip() and not line.lstrip().startswith(('Collecting', 'Downloading', 'Using cached', 'Obtaining',
                                                                '━', 'Requirement already', 'Would install'))]
    return False, (f'resolve_pypi: {what} does NOT resolve with PyPI alone: pip install {shlex.join(args)}\n'
                   + '\n'.join('    ' + line for line in lines[-25:]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--python', default=sys.executable, help='the Python whose pip resolves (default: this one)')
    parser.add_argument('--skip-ends', action='store_true', help='only the README commands')
    args = parser.parse_args(argv)
    with open(os.path.join(ROOT, 'README.md'), encoding='utf-8') as f:
        commands = readme_commands(f.read())
    checks = [(f'README command {n}', r) for n, command in enumerate(commands, 1) for r in resolutions(command)]
    if not args.skip_ends:
        low, high = torch_range_ends()
        newest = newest_release(args.python, 'torch', high)
        checks += [(f'.[dev] beside torch {end}', [f'torch=={end}', '.[dev]']) for end in (low, newest)]
    with concurrent.futures.ThreadPoolExecutor(len(checks)) as pool:  # network-bound: all at once
        results = list(pool.map(lambda check: resolve(args.python, check[1], check[0]), checks))
    for _, report in results:
        print(report)
    failed = [what for (what, _), (ok, _) in zip(checks, results) if not ok]
    if failed:
        print(f'resolve_pypi: {len(failed)} of {len(checks)} failed: {", ".join(failed)}')
        return 1
    print(f'resolve_pypi: all {len(checks)} resolve with PyPI alone')
    return 0


if __name__ == '__main__':
    sys.exit(main())
