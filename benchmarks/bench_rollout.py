"""On-policy sampling with vLLM colocate against transformers generation, and vLLM with every request seeded against
unseeded requests, same models, same run (CPU or GPU).

    python benchmarks/bench_rollout.py                 # hidden 256, 4 layers, 8 prompts x 64 tokens, 6 steps, 2 rounds
    python benchmarks/bench_rollout.py --samplers vllm,vllm_seeded --batch 64
    python benchmarks/bench_rollout.py --help

Every sampler runs ``NPROC_PER_NODE=1 swift rlhf --rlhf_type gkd --lmbda 1`` on the same student (heads of 32, what
vLLM's CPU attention accepts), teacher, prompts and seed, alternating (A B C A B C ...), with
``tests/step_probe_plugin.py`` timing each step's phases: ``generate`` is the generation batch (the weight sync to
vLLM included), ``step`` the whole optimizer step. ``vllm`` is what the plugin does with one rank per engine (no
request seeded; the draws come from the process's generator, seeded per step and rank); ``vllm_seeded`` seeds every
request, as the plugin did before (``benchmarks/seeded_requests_plugin.py``; vLLM then samples each seeded request on
its own and, on a GPU, leaves its FlashInfer top-k/top-p sampler). The first step of each run is left out (vLLM's
first batch, the transformers engine's first ``generate``). Printed: per sampler the mean sampled tokens per step, the
median generate and step seconds and sampled tokens per second of generation (medians over steps, then over runs),
and the ratios. Run it on a quiet machine: other processes on the cores move these figures. On a CPU machine these
are vLLM's CPU build's figures against transformers on the CPU: they say nothing of a GPU.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import socket
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PROBE = os.path.join(ROOT, 'tests', 'step_probe_plugin.py')
OFFLINE = {'HF_HUB_OFFLINE': '1', 'HF_DATASETS_OFFLINE': '1', 'TRANSFORMERS_OFFLINE': '1', 'MODELSCOPE_OFFLINE': '1',
           'USE_HF': '1', 'TOKENIZERS_PARALLELISM': 'false'}
SEEDED = os.path.join(HERE, 'seeded_requests_plugin.py')
VLLM = {'use_vllm': 'true', 'vllm_mode': 'colocate', 'vllm_enforce_eager': 'true', 'vllm_max_model_len': '512'}
SAMPLERS = {'transformers': {'use_vllm': 'false'},
            'vllm': VLLM,  # one rank per engine: unseeded requests, the draws seeded per (seed, step, rank)
            'vllm_seeded': VLLM}  # every request seeded (the plugin before issue 47): vLLM's per-request loop
PLUGINS = {'vllm_seeded': [SEEDED]}


def build(workdir: str, hidden: int, layers: int) -> dict:
    """Tokenizer, student (``hidden``, heads of 32), a wider teacher and 256 prompts, once per ``workdir``."""
    from swift_gkd_plugin.demo import tiny
    ws = {'student': os.path.join(workdir, f'student_h{hidden}_l{layers}'),
          'teacher': os.path.join(workdir, f'teacher_h{hidden}_l{layers}'),
          'train': os.path.join(workdir, 'train.jsonl')}
    if not os.path.exists(os.path.join(ws['teacher'], 'config.json')):
        tok = tiny.build_tokenizer(os.path.join(workdir, 'tok'))
        tiny.build_model(ws['student'], tok, seed=0, hidden_size=hidden, num_layers=layers, num_heads=hidden // 32,
                         num_kv_heads=max(hidden // 64, 1), intermediate_size=2 * hidden)
        tiny.build_model(ws['teacher'], tok, seed=1, hidden_size=hidden + 64, num_layers=layers,
                         num_heads=(hidden + 64) // 32, num_kv_heads=1, intermediate_size=2 * hidden)
        tiny.write_dataset(ws['train'], tiny.make_rows(256, seed=0, split='train'))
    return ws


def run(ws: dict, sampler: str, out: str, args) -> list:
    """One ``swift rlhf`` run; its steps' probe records."""
    log = out + '.steps.jsonl'
    for path in (log,):
        if os.path.exists(path):
            os.remove(path)
    flags = {'rlhf_type': 'gkd', 'model': ws['student'], 'model_type': 'qwen3', 'teacher_model': ws['teacher'],
             'teacher_model_type': 'qwen3', 'template': 'qwen3_nothinking', 'dataset': ws['train'],
             'tuner_type': 'full', 'torch_dtype': args.dtype, 'check_model': 'false', 'lmbda': '1',
             'max_completion_length': str(args.completion), 'max_steps': str(args.steps),
             'per_device_train_batch_size': str(args.batch), 'gradient_accumulation_steps': '1',
             'max_length': '512', 'logging_steps': '1', 'save_strategy': 'no', 'report_to': 'none',
             'dataloader_num_workers': '0', 'dataset_num_proc': '1', 'output_dir': out, 'add_version': 'false',
             'seed': '0', 'learning_rate': '1e-4', **SAMPLERS[sampler]}
    argv = [a for k, v in flags.items() for a in (f'--{k}', v)] + ['--external_plugins', PROBE,
                                                                    *PLUGINS.get(sampler, [])]
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    env = dict(os.environ, **OFFLINE, NPROC_PER_NODE='1', MASTER_PORT=str(port), GKD_TEST_PROBE_LOG=log)
    start = time.perf_counter()
    proc = subprocess.run([os.path.join(os.path.dirname(sys.executable), 'swift'), 'rlhf', *argv], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f'{sampler} run failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-4000:]}')
    with open(log) as f:
        steps = [json.loads(line) for line in f]
    for s in steps:
        s['wall'] = time.perf_counter() - start
    return steps


