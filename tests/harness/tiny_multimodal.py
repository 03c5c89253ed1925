"""Tiny, fully offline vision-language models (LLaVA-1.5 layout) and an image task, for the multimodal tests.

Everything is built from scratch on the local machine (no network, no downloads) and is small enough that a
few ``swift rlhf --rlhf_type gkd`` steps take seconds on a couple of CPU cores.

Why LLaVA-1.5 (``llava-hf`` layout)
-----------------------------------
ms-swift 4.6 registers it as model type ``llava1_5_hf`` with template ``llava1_5_hf``
(``LlavaForConditionalGeneration``: a CLIP vision tower, a 2-layer MLP projector and a Llama decoder), and
its whole image path -- ms-swift's ``LlavaHfTemplate`` and transformers' PIL-backend ``CLIPImageProcessorPil``
-- needs only Pillow and numpy.  The Qwen-VL / Qwen-Omni templates call ``qwen_vl_utils`` /
``qwen_omni_utils``, which import ``torchvision`` at module level; the PyPI ``torchvision`` wheels are CUDA
builds that cannot load next to the CPU build of torch, so those families cannot run in a CPU-only
environment without a CPU torchvision wheel (from the PyTorch index).

The task
--------
*Name the colour of a square.*  Each row shows one PNG (a filled square of one of :data:`COLORS` on a
white or black background, of a few sizes) and asks ``"<image>What color is the square?"``; the answer is
the colour name (one token).  The image is the only place the answer can come from, so a model that learns
the task has to use its vision tower.

Chat format
-----------
ms-swift's ``llava1_5_hf`` template::

    <s>USER: <image>\\nWhat color is the square?\\nASSISTANT:{answer}</s>

where the single ``<image>`` placeholder is expanded to ``(IMAGE_SIZE // PATCH_SIZE) ** 2`` image tokens
(4 with the defaults) by the template.

Typical use::

    from harness import tiny_multimodal as tmm
    ws = tmm.build_workspace('/tmp/mm')
    # ws['student'], ws['teacher'], ws['train'] (jsonl with 'messages' and 'images'), ws['images'] ...

This module imports only ``torch``, ``transformers``, ``tokenizers``, ``PIL`` and the standard library --
never ms-swift.
"""
from __future__ import annotations

import os
import random
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from swift_gkd_plugin.demo.tiny import read_dataset, write_dataset  # noqa: F401 (part of this API)

__all__ = [
    'MODEL_TYPE', 'TEMPLATE', 'COLORS', 'QUESTION', 'IMAGE_TOKEN', 'IMAGE_SIZE', 'PATCH_SIZE', 'NUM_IMAGE_TOKENS',
    'SPECIAL_TOKENS', 'STUDENT_KWARGS', 'TEACHER_KWARGS', 'CHAT_TEMPLATE',
    'build_tokenizer', 'build_processor', 'build_model', 'load_model', 'load_processor', 'count_parameters',
    'write_images', 'make_rows', 'write_dataset', 'read_dataset', 'train', 'answers', 'accuracy', 'build_workspace',
]

#: ms-swift model type and template of the tiny models (pass them as ``--model_type`` / ``--template``).
MODEL_TYPE: str = 'llava1_5_hf'
TEMPLATE: str = 'llava1_5_hf'

#: Colours of the squares: name -> RGB.  Every name is one token of the tokenizer.
COLORS: Dict[str, Tuple[int, int, int]] = {
    'red': (220, 30, 30),
    'green': (30, 180, 40),
    'blue': (30, 60, 220),
    'yellow': (240, 220, 30),
    'purple': (140, 40, 170),
    'orange': (250, 140, 20),
}
#: The user message of every row (after the ``<image>`` tag).
QUESTION: str = 'What color is the square?'
IMAGE_TOKEN: str = '<image>'
#: Tokenizer special tokens, in id order: pad, bos, eos, image placeholder.
SPECIAL_TOKENS: Tuple[str, ...] = ('<pad>', '<s>', '</s>', IMAGE_TOKEN)

