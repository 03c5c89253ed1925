"""The GKD trainer that ``swift rlhf --rlhf_type gkd`` runs once the plugin is active (transformers/DeepSpeed path).

It reuses ms-swift's rollout infrastructure (``RolloutTrainerMixin``: templates, transformers and vLLM engines,
vLLM client, teacher-server client, OPSD encoding) by subclassing ms-swift's ``GKDTrainer``, and replaces the GKD
logic with the plugin's core:

* the mode of each generation batch comes from :func:`swift_gkd_plugin.core.choose_mode` (on-policy, seq_kd with
  the teacher sampling, or off-policy), identical on every rank and reproducible on resume;
* the loss is the generalized JSD of :mod:`swift_gkd_plugin.core` on response tokens, summed in float32 and divided
  by the number of response tokens of the whole optimizer step (all micro-batches, all ranks), so its value and
  gradient do not depend on how the step is split into micro-batches or ranks.
"""
from __future__ import annotations

import functools
from contextlib import ExitStack, contextmanager, nullcontext
from copy import copy
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Union

import torch
import torch.nn.functional as F
from swift.infer_engine import TransformersEngine
from swift.infer_engine.protocol import RolloutOutput
from swift.rlhf_trainers.gkd_helpers import encode_gkd_samples
from swift.rlhf_trainers.gkd_loss import DataSource
from swift.rlhf_trainers.gkd_trainer import GKDTrainer
from swift.rlhf_trainers.utils import encode_sample
from swift.trainers import disable_gradient_checkpointing
from swift.utils import get_logger, to_device, unwrap_model_for_generation

from swift_gkd_plugin.core import Divergence, Mode, align_vocab, generalized_jsd
from swift_gkd_plugin.core.constants import IGNORE_INDEX
from swift_gkd_plugin.core.fused_loss import fused_linear_jsd
from swift_gkd_plugin.core.lora_round_trip import HostBuffer, exact_lora_sync, lora_merges_skipped
from swift_gkd_plugin.core.modes import DATA_SOURCES, mode_log_path, sampling_seed, step_mode
from swift_gkd_plugin.core.policy_gradient import (head_token_logprobs, policy_gradient_loss, rollout_importance_weights,
                                                   sampled_token_stats)
from swift_gkd_plugin.core.offload import TeacherOffloader, is_partitioned
from swift_gkd_plugin.core.speculative import teacher_seed
from swift_gkd_plugin.core.teacher_signal import (CrossTokenizerRows, TeacherHead, TeacherLogits, TeacherSignal,
                                                  TeacherTopK)
from swift_gkd_plugin.core.topk import drop_ids_outside_vocab, topk_of_logits
from swift_gkd_plugin.core.views import (check_privileged_columns, check_same_response_count, check_views_aligned,
                                         prepare_teacher_view, with_teacher_prompt)
from swift_gkd_plugin.flags import sampling_temperature
from swift_gkd_plugin.swift.compile_cost import eager_sampling
from swift_gkd_plugin.swift.clean_exit import destroy_process_groups_at_exit, note_training_finished
from swift_gkd_plugin.swift.cross_tokenizer import CrossTokenizerTeacher
from swift_gkd_plugin.swift.group_resample import resample_failed_groups
from swift_gkd_plugin.swift.hidden_states import (fused_fallback_reason, gathered_heads, head_bypassed, head_is_sharded,
                                                  head_rows, output_head, topk_from_hidden)
from swift_gkd_plugin.swift.media_tokens import cut_at_media_placeholders, suppress_media_placeholders
from swift_gkd_plugin.swift.peft_utils import TEACHER_ADAPTER, active_adapter, eval_mode, load_frozen_adapter
from swift_gkd_plugin.swift.rewards import global_advantages, load_reward_funcs, score_completions
from swift_gkd_plugin.swift.rollout_correction import SamplerLogprobsEngine, sampler_logprobs_of_batch
from swift_gkd_plugin.swift.run_guards import install_run_guards
from swift_gkd_plugin.swift.speculative import SpeculativeEngine, cached_forward, server_teacher, skd_decoding
from swift_gkd_plugin.swift.teacher_server import (attach_trainer_token_ids, connect_teacher_servers,
                                                    infer_prompt_logprobs)
from swift_gkd_plugin.swift.token_metrics import TokenMean
from swift_gkd_plugin.swift.token_metrics import add_token_sum as _add_token_sum

logger = get_logger()

