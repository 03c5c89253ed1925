"""Tests of the offline fixtures in ``swift_gkd_plugin.demo.tiny`` (tokenizer, models, task, training, score)."""
from __future__ import annotations

import filecmp
import json
import os

import pytest
import torch

from swift_gkd_plugin.demo import tiny


@pytest.fixture(scope='module')
def tok_dir(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp('tiny_tok'))
    tiny.build_tokenizer(path)
    return path


@pytest.fixture(scope='module')
def tok(tok_dir):
    return tiny.load_tokenizer(tok_dir)


# ---------------------------------------------------------------------------------------------------- tokenizer


def test_tokenizer_special_tokens_and_size(tok):
    assert 300 <= len(tok) <= 600
    assert len(tok) % 8 != 0  # models round their vocab up: lm_head larger than the tokenizer
    assert [tok.convert_tokens_to_ids(t) for t in tiny.SPECIAL_TOKENS] == [0, 1, 2]
    assert tok.eos_token == '<|im_end|>' and tok.eos_token_id == 2
    assert tok.pad_token == '<|endoftext|>' and tok.pad_token_id == 0
    for t in tiny.SPECIAL_TOKENS + tiny.EXTRA_TOKENS:
        assert tok.encode(t, add_special_tokens=False) == [tok.convert_tokens_to_ids(t)]
    # no BOS/EOS added automatically
    assert tok.encode('user', add_special_tokens=True) == tok.encode('user', add_special_tokens=False)


def test_tokenizer_round_trips_task_strings_compactly(tok):
    rows = tiny.make_rows(200, seed=3, split='train') + tiny.make_rows(50, seed=3, split='test')
    for row in rows:
        q, a = row['messages'][0]['content'], row['messages'][1]['content']
        for text in (q, a):
            ids = tok.encode(text, add_special_tokens=False)
            assert tok.decode(ids) == text
        n_symbols = len(a.split())
        assert len(tok.encode(a, add_special_tokens=False)) == n_symbols  # one token per letter
        assert len(tok.encode(q, add_special_tokens=False)) == n_symbols + 2  # 'Reverse', ':', letters
    text = '<|im_start|>user\nHello world! <think>x</think><|im_end|>\n'
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_chat_template_is_chatml_and_matches_encode_row(tok):
    row = tiny.make_rows(1, seed=0)[0]
    q, a = row['messages'][0]['content'], row['messages'][1]['content']
    text = tok.apply_chat_template(row['messages'], tokenize=False)
    assert text == f'<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n{a}<|im_end|>\n'
    prompt = tok.apply_chat_template(row['messages'][:1], tokenize=False, add_generation_prompt=True)
    assert prompt == f'<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n'
    with_system = tok.apply_chat_template([{'role': 'system', 'content': 'S'}] + row['messages'], tokenize=False)
    assert with_system.startswith('<|im_start|>system\nS<|im_end|>\n<|im_start|>user\n')

    enc = tiny.encode_row(tok, row)
    assert enc['input_ids'] == tok.encode(text, add_special_tokens=False)  # piecewise == whole-string tokenization
    p = enc['prompt_len']
    assert enc['input_ids'][:p] == tok.encode(prompt, add_special_tokens=False)
    assert enc['labels'][:p] == [-100] * p and enc['labels'][p:] == enc['input_ids'][p:]
    assert tok.decode(enc['input_ids'][p:p + enc['score_len']]) == a + '<|im_end|>'


def test_tokenizer_is_deterministic(tok_dir, tmp_path):
    other = str(tmp_path / 'tok2')
    tiny.build_tokenizer(other)
    names = sorted(os.listdir(tok_dir))
    assert names == sorted(os.listdir(other)) and 'tokenizer.json' in names
    for name in names:
        assert filecmp.cmp(os.path.join(tok_dir, name), os.path.join(other, name), shallow=False), name


# ---------------------------------------------------------------------------------------------------- models


def _state(model_dir):
    from safetensors.torch import load_file
    return load_file(os.path.join(model_dir, 'model.safetensors'))