#: Side of the (square) image the vision tower sees, and its patch size: (28 // 14) ** 2 = 4 patches (+ CLS,
#: which the ``default`` feature-select strategy drops), i.e. 4 image tokens per image.
IMAGE_SIZE: int = 28
PATCH_SIZE: int = 14
NUM_IMAGE_TOKENS: int = (IMAGE_SIZE // PATCH_SIZE)**2

#: Target size of the trained BPE vocabulary (bytes + merges + the special tokens); deliberately not a multiple of 8
#: (the model's vocab_size is rounded up, as with real checkpoints).
_BPE_VOCAB_SIZE: int = 330

#: Model sizes (keyword arguments of :func:`build_model`).
STUDENT_KWARGS: Dict[str, int] = dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128,
                                      vision_hidden_size=32, vision_layers=2)
TEACHER_KWARGS: Dict[str, int] = dict(hidden_size=96, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=192,
                                      vision_hidden_size=48, vision_layers=2)

#: Jinja chat template equivalent to ms-swift's ``llava1_5_hf`` template (content may be a string or a list of
#: ``{"type": "image"}`` / ``{"type": "text", "text": ...}`` parts).
CHAT_TEMPLATE: str = (
    "{{- '<s>' }}"
    "{%- for message in messages %}"
    "{%- if message['content'] is string %}{%- set text = message['content'] %}"
    "{%- else %}{%- set text = namespace(v='') %}"
    "{%- for part in message['content'] %}"
    "{%- if part['type'] == 'image' %}{%- set text.v = text.v + '<image>\\n' %}"
    "{%- else %}{%- set text.v = text.v + part['text'] %}{%- endif %}"
    "{%- endfor %}{%- set text = text.v %}{%- endif %}"
    "{%- if message['role'] == 'system' %}{{- text + '\\n' }}"
    "{%- elif message['role'] == 'user' %}{{- 'USER: ' + text + '\\nASSISTANT:' }}"
    "{%- else %}{{- text + '</s>' }}{%- endif %}"
    "{%- endfor %}")

# ----------------------------------------------------------------------------------------------------------------------
# Tokenizer and processor
# ----------------------------------------------------------------------------------------------------------------------


def _tokenizer_corpus() -> List[str]:
    rng = random.Random(7)
    texts = []
    names = list(COLORS)
    for _ in range(500):
        texts.append(f'USER: \n{QUESTION}\nASSISTANT:{rng.choice(names)}')
        texts.append(f'ASSISTANT: {rng.choice(names)}')
    texts += ['The square is red. The square is green. The square is blue. A yellow, purple or orange square.',
              'Hello world! A tiny tokenizer for tests. USER: ASSISTANT: system user assistant image color colour',
              '0 1 2 3 4 5 6 7 8 9 . , ; : ? ! ( ) [ ] " \' - + * / =',
              'abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ'] * 20
    return texts


def build_tokenizer(out_dir: str):
    """Train a tiny byte-level BPE tokenizer (LLaVA-1.5 conventions) and save it into ``out_dir``.

    ``<pad>`` (id 0), ``<s>`` (bos, id 1), ``</s>`` (eos, id 2) and ``<image>`` (id 3) are special tokens; every
    colour name of :data:`COLORS` (with or without a leading space) is a single token.  No tokens are added
    automatically (ms-swift's template writes ``<s>`` itself).  Deterministic.  Returns the loaded
    ``PreTrainedTokenizerFast``.
    """
    from transformers import PreTrainedTokenizerFast

    from swift_gkd_plugin.demo.tiny import train_bpe
    tok = train_bpe(_tokenizer_corpus(), SPECIAL_TOKENS, _BPE_VOCAB_SIZE)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token='<s>',
        eos_token='</s>',
        pad_token='<pad>',
        extra_special_tokens={'image_token': IMAGE_TOKEN},
        model_max_length=512,
        padding_side='right',
        clean_up_tokenization_spaces=False,
        chat_template=CHAT_TEMPLATE,
    )
    for name in COLORS:
        for text in (name, ' ' + name):
            ids = hf_tok.encode(text, add_special_tokens=False)
            assert len(ids) == 1, f'{text!r} is not one token: {ids}'
    os.makedirs(out_dir, exist_ok=True)
    hf_tok.save_pretrained(out_dir)
    return PreTrainedTokenizerFast.from_pretrained(out_dir)


