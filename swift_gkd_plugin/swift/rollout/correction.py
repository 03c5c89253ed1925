"""The sampler's side of the sampler/policy mismatch correction (``--rollout_importance_sampling_mode``): the
per-token log-probabilities a sampler reports, carried into the training batch next to the tokens they belong to.

The correction itself is :func:`swift_gkd_plugin.core.policy_gradient.rollout_importance_weights`.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from swift_gkd_plugin.core.constants import IGNORE_INDEX
from swift_gkd_plugin.swift.rollout.stop_token import TransformersSampler

__all__ = ['SamplerLogprobsEngine', 'sampler_logprobs_of_batch']


class SamplerLogprobsEngine(TransformersSampler):
    """ms-swift's transformers engine (keeping each answer's stop token), whose log-probabilities are those of the
    distribution it sampled from.

    ms-swift's engine reports ``log_softmax`` of the raw logits (temperature 1, no top-k/top-p), while vLLM, as
    ms-swift starts it, reports ``processed_logprobs`` (after temperature and truncation). This engine reports the
    processed scores too (transformers' ``output_scores``: the logits after every logits processor), so both engines'
    log-probabilities mean the same thing: ``log mu(y)`` of the sampler.
    """

    def _prepare_generation_config(self, request_config):
        config = super()._prepare_generation_config(request_config)
        if request_config.logprobs:
            config.output_logits, config.output_scores = False, True
        return config

    def _infer_full(self, inputs, **kwargs):
        if not kwargs['request_config'].logprobs:
            return super()._infer_full(inputs, **kwargs)
        template, generate = self.template, self.template.generate

        def generate_with_scores(model, *args, **kw):
            output = generate(model, *args, **kw)
            output['logits'] = output['scores']  # what ms-swift's engine turns into log-probabilities
            return output

        template.generate = generate_with_scores  # the engine's own template copy, for this call only
        try:
            return super()._infer_full(inputs, **kwargs)
        finally:
            del template.generate


def _flat(values) -> list:
    """A sample's per-token values (``rollout_logprobs``, ``response_token_ids``: one list per turn, or one list)
    as one list."""
    if not values:
        return []
    return [v for turn in values for v in turn] if isinstance(values[0], (list, tuple)) else list(values)


def sampler_logprobs_of_batch(samples, labels: torch.Tensor) -> Optional[torch.Tensor]:
    """The sampler's log-probabilities of one micro-batch's response tokens, one per token.

    ``labels`` ``[B, L]`` are the student's labels of the ``B`` samples in order. A sample's reported log-probabilities
    belong to its sampled ``response_token_ids``; they are given to the longest prefix of its label tokens that
    equals those ids (template tokens after the response, e.g. the end of the turn where the sampler stopped at the
    length limit, were not sampled: NaN, as are the tokens of rows whose sampler reported nothing).

    Returns ``[N]`` float32 in the order of the response tokens ``labels[:, 1:] != -100`` taken row by row (the
    order ms-swift's ``logits_to_keep`` trimming keeps), or None when no sample of the micro-batch has any.
    """
    shifted = labels[:, 1:].cpu()
    mask = shifted != IGNORE_INDEX
    out = torch.full(shifted.shape, math.nan, dtype=torch.float32)
    found = False
    for row, sample in enumerate(samples):
        logprobs, ids = _flat(getattr(sample, 'rollout_logprobs', None)), _flat(sample.response_token_ids)
        if not logprobs or not ids or any(lp is None for lp in logprobs):
            continue
        positions = mask[row].nonzero().flatten()
        n = 0
        for token, sampled in zip(shifted[row, positions].tolist(), ids[:len(logprobs)]):
            if token != sampled:
                break
            n += 1
        if n:
            out[row, positions[:n]] = torch.tensor(logprobs[:n], dtype=torch.float32)
            found = True
    return out[mask].to(labels.device) if found else None
