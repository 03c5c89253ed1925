"""The GKD loss of a training step or an evaluation batch recomputed in float64 from its definition, for the tests that
hold the trainers' glue (normalisers, coefficients, which term applies in which mode) to it.

Independent of the plugin's loss code: the tiny models run here in float64, one row at a time without padding; the
divergence is :func:`tests.core.test_divergence.reference_jsd` (probabilities, not log-space); the SFT term is the
cross-entropy of the student's logits (temperature 1) at the labelled positions. The definition, as the guide states
it (docs_en/README.md, "The loss"): over the optimizer step's micro-batches,

    loss = (gkd_divergence_coef * sum_tokens D_beta,T(student, teacher)
            + sft_alpha * [mode is not on-policy] * sum_tokens CE(student, label)) / (response tokens of the step)

where a token is a position whose (shifted) label is not -100, in the student's view, paired in order with the
teacher view's labelled positions.
"""
from __future__ import annotations

import functools
import os
import sys
from dataclasses import dataclass
from typing import Dict, List, Sequence

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), 'core'))
from test_divergence import reference_jsd  # noqa: E402 - the float64 definition of the divergence, one place

IGNORE = -100


@functools.lru_cache(maxsize=4)
def float64_model(path: str):
    """The HF model folder ``path`` in float64, in evaluation mode."""
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float64).eval()


def _labelled_logits(model, ids: Sequence[int], labels: Sequence[int], mask) -> tuple:
    """``(logits [N, V], targets [N])`` at the positions of one row whose next token is labelled (padding dropped)."""
    keep = [i for i in range(len(ids)) if mask is None or mask[i]]
    ids_t = torch.tensor([[ids[i] for i in keep]])
    labels_t = torch.tensor([labels[i] for i in keep])
    with torch.no_grad():
        logits = model(input_ids=ids_t).logits[0, :-1]
    targets = labels_t[1:]
    on = targets != IGNORE
    return logits[on], targets[on]


@dataclass
class Sums:
    """Float64 sums over one micro-batch's response tokens."""
    divergence: float
    cross_entropy: float
    tokens: int


def batch_sums(batch: Dict, student_dir: str, teacher_dir: str, beta: float, temperature: float) -> Sums:
    """The sums of one micro-batch as the probe (``tests/multi_turn_plugin.py``, ``GKD_TEST_TRAJ_LOG``) recorded it."""
    student, teacher = float64_model(student_dir), float64_model(teacher_dir)
    div = ce = 0.0
    tokens = 0
    rows = len(batch['input_ids'])
    masks, teacher_masks = (batch.get(key) or [None] * rows for key in ('attention_mask', 'teacher_attention_mask'))
    for r in range(rows):
        s_logits, targets = _labelled_logits(student, batch['input_ids'][r], batch['labels'][r], masks[r])
        t_logits, t_targets = _labelled_logits(teacher, batch['teacher_input_ids'][r], batch['teacher_labels'][r],
                                               teacher_masks[r])
        assert torch.equal(targets, t_targets), 'the two views label different tokens'
        assert s_logits.shape[-1] == t_logits.shape[-1], 'the reference assumes one vocabulary'
        div += float(reference_jsd(s_logits, t_logits, beta, temperature).sum())
        ce += float(torch.nn.functional.cross_entropy(s_logits, targets, reduction='sum'))
        tokens += int(targets.numel())
    return Sums(div, ce, tokens)


@dataclass
class Expected:
    """One step's (or evaluation batch's) loss and the divergence's token mean (``gkd/loss_<mode>``)."""
    loss: float
    divergence: float
    cross_entropy: float
    mode: str
    tokens: int


def expected(batches: List[Dict], student_dir: str, teacher_dir: str, *, beta: float, temperature: float,
             divergence_coef: float = 1.0, sft_alpha: float = 0.0) -> Expected:
    """The loss of the micro-batches of one optimizer step (all of one mode), from the definition above."""
    modes = {b['mode'] for b in batches}
    assert len(modes) == 1, modes
    mode = modes.pop().split('.')[-1].lower()  # 'Mode.ON_POLICY' -> 'on_policy'
    sums = [batch_sums(b, student_dir, teacher_dir, beta, temperature) for b in batches]
    n = sum(s.tokens for s in sums)
    div, ce = sum(s.divergence for s in sums), sum(s.cross_entropy for s in sums)
    sft = sft_alpha if mode != 'on_policy' else 0.0
    return Expected((divergence_coef * div + sft * ce) / n, div / n, ce / n, mode, n)


def dataset_batch(dataset: str, student_dir: str, max_length: int = 128) -> Dict:
    """The rows of a jsonl ``dataset`` as ms-swift's ``qwen3_nothinking`` template encodes them for training, as one
    off-policy micro-batch record (the teacher's view equal to the student's)."""
    import json

    from swift.model import get_processor
    from swift.template import get_template
    template = get_template(get_processor(student_dir, model_type='qwen3'), template_type='qwen3_nothinking',
                            max_length=max_length)
    template.set_mode('train')
    with open(dataset) as f:
        encoded = [template.encode({'messages': json.loads(line)['messages']}) for line in f]
    ids, labels = [e['input_ids'] for e in encoded], [e['labels'] for e in encoded]
    return {'kind': 'batch', 'mode': 'Mode.OFF_POLICY', 'input_ids': ids, 'labels': labels, 'teacher_input_ids': ids,
            'teacher_labels': labels}
