"""The on-policy remedies of issue 36 through the real ``swift rlhf`` on the tiny models (docs_en/onpolicy_remedies.md):
ms-swift's ``--top_k`` / ``--top_p`` reach the transformers sampler (the vLLM sampler: tests/test_vllm.py),
``--gkd_rollout_max_tokens`` cuts the student's samples and nothing else, and ``--gkd_entropy_fkl_threshold`` adds
exactly ``KL(teacher || student)`` at the gated positions in the dense and fused losses."""
import json
import os

import pytest
import torch
from conftest import base_args, run_swift

PROBE = os.path.join(os.path.dirname(__file__), 'multi_turn_plugin.py')  # GKD_TEST_TRAJ_LOG: samples and batches
ONE_ROW = dict(per_device_train_batch_size=1, learning_rate=1e-3, lr_scheduler_type='constant', warmup_ratio=0,
               seed=5, max_completion_length=8)


def probed_run(tiny_ws, out, **flags):
    """A run whose samples and batches the probe logs next to its output folder (read by :func:`with_records`)."""
    return run_swift(base_args(tiny_ws, out, external_plugins=PROBE, **ONE_ROW, **flags),
                     env={'GKD_TEST_TRAJ_LOG': out + '.jsonl'})


def with_records(run):
    with open(run.output_dir + '.jsonl') as f:
        records = [json.loads(line) for line in f]
    run.samples = [r for r in records if r['kind'] == 'samples']
    run.batches = [r for r in records if r['kind'] == 'batch']
    return run


def argmax_agreement(student_dir: str, batch: dict) -> float:
    """The fraction of the micro-batch's response tokens that are the student's argmax after their prefix (the
    initial student: the batch of step 1, one row, no padding)."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(student_dir, torch_dtype=torch.float64).eval()
    ids, labels = torch.tensor(batch['input_ids']), torch.tensor(batch['labels'])
    assert ids.shape[0] == 1
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    response = (labels[0, 1:] != -100).nonzero().squeeze(-1) + 1
    assert response.numel() > 0
    return float((logits[0, response - 1].argmax(-1) == ids[0, response]).double().mean())


class _Runs:
    """``runs[key]``: the shared run ``name(key)`` (started on first read, once per session), ``then`` applied."""

    def __init__(self, shared, name=str, then=lambda run: run):
        self.shared, self.name, self.then = shared, name, then

    def __getitem__(self, key):
        return self.then(self.shared[self.name(key)])


@pytest.fixture(scope='module')
def sampling_runs(tiny_ws, shared_runs):
    """One on-policy step each: no filter (the control), --top_k 1, --top_p 0.001 (both keep the argmax only), and
    --top_k 1 with --gkd_rollout_max_tokens 3."""
    flags = {'control': {}, 'top_k': dict(top_k=1), 'top_p': dict(top_p=0.001),
             'budget': dict(top_k=1, gkd_rollout_max_tokens=3)}
    starts = {name: (lambda extra: lambda out: probed_run(tiny_ws, out, lmbda=1, max_steps=1, **extra))(extra)
              for name, extra in flags.items()}
    return _Runs(shared_runs('rollout_filters', starts), then=with_records)


@pytest.mark.parametrize('name', ['top_k', 'top_p'])
def test_rollout_filters_reach_the_transformers_sampler(sampling_runs, tiny_ws, name):
    """With a filter that keeps the most likely token only, every sampled token is the student's argmax; without it
    the tiny student's samples are not (the check can fail)."""
    assert argmax_agreement(tiny_ws.student, sampling_runs[name].batches[0]) == 1.0
    assert argmax_agreement(tiny_ws.student, sampling_runs['control'].batches[0]) < 0.75


