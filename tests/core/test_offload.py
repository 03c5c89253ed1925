"""Which teachers are partitioned (kept on ms-swift's offload of their shards) and which are whole (offloaded by
:class:`TeacherOffloader`): decided from the prepared module. ZeRO-3 is checked through the real pipeline in
``tests/test_teacher_placement.py``; FSDP wrappers here, on a one-process gloo world."""
import pytest
import torch
import torch.distributed as dist
from torch import nn

from swift_gkd_plugin.core.offload import is_partitioned


@pytest.fixture
def gloo_world(tmp_path):
    dist.init_process_group('gloo', init_method=f'file://{tmp_path / "init"}', rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _model():
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def test_a_whole_module_is_not_partitioned():
    model = _model()
    assert not is_partitioned(model)
    assert not is_partitioned(nn.DataParallel(model))


def test_fsdp1_and_fsdp2_modules_are_partitioned(gloo_world):
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
    assert is_partitioned(FullyShardedDataParallel(_model(), device_id=torch.device('cpu')))
    model = _model()
    fully_shard(model)
    assert is_partitioned(model)
