"""The plugin's command-line flags, the allowed values of every flag GKD checks, and the checks that need only flags.

Framework-free (no ms-swift import): shared by ``swift rlhf`` (:mod:`swift_gkd_plugin.swift.setup.arguments`) and
``megatron rlhf`` (:mod:`swift_gkd_plugin.megatron.setup.checks`), where they also run in the launcher process, before any
rank starts. Each range is declared once, beside its field (:func:`flag_field`'s ``range`` for the plugin's fields,
:data:`MS_SWIFT_FLAGS` for ms-swift's own), and the checks are generated from the declarations; allowed values of a
choice come from its ``Literal`` type. Every message names the flag, the value and the allowed values. The
hand-written rules between flags are in :mod:`swift_gkd_plugin.options.flag_checks`, re-exported here: import from this module.
"""
from __future__ import annotations

import math
import typing
from dataclasses import Field, dataclass, field, fields
from typing import Dict, List, Literal, Optional, Tuple

from swift_gkd_plugin.core.constants import ROLLOUT_IS_MODES, SCALE_REWARDS
from swift_gkd_plugin.core.fused.kernels import BACKENDS as FUSED_BACKENDS
from swift_gkd_plugin.core.row_divergence import DIVERGENCES
from swift_gkd_plugin.options.flag_checks import (LOCAL_TEACHER_URL, SAMPLING_TEMPERATURE_FLOOR, SAMPLING_TEMPERATURE_FLOOR_WHY,
                                          SKD_PLACEMENTS, TEMPERATURE_CEILING, TEMPERATURE_CEILING_WHY,
                                          TEMPERATURE_FLOOR, TEMPERATURE_FLOOR_WHY, VLLM_TEMPERATURE_CEILING, FlagError,
                                          Range, check_bf16_device, check_cpu_processes, check_cross_tokenizer_flags,
                                          check_deepspeed_launch, check_divergence_flags, check_fused_backend,
                                          check_multi_turn_flags, check_no_multi_turn, check_reference_flags,
                                          check_max_staleness, check_rollout_flags, check_sampled_kl_flags,
                                          check_sampling_flags,
                                          check_teacher_server_flags, check_teacher_urls, check_temperature_ceiling,
                                          check_torch_compile_checkpointing, check_training_set, entry_urls,
                                          ignored_flag_warnings, local_teacher_index)

# this module's names and flag_checks' (callers import both from here)
__all__ = [
    'flag_field', 'FLAG_DECLARATIONS', 'choices_of', 'GKDPluginArgumentsMixin', 'PLUGIN_FLAGS',
    'MegatronGKDFlagsMixin', 'SWIFT_RLHF_ONLY', 'NO_EFFECT_IN_MEGATRON', 'TEACHER_CLIENT_FLAGS', 'MS_SWIFT_FLAGS', 'VLLM_FLAGS',
    'check_vllm_flags', 'declared_ranges', 'GKD_LOSS_IMPLS', 'CROSS_TOKENIZER_METHODS', 'GKD_DIVERGENCES',
    'FINITE_FLAGS', 'RL_FLAGS', 'SCALAR_FLAGS', 'check_declared', 'plugin_flags_in',
    'check_no_plugin_flags_outside_gkd', 'resolve_num_generations', 'check_gkd_scalars', 'rollout_max_tokens',
    'sampling_temperature', 'check_rl_flags',
    # flag_checks
    'TEMPERATURE_FLOOR', 'TEMPERATURE_FLOOR_WHY', 'TEMPERATURE_CEILING', 'TEMPERATURE_CEILING_WHY',
    'SAMPLING_TEMPERATURE_FLOOR', 'SAMPLING_TEMPERATURE_FLOOR_WHY', 'VLLM_TEMPERATURE_CEILING', 'FlagError', 'Range',
    'check_temperature_ceiling', 'check_fused_backend', 'check_bf16_device', 'check_rollout_flags',
    'check_reference_flags', 'check_sampled_kl_flags', 'check_training_set', 'SKD_PLACEMENTS', 'check_sampling_flags', 'check_multi_turn_flags', 'check_no_multi_turn',
    'check_torch_compile_checkpointing', 'check_deepspeed_launch', 'check_cpu_processes', 'check_divergence_flags',
    'check_cross_tokenizer_flags', 'check_teacher_server_flags', 'ignored_flag_warnings', 'LOCAL_TEACHER_URL',
    'local_teacher_index', 'entry_urls', 'check_teacher_urls', 'check_max_staleness',
]


