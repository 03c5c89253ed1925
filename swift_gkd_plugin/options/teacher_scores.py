"""``--teacher_scores``: whether a store fits a run, checked before any model loads, for ``swift rlhf`` and
``megatron rlhf`` alike (each adapter adds its own rules: ``swift/setup/teacher_scores.py``,
``megatron/setup/checks.py``).

A store fits a run when it was scored on the token ids of the run's tokenizer, with its template, holds at least the
run's ``--gkd_logits_topk`` entries a token, and (with ``--teacher_model``) by that teacher's weights and adapters
(a served teacher's: those its ``GET /health`` reports, compared by the trainer once connected). A store covers
a dataset when a finished ``swift-gkd score`` scored that file (by its SHA-256) with this encoding (the
settings that make a row's ids and scored positions: ``ENCODING_FLAGS``, the tokenizer): the manifest's ``covered``
list.
"""
from __future__ import annotations

import functools
import json
import logging
import os
from typing import List, Optional, Sequence

from swift_gkd_plugin.core.scores.media import PROCESSOR_FILES, processor_fingerprint
from swift_gkd_plugin.core.scores.store import (FULL_HASH, StoreError, StoreIdentity, TeacherStore,
                                                adapters_fingerprint, file_sha256, identity_of, read_manifest,
                                                tokenizer_fingerprint, weights_fingerprint)
from swift_gkd_plugin.options.flags import FlagError

logger = logging.getLogger('swift')  # ms-swift's logger, where ms-swift has set it up

__all__ = ['samples', 'model_tokenizer_fingerprint', 'file_sha256', 'encoding', 'dataset_files', 'covers',
           'check_store_fits', 'check_store_teacher', 'check_store_served_teacher', 'compare_teacher',
           'teacher_named']


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
