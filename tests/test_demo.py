"""``swift-gkd demo`` end to end through the real ``swift rlhf``: the default run (plain on-policy GKD) raises the
student's held-out exact match by a clear margin, prints each step's mode and draws its curves beside the teacher's
level; a run that did not use the plugin is refused."""
from __future__ import annotations

import glob
import json
import os
import re
import resource
import shlex
import shutil
import subprocess
import sys

import pytest

from swift_gkd_plugin.entry import cli


def _cached(demo: dict, workdir, held_out: int = 4) -> str:
    """A copy of ``demo``'s workspace (its models and data, not its run) as ``workdir``, where a demo with the same
    seed and --teacher_steps finds it cached (as a second demo run on a machine does), its held-out prompts cut to
    the first ``held_out`` (the demo scores both models on them before its run: the refusals read no score)."""
    shutil.copytree(demo['workdir'], str(workdir), ignore=shutil.ignore_patterns('output'))
    with open(os.path.join(str(workdir), 'test.jsonl')) as f:
        rows = f.readlines()[:held_out]
    with open(os.path.join(str(workdir), 'test.jsonl'), 'w') as f:
        f.writelines(rows)
    return str(workdir)


def _exact_match(out: str, name: str) -> float:
    return float(re.search(rf'^\s+{name}\s+([0-9.]+)\s', out, re.M).group(1))


#: 3 s of CPU that a user's shell spends before it execs the demo (bash -c 'pip install ...; swift-gkd demo' does so
#: for its last command): the demo's CPU figure must leave it out (issue 37 item 8: 221 s CPU in a 57 s wall on 2 cores)
BURN = ('import time\nt = time.process_time()\nwhile time.process_time() - t < 3: pass\n'
        'print("burned", time.process_time())')


@pytest.fixture(scope='session')
def default_demo(tmp_path_factory) -> dict:
    """``swift-gkd demo`` with its defaults, as a user's shell runs it: ``bash -c '<BURN>; exec swift-gkd demo
    --workdir W'``, the console script of this environment. Run once per test session for the xdist workers (a file
    lock, its record kept as JSON; tests/test_entropy_trend.py reads it too): ``returncode``, ``out`` (its stdout
    decoded, each progress bar's ``\\r`` kept), ``err``, ``cpu`` (the CPU seconds of the shell, the burn and the demo
    with the processes it waited for) and ``workdir``."""
    from filelock import FileLock
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get('PYTEST_XDIST_WORKER'):
        shared = shared.parent  # common to the xdist workers of this session
    path = str(shared / 'default_demo')
    with FileLock(path + '.lock'):
        if not os.path.exists(path + '.json'):
            demo = shlex.join(_swift_gkd() + ['demo', '--workdir', path])
            script = f'{shlex.quote(sys.executable)} -c {shlex.quote(BURN)}; exec {demo}'
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            proc = subprocess.run(['bash', '-c', script], capture_output=True)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            record = dict(returncode=proc.returncode, out=proc.stdout.decode('utf-8', errors='replace'),
                          err=proc.stderr.decode('utf-8', errors='replace'), workdir=path,
                          cpu=(after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime))
            with open(path + '.json', 'w') as f:
                json.dump(record, f)
    with open(path + '.json') as f:
        record = json.load(f)
    assert record['returncode'] == 0, record['out'][-3000:] + record['err'][-3000:]
    return record


def _swift_gkd() -> list:
    """The ``swift-gkd`` console script of this environment (a user's command), as ``swift_executable`` finds
    ``swift``."""
    beside = os.path.join(os.path.dirname(sys.executable), 'swift-gkd')
    return [beside if os.path.exists(beside) else shutil.which('swift-gkd') or 'swift-gkd']


