"""The tiny models' text side: the synthetic reversal task, the trained BPE tokenizers and the ChatML row encoding.

Kept apart from tiny.py (models, training, scores, demo workspace): it needs no torch, and the sibling tasks reuse it.
"""
from __future__ import annotations

import itertools
import json
import os
import random
import zlib
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

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

#: Qwen-style ChatML chat template (no default system prompt, no <think> insertion).
CHAT_TEMPLATE: str = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}")

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
