"""Destroy torch.distributed's process groups before the interpreter shuts down, after a clean exit.

ms-swift's pipelines never call ``torch.distributed.destroy_process_group()``. A rank that exits with its groups
alive leaves them to interpreter finalization, where gloo's worker threads may still hold async work that
references Python tensors; releasing it then needs the GIL of a dying interpreter and the rank aborts with
"terminate called without an active exception" (SIGABRT) after training has finished, so torchrun reports the
whole job failed (pytorch/pytorch#190489; the upstream fix, an atexit handler in ``init_process_group``,
pytorch/pytorch#179291, was abandoned). Seen here on 2-process CPU ZeRO-3 runs: once in each of two full test-suite
runs, never in ten repeated runs of one such configuration alone.

:func:`destroy_process_groups_at_exit` registers an ``atexit`` handler that destroys every group while the
interpreter is still alive. Only after a clean exit: after an uncaught exception other ranks may still be waiting in
a collective, and the job's failure must reach torchrun as it does today (torchtitan destroys its groups only when
training succeeded, pytorch/torchtitan#1342).

Destroying the groups did not remove every abort (two in one full test run of 2-process runs, each after training
had finished and both ranks had destroyed their groups). So when the trainer has also finished training
(:func:`note_training_finished`), the worker then skips interpreter finalization altogether, with exit code 0
(:func:`swift_gkd_plugin.runtime.process_exit.exit_after_clean_finish`, the process's last ``atexit`` handler).

What holds groups of its own is shut down first (:func:`before_groups_go`): a colocated vLLM engine tears down its
groups (and the default one) in its own shutdown, which otherwise ran after ours and failed ("Invalid process group
specified").
"""
from __future__ import annotations

import atexit
import sys

import torch.distributed as dist

from swift_gkd_plugin.runtime.process_exit import mark_clean_finish

_state = {'registered': False, 'failed': False, 'trained': False}
_shutdowns = []  # run before the groups are destroyed, in the order registered


def before_groups_go(shutdown) -> None:
    """``shutdown()`` runs at a clean exit before the process groups are destroyed (an engine that uses them)."""
    _shutdowns.append(shutdown)


def note_training_finished() -> None:
    """The trainer's ``train()`` returned: a clean exit from here on may skip interpreter finalization."""
    _state['trained'] = True


def note_run_failed() -> None:
    """The run failed and exits without an uncaught exception (an error printed as one line): the groups are left
    alone, as after an uncaught exception."""
    _state['failed'] = True


def destroy_process_groups_at_exit() -> None:
    """Register the handler once per process (a no-op where ``torch.distributed`` is not initialised)."""
    if _state['registered'] or not (dist.is_available() and dist.is_initialized()):
        return
    _state['registered'] = True
    previous_hook = sys.excepthook

    def note_failure(*exc_info):
        _state['failed'] = True
        previous_hook(*exc_info)

    sys.excepthook = note_failure
    atexit.register(_destroy)


def _destroy() -> None:
    if _state['failed'] or not dist.is_initialized():
        return
    rank = dist.get_rank()
    for shutdown in _shutdowns:
        shutdown()
    if dist.is_initialized():  # (an engine's shutdown may have destroyed them)
        dist.destroy_process_group()
    if rank == 0:  # one line for the run, not one per rank (every rank destroys its own)
        print('swift_gkd_plugin: rank 0 destroyed its process groups before exit', file=sys.stderr, flush=True)
    if _state['trained']:
        mark_clean_finish()


def setup_clean_exit(trainer) -> None:
    """The trainer's process groups destroyed at exit (ms-swift never does; a rank exiting with live gloo groups may
    abort), a colocated vLLM engine shut down before them (it uses the groups too)."""
    destroy_process_groups_at_exit()
    if trainer.args.use_vllm and trainer.args.vllm_mode == 'colocate':
        import functools

        from swift_gkd_plugin.rollout.colocated_vllm import shutdown_engine
        before_groups_go(functools.partial(shutdown_engine, trainer.engine))
