"""A small client of a teacher server: this plugin's compact endpoint (``POST /v1/topk``) and ms-swift's protocol.

::

    from swift_gkd_plugin.server import TeacherClient
    client = TeacherClient('http://127.0.0.1:8000', timeout=60, retries=3, backoff=0.5, wait=600)
    client.wait_until_ready()      # a server still loading its model: poll GET /health (logged, bounded)
    client.offers_topk()           # False for a server with only /health and /infer/ (``swift deploy``, vLLM)
    results = client.topk([(prompt_ids, response_ids), ...], topk=64, with_tail=True)
    results[0].ids        # [R, k] int64: the teacher's top-k token ids at each response token
    results[0].logprobs   # [R, k] float32: their full-vocabulary log-probabilities (temperature 1)
    results[0].tail       # [R] float32: log(1 - sum(exp(logprobs))), or None without with_tail
    answers = client.infer(infer_requests, request_config)   # ms-swift's POST /infer/ body and JSON answer
    client.route()                 # 'topk' (this plugin's server), 'infer' (ms-swift's) or 'completions' (vLLM's)
    results = client.prompt_logprobs_at([(input_ids, positions), ...], topk=20, with_targets=True)  # `vllm serve`

Retries: a server that is unreachable, times out or answers 429/502/503/504 (rate-limited, starting, restarting,
busy) is retried until ``wait`` seconds have passed since the request's first attempt; any retryable failure (those,
a 500 and an answer that fails the checks below) is also retried at least ``retries`` times. The delay grows as
``backoff * 2**attempt`` up to ``max_backoff``, and is at least the server's ``Retry-After`` (seconds or an HTTP
date); a ``Retry-After`` beyond the time left of ``wait`` stops at once, saying so. Every retry is logged with its
cause and the budget left. Another 4xx answer (401, 404, 413, 422, ...) is the client's fault and is raised at once.
Every failure raises :class:`TeacherServerError`, whose message names the URL, the number of attempts and the cause.
A request that took :data:`SLOW_SHARE` of ``timeout`` or more is logged once a client, naming the timeout
(``timeout_flag``: the caller's name for it) and its value: a slow server otherwise stalled a run without a word.

Answers are checked before use (:mod:`.answers`; :class:`InvalidAnswer` names the sequence and row). After
:meth:`TeacherClient.remember_identity`, a server restarted with another teacher on the URL (its ``/health`` after a
failed attempt, or the ``model`` of a ``/v1/topk`` answer) raises :class:`TeacherReplaced`.
"""
from __future__ import annotations

import copy
import email.utils
import json
import logging
import os
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import requests

from swift_gkd_plugin.server.answers import (InvalidAnswer, TopKResult, _decode, _parse_completions, _parse_topk,
                                             _short, check_infer_answer)
from swift_gkd_plugin.server.protocol import LOGPROB_DTYPES, MSGPACK, WEIGHTS_KEY

try:
    import msgpack
except ImportError:
    msgpack = None

__all__ = ['InvalidAnswer', 'TeacherClient', 'TeacherReplaced', 'TeacherServerError', 'TopKResult',
           'check_infer_answer']

API_KEY_ENV = 'SWIFT_GKD_TEACHER_API_KEY'
# rate-limited (a gateway), a proxy without its server, or a busy server: retried within ``wait``
_UNAVAILABLE_STATUS = {429, 502, 503, 504}
_SERVER_ERROR_STATUS = {500}  # the server is up but failed: retried ``retries`` times only
#: the share of ``timeout`` a request may take before the client says so (once)
SLOW_SHARE = 0.2
_NOT_FOUND_STATUS = {404, 405}  # a route this server does not have
_logger = logging.getLogger(__name__)


class TeacherServerError(RuntimeError):
    """The teacher server could not be reached or refused a request."""

    def __init__(self, message: str, *, url: str, status: Optional[int] = None, attempts: int = 1):
        super().__init__(message)
        self.url = url
        self.status = status
        self.attempts = attempts


