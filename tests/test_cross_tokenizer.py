"""``--gkd_cross_tokenizer uld|hybrid``: real ``swift rlhf`` runs with a teacher of another tokenizer family.

The student uses the tiny byte-level BPE tokenizer, the teacher a sentencepiece-style one (``sp_teacher``): other
vocabulary, other merges, ``▁`` instead of ``Ġ``. One run per (method, mode), shared by the assertions on it.
"""
import math
from types import SimpleNamespace

import pytest
from conftest import base_args, run_swift
from test_activation_and_bad_input import \
    test_bad_input_is_refused_before_any_model_is_loaded as refused_before_loading

from swift_gkd_plugin.options.flags import check_gkd_scalars

MODES = {  # mode -> flags that give it on every step
    'off_policy': dict(lmbda=0),
    'on_policy': dict(lmbda=1),
    'seq_kd': dict(lmbda=0, seq_kd='true'),
}
STEPS = 8  # off-policy runs on the fixed batch
FRACTIONS = ('gkd/xtok_exact_fraction', 'gkd/xtok_fallback_fraction')


@pytest.fixture(scope='module')
def xtok_runs(tiny_ws, sp_teacher, shared_runs):
    """``runs(method, mode)``: one run, shared by the test session. Off-policy runs train on the fixed four-row batch
    at a real learning rate for eight steps (the loss must fall); the sampling modes run three steps on the training
    set."""
    def start(method, mode):
        fixed = dict(dataset=tiny_ws.fixed, per_device_train_batch_size=4, learning_rate=5e-3, max_steps=STEPS,
                     lr_scheduler_type='constant', warmup_ratio=0, temperature=1.0)
        flags = dict(teacher_model=sp_teacher, gkd_cross_tokenizer=method, **MODES[mode],
                     **(fixed if mode == 'off_policy' else {}))
        return lambda out: run_swift(base_args(tiny_ws, out, **flags))

    shared = shared_runs('cross_tokenizer', {f'{method}_{mode}': start(method, mode) for method in ('uld', 'hybrid')
                                             for mode in MODES})
    return lambda method, mode: shared[f'{method}_{mode}']


@pytest.mark.parametrize('mode', list(MODES))
@pytest.mark.parametrize('method', ['uld', 'hybrid'])
def test_every_mode_trains_with_alignment_metrics(xtok_runs, method, mode):
    run = xtok_runs(method, mode)
    assert run.logs and all(math.isfinite(loss) for loss in run.losses)
    assert {row['mode'] for row in run.modes()} == {mode}
    assert 'the fused loss cannot apply here (cross-tokenizer distillation' in run.output
    for row in run.logs:
        assert f'gkd/loss_{mode}' in row and math.isfinite(row['gkd/top1_agreement'])
        exact, fallback = (row[name] for name in FRACTIONS)
        assert 0 <= exact <= 1 and 0 <= fallback <= 1 and exact + fallback == pytest.approx(1)
        assert exact > 0  # the end-of-turn tokens at least pair exactly
        if mode == 'on_policy':  # the teacher's entropy at the aligned positions, at most log of its 600 entries
            assert 0 < row['gkd/teacher_entropy'] < math.log(600) and 0 < row['gkd/entropy'] < 6.2


@pytest.mark.parametrize('method', ['uld', 'hybrid'])
def test_loss_falls_on_a_fixed_batch(xtok_runs, method):
    run = xtok_runs(method, 'off_policy')
    distill = [row['gkd/distill_loss'] for row in run.logs]
    assert len(run.losses) == STEPS and run.losses[-1] < 0.9 * run.losses[0], run.losses
    assert distill[-1] < 0.9 * distill[0], distill


def test_same_tokenizer_teacher_ignores_the_flag_with_a_warning(tiny_ws, tmp_path):
    """With the student's tokenizer the flag changes nothing: the exact path runs and the losses are identical."""
    flags = dict(lmbda=0, max_steps=2, gkd_loss_impl='dense')
    with_flag = run_swift(base_args(tiny_ws, str(tmp_path / 'flag'), gkd_cross_tokenizer='hybrid', **flags))
    without = run_swift(base_args(tiny_ws, str(tmp_path / 'plain'), **flags))
    assert '--gkd_cross_tokenizer hybrid is ignored: the teacher uses the student\'s tokenizer' in with_flag.output
    assert with_flag.losses == without.losses and len(with_flag.losses) == 2
    assert not any(FRACTIONS[0] in row for row in with_flag.logs)


