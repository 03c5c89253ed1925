"""``megatron rlhf --rlhf_type gkd``: what used to reach the ranks (a traceback per rank, or exit code 0 having
learnt nothing) is refused by the launcher in one line, and what only training can show stops naming its cause.

Launcher refusals: the real ``megatron`` CLI (its console script, forked from a zygote that imported it: conftest
``run_megatron_launcher``), its ranks stopped at once if it starts them
(``stop_site``); "without vLLM" hides the installed package from that process (``no_vllm_site``). The two guards
are end-to-end runs on the tiny pair (:mod:`megatron_runs`)."""
import os
import shutil

import pytest
import torch
from conftest import OFFLINE_ENV, run_megatron_launcher, without_import_side_effects
from megatron_runs import ACTIVE, megatron_args, run_megatron, train_rows
from test_launcher_checks import DATASET, GKD, SPAWNED, STOP_RANKS, assert_passed_the_checks

NO_VLLM = {'PYTHONPATH': os.path.join(os.path.dirname(__file__), 'no_vllm_site')}


def launch(*flags, env=STOP_RANKS):
    """``megatron rlhf --rlhf_type gkd FLAGS``: (exit code, output)."""
    full_env = dict(without_import_side_effects(os.environ), **OFFLINE_ENV, **env)
    full_env.pop('SWIFT_GKD_PLUGIN', None)
    proc = run_megatron_launcher(['rlhf', *GKD, *flags], full_env)
    return proc.returncode, proc.stdout + proc.stderr


def assert_refused(code, output, message):
    """Exit code 2, the one ``megatron rlhf: error:`` line holding ``message``, no rank started, no traceback."""
    errors = [line for line in output.splitlines() if line.startswith('megatron rlhf: error: ')]
    assert code == 2 and len(errors) == 1 and message in errors[0], output[-3000:]
    assert SPAWNED not in output and 'Traceback' not in output


def test_a_command_line_without_a_training_set_is_refused_in_the_launcher(tiny_ws):
    code, output = launch('--model', tiny_ws.student, '--teacher_model', tiny_ws.teacher, '--use_vllm', 'false')
    assert_refused(code, output, 'no training set: pass --dataset (local files such as train.jsonl, or hub dataset '
                   'ids) or --cached_dataset')


def test_no_teacher_and_no_privileged_prompt_is_refused_in_the_launcher(tiny_ws, tmp_path):
    """No --teacher_model: the teacher is the student itself, which needs a teacher_prompt column to differ."""
    code, output = launch('--model', tiny_ws.student, '--dataset', tiny_ws.train, '--use_vllm', 'false')
    assert_refused(code, output, 'no teacher: without --teacher_model or --teacher_model_server the teacher is the '
                   'student itself, and no row of --dataset has a teacher_prompt or teacher_messages column')
    privileged = tmp_path / 'privileged.jsonl'
    privileged.write_text('{"messages": [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"}], '
                          '"teacher_prompt": "1+1? The answer is 2."}\n')
    assert_passed_the_checks(launch('--model', tiny_ws.student, '--dataset', str(privileged), '--use_vllm', 'false')[1])


def test_context_parallel_sampling_from_the_megatron_model_passes_the_launcher(tiny_ws):
    """Refused before the plugin gathered the last positions' logits over the CP ranks (test_context_parallel.py)."""
    assert_passed_the_checks(launch('--model', tiny_ws.student, *DATASET, '--teacher_model', tiny_ws.teacher,
                                    '--use_vllm', 'false', '--seq_kd', 'true', '--context_parallel_size', '2',
                                    env=dict(STOP_RANKS, NPROC_PER_NODE='2'))[1])  # (CP 2: two ranks)


