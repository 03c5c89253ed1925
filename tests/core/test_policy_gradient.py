"""Group advantages and the policy-gradient term against float64 references written from the definitions."""
import math
from fractions import Fraction

import pytest
import torch

from swift_gkd_plugin.core.policy_gradient import (group_advantages, head_token_logprobs, policy_gradient_loss,
                                                   rollout_importance_weights, sampled_token_stats, token_logprobs)


def reference_advantages(rewards, group_size, scale, eps=1e-4):
    """From the definition, with exact (rational) means: an all-equal group is centred to exactly 0."""
    out = []
    all_rewards = [Fraction(float(r)) for r in rewards]
    mean_all = sum(all_rewards) / len(all_rewards)
    std_all = float(sum((r - mean_all)**2 for r in all_rewards) / max(len(all_rewards) - 1, 1))**0.5
    for g in range(0, len(all_rewards), group_size):
        group = all_rewards[g:g + group_size]
        mean = sum(group) / len(group)
        std = float(sum((r - mean)**2 for r in group) / max(len(group) - 1, 1))**0.5
        for r in group:
            if scale == 'none' or group_size == 1:
                out.append(float(r - mean))
            else:
                out.append(float(r - mean) / ((std if scale == 'group' else std_all) + eps))
    return torch.tensor(out, dtype=torch.float64)


def test_hand_made_groups():
    rewards = torch.tensor([1., 0., 0., 1., 1., 1., 0., 0.])  # prompts of 4: mixed, then all 1 / all 0 halves
    centred = group_advantages(rewards, 4, 'none')
    torch.testing.assert_close(centred, torch.tensor([.5, -.5, -.5, .5, .5, .5, -.5, -.5]))
    scaled = group_advantages(rewards, 2, 'group')
    # groups [1,0] [0,1] [1,1] [0,0]: std of a split pair is 1/sqrt(2); equal pairs give exactly 0
    s = 0.5 / (2**-0.5 + 1e-4)
    torch.testing.assert_close(scaled, torch.tensor([s, -s, -s, s, 0., 0., 0., 0.]))
    assert (group_advantages(rewards, 1, 'group') == 0).all()  # one sample per prompt: no baseline, no signal


@pytest.mark.parametrize('scale', ['group', 'batch', 'none'])
@pytest.mark.parametrize('group_size', [1, 2, 4, 8])
def test_random_rewards_match_reference(scale, group_size):
    gen = torch.Generator().manual_seed(group_size)
    rewards = torch.randn(16, generator=gen, dtype=torch.float64) * 3
    ours = group_advantages(rewards, group_size, scale)
    torch.testing.assert_close(ours, reference_advantages(rewards, group_size, scale), rtol=1e-12, atol=1e-12)
    if scale != 'none':
        assert group_advantages(rewards.float(), group_size, scale).dtype == torch.float32


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize('scale', ['group', 'batch', 'none'])
def test_a_group_of_equal_rewards_gets_exactly_zero(scale, dtype):
    """All-equal groups: A = 0 exactly (a float mean one ulp off, divided by eps = 1e-4, gave 5.96e-4 each); the
    other groups of the same batch match the float64 reference."""
    assert (group_advantages(torch.full((3, ), 0.9, dtype=dtype), 3, scale) == 0).all()
    gen = torch.Generator().manual_seed(7)
    rewards = torch.cat([torch.full((4, ), 0.9), torch.rand(4, generator=gen), torch.full((4, ), 1 / 3),
                         torch.full((4, ), -7.1)]).to(dtype)
    ours = group_advantages(rewards, 4, scale)
    ref = reference_advantages(rewards, 4, scale)
    assert (ours[:4] == 0).all() and (ours[8:] == 0).all()
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(ours.double(), ref, rtol=tol, atol=tol)


def test_matches_ms_swift_grpo_advantages():
    """Same numbers as ms-swift's GRPO advantages for the scalings both have (one reward function, weight 1)."""
    from swift.rl_core.advantage import compute_advantages
    gen = torch.Generator().manual_seed(3)
    rewards = torch.randint(0, 3, (12, ), generator=gen).float()
    for scale in ['group', 'batch', 'none']:
        theirs, _ = compute_advantages(rewards[:, None], torch.ones(1), 4, scale_rewards=scale)
        assert torch.equal(group_advantages(rewards, 4, scale), theirs)
    # the one difference, on purpose: an all-equal group is exactly 0 here, ms-swift's float mean leaves ~6e-4
    equal = torch.full((3, ), 0.9)
    theirs, _ = compute_advantages(equal[:, None], torch.ones(1), 3, scale_rewards='group')
    assert (theirs != 0).all() and (group_advantages(equal, 3, 'group') == 0).all()


