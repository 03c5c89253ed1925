"""TEST-ONLY: run Megatron-SWIFT (``megatron rlhf``) on a CPU machine, for the plugin's end-to-end tests.

Never active in a user's run. It is switched on only by putting ``tests/megatron/cpu_site`` on ``PYTHONPATH`` (its
``sitecustomize`` calls :func:`install`), which the tests do for the ``megatron rlhf`` processes they start; it does
nothing where CUDA is present (there the real stack runs, and the GPU kit tests it).

What it works around is what megatron-core 0.16, mcore-bridge 1.6 and ms-swift 4.6 hard-code for CUDA and
transformer-engine (TE), each named with the upstream place. Nothing here changes a behaviour of the plugin or of
ms-swift's GKD logic: a workaround of a plugin or ms-swift bug belongs in the plugin, where GPU users get it too.

MoE models (``qwen3_moe``) run with megatron-core's ``TEGroupedMLP`` over local stand-ins of TE's grouped linears
(:mod:`.moe`), at any ``--expert_model_parallel_size``; the import hooks every patch registers with are in
:mod:`harness` (its ``__init__``).

The runs also need these flags (flags, not patches): ``--ddp_backend gloo``, ``--padding_free false`` (the local
attention has no packed sequences), ``--fp16 false --bf16 false`` (float32), ``--masked_softmax_fusion false``.
"""
from __future__ import annotations

import contextlib
import os
import sys
import types

import torch

from harness import _FINDER, _after
from harness.megatron_cpu.moe import _grouped_linears

ENV = 'SWIFT_GKD_MEGATRON_CPU_HARNESS'  # set by install(): the rank processes say in their log that it is on


# ------------------------------------------------------------------------------------------- transformer-engine
def _te_placeholder() -> types.ModuleType:
    """An empty ``transformer_engine`` whose attributes raise: it satisfies only the bare module-level imports."""

    class _Absent(types.ModuleType):
        def __getattr__(self, item):
            if item.startswith('__'):
                raise AttributeError(item)
            raise RuntimeError(f'transformer_engine.{item}: transformer-engine is not installed (CPU test harness)')

    te = _Absent('transformer_engine')
    te.__path__ = []
    te.pytorch = _Absent('transformer_engine.pytorch')
    return te


@contextlib.contextmanager
def _te_importable():
    """mcore-bridge ``import transformer_engine`` at module level in ``tuners/lora.py`` and in model modules
    (``model/modules/{dsa_indexer,compressor,gated_delta_net,mtp_layer}.py``, ``model/gpts/deepseek_v4.py``,
    ``model/mm_gpts/deepseek_v41.py``) whose TE paths these tests never reach. During their import only, a
    placeholder answers (its attributes raise); megatron-core decided ``HAVE_TE = False`` before, without it."""
    import megatron.core.extensions.transformer_engine  # noqa: F401  (HAVE_TE fixed first, without the placeholder)
    te = _te_placeholder()
    saved = {k: sys.modules.get(k) for k in ('transformer_engine', 'transformer_engine.pytorch')}
    sys.modules['transformer_engine'], sys.modules['transformer_engine.pytorch'] = te, te.pytorch
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


for _name in ('mcore_bridge.model.modules.dsa_indexer', 'mcore_bridge.model.modules.compressor',
              'mcore_bridge.model.modules.gated_delta_net', 'mcore_bridge.model.modules.mtp_layer',
              'mcore_bridge.model.gpts.deepseek_v4', 'mcore_bridge.model.mm_gpts.deepseek_v41',
              'mcore_bridge.tuners.lora'):
    _FINDER.around[_name] = _te_importable


@_after('megatron.core.extensions.transformer_engine')
def _te_classes(module):
    """Without TE, megatron-core binds its ``TE*`` classes to ``MagicMock`` instances (or None: ``TEGroupedLinear``),
    which ``isinstance`` refuses (mcore-bridge ``model/register.py`` ~222, ms-swift ``megatron/utils/utils.py``
    ~26): each becomes an empty class that no module is an instance of, as no TE module exists in these runs. The
    three that mcore-bridge's LoRA builds its adapter factors from (``tuners/lora.py`` ~61-78, ~240, ~290) get
    working local equivalents, and so do the grouped ones of MoE experts (``_grouped_linears``)."""
    for name in dir(module):
        value = getattr(module, name)
        if name.startswith('TE') and (value is None or type(value).__module__ == 'unittest.mock'):
            setattr(module, name, type(name, (torch.nn.Module,), {'__module__': __name__}))
    module.TELinear = _DuplicatedLinear
    _te_parallel_linears()
    _grouped_linears(module)  # (.moe)


