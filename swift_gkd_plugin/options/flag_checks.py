"""The rules between flags (combinations GKD refuses, or warns about, naming every flag involved) and what every
flag check shares: :class:`FlagError`, :class:`Range` and the temperature bounds. Imports no ms-swift and not
:mod:`swift_gkd_plugin.options.flags`, which declares the flags, checks each against its declaration, and re-exports these.
"""
from __future__ import annotations

import importlib.util
import json
import re
import math
import os
from dataclasses import dataclass
from typing import List, Optional

from swift_gkd_plugin.core.fused.kernels import (BACKEND_ENV, BACKENDS as FUSED_BACKENDS, KERNEL_BACKENDS,
                                                  triton_available)

#: Below this ``--temperature`` most positions of a real model's loss saturate: see :data:`TEMPERATURE_FLOOR_WHY`
#: (measured in docs_en/README.md, "Bad input").
TEMPERATURE_FLOOR = 0.02
TEMPERATURE_FLOOR_WHY = (
    'the loss divides the logits by it and float32 exp() underflows past 103 nats, so below it every position whose '
    'top two logits differ by 2 or more is one-hot on both sides with gradient 0: most positions of a real model '
    '(positions with any gradient, SmolLM2-135M: 63% at 0.02, 36% at 0.01, 3% at 0.001)')

#: Above this ``--temperature`` (and ``--gkd_sampling_temperature``) a run learns next to nothing: see
#: :data:`TEMPERATURE_CEILING_WHY` (measured in tests/test_checks.py).
TEMPERATURE_CEILING = 100.0
TEMPERATURE_CEILING_WHY = (
    'the tempered distributions approach uniform: the loss and its gradient shrink as 1/T^2, to a largest logit '
    'gradient of 8e-10 at 100 and 8e-18 at 1e6 (a 151,936-token vocabulary, logits 1 nat apart), below AdamW\'s '
    'epsilon (1e-8), so the updates vanish; samples at such temperatures are near-uniform random tokens. GKD '
    'recipes use 0.5-2')

#: The lowest ``--gkd_sampling_temperature`` (its range says > 0; this floor, checked after it, says why).
SAMPLING_TEMPERATURE_FLOOR = 1e-6
SAMPLING_TEMPERATURE_FLOOR_WHY = (
    'the sampler divides the float32 logits by it: at 1e-6 they stay finite for any logit below 3e32, below it a '
    'temperature such as 1e-40 turns them into inf and the sampling probabilities into NaN, failing the first '
    'rollout; vLLM already samples greedily below 1e-5 and raises temperatures below 0.01 to 0.01')
#: vLLM's SamplingParams refuses sampling temperatures above this at the first rollout.
VLLM_TEMPERATURE_CEILING = 2.0


#: The largest float32: a float flag above it is inf in the float32 math it feeds (a loss coefficient: an inf loss).
FLOAT32_MAX = 3.4028234663852886e38


class FlagError(ValueError):
    """A refused command line: the message names the flag, the value and the allowed values. The entry points print
    it as one ``error:`` line and exit with code 2, as argparse does for a value of the wrong type."""


@dataclass(frozen=True)
class Range:
    """The allowed values of a numeric flag: ``low`` (``> low`` if ``low_open``) and ``high`` (``< high`` if
    ``high_open``) bounds, integers only (``integer``), None allowed (``optional``). Non-integer values must also be
    finite in float32 (NaN fails every comparison, inf passes ``> 0``, 1e39 is inf in the float32 loss). ``says``
    replaces the bounds in messages where they read badly; ``why`` and ``unit`` follow them."""
    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False
    optional: bool = False
    says: Optional[str] = None
    why: str = ''
    unit: str = ''

    def allowed(self) -> str:
        if self.says:
            return self.says
        if self.low is not None and self.high is not None:
            return f'in [{self.low:g}, {self.high:g}{")" if self.high_open else "]"}'
        text = f'{">" if self.low_open else ">="} {self.low:g}'
        return f'an integer {text}' if self.integer else text

    def check(self, flag: str, value) -> None:
        """Raise a ValueError naming ``--flag``, ``value`` and the allowed values when ``value`` is outside."""
        if value is None and self.optional:
            return
        if self.integer and not (isinstance(value, int) and not isinstance(value, bool)):
            ok = False
        elif not self.integer and not isinstance(value, (int, float)):
            ok = False
        elif not self.integer and not (math.isfinite(value) and abs(value) <= FLOAT32_MAX):
            ok = False
        else:
            ok = ((self.low is None or (value > self.low if self.low_open else value >= self.low))
                  and (self.high is None or (value < self.high if self.high_open else value <= self.high)))
        if not ok:
            unit = f' {self.unit}' if self.unit else ''
            why = f' ({self.why})' if self.why else ''
            finite = 'a finite number ' if isinstance(value, float) and not math.isfinite(value) else ''
            if not finite and not self.integer and isinstance(value, (int, float)) and abs(value) > FLOAT32_MAX:
                finite = f'a number float32 holds (|x| <= {FLOAT32_MAX:.4g}) '
            raise FlagError(f'--{flag} must be {finite}{self.allowed()}{unit}{why}, got {value}')


