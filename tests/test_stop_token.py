"""A sampled completion keeps the token that ended it, whatever the pad id (issue 96 item 1).

ms-swift's transformers engine (``swift rlhf`` without vLLM) removes every pad-id token from the generated ids. Where the
pad token is an end token (``pad = eos``: the usual set-up of a model without a pad token; Qwen's ``<|endoftext|>``,
which is both), a completion that stopped lost its stop token, and an answer that was only the stop token vanished:
the student was never trained on where to stop. Two copies of one early-stopping student, one with ``pad = eos``, must
draw, score and train alike: the same sampled ids (the stop token kept), loss and completion statistics."""
import json
import os

import pytest
from conftest import base_args, early_stopper, run_swift

PROBE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'multi_turn_plugin.py')
FLAGS = dict(lmbda=1, per_device_train_batch_size=4, max_completion_length=12, max_steps=2, learning_rate=0, seed=2,
             temperature=1.0, external_plugins=PROBE)


@pytest.fixture(scope='module')
def students(tiny_ws):
    """``pad_differs``, ``pad_is_eos``: the tiny student with its ``<|im_end|>`` output row aimed at its average last
    hidden state (it often stops at once), saved twice; the second copy's tokenizer, config and generation config take
    ``<|im_end|>`` as the pad token. ``plain_pad_is_eos``: the tiny student as built, with that pad token."""
    from transformers import AutoModelForCausalLM
    out = {name: os.path.join(tiny_ws.root, f'stop_token_{name}')
           for name in ('pad_differs', 'pad_is_eos', 'plain_pad_is_eos')}
    if all(os.path.exists(d) for d in out.values()):
        return out
    model, tok = early_stopper(tiny_ws.student, scale=4.0)
    end = tok.convert_tokens_to_ids('<|im_end|>')
    plain = AutoModelForCausalLM.from_pretrained(tiny_ws.student)
    model.save_pretrained(out['pad_differs'])
    tok.save_pretrained(out['pad_differs'])
    assert tok.pad_token_id != end
    tok.pad_token = '<|im_end|>'
    model.config.pad_token_id = model.generation_config.pad_token_id = end
    model.save_pretrained(out['pad_is_eos'])
    tok.save_pretrained(out['pad_is_eos'])
    plain.config.pad_token_id = plain.generation_config.pad_token_id = end
    plain.save_pretrained(out['plain_pad_is_eos'])
    tok.save_pretrained(out['plain_pad_is_eos'])
    return out


def _sampled(run):
    with open(run.output_dir + '.jsonl') as f:
        return [r['response_token_ids'] for r in map(json.loads, f) if r['kind'] == 'samples']


@pytest.mark.parametrize('mode', ['on_policy', 'seq_kd'])
def test_a_stop_token_that_is_the_pad_token_is_kept(tiny_ws, students, tmp_path, mode):
    """On-policy (the early-stopping student samples) and seq_kd (the early stopper is the teacher, sampling through
    the student's engine and template, whose pad token decides): with pad = eos the same ids are drawn, the stop token
    kept, and the run trains alike."""
    from transformers import AutoTokenizer
    if mode == 'on_policy':
        models = {name: dict(model=students[name]) for name in ('pad_differs', 'pad_is_eos')}
        flags = FLAGS
    else:
        models = {'pad_differs': dict(model=tiny_ws.student), 'pad_is_eos': dict(model=students['plain_pad_is_eos'])}
        for m in models.values():
            m['teacher_model'] = students['pad_differs']
        flags = dict(FLAGS, lmbda=0, seq_kd='true')
    runs = {}
    for name, model in models.items():
        out = str(tmp_path / name)
        runs[name] = run_swift(base_args(tiny_ws, out, **model, **flags), env={'GKD_TEST_TRAJ_LOG': out + '.jsonl'})
    end = AutoTokenizer.from_pretrained(students['pad_differs']).convert_tokens_to_ids('<|im_end|>')
    drawn = {name: _sampled(run) for name, run in runs.items()}
    assert drawn['pad_is_eos'] == drawn['pad_differs'], drawn
    completions = [ids for batch in drawn['pad_differs'] for ids in batch]
    assert any(ids == [[end]] or ids == [end] for ids in completions), completions  # answers of the stop token alone
    reference, other = runs['pad_differs'].logs, runs['pad_is_eos'].logs
    assert len(reference) == len(other) == 2
    for a, b in zip(reference, other):
        for key in ('loss', 'gkd/completion_length', 'gkd/clipped_ratio'):
            assert b[key] == pytest.approx(a[key], rel=1e-6), (key, reference, other)


@pytest.mark.parametrize('ids,reason,pad,stop_words,restored', [
    ([5, 6], 'stop', 2, (), [5, 6, 2]),  # stopped on the pad token, which the engine removed
    ([], 'stop', 2, (), [2]),  # an answer that was only the stop token
    ([5, 6], 'length', 2, (), [5, 6]),  # cut at the limit: nothing was removed at its end
    ([5, 2], 'stop', 2, (), [5, 2]),  # (an engine that kept it)
    ([5, 3], 'stop', 2, (), [5, 3]),  # ended on another end token, kept
    ([5, 6], 'stop', 7, (), [5, 6]),  # the pad token is no end token: the engine removed no stop token
    ([5, 6], 'stop', 2, ('b',), [5, 6]),  # ended on a stop word ('a b' decoded)
    (None, 'stop', 2, (), None),  # no ids asked for
])
def test_restore_stop_token(ids, reason, pad, stop_words, restored):
    from swift_gkd_plugin.swift.rollout.stop_token import restore_stop_token
    before = None if ids is None else list(ids)
    changed = restore_stop_token(ids, reason, pad_id=pad, end_ids={2, 3}, stop_words=stop_words,
                                 decode=lambda t: 'a b')
    assert ids == restored
    assert changed == (restored != before)