def test_a_teacher_server_without_vllm_is_refused_in_the_launcher(tiny_ws):
    """ms-swift's teacher client refuses to start without vLLM (every rank, after loading the student)."""
    server = ('--teacher_model_server', 'http://127.0.0.1:9', '--gkd_logits_topk', '8', '--use_vllm', 'false')
    code, output = launch('--model', tiny_ws.student, *DATASET, *server, env=NO_VLLM)
    assert_refused(code, output, "--teacher_model_server http://127.0.0.1:9 needs vLLM installed on this machine, the "
                   "trainer's: megatron rlhf asks the server through ms-swift's teacher client, which refuses to start "
                   'without it (pip install vllm')
    assert_passed_the_checks(launch('--model', tiny_ws.student, *DATASET, *server)[1])  # vLLM installed here


def test_the_divergence_coef_refusal_names_what_works_in_megatron():
    """It advised --lmbda 1 and --gkd_sampled_kl_coef > 0, which megatron rlhf refuses in turn: a dead end."""
    code, output = launch('--model', 'Qwen/Qwen3-0.6B', *DATASET, '--use_vllm', 'false', '--gkd_divergence_coef', '0')
    assert_refused(code, output, '--gkd_divergence_coef 0 is supported by swift rlhf only yet: the Megatron loss is '
                   'the divergence alone, at weight 1 (no policy-gradient term: --gkd_sampled_kl_coef and '
                   '--gkd_rl_coef are refused here too). Pass --gkd_divergence_coef 1 here')
    assert '--lmbda 1' not in output
    code, output = launch('--model', 'Qwen/Qwen3-0.6B', *DATASET, '--use_vllm', 'false', '--gkd_divergence_coef', '-1')
    assert_refused(code, output, '--gkd_divergence_coef must be >= 0')  # out of range: the shared check's message


cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason='the CPU harness does nothing where CUDA is present')


@cpu_only
@pytest.mark.parametrize('tuner', ['full', 'lora'])
def test_a_copy_of_the_student_as_teacher_stops_before_the_first_step(tiny_ws, tmp_path, tuner):
    """Under ms-swift's default --weight_decay 0.1 the run exited 0: step 1's gradient norm was 0, then weight decay
    moved the student (gradient norm 5e-7 at step 2). Decided from the weights at train begin, as swift rlhf does.
    A LoRA student (issue 65 item 4): its fresh adapter adds nothing, so its base is compared (the names never
    matched: it trained every step and ended with NothingLearnt)."""
    teacher = str(tmp_path / 'copy_of_the_student')
    shutil.copytree(tiny_ws.student, teacher)
    run = run_megatron(megatron_args(tiny_ws, str(tmp_path / 'out'), teacher_model=teacher, tuner_type=tuner),
                       check=False, launcher=False)  # refused by the ranks: forked from the Megatron zygote
    assert run.returncode != 0 and ACTIVE in run.output, run.output[-3000:]
    assert (f"--teacher_model {teacher} has the student's weights exactly (a copy of --model): distil from another "
            'model; no training row has a teacher_prompt or teacher_messages and --sft_alpha is 0') in run.output
    assert train_rows(run) == []  # stopped before the first step


@cpu_only
def test_a_nan_teacher_weight_names_the_model_and_the_step(tiny_ws, tmp_path):
    """It stopped with megatron-core's "found NaN in local grad norm ... iteration -1", naming neither."""
    from safetensors.torch import load_file, save_file
    teacher = str(tmp_path / 'nan_teacher')
    shutil.copytree(tiny_ws.teacher, teacher)
    path = os.path.join(teacher, 'model.safetensors')
    weights = load_file(path)
    weights['model.layers.1.mlp.down_proj.weight'][0, 0] = float('nan')
    save_file(weights, path, metadata={'format': 'pt'})
    run = run_megatron(megatron_args(tiny_ws, str(tmp_path / 'out'), teacher_model=teacher, lmbda=0, train_iters=1),
                       check=False, launcher=False)  # stopped by the ranks: forked from the Megatron zygote
    assert run.returncode != 0 and ACTIVE in run.output, run.output[-3000:]
    assert (f'the teacher (--teacher_model {teacher}): its logits hold NaN at response token 1 of ') in run.output
    assert 'a dataset response) on step 1 (off_policy step), so the loss is not finite' in run.output
    assert 'found NaN in local grad norm' not in run.output


