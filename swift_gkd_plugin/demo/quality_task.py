"""A task whose free-running answers are checkable exactly, and the metrics of the quality benchmark.

Shared by ``benchmarks/bench_quality.py``, ``swift-gkd demo`` and the tests.  Imports only torch, transformers and
:mod:`.tiny` (never ms-swift).

The task: *sort eight distinct letters, either way*
---------------------------------------------------
The user message is ``"Sort: k c a m f h b p"`` (:data:`NUM_SYMBOLS` distinct letters of :data:`SYMBOLS`, in random
order).  A right answer lists the same letters sorted, ascending (``"a b c f h k m p"``) or descending
(``"p m k h f c b a"``): the checker accepts exactly these two strings.  Each dataset row's reference picks one
direction at random, so the references are diverse the way human references are (two right answers, no single
"gold" one), while the teacher, trained on them, is a model of that two-mode distribution.  The answer is 8 letter
tokens plus ``<|im_end|>``; every output letter depends on the input set and on the letters already written, so an
early mistake (a skipped or repeated letter, a change of direction) derails the rest.

Train and test prompts are disjoint by construction: a prompt's split is a hash of its *set* of letters
(:func:`split_of`), so no held-out prompt shares its letters with any training prompt, in any order.
"""
from __future__ import annotations

import json
import os
import random
import zlib
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from swift_gkd_plugin.demo import tiny

__all__ = [
    'SYMBOLS', 'NUM_SYMBOLS', 'PROMPT_PREFIX', 'split_of', 'valid_answers', 'is_correct', 'make_rows',
    'token_accuracy', 'answer_metrics', 'agreement', 'generate_answers', 'evaluate',
    'xtok_corpus', 'build_xtok_teacher',
]

#: Alphabet (each ``' x'`` is one token of :func:`tiny.build_tokenizer`'s vocabulary).
SYMBOLS: str = 'abcdefghijklmnop'
#: Letters per prompt (C(16, 8) = 12,870 letter sets, about 2,570 of them held out).
NUM_SYMBOLS: int = 8
PROMPT_PREFIX: str = 'Sort: '
_TEST_MODULUS: int = 5


def split_of(letters: Sequence[str]) -> str:
    """``'test'`` or ``'train'``: a pure function of the *set* of letters (CRC32 of them sorted), about 1/5 test."""
    return 'test' if zlib.crc32(''.join(sorted(letters)).encode('utf-8')) % _TEST_MODULUS == 0 else 'train'


def _letters_of(prompt: str) -> List[str]:
    if not prompt.startswith(PROMPT_PREFIX):
        raise ValueError(f'not a task prompt: {prompt!r}')
    return prompt[len(PROMPT_PREFIX):].split()


def valid_answers(prompt: str) -> Tuple[str, str]:
    """The two right answers of a prompt: ascending and descending order."""
    letters = sorted(_letters_of(prompt))
    return ' '.join(letters), ' '.join(reversed(letters))


def is_correct(prompt: str, answer: str) -> bool:
    """True iff ``answer`` (surrounding whitespace ignored) is one of :func:`valid_answers`."""
    return answer.strip() in valid_answers(prompt)


def make_rows(n: int, seed: int = 0, split: str = 'train') -> List[Dict[str, Any]]:
    """``n`` rows with distinct prompts of one split, in ms-swift's ``messages`` format.

    The reference of each row is ascending or descending with probability 1/2 each (drawn from the same seeded
    RNG), so the dataset holds both right answers in equal measure.  Deterministic in ``(n, seed, split)``.
    """
    return distinct_rows(n, f'quality-task:{seed}:{split}', split, lambda rng: rng.sample(SYMBOLS, NUM_SYMBOLS),
                         split_of, lambda letters, rng: sorted(letters, reverse=rng.random() < 0.5), PROMPT_PREFIX)


def distinct_rows(n: int, rng_key: str, split: str, draw, split_of_letters, answer, prefix: str
                  ) -> List[Dict[str, Any]]:
    """``n`` rows of distinct letter sequences ``draw(rng)`` whose ``split_of_letters`` is ``split``; the reply is
    ``answer(letters, rng)`` (letters), the prompt ``prefix`` + the letters.  Shared by the tasks' ``make_rows``."""
    if split not in ('train', 'test'):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    rng = random.Random(rng_key)
    rows: List[Dict[str, Any]] = []
    seen = set()
    while len(rows) < n:
        letters = draw(rng)
        if split_of_letters(letters) != split or tuple(letters) in seen:
            continue
        seen.add(tuple(letters))
        rows.append({'messages': [{'role': 'user', 'content': prefix + ' '.join(letters)},
                                  {'role': 'assistant', 'content': ' '.join(answer(letters, rng))}]})
    return rows


