"""TEST-ONLY (see the package docstring): mixture-of-experts models (``qwen3_moe``) on CPU, at any
``--expert_model_parallel_size``: megatron-core's ``TEGroupedMLP`` over local stand-ins of transformer-engine's grouped
linears, bound under TE's names so that mcore-bridge's loader, exporter and LoRA and ms-swift's ``all-linear`` see them
as TE's; and the MoE code paths megatron-core hard-codes for TE or CUDA (the router's GEMM, the all-to-all sizes)."""
from __future__ import annotations

import contextlib

import torch

from harness import _after


class _GroupedLinear(torch.nn.Module):
    """TE's ``GroupedLinear`` as megatron-core wraps it (``extensions/transformer_engine.py`` ~1459
    ``TEGroupedLinear``: ``None`` without TE), computed with one ``F.linear`` per expert on its slice of the permuted
    tokens: per-expert parameters ``weight0..weight{n-1}`` (``bias{i}``), the layout that mcore-bridge's loader and
    exporter (``bridge/gpt_bridge.py`` ``_set_mlp_state`` ~960/1136/1246: ``getattr(linear_fc1, f'weight{i}')``)
    and its LoRA (``tuners/lora.py`` ~138/220-290/350/465: grouped factors built as ``TE*GroupedLinear``) read and
    write. As in TE's wrapper: the expert group communicates outside the layer (``explicit_expert_comm``: with
    expert TP or EP > 1 the local sizes are divided and the layer is not parallel), ``forward(x, m_splits)`` returns
    ``(output, bias)``, and every parameter has ``allreduce = not (is_expert and EP > 1)`` (expert parameters
    reduced over the expert data-parallel group, not the data-parallel one). No fp8, no ``delay_wgrad_compute``, no
    fused wgrad accumulation (the CPU runs use none); TE's grouped GEMM kernel is replaced, not its arithmetic."""

    def __init__(self, num_gemms, input_size, output_size, *, parallel_mode, config, init_method, bias,
                 skip_bias_add, is_expert=False, tp_comm_buffer_name=None, pg_collection=None):
        super().__init__()
        from megatron.core.process_groups_config import ProcessGroupCollection
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker, get_expert_parallel_rng_tracker_name
        from megatron.core.utils import divide, get_pg_size
        assert is_expert, 'TEGroupedLinear only supports expert parallelism'
        self.config, self.num_gemms, self.is_expert = config, num_gemms, is_expert
        self.te_return_bias, self.use_bias = skip_bias_add and bias, bias
        self.expert_parallel = config.expert_model_parallel_size > 1
        self._pg_collection = pg_collection or ProcessGroupCollection.use_mpu_process_groups()
        self._tp_group = self._pg_collection.expt_tp
        tp_size = get_pg_size(self._tp_group)
        self.explicit_expert_comm = tp_size > 1 or self.expert_parallel
        if self.explicit_expert_comm:
            if parallel_mode == 'column':
                output_size = divide(output_size, tp_size)
            elif parallel_mode == 'row':
                input_size = divide(input_size, tp_size)
            parallel_mode = None
        self.parallel_mode, self.in_features, self.out_features = parallel_mode, input_size, output_size
        tracker = get_cuda_rng_tracker()
        for i in range(num_gemms):
            weight = torch.nn.Parameter(torch.empty(output_size, input_size, dtype=config.params_dtype))
            if config.perform_initialization:
                with tracker.fork(get_expert_parallel_rng_tracker_name()) if tracker.is_initialized() else \
                        contextlib.nullcontext():
                    init_method(weight)
            self.register_parameter(f'weight{i}', weight)
            if bias:
                self.register_parameter(f'bias{i}', torch.nn.Parameter(
                    torch.zeros(output_size, dtype=config.params_dtype)))
        for param in self.parameters():
            param.allreduce = not (is_expert and self.expert_parallel)

    def forward(self, x, m_splits):
        splits = torch.split(x, [int(m) for m in m_splits])
        outs = [torch.nn.functional.linear(
            part, getattr(self, f'weight{i}'), getattr(self, f'bias{i}') if self.use_bias and not self.te_return_bias
            else None) for i, part in enumerate(splits)]
        out = torch.cat(outs) if outs else x.new_empty(0, self.out_features)
        if self.te_return_bias:
            return out, [getattr(self, f'bias{i}') for i in range(self.num_gemms)]
        return out, None

    def _sharded_state_dict_grouped(self, tp_axes, prefix='', sharded_offsets=(), metadata=None):
        """``extensions/transformer_engine.py`` ~1733 ``_sharded_state_dict_grouped`` (TE's column / row subclasses'
        ``sharded_state_dict``, and the plain one's through mcore-bridge ``patcher.py`` ~67-77 with ``tp_axes``
        None: LoRA's grouped factors), for the mcore checkpoints: each local expert's weight (and bias) sharded at
        its global expert index along a new leading axis, the expert-TP axis ``tp_axes``, replicated over the expert
        data-parallel group. Without TE's ``_extra_state`` (no fp8)."""
        from megatron.core.dist_checkpointing.utils import replace_prefix_for_sharding
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint
        from megatron.core.utils import get_pg_rank, get_pg_size
        singleton_local_shards = (metadata or {}).get('singleton_local_shards', False)
        num_global_experts = get_pg_size(self._pg_collection.ep) * self.num_gemms
        offset = get_pg_rank(self._pg_collection.ep) * self.num_gemms
        ep_axis, sharded = len(sharded_offsets), {}
        for i in range(self.num_gemms):
            state = {f'{i}.weight': getattr(self, f'weight{i}')}
            if self.use_bias:
                state[f'{i}.bias'] = getattr(self, f'bias{i}')
            if singleton_local_shards:
                expert_prefix, offsets = f'{offset + i}.{prefix}', sharded_offsets
            else:
                expert_prefix, offsets = prefix, (*sharded_offsets, (ep_axis, offset + i, num_global_experts))
            axes = {f'{i}.{k}': axis for k, axis in (tp_axes or {}).items()}
            sub = make_sharded_tensors_for_checkpoint(state, '', axes, offsets, tp_group=self._tp_group,
                                                      dp_cp_group=metadata['dp_cp_group'])
            replace_prefix_for_sharding(sub, f'{i}.', expert_prefix)
            sharded[f'{prefix}weight{i}'] = sub[f'{i}.weight']
            if self.use_bias:
                sharded[f'{prefix}bias{i}'] = sub[f'{i}.bias']
        for tensor in sharded.values():
            tensor.replica_id = (*tensor.replica_id[:2], get_pg_rank(self._pg_collection.expt_dp))
        return sharded

    def extra_repr(self):
        return f'num_gemms={self.num_gemms}, in_features={self.in_features}, out_features={self.out_features}'

    def finish_init(self, quantization_config):
        assert quantization_config is None, 'quantization: transformer-engine is not installed (CPU test harness)'

    def backward_dw(self):
        pass


