"""Sampling without vLLM in ``megatron rlhf``: from samples to prompt tokens, and from sampled tokens back to samples.

The glue between ms-swift's GKD samples (``swift.rl_core.data.GKDSample``) and the framework-free sampling loop
(:func:`swift_gkd_plugin.megatron.rollout.generation.generate`). Uses ms-swift's template and protocol classes only (no
Megatron import), so that it runs, and is tested, without CUDA.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from swift.infer_engine.protocol import (ChatCompletionResponse, ChatCompletionResponseChoice, ChatMessage,
                                         RolloutOutput, UsageInfo)
from swift.utils import remove_response

from swift_gkd_plugin.core.constants import IGNORE_INDEX
from swift_gkd_plugin.core.views import with_teacher_prompt

_MEDIA = ('images', 'videos', 'audios')


def has_media(sample) -> bool:
    return any(getattr(sample, key, None) for key in _MEDIA)


def prompt_request(sample, teacher: bool = False):
    """The inference request of a sample's prompt (its response removed); ``teacher=True``: the teacher's view
    (``teacher_messages``, from a ``teacher_prompt`` or ``teacher_messages`` column) when the sample has one."""
    request = sample.to_infer_request()
    request.messages = [dict(m) for m in request.messages]
    remove_response(request.messages)
    return with_teacher_prompt(sample, request) if teacher else request


def encode_prompts(template, samples: Sequence, teacher: bool = False) -> List[List[int]]:
    """Prompt token ids (ending with the assistant's generation prompt), as ms-swift's inference engines make them.

    Sampling from the Megatron model re-encodes only token ids, so samples with images, videos or audio are refused
    (multimodal on-policy steps need vLLM; multimodal seq_kd is not available in megatron rlhf).
    """
    ids = []
    with template.generate_context():
        for sample in samples:
            if has_media(sample):
                raise ValueError('sampling from the Megatron model supports text-only samples; this batch has '
                                 'images, videos or audio: for multimodal models use --use_vllm true (on-policy '
                                 'steps) and --seq_kd false (the teacher samples without vLLM)')
            ids.append(list(template.encode(prompt_request(sample, teacher))['input_ids']))
    return ids


def rollout_outputs(tokenizer, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]],
                    eos_token_ids: Sequence[int]) -> List[RolloutOutput]:
    """ms-swift rollout outputs for sampled completions, with their token ids (so that the training encoding uses
    exactly the sampled tokens, not a re-tokenisation of the decoded text)."""
    eos = set(eos_token_ids)
    outputs = []
    for prompt, tokens in zip(prompts, completions):
        tokens = list(tokens)
        finished = bool(tokens) and tokens[-1] in eos
        text = tokenizer.decode(tokens[:-1] if finished else tokens, skip_special_tokens=False)
        choice = ChatCompletionResponseChoice(
            index=0, message=ChatMessage(role='assistant', content=text),
            finish_reason='stop' if finished else 'length', token_ids=tokens)
        usage = UsageInfo(prompt_tokens=len(prompt), completion_tokens=len(tokens),
                          total_tokens=len(prompt) + len(tokens))
        outputs.append(RolloutOutput(response=ChatCompletionResponse(model='megatron', choices=[choice], usage=usage),
                                     response_token_ids=[tokens]))
    return outputs


def collate_for_forward(template, sequences: Sequence[Sequence[int]],
                        padding_to: Optional[int] = None) -> Tuple[Dict[str, torch.Tensor], List[Tuple[int, int]]]:
    """A training-format batch of token sequences (no loss positions) and the ``(row, column)`` of each sequence's
    last token in the model's logits: right-padded rows, or one packed row with ``--padding_free``."""
    items = [{'input_ids': list(seq), 'labels': [IGNORE_INDEX] * len(seq), 'length': len(seq)} for seq in sequences]
    rows = list(items)  # the collator packs ``items`` in place
    batch = template.data_collator(items, padding_to=padding_to)
    lengths = [len(seq) for seq in sequences]
    if template.padding_free:  # with context parallelism each sequence is padded to a multiple of 2 CP, in place
        starts = [0] + torch.tensor([len(row['input_ids']) for row in rows]).cumsum(0).tolist()[:-1]
        positions = [(0, start + length - 1) for start, length in zip(starts, lengths)]
    else:
        positions = [(row, length - 1) for row, length in enumerate(lengths)]
    return batch, positions


def last_logits(logits: torch.Tensor, positions: Sequence[Tuple[int, int]]) -> torch.Tensor:
    """The ``[B, V_r]`` logits at each sequence's last token, from ``[rows, seq, V_r]`` logits."""
    rows = torch.tensor([r for r, _ in positions], device=logits.device)
    cols = torch.tensor([c for _, c in positions], device=logits.device)
    return logits[rows, cols]


def last_logits_cp(logits: torch.Tensor, positions: Sequence[Tuple[int, int]], cu_seqlens: Optional[Sequence[int]],
                   group) -> torch.Tensor:
    """:func:`last_logits` when context parallelism split every sequence over ``group`` (Megatron-SWIFT's
    ``get_batch_on_this_cp_rank``: of a sequence's 2 CP equal chunks rank r holds r and 2 CP - 1 - r, in that order).

    ``positions`` are in the unsplit batch; ``cu_seqlens``: the packed row's (padded) sequence bounds, None for one
    sequence per row. Each rank fills the positions it holds, zeros elsewhere; one all-reduce (sum) over ``group``
    gives every rank all of them, bit-exact.
    """
    cp, rank = dist.get_world_size(group), dist.get_rank(group)
    width = logits.shape[1] * cp  # an unpacked row's whole length
    out = logits.new_zeros(len(positions), logits.shape[-1])
    for i, (row, col) in enumerate(positions):
        start, end = 0, width
        if cu_seqlens is not None:
            start, end = next((int(a), int(b)) for a, b in zip(cu_seqlens[:-1], cu_seqlens[1:]) if a <= col < b)
        chunk = (end - start) // (2 * cp)
        index, offset = divmod(col - start, chunk)
        if index == rank or index == 2 * cp - 1 - rank:
            out[i] = logits[row, start // cp + (0 if index < cp else chunk) + offset]
    dist.all_reduce(out, group=group)
    return out
