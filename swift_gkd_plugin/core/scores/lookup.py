"""Reading a stored row back: the request that keys it and the top-k a run asks of its answer.

In: one row of a teacher view as a batch holds it (its own token ids, unpadded, and its labels unshifted: ``labels[p]``
is the token at ``p`` where it is a response token, -100 elsewhere), and a stored :class:`~.store.RowScores`.
Out: the row's request (token ids, scored positions), which :func:`~.store.row_key` keys; and each scored position's
``k`` most likely entries of the stored top-k (a store may hold more than a run asks for).

A position ``p`` is scored where the NEXT token is a response token (``labels[p + 1] != -100``): the logits at ``p``
predict it. Both adapters key a row this way, so the same row encoded the same way finds the same scores in
``swift rlhf`` and ``megatron rlhf``.
"""
from __future__ import annotations

from typing import List, Tuple

import torch

from swift_gkd_plugin.core.constants import IGNORE_INDEX

__all__ = ['scored_positions', 'row_request', 'most_likely']


def scored_positions(labels: torch.Tensor) -> torch.Tensor:
    """The positions ``p`` of one unpadded row whose next token is a label (``labels[p + 1] != -100``), ascending."""
    return (labels[1:] != IGNORE_INDEX).nonzero().flatten()


def row_request(input_ids: torch.Tensor, labels: torch.Tensor) -> Tuple[List[int], List[int]]:
    """``(token ids, scored positions)`` of one unpadded row: what :func:`~.store.row_key` keys."""
    return input_ids.tolist(), scored_positions(labels).tolist()


def most_likely(ids: torch.Tensor, logprobs: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Each position's ``k`` most likely entries of a stored top-k ``[n, K]`` (ids ascending in the store), most
    likely first: ``(ids [n, k], logprobs [n, k])``. A store of ``K < k`` entries (a refused case, kept total here)
    fills the rest with unused slots (id 0, log-probability ``-inf``), buckets of probability 0 in every loss.
    Ties keep the lower id first (a stable sort on the descending log-probabilities)."""
    n, width = logprobs.shape
    order = torch.sort(logprobs, dim=-1, descending=True, stable=True).indices[:, :k]
    top_ids, top = ids.gather(-1, order), logprobs.gather(-1, order)
    if width < k:
        top_ids = torch.cat([top_ids, top_ids.new_zeros(n, k - width)], -1)
        top = torch.cat([top, top.new_full((n, k - width), float('-inf'))], -1)
    return top_ids, top