def _grouped_linears(te):
    """``TEGroupedLinear`` / ``TEColumnParallelGroupedLinear`` / ``TERowParallelGroupedLinear`` as
    :class:`_GroupedLinear` and its two subclasses, bound under TE's names (set by ``_te_classes`` before
    mcore-bridge's ``model/register.py``, ``tuners/lora.py``, ``tuners/patcher.py`` and ms-swift's
    ``megatron/utils/utils.py`` import them): their ``isinstance`` checks and LoRA factors see them as TE's."""
    grouped = type('TEGroupedLinear', (_GroupedLinear, ), {'__module__': __name__})

    def parallel(name, mode, tp_axes):
        def __init__(self, num_gemms, input_size, output_size, **kwargs):
            grouped.__init__(self, num_gemms, input_size, output_size, parallel_mode=mode, **kwargs)

        def sharded_state_dict(self, prefix='', sharded_offsets=(), metadata=None):
            return self._sharded_state_dict_grouped(tp_axes, prefix, sharded_offsets, metadata)

        return type(name, (grouped, ), {'__init__': __init__, 'sharded_state_dict': sharded_state_dict,
                                        '__module__': __name__})

    te.TEGroupedLinear = grouped
    te.TEColumnParallelGroupedLinear = parallel('TEColumnParallelGroupedLinear', 'column', {'weight': 0, 'bias': 0})
    te.TERowParallelGroupedLinear = parallel('TERowParallelGroupedLinear', 'row', {'weight': 1})


