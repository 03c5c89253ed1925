"""What the fused loss's chunk loop (``core/fused/loss.py``) and its chunk backends share.

A backend (:class:`ChunkBackend`: ``core/fused/chunk_torch.py``, ``chunk_triton.py``) is built from a :class:`Plan`
for one call, owns its scratch buffers, says how many rows a chunk has (``rows``), turns a chunk's hidden states into
a :class:`ChunkResult` (the chunk's sums and ``d loss / d z`` of its student logits) and that gradient into the hidden,
weight and bias gradients (:meth:`ChunkBackend.backprop`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, NamedTuple, Optional

import torch

from swift_gkd_plugin.core.constants import IGNORE_INDEX, NEG_LOGIT
from swift_gkd_plugin.core.row_divergence import Divergence


@dataclass
class Plan:
    """Everything a chunk needs besides the differentiable inputs; ``stats`` is filled in by the loop."""
    divergence: Divergence
    temperature: float
    tail: bool
    vocab: int
    teacher_hidden: Optional[torch.Tensor] = None
    teacher_weight: Optional[torch.Tensor] = None
    teacher_bias: Optional[torch.Tensor] = None  # float32, finite (see finite_bias)
    topk_ids: Optional[torch.Tensor] = None
    topk_logprobs: Optional[torch.Tensor] = None
    labels: Optional[torch.Tensor] = None
    label_weights: Optional[torch.Tensor] = None
    label_temperature: float = 1.0
    entropy: bool = False
    div_scale: float = 0.0
    sft_scale: float = 0.0
    chunk_size: Optional[int] = None
    grad_enabled: bool = True
    backend: str = 'torch'
    stats: Dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def full(self) -> bool:
        """A full teacher head (else a top-k teacher)."""
        return self.teacher_weight is not None

    @property
    def sft(self) -> bool:
        """The label term is on."""
        return self.labels is not None and self.sft_scale != 0


class ChunkResult(NamedTuple):
    """One chunk's detached sums and its gradient: ``d loss / d z = grad_scale * grad`` (``grad`` ``[C, V]`` in the
    matmul dtype, ``None`` without gradients); ``bias_grad`` is ``grad`` or a float32 copy for the bias's sum."""
    divergence_sum: torch.Tensor
    label_sum: torch.Tensor  # the weighted cross-entropy sum of the label term
    top1_agree: torch.Tensor
    entropy_sum: torch.Tensor  # the student's (``Plan.entropy``), and the teacher's with a full head (else 0)
    teacher_entropy_sum: torch.Tensor
    grad: Optional[torch.Tensor] = None
    grad_scale: float = 1.0
    bias_grad: Optional[torch.Tensor] = None
    gated_rows: Optional[torch.Tensor] = None  # rows whose teacher entropy passes the entropy-aware mix's gate


def finite_bias(bias: torch.Tensor) -> torch.Tensor:
    """``bias`` in float32 with ``-inf`` (masked entries) as ``-1e30``: probability exactly 0, no NaN.
    float32 so that the stand-in survives fp16, where it would overflow back to ``-inf``."""
    return bias.detach().float().clamp_min(NEG_LOGIT)


def label_rows(plan: Plan, sl):
    """``[C, 1]`` labels (ignored ones replaced by 0), ``[C]`` cross-entropy weights (0 where ignored) and
    ``[C]`` gradient weights (the cross-entropy weights times the term's scale and ``1 / label_temperature``)."""
    lab = plan.labels[sl]
    keep = lab != IGNORE_INDEX
    ce_weight = keep.float() if plan.label_weights is None else torch.where(keep, plan.label_weights[sl], 0.0)
    w = ce_weight * (plan.sft_scale / plan.label_temperature)
    return torch.where(keep, lab, 0).unsqueeze(1), ce_weight, w


def backprop_matmuls(g, h, weight, alpha: float, sl, grad_h, grad_w, first: bool):
    """``grad_h[sl] = alpha g @ weight``, ``grad_w (+)= alpha g.T @ h`` (``g`` in the matmul dtype).

    The first chunk overwrites ``grad_w`` (allocated uninitialised: no separate zero-fill pass over ``[V, H]``).
    """
    if weight.dtype == torch.float32:
        if grad_h is not None:
            torch.addmm(grad_h[sl], g, weight, beta=0, alpha=alpha, out=grad_h[sl])
        if grad_w is not None:
            torch.addmm(grad_w, g.t(), h, beta=0 if first else 1, alpha=alpha, out=grad_w)
        return
    if grad_h is not None:
        torch.mul(g @ weight, alpha, out=grad_h[sl])
    if grad_w is not None:  # rounded once per chunk, accumulated in float32
        if first:
            torch.mul(g.t() @ h, alpha, out=grad_w)
        else:
            grad_w.add_(g.t() @ h, alpha=alpha)


class ChunkBackend:
    """What the loop calls: ``rows`` per chunk, :meth:`chunk` per chunk, then :meth:`backprop` with its gradient.
    Built as ``Backend(plan, weight, bias, hidden, want_grad)`` (``hidden``: the ``[n, H]`` active rows)."""
    rows: int
    weight: torch.Tensor

    def chunk(self, h: torch.Tensor, sl: slice) -> ChunkResult:
        raise NotImplementedError

    def backprop(self, g, h, alpha: float, sl, grad_h, grad_w, first: bool) -> None:
        """``grad_h[sl] = alpha g @ W``, ``grad_w (+)= alpha g.T @ h`` (:func:`backprop_matmuls`)."""
        backprop_matmuls(g, h, self.weight, alpha, sl, grad_h, grad_w, first)
