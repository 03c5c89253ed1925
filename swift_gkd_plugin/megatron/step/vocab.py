"""The model's own vocabulary size in ``megatron rlhf``: Megatron pads its output layer beyond it.

Megatron-SWIFT loads the Hugging Face config on the *processor's* ``model_info`` (``args.get_model_processor``, then
the template keeps that ``model_info``); the ``model_info`` on the arguments comes from ``get_model_info_meta``,
which never reads the config (its ``config`` stays ``None``). Reading the arguments' one silently switched off the
masking of the padded vocabulary rows (sampling, loss, top-k teacher). Imports ms-swift's config helper only (no
Megatron), so that it runs, and is tested, without CUDA.
"""
from __future__ import annotations

from typing import Optional

from swift.utils import HfConfigFactory


def model_vocab_size(template, args=None) -> Optional[int]:
    """``vocab_size`` of the model's config (of its language model for multimodal configs), from the template's
    processor as Megatron-SWIFT builds it; ``args.model_info`` only as a fallback. ``None`` if neither has it."""
    for info in (getattr(template, 'model_info', None), getattr(args, 'model_info', None)):
        config = getattr(info, 'config', None)
        size = HfConfigFactory.get_config_attr(config, 'vocab_size') if config is not None else None
        if size:
            return int(size)
    return None
