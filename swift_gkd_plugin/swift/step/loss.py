"""The loss of one micro-batch, from the batch that :mod:`swift_gkd_plugin.swift.rollout.sampling` built to the loss
value and its metrics.

It learns from the positions whose label is not ``IGNORE_INDEX``, in the student's and the teacher's views: that is
the per-token mask of the tokens to learn from, whoever sampled them (a rollout marks context it did not write, such
as tool outputs, with ``IGNORE_INDEX`` labels: ms-swift's encoding does so from a sample's ``response_loss_mask``).

* :meth:`LossMixin.compute_loss`: the setup (positions, normaliser, label term), then the fused or the dense loss;
* the fused loss on hidden states (heads applied chunk by chunk; under ZeRO-3 inside the student's forward);
* the dense loss on full logits; the teacher's signal of each;
* the terms both share (rollout importance weights) and the loss metrics (``gkd/``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F
from swift.utils import get_logger

from swift_gkd_plugin.core import Divergence, Mode, align_vocab, generalized_jsd
from swift_gkd_plugin.core.constants import IGNORE_INDEX
from swift_gkd_plugin.core.entropy import tempered_entropy
from swift_gkd_plugin.core.fused.loss import fused_linear_jsd
from swift_gkd_plugin.core.fused.kernels import describe_backend
from swift_gkd_plugin.core.guards.non_finite import loss_terms, non_finite_loss_message
from swift_gkd_plugin.core.weights.offload import is_partitioned
from swift_gkd_plugin.core.weights.inference_tensors import reclaim_after_inference_sampling
from swift_gkd_plugin.core.policy_gradient import (head_token_logprobs, policy_gradient_loss,
                                                   rollout_importance_weights, sampled_token_stats)
from swift_gkd_plugin.core.row_divergence import gated_row_count
from swift_gkd_plugin.core.sampled_kl import discounted_returns, other_rows_baseline, token_log_ratios
from swift_gkd_plugin.core.scores.sampled_kd import sampled_forward_kl
from swift_gkd_plugin.core.teacher_signal import (CrossTokenizerRows, TeacherHead, TeacherLogits, TeacherSamples,
                                                  TeacherSignal, TeacherTopK)
from swift_gkd_plugin.core.topk import (drop_ids_outside_vocab, topk_divergence_dense, topk_of_logits,
                                        topk_teacher_entropy)
from swift_gkd_plugin.core.views import response_positions, shift_labels
from swift_gkd_plugin.swift.step.hidden_states import (fused_fallback_reason, gathered_heads, head_bypassed, head_is_sharded,
                                                  head_rows, output_head, topk_from_hidden)
from swift_gkd_plugin.swift.run.guards import RunError
from swift_gkd_plugin.swift.sequence_parallel import (announce_batch, group_size, local_slice, response_token_counts,
                                                     teacher_positions_of_slice, token_counts_entries,
                                                     whole_sequences)
from swift_gkd_plugin.swift.setup.teacher_server import teacher_names
from swift_gkd_plugin.swift.step.evaluation import EvaluationMixin
from swift_gkd_plugin.swift.step.accumulation import undo_trainer_ga_division
from swift_gkd_plugin.swift.step.token_metrics import add_token_sum as _add_token_sum

logger = get_logger()


class LossMixin(EvaluationMixin):
    """The loss of one micro-batch (``compute_loss``) and its metrics; evaluation under sequence parallelism from
    :class:`EvaluationMixin`."""

    def _setup_loss(self) -> None:
        """The loss of every step: fused or dense (:meth:`_decide_loss_impl`), the one divergence every path computes
        (``core.row_divergence``; ``--beta`` is the JSD's parameter), normalised over the whole step."""
        self._loss_batch, self._check_now = None, False  # training_step's non-finite check
        # compute_loss divides by the step's token count: the Trainer must not divide again (step/accumulation.py)
        self.loss_is_scaled_for_ga = True
        self._fused = self._decide_loss_impl()
        self._divergence = Divergence(self.args.gkd_divergence, beta=self.args.beta, alpha=self.args.gkd_skew_alpha,
                                      fkl_above_entropy=self.args.gkd_entropy_fkl_threshold)
        logger.info(f'swift_gkd_plugin: divergence {self._divergence} at temperature {self.args.temperature}')

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """One micro-batch: the teacher's signal, the loss terms (divergence, SFT or policy-gradient term), their
        metrics; fused on hidden states where it applies, else on the full logits."""
        setup = self._loss_setup(inputs)
        fwd = {k: v for k, v in inputs['model_inputs'].items() if k != 'labels'}
        self._ready_the_models(model)
        loss_impl = self._fused_loss if self._fused else self._dense_loss
        loss, outputs = loss_impl(model, fwd, inputs['teacher_model_inputs'], inputs, setup)
        if self.model.training:
            self._nothing_learnt.add(loss, inputs)  # run_guards.NothingLearnt: a run whose loss stays 0 stops
            self._loss_batch = inputs  # for training_step's check of a non-finite loss
        loss = undo_trainer_ga_division(self, loss, num_items_in_batch)  # transformers <= 5.17 divides it after
        return (loss, outputs) if return_outputs else loss

    def _ready_the_models(self, model) -> None:
        """Before a micro-batch's forwards: the weights ZeRO-3 gathered as the samplers drew made trainable again, an
        offloaded teacher's upload started (it overlaps the student's forward)."""
        if self.model.training and not self.args.ds3_gather_for_generation:  # ZeRO-3 gathered as they sampled
            for sampler in (model, self.teacher_model):
                if sampler is not None:
                    reclaim_after_inference_sampling(sampler)
        if self.teacher.offloader is not None and not self.use_teacher_api:
            self.teacher.offloader.prefetch()  # the upload overlaps the student's forward

    def training_step(self, model, inputs, *args, **kwargs):
        """One training micro-batch; a NaN or infinite loss stops the run (:class:`RunError`). The loss is read
        here, after the backward, where the HF Trainer's NaN filter (``--logging_nan_inf_filter``, on by default)
        reads it anyway: the loss path itself makes no host sync. The rare failing micro-batch is then run once
        more, forward only, to name the model and the position that hold the first non-finite value."""
        loss = super().training_step(model, inputs, *args, **kwargs)
        batch, self._loss_batch = self._loss_batch, None
        if not bool(torch.isfinite(loss).all()):
            self._explain_non_finite(model, inputs, batch)
        return loss

    def _explain_non_finite(self, model, raw_inputs, batch) -> None:
        """Raise the error of a non-finite training loss: the micro-batch's forward repeated under ``no_grad`` with
        the check on (:meth:`_check_finite` raises naming the part), where that involves no collective (a model whose
        weights are sharded over the ranks would wait for the others); else the step and the mode alone."""
        mode = _mode_of(batch).value if batch is not None else 'unknown'
        rerun = batch is not None and not is_partitioned(model)
        if rerun:
            self._check_now = True
            try:
                with torch.no_grad(), self.template.forward_context(self.model, raw_inputs), \
                        self.compute_loss_context_manager():
                    self.compute_loss(self.accelerator.unwrap_model(model), batch)
            finally:
                self._check_now = False
        raise RunError(non_finite_loss_message(self.state.global_step + 1, mode, True, [], outputs_checked=rerun,
                                               terms=loss_terms(self.args)))

    def _loss_setup(self, inputs) -> '_LossSetup':
        """Response positions, the step's normaliser and which label term applies to this micro-batch (and the
        logits trimmed to the response positions where ms-swift can)."""
        model_inputs = inputs['model_inputs']
        teacher_inputs = inputs['teacher_model_inputs']
        mode = _mode_of(inputs)

        if self.get_use_logits_to_keep(self.template.sequence_parallel_size == 1):
            # Only the response positions need logits; each side is trimmed by its own labels.
            self.prepare_logits_to_keep(model_inputs)
            if not self.use_teacher_api:
                self.prepare_logits_to_keep(teacher_inputs)

        student_labels = shift_labels(model_inputs['labels'])
        teacher_labels = shift_labels(teacher_inputs['labels'])
        sequence_parallel = self.template.sequence_parallel_size > 1
        teacher_index = None  # the teacher's response positions, read from its mask below where None
        if 'gkd_tokens' not in inputs:  # a batch that did not come from _count_step_tokens: counted here (one sync)
            counts = response_token_counts(model_inputs['labels'], teacher_inputs['labels']).tolist()
            own_view = sequence_parallel and not torch.equal(student_labels, teacher_labels)
            inputs = {**inputs, **token_counts_entries(counts, own_view, check_views=self.teacher.xtok is None)}
        n_student, n_teacher = inputs['gkd_tokens']  # (this rank's slice of the rows under sequence parallelism)
        if sequence_parallel:  # the models' outputs are this rank's slice of each sequence: so are the labels
            announce_batch(model_inputs)
            if inputs['gkd_own_view'] or self.use_teacher_api:  # the teacher read (a server scored) whole rows: its
                teacher_index = teacher_positions_of_slice(  # signal at this slice's tokens
                    student_labels, teacher_labels, n_student, inputs['gkd_whole_tokens'])
            student_labels = teacher_labels = local_slice(student_labels)
        student_mask = student_labels != IGNORE_INDEX
        teacher_mask = teacher_labels != IGNORE_INDEX
        step_tokens = inputs.get('gkd_step_tokens', float(inputs['gkd_whole_tokens']))
        # DDP and DeepSpeed average gradients over ranks: scaling by the world size makes the gradient that of
        # (sum over every response token of the step) / (their count). Under sequence parallelism a rank holds a
        # slice of the tokens, its group all of them once: an evaluation loss is then the mean over the group.
        world = self.accelerator.num_processes if self.model.training else group_size()
        normalizer = max(step_tokens, 1.0) / world
        # the SFT term needs dataset responses; a non-positive weight means none, in both loss implementations
        use_sft = mode is not Mode.ON_POLICY and self.args.sft_alpha > 0
        sft_alpha = self.args.sft_alpha if use_sft else 0.0
        # the policy-gradient term: on-policy steps, each sampled token weighted by its completion's advantage
        advantages = inputs.get('gkd_advantages')
        student_index = response_positions(student_mask, n_student)
        token_advantages = None
        if mode is Mode.ON_POLICY and advantages is not None and self.args.gkd_rl_coef > 0:
            token_advantages = _rows(advantages[:, None].expand(student_mask.shape), student_index)
        # the sampled-token term (--gkd_sampled_kl_coef): on-policy steps, advantages from the teacher's log-probs
        sampled_kl = mode is Mode.ON_POLICY and self.args.gkd_sampled_kl_coef > 0
        sampler_logprobs = (inputs.get('gkd_sampler_logprobs') if token_advantages is not None or sampled_kl
                            else None)
        owner = getattr(inputs.get('gkd_batch'), 'teacher_of_row', None) if sampled_kl else None
        token_teachers = None if owner is None else _rows(owner[:, None].expand(student_mask.shape), student_index)
        if teacher_index is None:
            teacher_index = response_positions(teacher_mask, n_teacher)
        return _LossSetup(student_mask, teacher_mask, _rows(student_labels, student_index), mode, normalizer,
                          sft_alpha, token_advantages, student_index, teacher_index, sampler_logprobs, sampled_kl,
                          token_teachers, sequence_parallel and inputs['gkd_own_view'])

    def _fused_loss(self, model, fwd, teacher_inputs, inputs, setup: '_LossSetup'):
        """The fused loss on the student's last hidden states; the heads are applied chunk by chunk.

        Without ZeRO-3: the student's forward (head bypassed), then the teacher's side, then the loss.
        Under ZeRO-3 the student's head is only a shard outside its forward, and the head's gradient must arrive
        while it is whole. So the teacher's side comes first (a shared-base teacher is this same engine, which
        cannot run inside its own forward), and the student's forward and the loss run together as the forward
        of the engine's module: the head, read there, becomes an external parameter of that module, which
        DeepSpeed gathers for the forward and again for the backward (as TRL and ms-swift do for Liger's loss).
        """
        student = self.accelerator.unwrap_model(model)
        teacher = None if self.teacher_model is None else self.accelerator.unwrap_model(self.teacher_model)
        if not head_is_sharded(student):
            with head_bypassed(student):
                outputs = model(**fwd)
            with gathered_heads([teacher]):  # a ZeRO-3 teacher under a replicated student
                teacher_side = self._fused_teacher_side(model, teacher_inputs, setup, inputs['gkd_batch'])
                loss = self._fused_apply(student, setup.student_rows(outputs.logits), teacher_side, setup)
            return loss, outputs

        with gathered_heads([student, teacher]):  # reads only: the teacher's top-k or its head
            teacher_side = self._fused_teacher_side(model, teacher_inputs, setup, inputs['gkd_batch'])
        redirect = _LossInForward.installed_on(student)
        with gathered_heads([teacher]):
            redirect.pending = lambda out: self._fused_apply(student, setup.student_rows(out.logits), teacher_side,
                                                             setup)
            try:
                loss, outputs = model(**fwd)
            finally:
                redirect.pending = None
        return loss, outputs

    def _fused_teacher_side(self, model, teacher_inputs, setup: '_LossSetup',
                            gkd_batch) -> Union[TeacherHead, TeacherTopK]:
        """The teacher's side of the fused loss: its top-k, or its hidden states and head.

        A shared-base teacher's head is the student's own head, left out here (``TeacherHead`` without a weight)
        and read at the loss, where ZeRO-3 keeps it gathered.
        """
        student_vocab = head_rows(self.accelerator.unwrap_model(model))
        if self.use_teacher_api:
            # the teacher's padded output rows: no such token for the student
            return TeacherTopK(*drop_ids_outside_vocab(setup.teacher_rows(gkd_batch.teacher_topk_indices),
                                                       setup.teacher_rows(gkd_batch.teacher_topk_logprobs).float(),
                                                       student_vocab), _token_logprobs(setup, gkd_batch))
        with whole_sequences(setup.teacher_whole):
            t_hidden, (t_weight, t_bias) = self.teacher.forward(model, teacher_inputs, hidden=True)
        t_hidden = setup.teacher_rows(t_hidden)
        if self.gkd_logits_topk is not None:
            return TeacherTopK(*topk_from_hidden(t_hidden, t_weight, t_bias, self.gkd_logits_topk, student_vocab))
        if self._is_self_distillation:
            return TeacherHead(t_hidden)  # the student's head, frozen, read at the loss
        return TeacherHead(t_hidden, t_weight, t_bias)

    def _fused_apply(self, student, student_hidden, teacher_side: Union[TeacherHead, TeacherTopK],
                     setup: '_LossSetup') -> torch.Tensor:
        """The fused loss of the student's head on its hidden states against the teacher's side, and its metrics."""
        labels, token_advantages, normalizer = setup.labels, setup.token_advantages, setup.normalizer
        weight, bias = output_head(student)
        if isinstance(teacher_side, TeacherHead) and teacher_side.uses_student_head:
            teacher_side = teacher_side.with_head(weight, bias)  # frozen for the teacher's side
        # the label term: the SFT cross-entropy on dataset responses, or the policy-gradient term on the student's
        # samples (advantage-weighted, at the sampling temperature: the reward term's, the sampled-token term's or
        # both, their weights folded into one per-token weight); never both kinds in one step
        label_term, pg_sum_scale = {}, None
        if setup.sft_alpha > 0:
            label_term = dict(labels=labels, sft_alpha=setup.sft_alpha)
        elif token_advantages is not None or setup.sampled_kl:
            t = self.samplers.temperature
            policy = None
            if setup.sampler_logprobs is not None or setup.sampled_kl:  # the sampled tokens' log-probs, detached
                policy = head_token_logprobs(student_hidden, weight, bias, labels, t)
            weights = self._rollout_weights(setup, policy) if setup.sampler_logprobs is not None else 1.0
            folded = 0.0
            if token_advantages is not None:
                folded = self.args.gkd_rl_coef * token_advantages
                pg_sum_scale = 1.0 / self.args.gkd_rl_coef if not setup.sampled_kl else None
            if setup.sampled_kl:
                teacher_lp = (head_token_logprobs(teacher_side.hidden, teacher_side.weight, teacher_side.bias, labels,
                                                  t) if isinstance(teacher_side, TeacherHead)
                              else teacher_side.token_logprobs)
                folded = folded + self.args.gkd_sampled_kl_coef * self._sampled_kl_advantages(setup, policy,
                                                                                                teacher_lp)
            label_term = dict(labels=labels, sft_alpha=1.0, label_weights=folded * weights, label_temperature=t)
        on_policy = setup.mode is Mode.ON_POLICY
        loss, stats = fused_linear_jsd(
            student_hidden, weight, bias, teacher=teacher_side, **label_term, divergence=self._divergence,
            temperature=self.args.temperature, topk_tail=self.args.gkd_topk_tail,
            normalizer=normalizer / self.args.gkd_divergence_coef if self.args.gkd_divergence_coef else 0.0,
            sft_normalizer=normalizer, return_entropy=on_policy, backend=self.args.gkd_fused_backend)
        self._check_finite(loss, setup.mode, teacher_side, [('last hidden states', student_hidden),
                                                            ('output head', weight)])
        n = stats['num_tokens']  # a device tensor: read at logging
        self._log_loss_metrics(setup.mode, stats['divergence_sum'], n, stats['top1_agree'], n,
                               pg_sum=stats['sft_sum'] * pg_sum_scale if pg_sum_scale is not None else None,
                               entropy_sum=stats['entropy_sum'] if on_policy else None,
                               teacher_entropy_sum=stats['teacher_entropy_sum'] if on_policy else None,
                               gated_rows=stats.get('entropy_fkl_rows') if on_policy else None)
        return loss

    def _dense_loss(self, model, fwd, teacher_inputs, inputs, setup: '_LossSetup'):
        """The loss on the student's full logits: teacher signal, then the loss terms, then the metrics."""
        outputs = model(**fwd)
        student = setup.student_rows(outputs.logits)
        teacher = self._dense_teacher_signal(model, teacher_inputs, setup, inputs)
        per_token, agreements, n_compared = self._dense_divergence(student, teacher)

        total = per_token.sum() * self.args.gkd_divergence_coef
        coef = self.args.gkd_ref_kl_coef
        if coef:  # --gkd_ref_kl_coef: the anchor to the initial student
            total = total + coef * self.reference.kl_sum(model, fwd, setup.student_rows, student)
        if setup.sft_alpha > 0:
            total = total + setup.sft_alpha * F.cross_entropy(student.float(), setup.labels, reduction='sum')
        pg_sum = entropy_sum = teacher_entropy_sum = gated_rows = None
        if setup.mode is Mode.ON_POLICY:
            rl = setup.token_advantages is not None
            with torch.set_grad_enabled((rl or setup.sampled_kl) and torch.is_grad_enabled()):  # else a metric
                # the sampled tokens' log-probabilities at their own (sampling) temperature, the entropy at the loss's
                logprobs, entropy = sampled_token_stats(student, setup.labels, self.samplers.temperature,
                                                        entropy_temperature=self.args.temperature)
            entropy_sum = entropy.detach().sum()
            teacher_entropies = self._teacher_entropies(teacher, student.shape[-1])
            teacher_entropy_sum = teacher_entropies.sum()
            gated_rows = gated_row_count(teacher_entropies, self._divergence)
            weights = self._rollout_weights(setup, logprobs) if rl or setup.sampled_kl else 1.0
            if rl:
                pg = policy_gradient_loss(logprobs, setup.token_advantages * weights).sum()
                total = total + self.args.gkd_rl_coef * pg
                pg_sum = pg.detach()
            if setup.sampled_kl:
                teacher_lp = getattr(teacher, 'token_logprobs', None)  # a server's (TeacherTopK)
                if isinstance(teacher, TeacherLogits):
                    with torch.no_grad():
                        teacher_lp = sampled_token_stats(teacher.logits, setup.labels, self.samplers.temperature)[0]
                advantages = self._sampled_kl_advantages(setup, logprobs.detach(), teacher_lp)
                total = total + self.args.gkd_sampled_kl_coef * policy_gradient_loss(logprobs, advantages * weights
                                                                                     ).sum()
        loss = total / setup.normalizer
        if student.shape[0] == 0:
            loss = loss + outputs.logits.sum() * 0.0  # keep the graph connected for DDP/ZeRO
        self._check_finite(loss, setup.mode, teacher, [('logits', student)])
        logged = per_token.detach().float()
        if isinstance(teacher, TeacherSamples):  # the sampled cross-entropy less the teacher's entropy: KL's estimate
            logged = logged - teacher.entropy.float()
        self._log_loss_metrics(setup.mode, logged.sum(), per_token.numel(), agreements,
                               n_compared, pg_sum=pg_sum, entropy_sum=entropy_sum,
                               teacher_entropy_sum=teacher_entropy_sum, gated_rows=gated_rows)
        return loss, outputs

    def _check_finite(self, loss, mode: Mode, teacher: TeacherSignal, student_parts) -> None:
        """A NaN or infinite micro-batch loss stops the run (:class:`~swift_gkd_plugin.swift.run.guards.RunError`),
        naming the teacher or the student whose outputs hold the first non-finite value (``student_parts``:
        ``(what, tensor)``), the step and the position. In evaluation, and in training when :meth:`training_step`
        repeats a failing micro-batch (``_check_now``); a training micro-batch is checked there, with no host read
        here."""
        if self.model.training and not self._check_now:
            return
        if bool(torch.isfinite(loss.detach()).all()):
            return
        parts = [(self.teacher.name(), what, tensor, logprobs) for what, tensor, logprobs in _signal_parts(teacher)]
        parts += [(self.teacher.student_name(), what, tensor, False) for what, tensor in student_parts]
        raise RunError(non_finite_loss_message(self.state.global_step + self.model.training, mode.value,
                                               self.model.training, parts, terms=loss_terms(self.args)))

    def _teacher_entropies(self, teacher: TeacherSignal, student_vocab: int) -> torch.Tensor:
        """The teacher's entropy ``[N]`` at the loss temperature at each response position (``gkd/teacher_entropy``,
        beside the student's ``gkd/entropy``): its own logits; the bucket distribution of a top-k teacher (the ids
        the dense top-k loss keeps, no tail); for a teacher with another tokenizer, its own logits at each student
        token's aligned position (the row the loss compares it with)."""
        temperature = self.args.temperature
        if isinstance(teacher, TeacherLogits):
            return tempered_entropy(teacher.logits, temperature)
        if isinstance(teacher, TeacherTopK):
            _, logprobs = drop_ids_outside_vocab(teacher.ids.clamp_min(0), teacher.logprobs.float(), student_vocab)
            return topk_teacher_entropy(logprobs, temperature, False, student_vocab)
        if isinstance(teacher, TeacherSamples):
            return teacher.entropy.float()
        # CrossTokenizerRows: every teacher position once (no [N, Vt] copy of the aligned rows), then the partners
        return tempered_entropy(teacher.logits, temperature).reshape(-1)[teacher.rows.teacher_index]

    def _dense_teacher_signal(self, model, teacher_inputs, setup: '_LossSetup', inputs) -> TeacherSignal:
        """The teacher's side of the dense loss: a server's top-k, aligned rows of a teacher with another
        tokenizer, the top-k of a local teacher (``--gkd_logits_topk``) or its full logits."""
        gkd_batch = inputs['gkd_batch']
        if self.use_teacher_api and getattr(gkd_batch, 'teacher_samples', None) is not None:
            ids, logprobs = gkd_batch.teacher_topk_indices, gkd_batch.teacher_topk_logprobs
            return TeacherSamples(setup.teacher_rows(gkd_batch.teacher_samples),
                                  setup.teacher_rows(gkd_batch.teacher_entropy),
                                  setup.teacher_rows(ids.gather(-1, logprobs.argmax(-1, keepdim=True))[..., 0]))
        if self.use_teacher_api:
            return TeacherTopK(setup.teacher_rows(gkd_batch.teacher_topk_indices),
                               setup.teacher_rows(gkd_batch.teacher_topk_logprobs), _token_logprobs(setup, gkd_batch))
        if self.teacher.xtok is not None:  # the teacher reads its own tokenization: aligned positions
            aligned = self.teacher.xtok.teacher_rows(setup.student_mask, setup.teacher_mask,
                                                     inputs['gkd_xtok_rows'])
            return CrossTokenizerRows(self.teacher.forward(model, teacher_inputs), aligned)
        with whole_sequences(setup.teacher_whole):
            teacher = setup.teacher_rows(self.teacher.forward(model, teacher_inputs))
        if self.gkd_logits_topk is not None:
            return topk_of_logits(teacher, self.gkd_logits_topk)
        return TeacherLogits(teacher)

    def _dense_divergence(self, student: torch.Tensor, teacher: TeacherSignal):
        """Per-token divergence of the student's logits ``[N, V]`` against the teacher's signal, the number of
        compared tokens whose two top-1 tokens agree (a device tensor) and the number of compared tokens."""
        if isinstance(teacher, TeacherTopK):
            return self._topk_divergence(student, teacher.ids, teacher.logprobs)
        if isinstance(teacher, TeacherSamples):  # forward KL from the stored draws (core/scores/sampled_kd.py)
            per_token, _ = sampled_forward_kl(student, teacher.ids, self.args.temperature)
            agree = student.argmax(-1) == teacher.top1
            return per_token, agree.sum(), agree.numel()
        if isinstance(teacher, CrossTokenizerRows):
            self._log_alignment_metrics(teacher.rows.exact)
            per_token, agree = self.teacher.xtok.loss(student, teacher.logits, teacher.rows, self._divergence,
                                               self.args.temperature)
            return per_token, agree.sum(), agree.numel()
        student_aligned, teacher_aligned = align_vocab(student, teacher.logits)
        per_token = generalized_jsd(student_aligned, teacher_aligned, self._divergence, self.args.temperature)
        agree = student_aligned.argmax(-1) == teacher_aligned.argmax(-1)
        return per_token, agree.sum(), agree.numel()

    def _topk_divergence(self, student_logits, teacher_ids, teacher_logprobs):
        """Divergence over the teacher's top-k support (``core.topk.topk_divergence_dense``: the fused loss's)."""
        per_token, agree, covered = topk_divergence_dense(student_logits, teacher_ids, teacher_logprobs,
                                                          self._divergence, self.args.temperature)
        return per_token, agree.sum(), covered.sum()  # counted on the device

    def _sampled_kl_advantages(self, setup: '_LossSetup', student_logprobs: torch.Tensor,
                               teacher_logprobs: Optional[torch.Tensor]) -> torch.Tensor:
        """The sampled-token term's advantage of each response token (:mod:`swift_gkd_plugin.core.sampled_kl`): the
        teacher's log-probability of the sampled token minus the student's (both detached, at the sampling
        temperature), summed over the row's later response tokens with ``--gkd_sampled_kl_discount``, less the other
        rows' mean with ``--gkd_sampled_kl_baseline batch``; logs
        ``gkd/sampled_kl``, the mean of the per-token reverse-KL estimate, and with several tag-routed teachers
        ``gkd/<name>/sampled_kl``, its mean over each teacher's rows (every teacher on every rank, 0 tokens included)."""
        if teacher_logprobs is None:
            raise RunError('swift_gkd_plugin: --gkd_sampled_kl_coef needs the teacher\'s log-probability of every '
                           'sampled token, and this teacher\'s signal has none (a top-k teacher)')
        teacher, student = teacher_logprobs.float(), student_logprobs.float()
        ratios = token_log_ratios(teacher, student, torch.ones_like(student, dtype=torch.bool))  # response rows
        metrics = self.custom_metrics['train' if self.model.training else 'eval']
        _add_token_sum(metrics['gkd/sampled_kl'], -ratios.sum(), setup.student_index.numel())
        if setup.token_teachers is not None:
            for t, name in enumerate(teacher_names(self.teacher_configs)):
                on = setup.token_teachers == t
                _add_token_sum(metrics[f'gkd/{name}/sampled_kl'], -(ratios * on).sum(), on.sum())
        discount, shape = self.args.gkd_sampled_kl_discount, setup.student_mask.shape
        advantages = ratios
        if discount:  # the discount runs along each row: the [B, S] layout, and back
            laid_out = ratios.new_zeros(shape.numel()).index_copy_(0, setup.student_index, ratios).view(shape)
            returns = discounted_returns(laid_out, setup.student_mask, discount)
            advantages = _rows(returns.unsqueeze(-1), setup.student_index).squeeze(-1)
        if self.args.gkd_sampled_kl_baseline == 'batch':
            advantages = advantages - other_rows_baseline(advantages, setup.student_index // shape[1], shape[0])
        return advantages

    def _rollout_weights(self, setup: '_LossSetup', policy_logprobs: torch.Tensor):
        """The importance weights of the policy-gradient term's tokens (``--rollout_importance_sampling_mode``; 1
        without one, or where the sampler reported no log-probability), and the mismatch metrics."""
        sampler = setup.sampler_logprobs
        if sampler is None:
            return 1.0
        mode = self.args.rollout_importance_sampling_mode
        # each token's sequence: its row in the micro-batch (flat index // positions per row)
        rows = None
        if mode is not None and mode.startswith('sequence'):
            rows = torch.div(setup.student_index, setup.student_mask.shape[1], rounding_mode='floor')
        correction = rollout_importance_weights(policy_logprobs, sampler, mode,
                                                self.args.rollout_importance_sampling_threshold, rows=rows,
                                                num_rows=setup.student_mask.shape[0])
        n, abs_diff, k3, weight, cut = correction.stats.unbind()  # device tensors: read at logging
        metrics = self.custom_metrics['train' if self.model.training else 'eval']
        _add_token_sum(metrics['gkd/rollout_logprob_diff'], abs_diff, n)
        _add_token_sum(metrics['gkd/rollout_k3_kl'], k3, n)
        if mode is not None:
            _add_token_sum(metrics['gkd/rollout_is_weight'], weight, n)
            _add_token_sum(metrics['gkd/rollout_is_truncated'], cut, n)
        return correction.weights

    def _log_loss_metrics(self, mode: Mode, divergence_sum, n_tokens, agreements, n_compared, *,
                          pg_sum=None, entropy_sum=None, teacher_entropy_sum=None, gated_rows=None) -> None:
        """Per-mode divergence and top-1 agreement of one micro-batch (both loss implementations), accumulated per
        token: a logged value is the mean over every response token since the last log, as the step loss is, not
        a mean of micro-batch means (micro-batches hold different numbers of tokens). Sums and counts may be device
        tensors: they are summed on the device and read once per logging step. ``gkd/distill_loss`` is the
        divergence over every mode; on-policy steps add the student's token entropy on its samples, the teacher's at
        the same positions (``gkd/teacher_entropy``) and, with rewards, ``gkd/pg_loss`` (the advantage-weighted
        negative log-likelihood, before ``--gkd_rl_coef``) and, with ``--gkd_entropy_fkl_threshold``,
        ``gkd/entropy_fkl_fraction`` (the fraction of those positions whose teacher entropy exceeds it: where the
        entropy-aware mix adds forward KL)."""
        metrics = self.custom_metrics['train' if self.model.training else 'eval']
        _add_token_sum(metrics[f'gkd/loss_{mode.value}'], divergence_sum, n_tokens)
        _add_token_sum(metrics['gkd/distill_loss'], divergence_sum, n_tokens)
        _add_token_sum(metrics['gkd/top1_agreement'], agreements, n_compared)
        if pg_sum is not None:
            _add_token_sum(metrics['gkd/pg_loss'], pg_sum, n_tokens)
        if entropy_sum is not None:
            _add_token_sum(metrics['gkd/entropy'], entropy_sum, n_tokens)
        if teacher_entropy_sum is not None:
            _add_token_sum(metrics['gkd/teacher_entropy'], teacher_entropy_sum, n_tokens)
        if gated_rows is not None:
            _add_token_sum(metrics['gkd/entropy_fkl_fraction'], gated_rows, n_tokens)

    def _log_alignment_metrics(self, exact: torch.Tensor) -> None:
        """Cross-tokenizer runs: the fraction of student response tokens paired exactly and through the fallback
        (token-weighted, like the other metrics)."""
        metrics = self.custom_metrics['train' if self.model.training else 'eval']
        n, n_exact = exact.numel(), exact.sum()
        _add_token_sum(metrics['gkd/xtok_exact_fraction'], n_exact, n)
        _add_token_sum(metrics['gkd/xtok_fallback_fraction'], n - n_exact, n)

    def _decide_loss_impl(self) -> bool:
        """--gkd_loss_impl: fused wherever it applies; otherwise dense, and the log says why (once)."""
        impl = self.args.gkd_loss_impl
        if self.score_store.train_on_samples:
            logger.info('swift_gkd_plugin: GKD loss implementation: dense (--teacher_scores_samples: the sampled '
                        'cross-entropy over the stored draws)')
            return False
        if impl == 'dense':
            logger.info('swift_gkd_plugin: GKD loss implementation: dense (--gkd_loss_impl dense)')
            return False
        reason = fused_fallback_reason(self)
        if reason is None:
            logger.info(f'swift_gkd_plugin: GKD loss implementation: fused (--gkd_loss_impl {impl}); its backend: '
                        f'{describe_backend(self.args.gkd_fused_backend)}')
            return True
        if self.args.gkd_topk_tail:
            raise ValueError(f'--gkd_topk_tail true needs the fused loss, which cannot apply here ({reason})')
        logger.warning(f'swift_gkd_plugin: --gkd_loss_impl {impl}: the fused loss cannot apply here ({reason}); '
                       'using the dense loss')
        return False



def _token_logprobs(setup: '_LossSetup', gkd_batch) -> Optional[torch.Tensor]:
    """A served teacher's log-probability of each response token (the sampled-token term asks for it), or None."""
    values = getattr(gkd_batch, 'teacher_token_logprobs', None)
    return None if values is None else setup.teacher_rows(values)


def _mode_of(batch) -> Mode:
    """The micro-batch's GKD mode (a batch that did not come from the rollout is off-policy)."""
    return batch.get('gkd_mode', Mode.OFF_POLICY)


def _signal_parts(teacher: TeacherSignal):
    """``(what, tensor, log-probabilities?)`` of a teacher signal, for :meth:`LossMixin._check_finite`."""
    if isinstance(teacher, TeacherTopK):
        return [('top-k log-probabilities', teacher.logprobs, True)]
    if isinstance(teacher, TeacherSamples):
        return [('entropy', teacher.entropy, False)]
    if isinstance(teacher, TeacherHead):
        return [('last hidden states', teacher.hidden, False), ('output head', teacher.weight, False)]
    return [('logits', teacher.logits.flatten(0, -2), False)]  # TeacherLogits, CrossTokenizerRows


@dataclass(frozen=True)
class _LossSetup:
    """What one micro-batch's loss needs beside the models' outputs (both loss implementations)."""
    student_mask: torch.Tensor  # the student's response positions (shifted labels != IGNORE_INDEX)
    teacher_mask: torch.Tensor  # the teacher view's response positions
    labels: torch.Tensor  # the student's labels there: dataset tokens, or its own samples on on-policy steps
    mode: Mode
    normalizer: float  # the step's response tokens over the ranks that average gradients
    sft_alpha: float  # the SFT term's weight on this step (0: none)
    token_advantages: Optional[torch.Tensor]  # per response token: the policy-gradient term's weights, or None
    student_index: torch.Tensor  # flat (batch x position) indices of student_mask's positions
    teacher_index: torch.Tensor  # the same for teacher_mask
    sampler_logprobs: Optional[torch.Tensor] = None  # per response token: the sampler's log-prob (NaN: none)
    sampled_kl: bool = False  # the sampled-token term applies to this micro-batch
    token_teachers: Optional[torch.Tensor] = None  # several tag-routed teachers: each response token's teacher
    teacher_whole: bool = False  # sequence parallelism, a teacher view of its own: the teacher reads whole rows

    def student_rows(self, x: torch.Tensor) -> torch.Tensor:
        """``x[student_mask]`` (``x``: ``[B, S, ...]``) without a host sync."""
        return _rows(x, self.student_index)

    def teacher_rows(self, x: torch.Tensor) -> torch.Tensor:
        """``x[teacher_mask]`` without a host sync."""
        return _rows(x, self.teacher_index)




def _rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The entries of ``x``'s two leading (batch, position) dimensions at the flat positions ``index``."""
    return x.flatten(0, 1).index_select(0, index)


class _LossInForward:
    """The student module's ``forward`` on the fused loss's ZeRO-3 path (see ``_fused_loss``), installed once.

    While ``pending`` holds the micro-batch's loss (a function of the student's outputs), a call runs the
    original forward with the head bypassed and returns ``(loss, outputs)``; otherwise it is the original forward.
    One object for the whole run, rather than a closure per micro-batch: a compiled module (``--torch_compile``)
    sees the same ``forward`` at every micro-batch. The loss itself runs outside the compiled graph (``_eager``).
    """

    def __init__(self, module: torch.nn.Module):
        self.module = module
        self.original = module.forward  # bound, or an instance attribute (e.g. accelerate's autocast wrapper)
        self.pending = None

    @classmethod
    def installed_on(cls, module: torch.nn.Module) -> '_LossInForward':
        forward = module.__dict__.get('forward')
        if not isinstance(forward, cls):
            forward = cls(module)
            module.forward = forward  # an instance attribute: nn.Module.__call__ dispatches to it
        return forward

    @torch.compiler.disable(recursive=False)  # this frame only: the original forward below is still compiled
    def __call__(self, *args, **kwargs):
        pending, self.pending = self.pending, None  # for this call only: the forward may call itself
        if pending is None:
            return self.original(*args, **kwargs)
        with head_bypassed(self.module):
            outputs = self.original(*args, **kwargs)
        return _eager(pending, outputs), outputs



@torch.compiler.disable
def _eager(function, *args):
    """``function(*args)`` outside torch.compile: the fused loss is a chunk loop with its own gradients, and
    tracing it would see ZeRO-3's partitioned head (an empty shard) rather than the gathered one."""
    return function(*args)
