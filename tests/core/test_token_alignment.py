"""Cross-tokenizer alignment: token normalisation, shared vocabulary, span alignment, spans from real tokenizers.

Hand-made tokenizations cover the cases one by one; two real tokenizers trained here offline with the ``tokenizers``
library (a GPT-2 style byte-level BPE and a sentencepiece style Metaspace BPE with byte fallback, different merges and
vocabulary sizes) check the whole chain on real offsets and decodes.
"""
import pytest
import torch

from swift_gkd_plugin.core.cross_tokenizer.alignment import (adds_prefix_space, align_positions, normalize_token,
                                                   shared_vocabulary, spans_by_decoding, spans_of_ids,
                                                   tokenize_with_spans)

# ---------------------------------------------------------------------------------------------------------------------
# normalize_token
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize('token, byte_level, text', [
    ('\u0120world', True, ' world'),  # Ġworld
    ('\u2581world', False, ' world'),  # ▁world
    ('\u010a', True, '\n'),  # Ċ
    ('<0x0A>', False, '\n'),
    ('hello', True, 'hello'),
    ('hello', False, 'hello'),
    ('\u00e4\u00bd\u0142', True, '\u4f60'),  # the three bytes of 你 in one byte-level token
    ('\u00e4', False, '\u00e4'),  # ä is the character in a sentencepiece vocabulary ...
    ('\u00c3\u00a4', True, '\u00e4'),  # ... and the bytes C3 A4 in a byte-level one
    ('<|im_end|>', True, '<|im_end|>'),
    ('<|im_end|>', False, '<|im_end|>'),
    ('<\uff5cend\u2581of\u2581sentence\uff5c>', False, '<\uff5cend\u2581of\u2581sentence\uff5c>'),  # DeepSeek's
])
def test_normalize_token(token, byte_level, text):
    assert normalize_token(token, byte_level) == text


def test_partial_utf8_is_the_same_byte_in_both_conventions():
    """A byte-level token holding the first byte of 你 (E4) and sentencepiece's <0xE4> stand for the same byte, and
    that byte normalises to a lone surrogate: it can never equal real text."""
    first_byte = normalize_token('\u00e4', byte_level=True)
    assert first_byte == normalize_token('<0xE4>') == '\udce4'
    assert normalize_token('\u00e4\u00bd', byte_level=True) == '\udce4\udcbd'
    # the guess without byte_level: a remapped character (Ġ, ł, ...) marks a byte-level token
    assert normalize_token('\u0120world') == ' world' and normalize_token('\u00e4\u00bd\u0142') == '\u4f60'


# ---------------------------------------------------------------------------------------------------------------------
# shared_vocabulary
# ---------------------------------------------------------------------------------------------------------------------

BYTE_VOCAB = {'<|im_end|>': 0, 'h': 1, 'e': 2, '\u0120': 3, '\u010a': 4, '\u0120the': 5, 'the': 6, '\u00e4': 7,
              '\u00e4\u00bd\u0142': 8, 'ness': 9}
SP_VOCAB = {'</s>': 0, '<|im_end|>': 1, '<0x0A>': 2, '<0x68>': 3, '<0xE4>': 4, '\u2581': 5, 'h': 6, '\u2581the': 7,
            '\u4f60': 8, 'iness': 9, 'the': 10}


def test_shared_vocabulary_matches_by_text():
    student_ids, teacher_ids = shared_vocabulary(BYTE_VOCAB, SP_VOCAB)
    pairs = dict(zip(student_ids.tolist(), teacher_ids.tolist()))
    assert pairs == {
        0: 1,  # <|im_end|> itself
        1: 6,  # h: the plain piece, not the byte fallback <0x68> (id 3, smaller)
        3: 5,  # Ġ = ▁ = ' '
        4: 2,  # Ċ = <0x0A> = '\n'
        5: 7,  # Ġthe = ▁the
        6: 10,  # the
        7: 4,  # the lone byte E4 in both
        8: 8,  # 你: three byte-level bytes = one sentencepiece piece
    }
    assert student_ids.dtype == teacher_ids.dtype == torch.long
    assert student_ids.tolist() == sorted(student_ids.tolist())


