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
(with the benchmark's sizes, the lookup a one-layer student does not learn: docs_en/quality_results.md).  Why this task: on
the sorting task (:mod:`.quality_task`) a student a third of the teacher's size learns the rule from references
alone (docs_en/quality_results.md), so no method can show what only the teacher knows.

Two valid tables (``tables=2``, ``wrap=False``, ``disjoint=True``: ``bench_quality.py --capacity_task two_tables``):
each row's reference is wholly one table's answer (drawn per row, like the sorting task's two directions), the
checker accepts either table's answer and nothing that mixes them (:meth:`CapacityTask.mixed_fraction` counts those),
there is no wrap-around (``length - window + 1`` letters), and with ``disjoint`` the tables write disjoint letters, so
any one letter of an answer tells which table it follows.  Why: a teacher whose distribution says more than the
references (two modes), for the GKD paper's mode-seeking argument (docs_en/quality_results.md).

Train and test prompts are disjoint: a prompt's split is a hash of its letter sequence (:meth:`CapacityTask.split_of`);
held-out prompts are new sequences, while (with the benchmark's sizes) every table entry occurs in training.
"""
from __future__ import annotations

import itertools
import random
import zlib
from dataclasses import dataclass
from typing import Any, Dict, List, Sequence, Tuple

from swift_gkd_plugin.demo import quality_task

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
    tables: int = 1
    wrap: bool = True
    disjoint: bool = False

    def __post_init__(self):
        if len(set(self.symbols)) != len(self.symbols) or not self.symbols:
            raise ValueError(f'symbols must be distinct letters, got {self.symbols!r}')
        if not 1 <= self.window <= self.length:
            raise ValueError(f'window must be in [1, length={self.length}], got {self.window}')
        if self.tables < 1:
            raise ValueError(f'tables must be >= 1, got {self.tables}')

    def describe(self) -> Dict[str, Any]:
        """The task's parameters (part of every cache key built on it; ``tables``/``wrap`` only when not the
        defaults, so the one-table task's cached workspaces stay valid)."""
        extra = ({} if (self.tables, self.wrap, self.disjoint) == (1, True, False)
                 else dict(tables=self.tables, wrap=self.wrap, disjoint=self.disjoint))
        return dict(name='capacity', symbols=self.symbols, length=self.length, window=self.window,
                    table_seed=self.table_seed, prefix=PROMPT_PREFIX, **extra)

    def table(self, index: int = 0) -> Dict[Tuple[str, ...], str]:
        """Table ``index`` (of ``tables``): every ``window``-tuple of symbols -> one of :meth:`outputs`, uniform,
        from ``table_seed`` (table 0 of a non-``disjoint`` task is the one-table task's table)."""
        seed = f'{self.table_seed}' if index == 0 else f'{self.table_seed}.{index}'
        rng = random.Random(f'capacity-table:{seed}:{self.symbols}:{self.window}')
        outputs = self.outputs(index)
        return {key: rng.choice(outputs) for key in itertools.product(self.symbols, repeat=self.window)}

    def outputs(self, index: int = 0) -> str:
        """The letters table ``index`` writes: all symbols, or with ``disjoint`` its own slice of them (table 0 the
        first ``len(symbols) // tables``, ...), so that any one letter of an answer tells which table it follows."""
        if not self.disjoint:
            return self.symbols
        size = len(self.symbols) // self.tables
        return self.symbols[index * size:(index + 1) * size]

    def answer_length(self) -> int:
        """``length`` letters with wrap-around windows, else one per window that fits (``length - window + 1``)."""
        return self.length if self.wrap else self.length - self.window + 1

    def solve(self, letters: Sequence[str], index: int = 0) -> List[str]:
        """The answer by table ``index``."""
        table, n = self.table(index), len(letters)
        return [table[tuple(letters[(i + j) % n] for j in range(self.window))] for i in range(self.answer_length())]

    def split_of(self, letters: Sequence[str]) -> str:
        """``'test'`` or ``'train'``: a pure function of the letter sequence (CRC32), about 1/5 test."""
        return 'test' if zlib.crc32(' '.join(letters).encode('utf-8')) % _TEST_MODULUS == 0 else 'train'

    def letters_of(self, prompt: str) -> List[str]:
        if not prompt.startswith(PROMPT_PREFIX):
            raise ValueError(f'not a task prompt: {prompt!r}')
        return prompt[len(PROMPT_PREFIX):].split()

    def valid_answers(self, prompt: str) -> Tuple[str, ...]:
        """The right answers of a prompt: each table's (distinct ones, in table order)."""
        letters = self.letters_of(prompt)
        return tuple(dict.fromkeys(' '.join(self.solve(letters, k)) for k in range(self.tables)))

    def is_correct(self, prompt: str, answer: str) -> bool:
        """True iff ``answer`` (surrounding whitespace ignored) is wholly one table's answer."""
        return answer.strip() in self.valid_answers(prompt)

    def make_rows(self, n: int, seed: int = 0, split: str = 'train') -> List[Dict[str, Any]]:
        """``n`` rows with distinct prompts of one split, in ms-swift's ``messages`` format; deterministic in
        ``(n, seed, split)`` and the task."""
        return quality_task.distinct_rows(n, f'capacity-task:{seed}:{split}', split,
                                          lambda rng: [rng.choice(self.symbols) for _ in range(self.length)],
                                          self.split_of, self._reference, PROMPT_PREFIX)

    def _reference(self, letters: Sequence[str], rng: random.Random) -> List[str]:
        """A row's reference: one table's answer, the table drawn uniformly (no draw with one table, so the one-table
        task's rows are unchanged)."""
        return self.solve(letters, rng.randrange(self.tables) if self.tables > 1 else 0)

    def token_accuracy(self, prompt: str, answer: str) -> float:
        """Position-wise matches against the closest right answer over the longer of the two lengths; 1.0 iff
        right."""
        got = answer.split()
        return max(sum(g == w for g, w in zip(got, want)) / max(len(want), len(got))
                   for want in (v.split() for v in self.valid_answers(prompt)))

    def mixed_fraction(self, prompts: Sequence[str], answers: Sequence[str]) -> float:
        """Fraction of answers of the right length in which every letter is some table's letter at its position but
        no one table gives them all: answers that mix the tables (0 with one table)."""
        mixed = 0
        for prompt, answer in zip(prompts, answers):
            got, wants = answer.split(), [v.split() for v in self.valid_answers(prompt)]
            if (len(got) == self.answer_length() and got not in wants
                    and all(any(g == w[i] for w in wants) for i, g in enumerate(got))):
                mixed += 1
        return mixed / max(1, len(prompts))

    def answer_metrics(self, prompts: Sequence[str], answers: Sequence[str]) -> Dict[str, float]:
        """``exact_match`` and ``token_accuracy`` (the same keys as the sorting task's)."""
        n = max(1, len(prompts))
        metrics = {'exact_match': sum(self.is_correct(p, a) for p, a in zip(prompts, answers)) / n,
                   'token_accuracy': sum(self.token_accuracy(p, a) for p, a in zip(prompts, answers)) / n}
        if self.tables > 1:
            metrics['mixed_tables'] = self.mixed_fraction(prompts, answers)
        return metrics


DEFAULT = CapacityTask()
