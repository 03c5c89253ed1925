"""Tiny, fully offline Qwen3-style models, tokenizer and a synthetic chat task.

Everything here is built from scratch on the local machine (no network, no
downloads) and is small enough to train on a couple of CPU cores in seconds.
It is used by the test-suite (which runs ms-swift's real ``swift rlhf
--rlhf_type gkd`` pipeline on these models) and by the ``swift-gkd demo``
command (which distils a briefly trained tiny teacher into a tiny student).

This module deliberately imports only ``torch``, ``transformers``,
``tokenizers`` and the standard library -- never ms-swift.

The synthetic task
------------------
*Reverse a short sequence of letters.*  The user message is
``"Reverse: a c d b"`` and the assistant answer is ``"b d c a"``.  Sequences
have :data:`MIN_LEN`..:data:`MAX_LEN` (4) symbols drawn (with repetition) from
:data:`SYMBOLS` (``a``..``h``); every letter is one token (``' c'``), so the
answer is 4 letter tokens plus ``<|im_end|>``.  The answer follows a rule
rather than memorised facts, so a model that learnt it also solves held-out
prompts.  Train and test prompts are
disjoint by construction: every sequence is assigned to exactly one split by
a stable hash (see :func:`split_of`).

Chat format
-----------
Prompts/responses are rendered exactly like ms-swift's ``qwen3_nothinking``
template (ChatML without a default system prompt)::

    <|im_start|>user\\n{q}<|im_end|>\\n<|im_start|>assistant\\n{a}<|im_end|>\\n

and, like ms-swift, the three pieces (prompt, response, suffix) are tokenized
separately and concatenated (for this tokenizer this is identical to
tokenizing the whole string at once).

Typical use::

    from swift_gkd_plugin.testing import tiny
    ws = tiny.build_demo_workspace('/tmp/gkd_demo')
    # ws['teacher'], ws['student'], ws['train'], ws['test'], ws['teacher_score'] ...
"""
from __future__ import annotations

import itertools
import json
import math
import os
import random
import shutil
import time
import zlib
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

__all__ = [
    'SPECIAL_TOKENS', 'EXTRA_TOKENS', 'SYMBOLS', 'MIN_LEN', 'MAX_LEN', 'PROMPT_PREFIX', 'CHAT_TEMPLATE',
    'STUDENT_KWARGS', 'TEACHER_KWARGS', 'WORKSPACE_VERSION',
    'build_tokenizer', 'build_sentencepiece_tokenizer', 'load_tokenizer', 'build_model', 'load_model',
    'count_parameters',
    'make_rows', 'write_dataset', 'read_dataset', 'split_of', 'solve',
    'encode_row', 'train_teacher', 'score', 'exact_match', 'build_demo_workspace',
]

# ----------------------------------------------------------------------------------------------------------------------
# Constants
# ----------------------------------------------------------------------------------------------------------------------

#: Special tokens of the tokenizer (Qwen's ids order: endoftext, im_start, im_end).
SPECIAL_TOKENS: Tuple[str, ...] = ('<|endoftext|>', '<|im_start|>', '<|im_end|>')
#: Qwen3's thinking markers, added as ordinary (non-special) added tokens.
EXTRA_TOKENS: Tuple[str, ...] = ('<think>', '</think>')
#: Alphabet of the reversal task.  Small on purpose: with 8 symbols and a fixed length a 2-layer student
#: learns the rule (and visibly improves under distillation) within a few dozen steps.
SYMBOLS: str = 'abcdefgh'
#: Shortest / longest sequence in the task (8**4 = 4096 distinct sequences, 844 of them in the test split).
MIN_LEN: int = 4
MAX_LEN: int = 4
#: The user message is ``PROMPT_PREFIX + ' '.join(sequence)``.
PROMPT_PREFIX: str = 'Reverse: '
#: Fraction (1 / _TEST_MODULUS) of all sequences that belong to the test split.
_TEST_MODULUS: int = 5

#: Target size of the trained BPE vocabulary (byte alphabet + merges + the 3 special tokens).  The 2
#: :data:`EXTRA_TOKENS` come on top, so ``len(tokenizer) == _BPE_VOCAB_SIZE + 2``, which is deliberately
#: *not* a multiple of 8: models round their ``vocab_size`` up, so their lm_head is larger than the tokenizer.
_BPE_VOCAB_SIZE: int = 440


def padded_vocab_size(n_tokens: int) -> int:
    """A tiny model's ``vocab_size`` (its lm_head's rows) for a tokenizer of ``n_tokens``: rounded up to a multiple
    of 8."""
    return int(math.ceil(n_tokens / 8) * 8)


#: ``vocab_size`` of the models built on :func:`build_tokenizer` (the demo's): known before anything is built.
MODEL_VOCAB_SIZE: int = padded_vocab_size(_BPE_VOCAB_SIZE + 2)

