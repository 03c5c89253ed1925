"""Served teachers before any model loads: what the flags need of each server (its route, its top-k, its context, its
tokenizer), asked of the server, waiting for it as the trainer would. In the adapter: it reads ms-swift's dataset
registry and its GKD helpers (ms-swift's runtime)."""
from __future__ import annotations

import json
import os
from typing import List, Optional, Tuple

from swift.utils import get_logger

from swift_gkd_plugin.options.flags import LOCAL_TEACHER_URL, FlagError, check_teacher_urls, local_teacher_index
from swift_gkd_plugin.options.local_paths import LOCAL_SUFFIXES
from swift_gkd_plugin.server.client import TeacherClient, TeacherServerError
from swift_gkd_plugin.server.protocol import tokenizer_fingerprint

logger = get_logger()


class TokenizerMismatch(ValueError):
    """A served teacher whose tokenizer is not the student's."""


ROUTE_NAMES = {'topk': 'POST /v1/topk (this plugin\'s server)', 'infer': 'ms-swift\'s /infer/ protocol (`swift deploy`)',
               'completions': 'POST /v1/completions with prompt_logprobs (`vllm serve`)'}


def teacher_client(args, url: str) -> TeacherClient:
    """A client of the teacher server at ``url`` with the trainer's key, timeout, retries and wait."""
    return TeacherClient(url, api_key=args.teacher_api_key, timeout=args.teacher_server_timeout,
                         retries=args.teacher_server_retries, wait=args.teacher_server_wait, log=logger.warning,
                         timeout_flag='--teacher_server_timeout')


