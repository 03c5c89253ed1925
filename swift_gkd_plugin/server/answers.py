"""A teacher server's answers, decoded and checked before use (:class:`InvalidAnswer` names the sequence and row):
one result per sequence and one row per asked position, token ids in ``[0, vocabulary)``, log-probabilities NaN-free
and <= 0 with a finite top-1 (a row of ``-inf`` would silently drop the row from the loss), tails likewise. Used by
:mod:`.client`, which retries an invalid answer as a server error."""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

import requests

from swift_gkd_plugin.server.protocol import IDS_DTYPE, LOGPROB_DTYPES, MSGPACK, TAIL_DTYPE, unpack_array

try:
    import msgpack
except ImportError:
    msgpack = None

__all__ = ['InvalidAnswer', 'TopKResult', 'check_infer_answer']

_LOGPROB_SLACK = 1e-3  # a log-probability above this is not one (float16 answers round near 0)


class InvalidAnswer(ValueError):
    """A 200 answer that cannot be used (undecodable, rows missing, NaN, ids outside the vocabulary): retried as a
    server error, then raised as :class:`TeacherServerError` naming the URL."""


@dataclass
class TopKResult:
    ids: Any  # torch.LongTensor [R, k]
    logprobs: Any  # torch.FloatTensor [R, k]
    tail: Any = None  # torch.FloatTensor [R] or None
    target_logprobs: Any = None  # torch.FloatTensor [R]: the log-prob of the token each row predicts, or None
    input_ids: Optional[List[int]] = None  # messages form: the encoded sequence
    positions: Optional[List[int]] = None  # messages form: the scored positions
    samples: Any = None  # torch.LongTensor [R, S]: ids drawn from the tempered teacher (a local teacher's), or None
    entropy: Any = None  # torch.FloatTensor [R]: the tempered teacher's entropy there, with samples


def _decode(resp: requests.Response) -> Any:
    """The answer's JSON or msgpack document; :class:`InvalidAnswer` when it is neither."""
    try:
        if resp.headers.get('content-type', '').startswith(MSGPACK):
            return msgpack.unpackb(resp.content, raw=False)
        return json.loads(resp.content)
    except Exception as e:
        raise InvalidAnswer(f'undecodable body of {len(resp.content)} bytes ({type(e).__name__}: {_short(e)})') from e


def _parse_topk(out: Any, expected: List[Optional[int]], vocab: Optional[int]) -> List[TopKResult]:
    """The checked results of a ``/v1/topk`` answer (``expected[i]``: rows asked for sequence ``i``, None: any)."""
    import torch
    if not isinstance(out, dict) or not isinstance(out.get('results'), list):
        raise InvalidAnswer(f'expected a teacher.topk document, got {type(out).__name__}')
    if len(out['results']) != len(expected):
        raise InvalidAnswer(f'{len(out["results"])} results for {len(expected)} sequences')
    vocab = out.get('vocab_size') if vocab is None else vocab
    results = []
    for i, (item, n_asked) in enumerate(zip(out['results'], expected)):
        try:
            k = int(out['topk'])
            lp_dtype = LOGPROB_DTYPES[out.get('dtypes', {}).get('logprobs', 'float32')]
            n = int(item['num_positions'])
            if n_asked is not None and n != n_asked:
                raise InvalidAnswer(f'{n} rows for the {n_asked} positions asked')
            ids = torch.from_numpy(unpack_array(item['ids'], IDS_DTYPE, (n, k))).long()
            lps = torch.from_numpy(unpack_array(item['logprobs'], lp_dtype, (n, k))).float()
            tail = item.get('tail')
            tail = torch.from_numpy(unpack_array(tail, TAIL_DTYPE, (n, ))) if tail is not None else None
            targets = item.get('target_logprobs')
            targets = torch.from_numpy(unpack_array(targets, TAIL_DTYPE, (n, ))) if targets is not None else None
            positions = item.get('positions')
            if n_asked is None and (not isinstance(positions, list) or len(positions) != n):
                raise InvalidAnswer(f'{n} rows for positions {str(positions)[:80]}')
        except InvalidAnswer as e:
            raise InvalidAnswer(f'sequence {i}: {e}') from None
        except (KeyError, TypeError, ValueError) as e:
            raise InvalidAnswer(f'sequence {i}: malformed result ({type(e).__name__}: {_short(e)})') from None
        _check_rows(i, ids, lps, tail, vocab)
        if targets is not None and bool((targets > 1e-4).any()):
            raise InvalidAnswer(f'sequence {i}: a target log-probability above 0')
        results.append(TopKResult(ids, lps, tail, input_ids=item.get('input_ids'), positions=positions,
                                  target_logprobs=targets))
    return results


