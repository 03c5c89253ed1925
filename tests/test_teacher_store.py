"""The teacher-score store (issue 80) through real ``swift rlhf`` runs: written by ``swift-gkd score`` (its command
line, run as ``swift rlhf --gkd_score_only``) and by a training run (``--save_teacher_scores``), read by later runs
(``--teacher_scores``) on one and two ranks, a killed score resumed, and the refusals before loading.

At learning rate 0 every run trains the same rows in the same order (``--seed``), so a run from a float32 store must
log the live teacher's top-k losses, and a run whose store covers every row must not load the teacher at all."""
import argparse
import dataclasses
import glob
import json
import os
import re
import shutil

import pytest
import torch
from conftest import OFFLINE_ENV, _free_port, base_args, run_swift
from safetensors import safe_open

from swift_gkd_plugin.core.scores.store import TeacherStore
from swift_gkd_plugin.entry import score as score_cli
from harness import tiny_multimodal as tmm
from test_multimodal import mm  # noqa: F401 (the tiny LLaVA workspace, built once for every module)

K = 8
KILL_AFTER_SHARDS = os.path.join(os.path.dirname(__file__), 'kill_after_shards_plugin.py')
SAMPLES = 64  # tokens drawn from the teacher a position (many: the test compares the estimate's mean)
EVAL = dict(val_dataset=None, eval_strategy='steps', eval_steps=2)  # val_dataset: the first 4 training rows
OFF_POLICY = dict(lmbda=0, seq_kd='false', learning_rate=0, max_steps=4, gkd_logits_topk=K, seed=5)


def score_argv(ws, store, **extra):
    """``swift-gkd score``'s ``swift rlhf`` command line (without ``rlhf``) for the tiny teacher over ``ws.train``."""
    parser = argparse.ArgumentParser()
    score_cli.add_arguments(parser)
    args, rest = parser.parse_known_args(
        ['--teacher_model', ws.teacher, '--dataset', ws.train, '--output_dir', store, '--gkd_logits_topk', str(K),
         '--teacher_scores_dtype', 'float32', '--teacher_model_type', 'qwen3', '--template', 'qwen3_nothinking',
         '--max_length', '128', '--torch_dtype', 'float32', '--check_model', 'false', '--dataloader_num_workers', '0',
         '--dataset_num_proc', '1', '--add_version', 'false']
        + [x for key, value in extra.items() for x in (f'--{key}', str(value))])
    return score_cli.score_command(args, rest)[1:]


@pytest.fixture(scope='module')
def runs(tiny_ws, shared_runs):
    EVAL['val_dataset'] = f'{tiny_ws.train}#4'

    def train(out, **flags):
        return run_swift(base_args(tiny_ws, out, **dict(OFF_POLICY, **flags)))

    def scored(out):  # (its run's logs are under out/runs; the store is out); top-k and 64 draws a position
        return dataclasses.replace(run_swift(score_argv(tiny_ws, out, teacher_scores_samples=SAMPLES)), output_dir=out)

    shared = shared_runs('teacher_store', {
        # the live teacher's top-k, kept while training (float32)
        'live': lambda out: train(out, save_teacher_scores=os.path.join(out, 'store'), teacher_scores_dtype='float32'),
        'score': scored,  # swift-gkd score of the whole training set
        # issue 90: rows of mixed lengths scored in dataset order and batched by length (swift-gkd score's default)
        'score_in_order': lambda out: mixed_score(tiny_ws, out, 'false'),
        'score_by_length': lambda out: mixed_score(tiny_ws, out, 'true'),
        # the score's store alone (it covers every row: --teacher_model is given and not loaded)
        'from_score': lambda out: after('score', lambda: train(out, teacher_scores=runs_dir(out, 'score'), **EVAL)),
        # the live run's store (the first 8 rows), with the teacher for anything missing, named by a hub id (a hub
        # cache that holds it, offline): its weights are compared with the store's once downloaded and loaded
        'from_live': lambda out: after('live', lambda: run_swift(base_args(tiny_ws, out, **dict(
            OFF_POLICY, teacher_scores=os.path.join(runs_dir(out, 'live'), 'store'), teacher_model=HUB_TEACHER)),
            env=hub_cache(os.path.join(out, 'hub'), HUB_TEACHER, tiny_ws.teacher))),
        # two ranks holding half of every row (sequence parallelism), the score's store alone, no teacher flag
        'two_ranks': lambda out: after('score', lambda: run_swift(base_args(tiny_ws, out, **dict(
            OFF_POLICY, teacher_scores=runs_dir(out, 'score'), teacher_model=None, teacher_model_type=None,
            sequence_parallel_size=2, use_cpu='true', **EVAL)), nproc=2)),
        # two epochs of the 4 fixed rows, kept while training: the second epoch reads what the first scored
        'epochs': lambda out: train(out, dataset=tiny_ws.fixed, save_teacher_scores=os.path.join(out, 'store'),
                                    save_strategy='steps', save_steps=2),
        # resumed from its checkpoint-2 (the first epoch), writing to the same store: the rows flushed with the
        # checkpoint answer the second epoch
        'epochs_resumed': lambda out: after('epochs', lambda: train(
            out, dataset=tiny_ws.fixed, save_teacher_scores=os.path.join(runs_dir(out, 'epochs'), 'store'),
            resume_from_checkpoint=os.path.join(runs_dir(out, 'epochs'), 'checkpoint-2'))),
        # ZeRO-3 (one torchrun rank): the partitioned teacher scores, its top-k kept while training
        'zero3': lambda out: run_swift(base_args(tiny_ws, out, **dict(
            OFF_POLICY, deepspeed='zero3', save_teacher_scores=os.path.join(out, 'store'),
            teacher_scores_dtype='float32', fp16='false', use_cpu='true')), nproc=1,
            env={'NPROC_PER_NODE': '1', 'MASTER_PORT': str(_free_port())}),
        # the score's draws: the sampled forward KL, against the live teacher's full-vocabulary forward KL
        'from_samples': lambda out: after('score', lambda: train(
            out, teacher_scores=runs_dir(out, 'score'), teacher_scores_samples=SAMPLES, beta=0, gkd_logits_topk=None)),
        'live_fkl': lambda out: train(out, beta=0, gkd_logits_topk=None),
        # the score's store with the tail bucket and no --gkd_logits_topk (the store's k), rows encoded with another
        # --loss_scale than the score's (ms-swift's rlhf default last_round): the store covers none of them
        'tail_loss_scale': lambda out: after('score', lambda: train(
            out, teacher_scores=runs_dir(out, 'score'), gkd_logits_topk=None, gkd_topk_tail='true',
            loss_scale='default', max_steps=1)),
        # the live run's 8-row store alone over 8 steps: rows it lacks and no teacher
        'missing': lambda out: after('live', lambda: run_swift(base_args(tiny_ws, out, **dict(
            OFF_POLICY, max_steps=8, teacher_scores=os.path.join(runs_dir(out, 'live'), 'store'), teacher_model=None,
            teacher_model_type=None)), check=False)),
    })

    def after(name, start):
        """``start()`` once the run ``name`` (whose store it reads) has finished."""
        assert shared[name].returncode == 0, shared[name].output[-4000:]
        return start()

    return shared


