"""The teacher behind the server: a transformers causal LM, ms-swift's chat template, and a dynamic batcher.

:class:`TransformersTeacher` loads the model (through ms-swift's ``get_model_processor`` so that ``--model_type``
and the template resolve exactly as in training; plain ``AutoModelForCausalLM`` when ms-swift cannot), merges
PEFT adapters, and scores padded batches of token sequences. It runs the decoder once per batch and applies the
output head only to the rows that were asked for, chunk by chunk, so the ``[tokens, vocab]`` logits of a whole
batch never exist at once. Per row it returns the top-k of the full-vocabulary ``log_softmax`` in float32, and on
request the log of the mass outside the top-k and the log-prob and rank of the next input token.

:class:`DynamicBatcher` feeds it: one worker thread takes queued sequences in arrival order until the next one
would push the padded batch (``longest x count``) past ``max_batch_tokens``, runs them as one batch, and hands each
request its results as soon as its last sequence is done. The queue is bounded (``max_queue`` sequences waiting);
a full queue raises :class:`QueueFull` with a suggested retry delay. A batch that fails is retried in halves, down to
single sequences, so that only the request whose sequence fails gets the error; the worker never dies. A retry
starts only after the failed attempt's exception is gone (its traceback holds the forward's activations) and, after
an out-of-memory error, after the allocator's cache is emptied; requests get a :class:`ScoreFailed` that holds no
traceback.
"""
from __future__ import annotations

import gc
import logging
import math
import os
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

logger = logging.getLogger('swift_gkd_plugin.server')

__all__ = ['ScoreSpec', 'ScoreResult', 'TransformersTeacher', 'DynamicBatcher', 'QueueFull', 'EncodeError',
           'TooLong', 'ScoreFailed', 'chunk_rows']

_DTYPES = {'float32': torch.float32, 'fp32': torch.float32, 'bfloat16': torch.bfloat16, 'bf16': torch.bfloat16,
           'float16': torch.float16, 'fp16': torch.float16}
_CPU_SCRATCH_BYTES = 2**27  # one [rows, vocab] float32 chunk of logits on CPU (128 MiB)
_ROW_COPIES = 3  # float32 [rows, vocab] tensors alive at once while scoring: logits, log-softmax, the tail's copy
_MAX_CHUNK_ROWS = 4096


