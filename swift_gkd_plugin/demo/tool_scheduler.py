"""ms-swift's multi-turn scheduler of the calculator task (:mod:`.tool_task`), registered as ``gkd_calculator``.

Importing this file registers it (``multi_turns['gkd_calculator']``), so a run passes::

    --external_plugins <path of this file> --multi_turn_scheduler gkd_calculator --max_turns 3

:meth:`CalculatorScheduler.step` runs the tool on the call of the assistant turn just written and appends its result
(:func:`.tool_task.tool_message`); :meth:`CalculatorScheduler.check_finished` ends the trajectory on a turn without a
call (the final answer), on a turn cut by the length limit, or at ``max_turns``: the rules of
:func:`.tool_task.rollout`.
"""
from __future__ import annotations

from typing import Dict

from swift.infer_engine.protocol import ChatCompletionResponseChoice, RolloutInferRequest
from swift.rollout import MultiTurnScheduler, multi_turns

from swift_gkd_plugin.demo import tool_task

__all__ = ['CalculatorScheduler', 'NAME']

NAME = 'gkd_calculator'


class CalculatorScheduler(MultiTurnScheduler):
    """Tool turns of the calculator task; constructed by ms-swift as ``(max_turns=, tokenizer=, template=)``."""

    def check_finished(self, infer_request: RolloutInferRequest, response_choice: ChatCompletionResponseChoice,
                       current_turn: int) -> bool:
        if tool_task.parse_tool_call(response_choice.message.content or '') is None:
            return True
        return super().check_finished(infer_request, response_choice, current_turn)

    def step(self, infer_request: RolloutInferRequest, response_choice: ChatCompletionResponseChoice,
             current_turn: int) -> Dict:
        call = tool_task.parse_tool_call(response_choice.message.content or '')
        infer_request.messages.append(tool_task.tool_message(call))
        return {'infer_request': infer_request}


multi_turns[NAME] = CalculatorScheduler