def test_shared_vocabulary_is_one_to_one_and_deterministic():
    """Two entries for one text: the plain one wins over <0xHH>, then the smaller id, whatever the dict order."""
    teacher = {'<0x41>': 3, 'A': 70, 'B': 71, '\u2581B': 72}
    student = {'B': 9, 'A': 5, 'b': 4}
    for vocab in (teacher, dict(reversed(list(teacher.items())))):
        s, t = shared_vocabulary(student, vocab)
        assert list(zip(s.tolist(), t.tolist())) == [(5, 70), (9, 71)]
    duplicated = {'x': 7, '\u2581x': 8, ' x': 3}  # ▁x and ' x' are both ' x': the smaller id is kept
    s, t = shared_vocabulary({' x': 0, 'x': 1}, duplicated)
    assert list(zip(s.tolist(), t.tolist())) == [(0, 3), (1, 7)]


def test_first_word_mapping_reads_the_prefixed_side_without_its_space():
    """Where a sentencepiece tokenizer writes a response's first word as ``▁a`` (its own prefix space) and a
    byte-level one as ``a``, both mean ``a``: ``▁a`` pairs with ``a``, and ``Ġa`` (a real space) has no partner."""
    byte_vocab = {'<|im_end|>': 0, 'a': 1, '\u0120a': 2, 'the': 3, '\u0120the': 4, 'x': 5}
    sp_vocab = {'<|im_end|>': 0, '\u2581a': 1, 'a': 2, '\u2581': 3, '\u2581the': 4, '<0x78>': 5, '\u2581\u2581a': 6}
    plain = dict(zip(*(ids.tolist() for ids in shared_vocabulary(byte_vocab, sp_vocab))))
    assert plain == {0: 0, 1: 2, 2: 1, 4: 4, 5: 5}  # by text: Ġa = ▁a = ' a', a = a
    first = dict(zip(*(ids.tolist() for ids in shared_vocabulary(byte_vocab, sp_vocab, strip_leading_space='teacher'))))
    # ▁a -> a (preferred to the plain a), ▁the -> the, ▁▁a -> ' a' = Ġa; ▁ alone stands for nothing; x by its byte
    assert first == {0: 0, 1: 1, 2: 6, 3: 4, 5: 5}
    # the mirror case: a sentencepiece student, a byte-level teacher
    mirrored = dict(zip(*(ids.tolist() for ids in shared_vocabulary(sp_vocab, byte_vocab, strip_leading_space='student'))))
    assert mirrored == {s: t for t, s in first.items()}
    with pytest.raises(ValueError, match="strip_leading_space must be None, 'student' or 'teacher', got 'both'"):
        shared_vocabulary(byte_vocab, sp_vocab, strip_leading_space='both')


# ---------------------------------------------------------------------------------------------------------------------
# align_positions on hand-made tokenizations
# ---------------------------------------------------------------------------------------------------------------------


def spans_of(pieces):
    """Contiguous character spans of a list of text pieces."""
    spans, start = [], 0
    for piece in pieces:
        spans.append((start, start + len(piece)))
        start += len(piece)
    return spans


def test_merges_split_differently():
    # "unhappiness": un|happi|ness against unh|app|iness: only the word start is shared
    alignment = align_positions(spans_of(['un', 'happi', 'ness']), spans_of(['unh', 'app', 'iness']))
    assert alignment.exact.tolist() == [True, False, False]
    # fallbacks: the teacher token covering the student token's first character
    assert alignment.teacher.tolist() == [0, 0, 2]
    # "the unhappiness is": boundaries at ' unhappiness' and ' is' agree, inside the word they do not
    student = spans_of(['the', ' un', 'happi', 'ness', ' is'])
    teacher = spans_of(['the', ' unh', 'app', 'iness', ' is'])
    alignment = align_positions(student, teacher, row='row 0')
    assert alignment.exact.tolist() == [True, True, False, False, True]
    assert alignment.teacher.tolist() == [0, 1, 1, 3, 4]
    assert alignment.exact_fraction == pytest.approx(3 / 5)


def test_byte_level_and_sentencepiece_markers_give_the_same_spans():
    """'Ġhello' and '▁hello' both carry the space before the word: same spans, all exact."""
    text = 'say hello world'
    byte_level = ['say', '\u0120hello', '\u0120world']
    sentencepiece = ['\u2581say', '\u2581hello', '\u2581world']
    # spans as the tokenizers report them in the text (the sentencepiece first-word marker is zero width)
    student = spans_of([normalize_token(t, True) for t in byte_level])
    teacher = [(0, 3), (3, 9), (9, 15)]
    assert [text[a:b] for a, b in student] == ['say', ' hello', ' world']
    alignment = align_positions(student, teacher)
    assert alignment.exact.all() and alignment.teacher.tolist() == [0, 1, 2]
    assert [normalize_token(t) for t in sentencepiece[1:]] == [text[a:b] for a, b in teacher[1:]]


