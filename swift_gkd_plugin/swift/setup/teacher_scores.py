"""``--teacher_scores``, ``--save_teacher_scores`` and ``--gkd_score_only`` before any model loads: a store that does
not fit the run is refused in one line, and a store that covers every row spares loading the teacher.

A store covers a dataset when a finished ``swift-gkd score`` scored that file (by its SHA-256) with this encoding
(the settings that make a row's ids and scored positions: ``options.teacher_scores.ENCODING_FLAGS``, the tokenizer): the
manifest's ``covered`` list.
"""
from __future__ import annotations

import json
import os
from types import SimpleNamespace
from typing import List, Optional

from swift.utils import get_logger

from swift_gkd_plugin.core.scores.store import (MANIFEST, StoreError, read_manifest, same_adapters, same_weights,
                                                write_json_atomic)
from swift_gkd_plugin.options.flags import FlagError
from swift_gkd_plugin.options.teacher_scores import (check_store_fits, covers, dataset_files, encoding, file_sha256,
                                                     samples as _samples)
from swift_gkd_plugin.swift.setup.paths import write_probe_error

logger = get_logger()


def store_teacher(args) -> Optional[str]:
    """The teacher that can score rows the store lacks, as the flag that gives it, or None (the store alone)."""
    if args.teacher_model_server:
        return '--teacher_model_server'
    if args.teacher_model:
        return '--teacher_model'
    if args.teacher_adapters:
        return '--teacher_adapters'
    if getattr(args, '_teacher_use_disable_adapter', False):
        return '--model\'s base (its LoRA adapter off)'
    if args.gkd_score_only:
        return '--model'
    return None  # (a score-only run with --lmbda 1 has --teacher_model or a server: checked apart)


def mark_covered(run_dir: str, files: Optional[List[str]] = None) -> None:
    """A finished score-only run: record in the manifest that the store covers ``files`` (default: its
    ``--dataset`` files), encoded as the run encoded (read from its ``args.json``, ms-swift's record of its
    command-line arguments)."""
    with open(os.path.join(run_dir, 'args.json')) as f:
        args = SimpleNamespace(**json.load(f))
    files = files or dataset_files(args.dataset, subsets=False)
    if not files:
        return
    root = args.save_teacher_scores
    doc = read_manifest(root)
    covered = doc.setdefault('covered', [])
    for path in files:
        entry = {'sha256': file_sha256(path), 'file': os.path.basename(path),
                 'encoding': encoding(args, args.model_dir)}
        if entry not in covered:
            covered.append(entry)
    write_json_atomic(os.path.join(root, MANIFEST), doc)


def resolve_teacher_scores(args) -> None:
    """``--gkd_logits_topk`` unset: the store's k. A store that covers every row of an off-policy run: the
    ``--teacher_model`` is not loaded (said in the start-up log)."""
    if not args.teacher_scores:
        return
    try:
        doc = read_manifest(args.teacher_scores)
    except StoreError:
        return  # refused by check_teacher_scores
    if args.gkd_logits_topk is None:
        args.gkd_logits_topk = int(doc['identity'].get('topk') or 0) or None
        _set_training_arg(args, 'gkd_logits_topk', args.gkd_logits_topk)
    stored_hash = doc['identity'].get('teacher_hash')
    same_teacher = os.path.isdir(args.teacher_model or '') and bool(stored_hash) and same_weights(
        args.teacher_model, stored_hash) and same_adapters(args.teacher_adapters or [], doc['identity'].get(
            'teacher_adapters_hash'))  # (another teacher is refused by check_teacher_scores)
    if same_teacher and not args.teacher_model_server and not _samples(args) and covers(doc, args, args.model_dir):
        logger.info(f'swift_gkd_plugin: --teacher_scores {args.teacher_scores} covers every row of --dataset (a '
                    f'finished `swift-gkd score` of these files and this encoding): --teacher_model '
                    f'{args.teacher_model} is not loaded')
        args.teacher_model = None
        _set_training_arg(args, 'teacher_model', None)


def _set_training_arg(args, name: str, value) -> None:
    if getattr(args, 'training_args', None) is not None and hasattr(args.training_args, name):
        setattr(args.training_args, name, value)


