"""``swift rlhf`` arguments: the plugin's flags, the resolvers that fill in GKD's arguments and the checks that refuse
bad GKD input before any model is loaded.

Resolvers change arguments and never raise; checks raise and never change arguments. :data:`SWIFT_RLHF_PHASES` lists
which check (or resolver) runs when, in order: :func:`resolve_gkd_arguments` runs the phase 'resolve', then
:func:`check_gkd_arguments` the phase 'resolved'. The checks defined here read ms-swift's runtime (its registries of
reward functions, schedulers, templates and model types, the resolved model folders), so they stay in the adapter;
the checks of a concept shared with ``megatron rlhf`` live in ``options/``."""
from __future__ import annotations

import difflib
import functools
import json
import os
from dataclasses import dataclass, field
from typing import List, Literal, Optional

from swift.arguments import RLHFArguments
from swift.rlhf_trainers import GKDConfig
from swift.utils import get_logger

import swift_gkd_plugin
from swift_gkd_plugin.rollout.colocated_vllm import (check_vllm_cpu_head_dim, check_vllm_max_model_len, check_vllm_sleep_mode,
                                             resolve_vllm_environment)
from swift_gkd_plugin.core.constants import ROLLOUT_IS_MODES, SCALE_REWARDS
from swift_gkd_plugin.options.flags import (FlagError, GKDPluginArgumentsMixin, check_bf16_device, check_cpu_processes,
                                    check_gkd_scalars, check_multi_turn_flags,
                                    check_no_plugin_flags_outside_gkd, check_rl_flags, check_teacher_server_flags,
                                    check_torch_compile_checkpointing, check_training_set, check_vllm_flags,
                                    ignored_flag_warnings, resolve_num_generations, sampling_temperature)
from swift_gkd_plugin.options.backends import check_deepspeed, check_deepspeed_fp16_on_cpu, check_packing_attention
from swift_gkd_plugin.options.flag_checks import check_ms_swift_values, check_training_length
from swift_gkd_plugin.options.hub_models import hub_lookup_failed, hub_unreachable, model_dir_of, resolve_check_model
from swift_gkd_plugin.options import model_types
from swift_gkd_plugin.runtime.ms_swift_state import keep_teacher_messages_column
from swift_gkd_plugin.swift.setup.checkpoints import check_resume_checkpoint
from swift_gkd_plugin.swift.setup.compile_cost import torch_compile_warnings, zero3_lora_warnings
from swift_gkd_plugin.swift.setup.datasets import (check_local_datasets, check_self_teacher_has_something_to_add,
                                                   check_teacher_media)
from swift_gkd_plugin.swift.setup.paths import CreatedDirs, check_command_line_paths
from swift_gkd_plugin.swift.setup.sequence_parallel import (check_local_model_heads, check_sequence_parallel,
                                                            check_sequence_parallel_heads, resolve_sequence_parallel)
from swift_gkd_plugin.swift.setup.teacher_server import (check_teacher_server_config, check_teacher_servers,
                                                        check_teacher_tags, local_teacher_of)
from swift_gkd_plugin.swift.setup.row_lengths import check_sampling_context
from swift_gkd_plugin.swift.setup.vllm import (check_async_generate, check_vllm_launcher, check_vllm_rollout,
                                              rollout_server_named, stale_sample_warnings)
from swift_gkd_plugin.options.teacher_scores import check_teacher_scores, resolve_teacher_scores

logger = get_logger()


@functools.lru_cache(maxsize=4)  # read by resolve_cross_tokenizer and check_teacher
def _load_vocab(model_dir: str):
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(model_dir, trust_remote_code=True).get_vocab()
    except Exception as exc:  # e.g. a processor-only multimodal repo: the pipeline will report real problems
        logger.warning(f'swift_gkd_plugin: cannot read the tokenizer of {model_dir} to compare vocabularies ({exc})')
        return None


