"""The example scripts' CPU mode (``GKD_EXAMPLE_TINY``, examples/README.md): a script run as a user runs it, with
only that variable set, trains the tiny models on CPU with the plugin active, in the modes its comments promise.

Two scripts, two mode mixes: ``gkd_seq_kd_full.sh`` (every step sampled by the teacher, full tuning) and
``gkd_mixed_modes_lora.sh`` (on-policy and seq_kd steps, a LoRA student); and a GPU-only script refuses the mode.
"""
import glob
import json
import math
import os
import signal
import subprocess
import sys

import pytest
from conftest import OFFLINE_ENV

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'examples')
STEPS = 10  # the CPU mode's default GKD_EXAMPLE_TINY_STEPS


@pytest.fixture
def tiny_dir(trained_ws, tmp_path):
    """A CPU-mode workspace: the session's demo models, linked, and this test's own runs folder."""
    root = tmp_path / 'tiny'
    root.mkdir()
    for name in ('student', 'teacher', 'tokenizer', 'train.jsonl', 'test.jsonl', 'tiny_workspace.json'):
        os.symlink(os.path.join(trained_ws['root'], name), root / name)
    return str(root)


def run_example(script, tiny, cwd, timeout=300):
    """``bash examples/SCRIPT`` with GKD_EXAMPLE_TINY, in an environment without the variables the mode must set."""
    env = {k: v for k, v in os.environ.items() if k not in OFFLINE_ENV and not k.startswith('SWIFT_GKD')}
    env.pop('TRITON_INTERPRET', None)  # the test process's, not a user's
    env.update(GKD_EXAMPLE_TINY=tiny, PATH=os.path.dirname(sys.executable) + os.pathsep + env['PATH'])
    proc = subprocess.Popen(['bash', os.path.join(EXAMPLES, script)], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:  # the script's whole process group: launchers and servers included
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def changed_tensors(before: dict, after: dict) -> int:
    return sum(1 for name, tensor in after.items() if name in before and not tensor.equal(before[name]))


@pytest.mark.parametrize('script, modes', [('gkd_seq_kd_full.sh', {'seq_kd'}),
                                           ('gkd_mixed_modes_lora.sh', {'on_policy', 'seq_kd'})])
def test_example_trains_the_tiny_models_on_cpu(script, modes, tiny_dir, tmp_path):
    """Exit 0 with the plugin active; one CPU process, one thread, no DeepSpeed or vLLM; a finite loss logged every
    step; the step's modes are those of the script's --lmbda / --seq_kd (never off-policy: both set --seq_kd true);
    the last checkpoint's trained weights differ from the tiny student's."""
    from safetensors.torch import load_file
    done = run_example(script, tiny_dir, tmp_path)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    assert 'GKD trainer active' in output, output[-3000:]
    command = next(line for line in output.splitlines() if line.startswith('[tiny mode] '))
    assert 'OMP_NUM_THREADS=1 swift rlhf' in command and '--use_cpu true' in command, command
    assert '--deepspeed' not in command and '--use_vllm false' in command and '--vllm_' not in command, command
    runs = os.path.join(tiny_dir, 'runs')
    [log] = glob.glob(os.path.join(runs, '**', 'logging.jsonl'), recursive=True)
    with open(log) as f:
        losses = [row['loss'] for row in map(json.loads, f) if 'loss' in row]
    assert len(losses) == STEPS and all(math.isfinite(x) and x > 0 for x in losses), losses
    [mode_log] = glob.glob(os.path.join(runs, '**', 'gkd_modes', 'rank0.jsonl'), recursive=True)
    with open(mode_log) as f:
        assert {row['mode'] for row in map(json.loads, f)} == modes
    [checkpoint] = glob.glob(os.path.join(runs, '**', f'checkpoint-{STEPS}'), recursive=True)
    student = load_file(os.path.join(tiny_dir, 'student', 'model.safetensors'))
    if os.path.exists(os.path.join(checkpoint, 'adapter_model.safetensors')):  # LoRA: B starts at zero
        adapter = load_file(os.path.join(checkpoint, 'adapter_model.safetensors'))
        assert any(t.abs().sum() > 0 for name, t in adapter.items() if 'lora_B' in name)
    else:
        assert changed_tensors(student, load_file(os.path.join(checkpoint, 'model.safetensors'))) > 0


@pytest.mark.parametrize('script', ['megatron_gkd_dense.sh', 'gkd_multi_turn_tools.sh'])
def test_gpu_only_example_refuses_the_cpu_mode_in_one_line(script, tmp_path):
    """Nothing is built or started: exit 2 and one line naming the script and why."""
    done = run_example(script, str(tmp_path / 'never_built'), tmp_path, timeout=60)
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.startswith(f'{script}: GKD_EXAMPLE_TINY does not apply to this example: ')
    assert len(done.stderr.strip().splitlines()) == 1 and not os.path.exists(tmp_path / 'never_built')
