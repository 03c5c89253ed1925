"""Where the teacher lives: shared base (adapter off / teacher adapter on), separate copy, offload; privileged
teacher prompts; the bad inputs of each. All through the real ``swift rlhf`` pipeline."""
import json
import os
import re

import pytest
from conftest import base_args, run_swift
from test_activation_and_bad_input import assert_refused_in_one_line
from test_fused_in_pipeline import two_rank_runs

LORA = dict(tuner_type='lora', lora_dropout=0, lmbda=0, max_steps=3, seed=3, learning_rate=5e-3)


def _rel(a, b):
    return abs(a - b) / max(abs(a), abs(b), 1e-12)


def _weights_loaded(run) -> int:
    """How many models were loaded: transformers starts one 'Loading weights' progress bar (at 0%) per model."""
    return len(re.findall(r'Loading weights:\s+0%', run.output))


def assert_same_losses(a, b, tol=1e-5):
    assert len(a.losses) == len(b.losses) > 0
    for x, y in zip(a.losses, b.losses):
        assert _rel(x, y) < tol, (a.losses, b.losses)


@pytest.fixture(scope='module')
def dropout_base(tiny_ws):
    """The student's weights with attention dropout in its config, and the same files under a second name (ms-swift
    then loads a separate teacher)."""
    root = os.path.join(tiny_ws.root, 'dropout_base')
    alias = root + '_alias'
    if not os.path.exists(root):
        os.makedirs(root)
        for name in os.listdir(tiny_ws.student):
            if name != 'config.json':
                os.symlink(os.path.join(tiny_ws.student, name), os.path.join(root, name))
        with open(os.path.join(tiny_ws.student, 'config.json')) as f:
            config = json.load(f)
        with open(os.path.join(root, 'config.json'), 'w') as f:
            json.dump({**config, 'attention_dropout': 0.2}, f)
        os.symlink(root, alias)
    return root, alias


def test_shared_base_teacher_is_the_base_with_the_adapter_disabled(tiny_ws, adapters, dropout_base, tmp_path):
    """Student = base + a (non-zero) LoRA; teacher = the same module with the adapter off: one copy of the base,
    and exactly the losses of a separately loaded base teacher. The base has attention dropout and the LoRA has
    dropout: the teacher's side runs without either, as a separately loaded (eval-mode) teacher does."""
    base, alias = dropout_base
    shared = run_swift(base_args(tiny_ws, str(tmp_path / 'shared'), model=base, teacher_model=base,
                                 adapters=adapters['fit'], **LORA))
    separate = run_swift(base_args(tiny_ws, str(tmp_path / 'separate'), model=base, teacher_model=alias,
                                   adapters=adapters['fit'], **LORA))
    assert ('Using shared base model architecture:\n  - Student model: base_model + LoRA (trainable)\n'
            '  - Teacher model: base_model with LoRA disabled (frozen)') in shared.output
    assert _weights_loaded(shared) == 1 and _weights_loaded(separate) == 2
    assert shared.losses[0] > 0
    assert_same_losses(shared, separate)


TEACHER_ADAPTER = dict(LORA, lmbda=0.5, seq_kd='true')


@pytest.fixture(scope='module')
def teacher_adapter_mixed_run(tiny_ws, adapters, shared_runs):
    """The teacher adapter on the shared base (given as the student's path; test_fused_in_pipeline.py's
    ``teacher_adapter`` case leaves --teacher_model unset), seed 3: steps 1-2 seq_kd (the teacher samples), step 3
    on-policy (the student samples)."""
    return shared_runs('teacher_adapter_mixed', {'run': lambda out: run_swift(base_args(
        tiny_ws, out, teacher_model=tiny_ws.student, adapters=adapters['student_start'],
        teacher_adapters=adapters['fit'], **TEACHER_ADAPTER))})['run']


def test_teacher_adapter_on_the_shared_base_equals_a_separate_teacher(tiny_ws, adapters, teacher_adapter_mixed_run,
                                                                       tmp_path):
    """The teacher adapter has LoRA dropout: on the shared base it must run without it, in its forwards and when it
    samples (steps 1-2 are seq_kd, step 3 on-policy), exactly as a separately loaded teacher."""
    shared = teacher_adapter_mixed_run
    # both students start from the same saved adapter (a random LoRA init would depend on what was loaded before)
    separate = run_swift(base_args(tiny_ws, str(tmp_path / 'separate'), teacher_model=adapters['student_alias'],
                                   adapters=adapters['student_start'], teacher_adapters=adapters['fit'],
                                   **TEACHER_ADAPTER))
    assert [m['mode'] for m in shared.modes()] == ['seq_kd', 'seq_kd', 'on_policy']
    assert 'Teacher model: base_model + teacher adapter' in shared.output
    assert 'self-distillation mode (teacher = student)' not in shared.output  # one true line about the teacher
    assert _weights_loaded(shared) == 1 and _weights_loaded(separate) == 2
    assert_same_losses(shared, separate)


