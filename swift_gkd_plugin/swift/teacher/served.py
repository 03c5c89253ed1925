"""Served teachers in ``swift rlhf``: connect at start-up, and ms-swift's own ``/infer/`` protocol where needed.

A ``--teacher_model_server`` may be this plugin's server (``POST /v1/topk``: the trainer's own token ids, packed
arrays), any server ms-swift's built-in GKD works against, e.g. ``swift deploy --infer_backend vllm`` (``GET /health``
and ``POST /infer/``), or a plain OpenAI-compatible vLLM server (``vllm serve``: ``POST /v1/completions`` with the
trainer's token ids as the prompt and vLLM's ``prompt_logprobs``). Which one is asked once, at start-up (the route,
:meth:`TeacherClient.route`). Against ``/infer/`` the trainer uses ms-swift's requests (chats with the response as
token ids), ``prompt_logprobs`` and parsing, so that its teacher top-k, and hence its losses, are the built-in's.
"""
from __future__ import annotations

from dataclasses import asdict
from typing import Any, List, Tuple

from swift.infer_engine import RequestConfig
from swift.infer_engine.protocol import ChatCompletionResponse
from swift.rlhf_trainers.utils import parse_prompt_logprobs
from swift.utils import get_logger

from swift_gkd_plugin.core.constants import IGNORE_INDEX
from swift_gkd_plugin.server.client import TeacherClient, TopKResult
from swift_gkd_plugin.swift.run.guards import RunError
from swift_gkd_plugin.swift.setup.teacher_server import (ROUTE_NAMES, check_routes_mix, check_same_tokenizer,
                                                        teacher_client)

logger = get_logger()


class TeacherAnswerError(RunError, ValueError):
    """A served teacher's answer that cannot be laid on the trainer's row (another length, tokenization, no
    log-probs): the run stops with its one ``swift rlhf: error:`` line, exit code 1 (a ``ValueError`` as before)."""


def connect_teacher_servers(args, configs, accelerator, topk: int, tokenizer=None,
                            local: bool = False) -> Tuple[List[TeacherClient], bool]:
    """The clients of the served teachers once their servers are healthy, and whether the trainer scores its own
    token ids on every one of them (``/v1/topk`` or ``/v1/completions``; False: ms-swift's ``/infer/`` path).

    Every rank waits for every server (``--teacher_server_wait`` seconds at most, each failed poll logged), so that
    training can start while a large teacher is still loading. Only the main process asks for the routes, and every
    rank follows its answer: the ``/infer/`` path gathers the requests on the main process, the others do not, so the
    ranks must agree (and ``/infer/`` cannot be mixed with the others, nor with a ``local`` teacher). ``topk`` (``--gkd_logits_topk``) is checked
    against what each server serves, and the student's ``tokenizer`` against the server's
    (:func:`check_same_tokenizer`).
    """
    clients = [teacher_client(args, cfg.url) for cfg in configs]
    for client in clients:
        logger.info(f'Teacher server {client.url}: waiting until it is healthy (at most {client.wait:g}s, '
                    '--teacher_server_wait)')
        client.health_doc = client.wait_until_ready()
        check_topk_served(client.url, client.health_doc, topk)
        if isinstance(client.health_doc.get('vocab_size'), int):
            client.vocab_size = client.health_doc['vocab_size']  # answers with ids beyond it are refused
    answer = [[client.route() for client in clients] if accelerator.is_main_process else None]
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list
        broadcast_object_list(answer, from_process=0)
    for client, route in zip(clients, answer[0]):
        client.route_name = route
        if route == 'completions':
            client.openai_model_id = (client.openai_model() or {}).get('id')
        if tokenizer is not None:
            check_same_tokenizer(client, tokenizer)
        identity = client.remember_identity()  # a server restarted with another teacher stops the run
        logger.info(f'Teacher server {client.url}: scored through {ROUTE_NAMES[route]} ({identity or "unnamed"})')
    # (checked before loading too; again here: a server restarted since then may speak otherwise)
    check_routes_mix([(c.url, c.route_name) for c in clients], local=local)
    return clients, clients[0].route_name != 'infer'


