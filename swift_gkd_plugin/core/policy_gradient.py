"""The policy-gradient term that can stand beside the divergence on on-policy steps, and its group advantages.

On an on-policy step the student samples ``G`` completions per prompt at temperature ``T``; a reward scores each
one. The advantage ``A`` of a completion is its reward minus the mean reward of its prompt's group (optionally
divided by a standard deviation), and the policy-gradient term of a sampled token ``y_i`` is the advantage-weighted
negative log-probability ``-A * log softmax(z_i / T)[y_i]`` (:func:`policy_gradient_loss`), summed over tokens and
divided by the divergence's normalizer. Its gradient ``-A * grad log p(y_i)`` is the REINFORCE estimator with a
group baseline (GRPO without clipping or a reference KL: the samples are fresh, one gradient step per generation
batch, so no importance ratio is needed).

:func:`sampled_token_stats` gives the log-probabilities and entropies of the sampled tokens from dense logits;
:func:`swift_gkd_plugin.core.fused_loss.fused_linear_jsd` computes the same term chunk by chunk from hidden states
(``labels`` = the sampled tokens, ``label_weights`` = the advantages, ``label_temperature`` = ``T``).
"""
from __future__ import annotations

from typing import Tuple

import torch

from .constants import IGNORE_INDEX, SCALE_REWARDS

__all__ = ['group_advantages', 'policy_gradient_loss', 'sampled_token_stats']


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
        eps: added to the standard deviation (a group of equal rewards has deviation 0).

    Returns:
        ``[N]`` advantages in the dtype of ``rewards`` (float32 at least). Constant, no gradient. A group whose
        rewards are all equal gets exactly 0 (its float mean can be one ulp off, which ``/ eps`` would magnify to
        ~6e-4); every other group gets ms-swift's GRPO advantages bit for bit.
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
    equal = (grouped == grouped[:, :1]).all(dim=1, keepdim=True)
    centred = (grouped - grouped.mean(dim=1, keepdim=True)).masked_fill(equal, 0.0).reshape(-1)
    if scale_rewards == 'none' or group_size == 1:
        return centred
    if scale_rewards == 'group':
        std = grouped.std(dim=1).repeat_interleave(group_size)
    else:
        std = rewards.std() if rewards.numel() > 1 else rewards.new_zeros(())
    return centred / (std + eps)


def policy_gradient_loss(logprobs: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """Per-token REINFORCE surrogate ``-A * log p(y)`` of sampled tokens: their advantage-weighted negative
    log-probabilities.

    Args:
        logprobs: ``[N]`` the student's log-probabilities of the sampled tokens (differentiable), at the
            temperature the tokens were sampled with (see :func:`sampled_token_stats`).
        advantages: ``[N]`` the advantage of each token's completion (constant; broadcast from its row).

    Returns:
        ``[N]`` per-token losses, float32 at least (float64 stays float64); sum them and divide by the step's
        token count like the divergence. The gradient with respect to ``logprobs`` is ``-A``.
    """
    if logprobs.shape != advantages.shape:
        raise ValueError(f'logprobs {tuple(logprobs.shape)} and advantages {tuple(advantages.shape)} must have '
                         'the same shape (one advantage per sampled token)')
    dtype = _at_least_float32(logprobs.dtype)
    return -advantages.detach().to(dtype) * logprobs.to(dtype)


def _at_least_float32(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def sampled_token_stats(logits: torch.Tensor, tokens: torch.Tensor,
                        temperature: float = 1.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of sampled tokens and the entropies of the distributions they were sampled from.

    The dense counterpart of the label term and ``entropy_sum`` of
    :func:`swift_gkd_plugin.core.fused_loss.fused_linear_jsd`.

    Args:
        logits: ``[..., V]`` the student's logits at the sampled positions.
        tokens: ``[...]`` the sampled token ids in ``[0, V)``; ``-100`` marks positions to ignore.
        temperature: ``T > 0`` (finite), the sampling temperature.

    Returns:
        ``(logprobs, entropy)``, both ``[...]``, float32 at least (float64 logits stay float64):
        ``log_softmax(logits / T)`` at ``tokens`` (differentiable; 0 where ignored) and the entropy of
        ``softmax(logits / T)`` (detached).
    """
    if not 0 < temperature < float('inf'):  # NaN too
        raise ValueError(f'temperature must be a finite number > 0, got {temperature}')
    if logits.shape[:-1] != tokens.shape:
        raise ValueError(f'tokens {tuple(tokens.shape)} must have the leading shape of logits '
                         f'{tuple(logits.shape)}')
    logp = torch.log_softmax(logits.to(_at_least_float32(logits.dtype)) / temperature, -1)
    keep = tokens != IGNORE_INDEX
    picked = logp.gather(-1, torch.where(keep, tokens, 0).long().unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():
        entropy = torch.special.entr(logp.exp()).sum(-1)
    return torch.where(keep, picked, 0.0), entropy
