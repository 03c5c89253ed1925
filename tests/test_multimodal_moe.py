"""The product's headline use, scaled down: shared-base LoRA self-distillation of a multimodal mixture-of-experts
model (Qwen3-VL-30B-A3B / Qwen3-Omni-30B-A3B in production) -- the teacher is the student's own base with the LoRA
adapter disabled and reads a privileged ``teacher_prompt`` -- on a tiny ``qwen3_vl_moe`` model
(``tests/tiny_multimodal_moe.py``: 1-block vision tower, 2 decoder layers of 4 experts).

The model and its image path run in transformers and peft with Pillow only (the first tests here, always run).  The
``swift rlhf`` runs need what ms-swift's ``qwen3_vl_moe`` loader and ``qwen3_vl`` template import: ``qwen_vl_utils``,
which imports ``torchvision`` at module level; PyPI's torchvision wheels are CUDA builds that cannot load beside the
CPU build of torch (``RuntimeError: operator torchvision::nms does not exist``), so these runs are skipped, with that
error as the reason, where torchvision does not load (CI's CPU machines today); they run where it does (GPU machines,
or a CPU torchvision wheel from the PyTorch index). The same ``swift rlhf`` runs on the tiny InternVL3.5-MoE
(``tests/tiny_internvl_moe.py``), whose ms-swift path needs no torchvision, run everywhere.
"""
import math
import os
import re

import pytest
from conftest import Workspace, _free_port, base_args, run_swift

import tiny_internvl_moe as tivl
import tiny_multimodal_moe as tmoe

import swift_gkd_plugin

N_ROWS = 4
#: LoRA on the decoder's linear layers (ms-swift's default all-linear: q/k/v/o; the routers are not nn.Linear) and,
#: through peft's target_parameters (``--target_parameters``), on the fused expert weights: 3-D nn.Parameters, which
#: all-linear does not reach
EXPERT_PARAMETERS = ('mlp.experts.gate_up_proj', 'mlp.experts.down_proj')
LORA = dict(tuner_type='lora', lora_rank=4, lora_alpha=16, lora_dropout=0, target_parameters=list(EXPERT_PARAMETERS))


def _workspace(builder, root) -> Workspace:
    built = builder.build_workspace(root, n_rows=N_ROWS)
    ws = Workspace(root, built['model'], built['model'], '', built['train'], built['train'])
    ws.images, ws.family = built['images'], builder
    return ws


@pytest.fixture(scope='module')
def moe(tmp_path_factory) -> Workspace:
    return _workspace(tmoe, str(tmp_path_factory.mktemp('tiny_mm_moe')))


@pytest.fixture(scope='module')
def internvl_moe(tmp_path_factory) -> Workspace:
    return _workspace(tivl, str(tmp_path_factory.mktemp('tiny_internvl_moe')))


#: the two families of the swift rlhf runs: Qwen3-VL-MoE where torchvision loads, InternVL3.5-MoE everywhere
FAMILIES = ['moe', 'internvl_moe']


# ---------------------------------------------------------------- the model, without ms-swift
def test_the_tiny_model_is_a_vision_moe_and_sees_its_image(moe):
    """A real Qwen3VLMoeForConditionalGeneration: 2 MoE layers of 4 experts (2 active), a vision tower whose features
    change the decoder's logits, 4 image tokens per 64 x 64 image from the PIL image processor."""
    import torch
    from PIL import Image
    from transformers import AutoTokenizer
    model = tmoe.load_model(moe.student).eval()
    text = model.config.text_config
    assert model.config.model_type == 'qwen3_vl_moe' and text.num_experts == tmoe.NUM_EXPERTS
    assert text.num_experts_per_tok == 2 and text.num_hidden_layers == 2 and text.mlp_only_layers == []
    assert os.path.getsize(os.path.join(moe.student, 'model.safetensors')) < 6e6
    tok = AutoTokenizer.from_pretrained(moe.student)
    assert tok.convert_tokens_to_ids(tmoe.IMAGE_TOKEN) == model.config.image_token_id == 151655
    processor = tmoe.load_image_processor(moe.student)
    row = tmoe.read_dataset(moe.train)[0]
    assert row['teacher_prompt'].startswith('<image>') and row['images'][0].endswith('.png')

    def logits(image):
        pixels = processor(images=[image], return_tensors='pt')
        n = int(pixels['image_grid_thw'].prod()) // tmoe.MERGE_SIZE**2
        assert n == tmoe.NUM_IMAGE_TOKENS
        prompt = ('<|im_start|>user\n<|vision_start|>' + tmoe.IMAGE_TOKEN * n + '<|vision_end|>' + tmoe.QUESTION +
                  '<|im_end|>\n<|im_start|>assistant\n')
        ids = tok(prompt, return_tensors='pt')['input_ids']
        with torch.no_grad():
            out = model(input_ids=ids, mm_token_type_ids=(ids == model.config.image_token_id).long(), **pixels)
        assert torch.isfinite(out.logits).all()
        return out.logits[0, -1]

    red = logits(Image.open(row['images'][0]))
    other = logits(Image.new('RGB', (tmoe.IMAGE_SIZE, tmoe.IMAGE_SIZE), (0, 0, 0)))
    assert not torch.allclose(red, other)


