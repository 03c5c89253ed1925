"""Sampling without vLLM for Megatron GKD: :mod:`swift_gkd_plugin.megatron.rollout.generation`.

* :func:`sample_next_token` on hand-built logits (greedy, top-k, top-p, padded vocabulary, temperature, seeds).
* :func:`generate` in one process with a real tiny HF model: greedy decoding equals ``model.generate``.
* :func:`generate` on gloo process groups, each rank returning its vocabulary slice of the same tiny model's logits:
  TP = 2 (world 2) and TP = 2 x PP = 2 (world 4, the first stage returns ``None``), and two data-parallel replicas of
  TP = 2 kept in step by ``sync_group``. Every rank must return the single-process completions, for greedy decoding
  and for sampling. The workers look the model's logits up in a table recorded by the single-process runs (so they
  need not import transformers): a sequence that leaves the single-process run is a ``KeyError``.
"""
import contextlib
import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from swift_gkd_plugin.megatron.rollout import generation
from swift_gkd_plugin.megatron.rollout.generation import gather_vocab_shards, generate, sample_next_token

MODEL_KWARGS = dict(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64, seed=3)
LETTERS = ['a b', 'c d e f', 'h', 'g a b c d e']  # prompts of different lengths
MAX_NEW = 10
SEED = 1234
REPLICA1_MAX_NEW = 6  # the second data-parallel replica's max_new_tokens: they stop at different steps
SAMPLING = dict(temperature=0.9, top_k=40, top_p=0.9)
MODES = {'greedy': dict(temperature=0.0), 'sample': SAMPLING}
# vocabulary slices of the model's 448 (padded) logits; the tokenizer has 442 tokens
SPLITS = {'equal': [224, 224], 'unequal': [300, 148], 'pp_unequal': [100, 348]}
TIMEOUT = datetime.timedelta(seconds=60)  # a mismatched collective fails instead of hanging


