"""The samplers: transformers engines (SKD's decoding loop included) on the student or the teacher, their request
configs (vLLM's per-request seeds, ``--top_k -1`` as every token), the sampling streams, the sampler's
log-probabilities the RL term's correction needs, and the exact LoRA syncs to vLLM."""
from __future__ import annotations

import os
from contextlib import ExitStack, contextmanager
from copy import copy

import torch
from swift.utils import get_logger, unwrap_model_for_generation

from swift_gkd_plugin.core.weights.lora_round_trip import (HostBuffer, adapter_tensors_copied, exact_lora_sync,
                                                           lora_merges_skipped)
from swift_gkd_plugin.core.modes import Mode, sampling_seed
from swift_gkd_plugin.options.flags import rollout_max_tokens, sampling_temperature
from swift_gkd_plugin.swift.step.hidden_states import head_rows
from swift_gkd_plugin.swift.rollout.rollout_server import watch_rollout_client
from swift_gkd_plugin.swift.rollout.media_tokens import suppress_media_placeholders
from swift_gkd_plugin.swift.rollout.correction import SamplerLogprobsEngine
from swift_gkd_plugin.swift.rollout.speculative import SpeculativeEngine
from swift_gkd_plugin.swift.rollout.stop_token import TransformersSampler
from swift_gkd_plugin.rollout.colocated_vllm import weight_sync_context

logger = get_logger()


class Samplers:
    """The engines and settings that draw a generation batch's samples.

    Built by the trainer before ms-swift's constructor (which asks for a request config) with ``trainer``: the ms-swift
    trainer whose public state it reads (``args``, ``accelerator``, ``model``, ``model_wrapped``, ``template``,
    ``state``, ``vllm_tensor_parallel_size``) and whose sampler settings it sets (``engine``, ``request_config``);
    the rollout asks it for engines, the unwrapped student, each step's sampling stream and request configs."""

    def __init__(self, trainer) -> None:
        self.trainer = trainer
        self.measure_mismatch = False  # the sampler's log-probabilities are asked for (request_sampler_logprobs)

    @property
    def temperature(self) -> float:
        """The temperature of on-policy and seq_kd sampling (``--gkd_sampling_temperature``, else ``--temperature``),
        which the policy-gradient terms also read their samples at."""
        return sampling_temperature(self.trainer.args)

    def engine(self, model, template=None, decode=None):
        """A transformers engine on ``model`` that keeps each answer's stop token (:mod:`.stop_token`); ``decode``:
        SKD's decoding loop (:class:`SpeculativeEngine`)."""
        template = template or self.trainer.template
        if decode is None:
            engine = TransformersSampler(model, template=self.infer_template(template), max_batch_size=0)
        else:
            engine = SpeculativeEngine(model, template=self.infer_template(template), decode=decode)
        suppress_media_placeholders(engine, template)
        return engine

    def infer_template(self, template=None):
        template = copy(template or self.trainer.template)
        template.padding_free = False
        template.sequence_parallel_size = 1
        template.remove_unused_columns = True
        return template

    def student(self, stack: ExitStack):
        """The unwrapped student, held by ``stack`` for sampling (ZeRO-3 weights gathered per
        ``--ds3_gather_for_generation``)."""
        trainer = self.trainer
        return stack.enter_context(
            unwrap_model_for_generation(
                trainer.model_wrapped, trainer.accelerator,
                gather_deepspeed3_params=trainer.args.ds3_gather_for_generation))

    @contextmanager
    def rng(self, step: int):
        """Every rank samples from its own stream seeded by (seed, step, rank) with several completions per prompt
        (the copies of a prompt on different ranks must not draw the same completion) and under vLLM colocate with
        one rank per engine (the engine, in this process, draws from the device's default generator: requests without
        a seed of their own keep vLLM's batched sampler, and a resumed run draws what the uninterrupted run drew).
        Otherwise the trainer's common stream (ms-swift's behaviour; a checkpoint restores it)."""
        args = self.trainer.args
        if args.num_generations == 1 and not self.vllm_draws_from_this_process():
            yield
            return
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(sampling_seed(args.seed, step, args.process_index))
            yield

    def vllm_draws_from_this_process(self) -> bool:
        """vLLM colocate with one rank per engine: its unseeded requests draw from this process's generator."""
        args = self.trainer.args
        return bool(args.use_vllm) and args.vllm_mode == 'colocate' and self.vllm_tp_size() == 1

    def vllm_tp_size(self) -> int:
        return int(getattr(self.trainer, 'vllm_tensor_parallel_size', 1) or 1)

    def request_config(self, config, logprobs: bool, mode, step, turn: int):
        """ms-swift's request ``config``, with vLLM's per-request seeds derived from (seed, step, rank) in colocate
        mode (see :func:`seeded_request_config`) and, on on-policy steps (``mode``), ``--gkd_rollout_max_tokens`` as its
        token budget; ``logprobs=False`` for samplers whose log-probabilities are unused (the teacher's, SKD's).
        ``step``: a prefetched step's (``--async_generate``), else None (this one); ``turn``: a multi-turn rollout's
        later turn."""
        trainer = self.trainer
        args = trainer.args
        if not logprobs and config.logprobs:
            config = copy(config)
            config.logprobs = False
        budget = rollout_max_tokens(args)  # early-stopped rollouts: the student's on-policy samples only
        if mode is Mode.ON_POLICY and config.max_tokens and budget < config.max_tokens:
            config = copy(config)
            config.max_tokens = budget
        if not args.use_vllm:  # (ms-swift keeps the flag on args alone)
            return untruncated_top_k(config, trainer.accelerator.unwrap_model(trainer.model))
        if not trainer.model.training:
            return config
        return seeded_request_config(config, seed=args.seed,
                                     step=int(trainer.state.global_step) if step is None else step,
                                     process_index=trainer.accelerator.process_index,
                                     tensor_parallel_size=self.vllm_tp_size(), vllm_mode=args.vllm_mode,
                                     turn=turn, copies=args.num_generations)

    def request_sampler_logprobs(self) -> None:
        """The RL term's sampler/policy mismatch correction (``--rollout_importance_sampling_mode``) and its metrics
        (also alone: ``--log_rollout_offpolicy_metrics``, as in GRPO) need the sampler's per-token log-probabilities:
        vLLM reports them anyway (ms-swift asks for its processed ones); the transformers engine is asked only then
        (it keeps every decoding step's scores meanwhile)."""
        trainer = self.trainer
        args = trainer.args
        mode, threshold = args.rollout_importance_sampling_mode, args.rollout_importance_sampling_threshold
        # (vLLM before 0.10.2 reports raw log-probabilities: refused by swift.arguments.check_vllm_logprobs)
        self.measure_mismatch = mode is not None or args.log_rollout_offpolicy_metrics
        if self.measure_mismatch and not args.use_vllm:
            trainer.request_config.logprobs = True
            trainer.engine = SamplerLogprobsEngine(trainer.model, template=self.infer_template(trainer.template),
                                                   max_batch_size=0)
        if mode is None:
            logged = ('the mismatch (gkd/rollout_*) is logged' if self.measure_mismatch else
                      '--log_rollout_offpolicy_metrics true logs the mismatch')
            logger.info('swift_gkd_plugin: no sampler/policy mismatch correction of the policy-gradient term '
                        f'(--rollout_importance_sampling_mode unset); {logged}')
        else:
            logger.info(f'swift_gkd_plugin: the policy-gradient term is weighted by {mode} importance weights '
                        f'min(pi / mu, {threshold:g}) of the sampler\'s log-probabilities '
                        f'({"vLLM" if args.use_vllm else "transformers engine"})')


