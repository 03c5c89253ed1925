"""Long rows (issue 55): benchmarks/bench_long_context.py at tiny sizes (its table and ratios are the measured
numbers) and the GPU kit's long-row cases of part a (``long32k``, ``sp``) on CPU with tiny models."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from types import SimpleNamespace

HERE = os.path.dirname(os.path.abspath(__file__))
BENCH = os.path.join(os.path.dirname(HERE), 'benchmarks', 'bench_long_context.py')
sys.path.insert(0, os.path.join(HERE, 'gpu', 'checks'))
from test_gpu_checks import finite, run_part_forked  # noqa: E402


def test_bench_long_context_prints_ratios_of_its_measured_rows(tmp_path):
    out = tmp_path / 'r.json'
    proc = subprocess.run([sys.executable, BENCH, '--tokens', '64', '--hidden', '16', '--vocab', '512',
                           '--json-out', str(out)], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {(r['method'], r['sp']): r for r in json.loads(out.read_text())}
    assert sorted(rows) == [('dense', 1), ('dense', 2), ('fused', 1), ('fused', 2)]
    assert all(r['status'] == 'ok' and r['peak_mib'] >= 0 and r['time_s'] > 0 for r in rows.values()), \
        [(k, r['status'], r.get('error')) for k, r in rows.items()]
    for m in ('fused', 'dense'):
        one, two = rows[(m, 1)], rows[(m, 2)]
        # each rank holds half of the row's 63 response tokens; the trainer's normaliser: tokens / processes
        assert one['rows'] == [63] and two['rows'] == [32, 31]
        assert one['normalizer'] == 63 and two['normalizer'] == 31.5
        assert abs(one['loss'] - two['loss']) < 1e-5 and abs(one['loss'] - rows[('fused', 1)]['loss']) < 1e-4
    out_text = proc.stdout

    def r(a, b):
        return f'{a / b:.2f}x' if b > 0 else 'n/a'

    # every printed ratio is the quotient of the printed run's own rows
    for m in ('fused', 'dense'):
        one, two = rows[(m, 1)], rows[(m, 2)]
        assert (f"# {m} N=64: SP=2/SP=1 memory per rank {r(two['peak_mib'], one['peak_mib'])}, "
                f"time {r(two['time_s'], one['time_s'])}, ") in out_text, out_text
    for sp in (1, 2):
        d, f = rows[('dense', sp)], rows[('fused', sp)]
        assert (f"# N=64 SP={sp}: dense/fused memory per rank {r(d['peak_mib'], f['peak_mib'])}, "
                f"time {r(d['time_s'], f['time_s'])}") in out_text, out_text
    table = [line for line in out_text.splitlines() if re.match(r'\s*(fused|dense)\s+64\s', line)]
    assert len(table) == 4 and '# memory: peak RSS (VmHWM' in out_text


def test_kit_part_a_long32k_and_sequence_parallel_cases(tmp_path, monkeypatch):
    doc, md = run_part_forked(tmp_path, monkeypatch, 'a', '--impls', 'builtin,fused', '--cases', 'long32k,sp')
    assert doc['status'] == 'ok', doc
    rows = {(r['mode'], r['impl']): r for r in doc['rows']}
    assert sorted(rows) == [('long32k', 'builtin'), ('long32k', 'fused'), ('sp', 'fused_sp1'), ('sp', 'fused_sp2')]
    for row in rows.values():
        assert row['outcome'] == 'ok' and row['ok'] and all(map(finite, row['losses'])), row
    assert rows[('long32k', 'fused')]['max_rel_loss_diff_vs_builtin'] < 1e-4
    # two gloo ranks, each on half of every row, log the one-rank run's losses
    assert rows[('sp', 'fused_sp2')]['max_rel_loss_diff_vs_sp1'] < 1e-4
    assert any(n.startswith('long32k: ') for n in doc['notes']) and any(n.startswith('sp: ') for n in doc['notes'])


def test_kit_sequence_parallel_case_skips_with_its_reason_below_two_gpus(tmp_path):
    import torch
    from common import Results
    from part_a import run_sequence_parallel
    res = Results('a', 'test')
    run_sequence_parallel(SimpleNamespace(device='cuda', work=str(tmp_path)), res, None)
    why = f'needs 2 GPUs, this machine has {torch.cuda.device_count()}'
    assert [(r['impl'], r['outcome'], r['error']) for r in res.rows] == [('fused_sp1', 'skipped', why),
                                                                         ('fused_sp2', 'skipped', why)]
    assert res.notes == [f'sp: not run: {why}'] and res.status == 'ok'
