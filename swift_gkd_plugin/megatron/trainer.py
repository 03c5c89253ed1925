"""The plugin's GKD trainer for Megatron-SWIFT (``megatron rlhf --rlhf_type gkd``).

Built on ms-swift's ``MegatronGKDTrainer`` (its rollout mixin, bridge, teacher loading, offload and shared-base
LoRA teacher, micro-batch encoding and teacher API routing); the plugin replaces:

* the mode policy: :func:`swift_gkd_plugin.core.modes.step_mode` on Megatron's iteration counter (restored on resume),
  so every rank takes the same decision, the same one as ``swift rlhf`` for the same seed and step; seq_kd included;
* sampling: vLLM through ms-swift's rollout when ``--use_vllm true``; otherwise, and always for seq_kd, the model
  itself samples (:mod:`swift_gkd_plugin.megatron.rollout.generation`), where ms-swift falls back to dataset
  responses or raises NotImplementedError;
* the loss: the plugin's vocabulary-parallel generalized JSD and top-k (with ``--gkd_topk_tail``) on the logit
  shards of the tensor-parallel group, Megatron's padded vocabulary rows masked out, teacher top-k taken from true
  log-probabilities.

Importing this module imports Megatron-SWIFT (CUDA and transformer-engine required).
"""
from __future__ import annotations

import copy
import dataclasses
import math
from contextlib import contextmanager, nullcontext
from typing import Dict, List, Optional

import torch
from megatron.core import mpu
from swift.megatron.trainers.gkd_trainer import MegatronGKDTrainer
from swift.megatron.utils import forward_step_helper, get_padding_to
from swift.rlhf_trainers.gkd_loss import DataSource, TeacherOutput
from swift.utils import get_logger, to_device
from transformers.utils import ContextManagers

from swift_gkd_plugin.rollout.colocated_vllm import shutdown_engine, weight_sync_context
from swift_gkd_plugin.rollout.completion_stats import CompletionWindow, end_of_turn_ids
from swift_gkd_plugin.core import Divergence, Mode
from swift_gkd_plugin.core.constants import IGNORE_INDEX
from swift_gkd_plugin.core.entropy import EntropyGapWatch
from swift_gkd_plugin.core.guards.non_finite import loss_terms, non_finite_loss_message
from swift_gkd_plugin.core.guards.same_weights import (copy_of_the_student, copy_of_the_student_cause,
                                                      privileged_row_count)
from swift_gkd_plugin.core.weights.lora_round_trip import BaseWeightsKeeper, adapter_tensors_copied
from swift_gkd_plugin.core.modes import mode_log_path, sampling_seed, step_mode
from swift_gkd_plugin.runtime.ms_swift_state import data_source, mode_of
from swift_gkd_plugin.core.views import prepare_teacher_view
from swift_gkd_plugin.options.flags import FlagError, rollout_max_tokens, sampling_temperature
from swift_gkd_plugin.runtime.process_exit import refuse
from swift_gkd_plugin.megatron.rollout.generation import generate
from swift_gkd_plugin.options.teacher_scores import check_loaded_teacher
from swift_gkd_plugin.megatron.step.loss import (check_views_split_alike, defer_teacher, entropies_on_shards,
                                                 fill_deferred_teacher, gkd_loss_on_shards, shard_vocab_start,
                                                 teacher_on_demand, teacher_topk_logprobs,
                                                 teacher_topk_per_micro_batch)
from swift_gkd_plugin.megatron.step.stored_teacher import StoredTeacher, TeacherRowMissing, split_over_context_parallel
from swift_gkd_plugin.megatron.rollout.samples import (collate_for_forward, encode_prompts, last_logits, last_logits_cp,
                                                       rollout_outputs)
from swift_gkd_plugin.megatron.step.vocab import model_vocab_size

logger = get_logger()

_CHUNK = 512  # rows per pass of the vocabulary-parallel divergence: bounds its [chunk, V/tp] temporaries