HUB_TEACHER = 'tiny-org/teacher'  # a hub id, resolved from a hub cache made by hub_cache (the tests run offline)


def hub_cache(root: str, repo: str, model_dir: str) -> dict:
    """A Hugging Face hub cache at ``root`` whose ``repo`` (revision main) holds ``model_dir``'s files, as
    ``huggingface_hub`` lays out a download (a snapshot of links to the files); the environment of a run that finds
    ``repo`` there, offline."""
    snapshot = os.path.join(root, 'models--' + repo.replace('/', '--'), 'snapshots', '0' * 40)
    os.makedirs(snapshot, exist_ok=True)
    for name in os.listdir(model_dir):
        if not os.path.lexists(os.path.join(snapshot, name)):
            os.symlink(os.path.join(os.path.abspath(model_dir), name), os.path.join(snapshot, name))
    os.makedirs(os.path.join(os.path.dirname(os.path.dirname(snapshot)), 'refs'), exist_ok=True)
    with open(os.path.join(os.path.dirname(os.path.dirname(snapshot)), 'refs', 'main'), 'w') as f:
        f.write('0' * 40)
    return {'HF_HUB_CACHE': root}


def mixed_rows(train: str, out: str, rows: int = 24) -> str:
    """``rows`` rows of ``train``'s task whose lengths vary about sixfold (the prompt repeated 1-6 times), in an
    order that mixes the lengths."""
    base = [json.loads(line) for line in open(train) if line.strip()]
    with open(out, 'w') as f:
        for i in range(rows):
            user, answer = (m['content'] for m in base[i]['messages'])
            rep = 1 + (i * 7) % 6
            f.write(json.dumps({'messages': [{'role': 'user', 'content': ' '.join([user] * rep)},
                                             {'role': 'assistant', 'content': f'{answer} {i}'}]}) + '\n')
    return out


def mixed_score(ws, out: str, by_length: str):
    """swift-gkd score of :func:`mixed_rows` (float32, top-8, batch 4) with ``--group_by_length by_length``."""
    data = mixed_rows(ws.train, os.path.join(os.path.dirname(out), f'mixed_{by_length}.jsonl'))
    argv = score_argv(ws, out, per_device_train_batch_size=4, group_by_length=by_length)
    argv[argv.index('--dataset') + 1] = data
    return dataclasses.replace(run_swift(argv), output_dir=out)


def runs_dir(out: str, name: str) -> str:
    """Another shared run's folder (``shared_runs`` puts each key's folder beside the others)."""
    return os.path.join(os.path.dirname(out), name)


def test_score_writes_a_store_that_covers_the_dataset(runs, tiny_ws):
    run = runs['score']
    assert run.returncode == 0, run.output[-4000:]
    store = TeacherStore(run.output_dir)
    with open(tiny_ws.train) as f:
        rows = sum(1 for line in f if line.strip())
    assert len(store) == rows == 64
    assert store.identity.topk == K and store.identity.dtype == 'float32' and store.identity.teacher_hash
    assert store.identity.teacher_adapters_hash == ''  # (issue 96: scored without an adapter, and known to be)
    assert 'swift-gkd score: done' in run.output and f'holds {rows} rows' in run.output
    with open(os.path.join(run.output_dir, 'manifest.json')) as f:
        covered = json.load(f)['covered']
    assert [c['file'] for c in covered] == ['train.jsonl']
    assert covered[0]['encoding']['max_length'] == 128 and covered[0]['encoding']['template'] == 'qwen3_nothinking'
    assert covered[0]['encoding']['loss_scale'] == 'last_round'  # (ms-swift's rlhf default: in the encoding, issue 89)
    # issue 89: shards of the mode the user's umask gives any file, as the manifest (safetensors wrote 0600)
    modes = {oct(os.stat(p).st_mode & 0o777) for p in glob.glob(os.path.join(run.output_dir, 'shards', '*'))}
    assert modes == {oct(os.stat(os.path.join(run.output_dir, 'manifest.json')).st_mode & 0o777)}, modes
    # issue 89: --teacher_model_type names the scored model (it is the run's --model): score_argv passes only it
    argv = score_argv(tiny_ws, run.output_dir)
    assert argv[argv.index('--model_type') + 1] == 'qwen3' and '--teacher_model_type' not in argv


GOLDEN = os.path.join(os.path.dirname(__file__), 'golden', 'score_store_crc32.json')


def cpu_isa() -> str:
    """The CPU's AVX-512 and AMX extensions (``/proc/cpuinfo``): a microarchitecture's float32 kernels may sum in
    another order than another's, so the golden bytes hold where these are the golden file's."""
    try:
        with open('/proc/cpuinfo') as f:
            flags = next(line for line in f if line.startswith('flags')).split(':', 1)[1].split()
    except (OSError, StopIteration):
        return ''
    return ' '.join(sorted(x for x in flags if x.startswith(('avx512', 'amx'))))


