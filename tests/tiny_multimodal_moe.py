"""A tiny, fully offline Qwen3-VL-MoE (``qwen3_vl_moe``) vision-language mixture-of-experts model, for the tests of
the product's headline use: shared-base LoRA self-distillation of a multimodal MoE (Qwen3-VL-30B-A3B /
Qwen3-Omni-30B-A3B) -- the teacher is the student's own base with the adapter disabled.

Layout
------
``Qwen3VLMoeForConditionalGeneration`` (transformers >= 4.57): a 1-block Qwen3-VL vision tower (patch 16, spatial
merge 2, one deepstack layer) and a 2-layer Qwen3-VL-MoE decoder with 4 experts, 2 active per token, fused expert
weights (``mlp.experts.gate_up_proj`` / ``mlp.experts.down_proj``: 3-D parameters, not ``nn.Linear``; saved in the
released checkpoints' layout, see :func:`_to_hub_expert_layout`), tied embeddings.  The expert width (12) and
twice it differ from the hidden width (16): transformers tells the two layouts of an expert weight apart by shape
only.

Why the vocabulary is 151,664 rows
----------------------------------
ms-swift's ``qwen3_vl`` template hard-codes the image and video placeholder ids of Qwen's real tokenizer
(``Qwen2VLTemplate.image_token_id = 151655``, ``video_token_id = 151656``), so the tiny tokenizer keeps Qwen's
special tokens at their real ids (``<|endoftext|>`` 151643 ... ``<|video_pad|>`` 151656) beside ~400 byte-level
BPE entries at ids 0-399; the ids in between are unused.  The embedding (tied with the head) thus has 151,664 rows
of width 16: ~2.5 M parameters, ~5 MB in bfloat16 on disk -- the rest of the model is ~60 k parameters.

Processor
---------
``processor_config.json`` of a ``Qwen3VLProcessor``: transformers' ``Qwen2VLImageProcessorPil`` settings (Pillow +
numpy only, patch 16, merge 2, temporal patch 2) and a ``Qwen3VLVideoProcessor``'s (transformers' video processors,
and so ``Qwen3VLProcessor`` itself, need torchvision: see :func:`build_processor`).

What runs where
---------------
transformers and peft run this model with Pillow only.  ms-swift's ``qwen3_vl_moe`` model type and ``qwen3_vl``
template do not: ``Qwen3VLLoader.get_processor`` requires the ``qwen_vl_utils`` distribution (>= 0.0.14) and imports
``qwen_vl_utils.vision_process``, and the template's ``replace_tag`` imports ``qwen_vl_utils.fetch_image``; that
module imports ``torchvision`` at module level, and PyPI's ``torchvision`` wheels (0.28.0 pins ``torch==2.13.0``)
are CUDA builds whose ``_C.so`` needs ``libc10_cuda.so`` / ``libtorch_cuda.so``, absent from torch's CPU build:
``import torchvision`` fails there with ``RuntimeError: operator torchvision::nms does not exist``.  A ``swift rlhf``
run of this model needs a torchvision that loads beside the installed torch (a CPU torchvision wheel from the
PyTorch index on CPU machines; PyPI's on CUDA machines) and ``qwen_vl_utils``: see :func:`swift_ready`.

The task is :mod:`harness.tiny_multimodal`'s (name the colour of a square), with 64 x 64 images
(the smallest that ``qwen_vl_utils.fetch_image`` leaves unscaled: 4 x 4 patches, 4 image tokens after the merge).

This module imports only ``torch``, ``transformers``, ``tokenizers``, ``PIL``, ``safetensors`` and the standard
library -- never ms-swift.  It lives beside the tests (it was kept out of the package's ``testing/`` (now ``demo/``) folder, then
at the 12 modules ``tests/test_architecture.py`` allows a folder).
"""
from __future__ import annotations

import json
import os
import random
from typing import Any, Dict, List, Optional, Tuple

import torch

