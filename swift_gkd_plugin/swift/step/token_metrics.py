"""Token-weighted training metrics that stay on the device until they are logged.

ms-swift's ``MeanMetric.update`` reads every tensor it is given (``.item()``): on a GPU, one host sync per metric
and micro-batch, each one stalling the queue of kernels. :class:`TokenMean` adds device tensors to device sums and
reads them once, when ms-swift's ``log`` computes the metric (once per logging step).
"""
from __future__ import annotations

from typing import Union

import torch
from swift.metrics import MeanMetric

__all__ = ['TokenMean', 'add_token_sum']

Number = Union[int, float, torch.Tensor]


class TokenMean(MeanMetric):
    """A mean over tokens: :meth:`add` ``(total, n)`` counts ``n`` values summing to ``total`` (tensors stay on
    their device, summed in float64; numbers stay numbers). :meth:`compute` reads the two sums once, then behaves as
    ms-swift's ``MeanMetric`` (the same all-reduce of a float32 ``[sum, count]`` pair, so that ranks holding a plain
    ``MeanMetric`` for the key take part in the same collective). ``update`` is ms-swift's."""

    def __init__(self, nan_value=None, device=None, group=None):
        super().__init__(nan_value=nan_value, device=device, group=group)

    def add(self, total: Number, n_tokens: Number) -> None:
        self.state = self.state + (total.detach().double() if isinstance(total, torch.Tensor) else total)
        self.count = self.count + (n_tokens.detach().double() if isinstance(n_tokens, torch.Tensor) else n_tokens)

    def compute(self):
        if isinstance(self.state, torch.Tensor) or isinstance(self.count, torch.Tensor):
            device = next(v.device for v in (self.state, self.count) if isinstance(v, torch.Tensor))
            pair = [torch.as_tensor(v, dtype=torch.float64, device=device).reshape(())
                    for v in (self.state, self.count)]
            state, count = torch.stack(pair).tolist()  # the metric's one read, at logging
            self.state, self.count = state, int(round(count))
        return super().compute()


def add_token_sum(metric, total: Number, n_tokens: Number) -> None:
    """Add ``n_tokens`` values summing to ``total`` to ``metric``: on the device for a :class:`TokenMean`; for a
    plain ``MeanMetric`` (a key created before the trainer set :class:`TokenMean` as the default) as ``n_tokens``
    entries equal to their mean, which is what ``MeanMetric.update`` counts (it reads both)."""
    if isinstance(metric, TokenMean):
        metric.add(total, n_tokens)
        return
    n_tokens = int(n_tokens)
    if n_tokens:
        metric.update(torch.full((n_tokens, ), float(total) / n_tokens, dtype=torch.float64))
