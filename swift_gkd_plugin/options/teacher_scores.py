"""The teacher-score store's checks before any model loads, for ``swift rlhf`` and ``megatron rlhf``: one home (the
run-time checks of a store, once the teacher is loaded or a row is read, are in ``swift/teacher/store.py`` and
:func:`check_loaded_teacher`).

A store fits a run when it was scored on the token ids of the run's tokenizer, with its template, holds at least the
run's ``--gkd_logits_topk`` entries a token, and (with ``--teacher_model``) by that teacher's weights and adapters
(a served teacher's: those its ``GET /health`` reports, compared by the trainer once connected). A store covers
a dataset when a finished ``swift-gkd score`` scored that file (by its SHA-256) with this encoding (the
settings that make a row's ids and scored positions: ``ENCODING_FLAGS``, the tokenizer): the manifest's ``covered``
list (written by :func:`mark_covered`).

Each command adds its own rules: ``swift rlhf``'s flags and stores (:func:`check_teacher_scores`, resolved by
:func:`resolve_teacher_scores`), ``megatron rlhf``'s (:func:`check_teacher_store_flags` and
:func:`check_teacher_store` in the launcher, :func:`check_rank_teacher_store` in each rank, resolved by
:func:`resolve_store_topk` and :func:`resolve_teacher_store`). Checks raise and resolvers change arguments, never both.
"""
from __future__ import annotations

import functools
import json
import logging
import os
from dataclasses import fields
from types import SimpleNamespace
from typing import List, Optional, Sequence

from swift_gkd_plugin.core.scores.media import PROCESSOR_FILES, processor_fingerprint
from swift_gkd_plugin.core.scores.store import (FULL_HASH, MANIFEST, StoreError, StoreIdentity, TeacherStore,
                                                adapters_fingerprint, file_sha256, identity_of, read_manifest,
                                                same_adapters, same_weights, tokenizer_fingerprint,
                                                weights_fingerprint, write_json_atomic)
from swift_gkd_plugin.options.flags import FlagError, GKDPluginArgumentsMixin
from swift_gkd_plugin.options.local_paths import write_probe_error

logger = logging.getLogger('swift')  # ms-swift's logger, where ms-swift has set it up

__all__ = ['samples', 'model_tokenizer_fingerprint', 'file_sha256', 'encoding', 'dataset_files', 'covers',
           'check_store_fits', 'check_store_teacher', 'check_store_served_teacher', 'compare_teacher',
           'teacher_named', 'stored_topk', 'mark_covered',
           # swift rlhf
           'store_teacher', 'check_teacher_scores', 'check_writable', 'resolve_teacher_scores',
           # megatron rlhf
           'WRITE_A_STORE', 'check_teacher_store_flags', 'check_teacher_store', 'check_rank_teacher_store',
           'check_loaded_teacher', 'resolve_store_topk', 'resolve_teacher_store']


def teacher_named(teacher: str, adapters: Sequence[str]) -> str:
    """A local teacher as the run's flags name it: ``--teacher_model ID`` and its ``--teacher_adapters``."""
    return f'--teacher_model {teacher}' + (f' --teacher_adapters {" ".join(adapters)}' if adapters else '')


def samples(args) -> bool:
    """Whether a step may sample new tokens (on-policy, seq_kd), which no store can hold."""
    return args.lmbda > 0 or bool(args.seq_kd)


@functools.lru_cache(maxsize=4)
def model_tokenizer_fingerprint(model_dir: str) -> Optional[str]:
    """The :func:`~swift_gkd_plugin.core.scores.store.tokenizer_fingerprint` of a local model folder's tokenizer, or
    None where it cannot be read (a processor-only repo: the run's own tokenizer is compared at start-up)."""
    from transformers import AutoTokenizer
    try:
        return tokenizer_fingerprint(AutoTokenizer.from_pretrained(model_dir, trust_remote_code=True))
    except Exception as exc:
        logger.warning(f'swift_gkd_plugin: cannot read the tokenizer of {model_dir} to compare it with the teacher '
                       f'scores\' ({exc})')
        return None


