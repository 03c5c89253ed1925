"""The training rows' order: a function of ``(seed, epoch)``, so that a resume replays what the run would have drawn.

TRL's ``RepeatSampler`` (ms-swift's GKD sampler) seeds its generator once, when it is built, and draws each epoch's
permutation from where the previous one left it: epoch ``e``'s order depends on how many epochs this process has
iterated. A resumed process builds the sampler afresh, so a resume in epoch 1 or later trained epoch 0's order again.
:class:`EpochSampler` draws epoch ``e``'s permutation from a generator seeded with ``seed + e`` (``e`` the trainer's
epoch, a resumed run's included): epoch 0's order is ``RepeatSampler``'s, bit for bit, and every later epoch's is the
same in an uninterrupted and a resumed run, on any number of processes.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from trl.trainer.utils import RepeatSampler

__all__ = ['EpochSampler']


class EpochSampler(RepeatSampler):
    """``RepeatSampler`` (the same arguments and layout: ``batch_size`` distinct rows, each repeated
    ``mini_repeat_count`` times, the chunk ``repeat_count`` times) whose shuffle is seeded per epoch with
    ``seed + epoch`` (``seed`` None: 0).

    The epoch is ``epoch_of()`` when given (the trainer's: ``int(state.epoch)``, read when an epoch's iteration
    starts), else the last :meth:`set_epoch`. HF's Trainer calls ``set_epoch`` through accelerate's dataloader, but
    where a resume skips the batches already trained on several processes the sampler sits four wrappers deep
    (``SkipBatchSampler`` -> ``BatchSamplerShard`` -> ``BatchSampler`` -> sampler) and the call never reaches it: a
    two-rank resume in epoch 1 drew epoch 0's order again.
    """

    def __init__(self, *args, epoch_of: Optional[Callable[[], int]] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.epoch, self.epoch_of = 0, epoch_of

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next iteration draws, where no ``epoch_of`` was given."""
        self.epoch = int(epoch)

    def __iter__(self):
        if self.epoch_of is not None:
            self.epoch = int(self.epoch_of())
        if self.shuffle:
            self.generator = torch.Generator()
            self.generator.manual_seed((self.seed or 0) + self.epoch)
        return super().__iter__()
