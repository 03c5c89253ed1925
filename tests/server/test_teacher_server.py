"""``swift-gkd serve-teacher``: a teacher server without vLLM, started as a real subprocess on loopback.

Checks that its answers equal a direct forward of the teacher on both endpoints (ms-swift's ``/infer/`` through
ms-swift's own ``VLLMInferClient`` + ``parse_prompt_logprobs``, and the compact ``/v1/topk`` through
``TeacherClient``), the API key, refusals of malformed / oversize requests, concurrency, the bounded queue, the
client's retries against a killed and restarted server, and real ``swift rlhf --teacher_model_server`` runs.
"""
from __future__ import annotations

import base64
import email.utils
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
import torch
from conftest import (OFFLINE_ENV, RL_REWARD_PLUGIN, SHARED_SERVERS, base_args, launcher_child_command, run_swift,
                      run_swift_gkd)

from swift_gkd_plugin.server import TeacherClient, TeacherServerError
from swift_gkd_plugin.demo import tiny

SWIFT_GKD = os.path.join(os.path.dirname(sys.executable), 'swift-gkd')
TEMPLATE = 'qwen3_nothinking'
SERVER_TOPK = 16
MAX_BATCH_TOKENS = 1024  # also the longest sequence the main server accepts
KEY = 'test-key-0123456789'
AUTH = {'Authorization': f'Bearer {KEY}'}

# ms-swift's VLLMInferClient is a plain HTTP client, but its constructor refuses to run unless vLLM is importable.
# vLLM is not installed here, so runs that go through ms-swift's client load this --external_plugins file, which only
# lifts that check (the client and everything else stay ms-swift's own code).
VLLM_CHECK_SHIM = '''
import swift.rlhf_trainers.vllm_client as _vllm_client
_vllm_client.is_vllm_available = lambda: True
'''


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


