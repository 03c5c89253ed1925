"""The policy-gradient term that can stand beside the divergence on on-policy steps, and its group advantages.

On an on-policy step the student samples ``G`` completions per prompt at temperature ``T``; a reward scores each
one. The advantage ``A`` of a completion is its reward minus the mean reward of its prompt's group (optionally
divided by a standard deviation), and the policy-gradient term of a sampled token ``y_i`` is the advantage-weighted
negative log-probability ``-A * log softmax(z_i / T)[y_i]`` (:func:`policy_gradient_loss`), summed over tokens and
divided by the divergence's normalizer. Its gradient ``-A * grad log p(y_i)`` is the REINFORCE estimator with a
group baseline (GRPO without PPO clipping or a reference KL: one gradient step per generation batch, so the policy
that sampled is the policy being trained).

Up to the sampler: vLLM's bf16 kernels and top-k/top-p truncation (or any other engine) sample from ``mu``, not
exactly from the trained ``pi``. :func:`rollout_importance_weights` turns the sampler's per-token log-probabilities
into truncated importance weights ``min(pi / mu, C)`` (ms-swift GRPO's ``--rollout_importance_sampling_mode``),
constants that multiply the advantages, and the mismatch statistics that are logged.

:func:`sampled_token_stats` gives the log-probabilities and entropies of the sampled tokens from dense logits;
:func:`swift_gkd_plugin.core.fused.loss.fused_linear_jsd` computes the same term chunk by chunk from hidden states
(``labels`` = the sampled tokens, ``label_weights`` = the advantages, ``label_temperature`` = ``T``).
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch

from swift_gkd_plugin.core.constants import IGNORE_INDEX, ROLLOUT_IS_MODES, SCALE_REWARDS
from swift_gkd_plugin.core.entropy import entropy_terms_

__all__ = ['RolloutCorrection', 'group_advantages', 'head_token_logprobs', 'policy_gradient_loss', 'token_logprobs',
           'rollout_importance_weights', 'sampled_token_stats']


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



#: float32 bytes of one ``[rows, V]`` buffer of :func:`sampled_token_stats` (a chunk holds two: its own and
#: logsumexp's): 32 MiB, 262 rows at V = 32k, 55 at V = 152k.
_CHUNK_BYTES = 2**25


def _chunk_rows(vocab: int, chunk_rows: Optional[int]) -> int:
    return int(chunk_rows) if chunk_rows else max(1, _CHUNK_BYTES // (4 * max(vocab, 1)))


def _check_temperature(name: str, value: float) -> None:
    if not 0 < value < float('inf'):  # NaN too
        raise ValueError(f'{name} must be a finite number > 0, got {value}')


def sampled_token_stats(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0, *,
                        entropy_temperature: Optional[float] = None,
                        chunk_rows: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of sampled tokens and the entropies of the student's distributions there.

    The dense counterpart of the label term and ``entropy_sum`` of
    :func:`swift_gkd_plugin.core.fused.loss.fused_linear_jsd`. Chunked over rows: float32 temporaries of at most
    ``chunk_rows x V`` (never a full-vocabulary float32 ``[N, V]`` copy: the entropy metric of every on-policy step
    would cost one); the log-probabilities carry a gradient only when grad mode is on and
    ``logits`` require it, and their backward also works chunk by chunk into ``logits``' own gradient.

    Args:
        logits: ``[..., V]`` the student's logits at the sampled positions.
        tokens: ``[...]`` the sampled token ids in ``[0, V)``; ``-100`` marks positions to ignore.
        temperature: ``T > 0`` (finite), the temperature of the log-probabilities (the sampling temperature).
        entropy_temperature: the temperature of the entropy (default ``temperature``).
        chunk_rows: rows per chunk (default: 32 MiB of float32 per buffer).

    Returns:
        ``(logprobs, entropy)``, both ``[...]``, float32 at least (float64 logits stay float64):
        ``log_softmax(logits / T)`` at ``tokens`` (0 where ignored; its gradient is ``(onehot - softmax) / T``) and
        the entropy of ``softmax(logits / entropy_temperature)`` (detached).
    """
    _check_temperature('temperature', temperature)
    entropy_temperature = temperature if entropy_temperature is None else entropy_temperature
    _check_temperature('entropy_temperature', entropy_temperature)
    if logits.shape[:-1] != tokens.shape:
        raise ValueError(f'tokens {tuple(tokens.shape)} must have the leading shape of logits '
                         f'{tuple(logits.shape)}')
    z, y = logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1)
    rows = _chunk_rows(z.shape[-1], chunk_rows)
    if torch.is_grad_enabled() and z.requires_grad:
        logp, entropy = _SampledLogprobs.apply(z, y, float(temperature), float(entropy_temperature), rows)
    else:
        with torch.no_grad():
            logp, entropy, _ = _sampled_chunks(z, y, temperature, entropy_temperature, rows)
    return logp.view(tokens.shape), entropy.view(tokens.shape)