def _vocabularies(args):
    """``(teacher_dir, same_tokenizer, student_vocab, teacher_vocab)`` of ``--teacher_model`` and ``--model``, or None
    without a teacher or a student directory. Raises (naming the flag) for a teacher that cannot be found."""
    if args.teacher_model is None:
        return None
    teacher_dir = model_dir_of('--teacher_model', args.teacher_model, args.teacher_model_revision, args)
    student_dir = getattr(args, 'model_dir', None)  # set by ms-swift's own resolution
    if student_dir is None:
        return None
    if os.path.realpath(student_dir) == os.path.realpath(teacher_dir):
        return teacher_dir, True, None, None
    student_vocab, teacher_vocab = _load_vocab(student_dir), _load_vocab(teacher_dir)
    return teacher_dir, student_vocab == teacher_vocab, student_vocab, teacher_vocab


def resolve_cross_tokenizer(args) -> None:
    """``--gkd_cross_tokenizer`` with a teacher that uses the student's tokenizer is dropped (with a warning): the
    exact token-by-token loss applies. Left for :func:`check_teacher` when ``--teacher_template`` is given too."""
    cross = args.gkd_cross_tokenizer
    if not cross or args.teacher_template is not None:
        return
    try:
        vocabularies = _vocabularies(args)
    except ValueError:  # a teacher that cannot be found: check_teacher names it
        return
    if vocabularies is None or not vocabularies[1]:
        return
    logger.warning(f'swift_gkd_plugin: --gkd_cross_tokenizer {cross} is ignored: the teacher uses the '
                   'student\'s tokenizer, so the exact (token by token) GKD loss is used')
    args.gkd_cross_tokenizer = None
    if getattr(args, 'training_args', None) is not None:
        args.training_args.gkd_cross_tokenizer = None


def check_teacher_model_type(args) -> None:
    """A local ``--teacher_model`` folder whose ``config.json`` fits several of ms-swift's model types names
    ``--teacher_model_type``: ms-swift raised its ``Failed to automatically match`` traceback after loading the
    student (the student's own case is one line at parse time, :func:`~.command_line.undetected_type_message`)."""
    folder = os.path.expanduser(args.teacher_model) if isinstance(args.teacher_model, str) else None
    if args.teacher_model_type is not None or folder is None or not os.path.isdir(folder) \
            or os.path.exists(os.path.join(folder, 'args.json')):
        return
    from swift.model.model_meta import get_matched_model_types
    with open(os.path.join(folder, 'config.json'), encoding='utf-8') as f:
        architectures = json.load(f).get('architectures')
    candidates = get_matched_model_types(architectures)
    if len(candidates) > 1:
        raise FlagError(f'--teacher_model {args.teacher_model}: ms-swift cannot tell its model type from the folder '
                        f'(it fits {candidates}): pass --teacher_model_type')


def check_teacher(args) -> None:
    """The teacher exists and speaks the student's vocabulary (a larger lm_head over the same tokenizer is fine), or
    ``--gkd_cross_tokenizer`` is given for a teacher with another tokenizer."""
    cross = args.gkd_cross_tokenizer
    if args.teacher_model is None:
        if cross:
            raise FlagError(f'--gkd_cross_tokenizer {cross} needs a --teacher_model with another tokenizer; without '
                             'one the teacher is the student itself (same tokenizer): drop the flag')
        return
    vocabularies = _vocabularies(args)
    if vocabularies is None:
        return
    _, same, student_vocab, teacher_vocab = vocabularies
    if same:
        if cross and args.teacher_template is not None:
            raise FlagError(f'--teacher_template {args.teacher_template} only applies to a teacher with another '
                             'tokenizer: this --teacher_model uses the student\'s tokenizer, so it scores the '
                             f'student\'s tokens through the student\'s --template {args.template}. Drop '
                             '--teacher_template (and --gkd_cross_tokenizer)')
        return
    if student_vocab is None or teacher_vocab is None or cross:
        return
    only_s = len(set(student_vocab.items()) - set(teacher_vocab.items()))
    only_t = len(set(teacher_vocab.items()) - set(student_vocab.items()))
    raise FlagError(
        f'teacher and student tokenizers differ: --model {args.model!r} has {len(student_vocab)} tokens, '
        f'--teacher_model {args.teacher_model!r} has {len(teacher_vocab)} ({only_s} token/id pairs only in the '
        f'student, {only_t} only in the teacher). GKD compares distributions token by token, so both must use the '
        'same tokenizer (a teacher whose lm_head is larger over the same tokenizer is fine), or pass '
        '--gkd_cross_tokenizer uld|hybrid to distil across tokenizers (docs_en/cross_tokenizer.md).')


