"""A calculator task for multi-turn tool-use distillation (``bench_quality.py --preset tools``), offline, on CPU.

Imports only torch, transformers, the standard library and :mod:`.tiny` / :mod:`.quality_task` (never ms-swift).

The task: *add two three-digit numbers, with a calculator*
---------------------------------------------------------
The user asks ``"Add: 347 + 598"``.  A tiny model cannot add in its head; the task's trajectory calls the tool:

    user       Add: 347 + 598
    assistant  <calc>347+598</calc>          (a tool call: the whole turn is the call)
    user       = 945                         (the tool's result, :func:`tool_message`)
    assistant  945                           (the final answer: a turn without a tool call)

The tool's result is a ``user`` message, rendered by ms-swift's ``qwen3_nothinking`` template as plain ChatML, the way
:func:`encode_trajectory` renders and tokenizes it (tests/test_tool_task.py compares the two), every assistant turn
a target.  Not role ``tool``: ms-swift 4.6 renders a ``tool`` message after an assistant turn held as token ids (as
its multi-turn rollouts hold the student's turns, the sampled ``<|im_end|>`` included) with a second ``<|im_end|>``,
so the trajectory the trainer encodes would differ from the text the teacher was trained on.

Data: :func:`make_rows` gives the *prompt rows* that the GKD runs read (the user prompt and, as the reference, the
final answer only: ms-swift drops the last assistant message before a rollout, so a row holding the whole trajectory
would make its first turns part of the prompt); :func:`trajectory_row` gives the full reference trajectory, the
teacher's and the warm start's training data.  A prompt's split is a hash of its two numbers (about 1/5 test), so
train and test prompts are disjoint for any seed.

:func:`evaluate` runs the tool loop with greedy generation (at most :data:`MAX_TURNS` assistant turns, like the
scheduler of :mod:`.tool_scheduler`) and reports the success rate (final answer right), the tool-call rate, the
tool-call correctness and the mean number of turns.  :func:`build_workspace` caches the tokenizer
(:func:`build_tokenizer`: digits and call markers one token each), the data, a teacher trained on the reference
trajectories and a smaller student with a short warm start on them.
"""
from __future__ import annotations

import os
import random
import re
import zlib
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from swift_gkd_plugin.demo import quality_task, tiny

__all__ = [
    'PROMPT_PREFIX', 'CALL_OPEN', 'CALL_CLOSE', 'MAX_TURNS', 'split_of', 'operands_of', 'solve', 'is_success',
    'parse_tool_call', 'run_tool', 'tool_message', 'make_rows', 'trajectory_row', 'build_tokenizer', 'render',
    'encode_trajectory', 'rollout', 'trajectory_metrics', 'evaluate', 'build_workspace',
]

PROMPT_PREFIX: str = 'Add: '
CALL_OPEN: str = '<calc>'
CALL_CLOSE: str = '</calc>'
#: Most assistant turns of a trajectory (the benchmark's ``--max_turns``).
MAX_TURNS: int = 3
#: Operands: three-digit numbers.
LOW, HIGH = 100, 999
#: Tokens of one turn at most in the evaluator (a call is 9 tokens, an answer at most 4, then ``<|im_end|>``).
MAX_NEW_TOKENS: int = 16
_TEST_MODULUS = 5
_PROMPT = re.compile(r'^Add: (\d+) \+ (\d+)$')
_CALL = re.compile(re.escape(CALL_OPEN) + r'(.*?)' + re.escape(CALL_CLOSE), re.S)
_EXPRESSION = re.compile(r'^\s*(\d{1,9})\s*([-+*])\s*(\d{1,9})\s*$')


def split_of(a: int, b: int) -> str:
    """``'test'`` or ``'train'``: a pure function of the two operands (CRC32), about 1/5 test."""
    return 'test' if zlib.crc32(f'{a}+{b}'.encode()) % _TEST_MODULUS == 0 else 'train'


def operands_of(prompt: str) -> Tuple[int, int]:
    match = _PROMPT.match(prompt.strip())
    if not match:
        raise ValueError(f'not a task prompt: {prompt!r}')
    return int(match.group(1)), int(match.group(2))


def solve(prompt: str) -> str:
    """The right final answer: the sum, in decimal."""
    a, b = operands_of(prompt)
    return str(a + b)


def is_success(prompt: str, final_answer: Optional[str]) -> bool:
    """True iff the final answer (surrounding whitespace ignored) is the sum; ``None`` (no final answer) fails."""
    return final_answer is not None and final_answer.strip() == solve(prompt)


