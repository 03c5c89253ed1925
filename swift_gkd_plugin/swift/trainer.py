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

import json
import os
from contextlib import ExitStack, contextmanager, nullcontext
from copy import copy
from typing import Any, Dict, List

import torch
import torch.nn.functional as F
from swift.infer_engine import TransformersEngine
from swift.infer_engine.protocol import RolloutOutput
from swift.rlhf_trainers.gkd_helpers import encode_gkd_samples
from swift.rlhf_trainers.gkd_loss import DataSource
from swift.rlhf_trainers.gkd_trainer import GKDTrainer
from swift.trainers import disable_gradient_checkpointing
from swift.utils import get_logger, to_device, unwrap_model_for_generation

from swift_gkd_plugin.core import Mode, align_vocab, choose_mode, generalized_jsd
from swift_gkd_plugin.core.fused_loss import fused_linear_jsd
from swift_gkd_plugin.core.modes import mode_draw
from swift_gkd_plugin.core.offload import TeacherOffloader, is_partitioned
from swift_gkd_plugin.core.topk import drop_ids_outside_vocab
from swift_gkd_plugin.swift.hidden_states import (fused_fallback_reason, gathered_heads, head_bypassed, head_is_sharded,
                                                  head_rows, output_head, topk_from_hidden)
from swift_gkd_plugin.swift.lora_round_trip import exact_lora_round_trip
from swift_gkd_plugin.swift.media_tokens import cut_at_media_placeholders, suppress_media_placeholders
from swift_gkd_plugin.swift.peft_utils import TEACHER_ADAPTER, active_adapter, eval_mode, load_frozen_adapter
from swift_gkd_plugin.swift.teacher_server import connect_teacher_servers, infer_prompt_logprobs
from swift_gkd_plugin.swift.views import (check_privileged_columns, check_same_response_count, check_views_aligned,
                                         prepare_teacher_view, with_teacher_prompt)

logger = get_logger()

