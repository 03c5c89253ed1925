"""The loss ``swift rlhf`` logs, step by step, against the loss recomputed here in float64 from its definition
(``tests/loss_reference.py``): the divergence weighted by ``--gkd_divergence_coef``, the SFT term by ``--sft_alpha`` on
the steps that train on dataset or teacher responses and never on the student's own samples, over the step's response
tokens with gradient accumulation, in training and in evaluation, for the dense and the fused loss.

At learning rate 0 every step's weights are the initial ones, so each logged step is compared with the tiny models as
built. The probe (``tests/multi_turn_plugin.py``, ``GKD_TEST_TRAJ_LOG``) records each micro-batch as the loss saw it:
the samples of on-policy and seq_kd steps are whatever was drawn, the reference needs only their ids and labels."""
import glob
import json
import os

import pytest
from conftest import base_args, run_swift
from loss_reference import expected

from swift_gkd_plugin.core import choose_mode

PROBE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'multi_turn_plugin.py')
BETA, TEMPERATURE, SFT_ALPHA, SEED = 0.3, 0.8, 0.5, 0
# two steps of 2 micro-batches of 2 rows: the first off-policy (seq_kd with --seq_kd true), the second on-policy
COMMON = dict(lmbda=0.5, beta=BETA, temperature=TEMPERATURE, sft_alpha=SFT_ALPHA, seed=SEED, max_steps=2,
              per_device_train_batch_size=2, gradient_accumulation_steps=2, learning_rate=0, external_plugins=PROBE,
              eval_strategy='steps', eval_steps=2, per_device_eval_batch_size=2)
assert [choose_mode(SEED, s, 0.5, False).value for s in range(2)] == ['off_policy', 'on_policy']
assert [choose_mode(SEED, s, 0.5, True).value for s in range(2)] == ['seq_kd', 'on_policy']
# name: (loss implementation, --seq_kd, --gkd_divergence_coef)
RUNS = {'dense': ('dense', 'false', 2.0), 'fused': ('fused', 'true', 0.5)}


@pytest.fixture(scope='module')
def runs(tiny_ws, shared_runs):
    def start(name):
        impl, seq_kd, coef = RUNS[name]
        return lambda out: run_swift(base_args(tiny_ws, out, gkd_loss_impl=impl, seq_kd=seq_kd,
                                               gkd_divergence_coef=coef, val_dataset=tiny_ws.fixed, **COMMON),
                                     env={'GKD_TEST_TRAJ_LOG': out + '.jsonl'})
    return shared_runs('loss_reference', {name: start(name) for name in RUNS})


def _batches(run, training):
    with open(run.output_dir + '.jsonl') as f:
        return [b for b in map(json.loads, f) if b['kind'] == 'batch' and b['training'] is training]


def _eval_rows(run):
    path = glob.glob(os.path.join(run.output_dir, '**', 'logging.jsonl'), recursive=True)
    with open(path[0]) as f:
        return [row for row in map(json.loads, f) if 'eval_loss' in row]


@pytest.mark.parametrize('name', list(RUNS))
def test_each_steps_loss_is_the_float64_loss_of_its_definition(runs, tiny_ws, name):
    """Per step: loss = (coef * sum D + sft_alpha * sum CE on non-on-policy steps) / the step's response tokens,
    and ``gkd/loss_<mode>`` the divergence's token mean (without the coefficient)."""
    run, (impl, seq_kd, coef) = runs[name], RUNS[name]
    assert f'GKD loss implementation: {impl}' in run.output
    batches = _batches(run, training=True)
    assert len(batches) == 4 and len(run.logs) == 2, (len(batches), run.logs)
    first = 'seq_kd' if seq_kd == 'true' else 'off_policy'
    for step, row in enumerate(run.logs):
        want = expected(batches[2 * step:2 * step + 2], tiny_ws.student, tiny_ws.teacher, beta=BETA,
                        temperature=TEMPERATURE, divergence_coef=coef, sft_alpha=SFT_ALPHA)
        assert want.mode == [first, 'on_policy'][step]
        assert row['loss'] == pytest.approx(want.loss, rel=2e-5), (step, row, want)
        assert row[f'gkd/loss_{want.mode}'] == pytest.approx(want.divergence, rel=2e-5), (step, row, want)


@pytest.mark.parametrize('name', list(RUNS))
def test_the_evaluation_loss_is_the_float64_loss_of_its_definition(runs, tiny_ws, name):
    """Evaluation scores the dataset responses (off-policy) with the same terms and coefficients as training, each
    batch over its own response tokens (gradient accumulation groups training micro-batches only): ``eval_loss`` is
    the mean of the two batches' losses (the HF Trainer's, over equal batches), ``eval_gkd/loss_off_policy`` the
    divergence's mean over every evaluated token."""
    run, (_, _, coef) = runs[name], RUNS[name]
    batches = _batches(run, training=False)
    rows = _eval_rows(run)
    assert len(batches) == 2 and len(rows) == 1, (len(batches), rows)  # 4 rows in batches of 2, after step 2
    each = [expected([b], tiny_ws.student, tiny_ws.teacher, beta=BETA, temperature=TEMPERATURE,
                     divergence_coef=coef, sft_alpha=SFT_ALPHA) for b in batches]
    both = expected(batches, tiny_ws.student, tiny_ws.teacher, beta=BETA, temperature=TEMPERATURE,
                    divergence_coef=coef, sft_alpha=SFT_ALPHA)
    assert both.mode == 'off_policy'
    assert rows[0]['eval_loss'] == pytest.approx((each[0].loss + each[1].loss) / 2, rel=2e-5), (rows, each)
    assert rows[0]['eval_gkd/loss_off_policy'] == pytest.approx(both.divergence, rel=2e-5), (rows, both)