def check_training_set(args) -> None:
    """A command line without a training set (ms-swift refuses it in a traceback, in every rank of megatron rlhf);
    not with ``--load_data_args true``, which takes it from a checkpoint's args.json."""
    if not (args.dataset or args.cached_dataset or getattr(args, 'load_data_args', False)):
        raise FlagError('no training set: pass --dataset (local files such as train.jsonl, or hub dataset ids) or '
                         '--cached_dataset (a dataset encoded ahead with `swift export --to_cached_dataset true`)')


def check_temperature_ceiling(args) -> None:
    """``--temperature`` and ``--gkd_sampling_temperature`` at most :data:`TEMPERATURE_CEILING` (their declared
    ranges have already refused values below the floor, NaN and infinity), the sampling temperature at least
    :data:`SAMPLING_TEMPERATURE_FLOOR`."""
    value = getattr(args, 'gkd_sampling_temperature', None)
    if value is not None and value < SAMPLING_TEMPERATURE_FLOOR:
        raise FlagError(f'--gkd_sampling_temperature must be >= {SAMPLING_TEMPERATURE_FLOOR:g} '
                        f'({SAMPLING_TEMPERATURE_FLOOR_WHY}), got {value}')
    for flag in ('temperature', 'gkd_sampling_temperature'):
        value = getattr(args, flag, None)
        if value is not None and value > TEMPERATURE_CEILING:
            raise FlagError(f'--{flag} must be <= {TEMPERATURE_CEILING:g} ({TEMPERATURE_CEILING_WHY}), got {value}')


def check_fused_backend(args) -> None:
    """``--gkd_fused_backend`` (declared choices) and, when it is unset, its default ``$SWIFT_GKD_FUSED_BACKEND``;
    a forced ``triton`` needs triton and a CUDA device (or Triton's interpreter)."""
    value = args.gkd_fused_backend
    flag = f'--gkd_fused_backend {value}'
    if value is None:
        value = os.environ.get(BACKEND_ENV, '').strip()
        flag = f'{BACKEND_ENV}={value}'
        if value and value not in FUSED_BACKENDS:
            raise FlagError(f'{BACKEND_ENV} (the default of --gkd_fused_backend) must be one of '
                            f'{list(FUSED_BACKENDS)} or empty, got {value!r}')
    if value not in KERNEL_BACKENDS:
        return
    if not triton_available():
        raise FlagError(f'{flag} needs the triton package (pip install triton); use --gkd_fused_backend auto or torch')
    if os.environ.get('TRITON_INTERPRET', '0') != '1' and not _cuda_visible():
        raise FlagError(f'{flag} runs the kernels on CUDA devices and this process sees none; use '
                        '--gkd_fused_backend auto (the PyTorch path here) or torch')


def _cuda_visible() -> bool:
    import torch
    return torch.cuda.is_available()


def check_bf16_device(args, torch_dtype_given, bf16_given) -> None:
    """bf16 mixed precision (``--bf16``, or ms-swift's default from the resolved ``--torch_dtype``) where transformers'
    ``TrainingArguments`` refuses it, its condition exactly: neither ``--use_cpu`` nor a bf16 GPU nor an XLA device.
    It raised after ms-swift built the arguments, with 30 lines of traceback. ``torch_dtype_given`` and
    ``bf16_given``: the command line's values (None: not given)."""
    from transformers.utils import is_torch_bf16_gpu_available, is_torch_cuda_available, is_torch_xla_available
    if (not (args.bf16 or args.bf16_full_eval) or args.use_cpu or is_torch_bf16_gpu_available()
            or is_torch_xla_available()):
        return
    if bf16_given or (args.bf16_full_eval and not args.bf16):
        flag = '--bf16' if bf16_given else '--bf16_full_eval'
        given, way_out = f'{flag} true', f'{flag} false'
    else:
        given = '--torch_dtype bfloat16' + ('' if torch_dtype_given else " (not given: --model's config.json)")
        way_out = '--torch_dtype float32'
    if is_torch_cuda_available():
        raise FlagError(f'{given}: this GPU does not support bfloat16 (transformers trains in bf16 on Ampere or newer '
                        f'GPUs only): pass {way_out} (or --torch_dtype float16)')
    raise FlagError(f'{given}: this machine has no GPU that supports bfloat16, and transformers trains in bf16 on the '
                    f'CPU only with --use_cpu true: pass --use_cpu true, or {way_out}')