def build_processor(out_dir: str, tokenizer, image_size: int = IMAGE_SIZE, patch_size: int = PATCH_SIZE):
    """A ``LlavaProcessor`` (PIL-backend CLIP image processor + ``tokenizer``) saved into ``out_dir``.

    The image processor resizes the shortest edge to ``image_size``, centre-crops to ``image_size x image_size`` and
    normalises with CLIP's mean/std; the processor expands ``<image>`` into ``(image_size // patch_size) ** 2``
    tokens.  It needs Pillow and numpy only; where torchvision is installed, transformers may load its torchvision
    twin (same outputs).
    """
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    image_processor = CLIPImageProcessorPil(size={'shortest_edge': image_size},
                                            crop_size={'height': image_size, 'width': image_size})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
                               vision_feature_select_strategy='default', num_additional_image_tokens=1,
                               image_token=IMAGE_TOKEN, chat_template=CHAT_TEMPLATE)
    processor.save_pretrained(out_dir)
    return processor


def load_processor(model_dir: str):
    from transformers import AutoProcessor
    return AutoProcessor.from_pretrained(model_dir)


# ----------------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------------


def build_model(out_dir: str,
                tokenizer_or_dir,
                *,
                hidden_size: int = 64,
                num_layers: int = 2,
                num_heads: int = 4,
                num_kv_heads: int = 2,
                intermediate_size: int = 128,
                vision_hidden_size: int = 32,
                vision_layers: int = 2,
                vision_heads: int = 2,
                image_size: int = IMAGE_SIZE,
                patch_size: int = PATCH_SIZE,
                seed: int = 0) -> str:
    """Create a randomly initialised tiny ``LlavaForConditionalGeneration`` and save it (with its tokenizer and
    processor) into ``out_dir``; return ``out_dir``.

    * vision tower: CLIP, ``image_size`` x ``image_size`` images (:data:`IMAGE_SIZE`), ``patch_size`` patches
      (:data:`PATCH_SIZE`), ``vision_layers`` layers of width ``vision_hidden_size``; features of the
      second-to-last layer, CLS dropped (``vision_feature_layer=-2``, ``vision_feature_select_strategy='default'``),
      like llava-1.5;
    * projector: ``Linear-GELU-Linear`` to the decoder width;
    * decoder: Llama, ``vocab_size = len(tokenizer)`` rounded up to a multiple of 8, untied head,
      ``max_position_embeddings=512``;
    * ``image_token_id = id('<image>')``, ``bos/eos/pad`` = ``<s>``/``</s>``/``<pad>`` in the configs and in
      ``generation_config.json``.

    Deterministic for a given ``seed`` (the global RNG state is left untouched).
    """
    from transformers import (CLIPVisionConfig, GenerationConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, PreTrainedTokenizerFast)

    tokenizer = (PreTrainedTokenizerFast.from_pretrained(os.fspath(tokenizer_or_dir))
                 if isinstance(tokenizer_or_dir, (str, os.PathLike)) else tokenizer_or_dir)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    vocab_size = (len(tokenizer) + 7) // 8 * 8
    text_config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=hidden_size // num_heads,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=ids['<s>'],
        eos_token_id=ids['</s>'],
        pad_token_id=ids['<pad>'],
    )
    vision_config = CLIPVisionConfig(
        hidden_size=vision_hidden_size,
        intermediate_size=2 * vision_hidden_size,
        projection_dim=vision_hidden_size,
        num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads,
        image_size=image_size,
        patch_size=patch_size,
    )
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=ids[IMAGE_TOKEN],
        projector_hidden_act='gelu',
        vision_feature_select_strategy='default',
        vision_feature_layer=-2,
        image_seq_length=(image_size // patch_size)**2,
        tie_word_embeddings=False,
    )
    for key in ('bos_token_id', 'eos_token_id', 'pad_token_id'):
        setattr(config, key, getattr(text_config, key))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config).to(torch.float32)
    model.generation_config = GenerationConfig(bos_token_id=ids['<s>'], eos_token_id=ids['</s>'],
                                               pad_token_id=ids['<pad>'])
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    build_processor(out_dir, tokenizer, image_size, patch_size)
    return out_dir


def load_model(model_dir: str):
    from transformers import LlavaForConditionalGeneration
    return LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32)


