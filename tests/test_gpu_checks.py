"""The GPU checks of issue 18 (tests/gpu/checks), run on CPU with tiny shapes: each part's script runs end to end
and writes ``<part>.json`` / ``<part>.md`` with the expected keys and finite numbers. The numbers themselves are for
a GPU (``bash tests/gpu/kit.sh run PART``); parts c and f need CUDA for their measurements and say so."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

RUN = os.path.join(os.path.dirname(__file__), 'gpu', 'checks', 'run.py')


def run_part(tmp_path, part, *extra, timeout=600):
    out = tmp_path / 'out'
    proc = subprocess.run([sys.executable, RUN, part, '--tiny', '--device', 'cpu', '--out', str(out),
                           '--work', str(tmp_path / 'work'), *extra], capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(os.listdir(out)) == [f'{part}.json', f'{part}.md']
    with open(out / f'{part}.json') as f:
        doc = json.load(f)
    md = (out / f'{part}.md').read_text()
    assert doc['part'] == part and doc['env']['versions']['ms-swift'] and md.startswith(f'# Part {part}:')
    return doc, md


def finite(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def test_part_a_pipeline_against_builtin(tmp_path):
    doc, md = run_part(tmp_path, 'a', '--modes', 'off_policy', '--impls', 'builtin,fused')
    assert doc['status'] == 'ok', doc
    rows = {r['impl']: r for r in doc['rows']}
    assert rows['builtin']['plugin_active'] is False and rows['fused']['plugin_active'] is True
    for r in rows.values():
        assert r['ok'] and len(r['losses']) == 2 and all(map(finite, r['losses'])) and finite(r['step_s'])
    # learning rate 0, the same batches: the plugin's fused loss equals ms-swift's
    assert rows['fused']['max_rel_loss_diff_vs_builtin'] < 1e-4
    assert finite(rows['fused']['step_s_vs_builtin'])
    assert '| off_policy | fused | True |' in md


def test_part_b_loss_methods_and_chunk_sweep(tmp_path):
    doc, md = run_part(tmp_path, 'b', '--methods', 'floor,fused,dense', '--ns', '64', '--chunks', '16',
                       '--repeats', '1')
    assert doc['status'] == 'ok', doc
    by = {(r['kind'], r['method']): r for r in doc['rows']}
    for key in [('method', 'floor'), ('method', 'fused'), ('method', 'dense'), ('chunk_sweep', 'fused')]:
        r = by[key]
        assert r['status'] == 'ok' and finite(r['time_ms']) and finite(r['peak_extra_mib']) and finite(r['loss'])
    # the same seeded inputs: fused (default chunk and chunk 16) and dense give the same loss
    assert by[('method', 'fused')]['loss'] == pytest.approx(by[('method', 'dense')]['loss'], rel=1e-4)
    assert by[('chunk_sweep', 'fused')]['loss'] == pytest.approx(by[('method', 'dense')]['loss'], rel=1e-4)
    assert finite(by[('method', 'dense')]['fused_time_ratio'])
    assert any('fused/floor time' in n for n in doc['notes']) and any('chunk sweep' in n for n in doc['notes'])


def test_part_c_offload_runs_on_cpu_and_says_what_needs_cuda(tmp_path):
    doc, md = run_part(tmp_path, 'c', '--steps', '2')
    assert doc['status'] == 'skipped'  # no CUDA: times only
    assert [r['scenario'] for r in doc['rows']] == ['resident', 'offload_prefetch', 'offload_no_prefetch']
    for r in doc['rows']:
        assert finite(r['step_ms']) and finite(r['loss']) and r['offload_active'] is False
    assert len({r['loss'] for r in doc['rows']}) == 1  # the same steps whatever the placement
    assert any('needs CUDA' in n for n in doc['notes'])


def test_part_d_deepspeed_zero2(tmp_path):
    pytest.importorskip('deepspeed')
    doc, md = run_part(tmp_path, 'd', '--cases', 'zero2')
    assert doc['status'] == 'ok', doc
    (row,) = doc['rows']
    assert row['case'] == 'zero2' and row['ok'] and row['plugin_active'] and all(map(finite, row['losses']))


def test_part_e_teacher_server_load_and_oversized_batch(tmp_path):
    doc, md = run_part(tmp_path, 'e', '--clients', '1,2', '--seconds', '1')
    assert doc['status'] == 'ok', doc
    load = [r for r in doc['rows'] if r['kind'] == 'load']
    assert [r['clients'] for r in load] == [1, 2]
    for r in load:
        assert r['requests'] > 0 and r['errors'] == 0 and finite(r['tokens_per_s']) and finite(r['p95_ms'])
    (big,) = [r for r in doc['rows'] if r['kind'] == 'oversized']
    assert big['answer'].startswith('error') and big['http_status'] == 413  # over --max_request_tokens on CPU
    assert big['next_request'] == 'ok' and big['server_alive'] is True


def test_part_f_megatron_probe_names_what_blocks(tmp_path):
    doc, md = run_part(tmp_path, 'f')
    assert doc['status'] == 'skipped'
    probes = {r['probe']: r for r in doc['rows'] if r['kind'] == 'import'}
    assert 'transformer_engine' in probes and 'plugin megatron trainer' in probes
    for r in probes.values():
        assert isinstance(r['ok'], bool) and (r['ok'] or 'Error' in r['result'])
    assert any(n.startswith('blocked at') or 'no CUDA' in n for n in doc['notes'])


def test_all_merges_parts_within_the_budget(tmp_path):
    out = tmp_path / 'out'
    proc = subprocess.run([sys.executable, RUN, 'all', '--tiny', '--device', 'cpu', '--out', str(out),
                           '--budget-s', '0'], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((out / 'all.json').read_text())
    assert [d['part'] for d in doc['parts']] == list('cbeadf')
    assert all(d['status'] == 'skipped' and 'not run' in d['notes'][0] for d in doc['parts'])
    assert sorted(os.listdir(out)) == ['all.json', 'all.md']
