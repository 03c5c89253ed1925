"""The teacher side: where the teacher lives (separate model, offloaded or not; the student's base with its
adapter off or the teacher adapter on; a server), its forward for the loss, and a served teacher's top-k."""
from __future__ import annotations

from contextlib import ExitStack, contextmanager, nullcontext
from typing import List

import torch
from swift.trainers import disable_gradient_checkpointing
from swift.utils import get_logger, unwrap_model_for_generation

from swift_gkd_plugin.core.constants import IGNORE_INDEX
from swift_gkd_plugin.core.policy_gradient import token_logprobs
from swift_gkd_plugin.core.topk import topk_of_logits
from swift_gkd_plugin.core.weights.inference_tensors import reclaim_after_inference_sampling
from swift_gkd_plugin.core.views import check_privileged_columns
from swift_gkd_plugin.core.weights.offload import TeacherOffloader, is_partitioned
from swift_gkd_plugin.options.flags import local_teacher_index
from swift_gkd_plugin.server.client import TopKResult
from swift_gkd_plugin.swift.sequence_parallel import gather_shares, group_rank, group_size, share, whole_sequences
from swift_gkd_plugin.swift.setup.teacher_server import teacher_configs, teacher_names
from swift_gkd_plugin.swift.step.hidden_states import (gathered_heads, head_bypassed, head_rows, output_head,
                                                      topk_from_hidden)
from swift_gkd_plugin.swift.step.token_metrics import add_token_sum as _add_token_sum
from swift_gkd_plugin.swift.teacher.adapters import TEACHER_ADAPTER, active_adapter, eval_mode, load_frozen_adapter
from swift_gkd_plugin.swift.teacher.cross_tokenizer import CrossTokenizerTeacher
from swift_gkd_plugin.swift.teacher.served import (attach_trainer_token_ids, connect_teacher_servers, fit_answer,
                                                   infer_prompt_logprobs, short_answer_warning)

logger = get_logger()


