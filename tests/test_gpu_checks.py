"""The GPU checks of issue 18 (tests/gpu/checks), run on CPU with tiny shapes: each part's script runs end to end
and writes ``<part>.json`` / ``<part>.md`` with the expected keys and finite numbers. The numbers themselves are for
a GPU (``bash tests/gpu/kit.sh run PART``); parts c and f need CUDA for their measurements and say so."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import pytest

RUN = os.path.join(os.path.dirname(__file__), 'gpu', 'checks', 'run.py')
if os.path.dirname(RUN) not in sys.path:  # the kit's modules (common, run, part_*), as run.py imports them
    sys.path.insert(0, os.path.dirname(RUN))


def _written(out, part):
    """The part's ``<part>.json`` (as a dict) and ``<part>.md``, the only files it wrote."""
    assert sorted(os.listdir(out)) == [f'{part}.json', f'{part}.md']
    with open(out / f'{part}.json') as f:
        doc = json.load(f)
    md = (out / f'{part}.md').read_text()
    assert doc['part'] == part and doc['env']['versions']['ms-swift'] and md.startswith(f'# Part {part}:')
    return doc, md


def run_part(tmp_path, part, *extra, timeout=600, **env):
    out = tmp_path / 'out'
    proc = subprocess.run([sys.executable, RUN, part, '--tiny', '--device', 'cpu', '--out', str(out),
                           '--work', str(tmp_path / 'work'), *extra], capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, OMP_NUM_THREADS='1', **env))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return _written(out, part)


def run_part_forked(tmp_path, monkeypatch, part, *extra, launched=lambda env: False):
    """:func:`run_part` with the part run inside this test process and its ``swift rlhf`` runs forked from the test
    worker's zygote (``conftest.run_swift``: the child command the launcher starts, ~15 s a run less than ``swift``
    and a fresh interpreter; a run with ``SWIFT_GKD_PLUGIN=0`` from a zygote started with it,
    ``conftest.ZYGOTE_VARIANTS``), but those whose environment ``launched(env)`` accepts: the kit's own
    ``common.start_rlhf`` (the ``swift`` launcher; part a's short case, its plugin run). The part's own code, flags
    and results are the same; run.py's command line stays tested by the parts that go through :func:`run_part` (b,
    c, f, v)."""
    import common
    import run
    from conftest import _free_port, run_swift
    kits = common.start_rlhf

    def start_rlhf(argv, env, timeout):
        if launched(env):
            return kits(argv, env, timeout)
        if 'MASTER_PORT' in env:  # a port of this worker's block (conftest._free_port), not bind(0)'s
            env = dict(env, MASTER_PORT=str(_free_port()))
        r = run_swift(argv, env=env, timeout=int(timeout), check=False)
        return r.returncode, r.output

    monkeypatch.setattr(common, 'start_rlhf', start_rlhf)
    out = tmp_path / 'out'
    run.main([part, '--tiny', '--device', 'cpu', '--out', str(out), '--work', str(tmp_path / 'work'), *extra])
    return _written(out, part)