def check_rollout_flags(args) -> None:
    """``--gkd_rollout_max_tokens`` needs on-policy steps and must cut below ``--max_completion_length``;
    ``--gkd_entropy_fkl_threshold`` needs a PyTorch loss path (the Triton kernels have no such mix)."""
    budget = getattr(args, 'gkd_rollout_max_tokens', None)
    if budget is not None:
        flag = f'--gkd_rollout_max_tokens {budget}'
        if args.lmbda == 0:
            raise FlagError(f'{flag} caps the student\'s samples on on-policy steps, and --lmbda 0 has none: set '
                            '--lmbda > 0 or drop the flag')
        if budget > args.max_completion_length:
            raise FlagError(f'{flag} must be <= --max_completion_length {args.max_completion_length} (it only cuts '
                            f'on-policy samples shorter); allowed: 1 to {args.max_completion_length}, or unset')
    tau = getattr(args, 'gkd_entropy_fkl_threshold', None)
    if tau is not None and getattr(args, 'gkd_cross_tokenizer', None) == 'uld':
        raise FlagError(f'--gkd_entropy_fkl_threshold {tau:g} adds KL(teacher || student) to the divergence, and '
                        '--gkd_cross_tokenizer uld compares sorted probabilities (no divergence): use '
                        '--gkd_cross_tokenizer hybrid or drop the flag')
    if tau is not None and args.gkd_fused_backend in KERNEL_BACKENDS:
        raise FlagError(f'--gkd_entropy_fkl_threshold {tau:g} runs on the PyTorch loss paths and --gkd_fused_backend '
                        f'{args.gkd_fused_backend} forces the kernels, which do not compute the entropy-aware mix: pass '
                        '--gkd_fused_backend auto or torch')


def check_reference_flags(args) -> None:
    """``--gkd_ref_kl_coef`` runs on the dense loss (the reference's logits beside the student's)."""
    coef = getattr(args, 'gkd_ref_kl_coef', 0.0)
    if coef and args.gkd_loss_impl == 'fused':
        raise FlagError(f'--gkd_ref_kl_coef {coef:g} compares the student\'s full logits with the reference\'s, '
                        'which the fused loss never forms: pass --gkd_loss_impl auto (it picks the dense loss) or '
                        'dense')
    if coef and args.gkd_topk_tail:
        raise FlagError(f'--gkd_ref_kl_coef {coef:g} runs on the dense loss and --gkd_topk_tail true needs the fused '
                        'one: drop one of them')


