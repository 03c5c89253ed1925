"""Activation (automatic, opt-out, explicit) and the early refusal of bad input, through the real CLI."""
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys

from dataclasses import fields
from types import SimpleNamespace

import pytest
from conftest import RL_REWARD_PLUGIN, _run_env, _zygote_for, base_args, run_swift

import swift_gkd_plugin
from swift_gkd_plugin.options.flags import RL_FLAGS as RL_FLAG_NAMES
from swift_gkd_plugin.options.flags import (FINITE_FLAGS, GKDPluginArgumentsMixin, check_gkd_scalars, check_rl_flags,
                                    declared_ranges)

SWIFT_GKD = os.path.join(os.path.dirname(sys.executable), 'swift-gkd')
MODEL_LOADED_MARKERS = ('model_parameter_info', 'Loading weights')


def _plugin_path():
    return subprocess.run([SWIFT_GKD, 'plugin-path'], capture_output=True, text=True, check=True).stdout.strip()


def test_plugin_path_is_an_importable_file():
    path = _plugin_path()
    assert os.path.isfile(path) and path.endswith('.py')
    # ms-swift puts the file's directory on sys.path: nothing there may shadow a real package
    assert os.listdir(os.path.dirname(path)) == [os.path.basename(path)] or set(os.listdir(
        os.path.dirname(path))) <= {os.path.basename(path), '__pycache__'}


def assert_launched_as_run_swift_starts_it(run):
    """``swift`` started the very command that ``run_swift`` starts without it (the other tests skip the launcher)."""
    assert run.launched is not None, run.output[-3000:]
    assert run.launched[1:] == run.child_command[1:]
    assert os.path.samefile(run.launched[0], run.child_command[0])  # the same interpreter


ROUTE_STOP_SITE = os.path.join(os.path.dirname(__file__), 'route_stop_site')


def launch_only(argv, env=None, command='rlhf'):
    """``swift <command> argv`` through the real launcher, what it starts stopped at once (``route_stop_site``): what
    the launcher accepted, and the command it started (``launched``), without a second start-up of ms-swift's
    pipeline in a fresh process; the tests run that same command through ``run_swift`` (forked)."""
    site = os.pathsep.join(filter(None, [ROUTE_STOP_SITE, (env or {}).get('PYTHONPATH', _run_env().get('PYTHONPATH'))]))
    run = run_swift(argv, env=dict(env or {}, PYTHONPATH=site), command=command, launcher=True, check=False)
    assert run.returncode == 0, run.output[-3000:]
    assert_launched_as_run_swift_starts_it(run)
    return run


@pytest.mark.quick
def test_opt_out_runs_ms_swift_trainer(tiny_ws, tmp_path):
    argv = base_args(tiny_ws, str(tmp_path / 'out'), lmbda=0, max_steps=1)
    launched = launch_only(argv, env={'SWIFT_GKD_PLUGIN': '0'})
    run = run_swift(argv, env={'SWIFT_GKD_PLUGIN': '0'})
    assert 'swift_gkd_plugin' not in launched.output + run.output
    assert len(run.logs) == 1
    assert not os.path.exists(tmp_path / 'out' / 'gkd_modes')
    # ms-swift's own trainer still refuses what only the plugin can do
    refused = run_swift(
        base_args(tiny_ws, str(tmp_path / 'out2'), lmbda=0, seq_kd='true', max_steps=1),
        env={'SWIFT_GKD_PLUGIN': '0'},
        check=False)
    assert refused.returncode != 0 and 'seq_kd' in refused.output


def test_a_plugin_flag_with_the_plugin_switched_off_names_the_variable(tiny_ws, tmp_path):
    """Issue 66 item 9: ms-swift's ``ValueError: remaining_argv`` traceback, after it had built its arguments."""
    out = tmp_path / 'out'
    run = run_swift(base_args(tiny_ws, str(out), gkd_skd_top_k=1), env={'SWIFT_GKD_PLUGIN': '0'}, check=False,
                    timeout=120)
    assert_refused_in_one_line(run, ['--gkd_skd_top_k: flag(s) of swift-gkd-plugin, which SWIFT_GKD_PLUGIN=0 turned '
                                     'off: unset SWIFT_GKD_PLUGIN (or set it to 1), or drop the flag(s)'])
    assert not out.exists()


def test_explicit_activation_through_external_plugins(tiny_ws, tmp_path):
    """``SWIFT_GKD_PLUGIN=0`` with ``--external_plugins`` naming the plugin's file, through the ``swift`` launcher: the
    plugin's trainer runs (the mode only it has, seq_kd on both steps) and its flags are accepted, by the launcher and
    by the process (``--gkd_loss_impl dense``: one run for what were two)."""
    argv = base_args(tiny_ws, str(tmp_path / 'out'), lmbda=0, seq_kd='true', max_steps=2, gkd_loss_impl='dense',
                     external_plugins=_plugin_path())
    assert '--gkd_loss_impl dense' in ' '.join(launch_only(argv, env={'SWIFT_GKD_PLUGIN': '0'}).launched)
    run = run_swift(argv, env={'SWIFT_GKD_PLUGIN': '0'})
    assert f'swift_gkd_plugin {swift_gkd_plugin.__version__}: GKD trainer active' in run.output
    assert [m['mode'] for m in run.modes()] == ['seq_kd', 'seq_kd']


PYTHON_API_RUN = """
import sys
from swift.arguments import RLHFArguments
from swift.pipelines import rlhf_main
from swift.utils import parse_args
args, _ = parse_args(RLHFArguments, sys.argv[1:])  # ms-swift's own class, built in Python
assert type(args) is RLHFArguments
print('num_generations', args.num_generations, flush=True)
rlhf_main(args)
"""