#: the declarations of the plugin's fields made with :func:`flag_field`, by field (:data:`FLAG_DECLARATIONS` by name)
_DECLARED: Dict[Field, object] = {}


def flag_field(*, default, help: str, range: Optional[Range] = None, choices=None) -> Field:
    """A plugin flag's field with its declared allowed values: ``range`` (a :class:`Range`) or ``choices`` (a
    ``Literal`` type, for a field whose annotation stays ``str``). The field's metadata is its ``help`` alone:
    transformers' ``HfArgumentParser`` hands every metadata key but ``aliases`` to ``argparse.add_argument`` (5.23 and
    later read it without calling ``copy()``), so the declaration is kept beside the field, out of the parser's sight,
    in :data:`FLAG_DECLARATIONS`."""
    f = field(default=default, metadata={'help': help})
    if range is not None or choices is not None:
        _DECLARED[f] = range if range is not None else choices
    return f


def choices_of(annotation) -> Tuple:
    """The values of a ``Literal[...]`` annotation (inside ``Optional`` too), else ``()``."""
    if typing.get_origin(annotation) is Literal:
        return typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Union:
        return tuple(v for arg in typing.get_args(annotation) for v in choices_of(arg))
    return ()


@dataclass
class GKDPluginArgumentsMixin:
    """Flags that ms-swift's GKD does not have. Each is declared on the command-line arguments and on the trainer's
    config (ms-swift only forwards fields that the config class declares)."""
    gkd_loss_impl: Literal['auto', 'fused', 'dense'] = field(
        default='auto',
        metadata={'help': 'GKD loss implementation: auto (fused where it applies, else dense), fused, or dense.'})
    # the annotation stays str (argparse would refuse other values with its own message); the choices are declared:
    gkd_fused_backend: Optional[str] = flag_field(
        default=None,
        help='Backend of the fused loss: auto (Triton kernels on CUDA, each kernel variant checked once against '
        'the PyTorch path on its first chunk, falling back to it with a warning; the PyTorch path elsewhere), '
        'torch (the PyTorch chunk path) or triton (the kernels, never a fallback). Unset (default): the '
        'SWIFT_GKD_FUSED_BACKEND environment variable, else auto. See docs_en/fused_loss.md.',
        choices=Literal[FUSED_BACKENDS])
    gkd_drop_bad_rows: bool = field(
        default=False,
        metadata={'help': 'Train without the rows of local jsonl, json, csv, parquet and arrow datasets that ms-swift '
                  'would drop silently (an unknown role, null or non-text content, messages that are not a list, longer than '
                  '--max_length with --truncation_strategy delete), counting them in a warning. Default false: such '
                  'rows are refused before any model is loaded, named by file and line.'})
    teacher_api_key: Optional[str] = field(
        default=None,
        metadata={'help': 'API key of --teacher_model_server (default: the SWIFT_GKD_TEACHER_API_KEY environment '
                  'variable, which, unlike the flag, is not written to args.json).'})
    teacher_server_timeout: float = flag_field(
        default=120.0, help='seconds per teacher-server request', range=Range(0, low_open=True, unit='seconds'))
    teacher_server_retries: int = flag_field(
        default=3, help='retries of a failed teacher-server request (at least; an HTTP 500 gets only these)',
        range=Range(0, integer=True))
    teacher_server_wait: float = flag_field(
        default=600.0,
        help='seconds to wait for an unreachable, starting or busy teacher server (connection refused, timeouts, '
        'HTTP 502/503/504): at start-up until it is healthy, and for each request, retrying with a logged '
        'backoff; long enough for a 7B teacher to (re)load. 0: only the retries.',
        range=Range(0, unit='seconds'))
    gkd_topk_tail: bool = field(
        default=False,
        metadata={'help': 'With top-k teachers (--gkd_logits_topk, teacher servers): add a bucket holding the '
                  'probability mass outside the top-k on both sides (fused loss).'})
    gkd_rl_coef: float = flag_field(
        default=0.0,
        help='Weight c of the policy-gradient term added to the divergence on on-policy steps: '
        'c * sum A * (-log p(sampled token)) / tokens, A the group-normalised reward of the completion '
        '(--reward_funcs, --num_generations, --scale_rewards). 0 (default): off. Finite, >= 0.',
        range=Range(0, why='the weight of the policy-gradient term; 0 = off'))
    gkd_divergence_coef: float = flag_field(
        default=1.0,
        help='Weight of the divergence (--gkd_divergence at --beta, on every step). 0: the divergence is only '
        'logged (gkd/distill_loss) and on-policy steps learn from the policy-gradient terms alone, as sampled-token '
        'distillation runs elsewhere (needs --lmbda 1 and --gkd_sampled_kl_coef or --gkd_rl_coef > 0). Default 1. '
        'Finite, >= 0. swift rlhf.',
        range=Range(0, why='the weight of the divergence; 0 = logged only'))
    gkd_sampled_kl_coef: float = flag_field(
        default=0.0,
        help='Weight c of the sampled-token distillation term on on-policy steps (Tinker\'s kl_penalty_coef): each '
        'token the student sampled gets the advantage A = log p_teacher(y) - log p_student(y) (constant; at the '
        'sampling temperature; summed over the later tokens with --gkd_sampled_kl_discount), trained as a policy '
        'gradient c * sum A * (-log p(y)) / tokens with the rollout importance weights; its expectation is the '
        'gradient of the reverse KL. Added to the divergence and the reward term. Logged as gkd/sampled_kl (the '
        'reverse-KL estimate). 0 (default): off. Finite, >= 0. See docs_en/sampled_kl.md.',
        range=Range(0, why='the weight of the sampled-token term; 0 = off'))
    gkd_sampled_kl_discount: float = flag_field(
        default=0.0,
        help='Discount g of --gkd_sampled_kl_coef\'s advantages (Tinker\'s kl_discount_factor): A_t = sum over the '
        'later response tokens k of g^(k - t) (log p_teacher(y_k) - log p_student(y_k)), masked tokens (tool '
        'outputs) skipped. 0 (default): each token alone (the per-token reverse KL); 1: the whole rest of the '
        'sequence (the sequence-level reverse KL). In [0, 1].',
        range=Range(0, 1, why='0 = each token alone, 1 = the sequence-level reverse KL'))
    gkd_sampled_kl_baseline: Literal['none', 'batch'] = field(
        default='none',
        metadata={'help': 'Baseline of --gkd_sampled_kl_coef\'s advantages. none (default): the advantages as they '
                  'are. batch: each row\'s advantages minus their mean over the micro-batch\'s other rows (sampled '
                  'independently, so the expectation is unchanged); it removes their common offset, which on a student '
                  'far from its teacher (every log-ratio negative) pushes down whatever was sampled. See '
                  'docs_en/sampled_kl.md.'})
    # the annotation stays str (argparse would refuse other values with its own message); the choices are declared:
    gkd_cross_tokenizer: Optional[str] = flag_field(
        default=None,
        help='Distil from a --teacher_model whose tokenizer differs from the student\'s: uld (sorted-probability '
        'L1, any two vocabularies) or hybrid (generalized JSD on the tokens both vocabularies share, ULD on the '
        'rest). Unset (default): the teacher must use the student\'s tokenizer. See docs_en/cross_tokenizer.md.',
        choices=Literal['uld', 'hybrid'])
    gkd_divergence: Literal[DIVERGENCES] = field(  # the registry's names (core/row_divergence.py)
        default='jsd',
        metadata={'help': 'The distillation divergence, at --temperature: jsd (the generalized JSD of --beta, '
                  'default), skew_kl = KL(teacher || a teacher + (1 - a) student) or skew_rkl = KL(student || '
                  '(1 - a) teacher + a student), a = --gkd_skew_alpha (DistiLLM). See docs_en/fused_loss.md.'})
    gkd_skew_alpha: float = flag_field(
        default=0.1,
        help='The skew a of --gkd_divergence skew_kl / skew_rkl, in [0, 1) (0: the plain forward / reverse KL). '
        'Default 0.1.',
        range=Range(0, 1, high_open=True, why='0 = the plain KL; at 1 the loss is 0'))
    teacher_template: Optional[str] = field(
        default=None,
        metadata={'help': 'With --gkd_cross_tokenizer: the teacher\'s ms-swift template type (as --template is the '
                  'student\'s). Unset (default): its model type\'s, or the student\'s --template when that type has '
                  'several candidates. See docs_en/cross_tokenizer.md.'})
    gkd_sampling_temperature: Optional[float] = flag_field(
        default=None,
        help='Temperature of on-policy sampling (the student\'s, and the teacher\'s on seq_kd steps and SKD '
        'replacements), separate from --temperature, which stays the temperature of the loss. Unset (default): '
        f'--temperature, as ms-swift. Finite, >= {SAMPLING_TEMPERATURE_FLOOR:g}, at most 2 with vLLM.',
        range=Range(0, low_open=True, optional=True, says='> 0', why='or unset for --temperature'))
    gkd_rollout_max_tokens: Optional[int] = flag_field(
        default=None,
        help='Early-stopped rollouts: the student\'s on-policy samples (SKD\'s included) stop after this many '
        'tokens (per turn with --multi_turn_scheduler; the whole trajectory where ms-swift bounds the total: vLLM '
        'colocate with --completion_length_limit_scope total), while --max_completion_length keeps bounding seq_kd '
        'samples and dataset responses. Unset (default): --max_completion_length. Integer in 1 to '
        '--max_completion_length. See docs_en/onpolicy_remedies.md.',
        range=Range(1, integer=True, optional=True, why='or unset for --max_completion_length'))
    gkd_entropy_fkl_threshold: Optional[float] = flag_field(
        default=None,
        help='Entropy-aware mix (arXiv 2603.07079): at every position where the teacher\'s entropy (nats, at '
        '--temperature, over the loss\'s support: the vocabulary, or the top-k buckets) exceeds this value, '
        'KL(teacher || student) is added to the --beta divergence. Unset (default): off. Finite, >= 0 (0: every '
        'position). PyTorch loss paths (--gkd_fused_backend auto picks them). gkd/entropy_fkl_fraction logs the '
        'share of sampled positions past the threshold. See docs_en/onpolicy_remedies.md.',
        range=Range(0, optional=True, says='>= 0 (nats)', why='or unset: off'))
    gkd_ref_kl_coef: float = flag_field(
        default=0.0,
        help='Reference anchor (StableOPD, arXiv 2604.08527): adds COEF * KL(student || reference) per response '
        'token on every step, the reference being the initial student at --temperature (a LoRA student\'s base '
        'with its adapter off; a fully tuned student\'s frozen copy loaded from --model). Keeps on-policy runs '
        'from drifting into long, repetitive samples. 0 (default): off. swift rlhf, dense loss (--gkd_loss_impl '
        'auto picks it). Logged as gkd/ref_kl. See docs_en/onpolicy_remedies.md.',
        range=Range(0, says='>= 0', why='0: off'))
    gkd_skd_top_k: int = flag_field(
        default=0,
        help='Speculative KD on on-policy steps: a token the student samples that is outside the teacher\'s '
        'top-K at its position is replaced by a token sampled from the teacher (the paper uses 25). 0 (default): '
        'off. Transformers sampling (--use_vllm false) with a teacher of the student\'s tokenizer, local or this '
        'plugin\'s server (its --top_k >= K). See docs_en/skd.md.',
        range=Range(0, integer=True, why='the teacher\'s top-K that accepts a student token; 0 = off'))
    gkd_max_staleness: int = flag_field(
        default=1,
        help='With --async_generate true: how many optimizer steps ahead the rollout server samples, and so how '
        'many weight versions old a sample may be (K). The server is synced once every K steps and samples the '
        'on-policy steps of the next K while they train (1 to K versions old; a batch older than K, from a '
        'checkpoint of a deeper queue, is dropped and sampled again, counted in gkd/stale_dropped). 1 (default): '
        'ms-swift\'s one step of lookahead, a sync every step. Integer >= 1; > 1 needs --async_generate true. '
        'See docs_en/vllm.md.',
        range=Range(1, integer=True, why='1 = one step ahead, as ms-swift\'s --async_generate'))
    teacher_scores: Optional[str] = field(
        default=None,
        metadata={'help': 'A teacher-score store (written by `swift-gkd score` or --save_teacher_scores): rows found '
                  'there take their teacher top-k from it, a missing row is scored by the teacher if one is given, '
                  'else refused. Where the store covers every row of the --dataset (a finished `swift-gkd score` of '
                  'the same files and encoding) and no step samples, --teacher_model is not loaded. See '
                  'docs_en/teacher_store.md.'})
    save_teacher_scores: Optional[str] = field(
        default=None,
        metadata={'help': 'Keep what the teacher scores in this run (its top-k, with --gkd_logits_topk) in a '
                  'teacher-score store in this folder, for --teacher_scores of a later epoch or run. See '
                  'docs_en/teacher_store.md.'})
    teacher_scores_dtype: Literal['float16', 'bfloat16', 'float32'] = field(
        default='float16',
        metadata={'help': 'Dtype of the log-probabilities a new teacher-score store keeps (--save_teacher_scores, '
                  '`swift-gkd score`): float16 (default: 8x the precision of bfloat16 for log-probabilities, which '
                  'lie in [-65504, 0]; the live top-k losses to ~1e-3), bfloat16, or float32 (the live losses to '
                  'float32 rounding, ~1.8x the bytes).'})
    teacher_scores_samples: int = flag_field(
        default=0,
        help='Tokens drawn from the tempered teacher at each scored position (random-sampling KD, Anshumann et '
        'al. 2025; 12 is the paper\'s). Writing (--save_teacher_scores, `swift-gkd score`): the store keeps them '
        'beside the top-k, with the teacher\'s entropy (a local teacher only). Reading (--teacher_scores): the '
        'loss is the sampled cross-entropy over them, an unbiased estimate of forward KL\'s gradient (--beta 0 '
        'only), instead of the top-k divergence. 0 (default): none.',
        range=Range(0, integer=True, why='0 = none'))
    gkd_score_only: bool = field(
        default=False,
        metadata={'help': 'What `swift-gkd score` runs: every row of --dataset encoded as training encodes it and '
                  'scored by the teacher into --save_teacher_scores, once; no training step, no checkpoint.'})