def prompt_of(row: Dict[str, Any]) -> str:
    return row['messages'][0]['content']


# ---------------------------------------------------------------------------------------------------- metrics


def token_accuracy(prompt: str, answer: str) -> float:
    """Per-token accuracy of a generated answer: position-wise matches against the closer right answer.

    Positions are letters (whitespace-separated); a missing or surplus letter counts as wrong, so the denominator
    is the longer of the two lengths.  1.0 iff :func:`is_correct`.
    """
    got = answer.split()
    best = 0.0
    for ref in valid_answers(prompt):
        want = ref.split()
        hits = sum(g == w for g, w in zip(got, want))
        best = max(best, hits / max(len(want), len(got)))
    return best


def agreement(answers_a: Sequence[str], answers_b: Sequence[str]) -> float:
    """Fraction of prompts on which two models generated the same answer (whitespace-normalised)."""
    if len(answers_a) != len(answers_b):
        raise ValueError('both answer lists must cover the same prompts')
    if not answers_a:
        return 0.0
    return sum(' '.join(a.split()) == ' '.join(b.split()) for a, b in zip(answers_a, answers_b)) / len(answers_a)


def answer_metrics(prompts: Sequence[str], answers: Sequence[str]) -> Dict[str, float]:
    """``exact_match`` (fraction of right answers) and ``token_accuracy`` (mean of :func:`token_accuracy`)."""
    n = max(1, len(prompts))
    return {
        'exact_match': sum(is_correct(p, a) for p, a in zip(prompts, answers)) / n,
        'token_accuracy': sum(token_accuracy(p, a) for p, a in zip(prompts, answers)) / n,
    }


# ---------------------------------------------------------------------------------------------------- generation


@torch.no_grad()
def generate_answers(model_or_dir, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 12,
                     batch_size: int = 256, num_threads: Optional[int] = None) -> List[str]:
    """Greedy free-running answers, batched (left padding) through ``generate`` with a KV cache.

    Prompts are rendered like ms-swift's ``qwen3_nothinking`` template (:func:`tiny.encode_row`); decoding stops
    at ``<|im_end|>``/``<|endoftext|>``; special tokens are dropped from the returned text.
    """
    model, tokenizer = tiny._load_for_eval(model_or_dir, tokenizer)
    was_training = model.training
    model.eval()
    pad = tokenizer.pad_token_id
    stop = [tokenizer.convert_tokens_to_ids('<|im_end|>'), pad]
    answers: List[str] = []
    try:
        with tiny._Threads(num_threads or 1), tiny._Quiet():
            for i in range(0, len(prompts), batch_size):
                encoded = [tokenizer.encode(tiny._render_prompt([{'role': 'user', 'content': p},
                                                                 {'role': 'assistant', 'content': ''}])[0],
                                            add_special_tokens=False) for p in prompts[i:i + batch_size]]
                width = max(map(len, encoded))
                ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded])
                mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])
                out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                     do_sample=False, eos_token_id=stop, pad_token_id=pad, use_cache=True)
                answers += tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    finally:
        model.train(was_training)
    return [a.strip() for a in answers]


def evaluate(model_or_dir, tokenizer, rows: Sequence[Dict[str, Any]],
             reference_answers: Optional[Sequence[str]] = None, task=None) -> Dict[str, Any]:
    """All metrics of one model on ``rows``: exact match, token accuracy, teacher-forced next-token accuracy
    (:func:`tiny.score` against the rows' references) and, given the teacher's answers, agreement with them.
    ``answers`` (the generated texts) come back too.  ``task``: an object with ``answer_metrics`` (such as
    :class:`.capacity_task.CapacityTask`); default the sorting task of this module."""
    prompts = [prompt_of(r) for r in rows]
    answers = generate_answers(model_or_dir, tokenizer, prompts)
    result: Dict[str, Any] = dict((task.answer_metrics if task is not None else answer_metrics)(prompts, answers))
    result['next_token_accuracy'] = tiny.score(model_or_dir, tokenizer, rows)
    if reference_answers is not None:
        result['teacher_agreement'] = agreement(answers, reference_answers)
    result['answers'] = answers
    return result


# ---------------------------------------------------------------------------------------------------- workspace

#: Model sizes of the benchmark: the student has about a third of the teacher's parameters.
TEACHER_KWARGS: Dict[str, int] = dict(tiny.TEACHER_KWARGS)
STUDENT_KWARGS: Dict[str, int] = dict(tiny.STUDENT_KWARGS)
_MARKER = 'quality_workspace.json'
_VERSION = 1