def test_the_score_loop_writes_the_bytes_it_wrote_before_issue_90(runs, tiny_ws):
    """Issue 90: swift-gkd score loads its model bare (--tuner_type full), forwards under inference_mode, takes each
    batch's top-k and next-token log-probs in one pass of the head, and encodes the store off the forward's thread;
    its store holds the same keys and payload bytes (crc32) as the loop before those changes wrote for the same rows
    and batches (the tiny rows are of one length: batched by length they are in dataset order). The golden file was
    written by commit 25d495c on torch 2.13's AVX-512 CPU kernels of one microarchitecture; other kernels may round
    otherwise, and are skipped."""
    assert '--tuner_type' in (argv := score_argv(tiny_ws, 'x')) and argv[argv.index('--tuner_type') + 1] == 'full'
    run = runs['score']
    assert run.returncode == 0, run.output[-4000:]
    assert 'tuner_type=full' in run.output and 'padding 0% of the 1280 positions forwarded' in run.output
    with open(GOLDEN) as f:
        golden = json.load(f)
    here = (torch.__version__.split('+')[0], torch.backends.cpu.get_cpu_capability(), cpu_isa())
    if here != (golden['torch'], golden['cpu_capability'], golden['cpu_isa']):
        pytest.skip(f'the golden store was written with torch {golden["torch"]} on {golden["cpu_capability"]} '
                    f'kernels ({golden["cpu_isa"]}); this is torch {here[0]} on {here[1]} ({here[2]})')
    crc = {}
    for path in glob.glob(os.path.join(run.output_dir, 'shards', '*.safetensors')):
        with safe_open(path, 'pt') as h:
            crc.update(zip((k.tobytes().hex() for k in h.get_tensor('keys').numpy()), h.get_tensor('crc32').tolist()))
    assert crc.keys() == golden['crc32'].keys()
    assert [k for k in crc if crc[k] != golden['crc32'][k]] == []


def test_rows_batched_by_length_pad_less_and_keep_their_keys_and_scores(runs):
    """Issue 90: batched by length (swift-gkd score's default) rows of mixed lengths pad less than in dataset order;
    the store holds the same keys, and each row's scores up to float32 rounding (a row's logits depend on its
    batch's padding by ~1e-6, so the bytes may differ)."""
    share = {}
    for name in ('score_in_order', 'score_by_length'):
        run = runs[name]
        assert run.returncode == 0, run.output[-4000:]
        share[name] = re.findall(r'padding (\d+)% of the (\d+) positions forwarded \(rows (batched by length|in '
                                 r'dataset order)\)', run.output)
    (in_order, positions, how), = share['score_in_order']
    (by_length, fewer, how_now), = share['score_by_length']
    assert (how, how_now) == ('in dataset order', 'batched by length')
    assert int(by_length) < int(in_order) / 2 and int(fewer) < int(positions), share
    a, b = TeacherStore(runs['score_in_order'].output_dir), TeacherStore(runs['score_by_length'].output_dir)
    assert sorted(a.keys()) == sorted(b.keys()) and len(a) == 24
    for key in a.keys():
        x, y = a.get(key), b.get(key)
        assert torch.equal(x.ids, y.ids)  # (ids ascending a position: the same top-8 sets)
        torch.testing.assert_close(y.logprobs, x.logprobs, rtol=0, atol=1e-4)
        torch.testing.assert_close(y.token_logprobs, x.token_logprobs, rtol=0, atol=1e-4)


def test_a_store_that_covers_every_row_logs_the_live_teachers_losses_without_loading_it(runs):
    live, stored = runs['live'], runs['from_score']
    assert stored.returncode == 0, stored.output[-4000:]
    assert 'is not loaded' in stored.output and 'no teacher model is loaded' in stored.output
    assert 'Teacher model: none loaded' in stored.output
    assert len(stored.logs) == len(live.logs) == 4
    for a, b in zip(stored.logs, live.logs):
        assert a['loss'] == pytest.approx(b['loss'], rel=1e-6)
        assert a['gkd/teacher_store_rows'] == 1.0
    assert [row['gkd/teacher_store_rows'] for row in live.logs] == [0.0] * 4  # (its own store, being written)


def test_a_store_written_while_training_is_read_by_the_next_run(runs):
    live, again = runs['live'], runs['from_live']
    assert live.returncode == 0 and again.returncode == 0, again.output[-4000:]
    store = TeacherStore(os.path.join(live.output_dir, 'store'))
    assert len(store) == 8 and store.identity.dtype == 'float32'  # 4 steps of 2 rows
    assert 'a row missing from it is scored by the teacher' in again.output
    # the hub id's weights, checked once loaded (the launcher cannot: it downloads no weights)
    assert f'--teacher_model {HUB_TEACHER} has the weights that scored --teacher_scores' in again.output
    for a, b in zip(again.logs, live.logs):
        assert a['gkd/teacher_store_rows'] == 1.0  # the same rows, in the same order: every one found
        assert a['loss'] == pytest.approx(b['loss'], rel=1e-6)


def test_the_sampled_estimator_from_the_stored_draws_estimates_the_live_forward_kl(runs):
    """The store's 64 draws a position (and the teacher's entropy): the loss trained on is the sampled
    cross-entropy (its gradient an unbiased estimate of forward KL's, tested in float64 in tests/core), the logged
    divergence that cross-entropy less the entropy, an estimate of the live teacher's full-vocabulary forward KL."""
    stored, live = runs['from_samples'], runs['live_fkl']
    assert stored.returncode == 0 and live.returncode == 0, stored.output[-4000:]
    assert TeacherStore(runs['score'].output_dir).identity.samples == SAMPLES
    assert 'the sampled cross-entropy over the stored draws' in stored.output
    estimate = sum(r['gkd/distill_loss'] for r in stored.logs) / len(stored.logs)
    exact = sum(r['gkd/distill_loss'] for r in live.logs) / len(live.logs)
    assert estimate == pytest.approx(exact, rel=0.15), (estimate, exact)
    for a in stored.logs:  # the loss is the cross-entropy: KL + the teacher's entropy (~ log V for a random teacher)
        assert a['loss'] > 10 * a['gkd/distill_loss'] and a['gkd/teacher_store_rows'] == 1.0