def test_demo_default_distils_the_student(default_demo):
    """Seed 0 with the demo's defaults: the seed whose earliest default (40 plain on-policy steps, learning rate 3e-3,
    batch 8) moved exact match 0.210 -> 0.315 here and 0.210 -> 0.145 on another CPU; the issue's bar is a gain of
    0.15 (measured: to the teacher's 1.000 on 5 seeds and 1 and 2 threads, docs_en/quality_results.md)."""
    out = default_demo['out']
    before, after = _exact_match(out, 'student before GKD'), _exact_match(out, 'student after GKD')
    teacher = _exact_match(out, 'teacher')
    assert after - before >= 0.15, (before, after)
    windows = re.findall(r'^\s+steps (\d+)-(\d+)\s+(\S.*)$', out, re.M)
    assert len(re.findall(r'^\s+steps ', out, re.M)) == len(windows)
    steps = sum(int(last) - int(first) + 1 for first, last, _ in windows)
    assert windows[-1][1] == str(cli.DEMO_STEPS) and steps == cli.DEMO_STEPS
    # lmbda 1 without SKD: plain on-policy throughout, no replaced fraction
    assert all(modes.startswith('on-policy') and ',' not in modes for _, _, modes in windows), windows
    assert 'replaced' not in out and '--gkd_skd_top_k' not in out
    # issue 66 item 11: the curves, as a PNG and its numbers (exact match from the printed start to the printed end)
    png = re.search(r'curves \(training loss, held-out exact match by step\): (\S+\.png)', out).group(1)
    with open(png, 'rb') as f:
        assert f.read(8) == b'\x89PNG\r\n\x1a\n'
    with open(png[:-len('png')] + 'json') as f:
        curves = json.load(f)
    assert abs(curves['teacher'] - teacher) < 5e-4  # the teacher's level, drawn beside the student's curve
    assert [step for step, _ in curves['exact_match']] == [0, 20, 40, 60, 80]
    assert abs(curves['exact_match'][0][1] - before) < 5e-4 and abs(curves['exact_match'][-1][1] - after) < 5e-4
    every = cli.DEMO_LOGGING_STEPS  # (and the first step, as ms-swift logs it)
    assert [s for s, _ in curves['loss']] == [1, *range(every, cli.DEMO_STEPS + 1, every)], curves['loss']
    assert all(x > 0 for _, x in curves['loss'])
    # issue 66 item 13: the run's output is passed on byte for byte; read as text lines, each progress bar's redraw
    # ('\r') became a line of its own (the last bar printed three times)
    assert '\rTrain: 100%' in out and not re.search(r'^Train: 100%.*\n(Train: 100%.*\n)', out, re.M)


def test_run_length_names_each_steps_mode_in_order():
    assert cli.run_length(['skd', 'skd', 'off-policy', 'skd']) == 'skd x2, off-policy, skd'
    assert cli.run_length(['on-policy']) == 'on-policy'


def _run_forked(monkeypatch):
    """The demo's ``swift rlhf`` run forked from the test worker's zygote (``conftest.run_swift``: the command the
    ``swift`` launcher starts, its ``SWIFT_GKD_PLUGIN`` as the demo passes it: a zygote started with it) instead of
    the launcher and a fresh process (~10 s of CPU a run); :func:`default_demo` runs the demo's own launch."""
    from conftest import run_swift

    def run_logged(cmd, env):
        assert cmd[:2] == [cli.swift_executable(), 'rlhf'], cmd
        run = run_swift(cmd[2:], env={'SWIFT_GKD_PLUGIN': env.get('SWIFT_GKD_PLUGIN')}, check=False, timeout=300)
        print(run.output, end='')  # echoed, as the demo echoes its run
        return run.returncode, run.output

    monkeypatch.setattr(cli, 'run_logged', run_logged)


