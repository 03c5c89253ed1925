#!/usr/bin/env python
"""A teacher served by ``vllm serve`` against this plugin's ``swift-gkd serve-teacher``: what the trainer's requests
cost on each (tokens/s, bytes per response token), for the top-k divergence and for the sampled-token term.

Usage::

    python benchmarks/bench_vllm_teacher.py                  # about 3 minutes on 2 CPU cores, needs vLLM
    python benchmarks/bench_vllm_teacher.py --clients 1,8 --seconds 8 --top_k 16

One tiny teacher (heads of 32, which vLLM's CPU attention takes; random weights: the cost does not depend on them),
served twice on loopback: by vLLM's OpenAI-compatible server (``POST /v1/completions``, the trainer's token ids as
the prompt, ``prompt_logprobs``) and by ``swift-gkd serve-teacher`` (``POST /v1/topk``, msgpack). Each method sends
requests of ``--seqs-per-request`` chat sequences of the tiny task, as the trainer does per generation batch, through
``TeacherClient``: top-k (``--top_k``; the plugin's server adds the tail), and the sampled-token term's signal (each
response token's log-prob: vLLM ``prompt_logprobs=0``, the plugin's server k=1 + targets). Ratios are against the
plugin's top-k in the same run. On a GPU vLLM's batching and kernels change the picture; this has not run there.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench_teacher_server import OFFLINE_ENV, _free_port, make_pairs, server_throughput  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--workdir', default=os.path.join(os.environ.get('TMPDIR', '/tmp'), 'swift_gkd_bench_vllm'))
    p.add_argument('--clients', type=lambda s: [int(x) for x in s.split(',')], default=[1, 8])
    p.add_argument('--seconds', type=float, default=6.0, help='duration of each throughput measurement')
    p.add_argument('--seqs-per-request', type=int, default=8)
    p.add_argument('--top_k', type=int, default=16, help='k of the top-k methods (vLLM: at most its --max-logprobs)')
    return p.parse_args(argv)


def _wait(client, proc, what, timeout=600):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f'{what} exited ({proc.returncode})')
        try:
            client.health()
            return
        except Exception:
            time.sleep(1)
    raise RuntimeError(f'{what} not ready after {timeout}s')


def start_servers(teacher: str, args):
    """``(vllm_proc, vllm_url, plugin_proc, plugin_url)``, both healthy."""
    from swift_gkd_plugin.server import TeacherClient
    env = dict(os.environ, **OFFLINE_ENV, VLLM_CPU_KVCACHE_SPACE='1')
    if importlib.util.find_spec('torchvision') is None:
        env['VLLM_PLUGINS'] = ''  # ms-swift's swift_uembed vLLM plugin imports torchvision
    vport, pport = _free_port(), _free_port()
    vllm = subprocess.Popen([sys.executable, '-m', 'vllm.entrypoints.openai.api_server', '--model', teacher, '--port',
                             str(vport), '--host', '127.0.0.1', '--enforce-eager', '--dtype', 'float32',
                             '--max-model-len', '512', '--max-logprobs', str(args.top_k)],
                            stdout=open(os.path.join(args.workdir, 'vllm.log'), 'wb'), stderr=subprocess.STDOUT,
                            env=env)
    plugin = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), 'swift-gkd'), 'serve-teacher', '--model',
                               teacher, '--model_type', 'qwen3', '--template', 'qwen3_nothinking', '--port',
                               str(pport), '--top_k', str(args.top_k), '--torch_dtype', 'float32', '--device', 'cpu',
                               '--log_level', 'warning'],
                              stdout=open(os.path.join(args.workdir, 'plugin.log'), 'wb'), stderr=subprocess.STDOUT,
                              env=dict(os.environ, **OFFLINE_ENV))
    vurl, purl = f'http://127.0.0.1:{vport}', f'http://127.0.0.1:{pport}'
    quiet = dict(retries=0, log=lambda message: None)  # polled here: no retry log
    _wait(TeacherClient(vurl, **quiet), vllm, 'vllm serve')
    _wait(TeacherClient(purl, **quiet), plugin, 'swift-gkd serve-teacher')
    return vllm, vurl, plugin, purl


def main(argv=None):
    args = parse_args(argv)
    if importlib.util.find_spec('vllm') is None:
        print('bench_vllm_teacher: vLLM is not installed (the README\'s test command installs vllm-cpu)')
        return 2
    os.environ.update(OFFLINE_ENV)
    os.makedirs(args.workdir, exist_ok=True)
    from swift_gkd_plugin.server import TeacherClient
    from swift_gkd_plugin.demo import tiny
    teacher = os.path.join(args.workdir, 'teacher')
    tok = tiny.build_tokenizer(os.path.join(args.workdir, 'tok'))
    if not os.path.exists(os.path.join(teacher, 'config.json')):
        tiny.build_model(teacher, tok, seed=1, hidden_size=96, num_heads=3, num_kv_heads=1, intermediate_size=192)
    tokenizer = tiny.load_tokenizer(teacher)
    pairs = make_pairs(tokenizer, tiny.make_rows(64, seed=0, split='test'))
    spr, k = args.seqs_per_request, args.top_k
    # the trainer's form: each sequence's ids and the positions before its response tokens
    batches = []
    for i in range(0, len(pairs) - spr + 1, spr):
        chunk = pairs[i:i + spr]
        batches.append((chunk, [(p + r, list(range(len(p) - 1, len(p) + len(r) - 1))) for p, r in chunk]))
    print(f'[bench] {len(pairs)} sequences of {sum(len(p) + len(r) for p, r in pairs) / len(pairs):.1f} tokens, '
          f'{spr} per request; starting vllm serve and swift-gkd serve-teacher ...', flush=True)
    vllm, vurl, plugin, purl = start_servers(teacher, args)
    try:
        model = TeacherClient(vurl).openai_model()['id']

        def method(url, kind, topk, targets):
            def make():
                client = TeacherClient(url, timeout=300, retries=0)
                if kind == 'completions':
                    call = lambda b: client.prompt_logprobs_at(b[1], topk=topk, with_targets=targets,  # noqa: E731
                                                               model=model)
                else:
                    call = lambda b: client.topk_at(b[1], topk=topk, with_tail=not targets,  # noqa: E731
                                                    with_targets=targets)
                call.client = client
                return call
            return make

        methods = [(f'swift-gkd serve-teacher /v1/topk k={k} + tail', method(purl, 'topk', k, False)),
                   (f'vllm serve /v1/completions prompt_logprobs={k}', method(vurl, 'completions', k, False)),
                   ('swift-gkd serve-teacher /v1/topk k=1 + targets', method(purl, 'topk', 1, True)),
                   ('vllm serve /v1/completions prompt_logprobs=0', method(vurl, 'completions', 0, True))]
        rows = []
        n_resp = sum(len(r) for _, r in batches[0][0])
        for name, make in methods:
            call = make()
            call(batches[0])  # warm-up, and the bytes of one answer
            per_token = call.client.last_response_bytes / n_resp
            for c in args.clients:
                print(f'[bench] {name}: {c} client(s) ({args.seconds:g}s) ...', flush=True)
                r = server_throughput(make, batches, c, args.seconds)
                rows.append(dict(r, method=name, bytes_per_token=per_token))
    finally:
        for proc in (vllm, plugin):
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    base = {r['clients']: r['tokens_per_s'] for r in rows if r['method'] == methods[0][0]}
    base_bytes = rows[0]['bytes_per_token']
    print('')
    print(f'== teacher cost per generation batch ({spr} sequences per request; client and servers share '
          f'{os.cpu_count()} cores; vLLM CPU build)')
    print(f'{"method":<50} {"clients":>7} {"tokens/s":>9} {"vs plugin top-k":>15} {"B/resp token":>12} '
          f'{"vs plugin":>9} {"errors":>6}')
    for r in rows:
        print(f'{r["method"]:<50} {r["clients"]:>7} {r["tokens_per_s"]:>9.0f} '
              f'{r["tokens_per_s"] / base[r["clients"]]:>14.2f}x {r["bytes_per_token"]:>12.1f} '
              f'{r["bytes_per_token"] / base_bytes:>8.2f}x {r["errors"]:>6}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
