"""Rewards of the student's completions for GKD + RL: ms-swift's reward registry and scoring, checked row by row.

The reward functions are ms-swift's (``swift.rewards.orms``: built-ins and those registered by ``--external_plugins``)
and are called by ms-swift's own ``compute_rewards_per_func``, so a reward written for GRPO works here unchanged
(``f(completions, **columns)``, extra dataset columns such as ``solution`` included). What this module adds: an error
that names the function and the row when a function (sync or async) raises, returns the wrong number of values, or
a value that is not a finite number (NaN, inf, a string), and the gather over ranks that group advantages need (a
prompt's completions may sit on several ranks).
"""
from __future__ import annotations

import math
import numbers
from typing import Callable, List, Optional, Tuple

import torch
from accelerate.utils import gather
from swift.rl_core.grpo_algorithm import _is_async_reward, compute_rewards_per_func

from swift_gkd_plugin.core.policy_gradient import group_advantages


def load_reward_funcs(args) -> Tuple[List[Callable], List[str]]:
    """Instances of ``--reward_funcs`` (names checked at argument parsing) and their names, as GRPO builds them."""
    from swift.rewards import orms
    funcs = [orms[name](args=args) for name in args.reward_funcs or []]
    return funcs, list(args.reward_funcs or [])


def _row_text(sample) -> str:
    prompt = next((m['content'] for m in reversed(sample.messages[:-1]) if m['role'] == 'user'), '')
    return f'prompt {str(prompt)[:80]!r}, completion {str(sample.messages[-1]["content"])[:80]!r}'


def _checked(func: Callable, name: str, samples) -> Callable:
    """``func`` with its output checked row by row (:func:`_check_rewards`), and its exceptions named; an async
    function stays async (ms-swift awaits it with the others), with the same checks."""

    def raised(exc: Exception, n: int) -> RuntimeError:
        return RuntimeError(f'reward function {name!r} raised on a batch of {n} completions '
                            f'({type(exc).__name__}: {exc}); first row: {_row_text(samples[0])}')

    if _is_async_reward(func):

        async def call_async(completions, **kwargs):
            try:
                out = await func(completions, **kwargs)
            except Exception as exc:
                raise raised(exc, len(completions)) from exc
            return _check_rewards(out, name, samples)

        return call_async

    def call(completions, **kwargs):
        try:
            out = func(completions, **kwargs)
        except Exception as exc:
            raise raised(exc, len(completions)) from exc
        return _check_rewards(out, name, samples)

    return call


def _check_rewards(out, name: str, samples) -> List[Optional[float]]:
    """One finite real number (or ``None``: does not apply) per completion, as floats; else an error naming the
    function and the row (ms-swift would take a NaN for "does not apply" and fail on the rest inside torch)."""
    n = len(samples)
    try:
        values = list(out)
    except TypeError:
        raise ValueError(f'reward function {name!r} returned {type(out).__name__} {out!r:.80}: it must return a list '
                         f'of {n} values (numbers, or None where it does not apply)') from None
    if len(values) != n:
        raise ValueError(f'reward function {name!r} returned {len(values)} values for {n} completions: it must '
                         'return one value (or None) per completion')
    checked = []
    for i, value in enumerate(values):
        number = None if value is None else _finite_number(value)
        if value is not None and number is None:
            raise ValueError(f'reward function {name!r} returned {value!r} for row {i} of the generation batch '
                             f'({_row_text(samples[i])}): rewards must be finite numbers, or None where the '
                             'function does not apply')
        checked.append(number)
    return checked


def _finite_number(value) -> Optional[float]:
    """``value`` as a float if it is a finite real number (Python, NumPy or a one-element tensor), else None;
    strings are not numbers here, even ``'1.0'``."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex():
            return None
        value = value.item()
    if not isinstance(value, numbers.Real):  # numpy's scalars are registered as numbers.Real too
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def score_completions(samples, funcs: List[Callable], names: List[str], device, trainer_state) -> torch.Tensor:
    """``[N, F]`` float32 rewards of this rank's completions, NaN where a function returned None."""
    # async functions are detected with ms-swift's own test and stay async, checked all the same
    wrapped = [f if isinstance(f, torch.nn.Module) else _checked(f, n, samples) for f, n in zip(funcs, names)]
    rewards = compute_rewards_per_func(samples, wrapped, None, device=device, trainer_state=trainer_state)
    missing = torch.isnan(rewards).all(dim=1) if rewards.shape[1] else torch.zeros(0, dtype=torch.bool)
    if bool(missing.any()):
        i = int(missing.nonzero()[0])
        raise ValueError(f'no reward function gave a reward for row {i} of the generation batch ({_row_text(samples[i])}):'
                         f' every one of {names} returned None')
    return rewards


def global_advantages(local_rewards: torch.Tensor, weights: torch.Tensor, group_size: int, scale_rewards: str,
                      rank: int, num_processes: int, replicas: int = 1):
    """Advantages of this rank's completions from the rewards of every rank's (groups may span ranks).

    ``replicas``: consecutive ranks that hold the same completions (a sequence-parallel group), counted once.
    Returns ``(this rank's advantages [N], every rank's advantages [N * world / replicas], rewards and per-function
    rewards [N * world / replicas, F])``, the global ones in rank order.
    """
    per_func = gather(local_rewards) if num_processes > 1 else local_rewards
    if replicas > 1:
        per_func = per_func.view(num_processes // replicas, replicas, *local_rewards.shape)[:, 0].flatten(0, 1)
        rank = rank // replicas
    rewards = (per_func * weights.unsqueeze(0)).nansum(dim=1)
    advantages = group_advantages(rewards, group_size, scale_rewards)
    n = local_rewards.shape[0]
    return advantages[rank * n:(rank + 1) * n], advantages, rewards, per_func