PLUGIN_FLAGS: List[str] = [f.name for f in fields(GKDPluginArgumentsMixin)]


@dataclass
class MegatronGKDFlagsMixin(GKDPluginArgumentsMixin):
    """The plugin's flags for ``megatron rlhf`` (those of ``swift rlhf`` plus the Megatron-only ones)."""
    teacher_tensor_model_parallel_size: Optional[int] = field(
        default=None,
        metadata={'help': 'Tensor-parallel size of a --teacher_model. The Megatron teacher is built in the '
                  "student's parallel layout: only the student's --tensor_model_parallel_size (the default) is "
                  'supported; serve a teacher in another layout and pass --teacher_model_server.'})


#: the plugin's flags that only ``swift rlhf`` acts on: ``megatron rlhf`` refuses each away from its default, naming
#: the flag (:func:`swift_gkd_plugin.megatron.setup.checks.check_megatron_gkd`), except those of
#: :data:`NO_EFFECT_IN_MEGATRON`, which it takes without effect. The flag reference's launchers column reads it.
#: the teacher-server client's flags of swift rlhf (megatron rlhf asks a server through ms-swift's own client)
TEACHER_CLIENT_FLAGS = ('teacher_api_key', 'teacher_server_timeout', 'teacher_server_retries', 'teacher_server_wait')
SWIFT_RLHF_ONLY = ('gkd_fused_backend', 'gkd_drop_bad_rows') + TEACHER_CLIENT_FLAGS + (
    'gkd_rl_coef', 'gkd_divergence_coef', 'gkd_sampled_kl_coef', 'gkd_sampled_kl_discount', 'gkd_sampled_kl_baseline',
    'gkd_cross_tokenizer', 'teacher_template', 'gkd_ref_kl_coef', 'gkd_skd_top_k', 'gkd_max_staleness',
    'save_teacher_scores', 'teacher_scores_dtype', 'teacher_scores_samples', 'gkd_score_only')