@pytest.mark.parametrize('mode', ['seq_kd', 'on_policy'])
def test_teacher_adapter_on_the_shared_base_samples_and_trains(teacher_adapter_mixed_run, mode):
    run = teacher_adapter_mixed_run
    assert [m['mode'] for m in run.modes()] == ['seq_kd', 'seq_kd', 'on_policy']
    assert len(run.losses) == 3 and all(x > 0 for x in run.losses)
    # sampling with the student's own module must leave it in train mode: training metrics, not eval_ ones
    rows = [row for row, m in zip(run.logs, run.modes()) if m['mode'] == mode]
    assert rows
    for row in rows:
        assert row.get(f'gkd/mode_{mode}') == 1.0 and not any(k.startswith('eval_') for k in row), row


def test_full_tuning_with_the_same_model_loads_a_separate_copy(tiny_ws, tmp_path):
    # (teacher = student at the start: the divergence is 0; the SFT term gives the step something to learn)
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'out'), teacher_model=tiny_ws.student, lmbda=0, max_steps=1,
                              sft_alpha=0.5))
    assert 'a separate frozen copy of the teacher is loaded' in run.output
    assert _weights_loaded(run) == 2


def test_offloaded_and_resident_teachers_give_the_same_losses(tiny_ws, tmp_path):
    common = dict(lmbda=0.5, seq_kd='true', max_steps=3, seed=4)
    resident = run_swift(base_args(tiny_ws, str(tmp_path / 'resident'), **common))
    offloaded = run_swift(base_args(tiny_ws, str(tmp_path / 'offloaded'), offload_teacher_model='true', **common))
    assert 'offloaded to CPU between uses' in offloaded.output
    assert_same_losses(resident, offloaded, tol=1e-6)


def test_zero3_teacher_offload_keeps_ms_swifts_partition_offload(tiny_ws, adapters, shared_runs):
    """--deepspeed zero3 without --teacher_deepspeed: ms-swift prepares the teacher as ZeRO-3 from the student's
    config and moves its partitions to the CPU. The offload is decided from that prepared model: ms-swift's
    load_teacher_model_context brings the partitions back for each use (the plugin's whole-model offloader, which
    does not, is not built), and the losses are those of the resident ZeRO-3 teacher (test_fused_in_pipeline.py's
    two-rank ZeRO-3 run, on-policy and seq_kd steps)."""
    pytest.importorskip('deepspeed')
    runs = two_rank_runs(tiny_ws, adapters, shared_runs)
    resident, offloaded = runs['full_dense'], runs['full_offloaded']
    assert ('Teacher model: a separate frozen model (its partitions offloaded to CPU between uses by ms-swift)'
            in offloaded.output), offloaded.output[-3000:]
    assert_same_losses(resident, offloaded, tol=1e-6)


# ---------------------------------------------------------------- privileged teacher prompts
def _with_columns(tiny_ws, path, make):
    rows = [json.loads(line) for line in open(tiny_ws.fixed)]
    with open(path, 'w') as f:
        for row in rows:
            f.write(json.dumps({**row, **make(row)}) + '\n')
    return str(path)


def _question(row):
    return row['messages'][0]['content']


def test_teacher_prompt_identical_to_the_student_prompt_changes_nothing(tiny_ws, tmp_path):
    same = _with_columns(tiny_ws, tmp_path / 'same.jsonl', lambda r: {'teacher_prompt': _question(r)})
    other = _with_columns(tiny_ws, tmp_path / 'other.jsonl',
                          lambda r: {'teacher_prompt': _question(r) + ' Think about the order of letters.'})
    common = dict(lmbda=0, max_steps=2, seed=5, per_device_train_batch_size=4)
    plain = run_swift(base_args(tiny_ws, str(tmp_path / 'plain'), dataset=tiny_ws.fixed, **common))
    identical = run_swift(base_args(tiny_ws, str(tmp_path / 'identical'), dataset=same, **common))
    privileged = run_swift(base_args(tiny_ws, str(tmp_path / 'privileged'), dataset=other, **common))
    assert_same_losses(plain, identical)
    assert _rel(plain.losses[0], privileged.losses[0]) > 1e-3  # the teacher did read its own prompt


@pytest.fixture(scope='module')
def teacher_messages_runs(tiny_ws, shared_runs, tmp_path_factory):
    """Rows with a teacher_messages column, 2 steps: seed 0 with --lmbda 0.5 is off-policy then on-policy; seq_kd."""
    data = _with_columns(tiny_ws, tmp_path_factory.mktemp('teacher_messages') / 'tm.jsonl', lambda r: {
        'teacher_messages': [{'role': 'system', 'content': 'You reverse sequences of letters.'},
                             {'role': 'user', 'content': _question(r)}]})

    def start(**mode):
        return lambda out: run_swift(base_args(tiny_ws, out, dataset=data, max_steps=2, **mode))

    return shared_runs('teacher_messages', {'mixed': start(lmbda=0.5, seed=0), 'seq_kd': start(lmbda=0, seq_kd='true')})


