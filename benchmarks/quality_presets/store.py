"""``--preset store``: off-policy forward KL (``--lmbda 0 --seq_kd false --beta 0``) distilled from the same warm start
three ways: from the live teacher over the full vocabulary (``live``, the reference: the default preset's ``supkd``),
from a teacher-score store of the teacher's top-k (``store_topk``; ``store_topk_tail`` adds the tail bucket,
``--gkd_topk_tail true``), and from the same store's tokens drawn from the teacher, 12 a position (``store_sampled``:
random-sampling KD, Anshumann et al. 2025, unbiased for the forward KL).  What does the top-k bias cost, and does the
sampled estimator match the live teacher within the seed spread?

The default preset's task, teacher, warm-started student, data, learning rate, steps and scoring (greedy exact match on
the held-out prompts).  The store is scored once per workspace by ``swift-gkd score`` (its ``swift rlhf`` command line,
:func:`swift_gkd_plugin.entry.score.score_command`) of the exact file the methods train on, with their ``--template``,
``--max_length`` and ``--truncation_strategy``, so that every row is found and the teacher is not loaded; it keeps the
top-:data:`STORE_K` (of the task's 448-row vocabulary) and :data:`STORE_SAMPLES` draws a position in float32 (no
rounding beside the approximation measured).  Every store run must log ``gkd/teacher_store_rows`` 1.0 on every step
(all its rows answered from the store), or the benchmark stops.  Beside exact match, each run's last checkpoint is
scored teacher-forced on held-out references: the student's mass outside the teacher's top-k (which the top-k loss
without a tail never sees) and the full-vocabulary forward KL.  Results under ``<workdir>/store``; the last line is
``quality[store]: ...``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from swift_gkd_plugin.entry.cli import swift_executable

from quality_presets.common import log, mean_std
from quality_presets.default import DEFAULT_LEARNING_RATE, METHODS, PRESETS

#: top-k entries the store keeps a position: 8 of the task's 448 vocabulary rows (1.8%), a real approximation
STORE_K = 8
#: tokens drawn from the tempered teacher a position (the paper's ~12)
STORE_SAMPLES = 12
#: float32 log-probabilities: the comparison measures the top-k and the sampling, not float16 rounding
STORE_DTYPE = 'float32'
#: the seed of the score run (its draws): one store for every training seed, as a store is used
SCORE_SEED = 0
#: the default preset's quick (1 seed, 60 steps) and full (3 seeds, 120 steps) settings: the same workspace
STORE_PRESETS = {'quick': dict(PRESETS['quick']), 'full': dict(PRESETS['full'])}
#: off-policy forward KL: the default preset's supkd (dataset rows, --beta 0), --seq_kd false said outright
OFF_POLICY = dict(METHODS['supkd'][1], seq_kd='false')
STORE_METHOD_NAMES = ('live', 'store_topk', 'store_topk_tail', 'store_sampled')
#: the flags of a run's command line that make its rows' token ids: the score takes them from the live run's
ENCODING_FLAGS = ('model_type', 'template', 'max_length', 'truncation_strategy', 'system', 'torch_dtype')


def store_methods(store: str) -> Dict[str, tuple]:
    """method -> (swift command, flags), as ``default.METHODS``; ``store``: the teacher-score store's folder."""
    return {
        'live': ('rlhf', dict(OFF_POLICY)),
        'store_topk': ('rlhf', dict(OFF_POLICY, teacher_scores=store, gkd_logits_topk=str(STORE_K))),
        'store_topk_tail': ('rlhf', dict(OFF_POLICY, teacher_scores=store, gkd_logits_topk=str(STORE_K),
                                         gkd_topk_tail='true')),
        # the sampled estimator runs on the dense loss; --gkd_logits_topk unset (the store's k, not used by it)
        'store_sampled': ('rlhf', dict(OFF_POLICY, teacher_scores=store, teacher_scores_samples=str(STORE_SAMPLES))),
    }


def _flag(argv: List[str], name: str) -> Optional[str]:
    return argv[argv.index(f'--{name}') + 1] if f'--{name}' in argv else None