#: Qwen-style ChatML chat template (no default system prompt, no <think> insertion).
CHAT_TEMPLATE: str = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}")

#: Model sizes used by :func:`build_demo_workspace` (keyword arguments of :func:`build_model`).
STUDENT_KWARGS: Dict[str, int] = dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128)
TEACHER_KWARGS: Dict[str, int] = dict(hidden_size=96, num_layers=3, num_heads=4, num_kv_heads=2, intermediate_size=256)

#: Bump when anything that changes the produced workspace files changes (invalidates caches).
WORKSPACE_VERSION: int = 2
_MARKER = 'tiny_workspace.json'

# ----------------------------------------------------------------------------------------------------------------------
# Task
# ----------------------------------------------------------------------------------------------------------------------


def split_of(seq: Sequence[str]) -> str:
    """Return ``'test'`` or ``'train'``: the split a symbol sequence belongs to.

    The assignment is a pure function of the sequence (CRC32 of the joined symbols), independent of seeds,
    so rows produced by :func:`make_rows` for different splits can never share a prompt.  About
    ``1/5`` of all sequences are test sequences.
    """
    return 'test' if zlib.crc32(''.join(seq).encode('utf-8')) % _TEST_MODULUS == 0 else 'train'


def solve(prompt: str) -> str:
    """Return the correct assistant answer for a task prompt (``'Reverse: a b c'`` -> ``'c b a'``)."""
    if not prompt.startswith(PROMPT_PREFIX):
        raise ValueError(f'not a task prompt: {prompt!r}')
    return ' '.join(reversed(prompt[len(PROMPT_PREFIX):].split()))


def _row(seq: Sequence[str]) -> Dict[str, Any]:
    return {
        'messages': [
            {'role': 'user', 'content': PROMPT_PREFIX + ' '.join(seq)},
            {'role': 'assistant', 'content': ' '.join(reversed(seq))},
        ]
    }


def _num_sequences(split: str) -> int:
    """Number of distinct task sequences belonging to ``split`` (exact; the task space is small)."""
    total = 0
    for length in range(MIN_LEN, MAX_LEN + 1):
        total += sum(split_of(seq) == split for seq in itertools.product(SYMBOLS, repeat=length))
    return total


def make_rows(n: int, seed: int = 0, split: str = 'train') -> List[Dict[str, Any]]:
    """Generate ``n`` distinct task rows in ms-swift's ``messages`` format.

    Each row is ``{"messages": [{"role": "user", "content": "Reverse: a c d b"},
    {"role": "assistant", "content": "b d c a"}]}``.  The sequence length is uniform in
    ``[MIN_LEN, MAX_LEN]`` and symbols are drawn uniformly (with repetition) from :data:`SYMBOLS`.

    Args:
        n: number of rows; all prompts within one call are distinct, so ``n`` may not exceed the number of
            sequences of the split (3,252 train / 844 test with the default task), else ``ValueError``.
        seed: RNG seed; the same ``(n, seed, split)`` always gives the same list, and a longer list with the
            same seed/split starts with the shorter one.
        split: ``'train'`` or ``'test'``.  Only sequences whose :func:`split_of` equals ``split`` are produced,
            so train and test prompts are disjoint for any seeds.
    """
    if split not in ('train', 'test'):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    available = _num_sequences(split)
    if n > available:
        raise ValueError(f'only {available} distinct {split} sequences exist, {n} rows requested')
    rng = random.Random(2 * int(seed) + (split == 'test'))
    rows: List[Dict[str, Any]] = []
    seen = set()
    while len(rows) < n:
        length = rng.randint(MIN_LEN, MAX_LEN)
        seq = tuple(rng.choice(SYMBOLS) for _ in range(length))
        if seq in seen or split_of(seq) != split:
            continue
        seen.add(seq)
        rows.append(_row(seq))
    return rows


def write_dataset(path_jsonl: str, rows: Iterable[Dict[str, Any]]) -> str:
    """Write ``rows`` as JSON lines (one row per line, UTF-8, deterministic key order); return the path."""
    d = os.path.dirname(os.path.abspath(path_jsonl))
    os.makedirs(d, exist_ok=True)
    tmp = f'{path_jsonl}.tmp{os.getpid()}'
    with open(tmp, 'w', encoding='utf-8') as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + '\n')
    os.replace(tmp, path_jsonl)
    return path_jsonl


def read_dataset(path_jsonl: str) -> List[Dict[str, Any]]:
    """Read a JSON-lines file written by :func:`write_dataset`."""
    with open(path_jsonl, encoding='utf-8') as f:
        return [json.loads(line) for line in f if line.strip()]


# ----------------------------------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------------------------------

