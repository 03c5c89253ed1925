"""A served teacher before any model loads: SKD's drafts need this plugin's server and a top-k that covers
``--gkd_skd_top_k`` (asked of the server, waiting for it as the trainer would)."""
from __future__ import annotations

from swift.utils import get_logger

from swift_gkd_plugin.flags import FlagError
from swift_gkd_plugin.server.client import TeacherClient

logger = get_logger()


def teacher_client(args, url: str) -> TeacherClient:
    """A client of the teacher server at ``url`` with the trainer's key, timeout, retries and wait."""
    return TeacherClient(url, api_key=args.teacher_api_key, timeout=args.teacher_server_timeout,
                         retries=args.teacher_server_retries, wait=args.teacher_server_wait, log=logger.warning)


def check_skd_teacher_server(args) -> None:
    """``--gkd_skd_top_k K`` with ``--teacher_model_server``: one server of this plugin (``POST /v1/topk``, which
    scores the student's drafts as token ids) whose top-k covers K. Asked before any model loads (waiting for the
    server as the trainer would, ``--teacher_server_wait``): ms-swift's ``/infer/`` protocol (``swift deploy``, a vLLM
    teacher) cannot verify drafts, and a smaller top-k would accept tokens the teacher ranks lower."""
    k, server = args.gkd_skd_top_k, args.teacher_model_server
    if not k or server is None:
        return
    from swift.rlhf_trainers.gkd_helpers import parse_teacher_model_server
    configs = parse_teacher_model_server(server)
    if len(configs) != 1:
        raise FlagError(f'--gkd_skd_top_k {k} verifies the student\'s drafts on one teacher server; '
                         f'--teacher_model_server names {len(configs)} (routed by tags): pass one URL or '
                         '--gkd_skd_top_k 0')
    client = teacher_client(args, configs[0].url)
    logger.info(f'--gkd_skd_top_k {k}: asking the teacher server {client.url} for /v1/topk and its top-k before '
                f'loading any model (at most {client.wait:g}s, --teacher_server_wait)')
    health = client.wait_until_ready()
    if not client.offers_topk():
        raise FlagError(f'--gkd_skd_top_k {k} needs this plugin\'s teacher server (`swift-gkd serve-teacher`, '
                         f'POST /v1/topk): {client.url} has no /v1/topk, so it speaks only ms-swift\'s /infer/ '
                         'protocol (`swift deploy`, a vLLM teacher), which scores chats, not the student\'s drafts. '
                         f'Serve the teacher with `swift-gkd serve-teacher --top_k {max(k, 64)}`, load it locally with '
                         '--teacher_model, or pass --gkd_skd_top_k 0')
    limit, vocab = health.get('max_topk'), health.get('vocab_size')
    needed = min(k, vocab) if isinstance(vocab, int) else k
    if isinstance(limit, int) and limit < needed:
        raise FlagError(f'--gkd_skd_top_k {k} is larger than the top-k the teacher server {client.url} returns '
                         f'(its --top_k is {limit}): the teacher\'s top-{k} cannot be checked from its top-{limit}. '
                         f'Pass --gkd_skd_top_k 1 to {limit}, or restart the server with --top_k {k} or more')
