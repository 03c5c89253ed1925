"""``--preset tools``: multi-turn tool use (``demo.tool_task``: add two numbers through a calculator call); on-policy
GKD with and without the ``gkd_calculator`` scheduler against SFT and SeqKD, scored by the held-out success rate."""
from __future__ import annotations

import json
import os
import shutil
import time
from typing import Any, Dict, List

from swift_gkd_plugin.demo import tiny, tool_task

from quality_presets.common import log, mean_std
from quality_presets.remedies import remedy_methods, versus
from quality_presets.smollm import SMOLLM_REMEDIES

#: ``--preset tools``: the calculator task (swift_gkd_plugin.demo.tool_task), a teacher that uses the tool and the
#: student after a short supervised warm start on the reference trajectories (it calls the tool, mostly wrongly).
TOOLS_COMMON = dict(n_train=4000, n_test=200, teacher_steps=400, student_steps=100, batch_size=16,
                    max_completion_length=32)
TOOLS_PRESETS = {
    'quick': dict(TOOLS_COMMON, seeds=[0], steps=100, eval_every=25),
    'full': dict(TOOLS_COMMON, seeds=[0, 1, 2], steps=200, eval_every=25),
}
#: the repository's scheduler plugin (its absolute path is part of the runs' cache keys)
TOOL_SCHEDULER = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                              'swift_gkd_plugin', 'demo', 'tool_scheduler.py')
MULTI_TURN = {'multi_turn_scheduler': 'gkd_calculator', 'max_turns': str(tool_task.MAX_TURNS),
              'external_plugins': TOOL_SCHEDULER}
TOOLS_BASELINE_NAMES = ('onpolicy_tools', 'onpolicy_tools_fkl', 'onpolicy_tools_rkl', 'single_turn', 'seqkd_sft',
                        'seqkd_tools', 'sampled_kl_tools', 'sampled_kl_jsd_tools')
#: the remedies on the tools preset's best pure on-policy base, forward KL (beta 0) with the scheduler
TOOLS_REMEDY_NAMES = tuple(f'{m}_tools' for m in SMOLLM_REMEDIES)
TOOLS_METHOD_NAMES = TOOLS_BASELINE_NAMES + TOOLS_REMEDY_NAMES
TOOLS_METRICS = ('success', 'tool_call_rate', 'tool_call_correct', 'turns')


def tools_methods(ws: Dict[str, Any]) -> Dict[str, tuple]:
    """The tools preset's methods: on-policy GKD with the scheduler and without it (single turn), SFT on the teacher's
    tool-loop trajectories of the workspace (every assistant turn a target) and SeqKD with the scheduler."""
    return {
        'onpolicy_tools': ('rlhf', {'lmbda': '1', 'beta': '0.5', **MULTI_TURN}),
        'onpolicy_tools_fkl': ('rlhf', {'lmbda': '1', 'beta': '0', **MULTI_TURN}),  # forward KL: the SFT-like end
        'onpolicy_tools_rkl': ('rlhf', {'lmbda': '1', 'beta': '1', **MULTI_TURN}),  # reverse KL: the entropy mix's base
        'single_turn': ('rlhf', {'lmbda': '1', 'beta': '0.5'}),
        'seqkd_sft': ('sft', {'dataset': ws['teacher_trajectories']}),
        'seqkd_tools': ('rlhf', {'seq_kd': 'true', 'lmbda': '0', 'beta': '0.5', **MULTI_TURN}),
        # sampled-token distillation (docs_en/sampled_kl.md) on the student's own tool loops: the term alone, and
        # beside the JSD; the tool outputs are masked, skipped by the advantages
        'sampled_kl_tools': ('rlhf', {'lmbda': '1', 'gkd_sampled_kl_coef': '1', 'gkd_divergence_coef': '0',
                                      **MULTI_TURN}),
        'sampled_kl_jsd_tools': ('rlhf', {'lmbda': '1', 'beta': '0.5', 'gkd_sampled_kl_coef': '1', **MULTI_TURN}),
        **{f'{m}_tools': spec for m, spec in remedy_methods({'lmbda': '1', 'beta': '0', **MULTI_TURN},
                                                             {'lmbda': '1', 'beta': '1', **MULTI_TURN}).items()},
    }


def tools_curve(checkpoints: List[str], ws: Dict[str, Any], test_rows, tokenizer) -> List[Dict[str, Any]]:
    """:data:`TOOLS_METRICS` of the warm start (step 0) and of every checkpoint (:func:`tool_task.evaluate`)."""
    curve = [{'step': 0, **{m: ws['student_eval'][m] for m in TOOLS_METRICS}}]
    for path in checkpoints:
        metrics = tool_task.evaluate(path, tokenizer, test_rows, max_turns=tool_task.MAX_TURNS)
        curve.append({'step': int(path.rsplit('-', 1)[1]), **{m: metrics[m] for m in TOOLS_METRICS}})
    return curve