BAD_FLAGS = [  # (flags, words the error must contain); flag-only checks, no ms-swift needed
    (dict(gkd_cross_tokenizer='gold'), ["--gkd_cross_tokenizer must be one of ['uld', 'hybrid']", "'gold'"]),
    (dict(gkd_logits_topk=8), ['--gkd_logits_topk 8', 'full teacher row']),
    (dict(teacher_model_server='http://127.0.0.1:1'), ['--teacher_model_server', 'not supported']),
    (dict(teacher_adapters=['a']), ['--teacher_adapters']),
    (dict(padding_free=True), ['--padding_free / --packing']),
    (dict(packing=True), ['--padding_free / --packing']),
    (dict(sequence_parallel_size=2), ['--sequence_parallel_size 2', 'allowed: 1']),
]


@pytest.mark.parametrize('flags,needles', BAD_FLAGS, ids=[str(f) for f, _ in BAD_FLAGS])
def test_bad_flag_combinations_are_named(flags, needles):
    from dataclasses import fields

    from swift_gkd_plugin.options.flags import GKDPluginArgumentsMixin
    plugin_defaults = {f.name: f.default for f in fields(GKDPluginArgumentsMixin)}
    args = SimpleNamespace(**dict(plugin_defaults, beta=0.5, lmbda=0.0, temperature=0.9, sft_alpha=0.0,
                                  max_completion_length=8, seq_kd=False, gkd_logits_topk=None, top_k=-1, top_p=1.0,
                                  teacher_model_server=None, teacher_adapters=[], padding_free=False, packing=False,
                                  sequence_parallel_size=1, gkd_cross_tokenizer='uld'))
    for name, value in flags.items():
        setattr(args, name, value)
    with pytest.raises(ValueError) as info:
        check_gkd_scalars(args)
    for needle in needles:
        assert needle in str(info.value)


@pytest.mark.parametrize('flags,needles', [
    (dict(gkd_cross_tokenizer='gold'), ["--gkd_cross_tokenizer must be one of ['uld', 'hybrid']"]),
    (dict(gkd_cross_tokenizer='uld', teacher_model=None, teacher_model_type=None),
     ['--gkd_cross_tokenizer uld needs a --teacher_model']),
], ids=['bad_value', 'no_teacher'])
def test_bad_input_is_refused_before_any_model_is_loaded(tiny_ws, tmp_path, flags, needles):
    refused_before_loading(tiny_ws, tmp_path, flags, needles)


def test_response_spans_end_tokens_pair_and_byte_tokens_are_text(tiny_ws, sp_teacher):
    """End-of-turn tokens (and the template's newline after them) are zero width at the end and pair exactly; the
    teacher's ``<0xHH>`` byte-fallback tokens, registered as special tokens in its tokenizer, are still text (a
    sampled response that decodes to U+FFFD re-encodes into them)."""
    from swift_gkd_plugin.core.cross_tokenizer.alignment import align_positions
    from swift_gkd_plugin.swift.teacher.cross_tokenizer import response_spans, special_ids
    from swift_gkd_plugin.demo import tiny
    text = 'Y\ufffd 9ishor b d'
    sides = []
    for tok in (tiny.load_tokenizer(tiny_ws.student), tiny.load_tokenizer(sp_teacher)):
        ids = tok.encode(text, add_special_tokens=False) + tok.encode('<|im_end|>\n', add_special_tokens=False)
        decoded, spans = response_spans(tok, ids, special_ids(tok))
        assert decoded == text and spans[-2:] == [(len(text), len(text))] * 2
        sides.append(spans)
    alignment = align_positions(*sides)
    assert alignment.exact[-2:].all() and 0 < alignment.exact_fraction <= 1


def test_a_leading_space_dropped_by_one_decoder_still_aligns():
    """A sampled response ' p q' decodes to 'p q' through a sentencepiece decoder: both sides are compared from 'p'."""
    from swift_gkd_plugin.swift.teacher.cross_tokenizer import without_leading_space
    assert without_leading_space(' p q', [(0, 2), (2, 4)]) == ('p q', [(0, 1), (1, 3)])
    assert without_leading_space('  p', [(0, 1), (1, 3)]) == ('p', [(0, 0), (0, 1)])