def check_teacher_template(args) -> None:
    """``--teacher_template`` names a registered ms-swift template type (templates registered by
    ``--external_plugins`` included: ms-swift has imported them by now)."""
    name = args.teacher_template
    if name is None:
        return
    from swift.template import TEMPLATE_MAPPING
    if name in TEMPLATE_MAPPING:
        return
    from swift_gkd_plugin.options.model_types import unknown_template_message
    raise FlagError(unknown_template_message('--teacher_template', name, TEMPLATE_MAPPING))


def _head_rows(flag: str, model_dir: str) -> Optional[int]:
    """The number of output rows (``vocab_size`` of the text config) of the model in ``model_dir``."""
    from transformers import AutoConfig
    try:
        return AutoConfig.from_pretrained(model_dir, trust_remote_code=True).get_text_config().vocab_size
    except Exception as exc:  # an unusual config: the pipeline will report real problems
        logger.warning(f'swift_gkd_plugin: cannot read the vocabulary size of {flag} {model_dir} ({exc})')
        return None


def check_sequence_parallel_models(args) -> None:
    """``--sequence_parallel_size`` against the attention heads of the student and of a local ``--teacher_model``."""
    if (args.sequence_parallel_size or 1) <= 1:
        return
    dirs = {'--model': args.model_dir}
    if args.teacher_model is not None:
        dirs['--teacher_model'] = model_dir_of('--teacher_model', args.teacher_model, args.teacher_model_revision, args)
    check_sequence_parallel_heads(args.sequence_parallel_size, dirs)


def check_topk_within_vocab(args) -> None:
    """``--gkd_logits_topk`` k takes k of the teacher's logits at each position: a k larger than the vocabulary
    crashes in torch.topk at step 1, after both models are loaded. ``--gkd_skd_top_k`` K larger than the vocabulary
    accepts every token whatever K: a silent no-op that still costs the teacher's verifying forwards. A served
    teacher's own limit (its ``--top_k``) needs the network and is left to the teacher-server start-up checks; k and
    K are still checked against the student."""
    given = {flag: k for flag, k in (('--gkd_logits_topk', args.gkd_logits_topk),
                                     ('--gkd_skd_top_k', args.gkd_skd_top_k or None)) if k is not None}
    if not given:
        return
    rows = {'--model': _head_rows('--model', args.model_dir)}
    if args.teacher_model is not None:  # (with --teacher_model_server: the local teacher of some tags)
        teacher_dir = model_dir_of('--teacher_model', args.teacher_model, args.teacher_model_revision, args)
        rows['--teacher_model'] = _head_rows('--teacher_model', teacher_dir)
    known = {flag: n for flag, n in rows.items() if n}
    if not known:
        return
    vocab = min(known.values())
    sizes = ', '.join(f'{flag} has {n}' for flag, n in known.items())
    unset = {'--gkd_logits_topk': '1 to {}, or unset for the full vocabulary', '--gkd_skd_top_k': '0 (off) to {}'}
    for flag, k in given.items():
        if k > vocab:
            raise FlagError(f'{flag} {k} is larger than the vocabulary ({sizes} output rows, config.json '
                            f'vocab_size): allowed {unset[flag].format(vocab)}')


def check_vllm_installed(args) -> None:
    """ms-swift's trainer refuses ``--use_vllm true`` without vLLM only after both models are loaded."""
    from swift.utils import is_vllm_available
    if args.use_vllm and not is_vllm_available():
        raise FlagError(f'--use_vllm true (--vllm_mode {args.vllm_mode}) needs vLLM, which is not installed here: '
                         'install vllm, or pass --use_vllm false (on-policy samples then come from the transformers '
                         'engine)')


