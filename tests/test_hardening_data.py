"""Issue 58 items 1, 3 and 6: data and teacher-server flags that failed after both models were loaded (or did nothing)
are refused before loading, in one line naming the flag, the value and the allowed form.

1. ``--dataset`` rows without a prompt (a ``text`` column alone, assistant messages only) where steps sample.
3. ``--teacher_tag_key dataset`` tags that no teacher has; teacher URLs that can never parse.
6. ``--gkd_sampled_kl_baseline batch`` with one row per micro-batch."""
import json
import os
import subprocess
import sys

import pytest
from conftest import OFFLINE_ENV, base_args, run_swift
from test_activation_and_bad_input import assert_refused_in_one_line
from test_dataset_files import _table

TEXT_ROWS = [{'text': f'Reverse: a b {c}'} for c in 'cdefgh']
ASSISTANT_ROWS = [{'messages': [{'role': 'assistant', 'content': f'{c} b a'}]} for c in 'cdefgh']
SERVED = dict(teacher_model=None, teacher_model_type=None, gkd_logits_topk=8, teacher_server_wait=2)


def _write(path, rows):
    if str(path).endswith('.parquet'):
        path.write_bytes(_table(rows))
    else:
        path.write_text(''.join(json.dumps(row) + '\n' for row in rows))
    return str(path)


@pytest.mark.parametrize('name,rows,flags,needles', [
    ('text.jsonl', TEXT_ROWS, {'lmbda': 0.5}, ["(lines 1, 2, 3", "['text']", '--lmbda 0.5 makes on-policy steps']),
    ('text.parquet', TEXT_ROWS, {'lmbda': 0.5}, ["(rows 1, 2, 3", "['text']", '--lmbda 0.5 makes on-policy steps']),
    ('assistant.jsonl', ASSISTANT_ROWS, {'lmbda': 1}, ['roles assistant (no "user" message)',
                                                       '--lmbda 1 makes on-policy steps']),
    ('text_seq_kd.jsonl', TEXT_ROWS, {'lmbda': 0, 'seq_kd': 'true'}, ['--seq_kd true makes seq_kd steps']),
], ids=['text_jsonl', 'text_parquet', 'assistant_only', 'seq_kd'])
def test_rows_without_a_prompt_are_refused_where_steps_sample(tiny_ws, tmp_path, name, rows, flags, needles):
    """ms-swift loaded both models, then failed the first sampling step ("resample: only collected 0/2 valid
    samples", a traceback): the student or the teacher samples a response to the row's user message."""
    data = _write(tmp_path / name, rows)
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'out'), dataset=data, **flags), check=False, timeout=120)
    assert_refused_in_one_line(run, [f'--dataset {data}: no row has a prompt', *needles, '--lmbda 0 --seq_kd false'])


def test_rows_without_a_prompt_are_warned_about_or_trained_off_policy(tiny_ws, tmp_path):
    """Some rows without a prompt: warned about (on-policy steps draw other rows in their place), the run trains; all
    of them at ``--lmbda 0`` (dataset steps only): trained on their responses, without a word."""
    good = [json.loads(line) for line in open(tiny_ws.fixed)]
    mixed = _write(tmp_path / 'mixed.jsonl', good + ASSISTANT_ROWS[:2])
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'mixed'), dataset=mixed, lmbda=0.5), timeout=300)
    assert (f'--dataset {mixed}: 2 row(s) have no user message (lines 5, 6; e.g. messages of the roles assistant'
            in run.output and 'on-policy steps draw other rows in their place' in run.output), run.output[-3000:]
    assert len(run.logs) == 3
    text = _write(tmp_path / 'text.jsonl', TEXT_ROWS)
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'text'), dataset=text, lmbda=0), timeout=300)
    assert len(run.logs) == 3 and 'no user message' not in run.output and 'no row has a prompt' not in run.output


def _two_parts(tiny_ws, tmp_path):
    rows = [json.loads(line) for line in open(tiny_ws.fixed)]
    return [_write(tmp_path / f'part{i}.jsonl', rows[2 * i:2 * i + 2]) for i in range(2)]


