"""``megatron rlhf --rlhf_type gkd``: the launcher's reading of its command line, the checks of Megatron's own rules,
and :data:`MEGATRON_RLHF_PHASES`, which check (or resolver) runs when, in the launcher and in the ranks.

Framework-free (no Megatron import; ms-swift's dataset syntax only to read a local ``--dataset``, and its model
table for ``--model_type``), because the checks run twice:

* in the ``megatron`` launcher process, on its command line, before any rank is started, any CUDA or
  transformer-engine import and any model load (:func:`check_megatron_command_line`); a bad flag costs the user
  seconds, not a cluster allocation;
* in every rank, on the parsed arguments (:class:`swift_gkd_plugin.megatron.setup.arguments.GKDPluginMegatronRLHFArguments`),
  for callers that build the arguments in Python.

The checks of a concept shared with ``swift rlhf`` live in its module (the backends in ``options/backends.py``, the
models' contexts and vocabularies in ``options/model_context.py``, the teacher-score store in
``options/teacher_scores.py``, the parallel layout in ``layout.py``); those here are Megatron's own rules between
flags (:func:`check_megatron_gkd`) and its dataset checks, which import ms-swift's dataset syntax when they run (the
launcher imports it only then).
"""
from __future__ import annotations

import argparse
import json
import math
import os
from types import SimpleNamespace
from dataclasses import fields
from typing import List, Optional, Sequence

from swift_gkd_plugin.options import ms_swift_flag_table
from swift_gkd_plugin.options.backends import (check_megatron_installed, check_not_ray, check_teacher_client,
                                               check_vllm_sampler, importable as _importable)
from swift_gkd_plugin.options.model_context import check_sampling_contexts, check_vocab_sizes
from swift_gkd_plugin.options.hub_models import resolve_check_model
from swift_gkd_plugin.rollout.colocated_vllm import (check_vllm_cpu_head_dim, check_vllm_max_model_len,
                                                     check_vllm_sleep_mode, resolve_vllm_environment)
from swift_gkd_plugin.runtime.ms_swift_state import keep_teacher_messages_column
from swift_gkd_plugin.options.flags import (GKD_LOSS_IMPLS, LOCAL_TEACHER_URL, SCALAR_FLAGS, SKD_PLACEMENTS, FlagError,
                                            GKDPluginArgumentsMixin, MegatronGKDFlagsMixin, TEACHER_CLIENT_FLAGS,
                                            check_gkd_scalars,
                                            check_no_multi_turn, check_teacher_server_flags, check_training_set,
                                            entry_urls, local_teacher_index, plugin_flags_in)
from swift_gkd_plugin.megatron.setup.layout import (check_expert_counts, check_grouped_experts,
                                                    check_moe_sequence_parallel, check_parallel_sizes,
                                                    check_pipeline_layers)
from swift_gkd_plugin.options.teacher_scores import (check_rank_teacher_store, check_teacher_store,
                                                     check_teacher_store_flags, resolve_store_topk,
                                                     resolve_teacher_store)

#: ``--gkd_loss_impl`` values of megatron rlhf: the fused loss on hidden states is for swift rlhf only
MEGATRON_LOSS_IMPLS = tuple(impl for impl in GKD_LOSS_IMPLS if impl != 'fused')
#: the teacher-server client's flags of swift rlhf (megatron rlhf uses ms-swift's own client)
CLIENT_FLAGS = TEACHER_CLIENT_FLAGS
MEGATRON_PLUGIN_FLAGS: List[str] = [f.name for f in fields(MegatronGKDFlagsMixin)]