#: the settings besides a row's text that make its token ids or its scored positions (what ms-swift's template reads
#: to encode a row: TemplateArguments.get_template_kwargs, the loss scale among them, and the dataset columns and
#: self-cognition names that rewrite a row's text; the teacher's own template): a store covers a file only encoded with
#: the same ones
ENCODING_FLAGS = ('template', 'max_length', 'truncation_strategy', 'system', 'loss_scale', 'is_binary_loss_scale',
                  'max_pixels', 'agent_template', 'norm_bbox', 'use_chat_template', 'response_prefix',
                  'enable_thinking', 'preserve_thinking', 'add_non_thinking_prefix', 'teacher_template', 'columns',
                  'model_name', 'model_author')


def encoding(args, model_dir: Optional[str]) -> dict:
    """What makes a row's token ids and scored positions (and a multimodal row's inputs) besides its text: the
    :data:`ENCODING_FLAGS` as the run resolved them, the tokenizer's fingerprint, the processor's; as JSON keeps them
    (a manifest's ``covered`` entries compare with it)."""
    found = {name: getattr(args, name, None) for name in ENCODING_FLAGS}
    found['tokenizer'] = model_tokenizer_fingerprint(model_dir) if model_dir else None
    processor = processor_fingerprint(model_dir)
    if processor:  # (a text model's encoding is as before media were keyed)
        found['processor'] = processor
    return json.loads(json.dumps(found, default=str))


def dataset_files(values, subsets: bool = True) -> Optional[List[str]]:
    """The local files of ``--dataset``, or None where one is not a local file (or, without ``subsets``, names a
    ``#N`` subset: a score of a subset does not cover its file; a run on a subset of a covered file is covered)."""
    files = []
    for value in values or []:
        path = value if os.path.isfile(value) or not subsets else value.split('#')[0]
        if not os.path.isfile(path):
            return None
        files.append(os.path.abspath(path))
    return files


def covers(doc: dict, args, model_dir: Optional[str]) -> bool:
    """Whether the manifest ``doc`` covers every ``--dataset`` and ``--val_dataset`` file of ``args`` with their
    encoding."""
    files = dataset_files(list(args.dataset or []) + list(getattr(args, 'val_dataset', None) or []))
    if not files:
        return False
    wanted = _canonical(encoding(args, model_dir))
    done = {(e.get('sha256'), _canonical(e.get('encoding', {}))) for e in doc.get('covered', [])}
    return all((file_sha256(p), wanted) in done for p in files)


def _canonical(found: dict) -> str:
    """An encoding as one string (an entry of a store written before :data:`ENCODING_FLAGS` grew lacks the new
    settings, so it covers nothing: the teacher is loaded, and the store's rows are still read by their keys)."""
    return json.dumps(found, sort_keys=True, default=str)


def stored_topk(doc: dict) -> Optional[int]:
    """The top-k a store's manifest ``doc`` holds a token (None: only tokens drawn from the teacher)."""
    return int(doc['identity'].get('topk') or 0) or None


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


def check_store_teacher(root: str, identity: StoreIdentity, teacher: str, teacher_dir: Optional[str],
                        flag: str = '--teacher_scores', adapters: Sequence[str] = ()) -> str:
    """Refuses (:class:`FlagError`) reading the store at ``root`` beside a local teacher whose weights
    (``teacher_dir``'s files) or adapters (``adapters``' files: ``--teacher_adapters``) are not those the store's
    ``teacher_hash`` and ``teacher_adapters_hash`` fingerprinted: the run would train on two teachers' answers.
    ``teacher``: how the run names it (``--teacher_model ID``). Returns what was compared, for the log; '' where
    nothing was: the store keeps no fingerprint (a served teacher that reported none scored it) or ``teacher_dir`` holds
    no weight file (a hub id before its download; the trainer checks once the teacher is loaded)."""
    if not identity.teacher_hash or not teacher_dir:
        return ''
    found = weights_fingerprint(teacher_dir, like=identity.teacher_hash)
    if not found:
        return ''
    where = '' if teacher_dir in teacher else f' (loaded from {teacher_dir})'
    found_adapters = None if identity.teacher_adapters_hash is None else adapters_fingerprint(adapters)
    return compare_teacher(root, identity, teacher + where, found, found_adapters, "this run's", flag)


