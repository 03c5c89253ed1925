"""Group advantages and the policy-gradient term against float64 references written from the definitions."""
from fractions import Fraction

import pytest
import torch

from swift_gkd_plugin.core.policy_gradient import group_advantages, policy_gradient_loss, sampled_token_stats


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
