"""The example scripts: every flag they pass exists (parsed by the real argument classes), and the self-distillation
example trains on a loss that is not zero from the start.

The scripts need real models and GPUs, so they are run by bash with ``swift``, ``megatron`` and ``swift-gkd``
defined as shell functions that record their command line; everything else (variables, arrays) runs for real, and
so do the scripts' own python steps where a test needs what they write (elsewhere ``python`` is recorded too: the
tiny CPU example's workspace build is what ``swift-gkd demo`` runs). The recorded command lines are then parsed as
those programs parse them.
"""
import argparse
import glob
import json
import os
import subprocess
import sys

import pytest
from conftest import OFFLINE_ENV, base_args, run_swift

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'examples')
# A served teacher runs until the script kills it; the kill waits until the server has recorded its command line.
RECORDERS = ('record() { local name="$1"; shift; printf "%s\\0" "$@" > "$RECORD_DIR/$name.tmp"; '
             'mv "$RECORD_DIR/$name.tmp" "$RECORD_DIR/$name"; }\n'
             'swift() { record swift "$@"; }\nmegatron() { record megatron "$@"; }\n'
             'swift-gkd() { record swift-gkd "$@"; [ "$1" != serve-teacher ] || exec sleep 600; }\n'
             'vllm() { record "vllm.$$.$BASHPID" "$@"; [ "$1" != serve ] || exec sleep 600; }\n'
             'kill() { for _ in $(seq 300); do [ -e "$RECORD_DIR/swift-gkd" ] || [ "$(ls "$RECORD_DIR" | grep -c '
             '"^vllm\\.[0-9.]*$")" -ge "$#" ] && break; sleep 0.1; done; builtin kill "$@"; }\n')


