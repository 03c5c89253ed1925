"""Local datasets of a GKD run (``.jsonl``, ``.json``, ``.csv``, ``.parquet``, ``.arrow``; of a folder, the files
``datasets`` reads of it), read once before any model is loaded. In the adapter: it reads ms-swift's dataset syntax and preprocessors (ms-swift's runtime).

ms-swift reads them later, after both models are loaded, and then fails badly: an empty file ends in a bare
``StopIteration``, a line that is not UTF-8 in a ``UnicodeDecodeError`` that names neither the file nor the line, a
broken JSON array in a ``DatasetGenerationError``; and rows it cannot use (an unknown role, a response of numbers) are
dropped without a word, or all of them, which ends in a resampling error. Here each problem is reported with the flag,
the file and the line (the index of a JSON array's item).

Rows with nothing to distil (no assistant response, in the column names that ms-swift's automatic preprocessor
understands) are named too: a dataset step (off-policy) has no response token to distil on them. When no step can
sample them (``--lmbda 0``, no ``--seq_kd``; or a validation set, which is always scored on its own responses) they
are refused; otherwise they are only reported, since on-policy and seq_kd steps sample a response for them, except
rows without a user message (e.g. a system turn only): ms-swift cannot encode those, and each step draws another row
in their place, so the report says they are dropped. A training set without a single prompt (a ``text`` column alone,
assistant messages only) is refused where on-policy or seq_kd steps sample (:func:`_rows_without_prompt`).

Media columns (``images``, ``videos``, ``audios``) are checked too. ms-swift replaces a row whose image it cannot
read by another row (an INFO line only), and a text-only model keeps a row's ``<image>`` tag as literal text and
never sees the image: both trained on something else than the user's data with exit code 0. Here a local media file
that is missing (or an image that cannot be opened) is refused by file, line and path, and so is a media row given to
a text-only model. URLs and inline (base64) media are left to ms-swift: they are read only when the row is encoded.
"""
from __future__ import annotations

import math
import os
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

from swift.dataset.dataset_syntax import DatasetSyntax
from swift.utils import get_logger
from transformers import TrainerCallback

from swift_gkd_plugin.options.flags import FlagError
from swift_gkd_plugin.data.dataset_files import (Where, all_read_here, check_fresh_adapter_teacher, check_teacher_given,
                                                 dataset_rows, local_dataset_files)
from swift_gkd_plugin.data.dataset_rows import (empty_prompt, has_prompt, has_response, mapped_row, media_problem,
                                           media_refs, media_tag_problem, misspelt_columns, privileged_problem,
                                           prompt_missing, response_problem, row_problem)

logger = get_logger()

LINES_SHOWN = 10
_NO_SAMPLING = {
    '--dataset': ('--lmbda 0 without --seq_kd only distils on dataset responses. Remove those rows, or let the '
                  'student (--lmbda > 0) or the teacher (--seq_kd true) sample responses for them.'),
    '--val_dataset': 'evaluation only distils on dataset responses. Remove those rows from the validation set.',
}


def scan_rows(flag: str, path: str, standard_format: bool, columns: Dict[str, str], multimodal: bool,
              by_steps: Callable[[dict], Tuple[Optional[str], Optional[str]]] = None) -> dict:
    """Reads the whole file (refusing what cannot be read): its number of rows, and where each of its rows is with
    a problem: ``bad`` (ms-swift would drop it) and ``privileged`` (its teacher columns) as ``(where, problem)``,
    ``no_response`` as ``(where, has a prompt)``, ``no_prompt`` (``(where, what it gives)``: a response and no prompt),
    ``prompted`` (the number of rows with a prompt), ``empty_prompt`` (a blank one: :func:`empty_prompt`), ``media`` (it
    names media), ``broken`` (``(where, problem)`` of
    each unreadable media file), ``tags`` (``(where, problem)``: a media tag without its media), ``dataset_steps``
    (``(where, problem)``: dropped on dataset steps only).
    ``by_steps(row)``: why ms-swift drops the row on every step, and on dataset steps only (:func:`_step_check`)."""
    found = {'no_response': [], 'no_prompt': [], 'media': [], 'broken': [], 'bad': [], 'privileged': [], 'tags': [],
             'dataset_steps': [], 'rows': 0, 'prompted': 0, 'empty_prompt': [], 'no_response_columns': set()}
    for where, row in dataset_rows(flag, path):
        found['rows'] += 1
        if not standard_format:
            continue
        problem = privileged_problem(row, columns)
        if problem:
            found['privileged'].append((where, problem))
        problem, dataset_steps = row_problem(row, columns), None
        if not problem and by_steps:
            problem, dataset_steps = by_steps(row)
        if problem:
            found['bad'].append((where, problem))
            continue
        if dataset_steps:
            found['dataset_steps'].append((where, dataset_steps))
        prompt = has_prompt(row, columns)
        found['prompted'] += prompt
        if prompt and empty_prompt(row, columns):
            found['empty_prompt'].append(where)
        if not has_response(row, columns):
            found['no_response'].append((where, prompt))
            found['no_response_columns'].update(mapped_row(row, columns))
        elif not prompt:
            found['no_prompt'].append((where, prompt_missing(row, columns)))
        refs = media_refs(row, columns)
        if refs:
            found['media'].append(where)
        if multimodal:
            problem = media_tag_problem(row, columns)
            found['tags'] += [(where, problem)] if problem else []
            found['broken'] += [(where, problem) for problem in (media_problem(*ref) for ref in refs) if problem]
    return found