def count_parameters(model_or_dir) -> int:
    model = load_model(os.fspath(model_or_dir)) if isinstance(model_or_dir, (str, os.PathLike)) else model_or_dir
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------------------------------------------
# Images and dataset
# ----------------------------------------------------------------------------------------------------------------------

_SIZES = (32, 40, 48)
_BACKGROUNDS = {'white': (255, 255, 255), 'black': (0, 0, 0)}


def write_images(image_dir: str) -> Dict[Tuple[str, str, int], str]:
    """Write one PNG per (colour, background, size): a filled square of the colour covering the middle 3/4 of an
    RGB canvas of ``size`` x ``size`` pixels.  Returns ``{(colour, background, size): absolute path}``."""
    from PIL import Image, ImageDraw
    os.makedirs(image_dir, exist_ok=True)
    paths = {}
    for name, rgb in COLORS.items():
        for bg_name, bg in _BACKGROUNDS.items():
            for size in _SIZES:
                path = os.path.abspath(os.path.join(image_dir, f'{name}_{bg_name}_{size}.png'))
                if not os.path.exists(path):
                    img = Image.new('RGB', (size, size), bg)
                    margin = size // 8
                    ImageDraw.Draw(img).rectangle([margin, margin, size - 1 - margin, size - 1 - margin], fill=rgb)
                    tmp = f'{path}.tmp{os.getpid()}.png'
                    img.save(tmp, format='PNG')
                    os.replace(tmp, path)
                paths[(name, bg_name, size)] = path
    return paths


def make_rows(images: Dict[Tuple[str, str, int], str], n: int, seed: int = 0) -> List[Dict[str, Any]]:
    """``n`` rows in ms-swift's multimodal ``messages`` + ``images`` format, cycling through shuffled images::

        {"messages": [{"role": "user", "content": "<image>What color is the square?"},
                      {"role": "assistant", "content": "red"}],
         "images": ["/abs/path/red_white_32.png"]}
    """
    keys = sorted(images)
    random.Random(seed).shuffle(keys)
    rows = []
    for i in range(n):
        color, _, _ = key = keys[i % len(keys)]
        rows.append({
            'messages': [{'role': 'user', 'content': f'{IMAGE_TOKEN}{QUESTION}'},
                         {'role': 'assistant', 'content': color}],
            'images': [images[key]],
        })
    return rows


# ----------------------------------------------------------------------------------------------------------------------
# Training and evaluation (plain PyTorch; the encoding equals ms-swift's llava1_5_hf template token for token)
# ----------------------------------------------------------------------------------------------------------------------


def _prompt_text(processor) -> str:
    return processor.apply_chat_template(
        [{'role': 'user', 'content': [{'type': 'image'}, {'type': 'text', 'text': QUESTION}]}])


def _encode(processor, row: Dict[str, Any], with_answer: bool = True) -> Dict[str, torch.Tensor]:
    """Encode one row as ms-swift's ``llava1_5_hf`` template does (``<image>`` expanded by the processor); the
    labels cover the answer and ``</s>``."""
    from PIL import Image
    images = [Image.open(p).convert('RGB') for p in row['images']]
    prompt = processor(images=images, text=_prompt_text(processor), return_tensors='pt')
    out = {'input_ids': prompt['input_ids'][0], 'pixel_values': prompt['pixel_values']}
    if with_answer:
        tok = processor.tokenizer
        answer = tok.encode(row['messages'][-1]['content'], add_special_tokens=False) + [tok.eos_token_id]
        out['labels'] = torch.cat([torch.full_like(out['input_ids'], -100), torch.tensor(answer)])
        out['input_ids'] = torch.cat([out['input_ids'], torch.tensor(answer)])
    return out


