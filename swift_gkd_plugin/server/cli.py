"""``swift-gkd serve-teacher``: flags and entry point (heavy imports happen only in :func:`run`)."""
from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import math
import os
import sys
from typing import List, Optional, Sequence, Tuple

API_KEY_ENV = 'SWIFT_GKD_TEACHER_API_KEY'
LOOPBACK_NAMES = {'localhost', 'ip6-localhost'}
DEVICE_MAPS = ('auto', 'balanced', 'balanced_low_0', 'sequential')
MIN_BODY_MB = 2**-10  # 1 KiB: the smallest request is ~100 bytes
MAX_BATCH_WAIT_MS = 60000.0
DTYPES = ('auto', 'float32', 'fp32', 'bfloat16', 'bf16', 'float16', 'fp16')  # backend._DTYPES and auto


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip('[]')).is_loopback
    except ValueError:
        return False


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--model', required=True, help='teacher model directory (or hub id)')
    parser.add_argument('--model_type', default=None, help="ms-swift model type (e.g. qwen3); default: detected")
    parser.add_argument('--template', default=None,
                        help="ms-swift template used to encode messages; use the trainer's --template (e.g. "
                        "qwen3_nothinking) so that tokenization matches exactly; default: the model's")
    parser.add_argument('--adapters', nargs='+', default=[], help='PEFT adapter directories merged into the model')
    parser.add_argument('--host', default='127.0.0.1',
                        help='address to bind (default loopback only; any other address requires an API key)')
    parser.add_argument('--port', type=int, default=8000,
                        help="port to listen on (0: any free port); the trainer's --teacher_model_server is "
                        'http://HOST:PORT')
    parser.add_argument('--top_k', '--topk', dest='topk', type=int, default=64,
                        help='largest k served (requests asking for more get 422) and the default k of /v1/topk; at '
                        "least the trainer's --gkd_logits_topk and --gkd_skd_top_k (--topk: the same flag)")
    parser.add_argument('--api_key', default=None,
                        help=f'require this key on every request (or set {API_KEY_ENV}, which keeps it out of ps)')
    parser.add_argument('--public_health', action='store_true',
                        help='answer GET /health without the API key (ms-swift\'s VLLMInferClient checks it so)')
    parser.add_argument('--only_ms_swift_routes', action='store_true',
                        help='serve only GET /health and POST /infer/, as `swift deploy` does (no /v1/topk): a '
                        'stand-in for such a server when testing clients')
    parser.add_argument('--max_batch_tokens', type=int, default=8192,
                        help='padded tokens (longest x count) per forward batch; also the longest sequence accepted')
    parser.add_argument('--max_queue', type=int, default=4096,
                        help='sequences waiting for a batch; beyond it requests get 503 with Retry-After (a request '
                        'with more sequences than this gets 413)')
    parser.add_argument('--max_request_tokens', type=int, default=1048576, help='tokens in one request (413 beyond)')
    parser.add_argument('--max_body_mb', type=float, default=64.0, help='request body size limit in MiB (413 beyond)')
    parser.add_argument('--max_length', type=int, default=None,
                        help="template max_length for messages (default: the model's)")
    parser.add_argument('--batch_wait_ms', type=float, default=0.0,
                        help='wait this long before each batch so that concurrent requests can join it')
    parser.add_argument('--torch_dtype', default='auto', help='auto (bfloat16 on GPU, float32 on CPU), float32, '
                        'bfloat16 or float16')
    parser.add_argument('--device', default='auto', help='auto, cpu, cuda, cuda:1, ...')
    parser.add_argument('--device_map', default=None,
                        help='spread a teacher larger than one GPU over the visible GPUs: auto, balanced, '
                        'balanced_low_0 or sequential (transformers\' device_map; replaces --device). Default: none')
    parser.add_argument('--served_model_name', default=None,
                        help='the model name the server reports (GET /health and /v1/models, and the "model" of '
                        "its answers); default: the --model folder's name")
    parser.add_argument('--num_threads', type=int, default=None, help='torch CPU threads')
    parser.add_argument('--log_level', default='info', choices=['debug', 'info', 'warning', 'error'],
                        help='the server\'s log level (uvicorn\'s and its own)')