def test_a_student_that_ends_at_once_pairs_with_the_teachers_end_token(tiny_ws, sp_teacher):
    """A sampled response that is only ``<|im_end|>`` (empty text): the teacher's view ends its turn too, so the
    student's end token pairs exactly with the teacher's, both predicted from the prompt (ms-swift's own templates
    and encoding; no model loaded)."""
    from swift.model import get_processor
    from swift.rl_core.data import GKDSample
    from swift.rlhf_trainers.utils import encode_sample
    from swift.template import get_template

    from swift_gkd_plugin.swift.teacher.cross_tokenizer import CrossTokenizerTeacher
    student_template = get_template(get_processor(tiny_ws.student, model_type='qwen3'),
                                    template_type='qwen3_nothinking', max_length=128)
    student_template.set_mode('train')
    xtok = CrossTokenizerTeacher('uld', sp_teacher, 'qwen3', student_template)
    end = student_template.tokenizer.convert_tokens_to_ids('<|im_end|>')
    sample = GKDSample(messages=[{'role': 'user', 'content': 'Reverse: a b'}, {'role': 'assistant', 'content': ''}],
                       response_token_ids=[end], add_eos=False)
    student = encode_sample(sample, student_template)
    _, (row, ) = xtok.encode_and_align([sample], [student])
    assert row.alignment.exact.tolist() == [True] and row.n_teacher >= 1


def _xtok_teacher(student_dir, teacher_dir, method):
    from swift.model import get_processor
    from swift.template import get_template

    from swift_gkd_plugin.swift.teacher.cross_tokenizer import CrossTokenizerTeacher
    student_template = get_template(get_processor(student_dir, model_type='qwen3'), template_type='qwen3_nothinking',
                                    max_length=128)
    student_template.set_mode('train')
    return CrossTokenizerTeacher(method, teacher_dir, 'qwen3', student_template), student_template


@pytest.mark.parametrize('student_is_sentencepiece', [False, True], ids=['sp_teacher', 'sp_student'])
def test_the_first_word_is_compared_without_a_prefix_space_of_one_side(tiny_ws, sp_teacher, student_is_sentencepiece):
    """The sentencepiece side writes the answer's first word as ``▁b`` (its own prefix space), the byte-level side as
    ``b``: at the first position the one must pull the other towards its own way of writing ``b``, not towards
    ``Ġb`` / ``▁b`` by text (`` b``, a space the other side never writes first). Before the first-word mapping the
    loss preferred the space-prefixed token (the measured cause of the cross-tokenizer benchmark's loss:
    docs_en/cross_tokenizer_results.md). Both directions: a sentencepiece teacher and a sentencepiece student. ms-swift's own
    templates and encoding; no model loaded."""
    import torch
    from swift.rl_core.data import GKDSample
    from swift.rlhf_trainers.utils import encode_sample

    from swift_gkd_plugin.core.views import response_ids
    byte_dir = tiny_ws.student
    student_dir, teacher_dir = (sp_teacher, byte_dir) if student_is_sentencepiece else (byte_dir, sp_teacher)
    xtok, student_template = _xtok_teacher(student_dir, teacher_dir, 'hybrid')
    assert xtok.first_word_side == ('student' if student_is_sentencepiece else 'teacher')
    sample = GKDSample(messages=[{'role': 'user', 'content': 'Reverse: c b'}, {'role': 'assistant', 'content': 'b c'}])
    student = encode_sample(sample, student_template)
    (teacher, ), (row, ) = xtok.encode_and_align([sample], [student])
    s_tok, t_tok = student_template.tokenizer, xtok.tokenizer
    sp_first, byte_first, byte_spaced = '\u2581b', 'b', '\u0120b'
    s_first, t_first = (sp_first, byte_first) if student_is_sentencepiece else (byte_first, sp_first)
    assert s_tok.convert_ids_to_tokens(response_ids(student)[0]) == s_first
    assert t_tok.convert_ids_to_tokens(response_ids(teacher)[0]) == t_first
    n_s, n_t = len(response_ids(student)), len(response_ids(teacher))
    aligned = xtok.teacher_rows(torch.ones(1, n_s, dtype=torch.bool), torch.ones(1, n_t, dtype=torch.bool), [row])
    assert aligned.first_word.tolist() == [True] + [False] * (n_s - 1)  # later positions keep the text mapping

    teacher_logits = torch.zeros(1, n_t, len(t_tok))
    teacher_logits[0, :, t_tok.convert_tokens_to_ids(t_first)] = 8.0  # the teacher is sure of its first word

    def first_position_loss(student_token):
        logits = torch.zeros(n_s, len(s_tok))
        logits[:, s_tok.convert_tokens_to_ids(student_token)] = 8.0
        per_token, agree = xtok.loss(logits, teacher_logits, aligned, beta=0.5, temperature=1.0)
        return float(per_token[0]), bool(agree[0])

    # the student's own first word against the one the text mapping pairs with the teacher's first word
    wrong = byte_spaced if not student_is_sentencepiece else 'b'
    (right, right_agrees), (spaced, spaced_agrees) = first_position_loss(s_first), first_position_loss(wrong)
    assert right < 0.05 < spaced and right_agrees and not spaced_agrees