from swift_gkd_plugin.demo.tiny import read_dataset, write_dataset  # noqa: F401 (part of this API)
from harness.tiny_multimodal import COLORS, QUESTION

__all__ = [
    'MODEL_TYPE', 'TEMPLATE', 'COLORS', 'QUESTION', 'QWEN_SPECIAL_TOKENS', 'IMAGE_TOKEN', 'IMAGE_SIZE', 'PATCH_SIZE',
    'MERGE_SIZE', 'NUM_IMAGE_TOKENS', 'NUM_EXPERTS', 'VOCAB_SIZE', 'CHAT_TEMPLATE', 'build_tokenizer',
    'build_processor', 'build_model', 'load_model', 'load_processor', 'load_image_processor', 'count_parameters',
    'write_images', 'make_rows', 'write_dataset', 'read_dataset', 'swift_ready', 'build_workspace',
]

#: ms-swift model type and template (``--model_type`` / ``--template``).
MODEL_TYPE: str = 'qwen3_vl_moe'
TEMPLATE: str = 'qwen3_vl'

#: Qwen's special tokens at their real ids (151643 + index): ms-swift's Qwen-VL templates hard-code some of them.
QWEN_SPECIAL_TOKENS: Tuple[str, ...] = (
    '<|endoftext|>', '<|im_start|>', '<|im_end|>', '<|object_ref_start|>', '<|object_ref_end|>', '<|box_start|>',
    '<|box_end|>', '<|quad_start|>', '<|quad_end|>', '<|vision_start|>', '<|vision_end|>', '<|vision_pad|>',
    '<|image_pad|>', '<|video_pad|>')
_FIRST_SPECIAL_ID: int = 151643
IMAGE_TOKEN: str = '<|image_pad|>'
#: the model's vocab_size: the last special id + 1, rounded up to a multiple of 8
VOCAB_SIZE: int = (_FIRST_SPECIAL_ID + len(QWEN_SPECIAL_TOKENS) + 7) // 8 * 8

IMAGE_SIZE: int = 64
PATCH_SIZE: int = 16
MERGE_SIZE: int = 2
NUM_IMAGE_TOKENS: int = (IMAGE_SIZE // PATCH_SIZE // MERGE_SIZE)**2
NUM_EXPERTS: int = 4

_BPE_VOCAB_SIZE: int = 400

#: A Qwen3-VL-style ChatML template (content may be a string or a list of image/text parts).
CHAT_TEMPLATE: str = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for part in message['content'] %}"
    "{%- if part['type'] == 'image' %}{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif part['type'] == 'text' %}{{- part['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")


def _tokenizer_corpus() -> List[str]:
    rng = random.Random(7)
    names = list(COLORS)
    texts = []
    for _ in range(300):
        texts.append(f'user\n{QUESTION}\nassistant\n{rng.choice(names)}')
        texts.append(f'Look closely. {QUESTION} The answer is {rng.choice(names)}.')
    texts += ['The square is red. The square is green. The square is blue. A yellow, purple or orange square.',
              'system user assistant image color colour think hint privileged teacher',
              '0 1 2 3 4 5 6 7 8 9 . , ; : ? ! ( ) [ ] " \' - + * / = < > |',
              'abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ'] * 20
    return texts


