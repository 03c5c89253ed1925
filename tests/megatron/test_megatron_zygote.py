"""The Megatron tests' shared start-up (``run_megatron`` forks the ranks of a run that should succeed from the test
worker's Megatron zygote) changes nothing a run does: the shared ``dp2`` run (two ranks, on-policy and seq_kd steps,
the rollouts cut) started through ms-swift's ``megatron`` launcher logs the same steps."""
import pytest
import torch
from megatron_runs import DP2, megatron_args, run_megatron, shared_megatron_runs, train_rows

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason='the CPU harness does nothing where CUDA is present')

# every logged value but the clock's
TIMING = ('elapsed_time', 'remaining_time', 'train_speed(s/it)', 'memory(GiB)')


def test_ranks_forked_from_the_zygote_equal_the_launchers(tiny_ws, shared_runs, tmp_path):
    forked = shared_megatron_runs(tiny_ws, shared_runs)['dp2']
    launched = run_megatron(megatron_args(tiny_ws, str(tmp_path / 'launched'), **DP2), nproc=2, launcher=True)
    assert 'run sh: `' in launched.output and 'run sh: `' not in forked.output  # one went through the launcher
    a, b = train_rows(forked), train_rows(launched)
    assert len(a) == len(b) == 2
    assert [r['gkd/mode_on_policy'] for r in a] == [1.0, 0.0] and [r['gkd/mode_seq_kd'] for r in a] == [0.0, 1.0]
    for x, y in zip(a, b):
        assert {k: v for k, v in x.items() if k not in TIMING} == {k: v for k, v in y.items() if k not in TIMING}
