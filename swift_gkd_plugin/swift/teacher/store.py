"""The teacher-score store in ``swift rlhf``: ``--teacher_scores`` answers the rows it holds, ``--save_teacher_scores``
keeps what the teacher scored, ``--gkd_score_only`` (``swift-gkd score``) scores every row once and trains nothing.

In: the step's teacher requests (each row's token ids and scored positions, as the teacher stage sends them to a
served teacher). Out: the stored answers (None for a row the store lacks), and the new answers appended to the store
being written. Rows are matched by :func:`~swift_gkd_plugin.core.scores.store.row_key`, never by order.
"""
from __future__ import annotations

import json
import os
import time
from typing import List, Optional, Tuple

import torch
from swift.utils import get_logger

from swift_gkd_plugin.core.scores.media import media_digest, processor_fingerprint
from swift_gkd_plugin.core.scores.store import (MANIFEST, RowScores, StoreError, StoreIdentity, StoreWriter,
                                                TeacherStore, adapters_fingerprint, identity_of, read_manifest,
                                                row_key, tokenizer_fingerprint, weights_fingerprint)
from swift_gkd_plugin.core.topk import teacher_tail_logmass
from swift_gkd_plugin.options.teacher_scores import check_store_served_teacher, check_store_teacher, teacher_named
from swift_gkd_plugin.server.client import TopKResult
from swift_gkd_plugin.server.protocol import reported_fingerprints
from swift_gkd_plugin.swift.run.guards import RunError
from swift_gkd_plugin.swift.step.hidden_states import head_rows
from swift_gkd_plugin.swift.step.token_metrics import add_token_sum

logger = get_logger()
Request = Tuple[list, list]
#: seconds between two progress lines of a score-only run
PROGRESS_EVERY = 10.0