def parse_tool_call(text: str) -> Optional[str]:
    """The expression of the first ``<calc>...</calc>`` in an assistant message, or ``None`` (a final answer)."""
    match = _CALL.search(text)
    return match.group(1) if match else None


def run_tool(expression: str) -> str:
    """The calculator: ``a+b``, ``a-b`` or ``a*b`` of non-negative integers of at most 9 digits (parsed, never
    evaluated as code); anything else gives ``'error'``."""
    match = _EXPRESSION.match(expression)
    if not match:
        return 'error'
    a, op, b = int(match.group(1)), match.group(2), int(match.group(3))
    return str(a + b if op == '+' else a - b if op == '-' else a * b)


def tool_message(expression: str) -> Dict[str, str]:
    """The message that answers a tool call: ``{'role': 'user', 'content': '= <result>'}``."""
    return {'role': 'user', 'content': f'= {run_tool(expression)}'}


def _prompt(a: int, b: int) -> str:
    return f'{PROMPT_PREFIX}{a} + {b}'


def make_rows(n: int, seed: int = 0, split: str = 'train') -> List[Dict[str, Any]]:
    """``n`` prompt rows with distinct operand pairs of one split: ``[user prompt, assistant final answer]``, in
    ms-swift's ``messages`` format.  Deterministic in ``(n, seed, split)``."""
    if split not in ('train', 'test'):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    rng = random.Random(f'tool-task:{seed}:{split}')
    rows, seen = [], set()
    while len(rows) < n:
        a, b = rng.randint(LOW, HIGH), rng.randint(LOW, HIGH)
        if split_of(a, b) != split or (a, b) in seen:
            continue
        seen.add((a, b))
        rows.append({'messages': [{'role': 'user', 'content': _prompt(a, b)},
                                  {'role': 'assistant', 'content': str(a + b)}]})
    return rows


def trajectory_row(row: Dict[str, Any]) -> Dict[str, Any]:
    """The reference trajectory of a prompt row: the call, the tool's result, the answer."""
    prompt = row['messages'][0]['content']
    a, b = operands_of(prompt)
    call = f'{a}+{b}'
    return {'messages': [{'role': 'user', 'content': prompt},
                         {'role': 'assistant', 'content': f'{CALL_OPEN}{call}{CALL_CLOSE}'},
                         tool_message(call),
                         {'role': 'assistant', 'content': solve(prompt)}]}


# ---------------------------------------------------------------------------------------------------- tokenizer

#: Added (non-special) tokens: Qwen3's thinking markers and the call markers.
ADDED_TOKENS: Tuple[str, ...] = (*tiny.EXTRA_TOKENS, CALL_OPEN, CALL_CLOSE)


def build_tokenizer(out_dir: str):
    """:func:`tiny.build_tokenizer`'s byte-level BPE (same corpus, specials, template), with every digit a token of
    its own (Qwen style) and :data:`ADDED_TOKENS` as single tokens.  Deterministic; returns the loaded tokenizer."""
    from tokenizers import AddedToken
    tok = tiny.train_bpe(tiny._tokenizer_corpus(), tiny.SPECIAL_TOKENS, tiny._BPE_VOCAB_SIZE, individual_digits=True)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in ADDED_TOKENS])
    return tiny._save_chatml_tokenizer(tok, out_dir)


# ---------------------------------------------------------------------------------------------------- rendering


