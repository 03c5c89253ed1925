"""Distillation losses between distributions over DIFFERENT vocabularies.

Rows are aligned positions (:func:`swift_gkd_plugin.core.cross_tokenizer.alignment.align_positions`): row ``n`` of the
student logits and row ``n`` of the teacher logits predict the next token after the same text.

Universal logit distillation (ULD; Boizard et al., 2024, "Towards Cross-Tokenizer Distillation: the Universal Logit
Distillation Loss for LLMs", arXiv:2402.12030): with ``p_s = softmax(student_logits / T)`` and
``p_t = softmax(teacher_logits / T)`` each sorted in decreasing order and the shorter zero-padded to the longer
length ``V = max(V_s, V_t)``::

    ULD(n) = sum_{k < V} | sort(p_s[n])_k - sort(p_t[n])_k |

(the closed form of the Wasserstein-1 distance the paper bounds, with all tokens at unit distance apart). It ignores
which token carries which probability, so it needs no vocabulary mapping, and it is invariant to permuting either
vocabulary.

Hybrid (GOLD, TRL ``trl/experimental/gold/gold_trainer.py``, ``ULDLoss._compute_hybrid_uld_loss``): the entries
shared by both vocabularies (same text) are compared token by token with the generalized JSD, the rest with ULD::

    hybrid(n) = w_shared * JSD_beta([p_s|shared, p_s(rest)], [p_t|shared, p_t(rest)]) + w_rest * ULD(p_s|rest, p_t|rest)

with GOLD's adaptive weights ``w_shared = K / V_t`` (``K`` shared entries) and ``w_rest = 1 - w_shared`` unless
given. Where we differ from GOLD, and why: GOLD feeds the shared probabilities to its JSD un-normalised (clamped at
1e-8), which is not a divergence (it can be negative when the two sides put different mass on the shared set); here
the first term is a proper divergence over ``K + 1`` buckets: the shared entries of each side's full distribution
and one bucket holding its mass outside the shared set (as the top-k tail bucket). So a student putting its mass on
entries the teacher lacks is penalised even when ``w_rest`` is 0 (every teacher entry shared, ``K = V_t``), which a
renormalised shared set let pass (0.97 of the student's mass unshared gave a loss of 1.9e-8). With every entry
shared on both sides there is no bucket and the hybrid is exactly the project's generalized JSD. The ULD term
compares how each side spreads its rest mass (un-normalised). ``beta`` has the project's meaning
(0 = ``KL(teacher||student)``, 1 = ``KL(student||teacher)``; the same as TRL's GKD and GOLD).

Top-k teacher: neither ULD nor GOLD defines a loss on a truncated teacher row (the sorted teacher vector beyond the
top k is unknown, and the zero padding of ULD would treat it as zero probability), so both losses need the full
teacher row.

Memory: rows are processed ``chunk_size`` at a time and, when a gradient is needed, each chunk is checkpointed, so no
``[N, V_s]`` + ``[N, V_t]`` float32 pair of probabilities (nor the sort indices) lives beyond one chunk; the backward
pass recomputes a chunk's forward.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch.utils.checkpoint import checkpoint

from swift_gkd_plugin.core.divergence import generalized_jsd
from swift_gkd_plugin.core.row_divergence import Divergence, as_divergence

__all__ = ['hybrid_loss', 'uld_loss']

DEFAULT_CHUNK = 256


def _check(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
           teacher_index: Optional[torch.Tensor] = None) -> None:
    if not 0 < temperature < float('inf'):
        raise ValueError(f'temperature must be a finite number > 0, got {temperature}')
    n_teacher = len(teacher_logits) if teacher_index is None else len(teacher_index)
    if student_logits.dim() != 2 or teacher_logits.dim() != 2 or len(student_logits) != n_teacher:
        raise ValueError(f'student {tuple(student_logits.shape)} and teacher {tuple(teacher_logits.shape)} logits must '
                         'be [N, V_student] and [N, V_teacher] with one row per aligned position (or [M, V_teacher] '
                         'with an [N] teacher_index)')


def _sorted_l1(p_s: torch.Tensor, p_t: torch.Tensor) -> torch.Tensor:
    """``sum_k |sort(p_s)_k - sort(p_t)_k|`` per row, the shorter sorted vector zero-padded."""
    s = p_s.sort(-1, descending=True).values
    t = p_t.sort(-1, descending=True).values
    width = max(s.shape[-1], t.shape[-1])
    s = torch.nn.functional.pad(s, (0, width - s.shape[-1]))
    t = torch.nn.functional.pad(t, (0, width - t.shape[-1]))
    return (s - t).abs().sum(-1)


def _by_chunks(fn, student_logits: torch.Tensor, teacher_logits: torch.Tensor, chunk_size: Optional[int],
               teacher_index: Optional[torch.Tensor] = None):
    """``fn(student_chunk, teacher_chunk) -> [c]`` over row chunks, checkpointed when a gradient is recorded.

    With ``teacher_index``, student row ``n`` pairs with teacher row ``teacher_index[n]``, gathered one chunk at a
    time: the aligned ``[N, V_teacher]`` copy of the teacher rows never exists whole."""
    chunk = chunk_size or DEFAULT_CHUNK
    if chunk < 1:
        raise ValueError(f'chunk_size must be >= 1, got {chunk_size}')
    record = torch.is_grad_enabled() and student_logits.requires_grad
    out = []
    for start in range(0, len(student_logits), chunk):
        rows = slice(start, start + chunk) if teacher_index is None else teacher_index[start:start + chunk]
        s, t = student_logits[start:start + chunk], teacher_logits[rows].detach()
        out.append(checkpoint(fn, s, t, use_reentrant=False) if record else fn(s, t))
    if not out:  # no row: an empty result that still belongs to the student's graph
        return student_logits.float().sum(-1)
    return torch.cat(out)


def uld_loss(student_logits: torch.Tensor,
             teacher_logits: torch.Tensor,
             temperature: float = 1.0,
             chunk_size: Optional[int] = None,
             teacher_index: Optional[torch.Tensor] = None) -> torch.Tensor:
    r"""Universal logit distillation distance per aligned position.

    .. math::
        \mathrm{ULD}_n = \sum_{k} \left| \operatorname{sort}^\downarrow(p^s_n)_k
        - \operatorname{sort}^\downarrow(p^t_n)_k \right|, \quad
        p^s_n = \operatorname{softmax}(z^s_n / T),\; p^t_n = \operatorname{softmax}(z^t_n / T)

    the shorter sorted vector zero-padded (Boizard et al., 2024, arXiv:2402.12030; TRL GOLD ``ULDLoss``). In
    ``[0, 2]``; 0 exactly when the two sorted distributions are equal.

    Args:
        student_logits: ``[N, V_s]`` (any float dtype; differentiable, through the sort).
        teacher_logits: ``[N, V_t]``, ``V_t`` may differ from ``V_s`` (no gradient flows to it).
        temperature: ``T > 0``, divides both logits.
        chunk_size: rows per chunk (default 256); float32 temporaries are ``chunk x V``.
        teacher_index: ``[N]`` int64, optional: student row ``n`` pairs with ``teacher_logits[teacher_index[n]]``
            (``teacher_logits`` then has any number of rows), gathered chunk by chunk.

    Returns:
        ``[N]`` float32.
    """
    _check(student_logits, teacher_logits, temperature, teacher_index)

    def chunk_loss(s, t):
        return _sorted_l1(torch.softmax(s.float() / temperature, -1), torch.softmax(t.float() / temperature, -1))

    return _by_chunks(chunk_loss, student_logits, teacher_logits, chunk_size, teacher_index)


def _complement(ids: torch.Tensor, size: int) -> torch.Tensor:
    keep = torch.ones(size, dtype=torch.bool, device=ids.device)
    keep[ids] = False
    return keep.nonzero().squeeze(-1)


def _with_rest_bucket(logits: torch.Tensor, shared: torch.Tensor, rest: torch.Tensor,
                      temperature: float) -> torch.Tensor:
    """``[n, K + 1]``: the shared logits and one more whose tempered softmax weight is the tempered mass of the rest
    (``T * logsumexp(z_rest / T)``; ``-inf`` when the rest is empty), so ``softmax(. / T)`` of it is the full
    distribution's shared entries, un-normalised, and its rest mass."""
    bucket = temperature * torch.logsumexp(logits[:, rest].float() / temperature, -1, keepdim=True)
    return torch.cat([logits[:, shared].float(), bucket], -1)