def compare_teacher(root: str, identity: StoreIdentity, teacher: str, weights: str, adapters: Optional[str],
                    source: str, flag: str = '--teacher_scores') -> str:
    """Refuses (:class:`FlagError`, one line naming the store, ``teacher``, the differing fingerprints and where each
    came from: the store's manifest, ``source``) a run's teacher whose fingerprints (``weights``, ``adapters``: None
    where unknown) are not the store's. The adapters are compared where both are known. Returns what was compared."""
    stored = identity.teacher_adapters_hash
    if weights != identity.teacher_hash:
        what, theirs, ours = 'weights', identity.teacher_hash, weights
    elif stored is not None and adapters is not None and adapters != stored:
        what, theirs, ours = 'adapters', stored or 'none', adapters or 'none'
    elif stored is None:
        return (f'fingerprint {weights}; the store was written before adapters were fingerprinted, so an adapter was '
                'not compared')
    elif adapters is None:
        return f'fingerprint {weights}; no fingerprint of its adapters, which were not compared'
    else:
        return f'fingerprint {weights}, ' + (f'adapters {adapters}' if adapters else 'no adapter')
    raise FlagError(f'{flag} {root} was scored by another teacher ({identity.teacher}) than {teacher}: their {what} '
                    f'differ (the store\'s manifest.json: {theirs}; {source}: {ours}), and the store and the teacher '
                    'would give two teachers\' answers in one run. Pass the store\'s teacher, or another store')


def check_store_served_teacher(root: str, identity: StoreIdentity, url: str, weights: Optional[str],
                               adapters: Optional[str], flag: str = '--teacher_scores') -> str:
    """Refuses (:class:`FlagError`) reading the store at ``root`` beside the teacher served at ``url`` whose
    fingerprints, as its ``GET /health`` reports them (``weights``, ``adapters``: None where it reports none), are
    not the store's teacher's: another model behind the same URL. Returns the log's line: what was compared, or why
    nothing could be (a server that reports no fingerprint, a store that keeps none)."""
    if not weights:
        return (f'the teacher server {url} reports no fingerprint of its weights (GET /health: ms-swift\'s server, '
                f'or this plugin\'s before issue 96), so whether it serves the teacher that scored {flag} {root} '
                f'({identity.teacher}) was not compared')
    if not identity.teacher_hash.startswith(FULL_HASH):
        kept = ('keeps no fingerprint of its teacher (a served teacher that reported none scored it)'
                if not identity.teacher_hash else 'keeps the sampled fingerprint of a store written before issue 89')
        return f'{flag} {root} {kept}, so the teacher server {url} was not compared with its teacher'
    account = compare_teacher(root, identity, f'--teacher_model_server {url} serves', weights, adapters,
                              f'GET {url}/health', flag)
    return f'the teacher server {url} serves the weights that scored {flag} {root} ({account}; reported by its GET ' \
        '/health)'


