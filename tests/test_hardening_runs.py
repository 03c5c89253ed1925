"""Issue 58 items 2 and 8, through the real ``swift rlhf``: a resume from a checkpoint of another model or tuner, or
one already past ``--max_steps``, refused before any model loads (and never pointed back at the refused checkpoint);
runs that train no step refused; a gradient that overflows under a finite loss stopped at its step."""
import json
import os
import shutil

import pytest
from conftest import base_args, run_swift
from test_activation_and_bad_input import assert_refused_in_one_line
from test_pipeline_consistency import RESUME, _cut, saved_every_three_steps  # noqa: F401 (a fixture)
from test_run_faults import _one_error_line

LORA_SAVED = dict(tuner_type='lora', lmbda=0, max_steps=1, save_strategy='steps', save_steps=1,
                  save_only_model='false')


@pytest.fixture(scope='module')
def lora_checkpoint(tiny_ws, shared_runs):
    """A LoRA run's checkpoint-1 (adapter, optimizer and trainer state)."""
    run = shared_runs('hardening_lora_saved', {'run': lambda out: run_swift(base_args(tiny_ws, out, **LORA_SAVED))})
    return os.path.join(run['run'].output_dir, 'checkpoint-1')


@pytest.fixture(scope='module')
def wide_model(tiny_ws):
    """The student's architecture at hidden size 128 (64 in the student), its tokenizer."""
    from swift_gkd_plugin.demo import tiny
    out = os.path.join(tiny_ws.root, 'wide_student')
    if not os.path.exists(os.path.join(out, 'config.json')):
        tiny.build_model(out, os.path.join(tiny_ws.root, 'tok'), seed=5, hidden_size=128, intermediate_size=256)
    return out


def _copy(saved, tmp_path):
    out = tmp_path / 'saved'
    shutil.copytree(saved.output_dir, out, symlinks=True)
    return out


def test_a_checkpoint_of_another_model_is_refused_before_loading(tiny_ws, saved_every_three_steps, wide_model,
                                                                 tmp_path):
    """Issue 58 item 2: a full checkpoint of a hidden-128 model resumed on --model of hidden 64 loaded both models,
    then failed in load_state_dict with 60 lines of size mismatches."""
    out = _copy(saved_every_three_steps, tmp_path)
    for name in ('config.json', 'model.safetensors'):  # the checkpoint of a run on the wider model
        shutil.copy(os.path.join(wide_model, name), out / 'checkpoint-3' / name)
    with open(out / 'checkpoint-3' / 'args.json') as f:
        saved = json.load(f)
    saved['model'] = wide_model
    with open(out / 'checkpoint-3' / 'args.json', 'w') as f:
        json.dump(saved, f)
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'resumed'), resume_from_checkpoint=str(out / 'checkpoint-3'),
                              **RESUME), check=False)
    assert_refused_in_one_line(run, [f'--resume_from_checkpoint {out}/checkpoint-3 is a checkpoint of another model '
                                     f'than --model {tiny_ws.student}: its config.json has hidden_size 128 vs 64',
                                     f'Pass the --model it was trained from ({wide_model})'])


