"""Speculative knowledge distillation (SKD, Xu et al., ICLR 2025): the student samples, the teacher corrects.

The student proposes each token; a proposed token outside the teacher's top-K at its position is replaced by a token
sampled from the teacher, and the student continues from the corrected prefix. Done as speculative decoding does it:
the student drafts a block of tokens with its KV cache, the teacher scores the whole block in one forward, the block is
cut at its first rejected token, which the teacher's sample replaces.

Pure PyTorch. The models are callbacks that keep their own KV caches (:data:`Forward`); the layout they see is one
``[B, W]`` batch that only grows to the right: rows keep their left padding, a cut turns the rejected draft tokens
into masked columns ("holes", attention mask 0, ignored by both caches) and the teacher's replacement goes into a new
column. Position ids count the unmasked columns, so a row with holes reads exactly like its compacted sequence.
A teacher that only returns its top-k log-probabilities for whole sequences (a teacher server) verifies through
:func:`scored_forward`, which turns its answers into logits of this layout (:func:`topk_logits`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from swift_gkd_plugin.core.modes import sampling_seed

__all__ = ['Forward', 'TopKScorer', 'SpeculativeResult', 'in_teacher_topk', 'first_rejection', 'speculative_sample',
           'position_ids', 'teacher_seed', 'topk_logits', 'scored_forward']

#: ``forward(input_ids [B, n], attention_mask [B, W], position_ids [B, n]) -> logits [B, n, V]``: the model's logits
#: for the ``n`` newest columns of the batch, given the mask of all ``W`` columns. Called with consecutive column
#: ranges, each column once: the callback appends them to its own KV cache.
Forward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


#: ``score([(input_ids, positions), ...]) -> [(ids [n, k], logprobs [n, k]), ...]``: a teacher's ``k`` most likely
#: tokens and their log-probabilities at the given positions of each sequence (position ``p`` predicts token ``p + 1``),
#: one forward per sequence, nothing kept between calls: a teacher server's ``/v1/topk``.
TopKScorer = Callable[[List[Tuple[List[int], List[int]]]], List[Tuple[torch.Tensor, torch.Tensor]]]


def in_teacher_topk(teacher_logits: torch.Tensor, tokens: torch.Tensor, k: int) -> torch.Tensor:
    """The acceptance rule: whether each token is among the teacher's ``k`` most likely tokens at its position.

    ``teacher_logits`` ``[..., V]``, ``tokens`` ``[...]``. A token tied with the k-th largest logit is accepted (ties
    never depend on the order of the vocabulary). The temperature does not change the ranking, so the rule is the
    same at every sampling temperature; ``k >= V`` accepts every token.
    """
    if k <= 0:
        raise ValueError(f'k must be >= 1, got {k}')
    if k >= teacher_logits.shape[-1]:
        return torch.ones(tokens.shape, dtype=torch.bool, device=tokens.device)
    kth = teacher_logits.topk(k, dim=-1).values[..., -1]
    return teacher_logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) >= kth


def first_rejection(accepted: torch.Tensor, proposed: torch.Tensor) -> torch.Tensor:
    """Per row of ``[B, n]`` booleans, the index of the first proposed token that is not accepted, ``n`` if none.

    ``proposed`` marks the draft tokens that exist (a row that stopped drafting has fewer); the others never reject.
    """
    rejected = proposed & ~accepted
    n = accepted.shape[-1]
    index = torch.arange(n, device=accepted.device).expand_as(rejected)
    return torch.where(rejected, index, torch.full_like(index, n)).min(-1).values


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Position of every column: the number of unmasked columns before it in its row (0 for masked columns), as
    transformers computes it for left-padded batches."""
    pos = mask.long().cumsum(-1) - 1
    return pos.masked_fill(mask == 0, 0)