def finite(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def test_part_a_pipeline_against_builtin(tmp_path, monkeypatch):
    """The plugin's run through the kit's own launch of ``swift rlhf`` (the console script), the built-in's forked
    from the ``SWIFT_GKD_PLUGIN=0`` zygote."""
    doc, md = run_part_forked(tmp_path, monkeypatch, 'a', '--modes', 'off_policy', '--impls', 'builtin,fused',
                              '--cases', 'short', launched=lambda env: env.get('SWIFT_GKD_PLUGIN') != '0')
    assert doc['status'] == 'ok', doc
    rows = {r['impl']: r for r in doc['rows']}
    assert rows['builtin']['plugin_active'] is False and rows['fused']['plugin_active'] is True
    for r in rows.values():
        assert r['ok'] and len(r['losses']) == 2 and all(map(finite, r['losses'])) and finite(r['step_s'])
    # learning rate 0, the same batches: the plugin's fused loss equals ms-swift's
    assert rows['fused']['max_rel_loss_diff_vs_builtin'] < 1e-4
    assert finite(rows['fused']['step_s_vs_builtin'])
    assert '| off_policy | fused | True |' in md


def test_part_a_long_sequences_batch_1_and_4(tmp_path, monkeypatch):
    doc, md = run_part_forked(tmp_path, monkeypatch, 'a', '--impls', 'builtin,fused', '--cases', 'long')
    assert doc['status'] == 'ok', doc
    rows = {(r['mode'], r['impl']): r for r in doc['rows']}
    assert sorted(rows) == [('long_batch1', 'builtin'), ('long_batch1', 'fused'), ('long_batch4', 'builtin'),
                            ('long_batch4', 'fused')]
    for r in rows.values():
        assert r['outcome'] == 'ok' and r['ok'] and all(map(finite, r['losses']))
    # lr 0, the same long rows: the fused loss equals the built-in's at both batch sizes
    assert rows[('long_batch4', 'fused')]['max_rel_loss_diff_vs_builtin'] < 1e-4
    assert any('long: 30-letter prompts' in n for n in doc['notes'])


def test_part_s_store_written_by_swift_gkd_score_against_the_live_teacher_in_bfloat16(tmp_path, monkeypatch):
    """Part s on tiny bfloat16 models (users' dtype: the teacher's hidden states reach the top-k head in float32,
    which stopped a bfloat16 teacher with --gkd_logits_topk at its first step until 971bcde): swift-gkd score's
    bfloat16 and float32 stores, then lr-0 runs from each without the teacher against the live teacher."""
    doc, md = run_part_forked(tmp_path, monkeypatch, 's')
    assert doc['status'] == 'ok', doc
    rows = {r['case']: r for r in doc['rows']}
    assert list(rows) == ['score_bfloat16', 'score_float32', 'live', 'store_bfloat16', 'store_float32']
    for dtype in ('bfloat16', 'float32'):
        score, run = rows[f'score_{dtype}'], rows[f'store_{dtype}']
        assert score['ok'] and score['covered'] and score['rows'] == 4 and finite(score['tokens_per_s'])
        assert run['ok'] and run['teacher_loaded'] is False and run['store_rows'] == [1.0, 1.0]
    assert rows['live']['ok'] and rows['live']['teacher_loaded'] is True and len(rows['live']['losses']) == 2
    assert rows['store_float32']['max_rel_loss_diff_vs_live'] < 1e-6  # the live teacher's top-k, kept exactly
    assert rows['store_bfloat16']['max_rel_loss_diff_vs_live'] < 1e-2  # 8 mantissa bits (3.5e-3 at this tiny loss)
    assert rows['score_bfloat16']['bytes_per_token'] < rows['score_float32']['bytes_per_token']
    assert '| store_float32 | 0 |' in md


def test_part_a_out_of_memory_is_an_outcome_not_a_failure():
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), 'gpu', 'checks'))
    from part_a import outcome
    with open(os.path.join(os.path.dirname(__file__), 'gpu', 'results', '2026-11-23-h100',
                           'e2e_long_batch4.json')) as f:
        builtin = next(r for r in json.load(f) if r['impl'] == 'builtin')  # the first run's OOM, as logged
    assert outcome(1, 'torch.OutOfMemoryError: CUDA out of memory. ' + builtin['error']) == 'oom'
    assert outcome(0, '') == 'ok' and outcome(1, 'ValueError: --beta must be in [0, 1]') == 'failed'
    assert outcome('timeout', '') == 'failed'