def test_full_and_lora_checkpoints_resume_only_their_own_tuner(tiny_ws, saved_every_three_steps, lora_checkpoint,
                                                               wide_model, tmp_path):
    """Issue 58 item 2: a LoRA checkpoint into a full run failed after loading with "Can't find a checkpoint index",
    a full one into a LoRA run with "'NoneType' object has no attribute 'missing_keys'", a LoRA adapter onto a
    wider base with size mismatches. A LoRA checkpoint still resumes a LoRA run (ms-swift loads the adapter with
    the checkpoint's own r and target modules)."""
    full = os.path.join(saved_every_three_steps.output_dir, 'checkpoint-3')
    cases = [
        (dict(RESUME, resume_from_checkpoint=lora_checkpoint),
         [f'--resume_from_checkpoint {lora_checkpoint} holds an adapter (adapter_config.json) and --tuner_type '
          'full resumes full weights: pass --tuner_type lora']),
        (dict(RESUME, resume_from_checkpoint=full, tuner_type='lora'),
         [f'--resume_from_checkpoint {full} holds full weights (model.safetensors, no adapter_config.json) and '
          '--tuner_type lora resumes an adapter: pass --tuner_type full']),
        (dict(LORA_SAVED, max_steps=2, save_strategy='no', resume_from_checkpoint=lora_checkpoint, model=wide_model),
         [f'--resume_from_checkpoint {lora_checkpoint} is a checkpoint of another model than --model {wide_model}: '
          f'the config.json of its base {tiny_ws.student} has hidden_size 64 vs 128']),
    ]
    for i, (flags, needles) in enumerate(cases):
        run = run_swift(base_args(tiny_ws, str(tmp_path / f'resumed{i}'), **flags), check=False)
        assert_refused_in_one_line(run, needles)
    resumed = run_swift(base_args(tiny_ws, str(tmp_path / 'lora'), **dict(
        LORA_SAVED, max_steps=2, save_strategy='no', resume_from_checkpoint=lora_checkpoint)))
    assert [log['global_step/max_steps'] for log in resumed.logs] == ['2/2']


def test_a_cut_short_newest_checkpoint_points_to_an_earlier_one(tiny_ws, saved_every_three_steps, tmp_path):
    """Issue 58 item 2: the newest checkpoint's weights cut short (its trainer_state.json written), the refusal
    named that same checkpoint as the one to resume from; now the earlier complete one, or that none is left."""
    out = _copy(saved_every_three_steps, tmp_path)
    _cut(out / 'checkpoint-6' / 'model.safetensors')
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'resumed'), resume_from_checkpoint=str(out / 'checkpoint-6'),
                              **RESUME), check=False)
    assert_refused_in_one_line(run, ['checkpoint-6 has a cut-short model.safetensors',
                                     f'the newest complete checkpoint is {out}/checkpoint-3 (--resume_from_checkpoint '
                                     f'{out}/checkpoint-3)'])
    _cut(out / 'checkpoint-3' / 'model.safetensors')
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'resumed'), resume_from_checkpoint=str(out / 'checkpoint-6'),
                              **RESUME), check=False)
    assert_refused_in_one_line(run, ['checkpoint-6 has a cut-short model.safetensors',
                                     f'{out} holds no other complete checkpoint to resume from'])


def test_a_runs_folder_is_refused_naming_its_newest_complete_checkpoint(tiny_ws, saved_every_three_steps, tmp_path):
    """Issue 66 item 3: the folder that holds checkpoint-3, checkpoint-6 and last-checkpoint was refused as a save "cut
    short" with "no complete checkpoint"; also one level down, in ms-swift's ``v<N>-<time>`` run folders."""
    out = _copy(saved_every_three_steps, tmp_path)
    versioned = tmp_path / 'versioned'
    shutil.copytree(out, versioned / 'v0-20261127-010203', symlinks=True)
    for folder, newest in ((out, out), (versioned, versioned / 'v0-20261127-010203')):
        run = run_swift(base_args(tiny_ws, str(tmp_path / 'resumed'), resume_from_checkpoint=str(folder), **RESUME),
                        check=False)
        assert_refused_in_one_line(run, [f"--resume_from_checkpoint {folder} is a run's folder, not one of its "
                                         'checkpoints: resume from its newest complete checkpoint, '
                                         f'--resume_from_checkpoint {newest}/'])
        named = run.output.split('--resume_from_checkpoint ')[-1].split()[0]
        assert os.path.realpath(named) == os.path.realpath(newest / 'checkpoint-6'), named