def check_megatron_gkd(args) -> None:
    """All flag-only checks of a Megatron GKD run (``args`` has the attributes of ms-swift's Megatron arguments).

    ``args.beta`` may be None (ms-swift's Megatron default, resolved to 0.5 for GKD).
    """
    if getattr(args, 'async_generate', False):
        raise FlagError('--async_generate true is not supported by megatron rlhf (allowed: false; ms-swift\'s '
                        'Megatron GRPO refuses it too): its samples are drawn between the training steps. swift rlhf '
                        'runs it, with --use_vllm true --vllm_mode server')
    if args.gkd_loss_impl not in MEGATRON_LOSS_IMPLS:
        raise FlagError(f'--gkd_loss_impl {args.gkd_loss_impl!r} is not available in megatron rlhf (allowed: '
                         f'{list(MEGATRON_LOSS_IMPLS)}): the output layer is vocabulary-parallel there, and the '
                         'loss is computed on the logit shards, chunk by chunk, with the tensor-parallel '
                         'all-reduces; the fused loss on hidden states is for swift rlhf')
    cross = [f'--{name} {getattr(args, name)}' for name in ('gkd_cross_tokenizer', 'teacher_template')
             if getattr(args, name) is not None]
    if cross:
        raise FlagError(f'{", ".join(cross)} is supported by swift rlhf only: the Megatron loss works on '
                         'vocabulary-parallel logit shards of one shared vocabulary. Distil across tokenizers with '
                         'swift rlhf --rlhf_type gkd (docs_en/cross_tokenizer.md)')
    if getattr(args, 'gkd_drop_bad_rows', False):
        raise FlagError('--gkd_drop_bad_rows true is read by swift rlhf only (allowed here: false): megatron rlhf '
                        'trains on every row, and its launcher names a local row it cannot sample from by file and '
                        'line: remove such rows from the dataset')
    if args.gkd_skd_top_k:
        raise FlagError(f'--gkd_skd_top_k {args.gkd_skd_top_k} is supported by swift rlhf only: megatron rlhf '
                         'samples with vLLM or with its own tensor-parallel sampler, and neither has SKD\'s step where '
                         f'the teacher verifies the student\'s drafts. SKD runs in {SKD_PLACEMENTS}; pass '
                         '--gkd_skd_top_k 0 here')
    # before the shared checks, whose advice for these names flags that megatron rlhf refuses (out-of-range values
    # are theirs)
    divergence = getattr(args, 'gkd_divergence_coef', 1.0)
    if divergence != 1 and math.isfinite(divergence) and divergence >= 0:
        raise FlagError(f'--gkd_divergence_coef {divergence:g} is supported by swift rlhf only yet: the Megatron loss '
                         'is the divergence alone, at weight 1 (no policy-gradient term: --gkd_sampled_kl_coef and '
                         '--gkd_rl_coef are refused here too). Pass --gkd_divergence_coef 1 here, or run a reweighted '
                         'or policy-gradient-only loss with swift rlhf --rlhf_type gkd')
    sampled = getattr(args, 'gkd_sampled_kl_coef', 0.0)
    if sampled and math.isfinite(sampled) and sampled > 0:
        raise FlagError(f'--gkd_sampled_kl_coef {sampled:g} is supported by swift rlhf only yet: the Megatron loss has '
                         'no policy-gradient term on the vocabulary-parallel logits. Run it with swift rlhf --rlhf_type '
                         'gkd, or pass --gkd_sampled_kl_coef 0 here')
    check_gkd_scalars(_scalar_view(args))
    coef = getattr(args, 'gkd_ref_kl_coef', 0.0)
    if coef:
        raise FlagError(f'--gkd_ref_kl_coef {coef:g} is supported by swift rlhf only yet: megatron rlhf builds no '
                         'reference model beside the student. Run the anchor with swift rlhf --rlhf_type gkd, or pass '
                         '--gkd_ref_kl_coef 0 here')
    check_teacher_server_flags(args)
    if local_teacher_index(entry_urls(args.teacher_model_server)) is not None:
        raise FlagError(f'--teacher_model_server {args.teacher_model_server}: an entry "url": "{LOCAL_TEACHER_URL}" '
                        '(the local teacher for some tags) is supported by swift rlhf only: megatron rlhf asks every '
                        'tag-routed teacher through ms-swift\'s client. Serve that teacher too (`swift-gkd '
                        'serve-teacher` or `vllm serve`) and give its URL, or run with swift rlhf --rlhf_type gkd')
    check_no_multi_turn(args)
    check_teacher_store_flags(args)
    teacher_tp = args.teacher_tensor_model_parallel_size
    student_tp = args.tensor_model_parallel_size or 1
    if teacher_tp is not None and teacher_tp != student_tp:
        raise FlagError(
            f'--teacher_tensor_model_parallel_size {teacher_tp} differs from --tensor_model_parallel_size '
            f'{student_tp}: a Megatron teacher is built in the student\'s parallel layout (the same tensor, pipeline, '
            'context and expert parallel sizes), so only the student\'s value is supported. For a teacher in another '
            'layout, serve it (`swift deploy`, a vLLM server, or `swift-gkd serve-teacher` without --api_key) and pass '
            '--teacher_model_server.')
    defaults = {f.name: f.default for f in fields(GKDPluginArgumentsMixin)}
    client_flags = [f'--{name}' for name in CLIENT_FLAGS if getattr(args, name) != defaults[name]]
    if client_flags:
        raise FlagError(f'{client_flags} are supported by swift rlhf only: megatron rlhf talks to --teacher_model_server '
                         "through ms-swift's own client (no API key, its own timeouts); serve the teacher without "
                         '--api_key on a private network')
    refuse_rl_flags(rl_flags_set(args))
    # only the launcher's parser has it: ms-swift's Megatron arguments do not declare --teacher_adapters at all
    if getattr(args, 'teacher_adapters', None):
        raise FlagError('--teacher_adapters is supported by swift rlhf only; for megatron rlhf merge the adapter '
                         'into the teacher first (`swift export --adapters ADAPTER --merge_lora true`) and pass the '
                         'merged model as --teacher_model')


