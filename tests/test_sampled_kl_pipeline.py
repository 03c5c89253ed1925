"""The sampled-token distillation term (``--gkd_sampled_kl_coef``, issue 46) in real ``swift rlhf`` runs: on-policy
steps where each sampled token's advantage is the teacher's log-probability of it minus the student's
(:mod:`swift_gkd_plugin.core.sampled_kl`, float64-tested there), trained as a policy gradient beside the divergence.

At learning rate 0 every run draws the same samples (one completion per prompt, the trainer's stream of ``--seed``),
so the runs differ only in how the loss is computed: the dense loss (full logits) and the fused one (hidden states and
heads) must agree, and the discount must change the term but not the reverse-KL estimate it logs."""
import pytest
from conftest import base_args, run_swift

SAMPLED = dict(lmbda=1, gkd_sampled_kl_coef=1, learning_rate=0, max_steps=2, seed=3, temperature=1.0)
ALONE = dict(gkd_sampled_kl_coef=0.5)  # the term alone at an ordinary weight: a path that drops it shows


@pytest.fixture(scope='module')
def runs(tiny_ws, shared_runs):
    def run(out, **flags):
        return run_swift(base_args(tiny_ws, out, **dict(SAMPLED, **flags)))
    return shared_runs('sampled_kl', {
        'dense': lambda out: run(out, gkd_loss_impl='dense'),
        'fused': lambda out: run(out, gkd_loss_impl='fused'),
        'fused_discount1': lambda out: run(out, gkd_loss_impl='fused', gkd_sampled_kl_discount=1),
        'off': lambda out: run(out, gkd_loss_impl='fused', gkd_sampled_kl_coef=0),
        'weighted': lambda out: run(out, gkd_loss_impl='fused', rollout_importance_sampling_mode='token_truncate'),
        'alone_fused': lambda out: run(out, gkd_loss_impl='fused', gkd_divergence_coef=0, **ALONE),
        'alone_dense': lambda out: run(out, gkd_loss_impl='dense', gkd_divergence_coef=0, **ALONE),
        'alone_baseline': lambda out: run(out, gkd_loss_impl='fused', gkd_divergence_coef=0,
                                          gkd_sampled_kl_baseline='batch', **ALONE),
    })


def test_sampled_term_trains_on_policy_and_logs_the_reverse_kl_estimate(runs):
    for name in ('dense', 'fused', 'fused_discount1'):
        run = runs[name]
        assert run.returncode == 0, run.output[-4000:]
        assert [m['mode'] for m in run.modes()] == ['on_policy'] * 2
        assert len(run.logs) == 2 and all('gkd/sampled_kl' in row for row in run.logs), run.logs
        # a random tiny student and a different teacher: the estimate of KL(student || teacher) is positive
        assert all(row['gkd/sampled_kl'] > 0 for row in run.logs), run.logs
    assert all('gkd/sampled_kl' not in row for row in runs['off'].logs)


def test_dense_and_fused_losses_agree(runs):
    """The two paths read the teacher's and the student's log-probabilities of the sampled tokens from different
    places (full logits; hidden states through the heads): the same samples give the same loss and estimate."""
    for a, b in zip(runs['dense'].logs, runs['fused'].logs):
        for key in ('loss', 'gkd/distill_loss', 'gkd/sampled_kl'):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key


def test_the_term_adds_to_the_divergence_and_the_discount_changes_only_the_term(runs):
    """Same samples: the divergence and the estimate are the run without the term's; the loss is not (the term's
    surrogate -sum A log p / N is added); discount 1 sums each token's later log-ratios into its advantage, which
    changes the surrogate but not the per-token estimate."""
    off, on, discounted = runs['off'].logs, runs['fused'].logs, runs['fused_discount1'].logs
    for a, b, c in zip(off, on, discounted):
        assert a['gkd/distill_loss'] == pytest.approx(b['gkd/distill_loss'], rel=1e-5)
        assert b['loss'] != pytest.approx(a['loss'], rel=1e-3)
        assert b['gkd/sampled_kl'] == pytest.approx(c['gkd/sampled_kl'], rel=1e-5)
        assert c['loss'] != pytest.approx(b['loss'], rel=1e-3)


def test_rollout_importance_weights_reach_the_sampled_term(runs):
    """--rollout_importance_sampling_mode with the sampled-token term alone (no reward term): the sampler's
    log-probabilities are asked for and compared with the trainer's (the transformers engine samples from the trained
    weights: the weights are 1), and the loss is the unweighted run's."""
    run = runs['weighted']
    assert run.returncode == 0, run.output[-4000:]
    for a, b in zip(run.logs, runs['fused'].logs):
        assert a['gkd/rollout_is_weight'] == pytest.approx(1.0, abs=1e-4)
        assert a['gkd/rollout_logprob_diff'] < 1e-4
        assert a['loss'] == pytest.approx(b['loss'], rel=1e-4)


@pytest.mark.parametrize('impl', ['fused', 'dense'])
def test_the_term_alone_with_the_divergence_weight_0(runs, impl):
    """--gkd_divergence_coef 0 and --gkd_sampled_kl_coef 0.5: the divergence is logged but not trained on; the loss
    is the sampled-token term alone at half its weight: half the with-divergence run's (weight 1) loss minus its
    divergence (same samples)."""
    alone, both = runs[f'alone_{impl}'], runs[impl]
    assert alone.returncode == 0, alone.output[-4000:]
    for a, b in zip(alone.logs, both.logs):
        assert a['gkd/distill_loss'] == pytest.approx(b['gkd/distill_loss'], rel=1e-5)
        assert abs(b['loss'] - b['gkd/distill_loss']) > 1e-3, b  # a term whose weight shows
        assert a['loss'] == pytest.approx(0.5 * (b['loss'] - b['gkd/distill_loss']), rel=1e-3, abs=1e-5)
        assert a['gkd/sampled_kl'] == pytest.approx(b['gkd/sampled_kl'], rel=1e-5)


def test_the_batch_baseline_changes_the_surrogate_not_the_estimate(runs):
    """--gkd_sampled_kl_baseline batch: each row's advantages less the other rows' mean (float64-tested in
    core/test_sampled_kl.py): the same samples, the same logged estimate, another surrogate loss."""
    centred, plain = runs['alone_baseline'], runs['alone_fused']
    assert centred.returncode == 0, centred.output[-4000:]
    for a, b in zip(centred.logs, plain.logs):
        assert a['gkd/sampled_kl'] == pytest.approx(b['gkd/sampled_kl'], rel=1e-5)
        assert a['loss'] != pytest.approx(b['loss'], rel=1e-3)