def test_arguments_built_in_python_get_the_command_lines_num_generations(tiny_ws, tmp_path):
    """``rlhf_main(RLHFArguments(...))`` gets GKD's default of the command line (1 completion per prompt), not
    GRPO's 8 (with 2 prompts per step ms-swift refused the run), and the plugin's checks and trainer."""
    argv = base_args(tiny_ws, str(tmp_path / 'out'), lmbda=1, max_steps=1)
    script = tmp_path / 'python_api_run.py'
    script.write_text(PYTHON_API_RUN)
    env = _run_env()  # a fork of the swift zygote where it can (as run_swift's runs; tests/test_zygote.py), else fresh
    zygote, _ = _zygote_for([sys.executable, str(script), *argv], env)
    if zygote is not None:
        returncode, stdout, stderr = zygote.run(str(script), argv, env, 300, str(tmp_path))
    else:
        proc = subprocess.run([sys.executable, str(script), *argv], env=env, capture_output=True, text=True,
                              timeout=300)
        returncode, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
    output = stdout + stderr
    assert returncode == 0, output[-3000:]
    assert 'num_generations 1' in output
    assert f'swift_gkd_plugin {swift_gkd_plugin.__version__}: GKD trainer active' in output
    with open(tmp_path / 'out' / 'gkd_modes' / 'rank0.jsonl') as f:
        assert [json.loads(line)['mode'] for line in f] == ['on_policy']


def test_swift_sft_is_untouched(tiny_ws, tmp_path):
    argv = ['--model', tiny_ws.student, '--model_type', 'qwen3', '--template', 'qwen3_nothinking', '--dataset',
            tiny_ws.fixed, '--tuner_type', 'full', '--torch_dtype', 'float32', '--check_model', 'false',
            '--max_steps', '1', '--per_device_train_batch_size', '2', '--gradient_accumulation_steps', '1',
            '--save_strategy', 'no', '--report_to', 'none', '--output_dir', str(tmp_path / 'sft'),
            '--dataset_num_proc', '1']
    launched = launch_only(argv, command='sft')
    run = run_swift(argv, command='sft')
    assert 'swift_gkd_plugin' not in launched.output + run.output
    assert len(run.logs) == 1
    bad = run_swift(argv + ['--gkd_loss_impl', 'dense'], command='sft', check=False)
    assert bad.returncode != 0 and 'remaining_argv' in bad.output