#: ``megatron rlhf`` warns that ``--gkd_fused_backend`` has no effect there
NO_EFFECT_IN_MEGATRON = ('gkd_fused_backend',)
#: the plugin's flags declared with :func:`flag_field`: name -> its :class:`Range`, or the ``Literal`` type of its
#: choices
FLAG_DECLARATIONS: Dict[str, object] = {f.name: _DECLARED[f] for f in fields(GKDPluginArgumentsMixin) if f in _DECLARED}
_HINTS = typing.get_type_hints(GKDPluginArgumentsMixin)

#: ms-swift's own flags that GKD checks, with their allowed values (declared here once: ms-swift's classes are not
#: ours to annotate). ``beta`` may be None (ms-swift's Megatron default, resolved to 0.5 for GKD).
MS_SWIFT_FLAGS: Dict[str, object] = {
    'beta': Range(0, 1, optional=True, why='0 = KL(teacher||student), 1 = KL(student||teacher)'),
    'lmbda': Range(0, 1, why='the probability of an on-policy step'),
    'temperature': Range(TEMPERATURE_FLOOR, why=TEMPERATURE_FLOOR_WHY),
    'sft_alpha': Range(0, why='the weight of the SFT term on dataset responses; 0 = none'),
    # refused even when nothing is sampled (--lmbda 0, --seq_kd false): ms-swift turns it into the generation
    # config's max_new_tokens, which transformers rejects later, after the models are loaded
    'max_completion_length': Range(0, low_open=True, says='> 0', integer=True,
                                   why='the length of sampled responses and of the generation config'),
    # ms-swift's rollout sampling filters (on-policy and seq_kd samples, transformers and vLLM alike)
    'top_p': Range(0, 1, low_open=True, optional=True, says='in (0, 1]', why='nucleus sampling; 1 = off'),
    'top_k': Range(-1, integer=True, optional=True, says='-1, 0 or a positive integer',
                   why='the K most likely tokens; -1 or 0 = every token'),
    'gkd_logits_topk': Range(1, integer=True, optional=True, says='a positive integer',
                             why='or unset for the full vocabulary'),
    'num_generations': Range(1, integer=True, why='completions sampled per prompt on on-policy steps; 1 = one, as '
                             'ms-swift GKD'),
    'scale_rewards': Optional[Literal[SCALE_REWARDS]],
    # ms-swift GRPO's sampler/policy mismatch correction, read by GKD's policy-gradient term (docs_en/rl.md)
    'rollout_importance_sampling_mode': Optional[Literal[ROLLOUT_IS_MODES]],
    'rollout_importance_sampling_threshold': Range(1, why='C of min(pi / mu, C): a token the sampler and the policy '
                                                   'agree on has weight 1, which a threshold below 1 would cut'),
}