def test_a_store_written_under_zero3_holds_the_teachers_top_k(runs):
    """Under ZeRO-3 the teacher's head is a shard outside its forward: the rows it scores for the store are read
    with the head gathered (a crash, 'size mismatch ... vec (0)', before), and they are the score run's rows."""
    import torch
    run = runs['zero3']
    assert run.returncode == 0, run.output[-4000:]
    written, scored = TeacherStore(os.path.join(run.output_dir, 'store')), TeacherStore(runs['score'].output_dir)
    assert len(written) == 8 and set(written.keys()) <= set(scored.keys())
    assert written.identity.vocab_size == scored.identity.vocab_size  # (the head's whole size, not its shard's)
    for key in written.keys():
        a, b = written.get(key), scored.get(key)
        same = (a.ids == b.ids).all(-1)  # (ZeRO-3 computes in its own precision: near-ties may swap the k-th id)
        assert same.float().mean() > 0.5
        assert torch.allclose(a.logprobs[same], b.logprobs[same], atol=2e-3)


def test_a_second_epoch_reuses_what_the_first_scored(runs):
    run = runs['epochs']
    assert run.returncode == 0, run.output[-4000:]
    assert [row['gkd/teacher_store_rows'] for row in run.logs] == [0.0, 0.0, 1.0, 1.0]
    resumed = runs['epochs_resumed']  # (read after the first run: both wrote to its store)
    assert resumed.returncode == 0, resumed.output[-4000:]
    assert [row['gkd/teacher_store_rows'] for row in resumed.logs] == [1.0, 1.0]
    assert [row['loss'] for row in resumed.logs] == pytest.approx([row['loss'] for row in run.logs[2:]], rel=1e-6)
    store = TeacherStore(os.path.join(run.output_dir, 'store'))
    assert len(store) == 4
    assert sum(len(s['tokens']) for s in store._shards) == 4  # nothing scored twice


def eval_losses(run):
    with open(glob.glob(os.path.join(run.output_dir, '**', 'logging.jsonl'), recursive=True)[0]) as f:
        return [row['eval_loss'] for row in map(json.loads, f) if 'eval_loss' in row]


def test_two_sequence_parallel_ranks_read_the_store_alone_beside_evaluation(runs):
    """No teacher flag at all, each rank holding half of every row: the store answers every row of the group on
    both ranks (the answers shared as a served teacher's are); evaluation reads the store too, and its losses are the
    one-rank run's."""
    run = runs['two_ranks']
    assert run.returncode == 0, run.output[-4000:]
    assert 'Teacher model: none loaded' in run.output
    assert len(run.logs) == 4 and all(row['gkd/teacher_store_rows'] == 1.0 for row in run.logs)
    one = eval_losses(runs['from_score'])
    assert len(one) == 2 and eval_losses(run) == pytest.approx(one, rel=1e-5)


def test_a_row_missing_without_a_teacher_stops_the_run_naming_it(runs):
    run = runs['missing']
    assert run.returncode == 1, run.output[-3000:]
    line = next(line for line in run.output.splitlines() if 'is not in --teacher_scores' in line)
    assert 'swift rlhf: error: row ' in line and 'this run has no teacher to score it' in line  # (after tqdm's bar)
    assert 'Traceback' not in run.output


def test_the_tail_bucket_takes_the_stores_k_and_another_loss_scale_is_not_covered(runs):
    """Issue 89: ``--gkd_topk_tail true`` with ``--teacher_scores`` and no ``--gkd_logits_topk`` was refused before
    the store's k was taken; and ``covers`` ignored ``--loss_scale``, so a store scored with another loss scale
    dropped the teacher (then a multi-turn row was missing, 'no teacher to score it'). Now the run takes top-8 from the
    store and, the encoding differing, keeps its teacher (these one-turn rows are found all the same)."""
    run = runs['tail_loss_scale']
    assert run.returncode == 0, run.output[-4000:]
    assert 'is not loaded' not in run.output and 'a row missing from it is scored by the teacher' in run.output
    assert len(run.logs) == 1 and run.logs[0]['gkd/teacher_store_rows'] == 1.0
    with open(glob.glob(os.path.join(run.output_dir, '**', 'args.json'), recursive=True)[0]) as f:
        used = json.load(f)
    assert used['gkd_logits_topk'] == K and used['gkd_topk_tail'] and used['loss_scale'] == 'default'


def test_a_row_two_ranks_wrote_counts_its_tokens_once(tmp_path):
    """Issue 89: a filled last batch on two ranks has both write a row; the store (and the score's closing line,
    which reads it) kept both rows' tokens (1,532 against 1,254). The reader keeps one row a key, and counts it once."""
    import torch
    from swift_gkd_plugin.core.scores.store import RowScores, StoreIdentity, StoreWriter
    identity = StoreIdentity(teacher='t', teacher_hash='', tokenizer='x', template='qwen3', topk=2, samples=0,
                             dtype='float32', temperature=1.0, vocab_size=8)
    rows = {f'{i:032x}': RowScores(torch.tensor([[1, 2]] * (i + 3)), torch.full((i + 3, 2), -0.7)) for i in range(3)}
    for rank, keys in enumerate([['0' * 32, f'{1:032x}'], [f'{1:032x}', f'{2:032x}']]):
        writer = StoreWriter(str(tmp_path), identity, rank=rank)
        for key in keys:
            writer.add(key, rows[key])
        writer.flush()
    store = TeacherStore(str(tmp_path))
    assert len(store) == 3 and store.tokens == 3 + 4 + 5


