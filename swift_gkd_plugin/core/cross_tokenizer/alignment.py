"""Aligning two tokenizations of the same text, for distillation across tokenizers.

A causal LM's logits at the position before token ``i`` predict token ``i`` from the text that precedes it. Two
tokenizations of one text give comparable next-token distributions exactly where a student token and a teacher
token START at the same character: both positions have seen exactly the same text. This module finds those pairs
(and a documented fallback partner for every other student token), and maps vocabulary entries of the two
tokenizers onto each other through the text they stand for.

The span alignment follows the idea of GOLD (TRL ``trl/experimental/gold/gold_trainer.py``,
``ULDLoss._align_by_byte_offsets``: walk both offset arrays and match where the tokenizers agree on a boundary) and
the vocabulary mapping its hybrid loss (``ULDLoss._initialize_vocabulary_mapping``: equal token strings), here with
the strings normalised for the byte-level (GPT-2 ``Ġ``) and sentencepiece (``▁``, ``<0xHH>``) conventions so that
``Ġworld`` and ``▁world`` meet. Pure Python and torch; :func:`tokenize_with_spans` and :func:`spans_by_decoding`
only call methods of the tokenizer object they are given.
"""
from __future__ import annotations

import bisect
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

__all__ = [
    'Alignment', 'adds_prefix_space', 'align_positions', 'normalize_token', 'shared_vocabulary', 'spans_by_decoding',
    'spans_of_ids', 'tokenize_with_spans'
]

Span = Tuple[int, int]

_SP_SPACE = '\u2581'  # sentencepiece's "▁"
_SP_BYTE = re.compile(r'^<0x([0-9A-Fa-f]{2})>$')
# Chat-format special tokens (``<|im_end|>``, DeepSeek's full-width ``<｜end▁of▁sentence｜>``) keep their markers.
_SPECIAL = re.compile(r'^<[|\uff5c].*[|\uff5c]>$')


def _bytes_to_unicode() -> Dict[int, str]:
    """GPT-2's reversible byte -> printable character table (``Ġ`` is the space, ``Ċ`` the newline)."""
    printable = (list(range(ord('!'), ord('~') + 1)) + list(range(ord('\xa1'), ord('\xac') + 1)) +
                 list(range(ord('\xae'), ord('\xff') + 1)))
    table = {b: chr(b) for b in printable}
    shift = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shift)
            shift += 1
    return table


_BYTE_OF_CHAR = {ch: b for b, ch in _bytes_to_unicode().items()}
# Characters that only the byte-level table produces (above U+00FF): their presence marks a byte-level token.
_REMAPPED = frozenset(ch for ch in _BYTE_OF_CHAR if ord(ch) > 0xFF)


def _decode_bytes(raw: bytes) -> str:
    """UTF-8 where complete; each byte of an incomplete sequence becomes a lone surrogate (``surrogateescape``).

    Lone surrogates never occur in real text, so a partial character cannot collide with one, and the same byte
    reached through a byte-level token or a sentencepiece ``<0xHH>`` token normalises to the same string.
    """
    return raw.decode('utf-8', errors='surrogateescape')


def normalize_token(token: str, byte_level: Optional[bool] = None) -> str:
    """The text a vocabulary entry stands for.

    * Chat special tokens (``<|...|>``, ``<｜...｜>``) map to themselves.
    * Sentencepiece style: ``▁`` is a space, ``<0xHH>`` is the byte ``HH``.
    * GPT-2 byte level: every character is one byte through the inverse of ``bytes_to_unicode`` (``Ġ`` space,
      ``Ċ`` newline, ...), and the bytes are decoded as UTF-8 where complete.

    Bytes that do not form complete UTF-8 (a character split across tokens) become lone surrogates (see
    :func:`_decode_bytes`). ``byte_level`` says which convention the vocabulary uses (:func:`shared_vocabulary`
    decides it once per vocabulary); ``None`` guesses per token: byte level only when the token holds a character
    that only the byte-level table produces. The guess matters only for tokens made of Latin-1 letters such as
    ``ä``, which are the character itself in a sentencepiece vocabulary but the byte 0xE4 in a byte-level one.
    """
    if _SPECIAL.match(token):
        return token
    byte = _SP_BYTE.match(token)
    if byte:
        return _decode_bytes(bytes([int(byte.group(1), 16)]))
    if byte_level is None:
        byte_level = _SP_SPACE not in token and any(ch in _REMAPPED for ch in token)
    if byte_level and all(ch in _BYTE_OF_CHAR for ch in token):
        return _decode_bytes(bytes(_BYTE_OF_CHAR[ch] for ch in token))
    return token.replace(_SP_SPACE, ' ')


