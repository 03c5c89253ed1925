"""``megatron rlhf --rlhf_type gkd``: bad command lines are refused by the real ``megatron`` launcher, before any rank
starts (so before CUDA, transformer-engine or a model is touched); good ones are passed on to ms-swift unchanged."""
import argparse
import ast
import importlib.util
import os

import pytest
from conftest import OFFLINE_ENV, run_megatron_launcher, without_import_side_effects

SPAWNED = 'run sh: `'  # printed by ms-swift's launcher just before it starts the rank processes


def megatron_rlhf(*flags, env=None):
    return megatron_rlhf_with('Qwen/Qwen3-0.6B', *flags, env=env)


# ranks started by the launcher exit at once (see its sitecustomize): ~20 s each of loading what no test here reads
STOP_RANKS = {'PYTHONPATH': os.path.join(os.path.dirname(__file__), 'stop_site')}


# a training set (the launcher refuses a command line without one): a hub id, whose rows the launcher does not read
DATASET = ('--dataset', 'AI-ModelScope/alpaca-gpt4-data-en')


def megatron_rlhf_with(model, *flags, env=None):
    full_env = dict(without_import_side_effects(os.environ), **OFFLINE_ENV, **STOP_RANKS, **(env or {}))
    full_env.pop('SWIFT_GKD_PLUGIN', None) if env is None or 'SWIFT_GKD_PLUGIN' not in env else None
    proc = run_megatron_launcher(['rlhf', '--model', model, *DATASET, *flags], full_env)
    return proc.returncode, proc.stdout + proc.stderr


GKD = ('--rlhf_type', 'gkd')
MISSING_EXTRA = 'megatron rlhf: error: megatron rlhf --rlhf_type gkd needs megatron-core'


def megatron_installed() -> bool:
    from swift_gkd_plugin.options.backends import MEGATRON_MODULES, importable
    return all(importable(module) for module in MEGATRON_MODULES)


def assert_passed_the_checks(output):
    """The launcher's flag checks let the command line through: it starts the ranks, or, without the ``megatron``
    extra (which every rank would fail to import), names the extra to install instead."""
    if megatron_installed():
        assert SPAWNED in output and 'megatron rlhf: error' not in output, output[-3000:]
    else:
        errors = [line for line in output.splitlines() if line.startswith('megatron rlhf: error')]
        assert len(errors) == 1 and errors[0].startswith(MISSING_EXTRA), output[-3000:]
        assert SPAWNED not in output and 'Traceback' not in output