@pytest.mark.parametrize('bad, message', [
    (dict(group_size=0), 'group_size'),
    (dict(group_size=3), 'divisible'),
    (dict(scale_rewards='gdpo'), 'scale_rewards'),
])
def test_bad_arguments(bad, message):
    kwargs = {**dict(rewards=torch.zeros(4), group_size=2, scale_rewards='group'), **bad}
    with pytest.raises(ValueError, match=message):
        group_advantages(**kwargs)
    with pytest.raises(ValueError, match='finite'):
        group_advantages(torch.tensor([0., float('nan')]), 2)


def test_policy_gradient_value_and_gradient_against_float64():
    """The REINFORCE surrogate: value -A log p(y) (advantage-weighted NLL), gradient -A grad log p(y)."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(10, 17, generator=gen, requires_grad=True)
    tokens = torch.randint(0, 17, (10, ), generator=gen)
    advantages = torch.randn(10, generator=gen)
    weights = torch.rand(10, generator=gen)
    logprobs = torch.log_softmax(logits, -1).gather(-1, tokens[:, None])[:, 0]
    ours = policy_gradient_loss(logprobs, advantages)
    (grad, ) = torch.autograd.grad((ours * weights).sum(), logits)

    logits64 = logits.detach().double().requires_grad_()
    logp64 = torch.log_softmax(logits64, -1).gather(-1, tokens[:, None])[:, 0]
    ref = -advantages.double() * logp64
    (ref_grad, ) = torch.autograd.grad((ref * weights.double()).sum(), logits64)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), ref.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match='same shape'):
        policy_gradient_loss(logprobs, advantages[:1])


def reference_token_stats(logits, tokens, temperature):
    """float64, from the definitions: log p(y) and -sum p log p of softmax(logits / T), row by row."""
    logprobs, entropies = [], []
    for row, y in zip(logits.double().unbind(0), tokens.tolist()):
        p = torch.softmax(row / temperature, -1)
        logprobs.append(torch.log(p[y]) if y != -100 else row.sum() * 0)
        entropies.append(-(p * p.log()).sum())
    return torch.stack(logprobs), torch.stack(entropies)


@pytest.mark.parametrize('temperature', [0.7, 1.0, 1.5])
def test_sampled_token_stats_against_float64(temperature):
    gen = torch.Generator().manual_seed(int(temperature * 10))
    logits = (torch.randn(2, 6, 23, generator=gen) * 3).requires_grad_()
    tokens = torch.randint(0, 23, (2, 6), generator=gen)
    tokens[0, :2] = -100  # ignored positions: log-probability 0, no gradient
    logprobs, entropy = sampled_token_stats(logits, tokens, temperature)
    assert logprobs.shape == entropy.shape == (2, 6) and logprobs.dtype == entropy.dtype == torch.float32
    assert logprobs.requires_grad and not entropy.requires_grad
    upstream = torch.randn(2, 6, generator=gen)
    (grad, ) = torch.autograd.grad((logprobs * upstream).sum(), logits)

    logits64 = logits.detach().double().requires_grad_()
    ref_logprobs, ref_entropy = reference_token_stats(logits64.view(12, 23), tokens.view(12), temperature)
    (ref_grad, ) = torch.autograd.grad((ref_logprobs * upstream.double().view(12)).sum(), logits64)
    torch.testing.assert_close(logprobs.double().view(12), ref_logprobs.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(entropy.double().view(12), ref_entropy.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-7)
    assert float(grad[0, :2].abs().max()) == 0.0


@pytest.mark.parametrize('temperature', [0.0, -1.0, float('inf'), float('nan')])
def test_sampled_token_stats_refuses_bad_temperature(temperature):
    with pytest.raises(ValueError, match='temperature'):
        sampled_token_stats(torch.zeros(2, 5), torch.zeros(2, dtype=torch.long), temperature)


def test_sampled_token_stats_refuses_mismatched_tokens():
    with pytest.raises(ValueError, match='tokens'):
        sampled_token_stats(torch.zeros(2, 5), torch.zeros(3, dtype=torch.long))


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize('chunk_rows', [1, 5, 64])
def test_chunked_sampled_token_stats_against_float64(chunk_rows, dtype):
    """Chunks of 1, 5 (not dividing 12) and more rows than there are: the values, the entropy at another temperature
    and the gradient into bf16/float32/float64 logits match the unchunked float64 definition."""
    gen = torch.Generator().manual_seed(chunk_rows)
    logits = (torch.randn(3, 4, 29, generator=gen) * 3).to(dtype).requires_grad_()
    tokens = torch.randint(0, 29, (3, 4), generator=gen)
    tokens[1, 1:3] = -100
    logprobs, entropy = sampled_token_stats(logits, tokens, 0.7, entropy_temperature=1.3, chunk_rows=chunk_rows)
    upstream = torch.randn(3, 4, generator=gen)
    (grad, ) = torch.autograd.grad((logprobs * upstream).sum(), logits)
    assert grad.dtype == dtype and not entropy.requires_grad

    logits64 = logits.detach().double().requires_grad_()
    ref_logprobs, _ = reference_token_stats(logits64.view(12, 29), tokens.view(12), 0.7)
    _, ref_entropy = reference_token_stats(logits64.detach().view(12, 29), tokens.view(12), 1.3)
    (ref_grad, ) = torch.autograd.grad((ref_logprobs * upstream.double().view(12)).sum(), logits64)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(logprobs.double().view(12), ref_logprobs.detach(), rtol=tol, atol=tol)
    torch.testing.assert_close(entropy.double().view(12), ref_entropy, rtol=tol, atol=tol)
    gtol = 1e-12 if dtype == torch.float64 else (1e-2 if dtype == torch.bfloat16 else 1e-5)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=gtol, atol=gtol)
    assert float(grad[1, 1:3].abs().max()) == 0.0


def test_sampled_token_stats_without_grad_builds_no_graph():
    logits = torch.randn(6, 11, requires_grad=True)
    with torch.no_grad():
        logprobs, _ = sampled_token_stats(logits, torch.zeros(6, dtype=torch.long), 1.0, chunk_rows=2)
    assert not logprobs.requires_grad


_PEAK_SCRIPT = """
import resource, sys
import torch
from swift_gkd_plugin.core.policy_gradient import sampled_token_stats
torch.set_num_threads(1)  # one allocator arena: the peak is the tensors', not per-thread caches
grad, n, v = sys.argv[1] == 'grad', 2048, 32000
logits = torch.randn(n, v).requires_grad_(grad)
tokens = torch.randint(0, v, (n, ))
rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
base = rss()
with torch.set_grad_enabled(grad):
    logprobs, entropy = sampled_token_stats(logits, tokens, 0.9)