def test_a_killed_score_resumes_keeping_its_finished_shards(tiny_ws, tmp_path):
    """Killed (SIGKILL) once a few rows are written (a shard per row), then run again as ``swift-gkd score`` runs a
    second time (with ``--teacher_scores`` on its own folder): the finished rows are found, not scored again."""
    store = str(tmp_path / 'store')
    killed = run_swift(score_argv(tiny_ws, store, per_device_train_batch_size=1, external_plugins=KILL_AFTER_SHARDS),
                       env={'GKD_TEST_KILL_AFTER_SHARDS': '3'}, check=False, timeout=300)
    assert killed.returncode == -9, killed.output[-3000:]  # SIGKILL, 3 shards (rows) in
    shards = os.path.join(store, 'shards')
    kept = len(TeacherStore(store))
    assert 3 <= kept < 64, kept
    # resumed on two processes (NPROC_PER_NODE=2): each scores its half of the rows into shards of its own
    resumed = run_swift(score_argv(tiny_ws, store, per_device_train_batch_size=1, use_cpu='true'), nproc=2,
                        env={'SWIFT_GKD_STORE_SHARD_BYTES': None})
    assert resumed.returncode == 0, resumed.output[-4000:]
    assert '--teacher_scores' in score_argv(tiny_ws, store)  # the second run reads its own folder
    done = re.findall(r'swift-gkd score: done, rank (\d): (\d+) rows / \d+ tokens scored \(\d+ tokens/s\), (\d+) found',
                      resumed.output)
    assert sorted(rank for rank, _, _ in done) == ['0', '1']
    assert sum(int(found) for _, _, found in done) == kept  # the finished shards' rows, not scored again
    assert sum(int(rows) for _, rows, _ in done) == 64 - kept
    final = TeacherStore(store)
    assert len(final) == 64
    assert {os.path.basename(p)[:5] for p in glob.glob(os.path.join(shards, '*.safetensors'))} == {'r0000', 'r0001'}


@pytest.mark.parametrize('flags, says', [
    (dict(teacher_scores='MISSING'), '--teacher_scores MISSING: MISSING is not a teacher-score store'),
    (dict(teacher_scores='SCORE', gkd_logits_topk=16), '--gkd_logits_topk 16 is larger than --teacher_scores'),
    (dict(teacher_scores='SCORE', lmbda=0.5, teacher_model=None, teacher_model_type=None),
     'sample new tokens, which --teacher_scores cannot hold'),
    (dict(teacher_scores='SCORE', template='chatml'), 'was scored with --template qwen3_nothinking'),
    (dict(teacher_scores='SCORE', model='OTHER', teacher_model=None, teacher_model_type=None),
     'on the token ids of another tokenizer'),
    (dict(teacher_scores='SCORE', teacher_model='STUDENT'), 'was scored by another teacher'),
    (dict(save_teacher_scores='NEW', gkd_logits_topk=None), '--save_teacher_scores keeps the teacher\'s top-k'),
    (dict(save_teacher_scores='NEW', gkd_cross_tokenizer='uld', gkd_logits_topk=None, teacher_model='OTHER'),
     'a store keeps the teacher\'s top-k over'),
    (dict(gkd_score_only='true'), '--gkd_score_only true needs --save_teacher_scores'),
    # issue 90: ms-swift's flag, honoured by swift-gkd score's sampler; GKD training's seeded order would ignore it
    (dict(group_by_length='true'), '--group_by_length true batches rows by length in swift-gkd score'),
    # issue 89: a folder that cannot be written, before loading (a traceback after it, or after the whole training)
    (dict(save_teacher_scores='FILE/store'), '--save_teacher_scores FILE/store: FILE is a file, not a folder'),
    # (sysfs: nothing can be made there, by root either, as in a read-only store or mount; chmod binds no root)
    (dict(save_teacher_scores='/sys/kernel/gkd_store'), '--save_teacher_scores /sys/kernel/gkd_store: /sys/kernel '
     'cannot be written'),
    (dict(teacher_scores='SCORE', teacher_scores_samples=64, beta=0.5), 'an unbiased estimate of the forward KL'),
    (dict(teacher_scores='SCORE', teacher_scores_samples=12, beta=0), 'holds 64 drawn tokens a position'),
])
def test_refused_before_loading(runs, tiny_ws, tmp_path, flags, says):
    assert runs['score'].returncode == 0
    names = {'SCORE': runs['score'].output_dir, 'MISSING': str(tmp_path / 'none'), 'NEW': str(tmp_path / 'new'),
             'OTHER': tiny_ws.other_vocab_teacher, 'STUDENT': tiny_ws.student, 'FILE': str(tmp_path / 'file')}
    if '/sys/kernel' in says and not os.path.isdir('/sys/kernel'):
        pytest.skip('not a Linux /sys')
    (tmp_path / 'file').write_text('')
    flags = {k: re.sub('|'.join(names), lambda m: names[m.group(0)], v) if isinstance(v, str) else v
             for k, v in flags.items()}
    says = re.sub('MISSING|FILE', lambda m: names[m.group(0)], says)
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'out'), **dict(OFF_POLICY, **flags)), check=False)
    assert run.returncode != 0
    assert says in run.output, run.output[-3000:]
    assert 'Traceback' not in run.output and 'model_info' not in run.output  # refused before any model loads


def changed_in_one_middle_tensor(model_dir: str, out: str) -> str:
    """A copy of ``model_dir`` whose one tensor away from the start, middle and end 64 KiB of its weight file (the
    windows the sampled fingerprint read) is scaled by 3: a LoRA merge or a partial fine-tune of one layer."""
    import struct
    from safetensors import safe_open
    from safetensors.torch import save_file
    shutil.copytree(model_dir, out)
    path = os.path.join(out, 'model.safetensors')
    size = os.path.getsize(path)
    with open(path, 'rb') as f:
        header = struct.unpack('<Q', f.read(8))[0]
        layout = json.loads(f.read(header))
    windows = [(0, 1 << 16), (size // 2 - (1 << 15), size // 2 + (1 << 15)), (size - (1 << 16), size)]
    name = next(n for n, t in layout.items() if n != '__metadata__' and 'layers' in n and all(
        8 + header + t['data_offsets'][1] <= a or 8 + header + t['data_offsets'][0] >= b for a, b in windows))
    with safe_open(path, framework='pt') as f:
        tensors = {n: f.get_tensor(n) for n in f.keys()}
        metadata = f.metadata()
    tensors[name] = tensors[name] * 3
    save_file(tensors, path, metadata=metadata)
    assert os.path.getsize(path) == size
    return out


def test_a_teacher_changed_in_one_middle_tensor_is_refused_before_loading_or_once_downloaded(runs, tiny_ws, tmp_path):
    """Issue 89: the fingerprint read three 64 KiB windows of each weight file, so a teacher changed in one middle
    tensor passed as the store's (a covering store then trained on the other teacher's scores, exit 0). Every byte
    is hashed now; a file's hash is cached by its identity, so the second look reads nothing. A hub id was not
    compared at all (no weights before the download): the trainer compares the loaded teacher's folder."""
    from swift_gkd_plugin.core.scores.store import (FULL_HASH, same_weights, sampled_weights_fingerprint,
                                                    weights_fingerprint)
    assert runs['score'].returncode == 0
    changed = changed_in_one_middle_tensor(tiny_ws.teacher, str(tmp_path / 'changed'))
    assert sampled_weights_fingerprint(changed) == sampled_weights_fingerprint(tiny_ws.teacher)  # (what passed)
    stored = TeacherStore(runs['score'].output_dir).identity.teacher_hash
    assert stored.startswith(FULL_HASH) and same_weights(tiny_ws.teacher, stored)
    assert weights_fingerprint(changed) != stored
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'out'), **dict(
        OFF_POLICY, teacher_scores=runs['score'].output_dir, teacher_model=changed)), check=False)
    assert run.returncode == 2, run.output[-3000:]
    assert 'was scored by another teacher' in run.output and f'--teacher_model {changed}' in run.output
    assert 'Traceback' not in run.output and 'model_info' not in run.output
    # the same teacher named by a hub id (the launcher gets its config, not its weights): refused once loaded, before
    # step 1, in one line naming the folder the hub gave
    cache = str(tmp_path / 'hub')
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'out_hub'), **dict(
        OFF_POLICY, teacher_scores=runs['score'].output_dir, teacher_model=HUB_TEACHER)),
        env=hub_cache(cache, HUB_TEACHER, changed), check=False)
    errors = [line for line in run.output.splitlines() if line.startswith('swift rlhf: error: ')]
    assert run.returncode == 1 and len(errors) == 1, run.output[-3000:]
    assert 'was scored by another teacher' in errors[0] and f'than --teacher_model {HUB_TEACHER} (loaded from ' \
        f'{cache}' in errors[0], errors[0]
    assert 'Traceback' not in run.output and not run.logs  # no step ran


