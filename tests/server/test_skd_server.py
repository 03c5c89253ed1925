"""Speculative KD (``--gkd_skd_top_k``) with the teacher on this plugin's server (``swift-gkd serve-teacher``), through
the real ``swift rlhf``, against the same SKD with the teacher loaded locally; and the refusals of servers that cannot
verify (ms-swift's ``/infer/`` only, a top-k smaller than K), before any model loads."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from conftest import base_args, run_swift
from test_activation_and_bad_input import MODEL_LOADED_MARKERS
from test_teacher_server import infer_only_server_of, shared_server, student_server_of

VOCAB = 448  # the tiny models' vocabulary
# on-policy steps only, completions long enough for several draft blocks, the same prompts and seeds in every run; the
# loss reads the teacher's top-8 (required with a server, given to the local runs too). The random tiny teacher and
# student are unrelated: K = 200 of 448 accepts about half of the drafted tokens.
SKD = dict(lmbda=1, max_steps=2, max_completion_length=20, log_completions='true', seed=3, data_seed=7,
           temperature=1.0, gkd_logits_topk=8, gkd_skd_top_k=200)
# sampled near-greedily, every replacement is the teacher's argmax, inside any top-k. A LoRA student (adapter non-zero)
# on the tiny student's base, and that base as the teacher: served, or the adapter switched off locally; close enough
# that the teacher's top-3 holds some of the student's tokens and not others
GREEDY_LORA = dict(SKD, gkd_skd_top_k=3, gkd_sampling_temperature=1e-6, tuner_type='lora', lora_dropout=0)


@pytest.fixture(scope='module')
def skd_servers(tiny_ws):
    """The session's servers (started on first use): the tiny teacher with its whole vocabulary as top-k and with
    ms-swift's routes only, and the tiny student's base with its top-16."""
    return {'full': lambda: shared_server(tiny_ws, 'serve_teacher_whole_vocabulary', '--top_k', str(VOCAB)),
            'top16': lambda: student_server_of(tiny_ws),
            'infer_only': lambda: infer_only_server_of(tiny_ws)}


def _served(flags, server):
    return dict(flags, teacher_model=None, teacher_model_type=None, teacher_model_server=server.url)


@pytest.fixture(scope='module')
def runs(tiny_ws, skd_servers, shared_runs, adapters):
    lora_start = adapters['student_start']

    def start(flags, server=None):
        if server is None:
            return lambda out: run_swift(base_args(tiny_ws, out, **flags))

        def served(out):  # the server's log lines of this run, kept with it (its only user: the tests of this module)
            started = skd_servers[server]()
            before = len(started.log())
            run = run_swift(base_args(tiny_ws, out, **_served(flags, started)))
            with open(out + '.server.log', 'w') as f:
                f.write(started.log()[before:])
            return run
        return served

    return shared_runs('skd_server', {
        'local': start(SKD),
        'server_full': start(SKD, 'full'),
        'local_lora_greedy': start(dict(GREEDY_LORA, teacher_model=tiny_ws.student, adapters=lora_start)),
        'server_top16_lora_greedy': start(dict(GREEDY_LORA, adapters=lora_start), 'top16'),
    })


def completions(run):
    with open(os.path.join(run.output_dir, 'completions.jsonl')) as f:
        return [(t['prompt'], t['completion']) for t in map(json.loads, f)]


def replaced(run):
    return [row['gkd/skd_replaced_fraction'] for row in run.logs]


@pytest.mark.timeout(900)
def test_skd_on_a_server_returning_the_whole_vocabulary_is_the_local_skd(runs):
    """With the server's top-k = the vocabulary, its top-k truncation is the teacher's whole distribution: the same
    accept/reject decisions and replacements as the local teacher on the same seed, hence the same completions,
    replaced fractions and rounds, and the same losses (the loss's top-8 comes from the server in one, from the local
    teacher in the other). One /v1/topk request per verification round, on top of the loss's one per step."""
    local, served = runs['local'], runs['server_full']
    assert 'skd_top_k=200' in served.output and 'scored through POST /v1/topk' in served.output
    assert completions(served) == completions(local)
    assert replaced(served) == replaced(local)
    assert all(0.1 < r < 0.9 for r in replaced(local)), replaced(local)  # some drafted tokens replaced, not all
    assert [r['gkd/skd_rounds'] for r in served.logs] == [r['gkd/skd_rounds'] for r in local.logs]
    assert np.allclose(served.losses, local.losses, rtol=1e-4, atol=1e-7), (served.losses, local.losses)
    print(f'\nK = 200, temperature 1: replaced fraction per step: local {replaced(local)}, server (top-{VOCAB}) '
          f'{replaced(served)}')