def _te_parallel_linears():
    """``TEColumnParallelLinear`` / ``TERowParallelLinear`` as the local parallel linears, once both modules exist
    (either may be imported first)."""
    te = sys.modules.get('megatron.core.extensions.transformer_engine')
    layers = sys.modules.get('megatron.core.tensor_parallel.layers')
    if te is None or layers is None or not hasattr(layers, 'RowParallelLinear'):
        return
    te.TEColumnParallelLinear = type('TEColumnParallelLinear', (_TEKeywords, layers.ColumnParallelLinear), {})
    te.TERowParallelLinear = type('TERowParallelLinear', (_TEKeywords, layers.RowParallelLinear), {})


class _TEKeywords:
    """Accepts (and drops) the TE-only keywords mcore-bridge passes; ``parallel_mode`` as TE's layers keep it."""

    def __init__(self, *args, parallel_mode=None, tp_comm_buffer_name=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.parallel_mode = parallel_mode


class _DuplicatedLinear(torch.nn.Module):
    """TE's ``Linear`` with ``parallel_mode='duplicated'`` (the whole weight on every rank): ``(output, bias)``."""

    def __init__(self, input_size, output_size, *, config, init_method, bias, skip_bias_add=False,
                 parallel_mode='duplicated', skip_weight_param_allocation=False, is_expert=False,
                 tp_comm_buffer_name=None, tp_group=None):
        super().__init__()
        self.config, self.parallel_mode, self.skip_bias_add, self.is_expert = config, parallel_mode, skip_bias_add, \
            is_expert
        self.in_features, self.out_features, self.use_bias, self.tp_size = input_size, output_size, bias, 1
        self.weight = torch.nn.Parameter(torch.empty(output_size, input_size, dtype=config.params_dtype))
        init_method(self.weight)
        self.bias = torch.nn.Parameter(torch.zeros(output_size, dtype=config.params_dtype)) if bias else None

    def forward(self, x):
        if self.skip_bias_add:
            return torch.nn.functional.linear(x, self.weight), self.bias
        return torch.nn.functional.linear(x, self.weight, self.bias), None


@_after('mcore_bridge.patcher')
def _bridge_patcher(module):
    """``patcher.py``: ``apply_patch`` imports transformer_engine unconditionally (~32) to re-export two of its names."""
    module._patch_transformer_engine = lambda: None
    # ~67-77 ``_patch_TEGroupedLinear`` runs: it gives the MoE section's stand-in TE's grouped sharded_state_dict


# ------------------------------------------------------------------------------------------------- CUDA -> CPU
def _is_cuda(device) -> bool:
    if isinstance(device, int) and not isinstance(device, bool):
        return True  # a bare index names a CUDA device
    if isinstance(device, str):
        return device.startswith('cuda')
    return isinstance(device, torch.device) and device.type == 'cuda'


class _CudaToCpu(torch.overrides.TorchFunctionMode):
    """Every torch call asking for a CUDA device (``device='cuda'``, ``.to('cuda')``, ``.cuda()``) gets the CPU, and
    ``Tensor.type()`` names the CUDA type: megatron-core's distributed optimizer and grad clipping accept only
    ``torch.cuda.*`` names (``optimizer/distrib_optimizer.py`` ~361/420-437/582, ``optimizer.py`` ~671/690,
    ``clip_grads.py`` ~167)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            return func(*args).replace('torch.', 'torch.cuda.', 1)
        if _is_cuda(kwargs.get('device')):
            kwargs = {**kwargs, 'device': 'cpu'}
        if kwargs.get('pin_memory'):  # rope_utils.py ~62 (CP): pinned memory needs CUDA
            kwargs = {**kwargs, 'pin_memory': False}
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], 'cpu', *args[2:])
        return func(*args, **kwargs)


class _NoStream:
    """``torch.cuda.Stream`` / ``Event`` where everything is synchronous."""

    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, item):
        return lambda *args, **kwargs: None

    def record_event(self, *args, **kwargs):
        """An event (MoE's token dispatcher synchronises on it: ``transformer/moe/token_dispatcher.py`` ~895/899)."""
        return _NoStream()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _cuda_calls_on_cpu():
    """Device placements that ms-swift's Megatron code (``torch.cuda.current_device()``, ``.cuda()``,
    ``device='cuda'``: trainers/base.py, gkd_trainer.py ~61, rollout_mixin.py ~227, utils/megatron_lm_utils.py ~454,
    ~655, ~689), mcore-bridge and megatron-core (``tensor_parallel/layers.py`` ~261, its optimizers) make
    unconditionally land on the CPU; streams and events are synchronous no-ops."""
    _CudaToCpu().__enter__()  # for the life of the process (torch function modes are per thread: the main one)
    torch.cuda.current_device = lambda: 'cpu'
    torch.cuda.Stream = torch.cuda.Event = _NoStream
    torch.cuda.current_stream = torch.cuda.default_stream = lambda *args, **kwargs: _NoStream()
    torch.cuda.stream = lambda *args, **kwargs: contextlib.nullcontext()
    torch.cuda.synchronize = lambda *args, **kwargs: None
    for name in ('memory_allocated', 'max_memory_allocated', 'memory_reserved', 'max_memory_reserved'):
        setattr(torch.cuda, name, lambda *args, **kwargs: 0)
    torch.cuda.empty_cache = lambda: None
    for where in (torch.cuda, torch.cuda.random):  # the RNG tracker (tensor_parallel/random.py ~235)
        where.get_rng_state = lambda *args, **kwargs: torch.get_rng_state()
        where.set_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)


@_after('megatron.core.tensor_parallel.random')
def _rng_tracker(module):
    """``tensor_parallel/random.py`` ~41-110: the model-parallel RNG tracker saves and restores CUDA generator
    states; the CPU generator's are used."""
    module._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    module._set_cuda_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)


