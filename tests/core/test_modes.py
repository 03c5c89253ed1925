"""The mode policy: frequencies, determinism, independence from process state."""
import random
import subprocess
import sys

import pytest

from swift_gkd_plugin.core import Mode, choose_mode
from swift_gkd_plugin.core.modes import mode_draw

pytestmark = pytest.mark.quick  # core math: part of `pytest -m quick`


def test_endpoints():
    assert all(choose_mode(1, s, 0.0, False) is Mode.OFF_POLICY for s in range(200))
    assert all(choose_mode(1, s, 0.0, True) is Mode.SEQ_KD for s in range(200))
    assert all(choose_mode(1, s, 1.0, True) is Mode.ON_POLICY for s in range(200))


@pytest.mark.parametrize('lmbda', [0.1, 0.5, 0.9])
def test_on_policy_frequency_is_lmbda(lmbda):
    n = 4000
    hits = sum(choose_mode(123, s, lmbda, True) is Mode.ON_POLICY for s in range(n))
    # binomial standard deviation is at most 0.008 at n = 4000: 5 sigma
    assert abs(hits / n - lmbda) < 0.04


def test_decisions_ignore_global_random_state_and_other_seeds():
    first = [choose_mode(9, s, 0.5, True) for s in range(50)]
    random.seed(0)
    random.random()
    assert [choose_mode(9, s, 0.5, True) for s in range(50)] == first
    # seed + step collisions do not repeat sequences: seed 10 is not seed 9 shifted by one step
    assert [mode_draw(10, s) for s in range(20)] != [mode_draw(9, s + 1) for s in range(20)]


def test_decisions_are_identical_in_a_fresh_interpreter():
    code = 'from swift_gkd_plugin.core.modes import mode_draw; print([mode_draw(5, s) for s in range(8)])'
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True,
                         env={'PYTHONHASHSEED': '123'}).stdout.strip()
    assert out == str([mode_draw(5, s) for s in range(8)])


def test_bad_lmbda_is_refused():
    with pytest.raises(ValueError, match='lmbda'):
        choose_mode(0, 0, 1.5, False)


def test_sampling_seeds_differ_per_rank_and_step_and_repeat():
    from swift_gkd_plugin.core.modes import sampling_seed
    seeds = {(step, rank): sampling_seed(42, step, rank) for step in range(50) for rank in range(8)}
    assert len(set(seeds.values())) == len(seeds)  # every (step, rank) has its own stream
    assert all(0 <= s < 2**63 for s in seeds.values())
    assert sampling_seed(42, 7, 3) == seeds[(7, 3)]  # a resumed run draws the same seed
    assert sampling_seed(43, 7, 3) != seeds[(7, 3)]
