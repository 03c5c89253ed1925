"""Local ``.json`` and ``.csv`` datasets and the teacher columns, read before any model is loaded (issue 37 item 1):
every row is either used or refused, named by file and line (a JSON array's index). The ``.jsonl`` cases are in
test_activation_and_bad_input.py."""
import csv
import io
import json

import pytest
from conftest import base_args, run_swift
from test_activation_and_bad_input import assert_refused_in_one_line

from swift_gkd_plugin.options.flags import FlagError
from swift_gkd_plugin.data.dataset_files import Where, dataset_rows
from swift_gkd_plugin.data.dataset_rows import (empty_prompt, has_prompt, has_response, privileged_problem,
                                           response_problem, row_problem)


def _row(user='Reverse: a b', answer='b a', role='user', **extra):
    return dict(messages=[{'role': role, 'content': user}, {'role': 'assistant', 'content': answer}], **extra)


GOOD = [_row(f'Reverse: {a} {b}', f'{b} {a}') for a, b in ('ab', 'cd', 'ef', 'gh')]
SYSTEM_ONLY = {'messages': [{'role': 'system', 'content': 'You are helpful.'}]}


LONG = 'Reverse: ' + ' '.join('abcdefgh'[i % 8] for i in range(150))  # 160 tokens with the template


def _jsonl(rows) -> bytes:
    return b''.join(json.dumps(row).encode() + b'\n' for row in rows)


def _csv(header, rows) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(header)
    writer.writerows(rows)
    return out.getvalue().encode()


def _messages_csv(rows) -> bytes:
    """A ``messages`` column of JSON strings, as a spreadsheet exports it (ms-swift parses the strings)."""
    return _csv(['messages'], [[json.dumps(row['messages'])] for row in rows])


