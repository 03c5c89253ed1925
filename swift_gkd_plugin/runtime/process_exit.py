"""How a plugin process ends: with its launcher, and without interpreter finalization after a clean finish.

Imported by the start-up hook (:mod:`swift_gkd_plugin.entry.bootstrap`) in every Python process, so it imports neither
torch nor ms-swift.

A torchrun worker registers, before anything else can, the last ``atexit`` handler of the process
(:func:`exit_after_clean_finish`): once the trainer has finished and destroyed its process groups, the worker leaves
with exit code 0 without interpreter finalization, where gloo's threads could still abort it.

The process that ms-swift's ``swift`` / ``megatron`` launcher starts exits with that launcher
(:func:`exit_with_launcher`): the launcher waits on its child without forwarding signals, so a SIGTERM to it (a job
scheduler, ``kill``) left the trainer running as an orphan, holding its GPUs.

A ``swift rlhf`` or ``megatron rlhf`` refusal in torchrun's ranks (:func:`refuse`) is one line and the refusal's exit
code: the first rank to refuse prints it and records it (:func:`record_refusal`) in the file the launcher names
(:func:`refusal_file`), and torchrun, which reads that file, leaves out its own report of the failed rank
(:func:`quiet_torchrun_after_refusal`).
"""
import contextlib
import os
import signal
import sys
from typing import NoReturn

LAUNCHER_PID_ENV = 'SWIFT_GKD_PLUGIN_LAUNCHER_PID'  # set by the launcher (activation.on_swift_cli_imported)
REFUSAL_FILE_ENV = 'SWIFT_GKD_PLUGIN_REFUSAL_FILE'  # set by the launcher for torchrun and its ranks (refusal_file)
#: the words of the one-line refusal of a plugin flag while SWIFT_GKD_PLUGIN turns the plugin off (activation)
PLUGIN_FLAGS_OFF = 'flag(s) of swift-gkd-plugin, which SWIFT_GKD_PLUGIN='
# torchrun's loggers that report a failed rank ("failed (exitcode: 2) local_rank: 1 ...", "Sending process ... SIGTERM")
_TORCHRUN_LOGGERS = ('torch.distributed.elastic.multiprocessing.api', 'torch.distributed.elastic.agent.server.api',
                     'torch.distributed.elastic.multiprocessing.errors', 'torch.distributed.launcher.api',
                     'torch.distributed.run')
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def exit_with_launcher() -> None:
    """In the child of ms-swift's launcher (the route file, or torchrun, which stops its own workers on SIGTERM):
    ask Linux for a SIGTERM when the launcher dies, or exit now if it is already gone. The variable is removed
    here, so only that one child acts on it, never the processes it starts."""
    launcher = os.environ.pop(LAUNCHER_PID_ENV, None)
    if launcher is None or not sys.platform.startswith('linux'):
        return
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if str(os.getppid()) != launcher:  # the launcher died before the request above
        os.kill(os.getpid(), signal.SIGTERM)


_finish = {'clean': False}


def mark_clean_finish() -> None:
    """Called by the trainer's exit handler (:mod:`swift_gkd_plugin.swift.run.clean_exit`) once training has finished
    without an exception and every process group is destroyed."""
    _finish['clean'] = True


def exit_after_clean_finish() -> None:
    """The last ``atexit`` handler of a torchrun worker (registered first, at start-up): after a clean finish, flush
    and leave with exit code 0, skipping interpreter finalization. A rank that had finished training and saved its
    checkpoints otherwise aborted there now and then ("terminate called without an active exception", SIGABRT:
    gloo's threads torn down by a dying interpreter), and torchrun reported the whole job failed. Every other
    ``atexit`` handler has run by then (registered later, they run earlier)."""
    if not _finish['clean']:
        return
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(0)


@contextlib.contextmanager
def refusal_file():
    """In the launcher, around torchrun: the file where a rank records its refusal (empty folder, removed after)."""
    import shutil
    import tempfile
    folder = tempfile.mkdtemp(prefix='swift_gkd_refusal_')
    os.environ[REFUSAL_FILE_ENV] = os.path.join(folder, 'refusal')
    try:
        yield
    finally:
        os.environ.pop(REFUSAL_FILE_ENV, None)
        shutil.rmtree(folder, ignore_errors=True)


def record_refusal(code: int, message: str) -> bool:
    """In a rank of the launcher's torchrun: record this refusal unless another rank did first (atomically: a link
    either creates the file or fails). True when this process is the one to print the line (the first, or no launcher
    asked)."""
    path = os.environ.get(REFUSAL_FILE_ENV)
    if not path:
        return True
    draft = f'{path}.{os.getpid()}'
    try:
        with open(draft, 'w') as f:
            f.write(f'{code}\n{message}\n')
        os.link(draft, path)
    except FileExistsError:
        return False
    except OSError:  # the launcher's folder is gone: print as without a launcher
        return True
    finally:
        with contextlib.suppress(OSError):
            os.remove(draft)
    return True


def refuse(prog: str, message, code: int = 2) -> NoReturn:
    """Print ``prog: error: message`` (one line) and exit with ``code``: 2 (as argparse does) for a refused command
    line, 1 for a run stopped later (``swift rlhf`` and ``megatron rlhf`` alike). Under the launcher's torchrun only
    the first rank to refuse prints it, and torchrun exits with ``code`` without its own report."""
    _end_progress_bars()
    sys.stdout.flush()
    if record_refusal(code, f'{prog}: error: {message}'):
        sys.stderr.write(f'{prog}: error: {message}\n')
        sys.stderr.flush()
    sys.exit(code)


def _end_progress_bars() -> None:
    """Close the open tqdm bars (the trainer's ``Train:`` bar, left mid-line by its last ``\\r`` refresh), so that
    the ``error:`` line starts a line of its own: users and scripts find it with ``grep '^swift rlhf: error:'``."""
    tqdm = sys.modules.get('tqdm')
    for bar in list(getattr(getattr(tqdm, 'tqdm', None), '_instances', ())):
        with contextlib.suppress(Exception):
            bar.close()


def refused_code(path: str):
    """The exit code a rank recorded in ``path``, else None."""
    try:
        with open(path) as f:
            return int(f.readline())
    except (OSError, ValueError):
        return None


def quiet_torchrun_after_refusal() -> None:
    """In the torchrun process the launcher starts (it has the launcher's variables): once a rank has refused (its one
    line printed), torchrun's own report of the failed rank (log lines, then ``ChildFailedError``'s 30-line traceback
    and exit code 1) is left out, and torchrun exits with the refusal's code (2 for a refused command line). Any other
    failure is reported as before."""
    path = os.environ.get(REFUSAL_FILE_ENV)
    if not path or LAUNCHER_PID_ENV not in os.environ:
        return
    import logging

    class _Refused(logging.Filter):
        def filter(self, record):
            return refused_code(path) is None

    for name in _TORCHRUN_LOGGERS:
        logging.getLogger(name).addFilter(_Refused())
    previous = sys.excepthook

    def excepthook(kind, value, traceback):
        code = refused_code(path)
        if code is None:
            return previous(kind, value, traceback)
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)  # an unhandled exception's exit code is 1 otherwise; torchrun's ranks are already stopped

    sys.excepthook = excepthook
