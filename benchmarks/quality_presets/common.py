"""What ``bench_quality.py`` and its preset modules share: the log line, mean ± std over seeds and a run's logged
values."""
from __future__ import annotations

import json
import os
import statistics
import time
from typing import Any, Dict, List


def log(msg: str) -> None:
    print(f'[bench_quality {time.strftime("%H:%M:%S")}] {msg}', flush=True)


def mean_std(values: List[float]) -> tuple:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def without_answers(metrics: Dict[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in metrics.items() if k != 'answers'}


def logged(output_dir: str, key: str) -> List[tuple]:
    """``(step, value)`` of ``key`` in a run's logging.jsonl."""
    path = os.path.join(output_dir, 'logging.jsonl')
    if not os.path.exists(path):
        return []
    with open(path) as f:
        rows = [json.loads(line) for line in f]
    return [(int(str(r['global_step/max_steps']).split('/')[0]), r[key]) for r in rows if key in r]