@_after('mcore_bridge.utils.megatron_utils')
def _seeded_tracker(module):
    """``utils/megatron_utils.py`` ~202: the model-parallel RNG tracker is seeded only if
    ``torch.cuda.device_count() > 0``; megatron-core's attention forks it unconditionally."""
    set_random_seed = module.set_random_seed

    def seeded(seed_, *args, **kwargs):
        set_random_seed(seed_, *args, **kwargs)
        from megatron.core import mpu, tensor_parallel
        tensor_parallel.model_parallel_cuda_manual_seed(seed_ + 1009 * mpu.get_pipeline_model_parallel_rank())

    module.set_random_seed = seeded


@_after('megatron.core.dist_checkpointing.strategies.filesystem_async')
def _forked_results_queue(module):
    """``strategies/filesystem_async.py`` ~51: a checkpoint save's write results come back through the queue of a
    ``multiprocessing`` manager started with ``spawn`` (a fresh interpreter, as forked CUDA state would break it):
    ~4 s of a rank's save in the CPU runs, and ~1 s more to stop it at exit. Without CUDA it is forked, as the
    writers themselves are (``write_preloaded_data_multiproc``, ``fork``); what is written, and how, is
    megatron-core's."""
    import multiprocessing

    def write_results_queue():
        if module._results_queue is None:
            module._results_queue = multiprocessing.get_context('fork').Manager().Queue()
        return module._results_queue

    module._get_write_results_queue = write_results_queue


@_after('megatron.core.tensor_parallel.layers')
def _parallel_attributes(module):
    """``tensor_parallel/layers.py`` ~244/855/1178: the local layers mark their weights as split over the tensor-
    parallel ranks only while initialising them, which mcore-bridge turns off (``perform_initialization=False``:
    the weights are loaded); TE's layers mark theirs always. Unmarked, every rank but the first drops its shard from
    the gradient norm (TP = 2 logged 0.0227 for 0.0300, and clipped by it). They are marked as on a GPU."""
    for cls, dim in ((module.VocabParallelEmbedding, 0), (module.ColumnParallelLinear, 0),
                     (module.RowParallelLinear, 1)):
        cls.__init__ = _marking_init(cls.__init__, dim, module.set_tensor_model_parallel_attributes)
    _te_parallel_linears()


def _marking_init(init, dim, mark):
    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        weight = getattr(self, 'weight', None)
        if isinstance(weight, torch.nn.Parameter) and not hasattr(weight, 'tensor_model_parallel'):
            mark(weight, True, dim, kwargs.get('stride', 1))
    return __init__