class TeacherModel:
    """The teacher's weights as the loss, the samplers and the local scorer use them: where they live (a separate
    model, offloaded or not; the student's base with its adapter off or the teacher adapter on), their views, their
    forward and their name in an error message.

    Built by the trainer once ms-swift has built both models, with ``trainer``: the ms-swift trainer whose public state
    it reads (``args``, ``accelerator``, ``model``, ``model_wrapped``, ``teacher_model``, ``template``, the datasets,
    ``use_teacher_api``, ms-swift's ``_teacher_use_disable_adapter`` and ``_is_self_distillation``, its
    ``load_teacher_model_context``). Construction places the teacher: privileged columns checked, a frozen teacher
    adapter on the shared base (:attr:`adapter`), our offload of a whole replicated teacher (:attr:`offloader`), the
    placement logged, a teacher of another tokenizer's alignment (:attr:`xtok`)."""

    def __init__(self, trainer):
        self.trainer = trainer
        args = trainer.args
        check_privileged_columns(trainer.train_dataset)
        check_privileged_columns(trainer.eval_dataset)
        self.adapter = None
        if args.teacher_adapters and trainer.teacher_model is None and not trainer.use_teacher_api:
            # one copy of the base: the teacher is the student's base with the frozen teacher adapter active
            self.adapter = args.teacher_adapters[0]
            load_frozen_adapter(trainer.model, self.adapter)
        self.offloader = None
        self.partitioned = trainer.teacher_model is not None and is_partitioned(trainer.teacher_model)
        if args.offload_teacher_model and trainer.teacher_model is not None and not self.partitioned:
            # Partitioned (ZeRO-3, FSDP) teachers keep ms-swift's offload of their shards, which its
            # load_teacher_model_context brings back; whole replicated teachers use ours.
            self.offloader = TeacherOffloader(
                trainer.accelerator.unwrap_model(trainer.teacher_model), trainer.accelerator.device)
        self._log_placement()
        self.xtok = None  # --gkd_cross_tokenizer: the teacher's template, vocabulary mapping and alignment
        if args.gkd_cross_tokenizer and trainer.teacher_model is not None:
            teacher = trainer.accelerator.unwrap_model(trainer.teacher_model)
            self.xtok = CrossTokenizerTeacher(args.gkd_cross_tokenizer, teacher.model_dir,
                                              teacher.model_meta.model_type, trainer.template, args.teacher_template)

    def _log_placement(self) -> None:
        trainer = self.trainer
        if trainer._local_teacher is not None and trainer.teacher_model_server is not None:
            tags = trainer.teacher_configs[trainer._local_teacher].tags
            logger.info(f'Teacher models: served at {trainer.teacher_model_server}; the rows tagged {tags} '
                        f'(--teacher_tag_key {trainer.args.teacher_tag_key}) are scored by the local teacher:')
        if self.adapter is not None:
            logger.info(f'Teacher model: the student base with the frozen adapter {self.adapter} (one copy '
                        'of the base weights)')
        elif trainer._teacher_use_disable_adapter:
            logger.info('Using shared base model architecture:\n'
                        '  - Student model: base_model + LoRA (trainable)\n'
                        '  - Teacher model: base_model with LoRA disabled (frozen)')
        elif trainer.teacher_model is not None:
            where = 'resident'
            if trainer.args.offload_teacher_model:
                where = ('its partitions offloaded to CPU between uses by ms-swift' if self.partitioned else
                         'offloaded to CPU between uses')
            logger.info(f'Teacher model: a separate frozen model ({where})')
        elif trainer.use_teacher_api and trainer.teacher_model_server is not None:
            logger.info(f'Teacher model: served at {trainer.teacher_model_server}')
        elif trainer.use_teacher_api and trainer._local_teacher is None:
            logger.info(f'Teacher model: none loaded; the teacher\'s scores come from --teacher_scores '
                        f'{trainer.args.teacher_scores}')
        else:
            logger.info('Teacher model: the student itself (no --teacher_model), frozen for the teacher forward')

    def is_the_student(self) -> bool:
        """The teacher is the student itself (no --teacher_model, no adapter switched): its samples are the
        student's."""
        trainer = self.trainer
        return trainer.teacher_model is None and not trainer._teacher_use_disable_adapter and self.adapter is None

    def name(self) -> str:
        """The teacher in an error message: its flag and value, or what it is."""
        trainer = self.trainer
        if self.adapter is not None:
            return f'the teacher (--teacher_adapters {self.adapter} on the student\'s base)'
        if trainer._teacher_use_disable_adapter:
            return 'the teacher (the student\'s base with its LoRA adapter off)'
        if trainer.teacher_model is not None:
            path = getattr(trainer.accelerator.unwrap_model(trainer.teacher_model), 'model_dir', '?')
            return f'the teacher (--teacher_model {path})'
        if trainer.use_teacher_api:
            return f'the teacher (--teacher_model_server {trainer.teacher_model_server})'
        return 'the teacher (the student itself)'

    def student_name(self) -> str:
        trainer = self.trainer
        return f'the student (--model {getattr(trainer.accelerator.unwrap_model(trainer.model), "model_dir", "?")})'

    @contextmanager
    def view_of_student(self, unwrapped):
        """The student module as the teacher: adapter off or the teacher adapter on when both share the base, else
        the student as it is; always in eval mode, as a separately loaded teacher runs (no dropout). Where ZeRO-3
        gathered the weights layer by layer as the view sampled, they are made trainable again before the adapter's
        parameters are set to require gradients (:func:`reclaim_after_inference_sampling`)."""
        with eval_mode(unwrapped):
            if self.adapter is not None:
                view = active_adapter(unwrapped, TEACHER_ADAPTER)
            elif self.trainer._teacher_use_disable_adapter:
                view = unwrapped.disable_adapter()
            else:
                view = nullcontext()
            with view:
                try:
                    yield
                finally:
                    if not self.trainer.args.ds3_gather_for_generation:
                        reclaim_after_inference_sampling(self.trainer.model_wrapped)

    def for_generation(self, stack: ExitStack):
        """The separate teacher, resident (an offloaded one uploaded) and unwrapped, held by ``stack``."""
        trainer = self.trainer
        stack.enter_context(trainer.load_teacher_model_context())
        return stack.enter_context(
            unwrap_model_for_generation(
                trainer.teacher_model, trainer.accelerator,
                gather_deepspeed3_params=trainer.teacher_ds3_gather_for_generation is not False))

    def forward(self, model, teacher_inputs, hidden: bool = False):
        """The teacher's logits, or (``hidden=True``) its last hidden states and output head ``(weight, bias)``.

        The head is taken (detached) before the forward: under ZeRO-3 a head tied to the input embedding is released
        by the embedding's post-forward hook, even inside ``gathered_heads``, and read afterwards it is an empty shard.
        """
        trainer = self.trainer
        fwd = {k: v for k, v in teacher_inputs.items() if k != 'labels'}
        if trainer._is_self_distillation:
            unwrapped = trainer.accelerator.unwrap_model(model)
            head = _detached_head(unwrapped) if hidden else None  # the student's own head, frozen for the teacher
            # DDP's forward broadcasts the buffers, a collective: a rank whose rows the store (or another teacher)
            # answered skips this forward, and the others would wait for it forever; no gradient flows here
            forward = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
            with torch.no_grad(), self.view_of_student(unwrapped), disable_gradient_checkpointing(
                    model, trainer.args.gradient_checkpointing_kwargs), head_bypassed(unwrapped, hidden):
                out = forward(**fwd).logits
            return (out, head) if hidden else out
        unwrapped = trainer.accelerator.unwrap_model(trainer.teacher_model)
        with torch.no_grad(), trainer.load_teacher_model_context(), disable_gradient_checkpointing(
                trainer.teacher_model, trainer.args.gradient_checkpointing_kwargs):
            # detached inside the block: an offloaded teacher's parameters point back to the CPU copy when it ends
            head = _detached_head(unwrapped) if hidden else None
            with head_bypassed(unwrapped, hidden):
                out = trainer.teacher_model(**fwd).logits
            if not hidden:
                return out
            weight, bias = head
            return out, (weight.to(out.device), None if bias is None else bias.to(out.device))