@torch.no_grad()
def head_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                        tokens: torch.Tensor, temperature: float, chunk_rows: Optional[int] = None) -> torch.Tensor:
    """``log_softmax((hidden @ weight.T + bias) / T)[tokens]`` from hidden states ``[N, H]`` and a head ``[V, H]``,
    chunk by chunk and without gradient: the fused loss's detached view of its own sampled tokens' log-probabilities
    (what :func:`rollout_importance_weights` compares with the sampler's). ``[N]`` float32, 0 where ``-100``."""
    _check_temperature('temperature', temperature)
    hidden, tokens = hidden.reshape(-1, hidden.shape[-1]), tokens.reshape(-1)
    rows = _chunk_rows(weight.shape[0], chunk_rows)
    out = torch.zeros(hidden.shape[0], dtype=_at_least_float32(weight.dtype), device=hidden.device)
    for start in range(0, hidden.shape[0], rows):
        logits = hidden[start:start + rows].to(weight.dtype) @ weight.t()
        if bias is not None:
            logits = logits + bias
        out[start:start + rows] = token_logprobs(logits, tokens[start:start + rows], temperature, rows)
    return out


@torch.no_grad()
def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0,
                   chunk_rows: Optional[int] = None) -> torch.Tensor:
    """``log_softmax(logits / T)[tokens]`` of ``[N, V]`` logits and ``[N]`` ids, without gradient or entropy (the
    cheap half of :func:`sampled_token_stats`); ``[N]`` float32 at least, 0 where ``-100``. Row by row the same
    bits whatever the chunking (:func:`head_token_logprobs` calls it on each chunk of its own logits)."""
    _check_temperature('temperature', temperature)
    return _sampled_chunks(logits, tokens, temperature, None, _chunk_rows(logits.shape[-1], chunk_rows))[0]


def _sampled_chunks(z: torch.Tensor, y: torch.Tensor, temperature: float, entropy_temperature: Optional[float],
                    rows: int):
    """The chunk loop of :func:`sampled_token_stats`: ``(logprobs, entropy, logsumexp of z / T)``; no entropy
    (zeros) when ``entropy_temperature`` is None."""
    dtype = _at_least_float32(z.dtype)
    n = z.shape[0]
    keep = y != IGNORE_INDEX
    safe = torch.where(keep, y, 0).long().unsqueeze(1)
    logp = torch.zeros(n, dtype=dtype, device=z.device)
    entropy = torch.zeros(n, dtype=dtype, device=z.device)
    lse = torch.zeros(n, dtype=dtype, device=z.device)
    for start in range(0, n, rows):
        sl = slice(start, min(start + rows, n))
        u = z[sl].to(dtype, copy=True).div_(temperature)
        lse[sl] = torch.logsumexp(u, -1)
        logp[sl] = u.gather(1, safe[sl]).squeeze(1) - lse[sl]
        if entropy_temperature is None:
            continue
        if entropy_temperature != temperature:
            entropy[sl] = entropy_terms_(u.copy_(z[sl]).div_(entropy_temperature))
        else:
            entropy[sl] = entropy_terms_(u, lse[sl])
    return torch.where(keep, logp, 0.0), entropy, lse


class _SampledLogprobs(torch.autograd.Function):
    """Chunked ``log_softmax(z / T)[y]`` with its entropy beside it; backward rebuilds ``softmax(z / T)`` chunk by
    chunk from the saved ``logsumexp`` instead of keeping a ``[N, V]`` float32 ``log_softmax`` alive."""

    @staticmethod
    def forward(ctx, z, y, temperature, entropy_temperature, rows):
        logp, entropy, lse = _sampled_chunks(z, y, temperature, entropy_temperature, rows)
        ctx.save_for_backward(z, y, lse)
        ctx.temperature, ctx.rows = temperature, rows
        ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, _grad_entropy):
        z, y, lse = ctx.saved_tensors
        temperature, rows = ctx.temperature, ctx.rows
        keep = y != IGNORE_INDEX
        safe = torch.where(keep, y, 0).long().unsqueeze(1)
        g = torch.where(keep, grad_logp.to(lse.dtype), 0.0) / temperature  # d logp / d z = (onehot - p) / T
        grad = torch.empty_like(z)
        for start in range(0, z.shape[0], rows):
            sl = slice(start, min(start + rows, z.shape[0]))
            p = z[sl].to(lse.dtype, copy=True).div_(temperature).sub_(lse[sl].unsqueeze(1)).exp_()
            p.mul_(-g[sl].unsqueeze(1)).scatter_add_(1, safe[sl], g[sl].unsqueeze(1))
            grad[sl] = p
        return grad, None, None, None, None


class RolloutCorrection(NamedTuple):
    """What :func:`rollout_importance_weights` gives: the weights and the sums its metrics are made of."""
    weights: torch.Tensor  # [N] constant importance weights of the policy-gradient term (1: no correction)
    #: float64 sums over the tokens that have a sampler log-probability: [count, sum |r|, sum (e^r - r - 1),
    #: sum of weights, tokens truncated or masked]; r = log pi(y) - log mu(y)
    stats: torch.Tensor


