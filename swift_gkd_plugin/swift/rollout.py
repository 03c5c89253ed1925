"""The sampling room: each generation batch's mode and its samples, from dataset rows to micro-batches.

* :meth:`RolloutMixin._generate_and_score_completions`: ms-swift's rollout, scoring and batching stages, then each
  micro-batch's response-token counts (the loss's normaliser);
* the mode of the batch (on-policy, seq_kd, off-policy) and its samples: the student's, SKD's (student drafts,
  teacher corrects), the teacher's (seq_kd); the samplers (transformers engines, vLLM) and their request configs
  (seeds, top-k), the sampling streams, group resampling of rows that do not encode;
* the LoRA syncs to vLLM; the sampler's log-probabilities the RL term's correction needs.
"""
from __future__ import annotations

from contextlib import ExitStack, contextmanager
from copy import copy
from typing import Any, Dict, List

import torch
from swift.infer_engine import TransformersEngine
from swift.infer_engine.protocol import RolloutOutput
from swift.rlhf_trainers.gkd_loss import DataSource
from swift.utils import get_logger, unwrap_model_for_generation

from swift_gkd_plugin.core import Mode
from swift_gkd_plugin.core.lora_round_trip import HostBuffer, exact_lora_sync, lora_merges_skipped
from swift_gkd_plugin.core.modes import DATA_SOURCES, sampling_seed, step_mode
from swift_gkd_plugin.core.speculative import teacher_seed
from swift_gkd_plugin.core.views import check_same_response_count, prepare_teacher_view, with_teacher_prompt
from swift_gkd_plugin.swift.batches import count_loss_tokens
from swift_gkd_plugin.swift.group_resample import resample_failed_groups
from swift_gkd_plugin.swift.hidden_states import head_rows
from swift_gkd_plugin.swift.media_tokens import cut_at_media_placeholders, suppress_media_placeholders
from swift_gkd_plugin.swift.rollout_correction import SamplerLogprobsEngine
from swift_gkd_plugin.swift.speculative import SpeculativeEngine, cached_forward, server_teacher, skd_decoding
from swift_gkd_plugin.swift.token_metrics import add_token_sum as _add_token_sum

logger = get_logger()

_DATA_SOURCE = {mode: DataSource(value) for mode, value in DATA_SOURCES.items()}


