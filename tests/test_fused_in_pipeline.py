"""Inside real ``swift rlhf`` runs, the fused loss gives the dense loss's values and gradients, everywhere."""
import json

import pytest
from conftest import base_args, run_swift


def _rel(a, b):
    """Relative difference, with an absolute floor of 1e-7 below which float32 rounding and the 4-digit logs of
    tiny losses dominate."""
    return abs(a - b) / max(abs(a), abs(b), 1e-2)


def _configs(tiny_ws, adapters, tmp_path):
    privileged = tmp_path / 'privileged.jsonl'
    with open(privileged, 'w') as f:
        for line in open(tiny_ws.fixed):
            row = json.loads(line)
            f.write(json.dumps({**row, 'teacher_prompt': row['messages'][0]['content'] + ' (reverse it)'}) + '\n')
    return {
        # a separate teacher reading privileged prompts, in the dataset and seq_kd modes, with the SFT term
        'separate_teacher_all_modes_sft_privileged': dict(dataset=str(privileged), lmbda=0.5, seq_kd='true',
                                                          sft_alpha=0.3),
        'shared_base_lora': dict(tuner_type='lora', lora_dropout=0, teacher_model=tiny_ws.student,
                                 adapters=adapters['student_start'], lmbda=0.5),
        'teacher_adapter': dict(tuner_type='lora', lora_dropout=0, teacher_model=None,
                                adapters=adapters['student_start'], teacher_adapters=adapters['fit'], lmbda=0),
        'local_topk': dict(gkd_logits_topk=8, lmbda=0, beta=0.3),
        # DistiLLM's skew divergences: a full teacher on dataset and on-policy steps, and a top-k teacher
        'skew_kl': dict(gkd_divergence='skew_kl', gkd_skew_alpha=0.2, lmbda=0.5),
        'skew_rkl_local_topk': dict(gkd_divergence='skew_rkl', gkd_logits_topk=8, lmbda=0),
        # the student itself is the teacher, reading the privileged prompt (the no-prompt case is 0 by definition)
        'self_distillation_privileged': dict(teacher_model=None, teacher_model_type=None, dataset=str(privileged),
                                             lmbda=0, temperature=2.0),
    }


CASES = ['separate_teacher_all_modes_sft_privileged', 'shared_base_lora', 'teacher_adapter', 'local_topk',
         'self_distillation_privileged', 'skew_kl', 'skew_rkl_local_topk']
DIVERGENCE_LOGGED = {'skew_kl': 'divergence skew_kl(alpha=0.2)', 'skew_rkl_local_topk': 'divergence skew_rkl(alpha=0.1)',
                     'local_topk': 'divergence jsd(beta=0.3)'}


@pytest.mark.parametrize('case', CASES)
def test_fused_equals_dense(tiny_ws, adapters, tmp_path, case):
    flags = dict(max_steps=3, seed=3, gradient_accumulation_steps=2, **_configs(tiny_ws, adapters, tmp_path)[case])
    dense = run_swift(base_args(tiny_ws, str(tmp_path / 'dense'), gkd_loss_impl='dense', **flags))
    fused = run_swift(base_args(tiny_ws, str(tmp_path / 'fused'), gkd_loss_impl='fused', **flags))
    assert 'GKD loss implementation: fused' in fused.output
    assert 'its backend: PyTorch chunk path (auto, the default: cpu tensors)' in fused.output  # and why
    if case == 'teacher_adapter':  # --teacher_model unset: one true line about the teacher, not ms-swift's
        assert 'self-distillation mode (teacher = student)' not in dense.output + fused.output
    if case in DIVERGENCE_LOGGED:  # the flags reach the trainer of both implementations
        assert DIVERGENCE_LOGGED[case] in dense.output and DIVERGENCE_LOGGED[case] in fused.output
    assert len(dense.logs) == len(fused.logs) == 3
    for d, f in zip(dense.logs, fused.logs):
        assert _rel(d['loss'], f['loss']) < 1e-5, (dense.losses, fused.losses)
        assert _rel(d['grad_norm'], f['grad_norm']) < 1e-4


# Two-rank runs, test_teacher_placement.py's too: full tuning with a separate teacher under ZeRO-3 (its resident
# teacher against one offloaded by ms-swift) and DDP, and the shared-base LoRA student under ZeRO-3, DDP and ZeRO-2.
TWO_RANKS = dict(max_steps=2, seed=3, use_cpu='true', lmbda=0.5, seq_kd='true', learning_rate=1e-3)
ZERO3 = dict(deepspeed='zero3', fp16='false')
SHARED_BASE = dict(tuner_type='lora', lora_dropout=0)


def two_rank_runs(tiny_ws, adapters, shared_runs):
    """The group ``two_ranks``: ``full_{dense,fused}`` (ZeRO-3, full tuning, a separate teacher), ``full_offloaded``
    (``full_dense`` with ``--offload_teacher_model true``), ``full_ddp_fused`` (plain DDP), ``lora_{dense,fused}``
    (ZeRO-3, the shared base with the ``fit`` adapter, sampling with ``--ds3_gather_for_generation false``),
    ``lora_ddp`` and ``lora_zero2`` (the same student under plain DDP and ZeRO-2, gathering as ms-swift does by
    default)."""
    lora = dict(SHARED_BASE, teacher_model=tiny_ws.student, adapters=adapters['fit'])

    def start(**flags):
        return lambda out: run_swift(base_args(tiny_ws, out, **TWO_RANKS, **flags), nproc=2)

    return shared_runs('two_ranks', {
        'full_dense': start(**ZERO3, gkd_loss_impl='dense'),
        'full_fused': start(**ZERO3, gkd_loss_impl='fused'),
        'full_offloaded': start(**ZERO3, gkd_loss_impl='dense', offload_teacher_model='true'),
        'full_ddp_fused': start(gkd_loss_impl='fused'),
        'lora_dense': start(**ZERO3, **lora, ds3_gather_for_generation='false', gkd_loss_impl='dense'),
        'lora_fused': start(**ZERO3, **lora, ds3_gather_for_generation='false', gkd_loss_impl='fused'),
        'lora_ddp': start(**lora, gkd_loss_impl='dense'),
        'lora_zero2': start(deepspeed='zero2', fp16='false', **lora, gkd_loss_impl='dense')})


