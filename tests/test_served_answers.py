"""Issue 74 item 9: a served teacher's answers placed on the trainer's batch (``TeacherMixin._postprocess_batch``).

An answer with another number of positions than the row's labels score used to be assigned by tensor indexing: a
one-position answer was broadcast over every position (a silently wrong loss), any other count failed with torch's
shape message naming no row. An answer of fewer than ``k`` entries a position (a server serving a smaller top-k) was
refused the same way."""
from types import SimpleNamespace

import pytest
import torch

from swift_gkd_plugin.core.constants import IGNORE_INDEX
from swift_gkd_plugin.server.client import TopKResult
from swift_gkd_plugin.swift.teacher import ahead, placement, store

K = 4


def _trainer(answer_rows, answer_k=K):
    """A trainer's state as ``_postprocess_batch`` reads it: one served teacher whose answer to each row holds
    ``answer_rows(row, positions)`` positions of ``answer_k`` entries."""
    client = SimpleNamespace(url='http://teacher:8000')

    def score_at(client_, requests, topk, with_targets):
        out = []
        for r, (ids, positions) in enumerate(requests):
            n = answer_rows(r, len(positions))
            lps = torch.log_softmax(torch.randn(n, answer_k, dtype=torch.float64), -1).sort(-1, descending=True)[0]
            out.append(TopKResult(torch.arange(answer_k).repeat(n, 1) + 1, lps.float()))
        return out

    trainer = SimpleNamespace(use_teacher_api=True, _teacher_topk_route=True,
                              teacher_configs=[SimpleNamespace(tags=[])],
                              args=SimpleNamespace(teacher_tag_key='dataset', gkd_sampled_kl_coef=0.0,
                                                   gkd_score_only=False,
                                                   teacher_scores=None, save_teacher_scores=None,
                                                   teacher_scores_samples=0),
                              _local_teacher=None, teacher_clients=[client], gkd_logits_topk=K,
                              accelerator=SimpleNamespace(is_main_process=True))
    trainer.teacher_ahead = ahead.TeacherAhead(trainer, prefetch_on=False)  # (no --async_generate: asked now)
    trainer.score_store = store.ScoreStore(trainer)  # (no teacher-score store)
    return trainer, score_at


def _batches():
    ids = torch.arange(1, 17).reshape(2, 8)
    labels = torch.full((2, 8), IGNORE_INDEX)
    labels[0, 5:] = ids[0, 5:]  # row 0: 3 labelled tokens
    labels[1, 3:] = ids[1, 3:]  # row 1: 5
    return [{'teacher_model_inputs': {'input_ids': ids, 'labels': labels}, 'gkd_batch': SimpleNamespace()}]


def _place(monkeypatch, answer_rows, answer_k=K):
    trainer, score_at = _trainer(answer_rows, answer_k)
    monkeypatch.setattr(ahead, 'score_at', score_at)
    batches = _batches()
    placement.TeacherMixin._postprocess_batch(trainer, [SimpleNamespace()] * 2, batches)
    return batches[0]['gkd_batch']


@pytest.mark.parametrize('answered', [1, 4])
def test_an_answer_for_another_number_of_positions_is_one_error_naming_the_row_and_both_counts(monkeypatch,
                                                                                                 answered):
    with pytest.raises(ValueError) as refused:
        _place(monkeypatch, lambda r, n: answered if r == 1 else n)
    assert str(refused.value).startswith(
        f'the teacher answered {answered} positions for row 1 of micro-batch 0 (request 1 of this step, teacher '
        'server http://teacher:8000), whose labels score 5: its log-probs would land on the wrong tokens'), refused


def test_an_answer_of_the_right_length_lands_on_the_labelled_positions(monkeypatch):
    batch = _place(monkeypatch, lambda r, n: n)
    finite = batch.teacher_topk_logprobs[..., 0] > float('-inf')
    # position p predicts token p + 1: the positions before each labelled token
    assert finite.tolist() == [[False] * 4 + [True] * 3 + [False], [False] * 2 + [True] * 5 + [False]]