@pytest.mark.parametrize('flags,needle', [
    (('--beta', '1.5'), '--beta must be in [0, 1]'),
    (('--lmbda', '-0.1'), '--lmbda must be in [0, 1]'),
    (('--temperature', '0'), '--temperature must be >= 0.02'),
    (('--temperature', 'inf'), '--temperature must be a finite number >= 0.02 (the loss divides'),
    (('--beta', 'nan'), '--beta must be a finite number in [0, 1] (0 = KL(teacher||student)'),
    (('--sft_alpha', '-1'), '--sft_alpha must be >= 0'),
    (('--max_completion_length', '0'), '--max_completion_length must be > 0'),
    (('--gkd_loss_impl', 'fused'), "--gkd_loss_impl 'fused' is not available in megatron rlhf (allowed: ['auto', "
     "'dense'])"),
    (('--gkd_loss_impl', 'chunked'), "--gkd_loss_impl 'chunked' is not available in megatron rlhf"),
    (('--gkd_logits_topk', '0'), '--gkd_logits_topk must be a positive integer'),
    (('--gkd_topk_tail', 'true'), '--gkd_topk_tail true needs --gkd_logits_topk'),
    (('--teacher_model_server', 'http://127.0.0.1:9'), '--gkd_logits_topk is required with --teacher_model_server'),
    (('--teacher_model_server', 'http://127.0.0.1:9', '--gkd_logits_topk', '8', '--offload_teacher_model', 'true'),
     '--offload_teacher_model true has no effect with --teacher_model_server'),
    (('--teacher_model_server', 'http://127.0.0.1:9', '--gkd_logits_topk', '8', '--seq_kd', 'true'),
     '--seq_kd true needs a local teacher that can sample'),
    (('--teacher_model_server', '[{"url": "http://127.0.0.1:9", "tags": ["a"]}, {"url": "local", "tags": ["b"]}]',
      '--gkd_logits_topk', '8'), '(the local teacher for some tags) is supported by swift rlhf only'),
    (('--tensor_model_parallel_size', '2', '--teacher_tensor_model_parallel_size', '4'),
     '--teacher_tensor_model_parallel_size 4 differs from --tensor_model_parallel_size 2'),
    (('--teacher_adapters', '/tmp/adapter'), '--teacher_adapters is supported by swift rlhf only'),
    (('--async_generate', 'true'), '--async_generate true is not supported by megatron rlhf (allowed: false'),
    (('--seq_kd', 'maybe'), 'cannot read the GKD flags'),
    (('--teacher_model_server', 'http://127.0.0.1:9', '--gkd_logits_topk', '8', '--teacher_api_key', 'k',
      '--teacher_server_wait', '30'), "['--teacher_api_key', '--teacher_server_wait'] are supported by swift rlhf only"),
    # RL + distillation (docs_en/rl.md): ms-swift's Megatron GKD has no rewards and samples once per prompt
    (('--reward_funcs', 'accuracy', 'format'), "['--reward_funcs'] are supported by swift rlhf only: ms-swift's "
     'Megatron GKD has no reward machinery'),
    (('--reward_weights', '1', '0.5', '--num_generations', '4'), "['--reward_weights', '--num_generations'] are "
     'supported by swift rlhf only'),
    (('--gkd_rl_coef', '0.5'), "['--gkd_rl_coef'] are supported by swift rlhf only"),
    (('--rollout_importance_sampling_mode', 'token_truncate', '--log_rollout_offpolicy_metrics', 'true'),
     "['--rollout_importance_sampling_mode', '--log_rollout_offpolicy_metrics'] are supported by swift rlhf only"),
    (('--gkd_cross_tokenizer', 'uld'), '--gkd_cross_tokenizer uld is supported by swift rlhf only'),
    (('--gkd_drop_bad_rows', 'true'), '--gkd_drop_bad_rows true is read by swift rlhf only (allowed here: false): '
     'megatron rlhf trains on every row'),
    (('--temperature', '0.001'), '--temperature must be >= 0.02 (the loss divides the logits by it'),
    (('--multi_turn_scheduler', 'x', '--max_turns', '2'), '--multi_turn_scheduler x, --max_turns 2: multi-turn '
     'rollouts are supported by swift rlhf only'),
    (('--gkd_sampling_temperature', '0'), '--gkd_sampling_temperature must be > 0 (or unset for --temperature), '
     'got 0.0'),
    (('--gkd_sampling_temperature', 'nan'), '--gkd_sampling_temperature must be a finite number > 0 (or unset for '
     '--temperature), got nan'),
    (('--gkd_skd_top_k', '25'), '--gkd_skd_top_k 25 is supported by swift rlhf only: megatron rlhf samples with '
     'vLLM or with its own tensor-parallel sampler, and neither has SKD\'s step where the teacher verifies the '
     'student\'s drafts. SKD runs in swift rlhf with transformers sampling (--use_vllm false) and a local teacher '
     '(--teacher_model, resident or --offload_teacher_model; the LoRA student\'s base; --teacher_adapters) or this '
     'plugin\'s teacher server (--teacher_model_server with `swift-gkd serve-teacher`); pass --gkd_skd_top_k 0 '
     'here'),
    (('--gkd_divergence', 'skew_kl', '--gkd_skew_alpha', '-0.5'), '--gkd_skew_alpha must be in [0, 1)'),
    (('--gkd_divergence', 'skew_rkl', '--beta', '0.2'), '--beta 0.2 applies to --gkd_divergence jsd only'),
    (('--gkd_ref_kl_coef', '1'), '--gkd_ref_kl_coef 1 is supported by swift rlhf only yet: megatron rlhf builds no '
     'reference model beside the student'),
    (('--gkd_ref_kl_coef', '-1'), '--gkd_ref_kl_coef must be >= 0 (0: off), got -1.0'),
    (('--gkd_sampled_kl_coef', '1', '--lmbda', '1'), '--gkd_sampled_kl_coef 1 is supported by swift rlhf only yet'),
    (('--gkd_divergence_coef', '0.5'), '--gkd_divergence_coef 0.5 is supported by swift rlhf only yet'),
    (('--use_ray', 'true'), "--use_ray true is not supported with the plugin: it runs ms-swift's own Ray GKD trainer"),
    (('--use_ray', ), "--use_ray true is not supported with the plugin"),
    # the teacher-score store: megatron rlhf reads one (--teacher_scores) and writes none
    (('--save_teacher_scores', '/tmp/store'), '--save_teacher_scores /tmp/store is supported by swift rlhf only: '
     'megatron rlhf reads a teacher-score store (--teacher_scores) and writes none; write the store with `swift-gkd '
     'score` (or `swift rlhf --save_teacher_scores DIR`), then pass it here as --teacher_scores DIR'),
    (('--gkd_score_only', 'true'), '--gkd_score_only true is supported by swift rlhf only (it is what `swift-gkd '
     'score` runs): megatron rlhf reads a teacher-score store (--teacher_scores) and writes none; write the store'),
    (('--teacher_scores_dtype', 'float32'), '--teacher_scores_dtype float32 is the dtype of a store being written, '
     'which megatron rlhf does not write'),
    (('--teacher_scores_samples', '12'), '--teacher_scores_samples 12 is supported by swift rlhf only'),
    (('--teacher_scores', '/tmp/store', '--lmbda', '0.5'), '--lmbda 0.5 / --seq_kd false sample new tokens, which '
     '--teacher_scores cannot hold, and this run has no teacher to score them: pass --teacher_model'),
    (('--teacher_scores', '/tmp/store', '--lmbda', '0', '--seq_kd', 'true'), '--lmbda 0 / --seq_kd true sample new '
     'tokens, which --teacher_scores cannot hold'),
    (('--teacher_scores', '/tmp/store', '--teacher_model_server', 'http://127.0.0.1:9', '--gkd_logits_topk', '8'),
     '--teacher_scores with --teacher_model_server http://127.0.0.1:9 is supported by swift rlhf only yet'),
    # issue 74 item 10a: refused in every rank (a remaining_argv traceback once the arguments were built)
    (('--gkd_lmbda', '0.5'), 'unrecognized arguments: --gkd_lmbda 0.5 (--gkd_lmbda: did you mean --lmbda?)'),
])
def test_bad_gkd_flags_are_refused_before_any_rank_starts(flags, needle):
    code, output = megatron_rlhf(*GKD, *flags)
    assert code == 2, output[-3000:]
    assert 'megatron rlhf: error: ' in output and needle in output, output[-3000:]
    assert SPAWNED not in output and 'Traceback' not in output


