"""The GKD trainer that ``swift rlhf --rlhf_type gkd`` runs once the plugin is active (transformers/DeepSpeed path).

It reuses ms-swift's rollout infrastructure (``RolloutTrainerMixin``: templates, transformers and vLLM engines,
vLLM client, teacher-server client, OPSD encoding) by subclassing ms-swift's ``GKDTrainer``, and replaces the GKD
logic with the plugin's core:

* the mode of each generation batch comes from :func:`swift_gkd_plugin.core.choose_mode` (on-policy, seq_kd with
  the teacher sampling, or off-policy), identical on every rank and reproducible on resume;
* the loss is the generalized JSD of :mod:`swift_gkd_plugin.core` on response tokens, summed in float32 and divided
  by the number of response tokens of the whole optimizer step (all micro-batches, all ranks), so its value and
  gradient do not depend on how the step is split into micro-batches or ranks.

The trainer is composed of one mixin per concern, by the stage a batch passes: :mod:`.rollout.sampling` (each
generation batch's mode and samples), :mod:`.rollout.samplers` (the engines and request configs that sample),
:mod:`.rollout.batches` (samples to micro-batches), :mod:`.teacher.placement` (the teacher's placement and forward, a
served teacher), :mod:`.teacher.reference` (``--gkd_ref_kl_coef``'s initial student), :mod:`.step.scoring` (rewards,
completions log) and :mod:`.step.loss` (the loss of a micro-batch and its metrics). This module holds their
composition and the set-up they share.
"""
from __future__ import annotations

import functools
from typing import Dict, List

import torch
from swift.rlhf_trainers.gkd_trainer import GKDTrainer
from swift.utils import get_logger

from swift_gkd_plugin.completion_stats import CompletionWindow
from swift_gkd_plugin.core import Divergence, Mode
from swift_gkd_plugin.core.modes import mode_log_path
from swift_gkd_plugin.core.weights.offload import TeacherOffloader, is_partitioned
from swift_gkd_plugin.core.views import check_privileged_columns
from swift_gkd_plugin.flags import FlagError, sampling_temperature
from swift_gkd_plugin.swift.rollout.batches import BatchesMixin
from swift_gkd_plugin.swift.sequence_parallel import drop_right_padding_masks
from swift_gkd_plugin.swift.run.clean_exit import (before_groups_go, destroy_process_groups_at_exit, note_run_failed,
                                               note_training_finished)
from swift_gkd_plugin.swift.setup.adapters import unadapted_experts
from swift_gkd_plugin.swift.setup.command_line import PROG, refuse
from swift_gkd_plugin.swift.teacher.cross_tokenizer import CrossTokenizerTeacher
from swift_gkd_plugin.swift.step.loss import LossMixin
from swift_gkd_plugin.swift.rollout.media_tokens import suppress_media_placeholders
from swift_gkd_plugin.swift.teacher.adapters import load_frozen_adapter
from swift_gkd_plugin.swift.teacher.reference import ReferenceMixin
from swift_gkd_plugin.swift.step.rewards import load_reward_funcs
from swift_gkd_plugin.swift.rollout.sampling import RolloutMixin
from swift_gkd_plugin.server.client import TeacherServerError
from swift_gkd_plugin.swift.run.guards import RunError, install_run_guards, server_failed_message
from swift_gkd_plugin.swift.rollout.rollout_server import RolloutServerError
from swift_gkd_plugin.swift.rollout.prefetch import PrefetchMixin
from swift_gkd_plugin.swift.rollout.samplers import SamplersMixin
from swift_gkd_plugin.swift.step.scoring import ScoringMixin
from swift_gkd_plugin.swift.teacher.placement import TeacherMixin
from swift_gkd_plugin.swift.step.token_metrics import TokenMean
from swift_gkd_plugin.colocated_vllm import shutdown_engine

logger = get_logger()