class ScoreStore:
    """Reads and writes the teacher-score store around the teacher stage (:meth:`TeacherMixin._postprocess_batch`).

    Built by the trainer once the teacher is placed, with ``trainer``: the ms-swift trainer whose state it reads
    (``args``, ``accelerator``, ``model``, ``teacher_model``, ``template``, ``state``, ``custom_metrics``, the served
    teachers' ``teacher_configs`` and ``teacher_clients`` and the routed ``_local_teacher``, which ms-swift's
    ``_setup_teacher`` hook sets) and whose ``_prepare_inputs`` a score-only step runs. Its state: :attr:`reader`
    (``--teacher_scores``), :attr:`writer` (``--save_teacher_scores``), :attr:`train_on_samples` and a score-only run's
    :attr:`progress`."""

    def __init__(self, trainer) -> None:
        """Open ``--teacher_scores``, start ``--save_teacher_scores``'s writer (one per rank, shards of its own)."""
        self.trainer = trainer
        self._sample_generator = None  # --teacher_scores_samples' draws (draw_from_teacher)
        args = trainer.args
        self.reader = self.writer = None
        if args.teacher_scores:
            self.reader = TeacherStore(args.teacher_scores)
            logger.info(f'swift_gkd_plugin: teacher scores from {args.teacher_scores}: {len(self.reader)} rows, '
                        f'{self.reader.tokens} tokens, top-{self.reader.identity.topk} of '
                        f'{self.reader.identity.teacher}; '
                        + ('no teacher model is loaded: every row must be in the store' if not self.can_score()
                           else 'a row missing from it is scored by the teacher'))
        if args.save_teacher_scores:
            self.writer = StoreWriter(args.save_teacher_scores, self.identity(),
                                      rank=trainer.accelerator.process_index, background=True)
            logger.info(f'swift_gkd_plugin: keeping the teacher\'s top-{self.trainer.gkd_logits_topk} in '
                        f'{args.save_teacher_scores} ({args.teacher_scores_dtype})')
        # --teacher_scores_samples on a store read: the loss is the sampled estimator (step/loss.py, dense)
        self.train_on_samples = bool(args.teacher_scores and args.teacher_scores_samples)
        self.progress = {'rows': 0, 'tokens': 0, 'found': 0, 'again': 0, 'started': None, 'said': 0.0,
                         'positions': 0, 'padding': 0}
        if args.gkd_score_only:
            self.trainer._nothing_learnt.armed = False  # nothing is trained, by design

    def can_score(self) -> bool:
        """A teacher that can score a row now: a served one, a local model, or the student's own base or adapter."""
        return bool(getattr(self.trainer, 'teacher_configs', None))

    def live_teacher(self) -> Tuple[str, Optional[str], List[str]]:
        """The teacher that scores rows in this run: its name (as a store's manifest keeps it), the folder of its
        weights (None for a served one) and its adapters (``--teacher_adapters``: on a separate ``--teacher_model``,
        or on the student's base)."""
        args = self.trainer.args
        if self.trainer.teacher_model_server:  # served (and a routed local one): named by the flag
            return self.trainer.teacher_model_server, None, []
        adapters = list(args.teacher_adapters or [])
        if self.trainer.teacher_model is not None:
            teacher_dir = getattr(self.trainer.accelerator.unwrap_model(self.trainer.teacher_model), 'model_dir', None)
            return str(teacher_dir), teacher_dir, adapters
        # the student's own module: its base (adapter off, or the teacher adapter), or itself (score-only)
        teacher_dir = getattr(self.trainer.accelerator.unwrap_model(self.trainer.model), 'model_dir', None)
        return str(teacher_dir) + (f' + {adapters[0]}' if adapters else ''), teacher_dir, adapters

    def served_teacher(self):
        """The client of the one served teacher that scores every row (``--teacher_model_server URL``), or None (a
        local teacher, several teachers by tag, none)."""
        clients = [c for c in getattr(self.trainer, 'teacher_clients', None) or [] if c is not None]
        served = self.trainer.teacher_model_server and self.trainer._local_teacher is None and len(clients) == 1
        return clients[0] if served else None

    def check_teacher(self) -> None:
        """``--teacher_scores`` beside a teacher: the loaded teacher's weights and adapters, or the served teacher's
        (as its ``GET /health`` reports them), are the store's teacher's, or the run stops before step 1
        (:class:`FlagError`). The launcher compares a local ``--teacher_model`` folder before loading; a hub id's
        weights exist only once downloaded, and the student's base (``--teacher_model`` the ``--model`` of a LoRA
        run) and a served teacher are compared here."""
        if self.reader is None:
            return
        root, identity = self.trainer.args.teacher_scores, self.reader.identity
        client = self.served_teacher()
        if client is not None:
            weights, adapters = reported_fingerprints(getattr(client, 'health_doc', None))
            logger.info('swift_gkd_plugin: ' + check_store_served_teacher(root, identity, client.url, weights,
                                                                          adapters))
            return
        if self.trainer.teacher_model_server and identity.teacher_hash:
            logger.info(f'swift_gkd_plugin: --teacher_scores {root} was scored by {identity.teacher}; this run\'s '
                        'several teachers (by tag) are not compared with it')
        if self.trainer._local_teacher is None:
            return
        name, teacher_dir, adapters = self.live_teacher()
        named = (teacher_named(self.trainer.args.teacher_model, adapters) if self.trainer.teacher_model is not None
                 else f'this run\'s teacher, the student\'s base {name}')
        compared = check_store_teacher(root, identity, named, teacher_dir, adapters=adapters)
        if compared:
            logger.info(f'swift_gkd_plugin: {named} has the weights that scored --teacher_scores {root} ({compared})')

    def identity(self) -> StoreIdentity:
        """What scores this run keeps: the teacher, its weights' and adapters' fingerprints (a served teacher's as its
        ``GET /health`` reports them), the tokenizer, template, k and dtype."""
        args = self.trainer.args
        name, teacher_dir, adapters = self.live_teacher()
        student = self.trainer.accelerator.unwrap_model(self.trainer.model)
        vocab = head_rows(student)  # (a ZeRO-3 shard's whole size too)
        stored = None  # a store being completed keeps its fingerprints' scheme (one written before the full one)
        if args.save_teacher_scores and os.path.exists(os.path.join(args.save_teacher_scores, MANIFEST)):
            stored = identity_of(read_manifest(args.save_teacher_scores))
        client = self.served_teacher()
        if client is not None:
            weights, adapters_hash = reported_fingerprints(getattr(client, 'health_doc', None))
            weights = weights or ''
        elif teacher_dir:
            weights = weights_fingerprint(teacher_dir, stored.teacher_hash if stored else '')
            adapters_hash = adapters_fingerprint(adapters)
        else:  # (several teachers by tag: no one fingerprint)
            weights, adapters_hash = '', None
        if stored is not None and not stored.teacher_hash:  # (what it did not know, it still does not)
            weights = ''
        if not weights or (stored is not None and stored.teacher_adapters_hash is None):
            adapters_hash = None
        model_dir = getattr(self.trainer.accelerator.unwrap_model(self.trainer.model), 'model_dir', None)
        return StoreIdentity(
            processor=processor_fingerprint(model_dir),  # (the rows are the run's --model's encoding)
            teacher=str(name), teacher_hash=weights, teacher_adapters_hash=adapters_hash,
            tokenizer=tokenizer_fingerprint(self.trainer.template.tokenizer),
            template=self.trainer.template.template_meta.template_type, topk=int(self.trainer.gkd_logits_topk),
            samples=int(args.teacher_scores_samples),
            dtype=args.teacher_scores_dtype, temperature=float(args.temperature), vocab_size=int(vocab))

    def row_keys(self, requests: List[Request], samples) -> List[Optional[str]]:
        """Each row's store key (:func:`row_key` of its request and its sample's :func:`media_digest`), where a store
        is read or written; else None each."""
        if self.reader is None and self.writer is None:
            return [None] * len(requests)
        try:
            media = [media_digest(s.images, s.videos, s.audios) for s in samples]
        except (TypeError, OSError) as exc:
            raise RunError(f'--teacher_scores / --save_teacher_scores: a row\'s media cannot be keyed: {exc}') from None
        return [row_key(ids, positions, m) for (ids, positions), m in zip(requests, media, strict=True)]

    def stored_answers(self, requests: List[Request], keys: List[Optional[str]]) -> List[Optional[TopKResult]]:
        """The store's answer to each request (``--teacher_scores``, then what ``--save_teacher_scores`` holds: a
        later epoch reuses an earlier one's), None where it has none. ``keys``: the rows' :meth:`row_keys`."""
        if self.reader is None and self.writer is None:
            return [None] * len(requests)
        answers, again = [], 0
        for key in keys:
            try:
                row = self.reader.get(key) if self.reader is not None else None
                if row is None and self.writer is not None:  # scored earlier in this run or folder
                    row = self.writer.get(key)
                    again += row is not None
            except StoreError as exc:  # a damaged shard: one line naming it
                raise RunError(f'--teacher_scores {self.trainer.args.teacher_scores}: {exc}') from None
            answers.append(None if row is None else TopKResult(row.ids, row.logprobs, row.tail,
                                                               target_logprobs=row.token_logprobs,
                                                               samples=row.samples, entropy=row.entropy))
        if self.trainer.model.training:
            found = sum(a is not None for a in answers)
            add_token_sum(self.trainer.custom_metrics['train']['gkd/teacher_store_rows'], float(found), len(requests))
            if self.trainer.args.gkd_score_only:  # (a score run's own rows again: the last batch filled up)
                self.progress['again'] += again
                found -= again
            self.progress['found'] += found
        return answers

    def refuse_missing(self, requests: List[Request], keys: List[str], missing: List[int], where) -> None:
        """Rows neither the store nor a teacher can answer: one error naming the first."""
        i = missing[0]
        root = self.trainer.args.teacher_scores
        raise RunError(f'{where(i)} is not in --teacher_scores {root} ({len(missing)} of this '
                       f'step\'s {len(requests)} rows are not; key {keys[i]}, {len(requests[i][0])} '
                       'tokens) and this run has no teacher to score it: pass --teacher_model (or '
                       '--teacher_model_server), or score the dataset into the store first (`swift-gkd score` with '
                       'the same --template, --max_length and --truncation_strategy)')

    def keep_answer(self, request: Request, key: str, answer: TopKResult,
                     drawn: Optional[TopKResult] = None) -> None:
        """Append one row the teacher scored now to ``--save_teacher_scores`` (``key``: its :meth:`row_keys`;
        ``drawn``: the answer as the teacher gave it, with its samples, where ``answer`` is the one fitted to the
        batch's top-k slots)."""
        if self.writer is None:
            return
        if key in self.writer:  # (a step that holds a row twice: a filled last batch)
            self.progress['again'] += 1
            return
        drawn = drawn or answer
        logprobs = answer.logprobs.detach().float().cpu()
        tail = answer.tail
        if tail is None:
            tail = teacher_tail_logmass(logprobs, (logprobs > float('-inf')).sum(-1), self.writer.identity
                                        .vocab_size)
        token = answer.target_logprobs
        samples, entropy = drawn.samples, drawn.entropy
        self.writer.add(key, RowScores(
            answer.ids.detach().long().cpu(), logprobs, tail.detach().float().cpu(),
            None if token is None else token.detach().float().cpu(),
            None if samples is None else samples.detach().long().cpu(),
            None if entropy is None else entropy.detach().float().cpu()))
        self.progress['rows'] += 1
        self.progress['tokens'] += len(request[1])

    def samples_to_draw(self) -> int:
        """Tokens the local teacher draws at each position it scores now: ``--teacher_scores_samples`` where a store
        keeps them or the loss trains on them, else 0."""
        args = self.trainer.args
        wanted = self.writer is not None or bool(args.teacher_scores)
        return int(args.teacher_scores_samples) if wanted else 0

    def draw_from_teacher(self, rows: torch.Tensor, head=None) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(samples [n, S], entropy [n])`` of the tempered teacher at ``rows``: its logits, or with ``head``
        ``(weight, bias)`` its hidden states (logits made 256 rows at a time: a ``[256, V]`` chunk at most)."""
        from swift_gkd_plugin.core.entropy import tempered_entropy
        from swift_gkd_plugin.core.scores.sampled_kd import draw_teacher_samples
        if self._sample_generator is None or self._sample_generator.device != rows.device:
            self._sample_generator = torch.Generator(device=rows.device).manual_seed(
                int(self.trainer.args.seed) * 1000003 + self.trainer.accelerator.process_index)
        n, temperature = self.samples_to_draw(), float(self.trainer.args.temperature)
        samples, entropies = [], []
        for start in range(0, rows.shape[0], 256):
            logits = rows[start:start + 256]
            if head is not None:
                weight, bias = head
                logits = logits.to(weight.dtype) @ weight.t() + (0 if bias is None else bias)
            samples.append(draw_teacher_samples(logits.float(), n, temperature, self._sample_generator))
            entropies.append(tempered_entropy(logits.float(), temperature))
        if not samples:
            return rows.new_zeros((0, n), dtype=torch.long), rows.new_zeros(0, dtype=torch.float32)
        return torch.cat(samples), torch.cat(entropies).float()

    def note_forwarded(self, inputs) -> None:
        """A score-only run's count of the positions its teacher forwarded, and of those that were padding."""
        mask = inputs.get('attention_mask')
        if mask is not None and mask.dim() == 2:
            self.progress['positions'] += mask.numel()
            self.progress['padding'] += mask.numel() - int(mask.sum())

    def flush(self) -> None:
        """Write what this rank buffered as a shard (at a checkpoint, at the end of training)."""
        if self.writer is not None:
            self.writer.flush()

    def _gather_sampled_rows(self) -> str:
        """Every rank's sampled rows in one ``samples.jsonl`` (rank files removed); its path."""
        import glob
        root = self.trainer.args.save_teacher_scores
        target = os.path.join(root, 'samples.jsonl')
        parts = sorted(glob.glob(os.path.join(root, 'samples.r*.jsonl')))
        rows = 0
        with open(target + '.tmp', 'w') as out:
            for part in parts:
                with open(part) as f:
                    for line in f:
                        out.write(line)
                        rows += 1
        os.replace(target + '.tmp', target)
        for part in parts:
            os.remove(part)
        cut = self.progress.get('cut', 0)
        logger.info(f'swift-gkd score: {rows} sampled rows in {target}' + (
            f'; {cut} completion(s) cut at --max_completion_length left out (this rank)' if cut else ''))
        return target

    def say_progress(self, done: bool = False) -> None:
        """A score-only run's progress line: rows and tokens scored, tokens/s, rows found, ETA (every 10 s)."""
        p = self.progress
        now = time.time()
        if p['started'] is None:
            p['started'] = p['said'] = now
        if not done and now - p['said'] < PROGRESS_EVERY:
            return
        p['said'] = now
        spent = max(now - p['started'], 1e-9)
        steps, total = self.trainer.state.global_step, self.trainer.state.max_steps
        eta = spent / steps * (total - steps) if steps and total else float('nan')
        rank = self.trainer.accelerator.process_index
        logger.info(f'swift-gkd score: {"done, " if done else ""}rank {rank}: {p["rows"]} '
                    f'rows / {p["tokens"]} tokens scored ({p["tokens"] / spent:.0f} tokens/s), {p["found"]} found in '
                    f'the store already, step {steps}/{total}' + ('' if done else f', ETA {eta:.0f}s')
                    + (f' ({p["again"]} rows repeated to fill the last batch)' if p['again'] else '')
                    + (f'; padding {p["padding"] / p["positions"]:.0%} of the {p["positions"]} positions forwarded'
                       + (' (rows batched by length)' if getattr(self.trainer, '_rows_by_length', False) else
                          ' (rows in dataset order)')
                       if p['positions'] else ''))

    def score_only_step(self, inputs) -> torch.Tensor:
        """``--gkd_score_only``: the step's rows encoded and scored (the teacher stage keeps them), nothing trained."""
        self.trainer._prepare_inputs(inputs)
        self.say_progress()
        return torch.zeros((), device=self.trainer.accelerator.device)

    def sampling(self) -> bool:
        """``swift-gkd score --sample_with``: a score-only run whose steps are on-policy (the model samples, the
        teacher scores the samples, the samples become a dataset)."""
        return bool(self.trainer.args.gkd_score_only and self.trainer.args.lmbda > 0)

    def write_sampled_rows(self, samples) -> None:
        from swift_gkd_plugin.swift.sequence_parallel import group_rank
        rank = self.trainer.accelerator.process_index
        path = os.path.join(self.trainer.args.save_teacher_scores, f'samples.r{rank:04d}.jsonl')
        cut = 0
        with open(path, 'a') as f:
            for sample in samples:
                sample.response_token_ids, sample.response_loss_mask = [], []
                sample.add_eos = True  # (a dataset row's answer ends its turn)
                if getattr(sample, 'finish_reason', None) == 'length':
                    cut += 1  # cut at --max_completion_length: no such row in the dataset
                elif group_rank() == 0:
                    f.write(json.dumps(_sampled_row(sample), ensure_ascii=False) + '\n')
        self.progress['cut'] = self.progress.get('cut', 0) + cut

    def finish_score_only(self) -> None:
        """The end of a score-only run: every rank's shards written; rank 0 marks the datasets the store covers
        (with ``--sample_with``: the sampled rows, gathered into ``samples.jsonl``)."""
        self.flush()
        self.say_progress(done=True)
        self.trainer.accelerator.wait_for_everyone()
        if self.trainer.accelerator.is_main_process:
            from swift_gkd_plugin.options.teacher_scores import mark_covered
            files = None
            if self.sampling():
                files = [self._gather_sampled_rows()]
            mark_covered(self.trainer.args.output_dir, files)
        if self.writer is not None and self.trainer.accelerator.is_main_process:
            written = TeacherStore(self.trainer.args.save_teacher_scores)
            logger.info(f'swift-gkd score: {self.trainer.args.save_teacher_scores} holds {len(written)} rows, '
                        f'{written.tokens} tokens, {written.bytes / max(written.tokens, 1):.1f} bytes a token')