_DATA_SOURCE = {mode: DataSource(value) for mode, value in DATA_SOURCES.items()}


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Labels aligned with the logits that predict them (position i predicts token i + 1); -100 = no loss."""
    return F.pad(labels[..., 1:], (0, 1), value=IGNORE_INDEX)


def count_loss_tokens(labels: torch.Tensor) -> torch.Tensor:
    """The number of response tokens (positions with a label to predict), on the labels' device (not read)."""
    return (labels[..., 1:] != IGNORE_INDEX).sum()


def response_positions(mask: torch.Tensor, count: int) -> torch.Tensor:
    """The flat indices of ``mask``'s ``count`` true entries, in order, without reading the mask on the host
    (``nonzero_static``; a boolean selection ``x[mask]`` waits for the device to size its result)."""
    return torch.nonzero_static(mask.reshape(-1), size=count).squeeze(1)


class GKDPluginTrainer(GKDTrainer):
    """ms-swift's GKD trainer with the plugin's modes (seq_kd included), loss, normalisation and metrics."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        destroy_process_groups_at_exit()  # ms-swift never does; a rank exiting with live gloo groups may abort
        install_run_guards(self)  # a training set smaller than one batch, a checkpoint save that runs out of space
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
        self._xtok = None  # --gkd_cross_tokenizer: the teacher's template, vocabulary mapping and alignment
        self._xtok_rows: List[list] = []  # per micro-batch, in encoding order, until attached to the batch
        if self.args.gkd_cross_tokenizer and self.teacher_model is not None:
            teacher = self.accelerator.unwrap_model(self.teacher_model)
            self._xtok = CrossTokenizerTeacher(self.args.gkd_cross_tokenizer, teacher.model_dir,
                                               teacher.model_meta.model_type, self.template, self.args.teacher_template)
        self._fused = self._decide_loss_impl()
        # the one divergence every loss path computes (core.row_divergence); --beta is the JSD's parameter
        self._divergence = Divergence(self.args.gkd_divergence, beta=self.args.beta, alpha=self.args.gkd_skew_alpha)
        logger.info(f'swift_gkd_plugin: divergence {self._divergence} at temperature {self.args.temperature}')
        self._sampler_logprobs_noted, self._measure_mismatch = False, False
        if self.args.gkd_rl_coef > 0:
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

    def train(self, *args, **kwargs):
        result = super().train(*args, **kwargs)
        note_training_finished()  # a clean exit may now skip interpreter finalization (see clean_exit)
        return result

    def _decide_loss_impl(self) -> bool:
        """--gkd_loss_impl: fused wherever it applies; otherwise dense, and the log says why (once)."""
        impl = self.args.gkd_loss_impl
        if impl == 'dense':
            logger.info('swift_gkd_plugin: GKD loss implementation: dense (--gkd_loss_impl dense)')
            return False
        reason = fused_fallback_reason(self)
        if reason is None:
            logger.info(f'swift_gkd_plugin: GKD loss implementation: fused (--gkd_loss_impl {impl})')
            return True
        if self.args.gkd_topk_tail:
            raise ValueError(f'--gkd_topk_tail true needs the fused loss, which cannot apply here ({reason})')
        logger.warning(f'swift_gkd_plugin: --gkd_loss_impl {impl}: the fused loss cannot apply here ({reason}); '
                       'using the dense loss')
        return False

    def _log_teacher_placement(self) -> None:
        if self._teacher_adapter is not None:
            logger.info(f'Teacher model: the student base with the frozen adapter {self._teacher_adapter} (one copy '
                        'of the base weights)')
        elif self._teacher_use_disable_adapter:
            logger.info('Using shared base model architecture:\n'
                        '  - Student model: base_model + LoRA (trainable)\n'
                        '  - Teacher model: base_model with LoRA disabled (frozen)')
        elif self.teacher_model is not None:
            where = 'resident'
            if self.args.offload_teacher_model:
                where = ('its partitions offloaded to CPU between uses by ms-swift' if self._teacher_partitioned else
                         'offloaded to CPU between uses')
            logger.info(f'Teacher model: a separate frozen model ({where})')
        elif self.use_teacher_api:
            logger.info(f'Teacher model: served at {self.teacher_model_server}')
        else:
            logger.info('Teacher model: the student itself (no --teacher_model), frozen for the teacher forward')

    @contextmanager
    def load_teacher_model_context(self):
        if self._teacher_offloader is not None and self._teacher_offloader.enabled:
            with self._teacher_offloader.resident():
                yield
        else:
            with super().load_teacher_model_context():
                yield

    # ------------------------------------------------------------------ teacher server
    def _setup_teacher(self) -> None:
        """A served teacher is reached through the plugin's client (no vLLM needed), from every rank."""
        server = getattr(self, 'teacher_model_server', None)
        self.teacher_model_server = None  # keep ms-swift from building its vLLM client
        super()._setup_teacher()
        self.teacher_model_server = server
        if server is None:
            return
        from swift.rlhf_trainers.gkd_helpers import parse_teacher_model_server
        self.use_teacher_api = True
        self._is_self_distillation = False
        self.teacher_configs = parse_teacher_model_server(server)
        self.teacher_clients, self._teacher_topk_route = connect_teacher_servers(
            self.args, self.teacher_configs, self.accelerator, self.gkd_logits_topk, self.template.tokenizer)

    def _infer_teacher_requests(self, handle, topk, teacher_client=None):
        """ms-swift's /infer/ call (main process) through the plugin's client: no vLLM, waits and logged retries."""
        if not handle['all_requests']:
            return []
        return infer_prompt_logprobs(teacher_client or self.teacher_clients[0], handle['all_requests'], topk)

    def _postprocess_batch(self, samples, batch_encoded_inputs) -> None:
        """One request per generation batch: the teacher's top-k at every response position of every row."""
        if not self.use_teacher_api:
            return
        if not self._teacher_topk_route:
            # a server with only ms-swift's routes: ms-swift's requests, routing, gather to the main process and
            # assembly, with _infer_teacher_requests above answering them (and checking the server's tokenization)
            attach_trainer_token_ids(batch_encoded_inputs)
            super()._postprocess_batch(samples, batch_encoded_inputs)
            return
        requests, places = [], []
        for b, batch in enumerate(batch_encoded_inputs):
            inputs = batch['teacher_model_inputs']
            labels, ids = inputs['labels'], inputs['input_ids']
            attention = inputs.get('attention_mask')
            for row in range(ids.shape[0]):
                keep = attention[row].bool() if attention is not None else torch.ones_like(ids[row], dtype=torch.bool)
                offset = int(keep.nonzero()[0]) if keep.any() else 0  # left padding
                row_ids, row_labels = ids[row][keep], labels[row][keep]
                positions = (row_labels[1:] != IGNORE_INDEX).nonzero().flatten()
                requests.append((row_ids.tolist(), positions.tolist()))
                places.append((b, row, positions + offset))
        # each sample goes to the teacher whose tags hold its tag (ms-swift's rule); one request per teacher
        from swift.rlhf_trainers.gkd_helpers import route_samples_to_teachers
        routing = route_samples_to_teachers(samples, self.teacher_configs, tag_key=self.args.teacher_tag_key)
        results = [None] * len(requests)
        for t_idx, indices in routing.items():
            if indices:
                answers = self.teacher_clients[t_idx].topk_at([requests[i] for i in indices], topk=self.gkd_logits_topk)
                for i, answer in zip(indices, answers):
                    results[i] = answer
        k = self.gkd_logits_topk
        for batch in batch_encoded_inputs:
            shape = tuple(batch['teacher_model_inputs']['input_ids'].shape) + (k, )
            device = batch['teacher_model_inputs']['input_ids'].device
            batch['gkd_batch'].teacher_topk_logprobs = torch.full(shape, float('-inf'), device=device)
            batch['gkd_batch'].teacher_topk_indices = torch.zeros(shape, dtype=torch.long, device=device)
        for (b, row, positions), result in zip(places, results):
            gkd_batch = batch_encoded_inputs[b]['gkd_batch']
            gkd_batch.teacher_topk_logprobs[row, positions] = result.logprobs.to(device).float()
            gkd_batch.teacher_topk_indices[row, positions] = result.ids.to(device).long()

    # ------------------------------------------------------------------ modes and sampling
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

    def resample_encode_failed_inputs(self, inputs, max_resample_rounds: int = 10, strip_response=True):
        """With several completions per prompt a row that does not encode is replaced in place with the same row on
        every rank and for every copy (its group stays one prompt); with one, ms-swift's per-rank replacement."""
        if self.args.num_generations == 1:
            return super().resample_encode_failed_inputs(inputs, max_resample_rounds, strip_response)
        dataset = self.train_dataset if self.model.training or self.eval_dataset is None else self.eval_dataset
        return resample_failed_groups(self.template, dataset, inputs, seed=self.args.seed,
                                      step=int(self.state.global_step), strip_response=strip_response,
                                      max_tries=max_resample_rounds)

    def _score_completions(self, samples):
        """On an on-policy step with ``--reward_funcs``: rewards, group advantages (over every rank's completions)
        and their metrics. Logs the sampled completions (the teacher's on seq_kd steps) with their rewards."""
        self._advantages = None
        if not self._gkd_mode.needs_generation:
            return samples
        columns = {}
        if self._gkd_mode is Mode.ON_POLICY and self._reward_funcs:
            local = score_completions(samples, self._reward_funcs, self._reward_names, self.accelerator.device,
                                      self.state)
            scale = self.args.scale_rewards or 'group'
            self._advantages, advantages, rewards, per_func = global_advantages(
                local, self._reward_weights, self.args.num_generations, scale, self.accelerator.process_index,
                self.accelerator.num_processes)
            self._log_rewards(rewards, per_func, scale)
            columns = {name: per_func[:, i].tolist() for i, name in enumerate(self._reward_names)}
            columns['advantage'] = advantages.tolist()
        self._log_completions(samples, columns)
        return samples

    def _log_rewards(self, rewards, per_func, scale: str) -> None:
        from swift.rl_core.advantage import compute_reward_metrics
        stats = compute_reward_metrics(rewards, per_func, self._reward_names, self.args.num_generations, scale)
        metrics = self.custom_metrics['train']
        metrics['gkd/reward'].update(stats.reward_mean)
        metrics['gkd/reward_std'].update(stats.reward_std)
        metrics['gkd/frac_reward_zero_std'].update(stats.frac_reward_zero_std)
        for name in stats.per_func_mean:
            metrics[f'gkd/rewards/{name}/mean'].update(stats.per_func_mean[name])
            metrics[f'gkd/rewards/{name}/std'].update(stats.per_func_std[name])

    def _log_completions(self, samples, columns: Dict[str, list]) -> None:
        """ms-swift's completions log (``--log_completions``), plus one column per reward function and the
        advantage on steps that have them (empty on the others)."""
        if not self.log_completions:
            return
        before = len(self._logs['prompt'])
        self._log_student_completions(samples)  # gathers every rank's completions to the main process
        if not self.accelerator.is_main_process:
            return
        added = len(self._logs['prompt']) - before
        for name in set(self._completion_columns) | set(columns):
            past = self._completion_columns.setdefault(name, [None] * before)
            past.extend(columns.get(name, [None] * added))

    def log(self, logs: Dict[str, float], start_time=None) -> None:
        """ms-swift's GKD ``log``; when rewards were logged, the completions table is written here with them."""
        pending = self.accelerator.is_main_process and self.log_completions and len(self._logs['prompt']) > 0
        if self._completion_columns and pending:
            n = len(self._logs['prompt'])
            table = {'step': [str(self.state.global_step)] * n, 'prompt': list(self._logs['prompt']),
                     'completion': list(self._logs['completion'])}
            table.update({name: values[:n] for name, values in self._completion_columns.items()})
            self.jsonl_writer.append(table)
            self._logs['prompt'].clear()
            self._logs['completion'].clear()
            if self.args.report_to and 'wandb' in self.args.report_to:
                import pandas as pd
                import wandb
                if wandb.run is not None:
                    wandb.log({'completions': wandb.Table(dataframe=pd.DataFrame(table))})
        self._completion_columns = {}
        super().log(logs, start_time)

    def _record_mode(self, step: int, mode: Mode) -> None:
        for m in Mode:
            self.custom_metrics['train'][f'gkd/mode_{m.value}'].update(float(m is mode))

    @contextmanager
    def _teacher_view_of_student(self, unwrapped):
        """The student module as the teacher: adapter off or the teacher adapter on when both share the base, else
        the student as it is; always in eval mode, as a separately loaded teacher runs (no dropout)."""
        with eval_mode(unwrapped):
            if self._teacher_adapter is not None:
                view = active_adapter(unwrapped, TEACHER_ADAPTER)
            elif self._teacher_use_disable_adapter:
                view = unwrapped.disable_adapter()
            else:
                view = nullcontext()
            with view:
                yield

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

    def _infer_template(self, template=None):
        template = copy(template or self.template)
        template.padding_free = False
        template.sequence_parallel_size = 1
        template.remove_unused_columns = True
        return template

    def _sampling_engine(self, model, template=None, decode=None):
        """A transformers engine on ``model``; ``decode``: SKD's decoding loop (:class:`SpeculativeEngine`)."""
        template = template or self.template
        if decode is None:
            engine = TransformersEngine(model, template=self._infer_template(template), max_batch_size=0)
        else:
            engine = SpeculativeEngine(model, template=self._infer_template(template), decode=decode)
        suppress_media_placeholders(engine, template)
        return engine

    def _postprocess_rollout_outputs(self, samples, outputs):
        """Every sampler's responses (student or teacher, any engine) as samples, cut before a media placeholder
        that a sampler outside this process may still have drawn."""
        samples = super()._postprocess_rollout_outputs(samples, outputs)
        cut_at_media_placeholders(samples, self.template)
        return samples

    def _student_for_generation(self, stack: ExitStack):
        """The unwrapped student, held by ``stack`` for sampling (ZeRO-3 weights gathered per
        ``--ds3_gather_for_generation``)."""
        return stack.enter_context(
            unwrap_model_for_generation(
                self.model_wrapped, self.accelerator, gather_deepspeed3_params=self.args.ds3_gather_for_generation))

    def _teacher_for_generation(self, stack: ExitStack):
        """The separate teacher, resident (an offloaded one uploaded) and unwrapped, held by ``stack``."""
        stack.enter_context(self.load_teacher_model_context())
        return stack.enter_context(
            unwrap_model_for_generation(
                self.teacher_model, self.accelerator,
                gather_deepspeed3_params=self.teacher_ds3_gather_for_generation is not False))

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

    # ------------------------------------------------------------------ batching and normalisation
    def _encode_samples(self, samples):
        """Encode both views; a teacher view that does not score the student's response tokens names its row."""
        template = self.template
        for sample in samples:
            prepare_teacher_view(sample)
        if self._xtok is not None:  # the teacher reads the samples through its own template, not the student's
            return self._encode_cross_tokenizer(samples)
        with self._template_context(template):
            student_list, teacher_list, has_teacher_view = encode_gkd_samples(samples, template)
        for sample, student, teacher in zip(samples, student_list, teacher_list):
            if not has_teacher_view:
                break
            check_views_aligned(sample, student, teacher)
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
        teacher_template = self._xtok.template
        with self._template_context(teacher_template):
            teacher_list, rows = self._xtok.encode_and_align(samples, student_list)
            teacher_encoded = to_device(teacher_template.data_collator(teacher_list), self.accelerator.device)
        with self._template_context(self.template):
            encoded = to_device(self.template.data_collator(student_list), self.accelerator.device)
        self._xtok_rows.append(rows)
        return encoded, teacher_encoded

    def _prepare_batch_inputs(self, samples):
        """ms-swift's micro-batches, each with its number of rows and, on an on-policy step with rewards, their
        advantages."""
        self._xtok_rows = []  # filled by _encode_samples, one entry per micro-batch
        batches = super()._prepare_batch_inputs(samples)
        if self.template.sequence_parallel_size == 1:
            sizes = [len(chunk) for chunk in self.split_by_mini_batches(samples)]  # the same split as ms-swift's
        else:  # ms-swift splits the samples of the whole sequence-parallel group (no rewards here)
            sizes = [batch['model_inputs']['labels'].shape[0] for batch in batches]
        for batch, rows in zip(batches, sizes):
            batch['gkd_rows'] = rows
        if self._xtok is not None:
            for batch, rows in zip(batches, self._xtok_rows):
                batch['gkd_xtok_rows'] = rows
            self._xtok_rows = []
        if self._advantages is not None:
            for batch, advantages in zip(batches, self._advantages.split(sizes)):
                batch['gkd_advantages'] = advantages
            if self.args.gkd_rl_coef > 0 and self._measure_mismatch:
                self._attach_sampler_logprobs(batches, self.split_by_mini_batches(samples))
        return batches

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

    def _generate_and_score_completions(self, inputs) -> List[Dict[str, Any]]:
        """Attach to every micro-batch the number of response tokens of its whole optimizer step.

        Micro-batches ``[i * GA, (i + 1) * GA)`` of one generation batch form optimizer step ``i``; their counts
        are summed over all micro-batches and all ranks with one all-reduce per generation batch. Each micro-batch
        also gets its own response-token counts (``gkd_tokens``: student view, teacher view), read on the host here
        once for the whole generation batch: they size the loss's tensors without a host sync per micro-batch.
        """
        with eager_sampling():  # a compiled student would be recompiled per sampled length (compile_cost.py)
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

    # ------------------------------------------------------------------ loss
    def _teacher_forward(self, model, teacher_inputs, hidden: bool = False):
        """The teacher's logits, or (``hidden=True``) its last hidden states and output head ``(weight, bias)``.

        The head is taken (detached) before the forward: under ZeRO-3 a head tied to the input embedding is released
        by the embedding's post-forward hook, even inside ``gathered_heads``, and read afterwards it is an empty shard.
        """
        fwd = {k: v for k, v in teacher_inputs.items() if k != 'labels'}
        if self._is_self_distillation:
            unwrapped = self.accelerator.unwrap_model(model)
            head = _detached_head(unwrapped) if hidden else None  # the student's own head, frozen for the teacher
            with torch.no_grad(), self._teacher_view_of_student(unwrapped), disable_gradient_checkpointing(
                    model, self.args.gradient_checkpointing_kwargs), head_bypassed(unwrapped, hidden):
                out = model(**fwd).logits
            return (out, head) if hidden else out
        unwrapped = self.accelerator.unwrap_model(self.teacher_model)
        with torch.no_grad(), self.load_teacher_model_context(), disable_gradient_checkpointing(
                self.teacher_model, self.args.gradient_checkpointing_kwargs):
            # detached inside the block: an offloaded teacher's parameters point back to the CPU copy when it ends
            head = _detached_head(unwrapped) if hidden else None
            with head_bypassed(unwrapped, hidden):
                out = self.teacher_model(**fwd).logits
            if not hidden:
                return out
            weight, bias = head
            return out, (weight.to(out.device), None if bias is None else bias.to(out.device))

    def _loss_setup(self, inputs) -> '_LossSetup':
        """Response positions, the step's normaliser and which label term applies to this micro-batch (and the
        logits trimmed to the response positions where ms-swift can)."""
        model_inputs = inputs['model_inputs']
        teacher_inputs = inputs['teacher_model_inputs']
        mode: Mode = inputs.get('gkd_mode', Mode.OFF_POLICY)

        if self.get_use_logits_to_keep(self.template.sequence_parallel_size == 1):
            # Only the response positions need logits; each side is trimmed by its own labels.
            self.prepare_logits_to_keep(model_inputs)
            if not self.use_teacher_api:
                self.prepare_logits_to_keep(teacher_inputs)

        student_labels = shift_labels(model_inputs['labels'])
        student_mask = student_labels != IGNORE_INDEX
        teacher_mask = shift_labels(teacher_inputs['labels']) != IGNORE_INDEX
        if 'gkd_tokens' in inputs:  # counted with the generation batch (_generate_and_score_completions)
            n_student, n_teacher = inputs['gkd_tokens']
        else:  # a batch that did not come from there: read here (two host syncs)
            n_student, n_teacher = int(student_mask.sum()), int(teacher_mask.sum())
            if self._xtok is None:
                check_same_response_count(n_student, n_teacher)
        step_tokens = inputs.get('gkd_step_tokens', float(n_student))
        # DDP and DeepSpeed average gradients over ranks: scaling by the world size makes the gradient that of
        # (sum over every response token of the step) / (their count).
        world = self.accelerator.num_processes if self.model.training else 1
        normalizer = max(step_tokens, 1.0) / world
        # the SFT term needs dataset responses; a non-positive weight means none, in both loss implementations
        use_sft = mode is not Mode.ON_POLICY and self.args.sft_alpha > 0
        sft_alpha = self.args.sft_alpha if use_sft else 0.0
        # the policy-gradient term: on-policy steps, each sampled token weighted by its completion's advantage
        advantages = inputs.get('gkd_advantages')
        student_index = response_positions(student_mask, n_student)
        token_advantages = None
        sampler_logprobs = None
        if mode is Mode.ON_POLICY and advantages is not None and self.args.gkd_rl_coef > 0:
            token_advantages = _rows(advantages[:, None].expand(student_mask.shape), student_index)
            sampler_logprobs = inputs.get('gkd_sampler_logprobs')
        return _LossSetup(student_mask, teacher_mask, _rows(student_labels, student_index), mode, normalizer,
                          sft_alpha, token_advantages, student_index, response_positions(teacher_mask, n_teacher),
                          sampler_logprobs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """One micro-batch: the teacher's signal, the loss terms (divergence, SFT or policy-gradient term), their
        metrics; fused on hidden states where it applies, else on the full logits."""
        setup = self._loss_setup(inputs)
        fwd = {k: v for k, v in inputs['model_inputs'].items() if k != 'labels'}

        if self._teacher_offloader is not None and not self.use_teacher_api:
            self._teacher_offloader.prefetch()  # the upload overlaps the student's forward
        loss_impl = self._fused_loss if self._fused else self._dense_loss
        loss, outputs = loss_impl(model, fwd, inputs['teacher_model_inputs'], inputs, setup)
        return (loss, outputs) if return_outputs else loss

    # ------------------------------------------------------------------ dense loss
    def _dense_loss(self, model, fwd, teacher_inputs, inputs, setup: '_LossSetup'):
        """The loss on the student's full logits: teacher signal, then the loss terms, then the metrics."""
        outputs = model(**fwd)
        student = setup.student_rows(outputs.logits)
        teacher = self._dense_teacher_signal(model, teacher_inputs, setup, inputs)
        per_token, agreements, n_compared = self._dense_divergence(student, teacher)

        total = per_token.sum()
        if setup.sft_alpha > 0:
            total = total + setup.sft_alpha * F.cross_entropy(student.float(), setup.labels, reduction='sum')
        pg_sum = entropy_sum = None
        if setup.mode is Mode.ON_POLICY:
            rl = setup.token_advantages is not None
            with torch.set_grad_enabled(rl and torch.is_grad_enabled()):  # the entropy alone is only a metric
                # the sampled tokens' log-probabilities at their own (sampling) temperature, the entropy at the loss's
                logprobs, entropy = sampled_token_stats(student, setup.labels, self._sampling_temperature,
                                                        entropy_temperature=self.args.temperature)
            entropy_sum = entropy.detach().sum()
            if rl:
                advantages = setup.token_advantages * self._rollout_weights(setup, logprobs)
                pg = policy_gradient_loss(logprobs, advantages).sum()
                total = total + self.args.gkd_rl_coef * pg
                pg_sum = pg.detach()
        loss = total / setup.normalizer
        if student.shape[0] == 0:
            loss = loss + outputs.logits.sum() * 0.0  # keep the graph connected for DDP/ZeRO
        self._log_loss_metrics(setup.mode, per_token.detach().float().sum(), per_token.numel(), agreements,
                               n_compared, pg_sum=pg_sum, entropy_sum=entropy_sum)
        return loss, outputs

    def _dense_teacher_signal(self, model, teacher_inputs, setup: '_LossSetup', inputs) -> TeacherSignal:
        """The teacher's side of the dense loss: a server's top-k, aligned rows of a teacher with another
        tokenizer, the top-k of a local teacher (``--gkd_logits_topk``) or its full logits."""
        gkd_batch = inputs['gkd_batch']
        if self.use_teacher_api:
            return TeacherTopK(setup.teacher_rows(gkd_batch.teacher_topk_indices),
                               setup.teacher_rows(gkd_batch.teacher_topk_logprobs))
        if self._xtok is not None:  # the teacher reads its own tokenization: aligned positions
            aligned = self._xtok.teacher_rows(setup.student_mask, setup.teacher_mask, inputs['gkd_xtok_rows'])
            return CrossTokenizerRows(self._teacher_forward(model, teacher_inputs), aligned)
        teacher = setup.teacher_rows(self._teacher_forward(model, teacher_inputs))
        if self.gkd_logits_topk is not None:
            return topk_of_logits(teacher, self.gkd_logits_topk)
        return TeacherLogits(teacher)

    def _dense_divergence(self, student: torch.Tensor, teacher: TeacherSignal):
        """Per-token divergence of the student's logits ``[N, V]`` against the teacher's signal, the number of
        compared tokens whose two top-1 tokens agree (a device tensor) and the number of compared tokens."""
        if isinstance(teacher, TeacherTopK):
            return self._topk_divergence(student, teacher.ids, teacher.logprobs)
        if isinstance(teacher, CrossTokenizerRows):
            self._log_alignment_metrics(teacher.rows.exact)
            per_token, agree = self._xtok.loss(student, teacher.logits, teacher.rows, self._divergence,
                                               self.args.temperature)
            return per_token, agree.sum(), agree.numel()
        student_aligned, teacher_aligned = align_vocab(student, teacher.logits)
        per_token = generalized_jsd(student_aligned, teacher_aligned, self._divergence, self.args.temperature)
        agree = student_aligned.argmax(-1) == teacher_aligned.argmax(-1)
        return per_token, agree.sum(), agree.numel()

    # ------------------------------------------------------------------ fused loss
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
                                                       student_vocab))
        t_hidden, (t_weight, t_bias) = self._teacher_forward(model, teacher_inputs, hidden=True)
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
        # samples (advantage-weighted, at the sampling temperature); never both in one step
        label_term = {}
        if setup.sft_alpha > 0:
            label_term = dict(labels=labels, sft_alpha=setup.sft_alpha)
        elif token_advantages is not None:
            if setup.sampler_logprobs is not None:  # the sampled tokens' log-probabilities, detached, for the weights
                policy = head_token_logprobs(student_hidden, weight, bias, labels, self._sampling_temperature)
                token_advantages = token_advantages * self._rollout_weights(setup, policy)
            label_term = dict(labels=labels, sft_alpha=self.args.gkd_rl_coef, label_weights=token_advantages,
                              label_temperature=self._sampling_temperature)
        on_policy = setup.mode is Mode.ON_POLICY
        loss, stats = fused_linear_jsd(
            student_hidden, weight, bias, teacher=teacher_side, **label_term, divergence=self._divergence,
            temperature=self.args.temperature, topk_tail=self.args.gkd_topk_tail, normalizer=normalizer,
            sft_normalizer=normalizer, return_entropy=on_policy)
        n = stats['num_tokens']  # a device tensor: read at logging
        self._log_loss_metrics(setup.mode, stats['divergence_sum'], n, stats['top1_agree'], n,
                               pg_sum=stats['sft_sum'] if token_advantages is not None else None,
                               entropy_sum=stats['entropy_sum'] if on_policy else None)
        return loss

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

    def _topk_divergence(self, student_logits, teacher_ids, teacher_logprobs):
        """Divergence over the teacher's top-k support, both sides renormalised over it (ms-swift's definition)."""
        uncovered = torch.isinf(teacher_logprobs).all(-1)
        teacher_ids = teacher_ids.clamp(min=0, max=student_logits.shape[-1] - 1)
        student_k = student_logits.gather(-1, teacher_ids)
        teacher_k = teacher_logprobs.masked_fill(uncovered[:, None], 0.0)
        per_token = generalized_jsd(student_k, teacher_k, self._divergence, self.args.temperature)
        per_token = per_token.masked_fill(uncovered, 0.0)
        agree = (student_logits.argmax(-1) == teacher_ids.gather(-1, teacher_k.argmax(-1, keepdim=True))[:, 0])
        # counted on the device: a row without teacher information is not compared
        return per_token, (agree & ~uncovered).sum(), (~uncovered).sum()

    def _log_loss_metrics(self, mode: Mode, divergence_sum, n_tokens, agreements, n_compared, *,
                          pg_sum=None, entropy_sum=None) -> None:
        """Per-mode divergence and top-1 agreement of one micro-batch (both loss implementations), accumulated per
        token: a logged value is the mean over every response token since the last log, as the step loss is, not
        a mean of micro-batch means (micro-batches hold different numbers of tokens). Sums and counts may be device
        tensors: they are summed on the device and read once per logging step. ``gkd/distill_loss`` is the
        divergence over every mode; on-policy steps add the student's token entropy on its samples and, with
        rewards, ``gkd/pg_loss`` (the advantage-weighted negative log-likelihood, before ``--gkd_rl_coef``)."""
        metrics = self.custom_metrics['train' if self.model.training else 'eval']
        _add_token_sum(metrics[f'gkd/loss_{mode.value}'], divergence_sum, n_tokens)
        _add_token_sum(metrics['gkd/distill_loss'], divergence_sum, n_tokens)
        _add_token_sum(metrics['gkd/top1_agreement'], agreements, n_compared)
        if pg_sum is not None:
            _add_token_sum(metrics['gkd/pg_loss'], pg_sum, n_tokens)
        if entropy_sum is not None:
            _add_token_sum(metrics['gkd/entropy'], entropy_sum, n_tokens)

    def _log_alignment_metrics(self, exact: torch.Tensor) -> None:
        """Cross-tokenizer runs: the fraction of student response tokens paired exactly and through the fallback
        (token-weighted, like the other metrics)."""
        metrics = self.custom_metrics['train' if self.model.training else 'eval']
        n, n_exact = exact.numel(), exact.sum()
        _add_token_sum(metrics['gkd/xtok_exact_fraction'], n_exact, n)
        _add_token_sum(metrics['gkd/xtok_fallback_fraction'], n - n_exact, n)


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

    def student_rows(self, x: torch.Tensor) -> torch.Tensor:
        """``x[student_mask]`` (``x``: ``[B, S, ...]``) without a host sync."""
        return _rows(x, self.student_index)

    def teacher_rows(self, x: torch.Tensor) -> torch.Tensor:
        """``x[teacher_mask]`` without a host sync."""
        return _rows(x, self.teacher_index)


def _detached_head(model) -> tuple:
    """The model's output head ``(weight, bias)``, detached (as they are now)."""
    weight, bias = output_head(model)
    return weight.detach(), None if bias is None else bias.detach()


def _rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The entries of ``x``'s two leading (batch, position) dimensions at the flat positions ``index``."""
    return x.flatten(0, 1).index_select(0, index)


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