def test_part_b_loss_methods_and_chunk_sweep(tmp_path):
    """Under Triton's interpreter (the CPU tests' setting) both kernels run; the sweep tunes the new one (fused2),
    which gives fused's loss. No verdict: no GPU measured it (tests/test_kit_part_b_kernels.py: the rows without the
    interpreter, where fused2 is unavailable, and the verdict's rules)."""
    doc, md = run_part(tmp_path, 'b', '--methods', 'floor,fused,fused2,dense', '--ns', '64', '--chunks', '16',
                       '--repeats', '1', TRITON_INTERPRET='1')
    assert doc['status'] == 'ok', doc
    by = {(r['kind'], r['method']): r for r in doc['rows']}
    for key in [('method', 'floor'), ('method', 'fused'), ('method', 'fused2'), ('method', 'dense'),
                ('chunk_sweep', 'fused2')]:
        r = by[key]
        assert r['status'] == 'ok' and finite(r['time_ms']) and finite(r['peak_extra_mib']) and finite(r['loss'])
    assert by[('method', 'fused')]['wall_s'] > 0
    # the same seeded inputs: fused, fused2 (default chunk and chunk 16) and dense give the same loss
    for key in [('method', 'fused'), ('method', 'fused2'), ('chunk_sweep', 'fused2')]:
        assert by[key]['loss'] == pytest.approx(by[('method', 'dense')]['loss'], rel=1e-4), key
    assert finite(by[('method', 'dense')]['fused_time_ratio'])
    assert any('fused/floor time' in n for n in doc['notes']) and any('chunk sweep' in n for n in doc['notes'])
    assert any(n.startswith('N=64: fused2/fused time') for n in doc['notes'])
    verdict = [n for n in doc['notes'] if n.startswith('make triton2 the CUDA default')]
    assert len(verdict) == 1 and 'no GPU measured it' in verdict[0] and 'make triton2 the CUDA default' in md
    ncu = by[('ncu', 'ncu')]
    assert ncu['status'] == 'unavailable' and 'no CUDA device' in ncu['error']
    assert any(n.startswith('ncu: not run') for n in doc['notes'])


def test_part_c_offload_runs_on_cpu_and_says_what_needs_cuda(tmp_path):
    doc, md = run_part(tmp_path, 'c', '--steps', '2')
    assert doc['status'] == 'skipped'  # no CUDA: times only
    assert [(r['scenario'], r['optimizer']) for r in doc['rows']] == [
        ('resident', 'sgd_lr0'), ('offload_prefetch', 'sgd_lr0'), ('offload_no_prefetch', 'sgd_lr0'),
        ('adamw_resident', 'adamw'), ('adamw_offload_prefetch', 'adamw')]
    for r in doc['rows']:
        assert finite(r['step_ms']) and finite(r['loss']) and r['offload_active'] is False
    sgd = [r['loss'] for r in doc['rows'] if r['optimizer'] == 'sgd_lr0']
    adamw = [r['loss'] for r in doc['rows'] if r['optimizer'] == 'adamw']
    assert len(set(sgd)) == 1  # the same steps whatever the placement
    # AdamW at lr 1e-5 trains: its last loss is not the frozen student's; each AdamW run starts from a fresh student
    assert adamw[0] == adamw[1] and adamw[0] != sgd[0]
    assert doc['rows'][-1]['loss_diff_vs_resident'] == 0.0
    assert any('needs CUDA' in n for n in doc['notes'])


def test_part_d_deepspeed_zero2_and_zero3_torch_compile(tmp_path, monkeypatch):
    pytest.importorskip('deepspeed')
    doc, md = run_part_forked(tmp_path, monkeypatch, 'd', '--cases', 'zero2,zero3_torch_compile')
    assert doc['status'] == 'ok', doc
    assert [r['case'] for r in doc['rows']] == ['zero2', 'zero3_torch_compile']
    for row in doc['rows']:
        assert row['ok'] and row['plugin_active'] and all(map(finite, row['losses']))
    assert doc['rows'][1]['fused'] is True


