"""The training rows' order: a function of ``(seed, epoch)``, so that a resume replays what the run would have drawn.

TRL's ``RepeatSampler`` (ms-swift's GKD sampler) seeds its generator once, when it is built, and draws each epoch's
permutation from where the previous one left it: epoch ``e``'s order depends on how many epochs this process has
iterated. A resumed process builds the sampler afresh, so a resume in epoch 1 or later trained epoch 0's order again.
:class:`EpochSampler` draws epoch ``e``'s permutation from a generator seeded with ``seed + e`` (``e`` the trainer's
epoch, a resumed run's included): epoch 0's order is ``RepeatSampler``'s, bit for bit, and every later epoch's is the
same in an uninterrupted and a resumed run, on any number of processes.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import torch
from trl.trainer.utils import RepeatSampler

__all__ = ['EpochSampler', 'text_lengths']


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

    def __init__(self, *args, epoch_of: Optional[Callable[[], int]] = None, fill_last: bool = False,
                 lengths: Optional[Sequence[int]] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.epoch, self.epoch_of, self.fill_last, self.lengths = 0, epoch_of, fill_last, lengths

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next iteration draws, where no ``epoch_of`` was given."""
        self.epoch = int(epoch)

    def __iter__(self):
        if self.epoch_of is not None:
            self.epoch = int(self.epoch_of())
        if self.shuffle:
            self.generator = torch.Generator()
            self.generator.manual_seed((self.seed or 0) + self.epoch)
        return self._filled() if self.fill_last else super().__iter__()

    def _filled(self):
        """``fill_last``: every row, the last incomplete chunk completed with the epoch's first rows (a score run
        scores each row; ``RepeatSampler`` drops that chunk, and those rows were never scored). With ``lengths`` the
        rows go longest first, so a batch holds rows of about one length (little padding), and the last chunk is
        completed with the shortest rows."""
        order = (torch.randperm(self.num_samples, generator=self.generator).tolist() if self.shuffle
                 else list(range(self.num_samples)))
        if self.lengths is not None:  # longest first (a batch that does not fit fails at once); ties keep the order
            order.sort(key=lambda i: -self.lengths[i])
        while len(order) % self.batch_size:
            need = self.batch_size - len(order) % self.batch_size
            order += order[-need:] if self.lengths is not None else order[:need]  # (by length: the shortest again)
        for start in range(0, len(order), self.batch_size):
            for _ in range(self.repeat_count):
                for index in order[start:start + self.batch_size]:
                    yield from [index] * self.mini_repeat_count

    def __len__(self) -> int:
        if not self.fill_last:
            return super().__len__()
        chunks = -(-self.num_samples // self.batch_size)
        return chunks * self.batch_size * self.mini_repeat_count * self.repeat_count


def text_lengths(dataset) -> Optional[List[int]]:
    """Each row's length in UTF-8 bytes of its messages' text, the order of its token count read without a tokenizer
    (``swift-gkd score``'s grouping by length); None where the rows have no ``messages`` column."""
    if 'messages' not in (getattr(dataset, 'column_names', None) or []):
        return None
    return [sum(len(str(m.get('content') or '').encode()) for m in messages or []) for messages in dataset['messages']]
