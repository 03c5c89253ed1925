"""The capacity preset of ``benchmarks/bench_quality.py``: the table task's checker and split
(``harness.capacity_task``), and the preset's command line end to end on tiny sizes (real
``swift sft`` / ``swift rlhf``)."""
from __future__ import annotations

import itertools
import json
import os
import random

import pytest

from swift_gkd_plugin.demo import quality_task, tiny
from harness.capacity_task import PROMPT_PREFIX, CapacityTask

from test_quality_bench import _as_the_suite_runs, bench


WRAP = CapacityTask(**bench.CAPACITY_TASK)  # the preset: one table, the last letter wrapping around
TWO_TABLES = bench.CAPACITY_VARIANTS['two_tables']['task']  # two tables writing disjoint letters, no wrap-around


def _by_definition(task, letters):
    """The answer written from the task's definition: letter i is the table at the window starting at i."""
    table = task.table()
    return [table[tuple(letters[(i + j) % len(letters)] for j in range(task.window))]
            for i in range(len(letters))]


@pytest.mark.parametrize('spec', [bench.CAPACITY_VARIANTS[name]['task'] for name in bench.CAPACITY_VARIANTS])
def test_table_covers_every_window_with_symbols_and_is_fixed_by_its_seed(spec):
    task = CapacityTask(**spec)
    for k in range(task.tables):
        table = task.table(k)
        assert set(table) == set(itertools.product(task.symbols, repeat=task.window))
        assert set(table.values()) <= set(task.outputs(k)) <= set(task.symbols)
        assert len(set(table.values())) > len(task.outputs(k)) // 2  # a random map, not a constant one
        assert CapacityTask(**spec).table(k) == table
        assert CapacityTask(**dict(spec, table_seed=1)).table(k) != table


def test_checker_accepts_the_one_right_answer_and_nothing_else():
    task = WRAP
    rng = random.Random(0)
    for row in task.make_rows(50, 0, 'test'):
        prompt, reference = quality_task.prompt_of(row), row['messages'][1]['content']
        letters = prompt[len(PROMPT_PREFIX):].split()
        assert len(letters) == task.length and set(letters) <= set(task.symbols)
        assert reference.split() == _by_definition(task, letters)
        assert task.is_correct(prompt, reference) and task.is_correct(prompt, f' {reference}\n')
        assert task.token_accuracy(prompt, reference) == 1.0
        wrong = reference.split()
        i = rng.randrange(len(wrong))
        wrong[i] = next(s for s in task.symbols if s != wrong[i])
        assert not task.is_correct(prompt, ' '.join(wrong))
        assert task.token_accuracy(prompt, ' '.join(wrong)) == (task.length - 1) / task.length
        assert not task.is_correct(prompt, ' '.join(reference.split()[:-1]))  # one letter short
        assert task.token_accuracy(prompt, reference + ' a') == task.length / (task.length + 1)  # one surplus
    with pytest.raises(ValueError, match='not a task prompt'):
        task.is_correct('Sort: a b', 'a b')


def test_held_out_prompts_are_new_sequences_whose_table_entries_all_occur_in_training():
    task = WRAP
    cfg = bench.CAPACITY_PRESETS['quick']
    train, test = task.make_rows(cfg['n_train'], 0, 'train'), task.make_rows(cfg['n_test'], 0, 'test')
    train_prompts = {quality_task.prompt_of(r) for r in train}
    test_prompts = {quality_task.prompt_of(r) for r in test}
    assert len(train_prompts) == cfg['n_train'] and len(test_prompts) == cfg['n_test']
    assert not train_prompts & test_prompts
    assert all(task.split_of(p[len(PROMPT_PREFIX):].split()) == 'test' for p in test_prompts)

    def windows(prompts):
        return {tuple(ls[(i + j) % len(ls)] for j in range(task.window))
                for ls in (p[len(PROMPT_PREFIX):].split() for p in prompts) for i in range(len(ls))}
    assert windows(test_prompts) <= windows(train_prompts)  # the answers are learnable from the training rows
    assert task.make_rows(5, 0, 'train') == train[:5]  # deterministic


