"""Rows longer than ``--max_length``, measured before any model is loaded with the student's own template (its
tokenizer only, read from the model folder). In the adapter: it encodes with ms-swift's template (ms-swift's runtime).

With ``--truncation_strategy delete`` (ms-swift's default) ms-swift replaces a row that does not fit by another
one, with an INFO line: a prompt longer than ``--max_length`` can never be trained on, and a row whose prompt and
response together are longer is dropped on every dataset (off-policy) step. When every row is dropped the run fails
after loading both models ("resample: only collected 0/2"). Here each row is encoded as the trainer encodes it: its
prompt for on-policy and seq_kd steps, prompt and response for dataset steps and evaluation; a row whose UTF-8 bytes
show it fits (:meth:`RowLengths.bound`) is not encoded (20,000 short rows: 0.4 s instead of 5.7). Multimodal models are
left out (their processors read the media, which is not cheap); so is ``--truncation_strategy left``, which
truncates instead of dropping, keeping the response's end.

With ``--truncation_strategy right`` a row is cut to its first ``--max_length`` tokens: one whose prompt is
``--max_length`` tokens or more keeps no response token, in every mode (a sampled response is cut away too), and its
steps trained on nothing (loss 0): such rows are measured by their prompt and refused the same way.
"""
from __future__ import annotations

import copy
import functools
from collections import Counter
from types import SimpleNamespace
from typing import Dict, Optional

from swift.utils import get_logger, remove_response

from swift_gkd_plugin.options import model_context as contexts
from swift_gkd_plugin.options.hub_models import model_dir_of

logger = get_logger()
#: tokens allowed per message beyond its UTF-8 bytes in :meth:`RowLengths.bound`
BOUND_MARGIN = 8


class RowLengths:
    """The student's template, without a length limit, to measure rows (in tokens) against ``--max_length``; its
    tokenizer is read on the first row measured."""

    def __init__(self, args):
        self.args, self.max_length = args, args.max_length
        self.cuts = getattr(args, 'truncation_strategy', 'delete') == 'right'  # else delete: a too long row is dropped
        self._skeletons = {}  # roles -> length of the row with empty messages
        self.over = []  # the lengths of the rows found over --max_length (reset by the caller per file)

    @functools.cached_property
    def template(self):
        """The template, or None (with a warning) where it cannot be built here: rows are then not measured."""
        try:
            template = self.args.get_template(None)  # the tokenizer (processor) only, never the weights
        except Exception as exc:
            logger.warning(f'swift_gkd_plugin: rows are not measured against --max_length before loading: the '
                           f'template cannot be built from the tokenizer alone ({type(exc).__name__}: {exc})')
            return None
        template.set_mode('train')  # the trainer's mode for GKD (ms-swift's rlhf pipeline)
        template.max_length = None  # the length is measured, not refused, here
        return template

    @classmethod
    def of(cls, args) -> Optional['RowLengths']:
        """None where rows are not measured: ``--truncation_strategy`` other than delete or right, no
        ``--max_length``, a multimodal (or unknown) model."""
        meta = getattr(args, 'model_meta', None)
        if (args.truncation_strategy not in ('delete', 'right') or not args.max_length or meta is None
                or meta.is_multimodal):
            return None
        return cls(args)

    def tokens(self, row: dict, columns: Dict[str, str], prompt_only: bool, exact: bool = True) -> Optional[int]:
        """The row's length in tokens as the trainer encodes it (``prompt_only``: its response removed, as for
        sampling), or None where it does not encode for another reason (left to the other checks). Not ``exact``:
        None too where the row certainly fits (:meth:`bound`), without encoding it."""
        if self.template is None:
            return None
        try:
            standard = standard_row(row, columns)
            if prompt_only:
                remove_response(standard['messages'])
            if not exact and self.bound(standard) <= self.max_length - self.cuts:  # right: fits below it
                return None
            return self.template.encode(standard, return_length=True)['length']
        except Exception:  # not a length problem
            return None

    def bound(self, standard: dict) -> float:
        """At least the row's length in tokens: the row encoded with empty messages (once per sequence of roles),
        plus the UTF-8 bytes of each message and a margin. A token of a byte-level BPE tokenizer covers at least one
        byte, and of a SentencePiece one at least one character or byte (plus a word-start marker); the margin also
        covers merges with the template's text around each message. Rows with tools are measured exactly."""
        messages = standard['messages']
        if standard.get('tools') or not all(isinstance(m.get('content'), str) for m in messages):
            return float('inf')
        key = tuple(m['role'] for m in messages)
        if key not in self._skeletons:
            empty = dict(standard, messages=[dict(m, content='') for m in messages])
            self._skeletons[key] = self.template.encode(empty, return_length=True)['length']
        return self._skeletons[key] + sum(len(m['content'].encode()) + BOUND_MARGIN for m in messages)

    def problem(self, row: dict, columns: Dict[str, str], prompt_only: bool) -> Optional[str]:
        """Why the trainer drops the row for its length (under right: why its cut keeps no response token, whatever
        ``prompt_only``), or None (its length kept in :attr:`over`)."""
        if self.cuts:
            length = self.tokens(row, columns, prompt_only=True, exact=False)
            if length is None or length < self.max_length:
                return None
            self.over.append(length)
            return (f'its prompt is {length} tokens with the template, at least --max_length {self.max_length}: '
                    f'--truncation_strategy right keeps its first {self.max_length} tokens, none of its response, so '
                    f'it trains on nothing (raise --max_length above {length}, or pass --truncation_strategy left)')
        length = self.tokens(row, columns, prompt_only, exact=False)
        if length is None or length <= self.max_length:
            return None
        self.over.append(length)
        what = 'its prompt is' if prompt_only else 'it is'
        return (f'{what} {length} tokens with the template, over --max_length {self.max_length} (--truncation_strategy '
                'delete: raise --max_length, or pass --truncation_strategy left)')