@_after('megatron.core.models.backends')
def _grouped_experts(module):
    """``models/backends.py`` ~117-130: the local spec's provider builds ``--moe_grouped_gemm true`` (ms-swift's
    default) as the legacy ``GroupedMLP``, which asserts that the ``grouped_gemm`` package is installed, and
    ``false`` as ``SequentialMLP``, whose experts mcore-bridge cannot load (it reads TE's grouped layout only).
    With grouped GEMM (not the legacy one) the experts are built as TE's spec provider builds them on a GPU
    (``extensions/transformer_engine_spec_provider.py`` ~65-72): megatron-core's ``TEGroupedMLP`` over
    ``TEColumnParallelGroupedLinear`` / ``TERowParallelGroupedLinear`` (the stand-ins above)."""
    provider = module.LocalSpecProvider
    grouped_mlp_modules = provider.grouped_mlp_modules

    def grouped(self, moe_use_grouped_gemm, moe_use_legacy_grouped_gemm):
        if not moe_use_grouped_gemm or moe_use_legacy_grouped_gemm:
            return grouped_mlp_modules(self, moe_use_grouped_gemm, moe_use_legacy_grouped_gemm)
        from megatron.core.extensions import transformer_engine as te
        from megatron.core.transformer.mlp import MLPSubmodules
        from megatron.core.transformer.moe.experts import TEGroupedMLP
        return TEGroupedMLP, MLPSubmodules(linear_fc1=te.TEColumnParallelGroupedLinear,
                                           linear_fc2=te.TERowParallelGroupedLinear)

    provider.grouped_mlp_modules = grouped


@_after('megatron.core.transformer.moe.moe_utils')
def _router_gemm(module):
    """``transformer/moe/moe_utils.py`` ~1192 (the router's fp32 GEMM, ``RouterGatingLinearFunction``) tests
    ``te_general_gemm is not None``; the name is bound only in the ``try`` block at ~22-35, which starts with
    ``import transformer_engine`` and so binds nothing without TE (``NameError`` at the first MoE forward). It is
    bound to None, as ``extensions/transformer_engine.py`` ~2485 binds it without TE: the torch ``mm`` branch runs
    (a GPU user without TE would hit the same NameError; with TE, the name exists and this does nothing)."""
    if not hasattr(module, 'te_general_gemm'):
        module.te_general_gemm = None


@_after('megatron.core.transformer.moe.token_dispatcher')
def _split_sizes_as_lists(module):
    """``transformer/moe/token_dispatcher.py`` ~666/669/810 pass the all-to-all split sizes as they come from
    ``maybe_move_tensor_to_cpu`` (``moe_utils.py`` ~1093): numpy arrays when they were on the GPU, but the tensors
    themselves when already on the CPU, as here, which ``torch.distributed.all_to_all_single`` refuses
    (``TypeError: incompatible function arguments``; it takes a sequence of ints, numpy arrays included, on gloo as
    on NCCL). The sizes are passed as lists of ints; the exchange itself is megatron-core's ``all_to_all``."""
    all_to_all = module.all_to_all

    def as_list(sizes):
        return None if sizes is None else [int(s) for s in sizes]

    def all_to_all_lists(group, input_, output_split_sizes_=None, input_split_sizes=None):
        return all_to_all(group, input_, as_list(output_split_sizes_), as_list(input_split_sizes))

    module.all_to_all = all_to_all_lists
