"""``--teacher_scores`` in ``megatron rlhf``: a micro-batch's rows looked up in the teacher-score store.

How ms-swift's Megatron template lays out a micro-batch's teacher view (``teacher_model_inputs``, collated by
``Template._data_collator`` with ``use_megatron``): the labels are unshifted (``labels[p]`` is the token at ``p``;
the trainer's ``_prepare_batch`` rolls them left before the loss), the rows are right-padded into ``[B, S]`` (ms-swift
asserts right padding for Megatron), or with ``--padding_free`` (Megatron-SWIFT's default) packed one after the other
into ``[1, T]``, each row's ``position_ids`` counting from 0; ``seq_lens`` holds each row's own length, taken before
context parallelism pads every row to a multiple of ``2 x CP``. So a row is ``input_ids[b, start:start + seq_lens[i]]``
and its labels the same slice: the very row ``swift rlhf`` unpads with its attention mask, and its key
(:func:`~swift_gkd_plugin.core.scores.store.row_key` of :func:`~swift_gkd_plugin.core.scores.lookup.row_request`)
is the one ``swift rlhf`` and ``swift-gkd score`` give it.

In: the store and a micro-batch's ``teacher_model_inputs``. Out: the stored top-k laid on the micro-batch's full
frame (``[B, S, k]``, ``-inf`` / id 0 where nothing is stored), which positions it answers, and the rows it lacks;
cut over the context-parallel ranks as the micro-batch is (:func:`split_over_context_parallel`, which alone imports
megatron-core, when called). Pure ``torch`` and the core otherwise: the layouts are tested on ms-swift's collator.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from swift_gkd_plugin.core.scores.lookup import most_likely, row_request
from swift_gkd_plugin.core.scores.store import StoreError, TeacherStore, row_key


class TeacherRowMissing(RuntimeError):
    """A row neither ``--teacher_scores`` nor a teacher can answer: the run stops naming it."""


@dataclass
class StoreAnswer:
    """The store's answer for one micro-batch, on its full (unsplit) frame."""
    topk_logprobs: torch.Tensor  # [B, S, k] at temperature 1; -inf where the store answers nothing
    topk_ids: torch.Tensor  # [B, S, k] global vocabulary ids; 0 where the store answers nothing
    found: torch.Tensor  # [B, S] bool: the positions the store answers (the scored positions of its rows found)
    rows: int  # rows in the micro-batch
    missing: List[Tuple[int, str, int]] = field(default_factory=list)  # (row, key, tokens) of each row not stored

    @property
    def rows_found(self) -> int:
        return self.rows - len(self.missing)


def _position_ids(inputs: Dict) -> Optional[torch.Tensor]:
    position_ids = inputs.get('text_position_ids')
    if position_ids is None:
        position_ids = inputs.get('position_ids')
    if position_ids is not None and position_ids.dim() == 3:  # (m)rope's [3, B, T]: the text positions first
        position_ids = position_ids[0]
    return position_ids


def micro_batch_rows(inputs: Dict, padding_free: bool) -> List[Tuple[int, int, int]]:
    """``(b, start, length)`` of each row of a collated micro-batch, in order: ``b`` indexes ``[B, S]``'s first
    dimension, ``start`` the first token of the row in it. ``seq_lens`` (ms-swift's Megatron collator) gives the
    lengths; packed rows (``padding_free``) start where ``position_ids`` restart at 0."""
    ids = inputs['input_ids']
    lengths = inputs.get('seq_lens')
    if lengths is None:
        raise ValueError('a Megatron micro-batch without seq_lens: its rows cannot be told apart to look them up in '
                         '--teacher_scores')
    lengths = [int(n) for n in (lengths.tolist() if isinstance(lengths, torch.Tensor) else lengths)]
    if not padding_free:
        if ids.shape[0] != len(lengths):
            raise ValueError(f'a padded Megatron micro-batch of {ids.shape[0]} rows with {len(lengths)} seq_lens')
        return [(b, 0, n) for b, n in enumerate(lengths)]
    position_ids = _position_ids(inputs)
    if position_ids is None or ids.shape[0] != 1:
        raise ValueError('a packed (--padding_free) Megatron micro-batch without position_ids, or of more than one '
                         'line: its rows cannot be told apart to look them up in --teacher_scores')
    starts = (position_ids[0] == 0).nonzero().flatten().tolist()
    if len(starts) < len(lengths):
        raise ValueError(f'a packed Megatron micro-batch of {len(lengths)} rows holds {len(starts)} row starts')
    return [(0, start, n) for start, n in zip(starts, lengths)]  # (trailing padding: more starts, each a pad token)


