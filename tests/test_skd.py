"""--gkd_sampling_temperature and speculative KD (--gkd_skd_top_k) through the real ``swift rlhf`` on tiny models."""
import json
import os
import re
from types import SimpleNamespace

import pytest
from conftest import RL_REWARD_PLUGIN, base_args, run_swift

from swift_gkd_plugin.options.flags import TEMPERATURE_FLOOR, check_declared, check_sampling_flags, sampling_temperature

VOCAB = 448  # the tiny models' vocabulary (tests/test_activation_and_bad_input.py checks it too)
# on-policy steps only, completions long enough for several draft blocks (SKD drafts 8 tokens at a time), the same
# prompts in every run (data_seed) whatever the sampling seed
# the random tiny models' logits are nearly flat: two samplers that draw from different random streams agree on the
# argmax only when the temperature is far below the gaps between their top logits
GREEDY = 1e-6
ON_POLICY = dict(lmbda=1, max_steps=2, max_completion_length=20, log_completions='true', seed=3, data_seed=7)


def lora(ws, adapters):
    """A LoRA student on the teacher's base (one copy of the weights), its adapter non-zero from the start."""
    return dict(tuner_type='lora', lora_dropout=0, teacher_model=ws.student, adapters=adapters['student_start'])


def _start(ws, **flags):
    return lambda out: run_swift(base_args(ws, out, **dict(ON_POLICY, **flags)))


@pytest.fixture(scope='module')
def runs(tiny_ws, shared_runs, tmp_path_factory, adapters, solution_dataset):
    from swift_gkd_plugin.demo import tiny
    one_prompt = tiny.write_dataset(str(tmp_path_factory.mktemp('skd') / 'one_prompt.jsonl'), tiny.make_rows(1) * 16)
    return shared_runs('skd', {
        'plain': _start(tiny_ws),
        # sampling at the loss temperature's floor (0.02) from --temperature, or from the flag beside a loss
        # temperature of 1; the random tiny models' logits are nearly flat, so 0.5 and 0.9 would draw the same tokens
        'cold': _start(tiny_ws, temperature=TEMPERATURE_FLOOR),
        'split_cold': _start(tiny_ws, temperature=1.0, gkd_sampling_temperature=TEMPERATURE_FLOOR),
        # one prompt in every row: greedy samples are all equal, samples at temperature 1 are not
        'one_prompt_greedy': _start(tiny_ws, dataset=one_prompt, temperature=1.0, gkd_sampling_temperature=GREEDY),
        'one_prompt_sampled': _start(tiny_ws, dataset=one_prompt, temperature=TEMPERATURE_FLOOR,
                                     gkd_sampling_temperature=1.0),
        'skd_vocab': _start(tiny_ws, gkd_skd_top_k=VOCAB),
        'skd_top1_greedy': _start(tiny_ws, gkd_skd_top_k=1, gkd_sampling_temperature=GREEDY,
                                  offload_teacher_model='true'),
        'seqkd_greedy': _start(tiny_ws, lmbda=0, seq_kd='true', gkd_sampling_temperature=GREEDY),
        # a LoRA student on the teacher's base, its adapter non-zero from the start: the teacher is the adapter off
        'lora_skd_top1_greedy': _start(tiny_ws, gkd_skd_top_k=1, gkd_sampling_temperature=GREEDY,
                                       **lora(tiny_ws, adapters)),
        'lora_seqkd_greedy': _start(tiny_ws, lmbda=0, seq_kd='true', gkd_sampling_temperature=GREEDY,
                                    **lora(tiny_ws, adapters)),
        # SKD samples scored by rewards, two per prompt, with the policy-gradient term
        'skd_rl': _start(tiny_ws, gkd_skd_top_k=5, dataset=solution_dataset, num_generations=2,
                         reward_funcs='tiny_letter_match', gkd_rl_coef=1, external_plugins=RL_REWARD_PLUGIN,
                         temperature=1.0),
    })


def completions(run):
    """Per logged step: (prompts, completions)."""
    with open(os.path.join(run.output_dir, 'completions.jsonl')) as f:
        tables = [json.loads(line) for line in f]
    assert tables, 'no completions were logged'
    return [(t['prompt'], t['completion']) for t in tables]


def metric(run, name):
    return [row[name] for row in run.logs]