def score_flags(bq, ws: Dict[str, Any], cfg: Dict[str, Any], store: str) -> List[str]:
    """``swift-gkd score``'s command line (without ``swift-gkd score``): the teacher over the file the methods train
    on, encoded as the ``live`` run's command line encodes it (:data:`ENCODING_FLAGS` copied from it), the draws at
    its ``--temperature``."""
    live = bq.method_command('live', ws, cfg, SCORE_SEED, '', store_methods(store))
    flags = ['--teacher_model', ws['teacher'], '--dataset', _flag(live, 'dataset'), '--output_dir', store,
             '--gkd_logits_topk', str(STORE_K), '--teacher_scores_samples', str(STORE_SAMPLES),
             '--teacher_scores_dtype', STORE_DTYPE, '--temperature', _flag(live, 'temperature'),
             '--per_device_train_batch_size', '32', '--seed', str(SCORE_SEED), '--check_model', 'false',
             '--dataloader_num_workers', '0', '--dataset_num_proc', '1', '--add_version', 'false']
    for name in ENCODING_FLAGS:
        if _flag(live, name) is not None:
            flags += [f'--{name}', _flag(live, name)]
    return flags


def score_command_line(flags: List[str]) -> List[str]:
    """The ``swift rlhf`` command line that ``swift-gkd score <flags>`` runs (``[swift, 'rlhf', ...]``)."""
    from swift_gkd_plugin.entry import score as score_cli
    parser = argparse.ArgumentParser()
    score_cli.add_arguments(parser)
    args, rest = parser.parse_known_args(flags)
    return [swift_executable(), *score_cli.score_command(args, rest)]


