"""How a plugin process ends: with its launcher, and without interpreter finalization after a clean finish.

Imported by the start-up hook (:mod:`swift_gkd_plugin._bootstrap`) in every Python process, so it imports neither
torch nor ms-swift.

A torchrun worker registers, before anything else can, the last ``atexit`` handler of the process
(:func:`exit_after_clean_finish`): once the trainer has finished and destroyed its process groups, the worker leaves
with exit code 0 without interpreter finalization, where gloo's threads could still abort it.

The process that ms-swift's ``swift`` / ``megatron`` launcher starts exits with that launcher
(:func:`exit_with_launcher`): the launcher waits on its child without forwarding signals, so a SIGTERM to it (a job
scheduler, ``kill``) left the trainer running as an orphan, holding its GPUs.
"""
import os
import signal
import sys

LAUNCHER_PID_ENV = 'SWIFT_GKD_PLUGIN_LAUNCHER_PID'  # set by the launcher (activation.on_swift_cli_imported)
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