BAD_INPUTS = [
    ({'beta': 1.5}, ['--beta must be in [0, 1]', '1.5']),
    ({'async_generate': 'true'}, ['--async_generate true samples the next step on a rollout server',
                                  '--use_vllm true --vllm_mode server']),
    ({'async_generate': 'true', 'use_vllm': 'true', 'vllm_mode': 'colocate'}, ['--vllm_mode server']),
    ({'async_generate': 'true', 'use_vllm': 'true', 'vllm_mode': 'server', 'vllm_server_host': '127.0.0.1',
      'sequence_parallel_size': 2}, ['--async_generate true does not run beside --sequence_parallel_size 2']),
    ({'async_generate': 'true', 'use_vllm': 'true', 'vllm_mode': 'server', 'vllm_server_host': '127.0.0.1',
      'lmbda': 0}, ['--async_generate true with --lmbda 0']),
    ({'gkd_max_staleness': 2}, ['--gkd_max_staleness 2 bounds how many steps ahead --async_generate true samples',
                                '--async_generate is false', 'allowed: --gkd_max_staleness 1']),
    ({'gkd_max_staleness': 0}, ['--gkd_max_staleness', 'an integer >= 1']),
    ({'beta': -0.1}, ['--beta must be in [0, 1]']),
    ({'lmbda': -0.1}, ['--lmbda must be in [0, 1]']),
    ({'lmbda': 2}, ['--lmbda must be in [0, 1]']),
    ({'temperature': 0}, ['--temperature must be >= 0.02']),
    ({'temperature': -1}, ['--temperature must be >= 0.02']),
    ({'temperature': 0.001}, ['--temperature must be >= 0.02 (the loss divides the logits by it', 'got 0.001']),
    ({'lmbda': 0.5, 'max_completion_length': 0}, ['--max_completion_length must be > 0']),
    ({'lmbda': 0, 'seq_kd': 'true', 'max_completion_length': -4}, ['--max_completion_length must be > 0']),
    ({'lmbda': 0, 'max_completion_length': 0}, ['--max_completion_length must be > 0']),
    ({'teacher_model': '/nonexistent/teacher'}, ['--teacher_model', '/nonexistent/teacher', 'no such model']),
    ({'gkd_loss_impl': 'bogus'}, ['--gkd_loss_impl', 'bogus', 'auto', 'fused', 'dense']),
    ({'teacher_model': None, 'teacher_model_server': '[{"url": "http://127.0.0.1:9"}, {"url": "http://127.0.0.1:10"}]',
      'gkd_logits_topk': 8}, ['--teacher_model_server [{"url"', '"tags" must be non-empty with multiple teachers',
                              '"tags": ["math"]']),
    ({'gkd_sampled_kl_baseline': 'batch'}, ['--gkd_sampled_kl_baseline batch centres the sampled-token term\'s '
                                            'advantages, and the term is off (--gkd_sampled_kl_coef 0)']),
    ({'gkd_sampled_kl_baseline': 'mean', 'gkd_sampled_kl_coef': 1, 'lmbda': 1},
     ['--gkd_sampled_kl_baseline', 'mean', 'none', 'batch']),
    # issue 46: a local teacher bound to some tags among the servers
    ({'teacher_model_server': '[{"url": "http://127.0.0.1:9", "tags": ["a"]}, {"url": "http://127.0.0.1:10", '
      '"tags": ["b"]}]', 'gkd_logits_topk': 8},
     ['--teacher_model', 'and --teacher_model_server', 'name two teachers for the same rows',
      '{"url": "local", "tags": ["math"]}']),
    ({'teacher_model_server': '[{"url": "local", "tags": ["a"]}, {"url": "local", "tags": ["b"]}]',
      'gkd_logits_topk': 8}, ['entries [0, 1] are all "url": "local"', 'give it every tag in one entry']),
    ({'teacher_model_server': 'local', 'gkd_logits_topk': 8},
     ['--teacher_model_server local: its only teacher is the local one', 'drop --teacher_model_server']),
    ({'teacher_model': None, 'teacher_model_type': None, 'gkd_logits_topk': 8,
      'teacher_model_server': '[{"url": "http://127.0.0.1:9", "tags": ["a"]}, {"url": "local", "tags": ["b"]}]'},
     ['its entry "url": "local" scores the rows of its tags [\'b\'] with --teacher_model, which is not given']),
    ({'gkd_logits_topk': 0}, ['--gkd_logits_topk must be a positive integer']),
    # issue 45: loss 0 on every token, accepted before loading
    ({'gkd_logits_topk': 1}, ['--gkd_logits_topk 1 without --gkd_topk_tail true',
                              'the divergence and its gradient are 0 on every token',
                              'allowed: --gkd_logits_topk 2 or more, or 1 with --gkd_topk_tail true']),
    ({'temperature': 'inf'}, ['--temperature must be a finite number >= 0.02', 'inf']),
    ({'gkd_divergence': 'skew_kl', 'gkd_skew_alpha': 'nan'}, ['--gkd_skew_alpha must be a finite number in [0, 1)']),
    ({'rollout_importance_sampling_threshold': 'nan'},
     ['--rollout_importance_sampling_threshold must be a finite number >= 1 (C of min(pi / mu, C)', 'got nan']),
    ({'sft_alpha': -1}, ['--sft_alpha must be >= 0', '-1']),
    ({'teacher_server_timeout': 'nan'}, ['--teacher_server_timeout must be a finite number']),
    ({'gkd_logits_topk': 1000}, ['--gkd_logits_topk 1000 is larger than the vocabulary', '--model has 448',
                                 '--teacher_model has 448', 'allowed 1 to 448']),
    ({'gkd_skd_top_k': 100000, 'lmbda': 1}, ['--gkd_skd_top_k 100000 is larger than the vocabulary', '--model has 448',
                                             'allowed 0 (off) to 448']),
    # with vLLM's CPU build installed (CI): the tiny student's heads of 16 (tests/test_vllm.py has the other refusals)
    ({'use_vllm': 'true', 'vllm_mode': 'colocate'}, ['--use_vllm true (--vllm_mode colocate) needs vLLM',
                                                     '--use_vllm false'] if importlib.util.find_spec('vllm') is None
     else ['has attention heads of size 16 (config.json)', '--use_vllm false']),
    ({'teacher_server_wait': -1}, ['--teacher_server_wait must be >= 0 seconds', '-1']),
    # issue 45: vLLM's own bounds, which its engine checks only once the models are loaded (or at the first rollout)
    ({'use_vllm': 'true'}, ['--use_vllm true needs --vllm_mode', 'allowed: colocate, server']),
    ({'use_vllm': 'true', 'vllm_mode': 'colocate', 'vllm_gpu_memory_utilization': 1.5},
     ['--vllm_gpu_memory_utilization must be in (0, 1]', 'got 1.5']),
    ({'use_vllm': 'true', 'vllm_mode': 'colocate', 'vllm_max_model_len': 0},
     ['--vllm_max_model_len must be an integer >= 1', 'got 0']),
    ({'use_vllm': 'true', 'vllm_mode': 'colocate', 'vllm_max_num_seqs': 0}, ['--vllm_max_num_seqs must be an integer']),
    ({'use_vllm': 'true', 'vllm_mode': 'colocate', 'vllm_max_model_len': 4096},
     ['--vllm_max_model_len 4096 is longer than the model (512 positions', 'allowed 128 to 512, or unset']),
    ({'use_vllm': 'true', 'vllm_mode': 'colocate', 'vllm_max_model_len': 64},
     ['--vllm_max_model_len 64 is shorter than --max_length 128']),
    ({'use_vllm': 'true', 'vllm_mode': 'colocate', 'lmbda': 1, 'gkd_sampling_temperature': 3},
     ['--gkd_sampling_temperature 3 is the sampling temperature', 'in [0, 2] only']),
    ({'lmbda': 1, 'gkd_sampling_temperature': 1e-40}, ['--gkd_sampling_temperature must be >= 1e-06',
                                                       'turns them into inf', 'got 1e-40']),
    ({'lmbdaa': 0.5}, ['unrecognized arguments: --lmbdaa 0.5 (--lmbdaa: did you mean --lmbda?)']),
    ({'gkd_los_impl': 'dense'}, ['--gkd_los_impl: did you mean --gkd_loss_impl?']),
    ({'seq_kd': 'maybe'}, ['--seq_kd', 'maybe']),
    ({'multi_turn_scheduler': 'thinking_tips_schedulr', 'max_turns': 2},
     ['--multi_turn_scheduler thinking_tips_schedulr: no such scheduler (did you mean thinking_tips_scheduler?)',
      'gym_scheduler', '--external_plugins']),
    ({'max_turns': 0}, ['--max_turns must be an integer >= 1 (turns of one trajectory), got 0']),
    ({'multi_turn_scheduler': 'gym_scheduler', 'gkd_skd_top_k': 2, 'lmbda': 1},
     ['--multi_turn_scheduler gym_scheduler cannot be combined with --gkd_skd_top_k 2']),
    ({'deepspeed': 'zero2'}, ['--deepspeed zero2 in one process started without a launcher', 'NPROC_PER_NODE=1']),
    ({'torch_compile': 'true', 'gradient_checkpointing': 'true'},
     ['--torch_compile true with --gradient_checkpointing true', '{"use_reentrant": false}']),
    ({'gkd_divergence': 'fkl'}, ['--gkd_divergence', 'fkl', 'jsd', 'skew_kl', 'skew_rkl']),
    ({'gkd_divergence': 'skew_kl', 'gkd_skew_alpha': 1}, ['--gkd_skew_alpha must be in [0, 1)', 'got 1']),
    ({'gkd_divergence': 'skew_rkl', 'beta': 0.3}, ['--beta 0.3 applies to --gkd_divergence jsd only',
                                                  '--gkd_skew_alpha']),
    ({'gkd_skew_alpha': 0.3}, ['--gkd_skew_alpha 0.3 applies to --gkd_divergence skew_kl / skew_rkl only']),
    ({'temperature': 1e6}, ['--temperature must be <= 100 (the tempered distributions approach uniform', 'got 1000000.0']),
    ({'teacher_model': None, 'teacher_model_type': None},
     ['no teacher: without --teacher_model, --teacher_model_server or --teacher_adapters the teacher is the student '
      'itself', 'teacher_prompt', '--sft_alpha > 0']),
    ({'gkd_fused_backend': 'nonsense'}, ["--gkd_fused_backend must be one of ['auto', 'torch', 'triton']",
                                         "got 'nonsense'"]),
    # the on-policy remedies (docs_en/onpolicy_remedies.md) and ms-swift's rollout filters
    ({'top_p': 0}, ['--top_p must be in (0, 1] (nucleus sampling; 1 = off), got 0']),
    ({'top_p': 1.5}, ['--top_p must be in (0, 1]', 'got 1.5']),
    ({'top_k': -2}, ['--top_k must be -1, 0 or a positive integer', 'got -2']),
    ({'gkd_rollout_max_tokens': 0, 'lmbda': 1}, ['--gkd_rollout_max_tokens must be an integer >= 1', 'got 0']),
    ({'gkd_rollout_max_tokens': 9, 'lmbda': 1, 'max_completion_length': 8},
     ['--gkd_rollout_max_tokens 9 must be <= --max_completion_length 8', 'allowed: 1 to 8, or unset']),
    ({'gkd_rollout_max_tokens': 4, 'lmbda': 0}, ['--gkd_rollout_max_tokens 4 caps the student\'s samples on '
                                                 'on-policy steps, and --lmbda 0 has none']),
    ({'gkd_entropy_fkl_threshold': -1}, ['--gkd_entropy_fkl_threshold must be >= 0 (nats)', 'got -1']),
    ({'gkd_entropy_fkl_threshold': 2, 'gkd_cross_tokenizer': 'uld'},
     ['--gkd_entropy_fkl_threshold 2 adds KL(teacher || student)', '--gkd_cross_tokenizer uld', 'hybrid']),
    ({'gkd_entropy_fkl_threshold': 1, 'gkd_fused_backend': 'triton'},
     ['--gkd_entropy_fkl_threshold 1 runs on the PyTorch loss paths', '--gkd_fused_backend auto or torch']),
    ({'gkd_ref_kl_coef': -0.5}, ['--gkd_ref_kl_coef must be >= 0 (0: off), got -0.5']),
    ({'gkd_ref_kl_coef': 1, 'gkd_loss_impl': 'fused'},
     ['--gkd_ref_kl_coef 1 compares the student\'s full logits', '--gkd_loss_impl auto', 'or dense']),
    ({'gkd_ref_kl_coef': 1, 'gkd_logits_topk': 4, 'gkd_topk_tail': 'true'},
     ['--gkd_ref_kl_coef 1 runs on the dense loss and --gkd_topk_tail true needs the fused one']),
    # issue 74 item 10b: a hub id while offline (the tests' HF_HUB_OFFLINE=1, USE_HF=1) was a 107-line traceback
    ({'model': 'Qwen/Qwen2.5-0.5B-Instruct'},
     ['--model Qwen/Qwen2.5-0.5B-Instruct: not a local folder, and the Hugging Face Hub cannot be reached',
      'HF_HUB_OFFLINE=1', 'pass the path of a local model folder']),
    ({'teacher_model': 'Qwen/Qwen2.5-7B-Instruct'},
     ['--teacher_model Qwen/Qwen2.5-7B-Instruct: not a local folder, and the Hugging Face Hub cannot be reached',
      'HF_HUB_OFFLINE=1']),
    # issue 89 item 13: a prompt beyond the student's 512 positions failed at its first rollout, after loading
    ({'lmbda': 0.5, 'max_length': 1024}, ["--max_length 1024 is longer than the student's context", '512 positions',
                                          'on-policy sampling (--lmbda 0.5)', 'pass --max_length 512 or less']),
]


