"""Served teachers in ``swift rlhf``: connect at start-up, and ms-swift's own ``/infer/`` protocol where needed.

A ``--teacher_model_server`` may be this plugin's server (``POST /v1/topk``: the trainer's own token ids, packed
arrays) or any server ms-swift's built-in GKD works against, e.g. ``swift deploy --infer_backend vllm``, which has
only ``GET /health`` and ``POST /infer/``. Which one is asked once, at start-up; against the latter the trainer uses
ms-swift's requests (chats with the response as token ids), ``prompt_logprobs`` and parsing, so that its teacher
top-k, and hence its losses, are the built-in's.
"""
from __future__ import annotations

from dataclasses import asdict
from typing import Any, List, Tuple

from swift.infer_engine import RequestConfig
from swift.infer_engine.protocol import ChatCompletionResponse
from swift.rlhf_trainers.utils import parse_prompt_logprobs
from swift.utils import get_logger

from swift_gkd_plugin.core.constants import IGNORE_INDEX
from swift_gkd_plugin.server.client import TeacherClient
from swift_gkd_plugin.server.protocol import tokenizer_fingerprint
from swift_gkd_plugin.swift.setup.teacher_server import teacher_client

logger = get_logger()


def connect_teacher_servers(args, configs, accelerator, topk: int,
                            tokenizer=None) -> Tuple[List[TeacherClient], bool]:
    """The clients of the served teachers once their servers are healthy, and whether all of them offer /v1/topk.

    Every rank waits for every server (``--teacher_server_wait`` seconds at most, each failed poll logged), so that
    training can start while a large teacher is still loading. Only the main process asks for the routes, and every
    rank follows its answer: the ``/infer/`` path gathers the requests on the main process, the ``/v1/topk`` path
    does not, so the ranks must agree. ``topk`` (``--gkd_logits_topk``) is checked against what each server serves,
    and the student's ``tokenizer`` against the one it reports (:func:`check_same_tokenizer`).
    """
    clients = [teacher_client(args, cfg.url) for cfg in configs]
    for client in clients:
        logger.info(f'Teacher server {client.url}: waiting until it is healthy (at most {client.wait:g}s, '
                    '--teacher_server_wait)')
        health = client.wait_until_ready()
        check_topk_served(client.url, health, topk)
        if tokenizer is not None:
            check_same_tokenizer(client.url, health, tokenizer)
        if isinstance(health.get('vocab_size'), int):
            client.vocab_size = health['vocab_size']  # answers with ids beyond it are refused
    answer = [all(client.offers_topk() for client in clients) if accelerator.is_main_process else None]
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list
        broadcast_object_list(answer, from_process=0)
    topk_route = bool(answer[0])
    urls = ', '.join(client.url for client in clients)
    if topk_route:
        logger.info(f'Teacher server {urls}: top-k through POST /v1/topk on the trainer\'s token ids')
    else:
        logger.info(f'Teacher server {urls}: no POST /v1/topk (e.g. `swift deploy`): top-k from prompt log-probs '
                    'through ms-swift\'s POST /infer/ protocol')
    return clients, topk_route


def check_topk_served(url: str, health: dict, topk: int) -> None:
    """``--gkd_logits_topk`` within what the server says it serves (this plugin's server reports ``max_topk``;
    others report nothing and are trusted): refused at start-up rather than at the first teacher request."""
    limit = health.get('max_topk') if isinstance(health, dict) else None
    if isinstance(limit, int) and topk is not None and topk > limit:
        raise ValueError(f'--gkd_logits_topk {topk} is larger than the teacher server {url} serves (its --top_k is '
                         f'{limit}): pass --gkd_logits_topk 1 to {limit}, or restart the server with --top_k {topk}')


def check_same_tokenizer(url: str, health: dict, tokenizer) -> None:
    """A served teacher must read the student's token ids as the student does: the tokenizer fingerprint its
    ``/health`` reports (this plugin's server) must be the student's, and a reported output head must hold every
    student token (a larger, padded head is fine). A server that reports neither (``swift deploy``) is trusted."""
    if not isinstance(health, dict):
        return
    theirs, head = health.get('tokenizer_sha256'), health.get('vocab_size')
    ours = tokenizer_fingerprint(tokenizer)
    if (isinstance(theirs, str) and theirs != ours) or (isinstance(head, int) and head < len(tokenizer)):
        size = health.get('tokenizer_size', '?')
        raise ValueError(
            f'the teacher server {url} serves a teacher with another tokenizer than the student\'s: its /health '
            f'reports a tokenizer of {size} tokens (fingerprint {str(theirs)[:12]}) and an output head of {head} '
            f'rows; the student\'s tokenizer has {len(tokenizer)} tokens (fingerprint {ours[:12]}). Its scores would '
            'be read as the student\'s token ids. Serve a teacher that shares the student\'s tokenizer (a padded, '
            'larger output head is fine), or load this teacher locally with --teacher_model and '
            '--gkd_cross_tokenizer uld|hybrid')


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
    """The server's encoding of request ``index`` (``prompt_token_ids``) must be the trainer's row, at least through
    its last labelled token: the teacher's log-probs are placed on the trainer's positions by index."""
    n = min(len(server_ids), len(trainer_ids))
    diff = next((p for p in range(n) if server_ids[p] != trainer_ids[p]), None)
    if diff is None and len(server_ids) <= len(trainer_ids) and len(server_ids) >= needed:
        return
    at = diff if diff is not None else n
    raise ValueError(
        f'the teacher server {url} tokenizes request {index} of this step differently from the trainer: its '
        f'prompt_token_ids ({len(server_ids)} tokens) {"differ from" if diff is not None else "do not cover"} the '
        f"trainer's ({len(trainer_ids)} tokens, {needed} read by the loss) from position {at}: server "
        f"{server_ids[max(0, at - 3):at + 5]}, trainer {trainer_ids[max(0, at - 3):at + 5]}. Its log-probs would land "
        "on the wrong tokens. Start the teacher's server with the trainer's --template (and the same system prompt "
        'and max_length), and a tokenizer equal to the student\'s')


def infer_prompt_logprobs(client: TeacherClient, requests: List[Any], topk: int) -> List[Tuple[list, list]]:
    """ms-swift's teacher call (``RolloutTrainerMixin._infer_teacher_requests``) through the plugin's client:
    the same request config and parsing, without vLLM, and with the client's waits, logged retries and checks of
    every answer; each answer's tokenization is checked against the trainer's (:func:`attach_trainer_token_ids`)."""
    # return_details: a vLLM server (swift deploy) reports prompt_token_ids only then; the log-probs are the same
    config = RequestConfig(prompt_logprobs=topk, max_tokens=1, temperature=0.0, return_details=True)
    answers = client.infer([asdict(r) for r in requests], asdict(config))
    for i, (request, answer) in enumerate(zip(requests, answers)):
        expected = getattr(request, '_gkd_trainer_ids', None)
        if expected is None:
            continue
        if answer.get('prompt_token_ids') is None:
            if not getattr(client, '_warned_no_token_ids', False):
                client._warned_no_token_ids = True
                logger.warning(f'Teacher server {client.url} does not report prompt_token_ids: its tokenization '
                               'cannot be checked against the trainer\'s')
            continue
        check_infer_tokenization(client.url, i, answer['prompt_token_ids'], *expected)
    return [parse_prompt_logprobs(ChatCompletionResponse(**answer), topk=topk) for answer in answers]