def test_plugin_flags_with_another_rlhf_type_are_refused():
    code, output = megatron_rlhf('--rlhf_type', 'dpo', '--gkd_topk_tail', 'true')
    assert code == 2 and "['--gkd_topk_tail'] only apply to --rlhf_type gkd (got --rlhf_type dpo)" in output
    assert SPAWNED not in output


def test_megatrons_default_use_vllm_needs_a_mode_where_vllm_is_installed():
    """ms-swift's Megatron default is ``--use_vllm true``: with vLLM installed, on-policy steps need its mode, named
    in the launcher (it was refused in every rank, with a traceback)."""
    pytest.importorskip('vllm')
    code, output = megatron_rlhf(*GKD)
    assert code == 2, output[-3000:]
    assert ('--use_vllm true needs --vllm_mode colocate or server (got None); or pass --use_vllm false to sample '
            'from the training model') in output
    assert SPAWNED not in output and 'Traceback' not in output
    assert_passed_the_checks(megatron_rlhf(*GKD, '--lmbda', '0')[1])  # no on-policy step: nothing samples


@pytest.mark.parametrize('flags', [
    GKD + ('--use_vllm', 'false'),
    GKD + ('--use_vllm', 'true', '--vllm_mode', 'colocate'),
    GKD + ('--use_vllm', 'false', '--seq_kd', 'true', '--lmbda', '0.3', '--beta', '0', '--temperature', '1.0', '--gkd_logits_topk', '16',
           '--gkd_topk_tail', 'true', '--tensor_model_parallel_size', '2', '--teacher_tensor_model_parallel_size',
           '2', '--gkd_loss_impl', 'dense', '--num_generations', '1', '--gkd_rl_coef', '0',
           '--gkd_sampling_temperature', '0.7'),
])
def test_good_command_lines_pass_the_checks(flags):
    code, output = megatron_rlhf(*flags, env={'NPROC_PER_NODE': '2'})  # (tensor parallel 2 needs two ranks)
    assert_passed_the_checks(output)


