"""``--preset capacity``: a random table of neighbouring letters (``capacity_task``) that a third-size student cannot
fully learn; every method from a student supervised until it stops improving, scored by greedy exact match."""
from __future__ import annotations

from typing import Any, Dict

from harness import capacity_task  # tests/harness/, on sys.path through bench_quality.py
from swift_gkd_plugin.demo import tiny

from quality_presets import default

#: ``--preset capacity``: a table task (capacity_task), a teacher and a third-size student, the student supervised
#: until it stops improving (the start of every method, as in the GKD paper); measured in docs_en/quality_results.md.
#: ``--capacity_task``: ``wrap`` (the preset: one table, the last letter wrapping around) or ``two_tables`` (the second
#: attempt: two valid tables writing disjoint letters, each reference wholly one of them, no wrap-around).
_LETTERS = 'abcdefghijklmnopqrstuvwxyz'
CAPACITY_VARIANTS = {
    'two_tables': dict(task=dict(symbols=_LETTERS, length=8, window=2, table_seed=0, tables=2, wrap=False,
                                 disjoint=True), teacher_steps=1500),
    'wrap': dict(task=dict(symbols=_LETTERS, length=8, window=2, table_seed=0), teacher_steps=1000),
}
CAPACITY_TASK = CAPACITY_VARIANTS['wrap']['task']
CAPACITY_COMMON = dict(eval_every=25, batch_size=16, n_train=4000, n_test=200, student_steps=2000,
                       teacher_kwargs=dict(tiny.STUDENT_KWARGS),
                       student_kwargs=dict(hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2,
                                           intermediate_size=64), **CAPACITY_VARIANTS['wrap'])
CAPACITY_PRESETS = {
    'quick': dict(CAPACITY_COMMON, seeds=[0], steps=100),
    'full': dict(CAPACITY_COMMON, seeds=[0, 1, 2], steps=100),
}
#: The methods' learning rate on the capacity preset: the student starts converged (1e-3 first undoes some of it).
CAPACITY_LEARNING_RATE = '2e-4'


def presets(variant: str = '') -> Dict[str, Dict[str, Any]]:
    """The quick and full settings of ``--capacity_task variant`` ('': the preset's own task, wrap)."""
    if not variant:
        return CAPACITY_PRESETS
    return {k: dict(p, **CAPACITY_VARIANTS[variant]) for k, p in CAPACITY_PRESETS.items()}


def workspace(workdir: str, cfg: Dict[str, Any], name: str = 'workspace') -> Dict[str, Any]:
    """``cfg``'s task, with its model sizes, under ``workdir/<name>_capacity`` (cached); the task object under
    ``task``."""
    task = capacity_task.CapacityTask(**cfg['task'])
    ws = default.workspace(workdir, cfg, f'{name}_capacity', task=task, teacher_kwargs=cfg['teacher_kwargs'],
                           student_kwargs=cfg['student_kwargs'])
    return dict(ws, task=task)