def _looks_byte_level(vocab: Dict[str, int]) -> bool:
    """A byte-level vocabulary has many ``Ġ``-prefixed words; a sentencepiece one ``▁``-prefixed words."""
    byte_words = sum(tok.startswith('\u0120') for tok in vocab)
    sp_words = sum(tok.startswith(_SP_SPACE) for tok in vocab)
    return byte_words > sp_words


def _canonical_entries(vocab: Dict[str, int], strip_leading_space: bool = False) -> Dict[str, int]:
    """Normalised text -> the one id that represents it.

    Several entries can stand for one text (in sentencepiece vocabularies ``A`` and the byte-fallback ``<0x41>``).
    The tokenizer emits the plain entry and uses byte fallback only for text it has no piece for, so the rule is:
    prefer entries that are not ``<0xHH>`` byte tokens, then the smallest id.

    ``strip_leading_space``: the entries are read where the tokenizer prepends a space of its own (the first word of
    a text, for sentencepiece tokenizers with a dummy prefix): an entry ``▁a`` then stands for ``a`` and is preferred
    to a plain ``a`` (which the tokenizer does not emit there); the bare ``▁`` stands for nothing and is left out.
    """
    byte_level = _looks_byte_level(vocab)
    best: Dict[str, Tuple[bool, bool, int]] = {}
    for tok, idx in vocab.items():
        text = normalize_token(tok, byte_level)
        stripped = strip_leading_space and text.startswith(' ')
        if stripped:
            text = text[1:]
            if not text:
                continue
        key = (not stripped and strip_leading_space, bool(_SP_BYTE.match(tok)), idx)
        if text not in best or key < best[text]:
            best[text] = key
    return {text: idx for text, (_, _, idx) in best.items()}