def train(model_dir: str, rows: Sequence[Dict[str, Any]], *, steps: int = 150, batch_size: int = 8, lr: float = 3e-3,
          seed: int = 0, num_threads: int = 1) -> Dict[str, Any]:
    """Train the whole model (vision tower included) on ``rows`` with AdamW and save it back into ``model_dir``.

    The prompts of all rows have the same length, so batches need no padding.  With the defaults a
    :data:`TEACHER_KWARGS` model names the colours of all :func:`write_images` squares after about 100 steps
    (a few seconds on one CPU thread).  Returns ``{'steps', 'initial_loss', 'final_loss'}`` (means of the first
    / last 10 step losses).
    """
    processor = load_processor(model_dir)
    encoded = [_encode(processor, r) for r in rows]
    rng = random.Random(seed)
    losses: List[float] = []
    old_threads = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = load_model(model_dir)
            model.train()
            opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
            order: List[int] = []
            for _ in range(steps):
                batch = []
                while len(batch) < min(batch_size, len(encoded)):
                    if not order:
                        order = list(range(len(encoded)))
                        rng.shuffle(order)
                    batch.append(encoded[order.pop()])
                out = model(input_ids=torch.stack([e['input_ids'] for e in batch]),
                            pixel_values=torch.cat([e['pixel_values'] for e in batch]),
                            labels=torch.stack([e['labels'] for e in batch]))
                opt.zero_grad(set_to_none=True)
                out.loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                losses.append(float(out.loss.detach()))
            model.eval()
            if steps:
                model.save_pretrained(model_dir)
    finally:
        torch.set_num_threads(old_threads)
    k = min(10, len(losses))
    return {'steps': steps, 'initial_loss': sum(losses[:k]) / k if k else None,
            'final_loss': sum(losses[-k:]) / k if k else None}


@torch.no_grad()
def answers(model_or_dir, rows: Sequence[Dict[str, Any]], processor=None, max_new_tokens: int = 4) -> List[str]:
    """Greedy answers of a model to ``rows`` (decoded, special tokens skipped, stripped)."""
    if isinstance(model_or_dir, (str, os.PathLike)):
        processor = processor or load_processor(os.fspath(model_or_dir))
        model = load_model(os.fspath(model_or_dir))
    else:
        model = model_or_dir
    model.eval()
    tok = processor.tokenizer
    out = []
    for row in rows:
        enc = _encode(processor, row, with_answer=False)
        ids = model.generate(input_ids=enc['input_ids'][None], pixel_values=enc['pixel_values'],
                             max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        out.append(tok.decode(ids[0, enc['input_ids'].shape[0]:], skip_special_tokens=True).strip())
    return out


def accuracy(model_or_dir, rows: Sequence[Dict[str, Any]], processor=None) -> float:
    """Fraction of ``rows`` whose greedy answer is exactly the colour name."""
    got = answers(model_or_dir, rows, processor)
    return sum(g == r['messages'][-1]['content'] for g, r in zip(got, rows)) / max(len(rows), 1)


def build_workspace(root: str, *, n_rows: int = 16, seed: int = 0, teacher_steps: int = 0,
                    student_kwargs: Optional[Dict[str, int]] = None,
                    teacher_kwargs: Optional[Dict[str, int]] = None) -> Dict[str, Any]:
    """Build under ``root``: ``tokenizer/``, ``student/`` (seed ``seed``), ``teacher/`` (wider, seed ``seed + 1``;
    trained for ``teacher_steps`` on every image when > 0), ``images/`` (PNG squares) and ``train.jsonl``
    (``n_rows`` rows).  Returns the absolute paths by name (plus ``teacher_accuracy`` when trained)."""
    root = os.path.abspath(root)
    tok = build_tokenizer(os.path.join(root, 'tokenizer'))
    student = build_model(os.path.join(root, 'student'), tok, seed=seed, **(student_kwargs or STUDENT_KWARGS))
    teacher = build_model(os.path.join(root, 'teacher'), tok, seed=seed + 1, **(teacher_kwargs or TEACHER_KWARGS))
    images = write_images(os.path.join(root, 'images'))
    train_path = write_dataset(os.path.join(root, 'train.jsonl'), make_rows(images, n_rows, seed=seed))
    ws: Dict[str, Any] = {'root': root, 'tokenizer': os.path.join(root, 'tokenizer'), 'student': student,
                          'teacher': teacher, 'images': os.path.join(root, 'images'), 'train': train_path}
    if teacher_steps:
        all_rows = make_rows(images, len(images), seed=seed)
        ws['teacher_train'] = train(teacher, all_rows, steps=teacher_steps, seed=seed)
        ws['teacher_accuracy'] = accuracy(teacher, all_rows)
    return ws