def record_commands(script: str, workdir, env=None, run_python=False) -> dict:
    """Runs ``script`` under bash in ``workdir``; returns {program: argv} for each program it called."""
    record_dir = os.path.join(workdir, 'recorded')
    os.makedirs(record_dir, exist_ok=True)
    full_env = dict(os.environ, **OFFLINE_ENV, RECORD_DIR=record_dir, **(env or {}))
    full_env['PATH'] = os.path.dirname(sys.executable) + os.pathsep + full_env['PATH']
    recorders = RECORDERS if run_python else RECORDERS + 'python() { record python "$@"; }\n'
    done = subprocess.run(['bash', '-c', recorders + 'source "$0"', script], cwd=workdir, env=full_env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    commands = {}
    for name in os.listdir(record_dir):
        if not name.endswith('.tmp'):
            with open(os.path.join(record_dir, name)) as f:
                commands[name] = f.read().split('\0')[:-1]
    assert commands, f'{script} called none of swift, megatron, swift-gkd'
    return commands


def unknown_flags(args_class, argv) -> list:
    """The flags of ``argv`` that ms-swift's parser (``swift.utils.parse_args``) would leave unparsed; argparse
    refuses a bad value of a known flag (e.g. a value outside a Literal's choices) with SystemExit."""
    from swift.utils.utils import _patch_get_type_hints
    from transformers import HfArgumentParser
    with _patch_get_type_hints():
        parser = HfArgumentParser([args_class])
    _, remaining = parser.parse_known_args(argv)
    return remaining


def swift_rlhf_args_class():
    from swift_gkd_plugin.swift.setup.arguments import GKDPluginRLHFArguments
    return GKDPluginRLHFArguments


def megatron_rlhf_args_class():
    for module in ('megatron.core', 'mcore_bridge', 'transformer_engine'):  # Megatron-SWIFT's arguments import them
        pytest.importorskip(module, reason=f'{module} is not installed: Megatron-SWIFT needs a CUDA machine')
    from swift_gkd_plugin.megatron.setup.arguments import GKDPluginMegatronRLHFArguments
    return GKDPluginMegatronRLHFArguments


def check_serve_teacher(argv):
    from swift_gkd_plugin.server import cli as server_cli
    parser = argparse.ArgumentParser()
    server_cli.add_arguments(parser)
    parser.parse_args(argv)  # exits on an unknown flag


def check_vllm_serve(argv, trainer_argv):
    """A ``vllm serve`` teacher of an example: vLLM's own parser takes its flags, its ``--max-logprobs`` covers the
    trainer's ``--gkd_logits_topk`` and its ``--max-model-len`` exceeds ``--max_length`` (the trainer refuses
    otherwise, before loading)."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser
    assert argv[0] == 'serve', argv
    served = make_arg_parser(FlexibleArgumentParser()).parse_args(argv[2:])
    topk = int(trainer_argv[trainer_argv.index('--gkd_logits_topk') + 1])
    max_length = int(trainer_argv[trainer_argv.index('--max_length') + 1])
    assert served.max_logprobs >= topk and served.max_model_len > max_length, (argv, trainer_argv)


@pytest.fixture(scope='module')
def omni_privileged_data(tiny_ws, tmp_path_factory):
    """The self-distillation example run on the tiny train set: its command line and the dataset it wrote."""
    workdir = tmp_path_factory.mktemp('omni')
    commands = record_commands(os.path.join(EXAMPLES, 'gkd_self_distill_qwen3_omni_lora.sh'), workdir,
                               env={'SOURCE_DATASET': tiny_ws.train}, run_python=True)
    argv = commands['swift']
    return argv, os.path.join(workdir, argv[argv.index('--dataset') + 1])


@pytest.mark.parametrize('script', sorted(os.path.basename(p) for p in glob.glob(os.path.join(EXAMPLES, '*.sh'))))
def test_example_flags_exist(script, request, tmp_path, monkeypatch):
    if script == 'gkd_self_distill_qwen3_omni_lora.sh':  # its python step needs a source dataset: the tiny one
        commands = {'swift': request.getfixturevalue('omni_privileged_data')[0]}
    else:
        commands = record_commands(os.path.join(EXAMPLES, script), tmp_path, env={'WS': str(tmp_path / 'ws')})
    for program, argv in commands.items():
        if program == 'python':
            continue
        if program == 'swift-gkd':
            assert argv[0] == 'serve-teacher'
            check_serve_teacher(argv[1:])
            continue
        if program.startswith('vllm'):  # `vllm serve` teachers: they must take what the trainer will ask of them
            monkeypatch.setenv('VLLM_PLUGINS', '')  # (ms-swift's vLLM plugin imports torchvision, absent here)
            check_vllm_serve(argv, commands['swift'])
            continue
        assert argv[0] == 'rlhf' and argv[argv.index('--rlhf_type') + 1] == 'gkd', argv
        args_class = swift_rlhf_args_class() if program == 'swift' else megatron_rlhf_args_class()
        assert unknown_flags(args_class, argv[1:]) == [], f'{script}: {program} rlhf does not know these flags'


def test_megatron_moe_example_gives_the_teacher_the_same_privileged_prompt(tiny_ws, omni_privileged_data, tmp_path):
    """The Megatron MoE example self-distils a zero LoRA too (same --model and --teacher_model): it trains on the
    dataset the Omni example writes (a teacher_prompt column in every row), which makes the loss non-zero at step 1
    (the next test; the MoE model itself does not run on CPU, and tests/megatron/test_megatron_rlhf.py trains a
    dense shared-base LoRA with a teacher_prompt end to end). Its data step is recorded, not run: the Omni example's
    own (the same script on the same source rows, into the file --dataset reads), whose rows the fixture wrote."""
    commands = record_commands(os.path.join(EXAMPLES, 'megatron_gkd_moe.sh'), tmp_path,
                               env={'SOURCE_DATASET': tiny_ws.train})
    argv = commands['megatron']
    assert argv[argv.index('--model') + 1] == argv[argv.index('--teacher_model') + 1]
    assert argv[argv.index('--tuner_type') + 1] == 'lora'
    data = argv[argv.index('--dataset') + 1]
    assert commands['python'] == [os.path.join(EXAMPLES, 'privileged_teacher_data.py'), tiny_ws.train, data]
    omni = record_commands(os.path.join(EXAMPLES, 'gkd_self_distill_qwen3_omni_lora.sh'), tmp_path / 'omni',
                           env={'SOURCE_DATASET': tiny_ws.train})['python']
    omni_data = omni_privileged_data[1]
    assert omni[:2] == commands['python'][:2] and os.path.basename(data) == os.path.basename(omni_data)
    with open(omni_data) as f:
        assert all(json.loads(line)['teacher_prompt'] for line in f)


def test_self_distillation_example_gives_the_teacher_a_privileged_prompt(tiny_ws, omni_privileged_data, tmp_path):
    """Shared base, zero LoRA: only the teacher_prompt column the example writes makes the loss non-zero at step 1."""
    argv, data = omni_privileged_data
    assert argv[argv.index('--model') + 1] == argv[argv.index('--teacher_model') + 1]
    assert argv[argv.index('--tuner_type') + 1] == 'lora'
    assert os.path.isfile(data), f'the example trains on {data}, not on a dataset with a privileged teacher column'
    with open(data) as f:
        rows = [json.loads(line) for line in f]
    with open(tiny_ws.train) as f:
        assert len(rows) == sum(1 for _ in f)
    for row in rows:
        question, answer = row['messages'][-2]['content'], row['messages'][-1]['content']
        assert row['teacher_prompt'].startswith(question) and answer in row['teacher_prompt']
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'out'), teacher_model=tiny_ws.student, tuner_type='lora',
                              lora_dropout=0, dataset=data, lmbda=0, max_steps=2, max_length=256))
    assert 'Using shared base model architecture:' in run.output
    assert run.losses[0] > 0, run.losses


def sampled(completion, **columns):
    """An ms-swift on-policy sample of one prompt with ``completion`` and the dataset ``columns``."""
    from swift.rl_core.data import GRPOSample
    messages = [{'role': 'user', 'content': 'Q'}, {'role': 'assistant', 'content': completion}]
    return GRPOSample.from_row({'messages': messages, **columns})


def test_exact_match_reward_plugin_scores_through_ms_swift():
    """The RL example's reward file, imported as --external_plugins imports it, registers `exact_match` in ms-swift's
    registry and is scored by ms-swift's own reward code on sampled rows: the dataset's `solution` column reaches it,
    \\boxed{} answers (nested braces) and plain answers compare, a row without a reference is skipped (NaN), and a
    dataset without the column is refused by name."""
    import torch
    from swift.rewards import orms
    from swift.rl_core.grpo_algorithm import compute_rewards_per_func
    from swift.utils.utils import import_external_file
    import_external_file(os.path.join(EXAMPLES, 'plugins', 'exact_match_reward.py'))
    reward = orms['exact_match']()
    samples = [sampled('so x = \\boxed{\\frac{1}{2}}.', solution='Hence $\\boxed{\\frac{1}{2}}$'),
               sampled('\\boxed{3}', solution='The answer is \\boxed{4}'),
               sampled('c  b a', solution='c b a'),
               sampled('c b a')]
    scores = compute_rewards_per_func(samples, [reward], None, device=torch.device('cpu'))
    assert scores[:3, 0].tolist() == [1.0, 0.0, 1.0] and torch.isnan(scores[3, 0]), scores
    with pytest.raises(ValueError, match='exact_match needs a `solution` column'):
        compute_rewards_per_func([sampled('c b a')], [reward], None, device=torch.device('cpu'))


def test_rl_example_rewards_exact_matches_in_a_tiny_run(trained_ws, tiny_ws, tmp_path):
    """The RL example's reward file and RL flags through the real ``swift rlhf`` on the demo's tiny models, the
    trained teacher (which reverses most prompts) as the student so that exact match is sometimes 1, sometimes 0:
    every logged reward is the completion compared with its row's `solution` column, and the step optimises it."""
    from swift_gkd_plugin.demo.tiny import solve
    argv = record_commands(os.path.join(EXAMPLES, 'gkd_rl_reward.sh'), tmp_path)['swift']
    rl_flags = {name: argv[argv.index(f'--{name}') + 1] for name in
                ('external_plugins', 'reward_funcs', 'num_generations', 'scale_rewards', 'gkd_rl_coef', 'lmbda',
                 'beta', 'temperature', 'log_completions', 'rollout_importance_sampling_mode')}
    data = str(tmp_path / 'train_solution.jsonl')
    with open(trained_ws['train']) as src, open(data, 'w') as dst:
        for line in src:
            row = json.loads(line)
            dst.write(json.dumps({**row, 'solution': row['messages'][-1]['content']}) + '\n')
    generation_batch = int(rl_flags['num_generations'])  # one prompt per step, sampled G times
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'out'), model=trained_ws['teacher'],
                              teacher_model=trained_ws['teacher'], dataset=data, max_completion_length=16,
                              per_device_train_batch_size=generation_batch, max_steps=3,
                              **{**rl_flags, 'temperature': 1.6}))  # hot enough that the trained model errs at times
    with open(os.path.join(run.output_dir, 'completions.jsonl')) as f:
        tables = [json.loads(line) for line in f]
    rewards = [r for table in tables for r in table['exact_match']]
    assert len(rewards) == 3 * generation_batch and {0.0, 1.0} == set(rewards), rewards
    # the example's sampler/policy correction, here on ms-swift's transformers engine (top-50: weights below 1)
    assert all(0 < row['gkd/rollout_is_weight'] <= 1 + 1e-5 and row['gkd/rollout_k3_kl'] >= 0 for row in run.logs), \
        run.logs
    for table in tables:
        for prompt, completion, reward in zip(table['prompt'], table['completion'], table['exact_match']):
            question = prompt[prompt.index('Reverse:'):].split('<|im_end|>')[0]
            assert reward == float(' '.join(completion.split()) == solve(question)), (prompt, completion, reward)
    assert all(row['gkd/rewards/exact_match/mean'] == pytest.approx(row['gkd/reward']) for row in run.logs)
    assert any(abs(row['gkd/pg_loss']) > 0 for row in run.logs), run.logs


