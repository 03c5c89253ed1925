"""Process groups are destroyed before the interpreter shuts down after a clean exit, and left alone after a failure
(``swift_gkd_plugin.swift.run.clean_exit``): two gloo ranks under torchrun, as a 2-process ``swift rlhf`` run has."""
import os
import subprocess
import sys

import pytest
from conftest import _free_port

RANK_SCRIPT = """
import atexit
import sys
import torch
import torch.distributed as dist
from swift_gkd_plugin.swift.run.clean_exit import destroy_process_groups_at_exit, note_training_finished


class Finalized:
    def __del__(self):
        print('rank finalized by the interpreter', flush=True)


FINALIZED = Finalized()  # a module global: its __del__ runs in interpreter finalization
dist.init_process_group('gloo')
RANK = dist.get_rank()
# registered before the plugin's handler, so it runs after it (atexit is last in, first out)
atexit.register(lambda: print(f'rank {RANK} at exit: groups initialized = {dist.is_initialized()}', flush=True))
destroy_process_groups_at_exit()
destroy_process_groups_at_exit()  # registered once
t = torch.ones(4)
dist.all_reduce(t)
assert t[0] == 2
if sys.argv[1] == 'fail' and dist.get_rank() == 1:
    raise RuntimeError('rank 1 fails after its last collective')
if sys.argv[1] == 'trained':
    atexit.register(print, 'a later atexit handler ran', flush=True)
    note_training_finished()
print('rank', dist.get_rank(), 'done', flush=True)
"""


def run_ranks(tmp_path, outcome):
    script = tmp_path / 'ranks.py'
    script.write_text(RANK_SCRIPT)
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port', str(_free_port()),
           str(script), outcome]
    env = dict(os.environ, OMP_NUM_THREADS='1')
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


@pytest.fixture(scope='module')
def clean_exit(tmp_path_factory):
    """Two ranks that end without error, training not finished: read by two tests."""
    return run_ranks(tmp_path_factory.mktemp('clean_exit'), 'ok')


def test_groups_destroyed_by_each_rank_after_a_clean_exit(clean_exit):
    """Each rank destroys its groups; rank 0 alone says so (issue 66: one line per rank of a 64-rank run)."""
    proc = clean_exit
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    for rank in (0, 1):
        assert f'rank {rank} at exit: groups initialized = False' in out, out[-3000:]
    assert out.count('destroyed its process groups before exit') == 1, out[-3000:]
    assert 'swift_gkd_plugin: rank 0 destroyed its process groups before exit' in out, out[-3000:]


def test_groups_left_alone_after_an_uncaught_exception(tmp_path):
    proc = run_ranks(tmp_path, 'fail')
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and 'rank 1 fails after its last collective' in out
    assert 'rank 1 at exit: groups initialized = True' in out, out[-3000:]  # the failing rank leaves them to torchrun
    assert 'rank 0 at exit: groups initialized = False' in out, out[-3000:]
    assert 'swift_gkd_plugin: rank 0 destroyed its process groups before exit' in out, out[-3000:]


def test_a_finished_training_skips_interpreter_finalization_with_exit_code_0(tmp_path, clean_exit):
    """After the trainer's train() returned and the groups are destroyed, each worker leaves through the last atexit
    handler (registered by the start-up hook) with exit code 0: the other atexit handlers run, finalization (where
    ranks aborted now and then with SIGABRT after training) does not. Without train() finishing, it runs as before."""
    proc = run_ranks(tmp_path, 'trained')
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert out.count('a later atexit handler ran') == 2, out[-3000:]
    assert out.count('at exit: groups initialized = False') == 2, out[-3000:]
    assert out.count('destroyed its process groups before exit') == 1, out[-3000:]
    assert 'rank finalized by the interpreter' not in out, out[-3000:]
    plain = clean_exit
    assert plain.returncode == 0
    assert (plain.stdout + plain.stderr).count('rank finalized by the interpreter') == 2, plain.stdout[-3000:]