def score_at(client: TeacherClient, requests: List[Tuple[list, list]], topk: int,
             with_targets: bool) -> List[TopKResult]:
    """The teacher's top-k (and each next token's log-prob) at the given positions of each ``(input_ids, positions)``,
    through the client's route (``/v1/topk`` or ``/v1/completions``)."""
    if client.route_name == 'completions':
        return client.prompt_logprobs_at(requests, topk=topk, with_targets=with_targets,
                                         model=getattr(client, 'openai_model_id', None))
    return client.topk_at(requests, topk=topk, with_targets=with_targets)


def fit_answer(result: TopKResult, positions: int, k: int, where: str) -> TopKResult:
    """A served teacher's answer for one row, checked and shaped for the batch's ``[positions, k]`` slots.

    One row per scored position, or one error naming the row and both counts (``where``: the row, its micro-batch
    and its server): a tensor assignment broadcast a one-row answer over every position and refused any other count
    with a shape message that named nothing. An answer of fewer than ``k`` entries a position (a server serving a
    smaller top-k) fills the rest with unused slots (id 0, log-probability ``-inf``: buckets of probability 0 in every
    loss); one of more keeps its ``k`` most likely."""
    import torch
    ids, logprobs = result.ids, result.logprobs
    if ids.dim() != 2 or ids.shape != logprobs.shape or ids.shape[0] != positions:
        answered = tuple(logprobs.shape)[0] if logprobs.dim() else 0
        raise TeacherAnswerError(
            f'the teacher answered {answered} positions for {where}, whose labels score {positions}: its log-probs '
            f'would land on the wrong tokens (ids {tuple(ids.shape)}, log-probs {tuple(logprobs.shape)}, top-{k} '
            'asked). Does the server tokenize or truncate the rows otherwise than the trainer (--max_length, '
            '--template)?')
    if ids.shape[1] > k:
        logprobs, order = logprobs.topk(k, dim=-1)
        ids = ids.gather(-1, order)
    elif ids.shape[1] < k:
        pad = k - ids.shape[1]
        ids = torch.cat([ids, ids.new_zeros(positions, pad)], -1)
        logprobs = torch.cat([logprobs, logprobs.new_full((positions, pad), float('-inf'))], -1)
    targets = result.target_logprobs
    if targets is not None and targets.shape != (positions, ):
        raise TeacherAnswerError(f'the teacher answered {targets.numel()} next-token log-probs for {where}, whose '
                                 f'labels score {positions}')
    return TopKResult(ids, logprobs, result.tail, target_logprobs=targets)


#: the flag that raises a server's cap on the entries it answers a position, by route
CAP_FLAGS = {'topk': 'its --top_k (`swift-gkd serve-teacher --top_k {k}`)',
             'completions': "vLLM's --max-logprobs (`vllm serve ... --max-logprobs {k}`; default 20)",
             'infer': "`swift deploy --max_logprobs {k}` (default 20), or for `swift rollout`, which leaves vLLM's "
                      'default of 20, `--vllm_engine_kwargs \'{{"max_logprobs": {k}}}\'`'}


def short_answer_warning(url: str, route: str, answered: int, k: int) -> str:
    """The warning for a served teacher that answered ``answered`` < ``k`` (``--gkd_logits_topk``) entries a position:
    its answers are padded with unused slots (probability 0), so the loss's top-k is the server's, silently smaller;
    names both counts and the server flag of its ``route`` that raises its cap."""
    raise_it = CAP_FLAGS.get(route, CAP_FLAGS['infer']).format(k=k)
    return (f'Teacher server {url} answered {answered} entries a position for --gkd_logits_topk {k}: the other '
            f'{k - answered} slots are padded (probability 0), so the loss reads the teacher\'s top-{answered}. Raise '
            f'the server\'s cap with {raise_it}, or pass --gkd_logits_topk {answered} (warned once)')


