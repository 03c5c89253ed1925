"""``swift-gkd score`` against the limit it can reach (issue 90 item 2): the score loop's tokens/s beside the same
teacher's bare forward + top-k over the same rows, at the same batches and dtype, in one invocation.

    python benchmarks/bench_score_loop.py                 # medium setting (153M teacher), 192 long-tailed rows
    python benchmarks/bench_score_loop.py --setting small --rows 64

1. **The score loop**: ``swift-gkd score`` of the teacher (``bench_teacher_store.SETTINGS``; ``medium``: hidden 2048,
   4 layers, 153M parameters, the tiny tokenizer's 448-token vocabulary) over ``--rows`` rows whose lengths are
   long-tailed (the tiny reversal task, its prompt repeated a log-normal number of times, 1-30: 10-300 tokens),
   ``--max_length 256``, float32, ``--per_device_train_batch_size`` ``--batch``. A plugin (``score_batches_plugin.py``)
   records every batch the teacher forwards (its ids, mask and positions, as the loop made them) and the seconds of
   each forward. Its tokens/s: the real (not padding) tokens of those batches over ms-swift's ``train_runtime`` (the
   loop: encoding, the forward, the top-k, the store's encoding and writes; loading and the dataset's preprocessing
   left out). Peak RSS: ``getrusage(RUSAGE_CHILDREN)`` of a wrapper (its largest process, the score run).
2. **The bare forward + top-k**: the same teacher loaded by ``transformers`` alone, ``torch.inference_mode``, the
   recorded batches as they are (same rows, padding, batch size, dtype, threads): logits, ``log_softmax`` and the top-k
   at each row's response positions; the real tokens over its seconds. Peak RSS: this process's.
3. **Padding share** (padding positions over all positions forwarded) of the loop's batches.

Both, twice: the rows in dataset order (``--group_by_length false``, the loop before issue 90) and batched by length
(``swift-gkd score``'s default since), each loop against the bare pass over its own batches.

The last line is ``score_loop: ...``; results in ``<workdir>/score_loop.json``.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import random
import resource
import shutil
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench_teacher_store as bts  # noqa: E402

PLUGIN = os.path.join(HERE, 'score_batches_plugin.py')


def long_tailed_rows(train: str, out: str, rows: int, seed: int = 0) -> str:
    """``rows`` rows made from ``train``'s: the prompt repeated a log-normal number of times (1-30), the answer half as
    often, each row distinct (its index in the answer)."""
    base = [json.loads(line) for line in open(train) if line.strip()]
    rng = random.Random(seed)
    with open(out, 'w') as f:
        for i in range(rows):
            user, answer = (m['content'] for m in base[i % len(base)]['messages'])
            rep = min(30, max(1, int(rng.lognormvariate(0.3, 1.0))))
            f.write(json.dumps({'messages': [
                {'role': 'user', 'content': ' '.join([user] * rep)},
                {'role': 'assistant', 'content': ' '.join([answer] * max(1, rep // 2)) + f' {i}'}]}) + '\n')
    return out


def padding_share(batches) -> float:
    real = sum(int(b['attention_mask'].sum()) for b in batches)
    return 1 - real / sum(b['attention_mask'].numel() for b in batches)


def bare_forward_topk(model, batches, k: int) -> float:
    """Seconds of the bare forward + top-k over ``batches``."""
    start = time.perf_counter()
    with torch.inference_mode():
        for b in batches:
            fwd = {n: b[n] for n in ('input_ids', 'attention_mask', 'position_ids') if n in b}
            logits = model(**fwd).logits
            if 'labels' in b:  # the scored positions: the next token is a response token
                where = b['labels'][:, 1:] != -100
                rows = logits[:, :-1][where]
            else:
                rows = logits[b['attention_mask'].bool()]
            rows.float().log_softmax(-1).topk(k, dim=-1)
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--workdir', default=os.path.join(bts.ROOT, '.bench_cache', 'teacher_store'))
    parser.add_argument('--setting', choices=list(bts.SETTINGS), default='medium')
    parser.add_argument('--rows', type=int, default=192, help='long-tailed rows scored')
    parser.add_argument('--batch', type=int, default=8, help='--per_device_train_batch_size')
    parser.add_argument('--topk', type=int, default=64, help='--gkd_logits_topk')
    parser.add_argument('--max_length', type=int, default=256)
    args = parser.parse_args(argv)
    args.workdir = os.path.abspath(args.workdir)
    os.makedirs(args.workdir, exist_ok=True)
    threads = int(os.environ.setdefault('OMP_NUM_THREADS', '1'))
    torch.set_num_threads(threads)
    bts.log(f'score loop bench: {os.cpu_count()} CPUs, OMP_NUM_THREADS={threads}, torch {torch.__version__}')
    ws = bts.build_tiny(args.workdir, bts.SETTINGS[args.setting], 64)
    data = long_tailed_rows(ws['train'], os.path.join(ws['root'], f'long_tailed_{args.rows}.jsonl'), args.rows)
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(ws['teacher'], dtype=torch.float32).eval()
    result = {'setting': args.setting, 'teacher_parameters': ws['teacher_parameters'], 'rows': args.rows,
              'batch': args.batch, 'uptime_before': os.popen('uptime').read().strip()}
    for order, flag in (('in_order', 'false'), ('by_length', 'true')):
        result[order] = one_order(args, ws, data, model, order, flag)
    result['uptime'] = os.popen('uptime').read().strip()
    with open(os.path.join(args.workdir, 'score_loop.json'), 'w') as f:
        json.dump(result, f, indent=1)
    lengths = result['in_order'].pop('row_tokens')
    bts.log(f'row lengths (tokens): min {lengths[0]}, median {lengths[len(lengths) // 2]}, '
            f'90th {lengths[int(len(lengths) * 0.9)]}, max {lengths[-1]}')
    a, b = result['in_order'], result['by_length']
    print(f'score_loop: {args.setting} ({ws["teacher_parameters"] / 1e6:.0f}M teacher), {args.rows} rows, '
          f'{a["tokens"]} tokens, batch {args.batch}, float32: swift-gkd score by length (its default) '
          f'{b["loop_tokens_per_s"]:.0f} tokens/s ({b["loop_s"]:.1f} s, forwards {b["loop_forward_s"]:.1f} s, the store '
          f'writer thread {b["writer_cpu_s"]:.1f} s of CPU beside them), bare '
          f'forward + top-k over its batches {b["bare_tokens_per_s"]:.0f} ({b["bare_s"]:.1f} s): {b["ratio"]:.2f}x, '
          f'padding {b["padding_share"]:.0%}; in dataset order (--group_by_length false) {a["loop_tokens_per_s"]:.0f} '
          f'tokens/s ({a["loop_s"]:.1f} s), bare {a["bare_tokens_per_s"]:.0f}: {a["ratio"]:.2f}x, padding '
          f'{a["padding_share"]:.0%}; by length / in order: {b["loop_tokens_per_s"] / a["loop_tokens_per_s"]:.2f}x; '
          f'peak RSS loop {b["loop_rss_bytes"] / 2**20:.0f} MiB, bare {b["bare_rss_bytes"] / 2**20:.0f} MiB; '
          f'{result["uptime_before"]} -> {result["uptime"]}', flush=True)
    return 0


def one_order(args, ws, data, model, order: str, group_by_length: str) -> dict:
    """``swift-gkd score`` with ``--group_by_length`` ``group_by_length`` (its batches recorded), then the bare
    forward + top-k over those batches: tokens/s, their ratio, padding share, peak RSS."""
    store = os.path.join(args.workdir, 'stores', f'score_loop_{args.setting}_{order}')
    record = os.path.join(args.workdir, 'logs', f'score_loop_{args.setting}_{order}.batches.pt')
    shutil.rmtree(store, ignore_errors=True)
    for p in glob.glob(record + '*'):
        os.remove(p)
    cmd = [bts._bin('swift-gkd'), 'score', '--teacher_model', ws['teacher'], '--dataset', data, '--output_dir', store,
           '--gkd_logits_topk', str(args.topk), '--per_device_train_batch_size', str(args.batch),
           '--group_by_length', group_by_length,
           *[x if x != '128' else str(args.max_length) for x in bts.COMMON], '--external_plugins', PLUGIN]
    os.environ['BENCH_SCORE_BATCHES'] = record
    loop = bts.run_measured(cmd, f'score_loop_{args.setting}_{order}', args.workdir)
    runs = sorted(glob.glob(os.path.join(store, 'runs', '*', 'logging.jsonl')))
    runtime = bts.read_logging(os.path.dirname(runs[-1]))['train_runtime']
    recorded = torch.load(record)
    batches, forward_s = recorded['batches'], recorded['forward_s']
    tokens = sum(int(b['attention_mask'].sum()) for b in batches)
    bare_forward_topk(model, batches[:1], args.topk)  # (warm-up)
    bare_s = bare_forward_topk(model, batches, args.topk)
    return {
        'batches': len(batches), 'tokens': tokens,
        'row_tokens': sorted(int(b['attention_mask'][r].sum()) for b in batches for r in range(len(b['input_ids']))),
        'loop_s': runtime, 'loop_forward_s': sum(forward_s), 'loop_tokens_per_s': tokens / runtime,
        'writer_cpu_s': recorded['writer_cpu_s'],
        'bare_s': bare_s, 'bare_tokens_per_s': tokens / bare_s, 'ratio': bare_s / runtime,
        'padding_share': padding_share(batches), 'loop_rss_bytes': loop['rss_bytes'],
        'bare_rss_bytes': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        'load_before': loop['load_before'], 'load_end': bts.load()}


if __name__ == '__main__':
    sys.exit(main())