@contextlib.contextmanager
def single_thread():
    """Same float results as the one-thread workers (and no slowdown when the two cores are shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def full_logits(model, sequences):
    """``[n, 448]`` last-position logits, one unpadded forward per sequence (no padding effects)."""
    with torch.no_grad():
        return torch.stack([model(input_ids=torch.tensor([s])).logits[0, -1] for s in sequences])


def bounds(split, rank):
    lo = sum(split[:rank])
    return lo, lo + split[rank]


# ----------------------------------------------------------------------------------------------------------------
# sample_next_token


def test_greedy_is_argmax_and_ignores_filters_and_scale():
    logits = torch.randn(16, 50, generator=torch.Generator().manual_seed(0))
    expected = logits.argmax(-1)
    for temperature in (0.0, -1.0):
        assert torch.equal(sample_next_token(logits, temperature=temperature, generator=None), expected)
        assert torch.equal(
            sample_next_token(logits, temperature=temperature, top_k=3, top_p=0.5, generator=None), expected)
    for scale in (0.01, 7.0):  # scaling the logits (a temperature) never changes the greedy choice
        assert torch.equal(sample_next_token(logits * scale, temperature=0.0, generator=None), expected)
    assert torch.equal(sample_next_token(logits.bfloat16(), temperature=0.0, generator=None),
                       logits.bfloat16().argmax(-1))


def test_top_k_1_is_greedy_at_any_temperature():
    logits = torch.randn(32, 50, generator=torch.Generator().manual_seed(1))
    for temperature in (0.1, 1.0, 10.0):
        for top_p in (None, 0.3, 1.0):
            got = sample_next_token(logits, temperature=temperature, top_k=1, top_p=top_p,
                                    generator=torch.Generator().manual_seed(2))
            assert torch.equal(got, logits.argmax(-1)), (temperature, top_p)


def test_padded_vocabulary_rows_are_never_chosen():
    vocab, padded = 30, 32
    logits = torch.randn(64, padded, generator=torch.Generator().manual_seed(3))
    logits[:, vocab:] = 1e4  # Megatron's padding rows, with the largest logits of all
    valid = logits[:, :vocab]
    assert torch.equal(sample_next_token(logits, temperature=0.0, generator=None, vocab_size=vocab), valid.argmax(-1))
    assert torch.equal(
        sample_next_token(logits, temperature=1.0, top_k=1, generator=torch.Generator().manual_seed(0),
                          vocab_size=vocab), valid.argmax(-1))
    many = logits.repeat(50, 1)
    for kw in (dict(), dict(top_k=5), dict(top_p=0.5), dict(top_k=40, top_p=0.99)):
        got = sample_next_token(many, temperature=1.0, generator=torch.Generator().manual_seed(4), vocab_size=vocab,
                                **kw)
        assert int(got.max()) < vocab, kw
    # without vocab_size the padding wins: the test above can fail
    assert (sample_next_token(logits, temperature=0.0, generator=None) >= vocab).all()


def _draws(probs, n, **kw):
    logits = torch.log(torch.tensor(probs, dtype=torch.float64)).float().expand(n, -1)
    return sample_next_token(logits, generator=torch.Generator().manual_seed(5), **kw)


def test_top_p_keeps_the_smallest_nucleus():
    probs = [0.15, 0.5, 0.05, 0.3]  # sorted: 0.5 (id 1), 0.3 (id 3), 0.15 (id 0), 0.05 (id 2)
    n = 20000
    for top_p, nucleus in [(0.75, [1, 3]), (0.85, [1, 3, 0]), (0.4, [1]), (0.97, [1, 3, 0, 2])]:
        got = _draws(probs, n, temperature=1.0, top_p=top_p)
        freq = torch.bincount(got, minlength=4).double() / n
        expected = torch.zeros(4, dtype=torch.float64)
        expected[nucleus] = torch.tensor(probs, dtype=torch.float64)[nucleus]
        expected /= expected.sum()
        assert set(got.unique().tolist()) == set(nucleus), top_p
        torch.testing.assert_close(freq, expected, atol=0.015, rtol=0)
    # top-k first, then top-p on the renormalised top-k distribution: top-2 = {0.5, 0.3} -> {0.625, 0.375}, so 0.6
    # needs the first token only (0.5 of the unfiltered distribution would need two)
    got = _draws(probs, n, temperature=1.0, top_k=2, top_p=0.7)
    assert set(got.unique().tolist()) == {1, 3}
    got = _draws(probs, n, temperature=1.0, top_k=2, top_p=0.6)
    assert set(got.unique().tolist()) == {1}


def test_filters_match_transformers_warpers():
    from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)
    logits = torch.randn(64, 100, generator=torch.Generator().manual_seed(6)) * 3
    for temperature, top_k, top_p in [(0.7, 10, 0.8), (1.0, None, 0.5), (1.3, 25, None), (0.5, 50, 0.95)]:
        ref = TemperatureLogitsWarper(temperature)(None, logits.clone())
        if top_k:
            ref = TopKLogitsWarper(top_k)(None, ref)
        if top_p:
            ref = TopPLogitsWarper(top_p)(None, ref)
        ours = generation._filtered_probs(logits, temperature, top_k, top_p)
        assert torch.equal(ours > 0, ref > float('-inf')), (temperature, top_k, top_p)
        torch.testing.assert_close(ours, ref.softmax(-1), rtol=1e-5, atol=1e-7)


def test_temperature_scales_the_sampled_distribution():
    logits = torch.tensor([1.0, 0.0, -0.5, 0.3, -2.0])
    n = 40000
    for temperature in (0.5, 2.0):
        got = sample_next_token(logits.expand(n, -1), temperature=temperature,
                                generator=torch.Generator().manual_seed(7))
        freq = torch.bincount(got, minlength=5).double() / n
        torch.testing.assert_close(freq, (logits.double() / temperature).softmax(-1), atol=0.01, rtol=0)


def test_sampling_is_reproducible_with_the_same_seed():
    logits = torch.randn(256, 60, generator=torch.Generator().manual_seed(8))

    def draw(seed):
        return sample_next_token(logits, temperature=1.0, top_k=30, top_p=0.95,
                                 generator=torch.Generator().manual_seed(seed))

    assert torch.equal(draw(11), draw(11))
    assert not torch.equal(draw(11), draw(12))
    assert not torch.equal(draw(11), logits.argmax(-1))  # it really samples


def test_invalid_arguments():
    logits = torch.zeros(2, 8)
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError):
        sample_next_token(logits, temperature=1.0, generator=None)
    with pytest.raises(ValueError):
        sample_next_token(logits, temperature=1.0, top_p=0.0, generator=gen)
    with pytest.raises(ValueError):
        sample_next_token(logits, temperature=1.0, top_p=1.5, generator=gen)
    with pytest.raises(ValueError):
        sample_next_token(logits, temperature=1.0, top_k=-1, generator=gen)
    with pytest.raises(ValueError):
        sample_next_token(logits, temperature=0.0, generator=None, vocab_size=9)
    with pytest.raises(ValueError):
        sample_next_token(logits[0], temperature=0.0, generator=None)
    with pytest.raises(ValueError):
        generate(lambda s: torch.zeros(len(s), 8), [[1], []], max_new_tokens=2, eos_token_ids=[], seed=0)


def test_gather_vocab_shards_without_a_process_group_is_the_identity():
    shard = torch.randn(3, 5)
    assert gather_vocab_shards(shard) is shard


# ----------------------------------------------------------------------------------------------------------------
# generate, single process


class Scripted:
    """``next_logits`` that emits ``script[i][t]`` as the ``t``-th token of sequence ``i``, and logs its calls."""

    def __init__(self, prompts, script, vocab=10):
        self.prompts, self.script, self.vocab, self.calls = prompts, script, vocab, []

    def __call__(self, sequences):
        self.calls.append([list(s) for s in sequences])
        out = torch.zeros(len(sequences), self.vocab)
        for j, s in enumerate(sequences):
            i = next(i for i, p in enumerate(self.prompts) if s[:len(p)] == p)
            out[j, self.script[i][len(s) - len(self.prompts[i])]] = 5.0
        return out


def test_generate_stops_at_eos_and_at_max_new_tokens():
    prompts = [[1, 2], [3], [4, 5, 6]]
    script = [[7, 0, 8, 8, 8], [8, 8, 8, 8, 8], [9, 9, 0, 8, 8]]  # 0 is the EOS
    fn = Scripted(prompts, script)
    out = generate(fn, prompts, max_new_tokens=4, eos_token_ids=[0], temperature=0.0, seed=0)
    assert out == [[7, 0], [8, 8, 8, 8], [9, 9, 0]]
    # called once per position with the running sequences only, in prompt order
    assert [len(c) for c in fn.calls] == [3, 3, 2, 1]
    assert fn.calls[1] == [[1, 2, 7], [3, 8], [4, 5, 6, 9]]
    assert fn.calls[3] == [[3, 8, 8, 8]]
    # several EOS ids; no EOS at all; no tokens to generate
    assert generate(Scripted(prompts, script), prompts, max_new_tokens=5, eos_token_ids=[7, 9], temperature=0.0,
                    seed=0) == [[7], [8] * 5, [9]]
    assert generate(Scripted(prompts, script), prompts, max_new_tokens=3, eos_token_ids=[], temperature=0.0,
                    seed=0) == [s[:3] for s in script]
    fn = Scripted(prompts, script)
    assert generate(fn, prompts, max_new_tokens=0, eos_token_ids=[0], seed=0) == [[], [], []] and not fn.calls
    assert generate(fn, [], max_new_tokens=3, eos_token_ids=[0], seed=0) == [] and not fn.calls


def test_none_logits_without_a_broadcast_raises():
    with pytest.raises(ValueError, match='broadcast_src'):
        generate(lambda s: None, [[1, 2]], max_new_tokens=2, eos_token_ids=[], seed=0)
    with pytest.raises(ValueError, match='broadcast_src'):
        generate(lambda s: None, [[1, 2]], max_new_tokens=2, eos_token_ids=[], seed=0, broadcast_src=0)


@pytest.fixture(scope='module')
def ws(tmp_path_factory):
    """The tiny model, prompts, EOS ids that stop some sequences early, and the single-process references.

    ``logits_file``: the full logits of every sequence the references passed to ``next_logits`` (and of every
    finished sequence), for the workers, which then need not import transformers.
    """
    from swift_gkd_plugin.demo import tiny
    root = tmp_path_factory.mktemp('generation')
    tok = tiny.build_tokenizer(str(root / 'tok'))
    model = tiny.load_model(tiny.build_model(str(root / 'model'), tok, **MODEL_KWARGS))
    assert model.config.vocab_size == 448 and len(tok) == 442
    prompts = [tok(f'<|im_start|>user\nReverse: {s}<|im_end|>\n<|im_start|>assistant\n')['input_ids']
               for s in LETTERS]
    assert len({len(p) for p in prompts}) == len(prompts)
    table = {}

    def next_logits(sequences):
        logits = full_logits(model, sequences)
        table.update({tuple(s): row.clone() for s, row in zip(sequences, logits)})
        return logits

    def run(prompt_list, eos, mode, max_new_tokens=MAX_NEW):
        with single_thread():
            out = generate(next_logits, prompt_list, max_new_tokens=max_new_tokens, eos_token_ids=eos, seed=SEED,
                           vocab_size=len(tok), **MODES[mode])
            next_logits([p + c for p, c in zip(prompt_list, out)])  # what an idle data-parallel replica passes
        return out

    free = {mode: run(prompts, [], mode) for mode in MODES}
    # EOS: the 4th free-running token of one sequence, so that it stops early (and maybe others too)
    eos = {'greedy': [free['greedy'][2][3]], 'sample': [free['sample'][1][3]]}
    ref = {mode: run(prompts, eos[mode], mode) for mode in MODES}
    replicas = {mode: [run(prompts[:2], eos[mode], mode), run(prompts[2:], eos[mode], mode, REPLICA1_MAX_NEW)]
                for mode in MODES}
    torch.save(table, root / 'logits.pt')
    return dict(model=model, tok=tok, prompts=prompts, vocab_size=len(tok), free=free, eos=eos, ref=ref,
                replicas=replicas, logits_file=str(root / 'logits.pt'))


def test_references_exercise_eos_and_max_new_tokens(ws):
    for mode in MODES:
        lengths = [len(c) for c in ws['ref'][mode]]
        assert min(lengths) < MAX_NEW and max(lengths) == MAX_NEW, (mode, lengths)
        for c in ws['ref'][mode]:
            assert all(t not in ws['eos'][mode] for t in c[:-1])  # stops at the first EOS, which is kept
            assert len(c) == MAX_NEW or c[-1] in ws['eos'][mode]
            assert max(c) < ws['vocab_size']
    assert ws['ref']['sample'] != ws['ref']['greedy']


def test_greedy_generate_equals_hf_generate(ws):
    model, eos = ws['model'], ws['eos']['greedy']
    for eos_ids, ours in [(eos, ws['ref']['greedy']), ([], ws['free']['greedy'])]:
        for prompt, completion in zip(ws['prompts'], ours):
            with single_thread(), torch.no_grad():
                out = model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt)),
                                     do_sample=False, max_new_tokens=MAX_NEW, eos_token_id=eos_ids,
                                     pad_token_id=0)
            assert out[0, len(prompt):].tolist() == completion


def test_a_sequence_does_not_depend_on_when_the_others_stop(ws):
    """Each sequence draws from its own generator: with an EOS, a completion is its free run cut at the EOS."""
    for mode in MODES:
        eos = ws['eos'][mode]
        for free, ref in zip(ws['free'][mode], ws['ref'][mode]):
            cut = next((k + 1 for k, t in enumerate(free) if t in eos), len(free))
            assert ref == free[:cut]


def test_sampling_generate_is_reproducible_and_seed_dependent(ws):
    model, prompts = ws['model'], ws['prompts']

    def run(seed):
        with single_thread():
            return generate(lambda seqs: full_logits(model, seqs), prompts, max_new_tokens=4, eos_token_ids=[],
                            seed=seed, vocab_size=ws['vocab_size'], **SAMPLING)

    assert run(SEED) == [c[:4] for c in ws['free']['sample']]
    assert run(SEED + 1) != run(SEED)


# ----------------------------------------------------------------------------------------------------------------
# generate on gloo process groups


def _tp_logits(table, split, tp_rank, calls, group=None, same_sequences=True):
    """A TP rank's ``next_logits``: its slice of the tiny model's full logits, looked up in ``table`` (a KeyError if
    the sequences left those of the single-process run). ``group``: a collective in every forward, over which all
    ranks must stay in step (as in Megatron's forward); ``same_sequences``: every rank of it has the same ones."""
    lo, hi = bounds(split, tp_rank)

    def fn(sequences):
        calls.append([list(s) for s in sequences])
        if group is not None:
            total = torch.tensor([sum(len(s) for s in sequences)], dtype=torch.long)
            dist.all_reduce(total, group=group)
            assert not same_sequences or int(total) == dist.get_world_size(group) * sum(len(s) for s in sequences)
        return torch.stack([table[tuple(s)] for s in sequences])[:, lo:hi]

    return fn


def _world2_cases(table, rank, prompts, eos, vocab_size):
    out = {}
    for mode, kw in MODES.items():
        common = dict(max_new_tokens=MAX_NEW, eos_token_ids=eos[mode], seed=SEED, vocab_size=vocab_size, **kw)
        calls = []  # equal slices, the default group as TP group, no broadcast: the ranks choose the same tokens
        out[f'{mode}/equal'] = generate(_tp_logits(table, SPLITS['equal'], rank, calls), prompts, **common)
        out[f'{mode}/equal/calls'] = calls
        calls = []  # unequal slices, tokens broadcast from rank 1
        out[f'{mode}/unequal'] = generate(_tp_logits(table, SPLITS['unequal'], rank, calls), prompts,
                                          broadcast_group=None, broadcast_src=1, **common)
        out[f'{mode}/unequal/calls'] = calls
    return out


def _world4_cases(table, rank, prompts, eos, vocab_size):
    out = {}
    # every rank creates every group, in the same order
    tp_groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    pp_groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    dp_groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    stage, tp_rank = rank // 2, rank % 2

    def pp_logits(split, calls):
        """TP = 2 x PP = 2: the first stage runs the "forward" (a collective over the whole model-parallel group)
        and has no logits; the last stage returns its slice."""
        fn = _tp_logits(table, split, tp_rank, calls, group=dist.group.WORLD)

        def call(sequences):
            logits = fn(sequences)
            return logits if stage == 1 else None

        return call

    for mode, kw in MODES.items():
        common = dict(max_new_tokens=MAX_NEW, eos_token_ids=eos[mode], seed=SEED, vocab_size=vocab_size, **kw)
        calls = []  # broadcast over the model-parallel group (the world here) from the last stage's TP rank 0
        out[f'pp/{mode}/mp_broadcast'] = generate(pp_logits(SPLITS['equal'], calls), prompts,
                                                  tp_group=tp_groups[stage], broadcast_group=None,
                                                  broadcast_src=2, **common)
        out[f'pp/{mode}/mp_broadcast/calls'] = calls
        calls = []  # broadcast over each pipeline group from its own last rank (Megatron's text generation)
        out[f'pp/{mode}/pp_broadcast'] = generate(pp_logits(SPLITS['pp_unequal'], calls), prompts,
                                                  tp_group=tp_groups[stage], broadcast_group=pp_groups[tp_rank],
                                                  broadcast_src=2 + tp_rank, **common)
        out[f'pp/{mode}/pp_broadcast/calls'] = calls
        # two data-parallel replicas of TP = 2 with different prompts and max_new_tokens (so different stopping
        # steps); the forward has a collective across the replicas (as MoE expert parallelism): they must stay in step
        replica = stage
        calls = []
        fn = _tp_logits(table, SPLITS['unequal'], tp_rank, calls, group=dp_groups[tp_rank], same_sequences=False)
        kw = dict(common, max_new_tokens=REPLICA1_MAX_NEW) if replica else common
        counts = {}
        out[f'dp/{mode}'] = generate(fn, prompts[2:] if replica else prompts[:2], tp_group=tp_groups[replica],
                                     sync_group=dp_groups[tp_rank], counts=counts, **kw)
        out[f'dp/{mode}/calls'] = calls
        out[f'dp/{mode}/counts'] = counts
    return out


def _worker(rank, world, init_file, out_dir, logits_file, prompts, eos, vocab_size):
    torch.set_num_threads(1)
    table = torch.load(logits_file)
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world, timeout=TIMEOUT)
    try:
        cases = _world2_cases if world == 2 else _world4_cases
        torch.save(cases(table, rank, prompts, eos, vocab_size), os.path.join(out_dir, f'rank{rank}.pt'))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _spawn(world, ws, tmp_path_factory):
    root = tmp_path_factory.mktemp(f'generation_world{world}')
    mp.spawn(_worker, args=(world, str(root / 'init'), str(root), ws['logits_file'], ws['prompts'], ws['eos'],
                            ws['vocab_size']), nprocs=world, join=True)
    return [torch.load(root / f'rank{r}.pt') for r in range(world)]


