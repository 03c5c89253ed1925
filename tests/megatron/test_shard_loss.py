"""The Megatron trainer's loss on logit shards (``swift_gkd_plugin.megatron.step.loss``) in real gloo processes with
TP = 2 and 4: equal, values and gradients, to the single-process float64 loss on the unpadded vocabulary, with
Megatron's padded vocabulary rows holding junk, response masks, a teacher view with its own positions, top-k
teachers taken from true log-probabilities of [B, S, V/tp] micro-batch shards (as the trainer passes them), with and
without the tail bucket, and a served teacher's top-k holding ids the student does not have."""
import datetime
import os
import weakref

import pytest
import torch
import torch.distributed as dist
from megatron_runs import spawn_ranks

from swift_gkd_plugin.core.row_divergence import Divergence
from swift_gkd_plugin.core.tensor_parallel import vocab_parallel_topk_jsd
from swift_gkd_plugin.megatron.step.loss import (entropies_on_shards, gkd_loss_on_shards, teacher_topk_logprobs,
                                            teacher_topk_per_micro_batch)

VOCAB, PADDED, K = 37, 40, 6
CASES = [(0.0, 1.0), (0.5, 0.7), (1.0, 2.0)]


def make_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(2, 7, PADDED, generator=g, dtype=torch.float64) * 3
    teacher = torch.randn(2, 9, PADDED, generator=g, dtype=torch.float64) * 3
    student[..., VOCAB:] = 50.0  # junk in the padded rows: it must not count
    teacher[..., VOCAB:] = 50.0
    labels = torch.full((2, 7), -100)
    labels[0, 2:6] = 1
    labels[1, 4:7] = 1  # 7 response positions
    teacher_labels = torch.full((2, 9), -100)
    teacher_labels[0, 4:8] = 1  # the teacher's prompt is 2 tokens longer: same responses, other positions
    teacher_labels[1, 6:9] = 1
    return student, teacher, labels, teacher_labels


def jsd64(student, teacher, beta, temperature):
    """The generalized JSD, written out in float64 (0: KL(teacher || student), 1: KL(student || teacher))."""
    s, t = torch.log_softmax(student / temperature, -1), torch.log_softmax(teacher / temperature, -1)
    if beta == 0:
        return (t.exp() * (t - s)).sum(-1)
    if beta == 1:
        return (s.exp() * (s - t)).sum(-1)
    m = torch.logsumexp(torch.stack([t + torch.log(torch.tensor(beta, dtype=t.dtype)),
                                     s + torch.log(torch.tensor(1 - beta, dtype=s.dtype))]), 0)
    return beta * (t.exp() * (t - m)).sum(-1) + (1 - beta) * (s.exp() * (s - m)).sum(-1)


def reference(beta, temperature, topk, tail):
    student, teacher, labels, teacher_labels = make_batch()
    student = student.clone().requires_grad_(True)
    s = student[labels != -100][:, :VOCAB]
    t = teacher[teacher_labels != -100][:, :VOCAB]
    if topk:
        lp, ids = torch.log_softmax(t, -1).topk(K, -1)
        per_token = vocab_parallel_topk_jsd(s, 0, ids, lp, beta, temperature, None, tail=tail, vocab_size=VOCAB)
    else:
        per_token = jsd64(s, t, beta, temperature)
    per_token.sum().backward()
    return per_token.sum().detach(), student.grad


def micro_batch_logits(seed):
    """A teacher's [B, S, V_padded] logits for one micro-batch, junk in the padded rows."""
    logits = torch.randn(2, 5, PADDED, generator=torch.Generator().manual_seed(100 + seed), dtype=torch.float64) * 3
    logits[..., VOCAB:] = 50.0
    return logits


def teacher_loop(world_slice):
    """The trainer's local teacher loop over 3 micro-batches, its forward returning this rank's [B, S, V/tp] shard;
    every forward checks that no earlier micro-batch's full logits are still alive."""
    alive = []

    def forward(seed):
        assert all(ref() is None for ref in alive), "an earlier micro-batch's full teacher logits are still held"
        shard = micro_batch_logits(seed)[..., world_slice].clone()
        alive.append(weakref.ref(shard))
        return shard, f'labels{seed}'

    return [(signal, labels) for signal, labels in teacher_topk_per_micro_batch([0, 1, 2], forward, K, VOCAB)]


def server_topk():
    """A teacher server's top-k ``[B, S', k]``: ids from a larger vocabulary (a padded row of the student, and one
    beyond its padded vocabulary) among real ones, log-probabilities of a bigger softmax."""
    _, teacher, _, _ = make_batch()
    lp, ids = torch.log_softmax(torch.cat([teacher[..., :VOCAB], teacher[..., :12] - 1], -1), -1).topk(K, -1)
    ids = ids.clone()
    ids[..., 1] = VOCAB + 1  # a padded row of the student's output layer
    ids[..., 3] = PADDED + 5  # beyond the student's padded vocabulary: no rank owns it
    return ids, lp


