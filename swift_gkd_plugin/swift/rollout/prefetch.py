"""``--async_generate true``: on-policy steps are sampled on the rollout server (``--vllm_mode server``) with the last
synced weights while earlier steps train, up to ``--gkd_max_staleness`` (K) optimizer steps ahead.

In: the rows of the next K optimizer steps, read ahead of the trainer (:meth:`PrefetchMixin.get_batch_samples`).
Out: those steps' on-policy samples, each batch with the weight version it was sampled with (``gkd/staleness``).

A window of K steps: at generation step ``g``, once every batch sampled ahead has been taken, the trainer syncs the
weights of step ``g`` to the server and sends it the prompts of the on-policy steps among ``g + 1 .. g + K``; the
server samples them in order while steps ``g .. g + K - 1`` train, whatever their own modes. So step ``g + j`` trains
on samples ``j`` weight versions old (1 to K; K = 1: ms-swift's one step, a sync every step), the server is synced
once per window, and no sample can be older than K. Off-policy and seq_kd steps run as without ``--async_generate``.
The rows, their order and each step's mode are those of the synchronous run, and each step's weight version is a
function of the step and K alone: only the weights that sampled differ, the same in every run.

A checkpoint keeps every batch sampled ahead (:data:`SAVED`, written atomically before ``trainer_state.json`` marks
the checkpoint complete; data only: JSON, a served teacher's tensors in :data:`SAVED_TENSORS`; never a pickle), with
a key of each row it was sampled for, so a resumed run trains what the uninterrupted run trained. A resume drops, and
samples again with the current weights: a batch older than K (a checkpoint of a deeper queue resumed with a smaller K;
``gkd/stale_dropped``), a batch whose rows are not the step's rows (``--ignore_data_skip true``, another
``--dataset``; ``gkd/prefetch_resampled``, one warning with the counts), and the whole queue of a checkpoint without a
readable queue file (a cut write, an earlier version's ``gkd_prefetched.pkl``: named in a warning, never unpickled).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from accelerate.utils import broadcast_object_list, gather_object
from swift.utils import get_logger

from swift_gkd_plugin.core import Mode
from swift_gkd_plugin.core.modes import choose_mode
from swift_gkd_plugin.core.scores.store import save_safetensors_atomic, write_json_atomic
from swift_gkd_plugin.swift.step.token_metrics import add_token_sum

logger = get_logger()
SAVED = 'gkd_prefetched.json'  # in a checkpoint: the server's samples of its next steps and their rows' keys
SAVED_TENSORS = 'gkd_prefetched.safetensors'  # the served teacher's answers to them (tensors), where there are
LEGACY = 'gkd_prefetched.pkl'  # the pickle of earlier versions: never read
FORMAT = 1


@dataclass
class Prefetched:
    """One generation batch sampled ahead: ``step`` it is for, ``version`` (optimizer steps in the weights that sampled
    it), the server's outputs for every rank (rank 0; others None) and the requests each rank sent."""
    step: int
    version: int
    lengths: List[int]
    future: Optional[Future] = None
    outputs: Optional[list] = field(default=None)
    keys: Optional[List[List[str]]] = None  # every rank's row keys (:func:`_row_keys`), checked against the step's
    answers: Optional[object] = None  # a served teacher's answers to the rows (a future while the producer asks)

    def result(self) -> list:
        if self.outputs is None and self.future is not None:
            self.outputs, self.answers = self.future.result()
        return self.outputs


def take_async_flag(args) -> bool:
    """``--async_generate`` is the plugin's to run: ms-swift's trainer would start its own GRPO prefetch (a callback
    and a queue its ``_fast_infer`` reads) when it sees the flag, so the trainer's arguments hold False and the plugin
    keeps the value."""
    value, args.async_generate = bool(getattr(args, 'async_generate', False)), False
    return value