class TeacherMixin:
    """ms-swift's teacher hooks: a served teacher's set-up and requests, the teacher's top-k placed on the batch (a
    served teacher's, the store's or the local teacher's, through :class:`TeacherModel`)."""

    @contextmanager
    def load_teacher_model_context(self):
        offloader = self.teacher.offloader
        if offloader is not None and offloader.enabled:
            with offloader.resident():
                yield
        else:
            with super().load_teacher_model_context():
                yield

    def _setup_teacher(self) -> None:
        """A served teacher is reached through the plugin's client (no vLLM needed), from every rank. A
        ``"url": "local"`` entry among the servers binds the local teacher (set up by ms-swift as without servers)
        to the rows of its tags (:meth:`_score_locally`)."""
        server = getattr(self, 'teacher_model_server', None)
        self.teacher_model_server = None  # keep ms-swift from building its vLLM client
        super()._setup_teacher()
        self.teacher_model_server = server
        self._local_teacher = None
        if server is None:
            if self.args.teacher_scores or self.args.save_teacher_scores:
                self._answer_through_store()
            return
        self.teacher_configs = teacher_configs(server)
        self._local_teacher = local_teacher_index([cfg.url for cfg in self.teacher_configs])
        self.use_teacher_api = True  # every row's teacher signal is a top-k, served or made locally alike
        # the local teacher's forward runs on the student's module only when it is the student's base
        self._is_self_distillation = self._is_self_distillation and self._local_teacher is not None
        served = [cfg for i, cfg in enumerate(self.teacher_configs) if i != self._local_teacher]
        clients, self._teacher_topk_route = connect_teacher_servers(
            self.args, served, self.accelerator, self.gkd_logits_topk, self.template.tokenizer,
            local=self._local_teacher is not None)
        if self._local_teacher is not None:
            clients.insert(self._local_teacher, None)
        self.teacher_clients = clients
        # (a served teacher without each token's log-prob, ms-swift's /infer/, is refused with the flags: before loading)

    def _answer_through_store(self) -> None:
        """A teacher-score store without a teacher server: every row's teacher signal is a top-k answer, from the
        store or from the local teacher (the routed local entry's path, one teacher for every row); without a
        local teacher (none given, or not loaded since the store covers every row) the store answers alone."""
        from swift.rlhf_trainers.gkd_helpers import TeacherServerConfig
        args = self.args
        local = (self.teacher_model is not None or self._teacher_use_disable_adapter or bool(args.teacher_adapters)
                 or args.gkd_score_only)
        self.use_teacher_api = True
        self._teacher_topk_route = True
        self.teacher_configs = [TeacherServerConfig(url='local', tags=[])] if local else []
        self._local_teacher = 0 if local else None
        self.teacher_clients = [None] if local else []
        self._is_self_distillation = local and self.teacher_model is None

    def _infer_teacher_requests(self, handle, topk, teacher_client=None):
        """ms-swift's /infer/ call (main process) through the plugin's client: no vLLM, waits and logged retries."""
        if not handle['all_requests']:
            return []
        return infer_prompt_logprobs(teacher_client or self.teacher_clients[0], handle['all_requests'], topk)

    def _gather_teacher_requests(self, requests):
        """ms-swift's gather of one teacher's requests to the main process (its ``/infer/`` route). The ranks of a
        sequence-parallel group hold the same rows: the group's first rank sends them, once, and every rank of the
        group reads the answers to them (the handle's counts point each rank at its group's)."""
        if group_size() == 1:
            return super()._gather_teacher_requests(requests)
        first = self.accelerator.process_index - group_rank()
        handle = super()._gather_teacher_requests([] if group_rank() else requests)
        handle['all_counts'] = handle['all_counts'][:first] + [0] * (len(handle['all_counts']) - first)
        handle['n_local'] = len(requests)
        return handle

    def _postprocess_batch(self, samples, batch_encoded_inputs) -> None:
        """One request per generation batch: the teacher's top-k at every response position of every row."""
        if not self.use_teacher_api:
            return
        if not self._teacher_topk_route:  # (True: /v1/topk or /v1/completions on the trainer's token ids)
            # a server with only ms-swift's routes: ms-swift's requests, routing, gather to the main process and
            # assembly, with _infer_teacher_requests above answering them (and checking the server's tokenization)
            attach_trainer_token_ids(batch_encoded_inputs)
            super()._postprocess_batch(samples, batch_encoded_inputs)
            return
        self.teacher_ahead.resolve()  # --async_generate: the producer's answers to this batch (teacher/ahead.py)
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
        routing = (route_samples_to_teachers(samples, self.teacher_configs, tag_key=self.args.teacher_tag_key)
                   if self.teacher_configs else {})  # (none: --teacher_scores alone)
        targets = self.args.gkd_sampled_kl_coef > 0  # the sampled-token term: each scored token's log-prob too
        names = teacher_names(self.teacher_configs)  # several teachers: per-teacher metrics from each token's log-prob
        mine = set(share(range(len(requests))))  # a sequence-parallel group asks once per row: each rank its share
        keys = self.score_store.row_keys(requests, samples)  # a multimodal row's key holds its media too
        results = self.score_store.stored_answers(requests, keys)  # --teacher_scores: the rows the store holds
        fresh = [i for i in sorted(mine) if results[i] is None]  # scored by a teacher now: kept by a store writer
        if fresh and not self.teacher_configs:
            self.score_store.refuse_missing(requests, keys, fresh,
                                 lambda i: f'row {places[i][1]} of micro-batch {places[i][0]}')
        ask_targets = targets or bool(names) or self.score_store.writer is not None  # (a store keeps them too)
        for t_idx, indices in routing.items():
            indices = [i for i in indices if i in mine and results[i] is None]
            if t_idx == self._local_teacher:
                answers = self._score_locally(batch_encoded_inputs, [places[i] for i in indices])
            else:
                # (--async_generate: the producer's answers where it asked the same request, teacher/ahead.py)
                answers = self.teacher_ahead.answers(t_idx, [requests[i] for i in indices],
                                                ask_targets) if indices else []
            for i, answer in zip(indices, answers):
                results[i] = answer
        results = gather_shares(share(results))
        owner = {}  # several teachers: (micro-batch, row) -> its teacher, for the loss's per-teacher metrics
        if names:
            self._log_teacher_metrics(names, routing, results)
            owner = {places[i][:2]: t_idx for t_idx, indices in routing.items() for i in indices}
        k = self.gkd_logits_topk
        for b, batch in enumerate(batch_encoded_inputs):
            shape = tuple(batch['teacher_model_inputs']['input_ids'].shape) + (k, )
            device = batch['teacher_model_inputs']['input_ids'].device
            if owner:
                batch['gkd_batch'].teacher_of_row = torch.tensor([owner[(b, row)] for row in range(shape[0])],
                                                                 device=device)
            batch['gkd_batch'].teacher_topk_logprobs = torch.full(shape, float('-inf'), device=device)
            batch['gkd_batch'].teacher_topk_indices = torch.zeros(shape, dtype=torch.long, device=device)
            if targets:
                batch['gkd_batch'].teacher_token_logprobs = torch.full(shape[:-1], float('nan'), device=device)
            if self.score_store.train_on_samples:  # --teacher_scores_samples: the sampled estimator's ids and entropies
                batch['gkd_batch'].teacher_samples = torch.full(shape[:-1] + (self.args.teacher_scores_samples, ),
                                                                -1, dtype=torch.long, device=device)
                batch['gkd_batch'].teacher_entropy = torch.full(shape[:-1], float('nan'), device=device)
        served_by = {i: self.teacher_clients[t_idx] for t_idx, indices in routing.items() for i in indices}
        fresh_set = set(fresh)
        for i, ((b, row, positions), result) in enumerate(zip(places, results)):
            gkd_batch = batch_encoded_inputs[b]['gkd_batch']
            client = served_by.get(i)
            drawn = result
            if client is not None and drawn.ids.dim() == 2 and drawn.ids.shape[1] < k and \
                    not getattr(self, '_warned_short_answer', False):
                self._warned_short_answer = True
                if self.accelerator.is_main_process:
                    logger.warning(short_answer_warning(client.url, getattr(client, 'route_name', None),
                                                        drawn.ids.shape[1], k))
            result = fit_answer(result, len(positions), k, f'row {row} of micro-batch {b} (request {i} of this step, '
                                f'teacher {f"server {client.url}" if client is not None else "local"})')
            if i in fresh_set:
                self.score_store.keep_answer(requests[i], keys[i], result, drawn)
            if self.score_store.train_on_samples:
                gkd_batch.teacher_samples[row, positions] = drawn.samples.to(device).long()
                gkd_batch.teacher_entropy[row, positions] = drawn.entropy.to(device).float()
            gkd_batch.teacher_topk_logprobs[row, positions] = result.logprobs.to(device).float()
            gkd_batch.teacher_topk_indices[row, positions] = result.ids.to(device).long()
            if targets:
                gkd_batch.teacher_token_logprobs[row, positions] = result.target_logprobs.to(device).float()


    def _score_locally(self, batch_encoded_inputs, places) -> List[TopKResult]:
        """The local teacher's answer at each ``(micro-batch, row, positions)`` of ``places``, as a server's: its
        top-k (:func:`topk_from_hidden`, or :func:`topk_of_logits` where the fused loss does not apply) and the
        log-prob of each next token, at temperature 1, from one forward of each micro-batch that holds such a row and
        one pass of its head over all of that micro-batch's scored positions. Where the teacher's weights are
        partitioned over the ranks (ZeRO-3) each forward is collective: every micro-batch is forwarded, on every rank,
        whatever its rows' tags. A score-only run (``swift-gkd score``) forwards under ``inference_mode``."""
        model = self.model_wrapped if self.model_wrapped is not None else self.model
        student = self.accelerator.unwrap_model(self.model)
        teacher = None if self.teacher_model is None else self.accelerator.unwrap_model(self.teacher_model)
        partitioned = self.teacher.partitioned or (self._is_self_distillation and is_partitioned(model))
        wanted = {b for b, _, _ in places}
        no_grad = torch.inference_mode if self.args.gkd_score_only else torch.no_grad  # (nothing is trained)
        answers = {}
        for b, batch in enumerate(batch_encoded_inputs):
            if b not in wanted and not partitioned:
                continue
            with gathered_heads([student, teacher]):  # (ZeRO-3: the heads are shards outside a forward)
                inputs = batch['teacher_model_inputs']
                ids = inputs['input_ids']
                with no_grad(), self.compute_loss_context_manager(), whole_sequences():  # (whole rows)
                    out = self.teacher.forward(model, inputs, hidden=self._fused)
                if self.args.gkd_score_only:
                    self.score_store.note_forwarded(inputs)  # (its padding share, in the progress line)
                mine = [where for where, (pb, _, _) in enumerate(places) if pb == b]
                with no_grad():  # (the head in its own dtype: outside the forward's autocast, as the fused loss's)
                    answers.update(zip(mine, self._score_rows(out, ids, [places[i] for i in mine], student)))
        return [answers[i] for i in range(len(places))]

    def _score_rows(self, out, ids, places, student) -> List[TopKResult]:
        """:meth:`_score_locally`'s answers to the rows ``places`` of one forwarded micro-batch (``out``: its logits,
        or hidden states and head), their positions scored together; ``--teacher_scores_samples`` draws row by row."""
        if not places:
            return []
        at = [(torch.full_like(positions, row), positions) for _, row, positions in places]
        row_of = torch.cat([r for r, _ in at]).to(ids.device)
        where = torch.cat([p for _, p in at]).to(ids.device)
        nxt = ids[row_of, where + 1]
        if self._fused:
            hidden, (weight, bias) = out
            rows = hidden[row_of, where]
            top_ids, top_lps, target = topk_from_hidden(rows, weight, bias, self.gkd_logits_topk, head_rows(student),
                                                        tokens=nxt)
        else:
            rows = out[row_of, where]
            top_ids, top_lps = topk_of_logits(rows, self.gkd_logits_topk)
            target = token_logprobs(rows, nxt)
        counts = [len(p) for _, p in at]
        answers = []
        for rows_i, ids_i, lps_i, target_i in zip(*(x.split(counts) for x in (rows, top_ids, top_lps, target))):
            samples = entropy = None
            if self.score_store.samples_to_draw():  # --teacher_scores_samples (teacher/store.py)
                samples, entropy = self.score_store.draw_from_teacher(rows_i, (weight, bias) if self._fused else None)
            answers.append(TopKResult(ids=ids_i, logprobs=lps_i, target_logprobs=target_i.float(), samples=samples,
                                      entropy=entropy))
        return answers

    def _log_teacher_metrics(self, names, routing, results) -> None:
        """Per tag-routed teacher: ``gkd/<name>/teacher_logprob``, the mean log-prob it gives the tokens trained on
        its rows (the student's samples on on-policy steps: it rises as they become the teacher's), and
        ``gkd/<name>/tokens``, the share of the batch's tokens it scored. Added for every teacher on every rank (zero
        tokens where it had no rows), so that the ranks reduce the same metrics."""
        metrics = self.custom_metrics['train' if self.model.training else 'eval']
        counts = {}
        for t_idx, indices in routing.items():
            lps = [results[i].target_logprobs.double() for i in indices]
            counts[t_idx] = n = sum(int(x.numel()) for x in lps)
            _add_token_sum(metrics[f'gkd/{names[t_idx]}/teacher_logprob'], sum(float(x.sum()) for x in lps), n)
        total = max(1, sum(counts.values()))
        for t_idx, n in counts.items():
            _add_token_sum(metrics[f'gkd/{names[t_idx]}/tokens'], n / total, 1)


def _detached_head(model) -> tuple:
    """The model's output head ``(weight, bias)``, detached (as they are now)."""
    weight, bias = output_head(model)
    return weight.detach(), None if bias is None else bias.detach()
