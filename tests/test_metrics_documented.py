"""Every ``gkd/`` metric is in the guide's table, and the sampled completions' length and truncation are logged right
(issue 57, item 4).

* statically: every ``gkd/`` key literal and f-string of the plugin's code is named in docs_en's and docs_zh's table;
* through the real ``swift rlhf``: every ``gkd/`` key of a mixed run's ``logging.jsonl`` is named there; where the
  limit cuts (``--gkd_rollout_max_tokens`` on on-policy steps, ``--max_completion_length`` on seq_kd ones) the clipped
  ratio is 1 and min = mean = max = the limit; the curves are where the guide says (``runs/``, ``images/``);
* on two ranks with a trained teacher whose answers are cut at the limit for some rows and ended before it for others:
  mean, min, max and clipped ratio are those of every rank's completions (as the completions log has them);
* through the real ``megatron rlhf`` on two data-parallel ranks: the same keys and values where the limit cuts.
"""
from __future__ import annotations

import glob
import json
import os
import re
import sys

import pytest
import torch
from conftest import Workspace, base_args, run_swift

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = {'en': os.path.join(ROOT, 'docs_en', 'README.md'), 'zh': os.path.join(ROOT, 'docs_zh', 'README.md')}
SECTION = {'en': '## Logged metrics', 'zh': '## 日志指标'}
LENGTH_KEYS = ('gkd/completion_length', 'gkd/completion_length_min', 'gkd/completion_length_max')
SOURCE_KEY = re.compile(r"""(?<!\w)(f?)['"](gkd/[\w/{}.\[\]]+)['"]""")  # a key literal or f-string of the code
MODES = ('on_policy', 'seq_kd', 'off_policy')


def documented(lang: str):
    """The metric names of the guide's table, as regular expressions (``<name>`` stands for any path part)."""
    with open(DOCS[lang], encoding='utf-8') as f:
        text = f.read()
    start = text.index(SECTION[lang])
    end = text.index('\n## ', start + 1)
    names = []
    for line in text[start:end].splitlines():
        if line.startswith('| `'):
            names += re.findall(r'`([^`]+)`', line.split(' | ')[0])
    return [re.compile(re.sub(r'<[^>]+>', '[^/]+', re.escape(n).replace(r'\<', '<').replace(r'\>', '>')))
            for n in names]


def undocumented(keys, lang: str):
    patterns = documented(lang)
    return sorted(k for k in keys if not any(p.fullmatch(k) for p in patterns))


def logged_gkd_keys(rows):
    """The ``gkd/`` (and ``gkd_``-prefixed) keys of logged rows, evaluation rows' ``eval_`` prefix removed."""
    keys = {k[len('eval_'):] if k.startswith('eval_') else k for row in rows for k in row}
    return {k for k in keys if k.startswith(('gkd/', 'gkd_'))}


def source_keys():
    """Every ``gkd/`` key the plugin's code names, f-strings' fields replaced by each mode's name and by ``x``."""
    keys = set()
    for path in glob.glob(os.path.join(ROOT, 'swift_gkd_plugin', '**', '*.py'), recursive=True):
        with open(path, encoding='utf-8') as f:
            for is_f, key in SOURCE_KEY.findall(f.read()):
                if not is_f or '{' not in key:
                    keys.add((key, (key, )))
                else:
                    keys.add((key, tuple(re.sub(r'\{[^}]*\}', v, key) for v in MODES + ('x', ))))
    return keys


@pytest.mark.parametrize('lang', ['en', 'zh'])
def test_every_gkd_key_of_the_code_is_in_the_table(lang):
    keys = source_keys()
    assert len(keys) > 30, sorted(keys)  # the scan found the code's keys
    patterns = documented(lang)
    missing = sorted(key for key, forms in keys if not any(p.fullmatch(v) for v in forms for p in patterns))
    assert not missing, f'docs_{lang}/README.md\'s metrics table does not name {missing}'


def _rows(run, mode):
    return [r for r in run.logs if r.get(f'gkd/mode_{mode}') == 1.0]


def _check_cut_at(row, limit):
    assert row['gkd/clipped_ratio'] == 1.0, row
    assert [row[k] for k in LENGTH_KEYS] == [limit] * 3, row


@pytest.fixture
def mixed_run(tiny_ws, shared_runs):
    """On-policy and seq_kd steps where the limits cut (the tiny random models never end a turn in 6 tokens),
    TensorBoard on; started once per test session."""
    def start(out):
        return run_swift(base_args(tiny_ws, out, lmbda=0.5, seq_kd='true', seed=41, max_steps=4,
                                   max_completion_length=6, gkd_rollout_max_tokens=3, report_to='tensorboard'))
    return shared_runs('metrics_documented', {'mixed': start})['mixed']


def test_every_gkd_key_a_run_logs_is_documented(mixed_run):
    keys = logged_gkd_keys(mixed_run.logs)
    assert set(LENGTH_KEYS) | {'gkd/clipped_ratio', 'gkd/distill_loss'} <= keys, sorted(keys)
    for lang in DOCS:
        assert not undocumented(keys, lang), (lang, undocumented(keys, lang))


