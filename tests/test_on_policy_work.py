"""On-policy steps do the same model work with the fused and the dense loss (issue 26 item 3).

On the H100 (part a, one run each, 5 timed steps) on-policy took 2.08 s/step fused and 1.30 s dense, seq_kd 1.51 s fused
and 2.29 s dense, with equal losses (the same samples). Counted per step by ``tests/step_probe_plugin.py``: both loss
implementations sample the same tokens with the same number of forwards (one per sampled position), run the teacher
once and the student once (plus the recomputation under gradient checkpointing), over the same token positions. The
fused path adds no forward; what differs is the loss's own head matmuls (0.20 s/step fused, 0.21 s dense off-policy on
the H100)."""
import json

from conftest import base_args, run_swift

PROBE = __file__.replace('test_on_policy_work.py', 'step_probe_plugin.py')
PHASES = ('generate', 'teacher', 'loss', 'backward')


def _work(tiny_ws, tmp_path, impl):
    log = tmp_path / f'{impl}.jsonl'
    run_swift(base_args(tiny_ws, str(tmp_path / impl), external_plugins=PROBE, lmbda=1, gkd_loss_impl=impl,
                        max_steps=3, seed=3), env={'GKD_TEST_PROBE_LOG': str(log)})
    steps = [json.loads(line) for line in open(log)]
    return [(s['mode'], s['response_tokens'],
             {p: (s['phases'][p].get('forwards', 0), s['phases'][p].get('layer_tokens', 0)) for p in PHASES})
            for s in steps]


def test_fused_and_dense_on_policy_steps_run_the_same_forwards(tiny_ws, tmp_path):
    fused, dense = _work(tiny_ws, tmp_path, 'fused'), _work(tiny_ws, tmp_path, 'dense')
    assert len(fused) == 3 and fused == dense
    for mode, tokens, phases in fused:
        assert mode == 'on_policy' and tokens > 0
        assert phases['teacher'][0] == phases['loss'][0] == 1
        assert phases['generate'][0] > 1
