"""``megatron rlhf`` arguments: ms-swift's ``MegatronRLHFArguments`` plus the plugin's flags and checks.

Importing this module imports Megatron-SWIFT (CUDA and transformer-engine required).
"""
from __future__ import annotations

from dataclasses import dataclass

from swift.megatron.arguments import MegatronRLHFArguments
from swift.utils import get_logger, is_vllm_available

import swift_gkd_plugin
from swift_gkd_plugin.rollout.colocated_vllm import (check_vllm_cpu_head_dim, check_vllm_max_model_len, check_vllm_sleep_mode,
                                             resolve_vllm_environment)
from swift_gkd_plugin.options.flags import check_no_plugin_flags_outside_gkd, ignored_flag_warnings
from swift_gkd_plugin.options.hub_models import resolve_check_model
from swift_gkd_plugin.megatron.setup.checks import (MegatronGKDFlagsMixin, check_megatron_gkd, check_model_sampling,
                                                    check_not_ray, check_vllm_sampler, float32_warning)
from swift_gkd_plugin.megatron.setup.layout import (check_expert_counts, check_grouped_experts,
                                                    check_moe_sequence_parallel, check_parallel_sizes,
                                                    check_pipeline_layers)
from swift_gkd_plugin.options.teacher_scores import (check_rank_teacher_store, resolve_store_topk,
                                                     resolve_teacher_store)
from swift_gkd_plugin.runtime.ms_swift_state import keep_teacher_messages_column

logger = get_logger()


def resolve_sampler(args) -> None:
    """ms-swift's Megatron default is ``use_vllm=True``; without vLLM the plugin samples from the model itself."""
    if args.use_vllm and not is_vllm_available():
        logger.info('swift_gkd_plugin: vLLM is not installed: on-policy steps sample from the training model')
        args.use_vllm = False


def check_colocated_vllm(args) -> None:
    """What the platform of a colocated vLLM engine (built in every rank by ms-swift's rollout mixin) cannot run,
    checked as for ``swift rlhf`` (:mod:`swift_gkd_plugin.rollout.colocated_vllm`), before the models load."""
    check_vllm_max_model_len(args, args.model_dir)
    check_vllm_cpu_head_dim(args, args.model_dir)
    check_vllm_sleep_mode(args)


@dataclass
class GKDPluginMegatronRLHFArguments(MegatronGKDFlagsMixin, MegatronRLHFArguments):
    """Parses ``megatron rlhf``; for ``--rlhf_type gkd`` the plugin's checks run before ms-swift's set-up."""

    def __post_init__(self):
        if self.rlhf_type != 'gkd':
            check_no_plugin_flags_outside_gkd(self, MegatronGKDFlagsMixin)
            super().__post_init__()
            return
        check_not_ray(self)
        resolve_store_topk(self)  # --teacher_scores without --gkd_logits_topk: the store's k
        check_megatron_gkd(self)
        check_parallel_sizes(self)
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
        model_dirs = [('--model', self.model_dir), ('--teacher_model', getattr(self, 'teacher_model_dir', None))]
        check_grouped_experts(self, model_dirs)
        check_expert_counts(self, model_dirs)  # hub models too, now resolved: before megatron-core's assertion
        check_pipeline_layers(self, model_dirs)
        check_moe_sequence_parallel(self, self.model_dir)
        resolve_sampler(self)
        resolve_check_model(self)
        check_vllm_sampler(self, vllm_installed=self.use_vllm)
        if self.use_vllm and self.vllm_mode == 'colocate' and self.lmbda > 0:  # ms-swift builds the engine then
            # the environment vLLM needs (without it a machine without torchvision failed building the engine:
            # ms-swift's swift_uembed vLLM plugin imports it), then what its platform cannot run
            resolve_vllm_environment(self)
            check_colocated_vllm(self)
        warning = float32_warning(dtype_given, fp16_given, self.fp16)
        if warning:
            logger.warning(f'swift_gkd_plugin: {warning}')
        check_model_sampling(self, vllm_samples=self.use_vllm)
        check_rank_teacher_store(self)
        resolve_teacher_store(self)
        keep_teacher_messages_column()
        logger.info(f'swift_gkd_plugin {swift_gkd_plugin.__version__}: GKD trainer active (megatron; '
                    f'lmbda={self.lmbda}, seq_kd={self.seq_kd}, beta={self.beta}, temperature={self.temperature})')