def test_truncation_where_the_limit_cuts(mixed_run):
    on_policy, seq_kd = _rows(mixed_run, 'on_policy'), _rows(mixed_run, 'seq_kd')
    assert on_policy and seq_kd, mixed_run.logs
    for row in on_policy:  # the on-policy limit: --gkd_rollout_max_tokens
        _check_cut_at(row, 3)
    for row in seq_kd:  # the teacher's: --max_completion_length
        _check_cut_at(row, 6)


def test_curves_are_where_the_guide_says(mixed_run):
    assert glob.glob(os.path.join(mixed_run.output_dir, '**', 'runs', '*', 'events.out.tfevents.*'), recursive=True) \
        or glob.glob(os.path.join(mixed_run.output_dir, '**', 'runs', 'events.out.tfevents.*'), recursive=True)
    images = glob.glob(os.path.join(mixed_run.output_dir, '**', 'images', '*.png'), recursive=True)
    assert any(p.endswith('train_gkd_clipped_ratio.png') for p in images), images


def test_lengths_over_two_ranks(trained_ws, tmp_path):
    """seq_kd with the trained teacher on two ranks: its answer to four letters (5 tokens with the end of turn) is cut
    at the limit, 4; to eight (a prompt it never saw) it writes a shorter one and ends it. Each logged value is that
    of the step's completions of both ranks, as the completions log has them."""
    limit, rows = 4, []
    with open(trained_ws['train']) as f:
        for i, line in enumerate(f):
            row = json.loads(line)
            if i % 2:
                letters = row['messages'][0]['content'].split(': ')[1].split() * 2
                row['messages'][0]['content'] = 'Reverse: ' + ' '.join(letters)
                row['messages'][1]['content'] = ' '.join(reversed(letters))
            rows.append(row)
    data = str(tmp_path / 'mixed_lengths.jsonl')
    with open(data, 'w') as f:
        f.writelines(json.dumps(r) + '\n' for r in rows[:16])
    out = str(tmp_path / 'ranks')
    ws = Workspace(trained_ws['root'], trained_ws['student'], trained_ws['teacher'], None, data, None)
    run = run_swift(base_args(ws, out, lmbda=0, seq_kd='true', max_steps=2, max_completion_length=limit,
                              log_completions='true', use_cpu='true', dataset_shuffle='false',
                              train_dataloader_shuffle='false'), nproc=2)
    from swift_gkd_plugin.demo import tiny
    tokenizer = tiny.load_tokenizer(trained_ws['tokenizer'])
    by_step = {}  # step: [(length, clipped)], every rank's completions
    with open(os.path.join(out, 'completions.jsonl')) as f:
        for line in f:
            table = json.loads(line)
            for step, text in zip(table['step'], table['completion']):
                n = len(tokenizer.encode(text, add_special_tokens=False))
                # cut at the limit: its tokens; else the answer and the end of turn
                by_step.setdefault(int(step), []).append((n, True) if n == limit else (n + 1, False))
    assert len(run.logs) == 2 and sorted(by_step) == [1, 2], (run.logs, by_step)
    for row, step in zip(run.logs, (1, 2)):
        lengths, clipped = zip(*by_step[step])
        assert len(lengths) == 4, by_step  # 2 ranks x 2 rows
        assert row['gkd/completion_length_min'] == min(lengths), (row, lengths)
        assert row['gkd/completion_length_max'] == max(lengths), (row, lengths)
        assert row['gkd/completion_length'] == pytest.approx(sum(lengths) / 4), (row, lengths)
        assert row['gkd/clipped_ratio'] == pytest.approx(sum(clipped) / 4), (row, clipped)
    # both kinds in a step: the share is neither 0 nor 1 (the teacher's answers to the eight letters may all reach
    # the limit with their end of turn, as on this machine: 'b b h' and its end is 4 tokens, so lengths can all be 4)
    assert any(0 < sum(c for _, c in v) < 4 for v in by_step.values()), by_step


@pytest.mark.skipif(torch.cuda.is_available(), reason='the CPU harness of tests/megatron does nothing where CUDA is '
                    'present')
def test_megatron_logs_the_same_truncation(tiny_ws, shared_runs):
    """Two data-parallel ranks (the window's reduction over Megatron's data-parallel group): the session's shared
    ``dp2`` run (``--gkd_rollout_max_tokens 3 --max_completion_length 6``, tests/megatron/megatron_runs.py)."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), 'megatron'))
    from megatron_runs import shared_megatron_runs, train_rows
    run = shared_megatron_runs(tiny_ws, shared_runs)['dp2']
    rows = train_rows(run)
    on_policy, seq_kd = _rows(run, 'on_policy'), _rows(run, 'seq_kd')
    assert len(rows) == 2 and on_policy and seq_kd, rows
    for row in on_policy:
        _check_cut_at(row, 3)
    for row in seq_kd:
        _check_cut_at(row, 6)
    keys = logged_gkd_keys(rows)
    for lang in DOCS:
        assert not undocumented(keys, lang), (lang, undocumented(keys, lang))