def check_sampled_kl_flags(args) -> None:
    """``--gkd_sampled_kl_coef`` scores the student's own samples with the teacher's log-probability of each sampled
    token: on-policy steps, and a teacher that gives that number (the full row of a local teacher of the student's
    tokenizer, or this plugin's server; a local top-k teacher keeps its top-k only); ``--gkd_sampled_kl_baseline
    batch`` needs two rows in a micro-batch (``--per_device_train_batch_size``). ``--gkd_divergence_coef 0``
    leaves the policy-gradient terms alone: every step must be on-policy and have one."""
    divergence = getattr(args, 'gkd_divergence_coef', 1.0)
    if divergence == 0:
        pg = getattr(args, 'gkd_sampled_kl_coef', 0.0) > 0 or getattr(args, 'gkd_rl_coef', 0.0) > 0
        if not pg or args.lmbda != 1 or getattr(args, 'seq_kd', False):
            raise FlagError(f'--gkd_divergence_coef 0 trains on the policy-gradient terms alone, so every step must be '
                            f'on-policy and have one: pass --lmbda 1 (got {args.lmbda:g}), --seq_kd false and '
                            '--gkd_sampled_kl_coef > 0 (or --gkd_rl_coef > 0 with --reward_funcs)')
    coef = getattr(args, 'gkd_sampled_kl_coef', 0.0)
    if not coef:
        if getattr(args, 'gkd_sampled_kl_discount', 0.0):
            raise FlagError(f'--gkd_sampled_kl_discount {args.gkd_sampled_kl_discount:g} discounts the sampled-token '
                            'term, which is off (--gkd_sampled_kl_coef 0): set --gkd_sampled_kl_coef > 0, or drop it')
        baseline = getattr(args, 'gkd_sampled_kl_baseline', 'none')
        if baseline != 'none':
            raise FlagError(f'--gkd_sampled_kl_baseline {baseline} centres the sampled-token term\'s advantages, and '
                            'the term is off (--gkd_sampled_kl_coef 0): set --gkd_sampled_kl_coef > 0, or pass '
                            '--gkd_sampled_kl_baseline none')
        return
    flag = f'--gkd_sampled_kl_coef {coef:g}'
    if not args.lmbda > 0:
        raise FlagError(f"{flag} trains on the student's own samples, and --lmbda {args.lmbda:g} makes no on-policy "
                        'step: set --lmbda > 0')
    rows = getattr(args, 'per_device_train_batch_size', None)  # the rows of one micro-batch
    if getattr(args, 'gkd_sampled_kl_baseline', 'none') == 'batch' and rows is not None and rows < 2:
        raise FlagError(f'--gkd_sampled_kl_baseline batch subtracts the mean of the micro-batch\'s other rows, and '
                        f'--per_device_train_batch_size {rows} puts one row in each micro-batch: there is no other '
                        'row, so the baseline is 0 on every step. Pass --per_device_train_batch_size 2 or more, or '
                        '--gkd_sampled_kl_baseline none')
    if getattr(args, 'teacher_model_server', None) is not None:
        sampling = args.gkd_sampling_temperature if args.gkd_sampling_temperature is not None else args.temperature
        if sampling != 1:
            raise FlagError(f'{flag} with --teacher_model_server compares the student\'s log-probabilities of its '
                            f'samples (at the sampling temperature, {sampling:g}) with the server\'s, which are at '
                            'temperature 1: pass --gkd_sampling_temperature 1 (it keeps --temperature for the loss)')
        return  # the server's top-k feeds the divergence; each sampled token's log-prob comes beside it
    if getattr(args, 'gkd_logits_topk', None) is not None:
        raise FlagError(f"{flag} needs the teacher's log-probability of every sampled token, which a top-k teacher "
                        f'(--gkd_logits_topk {args.gkd_logits_topk}) does not keep: unset --gkd_logits_topk')
    if getattr(args, 'gkd_cross_tokenizer', None) is not None:
        raise FlagError(f"{flag} scores the student's tokens with the teacher's log-probabilities of the same "
                        f'tokens, which a teacher of another tokenizer (--gkd_cross_tokenizer '
                        f'{args.gkd_cross_tokenizer}) does not have: drop one of them')


#: Where ``--gkd_skd_top_k`` runs (docs_en/skd.md), for the refusals elsewhere.
SKD_PLACEMENTS = ('swift rlhf with transformers sampling (--use_vllm false) and a local teacher (--teacher_model, '
                  'resident or --offload_teacher_model; the LoRA student\'s base; --teacher_adapters) or this '
                  'plugin\'s teacher server (--teacher_model_server with `swift-gkd serve-teacher`)')


def check_max_staleness(args) -> None:
    """``--gkd_max_staleness`` K > 1 is the depth of ``--async_generate true``'s queue on the rollout server; without
    it every step samples with its own weights and K would be ignored."""
    k = getattr(args, 'gkd_max_staleness', 1)
    if k != 1 and not getattr(args, 'async_generate', False):
        raise FlagError(f'--gkd_max_staleness {k} bounds how many steps ahead --async_generate true samples on a '
                        'rollout server, and --async_generate is false: every step samples with its own weights '
                        '(allowed: --gkd_max_staleness 1, or --async_generate true with --use_vllm true --vllm_mode '
                        'server in swift rlhf)')


def check_sampling_flags(args) -> None:
    """``--gkd_skd_top_k`` (SKD): the set-ups SKD cannot run in (the ranges of both sampling flags are declared)."""
    k = args.gkd_skd_top_k
    if k == 0:
        return
    flag = f'--gkd_skd_top_k {k}'
    if args.lmbda == 0:
        raise FlagError(f'{flag} corrects the student\'s samples on on-policy steps, and --lmbda 0 has none: set '
                         '--lmbda > 0 or --gkd_skd_top_k 0')
    if args.use_vllm:
        raise FlagError(f'{flag} is not supported with --use_vllm true: the teacher verifies the student\'s drafts '
                         'between decoding steps, which vLLM does not expose. SKD runs in ' + SKD_PLACEMENTS +
                         '; pass --use_vllm false or --gkd_skd_top_k 0')
    if args.gkd_cross_tokenizer is not None:
        raise FlagError(f'{flag} cannot be combined with --gkd_cross_tokenizer {args.gkd_cross_tokenizer}: the '
                         'teacher replaces student tokens, so both must share one tokenizer')
    penalty = args.repetition_penalty
    if penalty is not None and penalty != 1.0:
        raise FlagError(f'{flag} cannot be combined with --repetition_penalty {penalty} yet (allowed: 1.0)')
    if (args.sequence_parallel_size or 1) > 1:
        raise FlagError(f'{flag} is not supported with --sequence_parallel_size {args.sequence_parallel_size} '
                         '(allowed: 1)')