_PLURAL = {'line': 'lines', 'index': 'indices', 'row': 'rows'}


def _shown(wheres: List[Where]) -> str:
    """``lines 1, 2, 3, ...`` (or ``indices`` of a JSON array), the first :data:`LINES_SHOWN`."""
    numbers = ', '.join(str(where.number) for where in wheres[:LINES_SHOWN])
    return f'{_PLURAL[wheres[0].kind]} {numbers}' + (', ...' if len(wheres) > LINES_SHOWN else '')


def _listed(problems: List[Tuple[Where, str]]) -> str:
    """``line 3: problem; line 5: problem (and 2 more)``, the first :data:`LINES_SHOWN`."""
    shown = '; '.join(f'{where}: {problem}' for where, problem in problems[:LINES_SHOWN])
    return shown + (f' (and {len(problems) - LINES_SHOWN} more)' if len(problems) > LINES_SHOWN else '')


def check_local_datasets(args) -> None:
    """``--dataset`` / ``--val_dataset`` local jsonl, json, csv, parquet and arrow files: readable, not empty, rows that
    ms-swift would drop refused (or counted, :func:`_bad_rows`), teacher columns of the right type, their media files readable
    and only given to a multimodal model, and their rows without a response refused when nothing can sample one for
    them (see the module's docstring), else reported."""
    columns = args.columns if isinstance(args.columns, dict) else {}
    train_samples = args.lmbda > 0 or args.seq_kd
    meta = getattr(args, 'model_meta', None)
    multimodal = meta is None or meta.is_multimodal  # unknown: not refused here
    from swift_gkd_plugin.swift.setup.row_lengths import RowLengths, over_summary  # (imports ms-swift: on use)
    lengths = RowLengths.of(args)
    train_rows, dropped, skipped, partial = 0, [], [], []
    prompted, no_prompt = 0, []
    for flag, entries, can_sample in (('--dataset', args.dataset, train_samples), ('--val_dataset', args.val_dataset,
                                                                                    False)):
        for path, standard_format in local_dataset_files(entries, args.use_hf):
            by_steps = _step_check(args, lengths, can_sample)
            if lengths is not None:
                lengths.over = []
            found = scan_rows(flag, path, standard_format, columns, multimodal, by_steps)
            if flag == '--dataset':
                train_rows, prompted = train_rows + found['rows'], prompted + found['prompted']
                no_prompt += [(path, found['no_prompt'])] if can_sample and found['no_prompt'] else []
            if found['dataset_steps']:
                partial += [f'{path} {where}' for where, _ in found['dataset_steps']]
                logger.warning(f'swift_gkd_plugin: {flag} {path}: {len(found["dataset_steps"])} row(s) are dropped '
                               f'on dataset (off-policy) steps, used on the others: {_listed(found["dataset_steps"])}')
            if found['privileged']:
                raise FlagError(f'{flag} {path}: {len(found["privileged"])} row(s) have a teacher column that the '
                                f'trainer cannot use: {_listed(found["privileged"])}')
            if found['media'] and not multimodal:
                raise FlagError(
                    f'{flag} {path}: {len(found["media"])} row(s) have images, videos or audios '
                    f'({_shown(found["media"])}), but --model {args.model} (model type {meta.model_type}) is a '
                    'text-only model: its template keeps the <image> tag as literal text and the model never sees '
                    'the media. Train a multimodal model (with its --model_type / --template), or remove the media '
                    'columns (images, videos, audios).')
            if found['broken']:
                raise FlagError(f'{flag} {path}: {len(found["broken"])} media file(s) cannot be read: '
                                f'{_listed(found["broken"])}. ms-swift would silently train on other rows in their '
                                'place; fix or remove these rows.')
            if found['tags']:
                raise FlagError(f'{flag} {path}: {len(found["tags"])} row(s) have a media tag without its media: '
                                f'{_listed(found["tags"])}. ms-swift would train on the tag as text, the model never '
                                'seeing an image: give each row its media, or remove the tag.')
            if found['bad']:
                skipped += _bad_rows(args, flag, path, found['bad'], over_summary(lengths, found['rows']))
            if flag == '--dataset' and can_sample and found['empty_prompt']:
                _empty_prompts(args, path, found['empty_prompt'], found['prompted'])
            no_response = found['no_response']
            if not no_response:
                continue
            missing = [where for where, _ in no_response]
            typo = misspelt_columns(found['no_response_columns'])
            rows = f'{flag} {path}: {len(missing)} row(s) have no assistant response ({_shown(missing)}){typo}'
            if not can_sample:
                raise FlagError(f'{rows}, so they have nothing to distil (an empty response counts as none): '
                                f'{_NO_SAMPLING[flag]}')
            promptless = [where for where, prompt in no_response if not prompt]
            sampled = [where for where, prompt in no_response if prompt]
            if flag == '--dataset':
                dropped += [f'{path} {where}' for where in promptless]
            if sampled and args.lmbda < 1 and not args.seq_kd:  # else no step reads a dataset response
                logger.warning(f'swift_gkd_plugin: {flag} {path}: {len(sampled)} row(s) have no assistant response '
                               f'({_shown(sampled)}){typo}: dataset (off-policy) steps have nothing to distil on them; '
                               'on-policy and seq_kd steps sample a response for them.')
            if promptless:
                logger.warning(f'swift_gkd_plugin: {flag} {path}: {len(promptless)} row(s) have neither a user '
                               f'message nor an assistant response ({_shown(promptless)}): nothing can be '
                               'sampled for them, ms-swift cannot encode them, and each step draws other rows in their '
                               'place: they are dropped. Give them a user message, or remove them.')
    if no_prompt:
        dropped += _rows_without_prompt(args, no_prompt, prompted)
    check_one_batch(args, train_rows - len(dropped) - len(skipped), dropped, skipped, partial)


