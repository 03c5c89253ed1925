"""``--async_generate true`` beside a served teacher: the producer asks the teacher, so its latency leaves the
training path.

In: a batch the rollout server just sampled ahead (its rows and outputs, every rank's), in the producer's thread.
Out: the served teachers' answers to the rows' requests, keyed by the request, read by the trainer's teacher stage for
the step the batch is for (:meth:`TeacherMixin._postprocess_batch`: a row whose request has an answer is not asked
again; any other row, a local teacher's included, is scored there as without ``--async_generate``).

Each finished batch's rows are encoded as the trainer encodes them (each view through a private copy of the
template: the trainer's own is in use on the main thread) and sent to the teacher their tag routes them to, one
request per teacher with the trainer's token ids, as the trainer would send them. A row the trainer encodes otherwise
(cut at ``--max_length``, rewritten since) finds no answer under its request and is scored in the trainer: the
answers are keyed by the exact token ids and positions the loss reads, never matched by row. The teacher is asked in
a thread of its own once the samples are back, so the trainer takes the samples, syncs and sends the next prompts
without waiting for it, and waits for the answers only in its teacher stage. Logged per step: ``gkd/teacher_ahead``
(the share of served rows answered by the producer) and ``gkd/teacher_wait_s`` (the seconds the trainer spent waiting
for the producer's answers or asking the served teachers itself)."""
from __future__ import annotations

import copy
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Dict, List, Optional, Tuple

from swift.utils import get_logger

from swift_gkd_plugin.core.constants import IGNORE_INDEX
from swift_gkd_plugin.core.views import prepare_teacher_view
from swift_gkd_plugin.server.client import TopKResult
from swift_gkd_plugin.swift.setup.teacher_server import teacher_names
from swift_gkd_plugin.swift.step.encoding import encode_teacher_views
from swift_gkd_plugin.swift.step.token_metrics import add_token_sum
from swift_gkd_plugin.swift.teacher.served import score_at

logger = get_logger()
Key = Tuple[Tuple[int, ...], Tuple[int, ...]]


def request_key(request: Tuple[list, list]) -> Key:
    """The key of a teacher request ``(input_ids, positions)``: its exact token ids and scored positions."""
    return tuple(request[0]), tuple(request[1])


