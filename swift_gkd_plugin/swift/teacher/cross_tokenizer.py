"""Distillation across tokenizers on the transformers path (``--gkd_cross_tokenizer uld|hybrid``).

The teacher reads every conversation through its OWN template and tokenizer. For each row the student's response
tokens and the teacher's are given character spans in the response text (:mod:`swift_gkd_plugin.core.cross_tokenizer.alignment`)
and paired; the loss (:mod:`swift_gkd_plugin.core.cross_tokenizer.loss`) compares the student position that predicts
response token ``i`` with the teacher position that predicts its partner ``teacher[i]``. Logit row ``k`` of a side's
response mask predicts that side's ``k``-th response token, so the pairing of tokens is the pairing of rows.

Multi-turn rows: the teacher's template takes the student's ``--loss_scale``, so both score the same assistant turns
(ms-swift's GKD default ``last_round``: the last answer); each scored turn (a run of scored positions,
:func:`~swift_gkd_plugin.core.views.scored_turns`) is aligned with the teacher's turn in the same place, and the
student's response replaces the last answer of the teacher's view only. A row whose views cannot be paired stops the
run in one line (:class:`~swift_gkd_plugin.swift.run.guards.RunError`).

Chat end tokens (``<|im_end|>``, ``<|eot_id|>``, ...) and what the template puts after them are not text of the
response: from the first special token on, each token gets the zero-width span ``(len, len)``, so the two end
sequences pair in order (exactly) even when their names differ.

The first response position: a sentencepiece tokenizer with a dummy prefix (Llama-2, Mistral) writes a response's
first word as ``▁word``, a byte-level one (Qwen, Llama-3) as ``word``; both stand for the text ``word`` there. When
exactly one of the two tokenizers adds that prefix space, the pairs at the first position are compared through a
second vocabulary mapping in which that side's ``▁word`` stands for ``word``
(:func:`~swift_gkd_plugin.core.cross_tokenizer.alignment.shared_vocabulary` with ``strip_leading_space``); every other pair
uses the text mapping. Without it the teacher's first word ``▁a`` meets the student's ``Ġa`` (`` a``), which the
student then learns to write first (measured: docs_en/cross_tokenizer_results.md).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
from swift.utils import get_logger

from swift_gkd_plugin.core.cross_tokenizer.loss import hybrid_loss, uld_loss
from swift_gkd_plugin.core.cross_tokenizer.alignment import (Alignment, adds_prefix_space, align_positions, shared_vocabulary,
                                                   spans_of_ids)
from swift_gkd_plugin.core.views import response_ids, row_name, scored_turns
from swift_gkd_plugin.swift.run.guards import RunError

logger = get_logger()

_BYTE_TOKEN = re.compile(r'^<0x[0-9A-Fa-f]{2}>$')


@dataclass
class RowAlignment:
    """One row's pairing: ``alignment`` is None when the student row has no response token. A row whose template
    scores several assistant turns is paired turn by turn: ``student_starts`` / ``teacher_starts`` index each scored
    turn's first token among the row's response tokens (its first word, see the module docstring)."""
    alignment: Optional[Alignment]
    n_teacher: int  # the teacher's response tokens in this row
    student_starts: Tuple[int, ...] = (0, )
    teacher_starts: Tuple[int, ...] = (0, )


@dataclass
class AlignedRows:
    """A micro-batch's student response rows (in ``student_mask`` order) and their teacher partners."""
    teacher_index: torch.Tensor  # [N] flat index of the partner's logit row in [B * T_teacher]
    exact: torch.Tensor  # [N] bool: the pair is exact (not the fallback)
    first_word: torch.Tensor  # [N] bool: compared through the first-position vocabulary mapping


def special_ids(tokenizer) -> frozenset:
    """Ids of the tokenizer's special tokens that are not text: end-of-turn, padding, chat markers. Sentencepiece
    byte-fallback tokens (``<0xHH>``) may be registered as special, but they are text (one byte each)."""
    ids = set(getattr(tokenizer, 'all_special_ids', []) or [])
    for idx, token in (getattr(tokenizer, 'added_tokens_decoder', None) or {}).items():
        if getattr(token, 'special', False):
            ids.add(int(idx))
    return frozenset(i for i in ids if not _BYTE_TOKEN.match(tokenizer.convert_ids_to_tokens(i) or ''))


