"""Shared fixtures: tiny offline models and a runner for the real ``swift rlhf`` command line."""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import glob
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import pytest

from swift_gkd_plugin.entry.cli import OFFLINE_ENV as CLI_OFFLINE_ENV

# Without an NVIDIA GPU, Triton kernels can only run in its interpreter, which must be chosen before triton is
# imported (its standard library is compiled at import): tests/core/test_kernels_full.py runs the kernels that way.
# The pipeline runs (run_swift) get the environment without it, as a user's would.
# (xdist's workers inherit both variables from the controller, which set them.)
if 'TRITON_INTERPRET' not in os.environ and not os.path.exists('/dev/nvidiactl'):
    os.environ['TRITON_INTERPRET'] = os.environ['SWIFT_GKD_TESTS_SET_INTERPRET'] = '1'
_INTERPRET_SET_HERE = os.environ.get('SWIFT_GKD_TESTS_SET_INTERPRET') == '1'
# The README's test install skips pip's byte-compiling (--no-compile: 31k files, ~1 min, of which a session imports
# ~5k): each module is compiled where first imported and its .pyc written for every later process of the session,
# which a shell's PYTHONDONTWRITEBYTECODE (set on this project's machines) would forbid: every run would compile again.
os.environ.pop('PYTHONDONTWRITEBYTECODE', None)
sys.dont_write_bytecode = False
# every end-to-end run appends a line here (kind, seconds, test): the closing summary counts them by kind; the
# process that sets it (pytest's, xdist's controller) also stops the session's shared servers at its end
_OWNS_THE_SESSION = 'GKD_TEST_RUN_LOG' not in os.environ
if _OWNS_THE_SESSION:
    import tempfile
    os.environ['GKD_TEST_RUN_LOG'] = os.path.join(tempfile.mkdtemp(prefix='gkd_test_runs_'), 'runs.jsonl')
    os.environ['GKD_TEST_SESSION_PID'] = str(os.getpid())  # the session's zygotes end with it

OFFLINE_ENV = {**CLI_OFFLINE_ENV, 'TOKENIZERS_PARALLELISM': 'false', 'OMP_NUM_THREADS': '1'}
SWIFT = os.path.join(os.path.dirname(sys.executable), 'swift')
RL_REWARD_PLUGIN = os.path.join(os.path.dirname(__file__), 'rl_reward_plugin.py')  # rewards for GKD + RL tests


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config):
    """``pytest -n N`` (the README's ``-n 2``) without ``--dist``: work stealing instead of xdist's ``load``. ``load``
    hands each worker its queue ahead of time, and a worker whose queue ends with pipeline runs (tens of seconds each)
    kept running them while the other sat idle at the end of the suite; with ``worksteal`` an idle worker takes half of
    the other's queue. Runs before xdist's own hook, which would otherwise set ``load``."""
    if getattr(config.option, 'numprocesses', None) and config.option.dist == 'no':
        config.option.dist = 'worksteal'


# the modules whose tests share the session's servers (SHARED_SERVERS: one run at a time on each): collected first, so
# that one worker runs them all (worksteal hands a worker the first half of the queue and steals from the ends of the
# queues), instead of both workers at the end of the suite, each waiting for the other's runs on the server
SERVER_MODULES = ('test_vllm_server.py',)


def pytest_collection_modifyitems(session, config, items):
    """:data:`SERVER_MODULES` first, in their order; the rest as collected."""
    items.sort(key=lambda item: os.path.basename(str(item.fspath)) not in SERVER_MODULES)


@dataclass
class Workspace:
    root: str
    student: str
    teacher: str
    other_vocab_teacher: str
    train: str
    fixed: str  # four rows: a fixed batch for "the loss falls" checks


@pytest.fixture(scope='session')
def tiny_ws(tmp_path_factory) -> Workspace:
    from swift_gkd_plugin.demo import tiny
    root = str(tmp_path_factory.mktemp('tiny'))
    tok = tiny.build_tokenizer(os.path.join(root, 'tok'))
    student = tiny.build_model(os.path.join(root, 'student'), tok, seed=0)
    teacher = tiny.build_model(os.path.join(root, 'teacher'), tok, seed=1, hidden_size=96, intermediate_size=192)
    # a teacher whose tokenizer has 16 more tokens: a different vocabulary
    other_tok = tiny.load_tokenizer(os.path.join(root, 'tok'))
    other_tok.add_tokens([f'<extra_{i}>' for i in range(16)])
    other = tiny.build_model(os.path.join(root, 'other_teacher'), other_tok, seed=2)
    rows = tiny.make_rows(64, seed=0, split='train')
    train = tiny.write_dataset(os.path.join(root, 'train.jsonl'), rows)
    fixed = tiny.write_dataset(os.path.join(root, 'fixed.jsonl'), rows[:4])
    return Workspace(root, student, teacher, other, train, fixed)