# ------------------------------------------------------------------------------------------- context parallelism
@_after('megatron.core.transformer.dot_product_attention')
def _context_parallel_attention(module):
    """``transformer/dot_product_attention.py`` ~57: the local attention asserts ``context_parallel_size == 1``
    ('only supported by TEDotProductAttention'; TE's runs ring attention). Here, with CP > 1, each rank gathers the
    context-parallel group's Q, K and V (already rotated at their own positions: rotary embeddings are CP-aware),
    puts the load-balanced chunks back in sequence order (rank r holds chunks r and 2CP-1-r of 2CP), runs the local
    attention on the whole sequence and keeps its own chunks of the output: what ring attention computes."""
    cls = module.DotProductAttention
    init, forward = cls.__init__, cls.forward

    def __init__(self, config, *args, **kwargs):
        cp, config.context_parallel_size = config.context_parallel_size, 1
        try:
            init(self, config, *args, **kwargs)
        finally:
            config.context_parallel_size = cp

    def cp_forward(self, query, key, value, attention_mask, *args, **kwargs):
        from megatron.core import mpu
        group = mpu.get_context_parallel_group()
        cp = torch.distributed.get_world_size(group)
        if cp == 1:
            return forward(self, query, key, value, attention_mask, *args, **kwargs)
        rank = torch.distributed.get_rank(group)
        whole = [_zigzag_whole(_GatherCP.apply(t, group), cp) for t in (query, key, value)]
        out = forward(self, *whole, attention_mask, *args, **kwargs)  # [S, b, ...]
        chunks = out.chunk(2 * cp, dim=0)
        return torch.cat([chunks[rank], chunks[2 * cp - 1 - rank]], dim=0)

    cls.__init__, cls.forward = __init__, cp_forward


class _GatherCP(torch.autograd.Function):
    """All-gather along a new leading dim (gloo has no reduce-scatter): the gradient is summed over the group
    and each rank keeps its own slice."""

    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        parts = [torch.empty_like(tensor) for _ in range(torch.distributed.get_world_size(group))]
        torch.distributed.all_gather(parts, tensor.contiguous(), group=group)
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        torch.distributed.all_reduce(grad, group=ctx.group)
        return grad[torch.distributed.get_rank(ctx.group)], None


def _zigzag_whole(gathered, cp):
    """``[cp, 2c, ...]`` (each rank's chunks r and 2cp-1-r) -> ``[2cp*c, ...]`` in sequence order."""
    halves = gathered.chunk(2, dim=1)
    return torch.cat([halves[0][i] if i < cp else halves[1][2 * cp - 1 - i] for i in range(2 * cp)], dim=0)


# -------------------------------------------------------------------------------------------- sequence parallelism
@_after('megatron.core.transformer.torch_norm')
def _sequence_parallel_norm(module):
    """``transformer/torch_norm.py`` ~33: the local spec's torch norm asserts ``not config.sequence_parallel``
    ('sequence parallel not supported by torch LayerNorm'). TE's ``LayerNorm`` / ``RMSNorm`` (``TENorm``, and the
    norm fused in ``TELayerNormColumnParallelLinear``) run on the sequence shard and mark their weight (and bias)
    ``sequence_parallel = True`` in ``reset_parameters``, as megatron-core's own ``FusedLayerNorm`` does
    (``fusions/fused_layer_norm.py`` ~119): ``finalize_model_grads`` (``_allreduce_non_tensor_model_parallel_grads``
    ~354) then sums their gradients over the tensor-parallel group. The torch norm is built and marked alike."""
    cls = module.WrappedTorchNorm
    new = cls.__new__

    def __new__(cls, config, *args, **kwargs):
        sequence_parallel, config.sequence_parallel = config.sequence_parallel, False
        try:
            norm = new(cls, config, *args, **kwargs)
        finally:
            config.sequence_parallel = sequence_parallel
        for param in norm.parameters(recurse=False):
            param.sequence_parallel = sequence_parallel
        return norm

    cls.__new__ = staticmethod(__new__)


# ------------------------------------------------------------------------------------------------------- LoRA
@_after('mcore_bridge.tuners.patcher')
def _lora_on_local_linears(module):
    """``tuners/patcher.py`` ~32-37: LoRA is dispatched to TE's linears only (megatron-core's own parallel linears
    only on Ascend NPUs, where MindSpeed builds those): the local spec's are dispatched too."""
    module.is_torch_npu_available = lambda: True  # read there for that tuple only