def check_store_fits(args, model_dir: Optional[str], root: Optional[str] = None, flag: str = '--teacher_scores',
                     writing: bool = False, reads_samples: bool = True) -> Optional[TeacherStore]:
    """Refuses (:class:`FlagError`, naming the flag) a store at ``root`` (``--teacher_scores``) that does not fit the
    run: unreadable, another tokenizer than ``model_dir``'s (skipped where None: a hub id the launcher does not
    download), another ``--template`` (skipped where ``args.template`` is None), fewer top-k entries than
    ``--gkd_logits_topk``, another count of draws than ``--teacher_scores_samples`` asks for, draws at another
    ``--temperature`` (unless the run reads no draws: not ``reads_samples``), or scored by another
    ``--teacher_model``. ``writing``: a store this run would append to (``--save_teacher_scores``): the same k, draws
    and dtype instead. Returns the store opened for reading (None when ``writing``)."""
    root = root or args.teacher_scores
    try:
        store = TeacherStore(root) if not writing else None
        identity = store.identity if store is not None else identity_of(read_manifest(root))
    except (StoreError, OSError) as exc:
        raise FlagError(f'{flag} {root}: {exc}') from None
    if args.template and identity.template != args.template:
        raise FlagError(f'{flag} {root} was scored with --template {identity.template}, this run uses --template '
                        f'{args.template}: pass --template {identity.template}, or score again')
    k = args.gkd_logits_topk
    if identity.topk and k and k > identity.topk and not writing:
        raise FlagError(f'--gkd_logits_topk {k} is larger than {flag} {root} holds (top-{identity.topk}): pass '
                        f'--gkd_logits_topk 1 to {identity.topk}, or score again with a larger k')
    drawn = getattr(args, 'teacher_scores_samples', 0) or 0
    if writing and (identity.topk != k or identity.dtype != args.teacher_scores_dtype or identity.samples != drawn):
        raise FlagError(f'{flag} {root} holds top-{identity.topk} and {identity.samples} samples in {identity.dtype}, '
                        f'this run would add top-{k} and {drawn} samples in {args.teacher_scores_dtype}: pass those, '
                        'or another folder')
    if not writing and drawn and identity.samples != drawn:
        raise FlagError(f'--teacher_scores_samples {drawn}: {flag} {root} holds {identity.samples} drawn tokens a '
                        f'position (pass --teacher_scores_samples {identity.samples}: a subset of the sorted draws '
                        'would not be a sample of the teacher; 0 trains on its top-k)')
    if identity.samples and reads_samples and abs(identity.temperature - args.temperature) > 1e-9:
        raise FlagError(f'{flag} {root} drew its samples at --temperature {identity.temperature}, this run uses '
                        f'{args.temperature}')
    teacher = getattr(args, 'teacher_model', None)
    if teacher and not writing and os.path.isdir(teacher):  # (a hub id: checked once loaded, by the trainer)
        adapters = list(getattr(args, 'teacher_adapters', None) or [])
        check_store_teacher(root, identity, teacher_named(teacher, adapters), teacher, flag, adapters)
    processor = processor_fingerprint(model_dir) if model_dir and os.path.isdir(model_dir) else None
    if processor is not None and processor != identity.processor:
        raise FlagError(f'{flag} {root} was scored with other processor settings than --model {args.model}\'s ('
                        + (f'fingerprint {identity.processor or "none: a text store"} against {processor or "none"}'
                           ) + f' of its {" / ".join(PROCESSOR_FILES)}): its media would be other inputs. '
                        'Score the dataset again with this model\'s processor')
    # last: reading the tokenizer imports transformers' tokenizers (~4 s of a launcher's start)
    fingerprint = model_tokenizer_fingerprint(model_dir) if model_dir else None
    if fingerprint is not None and fingerprint != identity.tokenizer:
        raise FlagError(f'{flag} {root} was scored on the token ids of another tokenizer than --model '
                        f'{args.model}\'s (fingerprint {identity.tokenizer} against {fingerprint}): its rows would '
                        'be other tokens. Score the dataset again with this tokenizer')
    return store


# --- swift rlhf: its store flags and stores (checks in check_gkd_arguments, the resolver in resolve_gkd_arguments) ---

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
        args.gkd_logits_topk = stored_topk(doc)
        _set_training_arg(args, 'gkd_logits_topk', args.gkd_logits_topk)
    stored_hash = doc['identity'].get('teacher_hash')
    same_teacher = os.path.isdir(args.teacher_model or '') and bool(stored_hash) and same_weights(
        args.teacher_model, stored_hash) and same_adapters(args.teacher_adapters or [], doc['identity'].get(
            'teacher_adapters_hash'))  # (another teacher is refused by check_teacher_scores)
    if same_teacher and not args.teacher_model_server and not samples(args) and covers(doc, args, args.model_dir):
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
    drawn = args.teacher_scores_samples
    if drawn and not flags:
        raise FlagError(f'--teacher_scores_samples {drawn} draws tokens for a teacher-score store or trains on a '
                        'store\'s: pass --save_teacher_scores DIR or --teacher_scores DIR')
    if not flags:
        return
    named = ' / '.join(f'--{f}' for f in flags)
    if drawn:
        _check_samples(args, drawn)
    if args.gkd_cross_tokenizer:
        raise FlagError(f'{named} with --gkd_cross_tokenizer {args.gkd_cross_tokenizer}: a store keeps the teacher\'s '
                        'top-k over the student\'s own token ids; a teacher of another tokenizer has none')
    if args.padding_free or args.packing:
        raise FlagError(f'{named} does not support --padding_free / --packing yet: rows are keyed one by one')
    if args.save_teacher_scores and not args.gkd_logits_topk:
        raise FlagError('--save_teacher_scores keeps the teacher\'s top-k: pass --gkd_logits_topk K (e.g. 64; '
                        'the store\'s size grows with K, ~150-170 bytes a token at 64)')
    if args.gkd_score_only:
        if args.seq_kd or args.lmbda not in (0, 1):
            raise FlagError(f'--gkd_score_only true scores the dataset\'s rows (--lmbda 0) or the model\'s samples '
                            f'(--lmbda 1, swift-gkd score --sample_with), with --seq_kd false (got --lmbda '
                            f'{args.lmbda}, --seq_kd {str(bool(args.seq_kd)).lower()})')
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


