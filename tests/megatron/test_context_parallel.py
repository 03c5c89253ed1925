"""Context parallelism (``--context_parallel_size 2``) in ``megatron rlhf --rlhf_type gkd``.

The plugin's CP code on real megatron-core process groups: gloo processes run
``parallel_state.initialize_model_parallel`` (CP = 2, and TP = 2 x CP = 2 on 4 ranks), split a float64 micro-batch
as Megatron-SWIFT does (``get_batch_on_this_cp_rank`` for the labels, mcore-bridge's ``split_cp_inputs`` for the
logits a CP rank's student and teacher forwards return: rank r holds chunks r and 2CP-1-r of 2CP), run the plugin
trainer's ``loss_func`` on the shards and normalise as megatron-core's ``finalize_model_grads`` does (token counts
summed over the data- and context-parallel group): the logged loss and every rank's gradient equal the unsplit
one-process computation; a teacher split another way, or a per-rank normaliser, are shown to fail it. Sampling's
last-position logits, and a teacher view cut apart from the student's. Then whole ``megatron rlhf`` runs at CP = 2
against CP = 1 on the CPU harness, whose attention on gathered Q/K/V stands in for transformer-engine's ring
attention (megatron-core's local attention refuses CP)."""
import datetime
import json
import os
import types

import pytest
import torch
import torch.distributed as dist

from megatron_runs import (MIXED, fixed_rows, megatron_args, run_megatron, shared_megatron_runs, spawn_ranks,
                          train_rows)
from test_shard_loss import jsd64

CP_TOKENS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'cp_tokens_plugin.py')

VOCAB, PADDED, SEQ, K, T = 37, 40, 16, 6, 0.8


def make_batch(seed=0):
    """Two rows of 16 positions (divisible by 2CP), responses across chunk boundaries, junk in the padded rows."""
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(2, SEQ, PADDED, generator=g, dtype=torch.float64) * 3
    teacher = torch.randn(2, SEQ, PADDED, generator=g, dtype=torch.float64) * 3
    student[..., VOCAB:] = teacher[..., VOCAB:] = 50.0
    labels = torch.full((2, SEQ), -100)
    labels[0, 3:14] = 1  # 11 response positions over all four chunks
    labels[1, 9:12] = 2  # 3, in chunk 2 only: with CP = 2, rank 0 holds 3 positions and rank 1 holds 11
    return student, teacher, labels


def reference(topk):
    """The one-process loss (a per-token mean) and its gradient on the whole student logits."""
    student, teacher, labels = make_batch()
    student = student.clone().requires_grad_(True)
    mask = labels != -100
    s, t = student[mask][:, :VOCAB], teacher[mask][:, :VOCAB]
    if topk:
        from swift_gkd_plugin.core.tensor_parallel import vocab_parallel_topk_jsd
        lp, ids = torch.log_softmax(t / 1.0, -1).topk(K, -1)
        per_token = vocab_parallel_topk_jsd(s, 0, ids, lp, 0.5, T, None, vocab_size=VOCAB)
    else:
        per_token = jsd64(s, t, 0.5, T)
    loss = per_token.mean()
    loss.backward()
    return loss.detach(), student.grad


def _trainer():
    """The plugin's Megatron trainer, for its ``loss_func`` only (what it reads of ``self``)."""
    from swift_gkd_plugin.core import Divergence
    from swift_gkd_plugin.megatron.trainer import GKDPluginMegatronTrainer
    trainer = object.__new__(GKDPluginMegatronTrainer)
    trainer.args = types.SimpleNamespace(temperature=T, gkd_topk_tail=False)
    trainer._real_vocab, trainer._divergence, trainer.sft_alpha = VOCAB, Divergence('jsd', beta=0.5), 0
    trainer._step, trainer.steps_per_generation = 2, 2  # no completions flush
    return trainer


