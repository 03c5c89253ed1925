"""Mode decisions across ranks and resumes; loss normalisation; equality with ms-swift's built-in GKD loss."""
import json
import os

import pytest
from conftest import _run_env, _zygote_for, base_args, early_stopper, launcher_child_command, run_swift
from transformers import AutoTokenizer


def _rel(a, b):
    return abs(a - b) / max(abs(a), abs(b), 1e-12)


#: 6 steps that mix on-policy and seq_kd steps (seed 7) on two CPU ranks
TWO_RANKS = dict(lmbda=0.5, seq_kd='true', max_steps=6, use_cpu='true', seed=7)


@pytest.fixture(scope='module')
def two_ranks_launched(tiny_ws, shared_runs):
    """:data:`TWO_RANKS` through ms-swift's ``swift`` launcher (torchrun and its two ranks: fresh processes); also
    tests/test_zygote.py's reference for two ranks forked from the zygote."""
    return shared_runs('two_ranks_launched', {'run': lambda out: run_swift(base_args(tiny_ws, out, **TWO_RANKS),
                                                                           nproc=2, launcher=True)})['run']


def test_two_processes_agree_on_every_mode_decision(two_ranks_launched):
    run = two_ranks_launched
    # through ms-swift's launcher, which started torchrun exactly as run_swift does without it in the other tests
    assert run.launched and run.launched[1:4] == ['-m', 'torch.distributed.run', '--nproc_per_node']
    assert run.launched[1:] == run.child_command[1:] and os.path.samefile(run.launched[0], run.child_command[0])
    rank0, rank1 = run.modes(0), run.modes(1)
    assert [m['step'] for m in rank0] == list(range(6))
    assert rank0 == rank1
    assert len({m['mode'] for m in rank0}) == 2, 'seed 7 mixes on-policy and seq_kd steps in 6 steps'
    # the logged mode flags are averaged over ranks: exactly 0 or 1 means the ranks agreed
    for row in run.logs:
        assert all(row[k] in (0.0, 1.0) for k in row if k.startswith('gkd/mode_'))


RESUME = dict(lmbda=0.5, seq_kd='true', max_steps=6, seed=3, temperature=1.0, save_strategy='steps', save_steps=3,
              save_only_model='false')


@pytest.fixture(scope='module')
def saved_every_three_steps(tiny_ws, shared_runs):
    """6 steps, a full checkpoint (optimizer included) at steps 3 and 6."""
    return shared_runs('saved_every_three_steps', {'run': lambda out: run_swift(base_args(tiny_ws, out,
                                                                                          **RESUME))})['run']


def test_resume_continues_the_same_modes_and_losses(tiny_ws, saved_every_three_steps, tmp_path):
    full = saved_every_three_steps
    ckpt = [c for c in full.checkpoints() if c.endswith('checkpoint-3')]
    assert ckpt, full.checkpoints()

    # a fresh run directory that resumes from the uninterrupted run's step-3 checkpoint
    resumed = run_swift(base_args(tiny_ws, str(tmp_path / 'resumed'), resume_from_checkpoint=ckpt[0], **RESUME))
    assert [m['step'] for m in resumed.modes()] == [3, 4, 5]
    assert resumed.modes() == full.modes()[3:]
    assert len(resumed.logs) == 3
    assert 'was trained with another loss' not in resumed.output
    # issue 74 item 10d: the start of a resumed run names the checkpoint and the step it continues from
    assert (f'swift_gkd_plugin: resuming from --resume_from_checkpoint {ckpt[0]} at global step 3 of 6: the next step '
            'is 4') in resumed.output, resumed.output[-3000:]
    for a, b in zip(resumed.logs, full.logs[3:]):
        assert a['global_step/max_steps'] == b['global_step/max_steps']
        assert _rel(a['loss'], b['loss']) < 1e-4, (resumed.losses, full.losses)