class Prefetch:
    """The rows up to K optimizer steps ahead, their samples prefetched on the server, taken by the steps they are
    for.

    Built by the trainer with ``trainer``: the ms-swift trainer whose state it reads (``args``, ``state``,
    ``accelerator``, ``custom_metrics``, ms-swift's ``_last_loaded_step``), whose rollout hooks it calls as ms-swift's
    loop does (``_generate_completions``, ``_preprocess_inputs``, ``to_samples``, ``samples2requests``,
    ``_get_request_config``, ``_postprocess_rollout_outputs``, ``_move_model_to_vllm``, ``_engine_infer``) and whose
    :class:`~swift_gkd_plugin.swift.teacher.ahead.TeacherAhead` it hands a served teacher's answers; ``on``:
    ``--async_generate``."""

    def __init__(self, trainer, on: bool) -> None:
        self.trainer = trainer
        self.on = on
        self.max_staleness = int(getattr(trainer.args, 'gkd_max_staleness', 1) or 1)
        self._ahead = (None, [])  # (the epoch's iterator, the batches already read for the next optimizer steps)
        self._rows_ahead: Dict[int, object] = {}  # step -> that generation batch's rows on this rank
        self.queue: Dict[int, Prefetched] = {}  # step -> its batch sampled ahead, in step order
        self._resampled: Dict[int, int] = {}  # step -> samples a resume dropped for it (not its rows): sampled again
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix='gkd-prefetch') if on else None
        self._staleness_max = None  # the most weight versions a step's samples lagged since the last log
        self.resumed_from = None  # the checkpoint a resumed run's queue is read from (once)
        if on and trainer.args.process_index == 0:
            k = self.max_staleness
            logger.info('swift_gkd_plugin: --async_generate true: on-policy steps are sampled on the rollout server '
                        f'while earlier steps train, up to {k} step{"s" if k > 1 else ""} ahead (--gkd_max_staleness '
                        f'{k}: samples 1 to {k} weight versions old, gkd/staleness); the rows and modes are those of '
                        'the synchronous run')

    def read_ahead(self, epoch_iterator, num_batches, device):
        """The Trainer's batches of this optimizer step, and the next K steps' read early."""
        source, read = self._ahead
        read = list(read) if source is epoch_iterator else []
        batches, read = read[:num_batches], read[num_batches:]
        batches += _take(epoch_iterator, num_batches - len(batches))
        state = self.trainer.state
        step, per_step = int(state.global_step), self.trainer.args.gradient_accumulation_steps
        ahead = self.max_staleness
        if state.max_steps > 0:
            ahead = min(ahead, state.max_steps - step - 1)  # no step past the last
        read += _take(epoch_iterator, max(ahead, 0) * per_step - len(read))
        self._ahead = (epoch_iterator, read)
        self._rows_ahead = {step + 1 + i: read[i * per_step] for i in range((len(read) + per_step - 1) // per_step)}
        return batches, self.trainer._get_num_items_in_batch(batches, device)

    def samples(self, samples, step: int):
        """Step ``step``'s on-policy samples: prefetched ones where there are (not older than K), else sampled now."""
        trainer = self.trainer
        prefetched = self._take(step, samples)
        metrics = trainer.custom_metrics['train']
        resampled = self._resampled.pop(step, 0)  # (a resume dropped this step's batch: not its rows)
        if prefetched is None:
            if resampled:
                add_token_sum(metrics['gkd/prefetch_resampled'], float(resampled), 1)
            return trainer._generate_completions(samples)
        keys = _row_keys(samples)
        samples = trainer._preprocess_inputs(samples)
        lengths = gather_object([len(samples)])
        rank = trainer.accelerator.process_index
        if lengths != prefetched.lengths or not all(gather_object([prefetched.keys[rank] == keys])):
            # the step's rows are not those read ahead (a row replaced since): sampled now rather than mixed up
            logger.warning(f'swift_gkd_plugin: the samples prefetched for step {step} are not for its rows (a row '
                           'was replaced since): sampled now')
            add_token_sum(metrics['gkd/prefetch_resampled'], float(resampled + sum(lengths)), 1)
            return trainer._generate_completions(samples)
        add_token_sum(metrics['gkd/prefetch_resampled'], float(resampled), 1)
        staleness = step - prefetched.version
        if staleness > self.max_staleness:  # (the same on every rank: versions are broadcast)
            add_token_sum(metrics['gkd/stale_dropped'], float(sum(lengths)), 1)
            if trainer.accelerator.is_main_process:
                logger.warning(f'swift_gkd_plugin: the {sum(lengths)} samples prefetched for step {step} are '
                               f'{staleness} weight versions old, more than --gkd_max_staleness '
                               f'{self.max_staleness}: dropped, and their rows sampled now with the current weights')
            return trainer._generate_completions(samples)
        add_token_sum(metrics['gkd/stale_dropped'], 0.0, 1)
        outputs = prefetched.result() if trainer.accelerator.is_main_process else [None] * sum(lengths)
        outputs = broadcast_object_list(outputs, from_process=0)
        if trainer.teacher_ahead.on():  # the served teacher's answers come with the batch: read by this step's
            trainer.teacher_ahead.expect(prefetched.answers, pending=True)  # teacher stage (teacher/ahead.py)
        start = sum(lengths[:rank])
        add_token_sum(metrics['gkd/staleness'], float(staleness), 1)
        self._staleness_max = max(self._staleness_max or 0, staleness)
        return trainer._postprocess_rollout_outputs(samples, outputs[start:start + lengths[rank]])

    def _take(self, step: int, samples) -> Optional[Prefetched]:
        """The batch prefetched for ``step`` (waited for: ``gkd/sample_wait_s``), or one a checkpoint kept (``samples``:
        the step's rows on this rank)."""
        self._load(step, samples)
        for earlier in [s for s in self.queue if s < step]:  # (none: every queued step is on-policy, taken in turn)
            self._wait(self.queue.pop(earlier))
        prefetched = self.queue.pop(step, None)
        self.trainer.teacher_ahead.expect(None)
        self._wait(prefetched)
        return prefetched

    def _wait(self, prefetched: Optional[Prefetched]) -> None:
        """Wait until the server is done with ``prefetched`` (nothing may sync while it samples)."""
        if prefetched is None or prefetched.future is None:
            return
        started = time.perf_counter()
        prefetched.result()
        waited = time.perf_counter() - started
        add_token_sum(self.trainer.custom_metrics['train']['gkd/sample_wait_s'], waited, 1)

    def send_next(self, step: int) -> None:
        """Once every batch sampled ahead has been taken, send the prompts of the on-policy steps among the next K to
        the server: the weights of this step synced first, then sampled in the background, in step order (rank 0
        talks to the server)."""
        trainer, args = self.trainer, self.trainer.args
        if not self.on:
            return
        self._load(step + 1)  # (a resumed run: the checkpoint's queue first)
        if any(s > step for s in self.queue):
            return  # the window still runs: the server samples its steps with the weights synced at its start
        rows_ahead, self._rows_ahead = self._rows_ahead, {}
        wanted = [(s, rows) for s, rows in sorted(rows_ahead.items()) if step < s <= step + self.max_staleness
                  and choose_mode(args.seed, s, args.lmbda, args.seq_kd) is Mode.ON_POLICY]
        if not wanted:
            return
        for prefetched in self.queue.values():
            self._wait(prefetched)
        if trainer._last_loaded_step != trainer.state.global_step:
            trainer._move_model_to_vllm(skip_async_check=True)
            trainer._last_loaded_step = trainer.state.global_step
        score = trainer.teacher_ahead.on()  # a served teacher: the producer asks it too (teacher/ahead.py)
        for following, rows in wanted:
            samples = trainer.to_samples(rows)
            keys = gather_object([_row_keys(samples)])
            samples = trainer._preprocess_inputs(samples)
            requests = trainer.samples2requests(samples)
            lengths = gather_object([len(requests)])
            all_requests = gather_object(requests)
            all_samples = gather_object(samples) if score else None
            # the request config of the step it samples (its mode's budget, its seeds)
            config = trainer._get_request_config(for_step=following)
            future = None
            if trainer.accelerator.is_main_process:
                future = self._pool.submit(self._produce, all_requests, config, all_samples)
            self.queue[following] = Prefetched(following, int(trainer.state.global_step), lengths, future,
                                               keys=keys)

    def _produce(self, infer_requests, request_config, samples=None):
        """The producer's job for one batch (rank 0's thread): the server's samples, then, with ``samples`` (every
        rank's rows, as sent), the served teachers' answers to them, asked in a thread of their own
        (:meth:`~swift_gkd_plugin.swift.teacher.ahead.TeacherAhead.submit`). Returns ``(outputs, answers)``,
        ``answers`` a future: the trainer takes the samples (and syncs, and sends the next prompts) as soon as they are
        back, and waits for the answers only in its teacher stage, so the teacher's call overlaps the server's next
        batch as it did when the trainer asked."""
        outputs = self.trainer._engine_infer(infer_requests=infer_requests, request_config=request_config)
        answers = None if samples is None else self.trainer.teacher_ahead.submit(samples, outputs)
        return outputs, answers

    def save_queue(self, folder: str) -> None:
        """:data:`SAVED` (and :data:`SAVED_TENSORS`) in ``folder``, each written to a temporary file and renamed; an
        empty queue is saved too (a checkpoint of an ``--async_generate`` run always has the file)."""
        os.makedirs(folder, exist_ok=True)
        queue, tensors = [], {}
        for prefetched in self.queue.values():
            self._wait(prefetched)
            answers = prefetched.answers.result() if isinstance(prefetched.answers, Future) else prefetched.answers
            queue.append({'step': prefetched.step, 'version': prefetched.version, 'lengths': prefetched.lengths,
                          'keys': prefetched.keys, 'outputs': [o.model_dump(mode='json') for o in prefetched.result()],
                          'answers': _answers_to_json(answers, f'{prefetched.step}', tensors)})
        if tensors:
            save_safetensors_atomic(tensors, os.path.join(folder, SAVED_TENSORS))
        write_json_atomic(os.path.join(folder, SAVED), {'format': FORMAT, 'queue': queue})

    def _load(self, step: int, samples=None) -> None:
        """The batches of the checkpoint this run resumed from, for ``step`` and later (read once), into the queue:
        those whose rows are this run's rows for their steps (``samples``: this step's on this rank; later steps' read
        ahead); the others, and a queue that cannot be read, are sampled again (warned once, with the counts)."""
        trainer = self.trainer
        path, self.resumed_from = self.resumed_from, None
        if not path:
            return
        saved, problem = _read_queue(path) if trainer.accelerator.is_main_process else (None, None)
        meta = [(problem, [(b['step'], b['version'], b['lengths'], b['keys']) for b in saved or []])]
        problem, meta = broadcast_object_list(meta, from_process=0)[0]
        if problem:
            if trainer.accelerator.is_main_process:
                logger.warning(f'swift_gkd_plugin: {problem}: the steps its run had sampled ahead are sampled again '
                               'with the resumed weights (so they differ from the uninterrupted run\'s)')
            return
        rank, ranks = trainer.accelerator.process_index, trainer.accelerator.num_processes
        mine = []
        for saved_step, _, lengths, keys in meta:
            rows = samples if saved_step == step and samples is not None else self._rows_ahead.get(saved_step)
            mine.append(saved_step >= step and rows is not None and len(keys) == ranks
                        and keys[rank] == _row_keys(trainer.to_samples(rows)))  # (samples pass through)
        agreed = [all(flags) for flags in zip(*gather_object([mine]))] if meta else []
        dropped = []
        for i, (saved_step, version, lengths, keys) in enumerate(meta):
            if saved_step < step:
                continue
            if not agreed[i]:
                dropped.append((saved_step, sum(lengths)))
                self._resampled[saved_step] = sum(lengths)
                continue
            batch = saved[i] if saved is not None else {}
            self.queue[saved_step] = Prefetched(saved_step, version, lengths, outputs=batch.get('outputs'),
                                                answers=batch.get('answers'), keys=keys)
        if dropped and trainer.accelerator.is_main_process:
            logger.warning(f'swift_gkd_plugin: {os.path.join(path, SAVED)} holds samples of {len(dropped)} step'
                           f'{"s" if len(dropped) > 1 else ""} ({", ".join(str(s) for s, _ in dropped)}: '
                           f'{sum(n for _, n in dropped)} samples) for rows that are not this run\'s rows of those '
                           'steps (resumed with --ignore_data_skip true, or another --dataset): not trained; their '
                           'rows are sampled again with the resumed weights (gkd/prefetch_resampled)')

    def log_into(self, logs) -> None:
        """``gkd/staleness_max``: the most weight versions a step's samples lagged since the last log (the mean is
        ``gkd/staleness``)."""
        if self._staleness_max is not None:
            logs['gkd/staleness_max'] = self._staleness_max
            self._staleness_max = None


class PrefetchMixin:
    """ms-swift's hooks the prefetch takes part in: the batches read ahead, a checkpoint's queue, a resume's."""

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """The Trainer's batches of this optimizer step, and (async) the next K steps' read early."""
        if not self.prefetch.on:
            return super().get_batch_samples(epoch_iterator, num_batches, device)
        return self.prefetch.read_ahead(epoch_iterator, num_batches, device)

    def _save_checkpoint(self, model, trial):
        """A checkpoint also keeps every batch sampled for its next steps (rank 0 holds them), written before ms-swift
        and transformers write the checkpoint's files (``trainer_state.json`` last): a resumed run trains them, as the
        uninterrupted run does, and a checkpoint marked complete has its queue."""
        if self.prefetch.on and self.accelerator.is_main_process:
            from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
            folder = os.path.join(self._get_output_dir(trial=trial),
                                  f'{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}')
            self.prefetch.save_queue(folder)
        return super()._save_checkpoint(model, trial)

    def _load_rng_state(self, checkpoint):
        self.prefetch.resumed_from = checkpoint if self.prefetch.on else None
        return super()._load_rng_state(checkpoint)


def _row_keys(samples) -> List[str]:
    """A key of each sample's prompt: BLAKE2b of its messages without the response, tools and media."""
    keys = []
    for s in samples:
        messages = list(s.messages)
        if messages and messages[-1].get('role') == 'assistant':  # (what ms-swift's remove_response drops)
            messages = messages[:-1]
        blob = json.dumps([messages, s.tools, s.images, s.videos, s.audios], sort_keys=True, default=_media_bytes)
        keys.append(hashlib.blake2b(blob.encode(), digest_size=16).hexdigest())
    return keys


def _media_bytes(obj) -> str:
    """A stable stand-in for what JSON cannot write (a decoded image: its bytes' hash; never an address)."""
    data = obj if isinstance(obj, (bytes, bytearray)) else getattr(obj, 'tobytes', lambda: repr(type(obj)))()
    return hashlib.blake2b(data if isinstance(data, (bytes, bytearray)) else str(data).encode(),
                           digest_size=16).hexdigest()


def _answers_to_json(answers, prefix: str, tensors: dict):
    """A served teacher's answers (``{request key: TopKResult}`` or None) as JSON, their tensors put in ``tensors``
    under ``prefix``-based names."""
    if answers is None:
        return None
    import torch
    out = []
    for i, ((ids, positions), result) in enumerate(answers.items()):
        fields = {}
        for f in dataclasses.fields(result):
            value = getattr(result, f.name)
            if isinstance(value, torch.Tensor):
                name = f'{prefix}.{i}.{f.name}'
                tensors[name] = value.detach().cpu().contiguous().clone()
                value = {'tensor': name}
            fields[f.name] = value
        out.append({'input_ids': list(ids), 'positions': list(positions), 'result': fields})
    return out


def _async_checkpoint(path: str) -> bool:
    """Whether the run that wrote checkpoint ``path`` had ``--async_generate true`` (its ``args.json``, which
    ms-swift copies into each checkpoint; True where that file is missing or unreadable: the queue is then looked for)."""
    try:
        with open(os.path.join(path, 'args.json')) as f:
            return bool(json.load(f).get('async_generate', True))
    except (OSError, ValueError, AttributeError):
        return True


def _read_queue(path: str) -> Tuple[Optional[list], Optional[str]]:
    """The queue a checkpoint kept (its outputs and answers rebuilt), or ``(None, why not)``."""
    file = os.path.join(path, SAVED)
    if not os.path.exists(file):
        if os.path.exists(os.path.join(path, LEGACY)):
            return None, (f'{os.path.join(path, LEGACY)} is the queue of an earlier swift_gkd_plugin, a pickle: not '
                          'read (unpickling a file runs code)')
        if not _async_checkpoint(path):
            return [], None  # a synchronous run's checkpoint: it sampled nothing ahead
        return None, (f'{path} has no {SAVED} (an --async_generate run writes it before trainer_state.json: its '
                      'queue was removed, or the write was cut)')
    try:
        with open(file) as f:
            doc = json.load(f)
        if not isinstance(doc, dict) or doc.get('format') != FORMAT:
            found = doc.get('format') if isinstance(doc, dict) else type(doc).__name__
            raise ValueError(f'format {found!r}, this version reads {FORMAT}')
        if not isinstance(doc.get('queue'), list):
            raise ValueError(f'"queue" is {type(doc.get("queue")).__name__}, not a list of batches')
        for i, batch in enumerate(doc['queue']):
            _check_batch(i, batch)
        tensors = None
        if any(b['answers'] for b in doc['queue']):
            from safetensors.torch import load_file
            tensors = load_file(os.path.join(path, SAVED_TENSORS))
        from swift.infer_engine.protocol import RolloutOutput

        from swift_gkd_plugin.server.client import TopKResult
        for batch in doc['queue']:
            batch['outputs'] = [RolloutOutput.model_validate(o) for o in batch['outputs']]
            if batch['answers'] is not None:
                batch['answers'] = {
                    (tuple(a['input_ids']), tuple(a['positions'])): TopKResult(**{
                        k: tensors[v['tensor']] if isinstance(v, dict) and 'tensor' in v else v
                        for k, v in a['result'].items()}) for a in batch['answers']}
        return doc['queue'], None
    except Exception as exc:  # a cut or foreign file: its steps are sampled again
        return None, f'{file} cannot be read ({type(exc).__name__}: {exc})'


def _check_batch(i: int, batch) -> None:
    """A ValueError naming what is wrong with batch ``i`` of a saved queue (a field missing or of another type, or
    outputs that do not match its ranks' lengths and keys), read before any of its fields is used."""
    def whole(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    if not isinstance(batch, dict):
        raise ValueError(f'queue[{i}] is {type(batch).__name__}, not a batch object')
    missing = [name for name in ('step', 'version', 'lengths', 'keys', 'outputs', 'answers') if name not in batch]
    if missing:
        raise ValueError(f'queue[{i}] has no {", ".join(repr(m) for m in missing)}')
    for name in ('step', 'version'):
        if not whole(batch[name]):
            raise ValueError(f'queue[{i}]["{name}"] is {batch[name]!r}, not a whole number')
    lengths, keys, outputs = batch['lengths'], batch['keys'], batch['outputs']
    if not isinstance(lengths, list) or not lengths or not all(whole(n) for n in lengths):
        raise ValueError(f'queue[{i}]["lengths"] is {lengths!r}, not a list of each rank\'s sample count')
    if not (isinstance(keys, list) and len(keys) == len(lengths)
            and all(isinstance(k, list) and len(k) == n and all(isinstance(x, str) for x in k)
                    for k, n in zip(keys, lengths))):
        raise ValueError(f'queue[{i}]["keys"] does not hold one row key per sample of each of its {len(lengths)} '
                         f'rank(s) (lengths {lengths})')
    if not isinstance(outputs, list) or len(outputs) != sum(lengths) or not sum(lengths):
        count = len(outputs) if isinstance(outputs, list) else type(outputs).__name__
        raise ValueError(f'queue[{i}]["outputs"] holds {count} outputs for lengths {lengths} (one per sample, at '
                         'least one)')
    if batch['answers'] is not None and not isinstance(batch['answers'], list):
        raise ValueError(f'queue[{i}]["answers"] is {type(batch["answers"]).__name__}, not a list or null')


def _take(iterator, n: int) -> list:
    out = []
    for _ in range(max(n, 0)):
        try:
            out.append(next(iterator))
        except StopIteration:
            break
    return out
