"""A multi-turn scheduler's hooks, checked and kept within ``--max_length`` in the trainer's rollouts.

ms-swift's loop (:func:`swift.rollout.run_multi_turn`) takes what a scheduler returns as it is: a ``step`` that
returns None, a tool result whose content is not a string or token ids past the vocabulary surface as a bare
TypeError or IndexError far from the scheduler, and a trajectory whose next turn's prompt is longer than
``--max_length`` (a scheduler that never says it is finished, a huge tool result) stops the run with the engine's
``MaxLengthError``. :class:`SchedulerGuard` wraps the scheduler instance's ``step``, ``check_finished`` and
``on_turn_end``:

* their return values are checked, and a bad one stops the run with one error naming the scheduler's class, the
  method, what it returned and what is allowed (:class:`SchedulerError`);
* an empty ``response_token_ids`` (the scheduler: nothing of this turn to learn) keeps the turn as the model wrote it,
  every token masked 0 (context, not a target), and is counted (:attr:`SchedulerGuard.empty_turns`); ms-swift would
  drop the turn from the ids while its message stays, shifting the other turns' ids onto the wrong messages;
* :meth:`SchedulerGuard.rollout_fn` does not send a request whose prompt no longer fits in ``--max_length``: the
  trajectory ends with the turn before (what the scheduler appended after it is dropped), is marked in its
  ``rollout_infos`` (:data:`TRUNCATED`) and counted by the trainer (``gkd/truncated_trajectories``).
"""
from __future__ import annotations

import functools
import inspect
from copy import copy
from typing import Callable, List

from swift.infer_engine.protocol import (ChatCompletionResponse, ChatCompletionResponseChoice, ChatMessage,
                                         RolloutOutput, UsageInfo)

TRUNCATED = 'gkd_truncated'  # rollout_infos key of a trajectory cut at --max_length
STEP_KEYS = "'infer_request' (required), 'response_token_ids', 'response_loss_mask', 'rollout_logprobs', " \
    "'rollout_infos'"


class SchedulerError(ValueError):
    """A multi-turn scheduler returned something ms-swift's loop cannot use."""


def _is_bool(value) -> bool:
    kind = type(value)  # numpy's bool too (a gym env's done): numpy.bool_, numpy.bool since numpy 2
    return isinstance(value, bool) or (kind.__module__ == 'numpy' and kind.__name__ in ('bool', 'bool_'))


def _shown(value, limit: int = 200) -> str:
    text = repr(value)
    return f'{type(value).__name__} {text[:limit]}{"..." if len(text) > limit else ""}'


