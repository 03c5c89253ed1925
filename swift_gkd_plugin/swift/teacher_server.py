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

from swift_gkd_plugin.server.client import TeacherClient

logger = get_logger()


def connect_teacher_servers(args, configs, accelerator, topk: int) -> Tuple[List[TeacherClient], bool]:
    """The clients of the served teachers once their servers are healthy, and whether all of them offer /v1/topk.

    Every rank waits for every server (``--teacher_server_wait`` seconds at most, each failed poll logged), so that
    training can start while a large teacher is still loading. Only the main process asks for the routes, and every
    rank follows its answer: the ``/infer/`` path gathers the requests on the main process, the ``/v1/topk`` path
    does not, so the ranks must agree. ``topk`` (``--gkd_logits_topk``) is checked against what each server serves.
    """
    clients = [
        TeacherClient(cfg.url, api_key=args.teacher_api_key, timeout=args.teacher_server_timeout,
                      retries=args.teacher_server_retries, wait=args.teacher_server_wait, log=logger.warning)
        for cfg in configs
    ]
    for client in clients:
        logger.info(f'Teacher server {client.url}: waiting until it is healthy (at most {client.wait:g}s, '
                    '--teacher_server_wait)')
        check_topk_served(client.url, client.wait_until_ready(), topk)
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
        raise ValueError(f'--gkd_logits_topk {topk} is larger than the teacher server {url} serves (its --topk is '
                         f'{limit}): pass --gkd_logits_topk 1 to {limit}, or restart the server with --topk {topk}')


def infer_prompt_logprobs(client: TeacherClient, requests: List[Any], topk: int) -> List[Tuple[list, list]]:
    """ms-swift's teacher call (``RolloutTrainerMixin._infer_teacher_requests``) through the plugin's client:
    the same request config and parsing, without vLLM, and with the client's waits and logged retries."""
    config = RequestConfig(prompt_logprobs=topk, max_tokens=1, temperature=0.0)
    answers = client.infer([asdict(r) for r in requests], asdict(config))
    return [parse_prompt_logprobs(ChatCompletionResponse(**answer), topk=topk) for answer in answers]