def build_workspace(root: str, *, seed: int = 0, n_train: int = 4000, n_test: int = 200, teacher_steps: int = 300,
                    student_steps: int = 60, batch_size: int = 64, log=print, task=None,
                    teacher_kwargs: Optional[Dict[str, int]] = None,
                    student_kwargs: Optional[Dict[str, int]] = None) -> Dict[str, Any]:
    """Build (or reuse) the data, the teacher and the warm-started student under ``root``.

    The teacher (:data:`TEACHER_KWARGS`) and the student (:data:`STUDENT_KWARGS`) are trained with
    :func:`tiny.train_teacher` on the training rows: the teacher for ``teacher_steps``, the student for a short
    ``student_steps`` (the supervised warm start every method begins from).  Each model is cached on its own (a
    marker in its folder records its parameters), so changing the warm start keeps the teacher.  Deterministic from
    ``seed``.  Returns the paths (``tokenizer``, ``teacher``, ``student``, ``train``, ``test``) and the two models'
    metrics on the test rows (``teacher_eval``, ``student_eval``, answers included; ``*_parameters``).

    Another task (``task``: an object with ``make_rows``, ``answer_metrics`` and ``describe``, such as
    :class:`.capacity_task.CapacityTask`) and other model sizes change the cache keys only when given, so the sorting
    task's models stay cached.
    """
    root = os.path.abspath(root)
    data = dict(version=_VERSION, seed=seed, n_train=n_train, n_test=n_test, batch_size=batch_size,
                task=task.describe() if task is not None else dict(symbols=SYMBOLS, num_symbols=NUM_SYMBOLS,
                                                                   prefix=PROMPT_PREFIX))
    rows_of = task.make_rows if task is not None else make_rows
    paths = {k: os.path.join(root, k) for k in ('tokenizer', 'teacher', 'student')}
    paths.update(train=os.path.join(root, 'train.jsonl'), test=os.path.join(root, 'test.jsonl'))
    data_marker = os.path.join(root, 'data.json')  # the data's settings: other settings rewrite the data
    if not all(os.path.exists(paths[k]) for k in ('tokenizer', 'train', 'test')) or _read_json(data_marker) != data:
        os.makedirs(root, exist_ok=True)
        tiny.build_tokenizer(paths['tokenizer'])
        tiny.write_dataset(paths['train'], rows_of(n_train, seed, 'train'))
        tiny.write_dataset(paths['test'], rows_of(n_test, seed, 'test'))
        _write_json(data_marker, data)
    results: Dict[str, Any] = {}
    for name, kwargs, steps, model_seed in (('teacher', teacher_kwargs or TEACHER_KWARGS, teacher_steps, seed),
                                            ('student', student_kwargs or STUDENT_KWARGS, student_steps, seed + 1)):
        params = dict(data, model=kwargs, steps=steps, model_seed=model_seed,
                      teacher=results.get('teacher_params'))  # a new teacher means new teacher answers to agree with
        built = _cached_model(paths[name], params)
        if built is None:
            built = _train_model(paths, name, kwargs, steps, model_seed, batch_size, results, log, task)
            _write_json(os.path.join(paths[name], _MARKER), {'params': params, **built})
        else:
            log(f'reusing the cached {name} in {paths[name]}')
        results.update({f'{name}_eval': built['eval'], f'{name}_parameters': built['parameters'],
                        f'{name}_params': params})
    return {**paths, **results}


#: Upper bound of the other-family tokenizer's vocabulary (bytes, specials and merges; the task's text has fewer).
XTOK_VOCAB_SIZE: int = 600


def xtok_corpus(rows: Sequence[Dict[str, Any]]) -> List[str]:
    """The task's text as the other-family tokenizer learns it: the role names and each message's content, one
    piece of text each (as ms-swift encodes a response on its own), so that the task's words (``▁Sort:``, ``▁a``)
    and the role names get pieces of their own and no piece spans the template's line breaks."""
    return [text for row in rows for m in row['messages'] for text in (m['role'], m['content'])]