def test_skd_example_runs_on_the_tiny_models(tiny_ws, tmp_path):
    """The SKD example's sampling flags through the real ``swift rlhf`` on the tiny models: every step on-policy,
    sampled with SKD (the random tiny student's tokens mostly fall outside the random teacher's top-25)."""
    argv = record_commands(os.path.join(EXAMPLES, 'gkd_skd.sh'), tmp_path)['swift']
    flags = {name: argv[argv.index(f'--{name}') + 1] for name in
             ('lmbda', 'gkd_skd_top_k', 'gkd_sampling_temperature', 'beta', 'temperature', 'use_vllm')}
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'out'), max_steps=2, max_completion_length=12, **flags))
    assert 'skd_top_k=25' in run.output
    assert [m['mode'] for m in run.modes()] == ['on_policy', 'on_policy']
    assert all(0.5 < row['gkd/skd_replaced_fraction'] <= 1 and row['gkd/skd_rounds'] >= 2 for row in run.logs), \
        run.logs


def test_onpolicy_remedies_example_runs_on_the_tiny_models(tiny_ws, tmp_path):
    """The recommended on-policy recipe's flags through the real ``swift rlhf`` on the tiny models: every step
    on-policy, sampled from the nucleus, the teacher's entropy logged beside the student's; its first step
    fine-tunes the student with ``swift sft`` into the folder the second step loads."""
    commands = record_commands(os.path.join(EXAMPLES, 'gkd_onpolicy_remedies.sh'), tmp_path, env={'OUT': 'o'})
    argv = commands['swift']
    assert argv[0] == 'rlhf' and argv[argv.index('--model') + 1] == 'o/sft/checkpoint-200'
    flags = {name: argv[argv.index(f'--{name}') + 1] for name in
             ('lmbda', 'beta', 'temperature', 'top_p')}
    assert flags == {'lmbda': '1', 'beta': '1', 'temperature': '1.0', 'top_p': '0.9'}
    assert '--gkd_sampling_temperature' not in argv  # measured worse together with top-p
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'out'), max_steps=2, **flags))
    assert 'sampling temperature=1.0' in run.output
    assert [m['mode'] for m in run.modes()] == ['on_policy', 'on_policy']
    assert all(row['gkd/teacher_entropy'] > 0 and row['gkd/entropy'] > 0 for row in run.logs), run.logs


