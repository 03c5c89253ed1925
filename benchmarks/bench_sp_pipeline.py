#!/usr/bin/env python
"""Sequence parallelism through the whole ``swift rlhf`` pipeline: what each rank holds, against the row length.

Usage::

    python benchmarks/bench_sp_pipeline.py                          # rows of 2k, 4k, 8k, 16k tokens; SP 1 and 2
    python benchmarks/bench_sp_pipeline.py --tokens 1024,2048 --sp 1,2 --cap-mib 1024

For each row length L and group size SP, one real ``swift rlhf --rlhf_type gkd`` run (``NPROC_PER_NODE=SP``,
``--sequence_parallel_size SP``, gloo on CPU) trains ``--steps`` steps on dataset rows of L tokens (``--lmbda 0``,
``--per_device_train_batch_size 1``, ms-swift's default gradient checkpointing) of a student and a teacher built here
offline, sized so that activations, not weights, dominate at long rows (``--layers``, ``--hidden``). Every rank
records, through ``benchmarks/rank_memory_plugin.py``, its peak resident memory during training (``VmHWM`` minus the
resident size before the first step) and the token positions of its decoder layers' forwards (``B x S``).

Printed: one row per (L, SP) with the tokens a rank's forward holds and its peak memory; then, from those rows only,
SP=k against SP=1 at each L (memory per rank) and the longest row whose peak per rank stays within ``--cap-mib``
(derived from the measured peaks: no run is killed at the cap). On CPU the run's time says nothing of a GPU's.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.dirname(os.path.abspath(__file__))]

from bench_loss import _loadavg, _machine  # noqa: E402

PLUGIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'rank_memory_plugin.py')
PROMPT_TOKENS = 16  # the chat template's and the prompt's tokens, about


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ints = lambda s: [int(x) for x in s.split(',')]  # noqa: E731
    p.add_argument('--tokens', type=ints, default=[2048, 4096, 8192, 16384], help='row lengths')
    p.add_argument('--sp', type=ints, default=[1, 2], help='sequence-parallel sizes (processes per run)')
    p.add_argument('--layers', type=int, default=8)
    p.add_argument('--hidden', type=int, default=256)
    p.add_argument('--steps', type=int, default=2)
    p.add_argument('--cap-mib', type=float, default=1024.0, help='the per-process memory cap of the last line')
    p.add_argument('--workdir', default=None, help='keep the models and runs there (default: a temporary folder)')
    p.add_argument('--json-out', default=None, help='also write the results there')
    return p.parse_args(argv)


def build_models(root: str, args) -> dict:
    """A student and a teacher of ``--layers`` x ``--hidden`` (4 heads, 2 key-value heads: SP 1, 2 divide them),
    positions up to 64k."""
    from swift_gkd_plugin.demo import tiny
    tok = tiny.build_tokenizer(os.path.join(root, 'tok'))
    dirs = {}
    for name, seed in (('student', 0), ('teacher', 1)):
        path = os.path.join(root, name)
        tiny.build_model(path, tok, seed=seed, hidden_size=args.hidden, num_layers=args.layers, num_heads=4,
                         num_kv_heads=2, intermediate_size=3 * args.hidden)
        config = os.path.join(path, 'config.json')
        with open(config) as f:
            cfg = json.load(f)
        cfg['max_position_embeddings'] = 65536
        with open(config, 'w') as f:
            json.dump(cfg, f, indent=1)
        dirs[name] = path
    dirs['params'] = tiny.count_parameters(dirs['student'])
    return dirs


def write_rows(path: str, tokens: int, rows: int) -> str:
    """``rows`` rows of about ``tokens`` tokens: a short prompt and a response of one letter token per position."""
    from swift_gkd_plugin.demo.tiny import SYMBOLS
    with open(path, 'w') as f:
        for r in range(rows):
            answer = ' '.join(SYMBOLS[(r + 3 * i + i // 7) % len(SYMBOLS)] for i in range(tokens - PROMPT_TOKENS))
            f.write(json.dumps({'messages': [{'role': 'user', 'content': 'Reverse: a b c d'},
                                             {'role': 'assistant', 'content': answer}]}) + '\n')
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def run_case(models: dict, tokens: int, sp: int, args, root: str) -> dict:
    """One ``swift rlhf`` run at (L, SP): the ranks' records merged (the largest peak and forward of a rank)."""
    case = os.path.join(root, f'L{tokens}_sp{sp}')
    shutil.rmtree(case, ignore_errors=True)
    os.makedirs(case)
    log = os.path.join(case, 'memory.jsonl')
    dataset = write_rows(os.path.join(case, 'rows.jsonl'), tokens, args.steps)
    argv = ['swift', 'rlhf', '--rlhf_type', 'gkd', '--model', models['student'], '--model_type', 'qwen3',
            '--teacher_model', models['teacher'], '--teacher_model_type', 'qwen3', '--template', 'qwen3_nothinking',
            '--dataset', dataset, '--tuner_type', 'full', '--torch_dtype', 'float32', '--check_model', 'false',
            '--lmbda', '0', '--max_length', str(tokens + 64), '--max_steps', str(args.steps),
            '--per_device_train_batch_size', '1', '--gradient_accumulation_steps', '1', '--learning_rate', '1e-4',
            '--logging_steps', '1', '--save_strategy', 'no', '--report_to', 'none', '--dataloader_num_workers', '0',
            '--dataset_num_proc', '1', '--add_version', 'false',
            '--output_dir', os.path.join(case, 'out'), '--external_plugins', PLUGIN]
    env = dict(os.environ, GKD_BENCH_MEMORY_LOG=log, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // sp)))
    if sp > 1:
        argv += ['--sequence_parallel_size', str(sp), '--use_cpu', 'true', '--ddp_backend', 'gloo']
        env.update(NPROC_PER_NODE=str(sp), MASTER_PORT=str(_free_port()))
    start = time.perf_counter()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    result = dict(tokens=tokens, sp=sp, time_s=round(seconds, 1))
    if proc.returncode != 0 or not os.path.exists(log):
        killed = proc.returncode in (-9, 137) or 'SIGKILL' in proc.stderr
        return dict(result, status='oom' if killed else 'error', error=(proc.stdout + proc.stderr)[-400:])
    ranks = [json.loads(line) for line in open(log)]
    rows = [json.loads(line) for line in open(os.path.join(case, 'out', 'logging.jsonl'))]
    losses = [row['loss'] for row in rows if 'loss' in row]
    return dict(result, status='ok', ranks=len(ranks), tokens_per_forward=max(r['tokens'] for r in ranks),
                peak_mib=max(r['peak_mib'] for r in ranks), loss=losses[0] if losses else None)


def fmt(r) -> str:
    head = f"{r['tokens']:>6} {r['sp']:>3}"
    if r['status'] != 'ok':
        return f"{head}  {r['status'].upper():>9}  {r.get('error', '')[-120:]!r}"
    return (f"{head}  {r['tokens_per_forward']:>9}  {r['peak_mib']:>13.1f}  {r['time_s']:>7.1f}  "
            f"{r['loss']:>10.6f}")


def summary_lines(results, cap_mib: float):
    """From the measured rows only: SP=k against SP=1 at each L, and the longest row within the cap per SP."""
    by = {(r['tokens'], r['sp']): r for r in results if r['status'] == 'ok'}
    lines = []
    for (n, sp), r in sorted(by.items()):
        one = by.get((n, 1))
        if sp > 1 and one:
            lines.append(f"# L={n}: SP={sp}/SP=1 tokens per forward {r['tokens_per_forward'] / one['tokens_per_forward']:.2f}x, "
                         f"memory per rank {r['peak_mib'] / one['peak_mib']:.2f}x, "
                         f"first loss difference {abs(r['loss'] - one['loss']):.1e}")
    for sp in sorted({sp for _, sp in by}):
        fits = [n for (n, s), r in by.items() if s == sp and r['peak_mib'] <= cap_mib]
        longest = max(fits) if fits else None
        lines.append(f'# SP={sp}: the longest row measured within {cap_mib:.0f} MiB per rank: '
                     + (f'{longest} tokens' if longest else 'none'))
    return lines


def main(argv=None):
    args = parse_args(argv)
    root = args.workdir or tempfile.mkdtemp(prefix='bench_sp_pipeline_')
    os.makedirs(root, exist_ok=True)
    models = build_models(os.path.join(root, 'models'), args)
    print(f"# swift rlhf --rlhf_type gkd, dataset rows (--lmbda 0), batch 1, {args.steps} steps; student and teacher "
          f"{args.layers} layers x hidden {args.hidden} ({models['params']:,} parameters each), float32, "
          'gradient checkpointing (ms-swift default)', flush=True)
    print(f'# {_machine()}', flush=True)
    print('# memory: peak RSS during training (VmHWM) - RSS before the first step, the largest rank; tokens: the most '
          'token positions one decoder-layer forward of a rank ran on', flush=True)
    print(f"{'L':>6} {'SP':>3}  {'tokens/fw':>9}  {'peak_MiB/rank':>13}  {'time_s':>7}  {'first_loss':>10}",
          flush=True)
    results, start = [], time.perf_counter()
    for n in args.tokens:
        for sp in args.sp:
            r = run_case(models, n, sp, args, root)
            results.append(r)
            print(fmt(r), flush=True)
    print(f'# total {time.perf_counter() - start:.0f} s; load average at the end {_loadavg()}', flush=True)
    for line in summary_lines(results, args.cap_mib):
        print(line, flush=True)
    if args.json_out:
        with open(args.json_out, 'w') as f:
            json.dump(results, f, indent=1)
    if not args.workdir:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == '__main__':
    main()