def hybrid_loss(student_logits: torch.Tensor,
                teacher_logits: torch.Tensor,
                student_shared_ids: torch.Tensor,
                teacher_shared_ids: torch.Tensor,
                divergence: Union[float, Divergence],
                temperature: float = 1.0,
                chunk_size: Optional[int] = None,
                shared_weight: Optional[float] = None,
                rest_weight: Optional[float] = None,
                teacher_index: Optional[torch.Tensor] = None) -> torch.Tensor:
    r"""GOLD's hybrid: generalized JSD on the shared vocabulary, ULD on the rest, per aligned position.

    .. math::
        H_n = w_{sh}\, D_\beta\big([p^s_{n,S_s}, p^s_n(\bar S_s)], [p^t_{n,S_t}, p^t_n(\bar S_t)]\big)
        + w_{re}\, \mathrm{ULD}\big(p^s_{n,\bar S_s}, p^t_{n,\bar S_t}\big)

    where ``S_s[k] = student_shared_ids[k]`` and ``S_t[k] = teacher_shared_ids[k]`` are the same text
    (:func:`~swift_gkd_plugin.core.cross_tokenizer.alignment.shared_vocabulary`), ``D_beta`` is
    :func:`~swift_gkd_plugin.core.divergence.generalized_jsd` over ``K + 1`` buckets: the shared entries of the full
    distribution ``p = softmax(z / T)`` and one bucket with each side's mass outside the shared set (as the top-k
    tail bucket), and the ULD term takes the full-vocabulary probabilities of the entries outside the shared set,
    NOT renormalised. Weights default to GOLD's ``w_sh = K / V_t``, ``w_re = 1 - w_sh``.
    With every entry shared in the same order this is exactly ``generalized_jsd``. See the module docstring for
    where and why this departs from GOLD.

    Args:
        student_logits: ``[N, V_s]`` (differentiable). teacher_logits: ``[N, V_t]``.
        student_shared_ids, teacher_shared_ids: ``[K]`` int64, one-to-one.
        divergence: a :class:`~swift_gkd_plugin.core.row_divergence.Divergence`, or the generalized JSD's beta in
            ``[0, 1]``; 0 = ``KL(teacher||student)``, 1 = ``KL(student||teacher)``.
        temperature: ``T > 0``. chunk_size: rows per chunk (default 256).
        shared_weight, rest_weight: fixed weights instead of GOLD's adaptive ones (give both or neither).
        teacher_index: ``[N]`` int64, optional, as in :func:`uld_loss`.

    Returns:
        ``[N]`` float32.
    """
    _check(student_logits, teacher_logits, temperature, teacher_index)
    divergence = as_divergence(divergence)
    vs, vt = student_logits.shape[-1], teacher_logits.shape[-1]
    k = len(student_shared_ids)
    if len(teacher_shared_ids) != k or k == 0:
        raise ValueError(f'the shared vocabulary must be non-empty and one-to-one: {k} student ids, '
                         f'{len(teacher_shared_ids)} teacher ids')
    if (shared_weight is None) != (rest_weight is None):
        raise ValueError('give both shared_weight and rest_weight, or neither (GOLD adaptive weights)')
    if shared_weight is None:
        shared_weight = k / vt
        rest_weight = 1.0 - shared_weight
    s_ids = student_shared_ids.to(student_logits.device)
    t_ids = teacher_shared_ids.to(teacher_logits.device)
    s_rest, t_rest = _complement(s_ids, vs), _complement(t_ids, vt)

    bucket = bool(len(s_rest) or len(t_rest))  # every entry shared on both sides: no rest, exactly the JSD

    def chunk_loss(s, t):
        if bucket:
            s_shared, t_shared = (_with_rest_bucket(s, s_ids, s_rest, temperature),
                                  _with_rest_bucket(t, t_ids, t_rest, temperature))
        else:
            s_shared, t_shared = s[:, s_ids], t[:, t_ids]
        loss = shared_weight * generalized_jsd(s_shared, t_shared, divergence, temperature, chunk_size=len(s))
        if rest_weight and (len(s_rest) or len(t_rest)):
            p_s = torch.softmax(s.float() / temperature, -1)[:, s_rest]
            p_t = torch.softmax(t.float() / temperature, -1)[:, t_rest]
            loss = loss + rest_weight * _sorted_l1(p_s, p_t)
        return loss

    return _by_chunks(chunk_loss, student_logits, teacher_logits, chunk_size, teacher_index)