@pytest.mark.parametrize('page', ['docs_en/rl.md', 'docs_zh/rl.md'])
def test_custom_reward_of_the_rl_docs_works(page, tmp_path):
    """The custom reward file the RL page tells users to write, imported as --external_plugins imports it, registers
    `last_number` and scores through ms-swift's own reward code: a match, a miss, a row it does not apply to."""
    import re

    import torch
    from swift.rewards import orms
    from swift.rl_core.grpo_algorithm import compute_rewards_per_func
    from swift.utils.utils import import_external_file
    with open(os.path.join(os.path.dirname(EXAMPLES), page), encoding='utf-8') as f:
        code = re.search(r'```python\n(.*?)```', f.read(), re.S).group(1)
    plugin = tmp_path / 'my_rewards.py'
    plugin.write_text(code, encoding='utf-8')
    import_external_file(str(plugin))
    samples = [sampled('6 x 7 = 42', solution='42'), sampled('It is 41.', solution='so 42'),
               sampled('no idea', solution='unknown')]
    scores = compute_rewards_per_func(samples, [orms['last_number']()], None, device=torch.device('cpu'))
    assert scores[:2, 0].tolist() == [1.0, 0.0] and torch.isnan(scores[2, 0]), scores


def test_skd_server_example_serves_a_topk_that_covers_k(tmp_path):
    """The SKD-with-a-server example: its server's --top_k covers --gkd_skd_top_k and --gkd_logits_topk (the run would
    be refused before loading otherwise), with transformers sampling and the server as the only teacher."""
    commands = record_commands(os.path.join(EXAMPLES, 'gkd_skd_teacher_server.sh'), tmp_path)
    server, trainer = commands['swift-gkd'], commands['swift']

    def flag(argv, name):
        return argv[argv.index(f'--{name}') + 1]

    assert int(flag(server, 'top_k')) >= max(int(flag(trainer, 'gkd_skd_top_k')), int(flag(trainer, 'gkd_logits_topk')))
    assert flag(trainer, 'use_vllm') == 'false' and '--teacher_model' not in trainer
    assert flag(trainer, 'teacher_model_server').endswith(f':{flag(server, "port")}')