def rl_flags_set(args) -> List[str]:
    """The RL + distillation flags of ``swift rlhf`` (docs_en/rl.md) set away from their defaults in ``args``.

    ``--num_generations`` is not read here: ms-swift's Megatron arguments default it to 8 and set it to 1 for gkd,
    so only the command line tells whether it was given (:func:`check_megatron_command_line` checks it).
    """
    given = []
    if args.gkd_rl_coef not in (None, 0):
        given.append('--gkd_rl_coef')
    if args.reward_funcs:
        given.append('--reward_funcs')
    if args.reward_weights is not None:
        given.append('--reward_weights')
    if getattr(args, 'rollout_importance_sampling_mode', None) is not None:
        given.append('--rollout_importance_sampling_mode')
    if getattr(args, 'log_rollout_offpolicy_metrics', False):
        given.append('--log_rollout_offpolicy_metrics')
    return given


def refuse_rl_flags(given: List[str]) -> None:
    if given:
        raise FlagError(f'{given} are supported by swift rlhf only: ms-swift\'s Megatron GKD has no reward machinery '
                         'and its rollout samples one response per prompt, so megatron rlhf --rlhf_type gkd distils '
                         'without a reward term. Run RL + distillation with swift rlhf --rlhf_type gkd (docs_en/rl.md)')


def _scalar_view(args):
    """What the shared scalar checks see: ``beta`` resolved (None -> 0.5, ms-swift's GKD default), and the loss
    implementation as 'auto' (in megatron rlhf both implementations are the vocabulary-parallel loss, tail included)."""
    view = argparse.Namespace(**{k: getattr(args, k) for k in _SCALAR_NAMES})
    view.beta = 0.5 if args.beta is None else args.beta
    view.gkd_loss_impl = 'auto'
    return view


# the shared checks' flags (the cross-tokenizer ones are refused before them), the combinations' ones
_SCALAR_NAMES = SCALAR_FLAGS + ('seq_kd', 'gkd_topk_tail', 'teacher_template')


#: the launcher's own readings beside the table's fields (:data:`ms_swift_flag_table.TYPED_FIELDS`): a flag of swift
#: rlhf that ms-swift's Megatron arguments do not declare, read to be refused, and defaults that say "not given"
LAUNCHER_FIELDS = {
    'teacher_adapters': ('list[str]', []),  # refused by check_megatron_gkd: merge the adapter first
    'num_generations': ('int', None),  # ms-swift's default is 8, set to 1 for gkd later: None = not given
    'use_hf': ('bool', None),  # ms-swift's default is false: None = not given, the USE_HF environment decides
}


