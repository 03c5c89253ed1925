"""Part b of the GPU kit measures the second Triton kernel beside the first in one call (issue 56 item 4): the
``fused2`` rows, the verdict notes, the Nsight Compute pass of one chunk and its csv parser, run on CPU (tiny
shapes): what a GPU fills in is said to be unavailable, with the reason."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

CHECKS = os.path.join(os.path.dirname(__file__), 'gpu', 'checks')
sys.path.insert(0, CHECKS)
import ncu_chunk  # noqa: E402
import part_b  # noqa: E402

REAL_NS = [4096, 8192, 16384]

# ncu --csv --print-units base --metrics ... (the details page: one metric a line), as written to --log-file; the
# columns of Nsight Compute 2024-2025 (ID, Process ID, Process Name, Host Name, Kernel Name, Context, Stream, Block
# Size, Grid Size, Device, CC, Section Name, Metric Name, Metric Unit, Metric Value), numbers with separators
_HEAD = ('"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size",'
         '"Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"')
_VALUES = {  # kernel id -> metric -> (unit, value)
    0: dict(gpu__time_duration='1,234,567', dram_pct='71.52', read='933,494,784', write='466,747,392',
            xu_issue='38.41', xu_active='40.02'),
    1: dict(gpu__time_duration='617,283', dram_pct='88.03', read='933,494,784', write='466,747,392',
            xu_issue='55.27', xu_active='57.90'),
}


def _details_csv():
    lines = ['==PROF== Connected to process 4242 (/usr/bin/python3.12)',
             '==WARNING== Found outstanding GPU clock reset, trying to revert...Success.', _HEAD]
    names = {0: 'full_rows_kernel', 1: 'full_rows2_kernel'}
    for i, v in _VALUES.items():
        for metric, unit, value in [
                (ncu_chunk.TIME, 'nsecond', v['gpu__time_duration']), (ncu_chunk.DRAM_PCT, '%', v['dram_pct']),
                (ncu_chunk.READ, 'byte', v['read']), (ncu_chunk.WRITE, 'byte', v['write']),
                (ncu_chunk.XU_ISSUE, '%', v['xu_issue']), (ncu_chunk.XU_ACTIVE, '%', v['xu_active'])]:
            lines.append(f'"{i}","4242","python3.12","127.0.0.1","{names[i]}","1","7","(256, 1, 1)","(1536, 1, 1)",'
                         f'"0","9.0","Command line profiler metrics","{metric}","{unit}","{value}"')
    lines.append('==PROF== Disconnected from process 4242')
    return '\n'.join(lines) + '\n'


def _raw_csv():
    """The same as ``--page raw``: one kernel a line, the units line under the header."""
    metrics = list(ncu_chunk.METRICS)
    head = '"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Device","CC",' + \
        ','.join(f'"{m}"' for m in metrics)
    units = '"","","","","","","","","",' + ','.join(f'"{u}"' for u in ('nsecond', '%', 'byte', 'byte', '%', '%'))
    rows = []
    for i, name in [(0, 'full_rows_kernel'), (1, 'full_rows2_kernel')]:
        v = _VALUES[i]
        vals = [v['gpu__time_duration'], v['dram_pct'], v['read'], v['write'], v['xu_issue'], v['xu_active']]
        rows.append(f'"{i}","4242","python3.12","127.0.0.1","{name}","1","7","0","9.0",'
                    + ','.join(f'"{x}"' for x in vals))
    return '\n'.join(['==PROF== Connected to process 4242 (/usr/bin/python3.12)', head, units, *rows]) + '\n'


@pytest.mark.parametrize('page', ['details', 'raw'])
def test_ncu_csv_parser_rows_and_summary(page):
    text = _details_csv() if page == 'details' else _raw_csv()
    rows = ncu_chunk.parse_ncu_csv(text, ncu_chunk.METRICS)
    assert len(rows) == 12 and {r['kernel'] for r in rows} == {'full_rows_kernel', 'full_rows2_kernel'}
    by = {(r['id'], r['metric']): r for r in rows}
    assert by[(0, ncu_chunk.TIME)]['value'] == 1234567.0 and by[(0, ncu_chunk.TIME)]['unit'] == 'nsecond'
    assert by[(1, ncu_chunk.READ)]['value'] == 933494784.0 and by[(1, ncu_chunk.XU_ACTIVE)]['value'] == 57.9
    ncu_chunk.label(rows, ['fused beta=0.5', 'fused2 beta=0.5'])
    s = ncu_chunk.summary(rows, minimum_bytes=3 * 1536 * 151936 * 2)
    old, new = s['fused beta=0.5'], s['fused2 beta=0.5']
    assert old['kernel'] == 'full_rows_kernel' and new['kernel'] == 'full_rows2_kernel'
    assert old['time_us'] == pytest.approx(1234.567) and old['dram_pct'] == 71.52
    assert old['gbytes'] == pytest.approx(1.400242176) and old['x_minimum'] == pytest.approx(1.0)
    assert new['gb_per_s'] == pytest.approx(1.400242176 / 617.283e-6)
    assert new['xu_issue_pct'] == 55.27
    # a launch count that does not match the variants: labelled by launch, never silently shifted
    assert {r['variant'] for r in ncu_chunk.label(rows, ['fused beta=0.5'])} == {'launch 0', 'launch 1'}


def test_ncu_missing_is_unavailable_with_the_reason(tmp_path):
    if ncu_chunk.find_ncu():
        pytest.skip('ncu is installed here')
    out = ncu_chunk.profile(str(tmp_path), 64, 64, 1024, 'float32')
    assert out == dict(status='unavailable', error='ncu not found (not on PATH, no /usr/local/cuda/bin/ncu)')


def test_plan_at_real_shapes_fits_one_call():
    rows = part_b.plan(REAL_NS)
    for n in REAL_NS:  # old and new kernel, Liger, floor at every N
        assert [m for m, k in rows if k == n][:4] == ['floor', 'fused', 'fused2', 'liger']
    assert [n for m, n in rows if m == 'dense'] == [4096, 8192]
    assert [(m, n) for m, n in rows if m in ('fused2_serial', 'fused_torch', 'fused_topk')] == [
        ('fused2_serial', 8192), ('fused_torch', 8192), ('fused_topk', 8192)]
    assert len(rows) == 17 and part_b.plan([64], ['floor', 'fused2']) == [('floor', 64), ('fused2', 64)]


def test_part_b_tiny_new_rows_and_verdict(tmp_path):
    """Without TRITON_INTERPRET (a CPU machine running the kit) fused2 is unavailable and says why, and no verdict:
    no GPU measured it. (Under Triton's interpreter, the CPU tests' setting, it runs beside the floor, fused and
    dense in tests/test_gpu_checks.py's part b.)"""
    env = {k: v for k, v in os.environ.items() if k != 'TRITON_INTERPRET'}
    env.update(OMP_NUM_THREADS='1')
    out = tmp_path / 'out'
    proc = subprocess.run([sys.executable, os.path.join(CHECKS, 'run.py'), 'b', '--tiny', '--device', 'cpu',
                           '--out', str(out), '--work', str(tmp_path / 'work'), '--methods', 'fused,fused2',
                           '--ns', '64', '--chunks', '32', '--repeats', '1'], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((out / 'b.json').read_text())
    assert doc['status'] == 'ok', doc
    by = {(r['kind'], r['method']): r for r in doc['rows']}
    fused, fused2 = by[('method', 'fused')], by[('method', 'fused2')]
    assert fused['status'] == 'ok' and fused['wall_s'] > 0
    verdict = [n for n in doc['notes'] if n.startswith('make triton2 the CUDA default')]
    assert len(verdict) == 1 and 'no GPU measured it' in verdict[0]
    assert fused2['status'] == 'unavailable' and "backend 'triton2'" in fused2['error'], fused2
    assert 'CUDA tensors' in fused2['error'] and 'fused2: unavailable' in verdict[0]
    assert by[('chunk_sweep', 'fused')]['status'] == 'ok'  # the new kernel did not run: the old one is swept
    ncu = by[('ncu', 'ncu')]
    assert ncu['status'] == 'unavailable' and 'no CUDA device' in ncu['error']
    assert any(n.startswith('ncu: not run') for n in doc['notes'])
    assert 'make triton2 the CUDA default' in (out / 'b.md').read_text()


def _verdict_notes(rows, device='cuda', chunk_mib=None):
    from common import Results
    res = Results('b', 'verdict')
    res.rows = rows
    part_b.verdicts(res, REAL_NS, device, chunk_mib)
    return res.notes


def _row(method, n, time_ms, mib, status='ok', reserved=None):
    return dict(kind='method', method=method, n=n, status=status, time_ms=time_ms, peak_extra_mib=mib,
                peak_reserved_extra_mib=reserved)


def test_verdict_yes_only_when_faster_at_every_n_without_more_memory():
    old = [_row('fused', n, t, 1900) for n, t in zip(REAL_NS, (18.3, 35.3, 69.0))]
    notes = _verdict_notes(old + [_row('fused2', n, t, 1900) for n, t in zip(REAL_NS, (15.0, 30.0, 60.0))])
    assert notes[-1].startswith('make triton2 the CUDA default: yes, because faster than triton at N = 4096')
    assert 'N=16384: verdict: triton2 faster (60.0 vs 69.0 ms) and no more memory (allocated 1900 vs 1900 MiB): yes' \
        in notes
    notes = _verdict_notes(old + [_row('fused2', 4096, 15.0, 1900), _row('fused2', 8192, 30.0, 2100),
                                  _row('fused2', 16384, 70.0, 1900)])
    assert notes[-1] == 'make triton2 the CUDA default: no, because more memory at 8192; slower at 16384'
    notes = _verdict_notes(old + [_row('fused2', 4096, 15.0, 1900), _row('fused2', 8192, 30.0, 1900),
                                  _row('fused2', 16384, 50.0, 1900, status='fallback')])
    assert notes[-1] == 'make triton2 the CUDA default: no, because not measured at 16384'
    assert notes[-2].startswith('N=16384: verdict: not measured (fused2 fallback')


def test_verdict_fails_memory_that_grows_past_one_chunk():
    """Issue 67 item 3: the side stream's buffers, if the allocator cannot reuse them, grow the reserved memory with
    every chunk while the allocated figure stays flat: a reserved peak more than one chunk above triton's fails the
    second design, and so does an allocated one; within one chunk (but above 1%) it is only 'more memory'."""
    chunk = part_b.one_chunk_mib(151936, 151936, 2)
    assert chunk == pytest.approx(768 * 2 * 151936 * 2 / 2**20)  # triton2's 768 rows of student + teacher logits
    old = [_row('fused', n, t, 1900, reserved=2048) for n, t in zip(REAL_NS, (18.3, 35.3, 69.0))]
    grown = [_row('fused2', 4096, 15.0, 1900, reserved=2048), _row('fused2', 8192, 30.0, 1900, reserved=4096),
             _row('fused2', 16384, 60.0, 1900, reserved=2048 + chunk - 1)]
    notes = _verdict_notes(old + grown, chunk_mib=chunk)
    assert notes[-1] == ('make triton2 the CUDA default: no, because more memory at 8192; memory beyond one chunk at '
                         '8192; more memory at 16384'), notes[-1]
    line = next(n for n in notes if n.startswith('N=8192: verdict'))
    assert 'reserved 4096 vs 2048 MiB' in line and 'MORE than one chunk (445 MiB) above triton' in line, line
    assert 'within one chunk (445 MiB) of triton' in next(n for n in notes if n.startswith('N=16384: verdict'))
    allocated = [_row('fused2', n, 15.0, 1900 + (chunk + 1 if n == 4096 else 0), reserved=2048) for n in REAL_NS]
    assert 'memory beyond one chunk at 4096' in _verdict_notes(old + allocated, chunk_mib=chunk)[-1]
    same = [_row('fused2', n, 15.0, 1900, reserved=2048) for n in REAL_NS]
    assert _verdict_notes(old + same, chunk_mib=chunk)[-1].startswith('make triton2 the CUDA default: yes')
