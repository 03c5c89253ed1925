"""TEST-ONLY: start-ups shared between the test suite's ``swift rlhf`` runs.

A fresh ``python swift/cli/rlhf.py ...`` spends ~5 s of CPU importing torch, transformers and ms-swift before it reads
its command line. The zygote (:func:`serve`, one process per test session and kind of start-up, shared by its xdist
workers over a Unix socket, started with the run's default environment) imports them once; each run is then a
``fork`` of it that sets its own command line, environment, working directory and output files and runs ms-swift's
route file as ``__main__``, exactly as the fresh process would from there (the fork's parent is a fork of the zygote
that serves that one request). Only what the zygote did differs: the imports, with the plugin's activation (the same
start-up hooks a fresh process runs at those imports), the collector's freeze of the heap they left (``gc.freeze``:
the forks' collections skip it), and nothing else (no tensor op, no thread: ``fork`` must stay safe).

Several processes: a run of N ranks (what ``torchrun --nproc_per_node N route ...`` starts) is N forks of a zygote
whose environment holds torchrun's constant worker variables (``TORCHELASTIC_RUN_ID`` ...), each fork given the
per-rank ones (:func:`torchrun_rank_env`), and handled as torchrun handles them: the first rank to fail has
the others stopped (SIGTERM, then SIGKILL after 30 s) and the run's exit code is 1. What differs from torchrun: no
elastic agent (rank 0 hosts the rendezvous store, ``TORCHELASTIC_USE_AGENT_STORE`` unset) and no agent log lines.

:class:`Zygote` is the test side. A run whose environment at import time differs in ``SWIFT_GKD_PLUGIN``,
``PYTHONPATH`` or ``TRITON_INTERPRET`` forks from a zygote started with those values; runs through the ``swift``
launcher, on several nodes or with any other difference at import start fresh processes (``tests/conftest.py``
decides: ``_zygote_for``).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from typing import Dict, List, Optional

_TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tests/: where the zygote imports this harness

# what ms-swift's rlhf route file and its pipeline import, and the plugin's pieces they load later
# (and deepspeed, which accelerate's unwrap_model imports in the set-up of every run's trainer: ~0.35 s of CPU a run)
PRELOAD = ('swift.cli.utils', 'swift.pipelines', 'swift.pipelines.train.rlhf', 'swift.trainers.trainer_factory',
           'swift_gkd_plugin.swift.trainer', 'swift_gkd_plugin.swift.setup.arguments', 'deepspeed')
# the same for ``megatron rlhf`` (its route file ``swift/cli/_megatron/rlhf.py``)
# (its trainer warms megatron-core's fused functions with ``torch.compile``: inductor's CPU instruction-set probe,
# a ``python`` subprocess per candidate and cached per process, ~2 s a run, is run once here, then inherited; so is
# the hash of triton's sources that inductor's cache keys hold, ~0.9 s a rank)
# (and at its end the last rank draws the run's TensorBoard scalars as PNGs, ms-swift's plot_images: its two imports,
# ~0.6 s a run)
MEGATRON_PRELOAD = ('swift.cli._megatron.main', 'swift.megatron.pipelines.train.rlhf',
                    'swift_gkd_plugin.megatron.trainer', 'torch._inductor.cpu_vec_isa:pick_vec_isa',
                    'torch._inductor.codecache:triton_key', 'matplotlib.pyplot',
                    'tensorboard.backend.event_processing.event_accumulator')
# ms-swift's launchers themselves (their console scripts): its cli modules and the plugin's checks of the command
# line, the ~1.7 s of a refused command line's ~2 s; and the plugin's ``swift-gkd`` (its ``serve-teacher`` checks of
# --model_type / --template import ms-swift's model and template tables, ~13 s of CPU a refusal, and torch)
LAUNCHER_PRELOAD = {'swift launcher': ('swift.cli.main', 'swift_gkd_plugin.swift.setup.command_line'),
                    # (megatron: and what its checks import on first use, ms-swift's dataset package to read a local
                    # --dataset's rows where steps sample, transformers' config classes with it for the vocabulary
                    # sizes of local model folders: ~5-10 s of each launch that gets that far)
                    'megatron launcher': ('swift.cli._megatron.main', 'swift_gkd_plugin.megatron.setup.checks',
                                          'swift_gkd_plugin.data.dataset_files'),
                    'swift-gkd launcher': ('swift_gkd_plugin.entry.cli', 'swift_gkd_plugin.server.cli', 'torch',
                                           'swift.model.model_meta', 'swift.template')}
# a ``swift rlhf`` run with vLLM colocate (``--use_vllm true --vllm_mode colocate``, its torchrun ranks): also vLLM
# and ms-swift's engine over it, which its trainer imports when it builds the engine (~5 s of CPU a rank), and the
# plugin's colocate module (``tests/conftest.py``: ``_zygote_for`` picks that zygote by the command line)
VLLM_COLOCATE_PRELOAD = ('swift.infer_engine.grpo_vllm_engine', 'swift_gkd_plugin.rollout.colocated_vllm')
# what torchrun (torch 2.13, one node, static rendezvous) sets in every worker's environment, whatever the rank
TORCHRUN_WORKER_CONSTANTS = {
    'TORCHELASTIC_RUN_ID': 'none', 'TORCHELASTIC_RESTART_COUNT': '0', 'TORCHELASTIC_MAX_RESTARTS': '0',
    'TORCHELASTIC_SIGNALS_TO_HANDLE': 'SIGTERM,SIGINT,SIGHUP,SIGQUIT', 'ROLE_NAME': 'default', 'GROUP_RANK': '0',
    'GROUP_WORLD_SIZE': '1', 'TORCH_NCCL_ASYNC_ERROR_HANDLING': '1', 'OMP_NUM_THREADS': '1'}


def torchrun_rank_env(env: Dict[str, str], rank: int, world: int, port: str, error_file: str) -> Dict[str, str]:
    """The environment torchrun gives rank ``rank`` of ``world`` (one node) started from ``env``
    (``TORCHELASTIC_USE_AGENT_STORE`` left out: there is no agent)."""
    out = dict(env, **TORCHRUN_WORKER_CONSTANTS)
    out.update(RANK=str(rank), LOCAL_RANK=str(rank), ROLE_RANK=str(rank), WORLD_SIZE=str(world),
               LOCAL_WORLD_SIZE=str(world), ROLE_WORLD_SIZE=str(world), MASTER_ADDR='127.0.0.1', MASTER_PORT=port,
               TORCHELASTIC_ERROR_FILE=error_file)
    return out


def _child(request: dict, env: Dict[str, str], imported_env: Dict[str, Optional[str]]) -> None:
    """In the forked child: become the run ``request`` describes (in ``env``, with ``imported_env``: what the
    zygote's vLLM imports set in their environment, which a fresh process's same imports would set in its own), run
    the route file, exit as its process would."""
    os.setpgid(0, 0)  # its own process group: a timeout stops it with everything it started
    write = os.O_WRONLY | os.O_CREAT | os.O_APPEND  # the ranks of a run share its two files, as torchrun's do
    for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, request['stdout'], write), (2, request['stderr'], write)):
        target = os.open(path, flags, 0o644)
        os.dup2(target, fd)
        os.close(target)
    os.environ.clear()
    os.environ.update(env)
    for name, value in imported_env.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
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
        sys.excepthook(*sys.exc_info())
        code = 1
    _leave(code)


def _leave(code) -> None:
    """End the run as the interpreter's finalization would for what a run's output and files depend on (non-daemon
    threads joined, ``atexit`` handlers, standard streams flushed, ``SystemExit``'s code rules), then ``os._exit``
    without tearing down the modules: in a fork of the zygote that teardown touches every object and costs ~1.8 s of
    copy-on-write page faults per run (0.02 s without it). Teardown itself still runs in the suite's fresh and
    launcher runs."""
    import atexit
    import threading
    if code is None:
        code = 0
    elif not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    threading._shutdown()  # what finalization does first: wait for the non-daemon threads
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(code & 0xFF)


def _status_code(status: int) -> int:
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def _wait_ranks(pids: List[int]) -> int:
    """Wait for a run's forks. One fork: its exit code (a signal as ``-N``, as :mod:`subprocess` reports it). Several
    (ranks): as torchrun, the first failure stops the others (SIGTERM, SIGKILL 30 s later) and the code is 1."""
    if len(pids) == 1:
        return _status_code(os.waitpid(pids[0], 0)[1])
    codes: Dict[int, int] = {}
    kill_at = None
    while len(codes) < len(pids):
        flags = os.WNOHANG if kill_at is not None else 0
        pid, status = os.waitpid(-1, flags)
        if pid == 0:  # stopping the others: poll until they are gone or the grace period ends
            if time.time() > kill_at:
                for other in pids:
                    if other not in codes:
                        _signal_group(other, signal.SIGKILL)
                kill_at = float('inf')
            time.sleep(0.1)
            continue
        if pid not in pids:
            continue
        codes[pid] = _status_code(status)
        if codes[pid] != 0 and kill_at is None:
            for other in pids:
                if other not in codes:
                    _signal_group(other, signal.SIGTERM)
            kill_at = time.time() + 30
    return 0 if all(c == 0 for c in codes.values()) else 1


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


def _preload(preload) -> Dict[str, Optional[str]]:
    """Import ``preload`` (``module:function`` also calls the function) and freeze the heap they left; returns what the
    vLLM imports set, changed or removed in the environment (:func:`_child` sets it again in each fork)."""
    import gc
    import importlib
    # what the imports print goes to the zygote's log (stderr), not into its replies on stdout (deepspeed's logger
    # writes its accelerator line there); sys.stdout stays the same object, which the loggers made at import hold
    replies = os.dup(1)
    os.dup2(2, 1)
    before = None
    for name in preload:
        if name in VLLM_COLOCATE_PRELOAD and before is None:
            before = dict(os.environ)
        module, _, function = name.partition(':')
        module = importlib.import_module(module)
        if function and hasattr(module, function):  # a warm-up this torch lacks (2.11: no codecache.triton_key)
            getattr(module, function)()
    sys.stdout.flush()
    # what the vLLM imports set, changed or removed in the environment (ms-swift's engine module sets vLLM's worker
    # start method, cv2 prepends its library folder): the zygote's environment at import is the run's, so these are
    # the values the run's own imports of them would leave. (What the other imports set stays out of the forks, as a
    # rank's environment is torchrun's: tests/test_zygote.py.)
    imported_env = {} if before is None else {
        k: os.environ.get(k) for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k)}
    os.dup2(replies, 1)
    os.close(replies)
    # the heap the imports left, which every fork inherits, is left out of the collector's scans (gc.freeze): a
    # fork's full collection walked its ~590k objects, ~0.5 s of CPU a run with the copy-on-write faults it caused
    # (accelerate, transformers, ms-swift and megatron-core call gc.collect()); the objects stay alive, as they would
    # in a fresh process
    gc.collect()
    gc.freeze()
    return imported_env


def serve(argv: List[str]) -> None:
    """The zygote: ``argv`` is ``[socket path, pid to outlive, *preload]``. After :func:`_preload` it prints
    ``{"ready"}`` and accepts connections on the socket until the watched process is gone; each connection is served
    by a fork of it (:func:`_supervise`), so several test workers run forks of one zygote at the same time."""
    import socket
    path, watched, preload = argv[0], int(argv[1]), argv[2:]
    imported_env = _preload(preload)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    listener.settimeout(2)  # a poll: no thread in the zygote (fork must stay safe)
    sys.stdout.write(json.dumps({'ready': os.getpid()}) + '\n')
    sys.stdout.flush()
    os.dup2(2, 1)  # its starter reads no more: anything printed later goes to the log
    while True:
        try:
            conn, _ = listener.accept()
        except socket.timeout:
            _reap()
            if not _alive(watched):
                return
            continue
        conn.setblocking(True)
        pid = os.fork()
        if pid == 0:
            try:
                listener.close()
                _supervise(conn, imported_env)
            finally:  # never back into this loop
                os._exit(1)
        conn.close()
        _reap()


def _supervise(conn, imported_env: Dict[str, Optional[str]]) -> None:
    """In a fork of the zygote, for one connection: read the run's JSON request, fork its processes (one per entry of
    ``envs``) and reply ``{"pids"}``, then ``{"rc"}`` (:func:`_wait_ranks`) when they ended."""
    stream = conn.makefile('rw')
    line = stream.readline()
    if not line:  # a probe (Zygote._answers)
        os._exit(0)
    request = json.loads(line)
    pids = []
    for env in request['envs']:
        pid = os.fork()
        if pid == 0:
            stream.close()
            conn.close()
            _child(request, env, imported_env)
        pids.append(pid)
    stream.write(json.dumps({'pids': pids}) + '\n')
    stream.flush()
    stream.write(json.dumps({'rc': _wait_ranks(pids)}) + '\n')
    stream.flush()
    os._exit(0)


def _reap() -> None:
    try:
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass
    except ChildProcessError:
        pass


def _stat(pid: int) -> List[str]:
    """The fields of ``/proc/PID/stat`` after the command name (the first: the state)."""
    with open(f'/proc/{pid}/stat') as f:
        return f.read().rsplit(')', 1)[1].split()


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs: not gone, and not a zombie (a zygote that died, its starter not having reaped it)."""
    try:
        return _stat(pid)[0] != 'Z'
    except (FileNotFoundError, ProcessLookupError):
        return False


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` itself."""
    fields = _stat(pid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')


class Zygote:
    """The test side of a zygote of ``env`` (the default run's environment) and ``preload``, started on first use.

    ``shared_dir``: the zygote is shared by every process that asks for the same ``env`` and ``preload`` there (the
    test session's xdist workers: one start-up instead of one per worker, ~5-45 s of CPU each), started by the first
    under a file lock, and outlives its starter until ``outlive`` (a pid: the test session's process) ends or it is
    killed (its record ``<name>.json`` there: ``pid``, ``cmdline``, as ``tests/conftest.py``'s shared servers). Without
    ``shared_dir`` it is this process's own and :meth:`close` stops it. ``on_start(cpu_seconds)``: told the CPU its
    imports took when this process started it."""

    def __init__(self, env: Dict[str, str], preload=PRELOAD, shared_dir: Optional[str] = None,
                 outlive: Optional[int] = None, on_start=None):
        import hashlib
        import tempfile
        self.env, self.preload = dict(env), tuple(preload)
        self.shared = shared_dir is not None
        self.dir = shared_dir if self.shared else tempfile.mkdtemp(prefix='zygote_')
        key = hashlib.sha256(json.dumps([sorted(self.env.items()), self.preload]).encode()).hexdigest()[:16]
        self.name = os.path.join(self.dir, f'zygote-{key}')
        self.outlive = outlive or os.getpid()
        self.on_start = on_start
        self.pid: Optional[int] = None  # the zygote's, once this process used it
        self.runs = 0  # runs this process forked from it
        self.log = self.name + '.log'

    def _answers(self) -> bool:
        import socket
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(self.name + '.sock')
                return True
            except OSError:
                return False

    def _start(self) -> str:
        """The zygote's socket path; starts it where no live one answers there."""
        import fcntl
        if self.pid is not None and _alive(self.pid):
            return self.name + '.sock'
        with open(self.name + '.lock', 'w') as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            record = json.load(open(self.name + '.json')) if os.path.exists(self.name + '.json') else None
            if record is None or not _alive(record['pid']) or not self._answers():
                if os.path.exists(self.name + '.sock'):
                    os.remove(self.name + '.sock')
                with open(self.log, 'w') as log:  # its imports' messages; each run has its own output files
                    code = (f'import sys; sys.path.append({_TESTS!r}); '
                            'from harness import zygote; zygote.serve(sys.argv[1:])')
                    proc = subprocess.Popen([sys.executable, '-c', code, self.name + '.sock',
                                             str(self.outlive), *self.preload], env=self.env,
                                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log, text=True,
                                            start_new_session=True)
                line = proc.stdout.readline()  # blocks until ready or its end
                if 'ready' not in line:
                    raise RuntimeError(f'the test zygote did not start:\n{_read(self.log)[-5000:]}')
                if self.on_start is not None:
                    self.on_start(_cpu_seconds(proc.pid))
                with open(f'/proc/{proc.pid}/cmdline') as f:
                    record = {'name': os.path.basename(self.name), 'pid': proc.pid, 'cmdline': f.read(),
                              'preload': self.preload}
                with open(self.name + '.json', 'w') as f:
                    json.dump(record, f)
            self.pid = record['pid']
        return self.name + '.sock'

    def run(self, route: str, argv: List[str], env: Dict[str, str], timeout: float, workdir: str,
            nproc: int = 1, port: Optional[str] = None):
        """Run ``python route argv`` in a fork, or (``port`` given) as ``torchrun --nproc_per_node nproc
        --master_port port`` would on one node (``nproc`` forks); returns ``(returncode, stdout, stderr)``; raises
        :class:`subprocess.TimeoutExpired` (the run's process groups killed) past ``timeout`` seconds."""
        import socket
        path = self._start()
        stdout, stderr = os.path.join(workdir, 'stdout'), os.path.join(workdir, 'stderr')
        envs = [env] if port is None else [
            torchrun_rank_env(env, rank, nproc, port, os.path.join(workdir, f'error_{rank}.json'))
            for rank in range(nproc)]
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.connect(path)
            stream = conn.makefile('rw')
            stream.write(json.dumps({'route': route, 'argv': argv, 'envs': envs, 'cwd': os.getcwd(),
                                     'stdout': stdout, 'stderr': stderr}) + '\n')
            stream.flush()
            conn.settimeout(60)
            line = stream.readline()
            if not line:
                raise RuntimeError(f'the test zygote ended:\n{_read(self.log)[-5000:]}')
            pids = json.loads(line)['pids']
            self.runs += 1
            conn.settimeout(timeout)
            try:
                line = stream.readline()
            except socket.timeout:
                for pid in pids:
                    _signal_group(pid, signal.SIGKILL)
                raise subprocess.TimeoutExpired([route, *argv], timeout, _read(stdout), _read(stderr)) from None
            if not line:
                raise RuntimeError(f'the test zygote ended during a run:\n{_read(stdout)}{_read(stderr)}')
            return json.loads(line)['rc'], _read(stdout), _read(stderr)

    def close(self) -> None:
        """Stop this process's own zygote (a shared one is stopped with the test session)."""
        if not self.shared and self.pid is not None:
            _signal_group(self.pid, signal.SIGKILL)


def _read(path: str) -> str:
    with open(path, errors='replace') as f:
        return f.read()