_DATA_SOURCE = {Mode.ON_POLICY: DataSource.STUDENT, Mode.SEQ_KD: DataSource.TEACHER, Mode.OFF_POLICY: DataSource.DATASET}


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Labels aligned with the logits that predict them (position i predicts token i + 1); -100 = no loss."""
    return F.pad(labels[..., 1:], (0, 1), value=-100)


def count_loss_tokens(labels: torch.Tensor) -> int:
    return int((labels[..., 1:] != -100).sum())


class GKDPluginTrainer(GKDTrainer):
    """ms-swift's GKD trainer with the plugin's modes (seq_kd included), loss, normalisation and metrics."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # compute_loss already divides by the step's token count: the HF Trainer must not divide by the number
        # of gradient-accumulation steps again (nor DeepSpeed, which the Trainer tells via scale_wrt_gas=False).
        self.loss_is_scaled_for_ga = True
        self._gkd_mode = Mode.OFF_POLICY
        self._teacher_engine = None
        self._mode_log = os.path.join(self.args.output_dir, 'gkd_modes', f'rank{self.args.process_index}.jsonl')
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
        self._fused = self._decide_loss_impl()
        suppress_media_placeholders(getattr(self, 'engine', None), self.template)  # the student's own sampler

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
            self.args, self.teacher_configs, self.accelerator, self.gkd_logits_topk)

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
            # assembly, with _infer_teacher_requests above answering them
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
                positions = (row_labels[1:] != -100).nonzero().flatten()
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
    def _rollout_samples(self, inputs):
        """Pick the mode of this generation batch and produce its responses."""
        training = self.model.training
        step = int(self.state.global_step)
        mode = choose_mode(self.args.seed, step, self.args.lmbda, self.args.seq_kd) if training else Mode.OFF_POLICY
        self._gkd_mode = mode
        self._data_source = _DATA_SOURCE[mode]
        if training:
            self._record_mode(step, mode)

        if self.template.truncation_strategy == 'raise':
            inputs = self.resample_encode_failed_inputs(inputs, strip_response=mode.needs_generation)
        samples = self.to_samples(inputs)
        if mode is Mode.ON_POLICY:
            samples = self._generate_completions(samples)
            self._log_student_completions(samples)
        elif mode is Mode.SEQ_KD:
            samples = self._generate_with_teacher(samples)
            self._log_student_completions(samples)  # with --log_completions: the teacher's samples, same table
        return samples

    def _record_mode(self, step: int, mode: Mode) -> None:
        for m in Mode:
            self.custom_metrics['train'][f'gkd/mode_{m.value}'].update(float(m is mode))
        os.makedirs(os.path.dirname(self._mode_log), exist_ok=True)
        with open(self._mode_log, 'a') as f:
            f.write(json.dumps({'step': step, 'mode': mode.value, 'draw': mode_draw(self.args.seed, step)}) + '\n')

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
        bf16): with a shared-base teacher the base is restored exactly afterwards (FSDP2 merges out of place)."""
        shared_base = self._teacher_use_disable_adapter or getattr(self, '_teacher_adapter', None) is not None
        with exact_lora_round_trip([self.model], enabled=shared_base and not getattr(self, '_is_fsdp2', False)):
            return super()._move_model_to_vllm(*args, **kwargs)

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
            results = engine.infer(requests, self._get_request_config(), use_tqdm=False)
        outputs = [r if isinstance(r, RolloutOutput) else RolloutOutput(response=r) for r in results]
        return self._postprocess_rollout_outputs(samples, outputs)

    def _infer_template(self):
        template = copy(self.template)
        template.padding_free = False
        template.sequence_parallel_size = 1
        template.remove_unused_columns = True
        return template

    def _sampling_engine(self, model):
        engine = TransformersEngine(model, template=self._infer_template(), max_batch_size=0)
        suppress_media_placeholders(engine, self.template)
        return engine

    def _postprocess_rollout_outputs(self, samples, outputs):
        """Every sampler's responses (student or teacher, any engine) as samples, cut before a media placeholder
        that a sampler outside this process may still have drawn."""
        samples = super()._postprocess_rollout_outputs(samples, outputs)
        cut_at_media_placeholders(samples, self.template)
        return samples

    @contextmanager
    def _teacher_sampling_context(self):
        # the transformers engine calls eval() on the model it drives: the student module when the base is shared
        with ExitStack() as stack:
            stack.callback(self.model.train, self.model.training)
            if self.teacher_model is None:
                # One copy of the weights: the teacher is the student's base (adapter off or teacher adapter on).
                unwrapped = stack.enter_context(
                    unwrap_model_for_generation(
                        self.model_wrapped, self.accelerator, gather_deepspeed3_params=self.args.ds3_gather_for_generation))
                stack.enter_context(self._teacher_view_of_student(unwrapped))
                engine = self._sampling_engine(unwrapped)
            else:
                stack.enter_context(self.load_teacher_model_context())
                unwrapped = stack.enter_context(
                    unwrap_model_for_generation(
                        self.teacher_model, self.accelerator,
                        gather_deepspeed3_params=self.teacher_ds3_gather_for_generation is not False))
                if self._teacher_engine is None or self._teacher_engine.model is not unwrapped:
                    self._teacher_engine = self._sampling_engine(unwrapped)
                engine = self._teacher_engine
            stack.enter_context(self.template.generate_context())
            yield engine

    # ------------------------------------------------------------------ batching and normalisation
    def _encode_samples(self, samples):
        """Encode both views; a teacher view that does not score the student's response tokens names its row."""
        template = self.template
        for sample in samples:
            prepare_teacher_view(sample)
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

    def _generate_and_score_completions(self, inputs) -> List[Dict[str, Any]]:
        """Attach to every micro-batch the number of response tokens of its whole optimizer step.

        Micro-batches ``[i * GA, (i + 1) * GA)`` of one generation batch form optimizer step ``i``; their counts
        are summed over all micro-batches and all ranks with one all-reduce per generation batch.
        """
        batches = super()._generate_and_score_completions(inputs)
        training = self.model.training
        group = self.args.gradient_accumulation_steps if training else 1
        counts = torch.zeros((len(batches) + group - 1) // group, dtype=torch.float64, device=self.accelerator.device)
        for i, batch in enumerate(batches):
            counts[i // group] += count_loss_tokens(batch['model_inputs']['labels'])
        if training and self.accelerator.num_processes > 1:
            counts = self.accelerator.reduce(counts, reduction='sum')
        for i, batch in enumerate(batches):
            batch['gkd_step_tokens'] = float(counts[i // group])
            batch['gkd_mode'] = self._gkd_mode
        return batches

    # ------------------------------------------------------------------ loss
    def _teacher_forward(self, model, teacher_inputs, hidden: bool = False):
        """The teacher's logits, or (``hidden=True``) its last hidden states and output head ``(weight, bias)``."""
        fwd = {k: v for k, v in teacher_inputs.items() if k != 'labels'}
        if self._is_self_distillation:
            unwrapped = self.accelerator.unwrap_model(model)
            with torch.no_grad(), self._teacher_view_of_student(unwrapped), disable_gradient_checkpointing(
                    model, self.args.gradient_checkpointing_kwargs), head_bypassed(unwrapped, hidden):
                out = model(**fwd).logits
            if not hidden:
                return out
            weight, bias = output_head(unwrapped)  # the student's own head, frozen for the teacher's side
            return out, (weight.detach(), None if bias is None else bias.detach())
        unwrapped = self.accelerator.unwrap_model(self.teacher_model)
        with torch.no_grad(), self.load_teacher_model_context(), disable_gradient_checkpointing(
                self.teacher_model, self.args.gradient_checkpointing_kwargs):
            with head_bypassed(unwrapped, hidden):
                out = self.teacher_model(**fwd).logits
            if not hidden:
                return out
            weight, bias = output_head(unwrapped)
            # detach(): an offloaded teacher's parameters point back to the CPU copy when the block ends
            return out, (weight.detach().to(out.device), None if bias is None else bias.detach().to(out.device))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        model_inputs = inputs['model_inputs']
        teacher_inputs = inputs['teacher_model_inputs']
        gkd_batch = inputs['gkd_batch']
        mode: Mode = inputs.get('gkd_mode', Mode.OFF_POLICY)

        if self.get_use_logits_to_keep(self.template.sequence_parallel_size == 1):
            # Only the response positions need logits; each side is trimmed by its own labels.
            self.prepare_logits_to_keep(model_inputs)
            if not self.use_teacher_api:
                self.prepare_logits_to_keep(teacher_inputs)

        student_labels = shift_labels(model_inputs['labels'])
        student_mask = student_labels != -100
        teacher_mask = shift_labels(teacher_inputs['labels']) != -100
        n_student = int(student_mask.sum())
        check_same_response_count(n_student, int(teacher_mask.sum()))
        step_tokens = inputs.get('gkd_step_tokens', float(n_student))
        # DDP and DeepSpeed average gradients over ranks: scaling by the world size makes the gradient that of
        # (sum over every response token of the step) / (their count).
        world = self.accelerator.num_processes if self.model.training else 1
        normalizer = max(step_tokens, 1.0) / world
        # the SFT term needs dataset responses; a non-positive weight means none, in both loss implementations
        use_sft = mode is not Mode.ON_POLICY and self.args.sft_alpha > 0
        sft_alpha = self.args.sft_alpha if use_sft else 0.0
        fwd = {k: v for k, v in model_inputs.items() if k != 'labels'}

        if self._teacher_offloader is not None and not self.use_teacher_api:
            self._teacher_offloader.prefetch()  # the upload overlaps the student's forward
        if self._fused:
            loss, outputs = self._fused_loss(model, fwd, student_mask, student_labels[student_mask], teacher_inputs,
                                             teacher_mask, gkd_batch, mode, normalizer, sft_alpha)
            return (loss, outputs) if return_outputs else loss

        outputs = model(**fwd)
        student = outputs.logits[student_mask]
        if self.use_teacher_api:
            per_token, agree = self._topk_divergence(student, gkd_batch.teacher_topk_indices[teacher_mask],
                                                     gkd_batch.teacher_topk_logprobs[teacher_mask])
        else:
            teacher = self._teacher_forward(model, teacher_inputs)[teacher_mask]
            if self.gkd_logits_topk is not None:
                logprobs, ids = torch.log_softmax(teacher.float(), -1).topk(self.gkd_logits_topk, dim=-1)
                per_token, agree = self._topk_divergence(student, ids, logprobs)
            else:
                student_aligned, teacher_aligned = align_vocab(student, teacher)
                per_token = generalized_jsd(student_aligned, teacher_aligned, self.args.beta, self.args.temperature)
                agree = (student_aligned.argmax(-1) == teacher_aligned.argmax(-1))

        total = per_token.sum()
        if sft_alpha > 0:
            ce = F.cross_entropy(student.float(), student_labels[student_mask], reduction='sum')
            total = total + sft_alpha * ce
        loss = total / normalizer
        if n_student == 0:
            loss = loss + outputs.logits.sum() * 0.0  # keep the graph connected for DDP/ZeRO
        self._log_loss_metrics(mode, per_token.detach().float().sum(), per_token.numel(), agree.sum(), agree.numel())
        return (loss, outputs) if return_outputs else loss

    # ------------------------------------------------------------------ fused loss
    def _fused_loss(self, model, fwd, student_mask, labels, teacher_inputs, teacher_mask, gkd_batch, mode: Mode,
                    normalizer: float, sft_alpha: float):
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
        loss_args = dict(labels=labels, mode=mode, normalizer=normalizer, sft_alpha=sft_alpha)
        if not head_is_sharded(student):
            with head_bypassed(student):
                outputs = model(**fwd)
            with gathered_heads([teacher]):  # a ZeRO-3 teacher under a replicated student
                teacher_side = self._fused_teacher_side(model, teacher_inputs, teacher_mask, gkd_batch)
                loss = self._fused_apply(student, outputs.logits[student_mask], teacher_side, **loss_args)
            return loss, outputs

        with gathered_heads([student, teacher]):  # reads only: the teacher's top-k or its head
            teacher_side = self._fused_teacher_side(model, teacher_inputs, teacher_mask, gkd_batch)
        with gathered_heads([teacher]):

            def forward_and_loss(**kwargs):
                with head_bypassed(student):
                    outputs = original_forward(**kwargs)
                return self._fused_apply(student, outputs.logits[student_mask], teacher_side, **loss_args), outputs

            original_forward = student.forward
            patched = student.__dict__.get('forward')  # e.g. accelerate's autocast wrapper
            student.forward = forward_and_loss  # an instance attribute: nn.Module.__call__ dispatches to it
            try:
                loss, outputs = model(**fwd)
            finally:
                if patched is None:
                    del student.forward
                else:
                    student.forward = patched
        return loss, outputs

    def _fused_teacher_side(self, model, teacher_inputs, teacher_mask, gkd_batch) -> Dict[str, Any]:
        """The teacher's part of the fused loss's arguments: top-k ids and log-probs, or hidden states and head.

        A shared-base teacher's head is the student's own head, left out here (``teacher_head='student'``) and
        read at the loss, where ZeRO-3 keeps it gathered.
        """
        student_vocab = head_rows(self.accelerator.unwrap_model(model))
        if self.use_teacher_api:
            # the teacher's padded output rows: no such token for the student
            ids, logprobs = drop_ids_outside_vocab(gkd_batch.teacher_topk_indices[teacher_mask],
                                                   gkd_batch.teacher_topk_logprobs[teacher_mask].float(), student_vocab)
            return dict(teacher_topk_ids=ids, teacher_topk_logprobs=logprobs)
        t_hidden, (t_weight, t_bias) = self._teacher_forward(model, teacher_inputs, hidden=True)
        t_hidden = t_hidden[teacher_mask]
        if self.gkd_logits_topk is not None:
            ids, logprobs = topk_from_hidden(t_hidden, t_weight, t_bias, self.gkd_logits_topk, student_vocab)
            return dict(teacher_topk_ids=ids, teacher_topk_logprobs=logprobs)
        if self._is_self_distillation:
            return dict(teacher_hidden=t_hidden, teacher_head='student')
        return dict(teacher_hidden=t_hidden, teacher_weight=t_weight, teacher_bias=t_bias)

    def _fused_apply(self, student, student_hidden, teacher_side, *, labels, mode: Mode, normalizer: float,
                     sft_alpha: float) -> torch.Tensor:
        weight, bias = output_head(student)
        teacher_side = dict(teacher_side)
        if teacher_side.pop('teacher_head', None) == 'student':  # frozen for the teacher's side
            teacher_side.update(teacher_weight=weight.detach(), teacher_bias=None if bias is None else bias.detach())
        loss, stats = fused_linear_jsd(
            student_hidden, weight, bias, **teacher_side, labels=labels if sft_alpha > 0 else None,
            beta=self.args.beta, temperature=self.args.temperature, sft_alpha=sft_alpha,
            topk_tail=self.args.gkd_topk_tail, normalizer=normalizer, sft_normalizer=normalizer)
        n = int(stats['num_tokens'])
        self._log_loss_metrics(mode, stats['divergence_sum'], n, stats['top1_agree'], n)
        return loss

    def _topk_divergence(self, student_logits, teacher_ids, teacher_logprobs):
        """Divergence over the teacher's top-k support, both sides renormalised over it (ms-swift's definition)."""
        uncovered = torch.isinf(teacher_logprobs).all(-1)
        teacher_ids = teacher_ids.clamp(min=0, max=student_logits.shape[-1] - 1)
        student_k = student_logits.gather(-1, teacher_ids)
        teacher_k = teacher_logprobs.masked_fill(uncovered[:, None], 0.0)
        per_token = generalized_jsd(student_k, teacher_k, self.args.beta, self.args.temperature)
        per_token = per_token.masked_fill(uncovered, 0.0)
        agree = (student_logits.argmax(-1) == teacher_ids.gather(-1, teacher_k.argmax(-1, keepdim=True))[:, 0])
        return per_token, agree[~uncovered]

    def _log_loss_metrics(self, mode: Mode, divergence_sum, n_tokens: int, agreements, n_compared: int) -> None:
        """Per-mode divergence and top-1 agreement of one micro-batch (both loss implementations), accumulated per
        token: a logged value is the mean over every response token since the last log, as the step loss is, not
        a mean of micro-batch means (micro-batches hold different numbers of tokens)."""
        split = 'train' if self.model.training else 'eval'
        _add_token_sum(self.custom_metrics[split][f'gkd/loss_{mode.value}'], divergence_sum, n_tokens)
        _add_token_sum(self.custom_metrics[split]['gkd/top1_agreement'], agreements, n_compared)


def _add_token_sum(metric, total, n_tokens: int) -> None:
    """Add ``n_tokens`` values summing to ``total`` to an ms-swift ``MeanMetric``.

    ``MeanMetric.update`` counts a 1-D tensor's entries and adds their sum: ``n_tokens`` entries equal to their mean
    (in float64, so that they sum back to ``total``) weigh the micro-batch by its number of tokens.
    """
    if n_tokens:
        metric.update(torch.full((n_tokens, ), float(total) / n_tokens, dtype=torch.float64))
