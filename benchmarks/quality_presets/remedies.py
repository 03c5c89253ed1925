"""Issue 36's remedies of pure on-policy GKD (docs_en/onpolicy_remedies.md), run on the smollm and tools presets, and
how the best on-policy recipe compares."""
from __future__ import annotations

from typing import Dict

from quality_presets.common import mean_std

#: --gkd_ref_kl_coef of op_refkl: the anchor as strong as the distillation term (0.1 drifted like the base on
#: SmolLM2 seed 0: forward KL 1.816 against 1.658 at 1.0)
REF_KL_COEF = '1.0'
#: nats: about the teacher's mean entropy on the warm student's temperature-1 samples (2.88, docs_en/quality_results.md) less
#: one, so that its more uncertain positions get forward KL
ENTROPY_FKL_THRESHOLD = '2.0'
#: the two remedies that helped on both presets alone (seed 0, docs_en/onpolicy_remedies.md), together; and with the
#: early stop, which helped on SmolLM2 only
REMEDY_COMBINATION = {'gkd_sampling_temperature': '0.5', 'top_p': '0.9'}


def remedy_methods(base: Dict[str, str], rkl: Dict[str, str]) -> Dict[str, tuple]:
    """Issue 36's remedies of pure on-policy GKD (docs_en/onpolicy_remedies.md), each alone on the preset's on-policy
    ``base`` flags, and two combinations: top-p rollouts, the loss on the teacher's top-16 support (arXiv
    2603.25562), the entropy-aware mix on reverse KL (``rkl``; arXiv 2603.07079), early-stopped rollouts (a third of
    the answer budget; arXiv 2605.27028), sampling at temperature 0.5 (the lead of docs_en/quality_results.md) and the
    reference anchor KL(student || initial student) (StableOPD, arXiv 2604.08527; added when the on-policy runs
    were seen looping: rep-4 0.37 -> 0.55)."""
    return {
        'op_topp': ('rlhf', dict(base, top_p='0.9')),
        'op_support': ('rlhf', dict(base, gkd_logits_topk='16')),
        # the same with the mass outside the top-16 as one more bucket: the student cannot move mass there unseen
        'op_support_tail': ('rlhf', dict(base, gkd_logits_topk='16', gkd_topk_tail='true')),
        'op_entropy': ('rlhf', dict(rkl, gkd_entropy_fkl_threshold=ENTROPY_FKL_THRESHOLD)),
        'op_early': ('rlhf', dict(base, gkd_rollout_max_tokens='16')),
        'op_cold': ('rlhf', dict(base, gkd_sampling_temperature='0.5')),
        'op_combo': ('rlhf', dict(base, **REMEDY_COMBINATION)),
        'op_combo_early': ('rlhf', dict(base, **REMEDY_COMBINATION, gkd_rollout_max_tokens='16')),
        'op_refkl': ('rlhf', dict(base, gkd_ref_kl_coef=REF_KL_COEF)),
        'op_refkl_topp': ('rlhf', dict(base, gkd_ref_kl_coef=REF_KL_COEF, top_p='0.9')),
    }


def versus(stats, x: str, y: str, sign: int) -> str:
    """``x`` against ``y`` in units of the larger of their stds, positive when ``x`` is better."""
    std = max(stats[x][1], stats[y][1])
    return f'{sign * (stats[y][0] - stats[x][0]) / std:+.1f} std' if std > 0 else 'no std (one seed)'


def remedies_comparison(curves, metric: str, lower_is_better: bool, reference: str, shown) -> str:
    """``name m±s, ...`` of ``shown`` for ``metric`` (mean ± std over seeds), then the best on-policy recipe (plain
    on-policy or a remedy) against ``reference``."""
    stats = {m: mean_std([c[-1][metric] for c in by_seed.values()]) for m, by_seed in curves.items()}
    sign = 1 if lower_is_better else -1
    onpolicy = [m for m in curves if m.startswith(('onpolicy', 'op_'))]
    best = min(onpolicy, key=lambda m: sign * stats[m][0])
    cells = ', '.join(f'{m} {stats[m][0]:.3f}±{stats[m][1]:.3f}' for m in shown)
    return f'{cells}; best on-policy recipe {best} vs {reference}: {versus(stats, best, reference, sign)}'