@dataclass
class SwiftRun:
    returncode: int
    output: str
    output_dir: str
    logs: List[Dict] = field(default_factory=list)  # logging.jsonl rows that carry a training loss
    child_command: List[str] = field(default_factory=list)  # what ``swift`` starts (see ``launcher_child_command``)
    launched: Optional[List[str]] = None  # what ``swift`` did start, from its log (``run_swift(launcher=True)``)

    @property
    def losses(self) -> List[float]:
        return [r['loss'] for r in self.logs]

    def modes(self, rank: int = 0) -> List[Dict]:
        path = glob.glob(os.path.join(self.output_dir, '**', 'gkd_modes', f'rank{rank}.jsonl'), recursive=True)
        assert path, f'no mode log for rank {rank} under {self.output_dir}'
        with open(sorted(path)[-1]) as f:
            return [json.loads(line) for line in f]

    def checkpoints(self) -> List[str]:
        return sorted(glob.glob(os.path.join(self.output_dir, '**', 'checkpoint-*'), recursive=True),
                      key=lambda p: int(p.rsplit('-', 1)[1]))


def early_stopper(student_dir: str, scale: float = 2.0):
    """``(model, tokenizer)``: the tiny student of ``student_dir`` with its ``<|im_end|>`` output row aimed at its
    average last hidden state after 8 prompts (logit ~``scale`` there): its samples stop after a random number of
    tokens, often at once for a large ``scale``."""
    import torch
    from transformers import AutoModelForCausalLM

    from swift_gkd_plugin.demo import tiny
    tok = tiny.load_tokenizer(student_dir)
    model = AutoModelForCausalLM.from_pretrained(student_dir)
    with torch.no_grad():
        prompts = [f"<|im_start|>user\n{r['messages'][0]['content']}<|im_end|>\n<|im_start|>assistant\n"
                   for r in tiny.make_rows(8, seed=0)]
        hidden = torch.cat([model(**tok(p, return_tensors='pt'), output_hidden_states=True).hidden_states[-1][0]
                            for p in prompts]).mean(0)
        model.lm_head.weight[tok.convert_tokens_to_ids('<|im_end|>')] = hidden * scale / hidden.dot(hidden)
    return model, tok


def base_args(ws: Workspace, output_dir: str, **overrides) -> List[str]:
    """A CPU-friendly ``swift rlhf --rlhf_type gkd`` command line; ``overrides`` replace or add flags."""
    flags = {
        'rlhf_type': 'gkd',
        'model': ws.student,
        'model_type': 'qwen3',
        'teacher_model': ws.teacher,
        'teacher_model_type': 'qwen3',
        'template': 'qwen3_nothinking',
        'dataset': ws.train,
        'tuner_type': 'full',
        'torch_dtype': 'float32',
        'check_model': 'false',
        'max_completion_length': '8',
        'max_steps': '3',
        'per_device_train_batch_size': '2',
        'gradient_accumulation_steps': '1',
        'max_length': '128',
        'logging_steps': '1',
        'save_strategy': 'no',
        'report_to': 'none',
        'dataloader_num_workers': '0',
        'dataset_num_proc': '1',
        'output_dir': output_dir,
        'add_version': 'false',
    }
    for key, value in overrides.items():
        if value is None:
            flags.pop(key, None)
        else:
            flags[key] = [str(v) for v in value] if isinstance(value, (list, tuple)) else str(value)
    argv = []
    for key, value in flags.items():
        argv += [f'--{key}', *value] if isinstance(value, list) else [f'--{key}', value]
    return argv


# what imports in this test process set in its environment (vLLM's, deepspeed's), which a user's shell does not have:
# kept out of the runs' environment unless the shell had them (a run that imports them sets them itself)
IMPORT_SIDE_EFFECTS = ('TILELANG_CLEANUP_TEMP_FILES', 'TORCHINDUCTOR_CACHE_DIR', 'TORCHINDUCTOR_COMPILE_THREADS',
                       'TRITON_CACHE_AUTOTUNING', 'PYTORCH_NVML_BASED_CUDA_CHECK',
                       # vLLM's CPU attention backend (imported in-process by tests/test_staleness_preset.py): aiter's
                       # flag, and cv2's library folder prepended to LD_LIBRARY_PATH
                       'AITER_SITUV2_A4W4', 'LD_LIBRARY_PATH')
_SHELL_VALUES = {name: os.environ[name] for name in IMPORT_SIDE_EFFECTS if name in os.environ}
_SHELL_HAD = set(_SHELL_VALUES)


