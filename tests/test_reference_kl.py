"""``--gkd_ref_kl_coef`` (StableOPD's reference anchor, docs_en/onpolicy_remedies.md) through the real ``swift rlhf`` on
the tiny models: the reference is the initial student (a frozen copy for a fully tuned student, the base with the
adapter off for a LoRA one), ``gkd/ref_kl`` is ``KL(student || reference)`` at ``--temperature`` recomputed here in
float64 from the saved checkpoints, and the loss is the distillation loss plus ``COEF * gkd/ref_kl``."""
import json
import os

import pytest
import torch
from conftest import base_args, run_swift

PROBE = os.path.join(os.path.dirname(__file__), 'multi_turn_plugin.py')  # GKD_TEST_TRAJ_LOG: each micro-batch
COEF, TEMPERATURE = 0.7, 1.3
ON_POLICY = dict(lmbda=1, per_device_train_batch_size=1, learning_rate=5e-3, lr_scheduler_type='constant',
                 warmup_ratio=0, seed=7, temperature=TEMPERATURE, max_steps=3, gkd_ref_kl_coef=COEF,
                 external_plugins=PROBE)


def _start(tiny_ws, out, **flags):
    return run_swift(base_args(tiny_ws, out, **{**ON_POLICY, **flags}), env={'GKD_TEST_TRAJ_LOG': out + '.jsonl'})


def _with_batches(run):
    with open(run.output_dir + '.jsonl') as f:
        run.batches = [r for r in map(json.loads, f) if r['kind'] == 'batch']
    return run


def _run(tiny_ws, root, name, **flags):
    return _with_batches(_start(tiny_ws, str(root / name), **flags))


@pytest.fixture(scope='module')
def full_run(tiny_ws, shared_runs):
    """A fully tuned student, a checkpoint after every step (shared by the test session)."""
    shared = shared_runs('ref_kl', {'full': lambda out: _start(tiny_ws, out, save_strategy='steps', save_steps=1)})
    return _with_batches(shared['full'])


def _ref_kl64(student_dir: str, reference_dir: str, batch: dict) -> float:
    """Float64 mean over the micro-batch's response positions of KL(student || reference) of softmax(z / T)."""
    from transformers import AutoModelForCausalLM
    ids, labels = torch.tensor(batch['input_ids']), torch.tensor(batch['labels'])
    assert ids.shape[0] == 1  # one row: no padding
    rows = []
    for path in (student_dir, reference_dir):
        model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float64).eval()
        with torch.no_grad():
            logits = model(input_ids=ids).logits[:, :-1]
        rows.append(torch.log_softmax(logits[labels[:, 1:] != -100] / TEMPERATURE, -1))
    s, r = rows
    return float((s.exp() * (s - r)).sum(-1).mean())


def test_the_reference_is_a_frozen_copy_of_the_initial_student(full_run):
    assert 'the reference is a frozen copy of the initial student' in full_run.output
    # --gkd_loss_impl auto: the dense loss, with the reason
    assert ('the fused loss cannot apply here (--gkd_ref_kl_coef compares the student\'s full logits with the '
            'reference\'s); using the dense loss') in full_run.output


def test_ref_kl_is_the_students_kl_from_its_start(full_run, tiny_ws):
    logs, batches, checkpoints = full_run.logs, full_run.batches, full_run.checkpoints()
    assert len(logs) == len(batches) == 3 and len(checkpoints) == 3
    assert all(row['gkd/mode_on_policy'] == 1.0 for row in logs)
    # step 1: the student is the reference
    assert abs(logs[0]['gkd/ref_kl']) <= 1e-7
    # steps 2 and 3: the student of the previous checkpoint against the initial one, in float64
    for row, batch, student in zip(logs[1:], batches[1:], checkpoints[:2]):
        want = _ref_kl64(student, tiny_ws.student, batch)
        assert want > 1e-4  # the student moved: the check can fail
        assert row['gkd/ref_kl'] == pytest.approx(want, rel=1e-4)