def test_a_lora_students_base_as_its_teacher_is_compared_with_the_stores_once_loaded(runs, tiny_ws, tmp_path):
    """``--teacher_model`` the ``--model`` of a LoRA run: the teacher is the student's base, adapter off (ms-swift
    clears ``--teacher_model`` before the checks), so only the trainer can compare it with the store's teacher."""
    assert runs['score'].returncode == 0
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'out'), **dict(
        OFF_POLICY, teacher_scores=runs['score'].output_dir, teacher_model=tiny_ws.student, tuner_type='lora')),
        check=False)
    errors = [line for line in run.output.splitlines() if line.startswith('swift rlhf: error: ')]
    assert run.returncode == 1 and len(errors) == 1, run.output[-3000:]
    assert 'was scored by another teacher' in errors[0] and ("than this run's teacher, the student's base "
                                                             f'{tiny_ws.student}') in errors[0], errors[0]
    assert not run.logs


# ---------------------------------------------------------------- teacher adapters (issue 96 item 5)
#: one step from the first rows, the teacher the student's base plus --teacher_adapters (a LoRA student: one copy of
#: the base), or with --teacher_model the alias of that base (a separate teacher, full student)
ADAPTED = dict(OFF_POLICY, max_steps=1)


@pytest.fixture(scope='module')
def adapter_runs(tiny_ws, adapters, shared_runs):
    """A store scored by the student's base + the adapter ``fit``, then read beside that base + another adapter
    (``student_start``, refused once loaded) and beside the same teacher loaded apart (accepted)."""

    def shared_base(out, adapter, **flags):
        return run_swift(base_args(tiny_ws, out, **dict(ADAPTED, tuner_type='lora', teacher_model=tiny_ws.student,
                                                        teacher_adapters=adapter, **flags)), check=False)

    def store(out):
        return os.path.join(runs_dir(out, 'written'), 'store')

    shared = shared_runs('teacher_store_adapters', {
        'written': lambda out: shared_base(out, adapters['fit'], save_teacher_scores=os.path.join(out, 'store')),
        'other_adapter': lambda out: after('written', lambda: shared_base(out, adapters['student_start'],
                                                                         teacher_scores=store(out))),
        'same_apart': lambda out: after('written', lambda: run_swift(base_args(tiny_ws, out, **dict(
            ADAPTED, teacher_model=adapters['student_alias'], teacher_adapters=adapters['fit'],
            teacher_scores=store(out))), check=False)),
    })

    def after(name, start):
        assert shared[name].returncode == 0, shared[name].output[-4000:]
        return start()

    return shared


def test_a_store_keeps_the_teacher_adapters_fingerprint_and_another_adapter_is_refused(adapter_runs, adapters,
                                                                                       tiny_ws):
    """Issue 96 item 5: a store scored by base + adapter A passed beside base + adapter B (only the base's weights
    were fingerprinted). The manifest keeps the adapter's fingerprint beside the base's; another adapter on the same
    base stops the run before step 1 in one line naming both fingerprints and where each came from."""
    from swift_gkd_plugin.core.scores.store import adapters_fingerprint, weights_fingerprint
    written, other, apart = adapter_runs['written'], adapter_runs['other_adapter'], adapter_runs['same_apart']
    assert written.returncode == 0, written.output[-4000:]
    identity = TeacherStore(os.path.join(written.output_dir, 'store')).identity
    fit = adapters_fingerprint([adapters['fit']])
    assert identity.teacher_hash == weights_fingerprint(tiny_ws.student)
    assert identity.teacher_adapters_hash == fit and fit.startswith('sha256-all:')
    assert adapters_fingerprint([adapters['student_start']]) != fit and adapters_fingerprint([]) == ''
    errors = [line for line in other.output.splitlines() if line.startswith('swift rlhf: error: ')]
    assert other.returncode == 1 and len(errors) == 1, other.output[-3000:]
    assert 'was scored by another teacher' in errors[0] and 'their adapters differ' in errors[0], errors[0]
    assert f"the store's manifest.json: {fit}" in errors[0], errors[0]
    assert adapters_fingerprint([adapters['student_start']]) in errors[0] and adapters['student_start'] in errors[0]
    assert 'Traceback' not in other.output and not other.logs  # no step ran
    # the same teacher loaded apart (the base under another name, the same adapter): its rows are the store's
    assert apart.returncode == 0, apart.output[-4000:]
    assert f'--teacher_model {adapters["student_alias"]} --teacher_adapters {adapters["fit"]} has the weights ' \
        'that scored --teacher_scores' in apart.output
    assert f'adapters {fit}' in apart.output
    assert apart.logs[0]['gkd/teacher_store_rows'] == 1.0


