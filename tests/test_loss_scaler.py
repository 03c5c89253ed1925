"""An fp16 loss scaler's first overflowing steps are skipped by design, not a reason to stop the run.

ms-swift's ZeRO configs turn fp16 on for a float32 model (``fp16: auto`` and its ``_init_mixed_precision``): DeepSpeed's
dynamic loss scale starts at 2**16 and halves on each overflowing step, which it skips. The gradient-norm guard
(``swift/run/guards.py``) used to stop such a run at its first step ("nothing learnt yet"), so no fp16 DeepSpeed run
got past step 1; it now gives a loss scaler ``SCALER_STEPS`` overflows in a row, learnt or not."""
import pytest
from conftest import _free_port, base_args, run_swift


def _deepspeed_fp16() -> bool:
    try:
        from deepspeed.accelerator import get_accelerator
    except ImportError:
        return False
    return bool(get_accelerator().is_fp16_supported())


@pytest.mark.skipif(not _deepspeed_fp16(), reason='DeepSpeed\'s accelerator on this machine has no fp16 (its CPU '
                    'accelerator asks oneDNN, which needs the processor\'s fp16 instructions): the run is refused there')
def test_fp16_deepspeed_run_gets_past_the_loss_scalers_first_overflows(tiny_ws, tmp_path):
    out = tmp_path / 'out'
    result = run_swift(base_args(tiny_ws, str(out), deepspeed='zero2', use_cpu='true', lmbda=0, max_steps=12,
                                 logging_steps=1, gradient_checkpointing='false'),
                       env={'NPROC_PER_NODE': '1', 'MASTER_PORT': str(_free_port())},  # DeepSpeed wants a launcher
                       check=False)
    assert result.returncode == 0, result.output[-4000:]
    norms = [row['grad_norm'] for row in result.logs if 'grad_norm' in row]
    assert norms and any(n == n and abs(n) != float('inf') for n in norms), norms  # some steps learnt
