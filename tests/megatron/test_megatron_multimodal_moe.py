"""``megatron rlhf --rlhf_type gkd`` on a multimodal mixture of experts, on CPU: the tiny InternVL3.5-MoE
(``tests/tiny_internvl_moe.py``: an InternVL vision tower, a 2-layer Qwen3-MoE decoder of 4 experts) loaded by
mcore-bridge's ``internvl_hf`` family (the vision tower in transformers, the decoder in megatron-core over the
harness's grouped-linear stand-ins). The product's headline use, scaled down: shared-base LoRA self-distillation (the
teacher is the student's base with the adapter disabled) on image rows whose privileged ``teacher_prompt`` gives the
answer, at expert parallelism 2, off-policy (the Megatron sampler takes no images: on-policy steps of a multimodal
model sample with vLLM).

One shared run of 2 ranks (``--vit_attn_impl sdpa``: mcore-bridge builds the vision tower with flash attention
otherwise, which a CPU has not)."""
import itertools
import json
import math
import os

import pytest
import torch

from conftest import Workspace, base_args, run_swift
from megatron_runs import ACTIVE, megatron_args, run_megatron, shared_megatron_runs, train_rows

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason='the CPU harness does nothing where CUDA is '
                                'present')

FLAGS = dict(model_type='internvl', teacher_model_type='internvl', template='internvl_hf', tuner_type='lora',
             target_modules='all-linear', lora_dropout=0, lmbda=0, train_iters=2, micro_batch_size=2,
             global_batch_size=4, lr=1e-3, max_length=256, vit_attn_impl='sdpa')


@pytest.fixture(scope='module')
def internvl_ws(tiny_ws) -> Workspace:
    from filelock import FileLock

    import tiny_internvl_moe as tivl
    root = os.path.join(tiny_ws.root, 'megatron_internvl_moe')
    with FileLock(root + '.lock'):
        if not os.path.exists(os.path.join(root, 'train.jsonl')):
            tivl.build_workspace(root, n_rows=4)
    model = os.path.join(root, 'model')
    return Workspace(root, model, model, '', os.path.join(root, 'train.jsonl'), os.path.join(root, 'train.jsonl'))


@pytest.fixture(scope='module')
def runs(tiny_ws, internvl_ws, shared_runs):
    ws = internvl_ws
    return shared_megatron_runs(tiny_ws, shared_runs, {
        'internvl_moe_lora_ep2': lambda out: run_megatron(megatron_args(
            ws, out, dataset=ws.train, expert_model_parallel_size=2, **FLAGS), nproc=2),
    })


def test_multimodal_moe_self_distillation_under_expert_parallelism(runs, internvl_ws, tmp_path):
    """Shared-base LoRA on image rows at EP 2: the first step's loss (logged before its update: a fresh adapter adds
    nothing, so it is the base reading the privileged prompt against the base reading the plain one, each with the
    image) equals ``swift rlhf``'s on the same 4 rows (transformers' ``InternVLForConditionalGeneration``); both steps
    train; the experts were built as megatron-core's ``TEGroupedMLP`` (2 local experts a rank); the saved adapter
    (``--target_modules all-linear``) has LoRA A and B factors on the gate, up and down projections of all 4 experts of
    both layers (mcore-bridge's export, gathered over the 2 EP ranks) and on the attention, every expert's B factor
    moved from its zero initialisation (all of them were trained), and none on the vision tower."""
    from safetensors import safe_open
    run = runs['internvl_moe_lora_ep2']
    assert run.returncode == 0 and ACTIVE in run.output, run.output[-3000:]
    rows = train_rows(run)
    assert len(rows) == 2 and all(math.isfinite(r['loss']) and r['loss'] > 0 and r['grad_norm'] > 0 for r in rows)
    for rank in (0, 1):
        assert [r['mode'] for r in run.modes(rank)] == ['off_policy'] * 2
    assert 'TEGroupedMLP(' in run.output and 'SequentialMLP' not in run.output, run.output[-3000:]
    for name in ('TEColumnParallelGroupedLinear', 'TERowParallelGroupedLinear'):
        assert f'{name}(num_gemms=2,' in run.output, run.output[-3000:]
    swift = run_swift(base_args(internvl_ws, str(tmp_path / 'swift'), model_type='internvl', teacher_model_type='internvl',
                                template='internvl_hf', tuner_type='lora', lora_dropout=0, lmbda=0, max_steps=1,
                                per_device_train_batch_size=4, learning_rate=0, max_length=256))
    assert rows[0]['loss'] == pytest.approx(swift.losses[0], rel=1e-4), (rows[0], swift.losses)
    with safe_open(os.path.join(run.output_dir, 'checkpoint-2', 'adapter_model.safetensors'), 'pt') as f:
        keys = set(f.keys())
        expert_b = {k: f.get_tensor(k) for k in keys if '.experts.' in k and 'lora_B' in k}
    for layer, expert, proj, factor in itertools.product(range(2), range(4), ('gate_proj', 'up_proj', 'down_proj'),
                                                         'AB'):
        tail = f'.layers.{layer}.mlp.experts.{expert}.{proj}.lora_{factor}.weight'
        assert sum(k.endswith(tail) for k in keys) == 1, (tail, sorted(keys)[:20])
    assert len(expert_b) == 2 * 4 * 3 and all(t.abs().max() > 0 for t in expert_b.values()), sorted(keys)[:20]
    assert any('self_attn.q_proj.lora_A' in k for k in keys), sorted(keys)[:20]
    assert not any('vision' in k for k in keys), sorted(keys)
    with open(os.path.join(run.output_dir, 'args.json')) as f:
        assert json.load(f)['expert_model_parallel_size'] == 2