def response_spans(tokenizer, ids: Sequence[int], specials: frozenset) -> Tuple[str, List[Tuple[int, int]]]:
    """The text of a response's tokens and their spans; the first special token and all after it are zero width at
    the end of the text."""
    ids = list(ids)
    cut = next((k for k, t in enumerate(ids) if t in specials), len(ids))
    text, spans = spans_of_ids(tokenizer, ids[:cut]) if cut else ('', [])
    return text, list(spans) + [(len(text), len(text))] * (len(ids) - cut)


def without_leading_space(text: str, spans: List[Tuple[int, int]]) -> Tuple[str, List[Tuple[int, int]]]:
    """The text without its leading whitespace, and the spans moved onto it (tokens of that whitespace become zero
    width at 0). Sentencepiece decoders drop a leading space that byte-level ones keep; the two responses are then
    compared from their first non-space character."""
    d = len(text) - len(text.lstrip())
    return text[d:], [(max(a - d, 0), max(b - d, 0)) for a, b in spans]


def build_teacher_template(teacher_dir: str, model_type: str, student_template, template_type: Optional[str] = None):
    """The teacher's own template (``template_type``, --teacher_template, else its model type's), set up like the
    student's (length, truncation, padding, and the ``--loss_scale`` that decides which assistant turns are scored:
    ms-swift's GKD default ``last_round`` scores a multi-turn row's last answer only, a template's own default every
    answer)."""
    from swift.model import get_processor
    from swift.template import get_template
    processor = get_processor(teacher_dir, model_type=model_type)
    kwargs = dict(max_length=student_template.max_length, truncation_strategy=student_template.truncation_strategy,
                  padding_side=student_template.padding_side,
                  loss_scale=student_template._loss_scale,  # (the name given; ``.loss_scale`` is the object built)
                  is_binary_loss_scale=student_template.is_binary_loss_scale)
    try:  # template_type None: the model type's
        template = get_template(processor, template_type=template_type, **kwargs)
    except ValueError as exc:  # e.g. a model type with several candidate templates
        if template_type is not None:
            raise
        student_type = student_template.template_meta.template_type
        logger.warning(f'swift_gkd_plugin: cannot choose the teacher\'s template from its model type ({exc}); using '
                       f'the student\'s --template {student_type} with the teacher\'s tokenizer (name the teacher\'s '
                       'with --teacher_template)')
        template = get_template(processor, template_type=student_type, **kwargs)
    template.set_mode('train')
    return template


