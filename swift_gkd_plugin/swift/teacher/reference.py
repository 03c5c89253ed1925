"""The reference of ``--gkd_ref_kl_coef``: the initial student, which a ``KL(student || reference)`` term anchors the
student to (StableOPD, arXiv 2604.08527: on-policy runs drift into long, repetitive samples without it).

A LoRA student's reference is its own base with the adapter off (no second copy); a fully tuned student's is a frozen
copy loaded from ``--model`` by ms-swift's own model loader (:func:`load_reference_copy`, called by the pipeline
patch in ``activation.py``), prepared for DeepSpeed, FSDP or plain DDP as ms-swift prepares a DPO reference.
"""
from __future__ import annotations

import torch
from swift.trainers import disable_gradient_checkpointing
from swift.utils import get_logger

from swift_gkd_plugin.core.divergence import generalized_jsd
from swift_gkd_plugin.swift.teacher.adapters import eval_mode
from swift_gkd_plugin.swift.step.token_metrics import add_token_sum

logger = get_logger()


def reference_is_a_copy(args) -> bool:
    """Whether ``--gkd_ref_kl_coef`` needs a separate reference model: on, for a fully tuned student."""
    return args.rlhf_type == 'gkd' and bool(getattr(args, 'gkd_ref_kl_coef', 0.0)) and args.tuner_type == 'full'


def load_reference_copy(pipeline) -> None:
    """After ms-swift's pipeline loaded its models: the frozen initial student as ``pipeline.ref_model`` (which
    ms-swift then hands to the trainer as ``ref_model``), loaded from ``--model`` as ms-swift loads a DPO reference."""
    args = pipeline.args
    if not reference_is_a_copy(args):
        return
    args.ref_model = args.model  # what ms-swift's loader reads for 'ref'; GKD keeps it None otherwise
    try:
        model, _ = pipeline._prepare_single_model('ref', None, args.model_type, args.model_revision)
    finally:
        args.ref_model = None
    pipeline.ref_model = model
    logger.info(f'swift_gkd_plugin: --gkd_ref_kl_coef {args.gkd_ref_kl_coef:g}: the reference is a frozen copy of '
                f'the initial student ({args.model})')


class Reference:
    """The reference model's placement and forward (``--gkd_ref_kl_coef``), built by the trainer with ``trainer``
    (the ms-swift trainer whose public state it reads: ``args``, ``accelerator``, ``model``, ``custom_metrics``, the
    DeepSpeed and FSDP flags) and ``ref_model``: the copy the pipeline loaded (a fully tuned student), else None."""

    def __init__(self, trainer, ref_model) -> None:
        self.trainer = trainer
        coef = trainer.args.gkd_ref_kl_coef
        self.model = None
        if not coef:
            return
        if ref_model is None:
            student = trainer.accelerator.unwrap_model(trainer.model)
            if not hasattr(student, 'disable_adapter'):
                raise ValueError(f'--gkd_ref_kl_coef {coef:g}: the student has no adapter to switch off and no '
                                 'reference copy was loaded (--tuner_type full loads one)')
            logger.info(f'swift_gkd_plugin: --gkd_ref_kl_coef {coef:g}: the reference is the student\'s base with its '
                        'adapter off (the initial student; no second copy)')
            return
        # as ms-swift's RLHFTrainerMixin prepares a DPO reference
        if trainer.is_deepspeed_enabled:
            from trl.models.utils import prepare_deepspeed
            self.model = prepare_deepspeed(ref_model, trainer.accelerator)
        elif trainer.is_fsdp_enabled:
            from swift.rlhf_trainers.utils import prepare_fsdp
            self.model = prepare_fsdp(ref_model, trainer.accelerator)
        else:
            self.model = trainer.accelerator.prepare_model(ref_model, evaluation_mode=True)

    def kl_sum(self, model, fwd, rows, student: torch.Tensor) -> torch.Tensor:
        """``sum KL(student || reference)`` over the response rows ``student`` ``[N, V]`` (``rows`` picks them from the
        reference's logits), at ``--temperature``; its mean per token is logged as ``gkd/ref_kl``."""
        trainer = self.trainer
        ref_kl = generalized_jsd(student, rows(self.logits(model, fwd)), 1.0, trainer.args.temperature)
        metrics = trainer.custom_metrics['train' if trainer.model.training else 'eval']
        add_token_sum(metrics['gkd/ref_kl'], ref_kl.detach().float().sum(), ref_kl.numel())
        return ref_kl.sum()

    @torch.no_grad()
    def logits(self, model, fwd) -> torch.Tensor:
        """The reference's logits on the student's own inputs ``fwd`` (same layout as the student's)."""
        if self.model is not None:
            return self.model(**fwd).logits
        unwrapped = self.trainer.accelerator.unwrap_model(model)
        with eval_mode(unwrapped), unwrapped.disable_adapter(), disable_gradient_checkpointing(
                model, self.trainer.args.gradient_checkpointing_kwargs):
            return model(**fwd).logits


__all__ = ['Reference', 'load_reference_copy', 'reference_is_a_copy']
