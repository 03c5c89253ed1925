"""Shared pieces of the GPU checks (issue 18): results files, device facts, real-shape models, ``swift rlhf`` runs.

Every part writes ``<part>.json`` and ``<part>.md`` (flat, two files: the device tool brings back at most 8) and
runs on CPU with ``--tiny`` too, so that CI tests the scripts themselves (tests/test_gpu_checks.py).
"""
from __future__ import annotations

import glob
import json
import math
import os
import platform
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
OFFLINE_ENV = {'HF_HUB_OFFLINE': '1', 'HF_DATASETS_OFFLINE': '1', 'TRANSFORMERS_OFFLINE': '1',
               'MODELSCOPE_OFFLINE': '1', 'USE_HF': '1', 'TOKENIZERS_PARALLELISM': 'false'}
QWEN_VOCAB = 151936  # Qwen2.5's lm_head rows (151,665 tokens, padded)
QWEN_TOKENS = 151665
# Qwen2.5-0.5B and -1.5B shapes (tied embeddings, 2 KV heads); random weights, built offline
STUDENT_SHAPE = dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                     intermediate_size=4864)
TEACHER_SHAPE = dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                     intermediate_size=8960)
TINY_STUDENT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=128)
TINY_TEACHER = dict(hidden_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=192)
TINY_VOCAB, TINY_TOKENS = 1024, 1000


@dataclass
class Results:
    """Rows of one part, written as ``<part>.json`` (everything) and ``<part>.md`` (a table per row group)."""
    part: str
    title: str
    rows: List[Dict[str, Any]] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    status: str = 'ok'  # ok | partial | skipped | error
    started: float = field(default_factory=time.time)

    def add(self, **row):
        self.rows.append(row)
        return row

    def seconds_left(self, budget: float) -> float:
        return budget - (time.time() - self.started)

    def note(self, text: str):
        self.notes.append(text)
        print(f'[{self.part}] {text}', flush=True)

    def write(self, out_dir: str) -> List[str]:
        os.makedirs(out_dir, exist_ok=True)
        doc = dict(part=self.part, title=self.title, status=self.status, seconds=round(time.time() - self.started, 1),
                   env=environment(), rows=self.rows, notes=self.notes)
        paths = [os.path.join(out_dir, f'{self.part}.json'), os.path.join(out_dir, f'{self.part}.md')]
        with open(paths[0], 'w') as f:
            json.dump(doc, f, indent=1, default=_jsonable)
        with open(paths[1], 'w') as f:
            f.write(markdown(doc))
        return paths


def _jsonable(x):
    return None if isinstance(x, float) and not math.isfinite(x) else str(x)


def _cell(v) -> str:
    if isinstance(v, float):
        return f'{v:.4g}'
    return '' if v is None else str(v).replace('|', '\\|').replace('\n', ' ')


def markdown(doc: Dict[str, Any]) -> str:
    """A results document as markdown: the environment, one table of the rows (columns in first-seen order), notes."""
    env = doc['env']
    lines = [f"# Part {doc['part']}: {doc['title']}", '',
             f"status **{doc['status']}**, {doc['seconds']} s; {env.get('device')}; "
             + ', '.join(f'{k} {v}' for k, v in env.get('versions', {}).items()), '']
    cols: List[str] = []
    for row in doc['rows']:
        cols += [k for k in row if k not in cols]
    if cols:
        lines += ['| ' + ' | '.join(cols) + ' |', '|' + '---|' * len(cols)]
        lines += ['| ' + ' | '.join(_cell(r.get(c)) for c in cols) + ' |' for r in doc['rows']]
        lines.append('')
    lines += [f'- {n}' for n in doc['notes']]
    return '\n'.join(lines) + '\n'


def environment() -> Dict[str, Any]:
    """The device and the versions that matter (what the results were measured with)."""
    from importlib import metadata
    versions = {}
    for name in ('torch', 'transformers', 'ms-swift', 'swift-gkd-plugin', 'deepspeed', 'liger-kernel', 'peft',
                 'accelerate', 'megatron-core', 'mcore-bridge', 'triton'):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    device = f'CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)'
    try:
        import torch
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            device = f'{p.name}, {p.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}'
    except Exception:  # environment facts never fail a part
        pass
    return dict(device=device, python=platform.python_version(), versions=versions)


# ----------------------------------------------------------------------------------------------------------------
# models
# ----------------------------------------------------------------------------------------------------------------


def build_tokenizer(out_dir: str, num_tokens: int):
    """The tiny trained BPE of ``swift_gkd_plugin.demo.tiny`` (ChatML specials and template), padded with plain
    added tokens to ``num_tokens`` entries so that every id the model can sample decodes and re-encodes."""
    from swift_gkd_plugin.demo import tiny
    tok = tiny.build_tokenizer(out_dir)
    if num_tokens > len(tok):
        tok.add_tokens([f'<|pad{i}|>' for i in range(num_tokens - len(tok))])
        tok.save_pretrained(out_dir)
    return tok