@pytest.mark.parametrize('route,flag', [('completions', "vLLM's --max-logprobs (`vllm serve ... --max-logprobs 4`; "
                                                        'default 20)'),
                                        ('infer', '`swift deploy --max_logprobs 4` (default 20), or for `swift '
                                         'rollout`, which leaves vLLM\'s default of 20, `--vllm_engine_kwargs '
                                         '\'{"max_logprobs": 4}\'`')])
def test_an_answer_of_fewer_than_k_entries_fills_the_rest_with_unused_slots(monkeypatch, route, flag):
    """Issue 81 item 9: padded silently before; now warned once a run (rank 0), naming both counts and the server
    flag of its route that raises the cap (ms-swift's `swift rollout` answers at most 20, ms-swift issues 9644, 9718)."""
    from swift_gkd_plugin.swift.teacher import placement as module
    warnings = []
    monkeypatch.setattr(module.logger, 'warning', warnings.append)
    trainer, score_at = _trainer(lambda r, n: n, answer_k=2)
    trainer.teacher_clients[0].route_name = route
    monkeypatch.setattr(ahead, 'score_at', score_at)
    for _ in range(2):  # two steps: one warning
        batches = _batches()
        placement.TeacherMixin._postprocess_batch(trainer, [SimpleNamespace()] * 2, batches)
    batch = batches[0]['gkd_batch']
    row = batch.teacher_topk_logprobs[1, 2]
    assert torch.isfinite(row[:2]).all() and row[2:].tolist() == [float('-inf')] * 2
    assert batch.teacher_topk_indices[1, 2].tolist() == [1, 2, 0, 0]
    assert warnings == [f'Teacher server http://teacher:8000 answered 2 entries a position for --gkd_logits_topk {K}: '
                        'the other 2 slots are padded (probability 0), so the loss reads the teacher\'s top-2. Raise '
                        f'the server\'s cap with {flag}, or pass --gkd_logits_topk 2 (warned once)'], warnings


def test_an_infer_answer_short_of_the_scored_tokens_is_one_error_when_the_server_reports_no_token_ids():
    """ms-swift's ``/infer/`` answers of a server that does not report ``prompt_token_ids``: their tokenization cannot
    be compared with the trainer's, but their length can. An answer whose prompt log-probs stop before the last token
    the loss reads (a server that truncates) was laid on the row by ms-swift's assembly with the rest left ``-inf``
    (probability 0 in the top-k loss: a silently wrong loss); it is one error naming the request and both counts."""
    from swift.infer_engine import InferRequest

    from swift_gkd_plugin.swift.teacher.served import infer_prompt_logprobs
    requests = [InferRequest(messages=[{'role': 'user', 'content': 'a'}]) for _ in range(2)]
    for request, n in zip(requests, (9, 12)):
        request._gkd_trainer_ids = (list(range(1, n + 1)), n)  # (the trainer's row, the tokens the loss reads)

    class Client:  # the plugin's TeacherClient's interface: answers as a server without prompt_token_ids gives them
        url = 'http://teacher:8000'

        def infer(self, infer_requests, config):
            lengths = (9, 7)  # request 1 answered for 7 of its 12 tokens
            return [{'prompt_logprobs': [None] + [{'1': {'logprob': -0.5}}] * (n - 1)} for n in lengths]

    with pytest.raises(ValueError) as refused:
        infer_prompt_logprobs(Client(), requests, topk=1)
    assert str(refused.value).startswith(
        'the teacher server http://teacher:8000 answered prompt log-probs for 7 tokens of request 1 of this step, '
        "whose row the loss reads through 12 tokens (the trainer's row: 12): the teacher's log-probs would miss its "
        'last 5 scored tokens'), refused
