"""Wire formats of the teacher server (shared by :mod:`.app` and :mod:`.client`).

Two endpoints score sequences; both run the teacher over a whole sequence in one forward pass and report, at the
requested positions, the teacher's full-vocabulary ``log_softmax`` (temperature 1) restricted to its ``k`` most
likely tokens.

``POST /infer/`` -- ms-swift's teacher protocol
    The body ms-swift's ``VLLMInferClient.infer`` posts (``{"infer_requests": [...], "request_config": {...}}``),
    each request a chat whose last assistant message may carry the response as token ids (ms-swift's
    ``replace_assistant_response_with_ids``). The answer is a JSON list of ``ChatCompletionResponse`` objects with
    vLLM-style ``prompt_logprobs``: a list over the encoded tokens, ``None`` first, then for position ``i`` a dict
    ``{"<token id>": {"logprob": float, "rank": int, "decoded_token": str}}`` holding the top-k tokens of the
    distribution that predicts token ``i`` plus token ``i`` itself when it is not among them (as vLLM does).
    ms-swift's ``parse_prompt_logprobs`` reads it.

``POST /v1/topk`` -- the compact endpoint
    Body (JSON, or msgpack with ``Content-Type: application/msgpack``)::

        {"sequences": [{"prompt_ids": [...], "response_ids": [...]}        # scores each response token
                       | {"input_ids": [...], "positions": [...]}          # scores the given positions
                       | {"messages": [...], "add_eos": "auto"}],          # encoded with ms-swift's template
         "topk": 64, "with_tail": false, "encoding": "base64", "logprobs_dtype": "float32"}

    Position ``p`` is the distribution that predicts token ``p + 1``; ``prompt_ids`` + ``response_ids`` asks for
    ``p = P-1 .. P+R-2`` (one row per response token). The answer holds, per sequence, ``ids`` (int32) and
    ``logprobs`` (float32 or float16), both ``[R, k]`` row-major, and with ``with_tail`` the ``[R]`` float32
    ``tail = log(1 - sum(exp(logprobs)))`` (computed as ``logsumexp`` over the tokens outside the top-k, so with
    no cancellation; ``-inf`` when the top-k covers the vocabulary). ``encoding`` is ``"base64"`` (little-endian
    packed arrays as base64 strings) or ``"list"`` (plain JSON lists). With ``Accept: application/msgpack`` the
    answer is msgpack and the arrays are raw little-endian bytes.
"""
from __future__ import annotations

import base64
import hashlib
import json
from typing import Annotated, Any, Dict, List, Literal, Optional, Tuple, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, model_validator

__all__ = [
    'MSGPACK', 'TopKSequence', 'TopKRequest', 'InferRequestModel', 'RequestConfigModel', 'InferBody',
    'pack_array', 'unpack_array', 'IDS_DTYPE', 'TAIL_DTYPE', 'LOGPROB_DTYPES', 'tokenizer_fingerprint',
    'WEIGHTS_KEY', 'ADAPTERS_KEY', 'reported_fingerprints',
]

MSGPACK = 'application/msgpack'
IDS_DTYPE = '<i4'
TAIL_DTYPE = '<f4'
LOGPROB_DTYPES = {'float32': '<f4', 'float16': '<f2'}

AddEos = Optional[Union[StrictBool, Literal['auto']]]
# Token ids and positions become int64 tensors: a value outside int64 is malformed input (422), not an overflow (500).
Int64 = Annotated[StrictInt, Field(ge=-2**63, le=2**63 - 1)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra='forbid')


class TopKSequence(_Strict):
    """One sequence of a ``/v1/topk`` request: exactly one of the three forms."""
    prompt_ids: Optional[List[Int64]] = None
    response_ids: Optional[List[Int64]] = None
    input_ids: Optional[List[Int64]] = None
    positions: Optional[List[Int64]] = None
    messages: Optional[List[Dict[str, Any]]] = None
    tools: Optional[List[Any]] = None
    chat_template_kwargs: Optional[Dict[str, Any]] = None
    add_eos: AddEos = 'auto'

    @model_validator(mode='after')
    def _one_form(self):
        forms = [self.prompt_ids is not None or self.response_ids is not None,
                 self.input_ids is not None or self.positions is not None,
                 self.messages is not None]
        if sum(forms) != 1:
            raise ValueError('give exactly one of: prompt_ids + response_ids, input_ids + positions, messages')
        if forms[0]:
            if self.prompt_ids is None or self.response_ids is None:
                raise ValueError('prompt_ids and response_ids go together')
            if not self.prompt_ids:
                raise ValueError('prompt_ids must not be empty (the first response token needs a context)')
            if not self.response_ids:
                raise ValueError('response_ids must not be empty')
        if forms[1]:
            if self.input_ids is None or self.positions is None:
                raise ValueError('input_ids and positions go together')
            if not self.input_ids or not self.positions:
                raise ValueError('input_ids and positions must not be empty')
        if forms[2] and not self.messages:
            raise ValueError('messages must not be empty')
        return self