def assert_refused_in_one_line(run, needles):
    """One ``swift rlhf: error:`` line that holds every needle, exit code 2 (as argparse's), no traceback, and no
    model loaded."""
    errors = [line for line in run.output.splitlines() if line.startswith('swift rlhf: error: ')]
    assert run.returncode == 2 and len(errors) == 1 and 'Traceback' not in run.output, run.output[-3000:]
    for needle in needles:
        assert needle in errors[0], f'{needle!r} missing from:\n{run.output[-3000:]}'
    assert not any(marker in run.output for marker in MODEL_LOADED_MARKERS)


@pytest.mark.parametrize('flags,needles', BAD_INPUTS, ids=[str(f) for f, _ in BAD_INPUTS])
def test_bad_input_is_refused_before_any_model_is_loaded(tiny_ws, tmp_path, flags, needles):
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'out'), **flags), check=False, timeout=120)
    assert_refused_in_one_line(run, needles)


DEEPSPEED_FILES = {  # issue 89 item 11: each a traceback, two of them after loading
    'missing': (None, ['no such file', "give a DeepSpeed JSON file, JSON text, or one of ms-swift's zero0"]),
    'cut': ('{"zero_optimization": {"stage": 2, "overlap_c', ['the file is not a JSON object (JSONDecodeError',
                                                             'a cut or damaged file?']),
    'stage_7': ('{"zero_optimization": {"stage": 7}}', ['"zero_optimization": {"stage": 7} is not a ZeRO stage']),
    'micro_batch': ('{"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 2}}',
                    ['"train_micro_batch_size_per_gpu": 4 disagrees with --per_device_train_batch_size 2',
                     'set it to "auto"']),
    'nvme': ('{"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}}}',
             ['"zero_optimization": {"offload_param": {"device": "nvme"}} without "nvme_path"']),
}