#: ms-swift's GRPO clamps the log ratio to this bound before exp() (e^20 is already extreme)
_LOG_RATIO_BOUND = 20.0


def rollout_importance_weights(policy_logprobs: torch.Tensor, sampler_logprobs: torch.Tensor, mode: Optional[str],
                               threshold: float, rows: Optional[torch.Tensor] = None,
                               num_rows: int = 0) -> RolloutCorrection:
    """Truncated importance weights that correct the policy-gradient term for the gap between the sampler ``mu``
    (vLLM's bf16 kernels and top-k/top-p truncation, another engine) and the trained policy ``pi``.

    With ``r_i = log pi(y_i) - log mu(y_i)`` (clamped to +-20 as ms-swift's GRPO does) and ``C = threshold``
    (the names and formulas of ms-swift's GRPO ``--rollout_importance_sampling_mode``):

    * ``token_truncate``: ``w_i = min(e^{r_i}, C)``; ``token_mask``: ``w_i = e^{r_i}`` if ``e^{r_i} <= C`` else 0;
    * ``sequence_truncate``: ``w_i = min(rho_s, C)`` for every token of sequence ``s``, ``rho_s = exp(mean_{i in s}
      r_i)`` (the geometric mean of its token ratios); ``sequence_mask``: ``w_i = e^{r_i}`` if ``rho_s <= C`` else 0;
    * ``None``: ``w = 1`` (no correction; the statistics are still computed, to log the mismatch).

    A token whose sampler log-probability is NaN (the sampler returned none, or did not sample it: a template token
    after the response) gets ``w = 1`` and is left out of the statistics and of its sequence's ratio.

    Args:
        policy_logprobs: ``[N]`` ``log pi(y_i)`` at the sampling temperature; detached here (the weight is a
            constant: no gradient flows through it).
        sampler_logprobs: ``[N]`` ``log mu(y_i)`` as the sampler reported them, NaN where it has none.
        mode: one of :data:`~swift_gkd_plugin.core.constants.ROLLOUT_IS_MODES` or None.
        threshold: ``C >= 1`` (finite): a matched token (``r = 0``) keeps its weight 1.
        rows, num_rows: the sequence (``[N]`` ids in ``[0, num_rows)``) of each token; the sequence modes need them.

    Returns:
        :class:`RolloutCorrection`: ``weights`` ``[N]`` float32, ``stats`` (float64 sums, see its fields).
    """
    if mode is not None and mode not in ROLLOUT_IS_MODES:
        raise ValueError(f'mode must be one of {list(ROLLOUT_IS_MODES)} or None, got {mode!r}')
    if not 1 <= threshold < float('inf'):
        raise ValueError(f'threshold must be a finite number >= 1, got {threshold}')
    if policy_logprobs.shape != sampler_logprobs.shape or policy_logprobs.dim() != 1:
        raise ValueError(f'policy_logprobs {tuple(policy_logprobs.shape)} and sampler_logprobs '
                         f'{tuple(sampler_logprobs.shape)} must be the same 1-D shape')
    sequence = mode is not None and mode.startswith('sequence')
    if sequence and (rows is None or rows.shape != policy_logprobs.shape):
        raise ValueError(f'mode {mode!r} needs rows: the sequence of each token, shape {tuple(policy_logprobs.shape)}')
    dtype = torch.promote_types(policy_logprobs.dtype, torch.float32)
    has = ~torch.isnan(sampler_logprobs)
    r = torch.where(has, policy_logprobs.detach().to(dtype) - sampler_logprobs.to(dtype), 0.0)
    r = r.clamp(-_LOG_RATIO_BOUND, _LOG_RATIO_BOUND)
    ratio = r.exp()
    one = torch.ones_like(ratio)
    if mode is None:
        weights, cut = one, torch.zeros_like(has)
    elif not sequence:
        cut = has & (ratio > threshold)
        weights = ratio.clamp(max=threshold) if mode == 'token_truncate' else ratio.masked_fill(cut, 0.0)
        weights = torch.where(has, weights, one)
    else:
        count = torch.zeros(num_rows, dtype=dtype, device=r.device).index_add_(0, rows, has.to(dtype))
        seq_r = torch.zeros(num_rows, dtype=dtype, device=r.device).index_add_(0, rows, r) / count.clamp(min=1)
        seq_ratio = seq_r.exp()[rows]
        cut = has & (seq_ratio > threshold)
        weights = seq_ratio.clamp(max=threshold) if mode == 'sequence_truncate' else ratio.masked_fill(cut, 0.0)
        weights = torch.where(has, weights, one)
    h = has.double()
    r64 = r.double()
    stats = torch.stack([h.sum(), (r64.abs() * h).sum(), ((r64.exp() - r64 - 1) * h).sum(),
                         (weights.double() * h).sum(), cut.double().sum()])
    return RolloutCorrection(weights.float() if dtype == torch.float32 else weights, stats)
