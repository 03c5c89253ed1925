"""Autoregressive sampling from a model split by tensor and pipeline parallelism (pure ``torch.distributed``).

GKD needs completions sampled from the student (on-policy) or from the teacher (``seq_kd``). Without vLLM they are
sampled from the training model itself: :func:`generate` runs the decoding loop and leaves the forward to a callback,
``next_logits``, so that this module needs neither Megatron-core nor CUDA (it imports ``torch`` and the standard
library only) and is tested with gloo processes.

Megatron layout assumed:

* **Tensor parallelism (TP).** The output layer is column-parallel: every rank of a TP group holds the logits of the
  *same* tokens for a contiguous slice of the (padded) vocabulary, slices in TP-rank order. :func:`gather_vocab_shards`
  all-gathers them (slices may have different widths, also 0).
* **Pipeline parallelism (PP).** Only the last stage has logits; ``next_logits`` returns ``None`` on the other
  stages. The next tokens are chosen on the last stage and broadcast to every rank that runs the forward, because
  every stage must run every step on the same sequences.
* **Padded vocabulary.** Megatron pads the output layer to a multiple of ``make_vocab_size_divisible_by * tp``; the
  rows at and beyond ``vocab_size`` are never sampled.

Cost: there is no KV cache, each step re-runs the forward over the whole sequences, so generating ``T`` tokens after
a prompt of ``P`` tokens costs ``sum_t (P + t)`` token-forwards, ``O(P T + T^2)`` (quadratic attention on top). This is
the fallback for models that vLLM cannot serve or set-ups without vLLM; vLLM (colocated or server mode) is the fast
path.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

__all__ = ['gather_vocab_shards', 'generate', 'sample_next_token']

Group = Optional['dist.ProcessGroup']
NextLogits = Callable[[List[List[int]]], Optional[torch.Tensor]]

_MASK64 = (1 << 64) - 1

# ----------------------------------------------------------------------------------------------------------------
# collectives


def _dist_ready() -> bool:
    return dist.is_available() and dist.is_initialized()


def _group_size(group: Group) -> int:
    """Ranks in ``group``; 1 when ``torch.distributed`` is not initialised."""
    return dist.get_world_size(group) if _dist_ready() else 1


def _comm_device(group: Group) -> torch.device:
    """Where a small tensor must live to be sent over ``group``: the CPU for gloo, else the current accelerator."""
    backend = str(dist.get_backend(group))
    if 'gloo' in backend:  # 'gloo', or a multi-device backend such as 'cpu:gloo,cuda:nccl'
        return torch.device('cpu')
    accelerator = getattr(torch, 'accelerator', None)
    if accelerator is not None and accelerator.current_accelerator() is not None:
        return torch.device(accelerator.current_accelerator().type, accelerator.current_device_index())
    if torch.cuda.is_available():
        return torch.device('cuda', torch.cuda.current_device())
    return torch.device('cpu')


def gather_vocab_shards(shard: torch.Tensor, group: Group = None) -> torch.Tensor:
    """All-gather the vocabulary slices of a column-parallel output layer.

    Args:
        shard: ``[B, V_r]`` this rank's logits for a contiguous slice of the vocabulary; the ranks of ``group``
            hold the same ``B`` rows and their slices in group-rank order. Widths may differ between ranks (also 0).
        group: the tensor-parallel group (``None``: the default group). With one rank, or when
            ``torch.distributed`` is not initialised, ``shard`` is returned unchanged.

    Returns:
        ``[B, V]`` with ``V = sum_r V_r``, identical on every rank of ``group``, in ``shard``'s dtype and device.

    Every rank of ``group`` must call it (two all-gathers: the shapes, then the padded slices). Raises
    ``ValueError`` on every rank when the ranks disagree on ``B``.
    """
    if shard.dim() != 2:
        raise ValueError(f'shard must be [B, V_r], got shape {tuple(shard.shape)}')
    world = _group_size(group)
    if world == 1:
        return shard
    shard = shard.contiguous()
    shape = torch.tensor(list(shard.shape), dtype=torch.long, device=shard.device)
    shapes = [torch.empty_like(shape) for _ in range(world)]
    dist.all_gather(shapes, shape, group=group)
    rows = [int(s[0]) for s in shapes]
    widths = [int(s[1]) for s in shapes]
    if len(set(rows)) != 1:
        raise ValueError(f'the tensor-parallel ranks hold different numbers of rows: {rows}')
    width = max(widths)
    if shard.shape[1] != width:  # all_gather needs equal shapes: pad, then cut
        padded = shard.new_zeros(shard.shape[0], width)
        padded[:, :shard.shape[1]] = shard
        shard = padded
    parts = [torch.empty_like(shard) for _ in range(world)]
    dist.all_gather(parts, shard, group=group)
    return torch.cat([p[:, :w] for p, w in zip(parts, widths)], dim=1)


# ----------------------------------------------------------------------------------------------------------------
# sampling


def _check_sampling(temperature: float, top_k: Optional[int], top_p: Optional[float]):
    if top_k is not None and top_k < 0:
        raise ValueError(f'top_k must be None or >= 0, got {top_k}')
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f'top_p must be None or in (0, 1], got {top_p}')
    if temperature != temperature:  # nan
        raise ValueError('temperature is nan')


def _valid_vocab(logits: torch.Tensor, vocab_size: Optional[int]) -> torch.Tensor:
    """``logits[:, :vocab_size]``: drops Megatron's padded vocabulary rows."""
    if logits.dim() != 2:
        raise ValueError(f'logits must be [B, V], got shape {tuple(logits.shape)}')
    if vocab_size is None:
        return logits
    if not 0 < vocab_size <= logits.shape[1]:
        raise ValueError(f'vocab_size {vocab_size} is not in [1, {logits.shape[1]}] (the logits width)')
    return logits[:, :vocab_size]


