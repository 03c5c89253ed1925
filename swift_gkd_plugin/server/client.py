"""A small client of the teacher server's compact endpoint (``POST /v1/topk``).

::

    from swift_gkd_plugin.server import TeacherClient
    client = TeacherClient('http://127.0.0.1:8000', timeout=60, retries=3, backoff=0.5)
    client.health()
    results = client.topk([(prompt_ids, response_ids), ...], topk=64, with_tail=True)
    results[0].ids        # [R, k] int64: the teacher's top-k token ids at each response token
    results[0].logprobs   # [R, k] float32: their full-vocabulary log-probabilities (temperature 1)
    results[0].tail       # [R] float32: log(1 - sum(exp(logprobs))), or None without with_tail

Connection errors, timeouts and HTTP 429/500/502/503/504 are retried ``retries`` times with exponential backoff
(``backoff * 2**attempt`` seconds, at most ``max_backoff``, and at least the server's ``Retry-After``); other
refusals (401, 413, 422, ...) are raised at once. Every failure raises :class:`TeacherServerError`, whose message
names the URL, the number of attempts and the cause.
"""
from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import requests

from .protocol import IDS_DTYPE, LOGPROB_DTYPES, MSGPACK, TAIL_DTYPE, unpack_array

try:
    import msgpack
except ImportError:
    msgpack = None

__all__ = ['TeacherClient', 'TeacherServerError', 'TopKResult']

API_KEY_ENV = 'SWIFT_GKD_TEACHER_API_KEY'
_RETRY_STATUS = {429, 500, 502, 503, 504}


class TeacherServerError(RuntimeError):
    """The teacher server could not be reached or refused a request."""

    def __init__(self, message: str, *, url: str, status: Optional[int] = None, attempts: int = 1):
        super().__init__(message)
        self.url = url
        self.status = status
        self.attempts = attempts


@dataclass
class TopKResult:
    ids: Any  # torch.LongTensor [R, k]
    logprobs: Any  # torch.FloatTensor [R, k]
    tail: Any = None  # torch.FloatTensor [R] or None
    input_ids: Optional[List[int]] = None  # messages form: the encoded sequence
    positions: Optional[List[int]] = None  # messages form: the scored positions


