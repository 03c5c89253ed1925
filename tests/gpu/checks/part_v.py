"""Part v: vLLM colocate sampling with the RL term's sampler/policy mismatch correction (issue 21 item 10).

``swift rlhf --rlhf_type gkd --use_vllm true --vllm_mode colocate`` with a reward, ``--gkd_rl_coef 1``, G = 2 and
``--rollout_importance_sampling_mode token_truncate``: vLLM reports its processed log-probabilities (bf16 kernels,
the sampling temperature) and the trainer compares them with the policy's. Case ``c2`` (C = 2): the mismatch metrics
are logged on every step and small (mean |log pi - log mu| < 0.05, k3 KL < 0.01). Case ``c1`` (C = 1, every ratio
above 1 is cut): some weights truncate (``gkd/rollout_is_truncated`` > 0) and the mean weight is at most 1.
Cases ``sleep1`` (``--sleep_level 1``: vLLM's CPU build has no sleep mode), ``lora_adapter``
(``--vllm_enable_lora true``) and ``lora_merged`` (a LoRA student merged out of place at each sync: on a GPU the
temporaries live on the device) pass when the run trains with the metrics logged.
Skipped where vLLM is not installed (the kit does not carry it: one CUDA wheel of ~340 MB that pins its own torch).
"""
from __future__ import annotations

import os

from common import Results, build_workspace, finite, free_port, rlhf_argv, run_rlhf

REWARD_PLUGIN = '''from swift.rewards import ORM, orms


class DistinctCharacters(ORM):
    """The share of distinct characters in a completion: a graded reward that needs no dataset column."""

    def __call__(self, completions, **kwargs):
        return [len(set(c)) / max(len(c), 1) for c in completions]


orms['gpukit_distinct'] = DistinctCharacters
'''
CASES = {'c2': 2.0, 'c1': 1.0, 'sleep1': 2.0, 'lora_adapter': 2.0, 'lora_merged': 2.0}
# what vLLM's CPU build cannot run (sleep mode) or what ran only there (adapter-only LoRA syncs): kept for a GPU
EXTRA = {'sleep1': dict(sleep_level=1), 'lora_adapter': dict(tuner_type='lora', lora_dropout=0, vllm_enable_lora='true'),
         'lora_merged': dict(tuner_type='lora', lora_dropout=0)}
METRICS = ('gkd/rollout_logprob_diff', 'gkd/rollout_k3_kl', 'gkd/rollout_is_weight', 'gkd/rollout_is_truncated')


def run(args) -> Results:
    res = Results('v', 'vLLM colocate sampling: the RL term\'s sampler/policy mismatch, logged and truncated')
    if args.device != 'cuda':  # vLLM's CPU build runs these paths in CI (tests/test_vllm.py): this part is a GPU's
        res.status = 'skipped'
        res.note('a GPU vLLM check: on CPU, vLLM\'s CPU build runs these paths in tests/test_vllm.py')
        return res
    try:
        import vllm  # noqa: F401
    except Exception as exc:  # not installed, or built for another torch/CUDA
        res.status = 'skipped'
        res.note(f'vLLM cannot be imported here ({type(exc).__name__}: {str(exc)[:200]}); the kit does not carry it')
        return res
    ws = build_workspace(os.path.join(args.work, 'ws'), args.tiny, 'cuda' if args.device == 'cuda' else 'cpu')
    plugin = os.path.join(args.work, 'gpukit_reward.py')
    with open(plugin, 'w') as f:
        f.write(REWARD_PLUGIN)
    steps = args.steps or (2 if args.tiny else 4)
    for case in args.cases or list(CASES):
        flags = dict(lmbda=1, use_vllm='true', vllm_mode='colocate', vllm_gpu_memory_utilization=0.3,
                     vllm_max_model_len=1024, sleep_level=0, external_plugins=plugin, reward_funcs='gpukit_distinct',
                     gkd_rl_coef=1, num_generations=2, learning_rate=1e-5, temperature=1.0,
                     rollout_importance_sampling_mode='token_truncate',
                     rollout_importance_sampling_threshold=CASES[case])
        flags.update(EXTRA.get(case, {}))
        out = os.path.join(args.work, f'v_{case}')
        left = res.seconds_left(args.part_budget_s)
        if left < 90:
            res.add(case=case, ok=False, rc='not run', error=f'part budget: {left:.0f} s left')
            continue
        # colocate vLLM runs in torchrun's workers (external_launcher): one process, launched as users must
        r = run_rlhf(rlhf_argv(ws, out, steps, **flags), env={'NPROC_PER_NODE': '1', 'MASTER_PORT': str(free_port())},
                     timeout=min(args.run_timeout, left),
                     log_path=os.path.join(args.work, f'v_{case}.log'))
        rows = r['logs']
        logged = bool(rows) and all(all(finite(row.get(m)) for m in METRICS) for row in rows)
        values = {m: [row.get(m) for row in rows] for m in METRICS}
        ok = r['rc'] == 0 and r['plugin_active'] and logged
        if ok and case == 'c2':
            ok = (max(values['gkd/rollout_logprob_diff']) < 0.05 and max(values['gkd/rollout_k3_kl']) < 0.01)
        if ok and case == 'c1':
            ok = (max(values['gkd/rollout_is_truncated']) > 0 and max(values['gkd/rollout_is_weight']) <= 1 + 1e-6)
        res.add(case=case, threshold=CASES[case], ok=ok, rc=r['rc'], plugin_active=r['plugin_active'],
                metrics_logged=logged, **{m.split('/')[-1]: values[m] for m in METRICS}, losses=r['losses'],
                step_s=r['step_s'], wall_s=r['wall_s'], error=r['error'])
    if any(not row['ok'] for row in res.rows):
        res.status = 'partial'
    res.note(f'{steps} steps per run, G = 2, learning rate 1e-5 (weights synced to vLLM every step); '
             'rollout_logprob_diff = mean |log pi - log mu| per token, rollout_k3_kl = mean (e^r - r - 1)')
    return res
