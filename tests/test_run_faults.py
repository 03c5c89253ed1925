"""Faults at the level of a whole run, through the real ``swift rlhf``: a training set smaller than one batch, a disk
that fills up during a checkpoint save, a SIGTERM to the ``swift`` launcher."""
import os
import signal
import subprocess
import time

import pytest
from conftest import OFFLINE_ENV, SWIFT, _free_port, base_args, run_swift


FILE_SIZE_LIMIT_PLUGIN = os.path.join(os.path.dirname(__file__), 'file_size_limit_plugin.py')


def _first_rows(tiny_ws, path, n):
    with open(tiny_ws.train) as f:
        path.write_text(''.join(next(f) for _ in range(n)))
    return str(path)


def test_a_dataset_smaller_than_one_batch_is_refused_before_any_model_loads(tiny_ws, tmp_path):
    """One row and batches of 2, incomplete batches dropped: ms-swift ended with exit code 0 after 0 steps and
    train_loss 0. A local jsonl training set is counted before any model loads."""
    data = _first_rows(tiny_ws, tmp_path / 'one.jsonl', 1)
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'out'), dataset=data, lmbda=0), check=False)
    assert run.returncode != 0
    assert (f'--dataset: 1 row(s) in {data}, fewer than one generation batch of 2 row(s) '
            '(--per_device_train_batch_size 2 x 1 step(s) per generation (--gradient_accumulation_steps 1) x 1 '
            'process(es))' in run.output), run.output[-3000:]
    assert 'Pass --per_device_train_batch_size 1 --gradient_accumulation_steps 1' in run.output
    assert 'Loading weights' not in run.output and not run.logs


GENERATION_BATCH = ("fewer than one generation batch of 16 row(s) (--per_device_train_batch_size 2 x 8 step(s) per "
                    "generation (--gradient_accumulation_steps 8; ms-swift's default when not given: 16 / (2 x 1 "
                    "process(es)), rounded up) x 1 process(es))")


def test_a_dataset_smaller_than_one_generation_batch_names_it_before_loading(tiny_ws, tmp_path):
    """Issue 74 item 7: 4 rows at --per_device_train_batch_size 2 without --gradient_accumulation_steps (ms-swift's
    default: 8 on one process) passed the check against one per-device batch, loaded both models, and was refused
    naming that batch. GKD reads a generation batch of 2 x 8 x 1 = 16 rows: named, with the change that trains."""
    from test_activation_and_bad_input import assert_refused_in_one_line
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'out'), dataset=tiny_ws.fixed, gradient_accumulation_steps=None),
                    check=False, timeout=300)
    assert_refused_in_one_line(run, [f'--dataset: 4 row(s) in {tiny_ws.fixed}, {GENERATION_BATCH}',
                                     'Pass --gradient_accumulation_steps 2 (a generation batch of 4 row(s)), or add '
                                     'rows'])


def test_a_training_set_sampled_smaller_than_one_batch_is_refused_when_training_starts(tiny_ws, tmp_path):
    """``path#4`` samples 4 rows of a 64-row file: known only once ms-swift has loaded the dataset, and refused when
    training starts, naming the generation batch (issue 74 item 7: it named the per-device batch) and the change."""
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'out'), dataset=f'{tiny_ws.train}#4', lmbda=0,
                              gradient_accumulation_steps=None), check=False)
    assert run.returncode != 0
    assert (f'the training set has 4 row(s) after preprocessing (--max_steps 3), {GENERATION_BATCH}'
            in run.output), run.output[-3000:]
    assert 'Pass --gradient_accumulation_steps 2 (a generation batch of 4 row(s)), or add rows' in run.output
    assert not run.logs