def test_multibyte_character_split_across_byte_tokens():
    """你 split into two byte tokens (zero width, then the one completing it) against one whole-character token:
    the first byte token's position has seen what the teacher's has (exact); the second has seen one byte more
    (fallback to the teacher token covering the character)."""
    student = [(0, 2), (2, 2), (2, 3), (3, 5)]  # 'ab', byte 1 of 你, bytes 2-3 of 你, 'cd'
    teacher = [(0, 2), (2, 3), (3, 5)]
    alignment = align_positions(student, teacher)
    assert alignment.exact.tolist() == [True, True, False, True]
    assert alignment.teacher.tolist() == [0, 1, 1, 2]
    # both split it the same way: every pair is exact
    assert align_positions(student, student).exact.all()


def test_end_of_turn_tokens_with_empty_spans():
    """An end-of-turn token has no text: a zero-width span at the end. Two of them pair exactly (both positions
    have seen the whole response); without a teacher one the student's falls back to the last teacher token."""
    text_spans = spans_of(['Hi', ' there'])
    im_end = [(8, 8)]
    both = align_positions(text_spans + im_end, text_spans + im_end)
    assert both.exact.all() and both.teacher.tolist() == [0, 1, 2]
    student_only = align_positions(text_spans + im_end, text_spans)
    assert student_only.exact.tolist() == [True, True, False] and student_only.teacher.tolist() == [0, 1, 1]
    # a special token whose text is in the response (same special token in both vocabularies) is a normal token
    special = spans_of(['Hi', '<|im_end|>'])
    assert align_positions(special, special).exact.all()


def test_bad_spans_are_named_errors():
    with pytest.raises(ValueError, match=r'row 7: the teacher tokenization has no tokens'):
        align_positions([(0, 1)], [], row='row 7')
    with pytest.raises(ValueError, match=r'row 2: the student tokenization has no tokens'):
        align_positions([], [(0, 1)], row='row 2')
    with pytest.raises(ValueError, match=r'row 1: student span 1 = \(0, 2\) is not ordered'):
        align_positions([(3, 5), (0, 2)], [(0, 5)], row='row 1')
    with pytest.raises(ValueError, match=r'row 4: no student token starts where a teacher token starts'):
        align_positions([(5, 6)], [(0, 3)], row='row 4')


# ---------------------------------------------------------------------------------------------------------------------
# Real tokenizers, built offline
# ---------------------------------------------------------------------------------------------------------------------

CORPUS = [
    'the unhappiness of the world is a happy thing to study',
    'happiness and unhappiness are two sides of one coin',
    'hello world, this is a tokenizer trained in a test',
    'naïve café owners said 你好 世界 to the world',
    'line one\nline two\n  indented line three',
] * 20
TEXTS = ['the unhappiness of the world', 'naïve café: 你好, world!\nline two', 'x  y\tz<|im_end|>']


def train(byte_level: bool, vocab_size: int, trim_offsets: bool = False):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    special = [AddedToken('<|im_end|>', special=True, normalized=False)]
    if byte_level:  # GPT-2 / Qwen style
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        if trim_offsets:  # GPT-2's offsets leave out the space a word token starts with
            tok.post_processor = processors.ByteLevel(trim_offsets=True)
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:  # Llama / sentencepiece style: ▁ for spaces, <0xHH> byte fallback
        tok = Tokenizer(models.BPE(byte_fallback=True))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement='\u2581', prepend_scheme='first')
        tok.decoder = decoders.Sequence([
            decoders.Replace('\u2581', ' '), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(' ', 1, 0)])
        alphabet = []
        special += [AddedToken(f'<0x{b:02X}>', special=False, normalized=False) for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special, initial_alphabet=alphabet,
                                  show_progress=False)
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False)


@pytest.fixture(scope='module')
def tokenizers_pair():
    return train(byte_level=True, vocab_size=330), train(byte_level=False, vocab_size=420)


def check_tiling(text, spans):
    assert spans[0][0] == 0 and spans[-1][1] == len(text)
    assert all(a == prev_b for (_, prev_b), (a, _) in zip(spans, spans[1:]))


