"""The sorting task's exact-match reward (``tests/harness/quality_reward.py``), loaded the way
``--external_plugins`` loads it and called through ms-swift's own reward path on real GKD and GRPO samples."""
from __future__ import annotations

import pytest
import torch

from harness import quality_reward

PROMPT = 'Sort: k c a m f h b p'


def _conversation(prompt, answer):
    return [{'role': 'user', 'content': prompt}, {'role': 'assistant', 'content': answer}]


@pytest.fixture(scope='module')
def registered_reward():
    from swift.rewards import orms
    from swift.rlhf_trainers.utils import resolve_reward_funcs
    from swift.utils import import_external_file
    import_external_file(quality_reward.__file__)  # what --external_plugins does with the file
    assert quality_reward.REWARD_NAME in orms
    funcs, names = resolve_reward_funcs([quality_reward.REWARD_NAME])  # what GRPO and GKD + RL do with the name
    assert names == ['SortExactMatch']  # ms-swift logs rewards/<class name>/mean
    return funcs


@pytest.mark.parametrize('sample_class', ['GKDSample', 'GRPOSample'])
def test_exact_match_reward_through_ms_swift(sample_class, registered_reward):
    from swift.rl_core import data
    from swift.rl_core.grpo_algorithm import compute_rewards_per_func
    answers = ['a b c f h k m p', ' p m k h f c b a\n', 'a b c f h k p m', 'a b c f h k m', '']
    rows = [_conversation(PROMPT, a) for a in answers]
    rows.append([{'role': 'system', 'content': 'be brief'}, *_conversation('Sort: b a', 'b a')])
    rows.append(_conversation('Reverse: a b', 'b a'))  # not a sorting prompt: not applicable
    samples = [getattr(data, sample_class)(messages=m, extra={'solution': 'unused'}) for m in rows]
    rewards = compute_rewards_per_func(samples, registered_reward, None, device=torch.device('cpu'))
    assert rewards.shape == (len(rows), 1)
    assert rewards[:-1, 0].tolist() == [1.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    assert torch.isnan(rewards[-1, 0])