class GKDPluginTrainer(PrefetchMixin, LossMixin, RolloutMixin, SamplersMixin, ScoringMixin, BatchesMixin,
                       TeacherMixin, ReferenceMixin, GKDTrainer):
    """ms-swift's GKD trainer with the plugin's modes (seq_kd included), loss, normalisation and metrics."""

    def __init__(self, *args, **kwargs):
        ref_model = kwargs.pop('ref_model', None)  # --gkd_ref_kl_coef's copy (ms-swift's GKDTrainer takes none)
        self._sampling_turn = 0  # a multi-turn rollout's later turn, while it samples (vLLM's request seeds)
        async_generate = self.take_async_flag(kwargs['args'])  # before ms-swift's trainer reads it
        super().__init__(*args, **kwargs)
        self._setup_prefetch(async_generate)
        if self.template.sequence_parallel_size > 1:  # a group reads one set of rows (RolloutMixin.get_train_dataloader)
            self.args.generation_batch_size //= self.template.sequence_parallel_size
            drop_right_padding_masks()
            size, world, args = self.template.sequence_parallel_size, self.args.world_size, self.args
            if self.args.process_index == 0:
                logger.info(f'swift_gkd_plugin: sequence parallelism on: {world // size} group(s) of {size} ranks '
                            f'(--sequence_parallel_size {size}, {world} processes); each rank holds 1/{size} of every '
                            f'row, and a step covers {args.per_device_train_batch_size} x {world // size} x '
                            f'{args.gradient_accumulation_steps} rows (per device x groups x accumulation)')
        self._setup_reference(ref_model)
        destroy_process_groups_at_exit()  # ms-swift never does; a rank exiting with live gloo groups may abort
        if self.args.use_vllm and self.args.vllm_mode == 'colocate':
            before_groups_go(functools.partial(shutdown_engine, self.engine))  # it uses the groups too
        install_run_guards(self)  # a training set smaller than one batch, a checkpoint save that runs out of space
        self._loss_batch, self._check_now = None, False  # LossMixin.training_step's non-finite check
        self._guard_scheduler()  # a multi-turn scheduler's return values checked, its trajectories within --max_length
        # compute_loss already divides by the step's token count: the HF Trainer must not divide by the number
        # of gradient-accumulation steps again (nor DeepSpeed, which the Trainer tells via scale_wrt_gas=False).
        self.loss_is_scaled_for_ga = True
        self._gkd_mode = Mode.OFF_POLICY
        self._teacher_engine = None
        # --gkd_sampling_temperature: ms-swift built every sampler's request config from --temperature (the loss's)
        self._sampling_temperature = sampling_temperature(self.args)
        self.request_config.temperature = self._sampling_temperature
        self._mode_log = mode_log_path(self.args.output_dir, self.args.process_index)
        check_privileged_columns(self.train_dataset)
        check_privileged_columns(self.eval_dataset)
        self._teacher_adapter = None
        if self.args.teacher_adapters and self.teacher_model is None and not self.use_teacher_api:
            # one copy of the base: the teacher is the student's base with the frozen teacher adapter active
            self._teacher_adapter = self.args.teacher_adapters[0]
            load_frozen_adapter(self.model, self._teacher_adapter)
        self._teacher_offloader = None
        self._teacher_partitioned = self.teacher_model is not None and is_partitioned(self.teacher_model)
        if self.args.offload_teacher_model and self.teacher_model is not None and not self._teacher_partitioned:
            # Partitioned (ZeRO-3, FSDP) teachers keep ms-swift's offload of their shards, which its
            # load_teacher_model_context brings back; whole replicated teachers use ours.
            self._teacher_offloader = TeacherOffloader(
                self.accelerator.unwrap_model(self.teacher_model), self.accelerator.device)
        self._log_teacher_placement()
        experts = unadapted_experts(self.accelerator.unwrap_model(self.model))
        if experts and self.args.process_index == 0:
            logger.warning(f'swift_gkd_plugin: the LoRA adapter leaves the experts out: this mixture-of-experts model '
                           f'keeps them as fused weights ({", ".join(experts)}), which --target_modules does not reach '
                           '(all-linear neither), so only attention and the other linear layers learn. To adapt the '
                           f'experts too, pass --target_parameters {" ".join(experts)} (with --lora_dropout 0: peft\'s '
                           'LoRA on parameters takes no dropout)')
        self._xtok = None  # --gkd_cross_tokenizer: the teacher's template, vocabulary mapping and alignment
        self._xtok_rows: List[list] = []  # per micro-batch, in encoding order, until attached to the batch
        if self.args.gkd_cross_tokenizer and self.teacher_model is not None:
            teacher = self.accelerator.unwrap_model(self.teacher_model)
            self._xtok = CrossTokenizerTeacher(self.args.gkd_cross_tokenizer, teacher.model_dir,
                                               teacher.model_meta.model_type, self.template, self.args.teacher_template)
        self._fused = self._decide_loss_impl()
        # the one divergence every loss path computes (core.row_divergence); --beta is the JSD's parameter
        self._divergence = Divergence(self.args.gkd_divergence, beta=self.args.beta, alpha=self.args.gkd_skew_alpha,
                                      fkl_above_entropy=self.args.gkd_entropy_fkl_threshold)
        logger.info(f'swift_gkd_plugin: divergence {self._divergence} at temperature {self.args.temperature}')
        self._sampler_logprobs_noted, self._measure_mismatch = False, False
        if self.args.gkd_rl_coef > 0 or self.args.gkd_sampled_kl_coef > 0:  # the policy-gradient terms
            self._request_sampler_logprobs()
        suppress_media_placeholders(getattr(self, 'engine', None), self.template)  # the student's own sampler
        self._reward_funcs, self._reward_names = load_reward_funcs(self.args)
        weights = self.args.reward_weights or [1.0] * len(self._reward_names)
        self._reward_weights = torch.tensor(weights, dtype=torch.float32, device=self.accelerator.device)
        self._advantages = None  # this rank's advantages of the current generation batch (on-policy steps)
        # metrics are summed on the device and read once per logging step (ms-swift's MeanMetric reads each update)
        for metrics in self.custom_metrics.values():
            metrics.default_factory = functools.partial(TokenMean, device=self.args.device)
        self._completion_columns: Dict[str, list] = {}  # reward columns of the completions log
        self._completions = CompletionWindow()  # sampled lengths and truncation, logged by ScoringMixin.log

    def train(self, *args, **kwargs):
        """Training; a run stopped by a guard (:class:`RunError`, a :class:`FlagError` known only now) or by a teacher
        server that stayed unreachable or a rollout server that failed ends with its one ``swift rlhf: error:`` line and
        exit code 1, no traceback."""
        try:
            result = super().train(*args, **kwargs)
        except (RunError, FlagError) as exc:
            note_run_failed()
            refuse(PROG, exc, code=1)
        except TeacherServerError as exc:  # its retries and wait spent: the error, and where to resume from
            note_run_failed()
            refuse(PROG, server_failed_message(self, exc), code=1)
        except RolloutServerError as exc:  # the student's vLLM server (--vllm_mode server) failed or went away
            note_run_failed()
            refuse(PROG, server_failed_message(self, exc, 'the student\'s rollout server'), code=1)
        note_training_finished()  # a clean exit may now skip interpreter finalization (see clean_exit)
        return result

    def create_model_card(self, model_name=None, dataset_name=None, tags=None):
        """The plugin's ``README.md`` in the run folder (:func:`~swift_gkd_plugin.swift.run.records.write_model_card`:
        student, teacher, GKD settings, a snippet that runs on a CPU) in place of TRL's, which its ``_save_checkpoint``
        writes before each checkpoint."""
        from swift_gkd_plugin.swift.run.records import write_model_card
        write_model_card(self)