class Server:
    HEALTH = '/health/'  # polled until it answers 200

    def __init__(self, ws, log_path: str, *extra: str, port: int = None, env=None, session: bool = False,
                 model: str = None):
        self.port = port or _free_port()
        self.url = f'http://127.0.0.1:{self.port}'
        self.log_path = log_path
        cmd = [SWIFT_GKD, 'serve-teacher', '--model', model or ws.teacher, '--model_type', 'qwen3', '--template', TEMPLATE,
               '--port', str(self.port), '--top_k', str(SERVER_TOPK), '--torch_dtype', 'float32', '--device', 'cpu',
               '--max_batch_tokens', str(MAX_BATCH_TOKENS), *extra]
        full_env = dict(os.environ, **OFFLINE_ENV)
        full_env.pop('SWIFT_GKD_TEACHER_API_KEY', None)
        full_env.update(env or {})
        self._log = open(log_path, 'ab')
        # session: in a session of its own (SHARED_SERVERS stops a shared server with its process group)
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=full_env,
                                     start_new_session=session)

    def wait(self, timeout: float = 180.0, headers=None):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f'teacher server exited ({self.proc.returncode}):\n{self.log()[-4000:]}')
            try:
                if httpx.get(f'{self.url}{self.HEALTH}', headers=headers, timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise AssertionError(f'teacher server not ready after {timeout}s:\n{self.log()[-4000:]}')

    def log(self) -> str:
        with open(self.log_path, encoding='utf-8', errors='replace') as f:
            return f.read()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(15)
        self._log.close()


class SharedServer:
    """A server of the test session (:func:`shared_server`): its URL and log, as :class:`Server`'s."""

    def __init__(self, port: int, log_path: str):
        self.port, self.log_path = port, log_path
        self.url = f'http://127.0.0.1:{port}'

    log = Server.log

    def alive(self) -> bool:
        try:
            return httpx.get(f'{self.url}{Server.HEALTH}', timeout=5).status_code == 200
        except httpx.HTTPError:
            return False


def shared_server(ws, name: str, *extra: str) -> SharedServer:
    """The ``swift-gkd serve-teacher`` ``name`` of ``ws.teacher`` with :class:`Server`'s flags and ``extra``: one for
    every xdist worker of the session (``conftest.SHARED_SERVERS``: started by its first user, again where it stopped
    answering; it keeps no state between requests, so tests of both workers use it at once), its log beside the
    session's run log (appended to by each start). Only for tests that neither stop nor restart it."""
    log_path = os.path.join(SHARED_SERVERS.root, f'{name}.log')

    def start():
        server = Server(ws, log_path, *extra, session=True).wait()
        server._log.close()  # (the server writes to its own copy)
        return server.proc.pid, server.port, f'{server.url}{Server.HEALTH}'

    with SHARED_SERVERS.use(name, start) as record:
        return SharedServer(record['port'], log_path)


def main_server(ws) -> SharedServer:
    """The session's server of the tiny teacher (top-16), at most 4096 tokens and 0.25 MB a request."""
    return shared_server(ws, 'serve_teacher_main', '--max_request_tokens', '4096', '--max_body_mb', '0.25')


def infer_only_server_of(ws) -> SharedServer:
    """The session's server of the tiny teacher behind only GET /health and POST /infer/, the routes of `swift deploy`
    (ms-swift's teacher_server.sh)."""
    return shared_server(ws, 'serve_teacher_infer_only', '--only_ms_swift_routes')


def student_server_of(ws) -> SharedServer:
    """The session's server of the tiny student's base (top-16): another model of the teacher's tokenizer."""
    return shared_server(SimpleNamespace(teacher=ws.student), 'serve_teacher_student_top16', '--top_k', '16')


@pytest.fixture(scope='module')
def servers(tiny_ws):
    """The session's main server (:func:`main_server`)."""
    return {'main': main_server(tiny_ws)}


@pytest.fixture(scope='module')
def keyed_server(tiny_ws, tmp_path_factory):
    """A server of this module's worker with an API key and a one-sequence queue (its tests need it to themselves)."""
    server = Server(tiny_ws, str(tmp_path_factory.mktemp('teacher_server_logs') / 'keyed.log'), '--max_queue', '1',
                    '--max_batch_tokens', '512', env={'SWIFT_GKD_TEACHER_API_KEY': KEY})
    try:
        yield server.wait(headers=AUTH)
    finally:
        server.stop()


@pytest.fixture(scope='module')
def reference(tiny_ws):
    """Direct forwards of the teacher: full-vocabulary log_softmax (float32) and exact float64 tails."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_ws.teacher, dtype=torch.float32).eval()

    @torch.no_grad()
    def logprobs(ids):
        logits = model(input_ids=torch.tensor([ids])).logits[0]
        return torch.log_softmax(logits.float(), -1), torch.log_softmax(logits.double(), -1)

    def topk_at(ids, positions, k):
        lp, lp64 = logprobs(ids)
        lp, lp64 = lp[positions], lp64[positions]
        vals, idx = lp.topk(k, -1)
        tail = torch.log1p(-lp64.gather(-1, idx).exp().sum(-1))
        return idx, vals, tail

    topk_at.logprobs = logprobs
    return topk_at


@pytest.fixture(scope='module')
def tokenizer(tiny_ws):
    return tiny.load_tokenizer(tiny_ws.teacher)


@pytest.fixture(scope='module')
def template(tiny_ws):
    """ms-swift's template for the teacher, in inference mode (as a vLLM teacher server encodes requests)."""
    from swift.model import get_processor
    from swift.template import get_template
    tpl = get_template(get_processor(tiny_ws.teacher, model_type='qwen3'), template_type=TEMPLATE)
    tpl.set_mode('transformers')
    return tpl


def _chat_pairs(tokenizer, n, seed=0):
    """(prompt_ids, response_ids) of task rows rendered in the qwen3_nothinking chat format."""
    pairs = []
    for row in tiny.make_rows(n, seed=seed):
        enc = tiny.encode_row(tokenizer, row)
        ids, labels = enc['input_ids'], enc['labels']
        start = next(i for i, t in enumerate(labels) if t != -100)
        pairs.append((list(ids[:start]), list(ids[start:])))
    return pairs


def _random_pairs(n, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        p = int(torch.randint(1, 40, (1, ), generator=g))
        r = int(torch.randint(1, 30, (1, ), generator=g))
        ids = torch.randint(0, vocab, (p + r, ), generator=g).tolist()
        out.append((ids[:p], ids[p:]))
    return out


def _assert_matches(result, ref_ids, ref_lp, ref_tail=None):
    assert torch.equal(result.ids, ref_ids), 'top-k ids differ from a direct forward'
    assert torch.allclose(result.logprobs, ref_lp, atol=1e-5, rtol=0), (result.logprobs - ref_lp).abs().max()
    if ref_tail is not None:
        assert result.tail is not None
        assert torch.allclose(result.tail.double(), ref_tail, atol=1e-5, rtol=0), (result.tail - ref_tail).abs().max()


def _post_topk(url, sequences, k, headers=None, client=None):
    body = {'sequences': sequences, 'topk': k}
    return (client or httpx).post(f'{url}/v1/topk', json=body, headers=headers, timeout=60)


# ----------------------------------------------------------------------------------------------------------------
# correctness
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.timeout(300)
@pytest.mark.parametrize('binary', [True, False], ids=['msgpack', 'json-base64'])
def test_topk_endpoint_equals_direct_forward(servers, reference, tokenizer, binary):
    client = TeacherClient(servers['main'].url, timeout=30, retries=0, binary=binary)
    pairs = _chat_pairs(tokenizer, 6) + _random_pairs(6, len(tokenizer))
    for k, tail in [(8, True), (SERVER_TOPK, False), (1, True)]:
        results = client.topk(pairs, topk=k, with_tail=tail)
        assert len(results) == len(pairs)
        for (prompt, response), res in zip(pairs, results):
            ids = prompt + response
            positions = list(range(len(prompt) - 1, len(ids) - 1))
            assert res.ids.shape == (len(response), k)
            ref_ids, ref_lp, ref_tail = reference(ids, positions, k)
            _assert_matches(res, ref_ids, ref_lp, ref_tail if tail else None)
            if not tail:
                assert res.tail is None

    # (input_ids, positions): arbitrary positions of a sequence, in any order
    ids = pairs[0][0] + pairs[0][1]
    positions = [0, len(ids) - 1, 3, 2]
    res = client.topk_at([(ids, positions)], topk=8, with_tail=True)[0]
    _assert_matches(res, *reference(ids, positions, 8))

    # messages encoded by the server's ms-swift template: the scored tokens are the response (+ its suffix)
    row = tiny.make_rows(1, seed=3)[0]
    res = client.topk_messages([row['messages']], topk=8, with_tail=True)[0]
    enc = tiny.encode_row(tokenizer, row)  # the tiny chat format is ms-swift's qwen3_nothinking rendering
    assert res.input_ids == list(enc['input_ids'])
    assert res.positions == [p for p in range(len(enc['labels']) - 1) if enc['labels'][p + 1] != -100]
    _assert_matches(res, *reference(res.input_ids, res.positions, 8))


@pytest.mark.timeout(120)
@pytest.mark.parametrize('binary', [True, False], ids=['msgpack', 'json-base64'])
def test_topk_with_targets_gives_each_next_tokens_logprob(servers, reference, tokenizer, binary):
    """``with_targets``: beside the top-k, the log-probability of the token that follows each scored position (the
    sampled-token term's teacher signal, one prefill): equal to a direct forward's, NaN where no token follows; the
    prompt + response form scores the last response token too."""
    client = TeacherClient(servers['main'].url, timeout=30, retries=0, binary=binary)
    prompt, response = _chat_pairs(tokenizer, 1, seed=7)[0]
    ids = prompt + response
    full = reference.logprobs(ids)[0]
    positions = [0, 3, len(ids) - 2, len(ids) - 1]
    res = client.topk_at([(ids, positions)], topk=4, with_targets=True)[0]
    expected = torch.tensor([float(full[p, ids[p + 1]]) for p in positions[:-1]])
    assert torch.allclose(res.target_logprobs[:-1], expected, atol=1e-5, rtol=0), (res.target_logprobs, expected)
    assert torch.isnan(res.target_logprobs[-1])  # the last position predicts no token of the sequence
    _assert_matches(res, *reference(ids, positions, 4)[:2], None)
    pair = client._topk([{'prompt_ids': prompt, 'response_ids': response}], 4, False, with_targets=True)[0]
    expected = torch.tensor([float(full[p, ids[p + 1]]) for p in range(len(prompt) - 1, len(ids) - 1)])
    assert torch.allclose(pair.target_logprobs, expected, atol=1e-5, rtol=0)
    assert client.topk_at([(ids, positions)], topk=4)[0].target_logprobs is None  # only when asked


@pytest.mark.timeout(120)
def test_topk_plain_json_lists_and_float16(servers, reference, tokenizer):
    url = servers['main'].url
    prompt, response = _chat_pairs(tokenizer, 1, seed=5)[0]
    r = httpx.post(f'{url}/v1/topk', json={'sequences': [{'prompt_ids': prompt, 'response_ids': response}], 'topk': 4,
                                           'with_tail': True, 'encoding': 'list'}, timeout=30)
    assert r.status_code == 200, r.text
    item = r.json()['results'][0]
    ref_ids, ref_lp, ref_tail = reference(prompt + response, list(range(len(prompt) - 1, len(prompt + response) - 1)),
                                          4)
    assert item['ids'] == ref_ids.tolist()
    assert np.allclose(item['logprobs'], ref_lp.numpy(), atol=1e-5, rtol=0)
    assert np.allclose(item['tail'], ref_tail.numpy(), atol=1e-5, rtol=0)
    half = TeacherClient(url, retries=0, logprobs_dtype='float16').topk([(prompt, response)], topk=4)[0]
    assert torch.equal(half.ids, ref_ids)
    assert torch.allclose(half.logprobs, ref_lp, atol=1e-2, rtol=1e-3)


@pytest.mark.timeout(180)
@pytest.mark.parametrize('topk', [8, 0])
def test_ms_swift_client_parses_infer_answers(servers, reference, template, tokenizer, monkeypatch, topk):
    """ms-swift's own teacher path: VLLMInferClient + RequestConfig + parse_prompt_logprobs, as in
    RolloutTrainerMixin._infer_teacher_requests, on requests built like gkd_helpers.build_teacher_requests."""
    import swift.rlhf_trainers.vllm_client as vllm_client
    from swift.infer_engine import RequestConfig
    from swift.infer_engine.protocol import RolloutInferRequest
    from swift.rlhf_trainers.utils import parse_prompt_logprobs, replace_assistant_response_with_ids
    monkeypatch.setattr(vllm_client, 'is_vllm_available', lambda: True)
    client = vllm_client.VLLMInferClient(base_urls=[servers['main'].url], connection_timeout=30)

    requests_, expected_ids = [], []
    for i, row in enumerate(tiny.make_rows(5, seed=7)):
        messages = [dict(m) for m in row['messages']]
        if i % 2:  # a sampled response, sent as token ids (token-in-token-out)
            ids = tokenizer.encode(messages[-1]['content'] + ' x', add_special_tokens=False)
            messages = replace_assistant_response_with_ids(messages, ids)
        req = RolloutInferRequest(messages=messages)
        req.add_eos = 'auto'
        requests_.append(req)
        expected_ids.append(template.encode(asdict(req))['input_ids'])

    handle = {'all_requests': requests_}
    request_config = RequestConfig(prompt_logprobs=topk, max_tokens=1, temperature=0.0)
    responses = client.infer(handle['all_requests'], request_config=request_config, use_tqdm=False)
    parsed = [parse_prompt_logprobs(r, topk=topk) for r in responses]
    assert len(parsed) == len(requests_)
    for resp, (lps, ixs), ids in zip(responses, parsed, expected_ids):
        assert resp.prompt_token_ids == ids, 'the server encoded the request differently from ms-swift'
        assert len(lps) == len(ids) - 1
        positions = list(range(len(ids) - 1))
        if topk:
            ref_ids, ref_lp, _ = reference(ids, positions, topk)
            assert torch.equal(torch.tensor(ixs), ref_ids)
            assert torch.allclose(torch.tensor(lps), ref_lp, atol=1e-5, rtol=0)
            # ranks are vLLM's: 1..k for the top-k, the true rank for an extra (actual) token
            for p, entry in enumerate(resp.prompt_logprobs[1:]):
                actual = entry.get(str(ids[p + 1]))
                assert actual is not None
                lp_full, _ = reference.logprobs(ids)
                assert actual['rank'] == int((lp_full[p] > lp_full[p, ids[p + 1]]).sum()) + 1
        else:  # the sampled (actual) token's log-prob only
            lp_full, _ = reference.logprobs(ids)
            assert [x[0] for x in ixs] == ids[1:]
            assert torch.allclose(torch.tensor([x[0] for x in lps]), lp_full[positions, ids[1:]], atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------------------------
# security and refusals
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_api_key_required_on_every_request(keyed_server, reference, tokenizer):
    url = keyed_server.url
    body = {'sequences': [{'prompt_ids': [1, 2, 3], 'response_ids': [4, 5]}], 'topk': 2}
    for headers in [{}, {'Authorization': 'Bearer wrong'}, {'X-API-Key': 'wrong'}, {'Authorization': KEY},
                    {'Authorization': f'Bearer {KEY}x'}]:
        assert httpx.get(f'{url}/health/', headers=headers).status_code == 401
        r = httpx.post(f'{url}/v1/topk', json=body, headers=headers)
        assert r.status_code == 401 and r.headers.get('www-authenticate') == 'Bearer'
        assert httpx.post(f'{url}/infer/', json={'infer_requests': []}, headers=headers).status_code == 401
    for headers in [AUTH, {'X-API-Key': KEY}]:
        assert httpx.get(f'{url}/health/', headers=headers).status_code == 200
        assert httpx.post(f'{url}/v1/topk', json=body, headers=headers).status_code == 200
    # the client: the right key works, a wrong one fails at once (no retries on 401) with a clear message
    prompt, response = _chat_pairs(tokenizer, 1)[0]
    res = TeacherClient(url, api_key=KEY, retries=0).topk([(prompt, response)], topk=4)[0]
    ids = prompt + response
    _assert_matches(res, *reference(ids, list(range(len(prompt) - 1, len(ids) - 1)), 4)[:2])
    with pytest.raises(TeacherServerError, match='401') as err:
        TeacherClient(url, api_key='nope', retries=5, backoff=10).health()
    assert err.value.attempts == 1 and err.value.status == 401 and url in str(err.value)


@pytest.mark.timeout(60)
def test_non_loopback_bind_needs_a_key(tiny_ws):
    env = dict(os.environ, **OFFLINE_ENV)
    env.pop('SWIFT_GKD_TEACHER_API_KEY', None)
    proc = subprocess.run([SWIFT_GKD, 'serve-teacher', '--model', tiny_ws.teacher, '--host', '0.0.0.0', '--port',
                           str(_free_port())], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert 'API key' in proc.stderr and 'SWIFT_GKD_TEACHER_API_KEY' in proc.stderr


@pytest.mark.timeout(120)
def test_malformed_and_oversize_requests_are_refused(servers, reference, tokenizer):
    server = servers['main']
    url = server.url
    vocab = httpx.get(f'{url}/health/').json()['vocab_size']
    ok = {'prompt_ids': [1, 2, 3], 'response_ids': [4, 5]}
    malformed = [
        b'not json', b'[1, 2]', b'{"sequences": []}', b'{"sequences": "x"}',
        json.dumps({'sequences': [{'prompt_ids': [1, 2]}]}).encode(),
        json.dumps({'sequences': [{'prompt_ids': [], 'response_ids': [1]}]}).encode(),
        json.dumps({'sequences': [{'prompt_ids': [1], 'response_ids': []}]}).encode(),
        json.dumps({'sequences': [{'prompt_ids': [1, 'a'], 'response_ids': [2]}]}).encode(),
        json.dumps({'sequences': [{'prompt_ids': [1, 2.5], 'response_ids': [2]}]}).encode(),
        json.dumps({'sequences': [{'prompt_ids': [1, -1], 'response_ids': [2]}]}).encode(),
        json.dumps({'sequences': [{'prompt_ids': [1], 'response_ids': [vocab]}]}).encode(),
        json.dumps({'sequences': [ok], 'topk': 0}).encode(),
        json.dumps({'sequences': [ok], 'topk': SERVER_TOPK + 1}).encode(),
        json.dumps({'sequences': [ok], 'unknown': 1}).encode(),
        json.dumps({'sequences': [{'input_ids': [1, 2, 3], 'positions': [3]}]}).encode(),
        json.dumps({'sequences': [{**ok, 'messages': [{'role': 'user', 'content': 'x'}]}]}).encode(),
        json.dumps({'sequences': [{'messages': [{'role': 'banana', 'content': 'x'}]}]}).encode(),
    ]
    for body in malformed:
        r = httpx.post(f'{url}/v1/topk', content=body, headers={'Content-Type': 'application/json'})
        assert r.status_code == 422, (body, r.status_code, r.text)
        assert r.json()['object'] == 'error'
    bad_infer = [
        {'infer_requests': 'x'},
        {'infer_requests': [{'messages': []}]},
        {'infer_requests': [{'messages': [{'role': 'user', 'content': 'hi'}], 'images': ['x.png']}]},
        {'infer_requests': [{'messages': [{'role': 'user', 'content': 'hi'}]}], 'request_config': {'max_tokens': 9}},
        {'infer_requests': [{'messages': [{'role': 'user', 'content': 'hi'}]}],
         'request_config': {'prompt_logprobs': SERVER_TOPK + 1}},
        {'infer_requests': [{'messages': [{'role': 'user', 'content': 'hi'}, {'role': 'assistant', 'content': [-4]}]}],
         'request_config': {'prompt_logprobs': 2}},
    ]
    for body in bad_infer:
        r = httpx.post(f'{url}/infer/', json=body)
        assert r.status_code == 422, (body, r.status_code, r.text)

    too_long = {'sequences': [{'prompt_ids': [1] * MAX_BATCH_TOKENS, 'response_ids': [2, 3]}]}
    r = httpx.post(f'{url}/v1/topk', json=too_long)
    assert r.status_code == 413 and 'per sequence' in r.json()['message']
    too_many_tokens = {'sequences': [{'prompt_ids': [1] * 500, 'response_ids': [2]}] * 9}  # > --max_request_tokens
    r = httpx.post(f'{url}/v1/topk', json=too_many_tokens)
    assert r.status_code == 413 and 'max_request_tokens' in r.json()['message']
    huge_body = b'{"sequences": [' + b' ' * (300 * 1024) + b']}'  # > --max_body_mb 0.25
    r = httpx.post(f'{url}/v1/topk', content=huge_body, headers={'Content-Type': 'application/json'})
    assert r.status_code == 413
    long_chat = {'infer_requests': [{'messages': [{'role': 'user', 'content': 'a ' * 5000}]}],
                 'request_config': {'prompt_logprobs': 2}}
    assert httpx.post(f'{url}/infer/', json=long_chat).status_code == 413
    # issue 89 item 17: messages bounded in characters before the tokenizer reads them (a 21 MB request was encoded
    # whole, 7.3M tokens, against a 512-token limit; roles count), and more positions than tokens (repeated) refused
    limit = httpx.get(f'{url}/health').json()['max_seq_len']
    longest = max(len(token) for token in tokenizer.get_vocab())
    chat = [{'role': 'user', 'content': 'a' * 200_000}, {'role': 'assistant', 'content': 'b'}]
    for route, body, what in [('/v1/topk', {'sequences': [{'messages': chat}]}, 'sequences[0]'),
                              ('/infer/', {'infer_requests': [{'messages': chat}]}, 'infer_requests[0]')]:
        r = httpx.post(f'{url}{route}', json=body)
        assert r.status_code == 413 and r.json()['message'] == (
            f'{what}: 200014 characters of messages, more than the {limit} tokens this server takes per sequence can '
            f'hold ({limit * longest} characters at most)'), r.text
    repeated = {'sequences': [{'input_ids': [1, 2, 3], 'positions': [0, 1, 1, 0]}]}
    r = httpx.post(f'{url}/v1/topk', json=repeated)
    assert r.status_code == 422 and r.json()['message'] == (
        'sequences[0]: 4 positions for a sequence of 3 tokens: each position at most once'), r.text

    # still healthy, still correct, every refusal logged
    assert server.alive()
    health = httpx.get(f'{url}/health/').json()
    assert health['status'] == 'ok' and health['batcher']['worker_alive']
    prompt, response = _chat_pairs(tokenizer, 1, seed=9)[0]
    res = TeacherClient(url, retries=0).topk([(prompt, response)], topk=8, with_tail=True)[0]
    ids = prompt + response
    _assert_matches(res, *reference(ids, list(range(len(prompt) - 1, len(ids) - 1)), 8))
    log = server.log()
    assert '"POST /v1/topk" 422' in log and '"POST /v1/topk" 413' in log and '"POST /v1/topk" 200' in log


@pytest.mark.timeout(120)
@pytest.mark.parametrize('wire', ['json', 'msgpack'])
def test_ids_outside_int64_are_refused_with_422_and_not_retried(servers, wire):
    """A token id or position outside int64 is malformed input: 422 with a JSON message (not a plain-text 500),
    on both endpoints and both wire formats, and the client raises it at once (a 4xx is never retried)."""
    import msgpack
    url = servers['main'].url
    big = 2**63
    bodies = [('/v1/topk', {'sequences': [{'prompt_ids': [1, big], 'response_ids': [2]}]}),
              ('/v1/topk', {'sequences': [{'prompt_ids': [1], 'response_ids': [big]}]}),
              ('/v1/topk', {'sequences': [{'input_ids': [1, 2, 3], 'positions': [0, big]}]}),
              ('/v1/topk', {'sequences': [{'input_ids': [big, 2, 3], 'positions': [0]}]}),
              ('/infer/', {'infer_requests': [{'messages': [{'role': 'user', 'content': 'hi'},
                                                            {'role': 'assistant', 'content': [5, big]}]}],
                           'request_config': {'prompt_logprobs': 2}})]
    if wire == 'json':  # msgpack has no integer below -2**63
        bodies.append(('/v1/topk', {'sequences': [{'input_ids': [1, 2, 3], 'positions': [-big - 1]}]}))
    for path, body in bodies:
        if wire == 'json':
            content, ctype = json.dumps(body).encode(), 'application/json'
        else:
            content, ctype = msgpack.packb(body), 'application/msgpack'
        r = httpx.post(f'{url}{path}', content=content, headers={'Content-Type': ctype}, timeout=30)
        assert r.status_code == 422, (path, body, r.status_code, r.text)
        assert r.json()['object'] == 'error'
    patient = TeacherClient(url, retries=5, backoff=10, wait=600, binary=wire == 'msgpack')
    with pytest.raises(TeacherServerError, match='422') as err:  # a client error is not retried (backoff 10 s)
        patient.topk_at([([1, 2, 3], [0, big])], topk=2)
    assert err.value.attempts == 1 and err.value.status == 422
    assert servers['main'].alive()


# ----------------------------------------------------------------------------------------------------------------
# load
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_100_concurrent_clients(servers, reference, tokenizer):
    url = servers['main'].url
    pool = _chat_pairs(tokenizer, 10, seed=11) + _random_pairs(10, len(tokenizer), seed=11)
    expected = []
    for prompt, response in pool:
        ids = prompt + response
        expected.append(reference(ids, list(range(len(prompt) - 1, len(ids) - 1)), 8))
    start = threading.Barrier(100)

    def worker(w):
        out = []
        with httpx.Client(timeout=120) as client:
            start.wait()
            for j in range(5):
                i = (7 * w + j) % len(pool)
                prompt, response = pool[i]
                r = _post_topk(url, [{'prompt_ids': prompt, 'response_ids': response}], 8, client=client)
                out.append((i, r.status_code, r.json()))
        return out

    with ThreadPoolExecutor(100) as ex:
        answers = [a for chunk in ex.map(worker, range(100)) for a in chunk]
    assert len(answers) == 500
    assert all(status == 200 for _, status, _ in answers), {s for _, s, _ in answers}
    for i, _, doc in answers:
        item = doc['results'][0]
        n = item['num_positions']
        ids = np.frombuffer(base64.b64decode(item['ids']), '<i4').reshape(n, 8)
        lps = np.frombuffer(base64.b64decode(item['logprobs']), '<f4').reshape(n, 8)
        ref_ids, ref_lp, _ = expected[i]
        assert np.array_equal(ids, ref_ids.numpy())
        assert np.allclose(lps, ref_lp.numpy(), atol=1e-5, rtol=0)
    stats = httpx.get(f'{url}/health/').json()['batcher']
    assert stats['batches'] < stats['sequences'], 'concurrent requests were never batched together'


@pytest.mark.timeout(180)
def test_full_queue_answers_503_with_retry_after(keyed_server, reference):
    server = keyed_server  # --max_queue 1 --max_batch_tokens 512
    url = server.url
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 440, (500, ), generator=g).tolist() for _ in range(8)]
    start = threading.Barrier(40)

    def worker(w):
        ids = seqs[w % len(seqs)]
        with httpx.Client(timeout=120) as client:
            start.wait()
            r = _post_topk(url, [{'prompt_ids': ids[:400], 'response_ids': ids[400:]}], 4, headers=AUTH,
                           client=client)
        return w, r

    with ThreadPoolExecutor(40) as ex:
        answers = list(ex.map(worker, range(40)))
    statuses = [r.status_code for _, r in answers]
    assert set(statuses) <= {200, 503}, statuses
    assert 503 in statuses and 200 in statuses, statuses
    for w, r in answers:
        if r.status_code == 503:
            assert int(r.headers['Retry-After']) >= 1
            assert 'busy' in r.json()['message']
        else:
            ids = seqs[w % len(seqs)]
            item = r.json()['results'][0]
            got = np.frombuffer(base64.b64decode(item['ids']), '<i4').reshape(-1, 4)
            assert np.array_equal(got, reference(ids, list(range(399, 499)), 4)[0].numpy())
    # a request with more sequences than the queue can ever hold is refused as too large, not as busy
    r = _post_topk(url, [{'prompt_ids': [1], 'response_ids': [2]}] * 2, 4, headers=AUTH)
    assert r.status_code == 413
    assert server.alive() and httpx.get(f'{url}/health/', headers=AUTH).json()['batcher']['worker_alive']
    # the client rides out 503s (honouring Retry-After)
    with ThreadPoolExecutor(4) as ex:
        futures = [ex.submit(TeacherClient(url, api_key=KEY, retries=20, backoff=0.2, max_backoff=2).topk_at,
                             [(seqs[i], list(range(10)))], 4) for i in range(4)]
        for i, f in enumerate(futures):
            assert torch.equal(f.result()[0].ids, reference(seqs[i], list(range(10)), 4)[0])


# ----------------------------------------------------------------------------------------------------------------
# failure and recovery
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.timeout(1800)
def test_a_server_started_late_killed_mid_run_and_restarted_on_its_port(tiny_ws, tmp_path, reference, tokenizer):
    """One server's life on one port (two starts, each test of it once paid for its own):

    1. training started before its teacher server (as examples/gkd_teacher_server.sh does with a 7B teacher): the
       trainer waits, logging each retry, while the server starts and loads its model, then trains against it;
    2. the server killed during a run: once the client's retries are spent (--teacher_server_wait 0,
       --teacher_server_retries 1) the run stops with one error line naming the server, the step and the last
       checkpoint (no traceback), the checkpoint kept whole; a client then reports the dead server (3 attempts,
       connection refused) at once, and its health check fails;
    3. restarted on the same port while a patient client is already retrying: the client rides it out, logging each
       retry, and its answer equals a direct forward; the run resumed from the checkpoint finishes its next step;
    4. then restarted serving another model (the student: the same tokenizer) while that run goes on (issue 89 item
       16: it trained on the other model's answers, exit 0): the run rides out the restart, finds another model
       answering and stops in one line naming both models, exit 1."""
    import glob
    port = _free_port()
    url = f'http://127.0.0.1:{port}'
    prompt, response = _chat_pairs(tokenizer, 1, seed=13)[0]
    ids = prompt + response
    ref = reference(ids, list(range(len(prompt) - 1, len(ids) - 1)), 8)
    started = []
    try:
        # 1. the trainer first, as `swift rlhf` starts it, then the server once the trainer is waiting for it
        argv = base_args(tiny_ws, str(tmp_path / 'out'), teacher_model=None, teacher_model_type=None,
                         teacher_model_server=url, gkd_logits_topk=8)
        env = dict(os.environ, **OFFLINE_ENV)
        env.pop('SWIFT_GKD_PLUGIN', None)
        log_path = tmp_path / 'train.log'
        with open(log_path, 'wb') as log:
            trainer = subprocess.Popen(launcher_child_command('rlhf', argv, env),  # what `swift rlhf` starts
                                       stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            retry = f'teacher server {url}/health: attempt 2 failed'
            deadline = time.monotonic() + 300
            while retry not in log_path.read_text(errors='replace'):  # the trainer is waiting: start the teacher now
                assert trainer.poll() is None and time.monotonic() < deadline, log_path.read_text()[-4000:]
                time.sleep(0.5)
            started.append(Server(tiny_ws, str(tmp_path / 'a.log'), port=port))
            assert trainer.wait(600) == 0, log_path.read_text()[-6000:]
        finally:
            if trainer.poll() is None:
                trainer.kill()
        server = started[0]
        output = log_path.read_text(errors='replace')
        assert 'Connection refused' in output and 'of the 600s wait left' in output
        assert 'scored through POST /v1/topk' in output
        assert server.log().count('"POST /v1/topk" 200') >= 3
        rows = [json.loads(line) for line in open(tmp_path / 'out' / 'logging.jsonl')]
        losses = [row['loss'] for row in rows if 'loss' in row]
        assert len(losses) == 3 and all(np.isfinite(losses)), output[-3000:]

        # 2. killed mid-run, without a goodbye
        client = TeacherClient(url, timeout=10, retries=2, backoff=0.05)
        _assert_matches(client.topk([(prompt, response)], topk=8, with_tail=True)[0], *ref)
        out = tmp_path / 'killed'
        common = dict(teacher_model=None, teacher_model_type=None, teacher_model_server=url, gkd_logits_topk=8,
                      save_strategy='steps', save_steps=1, save_only_model='false', teacher_server_wait=0,
                      teacher_server_retries=1)
        done = {}
        worker = threading.Thread(target=lambda: done.update(run=run_swift(
            base_args(tiny_ws, str(out), max_steps=500, **common), check=False)))
        worker.start()
        try:
            deadline = time.monotonic() + 300
            while worker.is_alive() and time.monotonic() < deadline and not glob.glob(
                    str(out / 'checkpoint-*' / 'trainer_state.json')):
                time.sleep(0.2)
        finally:
            server.proc.kill()
            server.proc.wait(10)
            worker.join(600)
        run = done['run']
        assert run.returncode == 1, run.output[-3000:]
        errors = [line for line in run.output.splitlines() if line.startswith('swift rlhf: error:')]
        assert len(errors) == 1 and 'Traceback' not in run.output, run.output[-3000:]
        match = re.search(r'failed during step (\d+): .*?(http://127\.0\.0\.1:\d+)/v1/topk.*The last checkpoint, '
                          r'(\S+/checkpoint-(\d+)), is kept: once the server answers again, resume with '
                          r'--resume_from_checkpoint \3$', errors[0])
        assert match and match.group(2) == url, errors[0]
        step, checkpoint, saved = int(match.group(1)), match.group(3), int(match.group(4))
        assert saved == step - 1 and os.path.isfile(os.path.join(checkpoint, 'trainer_state.json')), errors[0]
        t0 = time.monotonic()
        with pytest.raises(TeacherServerError) as err:
            client.topk([(prompt, response)], topk=8)
        message = str(err.value)
        assert f'{url}/v1/topk' in message and 'after 3 attempts' in message
        assert 'connection' in message.lower() and 'refused' in message.lower(), message
        assert err.value.attempts == 3 and time.monotonic() - t0 < 5
        with pytest.raises(TeacherServerError, match='health'):
            client.health()

        # 3. restarted on the same port while a patient client is already retrying
        def restart():
            time.sleep(1.0)
            started.append(Server(tiny_ws, str(tmp_path / 'b.log'), port=port))

        th = threading.Thread(target=restart)
        th.start()
        retries = []
        patient = TeacherClient(url, timeout=10, retries=0, wait=300, backoff=0.2, max_backoff=1.0,
                                log=retries.append)
        res = patient.topk([(prompt, response)], topk=8, with_tail=True)[0]
        th.join()
        _assert_matches(res, *ref)
        assert retries, 'the client rode out the restart without a log line'
        for n, line in enumerate(retries, start=1):  # each retry: the attempt, its cause and the time left
            assert f'{url}/v1/topk: attempt {n} failed (connection failed' in line, line
            assert 'Connection refused' in line and 'of the 300s wait left' in line, line
        resumed_out = tmp_path / 'resumed'
        worker = threading.Thread(target=lambda: done.update(resumed=run_swift(
            base_args(tiny_ws, str(resumed_out), max_steps=500, resume_from_checkpoint=checkpoint,
                      **dict(common, teacher_server_wait=300, save_strategy='no')), check=False)))
        worker.start()
        try:  # 4. once its next step is logged, another model on the port
            deadline = time.monotonic() + 300
            while worker.is_alive() and time.monotonic() < deadline and '"loss"' not in (
                    (resumed_out / 'logging.jsonl').read_text() if (resumed_out / 'logging.jsonl').exists() else ''):
                time.sleep(0.2)
        finally:
            started[-1].proc.kill()
            started[-1].proc.wait(10)
            started.append(Server(tiny_ws, str(tmp_path / 'c.log'), port=port, model=tiny_ws.student))
            worker.join(600)
        resumed = done['resumed']
        assert resumed.returncode == 1 and resumed.logs, resumed.output[-3000:]
        assert resumed.logs[0]['global_step/max_steps'] == f'{saved + 1}/500', resumed.logs
        errors = [line for line in resumed.output.splitlines() if line.startswith('swift rlhf: error:')]
        assert len(errors) == 1 and 'Traceback' not in resumed.output, resumed.output[-3000:]
        assert (f"teacher server {url} now serves another teacher: its GET /health after" in errors[0]
                and "reports model 'student'" in errors[0] and "the run started against model 'teacher'" in errors[0]
                and 'the server was restarted with another model' in errors[0]), errors[0]
    finally:
        for server in started:
            server.stop()


# ----------------------------------------------------------------------------------------------------------------
# real training against the server
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.timeout(600)
@pytest.mark.parametrize('plugin', ['plugin', 'ms-swift'])
def test_swift_rlhf_trains_against_the_server(tiny_ws, servers, tmp_path, plugin):
    """``swift rlhf --teacher_model_server URL --gkd_logits_topk 8`` trains against the server (with the plugin's
    trainer, through its own client and the compact endpoint; and with ms-swift's own trainer and client through
    ``/infer/``), and its losses equal those of the same run with the local teacher."""
    server = servers['main']
    if plugin == 'plugin':
        env, extra, endpoint = {}, {}, '"POST /v1/topk" 200'
    else:
        shim = tmp_path / 'allow_vllm_infer_client.py'
        shim.write_text(VLLM_CHECK_SHIM)
        env, extra, endpoint = {'SWIFT_GKD_PLUGIN': '0'}, {'external_plugins': str(shim)}, '"POST /infer/" 200'
    n_calls = server.log().count(endpoint)
    remote = run_swift(
        base_args(tiny_ws, str(tmp_path / 'remote'), teacher_model=None, teacher_model_type=None,
                  teacher_model_server=server.url, gkd_logits_topk=8, **extra), env=env)
    assert len(remote.losses) == 3 and all(np.isfinite(remote.losses)), remote.output[-3000:]
    assert server.log().count(endpoint) >= n_calls + 3, 'the trainer did not query the teacher server'
    assert ('GKD trainer active' in remote.output) == (plugin == 'plugin')
    local = run_swift(base_args(tiny_ws, str(tmp_path / 'local'), gkd_logits_topk=8), env=env)
    assert np.allclose(remote.losses, local.losses, rtol=1e-4, atol=1e-7), (remote.losses, local.losses)


def test_multi_turn_trajectories_against_the_server(tiny_ws, servers, tmp_path):
    """A multi-turn run (the student's two turns with a tool result between them) scores the whole trajectory on the
    server: its losses equal those of the same run with the local teacher's top-k."""
    plugin = os.path.join(os.path.dirname(os.path.dirname(__file__)), 'multi_turn_plugin.py')
    turns = dict(external_plugins=plugin, multi_turn_scheduler='gkd_test_tool', max_turns=2, lmbda=1,
                 gkd_logits_topk=8)
    remote = run_swift(base_args(tiny_ws, str(tmp_path / 'remote'), teacher_model=None, teacher_model_type=None,
                                 teacher_model_server=servers['main'].url, **turns))
    local = run_swift(base_args(tiny_ws, str(tmp_path / 'local'), **turns))
    assert [r['gkd/num_turns'] for r in remote.logs] == [2.0] * 3
    assert np.allclose(remote.losses, local.losses, rtol=1e-4, atol=1e-7), (remote.losses, local.losses)


@pytest.fixture(scope='module')
def infer_only_server(tiny_ws):
    return infer_only_server_of(tiny_ws)


@pytest.mark.timeout(900)
def test_swift_rlhf_against_a_server_with_only_ms_swift_routes(tiny_ws, infer_only_server, tmp_path):
    """Against a server without /v1/topk the plugin's trainer finds out at start-up, asks ms-swift's /infer/ for
    prompt log-probs, and its losses equal those of ms-swift's built-in trainer against the same server. On-policy
    steps (--lmbda 1, the same samples in both trainers) send the sampled responses as token ids, the hardest case
    to align; learning rate 0 keeps the weights fixed."""
    server = infer_only_server
    probe = {'sequences': [{'prompt_ids': [1], 'response_ids': [2]}]}
    assert httpx.post(f'{server.url}/v1/topk', json=probe).status_code == 404
    shim = tmp_path / 'allow_vllm_infer_client.py'
    shim.write_text(VLLM_CHECK_SHIM)
    # --top_k = the vocabulary: the plugin samples every token for --top_k -1, ms-swift's engine its model's top-50
    with open(os.path.join(tiny_ws.student, 'config.json')) as f:
        vocab = json.load(f)['vocab_size']
    common = dict(teacher_model=None, teacher_model_type=None, teacher_model_server=server.url, gkd_logits_topk=8,
                  lmbda=1, learning_rate=0, max_steps=2, seed=5, dataset=tiny_ws.fixed, top_k=vocab)
    n_calls = server.log().count('"POST /infer/" 200')
    plugin = run_swift(base_args(tiny_ws, str(tmp_path / 'plugin'), **common))
    assert 'GKD trainer active' in plugin.output and "scored through ms-swift's /infer/ protocol" in plugin.output
    assert server.log().count('"POST /infer/" 200') >= n_calls + 2, 'the trainer did not ask /infer/'
    builtin = run_swift(base_args(tiny_ws, str(tmp_path / 'builtin'), external_plugins=str(shim), **common),
                        env={'SWIFT_GKD_PLUGIN': '0'})
    assert len(plugin.losses) == 2 and all(np.isfinite(plugin.losses)), plugin.output[-3000:]
    assert np.allclose(plugin.losses, builtin.losses, rtol=1e-5, atol=1e-7), (plugin.losses, builtin.losses)


@pytest.mark.timeout(300)
def test_sampled_token_term_with_only_ms_swift_routes_is_refused_before_loading(tiny_ws, infer_only_server, tmp_path):
    """ms-swift's /infer/ protocol gives a top-k, not the log-prob of each sampled token: the sampled-token term is
    refused in one line before any model loads (it was refused after both models had loaded)."""
    from test_activation_and_bad_input import assert_refused_in_one_line
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'out'), teacher_model=None, teacher_model_type=None,
                              teacher_model_server=infer_only_server.url, gkd_logits_topk=8, lmbda=1,
                              gkd_sampled_kl_coef=1, temperature=1.0), check=False)
    assert_refused_in_one_line(run, [f"--gkd_sampled_kl_coef 1 needs the teacher's log-probability of each sampled "
                                     f"token, which ms-swift's POST /infer/ protocol of the teacher server "
                                     f"{infer_only_server.url} does not give"])


