"""Sampled responses are text: they must never hold a multimodal model's media placeholder tokens.

A multimodal model's forward fills every occurrence of its placeholder token (LLaVA's ``<image>``, Qwen-VL's
``<|image_pad|>``, InternVL's ``<IMG_CONTEXT>``) with media features, and ms-swift's templates expand each occurrence
into a whole media slot when they encode a sample. These tokens are in the vocabulary, so a sampler may draw one (a
freshly initialised or pre-trained student does, a few times per thousand tokens). The re-encoded sample then asks
for more image slots than it has images, and the forward fails: ``Image features and image tokens do not match,
tokens: 20, features: 1024``.

So the in-process transformers samplers never draw them (:func:`suppress_media_placeholders`), and a response from
a sampler that cannot be told (vLLM, a rollout server) is cut before its first one
(:func:`cut_at_media_placeholders`): a prefix of a sample is still a sample of the policy on those positions.
"""
from __future__ import annotations

from copy import copy
from typing import List, Sequence

from swift.infer_engine import TransformersEngine
from swift.utils import get_logger

logger = get_logger()


def media_placeholder_ids(template) -> List[int]:
    """The token ids a multimodal template expands into media slots (none for a text-only model)."""
    if not template.model_meta.is_multimodal:
        return []
    return sorted({t for t in template.placeholder_tokens if isinstance(t, int) and t >= 0})


def suppress_media_placeholders(engine, template) -> None:
    """Make a transformers sampling engine never draw the template's media placeholder tokens.

    The engine's defaults come from the model's ``generation_config`` (ms-swift copies its set fields into every
    request's config); a copy gets ``suppress_tokens``, so the config saved with checkpoints stays as it was."""
    ids = media_placeholder_ids(template)
    if not ids or not isinstance(engine, TransformersEngine) or engine.generation_config is None:
        return
    config = copy(engine.generation_config)
    config.suppress_tokens = sorted(set(config.suppress_tokens or []) | set(ids))
    engine.generation_config = config


def _first_of(ids: Sequence[int], placeholders) -> int:
    return next((i for i, t in enumerate(ids) if t in placeholders), len(ids))


def cut_at_media_placeholders(samples, template) -> int:
    """Cut every sampled turn before its first media placeholder token (its loss mask and log-probs too); the
    single-turn response text follows its ids. Returns how many turns were cut."""
    placeholders = set(media_placeholder_ids(template))
    if not placeholders:
        return 0
    n_cut = 0
    for sample in samples:
        turns = sample.response_token_ids
        if not turns:
            continue
        flat = isinstance(turns[0], int)
        turns = [turns] if flat else turns
        ends = [_first_of(ids, placeholders) for ids in turns]
        if all(end == len(ids) for end, ids in zip(ends, turns)):
            continue
        n_cut += sum(end < len(ids) for end, ids in zip(ends, turns))
        sample.response_token_ids = _cut_turns(sample.response_token_ids, ends)
        sample.response_loss_mask = _cut_turns(sample.response_loss_mask, ends)
        sample.rollout_logprobs = _cut_turns(sample.rollout_logprobs, ends)
        if flat and sample.messages and sample.messages[-1]['role'] == 'assistant':
            sample.messages[-1]['content'] = template.tokenizer.decode(sample.response_token_ids)
    if n_cut:
        logger.warning(f'swift_gkd_plugin: {n_cut} sampled response(s) held a media placeholder token '
                       f'{sorted(placeholders)}; each was cut before it (the sampler could not be told to avoid it)')
    return n_cut


def _cut_turns(values, ends: List[int]):
    """``values`` (one list, or one list per turn) cut at ``ends``; empty or misaligned values are left as they are."""
    if not values:
        return values
    if isinstance(values[0], (int, float)):
        return list(values[:ends[0]])
    if len(values) != len(ends):
        return values
    return [list(v[:end]) for v, end in zip(values, ends)]