def topk_values(argv: Sequence[str]) -> List[Tuple[str, str]]:
    """``(flag, value)`` of each ``--top_k`` / ``--topk`` in a command line (argparse keeps only the last)."""
    found = []
    for i, token in enumerate(argv):
        for flag in ('--top_k', '--topk'):
            if token == flag and i + 1 < len(argv):
                found.append((flag, argv[i + 1]))
            elif token.startswith(flag + '='):
                found.append((flag, token.split('=', 1)[1]))
    return found


def check_args(args: argparse.Namespace, argv: Optional[Sequence[str]] = None) -> Optional[str]:
    """The first problem with the flags, as one line naming the flag, the value and the allowed values (None: all
    good). Everything is checked here, before the model loads: a refusal after a 7B load wastes minutes."""
    problem = _api_key_problem(args.api_key)
    if problem:
        return problem
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    if not is_loopback(args.host) and not api_key:
        return (f'refusing to bind {args.host!r} without an API key: pass --api_key or set {API_KEY_ENV} (or bind '
                '127.0.0.1)')
    if not 0 <= args.port <= 65535:
        return f'--port must be in [0, 65535] (0: any free port), got {args.port}'
    if args.device_map is not None and args.device_map not in DEVICE_MAPS:
        return f'--device_map {args.device_map!r} is not one of {", ".join(DEVICE_MAPS)}'
    last = dict(topk_values(argv or []))  # each spelling's last value (a repeated flag: the last wins, as argparse)
    if len(last) == 2 and len(set(last.values())) == 2:
        return (f'--top_k {last["--top_k"]} --topk {last["--topk"]}: --top_k and --topk are one flag given different '
                'values; give one')
    for name in ('topk', 'max_batch_tokens', 'max_queue', 'max_request_tokens'):
        if getattr(args, name) < 1:
            return f'--{"top_k" if name == "topk" else name} must be >= 1, got {getattr(args, name)}'
    if args.num_threads is not None and args.num_threads < 1:
        return f'--num_threads must be >= 1 (or unset for torch\'s default), got {args.num_threads}'
    if args.max_length is not None and args.max_length < 1:
        return (f'--max_length must be >= 1 (the longest encoded messages request, in tokens) or unset for the '
                f'model\'s, got {args.max_length}')
    if not (math.isfinite(args.max_body_mb) and args.max_body_mb >= MIN_BODY_MB):
        return (f'--max_body_mb must be a finite number >= {MIN_BODY_MB:g} (1 KiB; the request body limit in MiB: '
                f'below it every request would get 413), got {args.max_body_mb}')
    if not (math.isfinite(args.batch_wait_ms) and 0 <= args.batch_wait_ms <= MAX_BATCH_WAIT_MS):
        return (f'--batch_wait_ms must be a finite number from 0 to {MAX_BATCH_WAIT_MS:g} (a minute: every batch waits '
                f'this long before its forward), got {args.batch_wait_ms:g}')
    if args.torch_dtype not in DTYPES:
        return f'--torch_dtype must be one of {", ".join(DTYPES)}, got {args.torch_dtype!r}'
    problem = _device_problem(args.device) if args.device_map is None else None
    return problem or _paths_problem(args) or _model_type_problem(args) or _template_problem(args) or \
        _port_problem(args.host, args.port)


def _api_key_problem(value: Optional[str]) -> Optional[str]:
    """``--api_key`` (or ``SWIFT_GKD_TEACHER_API_KEY``) blank or with surrounding spaces: HTTP strips a header's
    value, so no client could ever send that key (every request 401), and a blank key counted as one for a
    non-loopback ``--host``."""
    for name, key in (('--api_key', value), (API_KEY_ENV, os.environ.get(API_KEY_ENV))):
        if key is None or (name == API_KEY_ENV and (value is not None or key == '')):  # '': unset, as before
            continue
        if not key.strip():
            return (f'{name} is blank ({key!r}): give a key of visible characters, or leave it unset (loopback '
                    'only)')
        if key != key.strip():
            return (f'{name} {key!r} has surrounding spaces, which HTTP strips from the Authorization header (every '
                    f'client would get 401): pass {key.strip()!r}')
    return None