def test_the_model_card_names_the_distillation_and_its_snippet_runs_on_a_cpu(tiny_ws, saved_every_three_steps,
                                                                             tmp_path):
    """Issue 74 item 10e: the run folder's README.md was TRL's card ("a fine-tuned version of [None]", a snippet on
    device="cuda"); it names the student, the teacher, the GKD settings and the versions, and its snippet loads the
    newest checkpoint and generates on a CPU."""
    import re
    import subprocess
    import sys

    import swift_gkd_plugin
    with open(os.path.join(saved_every_three_steps.output_dir, 'README.md')) as f:
        card = f.read()
    assert 'fine-tuned version of' not in card and 'device="cuda"' not in card, card
    # the models of the run as it was started (the workspace of the xdist worker that started the shared run)
    with open(os.path.join(saved_every_three_steps.output_dir, 'args.json')) as f:
        started = json.load(f)
    assert os.path.basename(started['model']) == 'student' and os.path.basename(started['teacher_model']) == 'teacher'
    for needle in (f'| student (--model) | `{started["model"]}` |',
                   f'| teacher | `{started["teacher_model"]}` (--teacher_model) |',
                   '| --lmbda | 0.5 ', '| --seq_kd | True ', '| --beta | 0.5 ', '| --temperature | 1.0 ',
                   '| loss | jsd(beta=0.5) on the ', '--gkd_divergence jsd', '| tuner | full |', '| steps | 6 of 6 ',
                   f'swift-gkd-plugin {swift_gkd_plugin.__version__}, ms-swift 4.6'):
        assert needle in card, (needle, card)
    snippet = re.search(r'```python\n(.*?)```', card, re.S).group(1)
    assert os.path.join(saved_every_three_steps.output_dir, 'checkpoint-6') in snippet
    # a python process on a CPU: a fork of the test worker's zygote (it imported torch and transformers, ~5 s of a
    # fresh interpreter's start), else a fresh one (GKD_TESTS_FRESH_PROCESSES=1)
    (tmp_path / 'snippet.py').write_text(snippet)
    env = dict(_run_env(), CUDA_VISIBLE_DEVICES='', HF_HUB_OFFLINE='1', OMP_NUM_THREADS='1')
    zygote, _ = _zygote_for(launcher_child_command('rlhf', [], _run_env()), _run_env())
    if zygote is not None:
        returncode, _, stderr = zygote.run(str(tmp_path / 'snippet.py'), [], env, 300, str(tmp_path))
    else:
        proc = subprocess.run([sys.executable, str(tmp_path / 'snippet.py')], capture_output=True, text=True,
                              timeout=300, cwd=tmp_path, env=env)
        returncode, stderr = proc.returncode, proc.stderr
    assert returncode == 0, stderr[-3000:]


@pytest.mark.parametrize('last_checkpoint_link', [True, False])
def test_resume_from_a_half_written_checkpoint_is_refused_before_loading(tiny_ws, saved_every_three_steps, tmp_path,
                                                                         last_checkpoint_link):
    """A save killed mid-way leaves checkpoint-6 with its config and weights but no trainer_state.json (written last),
    and last-checkpoint still on checkpoint-3: resuming from checkpoint-6 is refused before any model loads, naming
    the missing file and the newest complete checkpoint (from the link, or the highest complete checkpoint-N)."""
    import shutil
    out = tmp_path / 'killed'
    shutil.copytree(saved_every_three_steps.output_dir, out, symlinks=True)
    os.remove(out / 'checkpoint-6' / 'trainer_state.json')
    os.remove(out / 'last-checkpoint')
    if last_checkpoint_link:
        os.symlink('checkpoint-3', out / 'last-checkpoint')
    assert os.path.exists(out / 'checkpoint-6' / 'model.safetensors')
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'resumed'), resume_from_checkpoint=str(out / 'checkpoint-6'),
                              **RESUME), check=False)
    assert run.returncode != 0
    assert (f'--resume_from_checkpoint {out}/checkpoint-6 has no trainer_state.json' in run.output
            and f'the newest complete checkpoint is {out}/checkpoint-3 (--resume_from_checkpoint {out}/checkpoint-3)'
            in run.output), run.output[-3000:]
    assert 'Loading weights' not in run.output and 'FileNotFoundError' not in run.output


