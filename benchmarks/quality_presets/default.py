"""``--preset default``: sort eight letters either way (``quality_task``); on-policy GKD against SFT, SeqKD, supervised
KD and SKD, scored by greedy exact match on held-out prompts."""
from __future__ import annotations

import os
from typing import Any, Dict

from swift_gkd_plugin.demo import quality_task

from quality_presets.common import log

PRESETS = {
    'quick': dict(seeds=[0], steps=60, eval_every=20, batch_size=16, n_train=4000, n_test=200, teacher_steps=300,
                  student_steps=60),
    'full': dict(seeds=[0, 1, 2], steps=120, eval_every=20, batch_size=16, n_train=4000, n_test=200,
                 teacher_steps=300, student_steps=60),
}
DEFAULT_LEARNING_RATE = '1e-3'

#: method -> (swift command, flags).  beta: 0 = forward KL(teacher || student), 1 = reverse KL(student || teacher).
#: The off-policy KD methods use forward KL, as supervised KD and SeqKD do in the GKD paper.
METHODS: Dict[str, tuple] = {
    'sft': ('sft', {}),
    'seqkd': ('rlhf', {'seq_kd': 'true', 'lmbda': '0', 'beta': '0'}),
    'supkd': ('rlhf', {'lmbda': '0', 'beta': '0'}),
    'onpolicy_beta0': ('rlhf', {'lmbda': '1', 'beta': '0'}),
    'onpolicy_beta0.5': ('rlhf', {'lmbda': '1', 'beta': '0.5'}),
    'onpolicy_beta1': ('rlhf', {'lmbda': '1', 'beta': '1'}),
    'mixed': ('rlhf', {'lmbda': '0.5', 'beta': '0.5'}),
    # speculative KD (docs_en/skd.md): on-policy, the teacher replaces every student token that is not its top-1. The
    # paper's K = 25 holds every letter of this task's answers and replaced < 2% of the tokens (measured: skd.md)
    'skd': ('rlhf', {'lmbda': '1', 'beta': '0.5', 'gkd_skd_top_k': '1'}),
    # sampled-token distillation (docs_en/sampled_kl.md): the teacher scores the student's own tokens only; alone (as
    # Tinker / veRL OPD run it) and beside the dense JSD
    'sampled_kl': ('rlhf', {'lmbda': '1', 'gkd_sampled_kl_coef': '1', 'gkd_divergence_coef': '0'}),
    'sampled_kl_jsd': ('rlhf', {'lmbda': '1', 'beta': '0.5', 'gkd_sampled_kl_coef': '1'}),
    # the term alone with each row's advantages less the other rows' mean (--gkd_sampled_kl_baseline batch)
    'sampled_kl_centred': ('rlhf', {'lmbda': '1', 'gkd_sampled_kl_coef': '1', 'gkd_divergence_coef': '0',
                                    'gkd_sampled_kl_baseline': 'batch'}),
}
ONPOLICY = [m for m in METHODS if m.startswith('onpolicy')]


def workspace(workdir: str, cfg: Dict[str, Any], name: str = 'workspace', **task) -> Dict[str, Any]:
    """The task's data, teacher and warm-started student of ``cfg`` under ``workdir/name`` (cached); ``task``: another
    task and its model sizes (:func:`quality_task.build_workspace`'s keywords; the capacity preset)."""
    return quality_task.build_workspace(os.path.join(workdir, name), n_train=cfg['n_train'], n_test=cfg['n_test'],
                                        teacher_steps=cfg['teacher_steps'], student_steps=cfg['student_steps'],
                                        log=log, **task)