def test_lora_on_the_fused_experts_trains_them(moe):
    """peft's target_parameters puts LoRA on the fused 3-D expert weights of every MoE layer (target_modules reaches
    only nn.Linear: attention and router); one backward gives the expert adapters a gradient."""
    import torch
    from peft import LoraConfig, get_peft_model
    model = get_peft_model(tmoe.load_model(moe.student), LoraConfig(
        r=4, lora_alpha=16, target_modules=r'.*language_model.*\.(q_proj|v_proj)',
        target_parameters=list(EXPERT_PARAMETERS), init_lora_weights=False))
    expert_lora = {n: p for n, p in model.named_parameters() if 'experts' in n and 'lora_' in n}
    # 2 layers x 2 fused weights x (A, B)
    assert len(expert_lora) == 2 * 2 * 2, sorted(expert_lora)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in expert_lora.values())


# ---------------------------------------------------------------- swift rlhf
def _needs_swift_path(ws):
    why = tmoe.swift_ready() if ws.family is tmoe else None
    if why is not None:
        pytest.skip(f"ms-swift's qwen3_vl_moe loader and qwen3_vl template import qwen_vl_utils, which does not "
                    f'import here: {why}')


def moe_args(ws, output_dir, **overrides):
    flags = dict(model_type=ws.family.MODEL_TYPE, teacher_model=ws.student, teacher_model_type=ws.family.MODEL_TYPE,
                 template=ws.family.TEMPLATE, per_device_train_batch_size=2, max_steps=2, seed=7, learning_rate=1e-2,
                 max_length=256, save_strategy='steps', save_steps=2, **LORA)
    return base_args(ws, output_dir, **{**flags, **overrides})


def _adapter_keys(run):
    from safetensors import safe_open
    [checkpoint] = run.checkpoints()
    with safe_open(os.path.join(checkpoint, 'adapter_model.safetensors'), 'pt') as f:
        return list(f.keys())


def _assert_self_distilled(run, steps, zero3=False):
    assert f'swift_gkd_plugin {swift_gkd_plugin.__version__}: GKD trainer active' in run.output
    assert ('Using shared base model architecture:\n  - Student model: base_model + LoRA (trainable)\n'
            '  - Teacher model: base_model with LoRA disabled (frozen)') in run.output
    # one copy of the base; transformers' ZeRO-3 loader (each parameter partitioned as it is built) shows no bar
    assert len(re.findall(r'Loading weights:\s+0%', run.output)) == (0 if zero3 else 1)
    assert len(run.losses) == steps and all(math.isfinite(x) and x > 0 for x in run.losses), run.losses
    keys = _adapter_keys(run)
    experts = [k for k in keys if '.mlp.experts.' in k]
    # LoRA A and B on both fused expert weights of both decoder layers
    assert len(experts) == 2 * 2 * 2, keys
    assert not any('visual' in k or 'vision_tower' in k for k in keys), keys  # the vision tower stays frozen