def test_part_d_shared_base_lora_from_a_trained_adapter_equals_a_separate_base(tmp_path, monkeypatch):
    """The adapter moves from step 1 (SFT term, lr 1e-3): afterwards the divergence is not 0, and the shared base's
    adapter-off teacher gives the same losses as the base loaded as a separate model."""
    doc, md = run_part_forked(tmp_path, monkeypatch, 'd', '--cases', 'shared_base_lora,separate_base_lora',
                              '--steps', '3')
    assert doc['status'] == 'ok', doc
    shared, separate = doc['rows']
    for r in (shared, separate):
        assert r['ok'] and len(r['losses']) == 3 and all(d > 0 for d in r['divergence_after_step1'])
    assert separate['max_rel_loss_diff_vs_shared'] < 1e-3
    assert any('against a separate base model' in n for n in doc['notes'])


def test_part_e_teacher_server_load_and_oversized_batch(tmp_path, monkeypatch):
    doc, md = run_part_forked(tmp_path, monkeypatch, 'e', '--clients', '1,2', '--seconds', '1')  # (no swift rlhf)
    assert doc['status'] == 'ok', doc
    load = [r for r in doc['rows'] if r['kind'] == 'load']
    assert [r['clients'] for r in load] == [1, 2]
    for r in load:
        assert r['requests'] > 0 and r['errors'] == 0 and finite(r['tokens_per_s']) and finite(r['p95_ms'])
    (big,) = [r for r in doc['rows'] if r['kind'] == 'oversized']
    assert big['answer'].startswith('error') and big['http_status'] == 413  # over --max_request_tokens on CPU
    assert big['next_request'] == 'ok' and big['server_alive'] is True and big['as_expected'] is True


