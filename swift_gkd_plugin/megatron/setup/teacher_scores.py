"""``--teacher_scores`` in ``megatron rlhf``: the store flags it takes and refuses, and the store's checks, in the
launcher before any rank starts and again in each rank once the model is resolved.

megatron rlhf reads a teacher-score store and writes none (``swift-gkd score`` and ``swift rlhf --save_teacher_scores``
write them); whether a store fits a run is decided by :mod:`swift_gkd_plugin.options.teacher_scores`, as in
``swift rlhf``. Framework-free: the launcher imports it.
"""
from __future__ import annotations

import logging
import os
from dataclasses import fields
from typing import Optional

from swift_gkd_plugin.options.flags import FlagError, GKDPluginArgumentsMixin
from swift_gkd_plugin.options.teacher_scores import check_store_fits, check_store_teacher, covers, samples

logger = logging.getLogger('swift')  # ms-swift's logger, where ms-swift has set it up


#: how a store is written, for the refusals of the flags that write one
WRITE_A_STORE = ('write the store with `swift-gkd score` (or `swift rlhf --save_teacher_scores DIR`), then pass it '
                 'here as --teacher_scores DIR')


def check_teacher_store_flags(args) -> None:
    """megatron rlhf reads a teacher-score store (``--teacher_scores``) and writes none: ``--save_teacher_scores``,
    ``--gkd_score_only`` and ``--teacher_scores_dtype`` (they write one) are refused, naming how to write it. A store
    answers the dataset's rows only: beside steps that sample (``--lmbda`` > 0, ``--seq_kd``) it needs a local
    ``--teacher_model`` for the new rows; beside ``--teacher_model_server`` it is refused (swift rlhf runs that)."""
    if args.save_teacher_scores:
        raise FlagError(f'--save_teacher_scores {args.save_teacher_scores} is supported by swift rlhf only: megatron '
                        f'rlhf reads a teacher-score store (--teacher_scores) and writes none; {WRITE_A_STORE}')
    if args.gkd_score_only:
        raise FlagError('--gkd_score_only true is supported by swift rlhf only (it is what `swift-gkd score` runs): '
                        'megatron rlhf reads a teacher-score store (--teacher_scores) and writes none; '
                        f'{WRITE_A_STORE}')
    default_dtype = next(f.default for f in fields(GKDPluginArgumentsMixin) if f.name == 'teacher_scores_dtype')
    if args.teacher_scores_dtype != default_dtype:
        raise FlagError(f'--teacher_scores_dtype {args.teacher_scores_dtype} is the dtype of a store being written, '
                        f'which megatron rlhf does not write (a store read keeps its own dtype); {WRITE_A_STORE}')
    drawn = getattr(args, 'teacher_scores_samples', 0)
    if drawn:
        raise FlagError(f'--teacher_scores_samples {drawn} is supported by swift rlhf only: megatron rlhf trains on a '
                        'store\'s top-k (its vocabulary-parallel loss), not on tokens drawn from the teacher. Allowed: '
                        '0 (a store that holds draws is read for its top-k)')
    if not args.teacher_scores:
        return
    if args.teacher_model_server is not None:
        raise FlagError(f'--teacher_scores with --teacher_model_server {args.teacher_model_server} is supported by '
                        'swift rlhf only yet: megatron rlhf answers the rows a store lacks with a local teacher. '
                        'Allowed: --teacher_scores alone, or with --teacher_model')
    if samples(args) and not args.teacher_model:
        raise FlagError(f'--lmbda {args.lmbda:g} / --seq_kd {str(bool(args.seq_kd)).lower()} sample new tokens, which '
                        '--teacher_scores cannot hold, and this run has no teacher to score them: pass --teacher_model '
                        '(it scores the rows the store lacks), or --lmbda 0 --seq_kd false')


def resolve_store_topk(args) -> None:
    """``--teacher_scores`` without ``--gkd_logits_topk``: the store's k (as in swift rlhf). A store whose manifest
    cannot be read is left to :func:`check_teacher_store`."""
    if not args.teacher_scores or args.gkd_logits_topk is not None:
        return
    from swift_gkd_plugin.core.scores.store import StoreError, read_manifest
    try:
        args.gkd_logits_topk = int(read_manifest(args.teacher_scores)['identity'].get('topk') or 0) or None
    except (StoreError, OSError, TypeError, ValueError):
        pass