def build_tokenizer(out_dir: str):
    """A tiny byte-level BPE tokenizer (~400 entries at ids 0-399) with Qwen's special tokens at their real ids
    (:data:`QWEN_SPECIAL_TOKENS`), saved into ``out_dir``; every colour name is one token.  Returns the loaded
    ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from swift_gkd_plugin.demo.tiny import train_bpe
    spec = json.loads(train_bpe(_tokenizer_corpus(), [], _BPE_VOCAB_SIZE).to_str())
    added = []
    for i, token in enumerate(QWEN_SPECIAL_TOKENS):
        # in the model's vocab too: the tokenizers library renumbers added tokens that are not
        spec['model']['vocab'][token] = _FIRST_SPECIAL_ID + i
        added.append(dict(id=_FIRST_SPECIAL_ID + i, content=token, single_word=False, lstrip=False, rstrip=False,
                          normalized=False, special=True))
    spec['added_tokens'] = added
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
        eos_token='<|im_end|>',
        pad_token='<|endoftext|>',
        model_max_length=1024,
        padding_side='right',
        clean_up_tokenization_spaces=False,
        chat_template=CHAT_TEMPLATE,
    )
    assert hf_tok.convert_tokens_to_ids(IMAGE_TOKEN) == 151655
    for name in COLORS:
        assert len(hf_tok.encode(name, add_special_tokens=False)) == 1, name
    os.makedirs(out_dir, exist_ok=True)
    hf_tok.save_pretrained(out_dir)
    return PreTrainedTokenizerFast.from_pretrained(out_dir)


def _image_processor():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    factor = PATCH_SIZE * MERGE_SIZE
    return Qwen2VLImageProcessorPil(
        size={'shortest_edge': (IMAGE_SIZE // factor)**2 * factor**2, 'longest_edge': 16 * factor**2},
        patch_size=PATCH_SIZE, temporal_patch_size=2, merge_size=MERGE_SIZE,
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])


def build_processor(out_dir: str, tokenizer) -> str:
    """Save a ``Qwen3VLProcessor``'s files into ``out_dir`` (``processor_config.json``: the PIL-backend
    ``Qwen2VLImageProcessorPil``'s settings -- images resized to multiples of 32 pixels between 64 x 64 and
    128 x 128 -- and a ``Qwen3VLVideoProcessor``'s; ``chat_template.jinja``; the tokenizer) and return ``out_dir``.

    Written as JSON, not with ``Qwen3VLProcessor(...).save_pretrained``: transformers 5.19 cannot instantiate a
    ``Qwen3VLProcessor`` without torchvision, not even with ``video_processor=None`` (its argument check looks the
    video processor class up in ``VIDEO_PROCESSOR_MAPPING``, a placeholder without torchvision: ``AttributeError:
    type object 'VIDEO_PROCESSOR_MAPPING' has no attribute '_extra_content'``).  Where torchvision loads,
    ``AutoProcessor`` reads these files back as a ``Qwen3VLProcessor``; :func:`load_image_processor` reads the image
    part with Pillow only."""
    image = _image_processor().to_dict()
    image['image_processor_type'] = 'Qwen2VLImageProcessor'  # what save_pretrained writes for either backend
    video = dict(image, video_processor_type='Qwen3VLVideoProcessor', do_sample_frames=True, fps=2, min_frames=4,
                 max_frames=16, size={'shortest_edge': 4 * 32 * 32, 'longest_edge': 16 * 32 * 32 * 2})
    video.pop('image_processor_type')
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, 'processor_config.json'), 'w') as f:
        json.dump({'image_processor': image, 'processor_class': 'Qwen3VLProcessor', 'video_processor': video}, f,
                  indent=2, sort_keys=True)
    with open(os.path.join(out_dir, 'chat_template.jinja'), 'w') as f:
        f.write(CHAT_TEMPLATE)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def load_image_processor(model_dir: str):
    """The model's image processor, PIL backend (Pillow and numpy only)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    with open(os.path.join(model_dir, 'processor_config.json')) as f:
        config = json.load(f)['image_processor']
    config.pop('image_processor_type', None)
    return Qwen2VLImageProcessorPil(**config)


def load_processor(model_dir: str):
    """The full ``Qwen3VLProcessor`` (needs torchvision, see :func:`build_processor`)."""
    from transformers import AutoProcessor
    return AutoProcessor.from_pretrained(model_dir)