@pytest.mark.parametrize('flags,env,needle', [
    (('--context_parallel_size', '3'), {'NPROC_PER_NODE': '2'},
     '--context_parallel_size 3 = 3 ranks a model copy, which does not divide the 2 ranks (NPROC_PER_NODE x NNODES)'),
    (('--tensor_model_parallel_size', '2', '--context_parallel_size', '2'), {'NPROC_PER_NODE': '2', 'NNODES': '1'},
     '--tensor_model_parallel_size 2 x --context_parallel_size 2 = 4 ranks a model copy, which does not divide the 2'),
    (('--tensor_model_parallel_size', '2'), {}, 'does not divide the 1 rank (NPROC_PER_NODE x NNODES)'),
    (('--expert_model_parallel_size', '2'), {'NPROC_PER_NODE': '3'}, '--expert_model_parallel_size 2 does not divide '
     'the 3 ranks'),
    (('--dataset', './no_such_rows.jsonl'), {}, '--dataset ./no_such_rows.jsonl: no such file'),
    (('--teacher_model', './no_such_teacher'), {}, '--teacher_model ./no_such_teacher: no such model folder'),
    (('--teacher_model_server', 'http://[::1', '--gkd_logits_topk', '8'), {},
     '--teacher_model_server http://[::1: it does not parse as a URL (Invalid IPv6 URL)'),
    (('--teacher_model_server', 'http//127.0.0.1:8000', '--gkd_logits_topk', '8'), {},
     "it has no scheme (no '://') and a path '//127.0.0.1:8000' after the host 'http' (did you mean "
     'http://127.0.0.1:8000?)'),
    # issue 81 item 5: each passed the launcher and failed in every rank (--lmbda 0: no step samples from the model,
    # whose own check refuses virtual stages)
    (('--virtual_pipeline_model_parallel_size', '0', '--lmbda', '0'), {}, '--virtual_pipeline_model_parallel_size 0: allowed a '
     'positive integer or unset'),
    (('--expert_tensor_parallel_size', '0'), {}, '--expert_tensor_parallel_size 0: allowed a positive integer'),
    (('--virtual_pipeline_model_parallel_size', '2', '--lmbda', '0'), {}, '--virtual_pipeline_model_parallel_size 2 needs '
     '--pipeline_model_parallel_size > 1'),
    (('--expert_tensor_parallel_size', '2', '--expert_model_parallel_size', '2'), {'NPROC_PER_NODE': '2'},
     '--expert_tensor_parallel_size 2 x --expert_model_parallel_size 2 x --pipeline_model_parallel_size 1 = 4 ranks '
     'an expert layout, which does not divide the 2 ranks'),
], ids=['cp3_of_2', 'tp2_cp2_of_2', 'tp2_of_1', 'ep2_of_3', 'dataset', 'teacher_model', 'ipv6_url', 'no_scheme_url',
        'vpp0', 'etp0', 'vpp2_pp1', 'etp2_ep2_of_2'])
def test_what_the_ranks_failed_on_is_refused_by_the_launcher(flags, env, needle):
    """Issue 65 item 4: each was a traceback in every rank (a ZeroDivisionError for sizes that do not divide the
    ranks, a ValueError after both models loaded for a missing dataset) or a message without the flag."""
    code, output = megatron_rlhf(*GKD, '--use_vllm', 'false', *flags, env=env)
    assert code == 2, output[-3000:]
    errors = [line for line in output.splitlines() if line.startswith('megatron rlhf: error: ')]
    assert len(errors) == 1 and needle in errors[0], output[-3000:]
    assert SPAWNED not in output and 'Traceback' not in output


def test_another_rlhf_type_reaches_the_ranks():
    """Not the plugin's business (its ranks then fail to import Megatron on a machine without it)."""
    code, output = megatron_rlhf('--rlhf_type', 'dpo', '--beta', '5')
    assert SPAWNED in output and 'megatron rlhf: error' not in output, output[-3000:]