_FILLER = """\
You are a helpful assistant. The user asks a question and the assistant gives a short answer.
Reverse the order of the letters in the sequence and write them separated by single spaces.
A small model can learn a simple rule quickly when the data is clean and the task is short.
Knowledge distillation trains a student model to match the output distribution of a teacher model.
The generalized knowledge distillation loss mixes the forward and the reverse Kullback Leibler divergence.
Hello world! This is a tiny tokenizer for tests. It has only a few hundred tokens in its vocabulary.
system user assistant tool Reverse: reverse sequence letters digits answer question model teacher student
0 1 2 3 4 5 6 7 8 9 10 11 12 100 2024 3.14 (a) [b] {c} "quoted" 'single' - + * / = , . ; ? !
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.
"""


def _tokenizer_corpus() -> List[str]:
    """Deterministic training corpus: task-like conversations plus filler text.

    The conversations use all letters and digits (not only :data:`SYMBOLS`) with lengths 1-6, so the
    tokenizer does not depend on the task parameters and every ``' x'`` (space + letter/digit) is one token.
    Special tokens are not part of the corpus (they are added as whole tokens anyway).
    """
    rng = random.Random(12345)
    alphabet = 'abcdefghijklmnopqrstuvwxyz0123456789'
    texts: List[str] = []
    for _ in range(3000):
        seq = [rng.choice(alphabet) for _ in range(rng.randint(1, 6))]
        texts.append(f"user\n{PROMPT_PREFIX}{' '.join(seq)}\n")
        texts.append(f"assistant\n{' '.join(reversed(seq))}\n")
    texts.extend(_FILLER.splitlines() * 20)
    texts.extend(['system\n', 'user\n', 'assistant\n'] * 50)
    return texts


def train_bpe(corpus: Iterable[str], special_tokens: Sequence[str], vocab_size: int, individual_digits: bool = False):
    """A deterministic byte-level BPE ``tokenizers.Tokenizer`` trained on ``corpus``, ``special_tokens`` first.
    ``individual_digits``: every digit is a piece of its own, as in Qwen's tokenizers (no merges across digits)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                         if individual_digits else byte_level)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=False,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in special_tokens],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    return tok


def build_tokenizer(out_dir: str):
    """Train a tiny byte-level BPE tokenizer and save it (as a ``PreTrainedTokenizerFast``) into ``out_dir``.

    * Model: byte-level BPE (GPT-2/Qwen style, no prefix space) trained with the ``tokenizers`` library on a
      built-in deterministic corpus made of rendered task conversations plus some filler English, so every
      task string tokenizes compactly (``'Reverse: a c d b'`` -> about 6 tokens, one per letter).
    * Vocabulary: 440 BPE entries (256 byte symbols, merges and the special tokens ``<|endoftext|>`` (id 0),
      ``<|im_start|>`` (id 1), ``<|im_end|>`` (id 2)), plus ``<think>`` and ``</think>`` as ordinary added
      tokens: ``len(tokenizer) == 442``.
    * ``eos_token='<|im_end|>'``, ``pad_token='<|endoftext|>'``, no BOS/UNK, no automatic special tokens,
      ``model_max_length=512`` and a Qwen-style ChatML ``chat_template`` (:data:`CHAT_TEMPLATE`) supporting
      ``add_generation_prompt``.

    The output is deterministic: building twice gives byte-identical files.

    Returns:
        the loaded ``transformers.PreTrainedTokenizerFast``.
    """
    from tokenizers import AddedToken

    tok = train_bpe(_tokenizer_corpus(), SPECIAL_TOKENS, _BPE_VOCAB_SIZE)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in EXTRA_TOKENS])
    return _save_chatml_tokenizer(tok, out_dir)


def build_sentencepiece_tokenizer(out_dir: str, vocab_size: int = 600, corpus: Optional[Iterable[str]] = None,
                                  prefix_space: bool = True):
    """A tokenizer of ANOTHER family than :func:`build_tokenizer`, for distillation across tokenizers.

    Llama / sentencepiece style: Metaspace pre-tokenizer (``▁`` marks a space, prepended to the first word), BPE
    with byte fallback (``<0x00>`` .. ``<0xFF>`` tokens for text it has no piece for), trained on the same corpus
    with other merges and another size (``vocab_size`` entries including the 256 byte tokens and the special
    tokens). It keeps the ChatML special tokens and chat template so that :func:`build_model` accepts it; what
    differs is the vocabulary and how text is split (``' a'`` is ``▁a`` here, ``Ġa`` there). ``corpus`` replaces
    the built-in training corpus (e.g. another task's text, so that its words get their own pieces).
    ``prefix_space=False`` prepends no ``▁`` to the first word (sentencepiece's ``add_dummy_prefix=False``, as
    Gemma's tokenizer), so a text's first piece has no space, as in byte-level tokenizers.

    Returns:
        the loaded ``transformers.PreTrainedTokenizerFast``.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement='\u2581',
                                                 prepend_scheme='first' if prefix_space else 'never')
    strip_prefix = [decoders.Strip(' ', 1, 0)] if prefix_space else []  # drop the space the pre-tokenizer added
    tok.decoder = decoders.Sequence([decoders.Replace('\u2581', ' '), decoders.ByteFallback(), decoders.Fuse()] +
                                    strip_prefix)
    specials = [AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS]
    byte_tokens = [AddedToken(f'<0x{b:02X}>', special=False, normalized=False) for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  special_tokens=specials + byte_tokens)
    tok.train_from_iterator(_tokenizer_corpus() if corpus is None else corpus, trainer=trainer)
    return _save_chatml_tokenizer(tok, out_dir)


def _save_chatml_tokenizer(tok, out_dir: str):
    """Save a ``tokenizers.Tokenizer`` as a ``PreTrainedTokenizerFast`` with the ChatML template, and load it."""
    from transformers import PreTrainedTokenizerFast
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token='<|im_end|>',
        pad_token='<|endoftext|>',
        model_max_length=512,
        padding_side='right',
        clean_up_tokenization_spaces=False,
        chat_template=CHAT_TEMPLATE,
    )
    os.makedirs(out_dir, exist_ok=True)
    hf_tok.save_pretrained(out_dir)
    return load_tokenizer(out_dir)


