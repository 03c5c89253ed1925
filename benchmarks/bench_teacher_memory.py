"""Peak memory of LoRA self-distillation with a shared base versus the same run with the teacher loaded separately.

Builds a ~50M-parameter Qwen3-style model offline, runs ``swift rlhf --rlhf_type gkd`` twice for a few steps
(``--teacher_model`` = ``--model``: one copy of the base; ``--teacher_model`` = the same files under another path:
ms-swift loads a second copy), and reports the peak resident memory of each training process (``ru_maxrss`` of the
largest child) next to the model's parameter bytes.

    python benchmarks/bench_teacher_memory.py [--workdir DIR] [--steps N]
"""
from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile

OFFLINE = dict(HF_HUB_OFFLINE='1', HF_DATASETS_OFFLINE='1', TRANSFORMERS_OFFLINE='1', MODELSCOPE_OFFLINE='1', USE_HF='1')
MODEL = dict(hidden_size=640, num_layers=10, num_heads=10, num_kv_heads=5, intermediate_size=1920)


def peak_rss_of(cmd, env) -> int:
    """Run ``cmd`` in a fresh interpreter and return the peak RSS (bytes) of its largest descendant."""
    probe = ('import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); '
             'print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024); sys.exit(r.returncode)')
    out = subprocess.run([sys.executable, '-c', probe] + cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return int(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--workdir', default=None)
    parser.add_argument('--steps', type=int, default=3)
    args = parser.parse_args()
    from swift_gkd_plugin.demo import tiny

    root = args.workdir or tempfile.mkdtemp(prefix='bench_teacher_memory_')
    model_dir = os.path.join(root, 'model')
    if not os.path.exists(os.path.join(model_dir, 'config.json')):
        tok = tiny.build_tokenizer(os.path.join(root, 'tok'))
        tiny.build_model(model_dir, tok, seed=0, **MODEL)
        tiny.write_dataset(os.path.join(root, 'train.jsonl'), tiny.make_rows(64, seed=0))
    alias = os.path.join(root, 'model_alias')
    if not os.path.exists(alias):
        os.symlink(model_dir, alias)
    params = tiny.count_parameters(model_dir)
    param_bytes = params * 4
    swift = os.path.join(os.path.dirname(sys.executable), 'swift')
    env = dict(os.environ, **OFFLINE)
    results = {}
    for name, teacher in (('shared base', model_dir), ('separate teacher', alias)):
        cmd = [swift, 'rlhf', '--rlhf_type', 'gkd', '--model', model_dir, '--model_type', 'qwen3',
               '--teacher_model', teacher, '--teacher_model_type', 'qwen3', '--template', 'qwen3_nothinking',
               '--dataset', os.path.join(root, 'train.jsonl'), '--tuner_type', 'lora', '--torch_dtype', 'float32',
               '--check_model', 'false', '--lmbda', '0', '--max_steps', str(args.steps),
               '--per_device_train_batch_size', '2', '--gradient_accumulation_steps', '1', '--save_strategy', 'no',
               '--report_to', 'none', '--dataloader_num_workers', '0', '--dataset_num_proc', '1',
               '--output_dir', os.path.join(root, 'out_' + name.replace(' ', '_'))]
        results[name] = peak_rss_of(cmd, env)
    mib = 2**20
    print(f'model: {params / 1e6:.1f}M parameters, {param_bytes / mib:.0f} MiB in float32')
    for name, rss in results.items():
        print(f'{name:>17}: peak RSS {rss / mib:8.0f} MiB')
    saved = results['separate teacher'] - results['shared base']
    print(f'shared base saves {saved / mib:.0f} MiB = {saved / param_bytes:.2f}x the parameter bytes '
          '(target: at least 0.80x)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