def check_vllm_logprobs(args) -> None:
    """``--rollout_importance_sampling_mode`` (and ``--log_rollout_offpolicy_metrics``) compare the sampler's
    log-probabilities with the policy's: vLLM before 0.10.2 reports those of the raw logits (temperature 1, before
    top-k/top-p), as ms-swift's GRPO refuses too."""
    mode = args.rollout_importance_sampling_mode
    if not args.use_vllm or (mode is None and not args.log_rollout_offpolicy_metrics):
        return
    from swift.utils import is_vllm_available
    from swift.rlhf_trainers.utils import check_vllm_version_ge
    if is_vllm_available() and not check_vllm_version_ge('0.10.2'):
        flag = (f'--rollout_importance_sampling_mode {mode}' if mode is not None else
                '--log_rollout_offpolicy_metrics true')
        raise FlagError(f'{flag} needs vLLM >= 0.10.2 (older versions report log-probabilities before the sampling '
                         'temperature and top-k/top-p): update vLLM or drop the flag')


def _shares_the_students_base(args) -> bool:
    return args.teacher_model is None or args.teacher_model == args.model


def resolve_teacher_adapters(args) -> None:
    """``--teacher_adapters`` as a list; a teacher adapter on the student's own base (no ``--teacher_model``, or the
    same one) with a LoRA student is loaded next to the student's adapter on the one copy of the base weights:
    ``teacher_model`` is cleared so that ms-swift's pipeline does not load the base a second time."""
    if isinstance(args.teacher_adapters, str):
        args.teacher_adapters = [args.teacher_adapters]
    adapters = args.teacher_adapters or []
    if len(adapters) != 1 or args.teacher_model_server is not None:
        return
    if _shares_the_students_base(args) and args.tuner_type == 'lora':
        args.teacher_model = None
        args._teacher_use_disable_adapter = False
        logger.info('Using shared base model architecture:\n'
                    '  - Student model: base_model + LoRA (trainable)\n'
                    f'  - Teacher model: base_model + teacher adapter {adapters[0]} (frozen)')


def check_teacher_adapters(args) -> None:
    """``--teacher_adapters``: one adapter directory, a frozen adapter that fits the teacher's base; on the student's
    own base only for a LoRA student (see :func:`resolve_teacher_adapters`)."""
    adapters = args.teacher_adapters or []
    if not adapters:
        return
    if len(adapters) != 1:
        raise FlagError(f'--teacher_adapters takes one adapter directory, got {len(adapters)}: {adapters}')
    adapter = adapters[0]
    if not os.path.isdir(adapter):
        raise FlagError(f'--teacher_adapters {adapter!r}: no such adapter directory')
    if args.teacher_model_server is not None:
        raise FlagError('--teacher_adapters cannot be combined with --teacher_model_server: the server serves '
                         'its own model (start it with --adapters instead)')
    shared_base = _shares_the_students_base(args)
    if shared_base and args.tuner_type != 'lora':
        raise FlagError(f'--teacher_adapters on the student\'s own base needs a LoRA student (--tuner_type lora, got '
                         f'{args.tuner_type!r}): a fully tuned student changes the base the teacher adapter sits on. '
                         'Pass the teacher\'s base as --teacher_model to load a separate frozen teacher.')
    base_dir = args.model_dir if shared_base else model_dir_of('--teacher_model', args.teacher_model,
                                                               args.teacher_model_revision, args)
    from swift_gkd_plugin.swift.setup.adapters import adapter_base_mismatch
    problem = adapter_base_mismatch(adapter, base_dir)
    if problem:
        raise FlagError(f'--teacher_adapters {adapter!r} does not fit the teacher base {base_dir!r}: {problem}')


def check_skd_teacher(args) -> None:
    """``--gkd_skd_top_k`` needs a teacher other than the student (a --teacher_model, the student's base with the
    adapter off, or --teacher_adapters) and a text-only model. Run after ms-swift resolved a shared base."""
    k = args.gkd_skd_top_k
    shared_base = getattr(args, '_teacher_use_disable_adapter', False) or bool(args.teacher_adapters)
    if k and args.teacher_model is None and args.teacher_model_server is None and not shared_base:
        raise FlagError(f'--gkd_skd_top_k {k} needs a teacher to correct the student: pass --teacher_model (or '
                         '--teacher_adapters); without one the teacher is the student itself')
    meta = getattr(args, 'model_meta', None)
    if k and meta is not None and meta.is_multimodal:
        raise FlagError(f'--gkd_skd_top_k {k} supports text-only models yet (--model_type {args.model_type} is '
                         'multimodal): the teacher verifies token ids without the prompt\'s images, videos or audio. '
                         'Pass --gkd_skd_top_k 0')