@pytest.mark.skipif(megatron_installed(), reason='the megatron extra is installed here')
def test_without_megatron_core_the_launcher_names_the_extra():
    """Instead of every rank's raw ModuleNotFoundError for 'megatron'."""
    code, output = megatron_rlhf(*GKD, '--use_vllm', 'false')
    assert code == 2, output[-3000:]
    assert MISSING_EXTRA in output and 'pip install ".[megatron]"' in output
    assert SPAWNED not in output and 'ModuleNotFoundError' not in output


def test_a_teacher_with_another_vocabulary_size_is_refused_before_any_rank_starts(tiny_ws):
    """The configs' vocabularies (448 and 464 rows), padded to the tensor-parallel size as mcore-bridge pads them,
    are compared in the launcher, not at the first step after both models are loaded."""
    code, output = megatron_rlhf_with(tiny_ws.student, *GKD, '--teacher_model', tiny_ws.other_vocab_teacher,
                                      '--tensor_model_parallel_size', '2', '--use_vllm', 'false')
    assert code == 2, output[-3000:]
    assert (f'--teacher_model {tiny_ws.other_vocab_teacher} has 464 output rows and --model {tiny_ws.student} 448 '
            '(config.json vocab_size, padded to a multiple of --tensor_model_parallel_size 2)') in output
    assert SPAWNED not in output
    code, output = megatron_rlhf_with(tiny_ws.student, *GKD, '--teacher_model', tiny_ws.teacher, '--use_vllm', 'false')
    assert_passed_the_checks(output)


def test_padded_sizes_follow_the_tensor_parallel_size(tiny_ws):
    from swift_gkd_plugin.options.model_context import padded_vocab_size
    assert [padded_vocab_size(tiny_ws.other_vocab_teacher, tp) for tp in (1, 2, 3, 5)] == [464, 464, 465, 465]
    assert padded_vocab_size(tiny_ws.root, 1) is None  # not a model directory: left to the ranks


def test_opt_out_leaves_the_launcher_untouched():
    code, output = megatron_rlhf(*GKD, '--beta', '1.5', env={'SWIFT_GKD_PLUGIN': '0'})
    assert SPAWNED in output and 'megatron rlhf: error' not in output, output[-3000:]


def test_rank_side_checks_refuse_rewards_but_not_ms_swifts_default_num_generations():
    """In the ranks the arguments carry ms-swift's Megatron default --num_generations 8 (reset to 1 for gkd later),
    so only the launcher, which sees the command line, can tell a user's G > 1; rewards are refused on both sides."""
    from swift_gkd_plugin.megatron.setup.checks import check_megatron_gkd, parse_megatron_command_line
    parsed = parse_megatron_command_line(['--rlhf_type', 'gkd'])
    parsed.num_generations = 8
    check_megatron_gkd(parsed)
    parsed.reward_funcs = ['accuracy']
    with pytest.raises(ValueError, match=r"\['--reward_funcs'\] are supported by swift rlhf only"):
        check_megatron_gkd(parsed)


def _megatron_argument_defaults():
    """The fields of ms-swift's Megatron argument classes with their defaults, read from their source (importing
    them needs megatron-core): ``field(default_factory=list)`` as ``[]``, other non-literal defaults as None."""
    folder = os.path.dirname(importlib.util.find_spec('swift.megatron').origin)
    defaults = {}
    for name in sorted(os.listdir(os.path.join(folder, 'arguments'))):
        if not name.endswith('.py'):
            continue
        with open(os.path.join(folder, 'arguments', name)) as f:
            tree = ast.parse(f.read())
        for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
            for node in cls.body:
                if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                    text = ast.unparse(node.value) if node.value is not None else 'None'
                    try:
                        value = ast.literal_eval(node.value) if node.value is not None else None
                    except ValueError:
                        value = [] if 'default_factory=list' in text else None
                    defaults.setdefault(node.target.id, value)
    return defaults


def test_rank_side_checks_read_only_fields_that_megatron_arguments_have():
    """In the ranks the checks get ms-swift's Megatron arguments plus the plugin's flags: every attribute they read
    must exist there (a check reading a missing one would stop every rank with an AttributeError)."""
    from dataclasses import fields

    from swift_gkd_plugin.megatron.setup.checks import MegatronGKDFlagsMixin, check_megatron_gkd
    defaults = _megatron_argument_defaults()
    assert {'beta', 'lmbda', 'temperature', 'max_turns', 'reward_funcs'} <= set(defaults)
    args = argparse.Namespace(**defaults, **{f.name: f.default for f in fields(MegatronGKDFlagsMixin)})
    args.rlhf_type = 'gkd'
    check_megatron_gkd(args)


