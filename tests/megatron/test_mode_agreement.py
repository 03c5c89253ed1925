"""The Megatron trainer's mode decisions (``choose_mode`` on Megatron's iteration counter) agree on every rank of a
real ``torch.distributed`` job, whatever each rank's global random state, and equal a fresh single-process draw."""
import datetime
import os
import random

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from swift_gkd_plugin.core import choose_mode

CONFIGS = [(42, 0.5, False), (42, 0.5, True), (7, 0.1, True), (0, 1.0, False)]
STEPS = range(200)


def _decisions(seed, lmbda, seq_kd):
    return [choose_mode(seed, step, lmbda, seq_kd).value for step in STEPS]


def _worker(rank, world, init_file, out_dir):
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        random.seed(rank)  # each rank's global random state differs, as after data shuffling or dropout
        torch.manual_seed(rank)
        mine = [_decisions(*config) for config in CONFIGS]
        everyone = [None] * world
        dist.all_gather_object(everyone, mine)
        torch.save(everyone, os.path.join(out_dir, f'rank{rank}.pt'))
    finally:
        dist.destroy_process_group()


def test_every_rank_takes_the_same_decisions(tmp_path):
    world = 4
    mp.spawn(_worker, args=(world, str(tmp_path / 'init'), str(tmp_path)), nprocs=world, join=True)
    everyone = torch.load(tmp_path / 'rank0.pt')
    expected = [_decisions(*config) for config in CONFIGS]
    assert all(decisions == expected for decisions in everyone)
    modes = {m for decisions in expected for m in decisions}
    assert modes == {'on_policy', 'seq_kd', 'off_policy'}  # the draws exercise every mode