# ----------------------------------------------------------------- issue 74 items 5 and 8: refused by the launcher
@pytest.mark.parametrize('flag', ['tensor_model_parallel_size', 'pipeline_model_parallel_size',
                                  'context_parallel_size', 'expert_model_parallel_size'])
def test_a_parallel_size_of_0_is_refused_in_the_launcher(tiny_ws, tmp_path, flag):
    """``check_parallel_sizes`` read ``getattr(args, flag) or 1``, turning 0 into 1 before its own check: the
    launcher let it through and every rank stopped on a ZeroDivisionError."""
    run = run_megatron(megatron_args(tiny_ws, str(tmp_path / 'out'), **{flag: 0}), check=False)
    assert_refused(run.returncode, run.output, f'--{flag} 0: allowed a positive integer (1: not split)')


@pytest.fixture(scope='module')
def three_experts(tiny_ws):
    """A tiny Qwen3-MoE with 3 routed experts (2 per token), and one with 4."""
    from filelock import FileLock

    from swift_gkd_plugin.demo import tiny
    paths = {n: os.path.join(tiny_ws.root, f'moe_{n}_experts') for n in (3, 4)}
    with FileLock(os.path.join(tiny_ws.root, 'moe_experts.lock')):
        for n, path in paths.items():
            if not os.path.exists(path):
                tiny.build_model(path + '.partial', tiny.load_tokenizer(tiny_ws.student), seed=n, moe=True,
                                 num_experts=n)
                os.replace(path + '.partial', path)
    return paths


@pytest.mark.parametrize('who', ['teacher_model', 'model'])
def test_an_expert_count_that_the_ep_size_does_not_divide_is_refused_in_the_launcher(tiny_ws, three_experts,
                                                                                       tmp_path, who):
    """A teacher of 3 experts at --expert_model_parallel_size 2 passed the launcher; megatron-core asserted on both
    ranks once the student had loaded. The student's and the teacher's counts are read from their config.json."""
    models = {'model': three_experts[4], 'teacher_model': three_experts[4], who: three_experts[3]}
    run = run_megatron(megatron_args(tiny_ws, str(tmp_path / 'out'), model_type='qwen3_moe',
                                     teacher_model_type='qwen3_moe', expert_model_parallel_size=2,
                                     global_batch_size=4, **models),
                       nproc=2, check=False)
    assert_refused(run.returncode, run.output, f'--expert_model_parallel_size 2 does not divide the 3 routed experts '
                   f'of --{who} {three_experts[3]}: each expert-parallel rank holds an equal share of every MoE '
                   "layer's experts (the teacher is built in the student's layout); allowed: [1, 3]")


def test_a_fresh_lora_on_its_own_base_without_a_teacher_view_is_refused_in_the_launcher(tiny_ws, tmp_path):
    """--teacher_model = --model with --tuner_type lora and no trained adapter (--adapters, --mcore_adapter), rows
    without a teacher_prompt: the student is its teacher, loss 0 from step 1; the ranks loaded it and trained to the
    run guard's error (``lora_nothing_to_learn``, test_megatron_rlhf.py, still shows that guard)."""
    run = run_megatron(megatron_args(tiny_ws, str(tmp_path / 'out'), teacher_model=tiny_ws.student, tuner_type='lora',
                                     lmbda=0), check=False)
    assert_refused(run.returncode, run.output, f'--teacher_model {tiny_ws.student} is --model with --tuner_type lora')
    assert ('Start from a trained adapter (--adapters or --mcore_adapter), add a teacher_prompt column'
            in run.output), run.output[-3000:]