@pytest.mark.parametrize('adapter', ['student_start', None])
def test_a_separate_teacher_with_another_adapter_or_none_is_refused_before_loading(adapter_runs, adapters, tiny_ws,
                                                                                    tmp_path, adapter):
    """A local --teacher_model beside a store scored with an adapter: another --teacher_adapters, or none, is refused
    by the launcher before any model loads (the base's weights alone passed)."""
    from test_activation_and_bad_input import assert_refused_in_one_line
    assert adapter_runs['written'].returncode == 0
    store = os.path.join(adapter_runs['written'].output_dir, 'store')
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'out'), **dict(
        ADAPTED, teacher_model=adapters['student_alias'], teacher_adapters=adapters[adapter] if adapter else None,
        teacher_scores=store)), check=False)
    assert_refused_in_one_line(run, [f'--teacher_scores {store} was scored by another teacher', 'their adapters differ',
                                     f'this run\'s: {"sha256-all:" if adapter else "none"}'])


def test_a_store_written_before_adapters_were_fingerprinted_is_compared_by_its_base(adapter_runs, adapters, tiny_ws,
                                                                                   tmp_path):
    """A store written before issue 96 keeps no adapter fingerprint (its ``teacher_hash`` is the base's whether or not
    an adapter was on): it still loads and is compared by its base alone, the log saying the adapter was not."""
    from swift_gkd_plugin.options.flags import FlagError
    from swift_gkd_plugin.options.teacher_scores import check_store_teacher
    assert adapter_runs['written'].returncode == 0
    old = str(tmp_path / 'old')
    shutil.copytree(os.path.join(adapter_runs['written'].output_dir, 'store'), old)
    with open(os.path.join(old, 'manifest.json')) as f:
        doc = json.load(f)
    del doc['identity']['teacher_adapters_hash']
    with open(os.path.join(old, 'manifest.json'), 'w') as f:
        json.dump(doc, f)
    store = TeacherStore(old)
    assert store.identity.teacher_adapters_hash is None and len(store) == 2
    said = check_store_teacher(old, store.identity, 'the teacher', adapters['student_alias'],
                               adapters=[adapters['student_start']])
    assert 'written before adapters were fingerprinted' in said, said
    with pytest.raises(FlagError, match='their weights differ'):  # (the base is still compared)
        check_store_teacher(old, store.identity, 'the teacher', tiny_ws.teacher)


def test_the_weights_fingerprint_reads_a_file_once_per_identity(tiny_ws, tmp_path, monkeypatch):
    """A file's SHA-256 is kept by its identity (path, size, mtime_ns, inode): read once; a file rewritten in place
    (a new mtime) is read again; an older store's sampled fingerprint is still compared by its own windows."""
    from swift_gkd_plugin.core.scores import store as store_module
    monkeypatch.setenv('SWIFT_GKD_CACHE', str(tmp_path / 'cache'))
    model = str(tmp_path / 'model')
    shutil.copytree(tiny_ws.teacher, model)
    reads = []
    real = store_module.file_sha256
    monkeypatch.setattr(store_module, 'file_sha256', lambda p: reads.append(p) or real(p))
    first = store_module.weights_fingerprint(model)
    assert len(reads) == 2  # config.json and model.safetensors
    assert store_module.weights_fingerprint(model) == first and len(reads) == 2  # cached
    weights = os.path.join(model, 'model.safetensors')
    st = os.stat(weights)
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert store_module.weights_fingerprint(model) == first and len(reads) == 3
    old = store_module.sampled_weights_fingerprint(model)
    assert store_module.same_weights(model, old) and not store_module.same_weights(model, old[:-1] + 'x')


def test_swift_gkd_score_refuses_its_own_flags_in_one_line(tiny_ws, tmp_path, capsys):
    from swift_gkd_plugin.entry.cli import main
    for argv, says in [(['--dataset', tiny_ws.train, '--output_dir', str(tmp_path)], 'pass one teacher'),
                       (['--teacher_model', tiny_ws.teacher, '--dataset', tiny_ws.train, '--output_dir',
                         str(tmp_path), '--lmbda', '1'], '--lmbda is set by swift-gkd score itself'),
                       (['--teacher_model', tiny_ws.teacher, '--dataset', tiny_ws.train, '--output_dir',
                         str(tmp_path), '--teacher_model_type', 'qwen3', '--model_type', 'llama'],
                        'give its --model_type once')]:
        with pytest.raises(SystemExit) as stop:
            main(['score', *argv])
        assert stop.value.code == 2 and says in capsys.readouterr().err
    assert 'OFFLINE' not in says and OFFLINE_ENV  # (the runs above are offline)