@_after('swift.megatron.utils.utils')
def _local_linears_are_linears(module):
    """ms-swift ``megatron/utils/utils.py`` ~26: ``find_all_linears`` (``--target_modules all-linear``) looks for TE's
    linears: the local spec's parallel linears count as the linears they are (and the experts' grouped linears, as
    with TE)."""
    from megatron.core.extensions.transformer_engine import TEGroupedLinear  # the MoE section's stand-in
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from swift.utils import find_layers

    def find_all_linears(model, extra_layers=None):
        kinds = (ColumnParallelLinear, RowParallelLinear, TEGroupedLinear, torch.nn.Linear, *(extra_layers or ()))
        return find_layers(model, lambda name, m: name != 'output_layer' and isinstance(m, kinds))

    module.find_all_linears = find_all_linears


# ---------------------------------------------------------------------------------------------- local layer spec
def _local_spec(build):
    def spec(*args, **kwargs):
        kwargs['use_transformer_engine'] = False
        return build(*args, **kwargs)
    return spec


@_after('mcore_bridge.model.register')
def _bridge_register(module):
    """``model/register.py`` ~127-141: the layer (and MTP) specs are built with ``use_transformer_engine=True``;
    megatron-core's local spec (torch norms, its own parallel linears and attention) is built instead."""
    module.get_gpt_decoder_block_spec = _local_spec(module.get_gpt_decoder_block_spec)
    module.get_gpt_mtp_block_spec = _local_spec(module.get_gpt_mtp_block_spec)


_SEPARATE_NORMS = {'self_attention.linear_qkv.layer_norm_weight': 'input_layernorm.weight',
                   'mlp.linear_fc1.layer_norm_weight': 'pre_mlp_layernorm.weight'}


@_after('mcore_bridge.bridge.gpt_bridge')
def _bridge_norm_names(module):
    """``bridge/gpt_bridge.py`` ~1727/1747: the bridge names the norms fused into TE's linears
    (``linear_qkv.layer_norm_weight``, ``linear_fc1.layer_norm_weight``); the local spec has them as separate
    modules (``input_layernorm``, ``pre_mlp_layernorm``)."""
    set_state_dict = module.GPTBridge._set_state_dict

    def _set_state_dict(self, mg_module, mg_key, *args, **kwargs):
        if mg_key in _SEPARATE_NORMS and mg_module is not None and \
                getattr(mg_module, _SEPARATE_NORMS[mg_key].split('.')[0], None) is not None:
            mg_key = _SEPARATE_NORMS[mg_key]
        return set_state_dict(self, mg_module, mg_key, *args, **kwargs)

    module.GPTBridge._set_state_dict = _set_state_dict


@_after('mcore_bridge.config.model_config')
def _bridge_config(module):
    """``config/model_config.py`` ~302: ``persist_layer_norm = True`` (an Apex fused norm), which the local spec's
    torch norm refuses."""
    config = module.ModelConfig
    post_init = config.__post_init__

    def __post_init__(self):
        self.persist_layer_norm = False
        post_init(self)

    config.__post_init__ = __post_init__


# ---------------------------------------------------------------------------------------------------------- install
def _probes_without(site_folder: str) -> None:
    """inductor's python subprocesses get this process's ``sys.path`` as their ``PYTHONPATH``
    (``utils.python_subprocess_env``), ``site_folder`` (the harness's ``sitecustomize``) with it: each of the ~10
    processes of its CPU instruction-set probe (``cpu_vec_isa.pick_vec_isa``, a ``dlopen`` of a test library) then
    imported torch and this harness, ~28 s of CPU for the probe instead of ~2. They get that path without the folder
    (``TORCH_CUSTOM_PYTHONPATH``, which inductor reads in its place); they run no megatron code."""
    if 'TORCH_CUSTOM_PYTHONPATH' not in os.environ:
        folder = os.path.abspath(site_folder)
        os.environ['TORCH_CUSTOM_PYTHONPATH'] = os.pathsep.join(p for p in sys.path if os.path.abspath(p) != folder)


_INSTALLED = []  # this process (or the zygote it was forked from) installed it


def install(site_folder: str = None) -> bool:
    """Put the workarounds in place for this process (and, through the environment, its children). Returns False,
    doing nothing, where CUDA is available. ``site_folder``: the folder of the ``sitecustomize`` that installs it, kept
    off inductor's python subprocesses (:func:`_probes_without`). Once a process: a second install (a test's worker
    forked from the Megatron zygote, whose ``sitecustomize`` installed it) changes nothing."""
    if torch.cuda.is_available():
        return False
    if _INSTALLED:
        return True
    _INSTALLED.append(True)
    os.environ[ENV] = '1'
    if site_folder is not None:
        _probes_without(site_folder)
    _cuda_calls_on_cpu()
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)
    return True