@pytest.fixture(scope='module')
def world2(ws, tmp_path_factory):
    return _spawn(2, ws, tmp_path_factory)


@pytest.fixture(scope='module')
def world4(ws, tmp_path_factory):
    return _spawn(4, ws, tmp_path_factory)


def _same_calls(ranks, key):
    """Every rank called ``next_logits`` the same number of times with the same sequences."""
    for r in ranks[1:]:
        assert r[key + '/calls'] == ranks[0][key + '/calls'], key


@pytest.mark.parametrize('split', ['equal', 'unequal'])
@pytest.mark.parametrize('mode', list(MODES))
def test_tp2_matches_single_process(ws, world2, mode, split):
    key = f'{mode}/{split}'
    for r in world2:
        assert r[key] == ws['ref'][mode], key
    _same_calls(world2, key)
    # one call per generated position of the longest completion, with the running sequences
    calls = world2[0][key + '/calls']
    assert len(calls) == max(len(c) for c in ws['ref'][mode])
    assert [len(c) for c in calls] == [sum(len(c) > t for c in ws['ref'][mode]) for t in range(len(calls))]


@pytest.mark.parametrize('broadcast', ['mp_broadcast', 'pp_broadcast'])
@pytest.mark.parametrize('mode', list(MODES))
def test_tp2_pp2_matches_single_process(ws, world4, mode, broadcast):
    key = f'pp/{mode}/{broadcast}'
    for rank, r in enumerate(world4):
        assert r[key] == ws['ref'][mode], (key, rank)
    _same_calls(world4, key)


@pytest.mark.parametrize('mode', list(MODES))
def test_data_parallel_replicas_stay_in_step_with_sync_group(ws, world4, mode):
    key = f'dp/{mode}'
    expected = ws['replicas'][mode]
    for rank, r in enumerate(world4):
        assert r[key] == expected[rank // 2], (key, rank)
    steps = max(len(c) for replica in expected for c in replica)
    own = [max(len(c) for c in replica) for replica in expected]
    assert own[0] != own[1], 'the replicas should stop at different steps for this test to mean something'
    for rank, r in enumerate(world4):
        calls = r[key + '/calls']
        assert len(calls) == steps, (rank, len(calls))  # also the replica that finished first
        # every forward counted; the idle ones are those after the replica's own rows stopped
        assert r[key + '/counts'] == {'forwards': steps, 'idle': steps - own[rank // 2]}, (rank, r[key + '/counts'])
    _same_calls(world4[:2], key)
    _same_calls(world4[2:], key)