def test_demo_fails_loudly_when_the_plugin_did_not_run(default_demo, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv('SWIFT_GKD_PLUGIN', '0')  # ms-swift's own GKD trainer runs, and does not know --gkd_* flags
    _run_forked(monkeypatch)
    workdir = _cached(default_demo, tmp_path / 'ws')
    code = cli.main(['demo', '--workdir', workdir, '--steps', '1'])
    err = capsys.readouterr().err
    assert code == 3
    assert 'did not use swift-gkd-plugin' in err and 'GKD trainer active' in err
    # it failed parsing (nothing ran), and the advice is what works: the package is not on a package index
    assert "the plugin's flags were refused (the plugin was not active" in err and 'trainer ran' not in err
    assert 'pip install -e .' in err and 'pip install swift-gkd-plugin' not in err
    assert not glob.glob(os.path.join(workdir, 'output', '**', 'gkd_modes'), recursive=True)


def test_demo_without_skd_still_refuses_a_run_without_the_plugin(default_demo, tmp_path, monkeypatch, capsys):
    """With ``--skd_top_k 0`` the command line still carries the plugin's --gkd_sampling_temperature, which
    ms-swift's own parser refuses: the error says so (nothing ran), not that ms-swift's trainer ran."""
    monkeypatch.setenv('SWIFT_GKD_PLUGIN', '0')
    _run_forked(monkeypatch)
    code = cli.main(['demo', '--workdir', _cached(default_demo, tmp_path / 'ws'), '--steps', '1', '--skd_top_k', '0'])
    err = capsys.readouterr().err
    assert code == 3 and 'did not use swift-gkd-plugin' in err
    assert "the plugin's flags were refused (the plugin was not active" in err and 'trainer ran' not in err


@pytest.mark.parametrize('flag,value,says', [('--skd_top_k', '-1', '--skd_top_k must be an integer >= 0'),
                                             ('--sampling_temperature', '0', '--sampling_temperature must be > 0 '
                                              '(the temperature the student samples at'),
                                             ('--sampling_temperature', 'inf', '--sampling_temperature must be a '
                                              'finite number > 0'),
                                             ('--lmbda', 'nan', '--lmbda must be a finite number in [0, 1]'),
                                             ('--seed', '-1', '--seed must be an integer in [0, 4294967295]'),
                                             ('--seed', '99999999999', '--seed must be an integer in [0, 4294967295]'),
                                             ('--lmbda', '1.5', '--lmbda must be in [0, 1]'),
                                             ('--steps', '0', '--steps must be an integer >= 1'),
                                             ('--skd_top_k', '449', '--skd_top_k must be in [0, 448] (the demo\'s '
                                              'models have 448 output rows')])
def test_demo_refuses_bad_flags_before_building_anything(flag, value, says, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(['demo', '--workdir', str(tmp_path / 'ws'), flag, value])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and says in err and '--temperature' not in err  # the demo has no such flag
    assert f'got {float(value):g}' in err or f'got {value}' in err
    assert not (tmp_path / 'ws').exists()


def test_demo_refuses_skd_without_on_policy_steps_before_building_anything(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(['demo', '--workdir', str(tmp_path / 'ws'), '--lmbda', '0', '--skd_top_k', '1'])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and '--skd_top_k 1 corrects the student' in err
    assert '--lmbda 0 has none' in err and '--skd_top_k 0' in err and not (tmp_path / 'ws').exists()


def test_the_demos_vocabulary_is_known_before_anything_is_built(tmp_path):
    """--skd_top_k is checked against :data:`tiny.MODEL_VOCAB_SIZE` before the workspace is built: the size its
    models get."""
    from swift_gkd_plugin.demo import tiny
    assert tiny.padded_vocab_size(len(tiny.build_tokenizer(str(tmp_path / 'tok')))) == tiny.MODEL_VOCAB_SIZE == 448


@pytest.mark.parametrize('where', ['file', 'under_a_file'])
def test_demo_refuses_a_workdir_it_cannot_write_before_building_anything(where, tmp_path, capsys):
    """A --workdir that is a file, or under one, was a traceback from the workspace build (issue 37 item 9)."""
    (tmp_path / 'taken').write_text('not a folder')
    workdir = tmp_path / 'taken' if where == 'file' else tmp_path / 'taken' / 'ws'
    with pytest.raises(SystemExit) as exit_info:
        cli.main(['demo', '--workdir', str(workdir)])
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if 'error:' in line]
    assert exit_info.value.code == 2 and len(errors) == 1 and 'Traceback' not in captured.err
    assert f'--workdir {workdir}: {tmp_path / "taken"}' in errors[0] and 'is a file, not a folder' in errors[0]
    assert 'building' not in captured.out


def test_demo_cpu_figure_is_its_own(default_demo):
    """A shell that runs something else and then execs the demo hands the demo a process whose CPU counters already
    hold that work (:data:`BURN`): the demo reports what it used since it started (issue 37 item 8)."""
    burned = float(re.search(r'^burned ([0-9.]+)', default_demo['out'], re.M).group(1))
    total = default_demo['cpu']  # the shell, the burn and the demo
    reported = float(re.search(r'([0-9]+)s CPU; trained student', default_demo['out']).group(1))
    assert burned >= 3 and (total - burned) / 2 <= reported <= total - burned + 1, (reported, total, burned)
