"""The quality benchmark's task generator, checker and metrics (``swift_gkd_plugin.demo.quality_task``)."""
from __future__ import annotations

import os

import pytest
import torch

from swift_gkd_plugin.demo import quality_task as q
from swift_gkd_plugin.demo import tiny

PROMPT = 'Sort: k c a m f h b p'
UP, DOWN = 'a b c f h k m p', 'p m k h f c b a'


def _letter_set(row):
    return frozenset(q.prompt_of(row)[len(q.PROMPT_PREFIX):].split())


def test_splits_are_disjoint_as_letter_sets():
    train, test = q.make_rows(3000, seed=0, split='train'), q.make_rows(300, seed=1, split='test')
    assert not {_letter_set(r) for r in train} & {_letter_set(r) for r in test}
    assert len({q.prompt_of(r) for r in train}) == 3000  # distinct prompts within a split
    assert all(q.split_of(sorted(_letter_set(r))) == 'test' for r in test)


def test_rows_are_deterministic_and_hold_both_right_answers():
    rows = q.make_rows(400, seed=3)
    assert rows == q.make_rows(400, seed=3) and rows != q.make_rows(400, seed=4)
    for row in rows:
        letters = q.prompt_of(row)[len(q.PROMPT_PREFIX):].split()
        assert len(set(letters)) == q.NUM_SYMBOLS and set(letters) <= set(q.SYMBOLS)
        assert q.is_correct(q.prompt_of(row), row['messages'][1]['content'])
    ascending = sum(r['messages'][1]['content'] == q.valid_answers(q.prompt_of(r))[0] for r in rows)
    assert 150 < ascending < 250  # references pick a direction at random


def test_checker_accepts_exactly_the_two_sorted_orders():
    assert q.valid_answers(PROMPT) == (UP, DOWN)
    assert q.is_correct(PROMPT, UP) and q.is_correct(PROMPT, f' {DOWN}\n')
    wrong = ['a b c f h k p m', 'a b c f h k m', 'a b c f h k m p p', 'a b c f h k m q', 'p m k h f c b a a',
             'k c a m f h b p', 'a b c f h k m p m k', '', 'abcfhkmp']
    assert not any(q.is_correct(PROMPT, w) for w in wrong)
    with pytest.raises(ValueError, match='not a task prompt'):
        q.valid_answers('Reverse: a b')


def test_token_accuracy_and_exact_match_on_hand_made_answers():
    assert q.token_accuracy(PROMPT, UP) == 1.0 and q.token_accuracy(PROMPT, DOWN) == 1.0
    assert q.token_accuracy(PROMPT, 'a b c f h k p m') == 6 / 8  # last two swapped
    assert q.token_accuracy(PROMPT, 'p m k h') == 4 / 8  # stopped early: missing letters are wrong
    assert q.token_accuracy(PROMPT, 'a b c f h k m p a b') == 8 / 10  # surplus letters are wrong
    assert q.token_accuracy(PROMPT, 'a m k h f c b a') == 7 / 8  # closer to descending
    assert q.token_accuracy(PROMPT, '') == 0.0
    metrics = q.answer_metrics([PROMPT] * 4, [UP, DOWN, 'a b c f h k p m', ''])
    assert metrics['exact_match'] == 0.5
    assert metrics['token_accuracy'] == pytest.approx((1 + 1 + 0.75 + 0) / 4)


def test_agreement_counts_identical_answers():
    assert q.agreement([UP, DOWN, 'x'], [UP, UP, ' x ']) == pytest.approx(2 / 3)
    assert q.agreement([], []) == 0.0
    with pytest.raises(ValueError):
        q.agreement([UP], [])


@pytest.fixture(scope='module')
def random_model(tmp_path_factory):
    root = str(tmp_path_factory.mktemp('quality_model'))
    tok = tiny.build_tokenizer(os.path.join(root, 'tok'))
    return tiny.build_model(os.path.join(root, 'model'), tok, seed=5), tok


def _greedy_one_by_one(model_dir, tok, prompt, max_new_tokens=12):
    """Reference: greedy decoding of one prompt, no padding, no cache."""
    model = tiny.load_model(model_dir)
    ids = tok.encode(f'<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n', add_special_tokens=False)
    stop = {tok.convert_tokens_to_ids('<|im_end|>'), tok.pad_token_id}
    new = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            nxt = int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
            if nxt in stop:
                break
            new.append(nxt)
    return tok.decode(new, skip_special_tokens=True).strip()


def test_batched_generation_with_left_padding_matches_one_by_one(random_model):
    model_dir, tok = random_model
    # prompts of different token lengths, so the batch is left-padded
    prompts = [q.prompt_of(r) for r in q.make_rows(5, seed=0, split='test')] + ['Sort: a b', 'Sort: p']
    batched = q.generate_answers(model_dir, tok, prompts, batch_size=7)
    assert batched == [_greedy_one_by_one(model_dir, tok, p) for p in prompts]
    assert any(batched)  # a random model still writes something: the comparison is not vacuous


def test_other_family_tokenizer_learns_the_task_and_round_trips_it(tmp_path):
    """The cross-tokenizer benchmark's teacher tokenizer (``build_xtok_teacher``): sentencepiece-style pieces of the
    task's own words, exact round trips of prompts and answers, spans that tile them and align with the student's."""
    from swift_gkd_plugin.core.cross_tokenizer.alignment import align_positions, tokenize_with_spans
    rows = q.make_rows(200, seed=0)
    sp_tok = tiny.build_sentencepiece_tokenizer(str(tmp_path / 'sp'), q.XTOK_VOCAB_SIZE, q.xtok_corpus(rows))
    tok = tiny.build_tokenizer(str(tmp_path / 'bl'))
    assert sp_tok.tokenize(PROMPT)[:2] == ['\u2581Sort:', '\u2581k']  # pieces of the task's text, not bytes
    assert sp_tok.get_vocab().keys() != tok.get_vocab().keys()
    for text in [q.prompt_of(r) for r in rows[:20]] + [r['messages'][1]['content'] for r in rows[:20]] + [UP, DOWN]:
        ids, spans = tokenize_with_spans(sp_tok, text)
        assert sp_tok.decode(ids) == text
        assert spans[0][0] == 0 and spans[-1][1] == len(text)
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))  # the spans tile the text
    # every answer token of the student has a teacher token starting at the same character (``a`` / ``▁a``)
    alignment = align_positions(tokenize_with_spans(tok, UP)[1], tokenize_with_spans(sp_tok, UP)[1])
    assert alignment.exact_fraction == 1.0
    assert sp_tok.tokenize(UP)[0] == '\u2581a' and tok.tokenize(UP)[0] == 'a'
    # without the prefix space (Gemma style) the first piece has no space, like the student's, and a real one stays
    np_tok = tiny.build_sentencepiece_tokenizer(str(tmp_path / 'np'), q.XTOK_VOCAB_SIZE, q.xtok_corpus(rows),
                                                prefix_space=False)
    assert np_tok.tokenize(UP)[:2] == ['a', '\u2581b'] and np_tok.tokenize(PROMPT)[0] == 'Sort:'
    assert np_tok.decode(np_tok.encode(' ' + UP, add_special_tokens=False)) == ' ' + UP
    # the chat template renders the same conversation in both families
    messages = [{'role': 'user', 'content': PROMPT}]
    assert sp_tok.apply_chat_template(messages, tokenize=False) == tok.apply_chat_template(messages, tokenize=False)
