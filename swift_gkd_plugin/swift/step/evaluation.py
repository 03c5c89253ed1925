"""Evaluation (``--val_dataset`` or ``--split_dataset_ratio``, ``--eval_strategy``) under sequence parallelism.

In training the ranks of a group read the same rows and each holds 1/N of every row
(:mod:`swift_gkd_plugin.swift.sequence_parallel`); the HF Trainer's evaluation handed each rank rows of its own, and
the first forward's all-to-all in the group exchanged slices of different rows (gloo: ``Received data size doesn't
match expected size``, a SIGABRT). Evaluation follows the training's rows: the evaluation dataloader is sharded over
the groups, each rank's loss is its group's (each rank's is its slice's share), and the gathered losses count each
group once, so the same flags at N and at 1 log the same ``eval_loss``.
"""
from __future__ import annotations

import functools

from swift_gkd_plugin.swift.sequence_parallel import (gather_once_per_group, group_mean, group_size,
                                                     shard_over_data_parallel)


class EvaluationMixin:
    """The evaluation dataloader, loop and step of a sequence-parallel group (each a no-op without one)."""

    def get_eval_dataloader(self, eval_dataset=None):
        dataloader = super().get_eval_dataloader(eval_dataset)
        if group_size() > 1:
            shard_over_data_parallel(dataloader, evaluation=True)
        return dataloader

    def evaluation_loop(self, *args, **kwargs):
        if group_size() == 1:
            return super().evaluation_loop(*args, **kwargs)
        gather, self.gather_function = self.gather_function, functools.partial(gather_once_per_group,
                                                                               self.accelerator)
        try:
            return super().evaluation_loop(*args, **kwargs)
        finally:
            self.gather_function = gather

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        loss, logits, labels = super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)
        return (None if loss is None else group_mean(loss)), logits, labels
