#!/usr/bin/env python
"""Runs one part of the GPU checks (issue 18) and writes ``<part>.json`` and ``<part>.md`` into ``--out``.

    python tests/gpu/checks/run.py a|b|c|d|e|f|v|s|all [--out DIR] [--device cuda|cpu] [--tiny] ...

On the GPU machine ``bash tests/gpu/kit.sh run PART`` calls this after installing the kit. ``all`` runs the parts
in the order c, b, e, a, d, f, v, s, each in a subprocess, while ``--budget-s`` (default 540 s: inside the device's
10-minute command) lasts, skipping a part that has too little time left, and merges everything into ``all.json``
and ``all.md``. ``--tiny`` uses tiny models and shapes: how the CPU tests run these scripts.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import Results, markdown  # noqa: E402

PARTS = 'abcdefvs'
ORDER_ALL = 'cbeadfvs'  # cheapest and most informative first
# device seconds per part at real shapes, from the first H100 run (a 505 s, d 536 s, c+e+f 164 s with the models
# built; a and d stop starting runs at --part-budget-s); b: issue 56's trimmed plan, estimated from the 2026-11-26
# H200 run (182 s for 27 workers) plus the ncu pass: what `all` plans with (v: a guess, never run; s: five runs
# of ~50 s, part a's)
ESTIMATE_S = dict(a=530, b=170, c=90, d=540, e=75, f=25, v=240, s=300)
CUDA_ONLY = dict(c='memory statistics and prefetch overlap (the offloader is a no-op on CPU)',
                 f='Megatron-SWIFT needs GPUs (imports are still probed)', v='vLLM needs a GPU')


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('part', choices=list(PARTS) + ['all'])
    p.add_argument('--out', default=os.environ.get('GPUKIT_OUT') or os.environ.get('OUT') or 'gpukit_results')
    p.add_argument('--device', default=None, choices=['cuda', 'cpu'], help='default: cuda when available')
    p.add_argument('--tiny', action='store_true', help='tiny models and shapes (CPU tests of these scripts)')
    p.add_argument('--work', default=os.environ.get('GPUKIT_WORK'),
                   help='scratch folder (models, logs; reused: models are built once); default $GPUKIT_WORK, '
                        'else a fresh temporary one')
    p.add_argument('--steps', type=int, default=None, help='training steps per run (parts a, c, d, s)')
    p.add_argument('--run-timeout', type=float, default=480.0, help='seconds per swift run / server start')
    p.add_argument('--budget-s', type=float, default=540.0, help='all: total seconds')
    p.add_argument('--part-budget-s', type=float, default=530.0,
                   help='a, d: no new swift run once this many seconds of the part have passed (rows say so)')
    # narrowing a part (the CPU tests use these to stay cheap)
    p.add_argument('--modes', type=lambda s: s.split(','), default=None, help='a: off_policy,on_policy,seq_kd')
    p.add_argument('--impls', type=lambda s: s.split(','), default=None, help='a: builtin,fused,dense')
    p.add_argument('--cases', type=lambda s: s.split(','), default=None,
                   help='a: short,long (default), long32k, sp; d: case names; f: megatron cases; v: c2,c1')
    p.add_argument('--methods', type=lambda s: s.split(','), default=None,
                   help='b: floor,fused,fused2,liger,dense,... at every N (default: part_b.plan)')
    p.add_argument('--ns', type=lambda s: [int(x) for x in s.split(',')], default=None, help='b: token counts')
    p.add_argument('--chunks', type=lambda s: [int(x) for x in s.split(',')], default=None,
                   help='b: chunk sizes of the sweep')
    p.add_argument('--repeats', type=int, default=5, help='b: measured steps per worker (at most)')
    p.add_argument('--ncu-timeout', type=float, default=90.0,
                   help='b: seconds for the Nsight Compute pass of one chunk per kernel (0: skip it)')
    p.add_argument('--clients', type=lambda s: [int(x) for x in s.split(',')], default=None, help='e')
    p.add_argument('--seconds', type=float, default=None, help='e: seconds per load level')
    p.add_argument('--pretend-memory-mib', type=float, default=None,
                   help='e: size the oversized request against this much memory instead of the GPU\'s (CPU tests)')
    return p.parse_args(argv)


def run_part(args) -> Results:
    if args.device is None:
        import torch
        args.device = 'cuda' if torch.cuda.is_available() else 'cpu'
    args.work = args.work or tempfile.mkdtemp(prefix=f'gpukit_{args.part}_')
    module = importlib.import_module(f'part_{args.part}')
    try:
        res = module.run(args)
    except Exception as exc:  # a part that breaks still writes what it is and why
        import traceback
        traceback.print_exc()
        res = Results(args.part, module.__doc__.split('\n')[0])
        res.status = 'error'
        res.note(f'{type(exc).__name__}: {exc}'[:1000])
    if args.device == 'cpu' and args.part in CUDA_ONLY:
        res.note(f'needs CUDA for: {CUDA_ONLY[args.part]}')
    paths = res.write(args.out)
    print(f'part {args.part}: {res.status}; wrote {", ".join(paths)}', flush=True)
    return res


def run_all(args, argv):
    start, docs = time.perf_counter(), []
    scratch = tempfile.mkdtemp(prefix='gpukit_all_')
    work = args.work or tempfile.mkdtemp(prefix='gpukit_work_')
    rest = [a for a in argv if a != 'all']
    for part in ORDER_ALL:
        left = args.budget_s - (time.perf_counter() - start)
        need = 20 if args.tiny else ESTIMATE_S[part]
        if left < need:
            docs.append(dict(part=part, title='not run', status='skipped', seconds=0, env={}, rows=[],
                             notes=[f'not run: {left:.0f} s left of --budget-s, the part needs about {need} s']))
            continue
        cmd = [sys.executable, os.path.abspath(__file__), part, *rest, '--out', scratch, '--work', work]
        try:
            subprocess.run(cmd, timeout=left)
        except subprocess.TimeoutExpired:
            pass
        path = os.path.join(scratch, f'{part}.json')
        if os.path.exists(path):
            with open(path) as f:
                docs.append(json.load(f))
        else:
            docs.append(dict(part=part, title='no result', status='error', seconds=0, env={}, rows=[],
                             notes=['the part wrote no result (killed at the budget, or crashed)']))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, 'all.json'), 'w') as f:
        json.dump(dict(seconds=round(time.perf_counter() - start, 1), parts=docs), f, indent=1)
    with open(os.path.join(args.out, 'all.md'), 'w') as f:
        f.write('\n'.join(markdown(d) if d.get('env') else f"# Part {d['part']}: {d['status']}\n\n- "
                          + '\n- '.join(d['notes']) + '\n' for d in docs))
    print('all: ' + ', '.join(f"{d['part']} {d['status']}" for d in docs), flush=True)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.part == 'all':
        return run_all(args, argv)
    run_part(args)


if __name__ == '__main__':
    main()