@pytest.mark.parametrize('name', list(DEEPSPEED_FILES))
def test_a_bad_deepspeed_file_is_refused_before_loading(tiny_ws, tmp_path, name):
    text, needles = DEEPSPEED_FILES[name]
    path = tmp_path / 'ds.json'
    if text is not None:
        path.write_text(text)
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'out'), deepspeed=str(path)), check=False, timeout=120)
    assert_refused_in_one_line(run, [f'--deepspeed {path}: '] + needles)


PACKING_ON_CPU = [  # issue 89 item 14: ms-swift's ValueError (or transformers' ImportError) with a traceback
    ({'packing': 'true'}, ['--packing true packs rows into one sequence, which needs a flash attention implementation, '
                           'which runs on CUDA GPUs only (this machine has none): --attn_impl is unset',
                           'or --packing false']),
    ({'padding_free': 'true'}, ['--padding_free true packs rows', 'pass --attn_impl one of flash_attn, '
                                'flash_attention_2, flash_attention_3, flash_attention_4 on a GPU machine']),
    ({'padding_free': 'true', 'attn_impl': 'flash_attn'},
     ['--padding_free true with --attn_impl flash_attn: flash attention runs on CUDA GPUs only and this machine has '
      'none; pass --padding_free false to train here']),
]


@pytest.mark.skipif(os.path.exists('/dev/nvidiactl'), reason='a machine without a CUDA device')
@pytest.mark.parametrize('flags,needles', PACKING_ON_CPU, ids=[str(f) for f, _ in PACKING_ON_CPU])
def test_packing_on_a_cpu_is_refused_in_one_line(tiny_ws, tmp_path, flags, needles):
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'out'), **flags), check=False, timeout=120)
    assert_refused_in_one_line(run, needles)


@pytest.mark.skipif(os.path.exists('/dev/nvidiactl'), reason='a machine without a CUDA device')
def test_fused_backend_refusals_before_loading(tiny_ws, tmp_path):
    """A bad SWIFT_GKD_FUSED_BACKEND (the flag's default) is named as the variable; a forced triton without a CUDA
    device is refused before loading, not at the first step."""
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'out')), env={'SWIFT_GKD_FUSED_BACKEND': 'cuda'}, check=False,
                    timeout=120)
    assert_refused_in_one_line(run, ["SWIFT_GKD_FUSED_BACKEND (the default of --gkd_fused_backend) must be one of "
                                     "['auto', 'torch', 'triton'] or empty, got 'cuda'"])
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'out'), gkd_fused_backend='triton'), check=False, timeout=120)
    assert_refused_in_one_line(run, ['--gkd_fused_backend triton runs the kernels on CUDA devices and this process '
                                     'sees none', '--gkd_fused_backend auto'])


def test_teacher_folder_without_weights_is_refused_naming_it(tiny_ws, tmp_path):
    """Its config and tokenizer are there, so only the weights' load failed (transformers' raw OSError); refused with
    the other broken model folders (``local_paths.not_a_model_folder``), before anything resolves."""
    folder = tmp_path / 'no_weights'
    folder.mkdir()
    for name in os.listdir(tiny_ws.teacher):
        if not name.endswith('.safetensors'):
            shutil.copy(os.path.join(tiny_ws.teacher, name), folder / name)
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'out'), teacher_model=str(folder)), check=False, timeout=120)
    assert_refused_in_one_line(run, [f"--teacher_model {folder}: the folder '{folder}' has a config.json but no weight "
                                     'files'])


def test_teacher_with_another_vocabulary_is_refused_naming_both(tiny_ws, tmp_path):
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'out'), teacher_model=tiny_ws.other_vocab_teacher),
                    check=False, timeout=120)
    assert run.returncode != 0
    assert 'tokenizers differ' in run.output and '--gkd_cross_tokenizer uld|hybrid' in run.output
    assert tiny_ws.student in run.output and tiny_ws.other_vocab_teacher in run.output
    assert not any(marker in run.output for marker in MODEL_LOADED_MARKERS)


def test_plugin_flags_are_refused_for_other_rlhf_types(tiny_ws, tmp_path):
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'out'), rlhf_type='dpo', teacher_model=None,
                              teacher_model_type=None, gkd_loss_impl='dense'), check=False, timeout=120)
    assert run.returncode != 0
    assert "['--gkd_loss_impl'] only apply to --rlhf_type gkd" in run.output