def _worker(rank, world, tp, cp, init_file, out_dir):
    torch.set_num_threads(1)
    from harness import megatron_cpu
    megatron_cpu.install()  # Megatron-SWIFT's modules import on CPU (test-only; the loss code is the plugin's)
    references = {topk: reference(topk) for topk in (False, True)}  # before the groups: one process's computation
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        from mcore_bridge import split_cp_inputs
        from megatron.core import parallel_state as mpu
        from swift.megatron.utils import get_batch_on_this_cp_rank
        from swift.rlhf_trainers.gkd_loss import DataSource, TeacherOutput
        from swift_gkd_plugin.megatron.step.loss import teacher_topk_logprobs
        mpu.initialize_model_parallel(tensor_model_parallel_size=tp, context_parallel_size=cp)
        assert mpu.get_context_parallel_world_size() == cp and mpu.get_tensor_model_parallel_world_size() == tp
        trainer = _trainer()
        tp_group, width = mpu.get_tensor_model_parallel_group(), PADDED // tp
        vocab = slice(mpu.get_tensor_model_parallel_rank() * width, (mpu.get_tensor_model_parallel_rank() + 1) * width)
        dp_cp = mpu.get_data_parallel_group(with_context_parallel=True)
        student, teacher, labels = make_batch()
        swift_args = types.SimpleNamespace(is_multimodal=False, task_type='causal_lm', cp_partition_mode='zigzag')
        local_labels = get_batch_on_this_cp_rank(swift_args, {'labels': labels.clone()})['labels']

        def step(teacher_rows, topk):
            """This rank's loss_func, then megatron-core's normaliser: (logged loss, grad of this rank's shard)."""
            shard = split_cp_inputs(student, None, 1)[..., vocab].clone().requires_grad_(True)
            t = teacher_rows[..., vocab]
            if topk:
                lp, ids = teacher_topk_logprobs(t, K, vocab.start, VOCAB, tp_group)
                out = TeacherOutput(topk_logprobs=lp, topk_indices=ids)
            else:
                out = TeacherOutput(full_logits=t)
            out.labels = local_labels
            loss, count, metric = trainer.loss_func(shard, labels=local_labels, teacher_output=out,
                                                    data_source=DataSource.DATASET)
            total = count.clone()
            dist.all_reduce(total, group=dp_cp)  # finalize_model_grads.py ~493
            (loss / total).backward()
            return (metric['loss'][0] / metric['loss'][1]).item(), shard.grad, int(count), int(total)

        results = {}
        for topk in (False, True):
            ref_loss, ref_grad = references[topk]
            ref_shard = split_cp_inputs(ref_grad, None, 1)[..., vocab]
            logged, grad, count, total = step(split_cp_inputs(teacher, None, 1), topk)
            results[topk] = dict(loss=(logged, ref_loss.item()), grad=(grad - ref_shard).abs().max().item(),
                                 count=count, total=total)
            if not topk:
                # shown to fail: a teacher split contiguously (not as the student), a per-rank normaliser
                contiguous, _, _, _ = step(split_cp_inputs(teacher, None, 1, cp_partition_mode='contiguous'), False)
                results['contiguous_teacher_loss'] = contiguous
                results['per_rank_normaliser_grad'] = (grad * total / count - ref_shard).abs().max().item()
        torch.save(results, os.path.join(out_dir, f'rank{rank}.pt'))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize('tp,cp', [(1, 2), (2, 2)], ids=['cp2', 'tp2_cp2'])
def test_loss_and_gradient_under_context_parallel_equal_one_process(tmp_path, tp, cp):
    world = tp * cp
    spawn_ranks(_worker, (world, tp, cp, str(tmp_path / 'init'), str(tmp_path)), world)
    results = [torch.load(tmp_path / f'rank{r}.pt') for r in range(world)]
    for rank, res in enumerate(results):
        for topk in (False, True):
            logged, ref = res[topk]['loss']
            assert logged == pytest.approx(ref, rel=1e-6), (rank, topk, logged, ref)  # logged in float32
            assert res[topk]['grad'] < 1e-12, (rank, topk, res[topk]['grad'])
            assert res[topk]['total'] == 14, res[topk]  # all response positions, counted once
        # the checks above catch a wrong split or normaliser
        assert abs(res['contiguous_teacher_loss'] - results[0][False]['loss'][1]) > 1e-4, res
        assert res['per_rank_normaliser_grad'] > 1e-4, res  # vs < 1e-12 above
    assert sorted({r[False]['count'] for r in results}) == [3, 11]  # zigzag: rank 0 holds chunks 0, 3; rank 1: 1, 2


def _join_cp_group(rank, world, init_file, **parallel):
    """This process as rank ``rank`` of a gloo world with megatron-core's groups (``parallel``: its sizes; default
    context parallel over the whole world). Megatron-SWIFT's modules import on CPU through the test-only layer."""
    torch.set_num_threads(1)
    from harness import megatron_cpu
    megatron_cpu.install()
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    from megatron.core import parallel_state as mpu
    mpu.initialize_model_parallel(**(parallel or {'context_parallel_size': world}))


