"""Part e: the teacher server (``swift-gkd serve-teacher``) on the device under concurrent load, and a batch that
does not fit: it must answer an error and keep serving.

The 1.5B-shaped teacher (``--tiny``: the tiny one) behind a real server process on loopback; 1, 8 and 32 client
threads each send top-k requests (``TeacherClient.topk``, k = 64, with the tail) of random prompt/response ids for a
few seconds (``benchmarks/bench_teacher_server.server_throughput``): tokens scored per second, latency percentiles.
Then one request within every limit of the server but beyond the device's memory, then a normal request, which must
still be answered. The oversized request is one sequence whose hidden states alone (``tokens x hidden x 2`` bytes
in bf16, the embedding's output, which no chunking splits) are 1.25x the device's total memory
(``torch.cuda.get_device_properties``): the server's chunked head and its retry in halves cannot make it fit, so
the answer must be an error that is not a limit's (413/422). The server is started with limits that let it through
(``oversized_server_limits``). On CPU: a request beyond ``--max_request_tokens`` (413), or with ``--pretend-memory-mib``
the GPU's sizing against a pretended memory, which then fits: it shows the limits let such a request through.
(The first GPU run sent 8 x 32,000 tokens, meant to need 78 GB of logits; the server scores the head in chunks and
answered it in 3.6 s.)
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time

from common import OFFLINE_ENV, REPO, Results, build_workspace, free_port

MARGIN = 1.25  # the oversized sequence's hidden states / the device's total memory


def oversized_tokens(total_bytes: int, hidden_size: int, dtype_bytes: int = 2, margin: float = MARGIN) -> int:
    """Tokens of one sequence whose ``[tokens, hidden_size]`` hidden states alone take ``margin`` x ``total_bytes``."""
    return int(margin * total_bytes / (hidden_size * dtype_bytes)) + 1


def oversized_server_limits(tokens: int) -> dict:
    """``serve-teacher`` flags under which one sequence of ``tokens`` passes every limit (sequence length, batch,
    request, body: JSON ids take at most 8 bytes each with their separator)."""
    big = max(tokens, 262144)
    return {'--max_batch_tokens': big, '--max_length': big, '--max_request_tokens': big,
            '--max_body_mb': max(64, (8 * tokens) // 2**20 + 16)}

sys.path.insert(0, os.path.join(REPO, 'benchmarks'))
import bench_teacher_server  # noqa: E402


def run(args) -> Results:
    from swift_gkd_plugin.entry.cli import swift_executable
    from swift_gkd_plugin.server import TeacherClient
    from swift_gkd_plugin.server.client import TeacherServerError
    res = Results('e', 'teacher server under concurrent load, and a batch that does not fit')
    cuda = args.device == 'cuda'
    ws = build_workspace(os.path.join(args.work, 'ws'), args.tiny, 'cuda' if cuda else 'cpu')
    port = free_port()
    gkd = os.path.join(os.path.dirname(swift_executable()), 'swift-gkd')
    gkd = gkd if os.path.exists(gkd) else 'swift-gkd'
    with open(os.path.join(ws.teacher, 'config.json')) as f:
        hidden = json.load(f)['hidden_size']
    dtype_bytes = 4 if ws.dtype == 'float32' else 2
    pretend = getattr(args, 'pretend_memory_mib', None)
    if cuda or pretend:
        import torch
        total = int(pretend * 2**20) if pretend else torch.cuda.get_device_properties(0).total_memory
        big_tokens = oversized_tokens(total, hidden, dtype_bytes)
        limits = oversized_server_limits(big_tokens)
    else:  # CPU: a request beyond --max_request_tokens (an error and the server goes on; memory is not tried)
        total, big_tokens = None, 16 * 512
        limits = {'--max_batch_tokens': 2048, '--max_request_tokens': 4096}
    cmd = [gkd, 'serve-teacher', '--model', ws.teacher, '--model_type', 'qwen2', '--template', 'qwen2_5',
           '--port', str(port), '--top_k', '64', '--torch_dtype', ws.dtype, '--device', 'cuda' if cuda else 'cpu',
           '--log_level', 'warning'] + [str(x) for kv in limits.items() for x in kv]
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
        # a request that does not fit, then a normal request
        if total is None:
            big = [([1] * 256, [2] * 256) for _ in range(16)]
        else:
            big = [([1] * (big_tokens // 2), [2] * (big_tokens - big_tokens // 2))]
        client = TeacherClient(url, timeout=600, retries=0)
        t0 = time.perf_counter()
        try:
            client.topk(big, topk=64)
            answer, status = 'answered (it fitted)', None
        except TeacherServerError as e:
            answer, status = f'error: {e}'[:300], e.status
        big_s = time.perf_counter() - t0
        del big
        try:
            client.topk(batch(random.Random(99)), topk=64)
            after = 'ok'
        except Exception as e:
            after = f'{type(e).__name__}: {e}'[:300]
        expect = 'a memory error' if cuda else ('an answer (pretended memory)' if pretend else 'a 413 (limit)')
        res.add(kind='oversized', clients=1, tokens=big_tokens if total else 16 * 512, answer=answer,
                http_status=status, seconds=big_s, next_request=after, server_alive=server.poll() is None,
                device_total_gib=total / 2**30 if total else None, expected=expect,
                as_expected=oversized_as_expected(cuda, bool(pretend), status, answer))
        if after != 'ok' or server.poll() is not None:
            res.status = 'partial'
            res.note('the server did not keep serving after the oversized request')
        if not res.rows[-1]['as_expected']:
            res.status = 'partial'
            res.note(f'the oversized request: expected {expect}, got {answer[:120]!r} (HTTP {status})')
        if any(r.get('errors') for r in res.rows if r['kind'] == 'load'):
            res.status = 'partial'
    finally:
        server.kill()  # nothing to flush: a scoring server
        server.wait()
        log.close()
    res.note(f'{seqs} sequences of {prompt_len}+{resp_len} tokens per request, k=64 with tail, {seconds:g} s per '
             'load level; the oversized request: ' + (
                 f'one sequence of {big_tokens:,} tokens, whose hidden states ({hidden} x {dtype_bytes} bytes a token) '
                 f'are {MARGIN:g}x the {"pretended " if pretend else ""}device memory ({total / 2**30:.2f} GiB); '
                 f'server limits {limits}' if total else '16 x 2 x 256 tokens beyond --max_request_tokens 4096'))
    return res


def oversized_as_expected(cuda: bool, pretend: bool, status, answer: str) -> bool:
    """GPU: the server's 500 naming the memory error (not a limit's 413/422, not a timeout); CPU with a pretended
    memory: answered (every limit let it through); plain CPU: the 413 of --max_request_tokens."""
    if pretend and not cuda:
        return status is None and answer.startswith('answered')
    if cuda:  # the forward's out-of-memory error, answered as the server's 500
        return answer.startswith('error') and status == 500 and 'memory' in answer.lower()
    return status == 413