def over_summary(lengths: Optional[RowLengths], rows: int) -> str:
    """`` (every row (64) is longer than --max_length 8, the longest 20 tokens)``, or how many of ``rows`` are, for the
    rows :meth:`RowLengths.problem` found too long; empty where none."""
    if lengths is None or not lengths.over:
        return ''
    many = f'every row ({rows})' if len(lengths.over) == rows else f'{len(lengths.over)} of the {rows} rows'
    what = 'with a prompt of at least' if lengths.cuts else 'longer than'
    return f' ({many} {what} --max_length {lengths.max_length}, the longest {max(lengths.over)} tokens)'


def standard_row(row: dict, columns: Dict[str, str]) -> dict:
    """``row`` as ms-swift's automatic preprocessor makes it (``--columns``, its column names, case-insensitive; a
    messages, alpaca or query/response row), with standard ``messages``."""
    from swift.dataset.preprocessor.core import RowPreprocessor
    row = {columns.get(key, key): value for key, value in copy.deepcopy(row).items()}
    preprocessor = _preprocessor(frozenset(row))
    lower = {key.lower(): key for key in row}
    renames = {lower[key.lower()]: new for key, new in preprocessor.columns.items() if key.lower() in lower}
    counts = Counter(renames.values())  # as safe_rename_columns: two columns for one name rename neither
    renames = {key: new for key, new in renames.items() if counts[new] == 1 and key != new}
    row = preprocessor.preprocess({renames.get(key, key): value for key, value in row.items()})
    RowPreprocessor._check_messages(row)
    return row


@functools.lru_cache(maxsize=64)
def _preprocessor(columns: frozenset):
    """The preprocessor ms-swift's automatic one chooses for a dataset of these columns (one instance for all rows)."""
    from swift.dataset.preprocessor import AutoPreprocessor
    return AutoPreprocessor()._get_preprocessor(SimpleNamespace(features=columns))


def check_sampling_context(args) -> None:
    """``--max_length`` within the student's context on on-policy steps and the teacher's on seq_kd steps
    (:func:`swift_gkd_plugin.options.model_context.check_sampling_context`): the student's as ms-swift resolved it
    (``model_info.max_model_len``), a ``--teacher_model``'s from its folder's ``config.json`` (a hub id's fetched
    without its weights). Before, a prompt longer than either failed at its first rollout after loading ("Input length
    (569) leaves no room for generation")."""
    student = getattr(getattr(args, 'model_info', None), 'max_model_len', None)
    teacher = None
    if args.seq_kd and args.teacher_model and args.max_length and getattr(args, 'teacher_model_server', None) is None:
        folder = model_dir_of('--teacher_model', args.teacher_model, args.teacher_model_revision, args)
        teacher = contexts.model_context(folder)
    contexts.check_sampling_context(args, student, teacher)
