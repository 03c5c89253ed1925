"""Hidden states instead of logits from a (wrapped) causal LM, for the fused loss.

The forward must still go through the DDP / DeepSpeed wrapper (its hooks prepare gradient synchronisation), so
instead of calling the decoder directly the output head is swapped for an identity for the duration of one forward:
the model's ``logits`` are then the last hidden states (``logits_to_keep`` trimming included), and the fused loss
applies the real head chunk by chunk.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import List, Optional, Tuple

import torch
from torch import nn

from swift_gkd_plugin.core.policy_gradient import token_logprobs

# config attributes of models that transform the logits after the head (the fused loss would skip that)
_LOGIT_TRANSFORMS = ('final_logit_softcapping', 'logit_scale', 'logits_scaling', 'output_multiplier_scale')


def causal_lm(model: nn.Module) -> nn.Module:
    """The ``*ForCausalLM`` module inside torch.compile's and a PEFT wrapper (or the model itself)."""
    model = getattr(model, '_orig_mod', model)  # torch.compile's OptimizedModule (--torch_compile)
    get_base = getattr(model, 'get_base_model', None)
    return get_base() if callable(get_base) else model


def _head_name(lm: nn.Module) -> Optional[str]:
    head = lm.get_output_embeddings() if hasattr(lm, 'get_output_embeddings') else None
    for name, module in lm.named_children():
        if module is head:
            return name
    return None


def output_head(model: nn.Module) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(weight, bias)`` of the output head, for the fused loss."""
    head = causal_lm(model).get_output_embeddings()
    return head.weight, getattr(head, 'bias', None)


def head_is_sharded(model: nn.Module) -> bool:
    """Whether DeepSpeed ZeRO-3 partitions the model's output head."""
    return hasattr(output_head(model)[0], 'ds_id')


def head_rows(model: nn.Module) -> int:
    """The number of output rows (the vocabulary the head scores), also for a ZeRO-3 shard."""
    weight = output_head(model)[0]
    return weight.ds_shape[0] if hasattr(weight, 'ds_shape') else weight.shape[0]


def gathered_heads(models: List[Optional[nn.Module]]):
    """A context in which the output heads of ``models`` hold their full weights, also under DeepSpeed ZeRO-3.

    ZeRO-3 keeps only a shard of each parameter outside the forward of the module that owns it, and a bypassed
    head never runs its forward. For reading only (a frozen teacher's head): a gradient must not reach a head
    gathered this way, since ZeRO-3 accumulates it only into a whole parameter. Outside ZeRO-3 this is a no-op.
    """
    params = []
    for model in models:
        if model is None:
            continue
        weight, bias = output_head(model)
        params += [p for p in (weight, bias) if p is not None and hasattr(p, 'ds_id')]
    if not params:
        return nullcontext()
    import deepspeed
    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


@contextmanager
def head_bypassed(model: nn.Module, enabled: bool = True):
    """Inside this block the model's forward returns its last hidden states in place of logits."""
    if not enabled:
        yield
        return
    lm = causal_lm(model)
    name = _head_name(lm)
    head = getattr(lm, name)
    setattr(lm, name, nn.Identity())
    try:
        yield
    finally:
        setattr(lm, name, head)


def fused_fallback_reason(trainer) -> Optional[str]:
    """Why the fused loss cannot run in this trainer's configuration, or None when it can."""
    if trainer.teacher.xtok is not None:
        return 'cross-tokenizer distillation (--gkd_cross_tokenizer) compares aligned positions of two vocabularies'
    if getattr(trainer.args, 'gkd_ref_kl_coef', 0.0):
        return '--gkd_ref_kl_coef compares the student\'s full logits with the reference\'s'
    for label, model in (('student', trainer.accelerator.unwrap_model(trainer.model)),
                         ('teacher', None if trainer.teacher_model is None else trainer.accelerator.unwrap_model(
                             trainer.teacher_model))):
        if model is None:
            continue
        lm = causal_lm(model)
        head = lm.get_output_embeddings() if hasattr(lm, 'get_output_embeddings') else None
        if head is None or _head_name(lm) is None:
            return f'the {label} model has no output head module'
        if type(head) is not nn.Linear:
            return (f'the {label} output head is a {type(head).__name__} (e.g. a LoRA adapter on lm_head), '
                    'which the fused loss does not fold in')
        config = getattr(lm, 'config', None)
        for attr in _LOGIT_TRANSFORMS:
            if getattr(config, attr, None) not in (None, 0, 1, 1.0):
                return f'the {label} model transforms its logits after the head ({attr})'
    if getattr(trainer.args, 'ddp_find_unused_parameters', None):
        return 'ddp_find_unused_parameters=True would mark the bypassed head unused'
    return None


@torch.no_grad()
def topk_from_hidden(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], k: int,
                     student_vocab: int, chunk_size: int = 1024, tokens: Optional[torch.Tensor] = None):
    """The teacher's top-k ids and full-vocabulary log-probs, made chunk by chunk from its hidden states.

    Ids of the teacher's padded output rows (``>= student_vocab``) are marked unused (-inf). With ``tokens`` (``[N]``
    next-token ids) also each one's log-prob at temperature 1 (:func:`token_logprobs`), from the same chunk of
    logits: one pass of the head over the vocabulary instead of two.
    """
    ids, logprobs, targets = [], [], []
    for start in range(0, hidden.shape[0], chunk_size):
        logits = hidden[start:start + chunk_size].to(weight.dtype) @ weight.t()  # the head's dtype, as the model
        if bias is not None:
            logits = logits + bias
        lp, ix = torch.log_softmax(logits.float(), -1).topk(k, dim=-1)
        outside = ix >= student_vocab
        ids.append(ix.masked_fill(outside, 0))
        logprobs.append(lp.masked_fill(outside, float('-inf')))
        if tokens is not None:
            targets.append(token_logprobs(logits, tokens[start:start + chunk_size]))
    if not ids:
        empty = (torch.zeros(0, k, dtype=torch.long, device=hidden.device),
                 torch.zeros(0, k, dtype=torch.float32, device=hidden.device))
        return empty if tokens is None else empty + (torch.zeros(0, dtype=torch.float32, device=hidden.device), )
    out = torch.cat(ids), torch.cat(logprobs)
    return out if tokens is None else out + (torch.cat(targets), )