#: ms-swift's ``--vllm_*`` numbers, with vLLM's own bounds (vllm.config: CacheConfig, ModelConfig, ParallelConfig,
#: SchedulerConfig, LoRAConfig, MultiModalConfig), which it checks only when its engine starts, after the models
#: loaded (pydantic tracebacks). Checked with ``--use_vllm true`` (:func:`check_vllm_flags`).
VLLM_FLAGS: Dict[str, object] = {
    'vllm_gpu_memory_utilization': Range(0, 1, low_open=True, says='in (0, 1]',
                                         why='the fraction of each GPU\'s memory vLLM may take'),
    'vllm_tensor_parallel_size': Range(1, integer=True),
    'vllm_pipeline_parallel_size': Range(1, integer=True),
    'vllm_data_parallel_size': Range(1, integer=True),
    'vllm_max_num_seqs': Range(1, integer=True, optional=True, why='or unset for vLLM\'s default'),
    'vllm_max_model_len': Range(1, integer=True, optional=True, why='tokens of a prompt and its completion; or unset '
                                'for the model\'s length'),
    'vllm_mm_processor_cache_gb': Range(0, optional=True, unit='GiB'),
    'vllm_server_timeout': Range(0, low_open=True, says='> 0', unit='seconds'),
    'vllm_max_lora_rank': Literal[1, 8, 16, 32, 64, 128, 256, 320, 512],
}