def build_qwen2(out_dir: str, tokenizer, shape: Dict[str, int], vocab_size: int, seed: int, dtype: str,
                device: str = 'cpu') -> str:
    """A Qwen2.5-architecture causal LM with random weights (``Qwen2ForCausalLM``, tied embeddings, attention
    bias), saved with ``tokenizer`` into ``out_dir`` in ``dtype``; built on ``device`` (a GPU builds 1.5B in
    seconds)."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM
    if os.path.exists(os.path.join(out_dir, 'config.json')):
        return out_dir
    end = tokenizer.convert_tokens_to_ids('<|endoftext|>')
    im_end = tokenizer.convert_tokens_to_ids('<|im_end|>')
    config = Qwen2Config(vocab_size=vocab_size, max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6,
                         tie_word_embeddings=True, bos_token_id=end, eos_token_id=im_end, pad_token_id=end,
                         use_sliding_window=False, **shape)
    torch_dtype = getattr(torch, dtype)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.device(device):
            model = Qwen2ForCausalLM(config).to(torch_dtype)
    model.generation_config = GenerationConfig(eos_token_id=[im_end, end], pad_token_id=end, do_sample=False)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    del model
    return out_dir


@dataclass
class Workspace:
    root: str
    student: str
    teacher: str
    train: str
    dtype: str
    tiny: bool


def build_workspace(root: str, tiny: bool, device: str, dtype: Optional[str] = None) -> Workspace:
    """Student and teacher of real shapes (Qwen2.5-0.5B / 1.5B, vocabulary 151,936, bf16) or tiny ones (``tiny``,
    float32 unless ``dtype`` says otherwise, for the CPU tests of these scripts), and the tiny task's training rows.
    The models are built once per ``root`` (give another root for another dtype)."""
    from swift_gkd_plugin.demo import tiny as tiny_mod
    os.makedirs(root, exist_ok=True)
    vocab, tokens = (TINY_VOCAB, TINY_TOKENS) if tiny else (QWEN_VOCAB, QWEN_TOKENS)
    dtype = dtype or ('float32' if tiny else 'bfloat16')
    tok_dir = os.path.join(root, 'tok')
    if os.path.exists(os.path.join(tok_dir, 'tokenizer.json')):
        tok = tiny_mod.load_tokenizer(tok_dir)
    else:
        tok = build_tokenizer(tok_dir, tokens)
    student = build_qwen2(os.path.join(root, 'student'), tok, TINY_STUDENT if tiny else STUDENT_SHAPE, vocab, 0,
                          dtype, device)
    teacher = build_qwen2(os.path.join(root, 'teacher'), tok, TINY_TEACHER if tiny else TEACHER_SHAPE, vocab, 1,
                          dtype, device)
    train = os.path.join(root, 'train.jsonl')
    if not os.path.exists(train):
        tiny_mod.write_dataset(train, tiny_mod.make_rows(256, seed=0, split='train'))
    return Workspace(root, student, teacher, train, dtype, tiny)


# ----------------------------------------------------------------------------------------------------------------
# swift rlhf runs
# ----------------------------------------------------------------------------------------------------------------


def rlhf_argv(ws: Workspace, out_dir: str, steps: int, **flags) -> List[str]:
    """``swift rlhf --rlhf_type gkd`` on the workspace; ``flags`` add or replace (None removes)."""
    base = dict(rlhf_type='gkd', model=ws.student, model_type='qwen2', teacher_model=ws.teacher,
                teacher_model_type='qwen2', template='qwen2_5', dataset=ws.train, tuner_type='full',
                torch_dtype=ws.dtype, check_model='false', max_steps=steps, per_device_train_batch_size=2,
                gradient_accumulation_steps=1, max_length=512 if not ws.tiny else 128,
                max_completion_length=64 if not ws.tiny else 8, logging_steps=1, save_strategy='no',
                report_to='none', dataloader_num_workers=0, dataset_num_proc=1, output_dir=out_dir,
                add_version='false', seed=42)
    base.update(flags)
    argv = []
    for k, v in base.items():
        if v is not None:
            argv += [f'--{k}', str(v)]
    return argv


class _GpuMemoryPoller:
    """Peak device memory in use (all processes, through NVML or nvidia-smi) while a run lasts; None without a GPU."""

    def __init__(self):
        self.peak, self.stop, self.thread = None, threading.Event(), None
        try:
            import pynvml
            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            self.read = lambda: pynvml.nvmlDeviceGetMemoryInfo(handle).used / 2**30
        except Exception:
            self.read = None
        if self.read is not None:
            self.peak = self.read()
            self.thread = threading.Thread(target=self._loop, daemon=True)
            self.thread.start()

    def _loop(self):
        while not self.stop.wait(0.1):
            self.peak = max(self.peak, self.read())

    def close(self) -> Optional[float]:
        self.stop.set()
        if self.thread:
            self.thread.join()
        return self.peak


def start_rlhf(argv: List[str], env: Dict[str, str], timeout: float):
    """``swift rlhf argv`` (the console script of this environment) with ``env`` added to this process's environment:
    ``(exit code or 'timeout', output)``. (tests/test_gpu_checks.py's in-process parts replace it: the runs fork from
    the test worker's zygote.)"""
    from swift_gkd_plugin.entry.cli import swift_executable
    full_env = dict(os.environ, **env)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([swift_executable(), 'rlhf'] + argv, env=full_env, capture_output=True, text=True,
                              timeout=timeout)
        rc, output = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        rc, output = 'timeout', f'{e.stdout or ""}{e.stderr or ""}'
        output = output.decode(errors='replace') if isinstance(output, bytes) else output
    if os.environ.get('GKD_TEST_RUN_LOG'):  # counted by the test suite's closing summary (tests/conftest.py)
        with open(os.environ['GKD_TEST_RUN_LOG'], 'a') as f:
            f.write(json.dumps({'kind': f'swift rlhf (GPU kit), {full_env.get("NPROC_PER_NODE", "1")} process(es)',
                                'seconds': time.perf_counter() - t0,
                                'test': os.environ.get('PYTEST_CURRENT_TEST', '').split(' ')[0]}) + '\n')
    return rc, output


def run_rlhf(argv: List[str], env: Optional[Dict[str, str]] = None, timeout: float = 480,
             log_path: Optional[str] = None) -> Dict[str, Any]:
    """Run ``swift rlhf`` (the console script of this environment) and summarise it: exit code, whether the plugin
    was active, losses, step time (mean over the steps after the first, from ms-swift's ``train_speed(s/it)``),
    ms-swift's ``memory(GiB)`` (max reserved), the device's peak memory in use, wall time, ms-swift's ``train_runtime``
    (the training loop alone: start-up and loading left out)."""
    out_dir = argv[argv.index('--output_dir') + 1]
    shutil.rmtree(out_dir, ignore_errors=True)  # the logs read below are this run's (work folders are reused)
    poll = _GpuMemoryPoller()
    t0 = time.perf_counter()
    rc, output = start_rlhf(argv, dict(OFFLINE_ENV, **(env or {})), timeout)
    wall = time.perf_counter() - t0
    device_peak = poll.close()
    if log_path:
        with open(log_path, 'w') as f:
            f.write(output)
    rows = []
    for path in sorted(glob.glob(os.path.join(out_dir, '**', 'logging.jsonl'), recursive=True)):
        with open(path) as f:
            rows += [json.loads(line) for line in f if line.strip()]
    steps = [r for r in rows if 'loss' in r]
    speeds = [(int(str(r['global_step/max_steps']).split('/')[0]), r['train_speed(s/it)']) for r in steps
              if 'train_speed(s/it)' in r and 'global_step/max_steps' in r]
    step_s = None
    if len(speeds) >= 2:
        (k0, s0), (k1, s1) = speeds[0], speeds[-1]
        step_s = (s1 * k1 - s0 * k0) / (k1 - k0)
    elif speeds:
        step_s = speeds[-1][1]
    runtime = next((r['train_runtime'] for r in reversed(rows) if 'train_runtime' in r), None)
    mem = [r['memory(GiB)'] for r in steps if 'memory(GiB)' in r]
    error = None
    if rc != 0:
        tail = [ln for ln in output.strip().splitlines() if ln.strip()][-3:]
        error = ' / '.join(tail)[-400:]
    return dict(rc=rc, plugin_active='GKD trainer active' in output, losses=[r['loss'] for r in steps], logs=steps,
                step_s=step_s, reserved_gib=max(mem) if mem else None, device_peak_gib=device_peak,
                wall_s=round(wall, 1), runtime_s=runtime, error=error)


def max_rel(a, b, floor: float) -> float:
    """max |a_i - b_i| / max(|b_i|, floor) over the pairs of ``a`` and ``b`` (the shorter's length; not empty)."""
    return max(abs(x - y) / max(abs(y), floor) for x, y in zip(a, b))


def finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def ratio(a, b) -> Optional[float]:
    """``a / b``, or None where either is missing or not finite, or ``b`` is 0 (a tiny CPU peak can be 0 MiB)."""
    return a / b if finite(a) and finite(b) and b != 0 else None


def fmt(x, spec='.2f') -> str:
    return format(x, spec) if finite(x) else 'n/a'


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]