def test_float32_under_fp16_mixed_precision_is_warned():
    """ms-swift maps a float32 model to --fp16 true under Megatron-SWIFT; given --fp16 (either way) it is the user's
    choice and not warned about."""
    import torch

    from swift_gkd_plugin.megatron.setup.checks import float32_warning
    assert '--fp16 false --bf16 false to train in float32' in float32_warning(torch.float32, None, True)
    assert float32_warning('float32', None, True)  # as given on the command line
    assert float32_warning(torch.float32, True, True) is None  # --fp16 true given
    assert float32_warning(torch.float32, False, False) is None
    assert float32_warning(torch.bfloat16, None, False) is None


def test_rows_without_a_user_message_are_refused_where_steps_sample(tmp_path):
    """Issue 65 item 4: such a row failed every rank with dacite's MissingValueError when an on-policy step drew it;
    dataset steps alone (--lmbda 0) train on its response."""
    import json
    rows = [{'messages': [{'role': 'user', 'content': 'q'}, {'role': 'assistant', 'content': 'a'}]},
            {'messages': [{'role': 'system', 'content': 's'}, {'role': 'assistant', 'content': 'a'}]}]
    data = tmp_path / 'rows.jsonl'
    data.write_text(''.join(json.dumps(row) + '\n' for row in rows))
    code, output = megatron_rlhf(*GKD, '--use_vllm', 'false', '--lmbda', '1', '--dataset', str(data))
    assert code == 2, output[-3000:]
    assert (f'--dataset {data}: 1 row(s) without a user message (line 2: messages of the roles system, assistant (no '
            '"user" message)); with --lmbda 1 the student or the teacher samples') in output, output[-3000:]
    assert SPAWNED not in output and 'Traceback' not in output
    assert_passed_the_checks(megatron_rlhf(*GKD, '--use_vllm', 'false', '--lmbda', '0', '--dataset', str(data),
                                           '--teacher_model', 'Qwen/Qwen3-1.7B')[1])


def test_sequential_experts_are_refused_before_any_rank_starts(tiny_ws, tmp_path):
    """Issue 65: ``--moe_grouped_gemm false`` with a mixture-of-experts model (student or teacher) made megatron-core
    build ``SequentialMLP`` experts, and each rank then failed in mcore-bridge's loader (``'SequentialMLP' object has
    no attribute 'linear_fc1'``). Refused by the launcher in one line naming the flag and the allowed value; the
    same check (which the ranks run again on the resolved folders) passes dense pairs and ``--moe_grouped_gemm
    true``, and refuses a MoE teacher."""
    from swift_gkd_plugin.megatron.setup.checks import parse_megatron_command_line
    from swift_gkd_plugin.megatron.setup.layout import check_grouped_experts
    from swift_gkd_plugin.demo import tiny
    moe = tiny.build_model(str(tmp_path / 'moe'), tiny.load_tokenizer(tiny_ws.student), seed=0, moe=True)
    code, output = megatron_rlhf_with(moe, *GKD, '--teacher_model', tiny_ws.teacher, '--use_vllm', 'false',
                                      '--moe_grouped_gemm', 'false')
    assert code == 2, output[-3000:]
    errors = [line for line in output.splitlines() if line.startswith('megatron rlhf: error: ')]
    assert len(errors) == 1 and f'--moe_grouped_gemm false: --model {moe} is a mixture of experts (4 routed ' \
        'experts)' in errors[0] and 'Allowed: --moe_grouped_gemm true (the default)' in errors[0], output[-3000:]
    assert SPAWNED not in output and 'Traceback' not in output

    def check(model, teacher, grouped):
        ns = parse_megatron_command_line(['--rlhf_type', 'gkd', '--moe_grouped_gemm', grouped])
        check_grouped_experts(ns, [('--model', model), ('--teacher_model', teacher)])

    with pytest.raises(ValueError, match=f'--moe_grouped_gemm false: --teacher_model {moe} is a mixture of experts'):
        check(tiny_ws.student, moe, 'false')
    check(tiny_ws.student, tiny_ws.teacher, 'false')  # dense: the flag changes nothing
    check(moe, moe, 'true')
    check('Qwen/Qwen3-30B-A3B', None, 'false')  # a hub id: the ranks check its downloaded folder