def test_sampling_temperature_is_the_flag_and_unset_is_temperature(runs):
    """Sampling at 0.02 draws the same completions whether 0.02 comes from --temperature (flag unset: ms-swift's
    behaviour) or from --gkd_sampling_temperature beside a loss temperature of 1, and other ones than at 0.9; the
    loss is at its own temperature."""
    cold, split = runs['cold'], runs['split_cold']
    assert 'temperature=0.02, sampling temperature=0.02' in cold.output
    assert 'temperature=1.0, sampling temperature=0.02' in split.output
    assert completions(cold)[0] == completions(split)[0]  # same prompts, same draws at the same temperature
    assert completions(cold)[0] != completions(runs['plain'])[0]  # unset: sampled at --temperature
    assert cold.losses[0] != pytest.approx(split.losses[0], rel=1e-3)


def test_near_zero_sampling_temperature_samples_greedily(runs):
    """Two samples of one prompt: --temperature 1 --gkd_sampling_temperature 1e-6 samples greedily (the two are
    equal), --temperature 0.02 --gkd_sampling_temperature 1 samples at temperature 1 (they differ)."""
    greedy, sampled = completions(runs['one_prompt_greedy']), completions(runs['one_prompt_sampled'])
    assert len(greedy) == len(sampled) == 2
    for (prompts, texts), (_, sampled_texts) in zip(greedy, sampled):
        assert len(set(prompts)) == 1 and len(texts) == 2
        assert texts[0] == texts[1], texts
        assert sampled_texts[0] != sampled_texts[1], sampled_texts


def test_skd_with_k_vocab_replaces_nothing_and_is_plain_on_policy_sampling(runs):
    """K = the vocabulary accepts every token: the same completions and losses as plain on-policy sampling with
    the same seed (the student's draws are the plain sampler's, draw for draw), over several draft blocks."""
    plain, skd = runs['plain'], runs['skd_vocab']
    assert completions(skd) == completions(plain)
    assert skd.losses == plain.losses
    assert metric(skd, 'gkd/skd_replaced_fraction') == [0.0, 0.0]
    assert all(r >= 2 for r in metric(skd, 'gkd/skd_rounds'))  # 20 tokens in blocks of 8: verified in >= 2 rounds
    assert all(m['mode'] == 'on_policy' for m in skd.modes())


def test_skd_top1_near_greedy_is_the_teachers_greedy_decoding(runs):
    """K = 1 with near-greedy sampling: every student token that is not the teacher's argmax is replaced by the
    teacher's (near-)argmax, so the completions are the teacher's greedy ones, as seq_kd samples them at the same
    sampling temperature; most student tokens are replaced."""
    skd, seqkd = runs['skd_top1_greedy'], runs['seqkd_greedy']
    assert completions(skd) == completions(seqkd)
    assert [m['mode'] for m in seqkd.modes()] == ['seq_kd', 'seq_kd']
    replaced = metric(skd, 'gkd/skd_replaced_fraction')
    assert all(0.5 < r <= 1.0 for r in replaced), replaced
    assert all(r > 2 for r in metric(skd, 'gkd/skd_rounds'))  # cut blocks: more rounds than 20 / 8
    assert all(m['mode'] == 'on_policy' for m in skd.modes())


SAMPLING_FLAGS = dict(lmbda=0.5, temperature=0.9, gkd_sampling_temperature=None, gkd_skd_top_k=0, use_vllm=False,
                      teacher_model_server=None, gkd_cross_tokenizer=None, repetition_penalty=1.0,
                      sequence_parallel_size=1)


@pytest.mark.parametrize('changes,message', [
    ({'gkd_sampling_temperature': 0.0}, '--gkd_sampling_temperature must be > 0 (or unset for --temperature), got 0.0'),
    ({'gkd_sampling_temperature': -1.0}, '--gkd_sampling_temperature must be > 0'),
    ({'gkd_skd_top_k': -1}, '--gkd_skd_top_k must be an integer >= 0'),
    ({'gkd_skd_top_k': 25, 'lmbda': 0}, '--gkd_skd_top_k 25 corrects the student\'s samples on on-policy steps, and '
     '--lmbda 0 has none'),
    ({'gkd_skd_top_k': 25, 'use_vllm': True}, '--gkd_skd_top_k 25 is not supported with --use_vllm true: the '
     'teacher verifies the student\'s drafts between decoding steps, which vLLM does not expose. SKD runs in swift '
     'rlhf with transformers sampling (--use_vllm false) and a local teacher (--teacher_model, resident or '
     '--offload_teacher_model; the LoRA student\'s base; --teacher_adapters) or this plugin\'s teacher server '
     '(--teacher_model_server with `swift-gkd serve-teacher`); pass --use_vllm false or --gkd_skd_top_k 0'),
    ({'gkd_skd_top_k': 25, 'gkd_cross_tokenizer': 'uld'}, '--gkd_skd_top_k 25 cannot be combined with '
     '--gkd_cross_tokenizer uld'),
    ({'gkd_skd_top_k': 25, 'repetition_penalty': 1.1}, '--repetition_penalty 1.1'),
    ({'gkd_skd_top_k': 25, 'sequence_parallel_size': 2}, '--sequence_parallel_size 2 (allowed: 1)'),
])
def test_sampling_flag_checks(changes, message):
    """The declared ranges of both sampling flags, then the set-ups SKD cannot run in."""

    def check(args):
        check_declared(args, ('gkd_sampling_temperature', 'gkd_skd_top_k'))
        check_sampling_flags(args)

    check(SimpleNamespace(**SAMPLING_FLAGS))  # the defaults pass
    check(SimpleNamespace(**dict(SAMPLING_FLAGS, gkd_skd_top_k=25, gkd_sampling_temperature=0.5)))
    # a teacher server verifies too (which server: asked before loading, tests/server/test_skd_server.py)
    check(SimpleNamespace(**dict(SAMPLING_FLAGS, gkd_skd_top_k=25, teacher_model_server='http://x:1')))
    with pytest.raises(ValueError, match=re.escape(message)):
        check(SimpleNamespace(**dict(SAMPLING_FLAGS, **changes)))