class SchedulerGuard:
    """Checks on the hooks of ``scheduler`` (registered as ``name``), installed on the instance; ``vocab_size``: the
    ids a turn may hold; ``template``: the trainer's, whose ``--max_length`` a turn's prompt must fit, as it must fit
    in ``max_model_len`` (the models' context) with room for one token."""

    def __init__(self, scheduler, name: str, vocab_size: int, template, max_model_len=None):
        self.scheduler, self.name, self.vocab_size = scheduler, name, int(vocab_size)
        # the longest prompt of a turn: --max_length, and one token short of the models' context (the engines refuse
        # a prompt that leaves no room for generation)
        limits = [(template.max_length, f'--max_length {template.max_length}')]
        if max_model_len:
            limits.append((max_model_len - 1, f"the model's context (max_model_len {max_model_len}, under "
                           f'--max_length {template.max_length})'))
        self.limit, self.limit_name = min((lim for lim in limits if lim[0] is not None), default=(None, ''))
        self.limit_is_max_length = self.limit_name.startswith('--max_length')
        # measures prompts as the engines encode them, untruncated whatever --truncation_strategy says (a prompt cut
        # on the left would no longer be the context the turn is trained in)
        self._template = copy(template)
        self._template.set_mode('transformers')
        self._template.max_length = None
        self.empty_turns = 0
        self._cut = set()  # id() of the requests cut at --max_length in the current rollout
        self._empty_final = {}  # id() of a request -> its on_turn_end returned empty ids for this turn
        for method in ('step', 'check_finished', 'on_turn_end'):
            setattr(scheduler, method, getattr(self, f'_{method}')(getattr(scheduler, method)))

    def refuse(self, method: str, what: str, allowed: str):
        cls = type(self.scheduler)
        try:
            where = f' in {inspect.getfile(cls)}'
        except (TypeError, OSError):
            where = ''
        raise SchedulerError(f'--multi_turn_scheduler {self.name} (class {cls.__qualname__}{where}): {method}() '
                             f'{what}; allowed: {allowed}')

    # --- the hooks ---------------------------------------------------------------------------------------------

    def _step(self, step):

        @functools.wraps(step)
        def checked(infer_request, response_choice, current_turn):
            self._empty_final.pop(id(infer_request), None)  # not the last turn: on_turn_end's ids are unused
            result = step(infer_request, response_choice, current_turn)
            if not isinstance(result, dict) or 'infer_request' not in result:
                self.refuse('step', f'returned {_shown(result)}', f'a dict with the keys {STEP_KEYS}')
            request = result['infer_request']
            messages = getattr(request, 'messages', None)
            if not isinstance(messages, list):
                self.refuse('step', f"returned an 'infer_request' without a list of messages ({_shown(request)})",
                            'the request it was given, with the tool\'s result appended to its messages')
            self._check_messages(messages)
            self.empty_turns += self._check_ids('step', result, response_choice)
            return result

        return checked

    def _check_finished(self, check_finished):

        @functools.wraps(check_finished)
        def checked(infer_request, response_choice, current_turn):
            if id(infer_request) in self._cut:
                return True
            finished = check_finished(infer_request, response_choice, current_turn)
            if not _is_bool(finished):
                self.refuse('check_finished', f'returned {_shown(finished)}', 'True (the trajectory ends) or False')
            return bool(finished)

        return checked

    def _on_turn_end(self, on_turn_end):

        @functools.wraps(on_turn_end)
        async def checked(infer_request, response_choice, current_turn):
            if id(infer_request) in self._cut:
                return {'done': True, 'rollout_infos': {TRUNCATED: True}}
            result = await on_turn_end(infer_request, response_choice, current_turn)
            if not isinstance(result, dict):
                self.refuse('on_turn_end', f'returned {_shown(result)}',
                            "a dict (empty, or with 'done', 'rollout_infos', 'response_token_ids', "
                            "'response_loss_mask', 'rollout_logprobs')")
            if 'done' in result and not _is_bool(result['done']):
                self.refuse('on_turn_end', f"returned 'done': {_shown(result['done'])}", 'True or False')
            if self._check_ids('on_turn_end', result, response_choice):
                self._empty_final[id(infer_request)] = True  # counted if this turn ends the trajectory
            return result

        return checked

    def _check_messages(self, messages) -> None:
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get('role'), str):
                self.refuse('step', f'left message {i} of infer_request.messages as {_shown(message)}',
                            "dicts {'role': str, 'content': str}")
            content = message.get('content')
            if message['role'] != 'assistant' and not isinstance(content, str):
                self.refuse('step', f'left the content of message {i} (role {message["role"]!r}) of '
                            f'infer_request.messages as {_shown(content)}', 'a string (a tool\'s result as text)')

    def _check_ids(self, method: str, result: dict, response_choice) -> bool:
        """Check ``response_token_ids`` / ``response_loss_mask`` / ``rollout_infos``; an empty id list becomes the
        turn's sampled ids, all masked 0. True when it was empty."""
        if 'rollout_infos' in result and not isinstance(result['rollout_infos'], (dict, type(None))):
            self.refuse(method, f"returned 'rollout_infos': {_shown(result['rollout_infos'])}", 'a dict')
        ids, mask = result.get('response_token_ids'), result.get('response_loss_mask')
        if ids is None and mask is None:
            return False
        sampled = list(response_choice.token_ids or [])
        if ids is not None:
            if not isinstance(ids, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool)
                                                             for t in ids):
                self.refuse(method, f"returned 'response_token_ids': {_shown(ids)}",
                            'a list of token ids (ints), one per token of the turn')
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                self.refuse(method, f"returned 'response_token_ids' with ids outside the vocabulary: {bad[:5]}",
                            f'ids in [0, {self.vocab_size})')
        n = len(sampled if ids is None else ids)
        if mask is not None and (not isinstance(mask, (list, tuple)) or len(mask) != n
                                 or any(m not in (0, 1) or isinstance(m, float) for m in mask)):
            self.refuse(method, f"returned a 'response_loss_mask' of {_shown(mask)} for {n} token ids",
                        'one 0/1 value per token of response_token_ids (1: the model wrote it and learns it, 0: '
                        'context such as a tool result)')
        if ids is not None and not ids and sampled:
            result['response_token_ids'], result['response_loss_mask'] = sampled, [0] * len(sampled)
            return True
        return False

    # --- the rollout -------------------------------------------------------------------------------------------

    def rollout_fn(self, infer: Callable) -> Callable:
        """``infer(requests, config) -> outputs``, except for requests whose prompt does not fit in ``--max_length``:
        their trajectory ends with its last turn (the messages the scheduler appended after it are dropped), and
        their output is an empty continuation of that turn that ends the trajectory (:data:`TRUNCATED`)."""

        def rollout(requests, config) -> List[RolloutOutput]:
            cut = [not self._fits(request) for request in requests]
            outputs = iter(infer([r for r, c in zip(requests, cut) if not c], config))
            result = []
            for request, c in zip(requests, cut):
                if not c:
                    result.append(next(outputs))
                    continue
                self._cut.add(id(request))
                last = max(i for i, m in enumerate(request.messages) if m.get('role') == 'assistant')
                del request.messages[last + 1:]
                choice = ChatCompletionResponseChoice(index=0, message=ChatMessage(role='assistant', content=''),
                                                      finish_reason='length', token_ids=[])
                response = ChatCompletionResponse(model='', choices=[choice], usage=UsageInfo(0, 0, 0))
                if getattr(request, 'request_id', None):
                    response.id = request.request_id
                result.append(RolloutOutput(response=response))
            return result

        return rollout

    def _fits(self, request) -> bool:
        if self.limit is None or not any(m.get('role') == 'assistant' for m in request.messages):
            return True
        return len(self._template.encode(request)['input_ids']) <= self.limit

    def start(self) -> None:
        self._cut.clear()
        self._empty_final.clear()

    def finish(self, requests, outputs) -> None:
        """After the loop: a cut trajectory's turn count leaves out the empty continuation; empty id lists of last
        turns (``on_turn_end``'s) are counted."""
        for request, output in zip(requests, outputs):
            if id(request) in self._cut:
                output.rollout_infos['num_turns'] = max(int(output.rollout_infos.get('num_turns', 1)) - 1, 1)
            self.empty_turns += int(self._empty_final.get(id(request), False))
        self.start()