# every plugin flag at its default (a new flag joins by itself), ms-swift's checked ones set here
SCALAR_FLAGS = dict({f.name: f.default for f in fields(GKDPluginArgumentsMixin)}, beta=0.5, lmbda=0.5,
                    temperature=0.9, sft_alpha=0.0, max_completion_length=8, seq_kd=False, gkd_logits_topk=None,
                    top_k=-1, top_p=1.0)


@pytest.mark.parametrize('name', FINITE_FLAGS)
@pytest.mark.parametrize('value', [float('nan'), float('inf'), float('-inf')])
def test_every_float_flag_refuses_nan_and_inf(name, value):
    """The shared flag-only check (swift rlhf and megatron rlhf), or the RL flags' (swift rlhf); the command line is
    covered above for a few."""
    rl = name in RL_FLAG_NAMES
    check = check_rl_flags if rl else check_gkd_scalars
    args = SimpleNamespace(**(RL_FLAGS if rl else SCALAR_FLAGS))
    check(args)
    setattr(args, name, value)
    with pytest.raises(ValueError) as info:
        check(args)
    rule = declared_ranges()[name]  # the message names the allowed range too
    assert f'--{name} must be a finite number {rule.allowed()}' in str(info.value)
    assert str(info.value).endswith(f', got {value}')


GOOD_ROW = b'{"messages": [{"role": "user", "content": "Reverse: a b"}, {"role": "assistant", "content": "b a"}]}\n'
PROMPT_ONLY_ROW = b'{"messages": [{"role": "user", "content": "Reverse: c d"}]}\n'
SYSTEM_ONLY_ROW = b'{"messages": [{"role": "system", "content": "You are helpful."}]}\n'
BAD_DATASETS = {
    'empty': (b'', {}, ['--dataset', 'empty.jsonl', 'has no rows']),
    'latin1': (GOOD_ROW * 2 + GOOD_ROW.replace(b'b a', b'caf\xe9'), {},
               ['--dataset', 'latin1.jsonl', 'line 3 is not UTF-8']),
    'truncated_json': (GOOD_ROW + GOOD_ROW[:30] + b'\n', {}, ['--dataset', 'truncated_json.jsonl',
                                                             'line 2 is not valid JSON']),
    'no_response': (PROMPT_ONLY_ROW * 3, {'lmbda': 0}, ['--dataset', 'no_response.jsonl',
                                                       '3 row(s) have no assistant response (lines 1, 2, 3)',
                                                       '--lmbda 0 without --seq_kd']),
    'no_response_val': (GOOD_ROW + PROMPT_ONLY_ROW, {'lmbda': 0.5}, ['--val_dataset', 'no_response_val.jsonl',
                                                                    '(lines 2)', 'evaluation']),
    # ms-swift used to train on half the rows with exit 0 (issue 37: role "usr"), or fail after loading both models
    'unknown_role': (GOOD_ROW * 2 + GOOD_ROW.replace(b'"user"', b'"usr"') * 2, {},
                     ['--dataset', '2 row(s) that ms-swift would drop without a word', "line 3: message 0 has the role "
                      "'usr'", 'line 4', '--gkd_drop_bad_rows true']),
    'messages_string': (GOOD_ROW + b'{"messages": "Reverse: a b"}\n', {},
                        ['line 2: "messages" is str "Reverse: a b", not a non-empty list of messages']),
    'null_and_number_content': (GOOD_ROW + GOOD_ROW.replace(b'"b a"', b'null') + GOOD_ROW.replace(b'"b a"', b'7'),
                                {'lmbda': 0}, ['2 row(s)', 'line 2: message 1 (assistant): its content is null, not text',
                                     'line 3: message 1 (assistant): its content is int 7, not text']),
    'bad_rows_val': (GOOD_ROW + GOOD_ROW.replace(b'"assistant"', b'"asistant"'), {},
                     ['--val_dataset', "line 2: message 1 has the role 'asistant'"]),
    # ms-swift used to load both models, then fail to resample them ("Increase max_length")
    'system_only': (SYSTEM_ONLY_ROW * 4, {'lmbda': 1}, ['--dataset', 'system_only.jsonl', 'no row can be trained on',
                                                       'all 4 row(s) have neither a user message nor an assistant '
                                                       'response', 'line 1, ', 'Give each row a user message']),
}


def test_a_missing_local_dataset_is_refused_before_loading(tiny_ws, tmp_path, monkeypatch):
    """A typo in a relative path (issue 37: ms-swift took it for a hub id, loaded both models, then printed 645 lines
    ending in "Couldn't reach ... on the Hub"), with a #N suffix, and an absolute one: one line naming the path."""
    monkeypatch.chdir(os.path.dirname(tiny_ws.train))
    typo = os.path.basename(tiny_ws.train).replace('train', 'trian')
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'out'), dataset=f'./{typo}#8'), check=False, timeout=120)
    assert_refused_in_one_line(run, [f'--dataset ./{typo}#8: no such file', f'(relative to {os.getcwd()})',
                                     f'did you mean ./{os.path.basename(tiny_ws.train)}?'])
    missing = str(tmp_path / 'nowhere' / 'val.jsonl')
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'out'), val_dataset=missing), check=False, timeout=120)
    assert_refused_in_one_line(run, [f'--val_dataset {missing}: no such file', 'does not exist either'])