def check_topk_served(url: str, health: dict, topk: int) -> None:
    """``--gkd_logits_topk`` within what the server says it serves (this plugin's server reports ``max_topk``;
    others report nothing and are trusted): refused at start-up rather than at the first teacher request."""
    limit = health.get('max_topk') if isinstance(health, dict) else None
    if isinstance(limit, int) and topk is not None and topk > limit:
        raise ValueError(f'--gkd_logits_topk {topk} is larger than the teacher server {url} serves (its --top_k is '
                         f'{limit}): pass --gkd_logits_topk 1 to {limit}, or restart the server with --top_k {topk}')


def attach_trainer_token_ids(batches) -> None:
    """Mark each ``/infer/`` request of ms-swift's micro-batches with the trainer's own token ids of its row and the
    number of them the loss reads (through the last labelled token), for :func:`check_infer_tokenization` on the
    main process (an attribute outside the dataclass fields: gathered with the request, never sent)."""
    for batch in batches:
        requests, inputs = batch.get('_teacher_requests') or [], batch['teacher_model_inputs']
        ids, labels, attention = inputs['input_ids'], inputs['labels'], inputs.get('attention_mask')
        if ids.dim() != 2 or ids.shape[0] != len(requests):  # packed rows (padding-free): no per-row frame
            continue
        for row, request in enumerate(requests):
            keep = attention[row].bool() if attention is not None else ids[row] == ids[row]
            row_labels = labels[row][keep]
            labelled = (row_labels != IGNORE_INDEX).nonzero().flatten()
            needed = int(labelled[-1]) + 1 if labelled.numel() else 0
            request._gkd_trainer_ids = (ids[row][keep].tolist(), needed)


def check_infer_tokenization(url: str, index: int, server_ids: List[int], trainer_ids: List[int], needed: int):
    """The server's encoding of request ``index`` (``prompt_token_ids``) must be the trainer's row through its last
    labelled token (``needed`` tokens): the teacher's log-probs are placed on the trainer's positions by index, and
    ms-swift's assembly drops those beyond the trainer's row. So a longer encoding whose start is the trainer's whole
    row is right: the trainer cut the row's end (``--truncation_strategy right`` at ``--max_length``), the server
    scored the whole chat, and a causal teacher's log-probs at the kept positions do not depend on what follows. A row
    cut at its start (``left``) cannot be scored through ``/infer/``, which sends whole chats: named as such."""
    n = min(len(server_ids), len(trainer_ids))
    diff = next((p for p in range(min(n, needed)) if server_ids[p] != trainer_ids[p]), None)
    if diff is None and len(server_ids) >= needed:
        return
    at = diff if diff is not None else n
    counts = (f"its prompt_token_ids ({len(server_ids)} tokens) {'differ from' if diff is not None else 'do not cover'}"
              f" the trainer's ({len(trainer_ids)} tokens, {needed} read by the loss) from position {at}: server "
              f"{server_ids[max(0, at - 3):at + 5]}, trainer {trainer_ids[max(0, at - 3):at + 5]}")
    if 0 < len(trainer_ids) < len(server_ids) and server_ids[-len(trainer_ids):] == trainer_ids:
        raise TeacherAnswerError(
            f"the teacher server {url} cannot score request {index} of this step: the trainer cut the row at its start "
            f"to --max_length (--truncation_strategy left), and ms-swift's /infer/ protocol sends whole chats, so the "
            f"server scored the uncut row: {counts}. Pass --truncation_strategy right or delete, or a --max_length the "
            "rows fit, or serve the teacher with `swift-gkd serve-teacher` or `vllm serve` (they score the trainer's "
            "own token ids)")
    raise TeacherAnswerError(
        f'the teacher server {url} tokenizes request {index} of this step differently from the trainer: {counts}. Its '
        "log-probs would land on the wrong tokens. Start the teacher's server with the trainer's --template (and the "
        "same system prompt and max_length), and a tokenizer equal to the student's")