def _parse_completions(out: Any, seqs: List[Tuple[List[int], List[int]]], k: int, with_targets: bool,
                       vocab: Optional[int]) -> List[TopKResult]:
    """The checked results of an OpenAI ``/v1/completions`` answer with vLLM's ``prompt_logprobs`` (entry ``p`` of a
    choice: ``{token id: {"logprob": x, "rank": r}}`` of token ``p`` given the tokens before it, ``None`` at 0)."""
    import torch
    choices = out.get('choices') if isinstance(out, dict) else None
    if not isinstance(choices, list) or len(choices) != len(seqs):
        raise InvalidAnswer(f'{len(choices) if isinstance(choices, list) else "no"} completion choices for '
                            f'{len(seqs)} prompts')
    try:
        choices = sorted(choices, key=lambda c: int(c['index']))
    except (KeyError, TypeError, ValueError):
        raise InvalidAnswer('completion choices without an index') from None
    results = []
    for i, (choice, (ids, positions)) in enumerate(zip(choices, seqs)):
        table, echoed = choice.get('prompt_logprobs'), choice.get('prompt_token_ids')
        if echoed is not None and list(echoed) != ids:
            raise InvalidAnswer(f'sequence {i}: the server read other prompt token ids than sent ({len(echoed)} for '
                                f'{len(ids)})')
        if not isinstance(table, list) or len(table) != len(ids):
            raise InvalidAnswer(f'sequence {i}: prompt_logprobs of {len(table) if isinstance(table, list) else table!r:.40} '
                                f'entries for {len(ids)} prompt tokens (is prompt_logprobs supported?)')
        top_ids, top_lps, targets = [], [], []
        for r, p in enumerate(positions):
            entry = table[p + 1] if 0 <= p < len(ids) - 1 else None
            try:
                pairs = sorted(((int(t), float(v['logprob'])) for t, v in entry.items()), key=lambda tl: -tl[1])
            except (AttributeError, KeyError, TypeError, ValueError) as e:
                raise InvalidAnswer(f'sequence {i}, row {r}: malformed prompt_logprobs entry at position {p} '
                                    f'({type(e).__name__}: {_short(e)})') from None
            if len(pairs) < k:
                raise InvalidAnswer(f'sequence {i}, row {r}: {len(pairs)} log-probs for a top-{k}')
            top_ids.append([t for t, _ in pairs[:k]])
            top_lps.append([lp for _, lp in pairs[:k]])
            if with_targets:
                target = dict(pairs).get(ids[p + 1])
                if target is None:
                    raise InvalidAnswer(f'sequence {i}, row {r}: no log-prob of the token that follows position {p}')
                targets.append(target)
        n = len(positions)
        ids_t = torch.tensor(top_ids, dtype=torch.long).reshape(n, k)
        lps_t = torch.tensor(top_lps, dtype=torch.float32).reshape(n, k)
        _check_rows(i, ids_t, lps_t, None, vocab)
        target_t = torch.tensor(targets, dtype=torch.float32) if with_targets else None
        if target_t is not None and bool((torch.isnan(target_t) | (target_t > _LOGPROB_SLACK)).any()):
            raise InvalidAnswer(f'sequence {i}: a target log-probability that is NaN or above 0')
        results.append(TopKResult(ids_t, lps_t, target_logprobs=target_t))
    return results