forward = rss() - base
if grad:
    torch.autograd.grad(logprobs.sum(), logits)
print(forward / (n * v * 4), (rss() - base) / (n * v * 4))
"""


@pytest.mark.parametrize('grad', ['nograd', 'grad'])
def test_sampled_token_stats_peak_memory_is_chunked(grad):
    """Peak resident memory above the inputs at N = 2048, V = 32k, in units of one [N, V] float32 tensor (250 MiB):
    the unchunked definition peaked at 3.05 with or without grad (the entropy metric alone); chunked, the forward
    stays under half of one, and forward + backward under 1.5 (the gradient of the logits itself is 1)."""
    import os
    import subprocess
    import sys
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_='1048576')  # large blocks mapped and unmapped: RSS tracks tensors
    out = subprocess.run([sys.executable, '-c', _PEAK_SCRIPT, grad], capture_output=True, text=True, check=True,
                         env=env)
    forward, total = map(float, out.stdout.split())  # measured: 0.31 and 1.19
    assert forward < 0.5 and total < 1.5, out.stdout


def test_head_token_logprobs_equals_the_dense_definition():
    gen = torch.Generator().manual_seed(5)
    hidden, weight, bias = torch.randn(9, 6, generator=gen), torch.randn(13, 6, generator=gen), torch.randn(13)
    tokens = torch.randint(0, 13, (9, ), generator=gen)
    tokens[4] = -100
    ours = head_token_logprobs(hidden, weight, bias, tokens, 0.6, chunk_rows=4)
    ref, _ = reference_token_stats((hidden.double() @ weight.double().t() + bias.double()), tokens, 0.6)
    torch.testing.assert_close(ours.double(), ref, rtol=1e-6, atol=1e-6)


def test_token_logprobs_equals_the_definition_and_keeps_each_rows_bits_whatever_the_chunking():
    """token_logprobs (issue 90: the score loop's next-token log-probs from the top-k's own logits): float64 from the
    definition, 0 where -100, and the same bits for a row whether its chunk holds 1, 3 or all rows."""
    gen = torch.Generator().manual_seed(6)
    logits, tokens = torch.randn(7, 11, generator=gen) * 4, torch.randint(0, 11, (7, ), generator=gen)
    tokens[2] = -100
    ref, _ = reference_token_stats(logits.double(), tokens, 1.3)
    torch.testing.assert_close(token_logprobs(logits.double(), tokens, 1.3), ref, rtol=1e-12, atol=1e-12)
    whole = token_logprobs(logits, tokens, 1.3)
    assert whole[2] == 0 and whole.dtype == torch.float32
    for rows in (1, 3):
        assert torch.equal(token_logprobs(logits, tokens, 1.3, chunk_rows=rows), whole)
    with pytest.raises(ValueError, match='temperature'):
        token_logprobs(logits, tokens, 0.0)


def reference_rollout_weights(policy, sampler, mode, threshold, rows):
    """float64, token by token from the definition (ms-swift GRPO's four modes)."""
    out = []
    for i, (lp, ls) in enumerate(zip(policy.tolist(), sampler.tolist())):
        if ls != ls:  # NaN: no sampler log-prob
            out.append(1.0)
            continue
        ratio = math.exp(max(-20.0, min(20.0, lp - ls)))
        if mode is None:
            out.append(1.0)
        elif mode == 'token_truncate':
            out.append(min(ratio, threshold))
        elif mode == 'token_mask':
            out.append(ratio if ratio <= threshold else 0.0)
        else:
            mine = [max(-20.0, min(20.0, a - b)) for a, b, r in zip(policy.tolist(), sampler.tolist(), rows.tolist())
                    if r == rows[i] and b == b]
            seq = math.exp(sum(mine) / len(mine))
            out.append(min(seq, threshold) if mode == 'sequence_truncate' else (ratio if seq <= threshold else 0.0))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize('mode', [None, 'token_truncate', 'token_mask', 'sequence_truncate', 'sequence_mask'])
def test_rollout_importance_weights_against_float64(mode):
    gen = torch.Generator().manual_seed(11)
    n = 40
    policy = (torch.randn(n, generator=gen, dtype=torch.float64) - 2).requires_grad_()
    sampler = policy.detach() + torch.randn(n, generator=gen, dtype=torch.float64) * 0.8
    sampler[[3, 17]] = float('nan')  # tokens the sampler did not report
    sampler[5] = policy[5].detach() - 30  # a ratio beyond the clamp
    rows = torch.arange(n) // 8
    corr = rollout_importance_weights(policy, sampler, mode, 1.5, rows=rows, num_rows=5)
    ref = reference_rollout_weights(policy.detach(), sampler, mode, 1.5, rows)
    torch.testing.assert_close(corr.weights.double(), ref, rtol=1e-12, atol=1e-12)
    if mode is not None:
        assert bool((corr.weights != 1).any())  # the data exercise the mode
    # the weight is a constant: the policy-gradient term's gradient is -A w grad log pi, nothing through w
    advantages = torch.randn(n, generator=gen, dtype=torch.float64)
    (grad, ) = torch.autograd.grad(policy_gradient_loss(policy, advantages * corr.weights).sum(), policy)
    torch.testing.assert_close(grad, -advantages * ref)
    has = ~torch.isnan(sampler)
    r = (policy.detach() - sampler)[has].clamp(-20, 20)
    torch.testing.assert_close(corr.stats[:4], torch.stack([has.sum().double(), r.abs().sum(),
                                                             (r.exp() - r - 1).sum(), ref[has].sum()]))
    if mode in ('token_truncate', 'token_mask'):
        assert int(corr.stats[4]) == int((r.exp() > 1.5).sum())
    elif mode is None:
        assert int(corr.stats[4]) == 0


def test_rollout_importance_weights_of_a_matched_sampler_are_one():
    policy = torch.randn(10) - 1
    corr = rollout_importance_weights(policy, policy.clone(), 'token_truncate', 2.0)
    assert torch.equal(corr.weights, torch.ones(10)) and float(corr.stats[1]) == 0 and float(corr.stats[2]) == 0


@pytest.mark.parametrize('bad, message', [
    (dict(mode='tis'), 'mode'),
    (dict(threshold=0.5), 'threshold'),
    (dict(threshold=float('nan')), 'threshold'),
    (dict(mode='sequence_mask'), 'rows'),
])
def test_rollout_importance_weights_refuses_bad_arguments(bad, message):
    kwargs = {**dict(mode='token_truncate', threshold=2.0), **bad}
    with pytest.raises(ValueError, match=message):
        rollout_importance_weights(torch.zeros(3), torch.zeros(3), **kwargs)
