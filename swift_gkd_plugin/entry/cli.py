"""``swift-gkd``: helper commands of the plugin (:data:`DESCRIPTION` is its ``--help``)."""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time

import swift_gkd_plugin
from swift_gkd_plugin.runtime.process_exit import PLUGIN_FLAGS_OFF

#: The demo's distillation settings, chosen by measurement over seeds and 1 and 2 threads (docs_en/quality_results.md,
#: "The demo"): the GKD paper's on-policy mode, sampling at temperature 0.5, from a student warm-started to
#: well-formed answers, at a learning rate and batch size at which one run's float rounding cannot flip the sign of
#: its result (SKD, --skd_top_k 1, is the option).
LEARNING_RATE = '1e-3'
BATCH_SIZE = 16
DEMO_STEPS = 80
DEMO_SKD_TOP_K = 0
DEMO_SAMPLING_TEMPERATURE = 0.5
#: Checkpoints of the demo's run scored for its exact-match curve (one every steps / 4; the last is the trained one).
DEMO_CURVE_POINTS = 4
#: Steps per logged row of the demo's run (the per-window modes and SKD replaced fraction printed at the end).
DEMO_LOGGING_STEPS = 10
#: Where the demo builds its models and writes its run (relative to the current folder).
DEMO_WORKDIR = 'swift_gkd_demo'

OFFLINE_ENV = {
    'HF_HUB_OFFLINE': '1',
    'HF_DATASETS_OFFLINE': '1',
    'TRANSFORMERS_OFFLINE': '1',
    'MODELSCOPE_OFFLINE': '1',
    'USE_HF': '1',
}


def plugin_path() -> str:
    return os.path.join(os.path.dirname(os.path.abspath(swift_gkd_plugin.__file__)), 'plugin', 'activate_swift_gkd.py')


def swift_executable() -> str:
    """ms-swift's ``swift`` script of this environment (even when the environment is not activated)."""
    beside = os.path.join(os.path.dirname(sys.executable), 'swift')
    return beside if os.path.exists(beside) else (shutil.which('swift') or 'swift')