def test_capacity_preset_runs_end_to_end(tmp_path, monkeypatch, capsys):
    """``--preset capacity --quick`` on tiny sizes: the capacity workspace (table task, the preset's model sizes),
    the capacity learning rate on the methods' command lines, ``--sampling_temperature`` reaching the GKD runs only,
    results under ``<workdir>/capacity``. Its ``swift`` command lines start as the suite starts every run
    (:func:`test_quality_bench._as_the_suite_runs`); the two-table test below keeps the bench's own
    ``run_command``."""
    monkeypatch.setattr(bench, 'run_command', _as_the_suite_runs)
    tiny_preset = dict(bench.CAPACITY_PRESETS['quick'], n_train=64, n_test=8, teacher_steps=2)
    monkeypatch.setitem(bench.CAPACITY_PRESETS, 'quick', tiny_preset)
    code = bench.main(['--preset', 'capacity', '--quick', '--workdir', str(tmp_path), '--steps', '2',
                       '--eval_every', '1', '--student_steps', '2', '--methods', 'sft', 'skd',
                       '--sampling_temperature', '0.7'])
    out = capsys.readouterr().out
    assert code == 0
    ws = tmp_path / 'workspace_capacity'
    with open(ws / 'train.jsonl') as f:
        first = json.loads(f.readline())
    assert quality_task.prompt_of(first).startswith(PROMPT_PREFIX)
    assert tiny.count_parameters(str(ws / 'student')) < tiny.count_parameters(str(ws / 'teacher')) / 3  # the sizes
    with open(tmp_path / 'capacity' / 'results.json') as f:
        results = json.load(f)
    assert results['learning_rate'] == bench.CAPACITY_LEARNING_RATE
    assert results['config']['task'] == bench.CAPACITY_TASK
    assert [p['step'] for p in results['curves']['skd']['0']] == [0, 1, 2]
    assert 'skd_replaced_fraction' in results['curves']['skd']['0'][-1]
    args = {}
    for run in (tmp_path / 'runs').iterdir():
        if run.is_dir():
            with open(run / 'args.json') as f:
                args[run.name.split('_seed')[0]] = json.load(f)
    assert sorted(args) == ['sft', 'skd']
    assert {a['learning_rate'] for a in args.values()} == {float(bench.CAPACITY_LEARNING_RATE)}
    assert args['skd']['gkd_sampling_temperature'] == 0.7 and args['skd']['temperature'] == 1.0
    assert args['sft'].get('gkd_sampling_temperature') is None  # left out of swift sft's command line
    assert results['sampling_temperature'] == '0.7'
    assert '| sft |' in out and '| skd |' in out
    assert not os.path.exists(tmp_path / 'results.json')  # the default preset's results are not overwritten


def test_capacity_closing_line_has_its_prefix():
    em = {'sft': 0.5, 'seqkd': 0.45, 'supkd': 0.52, 'onpolicy_beta0': 0.2, 'onpolicy_beta0.5': 0.3,
          'onpolicy_beta1': 0.25, 'mixed': 0.4, 'skd': 0.6}
    summary = {m: {'exact_match': (v, 0.0)} for m, v in em.items()}
    ws = {'teacher_eval': {'exact_match': 0.9}, 'student_eval': {'exact_match': 0.1}}
    assert bench.closing_line(summary, ws, 'quality[capacity]').startswith('quality[capacity]: teacher 0.900, ')


def test_workspace_rewrites_its_data_when_the_task_changes(tmp_path):
    """The data are cached with their settings: the same folder with another table writes the other table's rows
    (and retrains the models on them) instead of keeping the first task's rows."""
    def build(task):
        return quality_task.build_workspace(str(tmp_path), n_train=16, n_test=4, teacher_steps=1, student_steps=1,
                                            batch_size=4, task=task, log=lambda msg: None,
                                            teacher_kwargs=bench.CAPACITY_PRESETS['quick']['student_kwargs'],
                                            student_kwargs=bench.CAPACITY_PRESETS['quick']['student_kwargs'])
    first, other = CapacityTask(**bench.CAPACITY_TASK), CapacityTask(**dict(bench.CAPACITY_TASK, table_seed=1))
    ws = build(first)
    assert tiny.read_dataset(ws['train']) == first.make_rows(16, 0, 'train')
    ws = build(other)
    assert tiny.read_dataset(ws['train']) == other.make_rows(16, 0, 'train')
    assert tiny.read_dataset(ws['test']) == other.make_rows(4, 0, 'test')
    assert ws['teacher_params']['task'] == other.describe()