def summary(steps: list) -> dict:
    kept = [s for s in steps if s['step'] > 1]  # the first step warms each sampler up
    generate = [s['phases']['generate']['seconds'] for s in kept]
    step = [sum(p.get('seconds', 0.0) for p in s['phases'].values()) for s in kept]
    tokens = [s['response_tokens'] for s in kept]
    return {'generate_s': statistics.median(generate), 'step_s': statistics.median(step),
            'tokens_per_s': statistics.median(t / g for t, g in zip(tokens, generate)),
            'tokens': statistics.mean(tokens), 'run_s': steps[-1]['wall']}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--workdir', default='bench_rollout_ws')
    parser.add_argument('--hidden', type=int, default=256, help='student hidden size (a multiple of 64)')
    parser.add_argument('--layers', type=int, default=4)
    parser.add_argument('--batch', type=int, default=8, help='prompts per step (one completion each)')
    parser.add_argument('--completion', type=int, default=64, help='--max_completion_length')
    parser.add_argument('--steps', type=int, default=6)
    parser.add_argument('--rounds', type=int, default=2, help='A B rounds (each sampler runs this many times)')
    parser.add_argument('--dtype', default='float32')
    parser.add_argument('--samplers', default=','.join(SAMPLERS), help=f'a subset of {",".join(SAMPLERS)}')
    args = parser.parse_args(argv)
    names = args.samplers.split(',')
    if not names or any(n not in SAMPLERS for n in names):
        parser.error(f'--samplers {args.samplers!r}: a comma-separated subset of {",".join(SAMPLERS)}')
    if args.hidden % 64 or args.steps < 2:
        parser.error('--hidden must be a multiple of 64 and --steps >= 2')
    os.makedirs(args.workdir, exist_ok=True)
    ws = build(args.workdir, args.hidden, args.layers)
    results = {name: [] for name in names}
    for r in range(args.rounds):
        for name in names:
            results[name].append(summary(run(ws, name, os.path.join(args.workdir, f'{name}_{r}'), args)))
    import torch
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f'CPU ({os.cpu_count()} cores)'
    print(f'on-policy sampling, {device}, student hidden {args.hidden} x {args.layers} layers, {args.batch} prompts '
          f'x {args.completion} tokens, steps 2-{args.steps} of {args.rounds} runs each')
    print('| sampler | sampled tokens/step | generate s/step | step s/step | sampled tokens/s | whole run s |')
    print('| --- | --- | --- | --- | --- | --- |')
    med = {}
    for name, rows in results.items():
        med[name] = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
        m = med[name]
        print(f'| {name} | {m["tokens"]:.0f} | {m["generate_s"]:.3f} | {m["step_s"]:.3f} | {m["tokens_per_s"]:.0f} | {m["run_s"]:.1f} |')
    if 'transformers' in med and 'vllm' in med:
        t, v = med['transformers'], med['vllm']
        print(f'rollout: transformers / vLLM colocate: generate {t["generate_s"] / v["generate_s"]:.2f}x, step '
              f'{t["step_s"] / v["step_s"]:.2f}x, tokens/s {v["tokens_per_s"] / t["tokens_per_s"]:.2f}x for vLLM '
              f'({device})')
    if 'vllm_seeded' in med and 'vllm' in med:
        s_, v = med['vllm_seeded'], med['vllm']
        print(f'vLLM seeds: per-request seeded / unseeded: generate {s_["generate_s"] / v["generate_s"]:.2f}x, '
              f'tokens/s {v["tokens_per_s"] / s_["tokens_per_s"]:.2f}x for unseeded ({device})')


if __name__ == '__main__':
    main()