class TeacherStoreMixin:
    """ms-swift's hooks the store takes part in: a score-only step, a checkpoint's flush, ``--sample_with``'s rows."""

    def training_step(self, model, inputs, *args, **kwargs):
        """``--gkd_score_only``: :meth:`ScoreStore.score_only_step`; otherwise the training step."""
        if self.args.gkd_score_only:
            return self.score_store.score_only_step(inputs)
        return super().training_step(model, inputs, *args, **kwargs)

    def _save_checkpoint(self, *args, **kwargs):
        """A checkpoint holds every row scored before it: a resumed run finds them in the store."""
        self.score_store.flush()
        return super()._save_checkpoint(*args, **kwargs)

    def _encode_samples(self, samples):
        """``--sample_with``: each finished completion is encoded from its text, as the dataset row it becomes
        (``samples.jsonl`` beside the store) will be, so the row a later run reads finds these scores."""
        if self.score_store.sampling():
            self.score_store.write_sampled_rows(samples)
        return super()._encode_samples(samples)


def _sampled_row(sample) -> dict:
    """A ``--sample_with`` row as a dataset line: its messages and its media as the dataset gave them (paths, URLs,
    base64), so the row a later run reads is the row scored."""
    row = {'messages': sample.messages}
    for name in ('images', 'videos', 'audios'):
        items = list(getattr(sample, name, None) or [])
        if not items:
            continue
        paths = [x.get('path') if isinstance(x, dict) and x.get('bytes') is None else x for x in items]
        if not all(isinstance(x, str) for x in paths):
            raise RunError(f'swift-gkd score --sample_with: a row\'s {name} are decoded objects '
                           f'({type(items[0]).__name__}), which a dataset line cannot hold: give them as paths or URLs')
        row[name] = paths
    return row