def test_two_table_checker_accepts_wholly_one_tables_answer_and_no_mixture():
    """The two-table task: letter i is table k's entry for input letters i and i + 1 (no wrap-around, so 7 letters
    from 8); a reference is wholly table A's or wholly table B's, drawn per row; the checker accepts exactly those
    two answers, and an answer that takes some letters from each table counts as mixed."""
    task = CapacityTask(**TWO_TABLES)
    a, b = task.table(0), task.table(1)
    assert not set(a.values()) & set(b.values())  # disjoint letters: one letter tells the table
    assert set(a.values()) | set(b.values()) == set(task.symbols)
    shared = CapacityTask(**dict(TWO_TABLES, disjoint=False))
    assert shared.table(0) == WRAP.table() and sum(shared.table(1)[k] != WRAP.table()[k] for k in a) > 0.9 * len(a)
    rows = task.make_rows(200, 0, 'test')
    chosen = []
    rng = random.Random(0)
    for row in rows:
        prompt, reference = quality_task.prompt_of(row), row['messages'][1]['content'].split()
        x = prompt[len(PROMPT_PREFIX):].split()
        by_a = [a[(x[i], x[i + 1])] for i in range(len(x) - 1)]
        by_b = [b[(x[i], x[i + 1])] for i in range(len(x) - 1)]
        assert reference in (by_a, by_b) and len(reference) == task.length - 1
        chosen.append(reference == by_a)
        for answer in (by_a, by_b):
            assert task.is_correct(prompt, ' '.join(answer)) and task.token_accuracy(prompt, ' '.join(answer)) == 1
        differ = [i for i in range(len(by_a)) if by_a[i] != by_b[i]]
        if len(differ) >= 2:  # take the first differing letter from B, the rest from A: valid letters, no one table
            mixed = list(by_a)
            mixed[differ[0]] = by_b[differ[0]]
            assert not task.is_correct(prompt, ' '.join(mixed))
            assert task.mixed_fraction([prompt], [' '.join(mixed)]) == 1.0
            assert task.mixed_fraction([prompt], [' '.join(by_b)]) == 0.0
        wrong = list(by_a)
        i = rng.randrange(len(wrong))
        wrong[i] = next(s for s in task.symbols if s not in (by_a[i], by_b[i]))
        assert not task.is_correct(prompt, ' '.join(wrong)) and task.mixed_fraction([prompt], [' '.join(wrong)]) == 0
        assert not task.is_correct(prompt, ' '.join(by_a + [by_a[0]]))  # the wrap-around letter is not asked for
    assert 0.35 < sum(chosen) / len(chosen) < 0.65  # both tables are referenced, about equally


def test_two_table_split_is_disjoint_and_every_needed_entry_of_both_tables_is_taught():
    task = CapacityTask(**TWO_TABLES)
    train, test = task.make_rows(4000, 0, 'train'), task.make_rows(200, 0, 'test')
    train_prompts = {quality_task.prompt_of(r) for r in train}
    test_prompts = {quality_task.prompt_of(r) for r in test}
    assert len(train_prompts) == 4000 and len(test_prompts) == 200 and not train_prompts & test_prompts

    def taught(rows, k):
        """(pair, table) entries that the rows' references use, by table ``k``."""
        pairs = set()
        for r in rows:
            x = quality_task.prompt_of(r)[len(PROMPT_PREFIX):].split()
            if r['messages'][1]['content'].split() == task.solve(x, k):
                pairs |= {(x[i], x[i + 1]) for i in range(len(x) - 1)}
        return pairs
    for k in (0, 1):
        needed = {(x[i], x[i + 1]) for x in (p[len(PROMPT_PREFIX):].split() for p in test_prompts)
                  for i in range(task.length - 1)}
        assert needed <= taught(train, k)  # either table's answer of a held-out prompt is learnable from training
    assert task.describe() != CapacityTask(**dict(TWO_TABLES, tables=1, wrap=True)).describe()
    assert 'tables' not in WRAP.describe()  # the first attempt's cached workspaces keep their key


def test_two_table_task_runs_end_to_end(tmp_path, monkeypatch):
    """``--capacity_task two_tables`` on tiny sizes: its own workspace (two-table rows) and results folder, the
    ``mixed_tables`` metric in every evaluation, the preset's folders untouched. Its run starts as the bench starts
    one (``bench.run_command``: ``swift`` in a fresh process, offline)."""
    monkeypatch.setitem(bench.CAPACITY_PRESETS, 'quick', dict(bench.CAPACITY_PRESETS['quick'], n_train=64, n_test=8))
    monkeypatch.setitem(bench.CAPACITY_VARIANTS, 'two_tables', dict(bench.CAPACITY_VARIANTS['two_tables'],
                                                                    teacher_steps=2))
    code = bench.main(['--preset', 'capacity', '--capacity_task', 'two_tables', '--quick', '--workdir',
                       str(tmp_path), '--steps', '1', '--eval_every', '1', '--student_steps', '2',
                       '--methods', 'onpolicy_beta1'])
    assert code == 0
    task = CapacityTask(**TWO_TABLES)
    rows = tiny.read_dataset(str(tmp_path / 'workspace_two_tables_capacity' / 'train.jsonl'))
    assert rows == task.make_rows(64, 0, 'train')
    assert all(len(r['messages'][1]['content'].split()) == task.length - 1 for r in rows)
    with open(tmp_path / 'capacity_two_tables' / 'results.json') as f:
        results = json.load(f)
    assert results['config']['task'] == TWO_TABLES and results['config']['teacher_steps'] == 2
    assert all('mixed_tables' in p for p in results['curves']['onpolicy_beta1']['0'])
    assert not (tmp_path / 'workspace_capacity').exists() and not (tmp_path / 'capacity').exists()