def check_reference(args) -> None:
    """``--gkd_ref_kl_coef``: its reference, the initial student, must be neither the teacher nor ambiguous. A LoRA
    student's is its base with the adapter off: not with ``--adapters`` (the base would lack them) and not when that
    base is also the teacher (self-distillation without --teacher_model). Run after ms-swift resolved a shared base."""
    coef = getattr(args, 'gkd_ref_kl_coef', 0.0)
    if not coef or args.tuner_type == 'full':
        return
    flag = f'--gkd_ref_kl_coef {coef:g}'
    if getattr(args, '_teacher_use_disable_adapter', False):
        raise FlagError(f'{flag} anchors the student to its base with the adapter off, which is also the teacher here '
                        '(no --teacher_model with a LoRA student): the anchor would be a second distillation term. '
                        'Pass a --teacher_model or drop the flag')
    if args.adapters:
        raise FlagError(f'{flag} with --adapters {args.adapters}: the reference of a LoRA student is its base with the '
                        'adapter off, which lacks those adapters, not the student you start from. Merge them into the '
                        'base (swift export --merge_lora true) and pass it as --model, or drop the flag')


def init_gloo_for_cpu_zero3(args) -> None:
    """ZeRO-3 builds the model under ``deepspeed.zero.Init``, which needs the process group first; on GPUs the
    launcher's NCCL set-up provides it, on CPU (``--use_cpu true``, several processes) nothing does: start gloo."""
    ds = args.deepspeed
    if not (args.use_cpu and isinstance(ds, dict) and ds.get('zero_optimization', {}).get('stage') == 3):
        return
    if int(os.environ.get('WORLD_SIZE', '1')) <= 1:
        return
    import deepspeed
    if not deepspeed.comm.is_initialized():  # wraps torch.distributed's group when one exists already
        deepspeed.init_distributed(dist_backend='gloo')


def resolve_reward_columns(args) -> None:
    """Reward functions read the dataset's extra columns (e.g. ``solution``), and tag-routed teacher servers the
    ``--teacher_tag_key`` column (ms-swift's GKD drops the columns it does not use, and its routing then finds no tag
    in any row): keep them."""
    server, key = getattr(args, 'teacher_model_server', None), getattr(args, 'teacher_tag_key', 'dataset')
    routed = server is not None and key != 'dataset' and server.strip().startswith('[')
    if not args.reward_funcs and not routed:
        return
    if routed and args.remove_unused_columns:
        logger.info(f'swift_gkd_plugin: --remove_unused_columns false: the teacher servers are routed by the '
                    f'"{key}" column (--teacher_tag_key)')
    args.remove_unused_columns = False
    if getattr(args, 'training_args', None) is not None:  # built by ms-swift's __post_init__
        args.training_args.remove_unused_columns = False


def check_reward_funcs(args) -> None:
    """Every ``--reward_funcs`` name is in ms-swift's reward registry (built-ins and ``--external_plugins``, which
    ms-swift has imported by now)."""
    if not args.reward_funcs:
        return
    from swift.rewards import orms
    unknown = [name for name in args.reward_funcs if name not in orms]
    if unknown:
        raise FlagError(f'--reward_funcs {unknown}: no such reward function. Known: {sorted(orms)}; register your '
                         'own in a file passed with --external_plugins (orms[\'my_reward\'] = MyReward)')


def check_multi_turn_scheduler(args) -> None:
    """``--multi_turn_scheduler`` names a scheduler in ms-swift's registry (built-ins and ``--external_plugins``,
    which ms-swift has imported by now)."""
    name = args.multi_turn_scheduler
    if not name:
        return
    from swift.rollout import multi_turns
    if name not in multi_turns:
        close = difflib.get_close_matches(name, list(multi_turns), n=1)
        hint = f' (did you mean {close[0]}?)' if close else ''
        raise FlagError(f'--multi_turn_scheduler {name}: no such scheduler{hint}. Known: {sorted(multi_turns)}; '
                         'register your own in a file passed with --external_plugins '
                         '(multi_turns[\'my_scheduler\'] = MyScheduler, a swift.rollout.MultiTurnScheduler)')


