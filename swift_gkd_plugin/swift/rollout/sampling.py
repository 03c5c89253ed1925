"""Sampling: each generation batch's mode and its samples, from dataset rows to micro-batches.

* :meth:`RolloutMixin._generate_and_score_completions`, the entry: ms-swift's rollout, scoring and batching stages,
  then each micro-batch's response-token counts (the loss's normaliser);
* :meth:`RolloutMixin._rollout_samples`: the batch's mode (on-policy, seq_kd, off-policy) and its samples: the
  student's (ms-swift's ``_generate_completions``), SKD's (the student drafts, the teacher corrects) or the teacher's
  (seq_kd); rows that do not encode are resampled, a whole prompt group at a time;
* :meth:`RolloutMixin._run_turns`: ms-swift's multi-turn loop with the scheduler's return values checked and each
  trajectory kept within ``--max_length`` (:mod:`.scheduler_guard`);
* the samplers themselves are in :mod:`.samplers`.

A rollout hands the loss its samples only: the tokens to learn from are those whose label is not
``IGNORE_INDEX`` once encoded (see :mod:`swift_gkd_plugin.swift.step.loss`), so a sampler that also writes context
(a multi-turn rollout's tool outputs, marked by ``response_loss_mask``) plugs in here without a change to the loss.
"""
from __future__ import annotations

import itertools
from contextlib import ExitStack, contextmanager
from typing import Any, Dict, List

import torch
from accelerate.utils import gather_object
from swift.infer_engine import TransformersEngine
from swift.infer_engine.protocol import RolloutOutput
from swift.rollout import invoke_async_hook, run_multi_turn
from swift.utils import get_logger

from swift_gkd_plugin.rollout.completion_stats import completion_length, end_of_turn_ids
from swift_gkd_plugin.core import Mode
from swift_gkd_plugin.core.modes import mode_log_path, step_mode
from swift_gkd_plugin.runtime.ms_swift_state import data_source
from swift_gkd_plugin.core.speculative import teacher_seed
from swift_gkd_plugin.core.views import (generated_turns, prepare_teacher_view, student_trajectory,
                                        with_teacher_prompt)
from swift_gkd_plugin.swift.setup.compile_cost import eager_sampling
from swift_gkd_plugin.swift.rollout.group_resample import resample_failed_groups
from swift_gkd_plugin.swift.rollout.media_tokens import cut_at_media_placeholders, suppress_media_placeholders
from swift_gkd_plugin.swift.step.hidden_states import head_rows
from swift_gkd_plugin.swift.rollout.scheduler_guard import TRUNCATED, SchedulerGuard
from swift_gkd_plugin.swift.rollout.speculative import cached_forward, server_teacher, skd_decoding
from swift_gkd_plugin.swift.sequence_parallel import (gather_shares, group_size, shard_over_data_parallel, share,
                                                     whole_sequences)
from swift_gkd_plugin.swift.step.token_metrics import add_token_sum as _add_token_sum

logger = get_logger()


def _rollout_outputs(results) -> List[RolloutOutput]:
    return [r if isinstance(r, RolloutOutput) else RolloutOutput(response=r) for r in results]


def learnable_tokens(sample) -> int:
    """The response tokens of ``sample`` its loss mask keeps (all without a mask; 1 for a text-only response)."""
    n = completion_length(sample)
    return 1 if n is None else n  # text only: the template encodes the response


