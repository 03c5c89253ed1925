"""Host syncs per micro-batch of a real ``swift rlhf`` step (issue 21 item 8): the plugin's loss path and its
backward read nothing from the device, on either loss implementation and in either mode; its metrics stay on the
device until the logging step.

Counted with :class:`~harness.host_syncs.HostSyncCounter` around each micro-batch's
``compute_loss`` and backward (``tests/host_sync_plugin.py``, loaded through ``--external_plugins``). What remains is
not the plugin's: ms-swift's ``prepare_logits_to_keep`` reads the first response position of each view, and the
model's forward (transformers' attention-mask helpers) reads its mask.
"""
import json

import pytest
from conftest import base_args, run_swift

from swift_gkd_plugin.core.modes import choose_mode

PLUGIN = __file__.replace('test_host_syncs.py', 'host_sync_plugin.py')
STEPS, GA, LMBDA = 3, 2, 0.5
# both modes within the run's steps
SEED = next(s for s in range(100) if len({choose_mode(s, i, LMBDA, False) for i in range(STEPS)}) == 2)

# the syncs that are not the plugin's (see the module docstring): (file fragment, function)
NOT_OURS = [('swift/trainers/mixin.py', 'prepare_logits_to_keep'), ('transformers/', '')]
# the fused loss against a top-k teacher drops the rows without teacher information (their number sizes a tensor)
# and checks the ids' range: one read of both, in fused_linear_jsd's _active_rows
TOPK_READS = [('tolist', '_active_rows')]

CASES = {
    'fused': dict(gkd_loss_impl='fused', sft_alpha=0.5),
    'dense': dict(gkd_loss_impl='dense', sft_alpha=0.5),
    'fused_topk': dict(gkd_loss_impl='fused', gkd_logits_topk=8),
}


def _theirs(where):
    return any(path in where and where.endswith(f'({func})' if func else '') for path, func in NOT_OURS)


@pytest.mark.parametrize('case', list(CASES))
def test_loss_and_backward_make_no_host_sync(tiny_ws, tmp_path, case):
    log = tmp_path / 'syncs.jsonl'
    run_swift(base_args(tiny_ws, str(tmp_path / 'out'), external_plugins=PLUGIN, max_steps=STEPS,
                        gradient_accumulation_steps=GA, lmbda=LMBDA, seed=SEED, **CASES[case]),
              env={'GKD_TEST_SYNC_LOG': str(log)})
    records = [json.loads(line) for line in open(log)]
    assert len(records) == STEPS * GA  # every training micro-batch counted
    assert {r['mode'] for r in records} == {'on_policy', 'off_policy'}
    for record in records:
        ours = [(name, where) for name, where in record['loss'] + record['backward'] if not _theirs(where)]
        expected = TOPK_READS if case == 'fused_topk' else []
        assert [(name, where.rsplit('(', 1)[1].rstrip(')')) for name, where in ours] == expected, record
        assert any(_theirs(where) for _, where in record['loss'])  # the counter was on: it saw ms-swift's read
