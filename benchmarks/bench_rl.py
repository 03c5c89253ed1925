"""GKD + RL against GKD alone and GRPO alone, with an imperfect teacher (CPU, offline).

    python benchmarks/bench_rl.py --quick          # 1 seed, short runs
    python benchmarks/bench_rl.py                  # the full preset: 3 seeds
    python benchmarks/bench_rl.py --help

The task and the scoring are ``bench_quality.py``'s (sort eight letters, greedy free-running exact match on
held-out prompts), with a teacher stopped early so that its own exact match is about 0.67, and an exact-match reward
(``tests/harness/quality_reward.py``, passed with ``--external_plugins``).  From the same warm-started
student, with the same steps, completions per step, completions per prompt (G), learning-rate schedule and seeds:

* ``gkd``: on-policy GKD (``--lmbda 1 --num_generations G --gkd_rl_coef 0``; the reward is only logged);
* ``grpo``: ms-swift's ``swift rlhf --rlhf_type grpo`` with the same reward (``--beta 0``: no reference model,
  ``--loss_type dapo``: the policy-gradient term normalised per token over the step, as GKD + RL's is);
* ``gkd_rl_c<c>``: GKD + RL (``--gkd_rl_coef c``), for each coefficient of ``--coefs``;
* ``sft``: ``swift sft`` on the dataset's (always right) references, for reference.

Outputs (under ``--workdir``): ``results.json``, ``results.csv``, ``exact_match_vs_step.png``, ``exact_match_bar.png``,
markdown tables on stdout (last checkpoint; every checkpoint), and as the last line of stdout the ``rl: ...`` summary.
The teacher and student live in ``<workdir>/workspace_rl`` (not ``bench_quality.py``'s ``workspace``).
"""
from __future__ import annotations

import os
import sys
import time
from typing import Any, Dict, List

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_quality as bq  # noqa: E402

from swift_gkd_plugin.demo import quality_task  # noqa: E402

#: teacher_steps 65: the teacher is stopped just before it has learnt the rule (greedy exact match 0.67; at 60 steps
#: 0.50, at 70 already 0.94).  student_steps 80: a start whose temperature-0.5 samples are right often enough
#: (about 14%) for a reward to have a signal with G = 4 (at 60 steps, under 1%).
PRESETS = {
    'quick': dict(bq.PRESETS['quick'], batch_size=64, teacher_steps=65, student_steps=80),
    'full': dict(bq.PRESETS['full'], batch_size=64, steps=100, teacher_steps=65, student_steps=80),
}
#: Sampling (and loss) temperature: at 1.0 the warm start's samples are almost never right (exact match 0.005).
TEMPERATURE = '0.5'
#: 3e-4 with 16 prompts (64 completions) per step: at 1e-3, or with 4 prompts per step, every on-policy method first
#: lost most of the start's exact match (0.45 -> 0.0-0.2 in 10-20 steps).
LEARNING_RATE = '3e-4'
NUM_GENERATIONS = '4'
#: JSD(0.5): bounded, ms-swift's default, and the best on-policy divergence of bench_quality.py at temperature 1.
BETA = '0.5'
#: --gkd_rl_coef: 1 was the best of 0.5 / 1 / 2 / 4 / 20 in the quick preset's pilot (seed 0, docs_en/rl_results.md).
COEFS = ('1',)
REWARD_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'tests/harness/quality_reward.py')
REWARD = {'reward_funcs': 'sort_exact_match', 'external_plugins': REWARD_FILE}
GKD = {'lmbda': '1', 'beta': BETA, 'num_generations': NUM_GENERATIONS, 'gkd_loss_impl': 'dense', **REWARD}
GRPO = {'rlhf_type': 'grpo', 'teacher_model': None, 'teacher_model_type': None, 'beta': '0', 'use_vllm': 'false',
        'loss_type': 'dapo', 'num_generations': NUM_GENERATIONS, **REWARD}