def test_rollout_budget_stops_the_students_samples(sampling_runs):
    run = sampling_runs['budget']
    lengths = [len(ids) for s in run.samples for ids in s['response_token_ids']]
    assert lengths and max(lengths) == 3  # the tiny models never stop on their own: every sample hits the budget
    full = [len(ids) for s in sampling_runs['top_k'].samples for ids in s['response_token_ids']]
    assert max(full) == 8  # --max_completion_length without the budget
    # the same greedy tokens, cut: the budget changes where sampling stops, not what is sampled
    assert run.samples[0]['response_token_ids'][0] == sampling_runs['top_k'].samples[0]['response_token_ids'][0][:3]


def test_rollout_budget_leaves_seq_kd_samples_whole(tiny_ws, tmp_path):
    """lmbda 0.5 with seq_kd: the teacher's samples keep --max_completion_length, the student's stop at the budget."""
    run = with_records(probed_run(tiny_ws, str(tmp_path / 'mixed'), lmbda=0.5, seq_kd='true', max_steps=6,
                                  gkd_rollout_max_tokens=3))
    by_mode = {}
    for s in run.samples:
        by_mode.setdefault(s['mode'], []).extend(len(ids) for ids in s['response_token_ids'])
    assert set(by_mode) == {'Mode.ON_POLICY', 'Mode.SEQ_KD'}, by_mode
    assert max(by_mode['Mode.ON_POLICY']) == 3 and max(by_mode['Mode.SEQ_KD']) == 8


@pytest.fixture(scope='module')
def entropy_mix_runs(tiny_ws, shared_runs):
    """One on-policy step per loss: reverse KL, forward KL, and reverse KL with the entropy-aware mix at threshold 0
    (every position gated: RKL + FKL) and past log V (none), dense and fused. Step 1's samples and weights are the
    same in every run (same seed), so the losses must add up."""
    def start(impl, flags):
        return lambda out: run_swift(base_args(tiny_ws, out, lmbda=1, max_steps=1, gkd_loss_impl=impl, **ONE_ROW,
                                               **flags))
    starts = {f'{impl}_{name}': start(impl, flags) for impl in ('dense', 'fused')
              for name, flags in {'rkl': dict(beta=1), 'fkl': dict(beta=0),
                                  'mix_all': dict(beta=1, gkd_entropy_fkl_threshold=0),
                                  'mix_none': dict(beta=1, gkd_entropy_fkl_threshold=100)}.items()}
    return _Runs(shared_runs('entropy_mix', starts), name=lambda key: f'{key[0]}_{key[1]}')


@pytest.mark.parametrize('impl', ['dense', 'fused'])
def test_entropy_aware_mix_adds_forward_kl_where_gated(entropy_mix_runs, impl):
    loss = {name: entropy_mix_runs[impl, name].logs[0]['loss'] for name in ('rkl', 'fkl', 'mix_all', 'mix_none')}
    assert loss['mix_all'] == pytest.approx(loss['rkl'] + loss['fkl'], rel=1e-5)
    assert loss['mix_none'] == pytest.approx(loss['rkl'], rel=1e-6)
    assert loss['fkl'] > 1e-3  # the sum is not trivially the same number
    assert 'KL(t||s) where H(t) > 0' in entropy_mix_runs[impl, 'mix_all'].output  # the divergence line names it
    # gkd/entropy_fkl_fraction: every position gated, none, and no such metric without the mix
    assert entropy_mix_runs[impl, 'mix_all'].logs[0]['gkd/entropy_fkl_fraction'] == 1.0
    assert entropy_mix_runs[impl, 'mix_none'].logs[0]['gkd/entropy_fkl_fraction'] == 0.0
    assert 'gkd/entropy_fkl_fraction' not in entropy_mix_runs[impl, 'rkl'].logs[0]


def test_entropy_aware_mix_is_the_same_in_both_loss_paths(entropy_mix_runs):
    dense, fused = entropy_mix_runs['dense', 'mix_all'].logs[0], entropy_mix_runs['fused', 'mix_all'].logs[0]
    assert dense['loss'] == pytest.approx(fused['loss'], rel=1e-4)
