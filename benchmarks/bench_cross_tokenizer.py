"""Cross-tokenizer GKD against same-tokenizer GKD (and SFT) on the quality benchmark's task (CPU, offline).

    python benchmarks/bench_cross_tokenizer.py                          # full preset: 3 seeds, 120 steps
    python benchmarks/bench_cross_tokenizer.py --preset quick --methods xtok_hybrid xtok_uld onpolicy_beta0.5 sft

Reuses ``bench_quality.py``'s workspace (teacher, warm-started student, data), runs and scoring; adds a teacher of
the same size and training whose tokenizer is sentencepiece-style (``tiny.build_sentencepiece_tokenizer``), and the
methods ``xtok_hybrid`` / ``xtok_uld`` (on-policy, ``--beta 0.5``, ``--gkd_cross_tokenizer``) that distil from it.
Prints each run's exact-match curve and, last, the share of the same-tokenizer gain that each cross-tokenizer method
keeps (docs_en/cross_tokenizer.md, "Measured").
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bench_quality as bq  # noqa: E402
from swift_gkd_plugin.testing import quality_task, tiny  # noqa: E402

CROSS = {'xtok_hybrid': 'hybrid', 'xtok_uld': 'uld'}
bq.METHODS.update({name: ('rlhf', {'lmbda': '1', 'beta': '0.5', 'gkd_cross_tokenizer': method})
                   for name, method in CROSS.items()})


def sentencepiece_teacher(root: str, ws, cfg) -> str:
    """The benchmark teacher's size and training, with the sentencepiece-style tokenizer (built once)."""
    out = os.path.join(root, 'sp_teacher')
    if not os.path.exists(os.path.join(out, 'done')):
        tok = tiny.build_sentencepiece_tokenizer(os.path.join(root, 'sp_tok'))
        tiny.build_model(out, tok, seed=0, **quality_task.TEACHER_KWARGS)
        tiny.train_teacher(out, tiny.read_dataset(ws['train']), steps=cfg['teacher_steps'], batch_size=64, seed=0)
        open(os.path.join(out, 'done'), 'w').close()
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--preset', choices=list(bq.PRESETS), default='full')
    parser.add_argument('--methods', nargs='+', choices=list(bq.METHODS), default=['xtok_hybrid', 'onpolicy_beta0.5'])
    parser.add_argument('--workdir', default='bench_cross_tokenizer_out')
    args = parser.parse_args(argv)
    cfg = dict(bq.PRESETS[args.preset])
    root = os.path.abspath(args.workdir)
    ws = quality_task.build_workspace(os.path.join(root, 'ws'), seed=0, n_train=cfg['n_train'], n_test=cfg['n_test'],
                                      teacher_steps=cfg['teacher_steps'], student_steps=cfg['student_steps'])
    sp_teacher = sentencepiece_teacher(root, ws, cfg)
    test_rows = tiny.read_dataset(ws['test'])
    tokenizer = tiny.load_tokenizer(ws['tokenizer'])
    final = {}
    for seed in cfg['seeds']:
        for method in args.methods:
            run_ws = dict(ws, teacher=sp_teacher) if method in CROSS else ws
            curve = bq.evaluate_curve(bq.run_method(method, run_ws, cfg, seed, os.path.join(root, 'runs')), ws,
                                      test_rows, tokenizer)
            bq.log(f"{method} seed {seed}: {[(c['step'], c['exact_match']) for c in curve]}")
            final.setdefault(method, []).append(curve[-1]['exact_match'])
    start = ws['student_eval']['exact_match']
    same = final.get('onpolicy_beta0.5')
    for method, values in final.items():
        kept = ''
        if method in CROSS and same:
            share = (statistics.mean(values) - start) / (statistics.mean(same) - start)
            kept = f', {share:.0%} of the same-tokenizer gain'
        print(f'{method}: exact match {statistics.mean(values):.3f} (start {start:.3f}){kept}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
