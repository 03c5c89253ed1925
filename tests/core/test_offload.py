"""Which teachers are partitioned (kept on ms-swift's offload of their shards) and which are whole (offloaded by
:class:`TeacherOffloader`): decided from the prepared module. ZeRO-3 is checked through the real pipeline in
``tests/test_teacher_placement.py``; FSDP wrappers here, on a one-process gloo world."""
import pytest
import torch
import torch.distributed as dist
from torch import nn

from swift_gkd_plugin.core.weights.offload import is_partitioned


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


def _calls(node):
    import ast
    return [n for n in ast.walk(node) if isinstance(n, ast.Call)]


def _name(call) -> str:
    import ast
    f = call.func
    return f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ''


def test_prefetched_copies_are_allocated_on_the_compute_stream():
    """What only a GPU can show (the GPU kit measures it: reserved memory and ``num_alloc_retries`` after the teacher is
    dropped), checked here by the structure of :meth:`TeacherOffloader.prefetch` on a CPU-only machine: nothing is
    allocated inside ``torch.cuda.stream(side)`` (such blocks belong to the side stream's pool, which the student on the
    compute stream cannot reuse without a cache flush); the copies are allocated before it, filled inside it, and
    recorded on the side stream so their blocks are not reused before the copy has run."""
    import ast
    import inspect
    import textwrap
    from swift_gkd_plugin.core.weights.offload import TeacherOffloader
    tree = ast.parse(textwrap.dedent(inspect.getsource(TeacherOffloader.prefetch)))
    side = [w for w in ast.walk(tree) if isinstance(w, ast.With)
            and any(isinstance(i.context_expr, ast.Call) and _name(i.context_expr) == 'stream' for i in w.items)]
    assert len(side) == 1, 'prefetch copies on one side stream'
    inside = {_name(c) for stmt in side[0].body for c in _calls(stmt)}
    allocating = {'to', 'cuda', 'empty', 'empty_like', 'zeros', 'zeros_like', 'clone', 'new_empty', 'contiguous'}
    assert not inside & allocating, f'allocations inside the side-stream block: {inside & allocating}'
    assert 'copy_' in inside
    outside = [c for c in _calls(tree) if c not in _calls(side[0])]
    assert any(_name(c) == 'empty_like' and any(k.arg == 'device' for k in c.keywords) for c in outside)
    recorded = [c for c in outside if _name(c) == 'record_stream']
    assert recorded and all(ast.unparse(c.args[0]) == 'self._stream' for c in recorded)
