"""What the teacher gives the loss, as one type per kind (modelled on ms-swift's ``TeacherOutput``).

The trainer turns the teacher's side of a micro-batch into one of these, and the loss dispatches on the type:
no keyword groups to pair up, no sentinel values. All rows are the active (response) positions, ``[N, ...]``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Union

import torch

__all__ = ['CrossTokenizerRows', 'TeacherHead', 'TeacherLogits', 'TeacherSamples', 'TeacherSignal', 'TeacherTopK']


@dataclass(frozen=True)
class TeacherLogits:
    """Full teacher logits ``[N, Vt]`` (the dense loss; a larger or smaller ``Vt`` is aligned as ms-swift does)."""
    logits: torch.Tensor


@dataclass(frozen=True)
class TeacherTopK:
    """The teacher's top-k: ids ``[N, k]`` and their full-vocabulary log-probabilities at temperature 1 (``-inf``:
    an unused slot; a row without a finite one carries no information). Servers and ``--gkd_logits_topk`` give
    this; the tail bucket (``--gkd_topk_tail``) is a rule of the loss on it (:mod:`.topk`). ``token_logprobs``: a
    server's log-probability of the token each row predicts, ``[N]``, at temperature 1 (the sampled-token term's),
    or None."""
    ids: torch.Tensor
    logprobs: torch.Tensor
    token_logprobs: Optional[torch.Tensor] = None


@dataclass(frozen=True)
class TeacherSamples:
    """Token ids drawn from the tempered teacher ``[N, S]`` (``-1``: an unused slot), the loss's sampled
    cross-entropy (:mod:`.scores.sampled_kd`, forward KL only); ``entropy`` ``[N]``: the tempered teacher's entropy
    there (the logged divergence is cross-entropy minus it), or None; ``top1`` ``[N]``: the teacher's most likely
    token (top-1 agreement), or None."""
    ids: torch.Tensor
    entropy: Optional[torch.Tensor] = None
    top1: Optional[torch.Tensor] = None


@dataclass(frozen=True)
class TeacherHead:
    """Teacher hidden states ``[N, Ht]`` and the output head that turns them into logits (the fused loss applies it
    chunk by chunk). ``weight is None``: the student's own head, frozen for the teacher's side (self-distillation on
    a shared base), read where the loss runs, since under ZeRO-3 it is whole only there."""
    hidden: torch.Tensor
    weight: Optional[torch.Tensor] = None
    bias: Optional[torch.Tensor] = None

    @property
    def uses_student_head(self) -> bool:
        return self.weight is None

    def with_head(self, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> 'TeacherHead':
        """This signal with a head (detached: the teacher's side gets no gradient)."""
        return TeacherHead(self.hidden, weight.detach(), None if bias is None else bias.detach())


@dataclass(frozen=True)
class CrossTokenizerRows:
    """A teacher with another tokenizer: its logits over its own tokenization ``[B, St, Vt]`` and, per student
    response token, the aligned teacher position (``rows``: the adapter's alignment record)."""
    logits: torch.Tensor
    rows: Any


TeacherSignal = Union[TeacherLogits, TeacherTopK, TeacherSamples, TeacherHead, CrossTokenizerRows]
