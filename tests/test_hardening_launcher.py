"""Refusals of ``swift rlhf`` under torchrun (``NPROC_PER_NODE`` set), through ms-swift's ``swift`` launcher: one
``error:`` line and exit code 2, without torchrun's ``ChildFailedError`` report; flag-only refusals before any rank
starts."""
import pytest
import yaml
from conftest import base_args, run_swift
from test_activation_and_bad_input import assert_refused_in_one_line, launch_only

CPU_RANKS = dict(ddp_backend='gloo', use_cpu='true')
TORCHRUN_REPORT = ('ChildFailedError', 'FAILED', 'exitcode', 'Root Cause', 'SIGTERM')
COLOCATE = dict(use_vllm='true', vllm_mode='colocate')


def assert_refused_by_launcher(run, needles, *, ranks_started):
    """One line, exit code 2, no model loaded, nothing of torchrun's report; torchrun started only for refusals that
    need what the ranks resolve."""
    assert_refused_in_one_line(run, needles)
    assert not any(marker in run.output for marker in TORCHRUN_REPORT), run.output[-3000:]
    assert (run.launched is not None) == ranks_started, run.output[-3000:]
    if ranks_started:
        assert run.launched[1:3] == ['-m', 'torch.distributed.run']


def test_flag_refused_in_the_launcher_before_torchrun(tiny_ws, tmp_path):
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'out'), beta=1.5, **CPU_RANKS), nproc=2, launcher=True,
                    check=False, timeout=180)
    assert_refused_by_launcher(run, ['--beta must be in [0, 1]', 'got 1.5'], ranks_started=False)


def test_config_file_refused_in_the_launcher(tiny_ws, tmp_path):
    """A ``swift rlhf config.yaml`` whose ``ENV`` asks for torchrun: its flags are checked before the ranks start."""
    argv = base_args(tiny_ws, str(tmp_path / 'out'), beta=1.5, **CPU_RANKS)
    config = {'ENV': {'NPROC_PER_NODE': 2}, **{argv[i][2:]: argv[i + 1] for i in range(0, len(argv), 2)}}
    path = tmp_path / 'gkd.yaml'
    path.write_text(yaml.safe_dump(config))
    run = run_swift([str(path)], launcher=True, check=False, timeout=180)
    assert_refused_by_launcher(run, ['--beta must be in [0, 1]', 'got 1.5'], ranks_started=False)


def test_unknown_flag_refused_in_the_launcher(tiny_ws, tmp_path):
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'out'), gkd_lmbda=0.5, **CPU_RANKS), nproc=2, launcher=True,
                    check=False, timeout=180)
    assert_refused_by_launcher(run, ['unrecognized arguments: --gkd_lmbda 0.5'], ranks_started=False)


def test_rank_refusal_is_one_line_without_torchrun_report(tiny_ws, tmp_path):
    """A refusal that needs the models' configs (resolved in the ranks): the first rank to refuse prints it, the
    other stays silent, torchrun exits 2 without its report. ``--deepspeed`` also shows that the launcher checks in
    the ranks' environment (in one process without a launcher it is refused for want of mpi4py)."""
    # --fp16 false: on a CPU without oneDNN's fp16 kernels the launcher refuses ZeRO's fp16 default first
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'out'), gkd_logits_topk=100000, deepspeed='zero2', fp16='false',
                              **CPU_RANKS), nproc=2, launcher=True, check=False, timeout=300)
    assert_refused_by_launcher(run, ['--gkd_logits_topk 100000 is larger than the vocabulary', 'allowed 1 to 448'],
                               ranks_started=True)


def test_vllm_tensor_parallel_size_divides_the_processes_in_the_launcher(tiny_ws, tmp_path):
    """ms-swift refused it in a traceback once both models were loaded."""
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'out'), vllm_tensor_parallel_size=3, **COLOCATE, **CPU_RANKS),
                    nproc=2, launcher=True, check=False, timeout=180)
    assert_refused_by_launcher(run, ['--vllm_tensor_parallel_size 3 does not divide the 2 training processes',
                                     '(allowed: 1, 2)'], ranks_started=False)


def test_vllm_tensor_parallel_size_divides_one_process(tiny_ws, tmp_path):
    """``NPROC_PER_NODE=1`` (torchrun, one rank), and a process started without a launcher (the child directly)."""
    args = base_args(tiny_ws, str(tmp_path / 'out'), vllm_tensor_parallel_size=3, **COLOCATE)
    run = run_swift(args, env={'NPROC_PER_NODE': '1'}, launcher=True, check=False, timeout=180)
    assert_refused_by_launcher(run, ['--vllm_tensor_parallel_size 3 does not divide the 1 training process',
                                     '(allowed: 1)'], ranks_started=False)
    run = run_swift(args, check=False, timeout=180)
    assert_refused_in_one_line(run, ['--vllm_tensor_parallel_size 3 does not divide the 1 training process'])


