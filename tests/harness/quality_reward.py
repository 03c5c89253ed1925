"""The sorting task's exact-match reward, as an ms-swift reward function (ORM) named ``sort_exact_match``.

Pass this file with ``--external_plugins`` and name the reward with ``--reward_funcs``, for GRPO and for GKD + RL
alike (``benchmarks/bench_rl.py`` does)::

    swift rlhf --rlhf_type grpo --external_plugins tests/harness/quality_reward.py --reward_funcs sort_exact_match ...

A completion scores 1.0 when :func:`.quality_task.is_correct` accepts it for its prompt (the last user message of the
row's ``messages`` column, which ms-swift hands to every reward function), else 0.0; rows whose prompt is not a
sorting prompt get ``None`` (not applicable), as ms-swift's reward contract allows.  Importing it registers the reward
and loads nothing that ``swift rlhf`` has not loaded already.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

from swift.rewards.orm import ORM, orms

from swift_gkd_plugin.demo.quality_task import PROMPT_PREFIX, is_correct

REWARD_NAME = 'sort_exact_match'


def _prompt_of(messages: Sequence[Dict[str, Any]]) -> Optional[str]:
    """The last user message of a conversation (the completion is the assistant message after it)."""
    users = [m['content'] for m in messages if m.get('role') == 'user']
    return users[-1] if users else None


class SortExactMatch(ORM):
    """1.0 for a right answer to a sorting prompt (ascending or descending), 0.0 for a wrong one."""

    def __call__(self, completions: List[str], messages: List[Sequence[Dict[str, Any]]],
                 **kwargs) -> List[Optional[float]]:
        rewards: List[Optional[float]] = []
        for completion, conversation in zip(completions, messages):
            prompt = _prompt_of(conversation)
            if prompt is None or not prompt.startswith(PROMPT_PREFIX):
                rewards.append(None)
            else:
                rewards.append(float(is_correct(prompt, completion)))
        return rewards


orms[REWARD_NAME] = SortExactMatch