def test_the_loss_adds_coef_times_ref_kl(full_run):
    for row in full_run.logs:  # one micro-batch per step, on-policy (no SFT term)
        assert row['loss'] == pytest.approx(row['gkd/distill_loss'] + COEF * row['gkd/ref_kl'], rel=1e-5, abs=1e-7)


def test_a_lora_students_reference_is_its_base(tiny_ws, tmp_path):
    """--tuner_type lora with a separate teacher: the reference is the student's base with its adapter off."""
    run = _run(tiny_ws, tmp_path, 'lora', tuner_type='lora', lora_rank=4, lora_alpha=8, target_modules='all-linear',
               learning_rate=5e-2, save_strategy='steps', save_steps=1)
    assert 'the reference is the student\'s base with its adapter off' in run.output
    logs = run.logs
    assert len(logs) == 3
    assert abs(logs[0]['gkd/ref_kl']) <= 1e-7  # LoRA's B starts at 0: the adapter changes nothing yet
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    for row, batch, adapter in zip(logs[1:], run.batches[1:], run.checkpoints()[:2]):
        merged = os.path.join(adapter, 'merged64')
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_ws.student), adapter)
        model.merge_and_unload().save_pretrained(merged)
        want = _ref_kl64(merged, tiny_ws.student, batch)
        assert want > 1e-5
        assert row['gkd/ref_kl'] == pytest.approx(want, rel=1e-3)
        assert row['loss'] == pytest.approx(row['gkd/distill_loss'] + COEF * row['gkd/ref_kl'], rel=1e-5, abs=1e-7)


def test_without_the_flag_no_reference(tiny_ws, tmp_path):
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'plain'), max_steps=1, lmbda=1))
    assert 'gkd/ref_kl' not in run.logs[0]
    assert 'reference is' not in run.output


def test_a_resumed_run_keeps_the_initial_student_as_reference(full_run, tiny_ws, tmp_path):
    """--resume_from_checkpoint: the reference is still --model (the start of the run), not the checkpoint."""
    checkpoint = full_run.checkpoints()[1]
    resumed = _run(tiny_ws, tmp_path, 'resumed', resume_from_checkpoint=checkpoint)
    assert len(resumed.logs) == len(resumed.batches) == 1  # step 3 only
    want = _ref_kl64(checkpoint, tiny_ws.student, resumed.batches[0])
    assert want > 1e-4
    assert resumed.logs[0]['gkd/ref_kl'] == pytest.approx(want, rel=1e-4)


def test_a_reference_that_is_the_teacher_is_refused(tiny_ws, tmp_path):
    """A LoRA student whose teacher is its own base (--teacher_model = --model): the reference would be the teacher."""
    from test_activation_and_bad_input import assert_refused_in_one_line
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'out'), tuner_type='lora', teacher_model=tiny_ws.student,
                              gkd_ref_kl_coef=0.5), check=False, timeout=120)
    assert_refused_in_one_line(run, ['--gkd_ref_kl_coef 0.5 anchors the student to its base with the adapter off, '
                                     'which is also the teacher', 'Pass a --teacher_model'])


def test_the_reference_copy_under_zero3(tiny_ws, tmp_path):
    """A fully tuned student under DeepSpeed ZeRO-3 (2 CPU ranks): the copy is loaded partitioned and prepared as
    ms-swift prepares a DPO reference; 0 at the first step, the student's drift after, in the loss."""
    pytest.importorskip('deepspeed')
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'out'), deepspeed='zero3', fp16='false', use_cpu='true',
                              lmbda=1, max_steps=2, seed=42, learning_rate=5e-3, gkd_ref_kl_coef=COEF,
                              temperature=TEMPERATURE), nproc=2)
    assert 'the reference is a frozen copy of the initial student' in run.output
    first, second = run.logs
    assert abs(first['gkd/ref_kl']) <= 1e-7 and second['gkd/ref_kl'] > 1e-4
    for row in run.logs:
        assert row['loss'] == pytest.approx(row['gkd/distill_loss'] + COEF * row['gkd/ref_kl'], rel=1e-5, abs=1e-7)