def build_model(out_dir: str, tokenizer_or_dir, *, hidden_size: int = 16, num_layers: int = 2, num_heads: int = 2,
                num_kv_heads: int = 1, num_experts: int = NUM_EXPERTS, experts_per_token: int = 2,
                moe_intermediate_size: int = 12, vision_hidden_size: int = 16, vision_depth: int = 1,
                seed: int = 0) -> str:
    """Create a randomly initialised tiny ``Qwen3VLMoeForConditionalGeneration`` and save it (bfloat16 weights,
    with its tokenizer and processor) into ``out_dir``; return ``out_dir``.  Deterministic for a given ``seed``
    (the global RNG state is left untouched)."""
    from transformers import (GenerationConfig, PreTrainedTokenizerFast, Qwen3VLMoeConfig,
                              Qwen3VLMoeForConditionalGeneration)
    tokenizer = (PreTrainedTokenizerFast.from_pretrained(os.fspath(tokenizer_or_dir))
                 if isinstance(tokenizer_or_dir, (str, os.PathLike)) else tokenizer_or_dir)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    head_dim = hidden_size // num_heads
    quarter = head_dim // 2 // 4
    text_config = dict(
        vocab_size=VOCAB_SIZE, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        head_dim=head_dim, max_position_embeddings=1024, tie_word_embeddings=True,
        num_experts=num_experts, num_experts_per_tok=experts_per_token, moe_intermediate_size=moe_intermediate_size,
        decoder_sparse_step=1, mlp_only_layers=[],
        rope_parameters=dict(rope_type='default', rope_theta=5000000.0,
                             mrope_section=[head_dim // 2 - 2 * quarter, quarter, quarter], mrope_interleaved=True),
        bos_token_id=None, eos_token_id=ids['<|im_end|>'], pad_token_id=ids['<|endoftext|>'])
    vision_config = dict(
        depth=vision_depth, hidden_size=vision_hidden_size, intermediate_size=2 * vision_hidden_size, num_heads=2,
        patch_size=PATCH_SIZE, spatial_merge_size=MERGE_SIZE, temporal_patch_size=2, out_hidden_size=hidden_size,
        num_position_embeddings=64, deepstack_visual_indexes=[0])
    config = Qwen3VLMoeConfig(
        text_config=text_config, vision_config=vision_config, image_token_id=ids['<|image_pad|>'],
        video_token_id=ids['<|video_pad|>'], vision_start_token_id=ids['<|vision_start|>'],
        vision_end_token_id=ids['<|vision_end|>'], tie_word_embeddings=True)
    config.eos_token_id, config.pad_token_id = ids['<|im_end|>'], ids['<|endoftext|>']
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3VLMoeForConditionalGeneration(config).to(torch.bfloat16)
    model.generation_config = GenerationConfig(eos_token_id=ids['<|im_end|>'], pad_token_id=ids['<|endoftext|>'])
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    _to_hub_expert_layout(out_dir)
    tokenizer.save_pretrained(out_dir)
    build_processor(out_dir, tokenizer)
    return out_dir


def _to_hub_expert_layout(model_dir: str) -> None:
    """Store the fused expert weights as the released Qwen3-VL-MoE checkpoints do (transformers 4.57's layout):
    ``gate_up_proj`` ``[experts, hidden, 2 * moe_intermediate]``, ``down_proj`` ``[experts, moe_intermediate,
    hidden]``.  transformers 5's modules hold their transposes, and its ``save_pretrained`` writes those; its loader
    transposes a tensor whose shape is not the module's (``Transpose(1, 2, check_dims=True)``).  Under DeepSpeed ZeRO-3
    that check sees the partitioned placeholder (shape ``[0]``) and always transposes: the hub layout loads, the
    layout transformers 5 saves does not (``size mismatch for ...experts.gate_up_proj``)."""
    from safetensors.torch import load_file, save_file
    path = os.path.join(model_dir, 'model.safetensors')
    weights = load_file(path)
    for name in list(weights):
        if name.endswith(('mlp.experts.gate_up_proj', 'mlp.experts.down_proj')):
            weights[name] = weights[name].transpose(1, 2).contiguous()
    save_file(weights, path, metadata={'format': 'pt'})


def load_model(model_dir: str):
    from transformers import Qwen3VLMoeForConditionalGeneration
    return Qwen3VLMoeForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32)


def count_parameters(model_or_dir) -> int:
    model = load_model(os.fspath(model_or_dir)) if isinstance(model_or_dir, (str, os.PathLike)) else model_or_dir
    return sum(p.numel() for p in model.parameters())


_BACKGROUNDS = {'white': (255, 255, 255), 'black': (0, 0, 0)}


def write_images(image_dir: str) -> Dict[Tuple[str, str], str]:
    """One :data:`IMAGE_SIZE` x :data:`IMAGE_SIZE` PNG per (colour, background): a filled square covering the middle
    3/4.  Returns ``{(colour, background): absolute path}``."""
    from PIL import Image, ImageDraw
    os.makedirs(image_dir, exist_ok=True)
    paths = {}
    for name, rgb in COLORS.items():
        for bg_name, bg in _BACKGROUNDS.items():
            path = os.path.abspath(os.path.join(image_dir, f'{name}_{bg_name}.png'))
            if not os.path.exists(path):
                img = Image.new('RGB', (IMAGE_SIZE, IMAGE_SIZE), bg)
                m = IMAGE_SIZE // 8
                ImageDraw.Draw(img).rectangle([m, m, IMAGE_SIZE - 1 - m, IMAGE_SIZE - 1 - m], fill=rgb)
                tmp = f'{path}.tmp{os.getpid()}.png'
                img.save(tmp, format='PNG')
                os.replace(tmp, path)
            paths[(name, bg_name)] = path
    return paths


def make_rows(images: Dict[Tuple[str, str], str], n: int, seed: int = 0,
              teacher_prompt: bool = True) -> List[Dict[str, Any]]:
    """``n`` rows in ms-swift's ``messages`` + ``images`` format; with ``teacher_prompt`` also a privileged
    ``teacher_prompt`` (the teacher's user turn: the answer given as a hint, with the same ``<image>``)::

        {"messages": [{"role": "user", "content": "<image>What color is the square?"},
                      {"role": "assistant", "content": "red"}],
         "images": ["/abs/red_white.png"],
         "teacher_prompt": "<image>Hint: the square is red. What color is the square?"}
    """
    keys = sorted(images)
    random.Random(seed).shuffle(keys)
    rows = []
    for i in range(n):
        colour, bg = keys[i % len(keys)]
        row = {'messages': [{'role': 'user', 'content': f'<image>{QUESTION}'},
                            {'role': 'assistant', 'content': colour}],
               'images': [images[(colour, bg)]]}
        if teacher_prompt:
            row['teacher_prompt'] = f'<image>Hint: the square is {colour}. {QUESTION}'
        rows.append(row)
    return rows


def swift_ready() -> Optional[str]:
    """``None`` where ms-swift can run this model type (``qwen_vl_utils.vision_process`` imports, and with it
    ``torchvision``), else why not: each failing import and its error."""
    import importlib
    problems = []
    for name in ('torchvision', 'qwen_vl_utils.vision_process'):  # what ms-swift's Qwen3-VL loader and template import
        try:
            importlib.import_module(name)
        except Exception as e:  # ImportError, or RuntimeError from a torchvision built for another torch
            problems.append(f'import {name}: {type(e).__name__}: {e}')
    return '; '.join(problems) or None


def build_workspace(root: str, n_rows: int = 4, seed: int = 0) -> Dict[str, Any]:
    """``root/model`` (the tiny model), ``root/images`` and ``root/train.jsonl`` (``n_rows`` image rows with a
    ``teacher_prompt`` column).  Returns their paths."""
    tok = build_tokenizer(os.path.join(root, 'tok'))
    model = build_model(os.path.join(root, 'model'), tok, seed=seed)
    images = write_images(os.path.join(root, 'images'))
    train = write_dataset(os.path.join(root, 'train.jsonl'), make_rows(images, n_rows, seed=seed))
    return {'root': root, 'model': model, 'images': images, 'train': train}