def _model_type_problem(args) -> Optional[str]:
    """A ``--model_type`` ms-swift does not know, or none where ``--template`` needs one that ms-swift cannot tell
    from the model (a local folder whose name it does not know, with an architecture of several model types: the tiny
    Qwen3's ``Qwen3ForCausalLM`` is qwen3, qwen3_emb or qwen3_reranker). Both failed after the load started, with a
    traceback. Without ``--template`` such a model is served by plain transformers (token-id requests only)."""
    if args.model_type is None and (args.template is None or not os.path.isdir(os.path.expanduser(args.model))):
        return None
    from swift.model.model_meta import MODEL_MAPPING, get_matched_model_meta, get_matched_model_types
    if args.model_type is not None:
        if args.model_type in MODEL_MAPPING:
            return None
        import difflib
        close = difflib.get_close_matches(args.model_type, list(MODEL_MAPPING), n=3)
        return (f'--model_type {args.model_type!r} is not an ms-swift model type'
                f'{" (closest: " + ", ".join(close) + ")" if close else ""}')
    folder = os.path.expanduser(args.model)
    if get_matched_model_meta(folder) is not None or os.path.exists(os.path.join(folder, 'args.json')):
        return None  # ms-swift knows the folder's name, or reads the model type from a checkpoint's args.json
    try:
        with open(os.path.join(folder, 'config.json'), encoding='utf-8') as f:
            config = json.load(f)
    except (OSError, ValueError):
        return None  # ms-swift's own loader says what is wrong with the folder
    types = get_matched_model_types(config.get('architectures'))
    if len(types) < 2:
        return None
    example = config.get('model_type') if config.get('model_type') in types else types[0]
    return (f'--model {args.model}: ms-swift cannot tell its model type (architecture {config["architectures"][0]} '
            f'is one of {", ".join(types)}), which --template {args.template} needs: pass --model_type, e.g. '
            f'--model_type {example}')


def _template_problem(args) -> Optional[str]:
    """No ``--template`` for a model whose ms-swift model type has several templates (``--model_type qwen3``: qwen3,
    qwen3_thinking, qwen3_nothinking, ...) and whose folder name picks none: ms-swift's own template lookup
    (``get_template_meta``, what ``swift rlhf`` runs before loading) asked here, as the load resolves the model type,
    instead of its traceback after the load. A model ms-swift does not know is left to the load (plain
    transformers)."""
    from swift.template import TEMPLATE_MAPPING
    from swift_gkd_plugin.options.model_types import undetected_type_message, unknown_template_message
    if args.template is not None:
        return None if args.template in TEMPLATE_MAPPING else unknown_template_message('--template', args.template,
                                                                                        TEMPLATE_MAPPING)
    from swift.model.model_meta import MODEL_MAPPING, get_matched_model_meta
    from swift.template import get_template_meta
    meta = get_matched_model_meta(args.model)  # as ms-swift's get_model_info_meta: the name, then --model_type
    if args.model_type is not None and (meta is None or meta.model_type != args.model_type):
        meta = MODEL_MAPPING.get(args.model_type)
    if meta is None:
        return None
    folder = os.path.expanduser(args.model)
    try:
        get_template_meta(argparse.Namespace(model_dir=folder), meta, None)  # (reads a checkpoint's args.json)
    except ValueError as exc:
        return undetected_type_message(str(exc), lambda _: ('--model', '--model_type'))
    return None