def test_offline_on_policy_samples_once_and_trains_from_the_store(trained_ws, tmp_path):
    """``swift-gkd score --sample_with STUDENT --num_samples 2`` (Lightning OPD's offline on-policy distillation): the
    warm student samples each prompt twice, the teacher scores the samples, the finished ones become
    ``samples.jsonl`` beside their scores; a run on that dataset finds every row in the store and loads no teacher."""
    store, prompts = str(tmp_path / 'opd'), str(tmp_path / 'prompts.jsonl')
    with open(trained_ws['train']) as f, open(prompts, 'w') as out:  # 5 prompts: a generation batch (8) not filled
        asked = [json.loads(line) for line in f][:5]
        out.writelines(json.dumps(row) + '\n' for row in asked)
    parser = argparse.ArgumentParser()
    score_cli.add_arguments(parser)
    args, rest = parser.parse_known_args(
        ['--sample_with', trained_ws['student'], '--num_samples', '2', '--teacher_model', trained_ws['teacher'],
         '--dataset', prompts, '--output_dir', store, '--gkd_logits_topk', str(K),
         '--model_type', 'qwen3', '--teacher_model_type', 'qwen3', '--template', 'qwen3_nothinking',
         '--max_length', '128', '--max_completion_length', '16', '--torch_dtype', 'float32', '--check_model', 'false',
         '--dataloader_num_workers', '0', '--dataset_num_proc', '1', '--add_version', 'false'])
    sampled = run_swift(score_cli.score_command(args, rest)[1:])
    assert sampled.returncode == 0, sampled.output[-4000:]
    with open(os.path.join(store, 'samples.jsonl')) as f:
        rows = [json.loads(line) for line in f]
    assert 12 <= len(rows) <= 16 and all(r['messages'][-1]['role'] == 'assistant' for r in rows)  # (cut ones out)
    assert len(TeacherStore(store)) == 16  # every sample scored, the cut ones too
    # issue 89: the last incomplete batch of prompts is filled up with the first ones, not dropped (5 prompts of a
    # batch of 8 gave no sample): each prompt sampled, the first 3 twice as often
    def user(row):
        return next(m['content'] for m in row['messages'] if m['role'] == 'user')
    assert {user(r) for r in rows} == {user(r) for r in asked}
    train = run_swift(['--rlhf_type', 'gkd', '--model', trained_ws['student'], '--model_type', 'qwen3',
                       '--teacher_model', trained_ws['teacher'], '--teacher_model_type', 'qwen3',
                       '--template', 'qwen3_nothinking', '--dataset', os.path.join(store, 'samples.jsonl'),
                       '--teacher_scores', store, '--tuner_type', 'full', '--torch_dtype', 'float32',
                       '--check_model', 'false', '--max_steps', '3', '--per_device_train_batch_size', '4',
                       '--max_length', '128', '--logging_steps', '1', '--save_strategy', 'no', '--report_to', 'none',
                       '--dataloader_num_workers', '0', '--dataset_num_proc', '1', '--lmbda', '0',
                       '--gkd_logits_topk', str(K), '--output_dir', str(tmp_path / 'train'), '--add_version', 'false'])
    assert 'is not loaded' in train.output
    assert len(train.logs) == 3 and all(row['gkd/teacher_store_rows'] == 1.0 for row in train.logs)


# ---------------------------------------------------------------- multimodal rows (tiny LLaVA, an image a row)
@pytest.fixture(scope='module')
def mm_runs(mm, shared_runs):
    """``swift-gkd score`` of the 8 image rows by the multimodal teacher, then one lr-0 step over them from the store
    (no teacher loaded) and one from the live teacher."""
    from test_multimodal import mm_args
    flags = dict(lmbda=0, seq_kd='false', learning_rate=0, max_steps=1, gkd_logits_topk=K, temperature=1.0)

    def scored(out):
        parser = argparse.ArgumentParser()
        score_cli.add_arguments(parser)
        args, rest = parser.parse_known_args(
            ['--teacher_model', mm.teacher, '--dataset', mm.train, '--output_dir', out, '--gkd_logits_topk', str(K),
             '--teacher_scores_dtype', 'float32', '--model_type', tmm.MODEL_TYPE, '--template', tmm.TEMPLATE,
             '--max_length', '128', '--torch_dtype', 'float32', '--check_model', 'false',
             '--dataloader_num_workers', '0', '--dataset_num_proc', '1', '--add_version', 'false'])
        return dataclasses.replace(run_swift(score_cli.score_command(args, rest)[1:]), output_dir=out)

    shared = shared_runs('teacher_store_mm', {
        'score': scored,
        'live': lambda out: run_swift(mm_args(mm, out, **flags)),
        'from_store': lambda out: run_swift(mm_args(mm, out, teacher_scores=runs_dir(out, 'score'), **flags))
        if shared['score'].returncode == 0 else shared['score'],
    })
    return shared


def test_image_rows_of_the_same_text_are_stored_apart_and_read_back_as_the_live_teacher(mm_runs, mm):
    """The 8 rows share their question and repeat answers: their token ids repeat, their images do not. Each is its
    own row in the store (its key holds its image's bytes), and a step over them from the store alone logs the live
    teacher's loss: with text-only keys one image's scores would answer another's row."""
    score, live, stored = mm_runs['score'], mm_runs['live'], mm_runs['from_store']
    assert score.returncode == 0, score.output[-4000:]
    rows = tmm.read_dataset(mm.train)
    texts = [json.dumps(r['messages']) for r in rows]
    assert len(set(texts)) < len(rows) == len({r['images'][0] for r in rows}) == 8  # (what the test tells apart)
    store = TeacherStore(score.output_dir)
    assert len(store) == 8 and store.identity.processor  # (the processor's settings named in the manifest)
    # 8 rows, a generation batch of 16 (8 a step x ms-swift's default 2 steps): filled up, not dropped (refused before)
    done = [line for line in score.output.splitlines() if 'swift-gkd score: done' in line]
    assert len(done) == 1 and '8 rows / ' in done[0] and '(8 rows repeated to fill the last batch)' in done[0], done
    assert stored.returncode == 0 and live.returncode == 0, stored.output[-4000:]
    assert 'is not loaded' in stored.output and 'Teacher model: none loaded' in stored.output
    assert stored.logs[0]['gkd/teacher_store_rows'] == 1.0
    assert stored.logs[0]['loss'] == pytest.approx(live.logs[0]['loss'], rel=1e-6)


def test_a_store_of_other_processor_settings_is_refused_before_loading(mm_runs, mm, tmp_path):
    """The student's image processor resizes otherwise than the scoring model's: its rows would be other inputs."""
    from test_multimodal import mm_args
    assert mm_runs['score'].returncode == 0
    student = tmp_path / 'student'
    shutil.copytree(mm.student, student, symlinks=True)
    config = student / 'processor_config.json'  # (transformers 5: the image processor's settings inside)
    doc = json.loads(config.read_text())
    doc['image_processor']['image_mean'] = [0.5, 0.5, 0.5]
    config.write_text(json.dumps(doc))
    run = run_swift(mm_args(mm, str(tmp_path / 'out'), model=str(student), teacher_scores=mm_runs['score'].output_dir,
                            lmbda=0, gkd_logits_topk=K, teacher_model=None, teacher_model_type=None), check=False)
    assert run.returncode == 2, run.output[-3000:]
    assert 'was scored with other processor settings than --model' in run.output
    assert 'Traceback' not in run.output and 'model_info' not in run.output