@pytest.mark.parametrize('mode', ['off_policy', 'on_policy', 'seq_kd'])
def test_teacher_messages_column_in_every_mode(teacher_messages_runs, mode):
    run = teacher_messages_runs['seq_kd' if mode == 'seq_kd' else 'mixed']
    assert mode in [m['mode'] for m in run.modes()]
    assert len(run.losses) == 2 and all(x > 0 for x in run.losses)


def test_seq_kd_teacher_samples_from_its_own_prompt(trained_ws, tiny_ws, tmp_path):
    """The trained teacher reverses whatever its prompt says: with every teacher prompt asking for 'a b c d', its
    samples are 'd c b a' although the students' prompts ask for other sequences."""
    rows = [json.loads(line) for line in open(trained_ws['train'])][:4]
    data = tmp_path / 'privileged.jsonl'
    with open(data, 'w') as f:
        for row in rows:
            f.write(json.dumps({**row, 'teacher_prompt': 'Reverse: a b c d'}) + '\n')
    argv = base_args(tiny_ws, str(tmp_path / 'out'), model=trained_ws['student'], teacher_model=trained_ws['teacher'],
                     dataset=str(data), lmbda=0, seq_kd='true', temperature=0.05, max_completion_length=12,
                     max_steps=2, per_device_train_batch_size=4, log_completions='true')
    run = run_swift(argv)
    with open(os.path.join(run.output_dir, 'completions.jsonl')) as f:
        completions = [c for line in f for c in json.loads(line)['completion']]
    assert len(completions) == 8
    assert all(c.strip() == 'd c b a' for c in completions), completions
    assert all('a b c d' not in r['messages'][0]['content'] for r in rows)


def test_misaligned_teacher_view_names_the_row_in_one_line(tiny_ws, tmp_path):
    """A teacher view that the pre-load check cannot judge (its last answer is the row's; an earlier answer the
    student scores, every answer scored by --loss_scale default, is another) stops step 1 in one line naming the row,
    not in the step's traceback."""
    earlier = [{'role': 'user', 'content': 'Reverse: a b'}, {'role': 'assistant', 'content': 'b a'}]
    data = _with_columns(tiny_ws, tmp_path / 'bad.jsonl', lambda r: {
        'messages': earlier + r['messages'],
        'teacher_messages': [earlier[0], {'role': 'assistant', 'content': 'a b'}] + r['messages']})
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'out'), dataset=data, lmbda=0, max_steps=1,
                              loss_scale='default'), check=False)
    errors = [line for line in run.output.splitlines() if line.startswith('swift rlhf: error: ')]
    assert run.returncode == 1 and len(errors) == 1 and 'Traceback' not in run.output, run.output[-3000:]
    assert 'cannot align the teacher prompt with the student response for the dataset row' in errors[0]
    assert "last user message is 'Reverse:" in errors[0] and '(--loss_scale)' in errors[0]


@pytest.mark.parametrize('column,value,needle', [
    ('teacher_prompt', 7, 'line 1: teacher_prompt is int 7; allowed: text'),
    ('teacher_messages', 'just a string', 'line 1: teacher_messages is str "just a string"; allowed: a non-empty list'),
    ('teacher_messages', [{'role': 'user', 'content': 'Reverse: a b'}, {'role': 'assistant', 'content': 'no'}],
     'line 1: teacher_messages ends with the assistant answer "no" where the row\'s answer (the response the student '
     'scores) is "'),
])
def test_privileged_column_of_the_wrong_type_is_refused(tiny_ws, tmp_path, column, value, needle):
    """Before loading, by file and line (the trainer refused the column once both models were loaded; it still does
    for datasets read by ms-swift alone: test_views); so is a teacher_messages whose last answer is not the row's
    (the step refused it, in a traceback)."""
    data = _with_columns(tiny_ws, tmp_path / 'bad.jsonl', lambda r: {column: value})
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'out'), dataset=data, lmbda=0, max_steps=1), check=False)
    assert_refused_in_one_line(run, [f'--dataset {data}', needle])


# ---------------------------------------------------------------- bad teacher placements
def test_teacher_adapter_that_does_not_fit_the_base_is_refused_early(tiny_ws, adapters, tmp_path):
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'out'), teacher_model=None, tuner_type='lora',
                              teacher_adapters=adapters['misfit']), check=False, timeout=120)
    assert run.returncode != 0
    assert f"--teacher_adapters '{adapters['misfit']}' does not fit the teacher base" in run.output
    assert 'has shape' in run.output and 'Loading weights' not in run.output