def test_model_same_seed_same_weights(tok, tmp_path):
    a = tiny.build_model(str(tmp_path / 'a'), tok, seed=7)
    b = tiny.build_model(str(tmp_path / 'b'), tok, seed=7)
    c = tiny.build_model(str(tmp_path / 'c'), tok, seed=8)
    sa, sb, sc = _state(a), _state(b), _state(c)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa['model.embed_tokens.weight'], sc['model.embed_tokens.weight'])
    assert all(v.dtype == torch.float32 for v in sa.values())
    assert 'lm_head.weight' in sa  # untied


def test_model_config_and_files(tok, tmp_path):
    d = tiny.build_model(str(tmp_path / 'm'), tok, seed=0)
    for name in ('config.json', 'generation_config.json', 'model.safetensors', 'tokenizer.json',
                 'tokenizer_config.json'):
        assert os.path.isfile(os.path.join(d, name)), name
    with open(os.path.join(d, 'config.json')) as f:
        cfg = json.load(f)
    assert cfg['model_type'] == 'qwen3'
    assert cfg['vocab_size'] % 8 == 0 and len(tok) < cfg['vocab_size'] < len(tok) + 8
    assert cfg['tie_word_embeddings'] is False and cfg['max_position_embeddings'] == 512
    assert (cfg['eos_token_id'], cfg['pad_token_id'], cfg['bos_token_id']) == (2, 0, 0)
    assert tiny.count_parameters(d) < 300_000
    model = tiny.load_model(d)
    assert model.get_output_embeddings().weight.shape[0] == cfg['vocab_size']


def test_moe_model_builds_and_runs(tok, tmp_path):
    d = tiny.build_model(str(tmp_path / 'moe'), tok, seed=0, moe=True)
    with open(os.path.join(d, 'config.json')) as f:
        cfg = json.load(f)
    assert cfg['model_type'] == 'qwen3_moe' and cfg['num_experts_per_tok'] == 2
    model = tiny.load_model(d)
    ids = torch.tensor([tiny.encode_row(tok, tiny.make_rows(1)[0])['input_ids']])
    assert model(input_ids=ids).logits.shape == (1, ids.shape[1], cfg['vocab_size'])


# ---------------------------------------------------------------------------------------------------- task


def test_rows_format_deterministic_and_disjoint():
    train = tiny.make_rows(2000, seed=0, split='train')
    test = tiny.make_rows(200, seed=0, split='test')
    assert train == tiny.make_rows(2000, seed=0, split='train')
    assert tiny.make_rows(10, seed=0, split='train') == train[:10]
    for row in train[:50] + test[:50]:
        user, assistant = row['messages']
        assert user['role'] == 'user' and assistant['role'] == 'assistant'
        assert assistant['content'] == tiny.solve(user['content'])
    prompts_train = {r['messages'][0]['content'] for r in train}
    prompts_test = {r['messages'][0]['content'] for r in test}
    assert len(prompts_train) == 2000 and len(prompts_test) == 200
    assert not prompts_train & prompts_test
    # other seeds cannot leak either: the split is a function of the prompt
    assert not {r['messages'][0]['content'] for r in tiny.make_rows(500, seed=5, split='train')} & prompts_test
    with pytest.raises(ValueError):
        tiny.make_rows(10_000, split='test')
    with pytest.raises(ValueError):
        tiny.make_rows(1, split='valid')


def test_write_and_read_dataset(tmp_path):
    rows = tiny.make_rows(5, seed=1)
    path = tiny.write_dataset(str(tmp_path / 'd' / 'x.jsonl'), rows)
    assert tiny.read_dataset(path) == rows
    with open(path) as f:
        assert len(f.read().splitlines()) == 5


# ---------------------------------------------------------------------------------------------------- training / score


