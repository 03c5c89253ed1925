"""Part e: the teacher server (``swift-gkd serve-teacher``) on the device under concurrent load, and a batch that
does not fit: it must answer an error and keep serving.

The 1.5B-shaped teacher (``--tiny``: the tiny one) behind a real server process on loopback; 1, 8 and 32 client
threads each send top-k requests (``TeacherClient.topk``, k = 64, with the tail) of random prompt/response ids for a
few seconds (``benchmarks/bench_teacher_server.server_throughput``): tokens scored per second, latency percentiles.
Then one batch within every limit of the server but far beyond the device's memory (on CPU: a request beyond
``--max_request_tokens``), then a normal request, which must still be answered.
"""
from __future__ import annotations

import os
import random
import subprocess
import sys
import time

from common import OFFLINE_ENV, REPO, Results, build_workspace, free_port

sys.path.insert(0, os.path.join(REPO, 'benchmarks'))
import bench_teacher_server  # noqa: E402


def run(args) -> Results:
    from swift_gkd_plugin.cli import swift_executable
    from swift_gkd_plugin.server import TeacherClient
    from swift_gkd_plugin.server.client import TeacherServerError
    res = Results('e', 'teacher server under concurrent load, and a batch that does not fit')
    cuda = args.device == 'cuda'
    ws = build_workspace(os.path.join(args.work, 'ws'), args.tiny, 'cuda' if cuda else 'cpu')
    port = free_port()
    gkd = os.path.join(os.path.dirname(swift_executable()), 'swift-gkd')
    gkd = gkd if os.path.exists(gkd) else 'swift-gkd'
    max_request_tokens = 4096 if args.tiny else 1048576
    cmd = [gkd, 'serve-teacher', '--model', ws.teacher, '--model_type', 'qwen2', '--template', 'qwen2_5',
           '--port', str(port), '--top_k', '64', '--torch_dtype', ws.dtype, '--device', 'cuda' if cuda else 'cpu',
           '--max_batch_tokens', '2048' if args.tiny else '262144', '--max_request_tokens', str(max_request_tokens),
           '--log_level', 'warning']
    log_path = os.path.join(args.work, 'e_server.log')
    log = open(log_path, 'wb')
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, **OFFLINE_ENV))
    url = f'http://127.0.0.1:{port}'
    try:
        TeacherClient(url).wait_until_ready(timeout=args.run_timeout)
        vocab_tokens = 900 if args.tiny else 150000
        prompt_len, resp_len, seqs = (16, 16, 2) if args.tiny else (256, 256, 4)
        seconds = args.seconds or (2.0 if args.tiny else 8.0)

        def batch(rng):
            return [([rng.randrange(vocab_tokens) for _ in range(prompt_len)],
                     [rng.randrange(vocab_tokens) for _ in range(resp_len)]) for _ in range(seqs)]

        batches = [(batch(random.Random(i)),) for i in range(64)]

        def make_call():
            client = TeacherClient(url, timeout=120)
            return lambda b: client.topk(b[0], topk=64, with_tail=True)

        for clients in args.clients or ([1, 4] if args.tiny else [1, 8, 32]):
            r = bench_teacher_server.server_throughput(make_call, batches, clients, seconds)
            res.add(kind='load', clients=clients, requests=r['requests'], errors=r['errors'],
                    tokens_per_s=r['tokens_per_s'], p50_ms=r['p50_ms'], p95_ms=r['p95_ms'])
        # a batch that does not fit, then a normal request
        # GPU: one batch of 8 x 32,000 tokens, within every limit of the server, whose logits alone (8 x 32,000 x
        # 151,936 in bf16) are 78 GB: the forward runs out of memory. CPU: beyond --max_request_tokens (413).
        big_len = 256 if args.tiny else 16000
        big = [([1] * big_len, [2] * big_len) for _ in range(16 if args.tiny else 8)]
        client = TeacherClient(url, timeout=300, retries=1)
        t0 = time.perf_counter()
        try:
            client.topk(big, topk=64)
            answer, status = 'answered (it fitted)', None
        except TeacherServerError as e:
            answer, status = f'error: {e}'[:300], e.status
        big_s = time.perf_counter() - t0
        try:
            client.topk(batch(random.Random(99)), topk=64)
            after = 'ok'
        except Exception as e:
            after = f'{type(e).__name__}: {e}'[:300]
        res.add(kind='oversized', clients=1, tokens=sum(len(p) + len(r) for p, r in big), answer=answer,
                http_status=status, seconds=big_s, next_request=after, server_alive=server.poll() is None)
        if after != 'ok' or server.poll() is not None:
            res.status = 'partial'
            res.note('the server did not keep serving after the oversized batch')
        if any(r.get('errors') for r in res.rows if r['kind'] == 'load'):
            res.status = 'partial'
    finally:
        server.kill()  # nothing to flush: a scoring server
        server.wait()
        log.close()
    res.note(f'{seqs} sequences of {prompt_len}+{resp_len} tokens per request, k=64 with tail, {seconds:g} s per '
             'load level; the oversized request: ' + ('16 x 2 x 256 tokens beyond --max_request_tokens 4096'
                                                      if args.tiny else '8 sequences of 32,000 tokens in one batch '
                                                      '(--max_batch_tokens 262144), 78 GB of bf16 logits'))
    return res