def store_folder(bq, workdir: str, ws: Dict[str, Any], cfg: Dict[str, Any]) -> str:
    """``<workdir>/stores/k<K>_s<S>-<hash>``: a hash of the teacher's weights, the training file's bytes and the score
    flags, so that another teacher or data set gets its own store (and its runs their own cache keys)."""
    from swift_gkd_plugin.core.scores.store import weights_fingerprint
    with open(ws['train'], 'rb') as f:
        data = hashlib.sha256(f.read()).hexdigest()
    flags = score_flags(bq, ws, cfg, '')
    key = json.dumps({'teacher': weights_fingerprint(ws['teacher']), 'train': data, 'flags': flags}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return os.path.join(workdir, 'stores', f'k{STORE_K}_s{STORE_SAMPLES}-{digest}')


def covers(store: str, train: str) -> bool:
    """Whether a finished ``swift-gkd score`` recorded ``train`` (its bytes) as covered in the store's manifest."""
    try:
        with open(os.path.join(store, 'manifest.json')) as f:
            covered = json.load(f).get('covered', [])
    except (OSError, ValueError):
        return False
    with open(train, 'rb') as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    return any(entry.get('sha256') == sha for entry in covered)


def ensure_store(bq, ws: Dict[str, Any], cfg: Dict[str, Any], workdir: str,
                 run: Optional[Callable[[List[str]], Tuple[int, str]]] = None) -> Dict[str, Any]:
    """Score the store once per workspace (a store that covers the training file already is reused); returns its
    folder, the score's wall seconds (as first measured) and its statistics (:func:`store_stats`)."""
    store = store_folder(bq, workdir, ws, cfg)
    info_path = os.path.join(store, 'bench_score.json')
    if covers(store, ws['train']) and os.path.exists(info_path):
        with open(info_path) as f:
            info = json.load(f)
        log(f'reusing the teacher-score store {store} (scored in {info["seconds"]:.0f}s)')
        return dict(info, store=store)
    flags = score_flags(bq, ws, cfg, store)
    argv = score_command_line(flags)
    log(f'scoring the store once: swift-gkd score {" ".join(flags)}')
    t = time.time()
    returncode, output = (run or bq.run_command)(argv)
    seconds = time.time() - t
    os.makedirs(store, exist_ok=True)
    with open(os.path.join(store, 'score.log'), 'w') as f:
        f.write(output)
    if returncode != 0:
        raise SystemExit(f'swift-gkd score failed ({returncode}):\n{output[-4000:]}')
    if not covers(store, ws['train']):
        raise SystemExit(f'swift-gkd score finished but {store} does not record {ws["train"]} as covered: the store '
                         'runs would load the teacher')
    info = {'seconds': seconds, 'command': ['swift-gkd', 'score', *flags], **store_stats(store)}
    with open(info_path, 'w') as f:
        json.dump(info, f, indent=1)
    log(f'store: {info["rows"]} rows, {info["tokens"]} positions, {info["bytes"]} bytes, in {seconds:.0f}s')
    return dict(info, store=store)


def store_stats(store: str) -> Dict[str, Any]:
    """What the store holds a position, over all its rows: the teacher's mass inside its top-k (mean, 1st percentile,
    minimum), its entropy (temperature of the draws), the distinct ids among the draws and the share of positions
    whose draws are all one id (there the sampled loss is a one-hot cross-entropy)."""
    import torch

    from swift_gkd_plugin.core.scores.store import TeacherStore
    ts = TeacherStore(store)
    mass, entropy, distinct, single = [], [], [], 0
    for key in ts.keys():
        row = ts.get(key)
        mass.append(torch.logsumexp(row.logprobs.float(), -1))
        if row.entropy is not None:
            entropy.append(row.entropy.float())
        if row.samples is not None:
            d = (row.samples[:, 1:] != row.samples[:, :-1]).sum(-1) + 1  # sorted: a change is a new id
            distinct.append(d.float())
            single += int((d == 1).sum())
    mass_t = torch.cat(mass).exp()
    out = {'rows': len(ts), 'tokens': int(ts.tokens), 'bytes': int(ts.bytes), 'vocab_size': ts.identity.vocab_size,
           'topk': ts.identity.topk, 'samples': ts.identity.samples, 'dtype': ts.identity.dtype,
           'topk_mass_mean': float(mass_t.mean()), 'topk_mass_p01': float(mass_t.quantile(0.01)),
           'topk_mass_min': float(mass_t.min())}
    if entropy:
        out['teacher_entropy_mean'] = float(torch.cat(entropy).mean())
    if distinct:
        out['distinct_samples_mean'] = float(torch.cat(distinct).mean())
        out['all_draws_one_id'] = single / int(mass_t.numel())
    return out


def _logged_rows(output_dir: str) -> List[Dict[str, Any]]:
    """The training rows of a run's logging.jsonl (those with a loss; not the closing summary)."""
    path = os.path.join(output_dir, 'logging.jsonl')
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [r for r in map(json.loads, f) if 'loss' in r and 'global_step/max_steps' in r]


def _step(row: Dict[str, Any]) -> int:
    return int(str(row['global_step/max_steps']).split('/')[0])


def check_store_rows(output_dir: str, steps: int, logging_steps: int = 5) -> None:
    """Raise unless the run logged ``gkd/teacher_store_rows`` 1.0 on every logged row and its logged rows cover every
    step (a row every ``logging_steps`` and one at the last step): each is the share of the rows of the steps since the
    last log answered from the store, so 1.0 everywhere means the teacher scored nothing."""
    rows = _logged_rows(output_dir)
    where = f'{output_dir}/logging.jsonl'
    if not rows:
        raise SystemExit(f'{where}: no logged training step: cannot check that the store answered every row')
    bad = [(_step(r), r.get('gkd/teacher_store_rows')) for r in rows if r.get('gkd/teacher_store_rows') != 1.0]
    if bad:
        raise SystemExit(f'{where}: gkd/teacher_store_rows is not 1.0 at (step, value) {bad[:5]}: the teacher scored '
                         'rows the store lacked, so this is not a run from the store; the comparison is invalid')
    logged = {_step(r) for r in rows}
    missing = sorted(set(range(logging_steps, steps + 1, logging_steps)) - logged)
    if missing or max(logged) != steps:
        raise SystemExit(f'{where}: logged steps {sorted(logged)} do not cover steps 1 to {steps} (missing '
                         f'{missing}): cannot check that the store answered every row')


def run_logs(bq, workdir: str, ws, cfg, methods, names: List[str]) -> Dict[str, Dict[int, Dict[str, Any]]]:
    """method -> seed -> what its run logged: mean grad_norm and loss over the logged rows, and (store methods) whether
    the teacher was loaded; the store methods are checked with :func:`check_store_rows` first."""
    out: Dict[str, Dict[int, Dict[str, Any]]] = {}
    for method in names:
        for seed in cfg['seeds']:
            output_dir = os.path.join(workdir, 'runs', bq.run_key(method, ws, cfg, seed, methods))
            if 'teacher_scores' in methods[method][1]:
                check_store_rows(output_dir, int(cfg['steps']))
            rows = _logged_rows(output_dir)
            entry = {'grad_norm': statistics.fmean(r['grad_norm'] for r in rows) if rows else float('nan'),
                     'loss': statistics.fmean(r['loss'] for r in rows) if rows else float('nan')}
            try:
                with open(os.path.join(output_dir, 'run.log')) as f:
                    entry['teacher_loaded'] = 'is not loaded' not in f.read()
            except OSError:
                entry['teacher_loaded'] = None
            out.setdefault(method, {})[seed] = entry
    return out


def distribution_gap(model_dir: str, teacher, tokenizer, rows, k: int = STORE_K) -> Dict[str, float]:
    """Teacher-forced on the references of ``rows`` (``tiny.encode_row``: the template's encoding), at each answer
    position: the student's probability mass outside the teacher's top-``k`` ids (what the top-``k`` loss without a
    tail never sees) and the forward KL(teacher || student) over the full vocabulary, temperature 1; means over the
    positions.  ``teacher``: a loaded model."""
    import torch

    from swift_gkd_plugin.demo import tiny
    student = tiny.load_model(model_dir).eval()
    teacher.eval()
    outside, kl, n = 0.0, 0.0, 0
    encoded = [tiny.encode_row(tokenizer, r) for r in rows]
    with torch.no_grad():
        for i in range(0, len(encoded), 64):
            chunk = encoded[i:i + 64]
            batch = tiny._batch(chunk, tokenizer.pad_token_id)
            ids, mask = batch['input_ids'], batch['attention_mask']
            s_logp = student(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)
            t_logp = teacher(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)
            for j, e in enumerate(chunk):
                at = slice(e['prompt_len'] - 1, e['prompt_len'] + e['score_len'] - 1)  # logits at t predict t + 1
                s, t = s_logp[j, at], t_logp[j, at]
                top = t.topk(k, -1).indices
                outside += float((1 - s.gather(-1, top).exp().sum(-1)).clamp_min(0).sum())
                kl += float((t.exp() * (t - s)).sum())
                n += s.shape[0]
    return {'student_mass_outside_topk': outside / n, 'forward_kl': kl / n}


def distribution_gaps(bq, workdir: str, ws, cfg, methods, names: List[str], n_rows: int = 200) -> Dict[str, Any]:
    """:func:`distribution_gap` of the warm start and of each run's last checkpoint on the first ``n_rows`` held-out
    prompts (their references); ``{'start': {...}, method: {seed: {...}}}``."""
    from swift_gkd_plugin.demo import tiny
    tokenizer = tiny.load_tokenizer(ws['tokenizer'])
    teacher = tiny.load_model(ws['teacher'])
    rows = tiny.read_dataset(ws['test'])[:n_rows]
    out: Dict[str, Any] = {'start': distribution_gap(ws['student'], teacher, tokenizer, rows)}
    for method in names:
        for seed in cfg['seeds']:
            output_dir = os.path.join(workdir, 'runs', bq.run_key(method, ws, cfg, seed, methods))
            last = os.path.join(output_dir, f"checkpoint-{cfg['steps']}")
            if os.path.isdir(last):
                out.setdefault(method, {})[seed] = distribution_gap(last, teacher, tokenizer, rows)
    return out


def gap_closed(score: float, ws: Dict[str, Any]) -> float:
    """The share of the start-to-teacher gap in exact match that ``score`` closes, in percent."""
    teacher, start = ws['teacher_eval']['exact_match'], ws['student_eval']['exact_match']
    return (score - start) / (teacher - start) * 100 if teacher != start else float('nan')


def versus_live(summary, curves, ws, logs=None, gaps=None) -> List[Dict[str, Any]]:
    """Per method: exact match mean ± std over seeds, the gap closed, the per-seed figures, (store methods) the
    difference from ``live`` paired by seed (mean ± std of the per-seed differences), the logged grad_norm, and
    (``gaps``, :func:`distribution_gaps`) the student's mass outside the teacher's top-k and the forward KL."""
    rows = []
    for method, stats in summary.items():
        mean, std = stats['exact_match']
        row = {'method': method, 'exact_match': mean, 'std': std, 'gap_closed': gap_closed(mean, ws),
               'per_seed': {s: c[-1]['exact_match'] for s, c in sorted(curves[method].items())}}
        if method != 'live' and 'live' in curves:
            seeds = sorted(set(curves[method]) & set(curves['live']))
            diffs = [curves[method][s][-1]['exact_match'] - curves['live'][s][-1]['exact_match'] for s in seeds]
            row['minus_live'] = mean_std(diffs)
            row['minus_live_per_seed'] = dict(zip(seeds, diffs))
        if logs and method in logs:
            row['grad_norm'] = mean_std([v['grad_norm'] for v in logs[method].values()])
        for key in ('student_mass_outside_topk', 'forward_kl'):
            if gaps and gaps.get(method):
                row[key] = mean_std([v[key] for v in gaps[method].values()])
        rows.append(row)
    return rows


def _pm(r, key, fmt='.3f') -> str:
    return f"{r[key][0]:{fmt}} ± {r[key][1]:{fmt}}" if key in r else ''


def store_table(rows, n_seeds: int, steps: int, gaps=None) -> str:
    lines = [f'| method ({n_seeds} seed(s), {steps} steps) | exact match | gap closed | minus live (paired by seed) '
             f'| per seed | logged grad_norm | student mass outside teacher top-{STORE_K} | forward KL (nats/token) |',
             '|---|---|---|---|---|---|---|---|']
    if gaps and 'start' in gaps:
        lines.append(f"| start | | | | | | {gaps['start']['student_mass_outside_topk']:.4f} | "
                     f"{gaps['start']['forward_kl']:.4f} |")
    for r in rows:
        diff = f"{r['minus_live'][0]:+.3f} ± {r['minus_live'][1]:.3f}" if 'minus_live' in r else ''
        seeds = ' / '.join(f'{v:.3f}' for v in r['per_seed'].values())
        lines.append(f"| {r['method']} | {r['exact_match']:.3f} ± {r['std']:.3f} | {r['gap_closed']:.0f}% | {diff} "
                     f"| {seeds} | {_pm(r, 'grad_norm')} | {_pm(r, 'student_mass_outside_topk', '.4f')} | "
                     f"{_pm(r, 'forward_kl', '.4f')} |")
    return '\n'.join(lines)


def store_closing_line(rows, ws, info: Optional[Dict[str, Any]] = None) -> str:
    cells = ', '.join(f"{r['method']} {r['exact_match']:.3f} ± {r['std']:.3f} ({r['gap_closed']:.0f}%"
                      + (f", {r['minus_live'][0]:+.3f} vs live" if 'minus_live' in r else '') + ')' for r in rows)
    tail = (f", top-{info['topk']} of {info['vocab_size']} holds {info['topk_mass_mean'] * 100:.2f}% of the teacher's "
            f"mass, {info['samples']} draws") if info else ''
    return (f"quality[store]: teacher {ws['teacher_eval']['exact_match']:.3f}, "
            f"start {ws['student_eval']['exact_match']:.3f}, {cells}{tail}")


def store_main(bq, args) -> int:
    """The store preset from ``bq`` (bench_quality.py's runner; its learning rate already the default's)."""
    cfg, workdir, t0 = bq.start(args, STORE_PRESETS, 'store ', top_k=STORE_K, samples=STORE_SAMPLES)
    ws = bq.workspace(workdir, cfg)
    names = [m for m in args.methods if m in STORE_METHOD_NAMES]
    info = ensure_store(bq, ws, cfg, workdir)
    methods = store_methods(info['store'])
    # another learning rate (--learning_rate) keeps its results beside the preset's
    lr = '' if bq.LEARNING_RATE == DEFAULT_LEARNING_RATE else f'_lr{bq.LEARNING_RATE}'
    outdir = os.path.join(workdir, 'store' + lr)
    os.makedirs(outdir, exist_ok=True)
    curves = bq.collect_curves(names, ws, cfg, workdir, methods)
    logs = run_logs(bq, workdir, ws, cfg, methods, names)  # fails loudly unless the store answered every row
    gaps = distribution_gaps(bq, workdir, ws, cfg, methods, names)
    summary = bq.summarise(curves)
    rows = versus_live(summary, curves, ws, logs, gaps)
    bq.write_results(outdir, cfg, ws, curves, summary, t0, preset='store', versus_live=rows, run_logs=logs,
                     distribution_gaps=gaps, store=info)
    print(bq.markdown_table(summary, ws, len(cfg['seeds']), cfg['steps']))
    print(store_table(rows, len(cfg['seeds']), cfg['steps'], gaps))
    print(f"store: {info['rows']} rows, {info['tokens']} positions, {info['bytes']} bytes ({info['dtype']}), scored "
          f"once in {info['seconds']:.0f}s; top-{info['topk']} of {info['vocab_size']} vocabulary rows holds "
          f"{info['topk_mass_mean'] * 100:.3f}% of the teacher's mass on average (1st percentile "
          f"{info['topk_mass_p01'] * 100:.2f}%, minimum {info['topk_mass_min'] * 100:.2f}%); teacher entropy "
          f"{info.get('teacher_entropy_mean', float('nan')):.3f} nats; {info['samples']} draws hold "
          f"{info.get('distinct_samples_mean', float('nan')):.2f} distinct ids a position, all one id at "
          f"{info.get('all_draws_one_id', float('nan')) * 100:.1f}% of positions")
    log(f'wrote results.json, results.csv and the plots to {outdir} ({time.time() - t0:.0f}s in all)')
    print(store_closing_line(rows, ws, info))
    return 0