def test_fused_equals_dense_on_two_ranks(tiny_ws, adapters, shared_runs):
    """Plain DDP: the fused loss logs the dense loss's losses and gradient norms (those of the dense ZeRO-3 run, one
    reference for the three: test_teacher_placement.py's shared-base runs tie ZeRO-3 to DDP with the dense loss)."""
    pytest.importorskip('deepspeed')
    runs = two_rank_runs(tiny_ws, adapters, shared_runs)
    dense, fused = runs['full_dense'], runs['full_ddp_fused']
    assert 'GKD loss implementation: fused (--gkd_loss_impl fused)' in fused.output
    assert len(dense.logs) == len(fused.logs) == 2
    for d, f in zip(dense.logs, fused.logs):
        assert _rel(d['loss'], f['loss']) < 1e-5 and _rel(d['grad_norm'], f['grad_norm']) < 1e-4, (dense.logs,
                                                                                                     fused.logs)
    # swift_gkd_plugin.swift.run.clean_exit: no process group left to interpreter finalization; one line, rank 0's
    assert fused.output.count('destroyed its process groups before exit') == 1, fused.output[-3000:]


@pytest.mark.parametrize('case', ['full', 'lora'])
def test_fused_equals_dense_under_zero3_on_two_processes(tiny_ws, adapters, shared_runs, case):
    """ZeRO-3 partitions both output heads: the fused loss gathers them for its forward, and the head's full-size
    gradient reaches the shards (full tuning: the head is trained; the grad-norm includes its gradient). The shared
    base samples its seq_kd rows with ZeRO-3 gathering each layer as it runs (``--ds3_gather_for_generation
    false``): the first training forward after it failed, in both loss paths (issue 74 item 1)."""
    pytest.importorskip('deepspeed')
    runs = two_rank_runs(tiny_ws, adapters, shared_runs)
    dense, fused = runs[f'{case}_dense'], runs[f'{case}_fused']
    assert 'GKD loss implementation: fused (--gkd_loss_impl fused)' in fused.output
    assert len(dense.logs) == len(fused.logs) == 2
    for d, f in zip(dense.logs, fused.logs):
        assert _rel(d['loss'], f['loss']) < 1e-5, (dense.losses, fused.losses)
        assert _rel(d['grad_norm'], f['grad_norm']) < 1e-4, (dense.logs, fused.logs)


def test_top_k_tail_trains_with_the_fused_loss(tiny_ws, tmp_path):
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'out'), gkd_logits_topk=4, gkd_topk_tail='true', lmbda=0,
                              max_steps=2, gkd_fused_backend='torch'))
    assert 'GKD loss implementation: fused (--gkd_loss_impl auto); its backend: torch (--gkd_fused_backend)' in \
        run.output
    assert len(run.losses) == 2 and all(x > 0 for x in run.losses)


@pytest.fixture(scope='module')
def confident_teacher(tiny_ws):
    """The tiny teacher with its output head scaled by 100: top-1 log-probabilities of -1e-3 .. -1e-10, tails of
    1e-6 .. 1e-12, as a sharp real teacher's; built once next to ``tiny_ws``."""
    import os
    import shutil

    import torch

    from swift_gkd_plugin.demo import tiny
    out = os.path.join(tiny_ws.root, 'confident_teacher')
    if not os.path.exists(os.path.join(out, 'config.json')):
        shutil.copytree(tiny_ws.teacher, out)  # tokenizer and config
        model = tiny.load_model(out)
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(100.0)
        model.save_pretrained(out)
    return out


def test_top_k_tail_reverse_kl_with_a_confident_teacher_is_finite(tiny_ws, confident_teacher, tmp_path):
    """Issue 27: reverse KL on the top-k + tail buckets of a confident teacher logged a loss of ~1e30 and an
    infinite grad_norm (the teacher's tail mass came out as 0 from float32 log-probabilities), exit 0."""
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'out'), teacher_model=confident_teacher, gkd_logits_topk=4,
                              gkd_topk_tail='true', beta=1, lmbda=0, max_steps=2))
    assert len(run.logs) == 2
    for row in run.logs:
        assert 0 < row['loss'] < 100 and 0 < row['grad_norm'] < 1e4, run.logs


def test_lora_on_the_output_head_falls_back_to_dense_and_says_why(tiny_ws, tmp_path):
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'out'), tuner_type='lora', target_modules=['q_proj', 'lm_head'],
                              lmbda=0, max_steps=1))
    assert 'the fused loss cannot apply here (the student output head is a' in run.output
    assert 'using the dense loss' in run.output
    assert run.output.count('the fused loss cannot apply here') == 1


@pytest.mark.parametrize('flags,needle', [
    ({'gkd_topk_tail': 'true'}, '--gkd_topk_tail true needs --gkd_logits_topk'),
    ({'gkd_topk_tail': 'true', 'gkd_logits_topk': 4, 'gkd_loss_impl': 'dense'}, 'the dense loss has no tail'),
])
def test_tail_without_its_prerequisites_is_refused(tiny_ws, tmp_path, flags, needle):
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'out'), **flags), check=False, timeout=120)
    assert run.returncode != 0 and needle in run.output
