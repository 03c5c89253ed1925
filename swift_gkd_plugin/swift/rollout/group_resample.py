"""Rows that fail to encode, replaced so that a group of ``--num_generations`` copies stays one prompt.

ms-swift replaces a row whose prompt does not encode (longer than ``--max_length`` with ``--truncation_strategy
delete``, a broken image, ...) with the next row of a per-rank backup iterator, appended at the end of the batch. With
several completions per prompt that breaks groups: a group's copies on two ranks get different replacements, and rows
move, so the advantages compare completions of different prompts. Here a failing row is replaced in place by a
dataset row drawn from (seed, step, the failing row's messages): every copy of a prompt, on every rank, gets the same
replacement, without communication.
"""
from __future__ import annotations

import copy
import hashlib
import json
import random
from typing import Any, Dict, List

from swift.utils import get_logger, remove_response

logger = get_logger()


def _encodes(template, row: Dict[str, Any], strip_response: bool) -> bool:
    """Whether ``row`` encodes (its response removed first, in place, as ms-swift does)."""
    try:
        if strip_response:
            remove_response(row['messages'])
        template.encode(row)
        return True
    except Exception as e:
        logger.info(f'Encoding failed for one sample; it is replaced with its whole group. {e}')
        return False


def replacement_rng(seed: int, step: int, row: Dict[str, Any]) -> random.Random:
    """A stream that depends only on (seed, step, the row's messages): the same on every rank and for every copy."""
    key = json.dumps([seed, step, row.get('messages')], sort_keys=True, default=str, ensure_ascii=False)
    return random.Random(int(hashlib.sha256(key.encode()).hexdigest()[:16], 16))


def resample_failed_groups(template, dataset, inputs: List[Dict[str, Any]], *, seed: int, step: int,
                           strip_response: bool, max_tries: int = 10) -> List[Dict[str, Any]]:
    """``inputs`` with each row that fails to encode replaced in place by a dataset row that encodes, the same one
    for every copy of the failing prompt (see the module docstring); at most ``max_tries`` draws per failing row."""
    out, chosen = [], {}
    for row in inputs:
        if _encodes(template, row, strip_response):
            out.append(row)
            continue
        key = json.dumps(row.get('messages'), sort_keys=True, default=str, ensure_ascii=False)
        if key not in chosen:
            rng = replacement_rng(seed, step, row)
            for _ in range(max_tries):
                index = rng.randrange(len(dataset))
                candidate = copy.deepcopy(dataset[index])
                if _encodes(template, candidate, strip_response):
                    chosen[key] = candidate
                    break
            else:
                raise RuntimeError(f'none of {max_tries} dataset rows drawn to replace a row that does not encode '
                                   f'encodes either (--max_length {template.max_length}): raise --max_length, or '
                                   'pass --truncation_strategy left')
        out.append(copy.deepcopy(chosen[key]))
    return out
