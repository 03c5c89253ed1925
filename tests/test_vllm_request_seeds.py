"""vLLM's per-request sampling seeds (issue 21 item 3, issue 47 item 2), without vLLM: ms-swift's own ``RequestConfig``
and the rule of its vLLM engine (request ``i`` of one call samples with ``config.seed + i``), on the configs the trainer
builds. Only an engine split over several ranks (TP > 1) gets them; with one rank per engine the draws come from the
process's generator, seeded per (seed, step, rank): ``tests/test_vllm.py`` checks that end to end."""
import pytest
from swift.infer_engine.protocol import RequestConfig

from swift_gkd_plugin.swift.rollout.samplers import seeded_request_config


def request_seeds(config, n):
    """The seeds ms-swift's ``VllmEngine._infer`` gives the ``n`` requests of one call."""
    return [None if config.seed is None else config.seed + i for i in range(n)]


def built(seed=42, step=3, rank=0, tp=2, mode='colocate', base=None, turn=0):
    return seeded_request_config(RequestConfig(temperature=1.0, max_tokens=8, seed=base), seed=seed, step=step,
                                 process_index=rank, tensor_parallel_size=tp, vllm_mode=mode, turn=turn)


def test_seeds_follow_seed_step_and_rank_and_repeat_on_resume():
    first = built()
    assert first.seed is not None and first.temperature == 1.0 and first.max_tokens == 8
    assert built().seed == first.seed  # a resumed run at the same step: the same draws
    assert len({built(seed=s, step=t, rank=r).seed for s in (1, 2) for t in (0, 1, 2) for r in (0, 2, 4)}) == 18
    assert 0 <= first.seed and first.seed + 10**6 < 2**63  # room for the engine's + i, a valid 64-bit seed


def test_a_tp_group_shares_its_seeds_and_groups_never_overlap():
    """TP = 2 on 4 ranks: ranks 0-1 drive one engine, 2-3 another. ms-swift's ``B * (rank // tp)`` gives groups
    ranges [0, B) and [B, 2B) for every seed and step, overlapping once a rank sends more than B requests
    (steps_per_generation > GA)."""
    configs = [built(rank=r, tp=2) for r in range(4)]
    assert configs[0].seed == configs[1].seed and configs[2].seed == configs[3].seed
    n = 4096  # requests per call, far beyond ms-swift's B
    assert not set(request_seeds(configs[0], n)) & set(request_seeds(configs[2], n))
    assert not set(request_seeds(built(step=3, tp=2), n)) & set(request_seeds(built(step=4, tp=2), n))


def test_one_rank_per_engine_gets_no_request_seeds():
    """TP = 1: vLLM keeps its batched sampler (a seeded request is sampled on its own), the trainer seeds the draws."""
    config = RequestConfig(temperature=1.0, seed=None)
    for rank in range(3):
        assert seeded_request_config(config, seed=1, step=2, process_index=rank, tensor_parallel_size=1,
                                     vllm_mode='colocate') is config


def test_server_mode_seeds_per_step_with_one_completion_per_prompt():
    """Server mode, one completion per prompt: the requests are seeded from (seed, step, turn), the same on every rank
    (rank 0 sends them all), new at every step and turn, so a resumed or ``--async_generate`` run draws what the
    synchronous, uninterrupted run drew. With several completions per prompt, and without vLLM, it stays ms-swift's:
    the server's data-parallel workers number their share from one seed (copies of a prompt would draw alike)."""
    config = RequestConfig(temperature=1.0, seed=None)
    seeds = {(step, turn, rank): seeded_request_config(config, seed=1, step=step, process_index=rank,
                                                       tensor_parallel_size=1, vllm_mode='server', turn=turn).seed
             for step in (2, 3) for turn in (0, 1) for rank in (0, 1)}
    assert all(s is not None for s in seeds.values())
    assert all(seeds[(step, turn, 0)] == seeds[(step, turn, 1)] for step in (2, 3) for turn in (0, 1))
    assert len({seeds[(step, turn, 0)] for step in (2, 3) for turn in (0, 1)}) == 4
    for mode, copies in (('server', 4), (None, 1)):
        assert seeded_request_config(config, seed=1, step=2, process_index=0, tensor_parallel_size=1,
                                     vllm_mode=mode, copies=copies) is config


def test_each_turn_of_a_multi_turn_rollout_draws_from_its_own_seeds():
    """Later turns of a trajectory get seed ranges of their own (the same seed at every turn would replay request
    i's random stream at each of its turns); the first turn keeps the single-turn seeds; a resumed run repeats them."""
    n = 4096
    turns = [built(turn=k) for k in range(4)]
    assert turns[0].seed == built().seed
    assert [built(turn=k).seed for k in range(4)] == [c.seed for c in turns]
    for a in range(4):
        for b in range(a + 1, 4):
            assert not set(request_seeds(turns[a], n)) & set(request_seeds(turns[b], n)), (a, b)