@pytest.mark.timeout(300)
@pytest.mark.parametrize('other', ['plugin', 'local'])
def test_an_infer_only_server_beside_other_teachers_is_refused_before_loading(tiny_ws, servers, infer_only_server,
                                                                             tmp_path, other):
    """ms-swift's /infer/ path asks every teacher through /infer/: beside this plugin's server or the local teacher
    it is refused in one line before any model loads (it was refused after loading, at the trainer's start)."""
    from test_activation_and_bad_input import assert_refused_in_one_line
    url = servers['main'].url if other == 'plugin' else 'local'
    # (the training set's rows are tagged with its path: --teacher_tag_key dataset)
    teachers = json.dumps([{'url': infer_only_server.url, 'tags': [tiny_ws.train]}, {'url': url, 'tags': ['b']}])
    extra = {} if other == 'local' else dict(teacher_model=None, teacher_model_type=None)
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'out'), teacher_model_server=teachers, gkd_logits_topk=8,
                              **extra), check=False)
    tail = (f'{url} (POST /v1/topk (this plugin\'s server))' if other == 'plugin' else
            'and the local teacher ("url": "local")')
    assert_refused_in_one_line(run, ["--teacher_model_server mixes servers that speak only ms-swift's /infer/ with "
                                     f"others: {infer_only_server.url} (ms-swift's /infer/ protocol", tail])