def check_multi_turn_flags(args) -> None:
    """ms-swift's multi-turn rollout flags (``--multi_turn_scheduler``, ``--max_turns``): a positive turn limit, a limit
    only with a scheduler, and none of the GKD options that sample or score one turn only. Whether the scheduler is
    registered needs ms-swift's registry (:func:`swift_gkd_plugin.swift.setup.arguments.check_multi_turn_scheduler`)."""
    scheduler, max_turns = getattr(args, 'multi_turn_scheduler', None), getattr(args, 'max_turns', None)
    if max_turns is not None:
        Range(1, integer=True, why='turns of one trajectory').check('max_turns', max_turns)
        if not scheduler:
            raise FlagError(f'--max_turns {max_turns} needs --multi_turn_scheduler NAME (the scheduler that runs '
                             'the turns); without one every rollout is a single turn: add the scheduler or drop '
                             '--max_turns')
    if not scheduler:
        return
    flag = f'--multi_turn_scheduler {scheduler}'
    skd = getattr(args, 'gkd_skd_top_k', 0)
    if skd:
        raise FlagError(f'{flag} cannot be combined with --gkd_skd_top_k {skd}: SKD\'s decoding loop, where the '
                         'teacher verifies the student\'s drafts, samples one turn (allowed: --gkd_skd_top_k 0)')
    cross = getattr(args, 'gkd_cross_tokenizer', None)
    if cross:
        raise FlagError(f'{flag} cannot be combined with --gkd_cross_tokenizer {cross}: a trajectory\'s tool results '
                         'are written in the student\'s tokens, which the teacher\'s tokenizer cannot align turn by '
                         'turn yet; distil multi-turn rollouts with a teacher of the same tokenizer')


def check_no_multi_turn(args) -> None:
    """``megatron rlhf``: its rollouts are single-turn (vLLM or its own sampler, no scheduler loop)."""
    given = [f'--{name} {getattr(args, name)}' for name in ('multi_turn_scheduler', 'max_turns')
             if getattr(args, name, None) is not None]
    if given:
        raise FlagError(f'{", ".join(given)}: multi-turn rollouts are supported by swift rlhf only (megatron '
                         'rlhf samples single turns); run multi-turn distillation with swift rlhf --rlhf_type gkd, or '
                         'remove '
                         f'{" and ".join(g.split()[0] for g in given)}')


def check_torch_compile_checkpointing(args) -> None:
    """``--torch_compile`` with gradient checkpointing needs torch's non-reentrant checkpoint (dynamo passes it a
    ``context_fn``), while ms-swift picks the reentrant one in one process and under DeepSpeed or FSDP: refused here
    rather than at the first step."""
    if not (getattr(args, 'torch_compile', False) and getattr(args, 'gradient_checkpointing', False)):
        return
    kwargs = args.gradient_checkpointing_kwargs
    if isinstance(kwargs, str):  # the command line's JSON, before ms-swift parses it
        kwargs = json.loads(kwargs) if kwargs.strip() else None
    reentrant = (kwargs or {}).get('use_reentrant')
    if reentrant is None:  # ms-swift's choice (its _fix_gradient_checkpointing)
        distributed = int(os.environ.get('WORLD_SIZE', '1')) > 1
        reentrant = not distributed or bool(args.deepspeed) or bool(getattr(args, 'fsdp', None))
    if reentrant:
        raise FlagError('--torch_compile true with --gradient_checkpointing true fails at the first step: the compiled '
                         'model needs the non-reentrant checkpoint, and '
                         + ('--gradient_checkpointing_kwargs sets use_reentrant true' if kwargs and 'use_reentrant'
                            in kwargs else 'ms-swift uses the reentrant one in one process and under DeepSpeed or FSDP')
                         + ". Pass --gradient_checkpointing_kwargs '{\"use_reentrant\": false}', or "
                         '--gradient_checkpointing false, or --torch_compile false')


