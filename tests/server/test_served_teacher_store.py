"""The teacher-score store beside a served teacher (issue 96 item 5): a store named its served teacher by the URL only,
so another model behind the same URL passed. ``swift-gkd serve-teacher``'s ``GET /health`` reports the fingerprint
of the weights it serves (the store's own, of its folder and its ``--adapters``), a store a served teacher scores
keeps it, and a run reading a store beside a served teacher compares it before step 1; a server that reports none
(ms-swift's, an older one) is not compared, and the log says so. Real ``swift rlhf`` runs against real server
processes (the session's servers of the tiny teacher and of the tiny student)."""
from __future__ import annotations

import os

import httpx
import pytest
from conftest import base_args, run_swift
from test_teacher_server import TEMPLATE, InProcessServer, main_server, student_server_of

from swift_gkd_plugin.core.scores.store import TeacherStore, weights_fingerprint

#: one off-policy step at learning rate 0 from the first rows, the teacher served (no --teacher_model)
SERVED = dict(lmbda=0, seq_kd='false', learning_rate=0, max_steps=1, gkd_logits_topk=8, seed=5, teacher_model=None,
              teacher_model_type=None)


@pytest.fixture(scope='module')
def runs(tiny_ws, shared_runs):
    """A store written while training against the teacher's server, then read beside that server (accepted) and
    beside the student's (another model of the same tokenizer: refused)."""

    def served(out, server, **flags):
        return run_swift(base_args(tiny_ws, out, **dict(SERVED, teacher_model_server=server(tiny_ws).url, **flags)),
                         check=False)

    def store(out):
        return os.path.join(os.path.dirname(out), 'written', 'store')

    shared = shared_runs('served_teacher_store', {
        'written': lambda out: served(out, main_server, save_teacher_scores=os.path.join(out, 'store')),
        'same': lambda out: after('written', lambda: served(out, main_server, teacher_scores=store(out))),
        'other_model': lambda out: after('written', lambda: served(out, student_server_of, teacher_scores=store(out))),
    })

    def after(name, start):
        assert shared[name].returncode == 0, shared[name].output[-4000:]
        return start()

    return shared


def test_health_reports_the_fingerprint_of_the_served_weights(tiny_ws):
    """The server's fingerprint is the store's function of the folder it loaded: the teacher's, not the student's."""
    teacher = httpx.get(f'{main_server(tiny_ws).url}/health', timeout=30).json()
    student = httpx.get(f'{student_server_of(tiny_ws).url}/health', timeout=30).json()
    assert teacher['weights_fingerprint'] == weights_fingerprint(tiny_ws.teacher)
    assert student['weights_fingerprint'] == weights_fingerprint(tiny_ws.student) != teacher['weights_fingerprint']
    assert teacher['adapters_fingerprint'] == student['adapters_fingerprint'] == ''  # (served without --adapters)


def test_a_store_a_served_teacher_scores_keeps_its_fingerprint(runs, tiny_ws):
    written = runs['written']
    assert written.returncode == 0, written.output[-4000:]
    identity = TeacherStore(os.path.join(written.output_dir, 'store')).identity
    assert identity.teacher == main_server(tiny_ws).url
    # the served weights' fingerprint (it was ''), the local teacher's by the same function: one store, one teacher
    assert identity.teacher_hash == weights_fingerprint(tiny_ws.teacher)
    assert identity.teacher_adapters_hash == ''


def test_a_store_beside_another_model_behind_a_server_is_refused_before_step_1(runs, tiny_ws):
    """The student's server (same tokenizer, other weights) beside the teacher's store: trained on, exit 0, before;
    now one line naming the store, the URL and both fingerprints with where each came from, exit 1, no step."""
    same, other = runs['same'], runs['other_model']
    assert same.returncode == 0 and same.logs, same.output[-4000:]
    url = main_server(tiny_ws).url
    fingerprint = weights_fingerprint(tiny_ws.teacher)
    store = os.path.join(runs['written'].output_dir, 'store')
    assert f'the teacher server {url} serves the weights that scored --teacher_scores {store} ' \
        f'(fingerprint {fingerprint}, no adapter; reported by its GET /health)' in same.output, same.output[-3000:]
    errors = [line for line in other.output.splitlines() if line.startswith('swift rlhf: error: ')]
    assert other.returncode == 1 and len(errors) == 1, other.output[-3000:]
    student_url = student_server_of(tiny_ws).url
    for needle in (f'--teacher_scores {store} was scored by another teacher ({url})',
                   f'than --teacher_model_server {student_url} serves: their weights differ',
                   f"the store's manifest.json: {fingerprint}",
                   f'GET {student_url}/health: {weights_fingerprint(tiny_ws.student)}'):
        assert needle in errors[0], errors[0]
    assert 'Traceback' not in other.output and not other.logs


@pytest.mark.timeout(300)
def test_a_server_that_reports_no_fingerprint_is_not_compared_and_the_log_says_so(runs, tiny_ws, tmp_path):
    """A server whose GET /health has no fingerprint (ms-swift's, or this plugin's before issue 96): the run goes on as
    before, and says the comparison was not possible."""
    from swift_gkd_plugin.server.backend import TransformersTeacher
    assert runs['written'].returncode == 0
    teacher = TransformersTeacher.load(tiny_ws.teacher, model_type='qwen3', template=TEMPLATE, torch_dtype='float32',
                                       device='cpu')
    teacher.weights_fingerprint = ''  # (what an older server knows of its weights)
    server = InProcessServer(teacher, topk=16)
    try:
        assert 'weights_fingerprint' not in httpx.get(f'{server.url}/health', timeout=30).json()
        run = run_swift(base_args(tiny_ws, str(tmp_path / 'out'), **dict(
            SERVED, teacher_model_server=server.url,
            teacher_scores=os.path.join(runs['written'].output_dir, 'store'))), check=False)
    finally:
        server.stop()
    assert run.returncode == 0 and run.logs, run.output[-3000:]
    assert f'the teacher server {server.url} reports no fingerprint of its weights (GET /health' in run.output
    assert 'was not compared' in run.output
