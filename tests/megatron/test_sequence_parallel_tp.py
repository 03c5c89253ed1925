"""Megatron's sequence parallelism (``--tensor_model_parallel_size 2 --sequence_parallel true``, the main example's
command line) in ``megatron rlhf --rlhf_type gkd``, on 2 CPU ranks against TP = 1: one run, with both sampling modes,
read by both tests.

megatron-core's local torch norm refuses sequence parallelism; the CPU harness's stand-in for transformer-engine's
norm runs it and marks its weights ``sequence_parallel`` as TE does, so that ``finalize_model_grads`` sums their
gradients over the tensor-parallel group (unmarked, the first step's gradient norm is 0.03001812 for 0.0300414, and
the ranks' norm weights drift apart). Sampling without vLLM pads each forward to a multiple of TP
(``get_padding_to``): the sequence is split over the TP ranks."""
import pytest
import torch

from megatron_runs import MIXED, megatron_args, run_megatron, shared_megatron_runs, train_rows
from test_context_parallel import _completions, _same_run

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason='the CPU harness does nothing where CUDA is '
                                'present: tests/gpu/run_megatron_gkd.sh runs Megatron-SWIFT there')

SP = dict(tensor_model_parallel_size=2, sequence_parallel='true')


@pytest.fixture(scope='module')
def pair(tiny_ws, shared_runs, tmp_path_factory):
    """The session's shared one-rank ``mixed`` run (TP = 1, megatron_runs.py: an on-policy step sampled by the
    student, a seq_kd step sampled by the teacher, the teacher offloaded, a save at step 2) and the same
    ``megatron rlhf`` at TP = 2 with sequence parallelism (2 ranks), which both tests read."""
    two = run_megatron(megatron_args(tiny_ws, str(tmp_path_factory.mktemp('tp2_sp')), **SP, **MIXED), nproc=2)
    assert 'sequence_parallel=True' in two.output  # the model config the ranks built
    return shared_megatron_runs(tiny_ws, shared_runs)['mixed'], two


def test_megatron_rlhf_sequence_parallel_trains_as_tp1(pair):
    """The losses and gradient norms of TP = 1 at every step (refused before: 'sequence parallel not supported by
    torch LayerNorm'). The first gradient norm shows the norms' gradients summed over the TP group (the module's
    docstring); the second loss, after an update, that the ranks' weights stayed the same."""
    one, two = pair
    assert [r['gkd/mode_on_policy'] for r in train_rows(two)] == [1.0, 0.0]
    _same_run(one, two)


def test_megatron_rlhf_sequence_parallel_samples_as_tp1(pair):
    """An on-policy step sampled by the student and a seq_kd step sampled by the teacher, both from the Megatron
    model (every decoding forward padded to a multiple of TP): the same completions as TP = 1."""
    one, two = pair
    assert _completions(two) == _completions(one)