def _paths_problem(args) -> Optional[str]:
    """A ``--model`` that names a local folder (the rule of ``swift rlhf``'s paths) and every ``--adapters`` folder
    exist: a missing one was taken for a hub id and failed after minutes, with a traceback. An existing ``--model`` is
    a model folder (:func:`~swift_gkd_plugin.options.local_paths.not_a_model_folder`), an ``--adapters`` path a folder."""
    from swift_gkd_plugin.options.local_paths import adapter_path_problem, looks_local, not_a_model_folder
    problem = not_a_model_folder(os.path.expanduser(args.model))
    if problem:
        return f'--model {args.model}: {problem}'
    named = [('--model', args.model)] if looks_local(args.model) else []  # (a --model file was refused above)
    for flag, value in named + [('--adapters', adapter) for adapter in args.adapters]:
        problem = adapter_path_problem(flag, value)
        if problem:
            return problem
    for adapter in args.adapters:
        folder = os.path.expanduser(adapter)
        if os.path.isdir(folder) and not os.path.isfile(os.path.join(folder, 'adapter_config.json')):
            return (f'--adapters {adapter}: the folder holds no adapter_config.json, so it is not a PEFT adapter '
                    '(pass the folder `save_pretrained` wrote, e.g. a LoRA checkpoint-N of `swift rlhf`)')
    return None


def _port_problem(host: str, port: int) -> Optional[str]:
    """``--port`` already taken on ``host`` (uvicorn found out only after the model loaded). Bound as uvicorn binds
    (``SO_REUSEADDR``), so only a listening socket counts."""
    import socket
    if port == 0:
        return None
    try:
        family = socket.getaddrinfo(host.strip('[]'), port, type=socket.SOCK_STREAM)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host.strip('[]'), port))
    except OSError as exc:
        return (f'--port {port}: cannot listen on {host}:{port} ({exc.strerror or exc}): another process holds it; '
                'pass another --port (0: any free port)')
    return None


def _device_problem(device: str) -> Optional[str]:
    if device in ('auto', 'cpu'):
        return None
    import torch
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        return f'--device must be auto, cpu, cuda or cuda:N, got {device!r}'
    if dev.type == 'cuda':
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            return f'--device {device}: this process sees no CUDA device (use --device cpu or auto)'
        if dev.index is not None and dev.index >= count:
            return f'--device {device}: this process sees {count} CUDA device(s) (cuda:0 to cuda:{count - 1})'
    elif dev.type != 'cpu':
        return f'--device must be auto, cpu, cuda or cuda:N, got {device!r}'
    return None


def run(args: argparse.Namespace, argv: Optional[Sequence[str]] = None) -> int:
    problem = check_args(args, argv)
    if problem:
        print(f'swift-gkd serve-teacher: error: {problem}', file=sys.stderr)
        return 2
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    server_logger = logging.getLogger('swift_gkd_plugin.server')
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter('%(asctime)s %(levelname)s [teacher-server] %(message)s'))
    server_logger.addHandler(handler)
    server_logger.setLevel(getattr(logging, args.log_level.upper()))
    server_logger.propagate = False

    import torch
    import uvicorn

    from swift_gkd_plugin.server.app import ServerConfig, create_app
    from swift_gkd_plugin.server.backend import TransformersTeacher

    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    teacher = TransformersTeacher.load(args.model, model_type=args.model_type, template=args.template,
                                       adapters=args.adapters, torch_dtype=args.torch_dtype, device=args.device,
                                       max_length=args.max_length, served_model_name=args.served_model_name,
                                       device_map=args.device_map)
    config = ServerConfig(topk=args.topk, api_key=api_key, max_batch_tokens=args.max_batch_tokens,
                          max_queue=args.max_queue, max_request_tokens=args.max_request_tokens,
                          max_body_bytes=int(args.max_body_mb * 2**20), batch_wait_ms=args.batch_wait_ms,
                          public_health=args.public_health, topk_route=not args.only_ms_swift_routes)
    app = create_app(teacher, config)
    logging.getLogger('swift_gkd_plugin.server').info(
        f'serving {teacher.name} on http://{args.host}:{args.port} (top-k <= {config.topk}, routes '
        f'{"/health, /infer/" if args.only_ms_swift_routes else "/health, /infer/, /v1/topk"}, '
        f'{"API key required" if api_key else "no API key"})')
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False,
                timeout_keep_alive=30)
    return 0