def render(messages: Sequence[Dict[str, str]]) -> List[Tuple[str, bool]]:
    """A conversation as ms-swift's ``qwen3_nothinking`` template renders it: ``(text, is_target)`` pieces, the
    targets being each assistant turn's content and its ``<|im_end|>\\n``."""
    pieces: List[Tuple[str, bool]] = []
    for m in messages:
        if m['role'] == 'assistant':
            pieces += [('<|im_start|>assistant\n', False), (m['content'], True), ('<|im_end|>\n', True)]
        else:
            pieces.append((f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n", False))
    return pieces


def _ids(tokenizer, pieces: Sequence[Tuple[str, bool]]) -> Tuple[List[int], List[int]]:
    ids: List[int] = []
    labels: List[int] = []
    for text, target in pieces:
        piece = tokenizer.encode(text, add_special_tokens=False)
        ids += piece
        labels += piece if target else [-100] * len(piece)
    return ids, labels


def encode_trajectory(tokenizer, row: Dict[str, Any]) -> Dict[str, Any]:
    """``input_ids`` and ``labels`` (``-100`` but on the assistant turns) of a trajectory row, each piece of
    :func:`render` tokenized on its own as ms-swift does; the ``encode`` of :func:`tiny.train_teacher`."""
    ids, labels = _ids(tokenizer, render(row['messages']))
    return {'input_ids': ids, 'labels': labels}


def _prompt_ids(tokenizer, messages: Sequence[Dict[str, str]]) -> List[int]:
    """The conversation so far and the next assistant turn's header (what the model continues)."""
    return _ids(tokenizer, render(messages) + [('<|im_start|>assistant\n', False)])[0]


# ---------------------------------------------------------------------------------------------------- tool loop


@torch.no_grad()
def rollout(model_or_dir, tokenizer, prompts: Sequence[str], *, max_turns: int = MAX_TURNS,
            max_new_tokens: int = MAX_NEW_TOKENS, batch_size: int = 256,
            num_threads: Optional[int] = None) -> List[List[Dict[str, str]]]:
    """Greedy trajectories of a model on ``prompts`` through the tool loop: each turn is generated (batched, left
    padding, KV cache) until ``<|im_end|>`` or ``max_new_tokens``; a turn with a tool call gets the tool's result
    as the next message and another turn, unless it ran out of tokens or was turn ``max_turns`` (the rules of
    :class:`.tool_scheduler.CalculatorScheduler`).  Returns each prompt's messages (user first)."""
    model, tokenizer = tiny._load_for_eval(model_or_dir, tokenizer)
    was_training = model.training
    model.eval()
    pad = tokenizer.pad_token_id
    im_end = tokenizer.convert_tokens_to_ids('<|im_end|>')
    trajectories = [[{'role': 'user', 'content': p}] for p in prompts]
    try:
        with tiny._Threads(num_threads or 1), tiny._Quiet():
            active = list(range(len(prompts)))
            for turn in range(1, max_turns + 1):
                still = []
                for i in range(0, len(active), batch_size):
                    chunk = active[i:i + batch_size]
                    encoded = [_prompt_ids(tokenizer, trajectories[j]) for j in chunk]
                    width = max(map(len, encoded))
                    ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded])
                    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])
                    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                         do_sample=False, eos_token_id=[im_end, pad], pad_token_id=pad,
                                         use_cache=True)[:, width:].tolist()
                    for j, new in zip(chunk, out):
                        ended = im_end in new or pad in new
                        text = tokenizer.decode(new, skip_special_tokens=True)
                        trajectories[j].append({'role': 'assistant', 'content': text})
                        call = parse_tool_call(text)
                        if call is not None and ended and turn < max_turns:
                            trajectories[j].append(tool_message(call))
                            still.append(j)
                active = still
    finally:
        model.train(was_training)
    return trajectories


def trajectory_metrics(trajectories: Sequence[Sequence[Dict[str, str]]]) -> Dict[str, float]:
    """``success`` (the last assistant turn has no tool call and is the sum), ``tool_call_rate`` (trajectories with
    a call), ``tool_call_correct`` (among those, the first call's result is the sum), ``turns`` (assistant turns,
    mean)."""
    n = max(1, len(trajectories))
    success = calls = correct = turns = 0
    for messages in trajectories:
        prompt = messages[0]['content']
        replies = [m['content'] for m in messages if m['role'] == 'assistant']
        turns += len(replies)
        last = replies[-1] if replies else None
        success += last is not None and parse_tool_call(last) is None and is_success(prompt, last)
        first_call = next((c for c in map(parse_tool_call, replies) if c is not None), None)
        if first_call is not None:
            calls += 1
            correct += run_tool(first_call) == solve(prompt)
    return {'success': success / n, 'tool_call_rate': calls / n, 'tool_call_correct': correct / max(1, calls),
            'turns': turns / n}


def evaluate(model_or_dir, tokenizer, rows: Sequence[Dict[str, Any]], *,
             max_turns: int = MAX_TURNS) -> Dict[str, Any]:
    """:func:`trajectory_metrics` of the model's greedy tool-loop trajectories on the rows' prompts, and the
    ``trajectories`` themselves."""
    trajectories = rollout(model_or_dir, tokenizer, [r['messages'][0]['content'] for r in rows], max_turns=max_turns)
    return {**trajectory_metrics(trajectories), 'trajectories': trajectories}


# ---------------------------------------------------------------------------------------------------- workspace

TEACHER_KWARGS: Dict[str, int] = dict(tiny.TEACHER_KWARGS)
STUDENT_KWARGS: Dict[str, int] = dict(tiny.STUDENT_KWARGS)
_VERSION = 1