class TeacherReplaced(TeacherServerError):
    """The server answers for another model (or tokenizer) than the one :meth:`TeacherClient.remember_identity`
    recorded: restarted with another teacher on the same URL."""
    resume_when = 'once the run\'s teacher is served there again'


#: what names a served teacher in its ``GET /health`` (this plugin's server; vLLM's ``/v1/models`` id as ``model``);
#: its weights' fingerprint tells another model of the same name and tokenizer apart
IDENTITY_KEYS = ('model', 'tokenizer_sha256', 'vocab_size', WEIGHTS_KEY)


class TeacherClient:
    """Client of one teacher server (see the module docstring)."""

    def __init__(self, url: str, api_key: Optional[str] = None, timeout: float = 60.0, retries: int = 3,
                 backoff: float = 0.5, *, wait: float = 0.0, max_backoff: float = 10.0, binary: Optional[bool] = None,
                 logprobs_dtype: str = 'float32', log: Optional[Callable[[str], None]] = None,
                 timeout_flag: str = 'timeout'):
        if '://' not in url:
            url = f'http://{url}'
        self.url = url.rstrip('/')
        self.api_key = api_key if api_key is not None else (os.environ.get(API_KEY_ENV) or None)
        self.timeout = float(timeout)
        self.timeout_flag = timeout_flag
        self._said_slow = False
        self.retries = max(0, int(retries))
        self.backoff = float(backoff)
        self.wait = max(0.0, float(wait))
        self.max_backoff = float(max_backoff)
        self.log = log or _logger.warning
        self.binary = (msgpack is not None) if binary is None else bool(binary)
        if self.binary and msgpack is None:
            raise ImportError('binary=True needs msgpack (pip install msgpack)')
        if logprobs_dtype not in LOGPROB_DTYPES:
            raise ValueError(f'logprobs_dtype must be one of {sorted(LOGPROB_DTYPES)}')
        self.logprobs_dtype = logprobs_dtype
        self._session = requests.Session()
        self.vocab_size: Optional[int] = None  # the teacher's output rows when known (answers are checked against it)
        self.identity: Optional[Dict[str, Any]] = None  # the teacher at the start (remember_identity), or None
        self._checking_identity = False
        self.last_request_bytes = 0
        self.last_response_bytes = 0

    # ------------------------------------------------------------------------------------------------------------

    def close(self):
        self._session.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f'TeacherClient({self.url!r})'

    def _headers(self) -> Dict[str, str]:
        headers = {}
        if self.api_key:
            headers['Authorization'] = f'Bearer {self.api_key}'
        return headers

    def _attempt(self, method: str, url: str, body: Optional[bytes],
                 headers: Optional[Dict[str, str]]) -> Tuple[Optional[requests.Response], str, Optional[int]]:
        """One HTTP attempt: ``(response, '', status)`` on an answer, ``(None, cause, None)`` on no answer."""
        t0 = time.monotonic()
        try:
            resp = self._session.request(method, url, data=body, headers={**self._headers(), **(headers or {})},
                                         timeout=self.timeout)
        except requests.Timeout as e:
            return None, f'timed out after {self.timeout:g}s ({type(e).__name__})', None
        except requests.ConnectionError as e:
            return None, f'connection failed ({type(e).__name__}: {_short(e)})', None
        except requests.RequestException as e:
            return None, f'{type(e).__name__}: {_short(e)}', None
        self._note_slow(url, time.monotonic() - t0)
        return resp, '', resp.status_code

    def _note_slow(self, url: str, seconds: float) -> None:
        """Log once a client that an answer took :data:`SLOW_SHARE` of the timeout or more, naming the timeout."""
        if self._said_slow or seconds < SLOW_SHARE * self.timeout:
            return
        self._said_slow = True
        self.log(f'teacher server {url} took {seconds:.1f}s to answer a request, {seconds / self.timeout:.0%} of '
                 f'{self.timeout_flag} {self.timeout:g}s (a request unanswered by then fails and is retried): each '
                 f'step waits for such answers; if the server is this slow by design, raise {self.timeout_flag} '
                 '(said once)')

    def _retry_delay(self, attempt: int, elapsed: float, unavailable: bool, retry_after: float) -> Optional[float]:
        """Seconds to sleep before attempt ``attempt + 1``, or None when the budget is spent (see the module doc)."""
        delay = max(min(self.max_backoff, self.backoff * 2**(attempt - 1)), retry_after)
        left = self.wait - elapsed
        if attempt <= self.retries and retry_after <= max(left, 60.0):
            return delay
        if unavailable and left > 0 and retry_after <= left:
            return min(delay, left)
        return None

    def _call(self, method: str, path: str, *, body: Optional[bytes] = None, headers: Optional[Dict[str, str]] = None,
              parse: Optional[Callable[[requests.Response], Any]] = None) -> Any:
        """The 200 response (or ``parse(response)``, whose :class:`InvalidAnswer` counts as a failed attempt)."""
        url = f'{self.url}{path}'
        t0 = time.monotonic()
        attempt = 0
        lost = False  # an attempt found no server (or a restarting one): the one answering now may be another
        while True:
            attempt += 1
            resp, cause, status = self._attempt(method, url, body, headers)
            retry_after = 0.0
            lost = lost or status is None or status in _UNAVAILABLE_STATUS
            if status == 200:
                if lost:
                    self.check_identity(f'after {attempt - 1} failed attempt{"s" if attempt > 2 else ""}')
                if parse is None:
                    return resp
                try:
                    return parse(resp)
                except InvalidAnswer as e:
                    cause, status = f'invalid answer: {e}', 500  # the server's fault: counted retries
            elif resp is not None:
                cause = f'HTTP {status}: {_message(resp)}'
                if status not in _UNAVAILABLE_STATUS | _SERVER_ERROR_STATUS:
                    raise TeacherServerError(f'teacher server {url} refused the request: {cause}', url=url,
                                             status=status, attempts=attempt)
                retry_after = _retry_after_seconds(resp.headers.get('Retry-After', ''))
            elapsed = time.monotonic() - t0
            unavailable = status not in _SERVER_ERROR_STATUS
            delay = self._retry_delay(attempt, elapsed, unavailable, retry_after)
            if delay is None:
                if retry_after > max(0.0, self.wait - elapsed):
                    cause += (f' (the server asks to retry after {retry_after:.0f}s, more than the '
                              f'{max(0.0, self.wait - elapsed):.0f}s left of the {self.wait:g}s wait)')
                raise TeacherServerError(
                    f'teacher server {url} failed after {attempt} attempt{"s" if attempt > 1 else ""} '
                    f'({elapsed:.1f}s): {cause}', url=url, status=status, attempts=attempt)
            budget = (f'{max(0.0, self.wait - elapsed):.0f}s of the {self.wait:g}s wait left' if unavailable else
                      f'retry {attempt} of {self.retries}')
            self.log(f'teacher server {url}: attempt {attempt} failed ({cause}); retrying in {delay:.1f}s ({budget})')
            time.sleep(delay)

    # ------------------------------------------------------------------------------------------------------------

    def health(self) -> Dict[str, Any]:
        """The server's ``GET /health`` document (``{}`` when it answers 200 with no JSON, as ``swift deploy`` does)."""
        return _json_or_empty(self._call('GET', '/health'))

    def served_identity(self) -> Dict[str, Any]:
        """What names the teacher the server serves now (:data:`IDENTITY_KEYS` of its ``GET /health``; without a
        ``model`` there, the id of its ``GET /v1/models``, as ``vllm serve`` reports it)."""
        health = self.health()
        identity = {key: health[key] for key in IDENTITY_KEYS if health.get(key) is not None}
        if 'model' not in identity:
            model = (self.openai_model() or {}).get('id')
            if model is not None:
                identity['model'] = model
        return identity

    def remember_identity(self) -> Dict[str, Any]:
        """Record the served teacher (:meth:`served_identity`): after any attempt that found no server or a
        restarting one, and in every ``/v1/topk`` answer (its ``model``), the answering teacher is compared with it
        and a different one raises :class:`TeacherReplaced` (a server restarted with another model on this URL)."""
        self.identity = None
        self.identity = self.served_identity()
        return self.identity

    def check_identity(self, when: str) -> None:
        """:class:`TeacherReplaced` when the server now serves another teacher than :meth:`remember_identity`'s
        (nothing before it, and nothing while asking)."""
        if self.identity is None or self._checking_identity:
            return
        self._checking_identity = True
        try:
            now = self.served_identity()
        finally:
            self._checking_identity = False
        self._compare_identity(now, f'its GET /health {when}')

    def _compare_identity(self, now: Dict[str, Any], where: str) -> None:
        before = self.identity or {}
        changed = [key for key in IDENTITY_KEYS if key in before and key in now and before[key] != now[key]]
        if not changed:
            return

        def show(doc):
            return ', '.join(f'{key} {str(doc[key])[:16]!r}' for key in IDENTITY_KEYS if key in doc)

        raise TeacherReplaced(
            f'teacher server {self.url} now serves another teacher: {where} reports {show(now)}, the run started '
            f'against {show(before)} ({", ".join(changed)} changed: the server was restarted with another model). '
            'Its answers are not the teacher\'s: serve the run\'s teacher at this URL again', url=self.url)

    def wait_until_ready(self, timeout: Optional[float] = None) -> Dict[str, Any]:
        """Poll ``GET /health`` until it answers 200 (a server still loading its model), at most ``timeout``
        seconds (default: ``wait``); each failed poll is logged with its cause and the time left."""
        patient = copy.copy(self)
        patient.retries, patient.wait = 0, self.wait if timeout is None else max(0.0, float(timeout))
        return patient.health()

    def offers_topk(self) -> bool:
        """Whether the server has ``POST /v1/topk`` (this plugin's server), asked with a one-token request; a
        server with only ms-swift's routes (``swift deploy``, a vLLM teacher) answers 404."""
        probe = json.dumps({'sequences': [{'prompt_ids': [0], 'response_ids': [0]}], 'topk': 1}).encode()
        try:
            self._call('POST', '/v1/topk', body=probe, headers={'Content-Type': 'application/json'})
        except TeacherServerError as e:
            if e.status in _NOT_FOUND_STATUS:
                return False
            raise
        return True

    def offers_infer(self) -> bool:
        """Whether the server has ms-swift's ``POST /infer/`` (``swift deploy``), asked with an empty body: a server
        with the route refuses the body (422/400), one without it answers 404."""
        try:
            self._call('POST', '/infer/', body=b'{}', headers={'Content-Type': 'application/json'})
        except TeacherServerError as e:
            if e.status in _NOT_FOUND_STATUS:
                return False
            if e.status is not None and 400 <= e.status < 500:
                return True
            raise
        return True

    def openai_model(self) -> Optional[Dict[str, Any]]:
        """The first entry of an OpenAI-compatible server's ``GET /v1/models`` (``vllm serve``: ``id``,
        ``max_model_len``), or None for a server without the route."""
        try:
            doc = _json_or_empty(self._call('GET', '/v1/models'))
        except TeacherServerError as e:
            if e.status in _NOT_FOUND_STATUS:
                return None
            raise
        data = doc.get('data')
        return data[0] if isinstance(data, list) and data and isinstance(data[0], dict) else None

    def route(self) -> str:
        """How this server scores a sequence: ``'topk'`` (this plugin's ``POST /v1/topk``), ``'infer'`` (ms-swift's
        ``POST /infer/``, ``swift deploy``) or ``'completions'`` (an OpenAI-compatible server with vLLM's
        ``prompt_logprobs``: ``vllm serve``); asked in that order. A :class:`TeacherServerError` for none of them."""
        if self.offers_topk():
            return 'topk'
        if self.offers_infer():
            return 'infer'
        if self.openai_model() is not None:
            return 'completions'
        raise TeacherServerError(f'teacher server {self.url} offers none of POST /v1/topk (`swift-gkd serve-teacher`), '
                                 'POST /infer/ (`swift deploy`) and GET /v1/models + POST /v1/completions (`vllm '
                                 'serve`): it is not a teacher server', url=self.url, status=404)

    def tokenize(self, text: str) -> Optional[List[int]]:
        """vLLM's ``POST /tokenize`` of ``text`` without special tokens added, or None for a server without it."""
        body = json.dumps({'prompt': text, 'add_special_tokens': False}).encode()
        try:
            doc = _json_or_empty(self._call('POST', '/tokenize', body=body,
                                            headers={'Content-Type': 'application/json'}))
        except TeacherServerError as e:
            if e.status in _NOT_FOUND_STATUS:
                return None
            raise
        tokens = doc.get('tokens')
        return [int(t) for t in tokens] if isinstance(tokens, list) else None

    def prompt_logprobs_at(self, batch: Sequence[Tuple[Sequence[int], Sequence[int]]], topk: Optional[int] = None,
                           with_targets: bool = False, model: Optional[str] = None) -> List[TopKResult]:
        """:meth:`topk_at` through an OpenAI-compatible ``POST /v1/completions`` with vLLM's ``prompt_logprobs``
        (``vllm serve``): one prefill of each ``input_ids`` sent as token ids, one generated token discarded.

        Row ``j`` holds the ``topk`` most likely tokens after ``input_ids[:p + 1]`` (``p = positions[j]``) and, with
        ``with_targets``, the log-prob of ``input_ids[p + 1]``, which vLLM reports beside its top-k. vLLM's prompt
        log-probs are the model's own (temperature 1, before any sampling processor); its ``--max-logprobs`` bounds
        ``topk`` (refused with 400, raised at once).
        """
        seqs = [([int(t) for t in ids], [int(p) for p in pos]) for ids, pos in batch]
        if not seqs:
            return []
        k = int(topk or 0)
        doc: Dict[str, Any] = {'prompt': [ids for ids, _ in seqs], 'max_tokens': 1, 'temperature': 0.0,
                               'prompt_logprobs': k, 'return_token_ids': True}
        if model:
            doc['model'] = model
        body = json.dumps(doc, separators=(',', ':')).encode()

        def parse(resp):
            self.last_request_bytes, self.last_response_bytes = len(body), len(resp.content)
            return _parse_completions(_decode(resp), seqs, k, with_targets, self.vocab_size)

        return self._call('POST', '/v1/completions', body=body, headers={'Content-Type': 'application/json'},
                          parse=parse)

    def infer(self, infer_requests: List[Dict[str, Any]], request_config: Dict[str, Any]) -> List[Dict[str, Any]]:
        """ms-swift's ``POST /infer/``: the body ms-swift's ``VLLMInferClient.infer`` posts (requests and request
        config as plain dicts) and the server's JSON list of answers, one per request."""
        doc = {'infer_requests': infer_requests, 'request_config': request_config, 'metrics': None,
               'use_tqdm': False, 'adapter_request': None}
        body = json.dumps(doc).encode()
        topk = request_config.get('prompt_logprobs')

        def parse(resp):
            self.last_request_bytes, self.last_response_bytes = len(body), len(resp.content)
            answers = _decode(resp)
            if not isinstance(answers, list) or len(answers) != len(infer_requests):
                raise InvalidAnswer(f'{type(answers).__name__} '
                                    f'{len(answers) if isinstance(answers, list) else ""} for {len(infer_requests)} '
                                    'requests (expected one answer per request)')
            for i, answer in enumerate(answers):
                check_infer_answer(answer, i, topk, self.vocab_size)
            return answers

        return self._call('POST', '/infer/', body=body, headers={'Content-Type': 'application/json'}, parse=parse)

    def topk(self, batch: Sequence[Tuple[Sequence[int], Sequence[int]]], topk: Optional[int] = None,
             with_tail: bool = False, with_targets: bool = False) -> List[TopKResult]:
        """Top-k at every response token of each ``(prompt_ids, response_ids)``: ``R = len(response_ids)`` rows.

        Row ``j`` is the teacher's distribution of ``response_ids[j]`` given ``prompt_ids + response_ids[:j]``;
        ``with_targets``: also ``log p(response_ids[j])`` (``target_logprobs``).
        """
        seqs = [{'prompt_ids': [int(t) for t in p], 'response_ids': [int(t) for t in r]} for p, r in batch]
        return self._topk(seqs, topk, with_tail, with_targets)

    def topk_at(self, batch: Sequence[Tuple[Sequence[int], Sequence[int]]], topk: Optional[int] = None,
                with_tail: bool = False, with_targets: bool = False) -> List[TopKResult]:
        """Top-k at the given positions of each ``(input_ids, positions)`` (position ``p`` predicts token ``p+1``).

        This is the form a trainer uses on its encoded batch: ``positions`` are the indices ``p`` whose shifted
        label ``labels[p + 1]`` is not ``-100``.
        """
        seqs = [{'input_ids': [int(t) for t in ids], 'positions': [int(p) for p in pos]} for ids, pos in batch]
        return self._topk(seqs, topk, with_tail, with_targets)

    def topk_messages(self, batch: Sequence[List[Dict[str, Any]]], topk: Optional[int] = None,
                      with_tail: bool = False, add_eos='auto') -> List[TopKResult]:
        """Top-k at the response tokens of chats encoded by the server's ms-swift template (``input_ids`` and
        ``positions`` of each result tell where)."""
        seqs = [{'messages': list(m), 'add_eos': add_eos} for m in batch]
        return self._topk(seqs, topk, with_tail)

    def _topk(self, seqs: List[Dict[str, Any]], topk: Optional[int], with_tail: bool,
              with_targets: bool = False) -> List[TopKResult]:
        if not seqs:
            return []
        doc: Dict[str, Any] = {'sequences': seqs, 'with_tail': bool(with_tail), 'logprobs_dtype': self.logprobs_dtype}
        if with_targets:  # only then: an older server refuses the unknown field (422)
            doc['with_targets'] = True
        if topk is not None:
            doc['topk'] = int(topk)
        if self.binary:
            body = msgpack.packb(doc, use_bin_type=True)
            headers = {'Content-Type': MSGPACK, 'Accept': MSGPACK}
        else:
            body = json.dumps(doc, separators=(',', ':')).encode()
            headers = {'Content-Type': 'application/json', 'Accept': 'application/json'}
        expected = [len(q['response_ids']) if 'response_ids' in q else len(q['positions']) if 'positions' in q else None
                    for q in seqs]

        def parse(resp):
            self.last_request_bytes, self.last_response_bytes = len(body), len(resp.content)
            out = _decode(resp)
            if isinstance(out, dict) and out.get('model') is not None:  # every answer names the teacher that gave it
                self._compare_identity({'model': out['model']}, 'its answer')
            return _parse_topk(out, expected, self.vocab_size)

        return self._call('POST', '/v1/topk', body=body, headers=headers, parse=parse)


def _retry_after_seconds(header: str) -> float:
    """``Retry-After`` in seconds (delta-seconds or an HTTP date); 0 when absent or unreadable."""
    header = header.strip()
    if header.isdigit():
        return float(header)
    try:
        when = email.utils.parsedate_to_datetime(header)
    except (TypeError, ValueError):
        return 0.0
    return max(0.0, when.timestamp() - time.time()) if when is not None else 0.0


def _json_or_empty(resp: requests.Response) -> Dict[str, Any]:
    try:
        doc = resp.json()
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}


def _message(resp: requests.Response) -> str:
    try:
        doc = resp.json()
        msg = doc.get('message') or doc.get('detail') or doc
        if doc.get('detail') and doc.get('message') == 'malformed request':
            msg = f'malformed request: {doc["detail"]}'
        return str(msg)[:500]
    except Exception:
        return (resp.text or resp.reason or '')[:500]
