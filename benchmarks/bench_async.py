"""``--async_generate`` against synchronous on-policy GKD, whole ``swift rlhf`` runs against one ``swift rollout``
server (``--vllm_mode server``), same models, prompts and seed, alternating (sync async sync async ...).

    python benchmarks/bench_async.py                  # hidden 256 x 4 layers, 8 prompts x 64 tokens, 8 steps, 2 rounds
    python benchmarks/bench_async.py --help

The server and the trainer each get a core of their own where the machine has two or more (``taskset``; one thread
each, ``OMP_NUM_THREADS=1``), as a user at scale gives the rollout server devices of its own. Without a GPU the server
is vLLM's CPU build and the weight sync runs over the tests' gloo stand-in for ms-swift's NCCL communicator
(``tests/rollout_cpu_site``, put on both processes' ``PYTHONPATH``: test-only; a GPU machine runs NCCL and leaves it
out). ``tests/step_probe_plugin.py`` times each step's phases. Printed per mode, medians of steps 3 to the last over
the runs: the optimizer step's seconds (steps per second), the ``generate`` phase (sampling, the weight sync and the
encoding: for the synchronous run the trainer waits all of it; for the asynchronous one it holds the wait for the
prefetched batch, ``gkd/sample_wait_s``, and the next batch's submission) and its share of the step, the staleness.
The speed-up is paired: each round runs sync then async back to back, and each pair's ratio (the sync run's step
seconds over the async run's) is printed with the 1-minute load average before and after the pair
(``os.getloadavg``), then their median and range. (Medians of each mode taken apart paired a slow synchronous round
with a fast asynchronous one under a shifting load: 1.44x printed where the pairs gave 1.46, 0.90 and 0.95.) Sampling and training should take comparable time for the overlap to pay: ``--completion`` and
``--batch`` move the balance. ``--max_staleness K`` runs the asynchronous side with a queue of K steps
(``--gkd_max_staleness``). ``--served_teacher`` scores with ``swift-gkd serve-teacher`` (top-k 8, on the server's core)
instead of a local teacher: the asynchronous run's producer then asks it for each batch it prefetched, and the table
adds the trainer's seconds asking the teacher per step (``gkd/teacher_wait_s``; the synchronous run waits for the
teacher inside its generate phase). Run it on a quiet machine.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from bench_rollout import OFFLINE, PROBE, build  # noqa: E402

SITE = os.path.join(ROOT, 'tests', 'rollout_cpu_site')


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _pinned(core):
    return ['taskset', '-c', str(core)] if core is not None and shutil.which('taskset') else []


def _env(extra=None) -> dict:
    env = dict(os.environ, **OFFLINE, OMP_NUM_THREADS='1')
    import torch
    if not torch.cuda.is_available():  # the tests' gloo stand-in for NCCL (test-only)
        env['PYTHONPATH'] = SITE + os.pathsep + env.get('PYTHONPATH', '')
        env.setdefault('VLLM_CPU_KVCACHE_SPACE', '1')
    env.update(extra or {})
    return env


def start_server(model: str, port: int, core, log: str):
    """``swift rollout`` serving ``model`` on ``port``; returns the process once ``/health`` answers."""
    import importlib.util
    extra = {}
    if importlib.util.find_spec('torchvision') is None:  # ms-swift's vLLM plugin imports it
        from importlib.metadata import entry_points

        from swift_gkd_plugin.rollout.colocated_vllm import UEMBED_PLUGIN
        extra['VLLM_PLUGINS'] = ','.join(sorted({e.name for e in entry_points(group='vllm.general_plugins')}
                                                - {UEMBED_PLUGIN}))
    cmd = _pinned(core) + [os.path.join(os.path.dirname(sys.executable), 'swift'), 'rollout', '--model', model,
                           '--model_type', 'qwen3', '--template', 'qwen3_nothinking', '--host', '127.0.0.1',
                           '--port', str(port), '--vllm_enforce_eager', 'true', '--vllm_max_model_len', '512']
    return _started(cmd, f'http://127.0.0.1:{port}/health', log, 'swift rollout', extra)


def start_teacher(model: str, port: int, core, log: str):
    """``swift-gkd serve-teacher`` (top-k 8) on ``model``; returns the process once ``/health/`` answers."""
    cmd = _pinned(core) + [os.path.join(os.path.dirname(sys.executable), 'swift-gkd'), 'serve-teacher', '--model',
                           model, '--model_type', 'qwen3', '--template', 'qwen3_nothinking', '--port', str(port),
                           '--top_k', '8', '--torch_dtype', 'float32', '--device', 'cpu']
    return _started(cmd, f'http://127.0.0.1:{port}/health/', log, 'swift-gkd serve-teacher')


def _started(cmd, url: str, log: str, name: str, extra=None):
    import requests
    with open(log, 'w') as out:
        proc = subprocess.Popen(cmd, env=_env(extra), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 900
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f'{name} exited ({proc.returncode}):\n{open(log).read()[-4000:]}')
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return proc
        except requests.RequestException:
            pass
        time.sleep(1)
    os.killpg(proc.pid, signal.SIGKILL)
    sys.exit(f'{name} did not start within 900 s')


def run(ws: dict, asynchronous: bool, out: str, port: int, args, teacher_url=None) -> dict:
    """One ``swift rlhf`` run against the server; its steps' probe records and logged rows."""
    log = out + '.steps.jsonl'
    if os.path.exists(log):
        os.remove(log)
    shutil.rmtree(out, ignore_errors=True)
    flags = {'rlhf_type': 'gkd', 'model': ws['student'], 'model_type': 'qwen3', 'teacher_model': ws['teacher'],
             'teacher_model_type': 'qwen3', 'template': 'qwen3_nothinking', 'dataset': ws['train'],
             'tuner_type': 'full', 'torch_dtype': 'float32', 'check_model': 'false', 'lmbda': '1',
             'max_completion_length': str(args.completion), 'max_steps': str(args.steps),
             'per_device_train_batch_size': str(args.batch), 'gradient_accumulation_steps': '1',
             'max_length': '512', 'logging_steps': '1', 'save_strategy': 'no', 'report_to': 'none',
             'dataloader_num_workers': '0', 'dataset_num_proc': '1', 'output_dir': out, 'add_version': 'false',
             'seed': '0', 'learning_rate': '1e-4', 'use_vllm': 'true', 'vllm_mode': 'server',
             'vllm_server_host': '127.0.0.1', 'vllm_server_port': str(port),
             'vllm_server_group_port': str(_free_port()), 'async_generate': str(asynchronous).lower()}
    if asynchronous and args.max_staleness != 1:
        flags['gkd_max_staleness'] = str(args.max_staleness)
    if teacher_url:
        del flags['teacher_model'], flags['teacher_model_type']
        flags.update(teacher_model_server=teacher_url, gkd_logits_topk='8')
    argv = [a for k, v in flags.items() for a in (f'--{k}', v)] + ['--external_plugins', PROBE]
    cmd = _pinned(args.trainer_core) + [os.path.join(os.path.dirname(sys.executable), 'swift'), 'rlhf', *argv]
    proc = subprocess.run(cmd, env=_env({'GKD_TEST_PROBE_LOG': log}), capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f'run failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-4000:]}')
    with open(log) as f:
        steps = [json.loads(line) for line in f]
    with open(os.path.join(out, 'logging.jsonl')) as f:
        rows = [row for row in map(json.loads, f) if 'loss' in row]
    kept = [s for s in steps if s['step'] > 2]  # steps 1-2 warm the server and the trainer up
    step_s = [sum(p.get('seconds', 0.0) for p in s['phases'].values()) for s in kept]
    generate = [s['phases']['generate']['seconds'] for s in kept]
    wait = [r['gkd/sample_wait_s'] for r in rows[2:] if 'gkd/sample_wait_s' in r]
    teacher = [r['gkd/teacher_wait_s'] for r in rows[2:] if 'gkd/teacher_wait_s' in r]
    return {'step_s': statistics.median(step_s), 'generate_s': statistics.median(generate),
            'wait_s': statistics.median(wait) if wait else statistics.median(generate),
            'teacher_s': statistics.median(teacher) if teacher else float('nan'),
            'staleness': statistics.mean(r.get('gkd/staleness', 0) for r in rows[2:]),
            'tokens': statistics.mean(r['gkd/completion_length'] for r in rows) * args.batch}