def load_benchmark(name: str):
    """The module ``benchmarks/<name>.py`` (the benchmarks are scripts, not a package), imported afresh."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'benchmarks', f'{name}.py')
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def without_import_side_effects(env: Dict[str, str]) -> Dict[str, str]:
    """``env`` (this process's) as the shell gave it: what an import set or changed in it undone."""
    return dict({k: v for k, v in env.items() if k not in IMPORT_SIDE_EFFECTS}, **_SHELL_VALUES)


def _run_env() -> Dict[str, str]:
    """The environment of a one-process run that sets nothing itself."""
    import swift.cli.main  # noqa: F401 - it sets VLLM_LOGGING_LEVEL in this process's environment when imported
    env = dict(without_import_side_effects(os.environ), **OFFLINE_ENV)
    env.pop('SWIFT_GKD_PLUGIN', None)
    if _INTERPRET_SET_HERE:  # this process's interpreter is not the pipeline's: a run sees what a user's would
        env.pop('TRITON_INTERPRET', None)
        env.pop('SWIFT_GKD_TESTS_SET_INTERPRET', None)
    return env


def run_swift(argv: List[str], *, env: Optional[Dict[str, Optional[str]]] = None, nproc: int = 1,
              timeout: int = 600, check: bool = True, command: str = 'rlhf', launcher: bool = False) -> SwiftRun:
    """Run ``swift <command> argv`` in a child process, as a user would, and collect its logs (``env``: variables
    set for it, ``None`` removes one).

    ``swift`` itself (ms-swift's ``cli_main``) only imports ms-swift and modelscope to start one more process, the
    route file (under torchrun with ``nproc > 1``), and waits for it: ~2.5 s of CPU and ~5 s of wall time per run on
    the CI machine, with nothing of the plugin in it. By default this starts that same child command directly
    (:func:`launcher_child_command`); ``launcher=True`` goes through ``swift`` and records the command it started in
    ``SwiftRun.launched``: tests of the launcher compare it with ``SwiftRun.child_command``."""
    full_env = _run_env()
    if nproc > 1:
        full_env['NPROC_PER_NODE'] = str(nproc)
        full_env['MASTER_PORT'] = str(_free_port())
    full_env.update(env or {})
    for name in [k for k, v in full_env.items() if v is None]:  # env={'NAME': None}: the run without NAME
        del full_env[name]
    child = launcher_child_command(command, argv, full_env)
    zygote, ranks = (None, 0) if launcher else _zygote_for(child, full_env)
    started, forked = time.time(), False
    if zygote is not None:
        import tempfile
        torchrun = child[1] == '-m'  # the ranks torchrun would start, or the route file itself
        route, route_argv = (child[7], child[8:]) if torchrun else (child[1], child[2:])
        with tempfile.TemporaryDirectory(prefix='run_swift_') as workdir:
            returncode, stdout, stderr = zygote.run(route, route_argv, full_env, timeout, workdir, nproc=ranks,
                                                    port=full_env['MASTER_PORT'] if torchrun else None)
        proc = subprocess.CompletedProcess(child, returncode, stdout, stderr)
    elif launcher:
        proc, forked = launch(SWIFT, [command, *argv], full_env, timeout)
    else:
        proc = subprocess.run(child, env=full_env, capture_output=True, text=True, timeout=timeout)
    how = ('launcher forked' if forked else 'launcher') if launcher else 'zygote fork' if zygote else 'fresh'
    how += ' (torchrun)' if child[1:3] == ['-m', 'torch.distributed.run'] else ''
    log_run(f'swift {command}, {full_env.get("NPROC_PER_NODE", "1")} process(es), {how}', time.time() - started,
            why_fresh=_ZYGOTE.get('why fresh') if how.startswith('fresh') else None)
    output = proc.stdout + proc.stderr
    output_dir = argv[argv.index('--output_dir') + 1] if '--output_dir' in argv else ''
    if check and proc.returncode != 0:
        raise AssertionError(f'swift {command} failed ({proc.returncode}):\n{output[-6000:]}')
    logs = []
    for path in sorted(glob.glob(os.path.join(output_dir, '**', 'logging.jsonl'), recursive=True)):
        with open(path) as f:
            logs += [row for row in map(json.loads, f) if 'loss' in row]
    run = SwiftRun(proc.returncode, output, output_dir, logs, child_command=child)
    if launcher:
        launched = re.search(r'^run sh: `(.*)`$', proc.stdout, re.MULTILINE)  # the launcher joins it with spaces
        run.launched = launched.group(1).split(' ') if launched else None
    return run


MEGATRON = os.path.join(os.path.dirname(sys.executable), 'megatron')
# what ms-swift's launcher reads when it runs (get_torchrun_args), not at import: a launcher run that sets them forks
LAUNCHER_RUN_TIME_ENV = ('NPROC_PER_NODE', 'MASTER_PORT', 'NNODES', 'NODE_RANK', 'MASTER_ADDR')


def launch(script: str, argv: List[str], env: Dict[str, str], timeout: int = 300):
    """``(process, forked)``: ms-swift's console script ``script`` (``SWIFT`` or ``MEGATRON``) with ``argv`` in ``env``
    (the whole environment), run as ``__main__`` in a fork of a zygote that imported its launcher
    (``LAUNCHER_PRELOAD``: ~1.7 s of a refused command line's ~2 s), else in a fresh process (an environment that
    differs from the zygote's at import); what the launcher starts (torchrun, the route file) is a fresh process."""
    child = [sys.executable, script, *argv]
    zygote, _ = _zygote_for(child, env, f'{os.path.basename(script)} launcher', env)
    if zygote is None:
        return subprocess.run(child[1:], env=env, capture_output=True, text=True, timeout=timeout), False
    import tempfile
    with tempfile.TemporaryDirectory(prefix='launcher_') as workdir:
        returncode, stdout, stderr = zygote.run(script, list(argv), env, timeout, workdir)
    return subprocess.CompletedProcess(child[1:], returncode, stdout, stderr), True


SWIFT_GKD = os.path.join(os.path.dirname(sys.executable), 'swift-gkd')


def run_swift_gkd(argv: List[str], env: Optional[Dict[str, str]] = None,
                  timeout: int = 120) -> subprocess.CompletedProcess:
    """``swift-gkd argv`` (e.g. a ``serve-teacher`` command line it refuses) through :func:`launch`, in ``env`` (default:
    this process's with ``OFFLINE_ENV``): a fork of the ``'swift-gkd launcher'`` zygote. Not for a server that keeps
    running (the zygote waits for each fork)."""
    started = time.time()
    proc, forked = launch(SWIFT_GKD, argv, env if env is not None else dict(os.environ, **OFFLINE_ENV), timeout)
    log_run(f'swift-gkd {argv[0] if argv else ""}, {"zygote fork" if forked else "fresh"}', time.time() - started,
            why_fresh=None if forked else _ZYGOTE.get('why fresh'))
    return proc


def run_megatron_launcher(argv: List[str], env: Dict[str, str], timeout: int = 300) -> subprocess.CompletedProcess:
    """``megatron argv`` through :func:`launch`, counted as a launcher-only run (tests of what it refuses)."""
    started = time.time()
    proc, forked = launch(MEGATRON, argv, env, timeout)
    log_run(f'megatron {argv[0] if argv else ""} (the launcher alone), {"zygote fork" if forked else "fresh"}',
            time.time() - started, why_fresh=None if forked else _ZYGOTE.get('why fresh'))
    return proc


def log_run(kind: str, seconds: float, why_fresh: Optional[List[str]] = None) -> None:
    """Count one end-to-end run (``swift``, ``megatron``, a kit part) for the closing summary; ``why_fresh``: the
    variables that kept a run from the zygote."""
    with open(os.environ['GKD_TEST_RUN_LOG'], 'a') as f:
        f.write(json.dumps({'kind': kind, 'seconds': seconds, 'why_fresh': why_fresh,
                            'test': os.environ.get('PYTEST_CURRENT_TEST', '').split(' ')[0]}) + '\n')


# the test worker's zygote (harness.zygote): the start-up of its one-process runs, shared
_ZYGOTE: Dict[str, object] = {}
# read at run time only (by the test plugins): a run that sets these still forks from the zygote
_RUNTIME_ENV_PREFIX = 'GKD_TEST_'
# (and the xdist worker's name: the workers share the session's zygotes; the plugin's variables that it reads when a
# run reaches them, not at import: swift_gkd_plugin/core/fused/kernels.requested_backend)
_ZYGOTE_IGNORED = ('PYTEST_CURRENT_TEST', 'PYTEST_XDIST_WORKER', 'SWIFT_GKD_FUSED_BACKEND')


def _zygote_for(child: List[str], env: Dict[str, str], family: str = 'swift',
                base_env: Optional[Dict[str, str]] = None):
    """``(zygote, nproc)``: the zygote that can start ``child`` in ``env`` and the number of ranks it forks, else
    ``(None, 0)``: a fresh process. It can: a route file, or ``torchrun --nproc_per_node N --master_port P`` of one
    (forks with torchrun's worker environment), whose environment differs from the zygote's in run-time variables
    only, or also in :data:`ZYGOTE_VARIANTS` (then a zygote started with their values). ``family``: ``swift`` (the
    default run's environment), ``megatron`` (``base_env``, its route file's imports) or ``swift launcher``,
    ``megatron launcher`` (``base_env``, the console script's imports: :func:`launch`).
    ``GKD_TESTS_FRESH_PROCESSES=1`` turns it off."""
    if os.environ.get('GKD_TESTS_FRESH_PROCESSES') == '1':
        return None, 0
    from harness.zygote import (LAUNCHER_PRELOAD, MEGATRON_PRELOAD, PRELOAD, TORCHRUN_WORKER_CONSTANTS,
                                                 VLLM_COLOCATE_PRELOAD, Zygote)
    nproc = 1
    if child[1] == '-m':
        torchrun = child[3:7]
        if (child[2] != 'torch.distributed.run' or len(child) < 8 or torchrun[0] != '--nproc_per_node'
                or torchrun[2] != '--master_port' or not torchrun[1].isdigit() or child[7].startswith('-')):
            return None, 0
        nproc = int(torchrun[1])
    elif family not in ('swift', 'swift launcher', 'megatron launcher', 'swift-gkd launcher'):
        return None, 0

    def at_import(e):
        return {k: v for k, v in e.items() if not k.startswith(_RUNTIME_ENV_PREFIX) and k not in _ZYGOTE_IGNORED
                and (child[1] != '-m' or k not in ('NPROC_PER_NODE', 'MASTER_PORT'))
                and (not family.endswith('launcher') or k not in LAUNCHER_RUN_TIME_ENV)}
    # torchrun's ranks: a zygote with torchrun's constant worker variables at import
    key = family if child[1] != '-m' else f'{family} torchrun'
    # a vLLM colocate run's ranks (its command line; without torchrun it is refused before vLLM loads): a zygote that
    # also imported vLLM (not megatron rlhf's: its three such runs saved less than one more Megatron zygote costs)
    colocate = child[1] == '-m' and family == 'swift' and \
        _flag(child, '--use_vllm', '').lower() == 'true' and _flag(child, '--vllm_mode', '') == 'colocate'
    key += ' vllm colocate' if colocate else ''
    if key not in _ZYGOTE:
        import atexit
        base = at_import(base_env if base_env is not None else _run_env())
        if child[1] == '-m':
            base.update(TORCHRUN_WORKER_CONSTANTS)
        _ZYGOTE[key] = _shared_zygote(Zygote, base, {'megatron': MEGATRON_PRELOAD, **LAUNCHER_PRELOAD}.get(
            family, PRELOAD) + (VLLM_COLOCATE_PRELOAD if colocate else ()))
        atexit.register(_ZYGOTE[key].close)
    zygote = _ZYGOTE[key]
    wanted = at_import(env) if child[1] != '-m' else dict(at_import(env), **TORCHRUN_WORKER_CONSTANTS)
    have = at_import(zygote.env)
    differ = sorted(k for k in set(wanted) | set(have) if wanted.get(k) != have.get(k))
    _ZYGOTE['why fresh'] = differ
    if not differ:
        return zygote, nproc
    if not set(differ) <= set(ZYGOTE_VARIANTS):
        return None, 0
    # a run that differs at import only in variables a zygote can be started with: a zygote of its own
    variant = f'{key} ' + ' '.join(f'{k}={wanted.get(k, "(unset)")}' for k in differ)
    if variant not in _ZYGOTE:
        import atexit
        _ZYGOTE[variant] = _shared_zygote(Zygote, wanted, _preload_for(zygote.preload, wanted))
        atexit.register(_ZYGOTE[variant].close)
    return _ZYGOTE[variant], nproc


def _shared_zygote(zygote_class, env: Dict[str, str], preload):
    """A zygote of ``env`` and ``preload`` shared by the session's workers (beside its shared servers, stopped with
    them), its start counted in the closing summary with the CPU seconds of its imports."""
    return zygote_class(env, preload, shared_dir=SHARED_SERVERS.root, outlive=int(os.environ.get('GKD_TEST_SESSION_PID', os.getpid())),
                        on_start=lambda cpu: log_run('zygote start', cpu))


def _flag(argv: List[str], name: str, default: str) -> str:
    """The value after the last ``name`` in ``argv``, else ``default``."""
    at = [i for i, arg in enumerate(argv[:-1]) if arg == name]
    return argv[at[-1] + 1] if at else default


# what a run may set at import and still fork, from a zygote started with it (``_zygote_for``): the plugin switched
# off, the server-mode tests' ``sitecustomize`` on PYTHONPATH, Triton's interpreter. One more zygote per worker and
# value, started on first use (~5 s, instead of ~8 s more for each fresh run)
ZYGOTE_VARIANTS = ('SWIFT_GKD_PLUGIN', 'PYTHONPATH', 'TRITON_INTERPRET')


def _preload_for(preload, env: Dict[str, str]) -> tuple:
    """``preload`` for a zygote of ``env``: without the plugin's own modules where ``SWIFT_GKD_PLUGIN`` turns it off
    (a fresh process of that environment imports only ms-swift's, with the plugin's off-hooks)."""
    if env.get('SWIFT_GKD_PLUGIN', '1').strip().lower() not in {'0', 'false', 'no', 'off'}:  # as _bootstrap reads it
        return tuple(preload)
    return tuple(name for name in preload if not name.startswith('swift_gkd_plugin'))


def launcher_child_command(command: str, argv: List[str], env: Dict[str, str], megatron: bool = False) -> List[str]:
    """The command ms-swift's ``swift`` launcher (``swift.cli.main.cli_main``; ``megatron``: ``megatron``'s) starts
    for ``swift <command> argv`` in the environment ``env``: the route file, under ``torch.distributed.run`` with the
    launcher's own ``get_torchrun_args`` (evaluated with ``env`` as the process environment) when it asks for
    torchrun."""
    from unittest.mock import patch

    from swift.cli._megatron.main import ROUTE_MAPPING as MEGATRON_ROUTES
    from swift.cli.main import ROUTE_MAPPING, get_torchrun_args
    routes = MEGATRON_ROUTES if megatron else ROUTE_MAPPING
    route = importlib.util.find_spec(routes[command.replace('_', '-')]).origin
    with patch.dict(os.environ, env, clear=True):  # the environment only: ms-swift's function runs as is
        torchrun = get_torchrun_args()
    if torchrun is None or (not megatron and command not in {'pt', 'sft', 'rlhf', 'infer'}):
        return [sys.executable, route, *argv]
    return [sys.executable, '-m', 'torch.distributed.run', *torchrun, route, *argv]


class SharedRuns:
    """``swift`` runs that several tests assert on, each started on first use and only once per test session, for
    all xdist workers: a file lock guards each run and its ``SwiftRun`` is kept as JSON. A module whose tests xdist
    splits between the workers thus still starts each run once (a module-scoped fixture would start it on both)."""

    def __init__(self, root: str, starts: Dict[str, Callable[[str], SwiftRun]]):
        self.root, self.starts = root, starts  # starts[name](output_dir) runs swift and returns its SwiftRun

    def __getitem__(self, name: str) -> SwiftRun:
        from filelock import FileLock
        path = os.path.join(self.root, name)
        with FileLock(path + '.lock'):
            if not os.path.exists(path + '.json'):
                run = self.starts[name](path)
                with open(path + '.json.partial', 'w') as f:
                    json.dump(dataclasses.asdict(run), f)
                os.replace(path + '.json.partial', path + '.json')
        with open(path + '.json') as f:
            return SwiftRun(**json.load(f))


class SharedServers:
    """Servers that every xdist worker of the test session uses (a ``swift rollout`` takes 30-60 s to start), each
    started by the first caller of :meth:`use` and kept for the others: its pid, port and health URL as JSON under
    ``root``, a file lock per server. The session's own process stops them at its end (``pytest_sessionfinish``),
    not the worker that started one, which may end while the other still runs against it."""

    def __init__(self, root: str):
        self.root = root
        os.makedirs(root, exist_ok=True)

    @contextlib.contextmanager
    def use(self, name: str, start: Callable[[], tuple], stop_after: bool = False):
        """The server ``name`` (a dict: ``pid``, ``port``, ``health``) for this block alone: one caller at a time, as
        a run that syncs its weights into the server must have it (the lock is held until the block ends).
        ``start()`` -> ``(pid, port, health URL)`` starts it and waits until it answers; it runs where no server of
        that name was started yet or the last one no longer answers (a test stopped it). ``stop_after``: stopped
        when the block ends (a server that one test uses: its memory back at once)."""
        from filelock import FileLock
        path = os.path.join(self.root, re.sub(r'[^A-Za-z0-9_.-]', '_', name))
        with FileLock(path + '.lock'):
            record = json.load(open(path + '.json')) if os.path.exists(path + '.json') else None
            if record is None or not _answers(record['health']):
                if record is not None:
                    _stop_group(record)
                pid, port, health = start()
                record = {'name': name, 'pid': pid, 'port': port, 'health': health, 'cmdline': _cmdline(pid)}
                with open(path + '.json', 'w') as f:
                    json.dump(record, f)
            try:
                yield record
            finally:
                if stop_after:
                    _stop_group(record)
                    os.remove(path + '.json')

    def stop_all(self) -> None:
        for path in glob.glob(os.path.join(self.root, '*.json')):
            with open(path) as f:
                _stop_group(json.load(f))
            os.remove(path)


def _cmdline(pid: int) -> Optional[str]:
    try:
        with open(f'/proc/{pid}/cmdline') as f:
            return f.read()
    except OSError:
        return None


def _answers(url: str) -> bool:
    import requests
    try:
        return requests.get(url, timeout=5).status_code == 200
    except requests.RequestException:
        return False


def _stop_group(record: Dict) -> None:
    """SIGKILL the process group of a server started in a session of its own, if its process is still the one started
    (its pid may have been given to another process since it ended)."""
    import signal
    if record['cmdline'] is not None and _cmdline(record['pid']) == record['cmdline']:
        try:
            os.killpg(record['pid'], signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


# the session's shared servers (SharedServers), beside the run log that the session's process created
SHARED_SERVERS = SharedServers(os.path.join(os.path.dirname(os.environ['GKD_TEST_RUN_LOG']), 'servers'))


def pytest_sessionfinish(session):
    if _OWNS_THE_SESSION:
        SHARED_SERVERS.stop_all()


@pytest.fixture(scope='session')
def shared_runs(tmp_path_factory) -> Callable[[str, Dict[str, Callable[[str], SwiftRun]]], SharedRuns]:
    """``shared_runs(group, starts)``: the :class:`SharedRuns` of ``starts`` under a folder named ``group``, common
    to the xdist workers of this test session (and to no other session)."""
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get('PYTEST_XDIST_WORKER'):
        shared = shared.parent

    def make(group, starts):
        root = shared / 'shared_runs' / group
        root.mkdir(parents=True, exist_ok=True)
        return SharedRuns(str(root), starts)

    return make


_PORTS_PER_WORKER = 1000
_next_port = [None]  # the next index into this worker's block (set on first use)


@functools.lru_cache(maxsize=1)
def _ephemeral_start() -> int:
    """The first port of the kernel's ephemeral range (read once)."""
    try:
        with open('/proc/sys/net/ipv4/ip_local_port_range') as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _free_port() -> int:
    """A free port for a run's rendezvous or a server that no other process of the suite picks in the meantime: from
    this xdist worker's own block, below the kernel's ephemeral range (where ``bind(0)`` and outgoing connections
    take theirs: a port picked that way and released was taken by another worker's run before this run bound it,
    EADDRINUSE), each handed out in turn from a start that depends on the process (two pytest sessions at once on
    one machine start at different places of the block) and checked free."""
    import socket
    worker = os.environ.get('PYTEST_XDIST_WORKER', 'gw0')
    index = int(worker[2:]) if worker[2:].isdigit() else 0
    ephemeral = _ephemeral_start()
    if _next_port[0] is None:
        _next_port[0] = os.getpid() * 7
    base = max(1024, ephemeral - _PORTS_PER_WORKER * (index + 1) - 2000)
    for _ in range(_PORTS_PER_WORKER):
        port = base + _next_port[0] % _PORTS_PER_WORKER
        _next_port[0] += 1
        with socket.socket() as s:
            try:
                s.bind(('127.0.0.1', port))
            except OSError:
                continue
        return port
    with socket.socket() as s:  # the whole block in use: the kernel's choice
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.fixture(scope='session')
def sp_teacher(tiny_ws) -> str:
    """A teacher of another tokenizer family (sentencepiece-style Metaspace BPE with byte fallback, 600 entries, the
    same ChatML specials and template) and a sharpened output head, for cross-tokenizer runs; built once next to
    ``tiny_ws``."""
    from swift_gkd_plugin.demo import tiny
    out = os.path.join(tiny_ws.root, 'sp_teacher')
    if not os.path.exists(os.path.join(out, 'config.json')):
        tok = tiny.build_sentencepiece_tokenizer(os.path.join(tiny_ws.root, 'sp_tok'))
        tiny.build_model(out, tok, seed=3, hidden_size=96, intermediate_size=192)
        # a random tiny model predicts almost uniformly; a sharper head gives ULD (which matches the shapes of the
        # distributions) a target to learn within a few steps
        import torch
        model = tiny.load_model(out)
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(10.0)
        model.save_pretrained(out)
    return out


@pytest.fixture(scope='session')
def adapters(tiny_ws) -> Dict[str, str]:
    """LoRA adapters with non-zero weights: ``fit`` and ``student_start`` (a fixed starting point for a LoRA student,
    independent of the random state) fit the student's base; ``misfit`` was made on the (wider) teacher. ``fit``, the
    teacher adapter of the tests, has LoRA dropout (as adapters trained with ms-swift's default 0.05 do): a teacher
    must run it in eval mode."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    out = {}
    torch.manual_seed(0)
    for name, base in [('fit', tiny_ws.student), ('misfit', tiny_ws.teacher), ('student_start', tiny_ws.student)]:
        model = get_peft_model(
            AutoModelForCausalLM.from_pretrained(base),
            LoraConfig(r=4, lora_alpha=8, target_modules=['q_proj', 'v_proj', 'down_proj'], init_lora_weights=False,
                       lora_dropout=0.1 if name == 'fit' else 0.0))
        out[name] = os.path.join(tiny_ws.root, f'adapter_{name}')
        model.save_pretrained(out[name])
    # the student's own files under another name: ms-swift then loads a separate teacher
    out['student_alias'] = os.path.join(tiny_ws.root, 'student_alias')
    if not os.path.exists(out['student_alias']):
        os.symlink(tiny_ws.student, out['student_alias'])
    return out


@pytest.fixture(scope='session')
def trained_ws(tmp_path_factory):
    """The demo workspace (a teacher trained to reverse letters perfectly, the student warm-started as the demo's and
    the example scripts' CPU mode's), built once for all xdist workers."""
    from filelock import FileLock

    from swift_gkd_plugin.demo import tiny
    shared = tmp_path_factory.getbasetemp().parent  # common to the xdist workers of one run
    with FileLock(str(shared / 'trained_ws.lock')):
        return tiny.build_warm_workspace(str(shared / 'trained_ws'), n_train=200, n_test=50)


@pytest.fixture(scope='session')
def solution_dataset(tiny_ws):
    """The tiny training rows with their answer also in a ``solution`` column (read by the tests' rewards)."""
    path = os.path.join(tiny_ws.root, 'train_solution.jsonl')
    with open(tiny_ws.train) as src, open(path, 'w') as dst:
        for line in src:
            row = json.loads(line)
            row['solution'] = row['messages'][-1]['content']
            dst.write(json.dumps(row) + '\n')
    return path


def pytest_report_header(config):
    """Under ``.ci/run``: the seconds from its start to the first test (the virtual environment and the install), so
    that a run's output holds its whole time (this, plus the closing summary)."""
    started = os.environ.get('CI_STARTED_AT')
    if started and started.isdigit():
        import time
        return f'ci: {time.time() - int(started):.0f} s from .ci/run\'s start to the tests (venv and install)'
    return None


# each test's seconds (set-up + call + tear-down), summed on the controller from the workers' reports
_SECONDS: Dict[str, float] = {}
_SESSION: Dict[str, float] = {}


def pytest_sessionstart(session):
    import time
    _SESSION['start'] = time.time()


_TIMELINE: List[tuple] = []


def pytest_runtest_logreport(report):
    _SECONDS[report.nodeid] = _SECONDS.get(report.nodeid, 0.0) + report.duration
    if os.environ.get('GKD_SUITE_TIMELINE'):
        node = getattr(report, 'node', None)  # xdist: the worker that ran it
        _TIMELINE.append((report.nodeid, report.when, getattr(getattr(node, 'gateway', None), 'id', 'main'),
                          getattr(report, 'start', 0.0), getattr(report, 'stop', 0.0)))


def readme_suite_minutes(readme: str) -> Optional[tuple]:
    """The README's figure for the whole suite under ``.ci/run`` with the install: ``(low, high)`` minutes."""
    m = re.search(r'(\d+)(?:-(\d+))? (?:min )?with the install', readme)
    return (int(m.group(1)), int(m.group(2) or m.group(1))) if m else None


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """The guard of the suite's time (issue 64): its wall time and its 10 slowest tests, at the end of every run;
    under ``.ci/run`` also the whole time with the install, against the README's figure (refresh it past 10%)."""
    import time
    if not _SECONDS or 'start' not in _SESSION:
        return
    tr = terminalreporter
    wall = time.time() - _SESSION['start']
    tr.section('suite time')
    tr.write_line(f'{len(_SECONDS)} tests in {wall:.0f} s of wall time ({wall / 60:.1f} min); '
                  f'{sum(_SECONDS.values()):.0f} s summed over the tests')
    started = os.environ.get('CI_STARTED_AT')
    if started and started.isdigit():
        total = (time.time() - int(started)) / 60
        readme = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'README.md')
        figure = readme_suite_minutes(open(readme).read()) if os.path.exists(readme) else None
        line = f'.ci/run: {total:.1f} min with the install'
        if figure:
            off = total < 0.9 * figure[0] or total > 1.1 * figure[1]
            said = f'{figure[0]}' if figure[0] == figure[1] else f'{figure[0]}-{figure[1]}'
            line += (f"; the README says {said} min" +
                     (': off by more than 10%, refresh it' if off else ' (within 10%)'))
        tr.write_line(line)
    runs = []
    if os.path.exists(os.environ['GKD_TEST_RUN_LOG']):
        with open(os.environ['GKD_TEST_RUN_LOG']) as f:
            runs = [json.loads(line) for line in f]
    starts = [r['seconds'] for r in runs if r['kind'].startswith('zygote start')]
    runs = [r for r in runs if not r['kind'].startswith('zygote start')]
    if starts:  # the session's shared start-ups (harness.zygote), each once for all its workers
        tr.write_line(f'{len(starts)} zygotes started, {sum(starts):.0f} s of CPU importing in all')
    if runs:
        by_kind: Dict[str, List[float]] = {}
        for r in runs:
            by_kind.setdefault(r['kind'], []).append(r['seconds'])
        tr.write_line(f'{len(runs)} end-to-end runs, {sum(r["seconds"] for r in runs):.0f} s of wall time in all:')
        for kind, secs in sorted(by_kind.items(), key=lambda kv: -sum(kv[1])):
            tr.write_line(f'{len(secs):6d} x {kind}: {sum(secs):.0f} s, {sum(secs) / len(secs):.1f} s each')
    if os.environ.get('GKD_SUITE_TIMELINE'):  # each phase's worker, start and stop: where the workers sat idle
        with open(os.environ['GKD_SUITE_TIMELINE'], 'w') as f:
            json.dump(_TIMELINE, f)
    tr.write_line('the 10 slowest tests (set-up + call + tear-down):')
    for nodeid, seconds in sorted(_SECONDS.items(), key=lambda kv: -kv[1])[:10]:
        tr.write_line(f'{seconds:8.1f} s  {nodeid}')
    by_file: Dict[str, List[float]] = {}
    for nodeid, seconds in _SECONDS.items():
        by_file.setdefault(nodeid.split('::')[0], []).append(seconds)
    tr.write_line('the 15 costliest files (seconds summed over their tests, tests):')
    for path, secs in sorted(by_file.items(), key=lambda kv: -sum(kv[1]))[:15]:
        tr.write_line(f'{sum(secs):8.1f} s  {len(secs):4d}  {path}')
    if os.environ.get('GKD_SUITE_DURATIONS'):  # every test's seconds, for planning the suite's time
        with open(os.environ['GKD_SUITE_DURATIONS'], 'w') as f:
            json.dump(_SECONDS, f, indent=0, sort_keys=True)