#: --max_length small enough to cut every row (15-22 tokens; with a teacher_prompt view 25-35): ``right`` at 16 cuts the
#: ends of the responses (a teacher view keeps its own prompt whole); ``left`` at 12 cuts the starts of the prompts of
#: rows without a view (the teacher reads the student's cut row; a view would stay whole, its response untouched).
#: Seed 0 with --lmbda 0.5: a dataset step, then an on-policy step
CUTS = {'right': dict(truncation_strategy='right', max_length=16), 'left': dict(truncation_strategy='left', max_length=12)}


@pytest.mark.timeout(900)
@pytest.mark.parametrize('strategy', list(CUTS))
def test_served_teachers_score_cut_rows_as_the_local_teacher(tiny_ws, servers, infer_only_server, tmp_path, strategy):
    """Issue 74 item 9: rows cut at ``--max_length`` (``right``: the ends of rows with a ``teacher_prompt`` view of
    their own; ``left``: the starts of rows without one), a dataset step then an on-policy step. The plugin's server
    (``/v1/topk``) scores the trainer's own token ids: its losses equal the local teacher's top-k to float precision.
    ms-swift's ``/infer/`` (``swift deploy``) re-encodes whole chats: after a ``right`` cut the positions the loss
    reads are a prefix of the server's encoding, and its losses equal the local teacher's too (the check of the
    server's ``prompt_token_ids`` refused it as another tokenization: a run that was right, stopped); after a ``left``
    cut they are not, and the first step stops naming the request, both counts, the cut and the ways out (it was named
    another tokenization, whose remedy, the server's template, cannot help)."""
    from test_max_length import _teacher_prompt_dataset
    data = _teacher_prompt_dataset(tiny_ws, tmp_path) if strategy == 'right' else tiny_ws.train
    common = dict(dataset=data, gkd_logits_topk=8, lmbda=0.5, seed=0, max_steps=2, **CUTS[strategy])
    served = dict(teacher_model=None, teacher_model_type=None)
    local = run_swift(base_args(tiny_ws, str(tmp_path / 'local'), **common))
    assert [m['mode'] for m in local.modes()] == ['off_policy', 'on_policy']
    assert local.logs[0]['gkd/cut_rows'] > 0, local.logs
    topk = run_swift(base_args(tiny_ws, str(tmp_path / 'topk'), teacher_model_server=servers['main'].url, **served,
                               **common))
    assert np.allclose(topk.losses, local.losses, rtol=1e-5, atol=1e-7), (topk.losses, local.losses)
    infer = run_swift(base_args(tiny_ws, str(tmp_path / 'infer'), teacher_model_server=infer_only_server.url,
                                **served, **common), check=False)
    if strategy == 'right':
        assert np.allclose(infer.losses, local.losses, rtol=1e-5, atol=1e-7), (infer.losses, local.losses)
        return
    assert infer.returncode != 0 and not infer.losses, infer.output[-3000:]
    assert re.search(rf'the teacher server {infer_only_server.url} cannot score request \d+ of this step: the trainer '
                     r'cut the row at its start to --max_length \(--truncation_strategy left\), .* its '
                     r"prompt_token_ids \(\d+ tokens\) differ from the trainer's \(12 tokens, \d+ read by the loss\) "
                     r'from position 0: .* Pass --truncation_strategy right or delete', infer.output), \
        infer.output[-3000:]