@dataclass
class SpeculativeResult:
    """The sampled completions and what it took.

    ``completions[b]``: row ``b``'s generated tokens (EOS included when it stopped on one). ``proposed``: draft tokens
    the teacher judged (up to and including the first rejection of each block); ``replaced``: those it replaced.
    ``rounds[b]``: teacher forwards in which row ``b`` had draft tokens; ``teacher_forwards`` and ``student_forwards``:
    forwards of each model for the whole batch.
    """
    completions: List[List[int]]
    proposed: int = 0
    replaced: int = 0
    rounds: List[int] = field(default_factory=list)
    teacher_forwards: int = 0
    student_forwards: int = 0


class _Model:
    """A forward callback and the columns it has already seen."""

    def __init__(self, forward: Forward):
        self.forward = forward
        self.seen = 0
        self.last = None  # [B, V]: logits at each row's last unmasked column seen so far

    def feed(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The logits ``[B, n, V]`` of the ``n`` columns the model has not seen yet."""
        start, width = self.seen, ids.shape[1]
        logits = self.forward(ids[:, start:], mask, position_ids(mask)[:, start:])
        self.seen = width
        return logits

    def walk(self, logits: torch.Tensor, mask: torch.Tensor, start: int):
        """For each column ``c >= start`` and row, the logits predicting ``c`` (from the previous unmasked column);
        updates ``last``. Returns ``[B, n, V]`` with rows of masked columns left as they come."""
        b, n = logits.shape[0], logits.shape[1]
        last = self.last if self.last is not None else logits.new_zeros(b, logits.shape[-1])
        predicting = []
        valid = mask[:, start:].bool()
        for j in range(n):
            predicting.append(last)
            last = torch.where(valid[:, j:j + 1], logits[:, j], last)
        self.last = last
        return torch.stack(predicting, 1)


def speculative_sample(student: Forward,
                       teacher: Forward,
                       prompt_ids: torch.Tensor,
                       prompt_mask: torch.Tensor,
                       *,
                       top_k: int,
                       max_new_tokens: int,
                       eos_token_ids: Sequence[int],
                       pad_token_id: int,
                       sample_student: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                       teacher_temperature: float,
                       generator: Optional[torch.Generator] = None,
                       draft_len: int = 8,
                       accept: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None,
                       stop: Optional[Callable[[List[int]], bool]] = None) -> SpeculativeResult:
    """Sample completions of left-padded prompts with SKD.

    Args:
        student, teacher: :data:`Forward` callbacks (fresh caches).
        prompt_ids, prompt_mask: ``[B, P]`` left-padded prompts and their attention mask.
        top_k: the teacher's top-K that accepts a proposed token (:func:`in_teacher_topk`).
        max_new_tokens: at most this many tokens per completion.
        eos_token_ids: a completion ends with the first of these (kept).
        sample_student: ``(logits [B, V], ids [B, W]) -> tokens [B]``, the student's sampler at each draft step,
            called with every row of the batch (finished rows included, their draws discarded), so that with nothing
            replaced it draws exactly what the student's own decoding loop draws, step for step.
        teacher_temperature: a replacement is drawn from ``softmax(teacher logits / teacher_temperature)``.
        generator: the teacher's draws (one ``multinomial`` over the rejecting rows per block, in row order).
        draft_len: the most tokens the student drafts before the teacher verifies them. The block length adapts:
            one more than the mean number of tokens the teacher accepted per row in the last block (at least 1), so
            a teacher that rejects most tokens costs about one student and one teacher forward per token, and one
            that accepts most about one teacher forward per ``draft_len`` tokens.
        accept: ``(teacher logits [B, V], tokens [B]) -> bool [B]`` instead of the top-K rule (tests).
        stop: ``completion -> bool``: ends a completion early (stop words).

    With ``accept`` always true the result is the student's own sampling; always false, the teacher's own sampling
    (one draw per unfinished row and token from ``generator``).
    """
    if max_new_tokens <= 0:
        raise ValueError(f'max_new_tokens must be > 0, got {max_new_tokens}')
    if draft_len <= 0:
        raise ValueError(f'draft_len must be > 0, got {draft_len}')
    if not teacher_temperature > 0:
        raise ValueError(f'teacher_temperature must be > 0, got {teacher_temperature}')
    accept = accept or (lambda logits, tokens: in_teacher_topk(logits, tokens, top_k))
    eos_set = {int(t) for t in eos_token_ids}
    ids, mask = prompt_ids.clone(), prompt_mask.clone().long()
    b = ids.shape[0]
    completions: List[List[int]] = [[] for _ in range(b)]
    finished = [False] * b
    result = SpeculativeResult(completions=completions, rounds=[0] * b)
    s_model, t_model = _Model(student), _Model(teacher)

    def append(column: torch.Tensor, valid: torch.Tensor):
        nonlocal ids, mask
        ids = torch.cat([ids, column.where(valid, torch.full_like(column, pad_token_id))[:, None]], 1)
        mask = torch.cat([mask, valid.long()[:, None]], 1)

    block = draft_len
    while not all(finished):
        # 1. the student drafts: every unfinished row proposes up to draft_len tokens (fewer near its budget, none
        # after its EOS); a draft step samples every row, as the student's own decoding loop does
        draft_start = ids.shape[1]
        drafting = torch.tensor([not f for f in finished], device=ids.device)
        drafts: List[List[int]] = [[] for _ in range(b)]
        for _ in range(block):
            logits = s_model.feed(ids, mask)
            result.student_forwards += 1
            s_model.walk(logits, mask, ids.shape[1] - logits.shape[1])
            tokens = sample_student(s_model.last, ids)
            append(tokens, drafting)
            for row in drafting.nonzero().flatten().tolist():
                drafts[row].append(int(tokens[row]))
                if _ends(completions[row] + drafts[row], eos_set, max_new_tokens, stop):
                    drafting[row] = False
            if not bool(drafting.any()):
                break
        # 2. the teacher scores every unseen column in one forward; its logits predicting each draft column
        t_logits = _to_width(t_model.feed(ids, mask), s_model.last.shape[-1])
        result.teacher_forwards += 1
        start = ids.shape[1] - t_logits.shape[1]
        predicting = t_model.walk(t_logits, mask, start)[:, draft_start - start:]
        draft = ids[:, draft_start:]
        proposed = mask[:, draft_start:].bool()
        accepted = accept(predicting.reshape(-1, predicting.shape[-1]), draft.reshape(-1)).view(draft.shape)
        cut = first_rejection(accepted, proposed)
        # 3. cut each block at its first rejection: the rejected token and the rest of the block become holes; the
        # teacher's sample at the cut goes into a new column
        n = draft.shape[1]
        rejecting = cut < n
        judged = torch.minimum(cut + 1, proposed.sum(-1))
        result.proposed += int(judged.sum())
        drafted = proposed.any(-1)
        accepted_run = torch.minimum(cut, proposed.sum(-1))[drafted].float().mean()
        block = max(1, min(draft_len, int(accepted_run.round()) + 1))
        result.replaced += int(rejecting.sum())
        replacement = torch.full((b, ), pad_token_id, dtype=torch.long, device=ids.device)
        if bool(rejecting.any()):
            rows = rejecting.nonzero().flatten()
            logits = predicting[rows, cut[rows]].float() / teacher_temperature
            probs = torch.softmax(logits, -1)
            draws = torch.multinomial(probs.cpu(), 1, generator=generator).flatten().to(ids.device)
            replacement[rows] = draws
            after = torch.arange(n, device=ids.device)[None, :] >= cut[:, None]
            mask[:, draft_start:] = mask[:, draft_start:].masked_fill(after & rejecting[:, None], 0)
            append(replacement, rejecting)
            # the teacher's "last logits" of a rejecting row came from a hole's neighbourhood: its new column is
            # unseen, so the next feed recomputes from there
        for row in range(b):
            if finished[row]:
                continue
            if bool(proposed[row].any()):
                result.rounds[row] += 1
            kept = draft[row, :int(cut[row])][proposed[row, :int(cut[row])]].tolist()
            if bool(rejecting[row]):
                kept.append(int(replacement[row]))
            completions[row].extend(kept)
            finished[row] = _ends(completions[row], eos_set, max_new_tokens, stop)
    return result


def topk_logits(ids: torch.Tensor, logprobs: torch.Tensor, vocab: int) -> torch.Tensor:
    """A teacher's top-k (``ids``, ``logprobs`` ``[..., k]``) as logits ``[..., vocab]``: its log-probabilities at
    their ids, ``-inf`` elsewhere (ids ``>= vocab`` dropped).

    What the sampler does with them is then the top-k truncation of the teacher's distribution: the acceptance rule
    with ``K <= k`` is the rule on the full logits (the ranking is the same; a tie at the k-th value may be cut by the
    teacher), and ``softmax(logits / T)`` is the teacher's distribution at temperature ``T`` restricted to its top-k
    and renormalised, ``p_i^(1/T) / sum_{j in top-k} p_j^(1/T)``.
    """
    ids = ids.long()
    width = max(vocab, int(ids.max()) + 1) if ids.numel() else vocab
    out = torch.full((*ids.shape[:-1], width), float('-inf'), dtype=torch.float32, device=ids.device)
    return out.scatter(-1, ids, logprobs.float())[..., :vocab]


def scored_forward(score: TopKScorer, vocab: int, first_column: int) -> Forward:
    """A :data:`Forward` on a teacher that scores whole sequences and returns its top-k (``score``, no KV cache).

    It keeps the columns it was fed; at each call it sends every row's unmasked columns (the row's compacted
    sequence) with the positions of its new unmasked columns from ``first_column`` on, and returns
    :func:`topk_logits` there. ``first_column`` is the prompt's last column (the sampler reads the logits of the last
    prompt column and of the drafted ones): the rows of columns before it, and of masked columns, are zeros, never
    read. One ``score`` call per teacher forward, with the rows that have new columns.
    """
    state = {'ids': None}

    def call(new_ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        seen = 0 if state['ids'] is None else state['ids'].shape[1]
        ids = new_ids if state['ids'] is None else torch.cat([state['ids'], new_ids], 1)
        state['ids'] = ids
        out = torch.zeros(new_ids.shape[0], new_ids.shape[1], vocab)
        start, full_pos = max(seen, first_column), position_ids(mask)
        asked, places = [], []
        for row in range(ids.shape[0]):
            keep = mask[row].bool()
            columns = keep[start:].nonzero().flatten() + start
            if columns.numel():
                asked.append((ids[row][keep].tolist(), full_pos[row, columns].tolist()))
                places.append((row, columns - seen))
        if asked:
            for (row, columns), (top_ids, top_logprobs) in zip(places, score(asked)):
                out[row, columns.to(out.device)] = topk_logits(top_ids.to(out.device), top_logprobs.to(out.device),
                                                               vocab)
        return out

    return call


def _to_width(logits: torch.Tensor, width: int) -> torch.Tensor:
    """The teacher's logits over the student's vocabulary: rows beyond it cut (a padded head), missing rows -inf."""
    if logits.shape[-1] >= width:
        return logits[..., :width]
    return torch.nn.functional.pad(logits, (0, width - logits.shape[-1]), value=float('-inf'))


def teacher_seed(seed: int, step: int, rank: int) -> int:
    """The seed of the teacher's replacement draws on rank ``rank`` at generation step ``step``: every rank its own
    stream, the same after a resume (like :func:`swift_gkd_plugin.core.modes.sampling_seed`, a separate stream)."""
    return sampling_seed(seed, step, rank, stream='skd')


def _ends(completion: List[int], eos: set, max_new_tokens: int, stop) -> bool:
    """A completion is complete at its budget, on an EOS token, or where ``stop`` says so."""
    if len(completion) >= max_new_tokens or (completion and completion[-1] in eos):
        return True
    return bool(completion) and stop is not None and bool(stop(completion))