def check_deepspeed_launch(args) -> None:
    """``--deepspeed`` in a process that no launcher started (``swift rlhf`` without ``NPROC_PER_NODE``): DeepSpeed then
    discovers its rank over MPI and, without mpi4py, fails only once both models are loaded."""
    if not getattr(args, 'deepspeed', None) or 'WORLD_SIZE' in os.environ or 'LOCAL_RANK' in os.environ:
        return
    if importlib.util.find_spec('mpi4py') is not None:
        return
    raise FlagError(f'--deepspeed {args.deepspeed} in one process started without a launcher: DeepSpeed would look '
                     'for MPI (mpi4py is not installed) and fail after loading the models. Set NPROC_PER_NODE=1 '
                     '(or the number of GPUs) so that swift starts torchrun, or drop --deepspeed')


def check_cpu_processes(args) -> None:
    """Several processes (``WORLD_SIZE`` > 1) on a machine without an accelerator and without ``--use_cpu true``:
    transformers then gives each process a data-parallel world of one (accelerate forms a group of CPU processes only
    when asked to), so each trains its own copy into the same ``--output_dir`` and exits 0."""
    world = int(os.environ.get('WORLD_SIZE') or 1)
    if world <= 1 or args.use_cpu or os.environ.get('ACCELERATE_USE_CPU', '').lower() in ('1', 'true', 'yes', 'on'):
        return
    import torch
    from transformers.utils import is_torch_xla_available
    if torch.accelerator.is_available() or is_torch_xla_available():
        return
    raise FlagError(f'--use_cpu false (the default) with {world} processes (NPROC_PER_NODE x NNODES) on a machine '
                     'without a GPU: the processes would not form a data-parallel group, and each would train its own '
                     'copy into the same --output_dir. Pass --use_cpu true to train on the CPU with gloo, or start one '
                     'process (NPROC_PER_NODE=1)')


def check_divergence_flags(args) -> None:
    """Neither divergence parameter given with the other divergence, where it would be silently unused (the ranges
    are declared). ``args.beta`` is None when unset, or ms-swift's GKD default 0.5 once resolved (which cannot be told
    apart from ``--beta 0.5``, so 0.5 passes)."""
    name, alpha = args.gkd_divergence, args.gkd_skew_alpha
    if name != 'jsd' and args.beta not in (None, 0.5):
        raise FlagError(f'--beta {args.beta} applies to --gkd_divergence jsd only; with --gkd_divergence {name} '
                         'the skew is --gkd_skew_alpha: drop --beta')
    if name == 'jsd' and alpha != 0.1:
        raise FlagError(f'--gkd_skew_alpha {alpha} applies to --gkd_divergence skew_kl / skew_rkl only; '
                         'with jsd the interpolation is --beta')


def check_cross_tokenizer_flags(args) -> None:
    """``--gkd_cross_tokenizer``: a known method, and none of the flags it cannot work with; ``--teacher_template``
    only with it (whether the template exists needs ms-swift's registry: :mod:`swift_gkd_plugin.swift.setup.arguments`)."""
    method, teacher_template = args.gkd_cross_tokenizer, args.teacher_template
    if method is None and teacher_template is not None:
        raise FlagError(f'--teacher_template {teacher_template} only applies to a teacher with another tokenizer '
                         '(--gkd_cross_tokenizer uld|hybrid): a teacher with the student\'s tokenizer scores the '
                         'student\'s tokens through the student\'s --template. Drop --teacher_template, or add '
                         '--gkd_cross_tokenizer')
    if method is None:
        return
    flag = f'--gkd_cross_tokenizer {method}'
    if args.teacher_model_server is not None:
        raise FlagError(f'{flag} is not supported with --teacher_model_server yet: the server\'s top-k is over its '
                         'own vocabulary and ULD/hybrid need full teacher rows; pass a local --teacher_model')
    if args.gkd_logits_topk is not None:
        raise FlagError(f'{flag} cannot be combined with --gkd_logits_topk {args.gkd_logits_topk}: ULD and hybrid '
                         'need the full teacher row (unset --gkd_logits_topk)')
    if args.teacher_adapters:
        raise FlagError(f'{flag} cannot be combined with --teacher_adapters: a teacher adapter shares its base\'s '
                         'tokenizer; pass a --teacher_model with another tokenizer, or drop the flag')
    if args.padding_free or args.packing:
        raise FlagError(f'{flag} is not supported with --padding_free / --packing (the alignment is per row): '
                         'pass --padding_free false --packing false')
    if (args.sequence_parallel_size or 1) > 1:
        raise FlagError(f'{flag} is not supported with --sequence_parallel_size {args.sequence_parallel_size} '
                         '(allowed: 1)')


#: The ``--teacher_model_server`` entry that binds tags to the local teacher (``--teacher_model``, or the student's
#: base with its LoRA adapter off): ``{"url": "local", "tags": [...]}``.
LOCAL_TEACHER_URL = 'local'


