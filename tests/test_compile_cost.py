"""``--torch_compile`` costs (issue 26 item 1): sampling runs eager, ZeRO-3 + compile is warned about before loading.

Under DeepSpeed accelerate compiles the student module in place, so before the fix every sampled token went through
dynamo (a new KV-cache length: a new trace). Counted per phase of each step by ``tests/step_probe_plugin.py``:
ZeRO-2 + compile (CPU, eager backend, 8-token samples) traced 26 frames in step 1's sampling (20 s of tracing) before,
none after."""
import json
from types import SimpleNamespace

import pytest
from conftest import _free_port, base_args, run_swift

from swift_gkd_plugin.swift.setup.compile_cost import torch_compile_warnings, zero_stage

PROBE = __file__.replace('test_compile_cost.py', 'step_probe_plugin.py')


def test_sampling_of_a_compiled_deepspeed_student_runs_eager(tiny_ws, tmp_path):
    pytest.importorskip('deepspeed')
    log = tmp_path / 'probe.jsonl'
    run_swift(base_args(tiny_ws, str(tmp_path / 'out'), external_plugins=PROBE, deepspeed='zero2', fp16='false',
                        use_cpu='true', torch_compile='true', torch_compile_backend='eager',
                        gradient_checkpointing='false', gkd_loss_impl='fused', lmbda=1, max_steps=2, seed=3),
              env={'GKD_TEST_PROBE_LOG': str(log), 'NPROC_PER_NODE': '1', 'MASTER_PORT': str(_free_port())})
    steps = [json.loads(line) for line in open(log)]  # (one rank: DeepSpeed compiles each rank's module alike)
    assert len(steps) == 2  # 2 steps
    for step in steps:
        assert step['mode'] == 'on_policy'
        assert step['phases']['generate']['forwards'] > 1  # it did sample, token by token
        assert step['phases']['generate']['dynamo_frames'] == 0
    assert all(s['phases']['loss']['dynamo_frames'] > 0 for s in steps if s['step'] == 1)  # the training forward is


@pytest.mark.parametrize('deepspeed,stage', [(None, None), ('zero2', 2), ('zero3', 3), ('zero3_offload', 3),
                                             ({'zero_optimization': {'stage': 3}}, 3)])
def test_zero_stage_of_the_deepspeed_flag(deepspeed, stage):
    assert zero_stage(deepspeed) == stage


def test_zero_stage_of_a_json_config(tmp_path):
    path = tmp_path / 'ds.json'
    path.write_text(json.dumps({'zero_optimization': {'stage': 3}}))
    assert zero_stage(str(path)) == 3


def test_torch_compile_under_zero3_is_warned_with_the_faster_configurations():
    [warning] = torch_compile_warnings(SimpleNamespace(torch_compile=True, deepspeed='zero3'))
    assert '--torch_compile true with --deepspeed zero3 is slow' in warning and '140 s' in warning
    assert '--deepspeed zero2 with --torch_compile true' in warning and '--torch_compile false' in warning
    assert torch_compile_warnings(SimpleNamespace(torch_compile=True, deepspeed='zero2')) == []
    assert torch_compile_warnings(SimpleNamespace(torch_compile=False, deepspeed='zero3')) == []
