"""The entropy-gap warning judges the trend (issue 57 item 2): it stays quiet on a student that closes the gap to a
near-deterministic teacher (``swift-gkd demo``), fires on the measured runs that ended worse than they started, and
names only the remedies not already in effect."""
import json
import os
import types

import pytest
from test_demo import default_demo  # noqa: F401 (the demo's run, shared with tests/test_demo.py)
from test_entropy_gap import DEGRADING, HOLDING

from swift_gkd_plugin.entry import cli
from swift_gkd_plugin.core.entropy import ENTROPY_GAP_MARGIN, EntropyGapWatch

#: gkd/entropy / gkd/teacher_entropy at every logged step (1, 10, ..., 80) of ``swift-gkd demo`` with its defaults
#: (OMP_NUM_THREADS=1; logging.jsonl of the run; 2 threads gave seeds 0 and 1's to 6 digits): the student closes the
#: gap while exact match climbs 0.210 -> 0.940, 0.455 -> 1.000, 0.250 -> 1.000 (seeds 0, 1, 2). The former rule (a
#: gap above 1.5 nats for 3 logged steps) fired at step 20 on each.
DEMO = {'seed0': [(2.58994846, 0.01348206), (2.4312685, 0.0136413), (2.18251472, 0.01367715),
                  (1.89514078, 0.01367557), (1.56244652, 0.01367083), (1.23721922, 0.01362759),
                  (1.02130303, 0.01374337), (0.83902178, 0.01367487), (0.65093498, 0.0136652)],
        'seed1': [(2.65326195, 0.01443016), (2.52528419, 0.01464762), (2.2800807, 0.0147699),
                  (1.89250887, 0.01478743), (1.43509378, 0.0147825), (1.03012758, 0.01477558),
                  (0.73975473, 0.01471773), (0.52594321, 0.01466068), (0.38512399, 0.01480262)],
        'seed2': [(2.4943573, 0.01587807), (2.36757637, 0.01565157), (2.19621254, 0.0156664),
                  (1.99483601, 0.01566128), (1.64785519, 0.01569086), (1.25615526, 0.01570215),
                  (0.93528652, 0.01557559), (0.69059232, 0.01568963), (0.50267137, 0.01567564)]}
#: The tiny student (near-uniform, 6.1 nats) against the tiny teacher with its head scaled by 10, sampling at 1.5
#: (tests/test_entropy_gap.py's sharp teacher, 6 steps): a flat gap of 1.7-2.2 nats that only wobbles, the loss
#: falling 0.36 -> 0.30. The former rule fired at the third logged step.
FLAT_GAP = [(6.08933401, 3.92958379), (6.08828115, 4.20247555), (6.08607531, 4.33161259), (6.08110094, 3.88866854),
            (6.07606649, 4.29763269), (6.06905603, 4.34769583)]
#: docs_en/quality_results.md's degrading SmolLM2 pattern for the gap trigger: a student at 4.5 nats climbing to 5.5-6.4
#: while the teacher's entropy stays near its start's 2.88 (three logged steps, watched from mid-run).
GROWING_GAP = [(4.5, 2.88), (5.5, 2.88), (6.4, 2.88)]
#: A run with SKD and cold sampling in effect (the demo's former flags): SKD with K = 1 at sampling temperature 0.5,
#: lmbda 1, beta 0.5.
DEMO_ARGS = types.SimpleNamespace(gkd_skd_top_k=1, gkd_sampling_temperature=0.5, lmbda=1.0, beta=0.5, top_p=1.0,
                                  gkd_rollout_max_tokens=None)


def _messages(pairs, **kwargs):
    watch = EntropyGapWatch(**kwargs)
    return [watch.update(e, t) for e, t in pairs]


@pytest.mark.parametrize('name', list(DEMO))
def test_the_demos_student_closing_the_gap_does_not_warn(name):
    gaps = [e - t for e, t in DEMO[name]]
    assert min(gaps[:3]) > ENTROPY_GAP_MARGIN  # what the former rule fired on
    assert _messages(DEMO[name]) == [None] * len(gaps)


def test_a_flat_gap_that_only_wobbles_does_not_warn():
    assert min(e - t for e, t in FLAT_GAP) > ENTROPY_GAP_MARGIN
    assert _messages(FLAT_GAP) == [None] * len(FLAT_GAP)


@pytest.mark.parametrize('name', list(DEGRADING) + ['growing_gap'])
def test_the_measured_degrading_runs_still_warn(name):
    messages = _messages(DEGRADING.get(name, GROWING_GAP))
    fired = [m for m in messages if m]
    assert len(fired) == 1 and messages.index(fired[0]) == len(messages) - 1, messages
    assert 'Remedies not yet in effect' in fired[0]
    if name == 'growing_gap':
        assert 'the gap growing by 1.90 nats across them' in fired[0]
    else:
        assert 'after rising more than 2 nats above its first logged value' in fired[0]


@pytest.mark.parametrize('name', list(HOLDING))
def test_the_runs_that_held_stay_quiet_with_the_trend_rule(name):
    assert not any(_messages(HOLDING[name], args=DEMO_ARGS))


def test_remedies_already_in_effect_are_left_out():
    """SKD and cold sampling in effect (the demo's former flags): neither they nor top-p (not both) are suggested."""
    quiet, told = _messages(GROWING_GAP, args=DEMO_ARGS)[-1], _messages(GROWING_GAP)[-1]
    for flag in ('--gkd_skd_top_k', '--gkd_sampling_temperature', '--top_p'):
        assert flag in told and flag not in quiet
    for flag in ('--lmbda', '--beta', '--gkd_rollout_max_tokens', 'a supervised start'):
        assert flag in told and flag in quiet
    everything = types.SimpleNamespace(top_p=0.9, lmbda=0.5, gkd_skd_top_k=4, beta=1.0, gkd_rollout_max_tokens=8)
    assert 'Remedies not yet in effect (measured in docs_en/onpolicy_remedies.md): a supervised start (SFT the ' \
        'student first).' in _messages(GROWING_GAP, args=everything)[-1]


def test_the_demo_run_does_not_warn(default_demo):
    """``swift-gkd demo`` through the real ``swift rlhf`` (its 80 default steps, logged at 1, 10, ..., 80: the run
    tests/test_demo.py checks): the former rule warned at step 20 while the student was learning."""
    out = default_demo['out']
    assert 'GKD trainer active' in out and 'gkd/entropy_gap_warnings' not in out
    assert "the student's entropy on its own samples" not in out
    with open(os.path.join(default_demo['workdir'], 'output', 'logging.jsonl')) as f:
        rows = [r for r in map(json.loads, f) if 'gkd/entropy' in r]
    assert [int(r['global_step/max_steps'].split('/')[0]) for r in rows] == [
        1, *range(cli.DEMO_LOGGING_STEPS, cli.DEMO_STEPS + 1, cli.DEMO_LOGGING_STEPS)]
    assert float(rows[2]['gkd/entropy']) - float(rows[2]['gkd/teacher_entropy']) > 1.5  # step 20