def _check_samples(args, drawn: int) -> None:
    """The sampled estimator: forward KL only, on full student logits, from a teacher that can draw."""
    if args.teacher_scores:
        beta = args.beta if args.beta is not None else 0.5
        if args.gkd_divergence != 'jsd' or beta != 0:
            raise FlagError(f'--teacher_scores_samples {drawn} trains on tokens drawn from the teacher: an unbiased '
                            'estimate of the forward KL alone, KL(teacher||student): pass --beta 0 (got --beta '
                            f'{beta}, --gkd_divergence {args.gkd_divergence}), or --teacher_scores_samples 0 for '
                            'the top-k divergence')
        if args.gkd_loss_impl == 'fused' or args.gkd_topk_tail:
            raise FlagError(f'--teacher_scores_samples {drawn} runs on the dense loss (full student logits): drop '
                            '--gkd_loss_impl fused / --gkd_topk_tail true')
    if args.teacher_model_server:
        raise FlagError(f'--teacher_scores_samples {drawn} with --teacher_model_server: a server answers top-k '
                        'log-probabilities, not draws from its distribution; a local --teacher_model draws them')


def _check_store_fits(args, root: Optional[str] = None, flag: str = '--teacher_scores', writing: bool = False) -> None:
    """What makes a store fit a run (:func:`~swift_gkd_plugin.options.teacher_scores.check_store_fits`, shared with
    megatron rlhf); then, reading, what swift rlhf needs of a store without a teacher."""
    store = check_store_fits(args, args.model_dir, root, flag, writing)
    root = root or args.teacher_scores
    if writing:
        return
    if store_teacher(args) is None:
        if samples(args):
            raise FlagError(f'--lmbda {args.lmbda} / --seq_kd {str(bool(args.seq_kd)).lower()} sample new tokens, which {flag} cannot '
                            'hold, and this run has no teacher to score them: pass --teacher_model (or '
                            '--teacher_model_server), or --lmbda 0 --seq_kd false')
        if len(store) == 0:
            raise FlagError(f'{flag} {root} holds no row yet (no finished shard) and this run has no teacher')


# --- megatron rlhf: it reads a store and writes none (the launcher's checks, then each rank's) ---

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
    try:
        args.gkd_logits_topk = stored_topk(read_manifest(args.teacher_scores))
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


def check_rank_teacher_store(args) -> None:
    """``--teacher_scores`` in a rank, the model resolved: the store fits the run (the launcher's checks, the
    tokenizer and template now known for hub models too); text rows only."""
    if not args.teacher_scores:
        return
    if getattr(getattr(args, 'model_meta', None), 'is_multimodal', False):
        raise FlagError(f'--teacher_scores with a multimodal --model ({args.model}): megatron rlhf reads text-only '
                        'stores for now (a multimodal row\'s key holds its media, which megatron\'s batches do not '
                        'carry); swift rlhf reads multimodal stores')
    check_teacher_store(args, args.model_dir)


def resolve_teacher_store(args) -> None:
    """``--teacher_scores`` in a rank, after :func:`check_rank_teacher_store`: a store that covers every row of
    ``--dataset`` (a finished ``swift-gkd score`` of these files, this encoding and this ``--teacher_model``'s weights)
    in a run that samples nothing spares loading ``--teacher_model`` (as in ``swift rlhf``): the store answers every
    row, and the student is not its own teacher."""
    teacher = args.teacher_model
    if not args.teacher_scores or not teacher or args.teacher_model_server or samples(args) \
            or not os.path.isdir(teacher):
        return
    doc = read_manifest(args.teacher_scores)  # (readable: check_rank_teacher_store opened the store)
    identity = identity_of(doc)
    if not same_weights(teacher, identity.teacher_hash) or not same_adapters(
            [], identity.teacher_adapters_hash) or not covers(doc, args, args.model_dir):
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
