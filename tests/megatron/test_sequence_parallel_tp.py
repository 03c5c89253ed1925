"""Megatron's sequence parallelism (``--tensor_model_parallel_size 2 --sequence_parallel true``, the main example's
command line) in ``megatron rlhf --rlhf_type gkd``, on 2 CPU ranks against TP = 1.

megatron-core's local torch norm refuses sequence parallelism; the CPU harness's stand-in for transformer-engine's
norm runs it and marks its weights ``sequence_parallel`` as TE does, so that ``finalize_model_grads`` sums their
gradients over the tensor-parallel group (unmarked, the first step's gradient norm is 0.03001812 for 0.0300414, and
the ranks' norm weights drift apart). Sampling without vLLM pads each forward to a multiple of TP
(``get_padding_to``): the sequence is split over the TP ranks."""
import pytest
import torch

from megatron_runs import MIXED, fixed_rows, megatron_args, run_megatron, shared_megatron_runs, train_rows
from test_context_parallel import _completions, _same_run

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason='the CPU harness does nothing where CUDA is '
                                'present: tests/gpu/run_megatron_gkd.sh runs Megatron-SWIFT there')

SP = dict(tensor_model_parallel_size=2, sequence_parallel='true')


@pytest.fixture(scope='module')
def baselines(tiny_ws, shared_runs):
    """The TP = 1 runs: the session's shared one-rank ``fixed_rows`` and ``mixed`` (megatron_runs.py)."""
    return shared_megatron_runs(tiny_ws, shared_runs)


def _pair(ws, tmp_path, baselines, name, flags):
    """The shared TP = 1 run ``name`` (started with ``flags``) and the same ``megatron rlhf`` at TP = 2 with sequence
    parallelism (2 ranks)."""
    two = run_megatron(megatron_args(ws, str(tmp_path / 'tp2_sp'), **SP, **flags), nproc=2)
    assert 'sequence_parallel=True' in two.output  # the model config the ranks built
    return baselines[name], two


def test_megatron_rlhf_sequence_parallel_trains_as_tp1(tiny_ws, tmp_path, baselines):
    """Off-policy, the 4 fixed rows, 3 steps at lr 1e-3: the losses and gradient norms of TP = 1 at every step
    (refused before: 'sequence parallel not supported by torch LayerNorm'). The gradient norm shows the norms'
    gradients summed over the TP group; the later losses, that the ranks' weights stayed the same."""
    one, two = _pair(tiny_ws, tmp_path, baselines, 'fixed_rows', fixed_rows(tiny_ws))
    assert len(train_rows(two)) == 3 and all(r['gkd/mode_off_policy'] == 1.0 for r in train_rows(two))
    _same_run(one, two)


def test_megatron_rlhf_sequence_parallel_samples_as_tp1(tiny_ws, tmp_path, baselines):
    """An on-policy step sampled by the student and a seq_kd step sampled by the teacher, both from the Megatron
    model (every decoding forward padded to a multiple of TP): the same completions, losses and gradient norms as
    TP = 1 (the shared ``mixed`` run's flags: the teacher offloaded, a save at step 2)."""
    one, two = _pair(tiny_ws, tmp_path, baselines, 'mixed', MIXED)
    assert [r['gkd/mode_on_policy'] for r in train_rows(two)] == [1.0, 0.0]
    _same_run(one, two)
    assert _completions(two) == _completions(one)
