"""Part f: can ``megatron rlhf --rlhf_type gkd`` run on this image with the kit's megatron-core and mcore-bridge?

Probes, in order, each recorded with its exact error: the imports (megatron.core, mcore_bridge, transformer_engine,
ms-swift's Megatron modules, the plugin's Megatron trainer), then, when nothing blocks,
``tests/gpu/run_megatron_gkd.sh`` (its off-policy case by default: on 2 GPUs also at TP = 2, and at CP = 2 compared
with CP = 1). transformer-engine is not in the kit (too large to carry, built for one CUDA): where ms-swift or
mcore-bridge needs it whatever the flags, this part says where.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

from common import REPO, Results

PROBES = [
    ('megatron.core', 'import megatron.core'),
    ('mcore_bridge', 'import mcore_bridge'),
    ('transformer_engine', 'import transformer_engine'),
    ('megatron.core TE extensions', 'from megatron.core.extensions.transformer_engine import TELinear'),
    ('swift.megatron', 'import swift.megatron'),
    ('swift.megatron.trainers', 'import swift.megatron.trainers'),
    ('plugin megatron trainer', 'import swift_gkd_plugin.megatron.trainer'),
    ('megatron rlhf entry', 'from swift.megatron import megatron_rlhf_main'),
]


def te_hard_requirements():
    """Places in mcore-bridge's source (read, not imported) that need transformer-engine whatever the flags: an
    unconditional import, or models built with ``use_transformer_engine=True`` (no local-layer path to fall back
    on)."""
    import importlib.util
    spec = importlib.util.find_spec('mcore_bridge')
    if spec is None or not spec.submodule_search_locations:
        return []
    root = list(spec.submodule_search_locations)[0]
    hits = []
    for folder, _, files in os.walk(root):
        for name in sorted(files):
            if not name.endswith('.py'):
                continue
            path = os.path.join(folder, name)
            with open(path, encoding='utf-8', errors='replace') as f:
                for i, line in enumerate(f, 1):
                    text = line.strip()
                    if text == 'import transformer_engine' or 'use_transformer_engine=True' in text:
                        hits.append(f'{os.path.relpath(path, os.path.dirname(root))}:{i}: {text[:120]}')
    return hits


def run(args) -> Results:
    res = Results('f', 'Megatron-SWIFT on this image: what imports, what blocks, and the end-to-end script')
    # one interpreter for all probes (importing ms-swift costs seconds); each probe in its own try
    script = ('import json, traceback\n'
              'for name, code in json.loads(input()):\n'
              '    try:\n'
              '        exec(code, {})\n'
              '        print(json.dumps([name, True, "ok"]), flush=True)\n'
              '    except BaseException as e:\n'
              '        where = traceback.extract_tb(e.__traceback__)[-1]\n'
              '        msg = f"{type(e).__name__}: {e} (at {where.filename}:{where.lineno})"\n'
              '        print(json.dumps([name, False, msg[-300:]]), flush=True)\n')
    proc = subprocess.run([sys.executable, '-c', script], input=json.dumps(PROBES) + '\n', capture_output=True,
                          text=True, timeout=300)
    found = {}
    for line in proc.stdout.splitlines():
        if line.startswith('['):
            name, ok, msg = json.loads(line)
            found[name] = (ok, msg)
    blocked = None
    for name, _ in PROBES:
        ok, msg = found.get(name, (False, f'probe did not run: {proc.stderr.strip()[-200:]}'))
        res.add(kind='import', probe=name, ok=ok, result=msg)
        if not ok and blocked is None and name != 'transformer_engine':
            blocked = f'{name}: {msg}'
    if not found.get('transformer_engine', (False,))[0]:
        for where in te_hard_requirements():
            res.add(kind='source', probe='needs transformer_engine', ok=False, result=where)
    if blocked:
        res.status = 'skipped'
        res.note(f'blocked at {blocked}; run_megatron_gkd.sh not started')
    elif args.device != 'cuda':
        res.status = 'skipped'
        res.note('no CUDA: Megatron-SWIFT needs GPUs; run_megatron_gkd.sh not started')
    else:
        env = dict(os.environ, PYTHON=sys.executable, CASES=' '.join(args.cases or ['off_policy']),
                   CASE_TIMEOUT=str(int(args.run_timeout)), WORK=os.path.join(args.work, 'megatron'))
        proc = subprocess.run(['bash', os.path.join(REPO, 'tests', 'gpu', 'run_megatron_gkd.sh')], env=env,
                              capture_output=True, text=True, timeout=args.run_timeout + 120)
        out = (proc.stdout + proc.stderr).strip().splitlines()
        with open(os.path.join(args.work, 'f_megatron.log'), 'w') as f:
            f.write('\n'.join(out))
        res.add(kind='run_megatron_gkd.sh', probe=env['CASES'], ok=proc.returncode == 0 and not any(
            ln.startswith('SKIP') for ln in out), result=' / '.join(out[-4:])[-400:])
        if not res.rows[-1]['ok']:
            res.status = 'partial'
    return res
