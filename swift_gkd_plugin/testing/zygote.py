"""TEST-ONLY: start-ups shared between the test suite's ``swift rlhf`` runs.

A fresh ``python swift/cli/rlhf.py ...`` spends ~5 s of CPU importing torch, transformers and ms-swift before it reads
its command line. The zygote (:func:`serve`, one process per test worker, started with the run's default
environment) imports them once; each run is then a ``fork`` of it that sets its own command line, environment,
working directory and output files and runs ms-swift's route file as ``__main__``, exactly as the fresh process
would from there. Only what the zygote did differs: the imports, with the plugin's activation (the same start-up
hooks a fresh process runs at those imports), and nothing else (no tensor op, no thread: ``fork`` must stay safe).

:class:`Zygote` is the test side. Runs with another environment at import time (``SWIFT_GKD_PLUGIN=0``, several
processes, the ``swift`` launcher) start fresh processes as before (``tests/conftest.py`` decides).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from typing import Dict, List, Optional

# what ms-swift's rlhf route file and its pipeline import, and the plugin's pieces they load later
PRELOAD = ('swift.cli.utils', 'swift.pipelines', 'swift.pipelines.train.rlhf', 'swift.trainers.trainer_factory',
           'swift_gkd_plugin.swift.trainer', 'swift_gkd_plugin.swift.setup.arguments')


def _child(request: dict) -> None:
    """In the forked child: become the run ``request`` describes, run the route file, exit as its process would."""
    os.setpgid(0, 0)  # its own process group: a timeout stops it with everything it started
    write = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, request['stdout'], write), (2, request['stderr'], write)):
        target = os.open(path, flags, 0o644)
        os.dup2(target, fd)
        os.close(target)
    os.environ.clear()
    os.environ.update(request['env'])
    os.chdir(request['cwd'])
    sys.argv = [request['route'], *request['argv']]
    sys.path[0] = os.path.dirname(request['route'])  # as for `python route.py`
    import runpy
    code = 0
    try:
        runpy.run_path(request['route'], run_name='__main__')
    except SystemExit as exc:
        code = exc.code
    except BaseException:  # noqa: B902 - an uncaught exception: its traceback and exit code 1, as a fresh process
        import traceback
        traceback.print_exc()
        code = 1
    raise SystemExit(code)  # atexit handlers and finalization, as at the end of a script


def serve() -> None:
    """The zygote's loop: one JSON request per line on stdin; replies ``{"pid"}`` once the run is forked, then
    ``{"rc"}`` (a signal as ``-N``, as :mod:`subprocess` reports it) when it ended."""
    import importlib
    for name in PRELOAD:
        importlib.import_module(name)
    out = sys.stdout
    out.write(json.dumps({'ready': os.getpid()}) + '\n')
    out.flush()
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(request)
        out.write(json.dumps({'pid': pid}) + '\n')
        out.flush()
        _, status = os.waitpid(pid, 0)
        rc = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        out.write(json.dumps({'rc': rc}) + '\n')
        out.flush()


class Zygote:
    """The test side: starts :func:`serve` with ``env`` (the default run's environment) on first use and runs route
    files in forks of it. One run at a time (a test worker runs one test at a time)."""

    def __init__(self, env: Dict[str, str]):
        self.env = dict(env)
        self.proc: Optional[subprocess.Popen] = None

    def _start(self) -> subprocess.Popen:
        if self.proc is None or self.proc.poll() is not None:
            import queue
            import threading
            import tempfile
            self.log = tempfile.NamedTemporaryFile(prefix='zygote_', suffix='.log', delete=False).name
            with open(self.log, 'w') as log:  # its imports' messages; each run has its own output files
                self.proc = subprocess.Popen([sys.executable, '-c', 'from swift_gkd_plugin.testing import zygote; '
                                              'zygote.serve()'], env=self.env, stdin=subprocess.PIPE,
                                             stdout=subprocess.PIPE, stderr=log, text=True, bufsize=1)
            self.replies = queue.Queue()
            threading.Thread(target=_pump, args=(self.proc.stdout, self.replies), daemon=True).start()
            if 'ready' not in self.replies.get(timeout=300):
                raise RuntimeError(f'the test zygote did not start:\n{_read(self.log)[-5000:]}')
        return self.proc

    def run(self, route: str, argv: List[str], env: Dict[str, str], timeout: float, workdir: str):
        """Run ``python route argv`` in a fork; returns ``(returncode, stdout, stderr)``; raises
        :class:`subprocess.TimeoutExpired` (the run's process group killed) past ``timeout`` seconds."""
        import queue
        proc = self._start()
        stdout, stderr = os.path.join(workdir, 'stdout'), os.path.join(workdir, 'stderr')
        proc.stdin.write(json.dumps({'route': route, 'argv': argv, 'env': env, 'cwd': os.getcwd(),
                                     'stdout': stdout, 'stderr': stderr}) + '\n')
        proc.stdin.flush()
        pid = self.replies.get(timeout=60).get('pid')
        if pid is None:
            raise RuntimeError(f'the test zygote ended:\n{_read(self.log)[-5000:]}')
        try:
            reply = self.replies.get(timeout=timeout)
        except queue.Empty:
            os.killpg(pid, signal.SIGKILL)
            self.replies.get(timeout=60)  # its rc
            raise subprocess.TimeoutExpired([route, *argv], timeout, _read(stdout), _read(stderr)) from None
        if reply.get('ended'):
            raise RuntimeError(f'the test zygote ended during a run:\n{_read(stdout)}{_read(stderr)}')
        return reply['rc'], _read(stdout), _read(stderr)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)


def _pump(stream, replies) -> None:
    for line in stream:
        replies.put(json.loads(line))
    replies.put({'ended': True})


def _read(path: str) -> str:
    with open(path, errors='replace') as f:
        return f.read()