def chunk_rows(vocab: int, free_bytes: Optional[int] = None) -> int:
    """Rows of the output head scored at once: their float32 scratch (``_ROW_COPIES`` copies of ``[rows, vocab]``)
    fits in a quarter of ``free_bytes`` (the device's free memory), or in 128 MiB when it is unknown (CPU); within
    [1, 4096]. Why: a fixed 128 MiB under-uses an 80 GB GPU and overflows a nearly full one."""
    budget = _CPU_SCRATCH_BYTES if free_bytes is None else free_bytes // 4
    return int(max(1, min(_MAX_CHUNK_ROWS, budget // (_ROW_COPIES * 4 * max(vocab, 1)))))


def free_device_bytes(device: torch.device) -> Optional[int]:
    """Free memory of a CUDA device (what the allocator has cached counts as free), None elsewhere."""
    if device.type != 'cuda':
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


class EncodeError(ValueError):
    """A request could not be turned into token ids (bad messages, no template, ...): HTTP 422."""


class TooLong(ValueError):
    """A sequence is longer than the server accepts: HTTP 413."""


class ScoreFailed(RuntimeError):
    """A failed forward as requests see it: the message only, no traceback (whose frames would keep the failed
    forward's activations alive until the reply); ``memory`` marks an out-of-memory error."""

    def __init__(self, message: str, memory: bool = False):
        super().__init__(message)
        self.memory = memory


def is_memory_error(error: BaseException) -> bool:
    """CUDA's OutOfMemoryError, Python's MemoryError, or an allocator's RuntimeError (CPU: "can't allocate")."""
    if isinstance(error, (MemoryError, getattr(torch.cuda, 'OutOfMemoryError', MemoryError))):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and ('out of memory' in text or "can't allocate memory" in text)


def release_memory() -> None:
    """Collect garbage (exception cycles) and give the allocator's cached blocks back to the device."""
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


class QueueFull(RuntimeError):
    """The batcher's queue is full: HTTP 503 with ``Retry-After: retry_after`` seconds."""

    def __init__(self, retry_after: int, queued: int):
        super().__init__(f'queue full ({queued} sequences waiting)')
        self.retry_after = retry_after


@dataclass
class ScoreSpec:
    """What to compute for one sequence.

    ``positions[j] = p`` asks for the distribution at ``p``, the one that predicts ``input_ids[p + 1]``.
    """
    input_ids: List[int]
    positions: torch.Tensor  # [n] int64
    topk: int  # 0: no top-k (only the targets)
    with_tail: bool = False
    with_targets: bool = False  # log-prob and rank of input_ids[p + 1] (where p + 1 < len)

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)


@dataclass
class ScoreResult:
    ids: torch.Tensor  # [n, topk] int64
    logprobs: torch.Tensor  # [n, topk] float32
    argmax: torch.Tensor  # [n] int64, the most likely token of each row
    tail: Optional[torch.Tensor] = None  # [n] float32
    target_logprobs: Optional[torch.Tensor] = None  # [n] float32, nan where there is no next token
    target_ranks: Optional[torch.Tensor] = None  # [n] int64 (1 = most likely), 0 where there is no next token


def resolve_dtype(name: Optional[str], device: torch.device) -> torch.dtype:
    if name in (None, 'auto'):
        if device.type == 'cuda' and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if name not in _DTYPES:
        raise ValueError(f'unknown --torch_dtype {name!r} (choose from auto, {", ".join(sorted(_DTYPES))})')
    return _DTYPES[name]


def resolve_device(name: Optional[str]) -> torch.device:
    if name in (None, 'auto'):
        return torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')
    return torch.device(name)


class TransformersTeacher:
    """A causal LM that scores token sequences (see the module docstring)."""

    def __init__(self, model, tokenizer, template=None, train_template=None, *, name: str = 'teacher',
                 max_length: Optional[int] = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.template = template  # inference mode: encodes /infer/ requests as ms-swift's vLLM server does
        self.train_template = train_template  # training mode: labels mark the response tokens
        self.name = name
        emb = model.get_input_embeddings()
        # where the inputs go: the embedding's device (the first of a teacher spread over several GPUs)
        self.device = emb.weight.device if emb is not None else next(model.parameters()).device
        head = model.get_output_embeddings()
        self.vocab_size = int(head.weight.shape[0]) if head is not None else int(model.config.vocab_size)
        emb = model.get_input_embeddings()
        self.num_embeddings = int(emb.weight.shape[0]) if emb is not None else self.vocab_size
        self.max_length = max_length
        pad = getattr(tokenizer, 'pad_token_id', None)
        self.pad_id = int(pad) if pad is not None and 0 <= pad < self.num_embeddings else 0
        self._encode_lock = threading.Lock()
        self._decoded: Optional[List[str]] = None
        self._decoded_lock = threading.Lock()
        self._split = self._head_only_matches()
        # what GET /health reports of the served weights (set by load: the folder's and the adapters' fingerprints)
        self.weights_fingerprint = ''
        self.adapters_fingerprint = ''

    # ------------------------------------------------------------------------------------------------------------
    # loading
    # ------------------------------------------------------------------------------------------------------------

    @classmethod
    def load(cls, model: str, *, model_type: Optional[str] = None, template: Optional[str] = None,
             adapters: Sequence[str] = (), torch_dtype: Optional[str] = None, device: Optional[str] = None,
             max_length: Optional[int] = None, served_model_name: Optional[str] = None,
             trust_remote_code: bool = False, device_map: Optional[str] = None) -> 'TransformersTeacher':
        """``device_map`` (transformers' ``auto``, ``balanced``, ``sequential``, ...) spreads a teacher larger than
        one GPU over the visible ones and replaces ``device``."""
        dev = resolve_device(device)
        dtype = resolve_dtype(torch_dtype, dev if device_map is None else resolve_device('auto'))
        t0 = time.time()
        from swift_gkd_plugin.core.scores.store import adapters_fingerprint, weights_fingerprint
        folder, hashed = os.path.expanduser(model), {}
        # a local folder's files hashed while the model loads (once a machine: file_digest caches each file's hash)
        hashing = threading.Thread(target=lambda: hashed.update(found=weights_fingerprint(folder)), daemon=True,
                                   name='weights-fingerprint')
        if os.path.isdir(folder):
            hashing.start()
        hf_model, processor, tpl, train_tpl = None, None, None, None
        try:
            from swift.model import get_model_processor
            hf_model, processor = get_model_processor(model, model_type=model_type, torch_dtype=dtype,
                                                      device_map=device_map or str(dev))
        except Exception as e:  # a model ms-swift does not know: plain transformers, no chat template
            if model_type is not None or template is not None:
                raise
            logger.warning(f'ms-swift could not load {model!r} ({type(e).__name__}: {e}); loading it with plain '
                           'transformers: requests must then carry token ids (no chat template)')
            from transformers import AutoModelForCausalLM, AutoTokenizer
            processor = AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code)
            hf_model = AutoModelForCausalLM.from_pretrained(model, dtype=dtype, trust_remote_code=trust_remote_code,
                                                            device_map=device_map)
            if device_map is None:
                hf_model.to(dev)
        loaded_from = getattr(hf_model, 'model_dir', None)  # (a hub id's download, as ms-swift resolved it)
        for path in adapters:
            from peft import PeftModel
            hf_model = PeftModel.from_pretrained(hf_model, path).merge_and_unload()
            logger.info(f'merged adapter {path}')
        if getattr(processor, 'model_meta', None) is not None or getattr(processor, 'model_info', None) is not None:
            from swift.template import get_template
            tpl = get_template(processor, template_type=template, max_length=max_length)
            tpl.set_mode('transformers')  # is_training False: add_eos follows the request, as on a vLLM server
            train_tpl = get_template(processor, template_type=template, max_length=max_length)
            train_tpl.set_mode('train')
        tokenizer = getattr(processor, 'tokenizer', None) or processor
        hf_model.requires_grad_(False)
        teacher = cls(hf_model, tokenizer, tpl, train_tpl, name=served_model_name or os.path.basename(
            os.path.normpath(model)), max_length=max_length or (tpl.max_length if tpl is not None else None))
        if hashing.ident is not None:
            hashing.join()
        teacher.weights_fingerprint = hashed.get('found') or (weights_fingerprint(loaded_from) if loaded_from else '')
        teacher.adapters_fingerprint = adapters_fingerprint(adapters)
        logger.info(f'weights fingerprint {teacher.weights_fingerprint or "unknown (no local folder)"}'
                    + (f', adapters {teacher.adapters_fingerprint}' if adapters else '')
                    + ' (reported by GET /health; a teacher-score store keeps it)')
        tpl_name = getattr(getattr(tpl, 'template_meta', None), 'template_type', None)
        where = dev if device_map is None else sorted({str(p.device) for p in hf_model.parameters()})
        logger.info(f'teacher {model!r} loaded in {time.time() - t0:.1f}s on {where} ({dtype}), vocabulary '
                    f'{teacher.vocab_size}, template {tpl_name}, head-only scoring '
                    f'{"on" if teacher._split else "off (full forward)"}')
        return teacher

    # ------------------------------------------------------------------------------------------------------------
    # encoding
    # ------------------------------------------------------------------------------------------------------------

    def encode(self, request: Dict[str, Any], *, train: bool = False) -> Tuple[List[int], Optional[List[int]]]:
        """``(input_ids, labels)`` of a chat request, with ms-swift's template (labels only when ``train``)."""
        template = self.train_template if train else self.template
        if template is None:
            raise EncodeError('this server has no ms-swift chat template (the model was loaded with plain '
                              'transformers): send token ids instead of messages')
        from swift.template import MaxLengthError
        try:
            with self._encode_lock:
                encoded = template.encode(request)
        except MaxLengthError as e:
            raise TooLong(str(e)) from e
        except Exception as e:
            raise EncodeError(f'could not encode the messages: {type(e).__name__}: {e}') from e
        input_ids = list(encoded['input_ids'])
        labels = encoded.get('labels')
        return input_ids, (list(labels) if labels is not None else None)

    def decoded_tokens(self) -> List[str]:
        """Each token id decoded on its own (``decoded_token`` of the vLLM format); built once, on first use."""
        if self._decoded is None:
            with self._decoded_lock:
                if self._decoded is None:
                    n = len(self.tokenizer)
                    table = self.tokenizer.batch_decode([[i] for i in range(n)])
                    self._decoded = table + [''] * max(0, self.vocab_size - n)
        return self._decoded

    # ------------------------------------------------------------------------------------------------------------
    # scoring
    # ------------------------------------------------------------------------------------------------------------

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.model.get_output_embeddings()(hidden).float()
        cfg = getattr(self.model.config, 'get_text_config', lambda: self.model.config)()
        scale = getattr(cfg, 'logit_scale', None)
        if isinstance(scale, (int, float)):
            logits = logits * scale
        scaling = getattr(cfg, 'logits_scaling', None)
        if isinstance(scaling, (int, float)) and scaling:
            logits = logits / scaling
        cap = getattr(cfg, 'final_logit_softcapping', None)
        if isinstance(cap, (int, float)) and cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def _head_only_matches(self) -> bool:
        """Whether decoder + output head reproduce ``model(...).logits`` (else every batch runs the full model)."""
        try:
            decoder = self.model.get_decoder()
            if decoder is None or self.model.get_output_embeddings() is None:
                return False
            ids = torch.arange(1, 9, device=self.device)[None] % self.num_embeddings
            with torch.inference_mode():
                ref = self.model(input_ids=ids, use_cache=False).logits.float().cpu()
                got = self._head(decoder(input_ids=ids, use_cache=False).last_hidden_state).cpu()
            tol = 1e-4 if next(self.model.parameters()).dtype == torch.float32 else 2e-2
            ok = got.shape == ref.shape and bool(torch.allclose(got, ref, atol=tol, rtol=tol))
            if not ok:
                logger.warning('decoder + output head do not reproduce the model logits: using full forwards')
            return ok
        except Exception as e:
            logger.warning(f'head-only scoring unavailable ({type(e).__name__}: {e}): using full forwards')
            return False

    @torch.inference_mode()
    def score(self, specs: Sequence[ScoreSpec]) -> List[ScoreResult]:
        """Run one padded batch and return one :class:`ScoreResult` per spec."""
        B = len(specs)
        lengths = [s.num_tokens for s in specs]
        L = max(lengths)
        ids = torch.full((B, L), self.pad_id, dtype=torch.long)
        mask = torch.zeros((B, L), dtype=torch.long)
        for b, s in enumerate(specs):
            ids[b, :lengths[b]] = torch.as_tensor(s.input_ids, dtype=torch.long)
            mask[b, :lengths[b]] = 1
        rows = torch.cat([s.positions.long() + b * L for b, s in enumerate(specs)])
        counts = [int(s.positions.numel()) for s in specs]
        row_k = torch.cat([torch.full((c, ), s.topk, dtype=torch.long) for c, s in zip(counts, specs)])
        row_tail = torch.cat([torch.full((c, ), s.with_tail, dtype=torch.bool) for c, s in zip(counts, specs)])
        targets = []
        for b, s in enumerate(specs):
            if s.with_targets:
                nxt = s.positions.long() + 1
                valid = nxt < lengths[b]
                targets.append(torch.where(valid, ids[b].gather(0, nxt.clamp(max=L - 1)), -1))
            else:
                targets.append(torch.full((counts[b], ), -1, dtype=torch.long))
        row_target = torch.cat(targets)
        need_targets = bool((row_target >= 0).any())
        need_tail = bool(row_tail.any())
        V = self.vocab_size
        kk = max(1, min(V, int(row_k.max())))

        ids_d, mask_d = ids.to(self.device), mask.to(self.device)
        if self._split:
            hidden = self.model.get_decoder()(input_ids=ids_d, attention_mask=mask_d, use_cache=False)
            hidden = hidden.last_hidden_state
            source = hidden.reshape(B * L, hidden.shape[-1]).index_select(0, rows.to(hidden.device))
            del hidden
            to_logits = self._head
        else:
            logits = self.model(input_ids=ids_d, attention_mask=mask_d, use_cache=False).logits
            source = logits.reshape(B * L, logits.shape[-1]).index_select(0, rows.to(logits.device))
            del logits
            to_logits = lambda x: x.float()  # noqa: E731
        N = source.shape[0]
        out_lp = torch.empty((N, kk), dtype=torch.float32)
        out_ids = torch.empty((N, kk), dtype=torch.long)
        out_tail = torch.full((N, ), float('nan')) if need_tail else None
        out_tlp = torch.full((N, ), float('nan')) if need_targets else None
        out_rank = torch.zeros((N, ), dtype=torch.long) if need_targets else None
        chunk = chunk_rows(V, free_device_bytes(source.device))
        for c0 in range(0, N, chunk):
            c1 = min(N, c0 + chunk)
            lp = torch.log_softmax(to_logits(source[c0:c1]), dim=-1)
            top_lp, top_ids = lp.topk(kk, dim=-1)
            out_lp[c0:c1] = top_lp.cpu()
            out_ids[c0:c1] = top_ids.cpu()
            if need_tail:
                sel_tail = row_tail[c0:c1]
                ks = row_k[c0:c1]
                for k in torch.unique(ks[sel_tail]).tolist():
                    sel = (sel_tail & (ks == k)).nonzero().squeeze(1)
                    if k >= V:
                        out_tail[c0 + sel] = float('-inf')
                        continue
                    sel_d = sel.to(lp.device)
                    rest = lp.index_select(0, sel_d).scatter(-1, top_ids.index_select(0, sel_d)[:, :k],
                                                            float('-inf'))
                    out_tail[c0 + sel] = torch.logsumexp(rest, dim=-1).cpu()
            if need_targets:
                tg = row_target[c0:c1]
                sel = (tg >= 0).nonzero().squeeze(1)
                if sel.numel():
                    sel_d = sel.to(lp.device)
                    lp_sel = lp.index_select(0, sel_d)
                    tlp = lp_sel.gather(-1, tg[sel].to(lp.device)[:, None])
                    out_tlp[c0 + sel] = tlp[:, 0].cpu()
                    out_rank[c0 + sel] = ((lp_sel > tlp).sum(-1) + 1).cpu()
            del lp
        results, o = [], 0
        for c, s in zip(counts, specs):
            k = min(s.topk, V)
            results.append(ScoreResult(
                ids=out_ids[o:o + c, :k], logprobs=out_lp[o:o + c, :k], argmax=out_ids[o:o + c, 0],
                tail=out_tail[o:o + c] if s.with_tail else None,
                target_logprobs=out_tlp[o:o + c] if s.with_targets else None,
                target_ranks=out_rank[o:o + c] if s.with_targets else None))
            o += c
        return results


# ----------------------------------------------------------------------------------------------------------------
# dynamic batching
# ----------------------------------------------------------------------------------------------------------------


class _Job:
    """The sequences of one HTTP request; ``on_done(results, error)`` is called once, from the worker thread."""

    def __init__(self, specs: List[ScoreSpec], on_done: Callable[[Optional[list], Optional[BaseException]], None]):
        self.specs = specs
        self.results: List[Optional[ScoreResult]] = [None] * len(specs)
        self.remaining = len(specs)
        self.error: Optional[BaseException] = None
        self.on_done = on_done
        self.enqueued = time.perf_counter()
        self.started: Optional[float] = None
        self.finished = False

    def deliver(self, index: int, result: Optional[ScoreResult], error: Optional[BaseException]):
        if self.finished:
            return
        if error is not None:
            self.error = error
            self.remaining = 0
        else:
            self.results[index] = result
            self.remaining -= 1
        if self.remaining == 0:
            self.finished = True
            try:
                self.on_done(None if self.error else self.results, self.error)
            except Exception:  # a callback must never kill the worker
                logger.exception('result callback failed')


class DynamicBatcher:
    """Bounded FIFO of sequences and one worker thread that runs them in token-bounded batches."""

    def __init__(self, score_fn: Callable[[List[ScoreSpec]], List[ScoreResult]], *, max_batch_tokens: int,
                 max_queue: int, batch_wait_s: float = 0.0):
        self.score_fn = score_fn
        self.max_batch_tokens = int(max_batch_tokens)
        self.max_queue = int(max_queue)
        self.batch_wait_s = float(batch_wait_s)
        self._queue: deque = deque()  # (job, index)
        self._queued_tokens = 0
        self._cv = threading.Condition()
        self._stop = False
        self._thread: Optional[threading.Thread] = None
        # statistics
        self.batches = 0
        self.sequences_done = 0
        self.tokens_done = 0
        self.busy_s = 0.0
        self.failures = 0
        self._rate = 0.0  # tokens / second, exponential moving average

    # lifecycle
    def start(self):
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name='teacher-batcher', daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 5.0):
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def queued(self) -> int:
        return len(self._queue)

    def stats(self) -> Dict[str, Any]:
        return {'queued_sequences': len(self._queue), 'queued_tokens': self._queued_tokens,
                'max_queue': self.max_queue, 'max_batch_tokens': self.max_batch_tokens, 'batches': self.batches,
                'sequences': self.sequences_done, 'tokens': self.tokens_done, 'failures': self.failures,
                'tokens_per_second': round(self._rate, 1),
                'worker_alive': bool(self._thread is not None and self._thread.is_alive())}

    def retry_after(self) -> int:
        """Seconds until the queue has likely drained (from the measured throughput), in [1, 60]."""
        rate = self._rate if self._rate > 0 else 1000.0
        return int(min(60, max(1, math.ceil(self._queued_tokens / rate))))

    def submit(self, specs: List[ScoreSpec], on_done) -> _Job:
        job = _Job(specs, on_done)
        with self._cv:
            if len(self._queue) + len(specs) > self.max_queue:
                raise QueueFull(self.retry_after(), len(self._queue))
            for i, s in enumerate(specs):
                self._queue.append((job, i))
                self._queued_tokens += s.num_tokens
            self._cv.notify()
        return job

    # worker
    def _take(self) -> List[Tuple[_Job, int]]:
        """Pop the next batch: FIFO while ``longest x count`` stays within ``max_batch_tokens`` (at least one)."""
        batch, longest = [], 0
        while self._queue:
            job, i = self._queue[0]
            n = job.specs[i].num_tokens
            if batch and max(longest, n) * (len(batch) + 1) > self.max_batch_tokens:
                break
            self._queue.popleft()
            self._queued_tokens -= n
            longest = max(longest, n)
            batch.append((job, i))
        return batch

    def _loop(self):
        while True:
            with self._cv:
                while not self._queue and not self._stop:
                    self._cv.wait()
                if self._stop:
                    return
            if self.batch_wait_s > 0:
                time.sleep(self.batch_wait_s)  # let concurrent requests join the batch
            with self._cv:
                batch = self._take()
            if batch:
                try:
                    self._run(batch)
                except BaseException:  # never let the worker die
                    logger.exception('teacher batch failed unexpectedly')

    def _attempt(self, specs: List[ScoreSpec]) -> Tuple[Optional[List[ScoreResult]], Optional[ScoreFailed]]:
        """One forward; a failure comes back as a :class:`ScoreFailed` once the except block is left, so that the
        exception, its traceback and the failed forward's activations are gone before anything else runs."""
        try:
            return self.score_fn(specs), None
        except Exception as e:
            failed = ScoreFailed(f'{type(e).__name__}: {e}', is_memory_error(e))
        if failed.memory:
            release_memory()
        logger.warning(f'teacher forward of {len(specs)} sequence{"s" if len(specs) > 1 else ""} failed: {failed}'
                       f'{"; retrying in halves" if len(specs) > 1 else ""}')
        return None, failed

    def _score_in_halves(self, specs: List[ScoreSpec]) -> List[Tuple[Optional[ScoreResult], Optional[BaseException]]]:
        """Results of ``specs``: the whole batch, else each half (recursively), so that an out-of-memory batch is
        retried smaller and a failing sequence fails alone."""
        results, error = self._attempt(specs)
        if error is None:
            return [(r, None) for r in results]
        if len(specs) == 1:
            return [(None, error)]
        mid = len(specs) // 2
        return self._score_in_halves(specs[:mid]) + self._score_in_halves(specs[mid:])

    def _run(self, batch: List[Tuple[_Job, int]]):
        t0 = time.perf_counter()
        for job, _ in batch:
            if job.started is None:
                job.started = t0
        specs = [job.specs[i] for job, i in batch]
        outcome = self._score_in_halves(specs)
        dt = time.perf_counter() - t0
        tokens = sum(s.num_tokens for s in specs)
        self.batches += 1
        self.sequences_done += len(specs)
        self.tokens_done += tokens
        self.failures += sum(1 for _, e in outcome if e is not None)
        self.busy_s += dt
        rate = tokens / max(dt, 1e-6)
        self._rate = rate if self._rate == 0 else 0.8 * self._rate + 0.2 * rate
        for (job, i), (result, error) in zip(batch, outcome):
            job.deliver(i, result, error)