def check_fresh_samples_for_rl(args) -> None:
    """The policy-gradient term assumes the student that sampled is the one being updated (no importance ratio): each
    generation batch must be exactly one optimizer step."""
    train = args.training_args
    spg, ga = train.steps_per_generation, train.gradient_accumulation_steps
    if args.gkd_rl_coef > 0 and spg != ga:
        raise FlagError(f'--gkd_rl_coef > 0 needs each generation batch to be one optimizer step: steps_per_generation '
                         f'{spg} (generation_batch_size {train.generation_batch_size}) must equal '
                         f'--gradient_accumulation_steps {ga}; later steps would train on samples of an older policy, '
                         'which the policy-gradient term (no importance ratio) does not correct. Leave '
                         '--steps_per_generation and --generation_batch_size unset.')


def check_generation_flags(args) -> None:
    """ms-swift's sampling options that GKD cannot honour."""
    from swift.utils import is_mp
    if is_mp() and args.use_vllm:
        raise FlagError('--use_vllm true is not compatible with device_map model parallelism: set '
                         'NPROC_PER_NODE to the number of processes.')
    if args.teacher_model_server is not None and (args.padding_free or args.packing):
        raise FlagError('--teacher_model_server does not support --padding_free / --packing yet')


def check_vllm_model(args) -> None:
    """What vLLM's platform here cannot run of the student (see :mod:`.vllm`)."""
    if args.use_vllm and args.vllm_mode == 'colocate':
        check_vllm_max_model_len(args, args.model_dir)
        check_vllm_cpu_head_dim(args, args.model_dir)  # (ms-swift resolved it: no second lookup)
        check_vllm_sleep_mode(args)
        check_vllm_launcher(args)  # last: the refusals above also reach a user who runs without one


def check_teacher_server_entries(args) -> None:
    """``--teacher_model_server``'s entries, one of them the local ``--teacher_model`` where it says so."""
    check_teacher_server_flags(args, local_teacher=local_teacher_of(args) is not None)


def check_local_teacher_media(args) -> None:
    check_teacher_media(args, args.teacher_model and model_dir_of('--teacher_model', args.teacher_model,
                                                                  args.teacher_model_revision, args))


#: The checks that need nothing but the flags (also run before ms-swift resolves models or vLLM servers).
FLAGS_ONLY = (check_gkd_scalars, check_training_set, check_training_length, check_ms_swift_values, check_rl_flags,
              check_multi_turn_flags, check_torch_compile_checkpointing, check_deepspeed, check_cpu_processes,
              check_vllm_flags, check_vllm_installed, check_vllm_logprobs, check_teacher_server_config,
              check_async_generate, check_sequence_parallel, check_vllm_rollout,
              check_packing_attention)  # last: a refusal of packing beside another flag says more

#: Which check (or resolver) runs when, for ``swift rlhf --rlhf_type gkd``: phase -> its functions of the arguments,
#: in order. A resolver changes the arguments and raises nothing; a check raises and changes nothing. Before these,
#: ``swift``'s launcher refuses unknown flags, out-of-range values and missing paths on the raw command line
#: (:func:`~swift_gkd_plugin.swift.setup.command_line.check_launcher_early`); ``_init_torch_dtype`` checks bf16 on
#: the device (:func:`~swift_gkd_plugin.options.flags.check_bf16_device`, on the flags as given).
SWIFT_RLHF_PHASES = {
    # every process's __post_init__, before ms-swift's own, and swift's launcher under torchrun before any rank starts
    'command line': FLAGS_ONLY + (model_types.check_given_model_types, check_command_line_paths),
    # swift's launcher only, after 'command line' (the ranks check the resolved models in 'resolved')
    'launcher': (check_local_model_heads, check_deepspeed_fp16_on_cpu),
    # _check_gkd, inside ms-swift's __post_init__ once the models' folders are known
    'resolve': (resolve_num_generations, resolve_reward_columns, resolve_teacher_adapters, resolve_cross_tokenizer,
                resolve_vllm_environment, resolve_sequence_parallel, resolve_teacher_scores, resolve_check_model),
    'resolved': FLAGS_ONLY + (
        check_reward_funcs, check_multi_turn_scheduler, check_fresh_samples_for_rl, check_generation_flags,
        check_vllm_model, check_sampling_context, check_teacher_server_entries,
        model_types.check_model_types,  # (again: --custom_register_path / --external_plugins are imported now)
        check_teacher_model_type, check_teacher_template, check_teacher, check_topk_within_vocab,
        check_sequence_parallel_models, check_teacher_adapters, check_skd_teacher, check_reference,
        check_local_datasets, check_local_teacher_media, check_teacher_tags, check_self_teacher_has_something_to_add,
        check_resume_checkpoint, check_teacher_scores,
        check_teacher_servers),  # last: it waits for the servers
}