class RolloutMixin:
    """Generation batches: their mode, their prompts and their samples."""

    def _setup_sampling(self) -> None:
        """Each step's mode and its log, the sampling temperature, a multi-turn scheduler's guard, the sampler's
        log-probabilities where a policy-gradient term needs them, media placeholders kept out of samples."""
        self._guard_scheduler()  # a multi-turn scheduler's return values checked, its trajectories within --max_length
        self._gkd_mode = Mode.OFF_POLICY
        self._teacher_engine = None
        # --gkd_sampling_temperature: ms-swift built every sampler's request config from --temperature (the loss's)
        self.request_config.temperature = self.samplers.temperature
        self._mode_log = mode_log_path(self.args.output_dir, self.args.process_index)
        self._sampler_logprobs_noted = False
        if type(getattr(self, 'engine', None)) is TransformersEngine:  # ms-swift's: one that keeps the stop token
            self.engine = self.samplers.engine(self.model)
        if self.args.gkd_rl_coef > 0 or self.args.gkd_sampled_kl_coef > 0:  # the policy-gradient terms
            self.samplers.request_sampler_logprobs()
        suppress_media_placeholders(getattr(self, 'engine', None), self.template)  # the student's own sampler

    def _guard_scheduler(self) -> None:
        """A multi-turn scheduler's hooks checked and its trajectories kept within ``--max_length``
        (:class:`~.scheduler_guard.SchedulerGuard`)."""
        self._scheduler_guard = None
        if self.multi_turn_scheduler is not None:
            name = self.args.multi_turn_scheduler
            name = name if isinstance(name, str) else type(name).__name__
            student = self.accelerator.unwrap_model(self.model)
            models = [student] + ([self.accelerator.unwrap_model(self.teacher_model)] if self.teacher_model else [])
            contexts = [getattr(getattr(m, 'model_info', None), 'max_model_len', None) for m in models]
            contexts.append(getattr(getattr(self, 'engine', None), 'max_model_len', None))  # vLLM's own limit
            self._scheduler_guard = SchedulerGuard(self.multi_turn_scheduler, name, head_rows(student), self.template,
                                                   min((c for c in contexts if c), default=None))

    def _generate_and_score_completions(self, inputs) -> List[Dict[str, Any]]:
        """One generation batch, in ms-swift's stages: its mode and samples (:meth:`_rollout_samples`), their rewards
        (:mod:`swift_gkd_plugin.swift.step.scoring`), its micro-batches (:mod:`.batches`) and a served teacher's
        top-k (:mod:`swift_gkd_plugin.swift.teacher.placement`); then each micro-batch's response-token counts, which
        size and normalise its loss (:meth:`_count_step_tokens`)."""
        with eager_sampling():  # a compiled student would be recompiled per sampled length (compile_cost.py)
            batches = super()._generate_and_score_completions(inputs)
        self._count_step_tokens(batches)
        return batches

    def _get_request_config(self, logprobs: bool = True, for_step=None):
        """ms-swift's request config as the samplers adapt it (:meth:`~.samplers.Samplers.request_config`) for this
        step's mode and a multi-turn rollout's turn; ``logprobs=False`` for samplers whose log-probabilities are
        unused; ``for_step``: an on-policy step sampled ahead (``--async_generate``), whose budget and seeds it gets
        instead of this step's."""
        mode = Mode.ON_POLICY if for_step is not None else getattr(self, '_gkd_mode', None)
        return self.samplers.request_config(super()._get_request_config(), logprobs, mode=mode, step=for_step,
                                            turn=self._sampling_turn)

    def _postprocess_rollout_outputs(self, samples, outputs):
        """Every sampler's responses (student or teacher, any engine) as samples, cut before a media placeholder
        that a sampler outside this process may still have drawn."""
        samples = super()._postprocess_rollout_outputs(samples, outputs)
        cut_at_media_placeholders(samples, self.template)
        return samples

    def _rollout_samples(self, inputs):
        """This generation batch's mode, its rows (resampled where they do not encode), their responses where the
        mode samples them, then the next steps' prompts sent ahead (``--async_generate``)."""
        training = self.model.training
        step = int(self.state.global_step)
        mode = self._choose_mode(step, training)
        if self.template.truncation_strategy == 'raise':
            inputs = self.resample_encode_failed_inputs(inputs, strip_response=mode.needs_generation)
        samples = self.to_samples(inputs)
        if mode.needs_generation:
            samples = self._generated(mode, samples, step, training)
        if training:
            self.prefetch.send_next(step)  # --async_generate: the next step's samples, while this one trains
        return samples

    def _choose_mode(self, step: int, training: bool) -> Mode:
        """The mode of this generation batch (:func:`step_mode`), kept for the stages that follow and logged."""
        mode = step_mode(self.args, step, training, self._mode_log)
        self._gkd_mode = mode
        self._data_source = data_source(mode)
        if training:
            self._record_mode(step, mode)
        return mode

    def _generated(self, mode: Mode, samples, step: int, training: bool):
        """The responses of an on-policy or seq_kd batch (once per sequence-parallel group: each rank its share, on
        whole sequences), their lengths logged, a cross-tokenizer teacher's answers turned into text both sides
        encode, a multi-turn rollout's trajectories logged."""
        with self.samplers.rng(step), whole_sequences():
            samples = gather_shares(self._sample(mode, share(samples), step))
        teacher_tokens = mode is Mode.SEQ_KD and self.teacher.xtok is not None
        if training:  # gkd/completion_length*, gkd/clipped_ratio (in the sampler's tokens)
            template = self.teacher.xtok.template if teacher_tokens else self.template
            self._completions.add(samples, end_of_turn_ids(template))
        if teacher_tokens:
            for sample in samples:
                # the sampled ids are the teacher's: both sides encode the text, ending the turn where the
                # teacher stopped by itself
                sample.response_token_ids, sample.response_loss_mask = [], []
                sample.add_eos = sample.finish_reason == 'stop'
        if self.multi_turn_scheduler is not None:
            self._log_trajectories(samples)
        return samples

    def _sample(self, mode: Mode, samples, step: int):
        """The responses of an on-policy (SKD's where ``--gkd_skd_top_k``) or seq_kd generation batch."""
        if mode is Mode.ON_POLICY and self.args.gkd_skd_top_k:
            return self._generate_with_skd(samples, step)
        if mode is Mode.ON_POLICY:
            return self.prefetch.samples(samples, step)  # prefetched (--async_generate) or ms-swift's loop
        return self._generate_with_teacher(samples)

    def _add_prompt_id_to_inputs(self, samples):
        """ms-swift's, whose gather over the ranks (a collective) it skips for an empty list: a rank's share of a
        generation batch (sequence parallelism) may be empty while the others' are not."""
        if not samples:
            gather_object([])
            return samples
        return super()._add_prompt_id_to_inputs(samples)

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
        the sampling stream of plain on-policy steps; the teacher's come from their own per-(seed, step, rank)
        stream."""
        samples = self._preprocess_inputs(samples)
        requests = self.samples2requests(samples)
        generator = torch.Generator().manual_seed(teacher_seed(self.args.seed, step, self.args.process_index))
        results = []
        with ExitStack() as stack:
            stack.callback(self.model.train, self.model.training)  # the engine calls eval() on the student
            unwrapped = self.samplers.student(stack)
            if self.use_teacher_api:  # this plugin's teacher server (checked before loading: /v1/topk, k >= K)
                teacher = server_teacher(self.teacher_clients[0], self.args.gkd_skd_top_k)
            elif self.teacher_model is None:  # the student's base, adapter off (or the teacher adapter on)
                view = lambda: self.teacher.view_of_student(unwrapped)  # noqa: E731
                teacher = lambda model, _: cached_forward(model, view)  # noqa: E731
            else:
                teacher_model = self.teacher.for_generation(stack)
                teacher = lambda model, _: cached_forward(teacher_model)  # noqa: E731
            decode = skd_decoding(teacher, top_k=self.args.gkd_skd_top_k, temperature=self.samplers.temperature,
                                  generator=generator, on_result=results.append)
            engine = self.samplers.engine(unwrapped, decode=decode)
            stack.enter_context(self.template.generate_context())
            # SKD's tokens come from a student/teacher mixture: no sampler log-probabilities, no correction
            outputs = engine.infer(requests, self._get_request_config(logprobs=False), use_tqdm=False)
        self._log_skd(results)
        return self._postprocess_rollout_outputs(samples, _rollout_outputs(outputs))

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
        if self.teacher.is_the_student():
            # The teacher is the student itself (no --teacher_model): its samples are the student's.
            return self._generate_completions(samples)
        for sample in samples:
            prepare_teacher_view(sample)
        samples = self._preprocess_inputs(samples)
        prompts = [[dict(m) for m in s.messages] if s.teacher_messages else None for s in samples]
        requests = [with_teacher_prompt(s, r) for s, r in zip(samples, self.samples2requests(samples))]
        config = self._get_request_config(logprobs=False)
        with self._teacher_sampling_context() as engine:
            if self.multi_turn_scheduler is None:
                outputs = _rollout_outputs(engine.infer(requests, config, use_tqdm=False))
            else:  # the teacher drives the turns, from its own prompt
                outputs = self._teacher_multi_turn(engine, requests, config)
                for prompt, output in zip(prompts, outputs):
                    output.messages = student_trajectory(prompt, output.messages, output.response_token_ids)
        return self._postprocess_rollout_outputs(samples, outputs)  # with a teacher of another tokenizer: its ids

    def _teacher_multi_turn(self, engine, requests, config):
        """seq_kd's multi-turn rollouts: ms-swift's scheduler loop (:func:`swift.rollout.run_multi_turn`, as its
        colocate rollouts run it) with the teacher's engine answering every turn."""
        invoke_async_hook(self.multi_turn_scheduler.on_trajectory_start(requests))
        infer = lambda reqs, cfg: _rollout_outputs(engine.infer(reqs, cfg, use_tqdm=False))  # noqa: E731
        return self._run_turns(requests, infer(requests, config), infer, config)

    def _colocate_multi_turn_infer(self, samples, first_turn_rollout_outputs, request_config, requests=None):
        """ms-swift's on-policy multi-turn rollouts (the student's engine, or vLLM's when the trainer drives the
        turns), through :meth:`_run_turns`."""
        requests = self.samples2requests(samples) if requests is None else requests
        outputs = self._run_turns(requests, first_turn_rollout_outputs, self._rollout, request_config)
        return self._postprocess_rollout_outputs(samples, outputs)

    def _run_turns(self, requests, first_turn_outputs, infer, config):
        """ms-swift's scheduler loop from the first turn's outputs on, each later turn's requests answered by
        ``infer`` unless their prompt no longer fits in ``--max_length`` (the trajectory ends there, see
        :meth:`~.scheduler_guard.SchedulerGuard.rollout_fn`)."""
        guard = self._scheduler_guard
        guard.start()
        turns = itertools.count(1)

        def later_turn(reqs, cfg):  # vLLM's request seeds of this turn (see samplers.seeded_request_config)
            self._sampling_turn = next(turns)
            try:
                return infer(reqs, cfg if cfg.seed is None else self._get_request_config(logprobs=cfg.logprobs))
            finally:
                self._sampling_turn = 0

        outputs = run_multi_turn(requests=requests, first_turn_outputs=first_turn_outputs,
                                 scheduler=self.multi_turn_scheduler, rollout_fn=guard.rollout_fn(later_turn),
                                 request_config=config, max_turns=self.args.max_turns, gather_fn=gather_object)
        guard.finish(requests, outputs)
        return outputs

    def _log_trajectories(self, samples) -> None:
        """``gkd/num_turns``: turns per trajectory; ``gkd/empty_trajectories``: trajectories whose loss mask keeps
        no token the model wrote (nothing to learn from them); ``gkd/empty_turns``: turns whose scheduler returned an
        empty ``response_token_ids``; ``gkd/truncated_trajectories``: trajectories cut at ``--max_length``. Each is
        also warned with its count."""
        metrics = self.custom_metrics['train' if self.model.training else 'eval']
        turns = [int((s.rollout_infos or {}).get('num_turns', generated_turns(s))) for s in samples]
        _add_token_sum(metrics['gkd/num_turns'], sum(turns), len(turns))
        empty = sum(1 for s in samples if not learnable_tokens(s))
        _add_token_sum(metrics['gkd/empty_trajectories'], empty, len(samples))
        guard, scheduler = self._scheduler_guard, f'--multi_turn_scheduler {self._scheduler_guard.name}'
        empty_turns, guard.empty_turns = guard.empty_turns, 0
        _add_token_sum(metrics['gkd/empty_turns'], empty_turns, sum(turns))
        cut = sum(1 for s in samples if (s.rollout_infos or {}).get(TRUNCATED))
        _add_token_sum(metrics['gkd/truncated_trajectories'], cut, len(samples))
        of_step = f'of {len(samples)} trajectories of step {int(self.state.global_step)}'
        if empty:
            logger.warning(f'swift_gkd_plugin: {empty} {of_step} have no token to learn from ({scheduler} masked '
                           'every token the model wrote, or it wrote none): none of their tokens is a target, their '
                           'turn-end markers included (counted in gkd/empty_trajectories)')
        if empty_turns:
            logger.warning(f'swift_gkd_plugin: {scheduler} returned an empty response_token_ids for {empty_turns} of '
                           f'the {sum(turns)} turns {of_step}: those turns stay in their trajectory as the model '
                           'wrote them, as context (every token masked 0), not as targets (counted in '
                           'gkd/empty_turns)')
        if cut:
            limit = f'--max_turns {self.args.max_turns}' if self.args.max_turns else 'no --max_turns'
            logger.warning(f'swift_gkd_plugin: {cut} {of_step} were cut at {guard.limit_name}: '
                           f'{scheduler} went on ({limit}) but the next turn\'s prompt, with what the scheduler '
                           'appended, would not fit; each keeps its turns up to there and learns them, what was '
                           'appended after its last turn is dropped (counted in gkd/truncated_trajectories; set '
                           f'--max_turns{", or a larger --max_length" if guard.limit_is_max_length else ""})')

    @contextmanager
    def _teacher_sampling_context(self):
        # the transformers engine calls eval() on the model it drives: the student module when the base is shared
        with ExitStack() as stack:
            stack.callback(self.model.train, self.model.training)
            if self.teacher_model is None:
                # One copy of the weights: the teacher is the student's base (adapter off or teacher adapter on).
                unwrapped = self.samplers.student(stack)
                stack.enter_context(self.teacher.view_of_student(unwrapped))
                engine = self.samplers.engine(unwrapped)
            else:
                unwrapped = self.teacher.for_generation(stack)
                if self._teacher_engine is None or self._teacher_engine.model is not unwrapped:
                    # a teacher with another tokenizer samples through its own template
                    xtok = self.teacher.xtok
                    self._teacher_engine = self.samplers.engine(unwrapped, xtok and xtok.template)
                engine = self._teacher_engine
            stack.enter_context((self.teacher.xtok.template if self.teacher.xtok else self.template).generate_context())
            yield engine

    def get_train_dataloader(self):
        """ms-swift's GKD dataloader. Under sequence parallelism the ranks of a group read the same rows, as in
        ``swift sft``: accelerate's sharding of the batches runs over the data-parallel groups, not over every rank
        (:func:`shard_over_data_parallel`), so one optimizer step covers ``per_device x (world / N) x GA`` rows and an
        epoch's length, ``--max_steps``, a resume's position and the learning-rate schedule follow."""
        dataloader = super().get_train_dataloader()
        if group_size() > 1:
            shard_over_data_parallel(dataloader)
        return dataloader

    def get_total_train_batch_size(self, args) -> int:
        """The rows of one optimizer step (logged at the start): a sequence-parallel group reads one set of rows."""
        return super().get_total_train_batch_size(args) // group_size()

    def _get_train_sampler(self, train_dataset=None):
        """With ``--num_generations G`` each prompt appears G times in a row in its generation batch (GRPO's
        layout: ``generation_batch_size / G`` prompts per generation batch), shuffled as ``--train_dataloader_shuffle``
        says, as ``swift sft`` reads it (false: the rows in the order ms-swift loaded them; ms-swift's GKD sampler
        shuffled whatever it said)."""
        g = self.args.num_generations  # the order is a function of (seed, epoch): a resume replays it (epoch_sampler)
        from swift_gkd_plugin.swift.rollout.epoch_sampler import EpochSampler, text_lengths
        dataset = train_dataset or self.train_dataset
        by_length = self.args.gkd_score_only and self.args.group_by_length  # (a store is keyed by content)
        lengths = text_lengths(dataset) if by_length else None
        self._rows_by_length = lengths is not None  # (said in a score run's progress line)
        return EpochSampler(
            data_source=dataset, lengths=lengths,
            mini_repeat_count=g,
            batch_size=self.args.generation_batch_size // g,
            repeat_count=self.args.steps_per_generation,
            shuffle=self.args.train_dataloader_shuffle,
            seed=self.args.seed, epoch_of=lambda: int(self.state.epoch or 0),
            fill_last=bool(self.args.gkd_score_only))  # (swift-gkd score: every row scored, every prompt sampled)
