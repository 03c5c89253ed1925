"""The capacity-limited task of ``bench_quality.py --preset capacity``: a fixed random table applied to neighbouring
letters, which a small student cannot fully learn.

Imports only :mod:`.quality_task`'s helpers (never ms-swift).

The task: *map each letter through a table of its neighbours*
-------------------------------------------------------------
The user message is ``"Map: k c a m f h b p"`` (:attr:`CapacityTask.length` letters of :attr:`CapacityTask.symbols`,
drawn with replacement).  The one right answer has as many letters: letter ``i`` is ``table[x_i, x_{i+1}, ...]``,
the table applied to the ``window`` letters starting at position ``i`` (cyclically).  The table is a fixed random
map from every ``window``-tuple of symbols to a symbol (seeded, :meth:`CapacityTask.table`): with 16 symbols and a
window of 2 it has 256 entries, with a window of 3 4,096 entries.  A model must memorise the table and look up the
right neighbours; the last letters' windows wrap around to the first input letters, a lookup at another distance
(with the benchmark's sizes, the lookup a one-layer student does not learn: docs_en/quality.md).  Why this task: on
the sorting task (:mod:`.quality_task`) a student a third of the teacher's size learns the rule from references
alone (docs_en/quality.md), so no method can show what only the teacher knows.

Train and test prompts are disjoint: a prompt's split is a hash of its letter sequence (:meth:`CapacityTask.split_of`);
held-out prompts are new sequences, while (with the benchmark's sizes) every table entry occurs in training.
"""
from __future__ import annotations

import itertools
import random
import zlib
from dataclasses import dataclass
from typing import Any, Dict, List, Sequence, Tuple

from swift_gkd_plugin.testing import quality_task

__all__ = ['CapacityTask', 'PROMPT_PREFIX', 'DEFAULT']

PROMPT_PREFIX: str = 'Map: '
_TEST_MODULUS: int = 5


@dataclass(frozen=True)
class CapacityTask:
    """One variant of the table task: ``symbols`` (each ``' x'`` one token of :func:`tiny.build_tokenizer`), the
    prompt ``length``, the table's ``window`` and the ``table_seed``.  The object is the task: its rows, its checker
    and its metrics (the interface :func:`quality_task.build_workspace` and :func:`quality_task.evaluate` take)."""

    symbols: str = 'abcdefghijklmnop'
    length: int = 8
    window: int = 3
    table_seed: int = 0

    def __post_init__(self):
        if len(set(self.symbols)) != len(self.symbols) or not self.symbols:
            raise ValueError(f'symbols must be distinct letters, got {self.symbols!r}')
        if not 1 <= self.window <= self.length:
            raise ValueError(f'window must be in [1, length={self.length}], got {self.window}')

    def describe(self) -> Dict[str, Any]:
        """The task's parameters (part of every cache key built on it)."""
        return dict(name='capacity', symbols=self.symbols, length=self.length, window=self.window,
                    table_seed=self.table_seed, prefix=PROMPT_PREFIX)

    def table(self) -> Dict[Tuple[str, ...], str]:
        """The fixed random table: every ``window``-tuple of symbols -> a symbol, uniform, from ``table_seed``."""
        rng = random.Random(f'capacity-table:{self.table_seed}:{self.symbols}:{self.window}')
        return {key: rng.choice(self.symbols) for key in itertools.product(self.symbols, repeat=self.window)}

    def solve(self, letters: Sequence[str]) -> List[str]:
        table, n = self.table(), len(letters)
        return [table[tuple(letters[(i + j) % n] for j in range(self.window))] for i in range(n)]

    def split_of(self, letters: Sequence[str]) -> str:
        """``'test'`` or ``'train'``: a pure function of the letter sequence (CRC32), about 1/5 test."""
        return 'test' if zlib.crc32(' '.join(letters).encode('utf-8')) % _TEST_MODULUS == 0 else 'train'

    def letters_of(self, prompt: str) -> List[str]:
        if not prompt.startswith(PROMPT_PREFIX):
            raise ValueError(f'not a task prompt: {prompt!r}')
        return prompt[len(PROMPT_PREFIX):].split()

    def valid_answers(self, prompt: str) -> Tuple[str]:
        """The one right answer of a prompt."""
        return (' '.join(self.solve(self.letters_of(prompt))),)

    def is_correct(self, prompt: str, answer: str) -> bool:
        """True iff ``answer`` (surrounding whitespace ignored) is the right answer."""
        return answer.strip() in self.valid_answers(prompt)

    def make_rows(self, n: int, seed: int = 0, split: str = 'train') -> List[Dict[str, Any]]:
        """``n`` rows with distinct prompts of one split, in ms-swift's ``messages`` format; deterministic in
        ``(n, seed, split)`` and the task."""
        return quality_task.distinct_rows(n, f'capacity-task:{seed}:{split}', split,
                                          lambda rng: [rng.choice(self.symbols) for _ in range(self.length)],
                                          self.split_of, lambda letters, rng: self.solve(letters), PROMPT_PREFIX)

    def token_accuracy(self, prompt: str, answer: str) -> float:
        """Position-wise matches against the right answer over the longer of the two lengths; 1.0 iff right."""
        got, want = answer.split(), self.valid_answers(prompt)[0].split()
        return sum(g == w for g, w in zip(got, want)) / max(len(want), len(got))

    def answer_metrics(self, prompts: Sequence[str], answers: Sequence[str]) -> Dict[str, float]:
        """``exact_match`` and ``token_accuracy`` (the same keys as the sorting task's)."""
        n = max(1, len(prompts))
        return {'exact_match': sum(self.is_correct(p, a) for p, a in zip(prompts, answers)) / n,
                'token_accuracy': sum(self.token_accuracy(p, a) for p, a in zip(prompts, answers)) / n}


DEFAULT = CapacityTask()
