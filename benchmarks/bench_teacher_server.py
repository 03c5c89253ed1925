#!/usr/bin/env python
"""The teacher server (``swift-gkd serve-teacher``): throughput, bytes on the wire, and the error of top-k losses.

Usage::

    python benchmarks/bench_teacher_server.py                    # about 2-3 minutes on 2 CPU cores
    python benchmarks/bench_teacher_server.py --seconds 10 --clients 1,8,32,64 --json-out bench.json

Everything runs on the tiny offline models of ``swift_gkd_plugin.demo.tiny``: the trained demo teacher
(``build_demo_workspace``, cached under ``--workdir``) served by a real ``swift-gkd serve-teacher`` subprocess on
loopback, and the untrained demo student. Three parts:

1. **Throughput**: tokens per second (prompt + response tokens scored) with 1, 8 and 32 concurrent clients, each
   sending requests of ``--seqs-per-request`` chat sequences of the reversal task for ``--seconds`` seconds, on
   the compact endpoint (``TeacherClient``, msgpack: top-k + tail, and k = 1 with each response token's log-prob, the
   sampled-token term's signal) and on ms-swift's ``/infer/`` (ms-swift's own
   ``VLLMInferClient`` + ``parse_prompt_logprobs``, exactly the trainer's path), versus sequential direct forwards
   of the same model in this process (forward + ``log_softmax`` + top-k + tail, one sequence at a time).
   Client and server share the machine's cores.
2. **Bytes per token** of the answers (request bytes beside them): ms-swift's ``/infer/`` JSON (which scores every
   prompt position too; given per response token and per scored position), the compact endpoint in each encoding,
   and full float32 logits (``4 * V`` bytes per token, at this vocabulary and at Qwen's 151936).
3. **Top-k loss error**: the generalized JSD (``--beta``, temperature 1) of a student against the teacher's top-k
   (from the server) relative to the full-vocabulary loss, at k in {8, 32, 64, 256}, without and with the tail
   bucket (``swift_gkd_plugin.core.fused.loss.fused_linear_jsd``); for the untrained student and for a "near"
   student (the teacher with noise on its ``lm_head``), on dataset responses and on corrupted responses (30% of the
   response tokens replaced at random, where the teacher is less sure).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OFFLINE_ENV = {'HF_HUB_OFFLINE': '1', 'HF_DATASETS_OFFLINE': '1', 'TRANSFORMERS_OFFLINE': '1',
               'MODELSCOPE_OFFLINE': '1', 'USE_HF': '1', 'TOKENIZERS_PARALLELISM': 'false'}
QWEN_VOCAB = 151936
LOSS_KS = (8, 32, 64, 256)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--workdir', default=os.path.join(os.environ.get('TMPDIR', '/tmp'), 'swift_gkd_bench'))
    p.add_argument('--clients', type=lambda s: [int(x) for x in s.split(',')], default=[1, 8, 32])
    p.add_argument('--seconds', type=float, default=6.0, help='duration of each throughput measurement')
    p.add_argument('--seqs-per-request', type=int, default=4)
    p.add_argument('--top_k', type=int, default=64, help='k of the throughput and bytes measurements')
    p.add_argument('--beta', type=float, default=0.5)
    p.add_argument('--loss-rows', type=int, default=64, help='test rows of the loss-error part')
    p.add_argument('--threads', type=int, default=1,
                   help='torch threads of the server and of the direct forwards (one is fastest for the tiny model)')
    p.add_argument('--max-batch-tokens', type=int, default=4096)
    p.add_argument('--json-out', default=None)
    return p.parse_args(argv)


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float('nan')


# ----------------------------------------------------------------------------------------------------------------
# setup
# ----------------------------------------------------------------------------------------------------------------


def start_server(teacher, args, log_path):
    port = _free_port()
    cmd = [os.path.join(os.path.dirname(sys.executable), 'swift-gkd'), 'serve-teacher', '--model', teacher,
           '--model_type', 'qwen3', '--template', 'qwen3_nothinking', '--port', str(port), '--top_k', '256',
           '--torch_dtype', 'float32', '--device', 'cpu', '--max_batch_tokens', str(args.max_batch_tokens),
           '--max_queue', '4096', '--num_threads', str(args.threads), '--log_level', 'warning']
    log = open(log_path, 'wb')
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, **OFFLINE_ENV))
    from swift_gkd_plugin.server import TeacherClient
    url = f'http://127.0.0.1:{port}'
    try:
        TeacherClient(url).wait_until_ready(timeout=300)
    except Exception:
        proc.kill()
        raise RuntimeError(f'the teacher server did not start; see {log_path}')
    return proc, url


def make_pairs(tokenizer, rows):
    from swift_gkd_plugin.demo import tiny
    pairs = []
    for row in rows:
        enc = tiny.encode_row(tokenizer, row)
        ids, labels = list(enc['input_ids']), enc['labels']
        start = next(i for i, t in enumerate(labels) if t != -100)
        pairs.append((ids[:start], ids[start:]))
    return pairs


def infer_requests(tokenizer, rows, pairs):
    """ms-swift teacher requests (as gkd_helpers.build_teacher_requests builds them): response as token ids."""
    from swift.infer_engine.protocol import RolloutInferRequest
    from swift.rlhf_trainers.utils import replace_assistant_response_with_ids
    out = []
    for row, (_, response) in zip(rows, pairs):
        # the response without its template suffix (<|im_end|>\n): the server's template adds it back (add_eos)
        ids = tokenizer.encode(row['messages'][-1]['content'], add_special_tokens=False)
        req = RolloutInferRequest(messages=replace_assistant_response_with_ids([dict(m) for m in row['messages']],
                                                                               ids))
        req.add_eos = 'auto'
        out.append(req)
    return out


# ----------------------------------------------------------------------------------------------------------------
# 1. throughput
# ----------------------------------------------------------------------------------------------------------------


def direct_throughput(model, pairs, k, seconds):
    import torch
    tokens = done = 0
    lat = []
    t_end = time.perf_counter() + seconds
    i = 0
    with torch.inference_mode():
        while time.perf_counter() < t_end:
            prompt, response = pairs[i % len(pairs)]
            i += 1
            t0 = time.perf_counter()
            ids = torch.tensor([prompt + response])
            lp = torch.log_softmax(model(input_ids=ids).logits[0, len(prompt) - 1:-1].float(), -1)
            vals, idx = lp.topk(k, -1)
            torch.logsumexp(lp.scatter(-1, idx, float('-inf')), -1)
            lat.append(time.perf_counter() - t0)
            tokens += ids.shape[1]
            done += 1
    return {'tokens': tokens, 'requests': done, 'seconds': seconds, 'tokens_per_s': tokens / seconds,
            'p50_ms': 1e3 * _pct(lat, 0.5), 'p95_ms': 1e3 * _pct(lat, 0.95)}


def server_throughput(make_call, batches, clients, seconds):
    """``clients`` threads, each calling ``make_call()(batch)`` on rotating batches until the deadline."""
    barrier = threading.Barrier(clients + 1)
    stats = [None] * clients
    deadline = [0.0]

    def worker(w):
        call = make_call()
        tokens = done = errors = 0
        lat = []
        j = w
        barrier.wait()
        while time.perf_counter() < deadline[0]:
            batch = batches[j % len(batches)]
            j += clients
            t0 = time.perf_counter()
            try:
                call(batch)
            except Exception as e:  # counted, reported
                errors += 1
                print(f'    request failed: {e}', file=sys.stderr)
                continue
            lat.append(time.perf_counter() - t0)
            tokens += sum(len(p) + len(r) for p, r in batch[0])
            done += 1
        stats[w] = (tokens, done, errors, lat)

    threads = [threading.Thread(target=worker, args=(w, ), daemon=True) for w in range(clients)]
    for t in threads:
        t.start()
    t0 = time.perf_counter()
    deadline[0] = t0 + seconds
    barrier.wait()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    tokens = sum(s[0] for s in stats)
    lat = [x for s in stats for x in s[3]]
    return {'clients': clients, 'tokens': tokens, 'requests': sum(s[1] for s in stats),
            'errors': sum(s[2] for s in stats), 'seconds': elapsed, 'tokens_per_s': tokens / elapsed,
            'p50_ms': 1e3 * _pct(lat, 0.5), 'p95_ms': 1e3 * _pct(lat, 0.95)}


# ----------------------------------------------------------------------------------------------------------------
# 2. bytes per token
# ----------------------------------------------------------------------------------------------------------------


def wire_bytes(url, pairs, requests_, vocab, ks):
    import httpx
    import msgpack
    from dataclasses import asdict
    n_resp = sum(len(r) for _, r in pairs)
    n_pos_infer = sum(len(p) + len(r) - 1 for p, r in pairs)
    rows = []
    with httpx.Client(timeout=300) as client:
        for k in ks:
            body = {'infer_requests': [asdict(r) for r in requests_],
                    'request_config': {'prompt_logprobs': k, 'max_tokens': 1, 'temperature': 0.0}}
            req = json.dumps(body).encode()
            r = client.post(f'{url}/infer/', content=req, headers={'Content-Type': 'application/json'})
            r.raise_for_status()
            rows.append({'format': 'ms-swift /infer/ JSON', 'k': k, 'request_bytes': len(req),
                         'response_bytes': len(r.content), 'per_token': len(r.content) / n_resp,
                         'per_scored_position': len(r.content) / n_pos_infer})
            seqs = [{'prompt_ids': p, 'response_ids': r_} for p, r_ in pairs]
            for label, encoding, dtype, tail, binary in [
                    ('/v1/topk JSON lists', 'list', 'float32', False, False),
                    ('/v1/topk JSON base64 f32', 'base64', 'float32', False, False),
                    ('/v1/topk JSON base64 f32 + tail', 'base64', 'float32', True, False),
                    ('/v1/topk JSON base64 f16', 'base64', 'float16', False, False),
                    ('/v1/topk msgpack f32', 'base64', 'float32', False, True),
                    ('/v1/topk msgpack f32 + tail', 'base64', 'float32', True, True),
                    ('/v1/topk msgpack f16 + tail', 'base64', 'float16', True, True),
                    ('/v1/topk msgpack k=1 + targets', 'base64', 'float32', False, True)]:
                targets = label.endswith('targets')
                if targets and k != ks[0]:
                    continue  # k = 1 whatever the row's k: measured once
                doc = {'sequences': seqs, 'topk': 1 if targets else k, 'with_tail': tail, 'encoding': encoding,
                       'logprobs_dtype': dtype, **({'with_targets': True} if targets else {})}
                if binary:
                    req = msgpack.packb(doc)
                    headers = {'Content-Type': 'application/msgpack', 'Accept': 'application/msgpack'}
                else:
                    req = json.dumps(doc).encode()
                    headers = {'Content-Type': 'application/json'}
                r = client.post(f'{url}/v1/topk', content=req, headers=headers)
                r.raise_for_status()
                rows.append({'format': label, 'k': 1 if targets else k, 'request_bytes': len(req),
                             'response_bytes': len(r.content),
                             'per_token': len(r.content) / n_resp, 'per_scored_position': len(r.content) / n_resp})
    rows.append({'format': f'full float32 logits (V={vocab})', 'k': vocab, 'request_bytes': None,
                 'response_bytes': 4 * vocab * n_resp, 'per_token': 4.0 * vocab, 'per_scored_position': 4.0 * vocab})
    rows.append({'format': f'full float32 logits (V={QWEN_VOCAB})', 'k': QWEN_VOCAB, 'request_bytes': None,
                 'response_bytes': 4 * QWEN_VOCAB * n_resp, 'per_token': 4.0 * QWEN_VOCAB,
                 'per_scored_position': 4.0 * QWEN_VOCAB})
    return rows, n_resp


# ----------------------------------------------------------------------------------------------------------------
# 3. top-k loss error
# ----------------------------------------------------------------------------------------------------------------


def loss_errors(url, teacher, student, pairs, vocab, beta, seed=0):
    import torch
    from swift_gkd_plugin.server import TeacherClient
    try:
        from swift_gkd_plugin.core.fused.loss import fused_linear_jsd
        from swift_gkd_plugin.core.teacher_signal import TeacherHead, TeacherTopK

        def full_loss(sh, sw, th, tw):
            return float(fused_linear_jsd(sh, sw, teacher=TeacherHead(th, tw), beta=beta)[0])

        def topk_loss(sh, sw, ids, lps, tail):
            return float(fused_linear_jsd(sh, sw, teacher=TeacherTopK(ids, lps), beta=beta,
                                          topk_tail=tail)[0])
        source = 'swift_gkd_plugin.core.fused.loss.fused_linear_jsd'
    except ImportError:  # INLINE FALLBACK (fused_loss not available): same definitions, dense
        from swift_gkd_plugin.core.divergence import generalized_jsd

        def full_loss(sh, sw, th, tw):
            return float(generalized_jsd(sh @ sw.T, th @ tw.T, beta).mean())

        def topk_loss(sh, sw, ids, lps, tail):
            z = sh @ sw.T
            zk = z.gather(-1, ids)
            if tail:
                zt = torch.logsumexp(z.scatter(-1, ids, float('-inf')), -1, keepdim=True)
                lt = torch.log1p(-lps.exp().sum(-1, keepdim=True).clamp(max=1.0))
                zk, lps = torch.cat([zk, zt], -1), torch.cat([lps, lt], -1)
            return float(generalized_jsd(zk, lps, beta).mean())
        source = 'INLINE top-k variants over swift_gkd_plugin.core.divergence.generalized_jsd'

    g = random.Random(seed)
    corrupted = []
    for p, r in pairs:
        r2 = [t if g.random() > 0.3 else g.randrange(300) for t in r]
        corrupted.append((p, r2))
    teacher_head = teacher.get_output_embeddings().weight.detach().float()
    gen = torch.Generator().manual_seed(seed)
    noisy_head = teacher_head + 0.5 * teacher_head.std() * torch.randn(teacher_head.shape, generator=gen)
    client = TeacherClient(url, timeout=300)
    out = []
    for data_name, data in [('dataset responses', pairs), ('corrupted responses', corrupted)]:
        top = client.topk(data, topk=max(LOSS_KS))
        top_ids = torch.cat([t.ids for t in top])
        top_lp = torch.cat([t.logprobs for t in top])

        @torch.no_grad()
        def hidden(model):
            hs = []
            for p, r in data:
                ids = torch.tensor([p + r])
                h = model.get_decoder()(input_ids=ids).last_hidden_state[0, len(p) - 1:-1]
                hs.append(h.float())
            return torch.cat(hs)

        th = hidden(teacher)
        students = {'untrained student': (hidden(student), student.get_output_embeddings().weight.detach().float()),
                    'near student (noisy teacher head)': (th, noisy_head)}
        with torch.no_grad():
            for s_name, (sh, sw) in students.items():
                full = full_loss(sh, sw, th, teacher_head)
                for k in LOSS_KS:
                    ids, lps = top_ids[:, :k].contiguous(), top_lp[:, :k].contiguous()
                    mass = float(lps.exp().sum(-1).mean())
                    row = {'student': s_name, 'data': data_name, 'k': k, 'full_loss': full, 'topk_mass': mass}
                    for tail in (False, True):
                        lk = topk_loss(sh, sw, ids, lps, tail)
                        row['tail' if tail else 'no_tail'] = lk
                        row[('rel_err_tail' if tail else 'rel_err_no_tail')] = abs(lk - full) / full
                    out.append(row)
    return out, source, int(top_ids.shape[0])


# ----------------------------------------------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    os.environ.update(OFFLINE_ENV)
    t_start = time.time()
    import torch
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    from swift_gkd_plugin.demo import tiny

    os.makedirs(args.workdir, exist_ok=True)
    print(f'[bench] workspace {args.workdir}/ws (trained tiny teacher; cached) ...', flush=True)
    ws = tiny.build_demo_workspace(os.path.join(args.workdir, 'ws'))
    tokenizer = tiny.load_tokenizer(ws['teacher'])
    teacher = AutoModelForCausalLM.from_pretrained(ws['teacher'], dtype=torch.float32).eval()
    student = AutoModelForCausalLM.from_pretrained(ws['student'], dtype=torch.float32).eval()
    vocab = teacher.get_output_embeddings().weight.shape[0]
    rows = tiny.read_dataset(ws['test'])
    pairs = make_pairs(tokenizer, rows)
    mean_len = statistics.mean(len(p) + len(r) for p, r in pairs)
    print(f'[bench] teacher {tiny.count_parameters(teacher):,} parameters, V={vocab}; {len(pairs)} test sequences '
          f'of {mean_len:.1f} tokens on average ({statistics.mean(len(r) for _, r in pairs):.1f} response tokens)',
          flush=True)

    print('[bench] starting swift-gkd serve-teacher ...', flush=True)
    t0 = time.time()
    server, url = start_server(ws['teacher'], args, os.path.join(args.workdir, 'server.log'))
    print(f'[bench] server ready in {time.time() - t0:.1f}s at {url}', flush=True)
    results = {'load_start': os.getloadavg()[0], 'vocab': vocab, 'mean_tokens_per_sequence': mean_len, 'threads': args.threads,
               'seqs_per_request': args.seqs_per_request, 'topk': args.top_k}
    try:
        # ---- 1. throughput
        import swift.rlhf_trainers.vllm_client as vllm_client
        from swift.infer_engine import RequestConfig
        from swift.rlhf_trainers.utils import parse_prompt_logprobs

        from swift_gkd_plugin.server import TeacherClient
        vllm_client.is_vllm_available = lambda: True  # its HTTP client needs no vLLM; only its import check does
        reqs = infer_requests(tokenizer, rows, pairs)
        spr = args.seqs_per_request
        batches = [(pairs[i:i + spr], reqs[i:i + spr]) for i in range(0, len(pairs) - spr + 1, spr)]
        k = args.top_k

        def make_compact():
            client = TeacherClient(url, timeout=300, retries=0)
            return lambda b: client.topk(b[0], topk=k, with_tail=True)

        def make_targets():  # the sampled-token term's signal: each response token's log-prob (top-1 beside it)
            client = TeacherClient(url, timeout=300, retries=0)
            return lambda b: client.topk(b[0], topk=1, with_targets=True)

        def make_infer():
            client = vllm_client.VLLMInferClient(base_urls=[url], connection_timeout=30)
            config = RequestConfig(prompt_logprobs=k, max_tokens=1, temperature=0.0)
            return lambda b: [parse_prompt_logprobs(r, topk=k)
                              for r in client.infer(b[1], request_config=config, use_tqdm=False)]

        print(f'[bench] sequential direct forwards ({args.seconds:g}s) ...', flush=True)
        direct_before = direct_throughput(teacher, pairs, k, args.seconds)
        tp = []
        for name, make in [('/v1/topk (TeacherClient, msgpack, +tail)', make_compact),
                           ('/v1/topk k=1 + targets (sampled-token term)', make_targets),
                           ('/infer/ (ms-swift VLLMInferClient + parse_prompt_logprobs)', make_infer)]:
            make()(batches[0])  # warm-up (decoded-token table, connections)
            for c in args.clients:
                print(f'[bench] {name}: {c} client(s) ({args.seconds:g}s) ...', flush=True)
                r = server_throughput(make, batches, c, args.seconds)
                r['endpoint'] = name
                tp.append(r)
        results['throughput'] = tp
        print(f'[bench] sequential direct forwards again ({args.seconds:g}s) ...', flush=True)
        direct_after = direct_throughput(teacher, pairs, k, args.seconds)
        # the machine's load may change during the run: the baseline is the mean of a measurement before and after
        direct = {key: (direct_before[key] + direct_after[key]) / 2 for key in ('tokens_per_s', 'p50_ms', 'p95_ms')}
        direct.update(before=direct_before, after=direct_after)
        results['direct'] = direct

        # ---- 2. bytes per token
        print('[bench] bytes on the wire ...', flush=True)
        sample = list(range(min(32, len(pairs))))
        wb, n_resp = wire_bytes(url, [pairs[i] for i in sample], [reqs[i] for i in sample], vocab, ks=(8, k))
        results['bytes'] = wb

        # ---- 3. top-k loss error
        print('[bench] top-k loss error ...', flush=True)
        le, source, n_pos = loss_errors(url, teacher, student, pairs[:args.loss_rows], vocab, args.beta)
        results['loss_error'] = le
        results['loss_source'] = source
    finally:
        server.terminate()
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            server.kill()

    # ---- report
    print('')
    print(f'(load average at the start {results["load_start"]:.1f}, at the end {os.getloadavg()[0]:.1f}, on '
          f'{os.cpu_count()} cores: timings are only comparable within one run)')
    print(f'== 1. throughput: tokens/s (prompt + response tokens scored), k={k}, {spr} sequences per request, '
          f'{args.threads} torch thread(s), client and server on the same {os.cpu_count()} cores; latencies are per '
          'request (direct: per sequence)')
    print(f'{"method":<62} {"clients":>7} {"tokens/s":>10} {"vs direct":>9} {"req p50 ms":>10} {"p95 ms":>8} '
          f'{"errors":>6}')
    print(f'{"sequential direct forwards (1 sequence at a time)":<62} {"-":>7} {direct["tokens_per_s"]:>10.0f} '
          f'{1.0:>8.2f}x {direct["p50_ms"]:>10.1f} {direct["p95_ms"]:>8.1f} {0:>6}   (before '
          f'{direct["before"]["tokens_per_s"]:.0f}, after {direct["after"]["tokens_per_s"]:.0f})')
    for r in tp:
        print(f'{r["endpoint"]:<62} {r["clients"]:>7} {r["tokens_per_s"]:>10.0f} '
              f'{r["tokens_per_s"] / direct["tokens_per_s"]:>8.2f}x {r["p50_ms"]:>10.1f} {r["p95_ms"]:>8.1f} '
              f'{r["errors"]:>6}')

    print('')
    print(f'== 2. bytes on the wire ({len(sample)} sequences, {n_resp} response tokens; /infer/ also scores the '
          'prompt positions)')
    print(f'{"format":<40} {"k":>6} {"request B":>10} {"response B":>11} {"B/response token":>17} '
          f'{"B/scored position":>18}')
    for r in wb:
        req_b = '-' if r['request_bytes'] is None else str(r['request_bytes'])
        print(f'{r["format"]:<40} {r["k"]:>6} {req_b:>10} {r["response_bytes"]:>11} {r["per_token"]:>17.1f} '
              f'{r["per_scored_position"]:>18.1f}')

    print('')
    print(f'== 3. top-k loss vs full-vocabulary loss (generalized JSD, beta={args.beta}, T=1; {n_pos} positions; '
          f'{source})')
    print(f'{"student":<36} {"data":<20} {"k":>4} {"top-k mass":>10} {"full loss":>10} {"rel err":>9} '
          f'{"rel err +tail":>13}')
    for r in le:
        print(f'{r["student"]:<36} {r["data"]:<20} {r["k"]:>4} {r["topk_mass"]:>10.4f} {r["full_loss"]:>10.4g} '
              f'{r["rel_err_no_tail"]:>9.2e} {r["rel_err_tail"]:>13.2e}')

    # ---- summary
    best = {}
    for r in tp:
        if r['endpoint'] not in best or r['tokens_per_s'] > best[r['endpoint']]['tokens_per_s']:
            best[r['endpoint']] = r
    infer64 = next(r for r in wb if r['format'].startswith('ms-swift') and r['k'] == k)
    mp64 = next(r for r in wb if r['format'] == '/v1/topk msgpack f32 + tail' and r['k'] == k)
    b64 = next(r for r in wb if r['format'] == '/v1/topk JSON base64 f32 + tail' and r['k'] == k)
    print('')
    print('== summary')
    for name, r in best.items():
        print(f'  {name}: best {r["tokens_per_s"]:.0f} tokens/s at {r["clients"]} clients = '
              f'{r["tokens_per_s"] / direct["tokens_per_s"]:.2f}x sequential direct forwards '
              f'({direct["tokens_per_s"]:.0f} tokens/s)')
    print(f'  k={k}: /infer/ JSON {infer64["per_token"]:.0f} B per response token; compact msgpack f32 + tail '
          f'{mp64["per_token"]:.0f} B ({infer64["per_token"] / mp64["per_token"]:.1f}x smaller), JSON base64 '
          f'{b64["per_token"]:.0f} B; full float32 logits {4 * vocab} B here and {4 * QWEN_VOCAB:,} B at '
          f'V={QWEN_VOCAB} ({4 * QWEN_VOCAB / mp64["per_token"]:.0f}x the compact answer)')
    targets = next(r for r in wb if r['format'] == '/v1/topk msgpack k=1 + targets')
    compact, sampled = best.get('/v1/topk (TeacherClient, msgpack, +tail)'), best.get(
        '/v1/topk k=1 + targets (sampled-token term)')
    if compact and sampled:
        print(f'  the sampled-token term\'s teacher signal (k=1 + each token\'s log-prob): {targets["per_token"]:.0f} B '
              f'per response token ({mp64["per_token"] / targets["per_token"]:.1f}x smaller than top-{k} + tail), '
              f'{sampled["tokens_per_s"]:.0f} tokens/s ({sampled["tokens_per_s"] / compact["tokens_per_s"]:.2f}x '
              f'top-{k} + tail): the teacher\'s cost is its prefill either way')
    for k_ in (8, 64):
        sel = [r for r in le if r['k'] == k_]
        if sel:
            print(f'  k={k_}: relative loss error without tail up to {max(r["rel_err_no_tail"] for r in sel):.2e}, '
                  f'with tail up to {max(r["rel_err_tail"] for r in sel):.2e}')
    print(f'  total {time.time() - t_start:.0f}s')
    if args.json_out:
        with open(args.json_out, 'w') as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == '__main__':
    sys.exit(main())