MISSING_PATHS = {  # issue 37 items 7 and 9: ms-swift's own tracebacks, or a hub download of a local path
    'no_model': ({'model': None}, ['--model is required', 'Qwen/Qwen3-0.6B']),
    'model': ({'model': './students/tiny'}, ['--model ./students/tiny: no such model folder', 'relative to']),
    'teacher': ({'teacher_model': 'models/teachers/tiny'},
                ['--teacher_model models/teachers/tiny: no such model folder', "the folder 'models/teachers' does "
                 'not exist either', 'hub models are named owner/name']),
    'plugin': ({'external_plugins': 'plugins/my_reward.py'},
               ['--external_plugins plugins/my_reward.py: no such file', 'my_reward.py']),
}


@pytest.mark.parametrize('name', list(MISSING_PATHS))
def test_missing_model_or_plugin_paths_are_refused_before_anything_is_resolved(tiny_ws, tmp_path, monkeypatch,
                                                                               name):
    """Refused before ms-swift resolves anything: nothing is looked up on a hub, and no run folder is made."""
    monkeypatch.chdir(tmp_path)
    flags, needles = MISSING_PATHS[name]
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'out'), add_version='true', **flags), check=False, timeout=120)
    assert_refused_in_one_line(run, needles)
    assert 'Downloading the model' not in run.output and not (tmp_path / 'out').exists()


def test_a_refusal_after_resolution_leaves_no_empty_run_folder(tiny_ws, tmp_path):
    """A check that needs the resolved models refuses after ms-swift created the run's ``v<N>-<time>`` folder
    (and --output_dir itself): both are removed while empty; a folder that held something before stays."""
    out = tmp_path / 'out'
    run = run_swift(base_args(tiny_ws, str(out), add_version='true', gkd_logits_topk=1000), check=False, timeout=120)
    assert_refused_in_one_line(run, ['--gkd_logits_topk 1000 is larger than the vocabulary'])
    assert not out.exists()
    out.mkdir()
    (out / 'v0-earlier').mkdir()
    run = run_swift(base_args(tiny_ws, str(out), add_version='true', gkd_logits_topk=1000), check=False, timeout=120)
    assert run.returncode == 2 and os.listdir(out) == ['v0-earlier']


@pytest.mark.parametrize('name', list(BAD_DATASETS))
def test_bad_local_dataset_is_refused_naming_the_file_and_line(tiny_ws, tmp_path, name):
    content, flags, needles = BAD_DATASETS[name]
    path = tmp_path / f'{name}.jsonl'
    path.write_bytes(content)
    which = 'val_dataset' if name.endswith('_val') else 'dataset'
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'out'), **{which: str(path)}, **flags), check=False,
                    timeout=120)
    assert_refused_in_one_line(run, needles + [str(path)])


def test_bad_rows_are_dropped_and_counted_only_when_asked(tiny_ws, tmp_path):
    """--gkd_drop_bad_rows true: the rows ms-swift would drop are named in a warning with their count, and the run
    trains on the others."""
    path = tmp_path / 'some_bad.jsonl'
    path.write_bytes(open(tiny_ws.fixed, 'rb').read() + GOOD_ROW.replace(b'"user"', b'"usr"'))
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'out'), dataset=str(path), lmbda=0, max_steps=1,
                              gkd_drop_bad_rows='true'), timeout=300)
    assert (f'--dataset {path}: 1 row(s) that ms-swift would drop without a word: line 5: message 0 has the role '
            "'usr'") in run.output and '--gkd_drop_bad_rows true: training without them' in run.output
    assert len(run.losses) == 1 and run.losses[0] > 0


def test_rows_without_response_are_named_but_sampled_on_policy(tiny_ws, tmp_path):
    """With --lmbda > 0 such rows still get on-policy samples: a warning names them and training goes on. A row
    without a user message cannot be sampled for: ms-swift fails to encode it and draws another row, and the
    warning says it is dropped."""
    path = tmp_path / 'some_prompt_only.jsonl'
    path.write_bytes(open(tiny_ws.fixed, 'rb').read() + PROMPT_ONLY_ROW + SYSTEM_ONLY_ROW)
    # --lmbda 0.5: dataset steps read responses (at --lmbda 1 none does, and nothing is said); seed 4: step 0 on-policy
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'out'), dataset=str(path), lmbda=0.5, max_steps=1,
                              max_completion_length=4, seed=4), timeout=300)
    assert f'--dataset {path}: 1 row(s) have no assistant response (lines 5)' in run.output
    assert (f'--dataset {path}: 1 row(s) have neither a user message nor an assistant response (lines 6): '
            'nothing can be sampled for them') in run.output and 'they are dropped' in run.output
    assert run.modes()[0]['mode'] == 'on_policy'


