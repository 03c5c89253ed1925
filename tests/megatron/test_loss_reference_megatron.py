"""The loss ``megatron rlhf`` logs against the loss recomputed in float64 from its definition
(``tests/loss_reference.py``), with ``--sft_alpha``: the SFT term is the cross-entropy at the response tokens of the
dataset's rows, over the step's response tokens with gradient accumulation (2 micro-batches of 2 rows), and it is
absent from on-policy steps (the student's own samples). Step 1 is logged before the first update: it is the loss of
the tiny models as built, on the 4 fixed rows."""
import math

import pytest
import torch
from loss_reference import dataset_batch, expected
from megatron_runs import ACTIVE, megatron_args, run_megatron, train_rows

from swift_gkd_plugin.core import choose_mode

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason='the CPU harness does nothing where CUDA is '
                                'present: tests/gpu/run_megatron_gkd.sh runs Megatron-SWIFT there')

BETA, TEMPERATURE, SFT_ALPHA, SEED = 0.3, 0.8, 0.5, 43
assert [choose_mode(SEED, s, 0.5, False).value for s in range(2)] == ['off_policy', 'on_policy']


@pytest.fixture(scope='module')
def run(tiny_ws, shared_runs):
    return shared_runs('megatron_loss_reference', {'sft': lambda out: run_megatron(megatron_args(
        tiny_ws, out, dataset=tiny_ws.fixed, lmbda=0.5, seed=SEED, train_iters=2, micro_batch_size=2,
        global_batch_size=4, beta=BETA, temperature=TEMPERATURE, sft_alpha=SFT_ALPHA))})['sft']


def test_the_sft_term_is_the_cross_entropy_of_the_response_tokens(run, tiny_ws):
    """Step 1 (off-policy): loss = (sum D + sft_alpha * sum CE) / tokens, ``sft_loss`` the CE's token mean and
    ``gkd/loss_off_policy`` the divergence's, all in float64 from the rows' template encoding."""
    assert run.returncode == 0 and ACTIVE in run.output, run.output[-3000:]
    rows = train_rows(run)
    assert len(rows) == 2, rows
    want = expected([dataset_batch(tiny_ws.fixed, tiny_ws.student)], tiny_ws.student, tiny_ws.teacher, beta=BETA,
                    temperature=TEMPERATURE, sft_alpha=SFT_ALPHA)
    first = rows[0]
    assert first['gkd/mode_off_policy'] == 1.0, first
    assert first['sft_loss'] == pytest.approx(want.cross_entropy, rel=1e-4), (first, want)
    assert first['gkd/loss_off_policy'] == pytest.approx(want.divergence, rel=1e-4), (first, want)
    assert first['loss'] == pytest.approx(want.loss, rel=1e-4), (first, want)


def test_on_policy_steps_have_no_sft_term(run):
    """Step 2 (on-policy): the loss is the divergence alone, whatever ``--sft_alpha``."""
    second = train_rows(run)[1]
    assert second['gkd/mode_on_policy'] == 1.0, second
    assert 'sft_loss' not in second, second
    assert math.isfinite(second['loss']) and second['loss'] > 0, second
    assert second['loss'] == pytest.approx(second['gkd/loss_on_policy'], rel=1e-6), second
