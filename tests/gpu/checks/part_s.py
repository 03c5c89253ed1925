"""Part s: the teacher-score store at real shapes (issue 80): ``swift-gkd score`` then ``swift rlhf --teacher_scores``.

The 1.5B-shaped teacher scores long rows once into a bfloat16 and a float32 store (top-64 + tail); then off-policy
runs of the 0.5B-shaped student at learning rate 0 on the same rows: the live teacher (top-64) against each store.
Per run: exit, losses, step time, ms-swift's reserved memory, the GPU's peak in use, whether the teacher was loaded;
per store: rows, tokens, bytes a token, the scoring loop's tokens a second. Compared: each store's losses against
the live teacher's (issue 80's aims: float32 1e-6, bfloat16 1e-3 relative) and the steps a second and memory
without the teacher.
"""
from __future__ import annotations

import argparse
import os
import shutil

from common import Results, build_workspace, finite, max_rel, ratio, rlhf_argv, run_rlhf
from part_a import long_dataset

TOPK = 64


def score_argv(ws, store: str, data: str, dtype: str, max_length: int, batch: int, device: str):
    """``swift rlhf``'s command line of ``swift-gkd score`` (the plugin's own builder: what the console script runs)
    for the workspace's teacher over ``data``."""
    from swift_gkd_plugin.entry import score
    parser = argparse.ArgumentParser()
    score.add_arguments(parser)
    args, rest = parser.parse_known_args([
        '--teacher_model', ws.teacher, '--dataset', data, '--output_dir', store, '--gkd_logits_topk', str(TOPK),
        '--teacher_scores_dtype', dtype, '--per_device_train_batch_size', str(batch),
        '--model_type', 'qwen2', '--template', 'qwen2_5', '--max_length', str(max_length), '--torch_dtype', ws.dtype,
        '--check_model', 'false', '--dataloader_num_workers', '0', '--dataset_num_proc', '1', '--logging_steps', '1',
        *(['--use_cpu', 'true'] if device == 'cpu' else [])])
    return score.score_command(args, rest)[1:]  # without 'rlhf': run_rlhf runs `swift rlhf`


def run_score(args, res: Results, ws, data: str, dtype: str, max_length: int):
    """One ``swift-gkd score`` into a fresh store: its row (rows, tokens, bytes a token, the scoring loop's tokens a
    second: ms-swift's ``train_runtime``, start-up and loading left out)."""
    from swift_gkd_plugin.core.scores.store import TeacherStore, read_manifest
    store = os.path.join(args.work, f's_store_{dtype}')
    shutil.rmtree(store, ignore_errors=True)
    r = run_rlhf(score_argv(ws, store, data, dtype, max_length, 4, args.device), timeout=args.run_timeout,
                 log_path=os.path.join(args.work, f's_score_{dtype}.log'))
    row = dict(case=f'score_{dtype}', rc=r['rc'], wall_s=r['wall_s'])
    if r['rc'] != 0 or not os.path.exists(os.path.join(store, 'manifest.json')):
        return res.add(**row, ok=False, error=r['error'] or 'no manifest.json written')
    written, covered, loop = TeacherStore(store), bool(read_manifest(store).get('covered')), r['runtime_s']
    return res.add(**row, ok=covered and written.tokens > 0, store=store, covered=covered, rows=len(written),
                   tokens=written.tokens, bytes=written.bytes, bytes_per_token=written.bytes / max(written.tokens, 1),
                   loop_s=loop, tokens_per_s=written.tokens / loop if finite(loop) and loop else None)


def run(args) -> Results:
    res = Results('s', 'the teacher-score store at real shapes: swift-gkd score, then swift rlhf from it vs live')
    # bfloat16 models at every size: users' dtype, whose teacher hidden states reach the top-k head in float32
    # (on CPU too: the tiny run is the CPU test of this path)
    ws = build_workspace(os.path.join(args.work, 's_bf16') if args.tiny else args.work, args.tiny, args.device,
                         dtype='bfloat16')
    steps = args.steps or (2 if args.tiny else 6)
    batch = 2 if args.tiny else 4
    letters, max_length = ((20, 100), 512) if args.tiny else ((300, 3000), 4096)
    data = long_dataset(os.path.join(args.work, 's_rows.jsonl'), *letters, rows=steps * batch)
    stores = {}
    for dtype in ('bfloat16', 'float32'):
        row = run_score(args, res, ws, data, dtype, max_length)
        if row['ok']:
            stores[dtype] = row['store']
    flags = dict(lmbda=0, seq_kd='false', learning_rate=0, dataset=data, max_length=max_length,
                 per_device_train_batch_size=batch, gkd_logits_topk=TOPK, split_dataset_ratio=0)
    if args.device == 'cpu':
        flags['use_cpu'] = 'true'
    runs = {}
    for case, store in [('live', None)] + [(f'store_{d}', stores.get(d)) for d in ('bfloat16', 'float32')]:
        if case != 'live' and store is None:
            res.add(case=case, ok=False, rc='not run', error='its store was not written (above)')
            continue
        log_path = os.path.join(args.work, f's_run_{case}.log')
        r = run_rlhf(rlhf_argv(ws, os.path.join(args.work, f's_run_{case}'), steps, teacher_scores=store, **flags),
                     timeout=args.run_timeout, log_path=log_path)
        with open(log_path) as f:
            not_loaded = 'is not loaded' in f.read()
        store_rows = [x['gkd/teacher_store_rows'] for x in r['logs'] if 'gkd/teacher_store_rows' in x]
        ok = (r['rc'] == 0 and r['plugin_active'] and len(r['losses']) == steps and all(map(finite, r['losses']))
              and not_loaded == (store is not None) and (store is None or (store_rows and min(store_rows) == 1.0)))
        runs[case] = res.add(case=case, ok=ok, rc=r['rc'], teacher_loaded=not not_loaded, losses=r['losses'],
                             store_rows=store_rows or None, step_s=r['step_s'], reserved_gib=r['reserved_gib'],
                             device_peak_gib=r['device_peak_gib'], wall_s=r['wall_s'], error=r['error'])
    live = runs.get('live')
    for case, r in runs.items():
        if case == 'live' or not live or not live['ok'] or not r['ok']:
            continue
        r['max_rel_loss_diff_vs_live'] = max_rel(r['losses'], live['losses'], 1e-12)
        r['aim'] = 1e-6 if case.endswith('float32') else 1e-3
        r['within_aim'] = r['max_rel_loss_diff_vs_live'] <= r['aim']
        r['speedup_vs_live'] = ratio(live['step_s'], r['step_s'])
        for key in ('reserved_gib', 'device_peak_gib'):
            r[f'{key}_vs_live'] = ratio(r[key], live[key])
    if not all(r['ok'] for r in res.rows):
        res.status = 'partial'
    res.note(f'rows: {letters[0]}-letter prompts, {letters[1]}-letter answers ({steps * batch} rows), --max_length '
             f'{max_length}, top-{TOPK}; score: batch 4 a process; training: batch {batch}, {steps} steps at lr 0, '
             'off-policy (--lmbda 0), the same rows in the same order in every run; loop_s: the scoring loop '
             "(ms-swift's train_runtime); step_s: mean step after the first (train_speed); device_peak_gib: NVML")
    return res
