"""Reward functions for the GKD + RL tests, registered the way users register theirs (``--external_plugins``).

``tiny_letter_match`` scores a completion by the fraction of its characters that are letters of the dataset column
``solution`` (a graded signal even for the untrained tiny student), and appends every call (rank, prompts, completions, solutions, rewards) to the jsonl file named
by ``GKD_TEST_REWARD_LOG``, so the tests can check what was scored. ``tiny_broken_reward`` (and its async twin
``tiny_broken_async_reward``, an ms-swift ``AsyncORM``) misbehaves as ``GKD_TEST_BROKEN_REWARD`` says (``raise``,
``short``, ``nan``, ``inf``, ``string``, ``scalar``).
"""
import json
import os

from swift.rewards import ORM, AsyncORM, orms


class TinyLetterMatch(ORM):

    def __call__(self, completions, solution, messages, **kwargs):
        rewards = []
        for completion, answer in zip(completions, solution):
            letters = set(answer.split())
            rewards.append(sum(c in letters for c in completion) / max(len(completion), 1))
        log = os.environ.get('GKD_TEST_REWARD_LOG')
        if log:
            with open(log, 'a') as f:
                f.write(json.dumps({'rank': int(os.environ.get('RANK', '0')), 'completions': list(completions),
                                    'solutions': list(solution), 'rewards': rewards,
                                    'prompts': [m[0]['content'] for m in messages]}) + '\n')
        return rewards


def _broken(completions):
    how = os.environ.get('GKD_TEST_BROKEN_REWARD', 'raise')
    if how == 'raise':
        raise KeyError('no_such_column')
    if how == 'short':
        return [1.0] * (len(completions) - 1)
    if how == 'string':
        return ['1.0'] * len(completions)
    if how == 'scalar':
        return 1.0
    return [0.5] * (len(completions) - 1) + [float(how)]  # nan, inf


class TinyBrokenReward(ORM):

    def __call__(self, completions, **kwargs):
        return _broken(completions)


class TinyBrokenAsyncReward(AsyncORM):

    async def __call__(self, completions, **kwargs):
        return _broken(completions)


orms['tiny_letter_match'] = TinyLetterMatch
orms['tiny_broken_reward'] = TinyBrokenReward
orms['tiny_broken_async_reward'] = TinyBrokenAsyncReward