def test_rows_left_out_of_each_epoch_are_counted(tiny_ws, tmp_path):
    """Issue 45: 5 rows in batches of 2, incomplete batches dropped: one row sat out every epoch without a word."""
    data = _first_rows(tiny_ws, tmp_path / 'five.jsonl', 5)
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'out'), dataset=data, lmbda=0, max_steps=None,
                              num_train_epochs=1))
    assert ('--dataset: 1 of the 5 training rows are left out of each epoch: GKD drops incomplete generation batches '
            '(dataloader_drop_last; a generation batch is --per_device_train_batch_size 2 x '
            '--gradient_accumulation_steps 1 on 1 process(es) = 2 rows)') in run.output
    assert len(run.logs) == 2


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 1.5 MiB filesystem: room for the run's logs and a checkpoint's weights, not for its optimizer state too."""
    mount = tmp_path / 'small_disk'
    mount.mkdir()
    done = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=1536k', 'tmpfs', str(mount)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f'cannot mount a small tmpfs here (needs root): {done.stderr.strip()}')
    yield mount
    subprocess.run(['umount', '-l', str(mount)], check=True)


def test_a_full_disk_during_a_save_is_named(tiny_ws, small_tmpfs):
    """The first checkpoint (weights, then the optimizer state) does not fit: torch's writer says only 'unexpected
    pos ...'. The run fails naming the cause, the free space and the checkpoint."""
    out = small_tmpfs / 'out'
    run = run_swift(base_args(tiny_ws, str(out), lmbda=0, max_steps=2, save_strategy='steps', save_steps=1,
                              save_only_model='false'), check=False)
    # issue 89 item 12: a failed save ended in two tracebacks (or a bare PermissionError); now one line, exit 1
    _one_error_line(run, [f'saving {out}/checkpoint-1 failed, no space left on device: the filesystem of '
                          f'{out}/checkpoint-1 has', f'{out} holds no complete checkpoint to resume from', 'Free space'])


def test_a_file_size_limit_during_a_save_is_named(tiny_ws, tmp_path):
    """The same fault without root: the process may write files of at most 600 KiB (``ulimit -f``, set by a test
    plugin as ms-swift loads it, before the models load), enough for the weights but not for the optimizer state,
    whose torch writer says only 'unexpected pos ...'."""
    out = tmp_path / 'out'
    limit = 600 * 1024
    run = run_swift(base_args(tiny_ws, str(out), lmbda=0, max_steps=2, save_strategy='steps', save_steps=1,
                              save_only_model='false', external_plugins=FILE_SIZE_LIMIT_PLUGIN),
                    env={'GKD_TEST_FILE_SIZE_LIMIT': str(limit)}, check=False)
    _one_error_line(run, [f'saving {out}/checkpoint-1 failed, file too large: this process may write files of at '
                          f'most {limit} bytes (ulimit -f)'])
    assert os.path.getsize(out / 'checkpoint-1' / 'model.safetensors') < limit  # the weights were written


OUTPUT_DIR_FAULT_PLUGIN = os.path.join(os.path.dirname(__file__), 'output_dir_fault_plugin.py')


def _fault_after_step_2(tiny_ws, out, fault):
    """A 2-step run saving each step (checkpoint-1 saved), whose --output_dir stops taking writes (``fault``) at the
    end of step 2: after the last step, before ms-swift writes its logs and saves its checkpoint."""
    return run_swift(base_args(tiny_ws, str(out), lmbda=0, max_steps=2, save_strategy='steps', save_steps=1,
                               save_only_model='true', external_plugins=OUTPUT_DIR_FAULT_PLUGIN),
                     env={'GKD_TEST_OUTPUT_FAULT_AFTER_STEP': '2', 'GKD_TEST_OUTPUT_FAULT': fault}, check=False)


def test_a_disk_that_fills_up_after_the_last_step_fails_the_final_save_in_one_line(tiny_ws, small_tmpfs):
    """Issue 96 item 5: the final save (the last step's checkpoint, ms-swift's only save after the last step) on a disk
    that filled up after that step: one line, exit code 1, naming checkpoint-1 to resume from. (The step's log line
    still fits in the last page of ``logging.jsonl`` on the tmpfs; the next test makes that write fail.)"""
    out = small_tmpfs / 'out'
    run = _fault_after_step_2(tiny_ws, out, 'fill')
    _one_error_line(run, [f'saving {out}/checkpoint-2 failed, no space left on device: the filesystem of '
                          f'{out}/checkpoint-2 has 0.0 MiB free of 1.5 MiB. That checkpoint is incomplete (no '
                          f'trainer_state.json); the newest complete checkpoint is {out}/checkpoint-1 '
                          f'(--resume_from_checkpoint {out}/checkpoint-1). Free space (or pass another --output_dir) '
                          'and resume.'])