@pytest.mark.timeout(600)
def test_swift_rlhf_with_the_tail_bucket_against_the_server(tiny_ws, servers, tmp_path):
    server = servers['main']
    remote = run_swift(base_args(tiny_ws, str(tmp_path / 'remote'), teacher_model=None, teacher_model_type=None,
                                 teacher_model_server=server.url, gkd_logits_topk=8, gkd_topk_tail='true'))
    local = run_swift(base_args(tiny_ws, str(tmp_path / 'local'), gkd_logits_topk=8, gkd_topk_tail='true'))
    assert 'GKD loss implementation: fused' in remote.output
    assert np.allclose(remote.losses, local.losses, rtol=1e-4, atol=1e-7), (remote.losses, local.losses)


@pytest.mark.timeout(600)
def test_swift_rlhf_sampled_token_term_against_the_server(tiny_ws, servers, tmp_path):
    """``--gkd_sampled_kl_coef`` with a served teacher: the server returns each sampled token's log-probability
    beside its top-k (one request), and the logged reverse-KL estimate equals the run with the local teacher on the
    same samples (learning rate 0)."""
    server = servers['main']
    common = dict(lmbda=1, gkd_sampled_kl_coef=1, learning_rate=0, max_steps=2, seed=3, temperature=1.0)
    remote = run_swift(base_args(tiny_ws, str(tmp_path / 'remote'), teacher_model=None, teacher_model_type=None,
                                 teacher_model_server=server.url, gkd_logits_topk=8, **common))
    local = run_swift(base_args(tiny_ws, str(tmp_path / 'local'), **common))
    assert len(remote.logs) == 2 and all('gkd/sampled_kl' in row for row in remote.logs), remote.output[-3000:]
    assert np.allclose([r['gkd/sampled_kl'] for r in remote.logs], [r['gkd/sampled_kl'] for r in local.logs],
                       rtol=1e-4, atol=1e-6), (remote.logs, local.logs)


def test_swift_rlhf_routes_samples_to_teachers_by_dataset_tag(tiny_ws, servers, tmp_path):
    """Two datasets, two teacher entries (the same server under two URL spellings): each sample goes to the
    teacher of its dataset tag, and the losses equal the local teacher's."""
    url = servers['main'].url
    parts = _tagged_parts(tiny_ws, tmp_path)
    teachers = json.dumps([{'url': url, 'tags': [parts[0]]}, {'url': url + '/', 'tags': [parts[1]]}])
    common = dict(dataset=parts, per_device_train_batch_size=4, gkd_logits_topk=8, lmbda=0)
    remote = run_swift(base_args(tiny_ws, str(tmp_path / 'remote'), teacher_model=None, teacher_model_type=None,
                                 teacher_model_server=teachers, **common))
    local = run_swift(base_args(tiny_ws, str(tmp_path / 'local'), **common))
    assert np.allclose(remote.losses, local.losses, rtol=1e-4, atol=1e-7), (remote.losses, local.losses)
    # the per-teacher metrics are named by the files' names, not their absolute paths (issue 66: gkd//tmp/.../part0...)
    teacher_keys = {key for row in remote.logs for key in row if key.startswith('gkd/part')}
    assert {'gkd/part0/tokens', 'gkd/part1/tokens'} <= teacher_keys, remote.logs[0]
    assert not [key for row in remote.logs for key in row if str(tmp_path) in key or '//' in key]


def _tagged_parts(ws, tmp_path):
    """The fixed dataset split in two files of two rows: two dataset tags."""
    rows = [json.loads(line) for line in open(ws.fixed)]
    parts = []
    for i in range(2):
        path = tmp_path / f'part{i}.jsonl'
        path.write_text(''.join(json.dumps(r) + '\n' for r in rows[2 * i:2 * i + 2]))
        parts.append(str(path))
    return parts


@pytest.mark.timeout(600)
def test_swift_rlhf_binds_a_tag_to_the_local_teacher(tiny_ws, servers, tmp_path):
    """``{"url": "local", "tags": [...]}`` among the servers: the rows of that tag are scored by --teacher_model
    (here offloaded to CPU between uses), the others by the server, and the losses equal those of the run with the
    local teacher alone (the same model on both sides); the per-teacher metrics count each side's tokens."""
    server = servers['main']
    parts = _tagged_parts(tiny_ws, tmp_path)
    teachers = json.dumps([{'url': server.url, 'tags': [parts[0]]}, {'url': 'local', 'tags': [parts[1]]}])
    common = dict(dataset=parts, per_device_train_batch_size=2, gkd_logits_topk=8, lmbda=0, seed=7)
    n_calls = server.log().count('"POST /v1/topk" 200')
    mixed = run_swift(base_args(tiny_ws, str(tmp_path / 'mixed'), teacher_model_server=teachers,
                                offload_teacher_model='true', **common))
    assert f"the rows tagged ['{parts[1]}'] (--teacher_tag_key dataset) are scored by the local teacher" in mixed.output
    assert 'Teacher model: a separate frozen model (offloaded to CPU between uses)' in mixed.output
    assert server.log().count('"POST /v1/topk" 200') > n_calls, 'the server scored no row'
    shares = [(r['gkd/part0/tokens'], r['gkd/part1/tokens']) for r in mixed.logs]  # (path tags by their file's name)
    assert len(shares) == 3 and all(abs(a + b - 1) < 1e-6 for a, b in shares), shares
    assert sum(b for _, b in shares) > 0 and sum(a for a, _ in shares) > 0, shares
    local = run_swift(base_args(tiny_ws, str(tmp_path / 'local'), **common))
    assert np.allclose(mixed.losses, local.losses, rtol=1e-4, atol=1e-7), (mixed.losses, local.losses)


@pytest.mark.timeout(600)
def test_local_teacher_of_a_tag_can_be_the_lora_students_base(tiny_ws, servers, tmp_path):
    """The local entry with a LoRA student and --teacher_model = --model: its rows are scored by the student's base
    with the adapter off (one copy of the weights), exactly as by a separate copy of the base, while the adapter
    trains (learning rate 1e-2, so that the adapter moves away from the base)."""
    import shutil
    parts = _tagged_parts(tiny_ws, tmp_path)
    teachers = json.dumps([{'url': servers['main'].url, 'tags': [parts[0]]}, {'url': 'local', 'tags': [parts[1]]}])
    common = dict(dataset=parts, per_device_train_batch_size=2, gkd_logits_topk=8, lmbda=0, seed=7,
                  tuner_type='lora', learning_rate=1e-2, teacher_model_server=teachers, max_steps=4)
    shared = run_swift(base_args(tiny_ws, str(tmp_path / 'shared'), teacher_model=tiny_ws.student, **common))
    assert 'Teacher model: base_model with LoRA disabled (frozen)' in shared.output
    copy = str(tmp_path / 'base_copy')
    shutil.copytree(tiny_ws.student, copy)
    separate = run_swift(base_args(tiny_ws, str(tmp_path / 'separate'), teacher_model=copy, **common))
    assert 'Teacher model: a separate frozen model (resident)' in separate.output
    assert len(shared.losses) == 4 and shared.losses[0] != shared.losses[-1], shared.losses
    assert np.allclose(shared.losses, separate.losses, rtol=1e-4, atol=1e-7), (shared.losses, separate.losses)


def test_swift_rlhf_refuses_a_topk_beyond_the_servers_limit(tiny_ws, servers, tmp_path):
    """The plugin's server reports its --top_k in /health: a larger --gkd_logits_topk is refused at start-up, naming
    both numbers, instead of failing on the first teacher request."""
    limit = httpx.get(f"{servers['main'].url}/health").json()['max_topk']
    assert limit == SERVER_TOPK
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'out'), teacher_model=None, teacher_model_type=None,
                              teacher_model_server=servers['main'].url, gkd_logits_topk=limit + 1), check=False)
    assert run.returncode != 0 and not run.losses
    assert (f'--gkd_logits_topk {limit + 1} is larger than the teacher server {servers["main"].url} serves (its '
            f'--top_k is {limit})') in run.output, run.output[-3000:]