def _empty_prompts(args, path: str, empty: List[Where], prompted: int) -> None:
    """``--dataset`` rows whose prompt is blank (:func:`empty_prompt`), where steps sample: refused when every row's is
    and every step samples (``--lmbda 1``, or ``--seq_kd``), else a warning that counts them."""
    rows = f'--dataset {path}: {len(empty)} of {prompted} row(s) have an empty prompt ({_shown(empty)})'
    if len(empty) == prompted and (args.lmbda >= 1 or args.seq_kd):
        raise FlagError(f'{rows}: every step samples (--lmbda {args.lmbda}, --seq_kd {str(args.seq_kd).lower()}), '
                        'and a response sampled to an empty prompt is unconditioned text. Give the rows their '
                        'prompts (Alpaca: instruction / input; messages: the user turn)')
    logger.warning(f'swift_gkd_plugin: {rows}: on-policy and seq_kd steps sample a response to nothing for them '
                   '(unconditioned text). Give them their prompts, or remove them.')


def _rows_without_prompt(args, files: List[Tuple[str, List[Tuple[Where, str]]]], prompted: int) -> List[str]:
    """``--dataset`` rows with a response and no prompt (``files``: ``(path, [(where, what it gives)])``), where steps
    sample (on-policy ``--lmbda`` > 0, ``--seq_kd``): those steps sample a response to the row's user message, and
    ms-swift replaces a row without one by another (the resampling fails, after loading, once every row lacks one).
    Refused when no row has a prompt and every ``--dataset`` was read (hub datasets cannot be read before loading);
    else warned about, and returned (as dropped rows) when every step samples."""
    steps = ' and '.join(([f'--lmbda {args.lmbda:g} makes on-policy steps'] if args.lmbda > 0 else [])
                         + (['--seq_kd true makes seq_kd steps'] if args.seq_kd else []))
    every_step = args.lmbda >= 1 or args.seq_kd
    path, rows = files[0]
    if prompted == 0 and all_read_here(args.dataset, args.use_hf):  # every --dataset read here
        where = f' of {path}' if len(files) > 1 else ''
        raise FlagError(f'--dataset {" ".join(p for p, _ in files)}: no row has a prompt: {len(rows)} row(s){where} '
                        f'({_shown([w for w, _ in rows])}) give {rows[0][1]}; {steps}, which sample a response to '
                        'each row\'s user message, so not one could train. Give the rows a user message (a "user" '
                        'message, or a query / prompt / instruction column), or pass --lmbda 0 --seq_kd false '
                        '(off-policy only: distils on the dataset\'s responses)')
    fate = ('they are never trained on (dropped)' if every_step else
            'on-policy steps draw other rows in their place, dataset (off-policy) steps distil on them')
    for path, rows in files:
        logger.warning(f'swift_gkd_plugin: --dataset {path}: {len(rows)} row(s) have no user message '
                       f'({_shown([w for w, _ in rows])}; e.g. {rows[0][1]}): {steps}, which sample a response to a '
                       f'row\'s user message: {fate}. Give them a user message, or remove them.')
    return [f'{path} {where}' for path, rows in files for where, _ in rows] if every_step else []