def _command_line_parser() -> argparse.ArgumentParser:
    """The flags the checks read: ms-swift's with their types and defaults from the generated table
    (:func:`~swift_gkd_plugin.options.ms_swift_flag_table.typed_fields`), the launcher's own readings
    (:data:`LAUNCHER_FIELDS`) and the plugin's flags (:class:`MegatronGKDFlagsMixin`); everything else is left to
    ms-swift."""
    return ms_swift_flag_table.typed_parser({**ms_swift_flag_table.typed_fields('megatron rlhf'), **LAUNCHER_FIELDS,
                                             **ms_swift_flag_table.class_fields(MegatronGKDFlagsMixin)})


def parse_megatron_command_line(argv: Sequence[str]) -> argparse.Namespace:
    """The flags of a ``megatron rlhf`` command line that the checks need (unknown flags are ignored)."""
    try:
        ns, _ = _command_line_parser().parse_known_args(list(argv))
    except SystemExit as exc:  # argparse's own message was printed; turn it into an exception that names it
        raise FlagError(f'megatron rlhf: cannot read the GKD flags of {list(argv)}') from exc
    return ns


def check_megatron_command_line(argv: Sequence[str]) -> None:
    """Refuse a bad ``megatron rlhf --rlhf_type gkd`` command line in the launcher, before any rank starts: the
    launcher's phases of :data:`MEGATRON_RLHF_PHASES`, in order (those that read local files not for a config file's
    command line, whose flags are ms-swift's to read in the ranks), with the unknown flags after the flags' own checks.

    Plugin flags with another ``--rlhf_type`` are refused too (they would be silently ignored otherwise).
    """
    ns = parse_megatron_command_line(argv)
    if ns.rlhf_type != 'gkd':
        given = plugin_flags_in(list(argv), MEGATRON_PLUGIN_FLAGS)
        if given:
            raise FlagError(f'{given} only apply to --rlhf_type gkd (got --rlhf_type {ns.rlhf_type})')
        return
    config_file = bool(argv) and str(argv[0]).endswith(CONFIG_FILE_SUFFIXES)
    run_phase(MEGATRON_RLHF_PHASES['launcher: flags'], ns)
    if not config_file:  # flags neither ms-swift nor the plugin declares
        unknown = ms_swift_flag_table.unknown_flags('megatron rlhf', argv, MegatronGKDFlagsMixin)
        if unknown is not None:  # (None: the table cannot tell; the ranks' parser refuses them then)
            raise FlagError(unknown)
    run_phase(MEGATRON_RLHF_PHASES['launcher: this machine'], ns)
    if not config_file:  # a config file's flags: ms-swift's, in the ranks
        run_phase(MEGATRON_RLHF_PHASES['launcher: local files'], ns)
    run_phase(MEGATRON_RLHF_PHASES['launcher: installed'], ns)


def check_launcher_rl_flags(args) -> None:
    """The RL flags of swift rlhf (:func:`rl_flags_set`), and ``--num_generations`` where the command line gives it."""
    num_generations = [] if args.num_generations in (None, 1) else ['--num_generations']
    refuse_rl_flags(rl_flags_set(args) + num_generations)


def check_launcher_sampling(args) -> None:
    """The samplers with vLLM as installed on this machine (the ranks check them with ``--use_vllm`` as resolved:
    :func:`check_rank_sampling`); a colocated engine's head size here rather than in every rank, with a traceback,
    after the ranks started."""
    vllm_installed = _importable('vllm')
    check_vllm_sampler(args, vllm_installed=vllm_installed)
    check_model_sampling(args, vllm_samples=args.use_vllm and vllm_installed)
    check_teacher_client(args, vllm_installed=vllm_installed)
    if args.use_vllm and args.vllm_mode == 'colocate' and args.lmbda > 0 and args.model \
            and os.path.isdir(args.model) and vllm_installed:
        check_vllm_cpu_head_dim(args, args.model)