def build_workspace(root: str, *, seed: int = 0, n_train: int = 4000, n_test: int = 200, teacher_steps: int = 400,
                    student_steps: int = 100, batch_size: int = 64, lr: float = 3e-3, log=print) -> Dict[str, Any]:
    """Build (or reuse) the tool task's data and models under ``root``.

    Layout: ``tokenizer/`` (:func:`build_tokenizer`), ``train.jsonl`` / ``test.jsonl`` (prompt rows of
    :func:`make_rows`, what the GKD runs read), ``train_trajectories.jsonl`` (their reference trajectories),
    ``teacher/`` (:data:`TEACHER_KWARGS`, ``teacher_steps`` of :func:`tiny.train_teacher` on the reference
    trajectories, every assistant turn a target), ``student/`` (:data:`STUDENT_KWARGS`, a warm start of
    ``student_steps`` on the same trajectories) and ``teacher_trajectories.jsonl`` (the teacher's own greedy
    tool-loop trajectories on the training prompts, SeqKD's data).  Each model is cached with its settings (a marker
    in its folder), so another warm start keeps the teacher.  Returns the paths and ``teacher_eval`` /
    ``student_eval`` (:func:`evaluate` on the test rows, trajectories included) and ``*_parameters``.
    """
    root = os.path.abspath(root)
    data = dict(version=_VERSION, seed=seed, n_train=n_train, n_test=n_test,
                task=dict(prefix=PROMPT_PREFIX, low=LOW, high=HIGH, call=CALL_OPEN, result='user'))
    paths = {k: os.path.join(root, k) for k in ('tokenizer', 'teacher', 'student')}
    paths.update({k: os.path.join(root, f'{k}.jsonl') for k in ('train', 'test', 'train_trajectories',
                                                               'teacher_trajectories')})
    data_marker = os.path.join(root, 'data.json')
    if (not all(os.path.exists(paths[k]) for k in ('tokenizer', 'train', 'test', 'train_trajectories'))
            or quality_task._read_json(data_marker) != data):
        os.makedirs(root, exist_ok=True)
        build_tokenizer(paths['tokenizer'])
        train = make_rows(n_train, seed, 'train')
        tiny.write_dataset(paths['train'], train)
        tiny.write_dataset(paths['train_trajectories'], [trajectory_row(r) for r in train])
        tiny.write_dataset(paths['test'], make_rows(n_test, seed, 'test'))
        quality_task._write_json(data_marker, data)
    results: Dict[str, Any] = {}
    for name, kwargs, steps, model_seed in (('teacher', TEACHER_KWARGS, teacher_steps, seed),
                                            ('student', STUDENT_KWARGS, student_steps, seed + 1)):
        params = dict(data, model=kwargs, steps=steps, model_seed=model_seed, batch_size=batch_size, lr=lr)
        built = quality_task._cached_model(paths[name], params)
        if built is None or (name == 'teacher' and not os.path.exists(paths['teacher_trajectories'])):
            built = _train_model(paths, name, kwargs, steps, model_seed, batch_size, lr, log)
            quality_task._write_json(os.path.join(paths[name], quality_task._MARKER), {'params': params, **built})
        else:
            log(f'reusing the cached {name} in {paths[name]}')
        results.update({f'{name}_eval': built['eval'], f'{name}_parameters': built['parameters']})
    return {**paths, **results}


def _train_model(paths, name, kwargs, steps, model_seed, batch_size, lr, log) -> Dict[str, Any]:
    tokenizer = tiny.load_tokenizer(paths['tokenizer'])
    log(f'training the {name} ({steps} steps of batch {batch_size}) ...')
    tiny.build_model(paths[name], tokenizer, seed=model_seed, **kwargs)
    stats = tiny.train_teacher(paths[name], tiny.read_dataset(paths['train_trajectories']), steps=steps,
                               batch_size=batch_size, lr=lr, seed=model_seed, log_every=max(1, steps // 4),
                               encode=encode_trajectory)
    metrics = evaluate(paths[name], tokenizer, tiny.read_dataset(paths['test']))
    if name == 'teacher':
        train = tiny.read_dataset(paths['train'])
        trajectories = rollout(paths[name], tokenizer, [r['messages'][0]['content'] for r in train])
        tiny.write_dataset(paths['teacher_trajectories'], [{'messages': t} for t in trajectories])
    log(f"{name}: success {metrics['success']:.3f}, tool calls {metrics['tool_call_rate']:.3f} "
        f"({metrics['tool_call_correct']:.3f} right), {stats['num_parameters']:,} parameters, {stats['seconds']:.0f}s")
    return {'eval': metrics, 'parameters': stats['num_parameters']}