# InternVL off-policy on one process: tests/megatron/test_megatron_multimodal_moe.py's swift rlhf run (and ZeRO-3 below)
@pytest.mark.parametrize('family,mode', [('moe', 'off_policy'), ('moe', 'on_policy'), ('internvl_moe', 'on_policy')])
def test_shared_base_lora_self_distillation_of_a_vision_moe(request, family, tmp_path, mode):
    """``--teacher_model`` = ``--model`` with ``--tuner_type lora``: the teacher is the base with the adapter off,
    reading each row's privileged teacher_prompt (the answer as a hint) with its image; a fresh LoRA (B = 0) would
    give the student the teacher's own outputs without that prompt, so a non-zero loss shows the teacher read it.
    Off-policy (dataset responses) and on-policy (the student samples with transformers' generate). Qwen3-VL-MoE
    where torchvision loads; InternVL3.5-MoE (HF layout) on every machine."""
    moe = request.getfixturevalue(family)
    _needs_swift_path(moe)
    extra = {'lmbda': 0} if mode == 'off_policy' else {'lmbda': 1, 'use_vllm': 'false', 'max_completion_length': 4}
    run = run_swift(moe_args(moe, str(tmp_path / 'out'), **extra), timeout=300)
    _assert_self_distilled(run, steps=2)
    assert [m['mode'] for m in run.modes()] == [mode] * 2


@pytest.mark.parametrize('family', FAMILIES)
def test_shared_base_lora_self_distillation_of_a_vision_moe_under_zero3(request, family, tmp_path):
    """The recipe's set-up: the same under DeepSpeed ZeRO-3 (CPU), off-policy. One rank: ZeRO-3 still holds every
    parameter (the fused experts, their LoRA) partitioned, gathers them for each forward and for the adapter it saves,
    and loads the base through transformers' ZeRO-3 path; a second rank adds only the gloo collectives."""
    moe = request.getfixturevalue(family)
    _needs_swift_path(moe)
    pytest.importorskip('deepspeed')
    run = run_swift(moe_args(moe, str(tmp_path / 'out'), lmbda=0, deepspeed='zero3', fp16='false', use_cpu='true',
                             per_device_train_batch_size=1),
                    env={'NPROC_PER_NODE': '1', 'MASTER_PORT': str(_free_port())}, timeout=300)
    _assert_self_distilled(run, steps=2, zero3=True)


ZERO3_LOAD = """
import os, sys
os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=sys.argv[2], RANK='0', WORLD_SIZE='1', LOCAL_RANK='0',
                  LOCAL_WORLD_SIZE='1')
import deepspeed, torch
from transformers import Qwen3VLMoeForConditionalGeneration
from transformers.integrations import HfDeepSpeedConfig
from transformers.integrations.deepspeed import unset_hf_deepspeed_config
deepspeed.init_distributed('gloo')
config = HfDeepSpeedConfig({'zero_optimization': {'stage': 3}, 'train_batch_size': 1})
sharded = Qwen3VLMoeForConditionalGeneration.from_pretrained(sys.argv[1], dtype=torch.float32)
unset_hf_deepspeed_config()
plain = dict(Qwen3VLMoeForConditionalGeneration.from_pretrained(sys.argv[1], dtype=torch.float32).named_parameters())
differ = []
for name, param in sharded.named_parameters():
    with deepspeed.zero.GatheredParameters([param]):
        if param.shape != plain[name].shape or not torch.equal(param.data, plain[name].data):
            differ.append(name)
print('differ:', differ)
"""


def test_the_checkpoint_loads_the_same_under_zero3(moe):
    """Under DeepSpeed ZeRO-3 (the recipe's set-up) transformers loads the checkpoint's fused experts through
    another path, which transposes them whatever their shape: the released checkpoints' layout, which the builder
    writes, loads there as it does without ZeRO-3 (the layout transformers 5 saves fails there with a size mismatch).
    Runs without ms-swift and torchvision."""
    pytest.importorskip('deepspeed')
    import subprocess
    import sys

    from conftest import OFFLINE_ENV, _free_port
    proc = subprocess.run([sys.executable, '-c', ZERO3_LOAD, moe.student, str(_free_port())], capture_output=True,
                          text=True, timeout=300, env={**os.environ, **OFFLINE_ENV})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert 'differ: []' in proc.stdout, proc.stdout[-3000:]