def _step_check(args, lengths, can_sample: bool) -> Callable[[dict], Tuple[Optional[str], Optional[str]]]:
    """``by_steps(row)`` of :func:`scan_rows`: the problems that depend on the step, a response that is not text
    (:func:`response_problem`) and a length over ``--max_length`` (``lengths``, a
    :class:`~swift_gkd_plugin.swift.setup.row_lengths.RowLengths`, or None where rows are not measured). On-policy and seq_kd
    steps encode the prompt alone, dataset steps (``--lmbda`` < 1 without ``--seq_kd``) and evaluation the response
    too: rows that nothing samples for (``can_sample`` False) are dropped on every step when the whole row does not
    encode; the others when their prompt does not, and on dataset steps only when the whole row does not."""
    columns = args.columns if isinstance(args.columns, dict) else {}
    dataset_steps = args.lmbda < 1 and not args.seq_kd

    def whole(row):
        return response_problem(row, columns) or (lengths.problem(row, columns, prompt_only=False) if lengths else None)

    def by_steps(row):
        if not can_sample:
            return whole(row), None
        prompt = lengths.problem(row, columns, prompt_only=True) if lengths else None
        return prompt, None if prompt or not dataset_steps else whole(row)

    return by_steps


def _shown_rows(rows: List[str]) -> str:
    return ', '.join(rows[:LINES_SHOWN]) + (', ...' if len(rows) > LINES_SHOWN else '')


#: media rows of the local datasets that both processors encode, at most, where their settings differ
MEDIA_ROWS_COMPARED = 64