def test_part_e_oversized_request_passes_every_server_limit(tmp_path, monkeypatch):
    """The GPU's oversized request, sized against a pretended 2 MiB of memory (tiny teacher: hidden 96, float32):
    one sequence of 6,827 tokens whose hidden states are 1.25x that memory. The server started with
    ``oversized_server_limits`` must score it (on CPU it fits): no limit refuses it, so on a GPU only memory can."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), 'gpu', 'checks'))
    from part_e import MARGIN, oversized_tokens
    doc, md = run_part_forked(tmp_path, monkeypatch, 'e', '--clients', '1', '--seconds', '0.5',
                              '--pretend-memory-mib', '2')
    assert doc['status'] == 'ok', doc
    (big,) = [r for r in doc['rows'] if r['kind'] == 'oversized']
    tokens = oversized_tokens(2 * 2**20, 96, 4)
    assert big['tokens'] == tokens and tokens * 96 * 4 >= MARGIN * 2 * 2**20
    assert big['answer'] == 'answered (it fitted)' and big['http_status'] is None and big['as_expected'] is True
    assert big['next_request'] == 'ok' and big['server_alive'] is True


def test_part_e_sizing_and_verdicts():
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), 'gpu', 'checks'))
    from part_e import oversized_as_expected, oversized_server_limits, oversized_tokens
    h100 = 79 * 2**30  # about what an H100 80GB HBM3 reports (torch.cuda.get_device_properties)
    n = oversized_tokens(h100, 1536)  # the kit's 1.5B-shaped teacher, bf16
    assert n * 1536 * 2 >= 1.25 * h100 > (n - 2) * 1536 * 2  # its embedding output alone: 1.25x the device
    limits = oversized_server_limits(n)
    assert min(limits['--max_batch_tokens'], limits['--max_length'], limits['--max_request_tokens']) >= n
    assert limits['--max_body_mb'] * 2**20 >= 8 * n  # the JSON of n ids
    oom = 'error: teacher forward failed: OutOfMemoryError: CUDA out of memory. Tried to allocate 99.50 GiB'
    assert oversized_as_expected(True, False, 500, oom)
    assert not oversized_as_expected(True, False, None, 'answered (it fitted)')  # what the first GPU run got
    assert not oversized_as_expected(True, False, 413, 'error: 34811905 tokens in one request')
    assert oversized_as_expected(False, True, None, 'answered (it fitted)')
    assert oversized_as_expected(False, False, 413, 'error: ...') and not oversized_as_expected(False, False, 500, '')


def test_part_f_megatron_probe_names_what_blocks(tmp_path):
    doc, md = run_part(tmp_path, 'f')
    assert doc['status'] == 'skipped'
    probes = {r['probe']: r for r in doc['rows'] if r['kind'] == 'import'}
    assert 'transformer_engine' in probes and 'plugin megatron trainer' in probes
    for r in probes.values():
        assert isinstance(r['ok'], bool) and (r['ok'] or 'Error' in r['result'])
    assert any(n.startswith('blocked at') or 'no CUDA' in n for n in doc['notes'])


def test_part_v_vllm_rollout_correction_says_it_needs_vllm(tmp_path):
    """On CPU part v is skipped, naming why (whether or not vLLM's CPU build is installed): what it checks on a GPU
    runs on vLLM's CPU build in tests/test_vllm.py."""
    doc, md = run_part(tmp_path, 'v')
    assert doc['status'] == 'skipped' and doc['rows'] == []
    assert any('tests/test_vllm.py' in n for n in doc['notes']) and 'needs CUDA for: vLLM' in md


def test_all_merges_parts_within_the_budget(tmp_path):
    out = tmp_path / 'out'
    proc = subprocess.run([sys.executable, RUN, 'all', '--tiny', '--device', 'cpu', '--out', str(out),
                           '--budget-s', '0'], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((out / 'all.json').read_text())
    assert [d['part'] for d in doc['parts']] == list('cbeadfvs')
    assert all(d['status'] == 'skipped' and 'not run' in d['notes'][0] for d in doc['parts'])
    assert sorted(os.listdir(out)) == ['all.json', 'all.md']


# ---------------------------------------------------------------------------------------------------- kit.sh itself
KIT_SH = os.path.join(os.path.dirname(__file__), 'gpu', 'kit.sh')


def _fake_wheel(folder, name, version='1.0', payload=b''):
    """A minimal valid pure-Python wheel (``<name>/__init__.py``) padded to ``len(payload)`` bytes."""
    import base64
    import hashlib
    import zipfile
    path = os.path.join(folder, f'{name}-{version}-py3-none-any.whl')
    info = f'{name}-{version}.dist-info'
    files = {f'{name}/__init__.py': b'X = 1\n# ' + payload + b'\n',
             f'{info}/METADATA': f'Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n'.encode(),
             f'{info}/WHEEL': b'Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n'}

    def digest(data):
        return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()

    record = ''.join(f'{p},sha256={digest(d)},{len(d)}\n' for p, d in files.items()) + f'{info}/RECORD,,\n'
    with zipfile.ZipFile(path, 'w', zipfile.ZIP_STORED) as z:
        for p, d in files.items():
            z.writestr(p, d)
        z.writestr(f'{info}/RECORD', record)
    return path


def _kit(tmp_path, *args, **env):
    return subprocess.run(['bash', KIT_SH, *args], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHON=sys.executable, GPUKIT=str(tmp_path / 'kit'), **env))


def test_kit_size_guard_refuses_oversize_duplicates_and_torch(tmp_path):
    wheels = tmp_path / 'kit' / 'wheels'
    wheels.mkdir(parents=True)
    _fake_wheel(str(wheels), 'alpha', payload=b'a' * 2**20)  # 1 MiB
    ok = _kit(tmp_path, 'size')
    assert ok.returncode == 0 and '1.00 MiB  total, 1 wheels (limit 60 MiB)' in ok.stdout, ok.stdout + ok.stderr
    over = _kit(tmp_path, 'size', GPUKIT_LIMIT_MIB='0.5')
    assert over.returncode != 0 and 'is above the 0.5 MiB limit' in over.stderr
    _fake_wheel(str(wheels), 'alpha', version='2.0')
    _fake_wheel(str(wheels), 'torch', version='2.11.0')
    bad = _kit(tmp_path, 'size')
    assert bad.returncode != 0 and "two versions of ['alpha']" in bad.stderr and "['torch']" in bad.stderr


def test_kit_install_activates_the_plugin_from_a_target_folder(tmp_path):
    """The GPU machine's install: no index, no deps, a --target folder on PYTHONPATH; the plugin's .pth must run in
    a Python that has nothing else (a bare venv), which a PYTHONPATH folder alone would not do. The checkout's
    plugin wheel is built on the spot (the fake kit has none), as on a GPU machine whose checkout changed."""
    pytest.importorskip('setuptools')
    wheels = tmp_path / 'kit' / 'wheels'
    wheels.mkdir(parents=True)
    _fake_wheel(str(wheels), 'alpha')
    site = tmp_path / 'site'
    proc = _kit(tmp_path, 'install', GPUKIT_SITE=str(site))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert 'building it from' in proc.stderr and (site / 'swift_gkd_plugin.pth').exists()
    exports = dict(part.split('=', 1) for part in proc.stdout.split()[1:])
    bare = tmp_path / 'bare'
    subprocess.run([sys.executable, '-m', 'venv', '--without-pip', str(bare)], check=True)
    # checked before anything is imported: importing _bootstrap installs its finder by itself
    check = ('import sys\n'
             'assert any(type(f).__name__ == "_PostImportFinder" for f in sys.meta_path), "plugin not activated"\n'
             'import swift_gkd_plugin, alpha\n'
             'print(swift_gkd_plugin.__file__, alpha.X)\n')
    pythonpath = exports['PYTHONPATH'].split('${')[0]
    run = subprocess.run([str(bare / 'bin' / 'python'), '-c', check], capture_output=True, text=True,
                         env={'PATH': os.environ['PATH'], 'PYTHONPATH': pythonpath}, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith(str(site)) and run.stdout.split()[-1] == '1'
    # without the sitecustomize the same folder does not activate the plugin: the boot folder is what does it
    plain = subprocess.run([str(bare / 'bin' / 'python'), '-c', check], capture_output=True, text=True,
                           env={'PATH': os.environ['PATH'], 'PYTHONPATH': str(site)}, cwd=tmp_path)
    assert plain.returncode != 0 and 'plugin not activated' in plain.stderr


# ------------------------------------------------------------------------------- large wheels carried in parts
def _tiny_sdist(folder, name='beta', version='0.1'):
    """A pure-Python sdist (setup.py, no dependencies): what assemble builds on the GPU machine, in miniature."""
    import tarfile
    src = os.path.join(folder, f'{name}-{version}')
    os.makedirs(os.path.join(src, name))
    with open(os.path.join(src, name, '__init__.py'), 'w') as f:
        f.write('Y = 2\n' + '#' * 200000 + '\n')  # ~200 kB, so that the built wheel splits into several parts
    with open(os.path.join(src, 'setup.py'), 'w') as f:
        f.write(f'from setuptools import setup\nsetup(name={name!r}, version={version!r}, packages=[{name!r}])\n')
    path = os.path.join(folder, f'{name}-{version}.tar.gz')
    with tarfile.open(path, 'w:gz') as t:
        t.add(src, arcname=f'{name}-{version}')
    return path


def test_big_parts_carried_one_bundle_per_call_then_joined_verified_installed_and_built(tmp_path):
    """kit.sh prepare-big / assemble on a small wheel and a small sdist: parts below --part-mib in bundles below
    --bundle-mib, with sha256 in the manifest; assemble, called once per carried bundle (each call sees only its
    bundle, as on the GPU machine), keeps the parts in its /tmp folder, says which bundles are missing, and once all
    are there joins, checks, installs the wheel, builds the sdist's wheel and brings it back in parts."""
    pytest.importorskip('setuptools')
    pytest.importorskip('wheel')
    src = tmp_path / 'src'
    src.mkdir()
    payload = os.urandom(300000).hex().encode()  # 600 kB that do not compress
    whl = _fake_wheel(str(src), 'alpha', payload=payload)
    sdist = _tiny_sdist(str(src))
    env = dict(GPUKIT_BIG_TMP=str(tmp_path / 'gpu_tmp'), GPUKIT_SITE=str(tmp_path / 'site'),
               GPUKIT_OUT=str(tmp_path / 'out'))
    prep = _kit(tmp_path, 'prepare-big', '--groups', '', '--local', whl, sdist, '--part-mib', '0.2',
                '--bundle-mib', '0.3', **env)
    assert prep.returncode == 0, prep.stdout + prep.stderr
    big = tmp_path / 'kit' / 'big'
    manifest = json.loads((big / 'manifest.json').read_text())
    import hashlib
    (w,) = [e for e in manifest['files'] if e['name'] == os.path.basename(whl)]
    assert w['sha256'] == hashlib.sha256(open(whl, 'rb').read()).hexdigest() and w['groups'] == ['local']
    assert len(w['parts']) == math.ceil(os.path.getsize(whl) / int(0.2 * 2**20)) == 3
    assert sum(p['size'] for p in w['parts']) == os.path.getsize(whl)
    bundles = sorted(os.listdir(big / 'carry'))
    assert bundles == ['00', '01', '02']  # one 0.2 MiB part a bundle; the small sdist joins the last
    for b in bundles:
        files = list((big / 'carry' / b).iterdir())
        assert all(f.stat().st_size <= 0.2 * 2**20 for f in files)
        assert sum(f.stat().st_size for f in files) <= 0.3 * 2**20
    # the GPU side: each call carries one bundle (a fresh checkout holds only it)
    held = tmp_path / 'held'
    (big / 'carry').rename(held)
    for i, b in enumerate(bundles):
        (big / 'carry').mkdir()
        shutil.copytree(held / b, big / 'carry' / b)
        if i == 1:  # damaged in transfer: refused by name, nothing kept from it
            part = next((big / 'carry' / b).iterdir())
            part.write_bytes(b'x' + part.read_bytes()[1:])
            bad = _kit(tmp_path, 'assemble', '--built-part-mib', '0.001', **env)
            assert bad.returncode != 0 and f'{part.name}: sha256 differs from the manifest' in bad.stderr
            shutil.copy(held / b / part.name, part)
        got = _kit(tmp_path, 'assemble', '--built-part-mib', '0.001', **env)
        assert got.returncode == 0, got.stdout + got.stderr
        if i < len(bundles) - 1:
            assert 'bundles still to carry: ' + ' '.join(bundles[i + 1:]) in got.stdout
            assert not (tmp_path / 'site' / 'alpha').exists()
        shutil.rmtree(big / 'carry')
    assert 'local: 2 files joined' in got.stdout and 'built beta-0.1-' in got.stdout, got.stdout
    check = subprocess.run([sys.executable, '-c', 'import alpha, beta; print(alpha.X, beta.Y)'], capture_output=True,
                           text=True, env=dict(os.environ, PYTHONPATH=str(tmp_path / 'site')))
    assert check.stdout.split() == ['1', '2'], check.stderr
    report = json.loads((tmp_path / 'out' / 'assemble.json').read_text())
    (built,) = report['groups']['local']['built']
    assert built['build_s'] >= 0 and len(built['parts']) > 1
    # the built wheel's parts join back into the wheel (what a later run carries instead of building)
    joined = b''.join((tmp_path / 'out' / 'built' / p['name']).read_bytes() for p in built['parts'])
    assert hashlib.sha256(joined).hexdigest() == built['sha256'] and len(joined) == built['size']