def test_tiny_cpu_example_has_its_own_folder_not_the_demos(tmp_path):
    """It builds an untrained workspace: in the demo's default folder it overwrote the demo's trained student."""
    from swift_gkd_plugin.entry.cli import DEMO_WORKDIR
    commands = record_commands(os.path.join(EXAMPLES, 'gkd_tiny_cpu.sh'), tmp_path)  # no WS: the script's default
    folder = commands['swift'][commands['swift'].index('--model') + 1].split('/')[0]
    assert folder == 'swift_gkd_tiny_cpu'
    assert DEMO_WORKDIR not in ' '.join(commands['python'] + commands['swift'])


def test_multi_turn_example_runs_the_calculator_scheduler(tmp_path):
    """The multi-turn example: the plugin's calculator scheduler file (found through the installed package) and its
    name, a turn limit, every step on-policy with transformers sampling; with the file present, importing it as
    --external_plugins does registers that name in ms-swift's registry."""
    dataset = tmp_path / 'prompts.jsonl'
    dataset.write_text('')  # present: the script does not write the tool task's prompts
    argv = record_commands(os.path.join(EXAMPLES, 'gkd_multi_turn_tools.sh'), tmp_path, env={'DATASET': str(dataset)},
                           run_python=True)['swift']

    def flag(name):
        return argv[argv.index(f'--{name}') + 1]

    import swift_gkd_plugin.demo
    plugin = flag('external_plugins')
    assert plugin == os.path.join(os.path.dirname(swift_gkd_plugin.demo.__file__), 'tool_scheduler.py')
    assert (flag('multi_turn_scheduler'), flag('max_turns'), flag('lmbda'), flag('use_vllm')) == \
        ('gkd_calculator', '3', '1', 'false')
    if not os.path.exists(plugin):
        pytest.skip(f'{plugin} is not in this checkout yet')
    from swift.rollout import multi_turns
    from swift.utils.utils import import_external_file
    import_external_file(plugin)
    assert 'gkd_calculator' in multi_turns


@pytest.mark.parametrize('page', ['docs_en/multi_turn.md', 'docs_zh/multi_turn.md'])
def test_multi_turn_docs_scheduler_answers_a_tool_call(page, tmp_path):
    """The scheduler the multi-turn page tells users to write, imported as --external_plugins imports it: a turn
    with a call gets the tool's result as a user message and its ids with a mask of ones; a turn without a call, or
    at --max_turns, ends the trajectory."""
    import re

    from swift.infer_engine.protocol import ChatCompletionResponseChoice, ChatMessage, RolloutInferRequest
    from swift.rollout import multi_turns
    from swift.utils.utils import import_external_file
    with open(os.path.join(os.path.dirname(EXAMPLES), page), encoding='utf-8') as f:
        code = re.search(r'```python\n(.*?)```', f.read(), re.S).group(1)
    plugin = tmp_path / 'my_scheduler.py'
    plugin.write_text(code, encoding='utf-8')
    before = multi_turns.get('calculator')
    try:
        import_external_file(str(plugin))
        scheduler = multi_turns['calculator'](max_turns=3)
    finally:
        if before is None:
            multi_turns.pop('calculator', None)
        else:
            multi_turns['calculator'] = before

    def turn(text, finish='stop'):
        return ChatCompletionResponseChoice(index=0, message=ChatMessage(role='assistant', content=text),
                                            finish_reason=finish, token_ids=[5, 6, 7])

    request = RolloutInferRequest(messages=[{'role': 'user', 'content': 'Add: 347 + 598'},
                                            {'role': 'assistant', 'content': '<calc>347+598</calc>'}])
    call = turn('<calc>347+598</calc>')
    assert not scheduler.check_finished(request, call, 1)
    result = scheduler.step(request, call, 1)
    assert result['infer_request'].messages[-1] == {'role': 'user', 'content': '= 945'}
    assert result['response_token_ids'] == [5, 6, 7] and result['response_loss_mask'] == [1, 1, 1]
    assert scheduler.check_finished(request, turn('945'), 2)
    assert scheduler.check_finished(request, call, 3)  # --max_turns 3
    assert scheduler.check_finished(request, turn('<calc>1+', 'length'), 1)
