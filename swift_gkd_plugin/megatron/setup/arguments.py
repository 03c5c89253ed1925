"""``megatron rlhf`` arguments: ms-swift's ``MegatronRLHFArguments`` plus the plugin's flags and checks.

Importing this module imports Megatron-SWIFT (CUDA and transformer-engine required).
"""
from __future__ import annotations

from dataclasses import dataclass

from swift.megatron.arguments import MegatronRLHFArguments
from swift.utils import get_logger

import swift_gkd_plugin
from swift_gkd_plugin.options.flags import check_no_plugin_flags_outside_gkd, ignored_flag_warnings
from swift_gkd_plugin.megatron.setup.checks import (MEGATRON_RLHF_PHASES, MegatronGKDFlagsMixin, check_colocated_vllm,
                                                    float32_warning, resolve_sampler, run_phase)

logger = get_logger()

__all__ = ['GKDPluginMegatronRLHFArguments', 'resolve_sampler', 'check_colocated_vllm']


@dataclass
class GKDPluginMegatronRLHFArguments(MegatronGKDFlagsMixin, MegatronRLHFArguments):
    """Parses ``megatron rlhf``; for ``--rlhf_type gkd`` the plugin's checks run before ms-swift's set-up."""

    def __post_init__(self):
        if self.rlhf_type != 'gkd':
            check_no_plugin_flags_outside_gkd(self, MegatronGKDFlagsMixin)
            super().__post_init__()
            return
        run_phase(MEGATRON_RLHF_PHASES['rank: flags'], self)
        fp16_given, dtype_given = self.fp16, self.torch_dtype  # ms-swift turns float32 into float16 below
        for warning in ignored_flag_warnings(self):
            logger.warning(f'swift_gkd_plugin: {warning}')
        if self.gkd_fused_backend not in (None, 'auto'):
            logger.warning(f'swift_gkd_plugin: --gkd_fused_backend {self.gkd_fused_backend} has no effect in megatron '
                           'rlhf: its loss runs on the vocabulary-parallel logit shards, in PyTorch')
        # ms-swift's Megatron arguments refuse seq_kd (its trainer cannot let the teacher sample); ours can.
        seq_kd, self.seq_kd = self.seq_kd, False
        try:
            super().__post_init__()
        finally:
            self.seq_kd = seq_kd
        run_phase(MEGATRON_RLHF_PHASES['rank: resolve'], self)
        run_phase(MEGATRON_RLHF_PHASES['rank: resolved'], self)
        warning = float32_warning(dtype_given, fp16_given, self.fp16)
        if warning:
            logger.warning(f'swift_gkd_plugin: {warning}')
        run_phase(MEGATRON_RLHF_PHASES['rank: store'], self)
        logger.info(f'swift_gkd_plugin {swift_gkd_plugin.__version__}: GKD trainer active (megatron; '
                    f'lmbda={self.lmbda}, seq_kd={self.seq_kd}, beta={self.beta}, temperature={self.temperature})')
