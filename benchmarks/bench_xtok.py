"""Cross-tokenizer GKD against same-tokenizer GKD and SFT (issue 13, Measure; CPU, offline).

    python benchmarks/bench_xtok.py --quick          # 1 seed, short runs
    python benchmarks/bench_xtok.py --quick --seeds 0 1 2
    python benchmarks/bench_xtok.py --help

The task, the student, its warm start, the steps, batch, learning-rate schedule and the scoring are
``bench_quality.py``'s (sort eight letters, greedy free-running exact match on held-out prompts).  Besides the
same-tokenizer teacher (byte-level BPE, as the student's) the workspace gets a teacher of another tokenizer family:
a sentencepiece-style Metaspace BPE with byte fallback trained on the task's text, a model of the same size trained
the same way (``quality_task.build_xtok_teacher``).  From the same warm start, with the same seeds:

* ``sft``: ``swift sft`` on the dataset's references;
* ``gkd_same``: ``swift rlhf --rlhf_type gkd`` with the same-tokenizer teacher (``--lmbda`` / ``--beta`` below);
* ``gkd_xtok_uld`` / ``gkd_xtok_hybrid``: the same flags with the other-family teacher and
  ``--gkd_cross_tokenizer uld`` / ``hybrid``.

The default GKD mode is on-policy (``--lmbda 1 --beta 0.5``) at temperature 0.5, the best on-policy temperature
measured by ``bench_quality.py`` (docs_en/quality_results.md; beta 0.5, ms-swift's default, within the spread of beta 0);
on-policy is also the mode where the cross-tokenizer path does the most (the student's samples are decoded and
re-encoded for the teacher).  ``--lmbda 0 --beta 0 --temperature 1.0`` measures supervised KD.  Results:
docs_en/cross_tokenizer_results.md.

Outputs (under ``--workdir``): ``results.json``, ``results.csv``, ``exact_match_vs_step.png``, ``exact_match_bar.png``,
a markdown table on stdout, and as the last line of stdout ``xtok: same-tokenizer gain G, uld keeps X%, hybrid keeps
Y% ...`` where a gain is a method's final exact match minus the start's (means over seeds).  The models live in
``<workdir>/workspace`` (``bench_quality.py``'s layout: ``--workdir bench_quality_out`` reuses its teacher and
student).
"""
from __future__ import annotations

import os
import sys
import time
from typing import Any, Dict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_quality as bq  # noqa: E402

from swift_gkd_plugin.demo import quality_task  # noqa: E402

PRESETS = bq.PRESETS
#: bench_quality.py's best on-policy setting: temperature 0.5 doubled on-policy exact match against 1.0.
TEMPERATURE = '0.5'
LMBDA = '1'
BETA = '0.5'
METHOD_NAMES = ('sft', 'gkd_same', 'gkd_xtok_uld', 'gkd_xtok_hybrid')
#: not run by default: ULD with the student's cross-entropy on the dataset's responses (the ULD paper trains with both;
#: ``--sft_alpha`` only acts on dataset responses, so it needs ``--lmbda 0``)
EXTRA_METHODS = ('gkd_xtok_uld_sft', )


def xtok_methods(ws: Dict[str, Any], lmbda: str, beta: str, seq_kd: bool = False) -> Dict[str, tuple]:
    """method -> (swift command, flags), as ``bench_quality.METHODS``: the GKD methods differ only in the teacher."""
    gkd = {'lmbda': lmbda, 'beta': beta, **({'seq_kd': 'true'} if seq_kd else {})}
    xtok = dict(gkd, teacher_model=ws['xtok_teacher'])
    return {'sft': ('sft', {}), 'gkd_same': ('rlhf', gkd),
            'gkd_xtok_uld': ('rlhf', dict(xtok, gkd_cross_tokenizer='uld')),
            'gkd_xtok_hybrid': ('rlhf', dict(xtok, gkd_cross_tokenizer='hybrid')),
            'gkd_xtok_uld_sft': ('rlhf', dict(xtok, gkd_cross_tokenizer='uld', sft_alpha='1'))}


