"""Every transformers-engine sample keeps the token that ended it, whatever the pad id.

ms-swift's transformers engine (``swift rlhf`` without vLLM) removes every token equal to the tokenizer's pad id from
the ids it generated (its non-streaming ``infer``). Where the pad token is also an end token (a model without a pad
token takes its EOS; Qwen's ``<|endoftext|>`` is both its pad and one of its EOS ids), a completion that stopped lost
its stop token, and an answer that was only the stop token came back empty: the student, or on seq_kd steps the
teacher's answers, never taught where to stop. vLLM keeps the stop token; so does this engine.

:class:`TransformersSampler` is ms-swift's ``TransformersEngine`` whose ``infer`` puts the stripped token back
(:func:`restore_stop_token`); every transformers engine that samples for the plugin is one (the student's, the
teacher's, SKD's, the log-probability reporting one).
"""
from __future__ import annotations

import functools
from typing import Iterable, Optional, Sequence, Set

from swift.infer_engine import TransformersEngine

__all__ = ['TransformersSampler', 'end_token_ids', 'restore_stop_token']


def end_token_ids(tokenizer, generation_config=None) -> Set[int]:
    """The ids that end generation: the generation config's ``eos_token_id`` (an id or a list) and the tokenizer's."""
    ids = set()
    for value in (getattr(generation_config, 'eos_token_id', None), getattr(tokenizer, 'eos_token_id', None)):
        if value is None:
            continue
        ids.update(int(v) for v in (value if isinstance(value, (list, tuple)) else [value]))
    return ids


def restore_stop_token(token_ids: Optional[list], finish_reason: Optional[str], *, pad_id: Optional[int],
                       end_ids: Set[int], stop_words: Iterable[str] = (), decode=None) -> bool:
    """Append ``pad_id`` to ``token_ids`` (in place) where the engine stripped it as the stop token; True if it did.

    That is when the completion stopped (``finish_reason == 'stop'``: ms-swift's engine says ``'length'`` when the
    kept ids reach the limit), the pad token is an end token (``pad_id in end_ids``), and the ids end neither with an
    end token nor, decoded by ``decode`` (a ``List[int] -> str``), with a stop word: then generation ended on an end
    token that was removed, and the only end token removed is the pad token.
    """
    if token_ids is None or finish_reason != 'stop' or pad_id is None or pad_id not in end_ids:
        return False
    if token_ids and token_ids[-1] in end_ids:
        return False
    if token_ids and decode is not None:
        tail = decode(token_ids[-20:])
        if any(isinstance(word, str) and word and tail.endswith(word) for word in stop_words):
            return False
    token_ids.append(pad_id)
    return True


class TransformersSampler(TransformersEngine):
    """ms-swift's transformers engine whose answers keep the token that ended them (see the module)."""

    def infer(self, infer_requests, request_config=None, metrics=None, **kwargs):
        responses = super().infer(infer_requests, request_config, metrics, **kwargs)
        if request_config is None or not request_config.stream:  # (the streaming path keeps it)
            self._restore_stop_tokens(responses, getattr(request_config, 'stop', None) or ())
        return responses

    def _restore_stop_tokens(self, responses: Sequence, request_stop: Iterable[str]) -> None:
        tokenizer = self.tokenizer
        end_ids = end_token_ids(tokenizer, self.generation_config)
        stop_words = [*(getattr(self.template.template_meta, 'stop_words', None) or ()), *request_stop]
        decode = functools.partial(tokenizer.decode, skip_special_tokens=False)
        for response in responses:
            for choice in getattr(response, 'choices', None) or ():
                restore_stop_token(choice.token_ids, choice.finish_reason, pad_id=tokenizer.pad_token_id,
                                   end_ids=end_ids, stop_words=stop_words, decode=decode)