def check_launcher_store(args) -> None:
    """``--teacher_scores`` against the local ``--model`` (first of the file checks: before the dataset checks import
    ms-swift's dataset package, ~4 s)."""
    check_teacher_store(args, args.model if isinstance(args.model, str) and os.path.isdir(args.model) else None)


def _launcher_models(args):
    return [('--model', args.model), ('--teacher_model', args.teacher_model)]


def check_model_layouts(args, models, student) -> None:
    """The parallel layout against the models' folders (``models``: (flag, folder) pairs; ``student``: --model's)."""
    check_grouped_experts(args, models)
    check_expert_counts(args, models)
    check_pipeline_layers(args, models)
    check_moe_sequence_parallel(args, student)


def check_launcher_layouts(args) -> None:
    """The parallel layout against the local folders of ``--model`` and ``--teacher_model``."""
    check_model_layouts(args, _launcher_models(args), args.model)


def check_launcher_contexts(args) -> None:
    check_sampling_contexts(args, vllm_installed=_importable('vllm'))


def check_launcher_teachers(args) -> None:
    """A teacher is given (a store is the teacher: megatron rlhf then loads none), and ms-swift's shared base
    (``megatron_args.py``, ``_check_teacher``: the teacher is the student with its adapter off) has something to add."""
    # ms-swift's dataset syntax: imported here
    from swift_gkd_plugin.data.dataset_files import check_fresh_adapter_teacher, check_teacher_given
    view = SimpleNamespace(**{**vars(args), 'columns': _json_or_none(args.columns)})
    if not args.teacher_scores:
        check_teacher_given(view, ('teacher_model', 'teacher_model_server'),
                            '--teacher_model (another model; --model itself only for a LoRA student that starts '
                            'from a trained adapter, --adapters or --mcore_adapter)')
    check_fresh_adapter_teacher(view, args.teacher_model is not None and args.teacher_model == args.model
                                and args.tuner_type == 'lora', ('adapters', 'mcore_adapter'))


def check_model_types(args) -> None:
    """``--model_type`` / ``--teacher_model_type`` name model types ms-swift registers (every rank raised ms-swift's
    traceback listing them all), and a type that contradicts a local folder's ``config.json`` is warned about (it
    trained without a word): :mod:`swift_gkd_plugin.options.model_types`, as in ``swift rlhf``. Left to the ranks
    with ``--custom_register_path`` / ``--external_plugins``, which may register types."""
    from swift.utils import get_logger

    from swift_gkd_plugin.options import model_types
    if model_types.types_may_be_registered_later(args):
        return
    model_types.check_given_model_types(args, 'megatron rlhf')
    for warning in model_types.model_type_warnings(args, resolved=False):
        get_logger().warning(f'swift_gkd_plugin: {warning}')


#: a first argument ms-swift reads as a config file holding the flags (``swift/cli/main.py``, ``parse_yaml_args``)
CONFIG_FILE_SUFFIXES = ('.json', '.yaml', '.yml')


def _json_or_none(text):
    try:
        return json.loads(text) if isinstance(text, str) else text
    except ValueError:  # not JSON: ms-swift's own parser decides
        return None


def check_local_paths(args) -> None:
    """Local ``--dataset`` files and ``--model`` / ``--teacher_model`` folders exist (a missing dataset was found
    after both models loaded, in every rank)."""
    from swift_gkd_plugin.options.local_paths import dataset_path_problem, looks_local, near_names
    for entry in args.dataset or []:
        problem = dataset_path_problem('--dataset', entry)
        if problem:
            raise FlagError(problem)
    for flag, value in (('--model', args.model), ('--teacher_model', args.teacher_model)):
        if isinstance(value, str) and looks_local(value) and not os.path.exists(os.path.expanduser(value)):
            path = os.path.expanduser(value)
            raise FlagError(f'{flag} {value}: no such model folder {path!r}{near_names(path)}; a local model must '
                            'exist (hub models are named owner/name)')



