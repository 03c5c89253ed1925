"""The three GKD modes through the real ``swift rlhf`` pipeline, for LoRA and full tuning."""
import math

import pytest
from conftest import base_args, run_swift

import swift_gkd_plugin
from swift_gkd_plugin.core import choose_mode

MODE_FLAGS = {
    'off_policy': {'lmbda': 0},
    'on_policy': {'lmbda': 1},
    'seq_kd': {'lmbda': 0, 'seq_kd': 'true'},
    'mixed': {'lmbda': 0.5, 'seq_kd': 'true'},
}
LR = {'full': 5e-3, 'lora': 2e-2}
STEPS = 8
SEED = 42


@pytest.mark.parametrize('tuner', ['full', 'lora'])
@pytest.mark.parametrize('case', [pytest.param(c, marks=pytest.mark.quick) if c == 'mixed' else c
                                  for c in MODE_FLAGS])
def test_each_mode_trains_and_the_loss_falls(tiny_ws, tmp_path, tuner, case):
    flags = MODE_FLAGS[case]
    run = run_swift(
        base_args(
            tiny_ws,
            str(tmp_path / 'out'),
            tuner_type=tuner,
            dataset=tiny_ws.fixed,  # four rows, batch of four: the same prompts every step
            per_device_train_batch_size=4,
            max_steps=STEPS,
            learning_rate=LR[tuner],
            lr_scheduler_type='constant',
            warmup_ratio=0,
            temperature=1.0,
            seed=SEED,
            **flags))
    assert f'swift_gkd_plugin {swift_gkd_plugin.__version__}: GKD trainer active' in run.output

    # the recorded mode sequence is the core policy's, step by step
    expected = [choose_mode(SEED, s, float(flags['lmbda']), flags.get('seq_kd') == 'true').value for s in range(STEPS)]
    assert [m['mode'] for m in run.modes()] == expected
    if case == 'mixed':
        assert {'on_policy', 'seq_kd'} <= set(expected), 'seed 42 should mix both modes in 8 steps'

    # one log row per step, with the mode flags and the loss of the step's mode
    assert len(run.logs) == STEPS
    for row, mode in zip(run.logs, expected):
        assert row[f'gkd/mode_{mode}'] == 1.0
        assert f'gkd/loss_{mode}' in row
        assert 0.0 <= row['gkd/top1_agreement'] <= 1.0

    losses = run.losses
    assert all(math.isfinite(x) and x >= 0 for x in losses), losses
    first, last = sum(losses[:2]) / 2, sum(losses[-2:]) / 2
    assert last < 0.8 * first, f'loss did not fall: {losses}'