# ---------------------------------------------------------------- multi-turn rows (issue 81)
TURNS = (2, 3)  # the fixed batch holds two rows of each


@pytest.fixture(scope='module')
def multi_turn_rows(tiny_ws, tmp_path_factory) -> str:
    """Four rows: two of two turns and two of three (each turn a question of the tiny task and its answer)."""
    from swift_gkd_plugin.demo import tiny
    singles = tiny.make_rows(10, seed=7, split='train')
    rows, used = [], 0
    for turns in TURNS:
        for _ in range(2):
            rows.append({'messages': [m for row in singles[used:used + turns] for m in row['messages']]})
            used += turns
    return tiny.write_dataset(str(tmp_path_factory.mktemp('multi_turn') / 'rows.jsonl'), rows)


def _one_step(tiny_ws, out, data, **flags):
    return run_swift(base_args(tiny_ws, out, dataset=data, per_device_train_batch_size=4, max_steps=1,
                               learning_rate=0, **flags))


@pytest.mark.parametrize('method,flags', [
    ('hybrid', dict(lmbda=0)),  # ms-swift's GKD default (--loss_scale last_round): the last answer
    ('uld', dict(lmbda=1, loss_scale='default')),  # every answer: the dataset's earlier ones and the sampled last
], ids=['hybrid_last_turn', 'uld_on_policy_every_turn'])
def test_multi_turn_rows_train_with_a_teacher_of_another_tokenizer(tiny_ws, sp_teacher, multi_turn_rows, tmp_path,
                                                                  method, flags):
    """Two- and three-turn rows with a teacher of another tokenizer: the teacher's view scores the turns the student
    scores (its template takes the student's --loss_scale), each turn aligned with its own. Before, the teacher's
    template scored every answer where the student scored the last: step 1 failed with a traceback blaming the
    teacher's template."""
    run = _one_step(tiny_ws, str(tmp_path / 'out'), multi_turn_rows, teacher_model=sp_teacher,
                    gkd_cross_tokenizer=method, **flags)
    (row, ) = run.logs
    assert math.isfinite(row['loss']) and row['loss'] > 0
    if flags['lmbda'] == 0:  # the dataset's answers: every student token has its exact partner, in every turn
        assert row['gkd/xtok_exact_fraction'] == 1
    else:
        assert row['gkd/xtok_exact_fraction'] > 0 and 'gkd/loss_on_policy' in row


def _uld_reference(student_dir, teacher_dir, data, temperature, loss_scale):
    """float64 ULD (sorted probabilities, L1) at every position ms-swift's template scores, the teacher at the same
    positions (its tokenizer is the student's with tokens added): the mean over the batch's scored tokens. Also the
    scored text, to say which turns the template scores."""
    import json

    import torch
    from swift.model import get_processor
    from swift.template import get_template

    from swift_gkd_plugin.demo import tiny
    template = get_template(get_processor(student_dir, model_type='qwen3'), template_type='qwen3_nothinking',
                            max_length=128, loss_scale=loss_scale)
    template.set_mode('train')
    student, teacher = (tiny.load_model(d).double().eval() for d in (student_dir, teacher_dir))
    total, count, scored = 0.0, 0, []
    for line in open(data):
        encoded = template.encode({'messages': json.loads(line)['messages']})
        ids, labels = torch.tensor([encoded['input_ids']]), torch.tensor(encoded['labels'])
        predicting = (labels[1:] != -100).nonzero().squeeze(1)  # logit row i predicts token i + 1
        scored.append(template.tokenizer.decode(ids[0, predicting + 1]))
        with torch.no_grad():
            p_s, p_t = (torch.softmax(model(ids).logits[0, predicting] / temperature, -1).sort(-1, descending=True)[0]
                        for model in (student, teacher))
        p_s = torch.nn.functional.pad(p_s, (0, p_t.shape[-1] - p_s.shape[-1]))
        total += float((p_s - p_t).abs().sum())
        count += len(predicting)
    return total / count, scored