class StoredTeacher:
    """``--teacher_scores`` opened for a run: answers micro-batches row by row (:meth:`answer`)."""

    def __init__(self, root: str):
        self.root = root
        self.store = TeacherStore(root)

    @property
    def topk(self) -> int:
        return int(self.store.identity.topk)

    def answer(self, inputs: Dict, k: int, padding_free: bool) -> StoreAnswer:
        """The stored top-k of every row of ``inputs`` (a micro-batch's ``teacher_model_inputs``) that the store
        holds, each position's ``k`` most likely entries, on the micro-batch's frame; the rows it lacks listed."""
        ids, labels = inputs['input_ids'], inputs['labels']
        shape = tuple(ids.shape)
        logprobs = torch.full(shape + (k, ), float('-inf'), dtype=torch.float32)
        top_ids = torch.zeros(shape + (k, ), dtype=torch.long)
        found = torch.zeros(shape, dtype=torch.bool)
        rows = micro_batch_rows(inputs, padding_free)
        missing = []
        cpu_ids, cpu_labels = ids.detach().cpu(), labels.detach().cpu()
        for i, (b, start, length) in enumerate(rows):
            request = row_request(cpu_ids[b, start:start + length], cpu_labels[b, start:start + length])
            key = row_key(*request)
            try:
                scores = self.store.get(key)
            except StoreError as exc:  # a damaged shard: its message names it
                raise StoreError(f'--teacher_scores {self.root}: {exc}') from None
            if scores is None or scores.ids is None:
                missing.append((i, key, length))
                continue
            positions = torch.tensor(request[1], dtype=torch.long)
            if scores.ids.shape[0] != positions.numel():  # a key of another row's positions: never, short of a bug
                raise StoreError(f'--teacher_scores {self.root}: row {i} (key {key}) holds {scores.ids.shape[0]} '
                                 f'scored positions, the micro-batch\'s row {positions.numel()}')
            row_ids, row_logprobs = most_likely(scores.ids, scores.logprobs, k)
            logprobs[b, start + positions] = row_logprobs
            top_ids[b, start + positions] = row_ids
            found[b, start + positions] = True
        device = ids.device
        return StoreAnswer(logprobs.to(device), top_ids.to(device), found.to(device), len(rows), missing)

    def missing_message(self, where: str, micro_batch: int, answer: StoreAnswer, rows: int, missing: int) -> str:
        """The error of a row neither the store nor a teacher can answer (``where``: the step): the first one, its key
        and what to do."""
        row, key, tokens = answer.missing[0]
        return (f'{where}: row {row} of micro-batch {micro_batch} is not in --teacher_scores {self.root} ({missing} of '
                f'the {rows} rows this rank holds are not; key {key}, {tokens} tokens) and this run has '
                'no teacher to score it: pass --teacher_model, or score the dataset into the store first (`swift-gkd '
                'score` with the same --template, --max_length, --truncation_strategy and --system)')


def split_over_context_parallel(tensors: Sequence[torch.Tensor], packed_seq_params, mode: str = 'zigzag'
                                ) -> Tuple[torch.Tensor, ...]:
    """Full-frame ``[B, S, ...]`` tensors cut over the context-parallel ranks as ``_prepare_batch`` cuts the
    micro-batch (mcore-bridge's ``split_cp_inputs`` on the sequence dimension, zigzag or contiguous, row by row where
    ``packed_seq_params`` packs them); as they are without context parallelism."""
    from megatron.core import mpu
    if mpu.get_context_parallel_world_size() == 1:
        return tuple(tensors)
    from mcore_bridge import split_cp_inputs
    kwargs = {'cp_partition_mode': 'contiguous'} if mode == 'contiguous' else {}
    cu_seqlens = getattr(packed_seq_params, 'cu_seqlens_q', None)
    return tuple(split_cp_inputs(t, cu_seqlens, 1, **kwargs) for t in tensors)