def paired_report(sync_step_s, async_step_s, loads) -> dict:
    """The paired speed-up of back-to-back rounds: ``sync_step_s[i] / async_step_s[i]`` per pair, their median and
    range (min, max), and each pair's 1-minute load average before and after it (``loads[i]``: a pair)."""
    ratios = [s / a for s, a in zip(sync_step_s, async_step_s)]
    return {'pair_ratios': ratios, 'median_ratio': statistics.median(ratios),
            'ratio_range': (min(ratios), max(ratios)), 'pair_loads': [tuple(pair) for pair in loads],
            'load_range': (min(min(pair) for pair in loads), max(max(pair) for pair in loads))}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--workdir', default='bench_async_ws')
    parser.add_argument('--hidden', type=int, default=256, help='student hidden size (a multiple of 64)')
    parser.add_argument('--layers', type=int, default=4)
    parser.add_argument('--batch', type=int, default=8, help='prompts per step (one completion each)')
    parser.add_argument('--completion', type=int, default=64, help='--max_completion_length')
    parser.add_argument('--steps', type=int, default=8)
    parser.add_argument('--rounds', type=int, default=2, help='sync/async rounds')
    parser.add_argument('--server_core', type=int, default=1, help='the server\'s core (taskset); -1: not pinned')
    parser.add_argument('--trainer_core', type=int, default=0, help='the trainer\'s core (taskset); -1: not pinned')
    parser.add_argument('--max_staleness', type=int, default=1, help='--gkd_max_staleness of the async runs')
    parser.add_argument('--served_teacher', action='store_true',
                        help='a swift-gkd serve-teacher teacher (top-k 8, on the server\'s core), not a local one')
    args = parser.parse_args(argv)
    if args.hidden % 64 or args.steps < 4:
        parser.error('--hidden must be a multiple of 64 and --steps >= 4')
    cores = os.cpu_count() or 1
    for name in ('server_core', 'trainer_core'):
        if getattr(args, name) < 0 or cores < 2:
            setattr(args, name, None)
    os.makedirs(args.workdir, exist_ok=True)
    ws = build(args.workdir, args.hidden, args.layers)
    port = _free_port()
    server = start_server(ws['student'], port, args.server_core, os.path.join(args.workdir, 'server.log'))
    teacher, teacher_url = None, None
    try:
        if args.served_teacher:
            teacher_port = _free_port()
            teacher = start_teacher(ws['teacher'], teacher_port, args.server_core,
                                    os.path.join(args.workdir, 'teacher.log'))
            teacher_url = f'http://127.0.0.1:{teacher_port}'
        results, loads = {'sync': [], 'async': []}, []
        for r in range(args.rounds):  # a pair: sync then async, back to back, the load before and after
            before = os.getloadavg()[0]
            for name in results:
                results[name].append(run(ws, name == 'async', os.path.join(args.workdir, f'{name}_{r}'), port, args,
                                         teacher_url))
            loads.append((before, os.getloadavg()[0]))
    finally:
        for proc in (server, teacher):
            if proc is not None:
                os.killpg(proc.pid, signal.SIGKILL)
    import torch
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f'CPU ({cores} cores)'
    pinned = f'server on core {args.server_core}, trainer on core {args.trainer_core}' \
        if args.server_core is not None else 'not pinned'
    print(f'on-policy GKD against a swift rollout server, {device}, {pinned}, student hidden {args.hidden} x '
          f'{args.layers} layers, {args.batch} prompts x {args.completion} tokens, steps 3-{args.steps} of '
          f'{args.rounds} runs each; teacher: {"served (swift-gkd serve-teacher, top-k 8)" if teacher_url else "local"}'
          f'{f"; async --gkd_max_staleness {args.max_staleness}" if args.max_staleness != 1 else ""}')
    print('| mode | step s | steps/s | sampled tokens/step | generate phase s | trainer waits s (share of step) | '
          'staleness | trainer asks the teacher s |')
    print('| --- | --- | --- | --- | --- | --- | --- | --- |')
    med = {}
    for name, rows in results.items():
        med[name] = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
        m = med[name]
        teacher_s = '-' if math.isnan(m['teacher_s']) else f'{m["teacher_s"]:.4f}'
        print(f'| {name} | {m["step_s"]:.3f} | {1 / m["step_s"]:.2f} | {m["tokens"]:.0f} | {m["generate_s"]:.3f} | '
              f'{m["wait_s"]:.3f} ({m["wait_s"] / m["step_s"]:.0%}) | {m["staleness"]:.2f} | {teacher_s} |')
    report = paired_report([r['step_s'] for r in results['sync']], [r['step_s'] for r in results['async']], loads)
    print('| pair | sync step s | async step s | async / sync steps per second | load before -> after |')
    print('| --- | --- | --- | --- | --- |')
    for i, (ratio, (before, after)) in enumerate(zip(report['pair_ratios'], report['pair_loads'])):
        print(f'| {i} | {results["sync"][i]["step_s"]:.3f} | {results["async"][i]["step_s"]:.3f} | {ratio:.2f}x | '
              f'{before:.1f} -> {after:.1f} |')
    low, high = report['ratio_range']
    print(f'async / sync: {report["median_ratio"]:.2f}x the steps per second, the median of '
          f'{len(report["pair_ratios"])} back-to-back pairs (range {low:.2f}-{high:.2f}x; load '
          f'{report["load_range"][0]:.1f}-{report["load_range"][1]:.1f}; {device})')
    return report


if __name__ == '__main__':
    main()