def check_teacher_scores(args) -> None:
    """Refuses, naming the flag, a store or store flags the run cannot use (before any model loads)."""
    flags = [f for f in ('teacher_scores', 'save_teacher_scores') if getattr(args, f)]
    if args.gkd_score_only and not args.save_teacher_scores:
        raise FlagError('--gkd_score_only true needs --save_teacher_scores DIR (the store it writes): run '
                        '`swift-gkd score`')
    if getattr(args, 'group_by_length', False) and not args.gkd_score_only:
        raise FlagError('--group_by_length true batches rows by length in swift-gkd score (--gkd_score_only true) '
                        'only: training draws its rows in a seeded order of generation batches (a resume replays '
                        'it); pass --group_by_length false')
    samples = args.teacher_scores_samples
    if samples and not flags:
        raise FlagError(f'--teacher_scores_samples {samples} draws tokens for a teacher-score store or trains on a '
                        'store\'s: pass --save_teacher_scores DIR or --teacher_scores DIR')
    if not flags:
        return
    named = ' / '.join(f'--{f}' for f in flags)
    if samples:
        _check_samples(args, samples)
    if args.gkd_cross_tokenizer:
        raise FlagError(f'{named} with --gkd_cross_tokenizer {args.gkd_cross_tokenizer}: a store keeps the teacher\'s '
                        'top-k over the student\'s own token ids; a teacher of another tokenizer has none')
    if args.padding_free or args.packing:
        raise FlagError(f'{named} does not support --padding_free / --packing yet: rows are keyed one by one')
    if args.save_teacher_scores and not args.gkd_logits_topk:
        raise FlagError('--save_teacher_scores keeps the teacher\'s top-k: pass --gkd_logits_topk K (e.g. 64; '
                        'the store\'s size grows with K, ~170 bytes a token at 64 in bfloat16)')
    if args.gkd_score_only:
        if args.seq_kd or args.lmbda not in (0, 1):
            raise FlagError(f'--gkd_score_only true scores the dataset\'s rows (--lmbda 0) or the model\'s samples '
                            f'(--lmbda 1, swift-gkd score --sample_with), with --seq_kd false (got --lmbda '
                            f'{args.lmbda}, --seq_kd {args.seq_kd})')
        if args.lmbda == 1 and not (args.teacher_model or args.teacher_model_server):
            raise FlagError('--gkd_score_only true with --lmbda 1 (swift-gkd score --sample_with): the samples of '
                            '--model are scored by a teacher: pass --teacher_model or --teacher_model_server')
        if args.lmbda == 1 and os.path.exists(os.path.join(args.save_teacher_scores, MANIFEST)):
            raise FlagError(f'swift-gkd score --sample_with writes a new store: {args.save_teacher_scores} holds one '
                            'already (samples drawn again would be other rows); pass another --output_dir')
        if args.deepspeed:
            raise FlagError('--gkd_score_only true (swift-gkd score) does not run under --deepspeed: score a teacher '
                            'larger than one device with --device_map auto, or serve it (vllm serve, swift-gkd '
                            'serve-teacher) and pass --teacher_model_server')
    if args.teacher_scores:
        _check_store_fits(args)
        if args.gkd_topk_tail and not args.gkd_logits_topk:  # (the store's k, resolved: none)
            raise FlagError(f'--gkd_topk_tail true needs a top-k: --teacher_scores {args.teacher_scores} holds none '
                            '(only tokens drawn from the teacher); pass --gkd_topk_tail false, or a store of a top-k')
    if args.save_teacher_scores:
        check_writable(args.save_teacher_scores)
    if args.save_teacher_scores and os.path.exists(os.path.join(args.save_teacher_scores, MANIFEST)):
        _check_store_fits(args, args.save_teacher_scores, '--save_teacher_scores', writing=True)


def check_writable(root: str) -> None:
    """``--save_teacher_scores``: the folder (or, not made yet, the nearest folder above it that exists), and an
    existing store's ``shards/``, take a new file now, not after the models loaded or the whole training ran (a file
    is made and removed: permissions alone do not tell, e.g. a read-only mount)."""
    here = os.path.abspath(root)
    while not os.path.lexists(here):
        here = os.path.dirname(here)
    if not os.path.isdir(here):
        raise FlagError(f'--save_teacher_scores {root}: {here} is a file, not a folder: pass a folder (made if '
                        'missing) that this user can write')
    shards = os.path.join(here, 'shards')
    for folder in [here] + ([shards] if here == os.path.abspath(root) and os.path.isdir(shards) else []):
        cause = write_probe_error(folder)
        if cause:
            raise FlagError(f'--save_teacher_scores {root}: {folder} cannot be written ({cause}): pass a folder this '
                            'user can write (made if missing), or make this one writable')


def _check_samples(args, samples: int) -> None:
    """The sampled estimator: forward KL only, on full student logits, from a teacher that can draw."""
    if args.teacher_scores:
        beta = args.beta if args.beta is not None else 0.5
        if args.gkd_divergence != 'jsd' or beta != 0:
            raise FlagError(f'--teacher_scores_samples {samples} trains on tokens drawn from the teacher: an unbiased '
                            'estimate of the forward KL alone, KL(teacher||student): pass --beta 0 (got --beta '
                            f'{beta}, --gkd_divergence {args.gkd_divergence}), or --teacher_scores_samples 0 for '
                            'the top-k divergence')
        if args.gkd_loss_impl == 'fused' or args.gkd_topk_tail:
            raise FlagError(f'--teacher_scores_samples {samples} runs on the dense loss (full student logits): drop '
                            '--gkd_loss_impl fused / --gkd_topk_tail true')
    if args.teacher_model_server:
        raise FlagError(f'--teacher_scores_samples {samples} with --teacher_model_server: a server answers top-k '
                        'log-probabilities, not draws from its distribution; a local --teacher_model draws them')


def _check_store_fits(args, root: Optional[str] = None, flag: str = '--teacher_scores', writing: bool = False) -> None:
    """What makes a store fit a run (:func:`~swift_gkd_plugin.options.teacher_scores.check_store_fits`, shared with
    megatron rlhf); then, reading, what swift rlhf needs of a store without a teacher."""
    store = check_store_fits(args, args.model_dir, root, flag, writing)
    root = root or args.teacher_scores
    if writing:
        return
    if store_teacher(args) is None:
        if _samples(args):
            raise FlagError(f'--lmbda {args.lmbda} / --seq_kd {args.seq_kd} sample new tokens, which {flag} cannot '
                            'hold, and this run has no teacher to score them: pass --teacher_model (or '
                            '--teacher_model_server), or --lmbda 0 --seq_kd false')
        if len(store) == 0:
            raise FlagError(f'{flag} {root} holds no row yet (no finished shard) and this run has no teacher')