def check_teacher_store(args, model_dir: Optional[str]):
    """``--teacher_scores``: a store that does not fit the run is refused (another tokenizer than ``model_dir``'s,
    another ``--template``, fewer top-k entries than ``--gkd_logits_topk``, another ``--teacher_model``: the checks of
    :func:`~swift_gkd_plugin.options.teacher_scores.check_store_fits`). Without a teacher, a store that holds no row
    yet is refused too. Returns the store (None without ``--teacher_scores``)."""
    if not args.teacher_scores:
        return None
    store = check_store_fits(args, model_dir, reads_samples=False)  # (the top-k only: its draws are not read)
    if not store.identity.topk:
        raise FlagError(f'--teacher_scores {args.teacher_scores} holds no top-k (only tokens drawn from the teacher): '
                        'megatron rlhf trains on a store\'s top-k; score one with --gkd_logits_topk K')
    if not args.teacher_model and len(store) == 0:
        raise FlagError(f'--teacher_scores {args.teacher_scores} holds no row yet (no finished shard) and this run has '
                        'no teacher: pass --teacher_model, or score the dataset first (`swift-gkd score`)')
    return store


def resolve_teacher_store(args) -> None:
    """``--teacher_scores`` in a rank, the model resolved: the store fits the run (the launcher's checks, the
    tokenizer and template now known for hub models too); text rows only; a store that covers every row of
    ``--dataset`` (a finished ``swift-gkd score`` of these files, this encoding and this ``--teacher_model``'s weights)
    in a run that samples nothing spares loading ``--teacher_model`` (as in ``swift rlhf``): the store answers every
    row, and the student is not its own teacher."""
    if not args.teacher_scores:
        return
    if getattr(getattr(args, 'model_meta', None), 'is_multimodal', False):
        raise FlagError(f'--teacher_scores with a multimodal --model ({args.model}): megatron rlhf reads text-only '
                        'stores for now (a multimodal row\'s key holds its media, which megatron\'s batches do not '
                        'carry); swift rlhf reads multimodal stores')
    store = check_teacher_store(args, args.model_dir)
    teacher = args.teacher_model
    if not teacher or args.teacher_model_server or samples(args) or not os.path.isdir(teacher):
        return
    from swift_gkd_plugin.core.scores.store import same_adapters, same_weights
    if not same_weights(teacher, store.identity.teacher_hash) or not same_adapters(
            [], store.identity.teacher_adapters_hash) or not covers(store.manifest, args, args.model_dir):
        return  # (megatron rlhf's teacher has no adapter: a store scored with one is refused once it loads)
    logger.info(f'swift_gkd_plugin: --teacher_scores {args.teacher_scores} covers every row of --dataset (a '
                f'finished `swift-gkd score` of these files and this encoding): --teacher_model {teacher} is not '
                'loaded')
    args.teacher_model = args.teacher_model_dir = None


def check_loaded_teacher(args, store) -> None:
    """``--teacher_scores`` beside the local teacher the ranks loaded (``--teacher_model``, or the student's base with
    its LoRA adapter off): its weights are those that scored ``store``, with no adapter as the store's teacher (a
    store scored with one is another teacher), or :class:`FlagError` (the trainer stops before step 1, as ``swift
    rlhf``'s). A hub id's weights exist only once downloaded: the launcher compared a local folder only."""
    if args.teacher_model_dir:
        named, folder = f'--teacher_model {args.teacher_model}', args.teacher_model_dir
    else:  # the student's base
        named, folder = f'this run\'s teacher, the student\'s base {args.model_dir}', args.model_dir
    compared = check_store_teacher(args.teacher_scores, store.identity, named, folder)
    if compared:
        logger.info(f'swift_gkd_plugin: {named} has the weights that scored --teacher_scores {args.teacher_scores} '
                    f'({compared})')