def tokenizer_probe(tokenizer) -> Tuple[str, List[int]]:
    """A text spread over the student's whole vocabulary (every ~V/97th token and the special tokens, decoded) and
    the student's own token ids of it: a server with the same tokenizer reads the text as the same ids."""
    size = len(tokenizer)
    ids = list(range(3, size, max(1, size // 97))) + [t for t in tokenizer.all_special_ids if t is not None]
    text = tokenizer.decode(ids)
    return text, tokenizer.encode(text, add_special_tokens=False)


def check_same_tokenizer(client: TeacherClient, tokenizer) -> None:
    """A served teacher must read the student's token ids as the student does. This plugin's server: the tokenizer
    fingerprint its ``/health`` reports must be the student's, and a reported output head must hold every student
    token (a larger, padded head is fine). vLLM's OpenAI server: its ``POST /tokenize`` of a text spread over the
    student's vocabulary must give the student's ids (:func:`tokenizer_probe`). A server that offers neither
    (``swift deploy``) is trusted, and its answers' ``prompt_token_ids`` are checked instead."""
    url, health = client.url, getattr(client, 'health_doc', None)
    if getattr(client, 'route_name', None) == 'completions':
        text, ours = tokenizer_probe(tokenizer)
        theirs = client.tokenize(text)
        if theirs is None:
            logger.warning(f'Teacher server {url} has no POST /tokenize: its tokenizer cannot be compared with the '
                           'student\'s; it must be the same (the student\'s token ids are scored as they are)')
        elif theirs != ours:
            at = next((p for p, (a, b) in enumerate(zip(theirs, ours)) if a != b), min(len(theirs), len(ours)))
            raise TokenizerMismatch(
                f'the teacher server {url} serves a teacher with another tokenizer than the student\'s: its '
                f'/tokenize reads a text spread over the student\'s {len(tokenizer)} tokens as {len(theirs)} ids, the '
                f'student as {len(ours)}, differing from id {at} (server {theirs[at:at + 4]}, student '
                f'{ours[at:at + 4]}). Its scores would be read as the student\'s token ids. Serve a teacher that '
                'shares the student\'s tokenizer, or load this teacher locally with --teacher_model and '
                '--gkd_cross_tokenizer uld|hybrid')
        return
    if not isinstance(health, dict):
        return
    theirs, head = health.get('tokenizer_sha256'), health.get('vocab_size')
    ours = tokenizer_fingerprint(tokenizer)
    if (isinstance(theirs, str) and theirs != ours) or (isinstance(head, int) and head < len(tokenizer)):
        size = health.get('tokenizer_size', '?')
        raise TokenizerMismatch(
            f'the teacher server {url} serves a teacher with another tokenizer than the student\'s: its /health '
            f'reports a tokenizer of {size} tokens (fingerprint {str(theirs)[:12]}) and an output head of {head} '
            f'rows; the student\'s tokenizer has {len(tokenizer)} tokens (fingerprint {ours[:12]}). Its scores would '
            'be read as the student\'s token ids. Serve a teacher that shares the student\'s tokenizer (a padded, '
            'larger output head is fine), or load this teacher locally with --teacher_model and '
            '--gkd_cross_tokenizer uld|hybrid')


def teacher_configs(server: str):
    """``--teacher_model_server`` as ms-swift parses it: a list of ``TeacherServerConfig(url, tags)``."""
    from swift.rlhf_trainers.gkd_helpers import parse_teacher_model_server
    return parse_teacher_model_server(server)


def local_teacher_of(args) -> Optional[int]:
    """The index of ``--teacher_model_server``'s entry ``{"url": "local", ...}`` (the local teacher scores the rows
    of its tags), or None (also without the flag)."""
    server = getattr(args, 'teacher_model_server', None)
    return None if server is None else local_teacher_index([cfg.url for cfg in teacher_configs(server)])


def check_teacher_server_config(args) -> None:
    """``--teacher_model_server`` parses as ms-swift parses it (one URL, or a JSON list of ``{"url", "tags"}`` whose
    tags are non-empty and disjoint with several teachers): its refusal as one line naming the flag (ms-swift raised
    it with a traceback); each URL can be reached (:func:`check_teacher_urls`). At most one entry is the local teacher
    (``"url": "local"``), beside at least one server; ``--teacher_model`` goes with ``--teacher_model_server`` only as
    that entry's model."""
    server = getattr(args, 'teacher_model_server', None)
    if server is None:
        return
    try:
        configs = teacher_configs(server)
    except ValueError as e:
        raise FlagError(f'--teacher_model_server {server}: {e} Give one URL, or '
                        '\'[{"url": "http://a:8000", "tags": ["math"]}, {"url": "http://b:8000", "tags": ["code"]}]\''
                        ) from None
    check_teacher_urls(server, [cfg.url for cfg in configs])
    local = [i for i, cfg in enumerate(configs) if cfg.url == LOCAL_TEACHER_URL]
    if len(local) > 1:
        raise FlagError(f'--teacher_model_server {server}: entries {local} are all "url": "{LOCAL_TEACHER_URL}"; one '
                        'local teacher scores the rows of its tags: give it every tag in one entry')
    if local and len(configs) == 1:
        raise FlagError(f'--teacher_model_server {server}: its only teacher is the local one; the local teacher alone '
                        'is --teacher_model (or, without it, the student\'s base): drop --teacher_model_server')
    shared_base = getattr(args, '_teacher_use_disable_adapter', False)  # ms-swift cleared --teacher_model for it
    if local and getattr(args, 'teacher_model', None) is None and not shared_base:
        raise FlagError(f'--teacher_model_server {server}: its entry "url": "{LOCAL_TEACHER_URL}" scores the rows of '
                        f'its tags {configs[local[0]].tags} with --teacher_model, which is not given: pass '
                        '--teacher_model (the student\'s own --model with a LoRA student: its base with the adapter '
                        'off, one copy of the weights)')
    if getattr(args, 'teacher_model', None) is not None and not local:
        raise FlagError(f'--teacher_model {args.teacher_model} and --teacher_model_server {server} name two teachers '
                        'for the same rows: bind the local one to the rows of some tags with an entry '
                        f'{{"url": "{LOCAL_TEACHER_URL}", "tags": ["math"]}} in --teacher_model_server, or drop one')


def check_routes_mix(routes: List[Tuple[str, str]], local: bool) -> None:
    """ms-swift's ``/infer/`` path asks every teacher through ``/infer/`` and assembles the batch itself: it cannot
    be mixed with the other routes, nor with a local teacher. ``routes``: ``(url, route)`` of each server."""
    kinds = {route for _, route in routes}
    if 'infer' in kinds and (len(kinds) > 1 or local):
        names = ', '.join(f'{url} ({ROUTE_NAMES[route]})' for url, route in routes) + (
            f', and the local teacher ("url": "{LOCAL_TEACHER_URL}")' if local else '')
        raise FlagError(f'--teacher_model_server mixes servers that speak only ms-swift\'s /infer/ with others: '
                        f'{names}. Serve every teacher the same way (`swift-gkd serve-teacher` or `vllm serve` for '
                        'all, or `swift deploy` for all, without a local teacher)')


def check_teacher_servers(args) -> None:
    """Each ``--teacher_model_server`` before any model loads, waiting for it as the trainer would
    (``--teacher_server_wait``): it must be a teacher server (:meth:`TeacherClient.route`), give what the flags need
    of it, and read token ids as the student does. SKD (``--gkd_skd_top_k``) verifies drafts on one server of this
    plugin whose top-k covers K; the sampled-token term (``--gkd_sampled_kl_coef``) needs each sampled token's
    log-prob, which ms-swift's ``/infer/`` protocol does not give; a ``vllm serve`` teacher must take
    ``--gkd_logits_topk`` prompt log-probs and rows of ``--max_length`` tokens. The local entry is not asked; ms-swift's
    ``/infer/`` servers go with neither it nor the other routes (:func:`check_routes_mix`)."""
    server = args.teacher_model_server
    if server is None:
        return
    configs = teacher_configs(server)
    k = args.gkd_skd_top_k
    if k and len(configs) != 1:
        raise FlagError(f'--gkd_skd_top_k {k} verifies the student\'s drafts on one teacher server; '
                         f'--teacher_model_server names {len(configs)} (routed by tags): pass one URL or '
                         '--gkd_skd_top_k 0')
    tokenizer = _student_tokenizer(args)
    routes = []
    for cfg in configs:
        if cfg.url == LOCAL_TEACHER_URL:
            continue
        client = teacher_client(args, cfg.url)
        try:
            _check_teacher_server(args, client, tokenizer)
        except (TeacherServerError, TokenizerMismatch) as e:  # one line, as the flags' refusals
            raise FlagError(f'--teacher_model_server: {e}') from None
        routes.append((cfg.url, client.route_name))
    check_routes_mix(routes, local=len(routes) < len(configs))


def _check_teacher_server(args, client: TeacherClient, tokenizer) -> None:
    logger.info(f'Teacher server {client.url}: asking for its routes before loading any model (at most '
                f'{client.wait:g}s, --teacher_server_wait)')
    client.health_doc = client.wait_until_ready()
    client.route_name = route = client.route()
    check_multimodal_route(args, client.url, route)
    k = args.gkd_skd_top_k
    if k:
        _check_skd_server(k, client, route)
    coef = getattr(args, 'gkd_sampled_kl_coef', 0.0)
    if coef > 0 and route == 'infer':
        raise FlagError(f'--gkd_sampled_kl_coef {coef:g} needs the teacher\'s log-probability of each sampled '
                        f'token, which ms-swift\'s POST /infer/ protocol of the teacher server {client.url} does '
                        'not give: serve the teacher with `swift-gkd serve-teacher` or `vllm serve` (vLLM\'s '
                        'OpenAI-compatible server, prompt log-probs), or pass --gkd_sampled_kl_coef 0')
    if route == 'completions':
        _check_completions_server(args, client)
    if tokenizer is not None and route != 'infer':
        check_same_tokenizer(client, tokenizer)


def check_multimodal_route(args, url: str, route: str) -> None:
    """A multimodal student's rows hold image (video, audio) tokens, which the trainer's encoding expands from the
    row's media with the student's processor. ``/v1/topk`` and ``/v1/completions`` score the trainer's token ids
    alone: the teacher would read the media tokens without the media. ms-swift's ``/infer/`` sends
    the media with each chat, the server's processor expands them, and each answer's ``prompt_token_ids`` are checked
    against the trainer's row (:func:`~swift_gkd_plugin.swift.teacher.served.check_infer_tokenization`)."""
    meta = getattr(args, 'model_meta', None)
    if route != 'infer' and meta is not None and meta.is_multimodal:
        raise FlagError(f'--teacher_model_server {url} scores token ids only ({ROUTE_NAMES[route]}), and the student '
                        f'(--model_type {args.model_type}) is multimodal: the teacher would read its rows\' image '
                        'tokens without the images. Serve the teacher behind ms-swift\'s POST /infer/ (`swift deploy '
                        '--infer_backend vllm`: the requests carry the images), or load it with --teacher_model')


def _metric_tag(tag: str) -> str:
    """A tag as a metric name shows it: a path (``--teacher_tag_key dataset`` tags rows with their ``--dataset`` entry)
    by its file name without the data suffix (``/data/chat.jsonl`` -> ``chat``), any other tag as it is."""
    if '/' not in tag and os.sep not in tag:
        return tag
    base = os.path.basename(tag.rstrip('/' + os.sep)) or tag
    stem, suffix = os.path.splitext(base)
    return stem if suffix.lower() in LOCAL_SUFFIXES and stem else base


def teacher_names(configs) -> List[str]:
    """The name of each tag-routed teacher in metrics, ``gkd/<name>/...``: its tags (:func:`_metric_tag`, whole where
    two teachers' names would be the same) joined by ``+``; none for a single teacher."""
    if len(configs) < 2:
        return []
    short = ['+'.join(map(_metric_tag, cfg.tags)) for cfg in configs]
    return short if len(set(short)) == len(short) else ['+'.join(cfg.tags) for cfg in configs]


def check_teacher_tags(args) -> None:
    """Several tag-routed teachers: each ``--dataset`` row's tag must name one (ms-swift's routing otherwise raises at
    that row's first step, after loading). The default ``--teacher_tag_key``, ``dataset``, is the tag ms-swift's
    loader gives every row of an entry: the entry as parsed (:func:`dataset_tag`), checked for every entry, hub
    datasets included. Another key is a column, read from the local files (hub datasets cannot be read here)."""
    server, key = args.teacher_model_server, getattr(args, 'teacher_tag_key', 'dataset')
    if server is None:
        return
    configs = teacher_configs(server)
    if len(configs) < 2:
        return
    tags = {tag for cfg in configs for tag in cfg.tags}
    if key == 'dataset':
        for entry in args.dataset or []:
            tag = dataset_tag(entry, args.use_hf)
            if tag not in tags:
                raise FlagError(f'--dataset {entry}: ms-swift tags its rows {tag!r} (--teacher_tag_key dataset: the '
                                'entry as given, its path, not its file name), '
                                'and no teacher of '
                                f'--teacher_model_server has that tag; the teachers\' tags are {sorted(tags)}: tag a '
                                f'teacher {json.dumps(tag)}, or route by a column of the rows with --teacher_tag_key '
                                'COLUMN')
        return
    from swift_gkd_plugin.data.dataset_files import dataset_rows, local_dataset_files
    for path, _ in local_dataset_files(args.dataset, args.use_hf):
        bad = [(where, row.get(key)) for where, row in dataset_rows('--dataset', path)
               if (str(row[key]) if row.get(key) is not None else None) not in tags]
        if bad:
            shown = '; '.join(f'{where}: {value!r}' for where, value in bad[:3]) + (
                f' (and {len(bad) - 3} more)' if len(bad) > 3 else '')
            raise FlagError(f'--teacher_tag_key {key}: {len(bad)} row(s) of --dataset {path} name no teacher of '
                            f'--teacher_model_server ({shown}); the teachers\' tags are {sorted(tags)}: give each row '
                            f'a "{key}" among them, or add a teacher with its tag')


def dataset_tag(entry: str, use_hf=None) -> str:
    """The routing tag ms-swift 4.6's ``load_dataset`` gives each row of a ``--dataset`` entry (``loader.py``
    ~362-392, ``_inject_dataset_routing_tag``): the entry's dataset as parsed (its path or hub id as given, without
    ``#N``, ``:subset`` or ``hf::``), or, for a dataset registered under a name (``--custom_dataset_info``'s
    ``dataset_name``), the registered path or the hub id of the hub in use, as the loader rewrites it (hub datasets
    registered without a name are keyed by their ids' tuple there, so their entry is their tag)."""
    from swift.dataset.dataset_syntax import DatasetSyntax
    from swift.dataset.register import DATASET_MAPPING
    from swift.utils import use_hf_hub
    syntax = DatasetSyntax.parse(entry)
    meta = DATASET_MAPPING.get(syntax.dataset)
    if meta is None:
        return syntax.dataset
    if syntax.use_hf is None and meta.dataset_path is not None:
        return meta.dataset_path
    hf = syntax.use_hf if syntax.use_hf is not None else (use_hf if use_hf is not None else use_hf_hub())
    return meta.hf_dataset_id if hf else meta.ms_dataset_id


def _student_tokenizer(args):
    """The student's tokenizer read from ``--model`` (None where it cannot be read alone: the trainer checks again
    with the template's)."""
    model_dir = getattr(args, 'model_dir', None)
    if not model_dir:
        return None
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(model_dir, trust_remote_code=True)
    except Exception as exc:
        logger.info(f'swift_gkd_plugin: the student\'s tokenizer is compared with the teacher server\'s after loading '
                    f'({type(exc).__name__} reading it from {model_dir})')
        return None


def _check_completions_server(args, client) -> None:
    """A ``vllm serve`` teacher: its context holds a row of ``--max_length`` tokens (plus the one token it generates),
    and its ``--max-logprobs`` covers ``--gkd_logits_topk`` (asked with a two-token request)."""
    model = client.openai_model() or {}
    client.openai_model_id = model.get('id')
    limit = model.get('max_model_len')
    if isinstance(limit, int) and args.max_length is not None and limit <= args.max_length:
        raise FlagError(f'--max_length {args.max_length} does not fit the teacher server {client.url}: it serves '
                        f'{model.get("id")} with a context of {limit} tokens (vLLM\'s --max-model-len), and each row '
                        f'is scored with one more token: restart it with --max-model-len {args.max_length + 1} or '
                        f'more, or pass --max_length {limit - 1} or less')
    topk = args.gkd_logits_topk or 0
    try:
        client.prompt_logprobs_at([([0, 0], [0])], topk=topk, with_targets=True, model=client.openai_model_id)
    except TeacherServerError as e:
        if e.status is not None and 400 <= e.status < 500:
            raise FlagError(f'--gkd_logits_topk {topk}: the teacher server {client.url} refused {topk} prompt '
                            f'log-probs per token ({e}); restart it with --max-logprobs {max(topk, 1)} or more, or '
                            'lower --gkd_logits_topk') from None
        raise


def _check_skd_server(k: int, client, route: str) -> None:
    """``--gkd_skd_top_k K``: this plugin's server (it scores the student's drafts as token ids), top-k >= K."""
    if route != 'topk':
        raise FlagError(f'--gkd_skd_top_k {k} needs this plugin\'s teacher server (`swift-gkd serve-teacher`, '
                         f'POST /v1/topk): {client.url} has no /v1/topk ({ROUTE_NAMES[route]}), and only this '
                         'plugin\'s server scores the student\'s drafts. '
                         f'Serve the teacher with `swift-gkd serve-teacher --top_k {max(k, 64)}`, load it locally with '
                         '--teacher_model, or pass --gkd_skd_top_k 0')
    health = client.health_doc
    limit, vocab = health.get('max_topk'), health.get('vocab_size')
    needed = min(k, vocab) if isinstance(vocab, int) else k
    if isinstance(limit, int) and limit < needed:
        raise FlagError(f'--gkd_skd_top_k {k} is larger than the top-k the teacher server {client.url} returns '
                         f'(its --top_k is {limit}): the teacher\'s top-{k} cannot be checked from its top-{limit}. '
                         f'Pass --gkd_skd_top_k 1 to {limit}, or restart the server with --top_k {k} or more')
