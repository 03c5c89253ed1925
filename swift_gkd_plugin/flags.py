"""The plugin's own command-line flags and the checks that need nothing but the flags.

Framework-free (no ms-swift import): shared by ``swift rlhf`` (:mod:`swift_gkd_plugin.swift.arguments`) and
``megatron rlhf`` (:mod:`swift_gkd_plugin.megatron.checks`), where they also run in the launcher process, before any
rank starts. Every message names the flag and the allowed values.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import List, Literal, Optional


@dataclass
class GKDPluginArgumentsMixin:
    """Flags that ms-swift's GKD does not have. Each is declared on the command-line arguments and on the trainer's
    config (ms-swift only forwards fields that the config class declares)."""
    gkd_loss_impl: Literal['auto', 'fused', 'dense'] = field(
        default='auto',
        metadata={'help': 'GKD loss implementation: auto (fused where it applies, else dense), fused, or dense.'})
    teacher_api_key: Optional[str] = field(
        default=None,
        metadata={'help': 'API key of --teacher_model_server (default: the SWIFT_GKD_TEACHER_API_KEY environment '
                  'variable, which, unlike the flag, is not written to args.json).'})
    teacher_server_timeout: float = field(default=120.0, metadata={'help': 'seconds per teacher-server request'})
    teacher_server_retries: int = field(
        default=3,
        metadata={'help': 'retries of a failed teacher-server request (at least; an HTTP 500 gets only these)'})
    teacher_server_wait: float = field(
        default=600.0,
        metadata={'help': 'seconds to wait for an unreachable, starting or busy teacher server (connection refused, '
                  'timeouts, HTTP 502/503/504): at start-up until it is healthy, and for each request, retrying '
                  'with a logged backoff; long enough for a 7B teacher to (re)load. 0: only the retries.'})
    gkd_topk_tail: bool = field(
        default=False,
        metadata={'help': 'With top-k teachers (--gkd_logits_topk, teacher servers): add a bucket holding the '
                  'probability mass outside the top-k on both sides (fused loss).'})
    gkd_rl_coef: float = field(
        default=0.0,
        metadata={'help': 'Weight c of the policy-gradient term added to the divergence on on-policy steps: '
                  'c * sum A * (-log p(sampled token)) / tokens, A the group-normalised reward of the completion '
                  '(--reward_funcs, --num_generations, --scale_rewards). 0 (default): off. Finite, >= 0.'})
    gkd_cross_tokenizer: Optional[str] = field(
        default=None,
        metadata={'help': 'Distil from a --teacher_model whose tokenizer differs from the student\'s: uld (sorted-'
                  'probability L1, any two vocabularies) or hybrid (generalized JSD on the tokens both vocabularies '
                  'share, ULD on the rest). Unset (default): the teacher must use the student\'s tokenizer. '
                  'See docs_en/cross_tokenizer.md.'})
    gkd_divergence: Literal['jsd', 'skew_kl', 'skew_rkl'] = field(
        default='jsd',
        metadata={'help': 'The distillation divergence, at --temperature: jsd (the generalized JSD of --beta, '
                  'default), skew_kl = KL(teacher || a teacher + (1 - a) student) or skew_rkl = KL(student || '
                  '(1 - a) teacher + a student), a = --gkd_skew_alpha (DistiLLM). See docs_en/fused_loss.md.'})
    gkd_skew_alpha: float = field(
        default=0.1,
        metadata={'help': 'The skew a of --gkd_divergence skew_kl / skew_rkl, in [0, 1) (0: the plain forward / '
                  'reverse KL). Default 0.1.'})
    teacher_template: Optional[str] = field(
        default=None,
        metadata={'help': 'With --gkd_cross_tokenizer: the teacher\'s ms-swift template type (as --template is the '
                  'student\'s). Unset (default): its model type\'s, or the student\'s --template when that type has '
                  'several candidates. See docs_en/cross_tokenizer.md.'})


PLUGIN_FLAGS: List[str] = [f.name for f in fields(GKDPluginArgumentsMixin)]
GKD_LOSS_IMPLS = ('auto', 'fused', 'dense')
GKD_DIVERGENCES = ('jsd', 'skew_kl', 'skew_rkl')  # the registry of core.row_divergence (a test keeps them equal)
CROSS_TOKENIZER_METHODS = ('uld', 'hybrid')


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
        raise ValueError(f'{changed} only apply to --rlhf_type gkd (got --rlhf_type {args.rlhf_type})')


#: Float flags refused when NaN or infinite; NaN fails every comparison and inf passes "> 0", so a range check alone
#: lets them through (``--temperature inf`` trains to a negative loss with zero gradients).
FINITE_FLAGS = ('beta', 'lmbda', 'temperature', 'sft_alpha', 'teacher_server_timeout', 'teacher_server_wait',
                'gkd_rl_coef', 'gkd_skew_alpha')


def check_finite(args, names=FINITE_FLAGS) -> None:
    """Each float flag of ``names`` that ``args`` has (None = unset) is a finite number."""
    for name in names:
        value = getattr(args, name, None)
        if isinstance(value, (int, float)) and not math.isfinite(value):
            raise ValueError(f'--{name} must be a finite number, got {value}')


def check_gkd_scalars(args) -> None:
    """Range checks that need nothing but the flags; each message names the flag and the allowed values."""
    check_finite(args)
    beta = args.beta
    if beta is not None and not 0.0 <= beta <= 1.0:
        raise ValueError(f'--beta must be in [0, 1] for GKD (0 = KL(teacher||student), 1 = KL(student||teacher)), '
                         f'got {beta}')
    if not 0.0 <= args.lmbda <= 1.0:
        raise ValueError(f'--lmbda must be in [0, 1] (the probability of an on-policy step), got {args.lmbda}')
    if not args.temperature > 0:
        raise ValueError(f'--temperature must be > 0, got {args.temperature}')
    sft_alpha = getattr(args, 'sft_alpha', 0.0)
    if sft_alpha < 0:
        raise ValueError(f'--sft_alpha must be >= 0 (the weight of the SFT term on dataset responses; 0 = none), '
                         f'got {sft_alpha}')
    # Refused even when nothing is sampled (--lmbda 0, --seq_kd false): ms-swift turns it into the generation
    # config's max_new_tokens, which transformers rejects later, after the models are loaded.
    max_len = args.max_completion_length
    if max_len is None or max_len <= 0:
        sampling = 'sampling is on' if args.lmbda > 0 or args.seq_kd else 'it is also the generation length'
        raise ValueError(f'--max_completion_length must be > 0 ({sampling}), got {max_len}')
    impl = getattr(args, 'gkd_loss_impl', 'auto')
    if impl not in GKD_LOSS_IMPLS:
        raise ValueError(f'--gkd_loss_impl must be one of {list(GKD_LOSS_IMPLS)}, got {impl!r}')
    if getattr(args, 'teacher_server_timeout', 1.0) <= 0:
        raise ValueError(f'--teacher_server_timeout must be > 0 seconds, got {args.teacher_server_timeout}')
    if getattr(args, 'teacher_server_retries', 0) < 0:
        raise ValueError(f'--teacher_server_retries must be >= 0, got {args.teacher_server_retries}')
    if getattr(args, 'teacher_server_wait', 0.0) < 0:
        raise ValueError(f'--teacher_server_wait must be >= 0 seconds, got {args.teacher_server_wait}')
    if getattr(args, 'gkd_rl_coef', 0.0) < 0:
        raise ValueError(f'--gkd_rl_coef must be >= 0 (the weight of the policy-gradient term; 0 = off), '
                         f'got {args.gkd_rl_coef}')
    topk = args.gkd_logits_topk
    if getattr(args, 'gkd_topk_tail', False):
        if topk is None:
            raise ValueError('--gkd_topk_tail true needs --gkd_logits_topk (the tail is the mass outside the top-k)')
        if impl == 'dense':
            raise ValueError('--gkd_topk_tail true needs --gkd_loss_impl auto or fused (the dense loss has no tail)')
    if topk is not None and topk <= 0:
        raise ValueError(f'--gkd_logits_topk must be a positive integer (or unset for the full vocabulary), got {topk}')
    check_divergence_flags(args)
    check_cross_tokenizer_flags(args)


def check_divergence_flags(args) -> None:
    """``--gkd_divergence`` a registered divergence, ``--gkd_skew_alpha`` in [0, 1], and neither parameter given
    with the other divergence, where it would be silently unused. ``args.beta`` is None when unset, or ms-swift's
    GKD default 0.5 once resolved (which cannot be told apart from ``--beta 0.5``, so 0.5 passes)."""
    name = getattr(args, 'gkd_divergence', 'jsd')
    if name not in GKD_DIVERGENCES:
        raise ValueError(f'--gkd_divergence must be one of {list(GKD_DIVERGENCES)}, got {name!r}')
    alpha = getattr(args, 'gkd_skew_alpha', 0.1)
    if not 0.0 <= alpha < 1.0:  # at 1 the mixture is the KL's own first distribution: a zero loss, nothing learnt
        raise ValueError(f'--gkd_skew_alpha must be in [0, 1) (0 = the plain KL; at 1 the loss is 0), got {alpha}')
    if name != 'jsd' and args.beta not in (None, 0.5):
        raise ValueError(f'--beta {args.beta} applies to --gkd_divergence jsd only; with --gkd_divergence {name} '
                         'the skew is --gkd_skew_alpha: drop --beta')
    if name == 'jsd' and alpha != 0.1:
        raise ValueError(f'--gkd_skew_alpha {alpha} applies to --gkd_divergence skew_kl / skew_rkl only; '
                         'with jsd the interpolation is --beta')


def check_cross_tokenizer_flags(args) -> None:
    """``--gkd_cross_tokenizer``: a known method, and none of the flags it cannot work with; ``--teacher_template``
    only with it (whether the template exists needs ms-swift's registry: :mod:`swift_gkd_plugin.swift.arguments`)."""
    method = getattr(args, 'gkd_cross_tokenizer', None)
    teacher_template = getattr(args, 'teacher_template', None)
    if method is None and teacher_template is not None:
        raise ValueError(f'--teacher_template {teacher_template} only applies to a teacher with another tokenizer '
                         '(--gkd_cross_tokenizer uld|hybrid): a teacher with the student\'s tokenizer scores the '
                         'student\'s tokens through the student\'s --template. Drop --teacher_template, or add '
                         '--gkd_cross_tokenizer')
    if method is None:
        return
    if method not in CROSS_TOKENIZER_METHODS:
        raise ValueError(f'--gkd_cross_tokenizer must be one of {list(CROSS_TOKENIZER_METHODS)} (or unset), '
                         f'got {method!r}')
    flag = f'--gkd_cross_tokenizer {method}'
    if getattr(args, 'teacher_model_server', None) is not None:
        raise ValueError(f'{flag} is not supported with --teacher_model_server yet: the server\'s top-k is over its '
                         'own vocabulary and ULD/hybrid need full teacher rows; pass a local --teacher_model')
    if args.gkd_logits_topk is not None:
        raise ValueError(f'{flag} cannot be combined with --gkd_logits_topk {args.gkd_logits_topk}: ULD and hybrid '
                         'need the full teacher row (unset --gkd_logits_topk)')
    if getattr(args, 'teacher_adapters', None):
        raise ValueError(f'{flag} cannot be combined with --teacher_adapters: a teacher adapter shares its base\'s '
                         'tokenizer; pass a --teacher_model with another tokenizer, or drop the flag')
    if getattr(args, 'padding_free', False) or getattr(args, 'packing', False):
        raise ValueError(f'{flag} is not supported with --padding_free / --packing (the alignment is per row): '
                         'pass --padding_free false --packing false')
    if (getattr(args, 'sequence_parallel_size', None) or 1) > 1:
        raise ValueError(f'{flag} is not supported with --sequence_parallel_size {args.sequence_parallel_size} '
                         '(allowed: 1)')


def check_teacher_server_flags(args) -> None:
    """Flags that do not go with ``--teacher_model_server`` (a teacher that only scores responses)."""
    if args.teacher_model_server is None:
        return
    if args.gkd_logits_topk is None:
        raise ValueError('--gkd_logits_topk is required with --teacher_model_server (the server returns '
                         'top-k log-probabilities)')
    if args.offload_teacher_model:
        raise ValueError('--offload_teacher_model true has no effect with --teacher_model_server (the '
                         'teacher lives on the server): remove one of them')
    if args.seq_kd:
        raise ValueError('--seq_kd true needs a local teacher that can sample (--teacher_model, or the '
                         'student base with LoRA); a --teacher_model_server only scores responses')


SCALE_REWARDS = ('group', 'batch', 'none')


def check_rl_flags(args) -> None:
    """``--num_generations``, ``--reward_funcs``, ``--reward_weights``, ``--scale_rewards``, ``--gkd_rl_coef``: the
    checks that need only the flags (reward names are checked once ``--external_plugins`` are imported)."""
    g = args.num_generations
    if not isinstance(g, int) or g < 1:
        raise ValueError(f'--num_generations must be an integer >= 1 (completions sampled per prompt on on-policy '
                         f'steps; 1 = one, as ms-swift GKD), got {g}')
    funcs = list(args.reward_funcs or [])
    coef = getattr(args, 'gkd_rl_coef', 0.0)
    if coef > 0 and not funcs:
        raise ValueError(f'--gkd_rl_coef {coef} needs --reward_funcs (the policy-gradient term weighs the sampled '
                         'tokens by their rewards\' advantages)')
    if args.reward_weights is not None and len(args.reward_weights) != len(funcs):
        raise ValueError(f'--reward_weights has {len(args.reward_weights)} values but --reward_funcs names '
                         f'{len(funcs)} functions {funcs}: give one weight per function')
    for w in args.reward_weights or []:
        if not math.isfinite(w):
            raise ValueError(f'--reward_weights must be finite numbers, got {args.reward_weights}')
    if args.scale_rewards is not None and args.scale_rewards not in SCALE_REWARDS:
        raise ValueError(f'--scale_rewards must be one of {list(SCALE_REWARDS)} for GKD, got {args.scale_rewards!r}')
    if not funcs and g == 1:
        return
    if args.lmbda == 0 and funcs:
        raise ValueError('--reward_funcs only act on on-policy steps, and --lmbda 0 has none: set --lmbda > 0 (the '
                         'probability of an on-policy step) or remove --reward_funcs')
    if args.lmbda == 0 and not args.seq_kd:
        raise ValueError(f'--num_generations {g} samples several completions per prompt, but --lmbda 0 without '
                         '--seq_kd samples nothing (every step uses the dataset responses): set --lmbda > 0 or '
                         '--seq_kd true, or --num_generations 1')
    if getattr(args, 'sequence_parallel_size', 1) > 1:
        raise ValueError(f'--num_generations > 1 and --reward_funcs are not supported with --sequence_parallel_size '
                         f'{args.sequence_parallel_size} (allowed: 1)')
    if funcs and (getattr(args, 'padding_free', False) or getattr(args, 'packing', False)):
        raise ValueError('--reward_funcs is not supported with --padding_free / --packing yet (the advantages are '
                         'per row): pass --padding_free false --packing false')
