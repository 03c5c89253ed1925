"""A tiny, fully offline InternVL3.5-MoE in Hugging Face format (ms-swift ``--model_type internvl``, template
``internvl_hf``; the released ``OpenGVLab/InternVL3_5-30B-A3B-HF`` is this layout): the multimodal mixture-of-experts
family that runs without torchvision, so CI can run the product's headline use on it (``tiny_multimodal_moe``'s
Qwen3-VL-MoE needs torchvision in ms-swift's loader and template).

Layout
------
``InternVLForConditionalGeneration``: a 1-layer InternVL vision tower (patch 14 on 56 x 56 images, pixel shuffle
0.5: 4 image tokens an image), a 2-layer MLP projector, and a 2-layer Qwen3-MoE decoder (4 experts, 2 active per
token, fused expert weights in transformers 5). The tokenizer is :mod:`swift_gkd_plugin.demo.tiny`'s (ChatML,
442 tokens) with InternVL's ``<img>``, ``</img>``, ``<IMG_CONTEXT>`` and ``<video>``.

Processor
---------
transformers 5.19's ``InternVLProcessor`` always builds a video processor, and its video processors need
torchvision (``requires `torchvision` to be installed``), even for image rows. The model folder therefore ships
its processor as remote code, as hub models do (``processor_config.json``'s ``auto_map``;
:data:`PROCESSOR_CODE`): InternVL's processor without the video part. Images go through transformers'
``GotOcr2ImageProcessor`` (its PIL backend where torchvision is absent). ms-swift loads processors with
``trust_remote_code=True``.

The task and images are :mod:`tiny_multimodal_moe`'s (name the colour of a square; the teacher's prompt gives the
answer). This module imports only ``torch``, ``transformers``, ``PIL``, the standard library and the tiny
builders, never ms-swift.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict

import torch

from tiny_multimodal_moe import make_rows, write_images

from swift_gkd_plugin.demo.tiny import build_tokenizer, write_dataset

MODEL_TYPE: str = 'internvl'
TEMPLATE: str = 'internvl_hf'
IMAGE_SIZE: int = 56
PATCH_SIZE: int = 14
NUM_IMAGE_TOKENS: int = int((IMAGE_SIZE // PATCH_SIZE)**2 * 0.5**2)
NUM_EXPERTS: int = 4
#: InternVL's image tokens, named as its tokenizer names them (``extra_special_tokens``)
IMAGE_TOKENS: Dict[str, str] = dict(start_image_token='<img>', end_image_token='</img>',
                                    context_image_token='<IMG_CONTEXT>', video_token='<video>')

#: ``processing_image_only_internvl.py`` of the model folder
PROCESSOR_CODE: str = '''"""InternVL's processor for images only: transformers' video processors need torchvision."""
from transformers import InternVLProcessor
from transformers.processing_utils import ProcessorMixin


class ImageOnlyInternVLProcessor(InternVLProcessor):

    def __init__(self, image_processor=None, tokenizer=None, image_seq_length: int = 256, chat_template=None,
                 **kwargs):
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)
        self.image_seq_length = image_seq_length
        self.start_image_token = tokenizer.start_image_token
        self.end_image_token = tokenizer.end_image_token
        self.start_image_token_id = tokenizer.start_image_token_id
        self.end_image_token_id = tokenizer.end_image_token_id
        self.image_token = tokenizer.context_image_token
        self.video_token = tokenizer.video_token
        self.image_token_id = tokenizer.context_image_token_id
        self.multimodal_pattern = None
'''


def build_model(out_dir: str, *, hidden_size: int = 64, seed: int = 0) -> str:
    """Create the randomly initialised tiny model with its tokenizer and processor in ``out_dir`` (float32);
    deterministic for a given ``seed``. Returns ``out_dir``."""
    from transformers import (AutoTokenizer, GenerationConfig, GotOcr2ImageProcessorPil, InternVLConfig,
                              InternVLForConditionalGeneration)
    os.makedirs(out_dir, exist_ok=True)
    tok_dir = os.path.join(os.path.dirname(os.path.abspath(out_dir)), 'tok')
    build_tokenizer(tok_dir)
    tok = AutoTokenizer.from_pretrained(tok_dir, extra_special_tokens=IMAGE_TOKENS)
    tok.add_special_tokens({'additional_special_tokens': list(IMAGE_TOKENS.values())})
    im_end, pad = tok.convert_tokens_to_ids('<|im_end|>'), tok.convert_tokens_to_ids('<|endoftext|>')
    config = InternVLConfig(
        text_config=dict(model_type='qwen3_moe', vocab_size=(len(tok) + 7) // 8 * 8, hidden_size=hidden_size,
                         intermediate_size=2 * hidden_size, moe_intermediate_size=hidden_size // 2,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=hidden_size // 4,
                         num_experts=NUM_EXPERTS, num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[],
                         max_position_embeddings=1024, tie_word_embeddings=False, eos_token_id=im_end,
                         pad_token_id=pad),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=[IMAGE_SIZE, IMAGE_SIZE], patch_size=[PATCH_SIZE, PATCH_SIZE]),
        image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKENS['context_image_token']),
        # untied at the top level too (transformers' default ties it): mcore-bridge reads the text config's False and
        # expects an lm_head, which a tied checkpoint lacks (its output layer then stays uninitialised)
        image_seq_length=NUM_IMAGE_TOKENS, downsample_ratio=0.5, tie_word_embeddings=False)
    config.eos_token_id, config.pad_token_id = im_end, pad
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = InternVLForConditionalGeneration(config).to(torch.float32)
    model.generation_config = GenerationConfig(eos_token_id=im_end, pad_token_id=pad)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    GotOcr2ImageProcessorPil(size={'height': IMAGE_SIZE, 'width': IMAGE_SIZE}, crop_to_patches=True, min_patches=1,
                             max_patches=1).save_pretrained(out_dir)
    with open(os.path.join(out_dir, 'processing_image_only_internvl.py'), 'w') as f:
        f.write(PROCESSOR_CODE)
    with open(os.path.join(out_dir, 'processor_config.json'), 'w') as f:
        json.dump({'processor_class': 'ImageOnlyInternVLProcessor', 'image_seq_length': NUM_IMAGE_TOKENS,
                   'auto_map': {'AutoProcessor': 'processing_image_only_internvl.ImageOnlyInternVLProcessor'}}, f)
    return out_dir


def load_model(model_dir: str):
    from transformers import InternVLForConditionalGeneration
    return InternVLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32)


def build_workspace(root: str, n_rows: int = 4, seed: int = 0) -> Dict[str, Any]:
    """``root/model``, ``root/images`` and ``root/train.jsonl`` (``n_rows`` image rows with a ``teacher_prompt``)."""
    model = build_model(os.path.join(root, 'model'), seed=seed)
    images = write_images(os.path.join(root, 'images'))
    train = write_dataset(os.path.join(root, 'train.jsonl'), make_rows(images, n_rows, seed=seed))
    return {'root': root, 'model': model, 'images': images, 'train': train}