def test_cpu_processes_without_use_cpu_refused_in_the_launcher(tiny_ws, tmp_path):
    """Issue 66: ``NPROC_PER_NODE=2`` on a machine without a GPU and without ``--use_cpu true`` exited 0, each process
    training its own copy into the same folder (transformers forms no group of CPU processes unless asked)."""
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'out'), ddp_backend='gloo'), nproc=2, launcher=True,
                    check=False, timeout=180)
    assert_refused_by_launcher(run, ['--use_cpu false (the default) with 2 processes', 'Pass --use_cpu true'],
                               ranks_started=False)
    assert not (tmp_path / 'out').exists()


def test_a_value_out_of_range_is_refused_by_the_launcher_of_one_process(tiny_ws, tmp_path):
    """Issue 66 item 12: a one-line refusal came after the route's process had imported ms-swift's pipeline (9.6 s on an
    idle 2-core machine, 34-44 s on a loaded one); the launcher now checks the declared ranges of the numeric flags
    given (1.9 s), before it starts that process. Other refusals stay in the process (the same words either way)."""
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'out'), beta=1.5, temperature='x'), launcher=True, check=False,
                    timeout=180)
    assert_refused_by_launcher(run, ['--beta must be in [0, 1]', 'got 1.5'], ranks_started=False)  # none started
    argv = base_args(tiny_ws, str(tmp_path / 'out'), beta=0.5, temperature='x')
    launch_only(argv)  # the launcher lets it through
    run = run_swift(argv, check=False, timeout=180)
    assert run.returncode == 2 and "argument --temperature: invalid float value: 'x'" in run.output, run.output[-2000:]


@pytest.mark.parametrize('flags,needles', [
    (dict(dataset='/nonexistent/train.jsonl'), ['--dataset /nonexistent/train.jsonl: no such file']),
    (dict(val_dataset='./missing_val.jsonl#20'), ['--val_dataset ./missing_val.jsonl#20: no such file']),
    (dict(teacher_model='./no_such_teacher'), ['--teacher_model ./no_such_teacher: no such model folder']),
    (dict(gkd_fused_backend='nope'), ['--gkd_fused_backend must be one of', "got 'nope'"]),
    (dict(gkd_lmbda=0.5), ['unrecognized arguments: --gkd_lmbda 0.5 (--gkd_lmbda: did you mean --lmbda?)']),
], ids=['dataset', 'val_dataset', 'teacher_model', 'choice', 'unknown_flag'])
def test_paths_and_choices_are_refused_by_the_launcher_of_one_process(tiny_ws, tmp_path, flags, needles):
    """Issue 66 item 12: the checks that need no ms-swift import (local paths, the plugin's choices) answer in the
    launcher (~2 s) instead of after the route's process imported ms-swift's pipeline (~9-10 s; a missing dataset was
    refused only after ms-swift resolved the models). Issue 74 item 10a: an unknown flag too, from the table of
    ms-swift's flags (8.3 s idle and 12-20 s at load 4 before, 2.2-4.1 s at load 4 after, as the other refusals)."""
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'out'), **flags), launcher=True, check=False, timeout=180)
    assert_refused_by_launcher(run, needles, ranks_started=False)


@pytest.mark.parametrize('entry', ['{file}', '{file}#5', '{file}:default/other', 'hf::{file}', 'ms::{file}#3',
                                   'owner/name', 'owner/name:sub#10', 'hf::owner/name', './missing.jsonl#4',
                                   '/abs/missing.jsonl:subset'])
def test_the_launchers_dataset_path_is_ms_swifts(tmp_path, entry):
    """The launcher reads a ``--dataset`` entry's path without importing ``swift.dataset`` (6 s): it must agree with
    ms-swift's own ``DatasetSyntax.parse`` on every form of the syntax."""
    from swift.dataset.dataset_syntax import DatasetSyntax
    from swift_gkd_plugin.options.local_paths import dataset_path
    data = tmp_path / 'rows.jsonl'
    data.write_text('{"messages": []}\n')
    entry = entry.format(file=data)
    assert dataset_path(entry) == DatasetSyntax.parse(entry).dataset