def test_default_tags_are_the_dataset_entries_as_given(tiny_ws, tmp_path):
    """``--teacher_tag_key dataset`` (the default): ms-swift tags each row with its ``--dataset`` entry, the path as
    given; teachers tagged with the files' base names matched no row, and step 1 raised after loading. Tagged with
    the paths, the tag check lets the run through (here to the unreachable servers' wait)."""
    parts = _two_parts(tiny_ws, tmp_path)
    by_name = json.dumps([{'url': f'http://127.0.0.1:{9 + i}', 'tags': [os.path.basename(p)]}
                          for i, p in enumerate(parts)])
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'names'), dataset=parts, teacher_model_server=by_name, lmbda=0,
                              **SERVED), check=False, timeout=120)
    assert_refused_in_one_line(run, [f'--dataset {parts[0]}: ms-swift tags its rows {parts[0]!r}',
                                     "the teachers' tags are ['part0.jsonl', 'part1.jsonl']",
                                     f'tag a teacher "{parts[0]}"', '--teacher_tag_key COLUMN'])
    by_path = json.dumps([{'url': f'http://127.0.0.1:{9 + i}', 'tags': [p]} for i, p in enumerate(parts)])
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'paths'), dataset=parts, teacher_model_server=by_path, lmbda=0,
                              **SERVED), check=False, timeout=120)
    assert run.returncode == 2 and 'http://127.0.0.1:9/health failed after' in run.output, run.output[-3000:]
    assert 'ms-swift tags its rows' not in run.output


BAD_URLS = [
    ('http://127.0.0.1:70000', '--teacher_model_server http://127.0.0.1:70000: its port 70000 is not a number from 1 '
     'to 65535; allowed: http://HOST:PORT or https://HOST:PORT (a port of 1 to 65535)'),
    ('[{"url": "http://127.0.0.1:9", "tags": ["a"]}, {"url": 8000, "tags": ["b"]}]',
     '--teacher_model_server entry 1 ("url": 8000): it is int 8000, not a URL string; allowed: http://HOST:PORT or '
     'https://HOST:PORT (a port of 1 to 65535), or "local"'),
    ('ftp://127.0.0.1:9', "its scheme 'ftp' is not http or https"),
    # issue 65 item 4: urllib's 'Invalid IPv6 URL' without the flag; a host named 'http' with a path
    ('http://[::1', '--teacher_model_server http://[::1: it does not parse as a URL (Invalid IPv6 URL)'),
    ('http//127.0.0.1:8000', '(did you mean http://127.0.0.1:8000?)'),
]


@pytest.mark.parametrize('server,message', BAD_URLS, ids=['port', 'int_url', 'scheme', 'ipv6', 'no_scheme'])
def test_teacher_urls_that_never_parse_are_refused_before_the_wait(tiny_ws, tmp_path, server, message):
    """The health poll used to retry such a URL for the whole --teacher_server_wait (600 s by default), or the
    client failed with a TypeError traceback."""
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'out'), teacher_model_server=server, **SERVED),
                    check=False, timeout=120)
    assert_refused_in_one_line(run, [message])
    assert 'attempt' not in run.output


def test_teacher_urls_that_never_parse_are_refused_by_the_megatron_launcher():
    """The same check in ``megatron rlhf``'s launcher (shared: :func:`check_teacher_server_flags`), before any
    rank starts (the ranks of a command line that passes are stopped at once: ``stop_site``)."""
    here = os.path.dirname(__file__)
    site = os.pathsep.join(filter(None, [os.path.join(here, 'megatron', 'stop_site'), os.environ.get('PYTHONPATH')]))
    env = dict(os.environ, **OFFLINE_ENV, PYTHONPATH=site)
    env.pop('SWIFT_GKD_PLUGIN', None)
    argv = [os.path.join(os.path.dirname(sys.executable), 'megatron'), 'rlhf', '--rlhf_type', 'gkd', '--model',
            'Qwen/Qwen3-0.6B', '--dataset', 'AI-ModelScope/alpaca-gpt4-data-en', '--gkd_logits_topk', '8',
            '--use_vllm', 'false', '--teacher_model_server', BAD_URLS[0][0]]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    errors = [line for line in output.splitlines() if line.startswith('megatron rlhf: error: ')]
    assert proc.returncode == 2 and len(errors) == 1 and BAD_URLS[0][1] in errors[0], output[-3000:]


def test_batch_baseline_needs_two_rows_in_a_micro_batch(tiny_ws, tmp_path):
    """``--gkd_sampled_kl_baseline batch`` subtracts the other rows' mean: with one row per micro-batch it was 0 on
    every step, silently (core/sampled_kl.py: ``other_rows_baseline``)."""
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'out'), lmbda=1, gkd_sampled_kl_coef=1,
                              gkd_sampled_kl_baseline='batch', per_device_train_batch_size=1), check=False, timeout=120)
    assert_refused_in_one_line(run, [
        '--gkd_sampled_kl_baseline batch subtracts the mean of the micro-batch\'s other rows, and '
        '--per_device_train_batch_size 1 puts one row in each micro-batch', 'Pass --per_device_train_batch_size 2 '
        'or more, or --gkd_sampled_kl_baseline none'])


def test_a_command_line_without_a_training_set_is_refused_before_loading(tiny_ws, tmp_path):
    """Issue 58 item 10 (swift rlhf's side): ms-swift raised "Please input the training dataset" in a traceback."""
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'out'), dataset=None), check=False, timeout=120)
    assert_refused_in_one_line(run, ['no training set: pass --dataset', '--cached_dataset'])