class TeacherClient:
    """Client of one teacher server (see the module docstring)."""

    def __init__(self, url: str, api_key: Optional[str] = None, timeout: float = 60.0, retries: int = 3,
                 backoff: float = 0.5, *, max_backoff: float = 10.0, binary: Optional[bool] = None,
                 logprobs_dtype: str = 'float32'):
        if '://' not in url:
            url = f'http://{url}'
        self.url = url.rstrip('/')
        self.api_key = api_key if api_key is not None else (os.environ.get(API_KEY_ENV) or None)
        self.timeout = float(timeout)
        self.retries = max(0, int(retries))
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self.binary = (msgpack is not None) if binary is None else bool(binary)
        if self.binary and msgpack is None:
            raise ImportError('binary=True needs msgpack (pip install msgpack)')
        if logprobs_dtype not in LOGPROB_DTYPES:
            raise ValueError(f'logprobs_dtype must be one of {sorted(LOGPROB_DTYPES)}')
        self.logprobs_dtype = logprobs_dtype
        self._session = requests.Session()
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

    def _call(self, method: str, path: str, *, body: Optional[bytes] = None,
              headers: Optional[Dict[str, str]] = None) -> requests.Response:
        url = f'{self.url}{path}'
        attempts = self.retries + 1
        t0 = time.monotonic()
        cause = 'no attempt made'
        status = None
        for attempt in range(attempts):
            wait = min(self.max_backoff, self.backoff * 2**attempt)
            try:
                resp = self._session.request(method, url, data=body, headers={**self._headers(), **(headers or {})},
                                             timeout=self.timeout)
            except requests.Timeout as e:
                cause, status = f'timed out after {self.timeout:g}s ({type(e).__name__})', None
            except requests.ConnectionError as e:
                cause, status = f'connection failed ({type(e).__name__}: {_short(e)})', None
            except requests.RequestException as e:
                cause, status = f'{type(e).__name__}: {_short(e)}', None
            else:
                if resp.status_code == 200:
                    return resp
                status = resp.status_code
                cause = f'HTTP {status}: {_message(resp)}'
                if status not in _RETRY_STATUS:
                    raise TeacherServerError(f'teacher server {url} refused the request: {cause}', url=url,
                                             status=status, attempts=attempt + 1)
                retry_after = resp.headers.get('Retry-After')
                if retry_after and retry_after.strip().isdigit():
                    wait = max(wait, min(60.0, float(retry_after)))
            if attempt + 1 < attempts:
                time.sleep(wait)
        raise TeacherServerError(
            f'teacher server {url} failed after {attempts} attempt{"s" if attempts > 1 else ""} '
            f'({time.monotonic() - t0:.1f}s): {cause}', url=url, status=status, attempts=attempts)

    # ------------------------------------------------------------------------------------------------------------

    def health(self) -> Dict[str, Any]:
        """The server's ``/health/`` document (status, model, vocabulary size, limits, batcher statistics)."""
        return self._call('GET', '/health/').json()

    def wait_until_ready(self, timeout: float = 300.0, interval: float = 1.0) -> Dict[str, Any]:
        """Poll ``/health/`` until it answers (a server still loading its model), or raise after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                resp = self._session.get(f'{self.url}/health/', headers=self._headers(), timeout=self.timeout)
                if resp.status_code == 200:
                    return resp.json()
                if resp.status_code == 401:
                    raise TeacherServerError(f'teacher server {self.url}/health/ refused the request: HTTP 401: '
                                             f'{_message(resp)}', url=f'{self.url}/health/', status=401)
                cause = f'HTTP {resp.status_code}'
            except requests.RequestException as e:
                cause = f'{type(e).__name__}: {_short(e)}'
            if time.monotonic() > deadline:
                raise TeacherServerError(f'teacher server {self.url} not ready after {timeout:g}s: {cause}',
                                         url=f'{self.url}/health/')
            time.sleep(interval)

    def topk(self, batch: Sequence[Tuple[Sequence[int], Sequence[int]]], topk: Optional[int] = None,
             with_tail: bool = False) -> List[TopKResult]:
        """Top-k at every response token of each ``(prompt_ids, response_ids)``: ``R = len(response_ids)`` rows.

        Row ``j`` is the teacher's distribution of ``response_ids[j]`` given ``prompt_ids + response_ids[:j]``.
        """
        seqs = [{'prompt_ids': [int(t) for t in p], 'response_ids': [int(t) for t in r]} for p, r in batch]
        return self._topk(seqs, topk, with_tail)

    def topk_at(self, batch: Sequence[Tuple[Sequence[int], Sequence[int]]], topk: Optional[int] = None,
                with_tail: bool = False) -> List[TopKResult]:
        """Top-k at the given positions of each ``(input_ids, positions)`` (position ``p`` predicts token ``p+1``).

        This is the form a trainer uses on its encoded batch: ``positions`` are the indices ``p`` whose shifted
        label ``labels[p + 1]`` is not ``-100``.
        """
        seqs = [{'input_ids': [int(t) for t in ids], 'positions': [int(p) for p in pos]} for ids, pos in batch]
        return self._topk(seqs, topk, with_tail)

    def topk_messages(self, batch: Sequence[List[Dict[str, Any]]], topk: Optional[int] = None,
                      with_tail: bool = False, add_eos='auto') -> List[TopKResult]:
        """Top-k at the response tokens of chats encoded by the server's ms-swift template (``input_ids`` and
        ``positions`` of each result tell where)."""
        seqs = [{'messages': list(m), 'add_eos': add_eos} for m in batch]
        return self._topk(seqs, topk, with_tail)

    def _topk(self, seqs: List[Dict[str, Any]], topk: Optional[int], with_tail: bool) -> List[TopKResult]:
        import torch
        if not seqs:
            return []
        doc: Dict[str, Any] = {'sequences': seqs, 'with_tail': bool(with_tail), 'logprobs_dtype': self.logprobs_dtype}
        if topk is not None:
            doc['topk'] = int(topk)
        if self.binary:
            body = msgpack.packb(doc, use_bin_type=True)
            headers = {'Content-Type': MSGPACK, 'Accept': MSGPACK}
        else:
            body = json.dumps(doc, separators=(',', ':')).encode()
            headers = {'Content-Type': 'application/json', 'Accept': 'application/json'}
        resp = self._call('POST', '/v1/topk', body=body, headers=headers)
        self.last_request_bytes, self.last_response_bytes = len(body), len(resp.content)
        if resp.headers.get('content-type', '').startswith(MSGPACK):
            out = msgpack.unpackb(resp.content, raw=False)
        else:
            out = resp.json()
        k = int(out['topk'])
        lp_dtype = LOGPROB_DTYPES[out.get('dtypes', {}).get('logprobs', 'float32')]
        results = []
        for item in out['results']:
            n = int(item['num_positions'])
            ids = torch.from_numpy(unpack_array(item['ids'], IDS_DTYPE, (n, k))).long()
            lps = torch.from_numpy(unpack_array(item['logprobs'], lp_dtype, (n, k))).float()
            tail = item.get('tail')
            tail = torch.from_numpy(unpack_array(tail, TAIL_DTYPE, (n, ))) if tail is not None else None
            results.append(TopKResult(ids, lps, tail, item.get('input_ids'), item.get('positions')))
        return results


def _message(resp: requests.Response) -> str:
    try:
        doc = resp.json()
        msg = doc.get('message') or doc.get('detail') or doc
        if doc.get('detail') and doc.get('message') == 'malformed request':
            msg = f'malformed request: {doc["detail"]}'
        return str(msg)[:500]
    except Exception:
        return (resp.text or resp.reason or '')[:500]


def _short(e: BaseException) -> str:
    text = str(e)
    m = re.search(r'\[Errno -?\d+\][^\'")]*', text)  # the root cause of urllib3's nested message
    if m:
        return m.group(0).strip()
    return text if len(text) < 300 else text[:300] + '...'