def check_vllm_flags(args) -> None:
    """With ``--use_vllm true``: a ``--vllm_mode``, the ``--vllm_*`` numbers within vLLM's bounds
    (:data:`VLLM_FLAGS`), and a sampling temperature vLLM accepts (at most 2)."""
    if not getattr(args, 'use_vllm', False):
        return
    if args.vllm_mode is None:
        raise FlagError('--use_vllm true needs --vllm_mode: colocate (vLLM inside each training process) or server (a '
                        'swift rollout server); allowed: colocate, server')
    for name, rule in VLLM_FLAGS.items():
        value = getattr(args, name)
        if isinstance(rule, Range):
            rule.check(name, value)
        elif value not in choices_of(rule):
            raise FlagError(f'--{name} must be one of {list(choices_of(rule))} (vLLM\'s), got {value!r}')
    temperature = sampling_temperature(args)
    if temperature > VLLM_TEMPERATURE_CEILING:
        flag = 'gkd_sampling_temperature' if args.gkd_sampling_temperature is not None else 'temperature'
        raise FlagError(f'--{flag} {temperature:g} is the sampling temperature, and vLLM samples at temperatures in '
                        f'[0, {VLLM_TEMPERATURE_CEILING:g}] only (it refuses the first rollout): pass '
                        f'--gkd_sampling_temperature <= {VLLM_TEMPERATURE_CEILING:g} (it keeps --temperature for the '
                        'loss), or --use_vllm false')


