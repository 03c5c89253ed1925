"""Faults at the level of a whole run, through the real ``swift rlhf``: a training set smaller than one batch, a disk
that fills up during a checkpoint save, a SIGTERM to the ``swift`` launcher."""
import os
import signal
import subprocess
import time

import pytest
from conftest import OFFLINE_ENV, SWIFT, base_args, run_swift


def test_a_dataset_smaller_than_one_batch_is_refused(tiny_ws, tmp_path):
    """One row and batches of 2 with incomplete batches dropped: ms-swift ended with exit code 0 after 0 steps and
    train_loss 0. The run is refused, naming the numbers."""
    one_row = tmp_path / 'one.jsonl'
    with open(tiny_ws.train) as f:
        one_row.write_text(f.readline())
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'out'), dataset=str(one_row), lmbda=0), check=False)
    assert run.returncode != 0
    assert ('the training set has 1 row(s) after preprocessing, fewer than one batch (--per_device_train_batch_size '
            '2 on each of 1 process(es))') in run.output, run.output[-3000:]
    assert not run.logs


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
    assert run.returncode != 0
    assert f'saving {out}/checkpoint-1 failed, no space left on device: the filesystem of {out}/checkpoint-1 has' \
        in run.output, run.output[-4000:]
    assert f'{out} holds no complete checkpoint to resume from' in run.output


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


def test_the_trainer_exits_with_the_swift_launcher(tiny_ws, tmp_path):
    """SIGTERM to ``swift rlhf`` (what a job scheduler sends): ms-swift's launcher dies without passing it on, and
    its child (the trainer) used to run on as an orphan. It now exits within seconds."""
    env = dict(os.environ, **OFFLINE_ENV)
    env.pop('SWIFT_GKD_PLUGIN', None)
    argv = base_args(tiny_ws, str(tmp_path / 'out'), lmbda=0, max_steps=100000)
    launcher = subprocess.Popen([SWIFT, 'rlhf'] + argv, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    child = None
    try:
        deadline = time.time() + 120
        while not _children(launcher.pid) and time.time() < deadline:
            time.sleep(0.2)
        [child] = _children(launcher.pid)
        time.sleep(3)  # the child is importing ms-swift (or loading the models) by now
        assert _alive(child) and launcher.poll() is None
        launcher.send_signal(signal.SIGTERM)
        launcher.wait(timeout=30)
        deadline = time.time() + 15
        while _alive(child) and time.time() < deadline:
            time.sleep(0.2)
        assert not _alive(child), 'the trainer outlived the swift launcher'
    finally:
        launcher.kill()
        launcher.wait()
        if child is not None and _alive(child):
            os.kill(child, signal.SIGKILL)