def test_routed_experts_are_found_in_nested_configs(tiny_ws, tmp_path):
    """A multimodal MoE keeps its experts in its text config (transformers' ``Qwen3VLMoeConfig``, saved as a model
    folder's ``config.json``); a dense model has none; a folder without a config is left to the ranks."""
    from transformers import Qwen3VLMoeConfig

    from swift_gkd_plugin.megatron.setup.layout import routed_experts
    config = Qwen3VLMoeConfig()
    config.text_config.num_experts = 6
    config.save_pretrained(str(tmp_path / 'vl_moe'))
    assert routed_experts(str(tmp_path / 'vl_moe')) == 6
    assert routed_experts(tiny_ws.student) == 0
    assert routed_experts(str(tmp_path)) is None


@pytest.fixture(scope='module')
def config_only_models(tmp_path_factory):
    """Model folders holding a config.json alone (what the launcher's layout checks read): a dense 3-layer model, a
    4-layer one, a 3-layer mixture of experts (4 routed experts)."""
    import json
    root = tmp_path_factory.mktemp('layouts')
    configs = {'dense3': {'model_type': 'qwen3', 'num_hidden_layers': 3},
               'dense4': {'model_type': 'qwen3', 'num_hidden_layers': 4},
               'moe3': {'model_type': 'qwen3_moe', 'num_hidden_layers': 3, 'num_experts': 4}}
    for name, config in configs.items():
        (root / name).mkdir()
        (root / name / 'config.json').write_text(json.dumps(config))
    return {name: str(root / name) for name in configs}


@pytest.mark.parametrize('model,teacher,flags,needle', [
    ('dense3', None, ('--pipeline_model_parallel_size', '2'),
     '--pipeline_model_parallel_size 2 with the 3 decoder layers of --model {dense3} (config.json num_hidden_layers): '
     'megatron-core splits them into 2 equal stages and 3 is not a multiple of 2: pass '
     '--decoder_first_pipeline_num_layers 2 (the other stages then hold 1 each), or a --pipeline_model_parallel_size '
     'that divides it (allowed: [1, 3])'),
    ('dense4', 'dense3', ('--pipeline_model_parallel_size', '2'), 'the 3 decoder layers of --teacher_model {dense3}'),
    ('dense4', None, ('--pipeline_model_parallel_size', '2', '--decoder_first_pipeline_num_layers', '4'),
     '--decoder_first_pipeline_num_layers 4 leave 0 layers for the 1 middle stage(s) of --pipeline_model_parallel_size '
     '2, and megatron-core needs them split equally'),
    ('dense4', None, ('--pipeline_model_parallel_size', '2', '--virtual_pipeline_model_parallel_size', '2',
                      '--decoder_last_pipeline_num_layers', '1', '--lmbda', '0'),
     'the stages hold [1, 3] layers, and each must be a multiple of --virtual_pipeline_model_parallel_size 2'),
    ('moe3', None, ('--tensor_model_parallel_size', '2'),
     '--tensor_model_parallel_size 2 with --model {moe3}, a mixture of experts (4 routed experts), needs '
     '--sequence_parallel true'),
], ids=['pp2_of_3_layers', 'teacher_3_layers', 'first_takes_all', 'vpp_of_uneven', 'moe_tp2_without_sp'])
def test_layouts_the_model_cannot_take_are_refused_by_the_launcher(config_only_models, model, teacher, flags, needle):
    """Issue 81 item 5: megatron-core asserted these in every rank (layers per pipeline stage) or raised at the first
    training forward after both models loaded (MoE under tensor parallelism without sequence parallelism)."""
    teacher_flags = ('--teacher_model', config_only_models[teacher]) if teacher else ()
    code, output = megatron_rlhf_with(config_only_models[model], *GKD, '--use_vllm', 'false', *teacher_flags, *flags,
                                      env={'NPROC_PER_NODE': '2'})
    assert code == 2, output[-3000:]
    errors = [line for line in output.splitlines() if line.startswith('megatron rlhf: error: ')]
    assert len(errors) == 1 and needle.format(**config_only_models) in errors[0], output[-3000:]
    assert SPAWNED not in output and 'Traceback' not in output