def run_phase(name: str, args) -> None:
    """Each function of the phase ``name`` of :data:`SWIFT_RLHF_PHASES` on ``args``, in order."""
    for function in SWIFT_RLHF_PHASES[name]:
        function(args)


def resolve_gkd_arguments(args) -> None:
    """Every resolver, in the order of the phase 'resolve' (each changes arguments, none raises)."""
    run_phase('resolve', args)


def check_gkd_arguments(args) -> None:
    """Every check, in the order of the phase 'resolved' (each raises, none changes arguments)."""
    run_phase('resolved', args)


def check_flags_only(args) -> None:
    """The checks that need nothing but the flags (:data:`FLAGS_ONLY`)."""
    for check in FLAGS_ONLY:
        check(args)


def check_command_line_flags(args) -> None:
    """The first checks of a GKD command line, before ms-swift resolves models, imports plugins or connects to vLLM
    servers; run in every process (``__post_init__``) and, under torchrun, in the launcher before any rank starts
    (:func:`swift_gkd_plugin.swift.setup.command_line.check_launcher_command_line`): the phase 'command line'."""
    run_phase('command line', args)


@dataclass
class GKDPluginRLHFArguments(GKDPluginArgumentsMixin, RLHFArguments):
    """ms-swift's ``RLHFArguments`` plus the plugin's flags and checks; used to parse ``swift rlhf``."""
    # None = the pipeline's default: 1 for GKD (one completion per prompt, as ms-swift GKD), GRPO's own otherwise
    num_generations: Optional[int] = field(
        default=None,
        metadata={'help': 'Completions sampled per prompt (GRPO: its G, default 8; GKD: on on-policy and seq_kd '
                  'steps, default 1).'})

    def __post_init__(self):
        resolve_num_generations(self)
        if self.rlhf_type == 'gkd':
            resolve_reward_columns(self)
            check_command_line_flags(self)
            for warning in ignored_flag_warnings(self):  # the flags as given (ms-swift fills in beta next)
                logger.warning(f'swift_gkd_plugin: {warning}')
        super().__post_init__()

    def _init_torch_dtype(self):
        """ms-swift resolves ``--torch_dtype`` (the model's config.json dtype when not given) and ``--bf16`` from it
        here, and builds transformers' ``TrainingArguments`` from them before any other GKD check."""
        torch_dtype_given, bf16_given = self.torch_dtype, self.bf16
        try:
            super()._init_torch_dtype()  # also where ms-swift resolves --model: a hub id is downloaded here
        except Exception as exc:
            model = self.model if isinstance(self.model, str) else None
            if self.rlhf_type != 'gkd' or model is None or os.path.exists(os.path.expanduser(model)) or \
                    not hub_unreachable(exc):
                raise
            raise hub_lookup_failed('--model', model, exc, self) from exc
        if self.rlhf_type == 'gkd':
            check_bf16_device(self, torch_dtype_given, bf16_given)

    def _init_external_vllm(self):
        """ms-swift connects rank 0 to the ``swift rollout`` server here (``--vllm_mode server``)."""
        with rollout_server_named(self):
            super()._init_external_vllm()

    def _add_version(self):
        """ms-swift creates the run's folder here (``--output_dir``, and its ``v<N>-<time>`` child under
        ``--add_version``); what it created is remembered, for a refusal of :meth:`_check_gkd` to remove."""
        created = CreatedDirs(self.output_dir)
        try:
            super()._add_version()
        except FileExistsError:
            if os.path.lexists(self.output_dir):
                raise
            # another rank's refusal removed the empty folder between ms-swift's mkdir and its isdir check: this rank
            # makes it again (its version suffix is already in output_dir) and goes on to the same refusal
            add_version, self.add_version = self.add_version, False
            try:
                super()._add_version()
            finally:
                self.add_version = add_version
        self._gkd_created_dirs = created.after(self.output_dir)

    def _check_teacher(self):
        """ms-swift logs "self-distillation mode (teacher = student)" whenever no --teacher_model is given; with
        --teacher_adapters the teacher is the base plus that adapter (logged by :func:`check_teacher_adapters`)."""
        if (self.rlhf_type == 'gkd' and self.teacher_adapters and self.teacher_model is None
                and self.teacher_model_server is None and not self.use_liger_kernel):
            self._teacher_use_disable_adapter = False
            return
        if self.rlhf_type == 'gkd' and local_teacher_of(self) is not None:
            # --teacher_model is the local entry's teacher: ms-swift refuses it beside --teacher_model_server
            server, self.teacher_model_server = self.teacher_model_server, None
            try:
                super()._check_teacher()
            finally:
                self.teacher_model_server = server
            return
        super()._check_teacher()

    def _check_gkd(self):
        """ms-swift calls it inside ``__post_init__``, once the models' directories are known (also with
        ``--external_plugins``, where ``__post_init__`` above is ms-swift's own)."""
        created = self.__dict__.pop('_gkd_created_dirs', None)  # not an argument: kept out of args.json
        if self.rlhf_type != 'gkd':
            check_no_plugin_flags_outside_gkd(self)
            return
        resolve_gkd_arguments(self)
        try:
            check_gkd_arguments(self)
        except FlagError:  # refused: the run's folder ms-swift just created stays only if something is in it
            if created is not None:
                created.remove_empty()
            raise
        # slow, samples staler than the loss tolerates, a model type its config.json contradicts: warned, not refused
        for warning in (torch_compile_warnings(self) + zero3_lora_warnings(self) + stale_sample_warnings(self)
                        + model_types.model_type_warnings(self, resolved=True)):
            logger.warning(f'swift_gkd_plugin: {warning}')
        logger.info(f'swift_gkd_plugin {swift_gkd_plugin.__version__}: GKD trainer active '
                    f'(lmbda={self.lmbda}, seq_kd={self.seq_kd}, beta={self.beta}, temperature={self.temperature}, '
                    f'sampling temperature={sampling_temperature(self)}, skd_top_k={self.gkd_skd_top_k})')
        keep_teacher_messages_column()
        init_gloo_for_cpu_zero3(self)
        if self.teacher_model is not None and self.teacher_model == self.model:
            # ms-swift only shares the base for LoRA students (it then clears teacher_model before we get here).
            logger.info(f'--teacher_model is --model with --tuner_type {self.tuner_type}: a separate frozen copy of '
                        'the teacher is loaded (only a LoRA student can share the base weights with its teacher)')


