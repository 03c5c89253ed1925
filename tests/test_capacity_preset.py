"""The capacity preset of ``benchmarks/bench_quality.py``: the table task's checker and split
(``swift_gkd_plugin.testing.capacity_task``), and the preset's command line end to end on tiny sizes (real
``swift sft`` / ``swift rlhf``)."""
from __future__ import annotations

import itertools
import json
import os
import random

import pytest

from swift_gkd_plugin.testing import quality_task, tiny
from swift_gkd_plugin.testing.capacity_task import PROMPT_PREFIX, CapacityTask

from test_quality_bench import bench


def _by_definition(task, letters):
    """The answer written from the task's definition: letter i is the table at the window starting at i."""
    table = task.table()
    return [table[tuple(letters[(i + j) % len(letters)] for j in range(task.window))]
            for i in range(len(letters))]


def test_table_covers_every_window_with_symbols_and_is_fixed_by_its_seed():
    task = CapacityTask(**bench.CAPACITY_TASK)
    table = task.table()
    assert set(table) == set(itertools.product(task.symbols, repeat=task.window))
    assert set(table.values()) <= set(task.symbols)
    assert len(set(table.values())) > len(task.symbols) // 2  # a random map, not a constant one
    assert CapacityTask(**bench.CAPACITY_TASK).table() == table
    assert CapacityTask(**dict(bench.CAPACITY_TASK, table_seed=1)).table() != table


def test_checker_accepts_the_one_right_answer_and_nothing_else():
    task = CapacityTask(**bench.CAPACITY_TASK)
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
    task = CapacityTask(**bench.CAPACITY_TASK)
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
    results under ``<workdir>/capacity``."""
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