@pytest.mark.timeout(900)
def test_skd_on_a_server_returning_its_top16_judges_as_the_local_teacher(runs):
    """With the server's top-16 (K = 3 <= 16 < the vocabulary) the drafts are judged on the returned top-k: with
    near-greedy sampling every replacement is the teacher's argmax, which the top-16 truncation keeps, so the same
    drafts, decisions and replacements as the local teacher (the LoRA student's base, adapter off): equal completions
    and replaced fractions, some drafted tokens kept and some replaced."""
    local, served = runs['local_lora_greedy'], runs['server_top16_lora_greedy']
    assert 'Teacher model: base_model with LoRA disabled' in local.output
    assert 'scored through POST /v1/topk' in served.output
    assert completions(served) == completions(local)
    assert replaced(served) == replaced(local)
    assert all(0 < r < 1 for r in replaced(local)), replaced(local)  # some drafted tokens kept, some replaced
    assert np.allclose(served.losses, local.losses, rtol=1e-4, atol=1e-7), (served.losses, local.losses)
    print(f'\nK = 3, near-greedy, LoRA student on the teacher base: replaced fraction per step: local '
          f'{replaced(local)}, server (top-16) {replaced(served)}')


def test_each_verification_round_is_one_request_for_all_rows(runs):
    """The sampler asks the server once per verification round, for every row with a new draft together: its
    requests (those at the server's own k, 16; the loss asks for 8, the start-up probes for 1) number between the
    mean and the sum of the two rows' rounds of each step."""
    served = runs['server_top16_lora_greedy']
    with open(served.output_dir + '.server.log') as f:  # the run may have been started by another test worker
        verifications = f.read().count(' k=16 ')
    rounds = [r['gkd/skd_rounds'] for r in served.logs]  # mean over the step's two sequences
    assert sum(rounds) <= verifications <= 2 * sum(rounds), (verifications, rounds)


@pytest.mark.parametrize('server,k,needles', [
    ('infer_only', 5, ['--gkd_skd_top_k 5 needs this plugin\'s teacher server (`swift-gkd serve-teacher`, POST '
                       '/v1/topk)', 'has no /v1/topk', "ms-swift's /infer/", '--gkd_skd_top_k 0']),
    ('top16', 32, ['--gkd_skd_top_k 32 is larger than the top-k the teacher server', '(its --top_k is 16)',
                   'Pass --gkd_skd_top_k 1 to 16, or restart the server with --top_k 32 or more']),
])
def test_a_server_that_cannot_verify_is_refused_before_any_model_loads(tiny_ws, skd_servers, tmp_path, server, k,
                                                                        needles):
    started = skd_servers[server]()
    flags = dict(_served(SKD, started), gkd_skd_top_k=k, teacher_server_wait=30)
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'out'), **flags), check=False, timeout=180)
    assert run.returncode != 0
    for needle in needles:
        assert needle in run.output, f'{needle!r} missing from:\n{run.output[-3000:]}'
    assert started.url in run.output
    assert not any(marker in run.output for marker in MODEL_LOADED_MARKERS)


@pytest.mark.timeout(300)
def test_the_server_teacher_returns_the_teachers_topk_as_logits_and_refuses_a_smaller_answer(tiny_ws):
    """``server_teacher`` on a running server: for the prompt's last column and the new columns, the teacher's top-16
    log-probabilities at their ids (a direct forward of the teacher as reference), -inf elsewhere; the columns before
    the prompt's last are never asked. A server answering fewer than K tokens (restarted with a smaller --top_k) is
    refused, naming --gkd_skd_top_k, K and the fix."""
    import torch
    from test_teacher_server import TEMPLATE, InProcessServer
    from transformers import AutoModelForCausalLM

    from swift_gkd_plugin.core.speculative import position_ids
    from swift_gkd_plugin.server import TeacherClient
    from swift_gkd_plugin.server.backend import TransformersTeacher
    from swift_gkd_plugin.swift.rollout.speculative import server_teacher
    served = TransformersTeacher.load(tiny_ws.teacher, model_type='qwen3', template=TEMPLATE, torch_dtype='float32',
                                      device='cpu')
    student = AutoModelForCausalLM.from_pretrained(tiny_ws.student, dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(tiny_ws.teacher, dtype=torch.float32).eval()
    server = InProcessServer(served, topk=16)
    try:
        client = TeacherClient(server.url)
        ids = torch.tensor([[0, 5, 6, 7, 8, 9], [11, 12, 13, 14, 15, 16]])  # row 0 left-padded, width 4 prompt
        mask = torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
        forward = server_teacher(client, 8)(student, 4)
        out = forward(ids[:, :5], mask[:, :5], position_ids(mask[:, :5]))
        out = torch.cat([out, forward(ids[:, 5:], mask, position_ids(mask)[:, 5:])], 1)
        with torch.no_grad():
            for row in range(2):
                keep = mask[row].bool()
                lp = torch.log_softmax(reference(input_ids=ids[row][keep][None]).logits[0].float(), -1)
                for column in range(6):
                    if column < 3:
                        assert bool((out[row, column] == 0).all())  # before the prompt's last column: not asked
                        continue
                    want = lp[int(position_ids(mask)[row, column])]
                    top = want.topk(16)
                    got = out[row, column]
                    assert torch.equal(torch.isfinite(got).nonzero().flatten().sort().values, top.indices.sort().values)
                    assert torch.allclose(got[top.indices], top.values, atol=1e-5, rtol=0)
        with pytest.raises(ValueError, match=r'--gkd_skd_top_k 32: the teacher server .* answered with its top-16 '
                                             r'only; restart it with --top_k >= 32'):
            server_teacher(client, 32)(student, 4)(ids, mask, position_ids(mask))
    finally:
        server.stop()