def demo_command(ws: dict, output_dir: str, steps: int, lmbda: float, seed: int, skd_top_k: int = DEMO_SKD_TOP_K,
                 sampling_temperature=DEMO_SAMPLING_TEMPERATURE) -> list:
    """The ``swift rlhf`` command line of the demo (also a working example of the flags a CPU run needs)."""
    cmd = [
        swift_executable(), 'rlhf', '--rlhf_type', 'gkd',
        '--model', ws['student'], '--model_type', 'qwen3',
        '--teacher_model', ws['teacher'], '--teacher_model_type', 'qwen3',
        '--template', 'qwen3_nothinking',
        '--dataset', ws['train'],
        '--tuner_type', 'full', '--torch_dtype', 'float32', '--check_model', 'false',
        '--lmbda', str(lmbda), '--beta', '0.5', '--temperature', '1.0', '--max_completion_length', '16',
        '--max_steps', str(steps), '--learning_rate', LEARNING_RATE, '--warmup_ratio', '0.0',
        '--lr_scheduler_type', 'constant',
        '--per_device_train_batch_size', str(BATCH_SIZE), '--gradient_accumulation_steps', '1',
        '--max_length', '128', '--logging_steps', str(DEMO_LOGGING_STEPS),
        '--save_strategy', 'steps', '--save_steps', str(max(1, steps // DEMO_CURVE_POINTS)), '--save_only_model',
        'true', '--add_version', 'false',
        '--report_to', 'none', '--dataloader_num_workers', '0', '--dataset_num_proc', '1',
        '--seed', str(seed), '--output_dir', output_dir,
    ]
    if skd_top_k:  # left out when 0, so that the command line stays ms-swift's own (the plugin's check below)
        cmd += ['--gkd_skd_top_k', str(skd_top_k)]
    if sampling_temperature is not None:
        cmd += ['--gkd_sampling_temperature', str(sampling_temperature)]
    return cmd


DESCRIPTION = """Helper commands of swift-gkd-plugin, the GKD trainer of swift rlhf / megatron rlhf --rlhf_type gkd.

  swift-gkd demo [--seed S]     build a tiny teacher and a warm-started student offline in ./swift_gkd_demo,
                                distil one into the other on CPU (80 on-policy steps sampled with speculative KD),
                                print each step's mode and the SKD replaced fraction, and free-running exact
                                match before and after
  swift-gkd serve-teacher --model PATH [--template T] [--port 8000] [--top_k 64] ...
                                serve a teacher's top-k log-probabilities over HTTP (no vLLM needed)
  swift-gkd score --teacher_model PATH --dataset FILE --output_dir STORE ...
                                score a dataset with a teacher once, into a teacher-score store that swift rlhf /
                                megatron rlhf --teacher_scores STORE train from without the teacher (docs: teacher_store)
  swift-gkd plugin-path         the file to pass to --external_plugins (explicit activation)
  swift-gkd docs [--lang zh] [PAGE]
                                where the documentation is installed (help texts and errors cite its pages,
                                docs_en/PAGE.md; the Chinese ones: --lang zh or docs_zh/PAGE.md), or the path of one
  swift-gkd version             the plugin's version (also --version)

swift-gkd COMMAND --help describes each command."""

PLUGIN_ACTIVE_MARK = 'GKD trainer active'
#: What turns the plugin on for ``swift rlhf`` (the package is installed from its checkout, not a package index).
PLUGIN_OFF_ADVICE = ('Unset SWIFT_GKD_PLUGIN (or set it to 1), and check that the plugin\'s start-up file '
                     'swift_gkd_plugin.pth is in this environment\'s site-packages: reinstall the plugin from its '
                     'checkout (pip install -e . or pip install . there)')


def log(msg: str) -> None:
    print(f'[swift-gkd demo] {msg}', flush=True)


def run_logged(cmd: list, env: dict) -> tuple:
    """Run ``cmd``, echoing its output byte for byte as it comes; return ``(exit code, whole output)``. Bytes, not
    text lines: text mode turns each ``\r`` of a progress bar's redraw into a new line (the last bar printed three
    times)."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    chunks = []
    while True:
        chunk = os.read(proc.stdout.fileno(), 1 << 16)
        if not chunk:
            break
        raw = getattr(sys.stdout, 'buffer', None)  # (a replaced sys.stdout may have none)
        sys.stdout.flush()
        if raw is None:
            sys.stdout.write(chunk.decode('utf-8', errors='replace'))
        else:
            raw.write(chunk)
            raw.flush()
        chunks.append(chunk)
    proc.stdout.close()
    return proc.wait(), b''.join(chunks).decode('utf-8', errors='replace')


def demo_metrics(model_dir: str, tokenizer, rows) -> tuple:
    """(free-running greedy exact match, teacher-forced next-token accuracy) on ``rows``."""
    from swift_gkd_plugin.demo import quality_task, tiny
    return quality_task.reference_exact_match(model_dir, tokenizer, rows), tiny.score(model_dir, tokenizer, rows)


def demo_curves(output_dir: str, tokenizer, rows, before: float, after: float, teacher: float, title: str) -> str:
    """``<output_dir>/demo_curves.png`` (and its numbers in ``demo_curves.json``): the run's logged training loss, and
    the student's held-out exact match at step 0, at each checkpoint and at the end, beside the teacher's (a dashed
    line), the start and end values written at their points, under ``title`` (the method and the seed); returns the
    PNG's path."""
    import glob

    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    from swift_gkd_plugin.demo import quality_task
    with open(os.path.join(output_dir, 'logging.jsonl')) as f:
        logged = [row for row in map(json.loads, f) if 'loss' in row and 'global_step/max_steps' in row]
    checkpoints = sorted(glob.glob(os.path.join(output_dir, 'checkpoint-*')), key=lambda p: int(p.rsplit('-', 1)[1]))
    steps = [int(p.rsplit('-', 1)[1]) for p in checkpoints]
    matches = [quality_task.reference_exact_match(p, tokenizer, rows) for p in checkpoints[:-1]] + [after]
    curves = {'loss': [[int(r['global_step/max_steps'].split('/')[0]), r['loss']] for r in logged],
              'exact_match': [[0, before]] + [list(point) for point in zip(steps, matches)], 'teacher': teacher}
    with open(os.path.join(output_dir, 'demo_curves.json'), 'w') as f:
        json.dump(curves, f)
    figure, (loss, match) = plt.subplots(1, 2, figsize=(9, 3.2))
    loss.plot(*zip(*curves['loss']), 'o-')
    loss.set(xlabel='step', ylabel='training loss (GKD)', title='loss')
    match.plot(*zip(*curves['exact_match']), 'o-', label='student')
    match.axhline(teacher, color='gray', linestyle='--', label=f'teacher {teacher:.3f}')
    (x0, y0), (x1, y1) = curves['exact_match'][0], curves['exact_match'][-1]
    match.annotate(f'{y0:.3f}', (x0, y0), textcoords='offset points', xytext=(6, -12))
    match.annotate(f'{y1:.3f}', (x1, y1), textcoords='offset points', xytext=(-30, -14))
    match.set(xlabel='step', ylabel='held-out exact match', ylim=(0, 1.08), title='held-out exact match')
    match.legend(loc='lower right')
    figure.suptitle(title)
    figure.tight_layout()
    path = os.path.join(output_dir, 'demo_curves.png')
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


#: How the demo names a step's mode (an on-policy step samples with SKD when --gkd_skd_top_k > 0).
MODE_NAMES = {'on_policy': 'on-policy', 'off_policy': 'off-policy', 'seq_kd': 'seq-kd'}


def training_windows(output_dir: str, skd: bool) -> list:
    """``(first step, last step, modes, SKD replaced fraction or None)`` per logged window of a finished run, read
    from its mode log (``gkd_modes/rank0.jsonl``, one mode per step) and ``logging.jsonl`` (the replaced fraction
    of the window's drafted tokens); the modes are the steps' in order, on-policy named ``skd`` when ``skd``."""
    from swift_gkd_plugin.core.modes import mode_log_path
    with open(mode_log_path(output_dir, 0)) as f:
        modes = {row['step'] + 1: row['mode'] for row in map(json.loads, f)}  # the log counts steps from 0
    names = dict(MODE_NAMES, on_policy='skd') if skd else MODE_NAMES
    windows, first = [], 1
    with open(os.path.join(output_dir, 'logging.jsonl')) as f:
        for row in map(json.loads, f):
            if 'loss' not in row or 'global_step/max_steps' not in row:
                continue  # the closing summaries (train_runtime ..., log_history ...)
            last = int(row['global_step/max_steps'].split('/')[0])
            windows.append((first, last, [names[modes[s]] for s in range(first, last + 1)],
                            row.get('gkd/skd_replaced_fraction')))
            first = last + 1
    return windows


def run_length(names: list) -> str:
    """``['skd', 'skd', 'off-policy']`` -> ``'skd x2, off-policy'``: a window's modes, step by step."""
    runs = []
    for name in names:
        if runs and runs[-1][0] == name:
            runs[-1][1] += 1
        else:
            runs.append([name, 1])
    return ', '.join(name if n == 1 else f'{name} x{n}' for name, n in runs)


#: The demo's flags -> the ``swift rlhf`` flag whose declared range they take, and what the range's reason says in
#: the demo's terms (None: the ``swift rlhf`` flag's own).
DEMO_FLAG_RANGES = {'lmbda': ('lmbda', None), 'skd_top_k': ('gkd_skd_top_k', None),
                    'sampling_temperature': ('gkd_sampling_temperature',
                                             'the temperature the student samples at; the loss\'s stays 1.0')}
#: numpy's seeds (the demo's data and models are drawn with numpy and torch)
SEED_MAX = 2**32 - 1


def check_demo_args(args) -> None:
    """The demo's flags hold allowed values (ValueError naming flag, value and range): checked before the workspace
    is built, which takes a minute, rather than by ``swift rlhf`` after it."""
    import dataclasses

    from swift_gkd_plugin.options.flags import Range, declared_ranges
    ranges = declared_ranges()
    for name, (swift_flag, why) in DEMO_FLAG_RANGES.items():
        rule = ranges[swift_flag]
        if why is not None:
            rule = dataclasses.replace(rule, optional=False, why=why)
        rule.check(name, getattr(args, name))
    for name in ('steps', 'teacher_steps'):
        Range(1, integer=True, why='optimizer steps').check(name, getattr(args, name))
    Range(0, SEED_MAX, integer=True, says=f'an integer in [0, {SEED_MAX}]', why='numpy\'s seeds').check(
        'seed', args.seed)
    from swift_gkd_plugin.demo.tiny import MODEL_VOCAB_SIZE  # swift rlhf checks it once the models exist
    Range(0, MODEL_VOCAB_SIZE, integer=True, why=f'the demo\'s models have {MODEL_VOCAB_SIZE} output rows; 0 = off'
          ).check('skd_top_k', args.skd_top_k)
    if args.skd_top_k and args.lmbda == 0:  # swift rlhf's own rule (flags.check_sampling_flags), in the demo's names
        raise ValueError(f'--skd_top_k {args.skd_top_k} corrects the student\'s samples on on-policy steps, and '
                         '--lmbda 0 has none: set --lmbda > 0 or --skd_top_k 0')
    check_workdir(args.workdir)


def check_workdir(workdir: str) -> None:
    """``--workdir`` is a folder this process can create and write (ValueError naming it), checked before anything
    is built: the nearest part of the path that exists must be a folder with write permission."""
    root = os.path.abspath(workdir)
    path = root
    while not os.path.exists(path):
        path = os.path.dirname(path)
    where = '' if path == root else f' (the nearest existing part of {root})'
    if not os.path.isdir(path):
        raise ValueError(f'--workdir {workdir}: {path}{where} is a file, not a folder; pass a folder to build in')
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f'--workdir {workdir}: {path}{where} is not writable by this user; pass a folder you can '
                         'write to')


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and of the children it has waited for (cumulative: the demo
    reports the difference from its start, without what ran in this process before it, e.g. a shell's earlier
    commands when the shell exec'd the demo)."""
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in usage)


def run_demo(args) -> int:
    from swift_gkd_plugin.demo import tiny

    root = os.path.abspath(args.workdir)
    t0, cpu0 = time.time(), cpu_seconds()
    log(f'building the tiny teacher and a warm-started student in {root} (cached after the first run) ...')
    ws = tiny.build_warm_workspace(root, seed=args.seed, teacher_steps=args.teacher_steps, verbose=True)
    test_rows = tiny.read_dataset(ws['test'])
    tokenizer = tiny.load_tokenizer(ws['student'])
    log('scoring the teacher and the student on the held-out prompts ...')
    teacher = demo_metrics(ws['teacher'], tokenizer, test_rows)
    before = demo_metrics(ws['student'], tokenizer, test_rows)
    log(f'ready in {time.time() - t0:.0f}s: teacher {ws["teacher_parameters"]:,} parameters, '
        f'student {ws["student_parameters"]:,} parameters')

    output_dir = os.path.join(root, 'output')
    shutil.rmtree(output_dir, ignore_errors=True)
    cmd = demo_command(ws, output_dir, args.steps, args.lmbda, args.seed, args.skd_top_k, args.sampling_temperature)
    # SWIFT_GKD_PLUGIN is the user's (=0 must show up as an error below); one thread unless the user chose: these
    # models are too small to profit from more, and the result then does not depend on the machine's core count
    env = dict(os.environ, **OFFLINE_ENV)
    env.setdefault('OMP_NUM_THREADS', '1')
    log(f'running (OMP_NUM_THREADS={env["OMP_NUM_THREADS"]}): ' + ' '.join(cmd))
    returncode, output = run_logged(cmd, env)
    # without the plugin its flags are refused: in one line by its off-mode check (activation), else by ms-swift's own
    # parser (remaining_argv: ['--gkd_skd_top_k', ...])
    plugin_flags_unknown = PLUGIN_FLAGS_OFF in output or 'remaining_argv' in output and '--gkd_' in output
    if PLUGIN_ACTIVE_MARK not in output and (returncode == 0 or plugin_flags_unknown):
        what = ("the plugin's flags were refused (the plugin was not active when the command line was parsed), so "
                'nothing trained' if plugin_flags_unknown else "ms-swift's own GKD trainer ran instead")
        print(f'[swift-gkd demo] ERROR: the swift rlhf run did not use swift-gkd-plugin (no "{PLUGIN_ACTIVE_MARK}" '
              f'in its log): {what}. {PLUGIN_OFF_ADVICE}', file=sys.stderr)
        return 3
    if returncode != 0:
        print(f'[swift-gkd demo] swift rlhf failed with exit code {returncode}', file=sys.stderr)
        return returncode
    trained = os.path.join(output_dir, f'checkpoint-{args.steps}')
    after = demo_metrics(trained, tokenizer, test_rows)
    skd = args.skd_top_k > 0
    print('')
    what = ("each step's mode and the fraction of the student's drafted tokens that the teacher replaced "
            '(gkd/skd_replaced_fraction)') if skd else "each step's mode"
    log(f'training, per logged window: {what}:')
    for first, last, names, replaced in training_windows(output_dir, skd):
        rate = f'replaced {replaced:.3f}' if replaced is not None else ''
        print(f'    steps {f"{first}-{last}":8}{rate:18}{run_length(names)}')
    log(f'{len(test_rows)} held-out prompts; exact match = greedy free-running answer equals the reference, '
        'next-token = teacher-forced accuracy on the reference tokens:')
    print(f'    {"":22}exact match   next-token')
    for name, (em, nt) in (('teacher', teacher), ('student before GKD', before), ('student after GKD', after)):
        print(f'    {name:22}{em:11.3f}   {nt:10.3f}')
    sampler = f'SKD top-{args.skd_top_k}' if skd else 'plain sampling'
    method = (f'on-policy GKD ({sampler})' if args.lmbda == 1 else f'GKD, --lmbda {args.lmbda:g}' +
              (f' (on-policy steps by {sampler})' if args.lmbda > 0 else ' (supervised KD)'))
    curves = demo_curves(output_dir, tokenizer, test_rows, before[0], after[0], teacher[0],
                         f'swift-gkd demo: {method}, {args.steps} steps, seed {args.seed}')
    cpu = cpu_seconds() - cpu0
    print(f'    ({args.steps} GKD steps, lmbda={args.lmbda}, on-policy steps by {sampler}, {time.time() - t0:.0f}s '
          f'wall, {cpu:.0f}s CPU; trained student: {trained})')
    log(f'curves (training loss, held-out exact match by step): {curves}')
    return 0


#: The documentation's languages and their folders (shipped inside the package; docs_en is the authoritative one).
DOCS_LANGS = {'en': 'docs_en', 'zh': 'docs_zh'}


def docs_dir(lang: str = 'en') -> str:
    """The installed docs folder of ``lang`` (shipped inside the package), or the checkout's for an editable install."""
    package = os.path.dirname(os.path.abspath(swift_gkd_plugin.__file__))
    installed = os.path.join(package, DOCS_LANGS[lang])
    return installed if os.path.isdir(installed) else os.path.join(os.path.dirname(package), DOCS_LANGS[lang])


def docs_page(page: str, lang):
    """``(language, page name)`` of ``page`` as ``swift-gkd docs`` takes it: ``skd``, ``skd.md``, or with a language
    prefix ``docs_zh/skd.md``, ``zh/skd`` (the prefix wins over the default language, and must agree with ``--lang``).
    A longer path counts by its last folder. Raises ValueError for a prefix that is no language or contradicts
    ``--lang``: a prefix silently ignored served the English page for ``docs_zh/skd.md``."""
    parts = [p for p in page.replace(os.sep, '/').split('/') if p not in ('', '.')][-2:]
    if len(parts) == 2:
        prefix = parts[0][len('docs_'):] if parts[0].startswith('docs_') else parts[0]
        if prefix not in DOCS_LANGS:
            raise ValueError(f'no language {parts[0]!r} in page {page!r} (languages: '
                             f'{", ".join(sorted(DOCS_LANGS) + sorted(DOCS_LANGS.values()))})')
        if lang is not None and prefix != lang:
            raise ValueError(f'page {page!r} is in {DOCS_LANGS[prefix]}, not --lang {lang}')
        lang = prefix
    name = parts[-1] if parts else ''
    return lang or 'en', name[:-3] if name.endswith('.md') else name


def show_docs(page, lang=None) -> int:
    """``swift-gkd docs``: the folder and its pages, or the path of one page; a bad page is one line, exit code 2."""
    try:
        lang, name = docs_page(page, lang) if page is not None else (lang or 'en', None)
    except ValueError as e:
        print(f'swift-gkd docs: error: {e}', file=sys.stderr)
        return 2
    folder = docs_dir(lang)
    if not os.path.isdir(folder):
        print(f'swift-gkd docs: no {DOCS_LANGS[lang]} folder at {folder} (an installation without its docs)',
              file=sys.stderr)
        return 1
    pages = sorted(n[:-3] for n in os.listdir(folder) if n.endswith('.md'))
    if name is None:
        print(f'{folder}\npages: {", ".join(pages)} (swift-gkd docs [--lang {"|".join(DOCS_LANGS)}] PAGE prints '
              'the path of one)')
        return 0
    if name not in pages:
        print(f'swift-gkd docs: error: no page {page!r} in {DOCS_LANGS[lang]} (pages: {", ".join(pages)})',
              file=sys.stderr)
        return 2
    print(os.path.join(folder, f'{name}.md'))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog='swift-gkd', description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--version', action='version', version=f'swift-gkd-plugin {swift_gkd_plugin.__version__}')
    sub = parser.add_subparsers(dest='command', required=True, metavar='COMMAND')
    defaults = argparse.ArgumentDefaultsHelpFormatter
    sub.add_parser('plugin-path', help='print the file to pass to --external_plugins')
    sub.add_parser('version', help='print the plugin version')
    docs = sub.add_parser('docs', help='print where the documentation is installed, or the path of one page')
    docs.add_argument('page', nargs='?', default=None,
                      help='a page, e.g. skd, docs_en/skd.md, docs_zh/skd.md or zh/skd')
    docs.add_argument('--lang', choices=sorted(DOCS_LANGS), default=None,
                      help='the language of the docs (default: en; a page\'s docs_zh/ or zh/ prefix sets it too)')
    demo = sub.add_parser('demo', help='distil a tiny teacher into a tiny student on CPU, offline, in ./swift_gkd_demo',
                          formatter_class=defaults,
                          description='Build a tiny teacher and a warm-started student offline in --workdir (cached '
                          'there for the next run), distil one into the other on CPU with swift rlhf, and print the '
                          'student\'s exact match before and after. See docs_en/quality_results.md (swift-gkd docs quality_results).')
    demo.add_argument('--workdir', default=DEMO_WORKDIR, help='where models, data and outputs go (relative to the '
                      'current folder; the trained student ends up in WORKDIR/output)')
    demo.add_argument('--steps', type=int, default=DEMO_STEPS, help='GKD optimizer steps')
    demo.add_argument('--lmbda', type=float, default=1.0, help='probability of an on-policy step (1: every step)')
    demo.add_argument('--skd_top_k', type=int, default=DEMO_SKD_TOP_K,
                      help='--gkd_skd_top_k of the run: on-policy steps sample with speculative KD, the teacher '
                           'replacing drafted tokens outside its top-K (0: plain on-policy sampling)')
    demo.add_argument('--sampling_temperature', type=float, default=DEMO_SAMPLING_TEMPERATURE,
                      help='--gkd_sampling_temperature of the run (the loss temperature stays 1.0)')
    demo.add_argument('--seed', type=int, default=0, help='seed of the data, the models and the run')
    demo.add_argument('--teacher_steps', type=int, default=250, help='supervised steps that train the teacher')
    from swift_gkd_plugin.server import cli as server_cli
    serve = sub.add_parser('serve-teacher', help="serve a teacher's top-k log-probabilities over HTTP (no vLLM)",
                           formatter_class=defaults, description="Serve a teacher's top-k log-probabilities over HTTP "
                           'for swift rlhf --teacher_model_server. See docs_en/teacher_server.md (swift-gkd docs '
                           'teacher_server).')
    server_cli.add_arguments(serve)
    from swift_gkd_plugin.entry import score as score_cli
    score = sub.add_parser('score', help='score a dataset with a teacher once, into a teacher-score store',
                           formatter_class=defaults, description=score_cli.__doc__.split('\n')[0] + ' Other flags '
                           'go to swift rlhf as they are. See docs_en/teacher_store.md (swift-gkd docs teacher_store).')
    score_cli.add_arguments(score)
    args, rest = parser.parse_known_args(argv)
    if args.command == 'score':
        try:
            command = score_cli.score_command(args, rest)
        except ValueError as e:
            score.error(str(e))  # exit code 2, before anything loads
        return score_cli.run(args, rest) if command else 1
    if rest:
        parser.error(f'unrecognized arguments: {" ".join(rest)}')
    if args.command == 'serve-teacher':
        return server_cli.run(args, sys.argv[1:] if argv is None else argv)
    if args.command == 'plugin-path':
        print(plugin_path())
        return 0
    if args.command == 'version':
        print(swift_gkd_plugin.__version__)
        return 0
    if args.command == 'docs':
        return show_docs(args.page, args.lang)
    try:
        check_demo_args(args)
    except ValueError as e:
        demo.error(str(e))  # exit code 2 and the usage, before anything is built
    return run_demo(args)


if __name__ == '__main__':
    sys.exit(main())
