"""Samples to micro-batches: both views encoded (the teacher's through its own template when it has another
tokenizer) and cut at ``--max_length`` (:mod:`.max_length`), each micro-batch's rows, advantages and sampler
log-probabilities, and the response-token counts that size and normalise the loss."""
from __future__ import annotations

import torch
from swift.rlhf_trainers.utils import encode_sample
from swift.utils import get_logger, to_device

from swift_gkd_plugin.core import Mode
from swift_gkd_plugin.core.views import (check_views_aligned, generated_turns, prepare_teacher_view,
                                        without_history_loss)
from swift_gkd_plugin.swift.rollout.correction import sampler_logprobs_of_batch
from swift_gkd_plugin.swift.rollout.max_length import length_cap
from swift_gkd_plugin.swift.run.guards import RunError
from swift_gkd_plugin.swift.sequence_parallel import group_size, response_token_counts, token_counts_entries
from swift_gkd_plugin.swift.step.encoding import encode_views

logger = get_logger()


class BatchesMixin:
    """ms-swift's batching stage for GKD: encoded micro-batches with what the loss reads."""

    def _prepare_batch_inputs(self, samples):
        """ms-swift's micro-batches, each with its number of rows and, on an on-policy step with rewards, their
        advantages."""
        self._xtok_rows = []  # filled by _encode_samples, one entry per micro-batch
        self._own_views = []  # filled by _encode_samples, one entry per micro-batch
        batches = super()._prepare_batch_inputs(samples)
        sizes = [len(chunk) for chunk in self.split_by_mini_batches(samples)]  # the same split as ms-swift's
        for batch, rows, own_view in zip(batches, sizes, self._own_views):
            batch['gkd_rows'] = rows
            batch['gkd_own_view'] = own_view
        if self.teacher.xtok is not None:
            for batch, rows in zip(batches, self._xtok_rows):
                batch['gkd_xtok_rows'] = rows
            self._xtok_rows = []
        if self._advantages is not None:
            for batch, advantages in zip(batches, self._advantages.split(sizes)):
                batch['gkd_advantages'] = advantages
        # the policy-gradient terms' samples: the reward term's, and the sampled-token term's on on-policy steps
        policy_gradient = ((self._advantages is not None and self.args.gkd_rl_coef > 0)
                           or (self.args.gkd_sampled_kl_coef > 0 and self._gkd_mode is Mode.ON_POLICY))
        if policy_gradient and self.samplers.measure_mismatch:
            self._attach_sampler_logprobs(batches, self.split_by_mini_batches(samples))
        return batches

    def split_by_mini_batches(self, samples):
        """The generation batch's micro-batches, ``--steps_per_generation`` of them. Under sequence parallelism the
        ranks of a group hold the same samples and split them alike (ms-swift pools the group's samples into N times
        as many micro-batches, for GRPO): each rank then trains on its slice of every row."""
        steps = self.args.steps_per_generation if self.model.training else 1
        return self._split_data_by_steps(samples, steps)

    def _encode_samples(self, samples):
        """Encode both views; a teacher view that does not score the student's response tokens names its row."""
        template = self.template
        multi_turn = self.multi_turn_scheduler is not None and self._gkd_mode.needs_generation
        for sample in samples:
            prepare_teacher_view(sample)
            if multi_turn:  # the loss keeps the sampled turns only, not a dataset row's earlier answers
                turns = generated_turns(sample)
                sample.messages = without_history_loss(sample.messages, turns)
                if sample.teacher_messages:
                    sample.teacher_messages = without_history_loss(sample.teacher_messages, turns)
        if self.teacher.xtok is not None:  # the teacher reads the samples through its own template, not the student's
            return self._encode_cross_tokenizer(samples)
        cap = length_cap(self)
        with self._template_context(template):  # (ms-swift's: --max_length unset while encoding)
            student_list, teacher_list, has_teacher_view = encode_views(samples, template)
        cap.cut(samples, student_list, teacher_list, has_teacher_view)  # --max_length, as swift sft cuts
        self._own_views.append(has_teacher_view)
        for sample, student, teacher in zip(samples, student_list, teacher_list):
            if not has_teacher_view:
                break
            try:
                check_views_aligned(sample, student, teacher)
            except ValueError as exc:  # one line naming the row, not the step's traceback
                raise RunError(str(exc)) from None
        with self._template_context(template):
            encoded = to_device(template.data_collator(student_list), self.accelerator.device)
            teacher_encoded = (to_device(template.data_collator(teacher_list), self.accelerator.device)
                               if has_teacher_view else None)
        return encoded, teacher_encoded

    def _encode_cross_tokenizer(self, samples):
        """The student's view, and the teacher's through its own template (privileged prompts included, see
        ``CrossTokenizerTeacher.teacher_row``); each row's alignment waits for its micro-batch."""
        with self._template_context(self.template):
            student_list = [encode_sample(sample, self.template) for sample in samples]
        for student in student_list:
            student.pop('_extra_kwargs', None)
        teacher_template = self.teacher.xtok.template
        with self._template_context(teacher_template):
            teacher_list, rows = self.teacher.xtok.encode_and_align(samples, student_list)
            teacher_encoded = to_device(teacher_template.data_collator(teacher_list), self.accelerator.device)
        with self._template_context(self.template):
            encoded = to_device(self.template.data_collator(student_list), self.accelerator.device)
        self._xtok_rows.append(rows)
        self._own_views.append(True)
        return encoded, teacher_encoded

    def _attach_sampler_logprobs(self, batches, chunks) -> None:
        """The sampler's log-probability of each response token (``gkd_sampler_logprobs``, see
        :func:`sampler_logprobs_of_batch`) where the sampler reported them; says once when it did not."""
        missing = 0
        for batch, chunk in zip(batches, chunks):
            logprobs = sampler_logprobs_of_batch(chunk, batch['model_inputs']['labels'])
            if logprobs is not None:
                batch['gkd_sampler_logprobs'] = logprobs
            missing += sum(1 for sample in chunk if not getattr(sample, 'rollout_logprobs', None))
        if missing and not self._sampler_logprobs_noted and self.args.rollout_importance_sampling_mode is not None:
            self._sampler_logprobs_noted = True
            why = ' (SKD samples from a student/teacher mixture)' if self.args.gkd_skd_top_k else ''
            logger.warning(f'swift_gkd_plugin: the sampler reported no per-token log-probabilities for {missing} '
                           f'completion(s){why}: their importance weights are 1, no sampler/policy correction '
                           'applies to them (said once)')

    def _count_step_tokens(self, batches) -> None:
        """Attach to every micro-batch the number of response tokens of its whole optimizer step.

        Micro-batches ``[i * GA, (i + 1) * GA)`` of one generation batch form optimizer step ``i``; their counts
        are summed over all micro-batches and all ranks with one all-reduce per generation batch. Each micro-batch
        also gets its own response-token counts (:func:`token_counts_entries`: this rank's slice of them under
        sequence parallelism), read on the host here once for the whole generation batch: they size the loss's
        tensors without a host sync per micro-batch.
        """
        training = self.model.training
        group = self.args.gradient_accumulation_steps if training else 1
        steps = (len(batches) + group - 1) // group
        tokens = [response_token_counts(b['model_inputs']['labels'], b['teacher_model_inputs']['labels'])
                  for b in batches]
        tokens = torch.stack(tokens).tolist() if batches else []  # the one read
        counts = [0.0] * steps  # per optimizer step: response tokens (gkd/completion_length: rollout/sampling.py)
        for i, (batch, batch_tokens) in enumerate(zip(batches, tokens)):
            batch.update(token_counts_entries(batch_tokens, batch.get('gkd_own_view', True),
                                              check_views=self.teacher.xtok is None))
            counts[i // group] += batch['gkd_whole_tokens']
        if training and self.accelerator.num_processes > 1:
            counts = torch.tensor(counts, dtype=torch.float64, device=self.accelerator.device)
            counts = self.accelerator.reduce(counts, reduction='sum').tolist()
            counts = [c / group_size() for c in counts]  # a sequence-parallel group's ranks hold the same rows
        for i, batch in enumerate(batches):
            batch['gkd_step_tokens'] = float(counts[i // group])
            batch['gkd_mode'] = self._gkd_mode