def local_teacher_index(urls: List[str]) -> Optional[int]:
    """The index of the local teacher's entry among the URLs of ``--teacher_model_server``'s entries, or None."""
    return next((i for i, url in enumerate(urls) if url == LOCAL_TEACHER_URL), None)


def entry_urls(server: Optional[str]) -> List[str]:
    """The URLs of ``--teacher_model_server``'s entries, read without ms-swift (the Megatron launcher checks run
    before it is imported): one URL, or each ``"url"`` of a JSON (or Python literal) list; ``[]`` where it does not
    parse (ms-swift's own parse then refuses or repairs it)."""
    if server is None:
        return []
    text = server.strip()
    if not text.startswith('['):
        return [text]
    import ast
    for parse in (json.loads, ast.literal_eval):
        try:
            entries = parse(text)
        except (ValueError, SyntaxError):
            continue
        return [e.get('url') for e in entries if isinstance(e, dict)] if isinstance(entries, list) else []
    return []


def teacher_url_problem(url) -> Optional[str]:
    """Why a ``--teacher_model_server`` URL can never be reached (not text, no host, a scheme other than http(s), a
    port that is not 1 to 65535), else None. ``HOST:PORT`` is read as ``http://HOST:PORT``, as the clients do."""
    if url == LOCAL_TEACHER_URL:
        return None
    if not isinstance(url, str) or not url.strip():
        return 'it is empty' if isinstance(url, str) else f'it is {type(url).__name__} {url!r}, not a URL string'
    from urllib.parse import urlsplit
    text = url.strip()
    try:
        parts = urlsplit(text if '://' in text else f'http://{text}')
    except ValueError as exc:  # e.g. an unclosed IPv6 bracket
        return f'it does not parse as a URL ({exc})'
    if '://' not in text and parts.path:  # HOST:PORT takes no path: 'http//h:8000' read as host 'http'
        fixed = re.sub(r'^(https?):?/*', r'\1://', text) if re.match(r'^https?:?/', text) else None
        hint = f' (did you mean {fixed}?)' if fixed else ''
        return f"it has no scheme (no '://') and a path {parts.path!r} after the host {parts.netloc!r}{hint}"
    try:
        port = parts.port
    except ValueError:
        port = parts.netloc.rsplit(':', 1)[-1]
    if parts.scheme not in ('http', 'https'):
        return f'its scheme {parts.scheme!r} is not http or https'
    if not parts.hostname:
        return 'it names no host'
    if port is not None and not (isinstance(port, int) and 0 < port <= 65535):
        return f'its port {port} is not a number from 1 to 65535'
    return None


def check_teacher_urls(server: str, urls: list) -> None:
    """Every URL of ``--teacher_model_server`` (``urls``: its entries' ``url``, in order) can be reached: a URL
    that can never parse would be retried for the whole ``--teacher_server_wait``."""
    several = server.strip().startswith('[')
    for i, url in enumerate(urls):
        problem = teacher_url_problem(url)
        if problem:
            where = f' entry {i} ("url": {json.dumps(url, default=str)})' if several else f' {server}'
            local = ', or "local"' if several else ''
            raise FlagError(f'--teacher_model_server{where}: {problem}; allowed: http://HOST:PORT or '
                            f'https://HOST:PORT (a port of 1 to 65535){local}')


def check_teacher_server_flags(args, local_teacher: bool = False) -> None:
    """Flags that do not go with ``--teacher_model_server`` (a teacher that only scores responses), and its URLs
    (:func:`check_teacher_urls`); ``local_teacher``: one of its entries is the local teacher, which
    ``--offload_teacher_model`` may offload."""
    if args.teacher_model_server is None:
        return
    check_teacher_urls(args.teacher_model_server, entry_urls(args.teacher_model_server))
    if args.gkd_logits_topk is None:
        raise FlagError('--gkd_logits_topk is required with --teacher_model_server (the server returns '
                         'top-k log-probabilities)')
    if args.offload_teacher_model and not local_teacher:
        raise FlagError('--offload_teacher_model true has no effect with --teacher_model_server (the '
                         'teacher lives on the server): remove one of them')
    if args.seq_kd:
        raise FlagError('--seq_kd true needs a local teacher that can sample (--teacher_model, or the '
                         'student base with LoRA); a --teacher_model_server only scores responses')