def test_an_output_folder_gone_after_the_last_step_is_named_as_a_failed_save(tiny_ws, tmp_path):
    """Issue 96 item 5: after the last step ms-swift writes the step's logs (``logging.jsonl``), then saves its
    checkpoint; the checkpoint save was guarded, the log write was not: an output folder that cannot be written after
    the last step (here a file where it was) ended the run in ms-swift's ``FileExistsError`` traceback. Now one line,
    exit code 1, as a failed checkpoint save: the file, the cause and the remedy."""
    out = tmp_path / 'out'
    run = _fault_after_step_2(tiny_ws, out, 'file')
    _one_error_line(run, [f"writing the logs of step 2 ({out}/logging.jsonl) failed, a write failed (FileExistsError: "
                          f"[Errno 17] File exists: '{out}')", f'{out} holds no complete checkpoint to resume from. '
                          f'Make {out} writable (or pass another --output_dir) and resume.'])


def test_a_checkpoint_folder_that_cannot_be_written_is_named(tiny_ws, tmp_path):
    """A checkpoint that cannot be written for another cause than space (here a file where its folder goes; a folder
    without write permission, a read-only file system alike): one line naming the checkpoint and the cause."""
    out = tmp_path / 'out'
    out.mkdir()
    (out / 'checkpoint-1').write_text('not a folder')
    run = run_swift(base_args(tiny_ws, str(out), lmbda=0, max_steps=1, save_strategy='steps', save_steps=1),
                    check=False)
    _one_error_line(run, [f"saving {out}/checkpoint-1 failed, a write failed (FileExistsError: [Errno 17] File "
                          f"exists: '{out}/checkpoint-1')", f'Make {out} writable (or pass another --output_dir) and '
                          'resume.'])


def _children(pid):
    try:
        with open(f'/proc/{pid}/task/{pid}/children') as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def _alive(pid):
    try:
        with open(f'/proc/{pid}/stat') as f:
            return f.read().split(')')[-1].split()[0] != 'Z'  # a zombie has exited
    except OSError:
        return False


def _descendants(pid):
    found = []
    for child in _children(pid):
        found += [child] + _descendants(child)
    return found


