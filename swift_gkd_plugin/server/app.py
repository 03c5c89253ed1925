"""FastAPI application of the teacher server (endpoints and wire formats: :mod:`.protocol`).

Routes::

    GET  /health, /health/   status, model, vocabulary size, tokenizer fingerprint, the weights' and adapters'
                             fingerprints, limits, batcher statistics
    GET  /v1/models          the served model (OpenAI-style list)
    POST /infer/, /infer     ms-swift's teacher protocol (VLLMInferClient): prompt_logprobs per request
    POST /v1/topk            compact top-k (+ tail, + each next token's log-prob) arrays for token-id sequences
                             (absent with ``topk_route=False``)

Every request passes one ASGI gate first: it checks the API key when one is set (``Authorization: Bearer KEY`` or
``X-API-Key: KEY``, compared in constant time; 401 otherwise), reads the body up to ``max_body_bytes`` (413
beyond), and logs one line with the status and timings when the request ends.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
import uuid
from typing import Any, Dict, List, Optional

import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from swift_gkd_plugin.core.constants import IGNORE_INDEX
from swift_gkd_plugin.server.backend import DynamicBatcher, EncodeError, QueueFull, ScoreSpec, TooLong, TransformersTeacher
from swift_gkd_plugin.server.protocol import (ADAPTERS_KEY, IDS_DTYPE, LOGPROB_DTYPES, MSGPACK, TAIL_DTYPE, WEIGHTS_KEY,
                                              InferBody, TopKRequest, pack_array, tokenizer_fingerprint)

try:
    import msgpack
except ImportError:  # optional: JSON + base64 is always available
    msgpack = None

logger = logging.getLogger('swift_gkd_plugin.server')

__all__ = ['ServerConfig', 'create_app']


class ServerConfig:
    """Limits and policy of one server (the ``serve-teacher`` flags)."""

    def __init__(self, *, topk: int = 64, api_key: Optional[str] = None, max_batch_tokens: int = 8192,
                 max_queue: int = 4096, max_request_tokens: int = 1048576, max_body_bytes: int = 64 * 2**20,
                 max_seq_len: Optional[int] = None, batch_wait_ms: float = 0.0, public_health: bool = False,
                 topk_route: bool = True):
        self.topk = int(topk)
        self.api_key = api_key or None
        self.max_batch_tokens = int(max_batch_tokens)
        self.max_queue = int(max_queue)
        self.max_request_tokens = int(max_request_tokens)
        self.max_body_bytes = int(max_body_bytes)
        self.max_seq_len = int(max_seq_len) if max_seq_len else self.max_batch_tokens
        self.batch_wait_ms = float(batch_wait_ms)
        self.public_health = bool(public_health)  # GET /health without the key (ms-swift's client checks it so)
        self.topk_route = bool(topk_route)  # False: only /health and /infer/, like `swift deploy` (404 on /v1/topk)


# ----------------------------------------------------------------------------------------------------------------
# the gate: API key, body size, one log line per request
# ----------------------------------------------------------------------------------------------------------------


def _digest(value: bytes) -> bytes:
    return hashlib.sha256(value).digest()


class _Gate:
    """Pure ASGI middleware (see the module docstring)."""

    def __init__(self, app, config: ServerConfig):
        self.app = app
        self.config = config
        self._key_digest = _digest(config.api_key.encode()) if config.api_key else None

    def _authorized(self, headers: Dict[bytes, bytes]) -> bool:
        if self._key_digest is None:
            return True
        given = headers.get(b'x-api-key')
        auth = headers.get(b'authorization')
        if given is None and auth is not None and auth[:7].lower() == b'bearer ':
            given = auth[7:].strip()
        # constant time, and the digests hide the key's length
        return given is not None and hmac.compare_digest(_digest(given), self._key_digest)

    async def _reply(self, send, status: int, message: str, headers: Optional[Dict[str, str]] = None):
        body = json.dumps({'object': 'error', 'message': message, 'code': status}).encode()
        raw = [(b'content-type', b'application/json'), (b'content-length', str(len(body)).encode())]
        raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
        await send({'type': 'http.response.start', 'status': status, 'headers': raw})
        await send({'type': 'http.response.body', 'body': body})

    async def __call__(self, scope, receive, send):
        if scope['type'] != 'http':
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        info: Dict[str, Any] = {}
        scope.setdefault('state', {})['log'] = info
        status = [0]
        sent = [0]

        async def send_logged(message):
            if message['type'] == 'http.response.start':
                status[0] = message['status']
            elif message['type'] == 'http.response.body':
                sent[0] += len(message.get('body', b''))
            await send(message)

        try:
            headers = dict(scope.get('headers') or [])
            public = self.config.public_health and scope['method'] == 'GET' and scope.get('path') in (
                '/health', '/health/')
            if not public and not self._authorized(headers):
                return await self._reply(send_logged, 401, 'missing or invalid API key', {
                    'WWW-Authenticate': 'Bearer'})
            if scope['method'] in ('POST', 'PUT', 'PATCH'):
                limit = self.config.max_body_bytes
                declared = headers.get(b'content-length')
                if declared is not None and declared.isdigit() and int(declared) > limit:
                    return await self._reply(send_logged, 413, f'request body of {int(declared)} bytes exceeds '
                                             f'the limit of {limit} bytes')
                chunks, size = [], 0
                while True:
                    message = await receive()
                    if message['type'] == 'http.disconnect':
                        return
                    chunk = message.get('body', b'')
                    size += len(chunk)
                    if size > limit:
                        return await self._reply(send_logged, 413, f'request body exceeds the limit of {limit} '
                                                 'bytes')
                    chunks.append(chunk)
                    if not message.get('more_body', False):
                        break
                body = b''.join(chunks)
                info['bytes_in'] = len(body)
                delivered = [False]

                async def replay():
                    if not delivered[0]:
                        delivered[0] = True
                        return {'type': 'http.request', 'body': body, 'more_body': False}
                    return await receive()

                return await self.app(scope, replay, send_logged)
            return await self.app(scope, receive, send_logged)
        finally:
            # successful health checks (polled by clients and load balancers) only at debug level
            quiet = scope.get('path') in ('/health', '/health/') and status[0] == 200
            client = scope.get('client') or ('-', 0)
            extra = ' '.join(f'{k}={v}' for k, v in info.items())
            logger.log(logging.DEBUG if quiet else logging.INFO,
                       f'{client[0]}:{client[1]} "{scope["method"]} {scope.get("path")}" {status[0] or "-"} '
                       f'{(time.perf_counter() - t0) * 1e3:.1f}ms out={sent[0]}B {extra}'.rstrip())


# ----------------------------------------------------------------------------------------------------------------
# the application
# ----------------------------------------------------------------------------------------------------------------


def _error(status: int, message: str, headers: Optional[Dict[str, str]] = None) -> HTTPException:
    return HTTPException(status_code=status, detail=message, headers=headers)


def _check_ids(ids: List[int], vocab: int, what: str):
    if not ids:
        return
    low, high = min(ids), max(ids)  # Python ints: an id beyond int64 (e.g. sent in a chat message) cannot overflow
    if low < 0 or high >= vocab:
        raise _error(422, f'{what}: token ids must lie in [0, {vocab}), got min {low} max {high}')


class _Routes:
    """The server's routes over one teacher: each route one method (``/health``, ``/v1/models``, ms-swift's
    ``/infer``, the compact ``/v1/topk``), sharing the teacher, its batcher and the request limits of ``config``."""

    def __init__(self, teacher: TransformersTeacher, config: ServerConfig):
        self.teacher, self.config = teacher, config
        self.batcher = DynamicBatcher(teacher.score, max_batch_tokens=config.max_batch_tokens,
                                      max_queue=config.max_queue, batch_wait_s=config.batch_wait_ms / 1e3)
        self.max_seq_len = min(config.max_seq_len, config.max_batch_tokens,
                               teacher.max_length or config.max_batch_tokens)
        self.vocab, self.n_emb = teacher.vocab_size, teacher.num_embeddings
        self.fingerprint = tokenizer_fingerprint(teacher.tokenizer)  # the trainer refuses another tokenizer's teacher
        # the served weights (computed once, as the teacher loaded): a teacher-score store keeps them, a run reading
        # one beside this server compares them (none where unknown)
        self.weights = ({WEIGHTS_KEY: teacher.weights_fingerprint, ADAPTERS_KEY: teacher.adapters_fingerprint}
                        if teacher.weights_fingerprint else {})
        # a text of more characters than this cannot encode into max_seq_len tokens (no token spells more than the
        # longest vocabulary entry): longer messages are refused before the tokenizer reads them
        self.max_chars = self.max_seq_len * max((len(token) for token in teacher.tokenizer.get_vocab()), default=1)

    async def health(self):
        teacher, config = self.teacher, self.config
        return {'status': 'ok', 'model': teacher.name, 'vocab_size': self.vocab,
                'tokenizer_size': len(teacher.tokenizer), 'tokenizer_sha256': self.fingerprint, **self.weights,
                'max_topk': config.topk, 'max_seq_len': self.max_seq_len,
                'max_request_tokens': config.max_request_tokens, 'msgpack': msgpack is not None,
                'chat_template': teacher.template is not None, 'batcher': self.batcher.stats()}

    async def models(self):
        return {'object': 'list',
                'data': [{'id': self.teacher.name, 'object': 'model', 'owned_by': 'swift-gkd-plugin'}]}

    async def score(self, request: Request, specs: List[ScoreSpec]):
        """Queue ``specs`` and wait for their results (503 when the queue is full, 500 when the forward fails)."""
        import asyncio
        loop = asyncio.get_running_loop()
        future = loop.create_future()

        def on_done(results, error):
            def resolve():
                if not future.done():
                    if error is not None:
                        future.set_exception(error)
                    else:
                        future.set_result(results)
            loop.call_soon_threadsafe(resolve)

        n_tok = sum(s.num_tokens for s in specs)
        if len(specs) > self.config.max_queue:
            raise _error(413, f'{len(specs)} sequences in one request; this server takes at most '
                         f'{self.config.max_queue} (--max_queue)')
        if n_tok > self.config.max_request_tokens:
            raise _error(413, f'{n_tok} tokens in one request; this server takes at most '
                         f'{self.config.max_request_tokens} (--max_request_tokens)')
        log = request.scope['state']['log']
        log.update(seqs=len(specs), tokens=n_tok)
        try:
            job = self.batcher.submit(specs, on_done)
        except QueueFull as e:
            log['queue'] = 'full'
            raise _error(503, f'teacher server busy: {e}; retry later', {'Retry-After': str(e.retry_after)})
        try:
            results = await future
        except Exception as e:
            raise _error(500, f'teacher forward failed: {type(e).__name__}: {e}')
        if job.started is not None:
            log['wait_ms'] = f'{(job.started - job.enqueued) * 1e3:.1f}'
        return results
    def limit_len(self, n: int, what: str):
        if n > self.max_seq_len:
            raise _error(413, f'{what}: {n} tokens; this server takes at most {self.max_seq_len} per sequence')
    def limit_chars(self, parts, what: str):
        """Messages (and their tools) of more characters than ``max_chars`` would encode beyond ``max_seq_len``:
        refused before the tokenizer reads them (a 21 MB request was tokenized whole, 7.3M tokens, for a
        512-token limit)."""
        n = sum(_characters(part) for part in parts)
        if n > self.max_chars:
            raise _error(413, f'{what}: {n} characters of messages, more than the {self.max_seq_len} tokens this server '
                         f'takes per sequence can hold ({self.max_chars} characters at most)')
    async def parse(self, request: Request, model_cls):
        """Decode (JSON or msgpack) and validate the body, off the event loop (bodies may be megabytes)."""
        raw = await request.body()
        ctype = request.headers.get('content-type', '').split(';')[0].strip().lower()
        if ctype == MSGPACK and msgpack is None:
            raise _error(415, 'msgpack is not installed on the server: send JSON')

        def decode():
            try:
                data = msgpack.unpackb(raw, raw=False) if ctype == MSGPACK else json.loads(raw)
            except Exception as e:
                raise _error(422, f'malformed body: {type(e).__name__}: {e}')
            try:
                return model_cls.model_validate(data)
            except ValidationError as e:
                raise RequestValidationError(e.errors())

        return await run_in_threadpool(decode)
    async def infer(self, request: Request):
        body: InferBody = await self.parse(request, InferBody)
        cfg = body.request_config
        k = cfg.prompt_logprobs if cfg is not None else None
        if cfg is not None:
            if cfg.stream or cfg.n != 1:
                raise _error(422, 'this teacher server only scores: stream and n > 1 are not supported')
            if cfg.max_tokens is not None and cfg.max_tokens > 1:
                raise _error(422, f'this teacher server only scores (it generates at most 1 token): '
                             f'max_tokens={cfg.max_tokens}')
        if k is not None and k > self.config.topk:
            raise _error(422, f'prompt_logprobs={k} exceeds the server limit of {self.config.topk} (--top_k)')
        if not body.infer_requests:
            return JSONResponse([])

        def encode_all():
            out = []
            for i, r in enumerate(body.infer_requests):
                self.limit_chars([r.messages, r.tools, r.chat_template_kwargs], f'infer_requests[{i}]')
                req = {'messages': r.messages, 'tools': r.tools, 'objects': r.objects,
                       'chat_template_kwargs': r.chat_template_kwargs or {}}
                if r.add_eos is not None:
                    req['add_eos'] = r.add_eos
                try:
                    ids, _ = self.teacher.encode(req)
                except TooLong as e:
                    raise _error(413, f'infer_requests[{i}]: {e}')
                except EncodeError as e:
                    raise _error(422, f'infer_requests[{i}]: {e}')
                if not ids:
                    raise _error(422, f'infer_requests[{i}]: encodes to no tokens')
                _check_ids(ids, self.n_emb, f'infer_requests[{i}]')
                self.limit_len(len(ids), f'infer_requests[{i}]')
                out.append(ids)
            return out

        encoded = await run_in_threadpool(encode_all)
        specs = [ScoreSpec(ids, torch.arange(len(ids)), topk=k or 0, with_targets=k is not None) for ids in encoded]
        results = await self.score(request, specs)
        request.scope['state']['log']['k'] = k

        def build():
            table = self.teacher.decoded_tokens()
            eos = getattr(self.teacher.tokenizer, 'eos_token_id', None)
            out = []
            for ids, res in zip(encoded, results):
                nxt = int(res.argmax[-1])
                resp = {
                    'model': self.teacher.name,
                    'choices': [{'index': 0, 'message': {'role': 'assistant', 'content': table[nxt]},
                                 'finish_reason': 'stop' if nxt == eos else 'length', 'logprobs': None,
                                 'token_ids': [nxt]}],
                    'usage': {'prompt_tokens': len(ids), 'completion_tokens': 1, 'total_tokens': len(ids) + 1},
                    'id': f'chatcmpl-{uuid.uuid4().hex}', 'object': 'chat.completion', 'created': int(time.time()),
                    'prompt_token_ids': ids,
                    'prompt_logprobs': _prompt_logprobs(ids, res, k, table) if k is not None else None,
                }
                out.append(resp)
            return json.dumps(out, ensure_ascii=False, separators=(',', ':')).encode()

        payload = await run_in_threadpool(build)
        return Response(payload, media_type='application/json')
    async def topk(self, request: Request):
        body: TopKRequest = await self.parse(request, TopKRequest)
        k = body.topk if body.topk is not None else self.config.topk
        if k > self.config.topk:
            raise _error(422, f'topk={k} exceeds the server limit of {self.config.topk} (--top_k)')
        k = min(k, self.vocab)
        binary = MSGPACK in request.headers.get('accept', '') and msgpack is not None
        encoding = 'raw' if binary else body.encoding

        def prepare():
            specs, extras = [], []
            for i, s in enumerate(body.sequences):
                extra = {}
                if s.prompt_ids is not None:  # with targets the last response token is read too (it is one)
                    ids = list(s.prompt_ids) + list(s.response_ids if body.with_targets else s.response_ids[:-1])
                    P, R = len(s.prompt_ids), len(s.response_ids)
                    _check_ids(s.prompt_ids, self.n_emb, f'sequences[{i}]')
                    _check_ids(s.response_ids, self.vocab, f'sequences[{i}]')
                    positions = torch.arange(P - 1, P + R - 1)
                elif s.input_ids is not None:
                    ids = list(s.input_ids)
                    _check_ids(ids, self.n_emb, f'sequences[{i}]')
                    positions = torch.as_tensor(s.positions, dtype=torch.long)
                    if int(positions.min()) < 0 or int(positions.max()) >= len(ids):
                        raise _error(422, f'sequences[{i}]: positions must lie in [0, {len(ids)})')
                    if len(positions) > len(ids):
                        raise _error(422, f'sequences[{i}]: {len(positions)} positions for a sequence of {len(ids)} '
                                     'tokens: each position at most once')
                else:
                    self.limit_chars([s.messages, s.tools, s.chat_template_kwargs], f'sequences[{i}]')
                    req = {'messages': s.messages, 'tools': s.tools,
                           'chat_template_kwargs': s.chat_template_kwargs or {}}
                    if s.add_eos is not None:
                        req['add_eos'] = s.add_eos
                    try:
                        ids, labels = self.teacher.encode(req, train=True)
                    except TooLong as e:
                        raise _error(413, f'sequences[{i}]: {e}')
                    except EncodeError as e:
                        raise _error(422, f'sequences[{i}]: {e}')
                    pos = [p for p in range(len(ids) - 1) if labels is not None and labels[p + 1] != IGNORE_INDEX]
                    if not pos:
                        raise _error(422, f'sequences[{i}]: the messages hold no response token to score')
                    _check_ids(ids, self.n_emb, f'sequences[{i}]')
                    positions = torch.as_tensor(pos, dtype=torch.long)
                    extra = {'input_ids': ids, 'positions': pos}
                self.limit_len(len(ids), f'sequences[{i}]')
                specs.append(ScoreSpec(ids, positions, topk=k, with_tail=body.with_tail, with_targets=body.with_targets))
                extras.append(extra)
            return specs, extras

        specs, extras = await run_in_threadpool(prepare)
        results = await self.score(request, specs)
        log = request.scope['state']['log']
        log.update(k=k, positions=sum(int(s.positions.numel()) for s in specs))
        lp_dtype = LOGPROB_DTYPES[body.logprobs_dtype]

        def build():
            out = []
            for res, extra in zip(results, extras):
                item = {'num_positions': int(res.ids.shape[0]),
                        'ids': pack_array(res.ids.numpy(), IDS_DTYPE, encoding),
                        'logprobs': pack_array(res.logprobs.numpy(), lp_dtype, encoding)}
                if body.with_tail:
                    item['tail'] = pack_array(res.tail.numpy(), TAIL_DTYPE, encoding)
                if body.with_targets:  # float32; NaN where no token follows the position
                    item['target_logprobs'] = pack_array(res.target_logprobs.numpy(), TAIL_DTYPE, encoding)
                item.update(extra)
                out.append(item)
            doc = {'object': 'teacher.topk', 'model': self.teacher.name, 'topk': k, 'vocab_size': self.vocab,
                   'encoding': 'raw' if binary else body.encoding,
                   'dtypes': {'ids': 'int32', 'logprobs': body.logprobs_dtype, 'tail': 'float32'}, 'results': out}
            if binary:
                return msgpack.packb(doc, use_bin_type=True), MSGPACK
            return json.dumps(doc, separators=(',', ':')).encode(), 'application/json'

        payload, media = await run_in_threadpool(build)
        return Response(payload, media_type=media)


def create_app(teacher: TransformersTeacher, config: ServerConfig) -> FastAPI:
    """The FastAPI app (wrapped in the gate) serving ``teacher`` under ``config``: the routes of :class:`_Routes`,
    their errors as JSON, the batcher started and stopped with the app."""
    from contextlib import asynccontextmanager
    routes = _Routes(teacher, config)

    @asynccontextmanager
    async def lifespan(_app):
        routes.batcher.start()
        try:
            yield
        finally:
            routes.batcher.stop()

    app = FastAPI(title='swift-gkd teacher server', lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.teacher = teacher
    app.state.batcher = routes.batcher
    app.state.config = config
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    for path in ('/health', '/health/'):
        app.add_api_route(path, routes.health, methods=['GET'])
    app.add_api_route('/v1/models', routes.models, methods=['GET'])
    for path in ('/infer/', '/infer'):  # ms-swift's protocol
        app.add_api_route(path, routes.infer, methods=['POST'])
    if config.topk_route:  # the compact endpoint
        app.add_api_route('/v1/topk', routes.topk, methods=['POST'])
    return _Gate(app, config)


async def _http_error(request: Request, exc: HTTPException):
    _log_error(request, str(exc.detail))
    return JSONResponse({'object': 'error', 'message': str(exc.detail), 'code': exc.status_code},
                        status_code=exc.status_code, headers=exc.headers)


async def _validation_error(request: Request, exc: RequestValidationError):
    errors = [{k: v for k, v in e.items() if k not in ('input', 'url', 'ctx')} for e in exc.errors()]
    _log_error(request, '; '.join(f'{".".join(map(str, e.get("loc", ())))}: {e.get("msg")}' for e in errors))
    return JSONResponse({'object': 'error', 'message': 'malformed request', 'detail': _jsonable(errors),
                         'code': 422}, status_code=422)


def _prompt_logprobs(ids: List[int], res, k: int, table: List[str]) -> List[Optional[Dict[str, Any]]]:
    """vLLM's prompt_logprobs: ``None``, then per token its top-k plus the token itself (with its rank)."""
    out: List[Optional[Dict[str, Any]]] = [None]
    top_ids = res.ids.tolist()
    top_lp = res.logprobs.tolist()
    t_lp = res.target_logprobs.tolist()
    t_rank = res.target_ranks.tolist()
    for p in range(len(ids) - 1):
        entry = {}
        for r, (tid, lp) in enumerate(zip(top_ids[p], top_lp[p])):
            entry[str(tid)] = {'logprob': lp, 'rank': r + 1, 'decoded_token': table[tid]}
        tok = ids[p + 1]
        key = str(tok)
        if key not in entry:
            entry[key] = {'logprob': t_lp[p], 'rank': int(t_rank[p]), 'decoded_token': table[tok]}
        out.append(entry)
    return out


def _characters(obj) -> int:
    """The characters of every string value in a JSON value (keys left out: a lower bound of the text encoded)."""
    if isinstance(obj, str):
        return len(obj)
    values = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else ()
    return sum(_characters(value) for value in values)


def _log_error(request: Request, message: str):
    log = request.scope.get('state', {}).get('log')
    if log is not None:
        log['error'] = json.dumps(message[:160])


def _jsonable(obj):
    try:
        json.dumps(obj)
        return obj
    except TypeError:
        return json.loads(json.dumps(obj, default=str))