@pytest.mark.parametrize('who', ['model', 'teacher_model'])
def test_a_model_folder_of_several_types_names_the_flag(tiny_ws, tmp_path, who):
    """A local folder whose config.json fits several of ms-swift's model types (``./student``: qwen3, qwen3_emb,
    qwen3_reranker): ms-swift's ``Failed to automatically match`` traceback, for the teacher after the student
    loaded; now one line naming --model_type / --teacher_model_type."""
    flag = {'model': 'model_type', 'teacher_model': 'teacher_model_type'}[who]
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'out'), **{flag: None}), check=False, timeout=180)
    assert_refused_in_one_line(run, [f'--{who} ', "it fits ['qwen3',", f'pass --{flag}'])


@pytest.mark.parametrize('flags,model_dtype,cpu_fp16,needle', [
    ({}, 'float32', False, "--torch_dtype float32 (not given: --model's config.json) with --deepspeed zero2 (ms-swift "
     'trains a float16 or float32 model in fp16 mixed precision unless --fp16 is given): DeepSpeed does not take fp16 '
     'on this CPU'),
    ({'torch_dtype': 'float16'}, 'bfloat16', False, '--torch_dtype float16 with --deepspeed zero2 (ms-swift trains'),
    ({'fp16': True, 'torch_dtype': 'bfloat16'}, None, False, '--fp16 true with --deepspeed zero2: DeepSpeed does not '
     'take fp16 on this CPU'),
    ({'fp16': False}, 'float32', False, None),  # float32 training: what the refusal advises
    ({'torch_dtype': 'bfloat16'}, 'float32', False, None),  # bf16 mixed precision
    ({}, 'float32', True, None),  # a CPU whose oneDNN has fp16 kernels (this machine's): DeepSpeed takes it
    ({'deepspeed': None}, 'float32', False, None),
], ids=['config_float32', 'given_float16', 'fp16_true', 'fp16_false', 'bfloat16', 'cpu_with_fp16', 'no_deepspeed'])
def test_deepspeed_fp16_on_a_cpu_without_it_is_named_before_loading(flags, model_dtype, cpu_fp16, needle):
    """Issue 81 item 6: a float32 model without --fp16 false trains in fp16 (ms-swift's default), which DeepSpeed
    refuses on a CPU without oneDNN fp16 kernels, in every rank after both models loaded; the launcher now names
    --fp16 false / --torch_dtype bfloat16 first. This machine's CPU has the kernels (AVX512-FP16): a ZeRO-2 run here
    trains in fp16, so the refusal is driven by its condition, which the next test holds to DeepSpeed's own."""
    from types import SimpleNamespace

    from swift_gkd_plugin.options.backends import deepspeed_fp16_problem
    args = SimpleNamespace(**dict(dict(deepspeed='zero2', fp16=None, torch_dtype=None), **flags))
    problem = deepspeed_fp16_problem(args, model_dtype, cpu_fp16)
    if needle is None:
        assert problem is None, problem
    else:
        assert needle in problem and problem.endswith('Pass --fp16 false (train in float32), or --torch_dtype '
                                                      'bfloat16'), problem


def test_the_cpu_fp16_condition_is_deepspeeds():
    """What the launcher asks (:func:`cpu_fp16_supported`) is DeepSpeed's CPU accelerator's answer on this machine."""
    pytest.importorskip('deepspeed')
    import torch
    if torch.accelerator.is_available():
        pytest.skip('DeepSpeed picks the GPU accelerator here')
    from deepspeed.accelerator import get_accelerator

    from swift_gkd_plugin.options.backends import cpu_fp16_supported
    assert get_accelerator().device_name() == 'cpu'
    assert cpu_fp16_supported() == bool(get_accelerator().is_fp16_supported())


def test_a_run_stopped_mid_progress_bar_prints_its_error_on_a_line_of_its_own(capsys):
    """A run stopped during training (``refuse(..., code=1)``) while the trainer's tqdm bar sits mid-line after a
    ``\\r`` refresh: the bar is ended first, so ``^swift rlhf: error:`` finds the line (CI once saw it glued to
    ``Train:   1%| 3/500``)."""
    import sys

    from tqdm import tqdm

    from swift_gkd_plugin.swift.setup.command_line import PROG, refuse
    bar = tqdm(total=500, desc='Train', file=sys.stderr)
    bar.update(3)
    bar.refresh()  # the line as the trainer leaves it: `\rTrain:   1%| 3/500 ...`, no newline
    with pytest.raises(SystemExit) as stop:
        refuse(PROG, 'the teacher server failed during step 4', code=1)
    err = capsys.readouterr().err
    assert stop.value.code == 1
    assert 'Train' in err and '3/500' in err, err
    errors = [line for line in err.splitlines() if line.startswith('swift rlhf: error:')]
    assert errors == ['swift rlhf: error: the teacher server failed during step 4'], repr(err)