# ------------------------------------------------------------------------------------------ sampling's last logits
def _sampling_worker(rank, world, init_file, out_dir):
    """Sampling's next-token logits under CP = 2: each rank holds its chunks of the forward's logits, as a CP rank's
    forward returns them; ``last_logits_cp`` must give every rank the unsplit batch's last positions."""
    _join_cp_group(rank, world, init_file)
    try:
        from mcore_bridge import split_cp_inputs
        from megatron.core import parallel_state as mpu
        from swift_gkd_plugin.megatron.rollout.samples import last_logits, last_logits_cp
        logits = torch.randn(3, SEQ, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        rows = [(0, 15), (1, 4), (2, 11)]  # right-padded rows: each sequence's last token, in 3 different chunks
        packed = torch.randn(1, 24, 5, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
        cu_seqlens = torch.tensor([0, 8, 12, 24])  # a packed row: sequences padded to multiples of 2 CP
        ends = [(0, 6), (0, 11), (0, 20)]
        group = mpu.get_context_parallel_group()
        got = {'rows': (last_logits_cp(split_cp_inputs(logits, None, 1), rows, None, group), last_logits(logits, rows)),
               'packed': (last_logits_cp(split_cp_inputs(packed, cu_seqlens, 1), ends, cu_seqlens.tolist(), group),
                          last_logits(packed, ends))}
        torch.save({k: (a - b).abs().max().item() for k, (a, b) in got.items()}, os.path.join(out_dir, f'{rank}.pt'))
    finally:
        dist.destroy_process_group()


def test_sampling_last_logits_under_context_parallel(tmp_path):
    spawn_ranks(_sampling_worker, (2, str(tmp_path / 'init'), str(tmp_path)), 2)
    for rank in range(2):
        assert torch.load(tmp_path / f'{rank}.pt') == {'rows': 0.0, 'packed': 0.0}, rank


# ------------------------------------------------------------------------------------ megatron rlhf, CP = 2 vs CP = 1
CPU_ONLY = pytest.mark.skipif(torch.cuda.is_available(), reason='the CPU harness does nothing where CUDA is present: '
                              'tests/gpu/run_megatron_gkd.sh compares CP = 2 with CP = 1 there')


def _completions(run):
    with open(os.path.join(run.output_dir, 'completions.jsonl')) as f:
        return [row['completion'] for row in map(json.loads, f)]


def _same_run(one, two, keys=('loss', 'grad_norm')):
    rows1, rows2 = train_rows(one), train_rows(two)
    assert len(rows1) == len(rows2) > 0
    for a, b in zip(rows1, rows2):
        for key in keys:
            assert b[key] == pytest.approx(a[key], rel=1e-5), (key, a, b)
        assert b['loss'] > 0


@pytest.fixture(scope='module')
def baselines(tiny_ws, shared_runs):
    """The CP = 1 runs: the session's shared one-rank ``fixed_rows`` and ``mixed`` (megatron_runs.py)."""
    return shared_megatron_runs(tiny_ws, shared_runs)


@CPU_ONLY
def test_megatron_rlhf_context_parallel_2_trains_as_1(tiny_ws, tmp_path, baselines):
    """The whole ``megatron rlhf`` at CP = 2 (2 ranks; the harness's attention on gathered Q/K/V stands in for TE's
    ring attention) logs the loss and gradient norm of CP = 1 on the same 4 rows, at each of 3 steps. Each rank holds
    half of every micro-batch: the trainer's batches are split in two (``tests/megatron/cp_tokens_plugin.py``), and
    every decoder-layer forward reads half of a batch's positions, never a whole one."""
    log = tmp_path / 'cp_tokens.jsonl'
    two = run_megatron(megatron_args(tiny_ws, str(tmp_path / 'cp2'), context_parallel_size=2,
                                     external_plugins=CP_TOKENS, **fixed_rows(tiny_ws)),
                       nproc=2, env={'GKD_TEST_CP_LOG': str(log)})
    _same_run(baselines['fixed_rows'], two)
    records = [json.loads(line) for line in open(log)]
    for rank in (0, 1):
        batches = [r for r in records if r['rank'] == rank and 'batch' in r]
        layers = {r['layer'] for r in records if r['rank'] == rank and 'layer' in r}
        assert batches and all(2 * r['local'] == r['batch'] for r in batches), batches
        assert layers and layers <= {r['local'] for r in batches}, (layers, batches)


@CPU_ONLY
def test_megatron_rlhf_context_parallel_2_samples_as_1(tiny_ws, tmp_path, baselines):
    """On-policy steps sampled by the student and seq_kd sampled by the teacher, both from the Megatron model, at
    CP = 2: the same completions, losses and gradient norms as CP = 1 (refused before: the last position's logits
    are on the rank holding it). The flags of the shared ``mixed`` run: the teacher offloaded, a save at step 2."""
    two = run_megatron(megatron_args(tiny_ws, str(tmp_path / 'cp2'), context_parallel_size=2, **MIXED), nproc=2)
    one = baselines['mixed']  # on_policy, then seq_kd
    assert [r['gkd/mode_on_policy'] for r in train_rows(two)] == [1.0, 0.0]
    _same_run(one, two)
    assert _completions(two) == _completions(one)


# ------------------------------------------------------------------------------- a teacher view of its own under CP
def _view_worker(rank, world, init_file, out_dir):
    """A teacher prompt 4 tokens longer (a ``teacher_prompt`` row): split at its own length, its response rows are
    not on the student's ranks."""
    _join_cp_group(rank, world, init_file)
    try:
        from mcore_bridge import split_cp_inputs
        from swift.rlhf_trainers.gkd_loss import DataSource, TeacherOutput
        from swift_gkd_plugin.megatron.step.loss import gkd_loss_on_shards
        student, teacher, labels = make_batch()
        teacher = torch.cat([teacher[:, :4], teacher], 1)  # [2, 20]: the same response positions, 4 later
        teacher_labels = torch.cat([torch.full((2, 4), -100), labels], 1)
        local = [split_cp_inputs(x, None, 1) for x in (student, teacher, labels, teacher_labels)]
        found = {}
        try:  # without the check: the response rows of other positions are paired, or the counts differ
            found['unchecked'] = gkd_loss_on_shards(local[0], local[2], divergence=0.5, temperature=T, vocab_start=0,
                                                    vocab_size=VOCAB, teacher_shard=local[1],
                                                    teacher_labels=local[3])[0].item()
        except ValueError as exc:
            found['unchecked'] = str(exc)
        try:
            _trainer().loss_func(local[0].clone().requires_grad_(True), labels=local[2],
                                 teacher_output=TeacherOutput(full_logits=local[1], labels=local[3]),
                                 data_source=DataSource.DATASET)
            found['checked'] = 'no error'
        except ValueError as exc:
            found['checked'] = str(exc)
        torch.save(found, os.path.join(out_dir, f'{rank}.pt'))
    finally:
        dist.destroy_process_group()


def test_a_teacher_view_of_its_own_is_refused_under_context_parallel(tmp_path):
    spawn_ranks(_view_worker, (2, str(tmp_path / 'init'), str(tmp_path)), 2)
    found = [torch.load(tmp_path / f'{rank}.pt') for rank in range(2)]
    print(found)
    assert any('different numbers of response tokens' in str(f['unchecked']) for f in found)  # what it was
    for f in found:  # every rank alike, naming the flag and the rows
        assert f['checked'].startswith('a teacher view with a prompt of its own (a teacher_prompt or '
                                       'teacher_messages row) is not supported with --context_parallel_size > 1'), f


def test_a_teacher_view_of_its_own_with_context_parallel_is_refused_in_the_launcher(tiny_ws, tmp_path):
    from test_hardening_megatron import assert_refused, launch
    privileged = tmp_path / 'privileged.jsonl'
    privileged.write_text('{"messages": [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"}]}\n'
                          '{"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}], '
                          '"teacher_prompt": "2+2? The answer is 4."}\n')
    from test_hardening_megatron import STOP_RANKS
    code, output = launch('--model', tiny_ws.student, '--dataset', str(privileged), '--teacher_model', tiny_ws.teacher,
                          '--lmbda', '0', '--context_parallel_size', '2', env=dict(STOP_RANKS, NPROC_PER_NODE='2'))
    assert_refused(code, output, f'--context_parallel_size 2 with a teacher view of its own ({privileged} line 2 has a '
                   'teacher_prompt or teacher_messages) is not supported in megatron rlhf: context parallelism cuts')
