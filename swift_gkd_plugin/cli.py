"""``swift-gkd``: helper commands of the plugin.

    swift-gkd plugin-path        the file to pass to --external_plugins (explicit activation)
    swift-gkd demo [--steps N]   build a tiny teacher and a warm-started student offline, distil one into the
                                 other on CPU and report free-running exact match before and after
    swift-gkd serve-teacher --model PATH [--template T] [--port 8000] [--topk 64] ...
                                 serve a teacher's top-k log-probabilities over HTTP (no vLLM needed)
    swift-gkd version
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time

import swift_gkd_plugin

LEARNING_RATE = '3e-3'

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


def demo_command(ws: dict, output_dir: str, steps: int, lmbda: float, seed: int) -> list:
    """The ``swift rlhf`` command line of the demo (also a working example of the flags a CPU run needs)."""
    return [
        swift_executable(), 'rlhf', '--rlhf_type', 'gkd',
        '--model', ws['student'], '--model_type', 'qwen3',
        '--teacher_model', ws['teacher'], '--teacher_model_type', 'qwen3',
        '--template', 'qwen3_nothinking',
        '--dataset', ws['train'],
        '--tuner_type', 'full', '--torch_dtype', 'float32', '--check_model', 'false',
        '--lmbda', str(lmbda), '--beta', '0.5', '--temperature', '1.0', '--max_completion_length', '16',
        '--max_steps', str(steps), '--learning_rate', LEARNING_RATE, '--warmup_ratio', '0.0',
        '--lr_scheduler_type', 'constant',
        '--per_device_train_batch_size', '8', '--gradient_accumulation_steps', '1',
        '--max_length', '128', '--logging_steps', '5',
        '--save_strategy', 'steps', '--save_steps', str(steps), '--save_only_model', 'true', '--add_version', 'false',
        '--report_to', 'none', '--dataloader_num_workers', '0', '--dataset_num_proc', '1',
        '--seed', str(seed), '--output_dir', output_dir,
    ]


#: Supervised steps that warm-start the demo's student (the GKD paper's setting: distillation starts from a
#: supervised-FT student): it then writes well-formed answers, many of them wrong.
DEMO_WARM_START_STEPS = 60  # held-out exact match about 0.2 on the reversal task
PLUGIN_ACTIVE_MARK = 'GKD trainer active'


def log(msg: str) -> None:
    print(f'[swift-gkd demo] {msg}', flush=True)


def run_logged(cmd: list, env: dict) -> tuple:
    """Run ``cmd``, echoing its output as it comes; return ``(exit code, whole output)``."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    lines = []
    for line in proc.stdout:
        sys.stdout.write(line)
        lines.append(line)
    return proc.wait(), ''.join(lines)


def demo_metrics(model_dir: str, tokenizer, rows) -> tuple:
    """(free-running greedy exact match, teacher-forced next-token accuracy) on ``rows``."""
    from swift_gkd_plugin.testing import quality_task, tiny
    return quality_task.reference_exact_match(model_dir, tokenizer, rows), tiny.score(model_dir, tokenizer, rows)


def run_demo(args) -> int:
    from swift_gkd_plugin.testing import tiny

    root = os.path.abspath(args.workdir)
    t0 = time.time()
    log(f'building the tiny teacher and a warm-started student in {root} (cached after the first run) ...')
    ws = tiny.build_demo_workspace(root, seed=args.seed, teacher_steps=args.teacher_steps,
                                   student_steps=DEMO_WARM_START_STEPS, verbose=True)
    test_rows = tiny.read_dataset(ws['test'])
    tokenizer = tiny.load_tokenizer(ws['student'])
    log('scoring the teacher and the student on the held-out prompts ...')
    teacher, before = demo_metrics(ws['teacher'], tokenizer, test_rows), demo_metrics(ws['student'], tokenizer, test_rows)
    log(f'ready in {time.time() - t0:.0f}s: teacher {ws["teacher_parameters"]:,} parameters, '
        f'student {ws["student_parameters"]:,} parameters')

    output_dir = os.path.join(root, 'output')
    shutil.rmtree(output_dir, ignore_errors=True)
    cmd = demo_command(ws, output_dir, args.steps, args.lmbda, args.seed)
    log('running: ' + ' '.join(cmd))
    env = dict(os.environ, **OFFLINE_ENV)  # SWIFT_GKD_PLUGIN is the user's: =0 must show up as an error below
    returncode, output = run_logged(cmd, env)
    if returncode != 0:
        print(f'[swift-gkd demo] swift rlhf failed with exit code {returncode}', file=sys.stderr)
        return returncode
    if PLUGIN_ACTIVE_MARK not in output:
        print(f'[swift-gkd demo] ERROR: the swift rlhf run did not use swift-gkd-plugin (no "{PLUGIN_ACTIVE_MARK}" '
              'in its log): ms-swift\'s own GKD trainer ran. Check that SWIFT_GKD_PLUGIN is not 0 and that the '
              'plugin\'s start-up .pth is installed (pip install swift-gkd-plugin, or pass '
              '--external_plugins "$(swift-gkd plugin-path)").', file=sys.stderr)
        return 3
    trained = os.path.join(output_dir, f'checkpoint-{args.steps}')
    after = demo_metrics(trained, tokenizer, test_rows)
    print('')
    log(f'{len(test_rows)} held-out prompts; exact match = greedy free-running answer equals the reference, '
        'next-token = teacher-forced accuracy on the reference tokens:')
    print(f'    {"":22}exact match   next-token')
    for name, (em, nt) in (('teacher', teacher), ('student before GKD', before), ('student after GKD', after)):
        print(f'    {name:22}{em:11.3f}   {nt:10.3f}')
    print(f'    ({args.steps} GKD steps, lmbda={args.lmbda}, {time.time() - t0:.0f}s in all; trained student: {trained})')
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog='swift-gkd', description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = parser.add_subparsers(dest='command', required=True)
    sub.add_parser('plugin-path', help='print the file to pass to --external_plugins')
    sub.add_parser('version', help='print the plugin version')
    demo = sub.add_parser('demo', help='distil a tiny teacher into a tiny student on CPU, offline')
    demo.add_argument('--workdir', default='swift_gkd_demo', help='where models, data and outputs go')
    demo.add_argument('--steps', type=int, default=40, help='GKD optimizer steps')
    demo.add_argument('--lmbda', type=float, default=1.0, help='probability of an on-policy step (1: every step)')
    demo.add_argument('--seed', type=int, default=0)
    demo.add_argument('--teacher_steps', type=int, default=250, help='supervised steps that train the teacher')
    from swift_gkd_plugin.server import cli as server_cli
    serve = sub.add_parser('serve-teacher', help="serve a teacher's top-k log-probabilities over HTTP (no vLLM)")
    server_cli.add_arguments(serve)
    args = parser.parse_args(argv)
    if args.command == 'serve-teacher':
        return server_cli.run(args)
    if args.command == 'plugin-path':
        print(plugin_path())
        return 0
    if args.command == 'version':
        print(swift_gkd_plugin.__version__)
        return 0
    return run_demo(args)


if __name__ == '__main__':
    sys.exit(main())