@pytest.mark.parametrize('model,flags', [
    ('dense3', ('--pipeline_model_parallel_size', '2', '--decoder_first_pipeline_num_layers', '2')),
    ('dense3', ('--pipeline_model_parallel_size', '2', '--decoder_last_pipeline_num_layers', '1')),
    ('dense4', ('--pipeline_model_parallel_size', '2', '--virtual_pipeline_model_parallel_size', '2')),
    ('moe3', ('--tensor_model_parallel_size', '2', '--sequence_parallel', 'true')),
], ids=['first_2_of_3', 'last_1_of_3', 'vpp2_of_4', 'moe_tp2_sp'])
def test_the_layouts_the_refusals_name_pass_the_checks(config_only_models, model, flags, monkeypatch):
    """What the refusals advise passes the same checks on the launcher's parse of the command line (in process: a
    launcher run that passes starts two ranks, ~40 s)."""
    from swift_gkd_plugin.megatron.setup.checks import parse_megatron_command_line
    from swift_gkd_plugin.megatron.setup.layout import (check_moe_sequence_parallel, check_parallel_sizes,
                                                        check_pipeline_layers)
    ns = parse_megatron_command_line(['--rlhf_type', 'gkd', *flags])
    monkeypatch.setenv('NPROC_PER_NODE', '2')  # (the launcher's environment for two ranks)
    check_parallel_sizes(ns)
    check_pipeline_layers(ns, [('--model', config_only_models[model])])
    check_moe_sequence_parallel(ns, config_only_models[model])


def _short_context_config(model: str, folder, positions: int) -> str:
    """A folder holding ``model``'s ``config.json`` with ``positions`` positions (all the launcher reads of it)."""
    import json
    folder.mkdir()
    with open(os.path.join(model, 'config.json')) as f:
        config = json.load(f)
    config['max_position_embeddings'] = positions
    (folder / 'config.json').write_text(json.dumps(config))
    return str(folder)


@pytest.mark.parametrize('case', ['student', 'seq_kd_teacher'])
def test_max_length_above_a_sampling_models_context_is_refused_by_the_launcher(tiny_ws, tmp_path, case):
    """Issue 96 item 5: ``swift rlhf`` refused a ``--max_length`` above the student's context (512 positions) with
    on-policy sampling, ``megatron rlhf`` did not (vLLM refused such a prompt at its first rollout, the model's own
    sampler ran past its positions), and neither checked the teacher's context on seq_kd steps. The launcher reads the
    local folders' ``config.json`` with the same check as ``swift rlhf``; what fits passes it."""
    teacher = _short_context_config(tiny_ws.teacher, tmp_path / 'teacher256', 256)
    if case == 'student':
        flags = ('--teacher_model', tiny_ws.teacher, '--lmbda', '0.5', '--max_length')
        too_long, fits = '1024', '512'
        needle = (f"--max_length 1024 is longer than the student's context (--model {tiny_ws.student}: 512 positions, "
                  'config.json): on-policy sampling (--lmbda 0.5) continues prompts of up to --max_length tokens')
    else:
        flags = ('--teacher_model', teacher, '--lmbda', '0', '--seq_kd', 'true', '--max_length')
        too_long, fits = '384', '256'
        needle = (f"--max_length 384 is longer than the teacher's context (--teacher_model {teacher}: 256 positions, "
                  'config.json): seq_kd steps (--seq_kd true) have the teacher answer prompts')
    code, output = megatron_rlhf_with(tiny_ws.student, *GKD, '--use_vllm', 'false', *flags, too_long)
    assert code == 2, output[-3000:]
    errors = [line for line in output.splitlines() if line.startswith('megatron rlhf: error: ')]
    assert len(errors) == 1 and needle in errors[0], output[-3000:]
    assert f'pass --max_length {fits} or less' in errors[0]
    assert SPAWNED not in output and 'Traceback' not in output
    code, output = megatron_rlhf_with(tiny_ws.student, *GKD, '--use_vllm', 'false', *flags, fits)
    assert_passed_the_checks(output)
