"""SKD sampling in ``swift rlhf``: ms-swift's transformers engine with the decoding loop of core/speculative.py.

Only the decoding loop changes: prompts are encoded, batched, processed (temperature, top-k/p, suppressed tokens),
stopped (EOS, template stop words, max tokens) and decoded by ms-swift's engine and transformers' ``generate``, which
hands the loop to ``custom_generate``; so with nothing replaced the samples are the plain engine's, draw for draw.
The teacher verifies locally (:func:`cached_forward`) or on this plugin's teacher server (:func:`server_teacher`).
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, List, Optional

import torch
from swift.template.utils import StopWordsCriteria
from transformers.generation.utils import GenerateDecoderOnlyOutput

from swift_gkd_plugin.core.speculative import Forward, SpeculativeResult, scored_forward, speculative_sample
from swift_gkd_plugin.swift.rollout.stop_token import TransformersSampler


class SpeculativeEngine(TransformersSampler):
    """A transformers engine (keeping each answer's stop token) whose ``generate`` runs ``decode`` (a transformers
    ``custom_generate`` callable)."""

    def __init__(self, model, *, template, decode: Callable):
        super().__init__(model, template=template, max_batch_size=0)
        self._decode = decode

    def _infer_full(self, inputs, **kwargs):
        # ms-swift passes the batch's tensors to generate() as keyword arguments: custom_generate rides along
        return super()._infer_full(dict(inputs, custom_generate=self._decode), **kwargs)


def cached_forward(model, context: Optional[Callable] = None) -> Forward:
    """A :data:`~swift_gkd_plugin.core.speculative.Forward` on a transformers causal LM with its own KV cache;
    ``context()`` is entered around every forward (e.g. the adapter switched off for a shared-base teacher)."""
    state = {}

    def call(input_ids, attention_mask, position_ids):
        with context() if context is not None else nullcontext():
            out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                        past_key_values=state.get('cache'), use_cache=True)
        state['cache'] = out.past_key_values
        return out.logits

    return call


def server_teacher(client, top_k: int) -> Callable[[torch.nn.Module, int], Forward]:
    """SKD's teacher on this plugin's teacher server: ``(student, prompt width) ->`` a :data:`Forward` that asks
    ``client`` (a :class:`~swift_gkd_plugin.server.TeacherClient`) for the server's top-k at the draft positions
    (``POST /v1/topk``, the server's own k, one request per verification; :func:`scored_forward`).

    A drafted token is accepted when it is among the returned top-``top_k``, a replacement is drawn from the returned
    top-k renormalised at the sampling temperature (the top-k truncation of the teacher's distribution). An answer
    with fewer than ``top_k`` tokens (a server restarted with a smaller --top_k) is refused: it would accept tokens the
    teacher ranks lower.
    """

    def make(model, prompt_width: int) -> Forward:
        vocab = model.get_output_embeddings().weight.shape[0]  # the student's logits (a padded head included)

        def score(asked):
            results = client.topk_at(asked, topk=None)
            served = results[0].ids.shape[-1] if results else top_k
            if served < top_k and served < (client.vocab_size or vocab):
                raise ValueError(f'--gkd_skd_top_k {top_k}: the teacher server {client.url} answered with its top-'
                                 f'{served} only; restart it with --top_k >= {top_k}')
            return [(r.ids, r.logprobs) for r in results]

        return scored_forward(score, vocab, first_column=prompt_width - 1)

    return make


def stop_words_check(stopping_criteria) -> Callable[[List[int]], bool]:
    """The template's stop words (ms-swift's ``StopWordsCriteria``) as a test on one completion."""
    criteria = [c for c in stopping_criteria if isinstance(c, StopWordsCriteria)]

    def stop(completion: List[int]) -> bool:
        for c in criteria:
            text = c.tokenizer.decode(completion[-20:], **c.tokenizer_kwargs)
            for word in c.stop_words:
                if isinstance(word, str) and word and word in text:
                    return True
                if isinstance(word, list) and word and completion[-len(word):] == word:
                    return True
        return False

    return stop


def skd_decoding(teacher: Callable[[torch.nn.Module, int], Forward], *, top_k: int, temperature: float,
                 generator: torch.Generator, on_result: Callable[[SpeculativeResult], None]) -> Callable:
    """A ``custom_generate`` callable for transformers' ``generate``: SKD with ``teacher(student_model, prompt
    width)`` verifying.

    The student's draws go through transformers' own logits processors and ``torch.multinomial`` on the global
    random stream, as ``generate``'s sampling loop does; the teacher's replacements come from ``generator`` at
    ``temperature``.
    """

    def decode(model, input_ids, logits_processor, stopping_criteria, generation_config, synced_gpus=False,
               streamer=None, **model_kwargs):
        if synced_gpus:
            raise ValueError('--gkd_skd_top_k does not support sampling with synchronised ranks (DeepSpeed ZeRO-3 '
                             'or FSDP with --ds3_gather_for_generation false)')

        def sample_student(logits, ids):
            scores = logits_processor(ids, logits.float())
            if generation_config.do_sample:
                return torch.multinomial(torch.softmax(scores, -1), num_samples=1).squeeze(1)
            return scores.argmax(-1)

        eos = generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        max_new = generation_config.max_new_tokens or generation_config.max_length - input_ids.shape[1]
        pad = generation_config.pad_token_id if generation_config.pad_token_id is not None else (eos or [0])[0]
        suppressed = list(generation_config.suppress_tokens or [])
        teacher_forward = teacher(model, input_ids.shape[1])
        mask = model_kwargs.get('attention_mask')
        mask = torch.ones_like(input_ids) if mask is None else mask

        def teacher_logits(ids, mask, pos):
            logits = teacher_forward(ids, mask, pos)
            if suppressed:  # the engine's suppressed tokens (media placeholders) are never drawn
                logits = logits.clone()
                logits[..., [t for t in suppressed if t < logits.shape[-1]]] = float('-inf')
            return logits

        result = speculative_sample(
            cached_forward(model), teacher_logits, input_ids, mask, top_k=top_k,
            max_new_tokens=max_new, eos_token_ids=eos, pad_token_id=pad, sample_student=sample_student,
            teacher_temperature=temperature, generator=generator, stop=stop_words_check(stopping_criteria))
        on_result(result)
        width = max(len(c) for c in result.completions)
        sequences = torch.full((input_ids.shape[0], input_ids.shape[1] + width), pad, dtype=input_ids.dtype,
                               device=input_ids.device)
        sequences[:, :input_ids.shape[1]] = input_ids
        for row, completion in enumerate(result.completions):
            sequences[row, input_ids.shape[1]:input_ids.shape[1] + len(completion)] = torch.tensor(completion)
        if generation_config.return_dict_in_generate:
            return GenerateDecoderOnlyOutput(sequences=sequences)
        return sequences

    return decode