def test_teacher_adapter_on_a_fully_tuned_student_base_is_refused(tiny_ws, adapters, tmp_path):
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'out'), teacher_model=None, tuner_type='full',
                              teacher_adapters=adapters['fit']), check=False, timeout=120)
    assert run.returncode != 0
    assert "--teacher_adapters on the student's own base needs a LoRA student (--tuner_type lora" in run.output
    assert 'Loading weights' not in run.output


def test_offload_with_a_teacher_server_is_refused(tiny_ws, tmp_path):
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'out'), teacher_model=None, teacher_model_type=None,
                              teacher_model_server='http://127.0.0.1:9', gkd_logits_topk=4,
                              offload_teacher_model='true'), check=False, timeout=120)
    assert run.returncode != 0
    assert '--offload_teacher_model true has no effect with --teacher_model_server' in run.output


# ---------------------------------------------------------------- mixture of experts
@pytest.fixture(scope='module')
def moe_models(tiny_ws):
    from swift_gkd_plugin.demo import tiny
    tok = tiny.load_tokenizer(tiny_ws.student)
    student = tiny.build_model(os.path.join(tiny_ws.root, 'moe_student'), tok, seed=5, moe=True)
    teacher = tiny.build_model(os.path.join(tiny_ws.root, 'moe_teacher'), tok, seed=6, moe=True, hidden_size=96,
                               intermediate_size=192)
    return student, teacher


@pytest.mark.parametrize('placement', ['separate', 'shared_base', 'shared_base_experts'])
def test_moe_student_trains_with_either_teacher_placement(tiny_ws, moe_models, tmp_path, placement):
    """A LoRA on the attention only (``--target_modules``) leaves the experts' fused weights out, which the run says
    in one warning naming ``--target_parameters``; with it, the saved adapter covers both fused weights of every
    layer."""
    student, teacher = moe_models
    flags = dict(model=student, model_type='qwen3_moe', lmbda=0.5, seq_kd='true', max_steps=3,
                 per_device_train_batch_size=4, dataset=tiny_ws.fixed, learning_rate=5e-3)
    if placement == 'separate':
        flags.update(teacher_model=teacher, teacher_model_type='qwen3_moe')
    else:
        # a fresh adapter: student = teacher, so only dataset steps' SFT term learns at first (sampled steps had a
        # loss of exactly 0, which the trainer now stops)
        flags.update(teacher_model=student, teacher_model_type='qwen3_moe', tuner_type='lora',
                     target_modules=['q_proj', 'k_proj', 'v_proj', 'o_proj'], sft_alpha=0.5, lmbda=0, seq_kd='false')
        if placement == 'shared_base_experts':
            flags.update(target_parameters=list(EXPERT_WEIGHTS), lora_dropout=0, save_strategy='steps', save_steps=3)
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'out'), **flags))
    assert len(run.losses) == 3 and all(x == x and x >= 0 for x in run.losses)
    warned = 'the LoRA adapter leaves the experts out' in run.output
    if placement == 'shared_base':
        assert 'Teacher model: base_model with LoRA disabled (frozen)' in run.output
        assert _weights_loaded(run) == 1
        assert warned and f'pass --target_parameters {" ".join(EXPERT_WEIGHTS)}' in run.output, run.output[-3000:]
    if placement == 'shared_base_experts':
        from safetensors import safe_open
        [checkpoint] = run.checkpoints()
        with safe_open(os.path.join(checkpoint, 'adapter_model.safetensors'), 'pt') as f:
            experts = [k for k in f.keys() if '.experts.' in k]
        assert not warned and len(experts) == 2 * 2 * 2, experts  # 2 layers x 2 fused weights x (A, B)
    assert placement == 'shared_base' or not warned


#: the fused expert weights of transformers 5's Qwen3-MoE layers (3-D parameters: --target_modules does not reach them)
EXPERT_WEIGHTS = ('mlp.experts.down_proj', 'mlp.experts.gate_up_proj')


def test_shared_base_under_zero2_and_zero3_on_two_processes(tiny_ws, adapters, shared_runs):
    """One copy of the base, sharded or not: ZeRO-2 and ZeRO-3 give the same losses as plain DDP (the ZeRO-3 run
    samples gathering each layer as it runs, test_fused_in_pipeline.py's)."""
    pytest.importorskip('deepspeed')
    runs = two_rank_runs(tiny_ws, adapters, shared_runs)
    ddp = runs['lora_ddp']
    for z in ('lora_zero2', 'lora_dense'):
        assert 'Teacher model: base_model with LoRA disabled (frozen)' in runs[z].output, z
        assert_same_losses(ddp, runs[z])