@pytest.mark.parametrize('nproc', [1, 2])
def test_the_trainer_exits_with_the_swift_launcher(tiny_ws, tmp_path, nproc):
    """SIGTERM to ``swift rlhf`` (what a job scheduler sends): ms-swift's launcher dies without passing it on, and
    its child (the trainer, or torchrun and its workers) used to run on as orphans. All exit within seconds."""
    env = dict(os.environ, **OFFLINE_ENV)
    env.pop('SWIFT_GKD_PLUGIN', None)
    flags = dict(lmbda=0, max_steps=100000)
    if nproc > 1:
        env.update(NPROC_PER_NODE=str(nproc), MASTER_PORT=str(_free_port()))
        flags['use_cpu'] = 'true'
    launcher = subprocess.Popen([SWIFT, 'rlhf'] + base_args(tiny_ws, str(tmp_path / 'out'), **flags), env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    started = []
    try:
        deadline = time.time() + 120
        while len(_descendants(launcher.pid)) < (1 if nproc == 1 else 1 + nproc) and time.time() < deadline:
            time.sleep(0.2)
        time.sleep(3)  # the trainers are importing ms-swift (or loading the models) by now
        started = [pid for pid in _descendants(launcher.pid) if _alive(pid)]
        assert len(started) >= (1 if nproc == 1 else 1 + nproc) and launcher.poll() is None, started
        launcher.send_signal(signal.SIGTERM)
        launcher.wait(timeout=30)
        deadline = time.time() + 20
        while any(map(_alive, started)) and time.time() < deadline:
            time.sleep(0.2)
        assert not [pid for pid in started if _alive(pid)], 'processes outlived the swift launcher'
    finally:
        launcher.kill()
        launcher.wait()
        for pid in started:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def _one_error_line(run, needles, code=1):
    """Exit ``code``, one ``swift rlhf: error:`` line holding every needle, no traceback."""
    errors = [line for line in run.output.splitlines() if 'swift rlhf: error: ' in line]
    assert run.returncode == code and len(errors) == 1 and 'Traceback' not in run.output, run.output[-3000:]
    for needle in needles:
        assert needle in errors[0], f'{needle!r} missing from:\n{errors[0]}'


def _as_folder(path: str, folder) -> str:
    """A dataset folder (``folder``, made) holding ``path`` as ``.ndjson``: ms-swift reads it whole (``datasets``' json
    loader), the checks before loading do not (they read a folder's jsonl, json, csv, parquet and arrow files), so a
    run guard decides what only the run can know."""
    import shutil
    folder.mkdir()
    shutil.copy(path, folder / (os.path.splitext(os.path.basename(path))[0] + '.ndjson'))
    return str(folder)


def test_a_fresh_lora_on_its_own_base_without_a_teacher_view_is_refused_before_loading(tiny_ws, tmp_path):
    """Issue 74 item 5: --teacher_model = --model with --tuner_type lora, no --adapters, no --resume_from_checkpoint,
    rows without a teacher_prompt: the fresh adapter adds nothing, the student is its teacher, loss 0 from step 1.
    Both models loaded and three steps ran before the run guard stopped it; now one line before loading."""
    from test_activation_and_bad_input import assert_refused_in_one_line
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'out'), tuner_type='lora', teacher_model=tiny_ws.student,
                              lmbda=0, max_steps=6), check=False, timeout=300)
    assert_refused_in_one_line(run, [f'--teacher_model {tiny_ws.student} is --model with --tuner_type lora',
                                     'a fresh adapter adds nothing', 'exactly 0 from step 1',
                                     'Start from a trained adapter (--adapters or --resume_from_checkpoint), add a '
                                     'teacher_prompt column'])
    assert not run.logs


def test_a_run_that_learns_nothing_stops_instead_of_exiting_0(tiny_ws, tmp_path):
    """A shared base with a fresh LoRA adapter (zero B): student = teacher exactly, so every loss and gradient is 0.
    Where the rows cannot be read before loading (a dataset folder) the pre-load check lets it through; the trainer
    stops the run after three steps, naming the cause in one line, instead of exiting 0 having learnt nothing."""
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'out'), tuner_type='lora', teacher_model=tiny_ws.student,
                              lmbda=0, max_steps=6, dataset=_as_folder(tiny_ws.train, tmp_path / 'data')), check=False,
                    timeout=300)
    _one_error_line(run, ['the run stops after 3 step(s) with loss 0 exactly', 'the student\'s base with its LoRA '
                          'adapter off, and the adapter is still zero'])
    assert len(run.logs) == 2 and all(log['loss'] == 0 and log['grad_norm'] == 0 for log in run.logs)  # (3rd: stopped)