def ignored_flag_warnings(args) -> List[str]:
    """Flags whose values have no effect with the others given, and a learning rate of 0 (warned about, not refused:
    the run still does what the user asked for otherwise; a run at learning rate 0 measures losses)."""
    warnings = []
    if args.gkd_cross_tokenizer == 'uld' and args.beta is not None:
        warnings.append(f'--beta {args.beta} is ignored with --gkd_cross_tokenizer uld (ULD compares sorted '
                        'probabilities with an L1 distance: it has no beta; --gkd_cross_tokenizer hybrid uses it)')
    if getattr(args, 'use_liger_kernel', False):
        warnings.append(f'--use_liger_kernel true: the GKD loss is the plugin\'s (--gkd_loss_impl {args.gkd_loss_impl}: '
                        'its fused loss on hidden states where it applies, which like Liger\'s fused JSD never '
                        'holds the full logits), not Liger\'s fused JSD, which ms-swift\'s GKD uses: the plugin\'s '
                        'covers every --gkd_divergence, --gkd_logits_topk with its tail, SKD and RL terms with one '
                        'tested code path (docs_en/fused_loss.md)')
    scheduler = getattr(args, 'multi_turn_scheduler', None)
    if scheduler and args.lmbda == 0 and not args.seq_kd:
        warnings.append(f'--multi_turn_scheduler {scheduler} has no effect with --lmbda 0 and --seq_kd false: every '
                        'step trains on the dataset\'s responses and nothing is sampled; raise --lmbda (the student '
                        'drives the turns) or set --seq_kd true (the teacher does)')
    scope = getattr(args, 'completion_length_limit_scope', None)
    if scheduler and scope == 'total' and not getattr(args, 'use_vllm', False):
        warnings.append('--completion_length_limit_scope total applies to vLLM colocate sampling only (ms-swift\'s '
                        'engine patch): with --use_vllm false every turn is limited by --max_completion_length')
    backend = getattr(args, 'gkd_fused_backend', None)
    if getattr(args, 'gkd_loss_impl', None) == 'dense' and backend not in (None, 'auto'):
        warnings.append(f'--gkd_fused_backend {backend} has no effect with --gkd_loss_impl dense (the '
                        'backend is the fused loss\'s)')
    if args.seq_kd and args.lmbda == 1:
        warnings.append('--seq_kd true has no effect with --lmbda 1: every step is on-policy (the student samples), '
                        'so the teacher never samples; lower --lmbda to mix in sequence-level KD steps')
    if getattr(args, 'learning_rate', None) == 0:
        warnings.append('--learning_rate 0: the weights never change, so the run measures losses and every checkpoint '
                        'it saves holds the starting weights; pass a learning rate above 0 to train')
    return warnings


def check_training_length(args) -> None:
    """The run has optimizer steps to take: ``--max_steps`` positive or -1 (the default: ``--num_train_epochs``
    decides, then positive). ``--max_steps 0`` ran one step at learning rate 0, ``--num_train_epochs 0`` none, both
    loading the models and ending with exit code 0."""
    steps, epochs = args.max_steps, args.num_train_epochs
    if steps == 0 or steps < -1:
        what = ' trains nothing (one step at learning rate 0)' if steps == 0 else ''
        raise FlagError(f'--max_steps {steps}{what}: allowed a positive number of optimizer steps, or -1 (the '
                        'default: --num_train_epochs decides)')
    if steps == -1 and not epochs > 0:
        raise FlagError(f'--num_train_epochs {epochs:g} with --max_steps -1 trains no step: allowed > 0 (a fraction '
                        'of an epoch too), or a positive --max_steps, which then decides')


def check_ms_swift_values(args) -> None:
    """The values of ms-swift flags that GKD refuses on their own (also in ``swift``'s launcher, on the values given)."""
    check_max_length(args)
    check_no_generation_in_evaluation(args)


def check_max_length(args) -> None:
    """``--max_length``, where given, is a positive number of tokens: 0 or less left no token of any row (0 was
    refused only at the first batch, after both models loaded)."""
    max_length = getattr(args, 'max_length', None)
    if max_length is not None and max_length <= 0:
        raise FlagError(f'--max_length {max_length}: allowed a positive number of tokens (a row\'s prompt and '
                        'response together), or not given (the model\'s own limit)')


def check_no_generation_in_evaluation(args) -> None:
    """``--predict_with_generate true``: GKD's evaluation scores the dataset's responses and never generates, so the
    flag was taken and ignored, and ms-swift's generation metric it selects asked for ``jieba`` (a traceback on every
    rank)."""
    if getattr(args, 'predict_with_generate', False):
        raise FlagError('--predict_with_generate true: GKD\'s evaluation scores the dataset\'s responses with the '
                        'loss and never generates, so the flag would be ignored (and ms-swift\'s generation metric '
                        'it selects fails on every rank); allowed: false (the default)')