def declared_ranges() -> Dict[str, object]:
    """Every declared flag: name -> its :class:`Range`, or the ``Literal`` type of its choices (``Optional[...]``
    when it may be unset)."""
    declared = dict(MS_SWIFT_FLAGS)
    for f in fields(GKDPluginArgumentsMixin):
        hint = _HINTS[f.name]
        declaration = FLAG_DECLARATIONS.get(f.name)
        if isinstance(declaration, Range):
            declared[f.name] = declaration
        elif declaration is not None or choices_of(hint):
            choices = hint if declaration is None else declaration
            declared[f.name] = Optional[choices] if type(None) in typing.get_args(hint) else choices
    return declared


GKD_LOSS_IMPLS = choices_of(declared_ranges()['gkd_loss_impl'])
CROSS_TOKENIZER_METHODS = choices_of(declared_ranges()['gkd_cross_tokenizer'])
#: the registry of core.row_divergence (a test keeps them equal)
GKD_DIVERGENCES = choices_of(declared_ranges()['gkd_divergence'])
#: Float flags refused when NaN or infinite (every declared non-integer range).
FINITE_FLAGS = tuple(name for name, r in declared_ranges().items() if isinstance(r, Range) and not r.integer)
#: ms-swift's GRPO flags that GKD + RL reads: checked by :func:`check_rl_flags` (swift rlhf only)
RL_FLAGS = ('num_generations', 'scale_rewards', 'rollout_importance_sampling_mode',
            'rollout_importance_sampling_threshold')
#: Every other declared flag (a new plugin field with a ``range`` or choices joins by itself), checked by
#: :func:`check_gkd_scalars` in both entry points.
SCALAR_FLAGS = tuple(name for name in declared_ranges() if name not in RL_FLAGS)


def check_declared(args, names) -> None:
    """Each flag of ``names`` holds an allowed value of its declaration. A declared name that ``args`` lacks (a
    renamed or removed field) raises, rather than switching its check off."""
    declared = declared_ranges()
    for name in names:
        if not hasattr(args, name):
            raise AttributeError(f'swift_gkd_plugin declares the allowed values of --{name}, but the arguments have '
                                 f'no field {name!r} (renamed or removed?): update swift_gkd_plugin/options/flags.py')
        value, rule = getattr(args, name), declared[name]
        if isinstance(rule, Range):
            rule.check(name, value)
            continue
        allowed, optional = choices_of(rule), type(None) in typing.get_args(rule)
        if not (value is None and optional) and value not in allowed:
            unset = ' (or unset)' if optional else ''
            raise FlagError(f'--{name} must be one of {list(allowed)}{unset} for GKD, got {value!r}')


def plugin_flags_in(argv: List[str], names: List[str] = PLUGIN_FLAGS) -> List[str]:
    """The flags of ``names`` present in a command line (``--flag value`` or ``--flag=value``)."""
    found = []
    for token in argv:
        name = token[2:].split('=', 1)[0] if token.startswith('--') else None
        if name in names:
            found.append(f'--{name}')
    return found


def check_no_plugin_flags_outside_gkd(args, mixin=GKDPluginArgumentsMixin) -> None:
    """The plugin's flags (the fields of ``mixin``) changed with another ``--rlhf_type`` would be silently ignored."""
    changed = [f'--{f.name}' for f in fields(mixin) if getattr(args, f.name) != f.default]
    if changed:
        raise FlagError(f'{changed} only apply to --rlhf_type gkd (got --rlhf_type {args.rlhf_type})')


def resolve_num_generations(args, grpo_default: Optional[int] = None) -> None:
    """An unset ``num_generations`` (None): 1 for GKD (one completion per prompt, as ms-swift GKD), GRPO's default for
    the other rlhf types (``grpo_default``, else ms-swift's: :func:`~swift_gkd_plugin.runtime.ms_swift_state.
    grpo_num_generations`); the one default of the command line and of arguments built in Python."""
    if args.num_generations is None:
        if args.rlhf_type == 'gkd':
            args.num_generations = 1
            return
        if grpo_default is None:
            from swift_gkd_plugin.runtime.ms_swift_state import grpo_num_generations
            grpo_default = grpo_num_generations()
        args.num_generations = grpo_default


