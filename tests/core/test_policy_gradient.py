"""Group advantages and the policy-gradient term against float64 references written from the definitions."""
import pytest
import torch

from swift_gkd_plugin.core.policy_gradient import group_advantages, policy_gradient_loss


def reference_advantages(rewards, group_size, scale, eps=1e-4):
    out = []
    all_rewards = [float(r) for r in rewards]
    mean_all = sum(all_rewards) / len(all_rewards)
    std_all = (sum((r - mean_all)**2 for r in all_rewards) / max(len(all_rewards) - 1, 1))**0.5
    for g in range(0, len(all_rewards), group_size):
        group = all_rewards[g:g + group_size]
        mean = sum(group) / len(group)
        std = (sum((r - mean)**2 for r in group) / max(len(group) - 1, 1))**0.5
        for r in group:
            if scale == 'none' or group_size == 1:
                out.append(r - mean)
            else:
                out.append((r - mean) / ((std if scale == 'group' else std_all) + eps))
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


def test_matches_ms_swift_grpo_advantages():
    """Same numbers as ms-swift's GRPO advantages for the scalings both have (one reward function, weight 1)."""
    from swift.rl_core.advantage import compute_advantages
    gen = torch.Generator().manual_seed(3)
    rewards = torch.randint(0, 3, (12, ), generator=gen).float()
    for scale in ['group', 'batch', 'none']:
        theirs, _ = compute_advantages(rewards[:, None], torch.ones(1), 4, scale_rewards=scale)
        torch.testing.assert_close(group_advantages(rewards, 4, scale), theirs)


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
    ref = -advantages.double() * logp64  # REINFORCE: same gradient, the ratio form only changes the value
    (ref_grad, ) = torch.autograd.grad((ref * weights.double()).sum(), logits64)
    torch.testing.assert_close(ours.double(), -advantages.double())  # ratio 1 for fresh samples
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-7)


def test_policy_gradient_with_old_logprobs_is_the_importance_ratio():
    logprobs = torch.tensor([-1.0, -2.0], requires_grad=True)
    old = torch.tensor([-1.5, -2.0])
    advantages = torch.tensor([2.0, -1.0])
    loss = policy_gradient_loss(logprobs, advantages, old)
    torch.testing.assert_close(loss, torch.tensor([-2.0 * torch.e**0.5, 1.0]))
    with pytest.raises(ValueError, match='same shape'):
        policy_gradient_loss(logprobs, advantages[:1])