def _cut(path):
    with open(path, 'r+b') as f:
        f.truncate(os.path.getsize(path) // 2)


RESUME_FAULTS = {  # issue 45: each used to fail after both models loaded, or resume silently with a fresh optimizer
    'missing': (lambda c: None, 'checkpoint-9', ['checkpoint-9: no such checkpoint folder']),
    'no_weights': (lambda c: os.remove(c / 'model.safetensors'), 'checkpoint-3',
                   ['checkpoint-3 holds no model weights (none of model.safetensors']),
    'no_optimizer': (lambda c: os.remove(c / 'optimizer.pt'), 'checkpoint-3',
                     ['checkpoint-3 has no optimizer.pt: resuming would silently start the optimizer state (AdamW '
                      'moments) afresh', '--resume_only_model true']),
    'cut_optimizer': (lambda c: _cut(c / 'optimizer.pt'), 'checkpoint-3',
                      ['checkpoint-3 has a cut-short optimizer.pt']),
    'cut_weights': (lambda c: _cut(c / 'model.safetensors'), 'checkpoint-3',
                    ['checkpoint-3 has a cut-short model.safetensors', 'its tensors need']),
}


@pytest.mark.parametrize('fault', list(RESUME_FAULTS))
def test_resume_from_a_checkpoint_without_its_files_is_refused_before_loading(tiny_ws, saved_every_three_steps,
                                                                              tmp_path, fault):
    import shutil

    from test_activation_and_bad_input import assert_refused_in_one_line
    out = tmp_path / 'saved'
    shutil.copytree(saved_every_three_steps.output_dir, out, symlinks=True)
    damage, name, needles = RESUME_FAULTS[fault]
    damage(out / 'checkpoint-3')
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'resumed'), resume_from_checkpoint=str(out / name), **RESUME),
                    check=False)
    assert_refused_in_one_line(run, needles + [f'the newest complete checkpoint is {out}/checkpoint-6'])


def test_resume_without_the_rng_state_is_warned(tiny_ws, saved_every_three_steps, tmp_path):
    """Issue 45: the run resumed with other random draws without a word."""
    import shutil
    out = tmp_path / 'saved'
    shutil.copytree(saved_every_three_steps.output_dir, out, symlinks=True)
    os.remove(out / 'checkpoint-3' / 'rng_state.pth')
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'resumed'), resume_from_checkpoint=str(out / 'checkpoint-3'),
                              **RESUME))
    assert (f'--resume_from_checkpoint {out}/checkpoint-3 has no rng_state.pth: the run resumes with other random '
            'draws than an uninterrupted run') in run.output
    assert len(run.logs) == 3


@pytest.mark.parametrize('changed,says', [
    ({'beta': 0.9}, '--beta 0.5 -> 0.9'),
    ({'gkd_divergence': 'skew_kl'}, '--gkd_divergence jsd -> skew_kl'),
    ({'temperature': 2.0}, '--temperature 1.0 -> 2.0'),  # issue 37: a changed temperature or top-k was silent
    ({'gkd_logits_topk': 8}, '--gkd_logits_topk None -> 8'),
])
def test_resume_with_another_loss_is_warned_naming_both_values(tiny_ws, saved_every_three_steps, tmp_path, changed,
                                                                says):
    """The checkpoint's args.json (ms-swift's copy of the run's arguments) records the loss; a resume that changes it
    is warned about before any model loads (here from the half-written checkpoint-6, refused right after: fast)."""
    import shutil
    out = tmp_path / 'killed'
    shutil.copytree(saved_every_three_steps.output_dir, out, symlinks=True)
    os.remove(out / 'checkpoint-6' / 'trainer_state.json')
    with open(out / 'checkpoint-6' / 'args.json') as f:
        saved = json.load(f)
    assert (saved['gkd_divergence'], saved['beta'], saved['gkd_skew_alpha']) == ('jsd', 0.5, 0.1)
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'resumed'), resume_from_checkpoint=str(out / 'checkpoint-6'),
                              **dict(RESUME, **changed)), check=False)
    assert (f'--resume_from_checkpoint {out}/checkpoint-6 was trained with another loss ({says}, checkpoint\'s -> '
            'this run\'s)') in run.output, run.output[-3000:]
    assert 'has no trainer_state.json' in run.output and 'Loading weights' not in run.output


EIGHT_ROWS_A_STEP = dict(lmbda=0, max_steps=2, seed=11)


@pytest.fixture(scope='module')
def one_process_two_micro_batches(tiny_ws, shared_runs):
    """8 rows per optimizer step on one process: 2 micro-batches of 4 rows (the reference of the next two tests)."""
    return shared_runs('eight_rows_a_step', {'run': lambda out: run_swift(base_args(
        tiny_ws, out, per_device_train_batch_size=4, gradient_accumulation_steps=2, **EIGHT_ROWS_A_STEP))})['run']


def test_loss_does_not_depend_on_the_micro_batch_split(tiny_ws, one_process_two_micro_batches, tmp_path):
    """One optimizer step over 8 rows: 1 x 8 rows, or 2 micro-batches of 4, gives the same token-mean loss."""
    whole = run_swift(base_args(tiny_ws, str(tmp_path / 'whole'), per_device_train_batch_size=8,
                                gradient_accumulation_steps=1, **dict(EIGHT_ROWS_A_STEP, max_steps=1)))
    split = one_process_two_micro_batches
    assert _rel(whole.losses[0], split.losses[0]) < 1e-5, (whole.losses, split.losses)
    assert _rel(whole.logs[0]['grad_norm'], split.logs[0]['grad_norm']) < 1e-4