class TeacherAhead:
    """Served teachers scored in the producer's thread (``--async_generate true``), their answers read by the step.

    Built by the trainer with ``trainer``: the ms-swift trainer whose state it reads (``args``, ``accelerator``,
    ``model``, ``template`` and its ``_template_context``, ``custom_metrics``, the served teachers as ms-swift's
    ``_setup_teacher`` hook left them: ``use_teacher_api``, ``teacher_configs``, ``teacher_clients``,
    ``_local_teacher``, ``_teacher_topk_route``, and its :class:`~.placement.TeacherModel`'s ``xtok``), and
    ``prefetch_on``: whether ``--async_generate`` runs (then :meth:`answers` logs ``gkd/teacher_wait_s`` and
    ``gkd/teacher_ahead``)."""

    def __init__(self, trainer, prefetch_on: bool) -> None:
        self.trainer = trainer
        self.prefetch_on = prefetch_on
        self._pool = None  # the producer's teacher thread
        self._template = None  # a private copy of the trainer's template, for the producer's encoding
        self._answers, self._pending, self._waited = None, False, 0.0

    def on(self) -> bool:
        """Whether the producer asks the teachers: a served teacher answering on the trainer's token ids
        (``/v1/topk`` or ``/v1/completions``), one tokenizer (a teacher of another reads its own template)."""
        trainer = self.trainer
        return bool(getattr(trainer, 'use_teacher_api', False) and getattr(trainer, '_teacher_topk_route', False)
                    and trainer.teacher.xtok is None and getattr(trainer, 'teacher_clients', None))

    def submit(self, samples, outputs) -> Future:
        """The served teachers' answers to the rows of ``samples`` (every rank's rows, as sent) completed by
        ``outputs``, asked in a thread of their own (rank 0, from the producer): a future of :meth:`_score_or_none`."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix='gkd-teacher-ahead')
        return self._pool.submit(self._score_or_none, samples, outputs)

    def _score_or_none(self, samples, outputs) -> Optional[Dict[Key, TopKResult]]:
        try:
            return self._score(samples, outputs)
        except Exception as exc:  # the trainer asks again (and reports the failure itself if it persists)
            logger.warning(f'swift_gkd_plugin: the producer could not ask the teacher ({exc!r}): the step\'s rows '
                           'are scored in the trainer')
            return None

    def _score(self, samples, outputs) -> Dict[Key, TopKResult]:
        """The served teachers' answers to the rows of ``samples`` completed by ``outputs``, keyed by request."""
        from swift.rlhf_trainers.gkd_helpers import route_samples_to_teachers
        trainer = self.trainer
        template = self._template
        if template is None:
            template = self._template = copy.deepcopy(trainer.template)
        rows = []
        for sample, output in zip(samples, outputs):  # (as the trainer's _postprocess_rollout_outputs and
            sample = copy.deepcopy(sample)  # _encode_samples prepare them)
            sample.apply_rollout_output(rollout_output=output)
            prepare_teacher_view(sample)
            rows.append(sample)
        with trainer._template_context(template):
            teachers = encode_teacher_views(rows, template)  # as the trainer's step encodes them
        requests = []
        for encoded in teachers:
            ids, labels = list(encoded['input_ids']), list(encoded['labels'])
            requests.append((ids, [p for p in range(len(labels) - 1) if labels[p + 1] != IGNORE_INDEX]))
        routing = route_samples_to_teachers(rows, trainer.teacher_configs, tag_key=trainer.args.teacher_tag_key)
        targets = trainer.args.gkd_sampled_kl_coef > 0 or bool(teacher_names(trainer.teacher_configs))  # (as trainer)
        answers = {}
        for t_idx, indices in routing.items():
            if t_idx == trainer._local_teacher or not indices:
                continue
            results = score_at(trainer.teacher_clients[t_idx], [requests[i] for i in indices],
                               trainer.gkd_logits_topk, targets)
            for i, result in zip(indices, results):
                answers[request_key(requests[i])] = result
        return answers

    def expect(self, answers=None, pending: bool = False) -> None:
        """The answers the producer is getting for this step's batch (rank 0: a future or the answers; ``pending`` on
        every rank), resolved at the start of the step's teacher stage (:meth:`resolve`)."""
        self._answers, self._pending = answers, pending

    def resolve(self) -> None:
        """Every rank: the producer's answers for this step (rank 0 waits for them, then sends them to every rank)."""
        if not self._pending:
            return
        started = time.perf_counter()
        answers = self._answers
        if isinstance(answers, Future):
            answers = answers.result()
        if self.trainer.accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list
            answers = broadcast_object_list([answers], from_process=0)[0]
        self._answers, self._pending = answers, False
        self._waited = time.perf_counter() - started

    def answers(self, client_index: int, requests: List[Tuple[list, list]], with_targets: bool):
        """Teacher ``client_index``'s answers to ``requests``: the producer's where it asked the same request, the
        others asked now (timed: ``gkd/teacher_wait_s``; the share answered ahead: ``gkd/teacher_ahead``)."""
        trainer = self.trainer
        ahead = self._answers or {}
        answers = [ahead.get(request_key(r)) for r in requests]
        missing = [i for i, a in enumerate(answers) if a is None]
        started = time.perf_counter()
        if missing:
            asked = score_at(trainer.teacher_clients[client_index], [requests[i] for i in missing],
                             trainer.gkd_logits_topk, with_targets)
            for i, answer in zip(missing, asked):
                answers[i] = answer
        if self.prefetch_on and trainer.model.training:
            metrics = trainer.custom_metrics['train']
            waited, self._waited = time.perf_counter() - started + self._waited, 0.0
            add_token_sum(metrics['gkd/teacher_wait_s'], waited, 1)
            add_token_sum(metrics['gkd/teacher_ahead'], float(len(requests) - len(missing)), len(requests))
        return answers