def server_reference(tail):
    """The loss with the foreign ids dropped: their mass is outside the student's support, as in swift rlhf."""
    student, _, labels, teacher_labels = make_batch()
    student = student.clone().requires_grad_(True)
    ids, lp = server_topk()
    ids, lp = ids[teacher_labels != -100], lp[teacher_labels != -100]
    foreign = ids >= VOCAB
    per_token = vocab_parallel_topk_jsd(student[labels != -100][:, :VOCAB], 0, ids.masked_fill(foreign, 0),
                                        lp.masked_fill(foreign, float('-inf')), 0.5, 1.0, None, tail=tail,
                                        vocab_size=VOCAB)
    per_token.sum().backward()
    return per_token.sum().detach(), student.grad


def _worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        student, teacher, labels, teacher_labels = make_batch()
        width = PADDED // world
        start = rank * width
        sl = slice(start, start + width)
        results = {}
        for beta, temperature in CASES:
            for topk, tail in [(False, False), (True, False), (True, True)]:
                shard = student[..., sl].clone().requires_grad_(True)
                kwargs = dict(divergence=beta, temperature=temperature, vocab_start=start, vocab_size=VOCAB,
                              teacher_labels=teacher_labels, tail=tail, chunk_size=3)
                if topk:  # [B, S, V/tp] as Megatron's forward returns them, as the trainer passes them
                    lp, ids = teacher_topk_logprobs(teacher[..., sl], K, start, VOCAB, None, chunk_size=4)
                    kwargs.update(teacher_topk_ids=ids, teacher_topk_logprobs=lp)
                else:
                    kwargs.update(teacher_shard=teacher[..., sl])
                total, _, n = gkd_loss_on_shards(shard, labels, **kwargs)
                total.backward()
                results[(beta, temperature, topk, tail)] = (total.detach(), shard.grad, n)
        for topk, tail in [(False, False), (True, False), (True, True)]:  # gkd/entropy, gkd/teacher_entropy
            kwargs = dict(temperature=1.3, vocab_start=start, vocab_size=VOCAB, teacher_labels=teacher_labels,
                          tail=tail, chunk_size=3)
            if topk:
                lp, ids = teacher_topk_logprobs(teacher[..., sl], K, start, VOCAB, None, chunk_size=4)
                kwargs.update(teacher_topk_ids=ids, teacher_topk_logprobs=lp)
            else:
                kwargs.update(teacher_shard=teacher[..., sl])
            results[('entropy', topk, tail)] = entropies_on_shards(student[..., sl], labels, **kwargs)
            gate = Divergence('jsd', beta=0.5, fkl_above_entropy=gate_threshold(topk, tail))
            results[('gated', topk, tail)] = entropies_on_shards(student[..., sl], labels, divergence=gate, **kwargs)
        results['teacher_loop'] = teacher_loop(sl)
        for tail in (False, True):  # a served teacher's top-k with ids the student does not have
            shard = student[..., sl].clone().requires_grad_(True)
            ids, lp = server_topk()
            total, _, _ = gkd_loss_on_shards(shard, labels, divergence=0.5, temperature=1.0, vocab_start=start,
                                             vocab_size=VOCAB, teacher_topk_ids=ids, teacher_topk_logprobs=lp,
                                             teacher_labels=teacher_labels, tail=tail)
            total.backward()
            results[('server', tail)] = (total.detach(), shard.grad)
        torch.save(results, os.path.join(out_dir, f'rank{rank}.pt'))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope='module', params=[2, 4], ids=['tp2', 'tp4'])
def ranks(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f'shard_loss_tp{request.param}')
    spawn_ranks(_worker, (request.param, str(root / 'init'), str(root)), request.param)
    return [torch.load(root / f'rank{r}.pt') for r in range(request.param)]


@pytest.mark.parametrize('beta,temperature', CASES)
@pytest.mark.parametrize('topk,tail', [(False, False), (True, False), (True, True)], ids=['full', 'topk', 'tail'])
def test_tensor_parallel_loss_equals_the_dense_loss(ranks, beta, temperature, topk, tail):
    ref_total, ref_grad = reference(beta, temperature, topk, tail)
    results = [r[(beta, temperature, topk, tail)] for r in ranks]
    for total, _, n in results:  # replicated on every rank
        assert n == 7
        assert torch.allclose(total, ref_total, rtol=1e-10, atol=1e-12), (total, ref_total)
    grad = torch.cat([g for _, g, _ in results], -1)
    assert torch.allclose(grad, ref_grad, rtol=1e-9, atol=1e-12)
    assert grad[..., VOCAB:].abs().max() == 0  # padded rows: no probability, no gradient
    assert ref_total > 0