def load_tokenizer(tokenizer_dir: str):
    """Load a tokenizer saved by :func:`build_tokenizer` (or a model dir from :func:`build_model`)."""
    from transformers import PreTrainedTokenizerFast
    return PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)


def _as_tokenizer(tokenizer_dir_or_tokenizer):
    if isinstance(tokenizer_dir_or_tokenizer, (str, os.PathLike)):
        return load_tokenizer(os.fspath(tokenizer_dir_or_tokenizer))
    return tokenizer_dir_or_tokenizer


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
                num_experts_per_tok: int = 2) -> str:
    """Create a randomly initialised tiny Qwen3 causal LM and save it into ``out_dir``.

    The model is a ``transformers`` ``Qwen3ForCausalLM`` (``moe=False``) or ``Qwen3MoeForCausalLM``
    (``moe=True``: ``num_experts`` experts, ``num_experts_per_tok`` active, every layer sparse, expert size
    ``intermediate_size``) with:

    * ``vocab_size = len(tokenizer)`` rounded up to a multiple of 8 (so the lm_head has a few rows more than
      the tokenizer, as with real Qwen checkpoints);
    * ``head_dim = hidden_size // num_heads``, ``max_position_embeddings=512``, ``tie_word_embeddings=False``;
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
        tie_word_embeddings=False,
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
# Encoding (ms-swift qwen3_nothinking layout)
# ----------------------------------------------------------------------------------------------------------------------


def _render_prompt(messages: Sequence[Dict[str, str]]) -> Tuple[str, str]:
    """Split a conversation into (prompt text incl. ``<|im_start|>assistant\\n``, final assistant content)."""
    if not messages or messages[-1]['role'] != 'assistant':
        raise ValueError('the last message must be an assistant message')
    prompt = ''.join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages[:-1])
    return prompt + '<|im_start|>assistant\n', messages[-1]['content']


def encode_row(tokenizer, row: Dict[str, Any]) -> Dict[str, Any]:
    """Tokenize one ``messages`` row the way ms-swift's ``qwen3_nothinking`` template does.

    The text is ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` for every message but the last, then
    ``<|im_start|>assistant\\n``, the last (assistant) message and the suffix ``<|im_end|>\\n``.  Prompt,
    response and suffix are tokenized separately (no special tokens added) and concatenated.

    Returns:
        dict with ``input_ids`` (list of ints), ``labels`` (``-100`` on the prompt, the token ids on
        response + suffix, as ms-swift's loss mask), ``prompt_len`` and ``score_len``: the number of
        tokens of ``{response}<|im_end|>`` (the tokens :func:`score` evaluates; excludes the final ``\\n``).
    """
    prompt, response = _render_prompt(row['messages'])
    p = tokenizer.encode(prompt, add_special_tokens=False)
    r = tokenizer.encode(response, add_special_tokens=False)
    s = tokenizer.encode('<|im_end|>\n', add_special_tokens=False)
    ids = p + r + s
    return {
        'input_ids': ids,
        'labels': [-100] * len(p) + r + s,
        'prompt_len': len(p),
        'score_len': len(r) + 1,
    }


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


def build_demo_workspace(root: str,
                         *,
                         seed: int = 0,
                         n_train: int = 2000,
                         n_test: int = 200,
                         teacher_steps: int = 250,
                         student_steps: int = 0,
                         force: bool = False,
                         verbose: bool = False) -> Dict[str, Any]:
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