@pytest.mark.parametrize('text', TEXTS)
def test_real_tokenizer_spans_tile_the_text_and_agree_with_decoding(tokenizers_pair, text):
    for tok in tokenizers_pair:
        ids, spans = tokenize_with_spans(tok, text)
        check_tiling(text, spans)
        decoded, decoded_spans = spans_by_decoding(tok, ids)
        assert decoded == text
        assert decoded_spans == spans  # offsets (tiled) and decoding say the same
        # a token that is whole characters stands for exactly its span (the sentencepiece marker prepended to the
        # first word is no text of the response)
        byte_level = tok is tokenizers_pair[0]
        for k, (tid, (a, b)) in enumerate(zip(ids, spans)):
            piece = normalize_token(tok.convert_ids_to_tokens(tid), byte_level)
            if not any('\udc80' <= ch <= '\udcff' for ch in piece):
                assert piece == (text[a:b] if byte_level or k > 0 else ' ' + text[a:b])


def test_trimmed_offsets_give_the_space_to_the_word_after_it(tokenizers_pair):
    """Trimmed offsets leave the space of 'Ġworld' out of every token; the position before 'Ġworld' has not seen
    it, so the tiled spans give it to 'Ġworld', as untrimmed offsets do."""
    trimmed = train(byte_level=True, vocab_size=330, trim_offsets=True)
    text = TEXTS[0]
    raw = trimmed(text, add_special_tokens=False, return_offsets_mapping=True)['offset_mapping']
    assert any(a > prev_b for (_, prev_b), (a, _) in zip(raw, raw[1:]))  # the gaps are there
    assert tokenize_with_spans(trimmed, text) == tokenize_with_spans(tokenizers_pair[0], text)


def test_real_tokenizers_align_end_to_end(tokenizers_pair):
    byte_tok, sp_tok = tokenizers_pair
    for row, text in enumerate(TEXTS):
        s_ids, s_spans = tokenize_with_spans(byte_tok, text)
        t_ids, t_spans = tokenize_with_spans(sp_tok, text)
        assert s_ids != t_ids
        alignment = align_positions(s_spans, t_spans, row=f'row {row}')
        for i, (k, exact) in enumerate(zip(alignment.teacher.tolist(), alignment.exact.tolist())):
            if exact:  # exact pairs: the predicting positions have seen the same text
                assert s_spans[i][0] == t_spans[k][0]
            else:  # fallbacks: the teacher token covers the student token's start
                assert t_spans[k][0] <= s_spans[i][0]
        assert 0 < alignment.exact_fraction <= 1
    # the same tokenizer on both sides aligns every token exactly, with itself
    ids, spans = tokenize_with_spans(sp_tok, TEXTS[1])
    same = align_positions(spans, spans)
    assert same.exact.all() and same.teacher.tolist() == list(range(len(ids)))


def test_real_tokenizers_shared_vocabulary(tokenizers_pair):
    byte_tok, sp_tok = tokenizers_pair
    s_vocab, t_vocab = byte_tok.get_vocab(), sp_tok.get_vocab()
    student_ids, teacher_ids = shared_vocabulary(s_vocab, t_vocab)
    s_token = {i: t for t, i in s_vocab.items()}
    t_token = {i: t for t, i in t_vocab.items()}
    assert len(set(student_ids.tolist())) == len(set(teacher_ids.tolist())) == len(student_ids) > 50
    for s, t in zip(student_ids.tolist(), teacher_ids.tolist()):
        assert normalize_token(s_token[s], True) == normalize_token(t_token[t], False)
    pairs = set(zip(student_ids.tolist(), teacher_ids.tolist()))
    assert (s_vocab['<|im_end|>'], t_vocab['<|im_end|>']) in pairs
    assert (s_vocab['\u0120the'], t_vocab['\u2581the']) in pairs
    # newline: Ċ against the teacher's plain '\n' piece (preferred to its byte-fallback <0x0A>)
    assert '\n' in t_vocab and (s_vocab['\u010a'], t_vocab['\n']) in pairs


def test_prefix_space_of_real_tokenizers_and_their_first_word(tokenizers_pair):
    byte_tok, sp_tok = tokenizers_pair
    assert not adds_prefix_space(byte_tok) and adds_prefix_space(sp_tok)
    text = TEXTS[0]  # 'the unhappiness ...': each side's own first token of the text
    s_first, t_first = (tok(text, add_special_tokens=False)['input_ids'][0] for tok in tokenizers_pair)
    assert byte_tok.convert_ids_to_tokens(s_first) == 'the' and sp_tok.convert_ids_to_tokens(t_first) == '\u2581the'
    plain = set(zip(*(ids.tolist() for ids in shared_vocabulary(byte_tok.get_vocab(), sp_tok.get_vocab()))))
    first = set(zip(*(ids.tolist() for ids in shared_vocabulary(byte_tok.get_vocab(), sp_tok.get_vocab(),
                                                               strip_leading_space='teacher'))))
    assert (s_first, t_first) in first and (s_first, t_first) not in plain
    assert (byte_tok.convert_tokens_to_ids('\u0120the'), t_first) in plain