def _table(rows, kind='parquet', empty=False) -> bytes:
    """A ``.parquet`` or ``.arrow`` (stream) file of ``rows`` (``empty``: their columns, no row)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    table = pa.Table.from_pylist(rows)
    table = table.slice(0, 0) if empty else table
    out = io.BytesIO()
    if kind == 'parquet':
        pq.write_table(table, out)
    else:
        with pa.ipc.new_stream(out, table.schema) as writer:
            writer.write_table(table)
    return out.getvalue()


# name: (file content, flags, needles); a name ending in _val is given to --val_dataset, '#N' samples the file
BAD_FILES = {
    # ms-swift: a raw DatasetGenerationError once both models are loaded
    'broken.json': (f'[\n{json.dumps(GOOD[0])},\n{json.dumps(GOOD[1])}\n {json.dumps(GOOD[2])}\n]'.encode(), {},
                    ["not valid JSON at line 4, column 2 (Expecting ',' delimiter)", 'an array of row objects']),
    'one_object.json': (json.dumps(GOOD[0], indent=1).encode(), {}, ['one JSON object over several lines']),
    # ms-swift: trained on the other rows with exit 0
    'roles.json': (json.dumps(GOOD + [_row(role='usr')], indent=1).encode(), {},
                   ["1 row(s) that ms-swift would drop without a word: index 4: message 0 has the role 'usr'",
                    '--gkd_drop_bad_rows true']),
    'roles.json#8': (json.dumps(GOOD + [_row(role='usr')]).encode(), {}, ["index 4: message 0 has the role 'usr'"]),
    'content_val.json': (json.dumps(GOOD[:1] + [_row(answer=None)]).encode(), {},
                         ['--val_dataset', 'index 1: message 1 (assistant): its content is null, not text']),
    # ms-swift: loaded both models, then "resample: only collected 0/2"
    'system_only.json': (json.dumps([SYSTEM_ONLY] * 4).encode(), {'lmbda': 1},
                         ['no row can be trained on', 'all 4 row(s) have neither a user message nor an assistant',
                          'system_only.json index 0, ']),
    # a column of numbers only is read as numbers, which do not encode: every dataset step failed late to resample
    'numbers.csv': (_csv(['query', 'response'], [['2 + 2', 4], ['3 + 4', 7]]), {'lmbda': 0},
                    ['2 row(s) that ms-swift would drop without a word', 'line 2: "response" is int 4, not text',
                     'line 3: "response" is int 7']),
    'roles.csv': (_messages_csv(GOOD[:2] + [_row(role='usr')]), {}, ["line 4: message 0 has the role 'usr'"]),
    'ragged.csv': (b'query,response\na,b\nc,d,e\n', {}, ['not a valid csv file', 'Expected 2 fields in line 3, saw 3']),
    # issue 45: ms-swift dropped such .parquet rows without a word (all of them: ZeroDivisionError), and read an empty
    # file only after loading both models; an empty assistant content trained with no word under --lmbda 0
    'roles.parquet': (_table(GOOD + [_row(role='usr')]), {},
                      ["1 row(s) that ms-swift would drop without a word: row 5: message 0 has the role 'usr'"]),
    'roles.arrow': (_table(GOOD + [_row(role='usr')], 'arrow'), {}, ["row 5: message 0 has the role 'usr'"]),
    'empty.parquet': (_table(GOOD, empty=True), {}, ['the file has no rows']),
    'zero_bytes.parquet': (b'', {}, ['not a readable parquet file']),
    'empty_answer.parquet': (_table(GOOD + [_row(answer='')]), {'lmbda': 0},
                             ['1 row(s) have no assistant response (rows 5)', 'an empty response counts as none']),
    'typo.csv': (_csv(['query', 'respones'], [['Reverse: a b', 'b a']] * 3), {'lmbda': 0},
                 ['3 row(s) have no assistant response (lines 2, 3, 4) (column \'respones\' is not one ms-swift reads: '
                  "did you mean 'response'?)"]),
    'empty_answer.jsonl': (_jsonl(GOOD[:2] + [_row(answer='')]), {'lmbda': 0},
                           ['1 row(s) have no assistant response (lines 3)', 'an empty response counts as none']),
    # the trainer refused these columns only once both models were loaded, with a traceback
    'teacher_prompt.jsonl': (_jsonl(GOOD + [_row(teacher_prompt=5)]), {},
                             ['1 row(s) have a teacher column that the trainer cannot use: line 5: teacher_prompt is '
                              'int 5; allowed: text']),
    'teacher_messages.json': (json.dumps(GOOD + [_row(teacher_messages='Reverse: a b')]).encode(), {},
                              ['index 4: teacher_messages is str "Reverse: a b"; allowed: a non-empty list of']),
    'numbers_half.csv': (_csv(['query', 'response'], [['2 + 2', 4], ['3 + 4', 7]]), {'lmbda': 0.5, 'max_steps': 6},
                         ['every row (2) is dropped on dataset (off-policy) steps', '--lmbda 0.5 without --seq_kd']),
    # --truncation_strategy delete (the default): ms-swift replaced such rows by others (an INFO line)
    'long_prompt.jsonl': (_jsonl(GOOD + [_row(LONG)]), {'lmbda': 1},
                          ['line 5: its prompt is 160 tokens with the template, over --max_length 128',
                           '--truncation_strategy left']),
    'long_answer.json': (json.dumps(GOOD + [_row(answer=LONG)]).encode(), {'lmbda': 0},
                         ['index 4: it is 166 tokens with the template, over --max_length 128']),
    # every row too long: ms-swift loaded both models, then "resample: only collected 0/2"
    'all_long.jsonl': (_jsonl([_row(LONG)] * 4), {'lmbda': 1, 'gkd_drop_bad_rows': 'true'},
                       ['no row can be trained on: all 4 row(s) would be dropped (4 left out by --gkd_drop_bad_rows '
                        'true']),
}


@pytest.mark.parametrize('name', list(BAD_FILES))
def test_bad_json_and_csv_datasets_are_refused_before_loading(tiny_ws, tmp_path, name):
    content, flags, needles = BAD_FILES[name]
    file_name, _, sample = name.partition('#')
    path = tmp_path / file_name.replace('_val.', '.')
    path.write_bytes(content)
    entry = f'{path}#{sample}' if sample else str(path)
    which = 'val_dataset' if '_val.' in file_name else 'dataset'
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'out'), **{which: entry}, **flags), check=False, timeout=120)
    assert_refused_in_one_line(run, needles + [f'--{which} {path}'])


@pytest.mark.parametrize('suffix', ['.json', '.csv'])
def test_bad_rows_of_json_and_csv_files_are_dropped_and_counted_only_when_asked(tiny_ws, tmp_path, suffix):
    """--gkd_drop_bad_rows true: the run trains on the other rows and a warning names the dropped ones, counted."""
    rows = GOOD + [_row(role='usr')]
    path = tmp_path / f'some_bad{suffix}'
    path.write_bytes(json.dumps(rows, indent=1).encode() if suffix == '.json' else _messages_csv(rows))
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'out'), dataset=str(path), lmbda=0, max_steps=1,
                              gkd_drop_bad_rows='true'), timeout=300)
    where = 'index 4' if suffix == '.json' else 'line 6'
    assert (f'--dataset {path}: 1 row(s) that ms-swift would drop without a word: {where}: message 0 has the role '
            "'usr'") in run.output and '--gkd_drop_bad_rows true: training without them' in run.output
    assert len(run.losses) == 1 and run.losses[0] > 0


def test_rows_are_read_as_the_datasets_loaders_read_them(tmp_path):
    """Both JSON layouts under either ending, csv rows by the line they start on (a quoted field may span lines),
    csv columns of numbers as numbers."""
    lines = tmp_path / 'lines.json'
    lines.write_text(''.join(json.dumps(row) + '\n\n' for row in GOOD[:2]))
    array = tmp_path / 'array.jsonl'
    array.write_text('\ufeff ' + json.dumps(GOOD[:2]))
    assert list(dataset_rows('--dataset', str(lines))) == [(Where('line', 1), GOOD[0]), (Where('line', 3), GOOD[1])]
    assert list(dataset_rows('--dataset', str(array))) == [(Where('index', 0), GOOD[0]), (Where('index', 1), GOOD[1])]
    table = tmp_path / 't.csv'
    table.write_bytes(_csv(['query', 'response'], [['two\nlines', 'x'], ['q', '4']]))
    assert list(dataset_rows('--dataset', str(table))) == [(Where('line', 2), {'query': 'two\nlines', 'response': 'x'}),
                                                           (Where('line', 4), {'query': 'q', 'response': '4'})]
    numbers = tmp_path / 'n.csv'
    numbers.write_bytes(_csv(['query', 'response'], [['q', '4']]))
    assert list(dataset_rows('--dataset', str(numbers))) == [(Where('line', 2), {'query': 'q', 'response': 4})]
    for content, message in [('[]', 'the file has no rows'), ('["a"]', 'index 0 is a JSON str, not an object'),
                             ('[{"a": 1},\n {"a": 2]', 'not valid JSON at line 2, column 9'), ('', 'has no rows')]:
        bad = tmp_path / 'bad.json'
        bad.write_text(content)
        with pytest.raises(FlagError, match=message):
            list(dataset_rows('--dataset', str(bad)))


@pytest.mark.parametrize('row,problem,response', [
    ({'messages': json.dumps(GOOD[0]['messages'])}, None, None),  # a string that parses: ms-swift's repair_messages
    ({'messages': 'Reverse: a b'}, '"messages" is str "Reverse: a b", not a non-empty list of messages', None),
    # a response that is not text only fails the steps that encode it
    ({'query': 'q', 'response': 4}, None, '"response" is int 4, not text'),
    (_row(answer=7), None, 'message 1 (assistant): its content is int 7, not text'),
    (_row(answer=None), 'message 1 (assistant): its content is null, not text', None),  # ms-swift's preprocessor
    ({'messages': [{'role': 'user', 'content': 1}]}, 'message 0 (user): its content is int 1, not text', None),
    ({'Prompt': 7, 'answer': 'a'}, '"Prompt" is int 7, not text', None),  # ms-swift maps columns case-insensitively
    ({'query': 'q', 'response': ['a', 'b']}, None, None),  # the first of a list of responses
    ({'query': 'q', 'response': [4]}, None, '"response" is int 4, not text'),
    ({'query': 'q', 'response': 'a', 'answer': 3}, None, None),  # two response columns: ms-swift keeps `response`
    ({'system': 1, 'query': 'q', 'response': 'a'}, '"system" is int 1, not text', None),
])
def test_row_and_response_problems(row, problem, response):
    assert (row_problem(row, {}), response_problem(row, {})) == (problem, response)


SHAREGPT_PAIRS = [{'conversations': [{'human': f'Reverse: {a} {b}', 'assistant': f'{b} {a}'}]} for a, b in ('ab', 'cd')]


@pytest.mark.parametrize('row,prompt,response', [
    (SHAREGPT_PAIRS[0], True, True),  # ShareGPT's key form: ms-swift's sharegpt_to_messages reads a user and a response
    ({'conversations': [{'user': 'q', 'gpt': 'a'}, {'human': 'q2', 'bot': 'a2'}]}, True, True),
    ({'conversations': [{'human': 'q', 'assistant': ''}]}, True, False),  # an empty response is none
    ({'conversations': [{'from': 'human', 'value': 'q'}, {'from': 'gpt', 'value': 'a'}]}, True, True),
    ({'messages': [{'role': 'user', 'content': 'q'}]}, True, False),
])
def test_sharegpt_key_form_has_a_prompt_and_a_response(row, prompt, response):
    assert (row_problem(row, {}), has_prompt(row, {}), has_response(row, {})) == (None, prompt, response)


def test_sharegpt_key_form_trains_off_policy_and_a_prompt_only_file_on_policy_without_a_false_warning(tiny_ws,
                                                                                                      tmp_path):
    """Issue 66: ``{"conversations": [{"human": q, "assistant": a}]}`` was refused at ``--lmbda 0`` (and as
    ``--val_dataset``) as having no assistant response; a prompt-only file at ``--lmbda 1`` warned about responses
    that no step reads."""
    pairs = tmp_path / 'sharegpt_pairs.jsonl'
    pairs.write_bytes(_jsonl(SHAREGPT_PAIRS * 2))
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'pairs'), dataset=str(pairs), val_dataset=str(pairs), lmbda=0,
                              max_steps=1, per_device_eval_batch_size=2), timeout=300)
    assert len(run.losses) == 1 and run.logs[0]['gkd/mode_off_policy'] == 1.0, run.output[-3000:]
    assert 'no assistant response' not in run.output
    prompts = tmp_path / 'prompts.jsonl'
    prompts.write_bytes(_jsonl([{'messages': row['messages'][:1]} for row in GOOD]))
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'prompts'), dataset=str(prompts), lmbda=1, max_steps=1),
                    timeout=300)
    assert len(run.losses) == 1 and 'no assistant response' not in run.output, run.output[-3000:]


@pytest.mark.parametrize('row,empty', [
    ({'instruction': '', 'input': '', 'output': 'a'}, True),
    ({'instruction': ' ', 'input': '\n', 'output': 'a'}, True),
    ({'instruction': 'Reverse', 'input': '', 'output': 'a'}, False),
    ({'query': '', 'response': 'a'}, True),
    ({'query': '', 'system': 'Write a poem.', 'response': 'a'}, False),  # the system prompt asks
    (_row(user=''), True),
    (_row(user='', images=['cat.png']), False),  # the image is the prompt
    ({'conversations': [{'human': '', 'assistant': 'a'}]}, True),
    (GOOD[0], False),
])
def test_empty_prompt(row, empty):
    assert empty_prompt(row, {}) is empty


def test_empty_prompts_are_counted_and_refused_when_every_row_has_one_and_every_step_samples(tiny_ws, tmp_path):
    """Issue 66 item 6: Alpaca rows with an empty instruction and input, or ``query: ""``, trained silently at
    ``--lmbda 1``: the student sampled unconditioned text."""
    empty = [{'instruction': '', 'input': '', 'output': 'b a'}, {'query': '', 'response': 'd c'}]
    path = tmp_path / 'empty.jsonl'
    path.write_bytes(_jsonl(empty))
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'out'), dataset=str(path), lmbda=1), check=False, timeout=120)
    assert_refused_in_one_line(run, [f'--dataset {path}: 2 of 2 row(s) have an empty prompt (lines 1, 2): every step '
                                     'samples (--lmbda 1.0, --seq_kd false)'])
    mixed = tmp_path / 'mixed.jsonl'
    mixed.write_bytes(_jsonl(GOOD + empty))
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'mixed_out'), dataset=str(mixed), lmbda=1, max_steps=1),
                    timeout=300)
    assert f'--dataset {mixed}: 2 of 6 row(s) have an empty prompt (lines 5, 6): on-policy and seq_kd' in run.output
    assert len(run.losses) == 1


@pytest.mark.parametrize('row,problem', [
    ({'teacher_prompt': 'Reverse (the answer is b a): a b'}, None),
    ({'teacher_prompt': None}, None),
    ({'teacher_prompt': ['a']}, 'teacher_prompt is list ["a"]; allowed: text'),
    ({'teacher_messages': [{'role': 'user', 'content': 'x'}]}, None),
    ({'teacher_messages': []}, 'teacher_messages is list []; allowed: a non-empty list'),
    ({'teacher_messages': [{'role': 'human', 'content': 'x'}]}, 'teacher_messages message 0 is dict {"role": "human"'),
    ({'tp': 3}, 'teacher_prompt is int 3'),  # after --columns
    # a teacher_messages that ends with an answer: the row's own only (messages, a response column, --columns)
    ({'messages': [{'role': 'user', 'content': 'q'}, {'role': 'assistant', 'content': 'b a'}],
      'teacher_messages': [{'role': 'user', 'content': 'Q'}, {'role': 'assistant', 'content': 'b a'}]}, None),
    ({'messages': [{'role': 'user', 'content': 'q'}, {'role': 'assistant', 'content': 'b a'}],
      'teacher_messages': [{'role': 'user', 'content': 'Q'}, {'role': 'assistant', 'content': 'a b'}]},
     'teacher_messages ends with the assistant answer "a b" where the row\'s answer (the response the student scores) '
     'is "b a"; allowed: the teacher\'s prompt alone'),
    ({'query': 'q', 'answer': 'b a', 'teacher_messages': [{'role': 'assistant', 'content': 'a b'}]},
     'teacher_messages ends with the assistant answer "a b" where the row\'s answer'),
    ({'conv': [{'from': 'human', 'value': 'q'}, {'from': 'gpt', 'value': 'b a'}],
      'teacher_messages': [{'role': 'user', 'content': 'Q'}, {'role': 'assistant', 'content': 'b a'}]}, None),
    ({'messages': [{'role': 'user', 'content': 'q'}], 'teacher_messages': [{'role': 'assistant', 'content': 'x'}]},
     None),  # no answer of the row's own: on-policy steps replace it by the sample
])
def test_privileged_problem(row, problem):
    found = privileged_problem(row, {'tp': 'teacher_prompt', 'conv': 'conversation'})
    assert found == problem if problem is None else found.startswith(problem), found


def test_rows_dropped_on_dataset_steps_only_are_named_and_the_run_trains(tiny_ws, tmp_path):
    """With --lmbda 0.5 a row whose prompt fits and whose response does not (too long, or a number) is sampled for
    on on-policy steps and dropped on dataset steps: a warning names it, and training goes on."""
    path = tmp_path / 'long_answer.jsonl'
    path.write_bytes(_jsonl(GOOD + [_row(answer=LONG), _row(answer=7)]))
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'out'), dataset=str(path), lmbda=0.5, max_steps=1), timeout=300)
    assert (f'--dataset {path}: 2 row(s) are dropped on dataset (off-policy) steps, used on the others: line 5: it '
            'is 166 tokens with the template, over --max_length 128') in run.output
    assert 'line 6: message 1 (assistant): its content is int 7, not text' in run.output
    assert len(run.losses) == 1


@pytest.mark.parametrize('tokenizer', ['student', 'sentencepiece'])
def test_row_lengths_are_the_trainers(tiny_ws, sp_teacher, tmp_path, tokenizer):
    """The lengths measured before loading are those of the rows ms-swift loads and its template encodes: prompt only
    (as for sampling) and whole, for a messages row, a query/response csv row and an alpaca row; the bound that lets
    short rows skip encoding is never below the length, with a byte-level BPE and a SentencePiece tokenizer."""
    from types import SimpleNamespace

    from swift.dataset import load_dataset
    from swift.model import get_processor
    from swift.template import get_template
    from swift.utils import remove_response

    from swift_gkd_plugin.swift.setup.row_lengths import RowLengths, standard_row
    processor = get_processor(tiny_ws.student if tokenizer == 'student' else sp_teacher, model_type='qwen3')
    template = get_template(processor, template_type='qwen3_nothinking', max_length=None)
    template.set_mode('train')
    lengths = RowLengths(SimpleNamespace(max_length=128, get_template=lambda _: template))
    odd = 'Ünïcödé  spaces\n\nand 数字 123 ' * 3
    files = {'m.jsonl': _jsonl([_row(system='Be brief.'), _row(LONG, 'x y'), _row(odd, odd, system=odd)]),
             'q.csv': _csv(['Question', 'answer'], [['Reverse: a b c', 'c b a']]),
             'a.json': json.dumps([{'instruction': 'Reverse:', 'input': 'a b', 'output': 'b a'}]).encode()}
    for name, content in files.items():
        path = tmp_path / name
        path.write_bytes(content)
        loaded, _ = load_dataset([str(path)], num_proc=1)
        for (_, row), standard in zip(dataset_rows('--dataset', str(path)), loaded):
            whole = template.encode(dict(standard), return_length=True)['length']
            remove_response(standard['messages'])
            prompt = template.encode(dict(standard), return_length=True)['length']
            assert (lengths.tokens(row, {}, prompt_only=True), lengths.tokens(row, {}, prompt_only=False)) == (
                prompt, whole), (name, row)
            assert prompt < whole <= lengths.bound(standard_row(row, {})), (name, row)
            assert lengths.tokens(row, {}, prompt_only=False, exact=False) == (whole if whole > 128 else None)


def test_rows_are_not_measured_when_the_template_cannot_be_built():
    """The tokenizer read once, and a failure leaves the lengths to ms-swift (no refusal), not one try per row."""
    from types import SimpleNamespace

    from swift_gkd_plugin.swift.setup.row_lengths import RowLengths
    calls = []

    def get_template(_):
        calls.append(1)
        raise OSError('no tokenizer files')

    lengths = RowLengths(SimpleNamespace(max_length=4, get_template=get_template))
    assert [lengths.problem(_row(LONG), {}, prompt_only=True) for _ in range(3)] == [None] * 3 and calls == [1]