def _filtered_probs(logits: torch.Tensor, temperature: float, top_k: Optional[int],
                    top_p: Optional[float]) -> torch.Tensor:
    """float32 ``softmax`` of ``logits / temperature`` after top-k then top-p filtering (transformers' warpers)."""
    x = logits.float() / temperature
    if top_k and top_k < x.shape[-1]:
        # TopKLogitsWarper: keep the values >= the k-th largest (ties at the k-th value are all kept)
        kth = torch.topk(x, top_k, dim=-1).values[:, -1:]
        x = x.masked_fill(x < kth, float('-inf'))
    if top_p is not None and top_p < 1.0:
        # TopPLogitsWarper: drop the tail of smallest probabilities whose total is <= 1 - top_p; keep at least one
        sorted_x, order = torch.sort(x, dim=-1, descending=False, stable=True)
        drop_sorted = sorted_x.softmax(-1).cumsum(-1) <= (1.0 - top_p)
        drop_sorted[:, -1] = False
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        x = x.masked_fill(drop, float('-inf'))
    return x.softmax(-1)


def _draw(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One ``torch.multinomial`` draw per row, on the generator's device; ``[B]`` int64 on that device."""
    if probs.shape[0] == 0:
        return torch.empty(0, dtype=torch.long, device=generator.device)
    return torch.multinomial(probs.to(generator.device), 1, generator=generator).squeeze(1)


def sample_next_token(logits: torch.Tensor,
                      *,
                      temperature: float,
                      top_k: Optional[int] = None,
                      top_p: Optional[float] = None,
                      generator: Optional[torch.Generator],
                      vocab_size: Optional[int] = None) -> torch.Tensor:
    """Choose one token per row from next-token logits.

    Args:
        logits: ``[B, V]`` full-vocabulary logits (any float dtype, any device).
        temperature: ``<= 0`` means greedy: ``argmax`` (the first maximum on ties); ``top_k``, ``top_p`` and
            ``generator`` are then ignored. ``> 0``: sample from ``softmax(logits / temperature)`` after filtering.
        top_k: keep the ``top_k`` largest logits of each row (and any tied with the ``top_k``-th); ``None`` or 0
            disables it.
        top_p: nucleus filtering, applied after ``top_k``: keep the smallest set of most probable tokens whose
            probability (after temperature and top-k) reaches ``top_p``, always at least one token (the exact rule
            of transformers' ``TopPLogitsWarper``: drop the least probable tokens while their cumulated probability
            is ``<= 1 - top_p``). ``None`` or 1.0 disables it; otherwise it must be in ``(0, 1)``.
        generator: the random source of the draws (``torch.multinomial``), required when sampling. The
            probabilities are moved to ``generator.device``, so a CPU generator gives the same tokens whatever the
            device of ``logits``; the same generator state and the same logits give the same tokens.
        vocab_size: the true vocabulary size; the columns ``>= vocab_size`` (Megatron's padding) are never chosen,
            however large their logits. ``None``: all ``V`` columns are valid.

    Returns:
        ``[B]`` int64 token ids on ``logits.device``.

    The filtering and the softmax are computed in float32.
    """
    _check_sampling(temperature, top_k, top_p)
    logits = _valid_vocab(logits, vocab_size)
    if temperature <= 0:
        return logits.argmax(-1)
    if generator is None:
        raise ValueError('sampling (temperature > 0) needs a torch.Generator')
    return _draw(_filtered_probs(logits, temperature, top_k, top_p), generator).to(logits.device)


def _mix64(x: int) -> int:
    """splitmix64's finaliser: a bijective, well-mixed 64-bit hash of a 64-bit integer (no Python ``hash()``)."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _row_seed(seed: int, row: int, step: int) -> int:
    """The seed of the draw of sequence ``row`` (its index in ``prompts``) at generated position ``step``."""
    return _mix64(_mix64(_mix64(seed & _MASK64) ^ row) ^ step) >> 1  # 63 bits: a valid manual_seed everywhere


def _choose(full: torch.Tensor, rows: Sequence[int], step: int, *, temperature: float, top_k: Optional[int],
            top_p: Optional[float], seed: int, vocab_size: Optional[int]) -> torch.Tensor:
    """The next token of every running sequence, ``[len(rows)]`` int64 on the CPU."""
    full = _valid_vocab(full, vocab_size)
    if temperature <= 0:
        return full.argmax(-1).cpu()
    probs = _filtered_probs(full, temperature, top_k, top_p).cpu()  # one device-to-host copy per step
    out = torch.empty(len(rows), dtype=torch.long)
    for j, row in enumerate(rows):
        gen = torch.Generator().manual_seed(_row_seed(seed, row, step))
        out[j] = torch.multinomial(probs[j], 1, generator=gen)[0]
    return out


# ----------------------------------------------------------------------------------------------------------------
# decoding loop


def _broadcast_tokens(tokens: Optional[torch.Tensor], n: int, src: int, group: Group) -> torch.Tensor:
    """``tokens`` of rank ``src`` on every rank of ``group`` (CPU int64 ``[n]``).

    A source without tokens sends ``-1`` everywhere, so that every rank raises instead of waiting forever.
    """
    if _group_size(group) == 1:
        if tokens is None:
            raise ValueError('broadcast_src holds no logits: next_logits returned None on it')
        return tokens
    device = _comm_device(group)
    if dist.get_rank() == src:
        buf = (tokens if tokens is not None else torch.full((n, ), -1, dtype=torch.long)).to(device)
    else:
        buf = torch.empty(n, dtype=torch.long, device=device)
    dist.broadcast(buf, src=src, group=group)
    if n and int(buf.min()) < 0:
        raise ValueError(f'broadcast_src (global rank {src}) holds no logits: next_logits returned None on it; it '
                         'must be a rank of the last pipeline stage')
    return buf.cpu()


def _any_running(local: bool, group: Group) -> bool:
    """Whether any rank of ``group`` still has a running sequence (one all-reduce MAX)."""
    if _group_size(group) == 1:
        return local
    flag = torch.tensor([int(local)], dtype=torch.long, device=_comm_device(group))
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    return bool(flag.item())


def _count(counts: Optional[Dict[str, int]], idle: bool) -> None:
    if counts is not None:
        counts['forwards'] = counts.get('forwards', 0) + 1
        counts['idle'] = counts.get('idle', 0) + int(idle)


def generate(next_logits: NextLogits,
             prompts: Sequence[Sequence[int]],
             *,
             max_new_tokens: int,
             eos_token_ids: Sequence[int],
             temperature: float = 1.0,
             top_k: Optional[int] = None,
             top_p: Optional[float] = None,
             seed: int,
             vocab_size: Optional[int] = None,
             tp_group: Group = None,
             broadcast_group: Group = None,
             broadcast_src: Optional[int] = None,
             sync_group: Group = None,
             counts: Optional[Dict[str, int]] = None) -> List[List[int]]:
    """Sample completions of ``prompts`` token by token with a tensor/pipeline-parallel model, without a KV cache.

    Each step calls ``next_logits`` once under ``torch.no_grad()``, with the token lists (prompt + tokens generated
    so far) of the **still-running** sequences, in prompt order (a fresh list per call, which it may keep or modify).
    It must return the ``[n, V_r]`` logits of the **last** position of each of the ``n`` sequences, this rank's
    vocabulary slice, or ``None`` on ranks that hold no logits (pipeline stages but the last). The slices are
    gathered over ``tp_group`` (:func:`gather_vocab_shards`), the next tokens chosen (:func:`sample_next_token`'s
    rules) and, when ``broadcast_src`` is given, broadcast from it over ``broadcast_group``. A sequence stops after
    it emits one of ``eos_token_ids`` (the EOS is kept in its completion) or after ``max_new_tokens`` tokens.

    Args:
        next_logits: the forward, see above. It runs on every rank of the model-parallel group, the same number of
            times with the same sequences (the collectives of a Megatron forward stay matched).
        prompts: ``B`` non-empty lists of token ids; the same on every rank of ``tp_group``/``broadcast_group``.
        max_new_tokens: the most tokens generated per sequence (``<= 0``: ``next_logits`` is never called).
        eos_token_ids: the tokens that end a sequence (may be empty).
        temperature, top_k, top_p: as in :func:`sample_next_token`; ``temperature <= 0`` is greedy decoding.
        seed: the randomness. Sequence ``i`` draws its ``t``-th token with its own CPU generator seeded from
            ``(seed, i, t)`` (a fixed integer hash, no Python ``hash()``), so all ranks draw the same tokens, and a
            sequence's draws do not depend on when the others stop. Give every data-parallel replica its own seed
            (and a new one per step), the same within a model-parallel group.
        vocab_size: the true vocabulary size; padded columns ``>= vocab_size`` are never chosen.
        tp_group: the tensor-parallel group over which the vocabulary is split (``None``: the default group; a
            one-rank group or no ``torch.distributed``: the slice is the full vocabulary).
        broadcast_group, broadcast_src: where the tokens come from. ``broadcast_src`` is the **global** rank that
            sends (a rank of the last pipeline stage); ``broadcast_group`` (``None``: the default group) the ranks
            that receive, e.g. the model-parallel group (TP x PP) with ``broadcast_src`` its last stage's first TP
            rank, or each rank's pipeline group with ``broadcast_src`` that pipeline's last rank. The sender's
            tokens are authoritative: a receiver that sampled its own overwrites them. ``None`` (no broadcast)
            fits a single pipeline stage: the TP ranks then rely on choosing identical tokens from the identical
            gathered logits, and a rank whose ``next_logits`` returns ``None`` raises ``ValueError``.
        sync_group: for forwards with collectives *across* data-parallel replicas, e.g. MoE expert parallelism whose
            all-to-alls span replicas generating different prompts. The loop then runs until no rank of
            ``sync_group`` has a running sequence with tokens left to generate (one all-reduce MAX per step); a rank
            that is done keeps calling ``next_logits`` with all of its (finished) sequences and ignores the result.
            The replicas may differ in prompts, their number (also 0: ``next_logits`` then gets an empty list) and
            ``max_new_tokens``. ``None``: no synchronisation across replicas.
        counts: if given, ``counts['forwards']`` is increased by the number of ``next_logits`` calls and
            ``counts['idle']`` by those of them made only to match ``sync_group``'s collectives (the cost of rows
            that stop at different lengths on different replicas).

    Returns:
        the ``B`` completions (generated ids only, EOS included when emitted), in prompt order, identical on every
        rank of ``broadcast_group`` (of ``tp_group`` without a broadcast).

    How the loop stops identically everywhere: after each step every rank holds the same tokens (the broadcast, or
    the same deterministic choice on the TP ranks of a single stage), hence the same running set; the loop ends when
    the running set is empty or after ``max_new_tokens`` steps, decided locally from these identical states without
    any extra collective, so every rank of the model-parallel group makes exactly the same calls to ``next_logits``
    and to the collectives (with ``sync_group``: also the same number of calls across it).

    Cost: no KV cache, step ``t`` re-runs the forward over the ``P + t`` tokens of each sequence, ``O(P T + T^2)``
    token-forwards for ``T`` new tokens (plus quadratic attention). Per step: two all-gathers over ``tp_group``, one
    broadcast, and one ``[n, V]`` float32 device-to-host copy when sampling. vLLM is the fast path.
    """
    _check_sampling(temperature, top_k, top_p)
    prompts = [[int(t) for t in p] for p in prompts]
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f'prompt {i} is empty')
    eos = frozenset(int(t) for t in eos_token_ids)
    completions: List[List[int]] = [[] for _ in prompts]
    running = list(range(len(prompts)))
    step = 0
    while True:
        active = bool(running) and step < max_new_tokens
        if sync_group is not None:
            if not _any_running(active, sync_group):
                break
            if not active:  # idle replica: a forward whose output is ignored, to match the collectives
                with torch.no_grad():
                    next_logits([p + c for p, c in zip(prompts, completions)])
                _count(counts, idle=True)
                continue
        elif not active:
            break
        with torch.no_grad():
            shard = next_logits([prompts[i] + completions[i] for i in running])
        _count(counts, idle=False)
        tokens = None
        if shard is not None:
            if shard.dim() != 2 or shard.shape[0] != len(running):
                raise ValueError(f'next_logits returned shape {tuple(shard.shape)} for {len(running)} sequences; '
                                 'expected [n, V_r]')
            full = gather_vocab_shards(shard, tp_group)
            tokens = _choose(full, running, step, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                             vocab_size=vocab_size)
        if broadcast_src is not None:
            tokens = _broadcast_tokens(tokens, len(running), broadcast_src, broadcast_group)
        elif tokens is None:
            raise ValueError('next_logits returned None (a rank without logits) but no broadcast_src is given')
        for i, token in zip(running, tokens.tolist()):
            completions[i].append(token)
        running = [i for i in running if completions[i][-1] not in eos]
        step += 1
    return completions