class CrossTokenizerTeacher:
    """The teacher's template, the vocabulary mapping and the per-row alignment of a cross-tokenizer run."""

    def __init__(self, method: str, teacher_dir: str, teacher_model_type: str, student_template,
                 teacher_template: Optional[str] = None):
        self.method = method
        self.template = build_teacher_template(teacher_dir, teacher_model_type, student_template, teacher_template)
        self.tokenizer = self.template.tokenizer
        self.student_tokenizer = student_template.tokenizer
        self._specials = (special_ids(self.student_tokenizer), special_ids(self.tokenizer))
        self.student_shared, self.teacher_shared = shared_vocabulary(self.student_tokenizer.get_vocab(),
                                                                     self.tokenizer.get_vocab())
        if method == 'hybrid' and not len(self.student_shared):
            raise ValueError('--gkd_cross_tokenizer hybrid: the two vocabularies share no token text; use uld')
        # which side's first response word carries a prefix space of its tokenizer's own (None: neither or both)
        self._prefix_space = (adds_prefix_space(self.student_tokenizer), adds_prefix_space(self.tokenizer))
        self.first_word_side = None
        if self._prefix_space[0] != self._prefix_space[1]:
            self.first_word_side = 'student' if self._prefix_space[0] else 'teacher'
        self._mappings = {False: (self.student_shared, self.teacher_shared)}
        if self.first_word_side:
            self._mappings[True] = shared_vocabulary(self.student_tokenizer.get_vocab(), self.tokenizer.get_vocab(),
                                                     strip_leading_space=self.first_word_side)
        self._teacher_to_student = {key: _index_map(*pair) for key, pair in self._mappings.items()}
        first_word = (f"; the {self.first_word_side}'s tokenizer adds a prefix space to a response's first word: "
                      f"{len(self._mappings[True][0])} entries mapped without it there" if self.first_word_side else '')
        logger.info(f'swift_gkd_plugin: cross-tokenizer distillation ({method}): teacher template '
                    f'{self.template.template_meta.template_type}, {len(self.tokenizer)} teacher tokens, '
                    f'{len(self.student_shared)} shared with the student\'s {len(self.student_tokenizer)}{first_word}')

    # ------------------------------------------------------------------ encoding
    def teacher_row(self, sample, text: str, ends_turn: bool) -> dict:
        """The teacher's view of a sample (its privileged prompt if any) with ``text`` as the response, ending its turn
        (the template's end tokens) exactly when the student's response does: a student that ends at once (an empty
        text) is then compared with the teacher's end token, predicted from the same prompt."""
        data = sample.to_teacher_template_dict() if sample.teacher_messages else sample.to_template_dict()
        messages = [dict(m) for m in data['messages']]
        if not messages or messages[-1].get('role') != 'assistant':
            raise RunError(f'{row_name(sample)}: no assistant response to distil on')
        messages[-1]['content'] = text
        data['messages'] = messages
        data['add_eos'] = ends_turn
        return data

    def encode_and_align(self, samples, student_list: List[dict]) -> Tuple[List[dict], List[RowAlignment]]:
        """Each sample's teacher encoding, and the pairing of its student response tokens with the teacher's: turn
        by turn where the row scores several assistant turns (both templates score the same ones, ``--loss_scale``).
        A row whose two views cannot be paired stops the run in one line naming it (:class:`RunError`)."""
        teacher_list, rows = [], []
        s_specials = self._specials[0]
        for sample, student in zip(samples, student_list):
            s_turns = scored_turns(student)
            last = s_turns[-1] if s_turns else []
            s_text = response_spans(self.student_tokenizer, last, s_specials)[0]
            ends_turn = any(t in s_specials for t in last)
            encoded = self.template.encode(self.teacher_row(sample, s_text, ends_turn), return_length=True)
            encoded.pop('_extra_kwargs', None)
            teacher_list.append(encoded)
            t_turns = scored_turns(encoded)
            if not s_turns:
                rows.append(RowAlignment(None, sum(map(len, t_turns))))
                continue
            if len(t_turns) != len(s_turns):
                raise RunError(f'cross-tokenizer alignment: {row_name(sample)}: the teacher\'s view scores '
                               f'{len(t_turns)} assistant turn(s), the student\'s {len(s_turns)}; the teacher must '
                               'score the turns the student scores (check its teacher_messages column: the same '
                               'assistant turns as its messages)')
            rows.append(self._align_turns(sample, s_turns, t_turns))
        return teacher_list, rows

    def _align_turns(self, sample, s_turns: List[List[int]], t_turns: List[List[int]]) -> RowAlignment:
        """The pairing of a row's scored turns, each with the teacher's turn in the same place, as one alignment over
        the row's response tokens."""
        teacher, exact, s_starts, t_starts = [], [], [], []
        s_offset = t_offset = 0
        for turn, (s_ids, t_ids) in enumerate(zip(s_turns, t_turns)):
            alignment = self._align_turn(sample, s_ids, t_ids, f' (scored turn {turn + 1} of {len(s_turns)})'
                                         if len(s_turns) > 1 else '')
            teacher.append(alignment.teacher + t_offset)
            exact.append(alignment.exact)
            s_starts.append(s_offset)
            t_starts.append(t_offset)
            s_offset, t_offset = s_offset + len(s_ids), t_offset + len(t_ids)
        return RowAlignment(Alignment(torch.cat(teacher), torch.cat(exact)), t_offset, tuple(s_starts),
                            tuple(t_starts))

    def _align_turn(self, sample, s_ids: List[int], t_ids: List[int], turn: str) -> Alignment:
        """One scored turn: both sides' tokens given spans in its text, and paired (:func:`align_positions`)."""
        s_specials, t_specials = self._specials
        s_text, s_spans = response_spans(self.student_tokenizer, s_ids, s_specials)
        t_text, t_spans = response_spans(self.tokenizer, t_ids, t_specials)
        if t_text != s_text:  # e.g. a sentencepiece decoder drops the response's leading space
            (s_text, s_spans), (t_text, t_spans) = without_leading_space(s_text, s_spans), without_leading_space(
                t_text, t_spans)
        if t_text != s_text:
            raise RunError(f'cross-tokenizer alignment: {row_name(sample)}{turn}: the teacher\'s view holds the answer '
                           f'{t_text[:80]!r} where the student\'s holds {s_text[:80]!r}; both views must hold the '
                           'same answer text (check its teacher_messages column and the teacher\'s template, '
                           '--teacher_template)')
        try:
            return align_positions(s_spans, t_spans, row=row_name(sample) + turn)
        except ValueError as exc:
            raise RunError(f'cross-tokenizer alignment failed: {exc}') from None

    # ------------------------------------------------------------------ loss
    def teacher_rows(self, student_mask: torch.Tensor, teacher_mask: torch.Tensor,
                     rows: List[RowAlignment]) -> AlignedRows:
        """For each student response row (in ``student_mask`` order): its teacher partner's logit row in
        ``[B * T_teacher]``, whether the pair is exact, and whether it is compared through the first-word mapping."""
        t_counts = teacher_mask.sum(1).tolist()
        s_counts = student_mask.sum(1).tolist()
        positions = teacher_mask.nonzero()
        flat = positions[:, 0] * teacher_mask.shape[1] + positions[:, 1]
        offset, index, exact, first_word = 0, [], [], []
        for b, row in enumerate(rows):
            if row.n_teacher != t_counts[b] or (row.alignment is None) != (s_counts[b] == 0) or (
                    row.alignment is not None and len(row.alignment.teacher) != s_counts[b]):
                raise ValueError(f'cross-tokenizer batch row {b}: the aligned token counts do not match the encoded '
                                 f'batch (student {s_counts[b]}, teacher {t_counts[b]})')
            if row.alignment is not None:
                index.append(offset + row.alignment.teacher)
                exact.append(row.alignment.exact)
                first_word.append(self._first_word_pairs(row))
            offset += t_counts[b]
        if not index:
            empty = flat.new_zeros(0)
            return AlignedRows(empty, empty.bool(), empty.bool())
        device = flat.device
        return AlignedRows(flat[torch.cat(index).to(device)], torch.cat(exact).to(device),
                           torch.cat(first_word).to(device))

    def _first_word_pairs(self, row: RowAlignment) -> torch.Tensor:
        """Pairs in which exactly one side's position is the first of a response (of a scored turn) whose first word
        its tokenizer writes with a prefix space of its own (see the module docstring)."""
        alignment = row.alignment
        student_first = torch.zeros_like(alignment.exact)
        if self.first_word_side is None:
            return student_first
        student_first[list(row.student_starts)] = self._prefix_space[0]
        teacher_first = torch.isin(alignment.teacher, torch.tensor(row.teacher_starts)) & self._prefix_space[1]
        return student_first != teacher_first

    def loss(self, student: torch.Tensor, teacher_logits: torch.Tensor, rows: AlignedRows, beta: float,
             temperature: float) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per student response token: the ULD or hybrid loss against its teacher partner, and top-1 agreement
        (the teacher's top token mapped to the student's vocabulary by text; a teacher token with no student
        counterpart never agrees)."""
        teacher_flat = teacher_logits.reshape(-1, teacher_logits.shape[-1])  # a view: rows are gathered per chunk
        if self.method == 'uld':  # sorted probabilities: no vocabulary mapping, the first word needs none
            per_token = uld_loss(student, teacher_flat, temperature, teacher_index=rows.teacher_index)
        elif not rows.first_word.any():
            per_token = self._hybrid(student, teacher_flat, rows.teacher_index, False, beta, temperature)
        else:  # the first-word pairs through their own mapping
            per_token = student.new_zeros(len(student), dtype=torch.float32)
            for first_word in (False, True):
                pick = (rows.first_word == first_word).nonzero().squeeze(-1)
                if len(pick):
                    per_token = per_token.index_put((pick, ), self._hybrid(
                        student[pick], teacher_flat, rows.teacher_index[pick], first_word, beta, temperature))
        with torch.no_grad():
            teacher_top = teacher_flat.argmax(-1)[rows.teacher_index].cpu()
            first_word = rows.first_word.cpu()
            mapped = torch.full_like(teacher_top, -1)
            for key, mapping in self._teacher_to_student.items():
                pick = first_word == key
                top = teacher_top[pick]
                mapped[pick] = torch.where(top < len(mapping), mapping[top.clamp(max=len(mapping) - 1)], -1)
            agree = student.argmax(-1).cpu() == mapped
        return per_token, agree

    def _hybrid(self, student, teacher_flat, teacher_index, first_word: bool, beta, temperature):
        student_ids, teacher_ids = self._mappings[first_word]
        return hybrid_loss(student, teacher_flat, student_ids.to(student.device), teacher_ids.to(teacher_flat.device),
                           beta, temperature, teacher_index=teacher_index)


def _index_map(student_ids: torch.Tensor, teacher_ids: torch.Tensor) -> torch.Tensor:
    """teacher id -> its student counterpart (-1: none)."""
    size = int(teacher_ids.max()) + 1 if len(teacher_ids) else 1
    mapping = torch.full((size, ), -1, dtype=torch.long)
    mapping[teacher_ids] = student_ids
    return mapping