def _check_rows(i: int, ids, lps, tail, vocab: Optional[int]) -> None:
    """Token ids in ``[0, vocab)``; log-probs without NaN, <= 0, a finite top-1; tails without NaN, <= 0."""
    import torch
    if ids.numel():
        bad = (ids < 0) | (ids >= vocab) if isinstance(vocab, int) else ids < 0
        if bool(bad.any()):
            r, j = (int(x) for x in bad.nonzero()[0])
            raise InvalidAnswer(f'sequence {i}, row {r}: token id {int(ids[r, j])} outside the vocabulary [0, '
                                f'{vocab if isinstance(vocab, int) else "V"})')
        bad = torch.isnan(lps) | (lps > _LOGPROB_SLACK) | torch.isneginf(lps[:, :1])
        if bool(bad.any()):
            r, j = (int(x) for x in bad.nonzero()[0])
            raise InvalidAnswer(f'sequence {i}, row {r}: log-probability {float(lps[r, j])} (top-{j + 1}): a '
                                'log-probability is a number <= 0, and the top-1 is finite')
    if tail is not None and tail.numel():
        bad = torch.isnan(tail) | (tail > _LOGPROB_SLACK)
        if bool(bad.any()):
            r = int(bad.nonzero()[0])
            raise InvalidAnswer(f'sequence {i}, row {r}: tail log-mass {float(tail[r])}')


def check_infer_answer(answer: Any, i: int, topk: Optional[int], vocab: Optional[int]) -> None:
    """One answer of ms-swift's ``/infer/`` protocol: ``prompt_token_ids`` (when reported) and, when asked,
    ``prompt_logprobs`` (``None``, then one ``{id: {"logprob": x}}`` per further token) with ids in ``[0, vocab)``
    and log-probs as in the compact answers. An answer without ``prompt_logprobs`` (a server that computes none, as
    ms-swift's transformers engine) is passed on unretried: the caller names the request and its counts."""
    if not isinstance(answer, dict):
        raise InvalidAnswer(f'answer {i}: expected a chat completion, got {type(answer).__name__}')
    ids = answer.get('prompt_token_ids')  # vLLM's ms-swift engine reports them only with return_details
    if ids is not None and (not isinstance(ids, list) or not ids or not all(isinstance(t, int) for t in ids)):
        raise InvalidAnswer(f'answer {i}: prompt_token_ids is not a list of token ids: {str(ids)[:80]}')
    if topk is None:
        return
    table = answer.get('prompt_logprobs')
    if table is None:  # a server that computes none (`swift deploy --infer_backend transformers`): never retried,
        return  # every answer would be the same; the caller names the request and its counts
    if not isinstance(table, list) or not table or (ids is not None and len(table) != len(ids)):
        raise InvalidAnswer(f'answer {i}: prompt_logprobs of {len(table) if isinstance(table, list) else table!r:.40} '
                            f'entries for {len(ids) if ids is not None else "some"} prompt tokens')
    for r, entry in enumerate(table[1:]):
        try:
            pairs = [(int(t), float(info['logprob'])) for t, info in entry.items()]
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            raise InvalidAnswer(f'answer {i}, row {r}: malformed prompt_logprobs entry ({type(e).__name__}: '
                                f'{_short(e)})') from None
        if not pairs:
            raise InvalidAnswer(f'answer {i}, row {r}: empty prompt_logprobs entry')
        for t, lp in pairs:
            if t < 0 or (isinstance(vocab, int) and t >= vocab):
                raise InvalidAnswer(f'answer {i}, row {r}: token id {t} outside the vocabulary [0, '
                                    f'{vocab if isinstance(vocab, int) else "V"})')
            if math.isnan(lp) or lp > _LOGPROB_SLACK:
                raise InvalidAnswer(f'answer {i}, row {r}: log-probability {lp} of token {t}')
        if math.isinf(max(lp for _, lp in pairs)):
            raise InvalidAnswer(f'answer {i}, row {r}: every log-probability is -inf')


def _short(e: BaseException) -> str:
    text = str(e)
    m = re.search(r'\[Errno -?\d+\][^\'")]*', text)  # the root cause of urllib3's nested message
    if m:
        return m.group(0).strip()
    return text if len(text) < 300 else text[:300] + '...'