@pytest.mark.timeout(300)
def test_swift_rlhf_names_an_unreachable_server(tiny_ws, tmp_path):
    """No server at the URL: the trainer waits --teacher_server_wait seconds at start-up, logging each failed poll
    with its cause and the time left, then stops with an error that names the URL and the cause."""
    url = f'http://127.0.0.1:{_free_port()}'
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'out'), teacher_model=None, teacher_model_type=None,
                              teacher_model_server=url, gkd_logits_topk=8, teacher_server_wait=3,
                              teacher_server_timeout=2), check=False)
    assert run.returncode != 0
    assert f'teacher server {url}/health failed after' in run.output
    assert 'Connection refused' in run.output or 'connection failed' in run.output
    assert f'teacher server {url}/health: attempt 1 failed' in run.output and 'of the 3s wait left' in run.output


@pytest.mark.timeout(180)
def test_adapters_are_merged(tiny_ws, tmp_path):
    """``--adapters``: a PEFT LoRA adapter is merged into the teacher; scores equal the PEFT model's forward."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from swift_gkd_plugin.server.backend import ScoreSpec, TransformersTeacher
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_ws.teacher, dtype=torch.float32)
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=['q_proj', 'v_proj', 'down_proj'],
                                                 init_lora_weights=False)).eval()
    peft_model.save_pretrained(str(tmp_path / 'adapter'))
    teacher = TransformersTeacher.load(tiny_ws.teacher, model_type='qwen3', template=TEMPLATE,
                                       adapters=[str(tmp_path / 'adapter')], torch_dtype='float32', device='cpu')
    ids = torch.randint(0, 440, (24, )).tolist()
    res = teacher.score([ScoreSpec(ids, torch.arange(5, 23), topk=8, with_tail=True)])[0]
    plain = AutoModelForCausalLM.from_pretrained(tiny_ws.teacher, dtype=torch.float32).eval()
    with torch.no_grad():
        lp = torch.log_softmax(peft_model(input_ids=torch.tensor([ids])).logits[0, 5:23].float(), -1)
        lp_plain = torch.log_softmax(plain(input_ids=torch.tensor([ids])).logits[0, 5:23].float(), -1)
    assert (lp - lp_plain).abs().max() > 1e-3, 'the adapter should change the teacher'
    vals, idx = lp.topk(8, -1)
    assert torch.equal(res.ids, idx)
    assert torch.allclose(res.logprobs, vals, atol=1e-5, rtol=0)
    assert torch.allclose(res.tail, torch.logsumexp(lp.scatter(-1, idx, float('-inf')), -1), atol=1e-5, rtol=0)
    # issue 96: what GET /health reports of the served weights, the store's fingerprints of the base and the adapter
    from swift_gkd_plugin.core.scores.store import adapters_fingerprint, weights_fingerprint
    assert teacher.weights_fingerprint == weights_fingerprint(tiny_ws.teacher)
    assert teacher.adapters_fingerprint == adapters_fingerprint([str(tmp_path / 'adapter')]) != ''


@pytest.fixture(scope='module')
def inproc_teacher(tiny_ws):
    from swift_gkd_plugin.server.backend import TransformersTeacher
    return TransformersTeacher.load(tiny_ws.teacher, model_type='qwen3', template=TEMPLATE, torch_dtype='float32',
                                    device='cpu')


class InProcessServer:
    """The app under uvicorn in a thread of this process (to reach into the teacher); ``wrap`` puts an ASGI layer in
    front of it (a gateway)."""

    def __init__(self, teacher, wrap=None, **config):
        import uvicorn

        from swift_gkd_plugin.server import ServerConfig, create_app
        self.port = _free_port()
        self.url = f'http://127.0.0.1:{self.port}'
        app = create_app(teacher, ServerConfig(**config))
        if wrap is not None:
            app = wrap(app)
        self.server = uvicorn.Server(uvicorn.Config(app, host='127.0.0.1', port=self.port, log_level='warning'))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), 'in-process server did not start'
            time.sleep(0.05)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)


@pytest.mark.timeout(120)
def test_a_failing_sequence_fails_only_its_request(inproc_teacher, reference, monkeypatch):
    """An exception in the forward of one sequence: its request gets 500, the others of the same batch their
    answers, and the batcher keeps serving."""
    real_score = inproc_teacher.score
    POISON = 13

    def score(specs):
        if any(s.input_ids[0] == POISON for s in specs):
            raise RuntimeError('poisoned sequence')
        return real_score(specs)

    monkeypatch.setattr(inproc_teacher, 'score', score)
    server = InProcessServer(inproc_teacher, topk=8, batch_wait_ms=200)  # 200 ms: the requests share a batch
    try:
        g = torch.Generator().manual_seed(1)
        seqs = [[POISON if i % 3 == 0 else 1] + torch.randint(0, 440, (20, ), generator=g).tolist()
                for i in range(9)]
        with ThreadPoolExecutor(9) as ex:
            answers = list(ex.map(lambda ids: _post_topk(server.url, [{'prompt_ids': ids[:10],
                                                                       'response_ids': ids[10:]}], 8), seqs))
        for ids, r in zip(seqs, answers):
            if ids[0] == POISON:
                assert r.status_code == 500 and 'poisoned sequence' in r.json()['message']
            else:
                assert r.status_code == 200, r.text
                item = r.json()['results'][0]
                got = np.frombuffer(base64.b64decode(item['ids']), '<i4').reshape(-1, 8)
                assert np.array_equal(got, reference(ids, list(range(9, 20)), 8)[0].numpy())
        health = httpx.get(f'{server.url}/health/').json()['batcher']
        assert health['worker_alive'] and health['failures'] == 3 and health['batches'] < 9
        # the client: a 500 (the server is up but failed) gets the counted retries only, not the time budget
        lines = []
        client = TeacherClient(server.url, retries=2, wait=600, backoff=0.05, log=lines.append)
        t0 = time.monotonic()
        with pytest.raises(TeacherServerError, match='poisoned sequence') as err:
            client.topk([(seqs[0][:10], seqs[0][10:])], topk=8)
        assert err.value.status == 500 and err.value.attempts == 3 and time.monotonic() - t0 < 60
        assert [line.split(' (retry ')[-1] for line in lines] == ['1 of 2)', '2 of 2)'], lines
        assert _post_topk(server.url, [{'prompt_ids': [1, 2], 'response_ids': [3]}], 8).status_code == 200
    finally:
        server.stop()


@pytest.mark.timeout(60)
def test_public_health_keeps_the_rest_private(inproc_teacher):
    server = InProcessServer(inproc_teacher, topk=8, api_key=KEY, public_health=True)
    try:
        assert httpx.get(f'{server.url}/health').status_code == 200
        assert httpx.get(f'{server.url}/v1/models').status_code == 401
        body = {'sequences': [{'prompt_ids': [1], 'response_ids': [2]}]}
        assert httpx.post(f'{server.url}/v1/topk', json=body).status_code == 401
        assert httpx.post(f'{server.url}/v1/topk', json=body, headers=AUTH).status_code == 200
    finally:
        server.stop()


@pytest.mark.timeout(600)
def test_rewards_and_several_samples_per_prompt_against_the_server(tiny_ws, servers, solution_dataset, tmp_path):
    """GKD + RL with the teacher's top-k (and the tail bucket) from the server: the same losses, rewards and
    policy-gradient term as the local top-k teacher (G = 2 seeds the sampler per step; learning rate 0 keeps the
    weights), the fused loss carrying the policy-gradient term."""
    common = dict(dataset=solution_dataset, lmbda=1, num_generations=2, per_device_train_batch_size=4, max_steps=2,
                  learning_rate=0, seed=6, reward_funcs='tiny_letter_match', gkd_rl_coef=1,
                  external_plugins=RL_REWARD_PLUGIN, gkd_logits_topk=8, gkd_topk_tail='true')
    remote = run_swift(base_args(tiny_ws, str(tmp_path / 'remote'), teacher_model=None, teacher_model_type=None,
                                 teacher_model_server=servers['main'].url, **common))
    local = run_swift(base_args(tiny_ws, str(tmp_path / 'local'), **common))
    assert 'GKD loss implementation: fused' in remote.output
    for a, b in zip(remote.logs, local.logs):
        for key in ('loss', 'gkd/pg_loss', 'gkd/reward', 'gkd/entropy'):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-7), key
        assert a['loss'] == pytest.approx(a['gkd/distill_loss'] + a['gkd/pg_loss'], rel=1e-4, abs=1e-7)
    assert any(abs(r['gkd/pg_loss']) > 0 for r in remote.logs)


# ----------------------------------------------------------------------------------------------------------------
# gateways in front of the real server: rate limits and damaged answers (issue 21 items 17, 25)
# ----------------------------------------------------------------------------------------------------------------


class RateLimit:
    """An ASGI gateway answering 429 with ``Retry-After: retry_after()`` to the first ``n`` POSTs, then passing
    requests through."""

    def __init__(self, app, n: int, retry_after):
        self.app, self.left, self.retry_after = app, n, retry_after

    async def __call__(self, scope, receive, send):
        if scope['type'] == 'http' and scope['method'] == 'POST' and self.left > 0:
            self.left -= 1
            body = b'{"object": "error", "message": "rate limit exceeded", "code": 429}'
            await send({'type': 'http.response.start', 'status': 429, 'headers': [
                (b'content-type', b'application/json'), (b'retry-after', self.retry_after().encode())]})
            await send({'type': 'http.response.body', 'body': body})
            return
        await self.app(scope, receive, send)


class Damage:
    """An ASGI gateway that passes requests to the real server and damages its 200 answers on ``path`` with
    ``fn(doc) -> doc`` (the decoded JSON or msgpack document; ``fn`` may return raw bytes)."""

    def __init__(self, app, path: str, fn):
        self.app, self.path, self.fn = app, path, fn

    async def __call__(self, scope, receive, send):
        if scope['type'] != 'http' or scope.get('path') != self.path:
            return await self.app(scope, receive, send)
        start, chunks = {}, []

        async def keep(message):
            if message['type'] == 'http.response.start':
                start.update(message)
            else:
                chunks.append(message.get('body', b''))

        await self.app(scope, receive, keep)
        body = b''.join(chunks)
        headers = [(k, v) for k, v in start['headers'] if k.lower() != b'content-length']
        if start['status'] == 200:
            import msgpack
            packed = dict(headers).get(b'content-type', b'').startswith(b'application/msgpack')
            doc = self.fn(msgpack.unpackb(body, raw=False) if packed else json.loads(body))
            body = doc if isinstance(doc, bytes) else (msgpack.packb(doc, use_bin_type=True) if packed else
                                                       json.dumps(doc).encode())
        await send({'type': 'http.response.start', 'status': start['status'],
                    'headers': headers + [(b'content-length', str(len(body)).encode())]})
        await send({'type': 'http.response.body', 'body': body})


@pytest.mark.timeout(120)
def test_the_client_rides_out_429_honouring_retry_after(inproc_teacher, reference):
    """A rate-limiting gateway in front of the real server: 429 is retried after its Retry-After (seconds or an HTTP
    date) within the wait, each retry logged; a Retry-After beyond the wait left stops at once, saying so."""
    ids, positions = list(range(3, 20)), [4, 8, 15]
    ref_ids = reference(ids, positions, 4)[0]
    for retry_after in [lambda: '1', lambda: email.utils.formatdate(time.time() + 2, usegmt=True)]:
        server = InProcessServer(inproc_teacher, wrap=lambda app: RateLimit(app, 2, retry_after), topk=8)
        try:
            lines = []
            client = TeacherClient(server.url, retries=0, wait=60, backoff=0.05, log=lines.append)
            t0 = time.monotonic()
            res = client.topk_at([(ids, positions)], topk=4)[0]
            assert torch.equal(res.ids, ref_ids) and time.monotonic() - t0 >= 1.0
            assert len(lines) == 2 and all('HTTP 429: rate limit exceeded' in line for line in lines), lines
            assert all('wait left' in line for line in lines), lines
        finally:
            server.stop()
    server = InProcessServer(inproc_teacher, wrap=lambda app: RateLimit(app, 10, lambda: '120'), topk=8)
    try:
        t0 = time.monotonic()
        with pytest.raises(TeacherServerError, match='asks to retry after 120s, more than the') as err:
            TeacherClient(server.url, retries=0, wait=5, backoff=0.05).topk_at([(ids, positions)], topk=4)
        assert err.value.status == 429 and err.value.attempts == 1 and time.monotonic() - t0 < 5
    finally:
        server.stop()


def _damage_topk(what):
    """A function damaging sequence 1 of a /v1/topk answer of two or more sequences (JSON base64 or msgpack raw
    arrays)."""
    from swift_gkd_plugin.server.protocol import IDS_DTYPE, pack_array, unpack_array

    def fn(doc):
        if len(doc['results']) < 2:  # the trainer's one-sequence probe of the route at start-up
            return doc
        if what == 'json':
            return b'{"object": "teacher.topk", "results": [{"num_po'
        if what == 'result short':
            doc['results'] = doc['results'][:1]
            return doc
        item, k, encoding = doc['results'][1], doc['topk'], doc['encoding']
        n = item['num_positions']
        lp_dtype = '<f4'
        if what == 'row short':
            item['num_positions'] = n - 1
            item['ids'] = pack_array(unpack_array(item['ids'], IDS_DTYPE, (n, k))[:-1], IDS_DTYPE, encoding)
            item['logprobs'] = pack_array(unpack_array(item['logprobs'], lp_dtype, (n, k))[:-1], lp_dtype, encoding)
            return doc
        if what in ('nan', '-inf'):
            lps = unpack_array(item['logprobs'], lp_dtype, (n, k))
            lps[2, 0 if what == '-inf' else 1] = float(what)
            if what == '-inf':
                lps[2, :] = float('-inf')
            item['logprobs'] = pack_array(lps, lp_dtype, encoding)
            return doc
        ids = unpack_array(item['ids'], IDS_DTYPE, (n, k))
        ids[2, 1] = {'beyond': doc['vocab_size'] + 5, 'negative': -3}[what]
        item['ids'] = pack_array(ids, IDS_DTYPE, encoding)
        return doc

    return fn


@pytest.mark.timeout(180)
@pytest.mark.parametrize('binary', [True, False], ids=['msgpack', 'json'])
def test_damaged_answers_are_refused_naming_the_server_and_the_row(inproc_teacher, binary):
    """Every /v1/topk answer is checked: NaN or all -inf log-probs, ids beyond the vocabulary or negative, an
    undecodable body, a result or a row missing. Each is retried once (a server error), then raised naming the URL,
    the sequence and the row; nothing is trained on silently."""
    seqs = [(list(range(3, 20)), [4, 8, 15]), (list(range(30, 60)), [1, 5, 9, 20])]
    cases = {'nan': 'sequence 1, row 2: log-probability nan (top-2)',
             '-inf': 'sequence 1, row 2: log-probability -inf (top-1)',
             'beyond': 'sequence 1, row 2: token id {} outside the vocabulary [0, {})',
             'negative': 'sequence 1, row 2: token id -3 outside the vocabulary',
             'json': 'invalid answer: undecodable body',
             'result short': 'invalid answer: 1 results for 2 sequences',
             'row short': 'sequence 1: 3 rows for the 4 positions asked'}
    for what, message in cases.items():
        if what == 'json' and binary:
            continue
        server = InProcessServer(inproc_teacher, wrap=lambda app: Damage(app, '/v1/topk', _damage_topk(what)), topk=8)
        try:
            vocab = httpx.get(f'{server.url}/health').json()['vocab_size']
            client = TeacherClient(server.url, retries=1, backoff=0.01, binary=binary)
            with pytest.raises(TeacherServerError) as err:
                client.topk_at(seqs, topk=4)
            text = str(err.value)
            assert f'teacher server {server.url}/v1/topk failed after 2 attempts' in text, text
            assert message.format(vocab + 5, vocab) in text, (what, text)
        finally:
            server.stop()


@pytest.mark.timeout(120)
def test_damaged_infer_answers_are_refused(inproc_teacher):
    """ms-swift's /infer/ answers get the same checks (NaN, ids outside the vocabulary, rows missing)."""
    requests_ = [{'messages': [{'role': 'user', 'content': 'Reverse: a b'}, {'role': 'assistant', 'content': 'b a'}]}]
    config = {'prompt_logprobs': 4, 'max_tokens': 1}

    def nan(doc):
        entry = doc[0]['prompt_logprobs'][3]
        entry[next(iter(entry))]['logprob'] = float('nan')
        return json.dumps(doc).replace('NaN', 'NaN').encode()

    def beyond(doc):
        doc[0]['prompt_logprobs'][3]['99999'] = {'logprob': -1.0, 'rank': 9}
        return doc

    def short(doc):
        doc[0]['prompt_logprobs'] = doc[0]['prompt_logprobs'][:-1]
        return doc

    def no_ids(doc):  # what vLLM's ms-swift engine answers without return_details
        doc[0]['prompt_token_ids'] = None
        return doc

    server = InProcessServer(inproc_teacher, wrap=lambda app: Damage(app, '/infer/', no_ids), topk=8)
    try:  # accepted: the log-probs are still checked, the tokenization cannot be
        answer = TeacherClient(server.url, retries=0).infer(requests_, config)[0]
        assert answer['prompt_token_ids'] is None and len(answer['prompt_logprobs']) > 3
    finally:
        server.stop()
    for fn, message in [(nan, 'answer 0, row 2: log-probability nan'),
                        (beyond, 'answer 0, row 2: token id 99999 outside the vocabulary'),
                        (short, 'answer 0: prompt_logprobs of')]:
        server = InProcessServer(inproc_teacher, wrap=lambda app: Damage(app, '/infer/', fn), topk=8)
        try:
            client = TeacherClient(server.url, retries=0)
            client.vocab_size = httpx.get(f'{server.url}/health').json()['vocab_size']
            with pytest.raises(TeacherServerError, match=re.escape(message)) as err:
                client.infer(requests_, config)
            assert server.url in str(err.value)
        finally:
            server.stop()


