"""``--torch_compile`` with the fused loss (issue 21 item 9), in real ``swift rlhf`` runs.

Without ZeRO-3 the fused loss must find the heads of compiled models (it fell back to the dense loss). Under ZeRO-3
the student's forward runs the loss too (see ``GKDPluginTrainer._fused_loss``): that forward is installed once, so
the compiled module sees one ``forward`` object at every micro-batch (a closure per micro-batch before), and the
loss runs outside the compiled graph (traced, it met ZeRO-3's empty head shard and the run stopped at step 1).

torch.compile runs with its ``eager`` backend (dynamo traces and guards as with inductor, without building kernels on
the CPU); ``tests/compile_probe_plugin.py`` records the forward object and dynamo's graph count per micro-batch.
"""
import json

import pytest
from conftest import _free_port, base_args, run_swift

PLUGIN = __file__.replace('test_torch_compile.py', 'compile_probe_plugin.py')
STEPS, GA = 3, 2


@pytest.mark.parametrize('zero3', [False, True], ids=['plain', 'zero3'])
def test_fused_loss_under_torch_compile_keeps_one_forward_and_its_graphs(tiny_ws, tmp_path, zero3):
    log = tmp_path / 'compile.jsonl'
    extra = dict(deepspeed='zero3', fp16='false', use_cpu='true') if zero3 else {}
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'out'), external_plugins=PLUGIN, max_steps=STEPS,
                              gradient_accumulation_steps=GA, lmbda=0, gkd_loss_impl='fused', torch_compile='true',
                              torch_compile_backend='eager', gradient_checkpointing='false', seed=3, **extra),
                    env={'GKD_TEST_COMPILE_LOG': str(log),
                         **({'NPROC_PER_NODE': '1', 'MASTER_PORT': str(_free_port())} if zero3 else {})})
    assert 'the fused loss cannot apply here' not in run.output
    records = [json.loads(line) for line in open(log)]
    ranks = sorted({r['rank'] for r in records})
    assert ranks == [0]
    for rank in ranks:
        mine = [r for r in records if r['rank'] == rank]
        assert len(mine) == STEPS * GA
        assert len({r['forward'] for r in mine}) == 1
        assert mine[0]['unique_graphs'] > 0  # it did compile
        settled = mine[GA:]  # after the first step every graph of the model exists
        assert {r['unique_graphs'] for r in settled} == {settled[0]['unique_graphs']}