def check_teacher_media(args, teacher_dir: Optional[str]) -> None:
    """A separate local teacher of a multimodal student scores the student's encoding of each row: the media tokens
    and pixel inputs the student's processor made. A teacher whose own processor expands an image otherwise (another
    image size, patch or merge size) failed in its first forward, after both models loaded ("Image features and image
    tokens do not match", "Input image size (28*28) doesn't match model (56*56)"); one that expands it into as many
    tokens from other pixel inputs (another normalisation) read images it was not made for, silently. Refused before
    loading, naming the first row the two processors encode differently and both counts. Processors with the same
    settings expand every row alike and are not compared row by row; otherwise the first :data:`MEDIA_ROWS_COMPARED`
    media rows of the local ``--dataset`` and ``--val_dataset`` files are encoded by both."""
    meta = getattr(args, 'model_meta', None)
    if (meta is None or not meta.is_multimodal or teacher_dir is None or args.gkd_cross_tokenizer
            or getattr(args, '_teacher_use_disable_adapter', False)
            or os.path.realpath(teacher_dir) == os.path.realpath(getattr(args, 'model_dir', None) or args.model)):
        return
    try:  # the processors only, never the weights
        student = args.get_model_processor(load_model=False)[1]
        teacher = args.get_model_processor(load_model=False, model=teacher_dir, model_type=args.teacher_model_type,
                                           revision=args.teacher_model_revision)[1]
    except Exception as exc:  # the pipeline reports a teacher it cannot load
        logger.warning(f'swift_gkd_plugin: the teacher\'s processor is not compared with the student\'s before loading '
                       f'({type(exc).__name__}: {exc})')
        return
    differences = _processor_differences(student, teacher)
    if not differences:
        return
    templates = [args.get_template(student), args.get_template(
        teacher, template_type=getattr(getattr(teacher, 'model_meta', None), 'template', None) or args.template)]
    for template in templates:
        template.set_mode('train')
        template.max_length = None
    columns = args.columns if isinstance(args.columns, dict) else {}
    compared = 0
    for flag, path, where, row in _media_rows(args, columns):
        problem = _encoded_otherwise(templates, row, columns)
        compared += 1
        if problem:
            raise FlagError(
                f'--teacher_model {args.teacher_model}: its processor encodes the media of {flag} {path} {where} '
                f'{problem}. The teacher scores the student\'s encoding of each row (the student\'s media tokens and '
                'pixel inputs), so its forward would fail after loading, or read images it was not made for. The '
                f'processors differ in {differences}: distil from a teacher whose processor takes the student\'s '
                'images as they are (the same image size, patch and merge sizes, normalisation)')
        if compared == MEDIA_ROWS_COMPARED:
            break
    if compared == 0:
        logger.warning(f'swift_gkd_plugin: the teacher\'s processor differs from the student\'s ({differences}) and no '
                       'local dataset row with media was found to compare them on: the teacher scores the student\'s '
                       'media tokens and pixel inputs, and its forward fails if it expands images otherwise')
    else:
        logger.info(f'swift_gkd_plugin: the teacher\'s processor differs from the student\'s ({differences}), and '
                    f'encodes the media of the first {compared} dataset row(s) as the student\'s does')


def _processor_differences(student, teacher) -> str:
    """The settings (``key a / b``, nested ones dotted) in which two processors differ, the first four; empty where
    they are the same (a chat template or class name aside)."""
    def flat(processor) -> dict:
        try:
            settings = processor.to_dict()
        except Exception:  # noqa: BLE001 -- then compared row by row
            return {'(settings)': id(processor)}
        out = {}
        for key, value in settings.items():
            if key in ('chat_template', 'processor_class', 'auto_map'):
                continue
            items = value.items() if isinstance(value, dict) else [(None, value)]
            out.update({f'{key}.{sub}' if sub else key: v for sub, v in items
                        if sub not in ('image_processor_type', 'processor_class', 'auto_map')})
        return out
    a, b = flat(student), flat(teacher)
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    shown = [f'{k} {a.get(k)!r} (student) / {b.get(k)!r} (teacher)' for k in keys[:4]]
    return '; '.join(shown) + (f' (and {len(keys) - 4} more)' if len(keys) > 4 else '')


def _media_rows(args, columns):
    """``(flag, path, where, row)`` of each row with media of the local ``--dataset`` and ``--val_dataset`` files."""
    for flag, entries in (('--dataset', args.dataset), ('--val_dataset', args.val_dataset)):
        for path, standard_format in local_dataset_files(entries, args.use_hf):
            if standard_format:
                yield from ((flag, path, where, row) for where, row in dataset_rows(flag, path)
                            if media_refs(row, columns))


def _encoded_otherwise(templates, row: dict, columns: Dict[str, str]) -> Optional[str]:
    """How the teacher's template (``templates[1]``) encodes ``row``'s media otherwise than the student's: another
    number of media tokens, or other media tensors (beyond two roundings of their dtype); None where alike, or where
    the row does not encode (the other checks' and ms-swift's to report)."""
    import torch

    from swift_gkd_plugin.swift.setup.row_lengths import standard_row
    encoded, counts = [], []
    for template in templates:
        try:
            encoded.append(template.encode(standard_row(row, columns)))
        except Exception:  # noqa: BLE001 -- not this check's problem
            return None
        ids = {t for t in template.placeholder_tokens if isinstance(t, int) and t >= 0}
        counts.append(sum(t in ids for t in encoded[-1]['input_ids']))
    if counts[0] != counts[1]:
        return f'into {counts[1]} media tokens, the student\'s processor into {counts[0]}'
    student, teacher = ({k: v for k, v in e.items() if isinstance(v, torch.Tensor)} for e in encoded)
    for key in sorted(set(student) | set(teacher)):
        s, t = student.get(key), teacher.get(key)
        if s is None or t is None or s.shape != t.shape:
            shape = [None if x is None else list(x.shape) for x in (t, s)]
            return (f'into as many media tokens ({counts[0]}) but another {key}: {shape[0]}, the student\'s '
                    f'processor {shape[1]}')
        gap = (s.double() - t.double()).abs().max().item() if s.numel() else 0.0
        eps = torch.finfo(s.dtype).eps if s.is_floating_point() else 0.0
        if gap > max(1e-3, 2 * eps * s.double().abs().max().item()):
            return (f'into as many media tokens ({counts[0]}) but other {key} (differing by up to {gap:.3g}): another '
                    'normalisation or resizing')
    return None


