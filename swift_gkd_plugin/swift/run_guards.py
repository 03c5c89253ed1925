"""Guards a GKD run installs on its trainer: exit code 0 only after training on what the user gave, and faults
named by their cause. One hook, called from the trainer's ``__init__``."""
from __future__ import annotations

from swift_gkd_plugin.swift.checkpoints import guard_checkpoint_saves
from swift_gkd_plugin.swift.datasets_check import RefuseEmptyEpochs


def install_run_guards(trainer) -> None:
    """A training set smaller than one batch is refused at the start; a checkpoint save that cannot write its files
    names the cause (no space left) and the newest complete checkpoint."""
    trainer.add_callback(RefuseEmptyEpochs())
    guard_checkpoint_saves(trainer)