def test_spans_of_given_ids_canonical_or_not(tokenizers_pair):
    """Canonical ids take the offsets; a split that re-encoding would not give (as sampling can produce) is still
    spanned exactly, by decoding."""
    for tok in tokenizers_pair:
        text = TEXTS[0]
        ids, spans = tokenize_with_spans(tok, text)
        assert spans_of_ids(tok, ids) == (text, spans)
        long_token = max(range(len(ids)), key=lambda k: spans[k][1] - spans[k][0])
        a, b = spans[long_token]
        # the longest token spelled one symbol at a time (each symbol of a BPE entry is itself an entry)
        pieces = [tok.convert_tokens_to_ids(ch) for ch in tok.convert_ids_to_tokens(ids[long_token])]
        assert len(pieces) > 1 and None not in pieces
        split = ids[:long_token] + pieces + ids[long_token + 1:]
        decoded, split_spans = spans_of_ids(tok, split)
        assert decoded == text and split != ids
        check_tiling(text, split_spans)
        assert split_spans[:long_token] == spans[:long_token] and split_spans[long_token] == (a, a + 1)


def test_tokenizer_without_offsets_or_decode_is_refused():
    with pytest.raises(ValueError, match='not a fast tokenizer .* and has no encode/decode'):
        tokenize_with_spans(object(), 'text')
    with pytest.raises(ValueError, match=r'has no decode\(\)'):
        spans_by_decoding(object(), [1, 2])


def spans_by_definition(tok, ids):
    """The definition, quadratic: token ``i`` ends at the longest common prefix of ``decode(ids[:i + 1])`` and the
    text (never before the previous token's end)."""
    def decode(part):
        return tok.decode(part, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    text, spans, prev = decode(ids), [], 0
    for i in range(len(ids)):
        prefix = decode(ids[:i + 1])
        common = next((k for k, (a, b) in enumerate(zip(prefix, text)) if a != b), min(len(prefix), len(text)))
        spans.append((prev, max(common, prev)))
        prev = spans[-1][1]
    return text, spans


def test_spans_by_decoding_match_the_definition_on_random_ids(tokenizers_pair):
    """Random id sequences (partial UTF-8, byte-fallback runs, stray sentencepiece markers, special tokens in the
    middle) and random re-splits of real texts: the linear decoding gives the definition's spans exactly."""
    import random
    rng = random.Random(0)
    for tok in tokenizers_pair:
        vocab = sorted(tok.get_vocab().values())
        rows = [[rng.choice(vocab) for _ in range(rng.randint(1, 40))] for _ in range(150)]
        for text in TEXTS + CORPUS[:5]:
            ids = tok(text, add_special_tokens=False)['input_ids']
            split = []
            for tid in ids:  # each token kept, or spelled symbol by symbol where those are entries
                pieces = [tok.convert_tokens_to_ids(ch) for ch in tok.convert_ids_to_tokens(tid)]
                split += pieces if rng.random() < 0.5 and None not in pieces and tok.unk_token_id not in pieces \
                    else [tid]
            rows.append(split)
        for ids in rows:
            assert spans_by_decoding(tok, ids) == spans_by_definition(tok, ids), ids


class CountingTokenizer:
    """A real tokenizer, counting how many ids its ``decode`` reads."""

    def __init__(self, tok):
        self.tok, self.decoded = tok, 0

    def decode(self, ids, **kwargs):
        self.decoded += len(ids)
        return self.tok.decode(ids, **kwargs)


def test_spans_by_decoding_is_linear_in_the_length(tokenizers_pair):
    """Sampled ids that re-encoding would not reproduce take this path for every row; decoding every prefix read
    L^2 / 2 ids (500k for a 1k-token row). Now a bounded number per token."""
    for tok in tokenizers_pair:
        ids = tok((' '.join(CORPUS[:5]) + ' ') * 8, add_special_tokens=False)['input_ids']
        counting = CountingTokenizer(tok)
        assert spans_by_decoding(counting, ids) == spans_by_definition(tok, ids)
        assert len(ids) > 300 and counting.decoded < 12 * len(ids), (len(ids), counting.decoded)