class RolloutMixin:
    """Generation batches: their mode, their samples and the samplers that draw them."""

    def _generate_and_score_completions(self, inputs) -> List[Dict[str, Any]]:
        """Attach to every micro-batch the number of response tokens of its whole optimizer step.

        Micro-batches ``[i * GA, (i + 1) * GA)`` of one generation batch form optimizer step ``i``; their counts
        are summed over all micro-batches and all ranks with one all-reduce per generation batch. Each micro-batch
        also gets its own response-token counts (``gkd_tokens``: student view, teacher view), read on the host here
        once for the whole generation batch: they size the loss's tensors without a host sync per micro-batch.
        """
        batches = super()._generate_and_score_completions(inputs)
        training = self.model.training
        group = self.args.gradient_accumulation_steps if training else 1
        steps = (len(batches) + group - 1) // group
        tokens = [torch.stack([count_loss_tokens(b['model_inputs']['labels']),
                               count_loss_tokens(b['teacher_model_inputs']['labels'])]) for b in batches]
        tokens = torch.stack(tokens).tolist() if batches else []  # the one read
        # per optimizer step: response tokens, then (for gkd/completion_length) rows; one all-reduce for both
        counts = [0.0] * (2 * steps)
        for i, (batch, (n_student, n_teacher)) in enumerate(zip(batches, tokens)):
            if self._xtok is None:
                check_same_response_count(n_student, n_teacher)
            batch['gkd_tokens'] = (n_student, n_teacher)
            counts[i // group] += n_student
            counts[steps + i // group] += batch['gkd_rows']
        if training and self.accelerator.num_processes > 1:
            counts = torch.tensor(counts, dtype=torch.float64, device=self.accelerator.device)
            counts = self.accelerator.reduce(counts, reduction='sum').tolist()
        for i, batch in enumerate(batches):
            batch['gkd_step_tokens'] = float(counts[i // group])
            batch['gkd_mode'] = self._gkd_mode
        if training and self._gkd_mode.needs_generation:
            _add_token_sum(self.custom_metrics['train']['gkd/completion_length'], sum(counts[:steps]),
                           int(sum(counts[steps:])))
        return batches

    def _rollout_samples(self, inputs):
        """Pick the mode of this generation batch and produce its responses."""
        training = self.model.training
        step = int(self.state.global_step)
        mode = step_mode(self.args, step, training, self._mode_log)
        self._gkd_mode = mode
        self._data_source = _DATA_SOURCE[mode]
        if training:
            self._record_mode(step, mode)

        if self.template.truncation_strategy == 'raise':
            inputs = self.resample_encode_failed_inputs(inputs, strip_response=mode.needs_generation)
        samples = self.to_samples(inputs)
        with self._sampling_rng(step):
            if mode is Mode.ON_POLICY and self.args.gkd_skd_top_k:
                samples = self._generate_with_skd(samples, step)
            elif mode is Mode.ON_POLICY:
                samples = self._generate_completions(samples)
            elif mode is Mode.SEQ_KD:
                samples = self._generate_with_teacher(samples)
        return samples

    def _record_mode(self, step: int, mode: Mode) -> None:
        for m in Mode:
            self.custom_metrics['train'][f'gkd/mode_{m.value}'].update(float(m is mode))

    def resample_encode_failed_inputs(self, inputs, max_resample_rounds: int = 10, strip_response=True):
        """With several completions per prompt a row that does not encode is replaced in place with the same row on
        every rank and for every copy (its group stays one prompt); with one, ms-swift's per-rank replacement."""
        if self.args.num_generations == 1:
            return super().resample_encode_failed_inputs(inputs, max_resample_rounds, strip_response)
        dataset = self.train_dataset if self.model.training or self.eval_dataset is None else self.eval_dataset
        return resample_failed_groups(self.template, dataset, inputs, seed=self.args.seed,
                                      step=int(self.state.global_step), strip_response=strip_response,
                                      max_tries=max_resample_rounds)

    def _generate_with_skd(self, samples, step: int):
        """On-policy sampling with SKD (``--gkd_skd_top_k``): the student drafts, the teacher replaces every drafted
        token outside its top-K by its own sample (:mod:`swift_gkd_plugin.core.speculative`). The student's draws use
        the sampling stream of plain on-policy steps; the teacher's come from their own per-(seed, step, rank) stream."""
        samples = self._preprocess_inputs(samples)
        requests = self.samples2requests(samples)
        generator = torch.Generator().manual_seed(teacher_seed(self.args.seed, step, self.args.process_index))
        results = []
        with ExitStack() as stack:
            stack.callback(self.model.train, self.model.training)  # the engine calls eval() on the student
            unwrapped = self._student_for_generation(stack)
            if self.use_teacher_api:  # this plugin's teacher server (checked before loading: /v1/topk, k >= K)
                teacher = server_teacher(self.teacher_clients[0], self.args.gkd_skd_top_k)
            elif self.teacher_model is None:  # the student's base, adapter off (or the teacher adapter on)
                view = lambda: self._teacher_view_of_student(unwrapped)  # noqa: E731
                teacher = lambda model, _: cached_forward(model, view)  # noqa: E731
            else:
                teacher_model = self._teacher_for_generation(stack)
                teacher = lambda model, _: cached_forward(teacher_model)  # noqa: E731
            decode = skd_decoding(teacher, top_k=self.args.gkd_skd_top_k, temperature=self._sampling_temperature,
                                  generator=generator, on_result=results.append)
            engine = self._sampling_engine(unwrapped, decode=decode)
            stack.enter_context(self.template.generate_context())
            # SKD's tokens come from a student/teacher mixture: no sampler log-probabilities, no correction
            outputs = engine.infer(requests, self._get_request_config(logprobs=False), use_tqdm=False)
        self._log_skd(results)
        outputs = [r if isinstance(r, RolloutOutput) else RolloutOutput(response=r) for r in outputs]
        return self._postprocess_rollout_outputs(samples, outputs)

    def _log_skd(self, results) -> None:
        """``gkd/skd_replaced_fraction``: replaced among the drafted tokens the teacher judged; ``gkd/skd_rounds``:
        teacher verification forwards per sequence."""
        metrics = self.custom_metrics['train' if self.model.training else 'eval']
        _add_token_sum(metrics['gkd/skd_replaced_fraction'], sum(r.replaced for r in results),
                       sum(r.proposed for r in results))
        _add_token_sum(metrics['gkd/skd_rounds'], sum(sum(r.rounds) for r in results),
                       sum(len(r.rounds) for r in results))

    def _generate_with_teacher(self, samples):
        """seq_kd: the teacher samples the responses (transformers engine on the teacher's weights)."""
        if self.teacher_model is None and not self._teacher_use_disable_adapter and self._teacher_adapter is None:
            # The teacher is the student itself (no --teacher_model): its samples are the student's.
            return self._generate_completions(samples)
        for sample in samples:
            prepare_teacher_view(sample)
        samples = self._preprocess_inputs(samples)
        requests = [with_teacher_prompt(s, r) for s, r in zip(samples, self.samples2requests(samples))]
        with self._teacher_sampling_context() as engine:
            results = engine.infer(requests, self._get_request_config(logprobs=False), use_tqdm=False)
        outputs = [r if isinstance(r, RolloutOutput) else RolloutOutput(response=r) for r in results]
        samples = self._postprocess_rollout_outputs(samples, outputs)
        if self._xtok is not None:
            for sample in samples:
                # the sampled ids are the teacher's: both sides encode the text, ending the turn where the
                # teacher stopped by itself
                sample.response_token_ids, sample.response_loss_mask = [], []
                sample.add_eos = sample.finish_reason == 'stop'
        return samples

    @contextmanager
    def _teacher_sampling_context(self):
        # the transformers engine calls eval() on the model it drives: the student module when the base is shared
        with ExitStack() as stack:
            stack.callback(self.model.train, self.model.training)
            if self.teacher_model is None:
                # One copy of the weights: the teacher is the student's base (adapter off or teacher adapter on).
                unwrapped = self._student_for_generation(stack)
                stack.enter_context(self._teacher_view_of_student(unwrapped))
                engine = self._sampling_engine(unwrapped)
            else:
                unwrapped = self._teacher_for_generation(stack)
                if self._teacher_engine is None or self._teacher_engine.model is not unwrapped:
                    # a teacher with another tokenizer samples through its own template
                    self._teacher_engine = self._sampling_engine(unwrapped, self._xtok and self._xtok.template)
                engine = self._teacher_engine
            stack.enter_context((self._xtok.template if self._xtok else self.template).generate_context())
            yield engine

    def _sampling_engine(self, model, template=None, decode=None):
        """A transformers engine on ``model``; ``decode``: SKD's decoding loop (:class:`SpeculativeEngine`)."""
        template = template or self.template
        if decode is None:
            engine = TransformersEngine(model, template=self._infer_template(template), max_batch_size=0)
        else:
            engine = SpeculativeEngine(model, template=self._infer_template(template), decode=decode)
        suppress_media_placeholders(engine, template)
        return engine

    def _infer_template(self, template=None):
        template = copy(template or self.template)
        template.padding_free = False
        template.sequence_parallel_size = 1
        template.remove_unused_columns = True
        return template

    def _student_for_generation(self, stack: ExitStack):
        """The unwrapped student, held by ``stack`` for sampling (ZeRO-3 weights gathered per
        ``--ds3_gather_for_generation``)."""
        return stack.enter_context(
            unwrap_model_for_generation(
                self.model_wrapped, self.accelerator, gather_deepspeed3_params=self.args.ds3_gather_for_generation))

    def _postprocess_rollout_outputs(self, samples, outputs):
        """Every sampler's responses (student or teacher, any engine) as samples, cut before a media placeholder
        that a sampler outside this process may still have drawn."""
        samples = super()._postprocess_rollout_outputs(samples, outputs)
        cut_at_media_placeholders(samples, self.template)
        return samples

    @contextmanager
    def _sampling_rng(self, step: int):
        """With several completions per prompt, every rank samples from its own stream seeded by (seed, step, rank):
        the copies of a prompt on different ranks must not draw the same completion. One completion per prompt keeps
        the trainer's common stream (ms-swift's behaviour)."""
        if self.args.num_generations == 1:
            yield
            return
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(sampling_seed(self.args.seed, step, self.args.process_index))
            yield

    def _get_request_config(self, logprobs: bool = True):
        """ms-swift's request config, with vLLM's per-request seeds derived from (seed, step, rank) in colocate mode
        (see :func:`seeded_request_config`); ``logprobs=False`` for samplers whose log-probabilities are unused (the
        teacher's, SKD's)."""
        config = super()._get_request_config()
        if not logprobs and config.logprobs:
            config = copy(config)
            config.logprobs = False
        if not getattr(self, 'use_vllm', False):
            return untruncated_top_k(config, self.accelerator.unwrap_model(self.model))
        if not self.model.training:
            return config
        return seeded_request_config(config, seed=self.args.seed, step=int(self.state.global_step),
                                     process_index=self.accelerator.process_index,
                                     tensor_parallel_size=getattr(self, 'vllm_tensor_parallel_size', 1) or 1,
                                     vllm_mode=self.args.vllm_mode)

    def _get_train_sampler(self, train_dataset=None):
        """With ``--num_generations G`` each prompt appears G times in a row in its generation batch (GRPO's
        layout: ``generation_batch_size / G`` prompts per generation batch), shuffled as ``--train_dataloader_shuffle``
        says (as with one completion per prompt)."""
        g = self.args.num_generations
        if g == 1:
            return super()._get_train_sampler(train_dataset)
        from trl.trainer.utils import RepeatSampler
        return RepeatSampler(
            data_source=train_dataset or self.train_dataset,
            mini_repeat_count=g,
            batch_size=self.args.generation_batch_size // g,
            repeat_count=self.args.steps_per_generation,
            shuffle=self.args.train_dataloader_shuffle,
            seed=self.args.seed)

    def _request_sampler_logprobs(self) -> None:
        """The RL term's sampler/policy mismatch correction (``--rollout_importance_sampling_mode``) and its metrics
        (also alone: ``--log_rollout_offpolicy_metrics``, as in GRPO) need the sampler's per-token log-probabilities:
        vLLM reports them anyway (ms-swift asks for its processed ones); the transformers engine is asked only then
        (it keeps every decoding step's scores meanwhile)."""
        mode, threshold = self.args.rollout_importance_sampling_mode, self.args.rollout_importance_sampling_threshold
        # (vLLM before 0.10.2 reports raw log-probabilities: refused by swift.arguments.check_vllm_logprobs)
        self._measure_mismatch = mode is not None or self.args.log_rollout_offpolicy_metrics
        if self._measure_mismatch and not self.args.use_vllm:
            self.request_config.logprobs = True
            self.engine = SamplerLogprobsEngine(self.model, template=self._infer_template(self.template),
                                                max_batch_size=0)
        if mode is None:
            logged = ('the mismatch (gkd/rollout_*) is logged' if self._measure_mismatch else
                      '--log_rollout_offpolicy_metrics true logs the mismatch')
            logger.info('swift_gkd_plugin: no sampler/policy mismatch correction of the policy-gradient term '
                        f'(--rollout_importance_sampling_mode unset); {logged}')
        else:
            logger.info(f'swift_gkd_plugin: the policy-gradient term is weighted by {mode} importance weights '
                        f'min(pi / mu, {threshold:g}) of the sampler\'s log-probabilities '
                        f'({"vLLM" if self.args.use_vllm else "transformers engine"})')

    def _move_model_to_vllm(self, *args, **kwargs):
        """ms-swift's sync merges the LoRA adapter into the base in place and unmerges it (``W + d - d != W`` in
        bf16) and casts the adapters to the base's dtype: the base and the adapters come out exactly as they went
        in, holding one parameter group's base at a time in a host buffer reused across syncs (FSDP2 merges out of
        place)."""
        if getattr(self, '_sync_buffer', None) is None:
            self._sync_buffer = HostBuffer()
        with exact_lora_sync([self.model], self._sync_buffer, enabled=not getattr(self, '_is_fsdp2', False)):
            return super()._move_model_to_vllm(*args, **kwargs)

    def _move_adapter_to_vllm(self, *args, **kwargs):
        """The adapter-only sync sends the adapter's own weights: ms-swift's merge and unmerge around it only move
        the base (and cast the adapters), so they are skipped."""
        with lora_merges_skipped([self.model]):
            return super()._move_adapter_to_vllm(*args, **kwargs)



def untruncated_top_k(config, model):
    """``config`` with ``--top_k -1`` (or 0) meaning every token on ms-swift's transformers engine, as ms-swift
    documents it and as vLLM samples.

    That engine turns a non-positive top-k into None and then takes the model's generation-config top-k (transformers'
    default 50; Qwen3 ships 20): on-policy samples would come from a truncated distribution on CPU and from the full
    one under vLLM. A top-k of the head's row count keeps every token."""
    if config.top_k is None or config.top_k > 0:
        return config
    config = copy(config)
    config.top_k = head_rows(model)
    return config



def seeded_request_config(config, *, seed: int, step: int, process_index: int, tensor_parallel_size: int,
                          vllm_mode: str):
    """A copy of ``config`` whose ``seed`` makes vLLM's sampling a function of (``--seed``, step, rank).

    ms-swift's vLLM engine gives request ``i`` of one call the seed ``config.seed + i``. In colocate mode ms-swift
    sets ``config.seed`` only with TP > 1, to ``B * (rank // tp)``: the same at every step and for every ``--seed``,
    and with more requests than ``B`` per rank (``steps_per_generation`` > GA) overlapping the next group's range, so
    two copies of a prompt could draw the same completion. Here the base is a 62-bit hash of (seed, step, the rank's
    TP group) (:func:`~swift_gkd_plugin.core.modes.sampling_seed`): the ranks of one TP group, which drive one engine,
    share it; other groups and steps get unrelated ranges; a resumed run draws what the uninterrupted run drew.

    Server mode is left to ms-swift (each rollout worker seeds itself at random): the trainer's client splits the
    requests between servers and each server between its data-parallel workers, which number their share from the
    same ``config.seed``, so one seed would give copies of a prompt on different workers the same draws.
    """
    if vllm_mode != 'colocate':
        return config
    config = copy(config)
    config.seed = sampling_seed(seed, step, process_index // max(int(tensor_parallel_size), 1)) >> 1
    return config