@dataclass
class GKDPluginConfig(GKDPluginArgumentsMixin, GKDConfig):
    """The trainer's configuration: ms-swift's ``GKDConfig`` plus the plugin's flags."""
    # forwarded from the command line: the trainer loads a teacher adapter on the shared base, and names the teacher
    # as the user did (a hub id, not the folder it was loaded from)
    teacher_adapters: List[str] = field(default_factory=list)
    teacher_model: Optional[str] = None
    # ms-swift's GRPO flags that GKD + RL reads (ms-swift's GKDConfig does not declare them). Declaring
    # num_generations also makes ms-swift's generation-batch check refuse a generation_batch_size it does not divide.
    num_generations: int = 1
    reward_funcs: List[str] = field(default_factory=list)
    reward_weights: Optional[List[float]] = None
    scale_rewards: Optional[Literal[SCALE_REWARDS]] = None
    rollout_importance_sampling_mode: Optional[Literal[ROLLOUT_IS_MODES]] = None
    rollout_importance_sampling_threshold: float = 2.0
    log_rollout_offpolicy_metrics: bool = False
    # ms-swift's multi-turn rollout flags (its GKDConfig does not declare them, so its GKD never built a scheduler)
    multi_turn_scheduler: Optional[str] = None
    max_turns: Optional[int] = None
    completion_length_limit_scope: Literal['total', 'per_round'] = 'per_round'
    gym_env: Optional[str] = None