class TopKRequest(_Strict):
    sequences: List[TopKSequence] = Field(min_length=1)
    topk: Optional[StrictInt] = Field(None, ge=1)
    with_tail: StrictBool = False
    with_targets: StrictBool = False  # also the log-prob of the token that follows each position (prefill scoring)
    encoding: Literal['base64', 'list'] = 'base64'
    logprobs_dtype: Literal['float32', 'float16'] = 'float32'


class InferRequestModel(BaseModel):
    """ms-swift's ``RolloutInferRequest`` as posted by ``VLLMInferClient`` (unknown keys are ignored)."""
    model_config = ConfigDict(extra='ignore')
    messages: List[Dict[str, Any]] = Field(min_length=1)
    images: List[Any] = Field(default_factory=list)
    audios: List[Any] = Field(default_factory=list)
    videos: List[Any] = Field(default_factory=list)
    tools: Optional[List[Any]] = None
    objects: Dict[str, Any] = Field(default_factory=dict)
    chat_template_kwargs: Optional[Dict[str, Any]] = None
    add_eos: AddEos = None
    uuid: Optional[str] = None

    @model_validator(mode='after')
    def _text_only(self):
        if self.images or self.audios or self.videos:
            raise ValueError('this teacher server is text-only: images, audios and videos must be empty')
        return self


class RequestConfigModel(BaseModel):
    """The fields of ms-swift's ``RequestConfig`` this server looks at (the others are ignored)."""
    model_config = ConfigDict(extra='ignore')
    prompt_logprobs: Optional[StrictInt] = Field(None, ge=0)
    max_tokens: Optional[StrictInt] = None
    n: StrictInt = 1
    stream: StrictBool = False


class InferBody(BaseModel):
    model_config = ConfigDict(extra='ignore')
    infer_requests: List[InferRequestModel]
    request_config: Optional[RequestConfigModel] = None


def pack_array(array: np.ndarray, dtype: str, encoding: str) -> Union[str, bytes, list]:
    """``array`` as little-endian ``dtype`` bytes: base64 text, raw bytes (msgpack) or a nested list."""
    if encoding == 'list':
        out = np.asarray(array, dtype=np.dtype(dtype).newbyteorder('=')).tolist()
        return out
    raw = np.ascontiguousarray(array, dtype=np.dtype(dtype)).tobytes()
    return raw if encoding == 'raw' else base64.b64encode(raw).decode('ascii')


def unpack_array(value: Union[str, bytes, list], dtype: str, shape) -> np.ndarray:
    """Inverse of :func:`pack_array` (a writable native-endian array)."""
    if isinstance(value, list):
        return np.asarray(value, dtype=np.dtype(dtype).newbyteorder('=')).reshape(shape)
    raw = base64.b64decode(value) if isinstance(value, str) else value
    return np.frombuffer(raw, dtype=np.dtype(dtype)).astype(np.dtype(dtype).newbyteorder('='), copy=True).reshape(shape)


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 (hex) of a tokenizer's vocabulary, token -> id with the added tokens: equal exactly when two tokenizers
    give every token the same id. ``GET /health`` reports the teacher's, the trainer compares it with the student's
    (an output head padded beyond the tokenizer does not change it)."""
    pairs = sorted(tokenizer.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
    return hashlib.sha256(json.dumps(pairs, ensure_ascii=False).encode()).hexdigest()


#: ``GET /health``'s fingerprints of the served weights (issue 96): the folder the model was loaded from and its
#: ``--adapters``, by the functions a teacher-score store fingerprints a local teacher with
#: (:func:`~swift_gkd_plugin.core.scores.store.weights_fingerprint`, ``adapters_fingerprint``); absent where the server
#: cannot tell (a hub id loaded by plain transformers) and on servers before issue 96 and ms-swift's
WEIGHTS_KEY, ADAPTERS_KEY = 'weights_fingerprint', 'adapters_fingerprint'


def reported_fingerprints(health) -> Tuple[Optional[str], Optional[str]]:
    """``(weights, adapters)`` as a ``GET /health`` document reports them, None each where it does not."""
    if not isinstance(health, dict) or not isinstance(health.get(WEIGHTS_KEY), str) or not health[WEIGHTS_KEY]:
        return None, None
    adapters = health.get(ADAPTERS_KEY)
    return health[WEIGHTS_KEY], adapters if isinstance(adapters, str) else None
