"""Shared-base LoRA under ZeRO-3 (issue 26 item 2), counted per step by ``tests/step_probe_plugin.py`` in a real
``swift rlhf`` run: the teacher pass is one forward of the base (adapter off), gathered once; the student's forward
is one more; nothing is run twice. The slowness measured on the H100 is ZeRO-3's gathering (see
``swift_gkd_plugin/swift/setup/zero3_lora.py``), warned about before loading."""
import json
from types import SimpleNamespace

import pytest
from conftest import base_args, run_swift

from swift_gkd_plugin.swift.setup.compile_cost import zero3_lora_warnings

PROBE = __file__.replace('test_zero3_lora.py', 'step_probe_plugin.py')


def test_shared_base_teacher_pass_under_zero3_is_one_forward_and_one_gather(tiny_ws, tmp_path):
    pytest.importorskip('deepspeed')
    log = tmp_path / 'probe.jsonl'
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'out'), external_plugins=PROBE, deepspeed='zero3', fp16='false',
                              use_cpu='true', tuner_type='lora', teacher_model=tiny_ws.student, lmbda=0, max_steps=2,
                              seed=42, sft_alpha=0.5), env={'GKD_TEST_PROBE_LOG': str(log)}, nproc=2)
    assert '--tuner_type lora with --deepspeed (a ZeRO-3 config) is slow' in run.output  # ms-swift parsed it
    assert 'Teacher model: base_model with LoRA disabled' in run.output
    steps = [json.loads(line) for line in open(log)]
    assert len(steps) == 4
    for step in steps:
        teacher, loss = step['phases']['teacher'], step['phases']['loss']
        assert teacher['forwards'] == loss['forwards'] == 1
        assert teacher['layer_tokens'] == loss['layer_tokens'] > 0
        assert 0 < teacher['gathered'] <= step['params']  # at most one gather of the weights for the teacher pass


def test_lora_under_zero3_is_warned_with_the_faster_configurations():
    [warning] = zero3_lora_warnings(SimpleNamespace(tuner_type='lora', deepspeed='zero3_offload'))
    assert '10.0 s/step' in warning and '--deepspeed zero2' in warning and 'no --deepspeed' in warning
    assert zero3_lora_warnings(SimpleNamespace(tuner_type='lora', deepspeed='zero2')) == []
    assert zero3_lora_warnings(SimpleNamespace(tuner_type='full', deepspeed='zero3')) == []