def check_gkd_scalars(args) -> None:
    """The declared ranges and choices of the flags that need nothing else, then their combinations."""
    check_declared(args, SCALAR_FLAGS)
    if args.gkd_logits_topk == 1 and not args.gkd_topk_tail:
        raise FlagError('--gkd_logits_topk 1 without --gkd_topk_tail true: over the teacher\'s one top token both '
                        'distributions are 1, so the divergence and its gradient are 0 on every token and the run '
                        'learns nothing; allowed: --gkd_logits_topk 2 or more, or 1 with --gkd_topk_tail true (the '
                        'mass outside the top token as a second bucket)')
    if args.gkd_topk_tail:
        # (with --teacher_scores an unset k is the store's, resolved after this check: options/teacher_scores.py)
        if args.gkd_logits_topk is None and not getattr(args, 'teacher_scores', None):
            raise FlagError('--gkd_topk_tail true needs --gkd_logits_topk (the tail is the mass outside the top-k)')
        if args.gkd_loss_impl == 'dense':
            raise FlagError('--gkd_topk_tail true needs --gkd_loss_impl auto or fused (the dense loss has no tail)')
    check_divergence_flags(args)
    check_cross_tokenizer_flags(args)
    check_sampling_flags(args)
    check_max_staleness(args)
    check_rollout_flags(args)
    check_reference_flags(args)
    check_sampled_kl_flags(args)
    check_fused_backend(args)
    check_temperature_ceiling(args)


def rollout_max_tokens(args) -> int:
    """The token budget of the student's on-policy samples: ``--gkd_rollout_max_tokens``, else
    ``--max_completion_length``."""
    value = getattr(args, 'gkd_rollout_max_tokens', None)
    return args.max_completion_length if value is None else value


def sampling_temperature(args) -> float:
    """The temperature of on-policy and seq_kd sampling: ``--gkd_sampling_temperature``, else ``--temperature``."""
    value = args.gkd_sampling_temperature
    return args.temperature if value is None else value


def check_rl_flags(args) -> None:
    """``--num_generations``, ``--reward_funcs``, ``--reward_weights``, ``--scale_rewards``, ``--gkd_rl_coef`` and
    ms-swift GRPO's ``--rollout_importance_sampling_mode`` / ``_threshold`` / ``--log_rollout_offpolicy_metrics``: the checks that need only the flags (reward names are checked once ``--external_plugins`` are imported)."""
    check_declared(args, RL_FLAGS)
    g = args.num_generations
    funcs = list(args.reward_funcs or [])
    coef = args.gkd_rl_coef
    if coef > 0 and not funcs:
        raise FlagError(f'--gkd_rl_coef {coef} needs --reward_funcs (the policy-gradient term weighs the sampled '
                         'tokens by their rewards\' advantages)')
    mode = args.rollout_importance_sampling_mode
    policy_gradient = coef > 0 or getattr(args, 'gkd_sampled_kl_coef', 0.0) > 0
    if mode is not None and not policy_gradient:
        raise FlagError(f'--rollout_importance_sampling_mode {mode} weights the policy-gradient terms, which are off '
                         f'(--gkd_rl_coef {coef}, --gkd_sampled_kl_coef 0): set --gkd_rl_coef > 0 with --reward_funcs '
                         'or --gkd_sampled_kl_coef > 0, or unset the mode')
    if args.log_rollout_offpolicy_metrics and not policy_gradient:
        raise FlagError(f'--log_rollout_offpolicy_metrics true measures the samples of the policy-gradient terms, '
                         f'which are off (--gkd_rl_coef {coef}, --gkd_sampled_kl_coef 0): set --gkd_rl_coef > 0 with '
                         '--reward_funcs or --gkd_sampled_kl_coef > 0, or drop it')
    if args.reward_weights is not None and len(args.reward_weights) != len(funcs):
        raise FlagError(f'--reward_weights has {len(args.reward_weights)} values but --reward_funcs names '
                         f'{len(funcs)} functions {funcs}: give one weight per function')
    for w in args.reward_weights or []:
        if not math.isfinite(w):
            raise FlagError(f'--reward_weights must be finite numbers, got {args.reward_weights}')
    if not funcs and g == 1:
        return
    if args.lmbda == 0 and funcs:
        raise FlagError('--reward_funcs only act on on-policy steps, and --lmbda 0 has none: set --lmbda > 0 (the '
                         'probability of an on-policy step) or remove --reward_funcs')
    if args.lmbda == 0 and not args.seq_kd:
        raise FlagError(f'--num_generations {g} samples several completions per prompt, but --lmbda 0 without '
                         '--seq_kd samples nothing (every step uses the dataset responses): set --lmbda > 0 or '
                         '--seq_kd true, or --num_generations 1')
    if funcs and (args.padding_free or args.packing):
        raise FlagError('--reward_funcs is not supported with --padding_free / --packing yet (the advantages are '
                         'per row): pass --padding_free false --packing false')