def check_rows_have_prompts(args) -> None:
    """Steps that sample (``--lmbda`` > 0, ``--seq_kd``) need a user message in every row: a local ``--dataset`` row
    without one (a system turn alone, a response alone) failed every rank with dacite's ``MissingValueError`` when
    drawn (``swift rlhf`` draws another row in its place)."""
    if not (args.lmbda > 0 or args.seq_kd):
        return
    from swift_gkd_plugin.data.dataset_files import dataset_rows, local_dataset_files  # ms-swift's dataset syntax
    from swift_gkd_plugin.data.dataset_rows import has_prompt, prompt_missing
    columns = _json_or_none(args.columns)
    columns = columns if isinstance(columns, dict) else {}
    for path, standard in local_dataset_files(list(args.dataset or []), args.use_hf):
        if not standard:
            continue
        missing = [(where, row) for where, row in dataset_rows('--dataset', path) if not has_prompt(row, columns)]
        if missing:
            where, row = missing[0]
            steps = '--lmbda ' + f'{args.lmbda:g}' + (' and --seq_kd true' if args.seq_kd else '')
            raise FlagError(f'--dataset {path}: {len(missing)} row(s) without a user message ({where}: '
                            f'{prompt_missing(row, columns)}); with {steps} the student or the teacher samples a '
                            'response to each row\'s user message, and megatron rlhf stops on a row without one: '
                            'remove those rows, or pass --lmbda 0 --seq_kd false (dataset responses only)')


def check_model_sampling(args, vllm_samples: bool) -> None:
    """Sampling from the Megatron model (on-policy steps when vLLM does not sample; seq_kd, whose own rule is in
    :func:`check_megatron_gkd`) runs whole sequences through each model-parallel group: no virtual pipeline stages
    (context parallelism is supported: the last positions' logits are gathered from the ranks holding them). In the
    launcher (where vLLM samples with ``--use_vllm true`` if it is installed) and in the ranks (``vllm_samples``:
    ``--use_vllm`` as resolved there)."""
    sampling = args.seq_kd or (args.lmbda > 0 and not vllm_samples)
    if not sampling:
        return
    vpp = getattr(args, 'virtual_pipeline_model_parallel_size', None)
    if vpp not in (None, 1):
        raise FlagError('sampling from the Megatron model (seq_kd, or on-policy steps without vLLM) does not '
                         f'support virtual pipeline stages (--virtual_pipeline_model_parallel_size {vpp}; allowed: '
                         '1 or unset)')


def check_context_parallel_views(args) -> None:
    """Context parallelism cuts each sequence at its own length, the teacher's view too: a local ``--dataset`` row
    with a teacher prompt of its own is refused (the ranks refuse a batch whose views are cut apart, for datasets
    that cannot be read here)."""
    cp = args.context_parallel_size or 1
    if cp == 1:
        return
    from swift_gkd_plugin.data.dataset_files import first_privileged_row  # ms-swift's dataset syntax: imported here
    where = first_privileged_row(args.dataset, args.use_hf, _json_or_none(args.columns))
    if where:
        raise FlagError(f'--context_parallel_size {cp} with a teacher view of its own ({where} has a teacher_prompt '
                        'or teacher_messages) is not supported in megatron rlhf: context parallelism cuts the '
                        "student's and the teacher's sequences at their own lengths, so the teacher's response tokens "
                        "are not on the ranks of the student's. Use --context_parallel_size 1, or swift rlhf")


def float32_warning(torch_dtype, fp16_given, fp16) -> Optional[str]:
    """The warning for a float32 model that ms-swift trains in fp16 mixed precision (it sets ``--fp16 true`` for
    ``--torch_dtype float32``, ``arguments/base_args/model_args.py`` ~133, unless ``--fp16`` was given), else None."""
    if str(torch_dtype).replace('torch.', '') == 'float32' and fp16_given is None and fp16:
        return ('--torch_dtype float32 trains in fp16 mixed precision under Megatron-SWIFT (ms-swift sets --fp16 true '
                'for float32 models); pass --fp16 false --bf16 false to train in float32')
    return None


# --- the ranks (GKDPluginMegatronRLHFArguments.__post_init__), framework-free as the launcher's ---