def check_self_teacher_has_something_to_add(args) -> None:
    """A student-itself teacher with nothing to add (:func:`~swift_gkd_plugin.data.dataset_files.check_teacher_given`),
    and a shared-base LoRA student (ms-swift's ``_teacher_use_disable_adapter``) whose fresh adapter makes it its
    own teacher (:func:`~swift_gkd_plugin.data.dataset_files.check_fresh_adapter_teacher`)."""
    if args.teacher_scores or args.gkd_score_only:  # the store is the teacher, or the model scores itself
        return
    if getattr(args, '_teacher_use_disable_adapter', False):
        check_fresh_adapter_teacher(args, args.teacher_model_server is None,
                                    ('adapters', 'resume_from_checkpoint'))
        return
    check_teacher_given(args, ('teacher_model', 'teacher_model_server', 'teacher_adapters'),
                        '--teacher_model (another model; --model itself only for a LoRA student that starts from a '
                        'trained adapter, --adapters), or --teacher_adapters')


def _bad_rows(args, flag: str, path: str, bad: List[Tuple[Where, str]], lengths: str = '') -> List[str]:
    """Rows ms-swift would drop without a word: refused, or with ``--gkd_drop_bad_rows true`` counted in a warning
    and left out (returned as dropped training rows); ``lengths``: how many are too long, the longest."""
    cut = args.truncation_strategy == 'right' and lengths  # rows whose prompt fills --max_length among them
    fate = 'drop, or cut to no response token,' if cut else 'drop'
    text = f'{flag} {path}: {len(bad)} row(s) that ms-swift would {fate} without a word{lengths}: {_listed(bad)}'
    if not getattr(args, 'gkd_drop_bad_rows', False):
        raise FlagError(f'{text}. Fix them, or pass --gkd_drop_bad_rows true to train without them (counted in a '
                        'warning)')
    cut = (' (the rows cut to no response token are still drawn: they add nothing to the loss, counted in '
           'gkd/cut_empty_rows)') if cut else ''
    logger.warning(f'swift_gkd_plugin: {text}; --gkd_drop_bad_rows true: training without them{cut}')
    return [f'{path} {where}' for where, _ in bad] if flag == '--dataset' else []


