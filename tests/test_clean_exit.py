"""Process groups are destroyed before the interpreter shuts down after a clean exit, and left alone after a failure
(``swift_gkd_plugin.swift.clean_exit``): two gloo ranks under torchrun, as a 2-process ``swift rlhf`` run has."""
import os
import subprocess
import sys

from conftest import _free_port

RANK_SCRIPT = """
import sys
import torch
import torch.distributed as dist
from swift_gkd_plugin.swift.clean_exit import destroy_process_groups_at_exit
dist.init_process_group('gloo')
destroy_process_groups_at_exit()
destroy_process_groups_at_exit()  # registered once
t = torch.ones(4)
dist.all_reduce(t)
assert t[0] == 2
if sys.argv[1] == 'fail' and dist.get_rank() == 1:
    raise RuntimeError('rank 1 fails after its last collective')
print('rank', dist.get_rank(), 'done', flush=True)
"""


def run_ranks(tmp_path, outcome):
    script = tmp_path / 'ranks.py'
    script.write_text(RANK_SCRIPT)
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port', str(_free_port()),
           str(script), outcome]
    env = dict(os.environ, OMP_NUM_THREADS='1')
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


def test_groups_destroyed_once_by_each_rank_after_a_clean_exit(tmp_path):
    proc = run_ranks(tmp_path, 'ok')
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    for rank in (0, 1):
        assert out.count(f'swift_gkd_plugin: rank {rank} destroyed its process groups before exit') == 1, out[-3000:]


def test_groups_left_alone_after_an_uncaught_exception(tmp_path):
    proc = run_ranks(tmp_path, 'fail')
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and 'rank 1 fails after its last collective' in out
    assert 'rank 1 destroyed its process groups' not in out  # the failing rank leaves them to torchrun
    assert 'swift_gkd_plugin: rank 0 destroyed its process groups before exit' in out, out[-3000:]