def resolve_sampler(args) -> None:
    """ms-swift's Megatron default is ``use_vllm=True``; without vLLM the plugin samples from the model itself."""
    from swift.utils import get_logger, is_vllm_available
    if args.use_vllm and not is_vllm_available():
        get_logger().info('swift_gkd_plugin: vLLM is not installed: on-policy steps sample from the training model')
        args.use_vllm = False


def resolve_colocated_vllm(args) -> None:
    """The environment a colocated vLLM engine needs, where ms-swift builds one (without it a machine without
    torchvision failed building the engine: ms-swift's swift_uembed vLLM plugin imports it)."""
    if args.use_vllm and args.vllm_mode == 'colocate' and args.lmbda > 0:
        resolve_vllm_environment(args)


def resolve_teacher_messages_column(args) -> None:
    """ms-swift's dataset rows keep their ``teacher_messages`` column (:func:`keep_teacher_messages_column`)."""
    keep_teacher_messages_column()


def _rank_models(args):
    return [('--model', args.model_dir), ('--teacher_model', getattr(args, 'teacher_model_dir', None))]


def check_rank_layouts(args) -> None:
    """The parallel layout against the resolved model folders (hub models too, now downloaded: before
    megatron-core's assertion)."""
    check_model_layouts(args, _rank_models(args), args.model_dir)


def check_rank_sampling(args) -> None:
    """The samplers with ``--use_vllm`` as resolved (:func:`resolve_sampler`); what the platform of a colocated vLLM
    engine (built in every rank by ms-swift's rollout mixin) cannot run, checked as for ``swift rlhf``
    (:mod:`swift_gkd_plugin.rollout.colocated_vllm`), before the models load."""
    check_vllm_sampler(args, vllm_installed=args.use_vllm)
    if args.use_vllm and args.vllm_mode == 'colocate' and args.lmbda > 0:  # ms-swift builds the engine then
        check_colocated_vllm(args)
    check_model_sampling(args, vllm_samples=args.use_vllm)


def check_colocated_vllm(args) -> None:
    check_vllm_max_model_len(args, args.model_dir)
    check_vllm_cpu_head_dim(args, args.model_dir)
    check_vllm_sleep_mode(args)


#: Which check (or resolver) runs when, for ``megatron rlhf --rlhf_type gkd``: phase -> its functions of the arguments,
#: in order. The launcher's phases run on its command line before any rank starts (:func:`check_megatron_command_line`);
#: the ranks' in ``GKDPluginMegatronRLHFArguments.__post_init__``, before and after ms-swift's own. A resolver changes
#: the arguments and raises nothing; a check raises and changes nothing.
MEGATRON_RLHF_PHASES = {
    'launcher: flags': (resolve_store_topk,  # --teacher_scores without --gkd_logits_topk: the store's k
                        check_launcher_rl_flags, check_not_ray,
                        check_megatron_gkd),  # then the unknown flags: it names swift rlhf's flags first
    'launcher: this machine': (check_launcher_sampling, check_vocab_sizes),
    'launcher: local files': (check_launcher_store, check_parallel_sizes, check_local_paths, check_launcher_layouts,
                              check_training_set, check_context_parallel_views, check_rows_have_prompts,
                              check_model_types,  # (ms-swift's model table: imported with its dataset package)
                              check_launcher_contexts, check_launcher_teachers),
    'launcher: installed': (check_megatron_installed,),
    'rank: flags': (resolve_store_topk, check_not_ray, check_megatron_gkd, check_parallel_sizes),
    # ms-swift's __post_init__ runs here: the models resolved (downloaded), its defaults filled in
    'rank: resolve': (resolve_sampler, resolve_check_model, resolve_colocated_vllm),
    'rank: resolved': (check_rank_layouts, check_rank_sampling, check_rank_teacher_store),
    'rank: store': (resolve_teacher_store, resolve_teacher_messages_column),
}


def run_phase(functions, args) -> None:
    """Each function of a phase of :data:`MEGATRON_RLHF_PHASES` on ``args``, in order."""
    for function in functions:
        function(args)