def test_multi_turn_loss_equals_a_float64_reference(tiny_ws, multi_turn_rows, tmp_path):
    """Where the two tokenizers cut every text alike (the teacher's is the student's with 16 tokens added) each
    student token's partner is its own position in the teacher's view: the logged ULD loss of a step on two- and
    three-turn rows, every answer scored (--loss_scale default), equals the float64 reference at the scored positions,
    and not the reference on the last turns alone."""
    run = _one_step(tiny_ws, str(tmp_path / 'out'), multi_turn_rows, teacher_model=tiny_ws.other_vocab_teacher,
                    gkd_cross_tokenizer='uld', lmbda=0, loss_scale='default', temperature=0.9)
    (row, ) = run.logs
    assert row['gkd/xtok_exact_fraction'] == 1
    every, scored = _uld_reference(tiny_ws.student, tiny_ws.other_vocab_teacher, multi_turn_rows, 0.9, 'default')
    last, last_scored = _uld_reference(tiny_ws.student, tiny_ws.other_vocab_teacher, multi_turn_rows, 0.9,
                                       'last_round')
    assert [text.count('<|im_end|>') for text in scored] == [2, 2, 3, 3]  # every answer and its end of turn
    assert [text.count('<|im_end|>') for text in last_scored] == [1] * 4  # ms-swift's GKD default: the last one
    assert row['loss'] == pytest.approx(every, rel=2e-6, abs=0) and abs(every - last) > 1e-4, (row['loss'], every,
                                                                                                last)


def test_a_teacher_view_of_other_turns_stops_in_one_line(tiny_ws, sp_teacher):
    """A teacher view that scores another number of turns than the student's (here a teacher_messages with an earlier
    turn, every answer scored) stops the run in one line naming the row (:class:`RunError`), before any forward.
    ms-swift's own templates and encoding; no model loaded."""
    from swift.rl_core.data import GKDSample
    from swift.rlhf_trainers.utils import encode_sample

    from swift_gkd_plugin.swift.run.guards import RunError
    xtok, student_template = _xtok_teacher(tiny_ws.student, sp_teacher, 'hybrid')  # every answer scored
    answer = [{'role': 'user', 'content': 'Reverse: a b'}, {'role': 'assistant', 'content': 'b a'}]
    sample = GKDSample(messages=answer, teacher_messages=[{'role': 'user', 'content': 'Reverse: c d'},
                                                          {'role': 'assistant', 'content': 'd c'}] + answer)
    with pytest.raises(RunError, match=r"the dataset row whose last user message is 'Reverse: a b': the teacher's "
                                       r"view scores 2 assistant turn\(s\), the student's 1"):
        xtok.encode_and_align([sample], [encode_sample(sample, student_template)])


def test_every_scored_turn_pairs_with_the_teachers_same_turn(tiny_ws, sp_teacher):
    """Every answer scored (--loss_scale default), tokenized into other numbers of tokens by the two tokenizers
    (``ab``: one byte-level token, ``▁a b`` for the sentencepiece teacher): each student token's partner lies in the
    teacher's same turn, every end of turn pairs with the teacher's, all exactly, and the first token of each turn
    is compared through the first-word mapping. Before, the turns after the first were zero-width tokens paired in
    order across the row: the student's end token met the teacher's ``b``. ms-swift's own templates and encoding."""
    import torch
    from swift.rl_core.data import GKDSample
    from swift.rlhf_trainers.utils import encode_sample

    from swift_gkd_plugin.core.views import response_ids, scored_turns
    xtok, student_template = _xtok_teacher(tiny_ws.student, sp_teacher, 'hybrid')  # every answer scored
    answers = ['ab c', 'c ab', 'b ab a']
    sample = GKDSample(messages=[m for k, answer in enumerate(answers) for m in (
        {'role': 'user', 'content': f'Reverse: {k}'}, {'role': 'assistant', 'content': answer})])
    student = encode_sample(sample, student_template)
    (teacher, ), (row, ) = xtok.encode_and_align([sample], [student])
    s_turns, t_turns = scored_turns(student), scored_turns(teacher)
    assert len(s_turns) == len(t_turns) == 3 and [len(t) for t in s_turns] != [len(t) for t in t_turns]

    def turn_of(turns):
        return torch.tensor([k for k, turn in enumerate(turns) for _ in turn])
    assert torch.equal(turn_of(t_turns)[row.alignment.teacher], turn_of(s_turns)) and row.alignment.exact.all()
    s_ids, t_ids = torch.tensor(response_ids(student)), torch.tensor(response_ids(teacher))
    s_end, t_end = (tok.convert_tokens_to_ids('<|im_end|>') for tok in (student_template.tokenizer, xtok.tokenizer))
    assert torch.equal(s_ids == s_end, t_ids[row.alignment.teacher] == t_end) and int((s_ids == s_end).sum()) == 3
    aligned = xtok.teacher_rows(torch.ones(1, len(s_ids), dtype=torch.bool), torch.ones(1, len(t_ids),
                                                                                          dtype=torch.bool), [row])
    firsts = torch.zeros(len(s_ids), dtype=torch.bool)
    firsts[[0, len(s_turns[0]), len(s_turns[0]) + len(s_turns[1])]] = True
    assert torch.equal(aligned.first_word, firsts)