class WeightSyncMixin:
    """ms-swift's weight syncs to vLLM, exact for a LoRA student."""

    def _move_model_to_vllm(self, *args, **kwargs):
        """ms-swift's sync merges the LoRA adapter into the base in place and unmerges it (``W + d - d != W`` in
        bf16) and casts the adapters to the base's dtype. Here the merge is out of place: each base weight is replaced
        by its merged value as it is sent (:meth:`_load_state_dict_to_vllm`), the base is never written and the
        adapters get their own tensors back (:func:`~swift_gkd_plugin.core.weights.lora_round_trip.exact_lora_sync`);
        layers whose merge is more than an addition (DoRA, ...) merge in place, their base held on the host meanwhile.
        FSDP2 is left to ms-swift (it merges out of place itself)."""
        if getattr(self, '_sync_buffer', None) is None:
            self._sync_buffer = HostBuffer()
        if self.vllm_mode == 'server':  # its failures named, a failed load in the server's workers refused
            watch_rollout_client(getattr(self, 'vllm_client', None))
        with exact_lora_sync([self.model], self._sync_buffer, enabled=not getattr(self, '_is_fsdp2', False),
                             out_of_place=True) as self._lora_sync:
            try:
                result = super()._move_model_to_vllm(*args, **kwargs)
                sync = self._lora_sync
            finally:
                self._lora_sync = None
        if sync is not None and sync.merged_out_of_place and not getattr(self, '_logged_lora_sync', False):
            self._logged_lora_sync = True
            logger.info(f'swift_gkd_plugin: LoRA weight sync: {sync.merged_out_of_place} base weights sent merged '
                        'out of place (the base is never written, nothing is copied to the host)')
        return result

    def _collect_state_dict_for_vllm(self, *args, **kwargs):
        """ms-swift's state dict of one parameter group; where it does not carry a layer's base weight as it is
        (a model whose names or layouts it converts), that group's layers are merged in place after all."""
        state_dict = super()._collect_state_dict_for_vllm(*args, **kwargs)
        sync = getattr(self, '_lora_sync', None)
        unsent = sync.unsent(state_dict.values()) if sync is not None else []
        if unsent:
            logger.warning_once(f'swift_gkd_plugin: ms-swift converts {len(unsent)} LoRA base weight(s) on their way '
                                'to vLLM; those layers are merged in place, their base held on the host meanwhile')
            sync.merge_pending_in_place()
            state_dict = super()._collect_state_dict_for_vllm(*args, **kwargs)
        return state_dict

    def _load_state_dict_to_vllm(self, state_dict):
        """ms-swift's load, in parts, each LoRA base weight replaced by its merged value (out of place): the merged
        temporaries of one part (``SWIFT_UPDATE_WEIGHTS_BUCKET_SIZE`` MB, ms-swift's bucket size, 512 by default)
        live at a time."""
        sync = getattr(self, '_lora_sync', None)
        if sync is None or not sync.pending:
            return super()._load_state_dict_to_vllm(state_dict)
        max_bytes = int(os.environ.get('SWIFT_UPDATE_WEIGHTS_BUCKET_SIZE', 512)) << 20
        for chunk in sync.merged_chunks(state_dict, max_bytes):
            super()._load_state_dict_to_vllm(chunk)
            del chunk  # freed before the next part is merged

    def _move_full_model_to_vllm(self, *args, **kwargs):
        """ms-swift's sync of the (merged) student, through vLLM's in-place reload where vLLM repacked its weights
        (its CPU build: see :mod:`swift_gkd_plugin.rollout.colocated_vllm`)."""
        if self.vllm_mode != 'colocate':
            return super()._move_full_model_to_vllm(*args, **kwargs)
        with weight_sync_context(self):
            return super()._move_full_model_to_vllm(*args, **kwargs)

    def _move_adapter_to_vllm(self, *args, **kwargs):
        """The adapter-only sync sends the adapter's own weights: ms-swift's merge and unmerge around it only move
        the base (and cast the adapters), so they are skipped; a colocated vLLM gets copies of them (it scales what
        it is given in place: :func:`~swift_gkd_plugin.core.weights.lora_round_trip.adapter_tensors_copied`)."""
        with ExitStack() as stack:
            stack.enter_context(lora_merges_skipped([self.model]))
            if self.vllm_mode == 'colocate':
                stack.enter_context(adapter_tensors_copied(self.engine.engine))
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
                          vllm_mode: str, turn: int = 0, copies: int = 1):
    """``config`` with vLLM per-request seeds that make a colocated engine split over ``tensor_parallel_size`` > 1
    ranks sample as a function of (``--seed``, step, TP group, turn); ``config`` itself otherwise.

    With TP > 1 the ranks of a group run one engine and must draw the same tokens, while their default generators
    differ: ms-swift seeds the requests then (request ``i`` of one call gets ``config.seed + i``), from ``B * (rank //
    tp)``: the same at every step and for every ``--seed``, and with more requests than ``B`` per rank
    (``steps_per_generation`` > GA) overlapping the next group's range. Here the base is a 62-bit hash of (seed, step,
    TP group) (:func:`~swift_gkd_plugin.core.modes.sampling_seed`): other groups and steps get unrelated ranges; a
    resumed run draws what the uninterrupted run drew.

    With one rank per engine no request is seeded: per-request generators put vLLM on a per-request sampling loop and
    off its fused top-k/top-p sampler; the engine draws from the process's default generator instead, which the
    trainer seeds per (seed, step, rank) around each rollout (:meth:`Samplers.rng`).

    Server mode (rank 0 sends every rank's requests) with one completion per prompt: seeded from (seed, step, turn),
    so a resumed run and ``--async_generate`` draw what the synchronous, uninterrupted run drew. With several
    completions per prompt it is left to ms-swift (each rollout worker seeds itself at random): the client splits the
    requests between servers and each server between its data-parallel workers, which number their share from the
    same ``config.seed``, so one seed would give copies of a prompt on different workers the same draws.

    ``turn``: the turn of a multi-turn rollout (0: the first). Each later turn gets a range of its own: with one seed
    for every turn, request ``i`` would draw from the same random stream at every turn of its trajectory.
    """
    stream = 'sampling' if not turn else f'sampling-turn{int(turn)}'
    if vllm_mode == 'server' and copies == 1:
        config = copy(config)
        config.seed = sampling_seed(seed, step, 0, f'server-{stream}') >> 1
        return config
    if vllm_mode != 'colocate' or int(tensor_parallel_size) <= 1:
        return config
    config = copy(config)
    config.seed = sampling_seed(seed, step, process_index // int(tensor_parallel_size), stream) >> 1
    return config
