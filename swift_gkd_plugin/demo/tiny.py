"""Tiny, fully offline Qwen3-style models, tokenizer and a synthetic chat task.

Everything here is built from scratch on the local machine (no network, no downloads) and is small enough to train on
a couple of CPU cores in seconds. It is used by the test-suite (which runs ms-swift's real
``swift rlhf --rlhf_type gkd`` pipeline on these models) and by the ``swift-gkd demo`` command (which distils a
briefly trained tiny teacher into a tiny student).

This module deliberately imports only ``torch``, ``transformers``, ``tokenizers`` and the standard library -- never
ms-swift. The task, tokenizers and row encoding live in :mod:`tiny_text` and are re-exported here.

The synthetic task
------------------
*Reverse a short sequence of letters.*  The user message is ``"Reverse: a c d b"`` and the assistant answer is
``"b d c a"``.  Sequences have :data:`MIN_LEN`..:data:`MAX_LEN` (4) symbols drawn (with repetition) from
:data:`SYMBOLS` (``a``..``h``); every letter is one token (``' c'``), so the answer is 4 letter tokens plus
``<|im_end|>``.  The answer follows a rule rather than memorised facts, so a model that learnt it also solves
held-out prompts.  Train and test prompts are disjoint by construction: every sequence is assigned to exactly one
split by a stable hash (see :func:`split_of`).

Chat format
-----------
Prompts/responses are rendered exactly like ms-swift's ``qwen3_nothinking`` template (ChatML without a default
system prompt)::

    <|im_start|>user\\n{q}<|im_end|>\\n<|im_start|>assistant\\n{a}<|im_end|>\\n

and, like ms-swift, the three pieces (prompt, response, suffix) are tokenized separately and concatenated (for this
tokenizer this is identical to tokenizing the whole string at once).

Typical use::

    from swift_gkd_plugin.demo import tiny
    ws = tiny.build_demo_workspace('/tmp/gkd_demo')
    # ws['teacher'], ws['student'], ws['train'], ws['test'], ws['teacher_score'] ...
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from typing import Any, Dict, List, Optional, Sequence

import torch

from swift_gkd_plugin.demo.tiny_text import (
    CHAT_TEMPLATE, EXTRA_TOKENS, MAX_LEN, MIN_LEN, PROMPT_PREFIX, SPECIAL_TOKENS, SYMBOLS, _BPE_VOCAB_SIZE,
    _as_tokenizer, _render_prompt, _save_chatml_tokenizer, _tokenizer_corpus, build_sentencepiece_tokenizer,
    build_tokenizer, encode_row, load_tokenizer, make_rows, read_dataset, solve, split_of, train_bpe, write_dataset)

__all__ = [
    'SPECIAL_TOKENS', 'EXTRA_TOKENS', 'SYMBOLS', 'MIN_LEN', 'MAX_LEN', 'PROMPT_PREFIX', 'CHAT_TEMPLATE',
    'STUDENT_KWARGS', 'TEACHER_KWARGS', 'WORKSPACE_VERSION',
    'build_tokenizer', 'build_sentencepiece_tokenizer', 'load_tokenizer', 'build_model', 'load_model',
    'count_parameters',
    'make_rows', 'write_dataset', 'read_dataset', 'split_of', 'solve',
    'encode_row', 'train_teacher', 'score', 'exact_match', 'build_demo_workspace',
    # tiny_text's tokenizer parts that tool_task and tiny_multimodal reach through this module
    'train_bpe', '_tokenizer_corpus', '_save_chatml_tokenizer',
]

# ----------------------------------------------------------------------------------------------------------------------
# Constants
# ----------------------------------------------------------------------------------------------------------------------


def padded_vocab_size(n_tokens: int) -> int:
    """A tiny model's ``vocab_size`` (its lm_head's rows) for a tokenizer of ``n_tokens``: rounded up to a multiple
    of 8."""
    return int(math.ceil(n_tokens / 8) * 8)


#: ``vocab_size`` of the models built on :func:`build_tokenizer` (the demo's): known before anything is built.
MODEL_VOCAB_SIZE: int = padded_vocab_size(_BPE_VOCAB_SIZE + 2)

#: Model sizes used by :func:`build_demo_workspace` (keyword arguments of :func:`build_model`).
STUDENT_KWARGS: Dict[str, int] = dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128)
TEACHER_KWARGS: Dict[str, int] = dict(hidden_size=96, num_layers=3, num_heads=4, num_kv_heads=2, intermediate_size=256)

#: Bump when anything that changes the produced workspace files changes (invalidates caches).
WORKSPACE_VERSION: int = 2
_MARKER = 'tiny_workspace.json'

# ----------------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------------


def build_model(out_dir: str,
                tokenizer_dir_or_tokenizer,
                *,
                hidden_size: int = 64,
                num_layers: int = 2,
                num_heads: int = 4,
                num_kv_heads: int = 2,
                intermediate_size: int = 128,
                seed: int = 0,
                moe: bool = False,
                num_experts: int = 4,
                num_experts_per_tok: int = 2,
                tie_word_embeddings: bool = False) -> str:
    """Create a randomly initialised tiny Qwen3 causal LM and save it into ``out_dir``.

    The model is a ``transformers`` ``Qwen3ForCausalLM`` (``moe=False``) or ``Qwen3MoeForCausalLM``
    (``moe=True``: ``num_experts`` experts, ``num_experts_per_tok`` active, every layer sparse, expert size
    ``intermediate_size``) with:

    * ``vocab_size = len(tokenizer)`` rounded up to a multiple of 8 (so the lm_head has a few rows more than
      the tokenizer, as with real Qwen checkpoints);
    * ``head_dim = hidden_size // num_heads``, ``max_position_embeddings=512``, untied embeddings unless
      ``tie_word_embeddings`` (most small real students tie them);
    * ``bos_token_id = pad_token_id = id('<|endoftext|>')``, ``eos_token_id = id('<|im_end|>')``;
    * float32 weights, initialised from ``torch.manual_seed(seed)`` (the global RNG state is restored), so the
      same arguments always give identical weights.

    ``out_dir`` receives ``config.json``, ``model.safetensors``, ``generation_config.json`` (greedy,
    ``eos_token_id=[im_end, endoftext]``) and the tokenizer files.  With the default sizes and the tokenizer
    of :func:`build_tokenizer` the model has 131,456 parameters (the MoE variant 279,424; the
    :data:`TEACHER_KWARGS` size 390,960).

    Returns:
        ``out_dir``.
    """
    from transformers import GenerationConfig

    tokenizer = _as_tokenizer(tokenizer_dir_or_tokenizer)
    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise ValueError('hidden_size must be divisible by num_heads and num_heads by num_kv_heads')
    vocab_size = padded_vocab_size(len(tokenizer))
    endoftext = tokenizer.convert_tokens_to_ids('<|endoftext|>')
    im_end = tokenizer.convert_tokens_to_ids('<|im_end|>')
    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=hidden_size // num_heads,
        hidden_act='silu',
        max_position_embeddings=512,
        initializer_range=0.02,
        rms_norm_eps=1e-6,
        use_cache=True,
        tie_word_embeddings=tie_word_embeddings,
        attention_bias=False,
        attention_dropout=0.0,
        bos_token_id=endoftext,
        eos_token_id=im_end,
        pad_token_id=endoftext,
    )
    if moe:
        from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
        config = Qwen3MoeConfig(
            **common,
            moe_intermediate_size=intermediate_size,
            num_experts=num_experts,
            num_experts_per_tok=num_experts_per_tok,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            norm_topk_prob=True,
        )
        model_cls = Qwen3MoeForCausalLM
    else:
        from transformers import Qwen3Config, Qwen3ForCausalLM
        config = Qwen3Config(**common, use_sliding_window=False)
        model_cls = Qwen3ForCausalLM
    config.dtype = torch.float32

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config).to(torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=endoftext,
        eos_token_id=[im_end, endoftext],
        pad_token_id=endoftext,
        do_sample=False,
        max_new_tokens=64,
    )
    os.makedirs(out_dir, exist_ok=True)
    with _Quiet():
        model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def load_model(model_dir: str):
    """Load a model saved by :func:`build_model` (``AutoModelForCausalLM``, float32, eval mode, CPU)."""
    from transformers import AutoModelForCausalLM
    with _Quiet():
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    return model


def count_parameters(model_or_dir) -> int:
    """Total number of parameters of a model (or of the model saved in a directory)."""
    model = load_model(model_or_dir) if isinstance(model_or_dir, (str, os.PathLike)) else model_or_dir
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------------------------------------------
# Batches, threads, quiet loading
# ----------------------------------------------------------------------------------------------------------------------


def _batch(encoded: Sequence[Dict[str, Any]], pad_id: int) -> Dict[str, torch.Tensor]:
    """Right-pad a list of :func:`encode_row` outputs into tensors."""
    max_len = max(len(e['input_ids']) for e in encoded)
    ids = torch.full((len(encoded), max_len), pad_id, dtype=torch.long)
    labels = torch.full((len(encoded), max_len), -100, dtype=torch.long)
    mask = torch.zeros((len(encoded), max_len), dtype=torch.long)
    for i, e in enumerate(encoded):
        n = len(e['input_ids'])
        ids[i, :n] = torch.tensor(e['input_ids'])
        labels[i, :n] = torch.tensor(e['labels'])
        mask[i, :n] = 1
    return {'input_ids': ids, 'labels': labels, 'attention_mask': mask}


class _Threads:
    """Context manager temporarily setting ``torch.set_num_threads``."""

    def __init__(self, n: Optional[int]):
        self.n = n
        self.old = None

    def __enter__(self):
        if self.n:
            self.old = torch.get_num_threads()
            torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        if self.old is not None:
            torch.set_num_threads(self.old)


class _Quiet:
    """Context manager silencing transformers' "Loading weights"/"Writing model shards" progress bars.

    The previous state is restored on exit (bars are only re-enabled if they were enabled before).
    """

    def __enter__(self):
        from transformers.utils import logging as hf_logging
        self.was_enabled = hf_logging.is_progress_bar_enabled()
        if self.was_enabled:
            hf_logging.disable_progress_bar()

    def __exit__(self, *exc):
        if self.was_enabled:
            from transformers.utils import logging as hf_logging
            hf_logging.enable_progress_bar()


def _default_threads() -> int:
    # Matrices here are tiny (<= 96 x 512): one thread is as fast as several and robust to CPU contention.
    return 1


# ----------------------------------------------------------------------------------------------------------------------
# Training / evaluation
# ----------------------------------------------------------------------------------------------------------------------


def train_teacher(model_dir: str,
                  rows: Sequence[Dict[str, Any]],
                  *,
                  steps: int = 250,
                  lr: float = 3e-3,
                  batch_size: int = 32,
                  warmup_steps: Optional[int] = None,
                  weight_decay: float = 0.0,
                  seed: int = 0,
                  num_threads: Optional[int] = None,
                  log_every: int = 0,
                  encode=None) -> Dict[str, Any]:
    """Briefly train the model saved in ``model_dir`` on ``rows`` with plain torch and save it back in place.

    Training is standard causal-LM cross-entropy on the response tokens only (``{a}<|im_end|>\\n``; the
    prompt is masked with ``-100``), with sequences encoded exactly as ms-swift's ``qwen3_nothinking`` template
    does (see :func:`encode_row`).  Optimiser: AdamW (betas 0.9/0.98), linear warm-up for ``warmup_steps``
    (default ``min(30, steps // 10)``) then cosine decay to 10% of ``lr``, gradient clipping at 1.0.
    Mini-batches of ``batch_size`` rows are drawn by shuffling ``rows`` with ``random.Random(seed)`` (epoch
    after epoch); the torch RNG is seeded with ``seed`` too (and restored afterwards), so the result is
    deterministic for a given thread count.

    With the defaults (250 steps, batch 32, lr 3e-3) the :data:`TEACHER_KWARGS` model learns the reversal rule
    (held-out :func:`score` 1.0; 200 steps already suffice) in about 10-20 s on one CPU thread; the
    :data:`STUDENT_KWARGS` model reaches a held-out score of ~0.8-0.9 after 60 steps (~2 s).

    Args:
        model_dir: directory produced by :func:`build_model` (holds the tokenizer too); overwritten.
        rows: training rows in ``messages`` format (e.g. :func:`make_rows`).
        steps: number of optimiser steps (0 = do nothing but still return stats).
        num_threads: ``torch.set_num_threads`` during training (default 1: these models are far too small
            to profit from intra-op threads, and multi-threading degrades badly on busy machines), restored
            afterwards.
        log_every: print the running loss every that many steps (0 = silent).
        encode: ``encode(tokenizer, row)`` giving ``input_ids`` and ``labels`` like :func:`encode_row` (the default),
            e.g. a multi-turn rendering whose every assistant turn is a target.

    Returns:
        ``{'steps', 'seconds', 'initial_loss', 'final_loss', 'num_rows', 'num_parameters'}``; the losses are
        the mean of the first / last (up to) 20 step losses.
    """
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(model_dir)
    encoded = [(encode or encode_row)(tokenizer, r) for r in rows]
    if not encoded:
        raise ValueError('no training rows')
    if warmup_steps is None:
        warmup_steps = min(30, steps // 10)
    rng = random.Random(seed)
    order: List[int] = []
    losses: List[float] = []
    t0 = time.perf_counter()
    with _Threads(num_threads or _default_threads()), torch.random.fork_rng(devices=[]), _Quiet():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        model.train()
        decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and 'norm' not in n]
        no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and 'norm' not in n)]
        opt = torch.optim.AdamW([{'params': decay, 'weight_decay': weight_decay},
                                 {'params': no_decay, 'weight_decay': 0.0}],
                                lr=lr, betas=(0.9, 0.98), eps=1e-8)

        def lr_at(step: int) -> float:
            if warmup_steps and step < warmup_steps:
                return lr * (step + 1) / warmup_steps
            progress = (step - warmup_steps) / max(1, steps - warmup_steps)
            return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))

        for step in range(steps):
            batch_idx = []
            while len(batch_idx) < min(batch_size, len(encoded)):
                if not order:
                    order = list(range(len(encoded)))
                    rng.shuffle(order)
                batch_idx.append(order.pop())
            batch = _batch([encoded[i] for i in batch_idx], tokenizer.pad_token_id)
            for g in opt.param_groups:
                g['lr'] = lr_at(step)
            out = model(input_ids=batch['input_ids'], attention_mask=batch['attention_mask'], labels=batch['labels'])
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            losses.append(float(out.loss.detach()))
            if log_every and (step + 1) % log_every == 0:
                print(f'[tiny.train_teacher] step {step + 1}/{steps} loss {sum(losses[-log_every:]) / log_every:.4f}',
                      flush=True)
        model.eval()
        if steps > 0:
            model.save_pretrained(model_dir)
    k = min(20, len(losses))
    return {
        'steps': steps,
        'seconds': round(time.perf_counter() - t0, 3),
        'initial_loss': (sum(losses[:k]) / k) if k else None,
        'final_loss': (sum(losses[-k:]) / k) if k else None,
        'num_rows': len(encoded),
        'num_parameters': sum(p.numel() for p in model.parameters()),
    }


def _load_for_eval(model_or_dir, tokenizer):
    if isinstance(model_or_dir, (str, os.PathLike)):
        model = load_model(os.fspath(model_or_dir))
        if tokenizer is None:
            tokenizer = load_tokenizer(os.fspath(model_or_dir))
    else:
        model = model_or_dir
        if tokenizer is None:
            raise ValueError('a tokenizer is required when passing a model object')
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_tokenizer(os.fspath(tokenizer))
    return model, tokenizer


@torch.no_grad()
def score(model_or_dir,
          tokenizer,
          rows: Sequence[Dict[str, Any]],
          *,
          batch_size: int = 64,
          num_threads: Optional[int] = None) -> float:
    """Teacher-forced next-token accuracy of a model on the response tokens of ``rows``, in ``[0, 1]``.

    Each row is encoded like ms-swift's ``qwen3_nothinking`` template (:func:`encode_row`).  For every token
    of ``{assistant answer}<|im_end|>`` (the trailing ``\\n`` is not counted) the model sees the gold prefix and
    the prediction counts as correct iff ``argmax(logits) == gold token``.  The score is the number of correct
    predictions divided by the number of such tokens over all rows (micro-average).  An untrained model
    scores ~0; a model that has learnt only the answer format (length, ``<|im_end|>``) gets about 0.2; a model
    that has learnt the reversal rule approaches 1.  Partial learning moves it smoothly, which makes it a good
    progress signal for a few dozen distillation steps.

    Deterministic: no sampling, the model is evaluated in ``eval()`` mode (its previous mode is restored)
    with fixed batching and (by default) one torch thread.

    Args:
        model_or_dir: a causal LM object or a model directory.
        tokenizer: tokenizer object or directory; may be ``None`` when ``model_or_dir`` is a directory.
        rows: rows in ``messages`` format whose last message is the assistant answer.
        batch_size: rows per forward pass (right padding; does not change the result beyond float noise).
        num_threads: torch threads during evaluation (default 1), restored afterwards.
    """
    model, tokenizer = _load_for_eval(model_or_dir, tokenizer)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = total = 0
    encoded = [encode_row(tokenizer, r) for r in rows]
    try:
        with _Threads(num_threads or _default_threads()):
            for i in range(0, len(encoded), batch_size):
                chunk = encoded[i:i + batch_size]
                batch = _batch(chunk, tokenizer.pad_token_id)
                logits = model(input_ids=batch['input_ids'].to(device),
                               attention_mask=batch['attention_mask'].to(device)).logits
                pred = logits.argmax(-1).cpu()
                for j, e in enumerate(chunk):
                    start, end = e['prompt_len'], e['prompt_len'] + e['score_len']
                    gold = torch.tensor(e['input_ids'][start:end])
                    # logits at position t predict token t + 1
                    correct += int((pred[j, start - 1:end - 1] == gold).sum())
                    total += e['score_len']
    finally:
        model.train(was_training)
    return correct / total if total else 0.0


@torch.no_grad()
def exact_match(model_or_dir,
                tokenizer,
                rows: Sequence[Dict[str, Any]],
                *,
                max_new_tokens: int = 16,
                num_threads: Optional[int] = None) -> float:
    """Fraction of ``rows`` whose greedy completion equals the assistant answer exactly.

    The prompt is encoded as in :func:`encode_row`; tokens are decoded greedily (argmax, no cache, one row
    at a time) until ``<|im_end|>``/``<|endoftext|>`` or ``max_new_tokens``; the decoded text (special tokens
    skipped, surrounding whitespace stripped) must equal the gold answer.  Deterministic (one torch thread
    by default, like :func:`score`).
    """
    model, tokenizer = _load_for_eval(model_or_dir, tokenizer)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    stop = {tokenizer.convert_tokens_to_ids('<|im_end|>'), tokenizer.convert_tokens_to_ids('<|endoftext|>')}
    hits = 0
    try:
        with _Threads(num_threads or _default_threads()):
            for row in rows:
                prompt, answer = _render_prompt(row['messages'])
                ids = tokenizer.encode(prompt, add_special_tokens=False)
                new: List[int] = []
                for _ in range(max_new_tokens):
                    logits = model(input_ids=torch.tensor([ids + new], device=device)).logits
                    nxt = int(logits[0, -1].argmax())
                    if nxt in stop:
                        break
                    new.append(nxt)
                hits += tokenizer.decode(new, skip_special_tokens=True).strip() == answer.strip()
    finally:
        model.train(was_training)
    return hits / len(rows) if rows else 0.0


# ----------------------------------------------------------------------------------------------------------------------
# Demo workspace
# ----------------------------------------------------------------------------------------------------------------------


def _workspace_complete(root: str, params: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    marker = os.path.join(root, _MARKER)
    try:
        with open(marker, encoding='utf-8') as f:
            info = json.load(f)
    except (OSError, ValueError):
        return None
    if info.get('version') != WORKSPACE_VERSION or info.get('params') != params:
        return None
    needed = [
        os.path.join(root, 'teacher', 'model.safetensors'),
        os.path.join(root, 'teacher', 'tokenizer.json'),
        os.path.join(root, 'student', 'model.safetensors'),
        os.path.join(root, 'student', 'tokenizer.json'),
        os.path.join(root, 'tokenizer', 'tokenizer.json'),
        os.path.join(root, 'train.jsonl'),
        os.path.join(root, 'test.jsonl'),
    ]
    if not all(os.path.isfile(p) for p in needed):
        return None
    return info


#: Supervised steps that warm-start the demo's student (as the GKD paper's SFT student): well-formed answers, many
#: wrong (held-out exact match 0.21-0.46, seeds 0-2). The demo and the examples' CPU mode distil it.
DEMO_WARM_START_STEPS = 60


def build_warm_workspace(root: str, **kwargs) -> Dict[str, Any]:
    return build_demo_workspace(root, student_steps=DEMO_WARM_START_STEPS, **kwargs)


def build_demo_workspace(root: str, *, seed: int = 0, n_train: int = 2000, n_test: int = 200, teacher_steps: int = 250,
                         student_steps: int = 0, force: bool = False, verbose: bool = False) -> Dict[str, Any]:
    """Create (or reuse) a teacher/student distillation workspace under ``root``.

    Layout::

        root/tokenizer/      tokenizer from build_tokenizer
        root/teacher/        TEACHER_KWARGS Qwen3 (96 hidden, 3 layers), trained with train_teacher(teacher_steps)
        root/student/        STUDENT_KWARGS Qwen3 (64 hidden, 2 layers), random init (seed + 1); trained for
                             ``student_steps`` (default 0: untrained)
        root/train.jsonl     make_rows(n_train, seed, 'train')
        root/test.jsonl      make_rows(n_test, seed, 'test')   (prompts disjoint from train)
        root/tiny_workspace.json   marker: version, params, scores (written last)

    If ``root`` already holds a complete workspace whose marker has the same :data:`WORKSPACE_VERSION` and
    parameters, nothing is rebuilt (``reused=True``); otherwise the workspace files are (re)created.
    ``force=True`` always rebuilds.

    Returns:
        dict with ``root``, ``tokenizer``, ``teacher``, ``student``, ``train``, ``test`` (absolute paths),
        ``teacher_score`` / ``student_score`` (:func:`score` on the test rows), ``teacher_exact_match`` /
        ``student_exact_match`` (:func:`exact_match` on the test rows), ``teacher_train`` /
        ``student_train`` (stats of :func:`train_teacher`, ``None`` when not trained), ``teacher_parameters`` /
        ``student_parameters``, ``params`` and ``reused``.  With the defaults: teacher 390,960 parameters,
        score 1.0; student 131,456 parameters, score ~0.00; about 30 s to build on one CPU thread.
    """
    root = os.path.abspath(root)
    params = dict(seed=seed, n_train=n_train, n_test=n_test, teacher_steps=teacher_steps,
                  student_steps=student_steps, teacher=TEACHER_KWARGS, student=STUDENT_KWARGS,
                  task=dict(symbols=SYMBOLS, min_len=MIN_LEN, max_len=MAX_LEN, prompt_prefix=PROMPT_PREFIX))
    paths = {
        'root': root,
        'tokenizer': os.path.join(root, 'tokenizer'),
        'teacher': os.path.join(root, 'teacher'),
        'student': os.path.join(root, 'student'),
        'train': os.path.join(root, 'train.jsonl'),
        'test': os.path.join(root, 'test.jsonl'),
    }
    info = None if force else _workspace_complete(root, params)
    if info is not None:
        return {**paths, **info['results'], 'params': params, 'reused': True}

    def log(msg):
        if verbose:
            print(f'[tiny] {msg}', flush=True)

    os.makedirs(root, exist_ok=True)
    marker = os.path.join(root, _MARKER)
    if os.path.exists(marker):
        os.remove(marker)
    for key in ('tokenizer', 'teacher', 'student'):
        shutil.rmtree(paths[key], ignore_errors=True)

    log('building tokenizer')
    tokenizer = build_tokenizer(paths['tokenizer'])
    train_rows = make_rows(n_train, seed=seed, split='train')
    test_rows = make_rows(n_test, seed=seed, split='test')
    write_dataset(paths['train'], train_rows)
    write_dataset(paths['test'], test_rows)

    log('building teacher')
    build_model(paths['teacher'], tokenizer, seed=seed, **TEACHER_KWARGS)
    teacher_stats = train_teacher(paths['teacher'], train_rows, steps=teacher_steps, seed=seed,
                                  log_every=100 if verbose else 0)
    log(f'teacher trained in {teacher_stats["seconds"]:.1f}s (final loss {teacher_stats["final_loss"]})')
    build_model(paths['student'], tokenizer, seed=seed + 1, **STUDENT_KWARGS)
    student_stats = None
    if student_steps:
        student_stats = train_teacher(paths['student'], train_rows, steps=student_steps, seed=seed + 1)

    results = {
        'teacher_score': score(paths['teacher'], None, test_rows),
        'student_score': score(paths['student'], None, test_rows),
        'teacher_exact_match': exact_match(paths['teacher'], None, test_rows),
        'student_exact_match': exact_match(paths['student'], None, test_rows),
        'teacher_train': teacher_stats,
        'student_train': student_stats,
        'teacher_parameters': count_parameters(paths['teacher']),
        'student_parameters': count_parameters(paths['student']),
    }
    log(f"teacher score {results['teacher_score']:.3f}, student score {results['student_score']:.3f}")
    tmp = f'{marker}.tmp{os.getpid()}'
    with open(tmp, 'w', encoding='utf-8') as f:
        json.dump({'version': WORKSPACE_VERSION, 'params': params, 'results': results}, f, indent=2, sort_keys=True)
    os.replace(tmp, marker)
    return {**paths, **results, 'params': params, 'reused': False}