def test_training_beats_untrained_on_held_out_rows(tok, tmp_path):
    """A student-size model trained for 60 steps (~2 s) scores far above its untrained self on unseen prompts.

    Measured with seeds 0/1: untrained ~0.00-0.01, trained 0.82-0.91 (teacher size: 1.0 after 200 steps).
    """
    train = tiny.make_rows(2000, seed=0, split='train')
    test = tiny.make_rows(200, seed=0, split='test')
    d = tiny.build_model(str(tmp_path / 'm'), tok, seed=0)
    untrained = tiny.score(d, None, test)
    assert untrained == tiny.score(d, None, test)  # deterministic
    assert untrained < 0.1
    stats = tiny.train_teacher(d, train, steps=60, seed=0)
    assert stats['steps'] == 60 and stats['final_loss'] < stats['initial_loss']
    trained = tiny.score(d, None, test)  # reloaded from disk: saved in place
    assert trained >= untrained + 0.5, (untrained, trained)
    model = tiny.load_model(d)
    assert tiny.score(model, tok, test) == trained
    assert 0.0 <= tiny.exact_match(model, tok, test[:20]) <= 1.0


def test_demo_workspace_is_cached(tmp_path):
    root = str(tmp_path / 'ws')
    kwargs = dict(n_train=64, n_test=16, teacher_steps=2)
    ws = tiny.build_demo_workspace(root, **kwargs)
    assert not ws['reused']
    for key in ('teacher', 'student', 'tokenizer'):
        assert os.path.isfile(os.path.join(ws[key], 'tokenizer.json'))
    assert len(tiny.read_dataset(ws['train'])) == 64 and len(tiny.read_dataset(ws['test'])) == 16
    assert ws['teacher_parameters'] > ws['student_parameters']
    assert 0.0 <= ws['teacher_score'] <= 1.0
    mtime = os.path.getmtime(os.path.join(ws['teacher'], 'model.safetensors'))
    again = tiny.build_demo_workspace(root, **kwargs)
    assert again['reused'] and again['teacher_score'] == ws['teacher_score']
    assert os.path.getmtime(os.path.join(ws['teacher'], 'model.safetensors')) == mtime
    changed = tiny.build_demo_workspace(root, **dict(kwargs, n_test=8))
    assert not changed['reused'] and len(tiny.read_dataset(changed['test'])) == 8


def test_sentencepiece_tokenizer_is_another_family_that_models_load_with(tok, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from swift_gkd_plugin.core.cross_tokenizer.alignment import align_positions, shared_vocabulary, tokenize_with_spans
    sp_dir = tiny.build_model(str(tmp_path / 'sp_model'), tiny.build_sentencepiece_tokenizer(str(tmp_path / 'sp')))
    sp_tok, model = AutoTokenizer.from_pretrained(sp_dir), AutoModelForCausalLM.from_pretrained(sp_dir)
    assert len(sp_tok) == 600 != len(tok) and model.config.vocab_size == 600
    text = 'Reverse: a b c d, naïve 你好\n'
    assert sp_tok.decode(sp_tok(text)['input_ids']) == text
    assert '<0xE4>' in sp_tok.convert_ids_to_tokens(sp_tok(text)['input_ids'])  # byte fallback
    messages = [{'role': 'user', 'content': 'Reverse: a b'}]
    assert sp_tok.apply_chat_template(messages, tokenize=False) == tok.apply_chat_template(messages, tokenize=False)
    # the two families share the ChatML tokens and ' a' (Ġa / ▁a), and align on the task text
    pairs = set(zip(*(ids.tolist() for ids in shared_vocabulary(tok.get_vocab(), sp_tok.get_vocab()))))
    assert (tok.convert_tokens_to_ids('<|im_end|>'), sp_tok.convert_tokens_to_ids('<|im_end|>')) in pairs
    assert (tok.convert_tokens_to_ids('\u0120a'), sp_tok.convert_tokens_to_ids('\u2581a')) in pairs
    alignment = align_positions(tokenize_with_spans(tok, text)[1], tokenize_with_spans(sp_tok, text)[1])
    assert alignment.exact_fraction > 0.5
    with torch.no_grad():
        assert model(**sp_tok(text, return_tensors='pt')).logits.shape[-1] == 600