def shared_vocabulary(student_vocab: Dict[str, int],
                      teacher_vocab: Dict[str, int],
                      strip_leading_space: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Pairs of ids whose entries stand for the same text, one-to-one.

    Args:
        student_vocab, teacher_vocab: ``token string -> id`` (``tokenizer.get_vocab()``).
        strip_leading_space: ``None`` (default), ``'student'`` or ``'teacher'``: the side whose entries are read
            where its tokenizer prepends a space the text does not have (:func:`adds_prefix_space`): there its
            ``▁a`` stands for ``a``. It is the mapping for the first position of a response when one tokenizer adds
            a prefix space and the other does not: a sentencepiece teacher writes a response's first word as
            ``▁a``, a byte-level student as ``a``, and both mean the text ``a``; by the default mapping ``▁a`` would
            meet the student's ``Ġa`` (`` a``), which the student never writes first.

    Returns:
        ``(student_ids, teacher_ids)``: equal-length ``int64`` tensors, sorted by student id; ``student_ids[k]`` and
        ``teacher_ids[k]`` normalise (:func:`normalize_token`) to the same text (after stripping as asked). When
        several entries of one vocabulary normalise to the same text, the one kept is chosen by
        :func:`_canonical_entries` (a stripped entry on the stripped side, not a ``<0xHH>`` byte token if possible,
        then the smallest id), so the result is deterministic and one-to-one.
    """
    if strip_leading_space not in (None, 'student', 'teacher'):
        raise ValueError(f"strip_leading_space must be None, 'student' or 'teacher', got {strip_leading_space!r}")
    student = _canonical_entries(student_vocab, strip_leading_space == 'student')
    teacher = _canonical_entries(teacher_vocab, strip_leading_space == 'teacher')
    pairs = sorted((sid, teacher[text]) for text, sid in student.items() if text in teacher)
    student_ids = torch.tensor([s for s, _ in pairs], dtype=torch.long)
    teacher_ids = torch.tensor([t for _, t in pairs], dtype=torch.long)
    return student_ids, teacher_ids


def adds_prefix_space(tokenizer, probe: str = 'a') -> bool:
    """Whether the tokenizer prepends a space to the first word of a text it encodes (sentencepiece's dummy prefix:
    Llama-2, Mistral; not GPT-2/Qwen byte-level BPE nor Gemma), i.e. whether its first token of ``probe`` stands for
    more text than ``probe`` begins with."""
    ids = tokenizer(probe, add_special_tokens=False)['input_ids']
    if not ids:
        return False
    return normalize_token(tokenizer.convert_ids_to_tokens(ids[0])).startswith(' ') and not probe.startswith(' ')


@dataclass
class Alignment:
    """For every student token ``i``: its teacher partner ``teacher[i]`` and whether the pair is exact.

    ``exact[i]`` is True when both tokens start at the same character in the same order (the positions predicting
    them have seen the same text); otherwise ``teacher[i]`` is the fallback partner of :func:`align_positions`.
    """
    teacher: torch.Tensor  # [num_student_tokens] int64
    exact: torch.Tensor  # [num_student_tokens] bool

    @property
    def exact_fraction(self) -> float:
        return float(self.exact.float().mean()) if self.exact.numel() else 0.0


def _check_spans(spans: Sequence[Span], side: str, where: str) -> None:
    if not spans:
        raise ValueError(f'{where}: the {side} tokenization has no tokens, nothing to align')
    prev_start = 0
    for k, (start, end) in enumerate(spans):
        if start < prev_start or end < start:
            raise ValueError(f'{where}: {side} span {k} = ({start}, {end}) is not ordered; spans must start in '
                             'non-decreasing order with start <= end')
        prev_start = start


def align_positions(student_spans: Sequence[Span],
                    teacher_spans: Sequence[Span],
                    row: Optional[str] = None) -> Alignment:
    """Pair each student token with a teacher token, exactly where both start at the same character.

    Args:
        student_spans, teacher_spans: ``[(start, end), ...]`` character spans, in token order, of the response
            tokens of ONE row in each tokenization of the same text (:func:`tokenize_with_spans`,
            :func:`spans_by_decoding`). Spans should tile the text; zero-width tokens (``start == end``) are allowed.
        row: a label for error messages (e.g. ``'row 3'``).

    Rules:
        * Exact: tokens are grouped by start character; the ``k``-th student token starting at ``c`` is paired with
          the ``k``-th teacher token starting at ``c``. Usually there is one per side. Several tokens start at one
          character when some are zero width: the pieces of a character split into bytes but the last, a prefix
          marker, or an end-of-turn token placed at the end of the text (``(len, len)``). Pairing by order makes
          two end-of-turn tokens, or identical byte splits, exact pairs. (Two different byte splits of one character
          also pair in order, though their later pieces may have seen different bytes of it: rare, and counted
          as exact.)
        * Fallback (every other student token): the teacher token with the largest start ``<= c`` (the last one
          among equal starts), i.e. the teacher token covering ``c``; the first teacher token when ``c`` precedes
          them all. Its position has seen less text than the student's: an approximation.

    Raises:
        ValueError: a side has no tokens, spans are not ordered, or no pair is exact (the two span lists cannot
            come from the same text, since any two tilings of it start at the same character).
    """
    where = row or 'row'
    _check_spans(student_spans, 'student', where)
    _check_spans(teacher_spans, 'teacher', where)
    by_start: Dict[int, List[int]] = {}
    for k, (start, _) in enumerate(teacher_spans):
        by_start.setdefault(start, []).append(k)
    starts = [start for start, _ in teacher_spans]
    teacher, exact = [], []
    rank_at: Dict[int, int] = {}
    for start, _ in student_spans:
        rank = rank_at.get(start, 0)
        rank_at[start] = rank + 1
        same = by_start.get(start, [])
        if rank < len(same):
            teacher.append(same[rank])
            exact.append(True)
        else:
            teacher.append(_covering(starts, start))
            exact.append(False)
    if not any(exact):
        raise ValueError(f'{where}: no student token starts where a teacher token starts; the student spans '
                         f'{list(student_spans)[:4]}... and teacher spans {list(teacher_spans)[:4]}... are not '
                         'spans of the same text')
    return Alignment(torch.tensor(teacher, dtype=torch.long), torch.tensor(exact, dtype=torch.bool))


def _covering(starts: Sequence[int], char: int) -> int:
    """Index of the last teacher token starting at or before ``char`` (0 if none)."""
    return max(bisect.bisect_right(starts, char) - 1, 0)


def _tile(offsets: Sequence[Span]) -> List[Span]:
    """Make a fast tokenizer's offsets a tiling of the text, each token's span being the text it adds.

    Two corrections. Overlaps: a token whose offsets run into the next token's start holds only part of the
    shared character (a character split into byte tokens reports the whole character in every piece; so does a
    sentencepiece ``▁`` prepended to the first word), so the character goes to the later token, the one
    completing it, and a token left with nothing is zero width. Gaps: text that no token covers (offsets trimmed of a
    leading space, as ByteLevel's ``trim_offsets`` does) goes to the following token, since the position before
    that token has not seen it. The result is what :func:`spans_by_decoding` gives.
    """
    tiled: List[Span] = []
    prev_end = offsets[0][0] if offsets else 0
    for k, (start, end) in enumerate(offsets):
        if k + 1 < len(offsets):
            end = min(end, offsets[k + 1][0])
        start = prev_end
        end = max(end, start)
        tiled.append((start, end))
        prev_end = end
    return tiled


def tokenize_with_spans(tokenizer, text: str) -> Tuple[List[int], List[Span]]:
    """Token ids of ``text`` (no special tokens added) and their character spans in ``text``.

    A HF *fast* tokenizer gives the offsets directly (``return_offsets_mapping``), made a tiling by :func:`_tile`;
    otherwise the ids come from ``encode`` and the spans from :func:`spans_by_decoding`.

    Raises:
        ValueError: the tokenizer offers neither offsets (a fast tokenizer) nor ``decode``.
    """
    if getattr(tokenizer, 'is_fast', False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(enc['input_ids']), _tile([tuple(o) for o in enc['offset_mapping']])
    if not callable(getattr(tokenizer, 'decode', None)) or not callable(getattr(tokenizer, 'encode', None)):
        raise ValueError(f'{type(tokenizer).__name__} cannot map tokens to text spans: it is not a fast tokenizer '
                         '(no offsets mapping) and has no encode/decode; cross-tokenizer distillation needs one')
    ids = list(tokenizer.encode(text, add_special_tokens=False))
    _, spans = spans_by_decoding(tokenizer, ids)
    return ids, spans


def spans_of_ids(tokenizer, token_ids: Sequence[int]) -> Tuple[str, List[Span]]:
    """The text of given ids (e.g. sampled ones) and each token's span in it.

    A fast tokenizer that re-encodes the decoded text into the same ids gives its offsets
    (:func:`tokenize_with_spans`). Ids that re-encoding would not reproduce (a sampled non-canonical split, common at
    temperature 1) go through :func:`spans_by_decoding`, exact for any ids and also linear, with a larger constant.
    """
    ids = list(token_ids)
    if getattr(tokenizer, 'is_fast', False):
        text = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        encoded, spans = tokenize_with_spans(tokenizer, text)
        if encoded == ids:
            return text, spans
    return spans_by_decoding(tokenizer, ids)


def spans_by_decoding(tokenizer, token_ids: Sequence[int], context: int = 2) -> Tuple[str, List[Span]]:
    """The text of ``token_ids`` and each token's span, from decoding.

    By definition token ``i`` spans from the end of token ``i - 1`` to the longest common prefix of
    ``decode(ids[:i + 1])`` and the full text: a token that ends inside a character (its prefix decodes to
    ``U+FFFD``) is zero width and the token that completes the character carries it. Works on any ids (sampled ones
    that re-encoding the text would not reproduce).

    Linear in the length (the definition decodes every prefix: L^2 / 2 ids): ``decode(ids[:i + 1])`` is read as the
    text up to the last token boundary that decoded cleanly (an anchor: the decoded prefix is exactly the text so far
    and ends on a whole character) followed by what decoding from ``context`` anchors further back adds beyond it.
    Starting a few clean boundaries back keeps what decoders do at the start of a text (sentencepiece's leading
    space strip) and inside runs of byte tokens (decoded together, all U+FFFD when invalid) out of the added text.
    Where a decoder's window does not extend its start the prefix is decoded whole, as the definition says.
    Checked against the definition on random id sequences of byte-level and sentencepiece tokenizers.

    Raises:
        ValueError: the tokenizer has no ``decode``.
    """
    if not callable(getattr(tokenizer, 'decode', None)):
        raise ValueError(f'{type(tokenizer).__name__} has no decode(): cannot map tokens to text spans')
    ids = list(token_ids)

    def decode(part):
        return tokenizer.decode(part, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    text = decode(ids)
    spans: List[Span] = []
    prev_end = 0
    anchors = [(0, 0)]  # (token, char) where decode(ids[:token]) == text[:char], ending on a whole character
    head, head_text = 0, ''
    for i in range(len(ids)):
        anchor, anchor_char = anchors[-1]
        window = decode(ids[head:i + 1])
        if window.startswith(head_text):
            added = window[len(head_text):]
        else:  # the window does not extend its head: the whole prefix
            added = _after(decode(ids[:i + 1]), text, anchor_char)
        end = prev_end if added is None else max(
            anchor_char + _common_prefix_length(added, text[anchor_char:anchor_char + len(added)]), prev_end)
        spans.append((prev_end, end))
        prev_end = end
        if added is not None and not added.endswith('\ufffd') and text.startswith(added, anchor_char):
            anchors.append((i + 1, anchor_char + len(added)))
            head = anchors[max(len(anchors) - 1 - context, 0)][0]
            head_text = decode(ids[head:i + 1]) if head <= i else ''
    return text, spans


def _after(prefix: str, text: str, char: int) -> Optional[str]:
    """What ``prefix`` holds beyond ``text[:char]``; None when it departs from the text before ``char``."""
    return prefix[char:] if prefix.startswith(text[:char]) else None


def _common_prefix_length(a: str, b: str) -> int:
    n = min(len(a), len(b))
    k = 0
    while k < n and a[k] == b[k]:
        k += 1
    return k
