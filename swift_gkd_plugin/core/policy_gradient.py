"""The policy-gradient term that can stand beside the divergence on on-policy steps, and its group advantages.

On an on-policy step the student samples ``G`` completions per prompt; a reward scores each one. The advantage of a
completion is its reward minus the mean reward of its prompt's group (optionally divided by a standard deviation),
and the policy-gradient loss of a sampled token ``y_i`` with advantage ``A`` is ``-A * ratio_i`` where
``ratio_i = exp(log p(y_i) - log p_old(y_i))``. The samples are fresh (one gradient step per generation batch),
so ``p_old`` is ``p`` itself and the ratio is 1 in value: the loss reads ``-A`` and its gradient is
``-A * grad log p(y_i)``, the REINFORCE estimator with a group baseline (GRPO without clipping or a reference KL).
"""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ['group_advantages', 'policy_gradient_loss']

SCALE_REWARDS = ('group', 'batch', 'none')


def group_advantages(rewards: torch.Tensor, group_size: int, scale_rewards: str = 'group',
                     eps: float = 1e-4) -> torch.Tensor:
    """Advantages of completions sampled in groups: reward minus its group's mean, optionally scaled.

    Args:
        rewards: ``[N]`` rewards, ``N`` a multiple of ``group_size``; entries ``[g * G, (g + 1) * G)`` are the
            completions of one prompt.
        group_size: ``G >= 1``, completions per prompt. With ``G == 1`` every advantage is 0 (no baseline can be
            formed from one sample).
        scale_rewards: ``'group'`` divides by the group's standard deviation, ``'batch'`` by that of all ``N``
            rewards, ``'none'`` leaves the centred rewards as they are (the names and the unbiased standard
            deviation of ms-swift's GRPO ``--scale_rewards``).
        eps: added to the standard deviation, so a group whose rewards are all equal gets advantages of 0.

    Returns:
        ``[N]`` advantages in the dtype of ``rewards`` (float32 at least). Constant, no gradient.
    """
    if group_size < 1:
        raise ValueError(f'group_size must be >= 1, got {group_size}')
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f'scale_rewards must be one of {list(SCALE_REWARDS)}, got {scale_rewards!r}')
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f'rewards must be 1-D with a length divisible by group_size={group_size}, '
                         f'got shape {tuple(rewards.shape)}')
    if not torch.isfinite(rewards).all():
        raise ValueError('rewards must be finite (got NaN or inf)')
    rewards = rewards.detach()
    if not rewards.is_floating_point() or rewards.dtype in (torch.float16, torch.bfloat16):
        rewards = rewards.float()
    grouped = rewards.view(-1, group_size)
    centred = (grouped - grouped.mean(dim=1, keepdim=True)).reshape(-1)
    if scale_rewards == 'none' or group_size == 1:
        return centred
    if scale_rewards == 'group':
        std = grouped.std(dim=1).repeat_interleave(group_size)
    else:
        std = rewards.std() if rewards.numel() > 1 else rewards.new_zeros(())
    return centred / (std + eps)


def policy_gradient_loss(logprobs: torch.Tensor, advantages: torch.Tensor,
                         old_logprobs: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-token policy-gradient loss ``-A * exp(log p - log p_old)`` of sampled tokens.

    Args:
        logprobs: ``[N]`` the student's log-probabilities of the sampled tokens (differentiable), at the
            temperature the tokens were sampled with.
        advantages: ``[N]`` the advantage of each token's completion (constant; broadcast from its row).
        old_logprobs: ``[N]`` log-probabilities of the policy that sampled; ``None`` (the default, fresh samples)
            uses ``logprobs`` detached, so the ratio is exactly 1 in value.

    Returns:
        ``[N]`` float32 per-token losses; sum them and divide by the step's token count like the divergence.
        The gradient with respect to ``logprobs`` is ``-A * ratio``.
    """
    if logprobs.shape != advantages.shape:
        raise ValueError(f'logprobs {tuple(logprobs.shape)} and advantages {tuple(advantages.shape)} must have '
                         'the same shape (one advantage per sampled token)')
    logprobs = logprobs.float()
    old = logprobs.detach() if old_logprobs is None else old_logprobs.detach().float()
    ratio = torch.exp(logprobs - old)
    return -advantages.detach().float() * ratio


def sampled_token_stats(logits, tokens, temperature: float = 1.0):
    """TEMPORARY (the core engineer's version replaces it): log p_T(tokens) and entropy of softmax(logits / T)."""
    logp = torch.log_softmax(logits.float() / temperature, -1)
    entropy = -(logp.exp() * logp).sum(-1).detach()
    return logp.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1), entropy


def policy_gradient_loss(logprobs, advantages, old_logprobs=None):  # noqa: F811  TEMPORARY
    return -advantages.detach().float() * logprobs.float()