BAD_RL_INPUTS = [
    ({'reward_funcs': 'no_such_reward', 'lmbda': 1, 'external_plugins': RL_REWARD_PLUGIN},
     ["--reward_funcs ['no_such_reward']: no such reward function", 'tiny_letter_match', '--external_plugins']),
    ({'gkd_rl_coef': -1, 'reward_funcs': 'accuracy', 'lmbda': 1}, ['--gkd_rl_coef must be >= 0', '-1']),
    ({'reward_funcs': 'tiny_letter_match', 'gkd_rl_coef': 1, 'lmbda': 1, 'external_plugins': RL_REWARD_PLUGIN,
      'steps_per_generation': 2}, ['--gkd_rl_coef > 0 needs each generation batch to be one optimizer step',
                                   'steps_per_generation 2', '--gradient_accumulation_steps 1']),
    ({'rollout_importance_sampling_mode': 'token_truncate', 'lmbda': 1},
     ['--rollout_importance_sampling_mode token_truncate weights the policy-gradient terms, which are off',
      '--gkd_rl_coef 0.0', '--gkd_sampled_kl_coef 0']),
    ({'gkd_sampled_kl_coef': -0.5, 'lmbda': 1}, ['--gkd_sampled_kl_coef must be >= 0', '-0.5']),
    ({'gkd_sampled_kl_coef': 1, 'gkd_sampled_kl_discount': 1.5, 'lmbda': 1},
     ['--gkd_sampled_kl_discount', '1.5', '[0, 1]']),
    ({'gkd_sampled_kl_discount': 0.5, 'lmbda': 1}, ['--gkd_sampled_kl_discount 0.5 discounts the sampled-token term',
                                                    '--gkd_sampled_kl_coef 0']),
    ({'gkd_sampled_kl_coef': 1, 'lmbda': 0}, ['--gkd_sampled_kl_coef 1 trains on the student', '--lmbda 0']),
    ({'gkd_sampled_kl_coef': 1, 'lmbda': 1, 'gkd_logits_topk': 8},
     ['--gkd_sampled_kl_coef 1 needs the teacher', '--gkd_logits_topk 8']),
    ({'gkd_sampled_kl_coef': 1, 'lmbda': 1, 'teacher_model': None, 'teacher_model_type': None, 'gkd_logits_topk': 8,
      'teacher_model_server': 'http://127.0.0.1:9', 'temperature': 0.9},
     ['--gkd_sampled_kl_coef 1 with --teacher_model_server', 'sampling temperature, 0.9', 'temperature 1']),
    ({'gkd_divergence_coef': 0, 'gkd_sampled_kl_coef': 1, 'lmbda': 0.5},
     ['--gkd_divergence_coef 0 trains on the policy-gradient terms alone', '--lmbda 1 (got 0.5)']),
    ({'gkd_divergence_coef': 0, 'lmbda': 1}, ['--gkd_divergence_coef 0', '--gkd_sampled_kl_coef > 0']),
    ({'gkd_divergence_coef': -1, 'lmbda': 1}, ['--gkd_divergence_coef must be >= 0', '-1']),
]


@pytest.mark.parametrize('flags,needles', BAD_RL_INPUTS, ids=[str(f) for f, _ in BAD_RL_INPUTS])
def test_bad_rl_input_is_refused_before_any_model_is_loaded(tiny_ws, tmp_path, flags, needles):
    test_bad_input_is_refused_before_any_model_is_loaded(tiny_ws, tmp_path, flags, needles)


def test_ms_swifts_own_generation_batch_check_refuses_before_loading(tiny_ws, tmp_path):
    """ms-swift's own refusal (its traceback, not the plugin's one line), still before any model is loaded."""
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'out'), num_generations=4, lmbda=1), check=False, timeout=120)
    assert run.returncode != 0
    assert 'generation_batch_size (2) must be evenly divisible by num_generations (4)' in run.output
    assert 'Valid values: [2]' in run.output
    assert not any(marker in run.output for marker in MODEL_LOADED_MARKERS)


RL_FLAGS = dict(num_generations=1, reward_funcs=[], reward_weights=None, scale_rewards=None, gkd_rl_coef=0.0, lmbda=0.5,
                seq_kd=False, sequence_parallel_size=1, padding_free=False, packing=False,
                rollout_importance_sampling_mode=None, rollout_importance_sampling_threshold=2.0,
                log_rollout_offpolicy_metrics=False)


@pytest.mark.parametrize('changes,message', [
    ({'num_generations': 0}, '--num_generations must be an integer >= 1'),
    ({'gkd_rl_coef': 0.5}, '--gkd_rl_coef 0.5 needs --reward_funcs'),
    ({'reward_funcs': ['a', 'b'], 'reward_weights': [1.0]}, '--reward_weights has 1 values but --reward_funcs names 2'),
    ({'reward_funcs': ['a'], 'reward_weights': [float('nan')]}, '--reward_weights must be finite'),
    ({'scale_rewards': 'gdpo'}, "--scale_rewards must be one of ['group', 'batch', 'none']"),
    ({'reward_funcs': ['a'], 'lmbda': 0, 'seq_kd': True}, '--reward_funcs only act on on-policy steps'),
    ({'num_generations': 2, 'lmbda': 0}, '--num_generations 2 samples several completions per prompt'),
    ({'reward_funcs': ['a'], 'padding_free': True}, '--padding_free'),
    ({'rollout_importance_sampling_mode': 'tis'}, "--rollout_importance_sampling_mode must be one of ['token_truncate', "
     "'token_mask', 'sequence_truncate', 'sequence_mask'] (or unset) for GKD, got 'tis'"),
    ({'rollout_importance_sampling_threshold': 0.5}, '--rollout_importance_sampling_threshold must be >= 1'),
    ({'rollout_importance_sampling_mode': 'sequence_mask'}, '--rollout_importance_sampling_mode sequence_mask weights '
     'the policy-gradient terms, which are off (--gkd_rl_coef 0.0, --gkd_sampled_kl_coef 0)'),
    ({'log_rollout_offpolicy_metrics': True}, '--log_rollout_offpolicy_metrics true measures the samples of the '
     'policy-gradient terms, which are off'),
])
def test_rl_flag_checks(changes, message):
    check_rl_flags(SimpleNamespace(**RL_FLAGS))  # the defaults pass
    with pytest.raises(ValueError, match=re.escape(message)):
        check_rl_flags(SimpleNamespace(**dict(RL_FLAGS, **changes)))


def test_rl_flags_pass_under_sequence_parallelism():
    """Several completions per prompt and rewards run under ``--sequence_parallel_size`` (issue 63; refused before:
    the group pooled its rows): tests/test_sequence_parallel.py trains them."""
    check_rl_flags(SimpleNamespace(**dict(RL_FLAGS, num_generations=2, reward_funcs=['a'], gkd_rl_coef=1.0,
                                          sequence_parallel_size=2)))