@pytest.mark.timeout(300)
def test_swift_rlhf_stops_on_a_teacher_answering_nan(tiny_ws, inproc_teacher, tmp_path):
    """A served teacher whose answers hold NaN log-probs: the run stops at the first step naming the server and the
    row (it trained with loss 0 and grad 0 and exited 0)."""
    server = InProcessServer(inproc_teacher, wrap=lambda app: Damage(app, '/v1/topk', _damage_topk('nan')), topk=8)
    try:
        run = run_swift(base_args(tiny_ws, str(tmp_path / 'out'), teacher_model=None, teacher_model_type=None,
                                  teacher_model_server=server.url, gkd_logits_topk=8, teacher_server_retries=1,
                                  max_steps=1), check=False)
    finally:
        server.stop()
    assert run.returncode != 0 and not run.losses
    assert f'teacher server {server.url}/v1/topk failed after 2 attempts' in run.output, run.output[-3000:]
    assert 'sequence 1, row 2: log-probability nan' in run.output


# ----------------------------------------------------------------------------------------------------------------
# a teacher that does not read the student's tokens as the student does (issue 21 items 18, 24)
# ----------------------------------------------------------------------------------------------------------------


def test_health_reports_the_tokenizer_and_a_padded_head_is_accepted(inproc_teacher, tokenizer):
    """/health's tokenizer fingerprint is the student's for a teacher of the same tokenizer; a larger (padded)
    output head with that tokenizer is accepted, a smaller head or another fingerprint refused."""
    from swift_gkd_plugin.server import TeacherClient
    from swift_gkd_plugin.swift.setup.teacher_server import check_same_tokenizer
    server = InProcessServer(inproc_teacher, topk=8)
    try:
        client = TeacherClient(server.url)
        health = client.health_doc = client.health()
        client.route_name = client.route()
    finally:
        server.stop()
    assert health['tokenizer_size'] == len(tokenizer) and client.route_name == 'topk'
    check_same_tokenizer(client, tokenizer)
    client.health_doc = {**health, 'vocab_size': health['vocab_size'] + 64}
    check_same_tokenizer(client, tokenizer)
    for bad in [{'vocab_size': len(tokenizer) - 1}, {'tokenizer_sha256': '0' * 64}]:
        client.health_doc = {**health, **bad}
        with pytest.raises(ValueError, match='another tokenizer'):
            check_same_tokenizer(client, tokenizer)


@pytest.mark.timeout(300)
def test_swift_rlhf_refuses_a_served_teacher_with_another_tokenizer(tiny_ws, sp_teacher, tokenizer, tmp_path):
    """A served teacher of another tokenizer (600 entries; the student has 448): refused at start-up naming both,
    before any step (its scores were read as the student's token ids and the run exited 0)."""
    from swift_gkd_plugin.server.backend import TransformersTeacher
    teacher = TransformersTeacher.load(sp_teacher, model_type='qwen3', template=TEMPLATE, torch_dtype='float32',
                                       device='cpu')
    server = InProcessServer(teacher, topk=8)
    try:
        run = run_swift(base_args(tiny_ws, str(tmp_path / 'out'), teacher_model=None, teacher_model_type=None,
                                  teacher_model_server=server.url, gkd_logits_topk=8, max_steps=1), check=False)
    finally:
        server.stop()
    assert run.returncode != 0 and not run.losses
    needle = (f"the teacher server {server.url} serves a teacher with another tokenizer than the student's: its "
              f"/health reports a tokenizer of {len(teacher.tokenizer)} tokens")
    assert needle in run.output, run.output[-3000:]
    assert f"the student's tokenizer has {len(tokenizer)} tokens" in run.output


@pytest.mark.timeout(300)
def test_swift_rlhf_refuses_an_infer_server_that_tokenizes_otherwise(tiny_ws, tmp_path):
    """A server with only ms-swift's /infer/ whose template adds an empty think block (qwen3 against the trainer's
    qwen3_nothinking): its prompt_token_ids differ from the trainer's, and the first step stops naming both (the
    teacher's log-probs landed on the wrong tokens and the run exited 0)."""
    from swift_gkd_plugin.server.backend import TransformersTeacher
    teacher = TransformersTeacher.load(tiny_ws.teacher, model_type='qwen3', template='qwen3', torch_dtype='float32',
                                       device='cpu')
    server = InProcessServer(teacher, topk=8, topk_route=False)
    try:
        run = run_swift(base_args(tiny_ws, str(tmp_path / 'out'), teacher_model=None, teacher_model_type=None,
                                  teacher_model_server=server.url, gkd_logits_topk=8, max_steps=1, lmbda=0),
                        check=False)
    finally:
        server.stop()
    assert run.returncode != 0 and not run.losses
    needle = f'the teacher server {server.url} tokenizes request 0 of this step differently from the trainer'
    assert needle in run.output, run.output[-3000:]
    assert re.search(r"server \[[\d, ]+\], trainer \[[\d, ]+\]", run.output)