def build_workspace(workdir: str, cfg: Dict[str, Any]) -> Dict[str, Any]:
    """bench_quality.py's workspace plus the other-family teacher, trained with the same steps."""
    ws = bq.workspace(workdir, cfg)
    xtok = quality_task.build_xtok_teacher(os.path.dirname(ws['teacher']), teacher_steps=cfg['teacher_steps'],
                                           prefix_space=cfg.get('xtok_prefix_space', True), log=bq.log)
    xtok['xtok_teacher_eval']['teacher_agreement'] = quality_task.agreement(xtok['xtok_teacher_eval']['answers'],
                                                                            ws['teacher_eval']['answers'])
    return {**ws, **xtok}


def gains(summary, ws) -> Dict[str, tuple]:
    """method -> (final exact match minus the start's, std over seeds)."""
    start = ws['student_eval']['exact_match']
    return {m: (stats['exact_match'][0] - start, stats['exact_match'][1]) for m, stats in summary.items()}


def kept_percent(gain: float, same_gain: float) -> float:
    return gain / same_gain * 100 if same_gain else float('nan')


def closing_line(summary, ws, lmbda: str, beta: str) -> str:
    g = gains(summary, ws)
    same = g['gkd_same'][0]
    return (f"xtok: same-tokenizer gain {same:.3f}+-{g['gkd_same'][1]:.3f}, "
            f"uld keeps {kept_percent(g['gkd_xtok_uld'][0], same):.0f}% (gain {g['gkd_xtok_uld'][0]:.3f}), "
            f"hybrid keeps {kept_percent(g['gkd_xtok_hybrid'][0], same):.0f}% (gain {g['gkd_xtok_hybrid'][0]:.3f}), "
            f"sft gain {g['sft'][0]:.3f}; start {ws['student_eval']['exact_match']:.3f}, teachers "
            f"{ws['teacher_eval']['exact_match']:.3f} (same) / {ws['xtok_teacher_eval']['exact_match']:.3f} (xtok); "
            f"lmbda {lmbda}, beta {beta}, T {bq.TEMPERATURE}")


def parse_args(argv=None):
    parser = bq.common_parser(__doc__, 'bench_xtok_out', METHOD_NAMES + EXTRA_METHODS, TEMPERATURE)
    parser.set_defaults(methods=list(METHOD_NAMES))
    parser.add_argument('--lmbda', default=LMBDA, help=f'--lmbda of the three GKD methods ({LMBDA}: on-policy)')
    parser.add_argument('--beta', default=BETA, help=f'--beta of the three GKD methods ({BETA})')
    parser.add_argument('--seq_kd', action='store_true',
                        help='--seq_kd true for the GKD methods: off-policy steps train on the teacher\'s samples '
                        '(with --lmbda 0: sequence-level KD on every step; the other-family teacher samples through '
                        'its own template)')
    parser.add_argument('--xtok_no_prefix_space', action='store_true',
                        help="a teacher tokenizer that prepends no '▁' to a text's first word (Gemma style)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg, workdir, t0 = bq.start(args, PRESETS, 'xtok ', lmbda=args.lmbda, beta=args.beta)
    if args.xtok_no_prefix_space:  # part of every run's cache key: the teacher differs
        cfg['xtok_prefix_space'] = False
    ws = build_workspace(workdir, cfg)
    methods = xtok_methods(ws, args.lmbda, args.beta, args.seq_kd)
    curves = bq.collect_curves(args.methods, ws, cfg, workdir, methods)
    summary = bq.summarise(curves)
    pngs = bq.write_results(workdir, cfg, ws, curves, summary, t0, methods=methods, lmbda=args.lmbda, beta=args.beta,
                            xtok_teacher=bq._without_answers(ws['xtok_teacher_eval']),
                            xtok_teacher_parameters=ws['xtok_teacher_parameters'])
    reference_models = bq.REFERENCE_MODELS[:1] + (('teacher, other tokenizer', 'xtok_teacher_eval'),) + \
        bq.REFERENCE_MODELS[1:]
    print(bq.markdown_table(summary, ws, len(cfg['seeds']), cfg['steps'], reference_models))
    bq.log(f"wrote results.json, results.csv, {', '.join(map(os.path.basename, pngs))} to {workdir} "
           f"({time.time() - t0:.0f}s in all)")
    if set(METHOD_NAMES) <= set(summary):
        print(closing_line(summary, ws, args.lmbda, args.beta))
    return 0


if __name__ == '__main__':
    sys.exit(main())