def check_one_batch(args, rows: int, dropped: List[str] = (), skipped: List[str] = (), partial: List[str] = ()
                    ) -> None:
    """Training sets of local jsonl, json, csv, parquet and arrow files only: with no row that can be encoded
    (``dropped``: rows with neither a user message nor a response; ``skipped``: rows left out by ``--gkd_drop_bad_rows true``; or, on dataset
    steps, none but ``partial`` rows), ms-swift would load both models and then fail to resample ("Increase
    max_length"). Read whole (no ``#N`` sampling), fewer rows than one generation batch (:class:`GenerationBatch`: the
    per-device batch x the steps per generation, ms-swift's gradient accumulation by default, x the processes) can
    never fill one, and GKD drops incomplete ones. Preprocessing only removes rows, so these refusals are certain; the
    other cases (``#N`` sampling, sequence-parallel groups, rows dropped while encoding, hub datasets) are refused when
    training starts (:class:`RefuseEmptyEpochs`)."""
    entries = args.dataset or []
    if not entries or not all_read_here(entries, args.use_hf, standard_only=False) or args.streaming:
        return
    if rows <= 0 and skipped:
        promptless = f', {len(dropped)} without a user message or a response' if dropped else ''
        raise FlagError(f'--dataset {" ".join(entries)}: no row can be trained on: all {len(skipped) + len(dropped)} '
                        f'row(s) would be dropped ({len(skipped)} left out by --gkd_drop_bad_rows true, named in the '
                        f'warning above{promptless}). Fix the rows')
    if partial and len(partial) >= rows > 0:
        raise FlagError(f'--dataset {" ".join(entries)}: every row ({len(partial)}) is dropped on dataset '
                        '(off-policy) steps, as the warning above lists, so the first such step would fail (--lmbda '
                        f'{args.lmbda} without --seq_kd: dataset steps). Fix the rows, or pass --lmbda 1 or --seq_kd '
                        'true')
    if rows <= 0 and dropped:
        raise FlagError(f'--dataset {" ".join(entries)}: no row can be trained on: all {len(dropped)} row(s) have '
                        f'neither a user message nor an assistant response ({_shown_rows(dropped)}), so nothing can '
                        'be sampled or distilled for them. Give each row a user message (the prompt), or an assistant '
                        'response too')
    whole = all(DatasetSyntax.parse(entry).dataset_sample is None for entry in entries)
    world = int(os.environ.get('WORLD_SIZE') or 1)
    if getattr(args, 'gkd_score_only', False):
        return  # a score run's sampler fills its last batch up with rows again (epoch_sampler.fill_last)
    if not whole or (getattr(args, 'sequence_parallel_size', 1) or 1) > 1:
        return  # sampled (#N) or read by sequence-parallel groups: refused when training starts
    per_device = args.per_device_train_batch_size
    if args.steps_per_generation:
        spg, flag = args.steps_per_generation, '--steps_per_generation'
    elif args.generation_batch_size:
        spg, flag = max(1, args.generation_batch_size // (per_device * world)), '--generation_batch_size'
    else:  # not given: ms-swift's default, set after this check (trainers/arguments.py)
        spg = args.gradient_accumulation_steps or max(1, math.ceil(16 / per_device / world))
        flag = '--gradient_accumulation_steps'
    batch = GenerationBatch(per_device, spg, flag, world, 'process(es)', args.num_generations or 1, world)
    if rows >= batch.rows:
        return
    unusable = f' (and {len(dropped)} without a user message or a response, dropped)' if dropped else ''
    raise FlagError(f'--dataset: {rows} row(s){unusable} in {", ".join(entries)}, {batch.fewer_than(rows)}')


class GenerationBatch(NamedTuple):
    """The rows GKD reads at a time (ms-swift's GKD sampler, the plugin's for ``--num_generations`` G): a generation
    batch of ``per_device x steps per generation x readers`` samples, G of them per row, and an incomplete one is
    dropped. ``flag`` sets the steps per generation: ``--gradient_accumulation_steps`` (ms-swift's default, and its
    own default ``ceil(16 / (per-device batch x processes))`` when not given), ``--steps_per_generation`` or
    ``--generation_batch_size``."""
    per_device: int
    steps: int
    flag: str
    readers: int
    what: str
    generations: int
    processes: int

    @property
    def rows(self) -> int:
        return self.per_device * self.steps * self.readers // self.generations

    def _steps_words(self) -> str:
        if self.flag == '--generation_batch_size':
            return f'--generation_batch_size {self.per_device * self.steps * self.readers}'
        if self.flag == '--steps_per_generation':
            return f'--steps_per_generation {self.steps}'
        default = max(1, math.ceil(16 / self.per_device / self.processes))
        why = (f"; ms-swift's default when not given: 16 / ({self.per_device} x {self.processes} process(es)), "
               'rounded up' if self.steps == default else '')
        return f'--gradient_accumulation_steps {self.steps}{why}'

    def _value(self, steps: int) -> int:
        return self.per_device * steps * self.readers if self.flag == '--generation_batch_size' else steps

    def smallest_change(self, rows: int) -> Optional[str]:
        """The flags that make one generation batch fit in ``rows``: fewer steps per generation first (the same
        micro-batches), else a smaller per-device batch at one step (its ``flag`` given too: ms-swift's default
        accumulation grows as the batch shrinks)."""
        for steps in range(self.steps - 1, 0, -1):
            samples = self.per_device * steps * self.readers
            if samples % self.generations == 0 and samples // self.generations <= rows:
                return f'{self.flag} {self._value(steps)} (a generation batch of {samples // self.generations} row(s))'
        for per_device in range(self.per_device - 1, 0, -1):
            samples = per_device * self.readers
            if samples % self.generations == 0 and samples // self.generations <= rows:
                value = samples if self.flag == '--generation_batch_size' else 1
                return (f'--per_device_train_batch_size {per_device} {self.flag} {value} (a generation batch of '
                        f'{samples // self.generations} row(s))')
        return None

    def fewer_than(self, rows) -> str:
        """The words after ``N row(s)``: the batch, its flags, and the change that trains."""
        per_prompt = f' / --num_generations {self.generations}' if self.generations > 1 else ''
        change = self.smallest_change(rows) if isinstance(rows, int) else None
        fix = f'Pass {change}, or add rows' if change else f'Add rows (or train on fewer {self.what})'
        return (f'fewer than one generation batch of {self.rows} row(s) (--per_device_train_batch_size '
                f'{self.per_device} x {self.steps} step(s) per generation ({self._steps_words()}) x {self.readers} '
                f'{self.what}{per_prompt}): GKD samples and distils a whole generation batch at a time and drops an '
                f'incomplete one, so not one step could train. {fix}.')


class RefuseEmptyEpochs(TrainerCallback):
    """Refuses, when training starts, a training set too small for one batch: GKD drops incomplete batches
    (ms-swift sets ``dataloader_drop_last``), so the run would end with exit code 0 after 0 steps, ``train_loss 0``
    and nothing saved. The numbers are known here: after preprocessing and filtering, on every rank. A run that
    covers whole epochs is told how many rows each epoch leaves out that way (:func:`warn_rows_left_out`)."""

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        if train_dataloader is None or not hasattr(train_dataloader, '__len__'):
            return
        if len(train_dataloader) > 0:
            warn_rows_left_out(args, state, train_dataloader)
            return
        rows = len(train_dataloader.dataset) if hasattr(train_dataloader.dataset, '__len__') else '?'
        raise FlagError(f'--dataset: the training set has {rows} row(s) after preprocessing (--max_steps '
                        f'{args.max_steps}), {training_generation_batch(args).fewer_than(rows)}')


def training_generation_batch(args) -> GenerationBatch:
    """The generation batch of a run whose arguments ms-swift resolved (``--steps_per_generation`` filled in: it is
    ``--gradient_accumulation_steps`` unless given)."""
    steps, (readers_count, what) = args.steps_per_generation, readers(args)
    flag = '--gradient_accumulation_steps' if steps == args.gradient_accumulation_steps else '--steps_per_generation'
    return GenerationBatch(args.per_device_train_batch_size, steps, flag, readers_count, what,
                           getattr(args, 'num_generations', 1) or 1, args.world_size)


def warn_rows_left_out(args, state, train_dataloader) -> None:
    """The rows that ``dataloader_drop_last`` leaves out of each epoch (its last, incomplete batch on each process:
    other rows each epoch, as the sampler shuffles), warned about on the main process when the run covers at least
    one epoch and batches hold one row per prompt."""
    dataset = train_dataloader.dataset
    one_row_per_prompt = (getattr(args, 'num_generations', 1) or 1) == 1
    if not one_row_per_prompt or not hasattr(dataset, '__len__') or not state.is_world_process_zero:
        return
    rows, steps = len(dataset), len(train_dataloader)
    groups, what = readers(args)
    per_epoch = steps * args.per_device_train_batch_size * groups
    if rows > per_epoch and state.max_steps * args.gradient_accumulation_steps >= steps:
        batch = training_generation_batch(args)
        logger.warning(f'swift_gkd_plugin: --dataset: {rows - per_epoch} of the {rows} training rows are left out of '
                       f'each epoch: GKD drops incomplete generation batches (dataloader_drop_last; a generation '
                       f'batch is --per_device_train_batch_size {batch.per_device} x {batch.flag} {batch.steps} on '
                       f'{batch.readers} {batch.what} = {batch.rows} rows), and the sampler leaves out other rows each '
                       'epoch')


def readers(args) -> Tuple[int, str]:
    """How many read rows of their own, and what they are: ``(2, 'process(es)')``, or under sequence parallelism
    ``(1, 'sequence-parallel group(s)')`` (the ranks of a group read the same rows)."""
    from swift_gkd_plugin.swift.sequence_parallel import data_parallel_size, group_size
    if group_size() == 1:
        return args.world_size, 'process(es)'
    return data_parallel_size(args.world_size), 'sequence-parallel group(s)'