@pytest.mark.parametrize('flags,needles', [
    (dict(max_steps=6), ['checkpoint-6 is at step 6 (trainer_state.json\'s global_step) and --max_steps is 6: nothing '
                         'is left to train', 'Pass --max_steps larger than 6']),
    (dict(max_steps=-1, num_train_epochs=0.1), ['checkpoint-6 is at epoch 0.1875 (trainer_state.json\'s epoch) and '
                                                '--num_train_epochs is 0.1: nothing is left to train']),
], ids=['max_steps', 'epochs'])
def test_a_checkpoint_already_past_the_end_is_refused_before_loading(tiny_ws, saved_every_three_steps, tmp_path,
                                                                     flags, needles):
    """Issue 58 item 8: resuming checkpoint-6 with --max_steps 6 trained a 7th step ("7/6") and exited 0."""
    checkpoint = os.path.join(saved_every_three_steps.output_dir, 'checkpoint-6')
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'resumed'), resume_from_checkpoint=checkpoint,
                              **dict(RESUME, **flags)), check=False)
    assert_refused_in_one_line(run, needles)


@pytest.mark.parametrize('flags,needles', [
    (dict(max_steps=0), ['--max_steps 0 trains nothing (one step at learning rate 0): allowed a positive number of '
                         'optimizer steps, or -1']),
    (dict(max_steps=-1, num_train_epochs=0), ['--num_train_epochs 0 with --max_steps -1 trains no step: allowed > 0']),
], ids=['max_steps_0', 'epochs_0'])
def test_a_run_of_no_step_is_refused_before_loading(tiny_ws, tmp_path, flags, needles):
    """Issue 58 item 8: --max_steps 0 ran one step at learning rate 0, --num_train_epochs 0 none, both after loading
    the models, with exit code 0."""
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'out'), **flags), check=False, timeout=120)
    assert_refused_in_one_line(run, needles)


def test_a_coefficient_float32_cannot_hold_is_refused_before_loading(tiny_ws, tmp_path):
    """Issue 58 item 8: --gkd_divergence_coef 1e39 is inf in the float32 loss (every step's gradient NaN, exit 0)."""
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'out'), lmbda=0, max_steps=2, gkd_divergence_coef=1e39),
                    check=False, timeout=120)
    assert_refused_in_one_line(run, ['--gkd_divergence_coef must be a number float32 holds (|x| <= 3.403e+38',
                                     'got 1e+39'])


def test_a_gradient_that_overflows_under_a_finite_loss_stops_the_run(tiny_ws, tmp_path):
    """Issue 58 item 8: a coefficient float32 holds (1e38) keeps the loss finite (~1e36) while the gradient overflows:
    every step logged a non-finite grad_norm, ms-swift skipped each update, and the run exited 0 with the weights it
    started from."""
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'out'), lmbda=0, max_steps=2, gkd_divergence_coef=1e38),
                    check=False, timeout=300)
    _one_error_line(run, ['on step 1 although the loss is finite',
                          'the terms present: --temperature 0.9, --gkd_divergence_coef 1e+38)'])
    assert not run.logs


def test_a_non_finite_loss_names_the_terms_present(tiny_ws, tmp_path):
    """Issue 58 item 8: the message listed --temperature, --sft_alpha, --gkd_rl_coef, --gkd_ref_kl_coef whatever the
    run, and never the coefficient that overflowed: --sft_alpha 3e38 times a cross-entropy of ~6 nats is inf."""
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'out'), lmbda=0, max_steps=2, sft_alpha=3e38),
                    check=False, timeout=300)
    _one_error_line(run, ['the loss is not finite on step 1 (off_policy step)',
                          'the terms present: --temperature 0.9, --gkd_divergence_coef 1, --sft_alpha 3e+38)'])
    assert '--gkd_rl_coef' not in run.output.split('swift rlhf: error: ')[1]


def test_a_learning_rate_of_0_is_warned_about_at_start(tiny_ws, tmp_path):
    """Issue 66 item 8: it trained, saved a checkpoint equal to the start and exited 0 without a word (--max_steps 0
    is refused for this outcome; a run at learning rate 0 still measures losses)."""
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'out'), learning_rate=0, max_steps=1))
    warning = ('--learning_rate 0: the weights never change, so the run measures losses and every checkpoint it saves '
               'holds the starting weights')
    assert warning in run.output and len(run.losses) == 1
    assert warning not in run_swift(base_args(tiny_ws, str(tmp_path / 'lr'), learning_rate=1e-5, max_steps=1)).output