class GKDPluginMegatronTrainer(MegatronGKDTrainer):

    def __init__(self, args, template, **kwargs):
        # vLLM syncs merge LoRA adapters into the base in place (every layer at once): keep the base exact
        self._base_keeper = BaseWeightsKeeper()
        self._entropy_watch = EntropyGapWatch(args=args)  # the remedies in effect are left out of its warning
        self._completions = CompletionWindow()  # sampled lengths and truncation, logged by _log_callback
        self._teacher_store = None  # --teacher_scores, opened once ms-swift has resolved the teacher
        super().__init__(args, template, **kwargs)
        if getattr(self, 'request_config', None) is not None:  # vLLM's requests: --gkd_sampling_temperature
            self.request_config.temperature = sampling_temperature(args)
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        self._mode_log = mode_log_path(args.output_dir, rank)
        self._real_vocab = model_vocab_size(template, args)
        self._divergence = Divergence(args.gkd_divergence, beta=args.beta, alpha=args.gkd_skew_alpha,
                                      fkl_above_entropy=args.gkd_entropy_fkl_threshold)
        logger.info(f'swift_gkd_plugin: divergence {self._divergence} at temperature {args.temperature}')
        if self._real_vocab is None:
            logger.warning('swift_gkd_plugin: the model config holds no vocab_size: Megatron\'s padded vocabulary '
                           'rows cannot be masked (sampling, loss and top-k teacher use the padded vocabulary)')
        if not self.use_vllm and args.lmbda > 0:
            logger.info('swift_gkd_plugin: on-policy steps sample from the training model (no KV cache: each new '
                        'token re-runs the sequence; --use_vllm true is much faster for long completions)')
        self._setup_teacher_store()

    # ------------------------------------------------------------------ modes and sampling
    def _generate_and_score_completions(self, inputs: List[Dict]) -> List[Dict]:
        """Mode → responses (dataset, vLLM, the student itself, or the teacher) → teacher signal → micro-batches."""
        training = self.unwrapped_models[0].training
        step = int(self.state.iteration)
        mode = step_mode(self.args, step, training, self._mode_log)
        samples = self.to_samples(inputs)
        for sample in samples:
            prepare_teacher_view(sample)
        if mode is Mode.ON_POLICY and self.use_vllm:
            local = self._generate_completions(self._get_local_rollout_batch(samples))
            samples = self._gather_rollout_results(local)
        elif mode is not Mode.OFF_POLICY:
            samples = self._sample_from_model(samples, teacher=mode is Mode.SEQ_KD)
        if mode is not Mode.OFF_POLICY:
            self._log_completions_from_samples(samples)
            if training:  # this data-parallel rank's samples (the same on its tensor/pipeline/context peers)
                self._completions.add(samples, end_of_turn_ids(self.template))
        return self._score(samples, data_source(mode))

    def _log_completions_from_samples(self, samples) -> None:
        """ms-swift's, on copies of the messages: its ``_apply_chat_template_to_messages_list``
        (``rollout_mixin.py`` ~1013) removes the response from the very lists it is given (``gather_object`` returns
        them unchanged without a distributed accelerate state), and the step then trained on nothing."""
        super()._log_completions_from_samples(
            [dataclasses.replace(s, messages=copy.deepcopy(s.messages)) for s in samples])

    def _score(self, samples, data_source: DataSource) -> List[Dict]:
        """ms-swift's tail of ``_generate_and_score_completions``: teacher API, micro-batch encoding, teacher logits."""
        from swift.rlhf_trainers.gkd_helpers import build_opsd_samples, fetch_teacher_parsed_by_routing
        local_parsed = None
        if self.use_teacher_api:
            build_opsd_samples(samples)
            requests = self._build_teacher_requests(samples)
            if requests:
                local_parsed = fetch_teacher_parsed_by_routing(
                    samples, requests, self.teacher_configs, self.teacher_clients,
                    gather_fn=self._gather_teacher_requests,
                    infer_fn=lambda handle, client: self._infer_teacher_requests(
                        handle, topk=self.gkd_logits_topk, teacher_client=client),
                    scatter_fn=self._scatter_teacher_parsed, is_main_process=self.is_main_process,
                    tag_key=self.args.teacher_tag_key)
        mbs = self.args.micro_batch_size
        batches = []
        for start in range(0, len(samples), mbs):
            batch = self._encode_samples(samples[start:start + mbs])
            batch['data_source'] = data_source
            if local_parsed is not None:
                batch['_teacher_parsed'] = local_parsed[start:start + mbs]
            batches.append(batch)
        self._compute_teacher_logits(batches)
        return batches

    @contextmanager
    def _sampler(self, teacher: bool):
        """The model that samples: the student (current weights), or the teacher (its own model, possibly offloaded,
        or the student's base with the LoRA adapter disabled), in eval mode for the duration."""
        if teacher and self.teacher_models:
            with self.load_teacher_model_context():
                yield self.teacher_models[0]
            return
        model = self.unwrapped_models[0]
        contexts = [m.disable_adapter() for m in self.peft_models] if teacher and self._teacher_use_disable_adapter \
            else []
        was_training = model.training
        model.eval()
        try:
            with ContextManagers(contexts):
                yield model
        finally:
            model.train(was_training)

    def _get_request_config(self):
        """ms-swift's vLLM request config (on-policy steps only) with ``--gkd_rollout_max_tokens`` as its budget."""
        config = super()._get_request_config()
        config.max_tokens = min(config.max_tokens or rollout_max_tokens(self.args), rollout_max_tokens(self.args))
        return config

    @torch.no_grad()
    def _sample_from_model(self, samples, teacher: bool):
        """Sampling without vLLM. Every rank of a model-parallel group (TP x CP x PP) runs each forward together on
        its data-parallel batch (with CP, the last positions' logits are gathered from the ranks holding them); with
        expert parallelism the MoE all-to-alls span data-parallel ranks too, so then all ranks keep running forwards
        until every rank's sequences have stopped (the idle ones are logged: ``gkd/idle_decode_ratio``)."""
        samples = self._preprocess_inputs(samples)
        prompts = encode_prompts(self.template, samples, teacher=teacher)
        tokenizer = self.template.tokenizer
        eos = sorted(end_of_turn_ids(self.template))
        expert_parallel = (getattr(self.args, 'expert_model_parallel_size', 1) or 1) > 1
        padding_to = get_padding_to(self.args)
        counts = {} if expert_parallel else None

        with self._sampler(teacher) as model:

            def next_logits(sequences):
                batch, positions = collate_for_forward(self.template, sequences, padding_to)
                data = self._prepare_batch(to_device(batch, self.device), None)
                data.pop('loss_scale', None)
                data.pop('labels', None)
                logits = forward_step_helper(model, data)
                if logits is None:
                    return None
                if mpu.get_context_parallel_world_size() > 1:  # each rank holds 2 chunks of every sequence
                    packed = data.get('packed_seq_params')
                    return last_logits_cp(logits, positions, None if packed is None else packed.cu_seqlens_q.tolist(),
                                          mpu.get_context_parallel_group())
                return last_logits(logits, positions)

            budget = self.args.max_completion_length if teacher else rollout_max_tokens(self.args)
            completions = generate(
                next_logits, prompts, max_new_tokens=budget,
                eos_token_ids=eos, temperature=sampling_temperature(self.args),
                top_k=_positive(getattr(self.args, 'top_k', None)), top_p=getattr(self.args, 'top_p', None),
                seed=sampling_seed(self.args.seed, self.state.iteration, mpu.get_data_parallel_rank()),
                vocab_size=self._real_vocab, tp_group=mpu.get_tensor_model_parallel_group(),
                broadcast_group=mpu.get_pipeline_model_parallel_group(),
                broadcast_src=mpu.get_pipeline_model_parallel_last_rank(),  # each pipeline's last stage decides
                sync_group=torch.distributed.group.WORLD if expert_parallel else None, counts=counts)
        if counts and self.unwrapped_models[0].training:
            self._completions.add_decode(counts['forwards'], counts['idle'])
        outputs = rollout_outputs(tokenizer, prompts, completions, eos)
        return self._postprocess_rollout_outputs(samples, outputs)

    # ------------------------------------------------------------------ teacher signal
    def _setup_teacher_store(self) -> None:
        """``--teacher_scores``: the store opened (:class:`StoredTeacher`); each micro-batch's rows are looked up in
        it before any teacher runs."""
        args = self.args
        self._teacher_store = StoredTeacher(args.teacher_scores) if getattr(args, 'teacher_scores', None) else None
        if self._teacher_store is None:
            return
        store = self._teacher_store.store
        logger.info(f'swift_gkd_plugin: teacher scores from {args.teacher_scores}: {len(store)} rows, {store.tokens} '
                    f'tokens, top-{store.identity.topk} of {store.identity.teacher} (top-{self.gkd_logits_topk} '
                    'read); ' + ('a row missing from it is scored by the teacher' if self._store_can_score() else
                                 'no teacher model is loaded: every row must be in the store'))

    def _store_can_score(self) -> bool:
        """Beside ``--teacher_scores``, a local teacher that scores the rows the store lacks: ``--teacher_model``, or
        the student's base with its LoRA adapter off. Without one the student is not its own teacher: the store
        answers every row."""
        return not self._is_self_distillation or bool(self._teacher_use_disable_adapter)

    def _teacher_from_store(self, encoded_batches: List[Dict], vp_stage: Optional[int] = None) -> None:
        """``--teacher_scores``: each micro-batch's top-k from the store, for the rows it holds (each position's
        ``--gkd_logits_topk`` most likely entries); a micro-batch with a row the store lacks runs the local teacher,
        whose top-k those rows take (the stored rows keep the store's). Without a teacher such a row stops the run
        (:class:`TeacherRowMissing`, naming it)."""
        k = self.gkd_logits_topk
        padding_free = bool(getattr(self.template, 'padding_free', False))
        answers = [self._teacher_store.answer(batch['teacher_model_inputs'], k, padding_free)
                   for batch in encoded_batches]
        missing = sum(len(a.missing) for a in answers)
        can_score = self._store_can_score()
        if missing and not can_score:
            first = next(i for i, a in enumerate(answers) if a.missing)
            where = (f'training step {int(self.state.iteration) + 1}' if self.unwrapped_models[0].training else
                     f'evaluation after step {int(self.state.iteration)}')
            raise TeacherRowMissing('swift_gkd_plugin: ' + self._teacher_store.missing_message(
                where, first, answers[first], sum(a.rows for a in answers), missing))
        forward = [bool(a.missing) for a in answers]
        if can_score and (getattr(self.args, 'expert_model_parallel_size', 1) or 1) > 1:
            forward = self._on_any_rank(forward)  # the MoE all-to-alls of a forward span data-parallel ranks
        model, context = self._local_teacher(vp_stage) if any(forward) else (None, nullcontext())
        group = mpu.get_tensor_model_parallel_group()
        with torch.no_grad(), context:
            for batch, answer, run in zip(encoded_batches, answers, forward):
                data, labels = self._teacher_data(batch['teacher_model_inputs'], vp_stage)
                logprobs, ids, found = split_over_context_parallel(  # as _prepare_batch cut the micro-batch
                    (answer.topk_logprobs, answer.topk_ids, answer.found), data.get('packed_seq_params'),
                    getattr(self.args, 'cp_partition_mode', 'zigzag'))
                logits = forward_step_helper(model, data) if run else None
                if logits is not None:  # the teacher's top-k where the store has nothing
                    live, live_ids = teacher_topk_logprobs(logits.detach(), k, shard_vocab_start(logits, group),
                                                           self._real_vocab, group)
                    del logits
                    logprobs = torch.where(found[..., None], logprobs, live)
                    ids = torch.where(found[..., None], ids, live_ids)
                out = TeacherOutput(topk_logprobs=logprobs, topk_indices=ids)
                out.labels = labels
                out.store_rows = (answer.rows_found, answer.rows)  # gkd/teacher_store_rows
                batch['teacher_output'] = out

    def _on_any_rank(self, flags: List[bool]) -> List[bool]:
        """Each flag true where it is on any rank (one all-reduce over the world)."""
        device = next(self.unwrapped_models[0].parameters()).device
        values = torch.tensor([float(f) for f in flags], device=device)
        torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.MAX)
        return [bool(v) for v in values.tolist()]

    def _compute_teacher_logits(self, encoded_batches: List[Dict], vp_stage: Optional[int] = None) -> None:
        """ms-swift defers a self-distilled or shared-base teacher to ``_on_train_step_batch``, which its
        ``evaluate`` never calls (``KeyError: 'teacher_output'``); in evaluation the weights do not change, so the
        teacher runs here, once per evaluation batch."""
        if self._is_self_distillation and not self.use_teacher_api and not self.unwrapped_models[0].training:
            self._compute_teacher_logits_local(encoded_batches, vp_stage)
            return
        super()._compute_teacher_logits(encoded_batches, vp_stage)

    def _compute_teacher_logits_local(self, encoded_batches: List[Dict], vp_stage: Optional[int] = None) -> None:
        """ms-swift's local teacher forward, with each micro-batch's ``[B, S, V/tp]`` logits cut to the top-k right
        after its forward (a generation batch's full logits are never held at once), the top-k taken from true
        log-probabilities (needed by the tail) with the padded vocabulary excluded."""
        if self._teacher_store is not None:  # --teacher_scores
            self._teacher_from_store(encoded_batches, vp_stage)
            return
        topk = self.gkd_logits_topk
        if topk is None:
            if self._teacher_deferral() is not None:
                defer_teacher(encoded_batches)  # computed micro-batch by micro-batch (or per train step)
                return
            return super()._compute_teacher_logits_local(encoded_batches, vp_stage)
        model, context = self._local_teacher(vp_stage)
        with torch.no_grad(), context:
            signals = teacher_topk_per_micro_batch(
                encoded_batches, lambda batch: self._teacher_forward(model, batch['teacher_model_inputs'], vp_stage),
                topk, self._real_vocab, mpu.get_tensor_model_parallel_group())
            for batch, (signal, labels) in zip(encoded_batches, signals):
                if signal is None:  # not the last pipeline stage
                    out = TeacherOutput(full_logits=None)
                else:
                    out = TeacherOutput(topk_logprobs=signal[0], topk_indices=signal[1])
                out.labels = labels
                batch['teacher_output'] = out

    def _teacher_deferral(self) -> Optional[str]:
        """When a separate teacher's full-vocabulary logits are computed, instead of for the whole generation batch
        up front (ms-swift): ``'micro_batch'`` (in ``forward_step``, just before the student's forward) without
        pipeline stages; ``'step'`` (per train step, outside the schedule) with them; None for an offloaded teacher
        (one upload per generation batch, as ms-swift) and for self-distillation (ms-swift computes it per train
        step, from the current weights)."""
        if self._is_self_distillation or self.use_teacher_api or self.offload_teacher_model:
            return None
        if mpu.get_pipeline_model_parallel_world_size() == 1:
            return 'micro_batch'
        return 'step' if self.unwrapped_models[0].training else None  # evaluation runs no train step

    def _full_teacher_output(self, micro_batch: Dict, vp_stage: Optional[int] = None) -> TeacherOutput:
        model, context = self._local_teacher(vp_stage)
        with torch.no_grad(), context:
            logits, labels = self._teacher_forward(model, micro_batch['teacher_model_inputs'], vp_stage)
        out = TeacherOutput(full_logits=logits)
        out.labels = labels
        return out

    def _replace_data_iterator(self, data_iterator):
        """ms-swift counts its training steps from 0 in every process, also in a resumed run (whose completions log
        then restarted at ``gen_step`` 0): the first training step of a run starts the count at its iteration."""
        if self._step == 0 and self.unwrapped_models[0].training:
            self._step = int(self.state.iteration)
        return super()._replace_data_iterator(data_iterator)

    def _on_train_step_batch(self, encoded_batches: List[Dict]) -> None:
        super()._on_train_step_batch(encoded_batches)
        if self._teacher_deferral() == 'step':
            fill_deferred_teacher(encoded_batches, self._full_teacher_output)

    def forward_step(self, data_iterator, model):
        """ms-swift's ``forward_step``; a deferred teacher output is computed as its micro-batch is taken."""
        if self._teacher_deferral() == 'micro_batch':
            data_iterator = teacher_on_demand(data_iterator, self._full_teacher_output)
        return super().forward_step(data_iterator, model)

    def _local_teacher(self, vp_stage: Optional[int]):
        """ms-swift's choice: the student itself (adapter disabled for a shared base), or the teacher model."""
        if self._is_self_distillation:
            contexts = [m.disable_adapter() for m in self.peft_models] if self._teacher_use_disable_adapter else []
            return self.unwrapped_models[vp_stage or 0], ContextManagers(contexts)
        return self.teacher_models[vp_stage or 0], self.load_teacher_model_context()

    def _teacher_data(self, teacher_inputs: Dict, vp_stage: Optional[int]):
        """A micro-batch's teacher view as the teacher's forward takes it (``_prepare_batch`` on a copy: labels
        shifted, cut over the context-parallel ranks): ``(data, labels)``."""
        data = self._prepare_batch({k: v.clone() if isinstance(v, torch.Tensor) else v
                                    for k, v in teacher_inputs.items()}, vp_stage)
        data.pop('loss_scale', None)
        return data, data.pop('labels', None)

    def _teacher_forward(self, model, teacher_inputs: Dict, vp_stage: Optional[int]):
        """One micro-batch through the teacher: ``(logits [B, S, V/tp] or None off the last stage, labels)``."""
        data, labels = self._teacher_data(teacher_inputs, vp_stage)
        logits = forward_step_helper(model, data)
        return (None if logits is None else logits.detach()), labels

    # ------------------------------------------------------------------ vLLM weight sync
    def merge_lora_adapters(self, adapter_name='default'):
        self._base_keeper.save(self.unwrapped_models)
        super().merge_lora_adapters(adapter_name)

    def unmerge_lora_adapters(self):
        """ms-swift unmerges in place (``W + d - d != W`` in bf16): the base (the student's, and a shared-base
        teacher's) gets its weights back exactly, from the host copy saved by :meth:`merge_lora_adapters`."""
        super().unmerge_lora_adapters()
        self._base_keeper.restore()

    def _export_and_load_weights(self, *args, **kwargs):
        """ms-swift's export of the (merged) student into a colocated vLLM (``rollout_mixin.py`` ~624-654:
        ``load_weights`` and its whole-model post-load pass), through vLLM's in-place layerwise reload where vLLM
        repacked its weights after loading (its CPU build: ``load_weights`` then fails with ``'Parameter' object has
        no attribute 'weight_loader'``, see :mod:`swift_gkd_plugin.rollout.colocated_vllm`); elsewhere ms-swift's path as it
        is."""
        if self.vllm_mode != 'colocate':
            return super()._export_and_load_weights(*args, **kwargs)
        with weight_sync_context(self, log=self.is_main_process):
            return super()._export_and_load_weights(*args, **kwargs)

    def _move_adapter_to_vllm(self, *args, **kwargs):
        """``--vllm_enable_lora`` colocate: vLLM gets copies of the exported adapter (it scales ``lora_B`` in place;
        mcore-bridge's export may hand out the parameters themselves; ``tests/megatron/test_megatron_vllm.py``)."""
        if self.vllm_mode != 'colocate':
            return super()._move_adapter_to_vllm(*args, **kwargs)
        with adapter_tensors_copied(self.engine.engine):
            return super()._move_adapter_to_vllm(*args, **kwargs)

    # ------------------------------------------------------------------ nothing learnt, non-finite
    def train_step(self, train_data_iterator):
        """ms-swift's step; then the guards on its gradient norm (reduced over all ranks, the same on each): a
        non-finite one stops the run, naming the step; one of exactly 0 (the step learnt nothing: the teacher
        agrees with the student everywhere, no position has a teacher signal) is a counted warning."""
        metrics, grad_norm, update_successful = super().train_step(train_data_iterator)
        step = int(self.state.iteration)
        if grad_norm is not None and not math.isfinite(grad_norm):
            raise NonFiniteStep(f'swift_gkd_plugin: step {step + 1}: the gradient norm is {grad_norm}: a teacher or '
                                'student logit, or the loss, is not finite (a NaN or inf weight, an overflow): the run '
                                'stops here rather than train on it')
        if grad_norm == 0.0:
            self._steps_without_learning += 1
            if self.is_main_process:
                logger.warning(f'swift_gkd_plugin: step {step + 1} learnt nothing (loss and gradient exactly 0): '
                               f'{self._steps_without_learning} of {step + 1 - self._first_step} steps so far')
        return metrics, grad_norm, update_successful

    def train(self, train_dataset, val_dataset):
        """ms-swift's training loop; exit code 0 only if some step learnt something."""
        self._refuse_a_copy_of_the_student(train_dataset)
        self._first_step = int(self.state.iteration)
        self._steps_without_learning = 0
        try:
            if self._teacher_store is not None and not self.use_teacher_api and self._store_can_score():
                check_loaded_teacher(self.args, self._teacher_store.store)  # (not the store's: stops here)
            super().train(train_dataset, val_dataset)
        except (TeacherRowMissing, FlagError) as exc:  # one line, exit code 1, without torchrun's report
            for callback in self.callbacks:  # the steps logged so far stay readable (TensorBoard flushes every 120 s)
                writer = getattr(callback, 'writer', None)
                if writer is not None and hasattr(writer, 'flush'):
                    writer.flush()
            refuse('megatron rlhf', exc, code=1)  # (under the launcher: printed by the first rank to refuse)
        self._shut_down_colocated_engine()
        trained = int(self.state.iteration) - self._first_step
        if trained == 0 or self._steps_without_learning == trained:
            raise NothingLearnt(
                f'swift_gkd_plugin: none of the {trained} training step(s) learnt anything (loss and gradient exactly '
                '0 at every step): the teacher agrees with the student everywhere (the student as its own teacher '
                'without a teacher_prompt column; a copy of the student as --teacher_model) or no position has a '
                'teacher signal. The checkpoints were saved; the run ends with an error instead of exit code 0')

    def _refuse_a_copy_of_the_student(self, train_dataset) -> None:
        """A separate local teacher whose weights equal the student's on every rank (a copy of ``--model``), no row
        with a teacher_prompt or teacher_messages and ``--sft_alpha 0``: every step's loss would be 0, the first
        exactly, the next ones only from weight decay (gradient norms of ~1e-7, which the zero-gradient guard cannot
        tell from learning). Stopped before the first step, from the weights, as in ``swift rlhf``."""
        if (not self.teacher_models or self.use_teacher_api or self._is_self_distillation
                or self._teacher_use_disable_adapter or self.sft_alpha > 0):
            return
        counted = privileged_row_count(train_dataset)
        if counted is not None and counted[0]:
            return
        same = all(copy_of_the_student(dict(teacher.named_parameters()), dict(student.named_parameters()))
                   for teacher, student in zip(self.teacher_models, self.unwrapped_models))
        verdict = torch.tensor([float(same)], device=next(self.unwrapped_models[0].parameters()).device)
        torch.distributed.all_reduce(verdict, op=torch.distributed.ReduceOp.MIN)  # every rank's shards, one answer
        if verdict.item() == 1:
            raise NothingLearnt(f'swift_gkd_plugin: {copy_of_the_student_cause(self.args.teacher_model)}; no training '
                                'row has a teacher_prompt or teacher_messages and --sft_alpha is 0: every step would '
                                'have loss 0 (the first exactly, the next ones only from weight decay), and the run '
                                'would end with exit code 0 having learnt nothing. Stopped before the first step')

    def _shut_down_colocated_engine(self) -> None:
        """After training, the colocated vLLM engine is shut down while the process groups exist: ms-swift's
        pipeline destroys them after ``train()`` (``megatron/pipelines/train/sft.py`` ~88), and vLLM's own exit
        handler (``v1/engine/core.py`` ~839, ``cleanup_dist_env_and_memory``) then failed destroying its groups again
        (``ValueError: Invalid process group specified``, a traceback after a finished run). Its shutdown destroys the
        default group too, which ms-swift then skips."""
        if self.use_vllm and getattr(self, 'vllm_mode', None) == 'colocate' and getattr(self, 'engine', None):
            shutdown_engine(self.engine)

    def on_log(self, logs, prefix=''):
        self._log_prefix = prefix  # '' for training rows, 'eval_' for evaluation ones (ms-swift's base trainer)
        super().on_log(logs, prefix)

    def _log_callback(self, logs, n_steps):
        """ms-swift turns the logged metrics into numbers; then, on training rows, the sampled completions' length
        and truncation (:class:`~swift_gkd_plugin.rollout.completion_stats.CompletionWindow`) and the on-policy entropy
        warning (:class:`~swift_gkd_plugin.core.entropy.EntropyGapWatch`), as in ``swift rlhf``."""
        super()._log_callback(logs, n_steps)
        if getattr(self, '_log_prefix', ''):
            return
        # every rank: the completions sampled since the last log, over the data-parallel ranks (a collective)
        device = next(self.unwrapped_models[0].parameters()).device
        logs.update(self._completions.logs(device, group=mpu.get_data_parallel_group()))
        if 'loss' not in logs:
            return
        message = self._entropy_watch.observe(logs)
        if message and self.is_main_process:
            logger.warning(message)

    # ------------------------------------------------------------------ loss
    def loss_func(self, output_tensor: torch.Tensor, *, labels: torch.Tensor, teacher_output: TeacherOutput,
                  data_source: DataSource = DataSource.DATASET):
        """Sum of the per-token divergences of this micro-batch and its token count; Megatron divides the step's
        summed losses by the step's summed counts over data- and context-parallel ranks (a per-token mean)."""
        args = self.args
        topk = teacher_output.is_topk_mode
        if mpu.get_context_parallel_world_size() > 1:
            check_views_split_alike(labels, teacher_output.labels, mpu.get_context_parallel_group())
        group = mpu.get_tensor_model_parallel_group()
        shards = dict(temperature=args.temperature, vocab_start=shard_vocab_start(output_tensor, group),
                      vocab_size=self._real_vocab, teacher_shard=None if topk else teacher_output.full_logits,
                      teacher_topk_ids=teacher_output.topk_indices if topk else None,
                      teacher_topk_logprobs=teacher_output.topk_logprobs if topk else None,
                      teacher_labels=teacher_output.labels, tail=args.gkd_topk_tail, group=group, chunk_size=_CHUNK)
        divergence, _, n_student = gkd_loss_on_shards(output_tensor, labels, divergence=self._divergence, **shards)
        student_mask = labels != IGNORE_INDEX
        loss = divergence
        sft = None
        if self.sft_alpha > 0 and data_source is not DataSource.STUDENT:
            model = self.unwrapped_models[0]
            model = getattr(model, 'language_model', model)
            per_token_ce = model.compute_language_model_loss(labels, output_tensor.transpose(0, 1).contiguous())
            sft = (per_token_ce * student_mask).sum()
            loss = loss + self.sft_alpha * sft
        mode = mode_of(data_source)
        if not bool(torch.isfinite(loss.detach())):  # before megatron-core's NaN check on the gradients fires
            teacher_mask = student_mask if teacher_output.labels is None else teacher_output.labels != IGNORE_INDEX
            self._stop_on_non_finite(output_tensor[student_mask], teacher_output, teacher_mask, mode)
        count = torch.tensor(n_student, device=loss.device, dtype=torch.int)
        n = count.float()
        one = torch.ones((), device=loss.device)
        metric = {'loss': torch.stack([loss.detach().float(), n]),
                  f'gkd/loss_{mode.value}': torch.stack([divergence.detach().float(), n]),
                  **{f'gkd/mode_{m.value}': torch.stack([one * float(m is mode), one]) for m in Mode}}
        if sft is not None:
            metric['sft_loss'] = torch.stack([sft.detach().float(), n])
        store_rows = getattr(teacher_output, 'store_rows', None)
        if store_rows is not None:  # --teacher_scores: the share of rows the store answered
            metric['gkd/teacher_store_rows'] = torch.stack([one * store_rows[0], one * store_rows[1]])
        if mode is Mode.ON_POLICY:  # the student's entropy on its samples and the teacher's there, as swift rlhf's
            entropy, teacher_entropy, gated = entropies_on_shards(output_tensor, labels, divergence=self._divergence,
                                                                  **shards)
            metric['gkd/entropy'] = torch.stack([entropy.float(), n])
            metric['gkd/teacher_entropy'] = torch.stack([teacher_entropy.float(), n])
            if gated is not None:  # --gkd_entropy_fkl_threshold: where the entropy-aware mix adds forward KL
                metric['gkd/entropy_fkl_fraction'] = torch.stack([gated.float(), n])
        metric = self._all_reduce_metric(
            metric, torch.distributed.ReduceOp.SUM, group=mpu.get_data_parallel_group(with_context_parallel=True))
        if (self._step - 1) % self.steps_per_generation == 0:
            self._flush_log_completions()
        return loss, count, metric

    def _stop_on_non_finite(self, student_rows, teacher_output: TeacherOutput, teacher_mask, mode: Mode) -> None:
        """A NaN or infinite micro-batch loss stops the run naming the model whose outputs (this rank's logit shard,
        or the top-k) hold the first non-finite value, the step and the position, as in ``swift rlhf``."""
        if teacher_output.is_topk_mode:
            teacher = ('top-k log-probabilities', teacher_output.topk_logprobs[teacher_mask], True)
        else:
            teacher = ('logits', teacher_output.full_logits[teacher_mask], False)
        parts = [(self._teacher_name(), *teacher), (f'the student (--model {self.args.model})', 'logits', student_rows,
                                                     False)]
        training = self.unwrapped_models[0].training
        raise NonFiniteStep('swift_gkd_plugin: ' + non_finite_loss_message(
            int(self.state.iteration) + training, mode.value, training, parts, terms=loss_terms(self.args)))

    def _teacher_name(self) -> str:
        """The teacher in an error message: its flag and value, or what it is."""
        if self._teacher_store is not None:
            scores = f'--teacher_scores {self.args.teacher_scores}'
            if not self._store_can_score():
                return f'the teacher ({scores})'
            local = ('the student\'s base with its LoRA adapter off' if self._teacher_use_disable_adapter
                     else f'--teacher_model {self.args.teacher_model}')
            return f'the teacher ({scores}, and {local} for the rows it lacks)'
        if self.use_teacher_api:
            return f'the teacher (--teacher_model_server {self.teacher_model_server})'
        if self._teacher_use_disable_adapter:
            return 'the teacher (the student\'s base with its LoRA adapter off)'
        if self._is_self_distillation:
            return 'the teacher (the student itself)'
        return f'the teacher (--teacher_model {self.args.teacher_model})'


class NothingLearnt(RuntimeError):
    """A run none of whose steps changed the student."""


class NonFiniteStep(RuntimeError):
    """A step whose gradient norm is NaN or infinite."""


def _positive(value) -> Optional[int]:
    return int(value) if value is not None and int(value) > 0 else None