def collect_tools(bq, names: List[str], ws: Dict[str, Any], cfg: Dict[str, Any], workdir: str):
    """method -> seed -> curve (with the run's wall seconds) of the tools preset; each run's checkpoints are deleted
    once scored."""
    methods = tools_methods(ws)
    test_rows = tiny.read_dataset(ws['test'])
    tokenizer = tiny.load_tokenizer(ws['tokenizer'])
    curves: Dict[str, Dict[int, List[Dict[str, Any]]]] = {}
    runs = [(m, s) for s in cfg['seeds'] for m in names]
    for i, (method, seed) in enumerate(runs, 1):
        curve = bq.cached_curve(workdir, method, ws, cfg, seed, methods)
        if curve is None:
            log(f'[{i}/{len(runs)}] {method} seed {seed}: {cfg["steps"]} steps ...')
            t = time.time()
            checkpoints = bq.run_method(method, ws, cfg, seed, os.path.join(workdir, 'runs'), methods)
            wall = round(time.time() - t)
            curve = tools_curve(checkpoints, ws, test_rows, tokenizer)
            curve[-1]['train_wall_s'] = wall
            for path in checkpoints:
                shutil.rmtree(path, ignore_errors=True)
            bq.save_curve(workdir, method, ws, cfg, seed, curve, methods)
        curves.setdefault(method, {})[seed] = curve
        log(f'[{i}/{len(runs)}] {method} seed {seed}: success ' + ' -> '.join(f"{p['success']:.3f}" for p in curve) +
            f", tool calls {curve[-1]['tool_call_rate']:.3f} (train {curve[-1]['train_wall_s']}s wall)")
    return curves


def tools_summary(curves) -> Dict[str, Dict[str, Any]]:
    """method -> metric -> (mean, std) over seeds at the last step, and ``seeds`` (their number)."""
    return {method: {**{m: mean_std([c[-1][m] for c in by_seed.values()]) for m in TOOLS_METRICS},
                     'seeds': len(by_seed)} for method, by_seed in curves.items()}


def tools_table(summary, ws, steps: int) -> str:
    """Mean ± std over seeds of :data:`TOOLS_METRICS` after the last step; the teacher and the start first."""
    lines = [f'| method ({steps} steps) | ' + ' | '.join(TOOLS_METRICS) + ' | seeds |', '|---' * 6 + '|']
    for name, key in (('teacher', 'teacher_eval'), ('start (warm-started student)', 'student_eval')):
        lines.append(f'| {name} | ' + ' | '.join(f'{ws[key][m]:.3f}' for m in TOOLS_METRICS) + ' | |')
    for method, stats in summary.items():
        cells = ' | '.join(f'{stats[m][0]:.3f} ± {stats[m][1]:.3f}' for m in TOOLS_METRICS)
        lines.append(f"| {method} | {cells} | {stats['seeds']} |")
    return '\n'.join(lines)


def tools_closing_line(summary, ws) -> str:
    """``quality[tools]: ...``: the held-out success rate of the teacher, the start and each method (mean ± std,
    number of seeds)."""
    cells = ', '.join(f"{method} {stats['success'][0]:.3f}±{stats['success'][1]:.3f} ({stats['seeds']} seed"
                      f"{'s' if stats['seeds'] != 1 else ''})" for method, stats in summary.items())
    line = (f"quality[tools]: success rate (held-out): teacher {ws['teacher_eval']['success']:.3f}, "
            f"start {ws['student_eval']['success']:.3f}, {cells}")
    onpolicy = [m for m in summary if m.startswith(('onpolicy', 'op_'))]
    if 'seqkd_sft' not in summary or not onpolicy:
        return line
    best = max(onpolicy, key=lambda m: summary[m]['success'][0])
    stats = {m: summary[m]['success'] for m in summary}
    return f"{line}; best on-policy recipe {best} vs seqkd_sft: {versus(stats, best, 'seqkd_sft', -1)}"


def tools_main(bq, args) -> int:
    """The tools preset from ``bq`` (bench_quality.py's runner; its learning rate already set to the default's)."""
    cfg, workdir, t0 = bq.start(args, TOOLS_PRESETS, 'tools ')
    ws = tool_task.build_workspace(os.path.join(workdir, 'workspace_tools'), n_train=cfg['n_train'],
                                   n_test=cfg['n_test'], teacher_steps=cfg['teacher_steps'],
                                   student_steps=cfg['student_steps'], log=log)
    names = [m for m in args.methods if m in TOOLS_METHOD_NAMES]
    curves = collect_tools(bq, names, ws, cfg, workdir)
    summary = tools_summary(curves)
    outdir = os.path.join(workdir, 'tools')
    os.makedirs(outdir, exist_ok=True)
    result = {'config': cfg, 'learning_rate': bq.LEARNING_RATE, 'temperature': bq.TEMPERATURE,
              'teacher': {m: ws['teacher_eval'][m] for m in TOOLS_METRICS},
              'start': {m: ws['student_eval'][m] for m in TOOLS_METRICS},
              'teacher_parameters': ws['teacher_parameters'], 'student_parameters': ws['student_parameters'],
              'summary': summary, 'curves': curves, 'seconds': round(time.time() - t0)}
    with open(os.path.join(outdir, 'results.json'), 'w') as f:
        json.dump(result, f, indent=1)
    print(tools_table(summary, ws, cfg['steps']))
    log(f'wrote results.json to {outdir} ({time.time() - t0:.0f}s in all)')
    print(tools_closing_line(summary, ws))
    return 0
