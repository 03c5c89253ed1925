"""Length and truncation of the sampled completions between two logs, for ``swift rlhf`` and ``megatron rlhf``.

``gkd/completion_length`` (mean), ``gkd/completion_length_min``, ``gkd/completion_length_max``: tokens per completion;
``gkd/clipped_ratio``: the share of completions the sampler cut at its limit (no end of turn within
``--max_completion_length``, or ``--gkd_rollout_max_tokens`` on on-policy steps), as TRL's GKD/GRPO log them (ms-swift's
transformers engine also says 'length' for one that ends its turn on the limit's last token: not cut here). A mean
of means or of maxima would be wrong for every split into micro-batches and ranks, so the window keeps sums and
extremes and reduces them once per log: sums for the mean and the share, MIN/MAX for the extremes.
``gkd/idle_decode_ratio`` (``megatron rlhf`` sampling under expert parallelism only): the share of decode forwards a
rank ran with all its rows stopped, only to keep the experts' all-to-alls matched.
"""
from __future__ import annotations

from typing import Collection, Dict, Iterable, Optional, Set

import torch

from swift_gkd_plugin.core.views import turn_ids

__all__ = ['COMPLETION_KEYS', 'IDLE_DECODE_KEY', 'CompletionWindow', 'completion_length', 'end_of_turn_ids']

COMPLETION_KEYS = ('gkd/completion_length', 'gkd/completion_length_min', 'gkd/completion_length_max',
                   'gkd/clipped_ratio')
IDLE_DECODE_KEY = 'gkd/idle_decode_ratio'


def completion_length(sample) -> Optional[int]:
    """The tokens of ``sample``'s completion the loss learns: those its ``response_loss_mask`` keeps (a multi-turn
    rollout's), else every sampled token; None for a response the sampler gave as text only (no token ids)."""
    if sample.response_loss_mask:
        return sum(sum(mask) for mask in sample.response_loss_mask)
    turns = turn_ids(sample.response_token_ids)
    return sum(len(turn) for turn in turns) if turns else None


def end_of_turn_ids(template) -> Set[int]:
    """Token ids that end a response for ``template``: the tokenizer's EOS and its single-token stop words (e.g.
    ``<|im_end|>``)."""
    tokenizer = template.tokenizer
    ids = {tokenizer.eos_token_id} - {None}
    for word in getattr(template.template_meta, 'stop_words', None) or []:
        if isinstance(word, str):
            encoded = tokenizer.encode(word, add_special_tokens=False)
            if len(encoded) == 1:
                ids.add(encoded[0])
        elif isinstance(word, list) and len(word) == 1:
            ids.add(word[0])
    return ids


def is_cut(sample, end_ids: Collection[int]) -> bool:
    """``sample``'s completion was cut at the sampler's limit: finish reason 'length' and its last token does not end
    the turn."""
    if not sample.is_truncated:
        return False
    turns = turn_ids(sample.response_token_ids)
    return not (turns and turns[-1] and turns[-1][-1] in end_ids)


class CompletionWindow:
    """The completions sampled since the last log: :meth:`add` them as they are sampled, :meth:`logs` at a log."""

    def __init__(self):
        self._reset()

    def _reset(self) -> None:
        self.total, self.count, self.clipped = 0, 0, 0
        self.low, self.high = float('inf'), float('-inf')
        self.forwards, self.idle = 0, 0

    def add(self, samples: Iterable, end_ids: Collection[int]) -> None:
        """Count ``samples`` (ms-swift ``OnPolicySample``s after a rollout), cut or not (:func:`is_cut` with
        ``end_ids``, the sampler's :func:`end_of_turn_ids`); a text-only response (no token ids: no length) is not
        counted."""
        for sample in samples:
            n = completion_length(sample)
            if n is None:
                continue
            self.total, self.count = self.total + n, self.count + 1
            self.clipped += int(is_cut(sample, end_ids))
            self.low, self.high = min(self.low, n), max(self.high, n)

    def add_decode(self, forwards: int, idle: int) -> None:
        """Count a sampler's decode forwards, ``idle`` of them with all of this rank's rows stopped (a sampler whose
        forwards span data-parallel ranks, e.g. expert parallelism; others do not call it, and log no ratio)."""
        self.forwards, self.idle = self.forwards + forwards, self.idle + idle

    def logs(self, device, group=None) -> Dict[str, float]:
        """The window's metrics over every rank of ``group`` (a collective: every rank calls it at the same log),
        empty when no rank sampled; then a new window. Two all-reduces: SUM of (lengths, completions, clipped,
        decode forwards, idle ones), MAX of (-min, max)."""
        sums = torch.tensor([self.total, self.count, self.clipped, self.forwards, self.idle], dtype=torch.float64,
                            device=device)
        extremes = torch.tensor([-self.low, self.high], dtype=torch.float64, device=device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(sums, op=torch.distributed.ReduceOp.SUM, group=group)
            torch.distributed.all_reduce(extremes, op=torch.distributed.ReduceOp.MAX, group=group)
        self._reset()
        (total, count, clipped, forwards, idle), (low, high) = sums.tolist(), extremes.tolist()
        if not count:
            return {}
        keys = COMPLETION_KEYS
        out = {keys[0]: total / count, keys[1]: -low, keys[2]: high, keys[3]: clipped / count}
        if forwards:
            out[IDLE_DECODE_KEY] = idle / forwards
        return out