@pytest.fixture(scope='module')
def early_stopping_student(tiny_ws):
    """The tiny student with its ``<|im_end|>`` output row aimed at its average last hidden state (logit ~2 there):
    its samples stop after a random number of tokens, so on-policy micro-batches hold different token counts."""
    out = os.path.join(tiny_ws.root, 'early_stopping_student')
    if os.path.exists(out):
        return out
    model, tok = early_stopper(tiny_ws.student, scale=2.0)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.mark.parametrize('impl', ['dense', 'fused'])
def test_logged_divergence_is_the_token_mean_of_uneven_micro_batches(tiny_ws, early_stopping_student, tmp_path,
                                                                     impl):
    """On-policy with sft off, the step loss is the divergence's mean over the step's response tokens: so must
    gkd/loss_on_policy be when the step's two micro-batches hold different numbers of tokens (not a mean of the
    two micro-batch means)."""
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'out'), model=early_stopping_student, lmbda=1, max_steps=2,
                              per_device_train_batch_size=1, gradient_accumulation_steps=2, temperature=1.0, seed=1,
                              gkd_loss_impl=impl, log_completions='true'))
    tok = AutoTokenizer.from_pretrained(early_stopping_student)
    with open(os.path.join(run.output_dir, 'completions.jsonl')) as f:
        steps = [[len(tok(c)['input_ids']) for c in json.loads(line)['completion']] for line in f]
    assert len(steps) == 2 and any(a != b for a, b in steps), steps  # a step with uneven micro-batches
    assert len(run.logs) == 2
    for row in run.logs:
        assert _rel(row['gkd/loss_on_policy'], row['loss']) < 1e-5, run.logs  # the logs keep 8 decimals


@pytest.mark.parametrize('beta,temperature', [(0.0, 1.0), (0.5, 0.9), (1.0, 2.0)])
def test_off_policy_loss_equals_ms_swift_builtin(tiny_ws, tmp_path, beta, temperature):
    # learning rate 0: every step compares the two losses on the same batch and the same weights (after an update,
    # float rounding of the two gradients would already differ at the 1e-5 level)
    common = dict(lmbda=0, beta=beta, temperature=temperature, max_steps=2, seed=5, dataset=tiny_ws.fixed,
                  learning_rate=0)
    ours = run_swift(base_args(tiny_ws, str(tmp_path / 'ours'), **common))
    builtin = run_swift(base_args(tiny_ws, str(tmp_path / 'builtin'), **common), env={'SWIFT_GKD_PLUGIN': '0'})
    assert 'swift_gkd_plugin' in ours.output and 'swift_gkd_plugin' not in builtin.output
    assert len(ours.losses) == len(builtin.losses) == 2
    # 3e-5: ms-swift sums first-order terms sum p (log p - log q) in float32, which cancel to a value this small
    # (~0.008 per token) and leave ~1e-5 of it as rounding; the plugin's fused loss sums second-order terms (1e-8
    # against float64 in tests/core/test_fused_loss.py), so the two differ by the built-in's own error
    for a, b in zip(ours.losses, builtin.losses):
        assert _rel(a, b) < 3e-5, (ours.losses, builtin.losses)


def test_step_loss_is_the_same_on_one_process_two_ranks_and_zero2(tiny_ws, one_process_two_micro_batches, tmp_path):
    """8 rows per step: 1 process x 4 rows x 2 accumulation steps, 2 DDP ranks x 2 x 2, and the same under ZeRO-2."""
    pytest.importorskip('deepspeed')
    common = dict(gradient_accumulation_steps=2, per_device_train_batch_size=2, use_cpu='true', **EIGHT_ROWS_A_STEP)
    single = one_process_two_micro_batches
    ddp = run_swift(base_args(tiny_ws, str(tmp_path / 'ddp'), **common), nproc=2)
    zero2 = run_swift(base_args(tiny_ws, str(tmp_path / 'zero2'), deepspeed='zero2', fp16='false', **common), nproc=2)
    for other in (ddp, zero2):
        assert len(other.logs) == len(single.logs) == 2
        for a, b in zip(single.logs, other.logs):
            assert _rel(a['loss'], b['loss']) < 1e-5, (single.losses, other.losses)
            assert _rel(a['grad_norm'], b['grad_norm']) < 1e-4