def check_infer_answer_length(url: str, index: int, scored: int, trainer_ids: List[int], needed: int):
    """Without ``prompt_token_ids``, the answer to request ``index`` must at least reach the last token the loss reads:
    ``scored`` prompt positions (vLLM's ``prompt_logprobs``, one per prompt token) against the ``needed`` tokens of
    the trainer's row. A shorter answer (a server that truncates) left the row's last scored positions without a
    teacher distribution, which the top-k loss reads as probability 0: a silently wrong loss."""
    if scored < needed:
        raise TeacherAnswerError(
            f"the teacher server {url} answered prompt log-probs for {scored} tokens of request {index} of this step, "
            f"whose row the loss reads through {needed} tokens (the trainer's row: {len(trainer_ids)}): the teacher's "
            f'log-probs would miss its last {needed - scored} scored tokens. Does the server truncate the rows (its '
            'max_length) or use another --template?')


def raise_no_prompt_logprobs(url: str, index: int, server_ids, expected):
    """An answer to request ``index`` without ``prompt_logprobs``: the server computes none (ms-swift's transformers
    engine ignores the request's ``prompt_logprobs``), so every answer would lack them; ms-swift's assembly would have
    left every position -inf (probability 0: a wrong loss), the client's checks retried it as a failed answer."""
    counts = ([f'its prompt_token_ids: {len(server_ids)} tokens'] if server_ids is not None else []) + (
        [f"the trainer's row: {len(expected[0])} tokens, {expected[1]} read by the loss"] if expected else [])
    raise TeacherAnswerError(
        f"the teacher server {url} answered request {index} of this step without prompt log-probs "
        f"({'; '.join(counts) or 'asked for each prompt token'}): it computes none, so the teacher's "
        "top-k cannot be read. ms-swift's `swift deploy --infer_backend transformers` ignores prompt_logprobs: serve "
        "the teacher with `swift deploy --infer_backend vllm` (or, for a text-only student, `swift-gkd "
        "serve-teacher`)")


def infer_prompt_logprobs(client: TeacherClient, requests: List[Any], topk: int) -> List[Tuple[list, list]]:
    """ms-swift's teacher call (``RolloutTrainerMixin._infer_teacher_requests``) through the plugin's client:
    the same request config and parsing, without vLLM, and with the client's waits, logged retries and checks of
    every answer; each answer's tokenization is checked against the trainer's (:func:`attach_trainer_token_ids`)."""
    # return_details: a vLLM server (swift deploy) reports prompt_token_ids only then; the log-probs are the same
    config = RequestConfig(prompt_logprobs=topk, max_tokens=1, temperature=0.0, return_details=True)
    answers = client.infer([asdict(r) for r in requests], asdict(config))
    for i, (request, answer) in enumerate(zip(requests, answers)):
        expected = getattr(request, '_gkd_trainer_ids', None)
        if expected is not None and answer.get('prompt_token_ids') is not None:
            check_infer_tokenization(client.url, i, answer['prompt_token_ids'], *expected)
        if answer.get('prompt_logprobs') is None:
            raise_no_prompt_logprobs(client.url, i, answer.get('prompt_token_ids'), expected)
        if expected is not None and answer.get('prompt_token_ids') is None:
            if not getattr(client, '_warned_no_token_ids', False):
                client._warned_no_token_ids = True
                logger.warning(f'Teacher server {client.url} does not report prompt_token_ids: its tokenization '
                               'cannot be checked against the trainer\'s, only its answers\' lengths')
            check_infer_answer_length(client.url, i, len(answer['prompt_logprobs']), *expected)
    return [parse_prompt_logprobs(ChatCompletionResponse(**answer), topk=topk) for answer in answers]