def rl_methods(coefs) -> Dict[str, tuple]:
    """method -> (swift command, flags), as ``bench_quality.METHODS``."""
    return {'gkd': ('rlhf', dict(GKD, gkd_rl_coef='0')), 'grpo': ('rlhf', GRPO),
            **{f'gkd_rl_c{c}': ('rlhf', dict(GKD, gkd_rl_coef=c)) for c in coefs}, 'sft': ('sft', {})}


def build_workspace(workdir: str, cfg: Dict[str, Any]) -> Dict[str, Any]:
    return quality_task.build_workspace(os.path.join(workdir, 'workspace_rl'), n_train=cfg['n_train'],
                                        n_test=cfg['n_test'], teacher_steps=cfg['teacher_steps'],
                                        student_steps=cfg['student_steps'], log=bq.log)


def checkpoint_table(curves) -> str:
    """Exact match (mean ± std over seeds) of every method at every checkpoint."""
    steps = [p['step'] for p in next(iter(next(iter(curves.values())).values()))]
    lines = ['| method | ' + ' | '.join(f'step {s}' for s in steps) + ' |', '|---' * (len(steps) + 1) + '|']
    for method, by_seed in curves.items():
        cells = [bq.mean_std([c[i]['exact_match'] for c in by_seed.values()]) for i in range(len(steps))]
        lines.append(f'| {method} | ' + ' | '.join(f'{m:.3f} ± {s:.3f}' for m, s in cells) + ' |')
    return '\n'.join(lines)


def closing_line(summary, ws, coef: str) -> str:
    """The ``rl: ...`` line; ``gkd_rl`` is the run with ``coef`` (chosen beforehand, not the best afterwards)."""
    em = {m: summary[m]['exact_match'] for m in summary}
    parts = [f"rl: teacher {ws['teacher_eval']['exact_match']:.3f}, start {ws['student_eval']['exact_match']:.3f}"]
    parts += [f'{name} {em[m][0]:.3f}+-{em[m][1]:.3f}' for name, m in (('gkd', 'gkd'), ('grpo', 'grpo'),
                                                                      ('gkd_rl', f'gkd_rl_c{coef}'), ('sft', 'sft'))]
    return ', '.join(parts) + f' (gkd_rl: c {coef}; G {NUM_GENERATIONS}, T {bq.TEMPERATURE})'


def parse_args(argv=None):
    parser = bq.common_parser(__doc__, 'bench_rl_out', ('gkd', 'grpo', 'gkd_rl', 'sft'), TEMPERATURE, LEARNING_RATE)
    parser.add_argument('--coefs', nargs='+', default=list(COEFS),
                        help=f'the --gkd_rl_coef values of the gkd_rl_c<c> methods {list(COEFS)}; the closing line '
                        'reports the first')
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    methods = rl_methods(args.coefs)
    names = [m for m in methods if m in args.methods or m.startswith('gkd_rl_c') and 'gkd_rl' in args.methods]
    cfg = bq.configure(args, PRESETS)
    workdir = os.path.abspath(args.workdir)
    t0 = time.time()
    bq.log(f"rl preset {'quick' if args.quick else 'full'}: {cfg}, learning rate {bq.LEARNING_RATE}, temperature "
           f"{bq.TEMPERATURE}, G {NUM_GENERATIONS}, beta {BETA}, coefficients {args.coefs}")
    ws = build_workspace(workdir, cfg)
    curves = bq.collect_curves(names, ws, cfg, workdir, methods)
    summary = bq.summarise(curves)
    pngs = bq.write_results(workdir, cfg, ws, curves, summary, t0, methods=methods, num_generations=NUM_GENERATIONS,
                            beta=BETA)
    print(bq.markdown_table(summary, ws, len(cfg['seeds']), cfg['steps']))
    print()
    print(checkpoint_table(curves))
    bq.log(f"wrote results.json, results.csv, {', '.join(map(os.path.basename, pngs))} to {workdir} "
           f"({time.time() - t0:.0f}s in all)")
    if {'gkd', 'grpo', f'gkd_rl_c{args.coefs[0]}', 'sft'} <= set(summary):
        print(closing_line(summary, ws, args.coefs[0]))
    return 0


if __name__ == '__main__':
    sys.exit(main())