def build_xtok_teacher(root: str, *, seed: int = 0, teacher_steps: int = 300, batch_size: int = 64,
                       prefix_space: bool = True, log=print) -> Dict[str, Any]:
    """A teacher of ANOTHER tokenizer family for the workspace that :func:`build_workspace` made under ``root``.

    Its tokenizer is :func:`tiny.build_sentencepiece_tokenizer` (Metaspace BPE with byte fallback, Llama style)
    trained on the workspace's training text (:func:`xtok_corpus`): its own vocabulary and merges, the same ChatML
    special tokens and template.  The model has :data:`TEACHER_KWARGS` and is trained exactly like the
    same-tokenizer teacher (:func:`tiny.train_teacher`, same rows, steps, batch and seed), so the two teachers
    differ in their tokenizer only.  Cached like the other models (``xtok_tokenizer/``, ``xtok_teacher/``; the
    existing models and their cache keys are untouched).  ``prefix_space=False``: a tokenizer that prepends no
    ``▁`` to a text's first word (Gemma style), cached in ``xtok_np_tokenizer/``, ``xtok_np_teacher/``.  Returns
    ``xtok_tokenizer``, ``xtok_teacher``, ``xtok_teacher_eval`` (metrics on the test rows, answers included) and
    ``xtok_teacher_parameters``.
    """
    root = os.path.abspath(root)
    prefix = 'xtok' if prefix_space else 'xtok_np'
    paths = dict(tokenizer=os.path.join(root, f'{prefix}_tokenizer'),
                 xtok_teacher=os.path.join(root, f'{prefix}_teacher'),
                 train=os.path.join(root, 'train.jsonl'), test=os.path.join(root, 'test.jsonl'))
    if not os.path.exists(paths['train']):
        raise FileNotFoundError(f'{paths["train"]} is missing: build the workspace (build_workspace) first')
    params = dict(version=_VERSION, seed=seed, batch_size=batch_size, model=TEACHER_KWARGS, steps=teacher_steps,
                  model_seed=seed, tokenizer=dict(family='sentencepiece', vocab_size=XTOK_VOCAB_SIZE),
                  train=_file_crc(paths['train']),
                  **({} if prefix_space else {'prefix_space': False}))  # the default keeps the first cache key
    built = _cached_model(paths['xtok_teacher'], params)
    if built is None:
        tiny.build_sentencepiece_tokenizer(paths['tokenizer'], XTOK_VOCAB_SIZE,
                                           xtok_corpus(tiny.read_dataset(paths['train'])), prefix_space)
        built = _train_model(paths, 'xtok_teacher', TEACHER_KWARGS, teacher_steps, seed, batch_size, {}, log)
        _write_json(os.path.join(paths['xtok_teacher'], _MARKER), {'params': params, **built})
    else:
        log(f"reusing the cached xtok_teacher in {paths['xtok_teacher']}")
    return {'xtok_tokenizer': paths['tokenizer'], 'xtok_teacher': paths['xtok_teacher'],
            'xtok_teacher_eval': built['eval'], 'xtok_teacher_parameters': built['parameters']}


def _file_crc(path: str) -> int:
    with open(path, 'rb') as f:
        return zlib.crc32(f.read())


def _read_json(path: str) -> Optional[Any]:
    try:
        with open(path, encoding='utf-8') as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _cached_model(model_dir: str, params: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    built = _read_json(os.path.join(model_dir, _MARKER))
    return built if isinstance(built, dict) and built.get('params') == params else None


def _train_model(paths, name, kwargs, steps, model_seed, batch_size, results, log, task=None) -> Dict[str, Any]:
    tokenizer = tiny.load_tokenizer(paths['tokenizer'])
    log(f'training the {name} ({steps} steps of batch {batch_size}) ...')
    tiny.build_model(paths[name], tokenizer, seed=model_seed, **kwargs)
    stats = tiny.train_teacher(paths[name], tiny.read_dataset(paths['train']), steps=steps, batch_size=batch_size,
                               seed=model_seed, log_every=max(1, steps // 4))
    reference = results['teacher_eval']['answers'] if name == 'student' else None
    metrics = evaluate(paths[name], tokenizer, tiny.read_dataset(paths['test']), reference, task)
    log(f"{name}: exact match {metrics['exact_match']:.3f}, {stats['num_parameters']:,} parameters, "
        f"{stats['seconds']:.0f}s")
    return {'eval': metrics, 'parameters': stats['num_parameters']}


def _write_json(path: str, payload: Dict[str, Any]) -> None:
    with open(path + '.tmp', 'w', encoding='utf-8') as f:
        json.dump(payload, f)
    os.replace(path + '.tmp', path)


def reference_exact_match(model_or_dir, tokenizer, rows: Sequence[Dict[str, Any]]) -> float:
    """Fraction of ``rows`` whose greedy free-running answer equals the row's reference (tasks with one right
    answer, such as :mod:`.tiny`'s reversal)."""
    answers = generate_answers(model_or_dir, tokenizer, [prompt_of(r) for r in rows])
    return sum(a == r['messages'][-1]['content'].strip() for a, r in zip(answers, rows)) / max(1, len(rows))