def test_the_teacher_view_must_score_as_many_tokens():
    student, teacher, labels, teacher_labels = make_batch()
    teacher_labels[1, 8] = -100
    n = int((labels[1] != -100).sum())  # (issue 74 item 9: the row and both its counts are named)
    with pytest.raises(ValueError, match=rf'different numbers of response tokens \(\d+ vs \d+; row 1 of the '
                       rf'micro-batch: the teacher view {n - 1}, the student view {n}\)'):
        gkd_loss_on_shards(student, labels, divergence=0.5, temperature=1.0, vocab_start=0, vocab_size=VOCAB,
                           teacher_shard=teacher, teacher_labels=teacher_labels)


@pytest.mark.parametrize('tail', [False, True], ids=['topk', 'tail'])
def test_served_teacher_ids_beyond_the_vocabulary_are_dropped(ranks, tail):
    ref_total, ref_grad = server_reference(tail)
    for total, _ in (r[('server', tail)] for r in ranks):
        assert torch.allclose(total, ref_total, rtol=1e-10, atol=1e-12), (total, ref_total)
    grad = torch.cat([r[('server', tail)][1] for r in ranks], -1)
    assert torch.allclose(grad, ref_grad, rtol=1e-9, atol=1e-12)
    assert grad[..., VOCAB:].abs().max() == 0


def test_the_teacher_loop_cuts_each_micro_batch_to_topk_before_the_next_forward(ranks):
    for rank in ranks:  # replicated on every rank; the loop's own check of the earlier logits passed
        for seed, ((logprobs, ids), labels) in enumerate(rank['teacher_loop']):
            ref_logprobs, ref_ids = torch.log_softmax(micro_batch_logits(seed)[..., :VOCAB], -1).topk(K, -1)
            assert labels == f'labels{seed}'
            assert logprobs.shape == ids.shape == (2, 5, K)
            assert torch.equal(ids, ref_ids)
            assert torch.allclose(logprobs, ref_logprobs, rtol=1e-12, atol=1e-12)


def _entropy64(logits, temperature):
    return _row_entropies64(logits, temperature).sum()


def _row_entropies64(logits, temperature):
    return torch.special.entr(torch.softmax(logits / temperature, -1)).sum(-1)


def _teacher_rows64(topk, tail):
    """The teacher's float64 logits at its response positions as the entropy statistics see them."""
    _, teacher, _, teacher_labels = make_batch()
    t = teacher[teacher_labels != -100][:, :VOCAB]
    if topk:
        lp = torch.log_softmax(t, -1).topk(K, -1)[0]
        t = torch.cat([lp, torch.log1p(-lp.exp().sum(-1, keepdim=True))], -1) if tail else lp
    return t


def gate_threshold(topk, tail):
    """A threshold halfway between the 4th and 5th largest of the 7 teacher entropies: it gates 3 rows, and no row
    sits near it."""
    h = _row_entropies64(_teacher_rows64(topk, tail), 1.3).sort(descending=True).values
    return float(h[2] + h[3]) / 2


@pytest.mark.parametrize('topk,tail', [(False, False), (True, False), (True, True)], ids=['full', 'topk', 'tail'])
def test_entropies_on_shards_equal_float64(ranks, topk, tail):
    """gkd/entropy and gkd/teacher_entropy of megatron rlhf: the student's and the teacher's summed entropies at
    the response positions (the teacher's at its own positions), padded rows excluded; a top-k teacher's is that of
    its buckets (renormalised top-k, or with the tail), as in swift rlhf."""
    student, _, labels, _ = make_batch()
    want = _entropy64(student[labels != -100][:, :VOCAB], 1.3)
    t_rows = _row_entropies64(_teacher_rows64(topk, tail), 1.3)
    t_want = t_rows.sum()
    gated_want = int((t_rows > gate_threshold(topk, tail)).sum())
    assert gated_want == 3
    for rank in ranks:  # replicated
        entropy, teacher_entropy, gated = rank[('entropy', topk, tail)]
        assert gated is None  # no entropy-aware mix: no count
        assert torch.allclose(entropy, want, rtol=1e-10), (entropy, want)
        assert torch.allclose(teacher_entropy, t_want, rtol=1e-10), (teacher_entropy, t_want)
        # gkd/entropy_fkl_fraction's numerator: the positions whose teacher entropy passes the gate
        _, _, gated = rank[('gated', topk, tail)]
        assert int(gated) == gated_want