# ----------------------------------------------------------------------------------------------------------------
# out of memory, devices (issue 21 item 5)
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_an_out_of_memory_batch_is_retried_in_halves_after_its_memory_is_freed(inproc_teacher, reference):
    """The batcher with the real teacher behind a tiny memory budget: a forward of more than 2 sequences fails with
    a real allocation failure (torch's CPU allocator, asked for 4 EiB). The batch is retried in halves, and every
    retry starts only once the failed forward's activations are freed (they stayed alive through the traceback when
    the retries ran inside the except block). A sequence that never fits fails alone, with an error that holds no
    traceback."""
    import weakref

    from swift_gkd_plugin.server.backend import DynamicBatcher, ScoreFailed, ScoreSpec
    POISON = 13
    calls, alive, refs = [], [], []

    def score(specs):
        alive.append(sum(ref() is not None for ref in refs))  # earlier attempts' activations still in memory
        activations = torch.ones(4096)  # what a forward holds when it fails
        refs.append(weakref.ref(activations))
        calls.append(len(specs))
        if len(specs) > 2 or any(s.input_ids[0] == POISON for s in specs):
            torch.empty(2**62, dtype=torch.uint8)
        return inproc_teacher.score(specs)

    g = torch.Generator().manual_seed(3)
    seqs = [[1 + i] + torch.randint(0, 440, (15, ), generator=g).tolist() for i in range(5)]
    done = {}
    finished = threading.Event()

    def on_done(name):
        def cb(results, error):
            done[name] = (results, error)
            if len(done) == 2:
                finished.set()
        return cb

    batcher = DynamicBatcher(score, max_batch_tokens=10**6, max_queue=100, batch_wait_s=0.2)
    batcher.start()
    try:
        batcher.submit([ScoreSpec(ids, torch.arange(4, 15), topk=4) for ids in seqs], on_done('good'))
        batcher.submit([ScoreSpec([POISON] + seqs[0][1:], torch.arange(4, 15), topk=4)], on_done('poison'))
        assert finished.wait(60), done
    finally:
        batcher.stop()
    results, error = done['good']
    assert error is None
    for ids, res in zip(seqs, results):
        assert torch.equal(res.ids, reference(ids, list(range(4, 15)), 4)[0])
    assert calls[0] == 6 and max(calls[1:]) <= 3, calls  # one batch of all six, then halves
    assert alive == [0] * len(alive), (alive, calls)
    results, error = done['poison']
    assert results is None and isinstance(error, ScoreFailed) and error.memory
    assert "can't allocate memory" in str(error) and error.__traceback__ is None


def test_the_scoring_chunk_is_sized_for_the_free_memory():
    """chunk_rows: three float32 [rows, vocab] copies within a quarter of the free memory, 128 MiB when it is
    unknown (CPU), within [1, 4096]."""
    from swift_gkd_plugin.server.backend import chunk_rows
    V = 151936
    assert chunk_rows(V) == 2**27 // (3 * 4 * V) == 73
    assert chunk_rows(V, free_bytes=8 * 2**30) == 2 * 2**30 // (3 * 4 * V) == 1177  # an 8 GiB-free device
    assert chunk_rows(V, free_bytes=80 * 2**30) == 4096  # capped
    assert chunk_rows(V, free_bytes=2**20) == 1  # a nearly full device: one row at a time


@pytest.mark.timeout(120)
def test_device_map_loads_and_scores(tiny_ws, reference):
    """--device_map: the teacher is placed by transformers' device map (here on the only device, the CPU) and
    scores as a direct forward; an unknown value is refused naming the flag and the choices."""
    from swift_gkd_plugin.server.backend import ScoreSpec, TransformersTeacher
    teacher = TransformersTeacher.load(tiny_ws.teacher, model_type='qwen3', template=TEMPLATE, torch_dtype='float32',
                                       device_map='auto')
    ids = list(range(5, 30))
    res = teacher.score([ScoreSpec(ids, torch.arange(3, 20), topk=8)])[0]
    ref_ids, ref_lp, _ = reference(ids, list(range(3, 20)), 8)
    assert torch.equal(res.ids, ref_ids) and torch.allclose(res.logprobs, ref_lp, atol=1e-5, rtol=0)
    proc = run_swift_gkd(['serve-teacher', '--model', tiny_ws.teacher, '--device_map', 'everywhere'])
    assert proc.returncode == 2
    assert "--device_map 'everywhere' is not one of auto, balanced, balanced_low_0, sequential" in proc.stderr


@pytest.mark.parametrize('flag', ['--top_k', '--topk'])
def test_top_k_is_the_trainers_name_and_topk_stays_an_alias(flag):
    """The trainer's flags are --top_k / --gkd_logits_topk; the server's former name --topk still parses."""
    import argparse

    from swift_gkd_plugin.server import cli as server_cli
    parser = argparse.ArgumentParser()
    server_cli.add_arguments(parser)
    assert parser.parse_args(['--model', 'm', flag, '7']).topk == 7
    assert '--top_k TOPK, --topk TOPK' in parser.format_help()


SERVE_BAD_FLAGS = [
    (['--max_body_mb', '-1'], '--max_body_mb must be a finite number >= 0.000976562 (1 KiB; the request body limit in '
                              'MiB: below it every request would get 413), got -1.0'),
    (['--max_body_mb', '0'], '--max_body_mb must be a finite number >= 0.000976562'),
    # issue 89 item 15: a 0-byte limit, a wait of 31 years, no tokens, keys no client can send, a folder that is no
    # adapter and a misspelled template (the last two failed with tracebacks after the load)
    (['--max_body_mb', '1e-9'], '--max_body_mb must be a finite number >= 0.000976562 (1 KiB'),
    (['--batch_wait_ms', '1e12'], '--batch_wait_ms must be a finite number from 0 to 60000 (a minute: every batch '
                                  'waits this long before its forward), got 1e+12'),
    (['--max_length', '0'], '--max_length must be >= 1 (the longest encoded messages request, in tokens) or unset'),
    (['--max_length', '-5'], 'got -5'),
    (['--api_key', ' k1 '], "--api_key ' k1 ' has surrounding spaces, which HTTP strips from the Authorization header "
                            "(every client would get 401): pass 'k1'"),
    (['--host', '0.0.0.0', '--api_key', ' '], "--api_key is blank (' '): give a key of visible characters"),
    (['--adapters', '{teacher}'], '--adapters {teacher}: the folder holds no adapter_config.json, so it is not a PEFT '
                                  'adapter'),
    (['--model_type', 'qwen3', '--template', 'qwen3_nothinkng'],
     "--template 'qwen3_nothinkng' is not a registered ms-swift template type (close matches: ['qwen3_nothinking'"),
    (['--port', '70000'], '--port must be in [0, 65535] (0: any free port), got 70000'),
    (['--device', 'cuda'], '--device cuda: this process sees no CUDA device (use --device cpu or auto)'),
    (['--device', 'tpu'], "--device must be auto, cpu, cuda or cuda:N, got 'tpu'"),
    (['--torch_dtype', 'float8'], "--torch_dtype must be one of auto, float32, fp32, bfloat16, bf16, float16, fp16, "
                                  "got 'float8'"),
    (['--top_k', '5', '--topk', '9'], '--top_k 5 --topk 9: --top_k and --topk are one flag given different values'),
    (['--batch_wait_ms', 'nan'], '--batch_wait_ms must be a finite number from 0 to 60000 (a minute: every batch '
                                 'waits this long before its forward), got nan'),
    (['--num_threads', '0'], '--num_threads must be >= 1'),
    # issue 45: taken for a hub id, failing after minutes with a traceback
    (['--model', './teachers/tiny'], "--model ./teachers/tiny: no such folder './teachers/tiny'"),
    (['--adapters', '/nonexistent/adapter'], "--adapters /nonexistent/adapter: no such folder"),
]


@pytest.mark.skipif(os.path.exists('/dev/nvidiactl'), reason='the --device cuda case needs a machine without CUDA')
@pytest.mark.parametrize('flags,message', SERVE_BAD_FLAGS, ids=[' '.join(f) for f, _ in SERVE_BAD_FLAGS])
def test_serve_teacher_refuses_bad_flags_before_loading(tiny_ws, flags, message):
    """Every flag is checked before the model loads (they used to fail after the load with a traceback, or start a
    server that answered 413 to everything, or silently take the last of --top_k / --topk): one error line, exit 2."""
    proc = run_swift_gkd(['serve-teacher', '--model', tiny_ws.teacher,
                          *[flag.format(teacher=tiny_ws.teacher) for flag in flags]])
    errors = [line for line in proc.stderr.splitlines() if line.startswith('swift-gkd serve-teacher: error: ')]
    assert proc.returncode == 2 and len(errors) == 1 and 'Traceback' not in proc.stderr, proc.stderr[-2000:]
    assert message.format(teacher=tiny_ws.teacher) in errors[0]
    assert 'loaded in' not in proc.stderr  # the teacher never loaded


def test_serve_teacher_refuses_a_port_in_use_before_loading(tiny_ws):
    """Issue 45: uvicorn found the port taken only after the model had loaded."""
    import socket
    with socket.socket() as taken:
        taken.bind(('127.0.0.1', 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = run_swift_gkd(['serve-teacher', '--model', tiny_ws.teacher, '--port', str(port)])
    errors = [line for line in proc.stderr.splitlines() if line.startswith('swift-gkd serve-teacher: error: ')]
    assert proc.returncode == 2 and len(errors) == 1 and 'Traceback' not in proc.stderr, proc.stderr[-2000:]
    assert f'--port {port}: cannot listen on 127.0.0.1:{port}' in errors[0] and 'loaded in' not in proc.stderr


def test_every_serve_teacher_flag_has_help_text():
    """Issue 66 item 13: --port and --served_model_name had none in ``swift-gkd serve-teacher --help``."""
    import argparse

    from swift_gkd_plugin.server.cli import add_arguments
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    flags = [action for action in parser._actions if action.option_strings and action.dest != 'help']
    assert flags and [a.option_strings[0] for a in flags if not (a.help or '').strip()] == []


@pytest.mark.timeout(120)
def test_a_slow_answer_names_the_timeout_once(inproc_teacher):
    """Issue 81 item 9: a server answering in 30 s held each step without a word (a 2-process run went 11.5 minutes
    without a step). An answer taking a fifth of the client's timeout or more is logged once, naming the timeout's
    flag and value (swift rlhf's client: --teacher_server_timeout)."""
    import asyncio

    def slow_gateway(app):
        async def delayed(scope, receive, send):
            if scope['type'] == 'http' and scope['path'].startswith('/v1/topk'):
                await asyncio.sleep(2.5)
            await app(scope, receive, send)
        return delayed

    server = InProcessServer(inproc_teacher, wrap=slow_gateway, topk=8)
    try:
        lines = []
        client = TeacherClient(server.url, timeout=10, retries=0, log=lines.append,
                               timeout_flag='--teacher_server_timeout')
        for _ in range(2):
            client.topk([([1, 2, 3], [4, 5])], topk=4)
        assert len(lines) == 1 and lines[0].startswith(f'teacher server {server.url}/v1/topk took '), lines
        assert 'of --teacher_server_timeout 10s (a request unanswered by then fails and is retried)' in lines[0]
        assert 'raise --teacher_server_timeout (said once)' in lines[0], lines
    finally:
        server.stop()