@pytest.mark.parametrize('name', ['logging_steps', 'one_epoch', 'copy'])
def test_the_zero_loss_guard_sees_every_step(tiny_ws, tmp_path, name):
    """Issue 45: the guard read the logged steps only, so a 6-step run logging every 5 steps, or a 2-step epoch,
    ended with exit code 0 at loss 0; a teacher that is a copy of the student (loss 0 on the first step, then
    weight decay's drift only) was never caught. (The shared-base runs read a dataset folder, which the pre-load
    refusal of a fresh adapter on its own base cannot read.)"""
    flags = {'logging_steps': dict(tuner_type='lora', teacher_model=tiny_ws.student, logging_steps=5, max_steps=6,
                                   dataset=_as_folder(tiny_ws.train, tmp_path / 'train')),
             'one_epoch': dict(tuner_type='lora', teacher_model=tiny_ws.student, max_steps=None, num_train_epochs=1,
                               dataset=_as_folder(tiny_ws.fixed, tmp_path / 'fixed')),
             'copy': dict(teacher_model=tiny_ws.student, logging_steps=5, max_steps=6)}[name]
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'out'), lmbda=0, **flags), check=False, timeout=300)
    needles = {'logging_steps': ['the run stops after 3 step(s) with loss 0 exactly'],
               'one_epoch': ['the run ended after 2 step(s) with loss 0 exactly'],
               'copy': [f'--teacher_model {tiny_ws.student} has the student\'s weights exactly (a copy of --model)',
                        'no training row has a teacher_prompt']}[name]
    _one_error_line(run, needles)


def test_a_copy_of_a_lora_students_base_stops_before_the_first_step(tiny_ws, tmp_path):
    """Issue 65 item 4: a LoRA student with a separate teacher that is a copy of its base (another folder, so not
    the shared base): the fresh adapter adds nothing, every step's loss is 0; the copy check compared the LoRA
    model's names with the plain teacher's, never equal, and the run was stopped only after 3 steps."""
    import shutil
    teacher = str(tmp_path / 'copy_of_the_base')
    shutil.copytree(tiny_ws.student, teacher)
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'out'), tuner_type='lora', teacher_model=teacher, lmbda=0,
                              max_steps=6), check=False, timeout=300)
    _one_error_line(run, [f'--teacher_model {teacher} has the student\'s weights exactly (a copy of --model)'])
    assert run.logs == []  # before the first step


def test_the_zero_loss_guard_waits_for_privileged_rows(tiny_ws, tmp_path):
    """A shared base whose teacher_prompt is on 4 of 32 rows: the steps before one of them is drawn have loss 0
    exactly, and the run used to be stopped at step 3 although it learns once they come up."""
    import json
    rows = [json.loads(line) for line in open(tiny_ws.train)][:32]
    for row in rows[28:]:
        row['teacher_prompt'] = 'Hint: reverse the letters. ' + row['messages'][0]['content']
    data = tmp_path / 'privileged.jsonl'
    data.write_text(''.join(json.dumps(row) + '\n' for row in rows))
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'out'), tuner_type='lora', teacher_model=tiny_ws.student,
                              lmbda=0, max_steps=16, dataset=str(data)), timeout=300)
    losses = run.losses
    assert losses[:3] == [0, 0, 0] and any(loss > 0 for loss in losses), losses


@pytest.mark.parametrize('side,impl', [('teacher', 'auto'), ('student', 'dense')])
def test_a_non_finite_model_stops_the_run_naming_it(tiny_ws, tmp_path, side, impl):
    """One NaN weight in the teacher (or an inf in the student): every step used to log loss 0 and grad_norm nan,
    with exit code 0. The first step stops naming the model, the step and the position."""
    import shutil

    import torch

    from swift_gkd_plugin.demo import tiny
    source = tiny_ws.teacher if side == 'teacher' else tiny_ws.student
    broken = str(tmp_path / f'{side}_nan')
    shutil.copytree(source, broken)
    model = tiny.load_model(broken)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = float('nan') if side == 'teacher' else float('inf')
    model.save_pretrained(broken)
    flags = {'teacher_model': broken} if side == 'teacher' else {'model': broken}
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'out'), lmbda=0, gkd_loss_impl=impl, **flags), check=False,
                    timeout=300)
    what = 'last hidden states hold NaN' if side == 'teacher' else 'logits hold NaN'
    _one_error_line(run, [f'the {side} (--{"teacher_" if side == "teacher" else ""}model {broken}): its {what} at '
                          'response token 1 of', '(a dataset response) on step 1 (off_policy step)'])
    assert not run.logs