def test_sampling_temperature_defaults_to_temperature():
    assert sampling_temperature(SimpleNamespace(temperature=0.7, gkd_sampling_temperature=None)) == 0.7
    assert sampling_temperature(SimpleNamespace(temperature=0.7, gkd_sampling_temperature=0.3)) == 0.3


@pytest.mark.parametrize('flags,needles', [
    ({'gkd_sampling_temperature': 0}, ['--gkd_sampling_temperature must be > 0']),
    ({'gkd_skd_top_k': 4, 'use_vllm': 'true', 'vllm_mode': 'colocate'},
     ['--gkd_skd_top_k 4 is not supported with --use_vllm true', '--use_vllm false', 'SKD runs in swift rlhf with '
      'transformers sampling']),
    ({'gkd_skd_top_k': 4, 'teacher_model': None, 'teacher_model_type': None},
     ['--gkd_skd_top_k 4 needs a teacher to correct the student', '--teacher_model']),
], ids=['temperature', 'vllm', 'no_teacher'])
def test_bad_skd_input_is_refused_before_any_model_is_loaded(tiny_ws, tmp_path, flags, needles):
    from test_activation_and_bad_input import test_bad_input_is_refused_before_any_model_is_loaded as refused
    refused(tiny_ws, tmp_path, dict(flags, lmbda=1), needles)


def test_skd_on_a_shared_base_verifies_with_the_adapter_off(runs):
    """The LoRA student's adapter is non-zero: its own greedy tokens are not the base's. With K = 1 and near-greedy
    sampling the completions are the base's greedy ones, as seq_kd samples them from the base (adapter off); a
    teacher forward with the adapter on would accept the student's own tokens instead."""
    skd, seqkd = runs['lora_skd_top1_greedy'], runs['lora_seqkd_greedy']
    assert 'Teacher model: base_model with LoRA disabled' in skd.output, skd.output[-3000:]
    assert completions(skd) == completions(seqkd)
    assert all(r > 0.2 for r in metric(skd, 'gkd/skd_replaced_fraction')), skd.logs


def test_skd_combines_with_several_samples_and_rewards(runs):
    run = runs['skd_rl']
    for prompts, texts in completions(run):
        assert len(prompts) == 2 and prompts[0] == prompts[1]  # two samples of one prompt per step
    for row in run.logs:
        assert 0 < row['gkd/skd_replaced_fraction'] <= 1
        for key in ('gkd/pg_loss', 'gkd/reward', 'gkd/distill_loss'):
            assert key in row, sorted(row)


def test_skd_with_several_teacher_servers_is_refused_before_asking_them():
    """Tag-routed teacher servers cannot verify one draft batch: refused by name (no server is asked; the servers that
    can or cannot verify are in tests/server/test_skd_server.py)."""
    from swift_gkd_plugin.swift.setup.teacher_server import check_teacher_servers
    servers = '[{"url": "http://127.0.0.1:9", "tags": ["a"]}, {"url": "http://127.0.0.1:10", "tags": ["b"]}]'
    args = SimpleNamespace(gkd_skd_top_k=5, teacher_model_server=servers)
    with pytest.raises(ValueError, match=re.escape('--gkd_skd_top_k 5 verifies the student\'s drafts on one teacher '
                                                   'server; --teacher_model_server names 2 (routed by tags)')):
        check_teacher_servers(args)
