"""The training encodings cut at ``--max_length``.

ms-swift's GKD encodes each micro-batch with the template's ``max_length`` unset (``_template_context``), so the
rows reached the forwards whole whatever ``--max_length`` and ``--truncation_strategy`` said. Here each encoded row is
cut as ``swift sft``'s template cuts it (``Template._truncate``): ``right`` keeps its first ``--max_length`` tokens,
``left`` its last; an image's tokens (the template's placeholder tokens) are never cut, and a row whose image tokens
alone are more than ``--max_length`` stops the run (:class:`~swift_gkd_plugin.swift.run.guards.RunError`): the image
cannot be cut and still be seen. Under ``delete`` (ms-swift's default) a row whose prompt (on-policy, seq_kd) or whole
row (dataset steps) is too long was already replaced by another row before sampling; what can still be too long is a
sampled response, whose end is cut (``right``), as ``--max_completion_length`` cuts it.

The teacher's view stays token-aligned with the student's: without a view of its own it is the student's encoding.
With one (``teacher_prompt``, ``teacher_messages``) it keeps exactly the response tokens the student's kept, scored
where the student's are, and around them the same cut: after a ``right`` cut its own prompt whole and the response up
to where the student's ends (so it holds up to as many tokens more than ``--max_length`` as its prompt is longer than
the student's); after a ``left`` cut that starts within the response, the response from the same token on, and its
prompt's image tokens.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from swift.utils import get_logger

from swift_gkd_plugin.core.constants import IGNORE_INDEX
from swift_gkd_plugin.core.views import row_name
from swift_gkd_plugin.swift.run.guards import RunError

logger = get_logger()
#: per-token entries of an encoded row that a cut keeps in step with ``input_ids`` (ms-swift's ``_truncate``'s)
_PER_TOKEN = ('labels', 'loss_scale', 'mm_token_type_ids', 'image_token_types')


class LengthCap:
    """``--max_length`` applied to a micro-batch's encoded rows (see the module's docstring)."""

    def __init__(self, template, counter=None):
        self.max_length = template.max_length  # read outside ms-swift's _template_context, which unsets it
        strategy = template.truncation_strategy
        self.strategy = strategy if strategy in ('left', 'right') else 'right'  # delete: a sampled response's end
        self.given = strategy if strategy != 'raise' else 'delete'
        self.protected = torch.tensor([t for t in template.placeholder_tokens if isinstance(t, int)], dtype=torch.long)
        self.counter = counter  # guards.ReplacedRows: gkd/cut_rows

    def cut(self, samples, students: List[dict], teachers: List[dict], own_view: bool) -> None:
        """Cut, in place, every row longer than ``--max_length`` (and its teacher view where it has its own)."""
        if not self.max_length:
            return
        for i, (sample, student) in enumerate(zip(samples, students)):
            if len(student['input_ids']) <= self.max_length:
                continue
            kept = self._cut_student(sample, student)
            if own_view:
                self._cut_teacher(teachers[i], *kept)
            else:
                teachers[i] = student.copy()
            self._count(sample, emptied=not kept[2])

    def _count(self, sample, emptied: bool) -> None:
        """One row cut; ``emptied``: cut to no scored response token (it adds nothing to the loss): counted apart,
        for the run guard to name the cut where it leaves a step nothing to learn."""
        if self.counter is None:
            return
        self.counter.cut += 1
        if self.counter.cut == 1:
            what = ('a sampled response is cut at its end' if self.given == 'delete' else
                    f'a row is cut at its {"end" if self.strategy == "right" else "start"}')
            logger.warning(f'swift_gkd_plugin: {what} to --max_length {self.max_length} (--truncation_strategy '
                           f'{self.given}, as swift sft cuts); said once, counted in gkd/cut_rows')
        if not emptied:
            return
        self.counter.emptied += 1
        if self.counter.emptied == 1:
            logger.warning(f'swift_gkd_plugin: {row_name(sample)}: --max_length {self.max_length} '
                           f'(--truncation_strategy {self.given}) cuts every response token away (its prompt fills '
                           '--max_length): it adds nothing to the loss. Said once, counted in gkd/cut_empty_rows; '
                           'raise --max_length above the prompts\' length')

    def _mask(self, ids: torch.Tensor) -> torch.Tensor:
        """The positions ``Template._truncate`` keeps: every placeholder (image) token, and the first (``right``) or
        last (``left``) of the others up to ``--max_length``."""
        protected = torch.isin(ids, self.protected)
        room = self.max_length - int(protected.sum())
        if room > 0:
            others = (~protected).nonzero(as_tuple=True)[0]
            protected[others[-room:] if self.strategy == 'left' else others[:room]] = True
        return protected

    def _cut_student(self, sample, encoded: dict):
        """The student's row cut as ``swift sft`` cuts it; returns what the teacher's view needs: the range of the
        response tokens kept (indices into the row's response tokens) and those of them still scored."""
        ids = torch.tensor(encoded['input_ids'])
        n_images = int(torch.isin(ids, self.protected).sum())
        if n_images > self.max_length:
            raise RunError(f'{row_name(sample)} holds {n_images} image tokens, more than --max_length '
                           f'{self.max_length} (--truncation_strategy {self.given}): its images cannot be cut and '
                           f'still be seen, and the row is {len(ids)} tokens. Raise --max_length to at least '
                           f'{n_images} plus its text, or use fewer or smaller images')
        labels = torch.tensor(encoded['labels'])
        mask = self._mask(ids)
        response = (labels != IGNORE_INDEX).nonzero(as_tuple=True)[0]
        kept = mask[response].nonzero(as_tuple=True)[0]
        first, end = (int(kept[0]), int(kept[-1]) + 1) if len(kept) else ((0, 0) if self.strategy == 'right' else
                                                                          (len(response), len(response)))
        _keep(encoded, mask)
        new_labels = torch.tensor(encoded['labels'])
        new_at = torch.cumsum(mask.long(), 0) - 1
        scored = [int(i) for i in kept if new_labels[new_at[response[i]]] != IGNORE_INDEX]
        return first, end, scored

    def _cut_teacher(self, encoded: dict, first: int, end: int, scored: List[int]) -> None:
        """The teacher's own view holding the student's kept response tokens ``[first, end)``, ``scored`` of them
        scored (see the module's docstring); a view of another response is left to the alignment check."""
        ids, labels = torch.tensor(encoded['input_ids']), torch.tensor(encoded['labels'])
        response = (labels != IGNORE_INDEX).nonzero(as_tuple=True)[0]
        if end > len(response):
            return
        start = 0 if first == 0 else int(response[first - 1]) + 1
        stop = len(ids) if end == len(response) else int(response[end])
        mask = torch.isin(ids, self.protected)
        mask[start:stop] = True
        for i in set(range(first, end)) - set(scored):
            labels[response[i]] = IGNORE_INDEX
        encoded['labels'] = labels.tolist()
        _keep(encoded, mask)


def _keep(encoded: dict, mask: torch.Tensor) -> None:
    """``encoded`` reduced to the positions of ``mask``, as ``Template._truncate`` reduces a row: its first label is
    not scored (nothing precedes it), its length updated."""
    index = mask.nonzero(as_tuple=True)[0]
    encoded['input_ids'] = [encoded['input_ids'][i] for i in index.tolist()]
    for key in _PER_TOKEN:
        value = encoded.get(key)
        if value is None:
            continue
        value = value[mask] if isinstance(value, torch.Tensor) else [value[i] for i in index.tolist()]
        if key == 'labels':
            value[0] = IGNORE_INDEX
        elif key == 'loss_scale':
            value[0] = 0
        encoded[key] = value
    length = len(encoded['input_ids'])
    encoded['length'] = length
    if 'lengths' in encoded:
        encoded['lengths'] = [length]


def length_cap(trainer) -> Optional[LengthCap]:
    """The trainer's :class:`LengthCap`, made on first use (the template's ``max_length`` as the run set it)."""
    cap = getattr(trainer, '_length_cap', None)
    if cap is None:
        cap = trainer._length_cap = LengthCap(trainer.template, getattr(trainer, '_replaced_rows', None))
    return cap
