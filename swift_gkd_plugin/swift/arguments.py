"""The plugin's command-line flags and the checks that refuse bad GKD input before any model is loaded."""
from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field, fields
from typing import List, Literal, Optional

from swift.arguments import RLHFArguments
from swift.rlhf_trainers import GKDConfig
from swift.utils import get_logger

import swift_gkd_plugin
from swift_gkd_plugin.flags import (GKDPluginArgumentsMixin, check_gkd_scalars, check_no_plugin_flags_outside_gkd,
                                    check_rl_flags, check_teacher_server_flags, sampling_temperature)
from swift_gkd_plugin.swift.datasets_check import check_local_jsonl_datasets

logger = get_logger()


def resolve_model_dir(flag: str, model_id: str, revision: Optional[str], args) -> str:
    """A local directory for ``model_id`` (a path or a hub id), or a ValueError that names ``flag``."""
    path = os.path.abspath(os.path.expanduser(model_id))
    if os.path.isdir(path):
        return path
    if model_id.startswith(('/', './', '../', '~')) or os.path.exists(path):
        raise ValueError(f'{flag} {model_id!r}: no such model directory')
    from swift.utils import safe_snapshot_download
    try:  # config and tokenizer files only, never the weights
        return safe_snapshot_download(
            model_id, revision=revision, download_model=False, use_hf=args.use_hf, hub_token=args.hub_token)
    except Exception as exc:
        raise ValueError(f'{flag} {model_id!r} cannot be found: not a local directory, and the hub lookup failed '
                         f'({type(exc).__name__}: {exc})') from exc


def _load_vocab(model_dir: str):
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(model_dir, trust_remote_code=True).get_vocab()
    except Exception as exc:  # e.g. a processor-only multimodal repo: the pipeline will report real problems
        logger.warning(f'swift_gkd_plugin: cannot read the tokenizer of {model_dir} to compare vocabularies ({exc})')
        return None


def check_teacher(args) -> None:
    """The teacher exists and speaks the student's vocabulary (a larger lm_head over the same tokenizer is fine), or
    ``--gkd_cross_tokenizer`` is given for a teacher with another tokenizer."""
    cross = args.gkd_cross_tokenizer
    if args.teacher_model is None:
        if cross:
            raise ValueError(f'--gkd_cross_tokenizer {cross} needs a --teacher_model with another tokenizer; without '
                             'one the teacher is the student itself (same tokenizer): drop the flag')
        return
    teacher_dir = resolve_model_dir('--teacher_model', args.teacher_model, args.teacher_model_revision, args)
    student_dir = getattr(args, 'model_dir', None)
    if student_dir is None:
        return
    same_dir = os.path.realpath(student_dir) == os.path.realpath(teacher_dir)
    student_vocab = None if same_dir else _load_vocab(student_dir)
    teacher_vocab = None if same_dir else _load_vocab(teacher_dir)
    if same_dir or student_vocab == teacher_vocab:
        if cross and getattr(args, 'teacher_template', None) is not None:
            raise ValueError(f'--teacher_template {args.teacher_template} only applies to a teacher with another '
                             'tokenizer: this --teacher_model uses the student\'s tokenizer, so it scores the '
                             f'student\'s tokens through the student\'s --template {args.template}. Drop '
                             '--teacher_template (and --gkd_cross_tokenizer)')
        if cross:
            logger.warning(f'swift_gkd_plugin: --gkd_cross_tokenizer {cross} is ignored: the teacher uses the '
                           'student\'s tokenizer, so the exact (token by token) GKD loss is used')
            args.gkd_cross_tokenizer = None
            if getattr(args, 'training_args', None) is not None:
                args.training_args.gkd_cross_tokenizer = None
        return
    if student_vocab is None or teacher_vocab is None or cross:
        return
    only_s = len(set(student_vocab.items()) - set(teacher_vocab.items()))
    only_t = len(set(teacher_vocab.items()) - set(student_vocab.items()))
    raise ValueError(
        f'teacher and student tokenizers differ: --model {args.model!r} has {len(student_vocab)} tokens, '
        f'--teacher_model {args.teacher_model!r} has {len(teacher_vocab)} ({only_s} token/id pairs only in the '
        f'student, {only_t} only in the teacher). GKD compares distributions token by token, so both must use the '
        'same tokenizer (a teacher whose lm_head is larger over the same tokenizer is fine), or pass '
        '--gkd_cross_tokenizer uld|hybrid to distil across tokenizers (docs_en/cross_tokenizer.md).')


def check_teacher_template(args) -> None:
    """``--teacher_template`` names a registered ms-swift template type (templates registered by
    ``--external_plugins`` included: ms-swift has imported them by now)."""
    name = getattr(args, 'teacher_template', None)
    if name is None:
        return
    from swift.template import TEMPLATE_MAPPING
    if name in TEMPLATE_MAPPING:
        return
    close = difflib.get_close_matches(name, list(TEMPLATE_MAPPING), n=5)
    allowed = f'close matches: {close}' if close else f'allowed: {sorted(TEMPLATE_MAPPING)}'
    raise ValueError(f'--teacher_template {name!r} is not a registered ms-swift template type ({allowed}; '
                     'the --template choices of `swift rlhf --help`)')


def _head_rows(flag: str, model_dir: str) -> Optional[int]:
    """The number of output rows (``vocab_size`` of the text config) of the model in ``model_dir``."""
    from transformers import AutoConfig
    try:
        return AutoConfig.from_pretrained(model_dir, trust_remote_code=True).get_text_config().vocab_size
    except Exception as exc:  # an unusual config: the pipeline will report real problems
        logger.warning(f'swift_gkd_plugin: cannot read the vocabulary size of {flag} {model_dir} ({exc})')
        return None


def check_topk_within_vocab(args) -> None:
    """``--gkd_logits_topk`` k takes k of the teacher's logits at each position: a k larger than the vocabulary
    crashes in torch.topk at step 1, after both models are loaded. A served teacher's own limit (its ``--topk``)
    needs the network and is left to the teacher-server start-up check; k is still checked against the student."""
    k = args.gkd_logits_topk
    if k is None:
        return
    rows = {'--model': _head_rows('--model', args.model_dir)}
    if args.teacher_model is not None and args.teacher_model_server is None:
        teacher_dir = resolve_model_dir('--teacher_model', args.teacher_model, args.teacher_model_revision, args)
        rows['--teacher_model'] = _head_rows('--teacher_model', teacher_dir)
    known = {flag: n for flag, n in rows.items() if n}
    if known and k > min(known.values()):
        sizes = ', '.join(f'{flag} has {n}' for flag, n in known.items())
        raise ValueError(f'--gkd_logits_topk {k} is larger than the vocabulary ({sizes} output rows, config.json '
                         f'vocab_size): allowed 1 to {min(known.values())}, or unset for the full vocabulary')


def check_vllm_installed(args) -> None:
    """ms-swift's trainer refuses ``--use_vllm true`` without vLLM only after both models are loaded."""
    from swift.utils import is_vllm_available
    if args.use_vllm and not is_vllm_available():
        raise ValueError(f'--use_vllm true (--vllm_mode {args.vllm_mode}) needs vLLM, which is not installed here: '
                         'install vllm, or pass --use_vllm false (on-policy samples then come from the transformers '
                         'engine)')


def check_teacher_adapters(args) -> None:
    """``--teacher_adapters``: a frozen adapter on the teacher's base, sharing the student's base when it can.

    When the teacher's base is the student's (no ``--teacher_model``, or the same one) and the student is a LoRA,
    the adapter is loaded next to the student's on the one copy of the base weights: ``teacher_model`` is cleared so
    that ms-swift's pipeline does not load the base a second time.
    """
    adapters = args.teacher_adapters or []
    if isinstance(adapters, str):
        adapters = args.teacher_adapters = [adapters]
    if not adapters:
        return
    if len(adapters) != 1:
        raise ValueError(f'--teacher_adapters takes one adapter directory, got {len(adapters)}: {adapters}')
    adapter = adapters[0]
    if not os.path.isdir(adapter):
        raise ValueError(f'--teacher_adapters {adapter!r}: no such adapter directory')
    if args.teacher_model_server is not None:
        raise ValueError('--teacher_adapters cannot be combined with --teacher_model_server: the server serves '
                         'its own model (start it with --adapters instead)')
    shared_base = args.teacher_model is None or args.teacher_model == args.model
    if shared_base and args.tuner_type != 'lora':
        raise ValueError(f'--teacher_adapters on the student\'s own base needs a LoRA student (--tuner_type lora, got '
                         f'{args.tuner_type!r}): a fully tuned student changes the base the teacher adapter sits on. '
                         'Pass the teacher\'s base as --teacher_model to load a separate frozen teacher.')
    base_dir = args.model_dir if shared_base else resolve_model_dir('--teacher_model', args.teacher_model,
                                                                    args.teacher_model_revision, args)
    from swift_gkd_plugin.swift.peft_utils import adapter_base_mismatch
    problem = adapter_base_mismatch(adapter, base_dir)
    if problem:
        raise ValueError(f'--teacher_adapters {adapter!r} does not fit the teacher base {base_dir!r}: {problem}')
    if shared_base:
        args.teacher_model = None
        args._teacher_use_disable_adapter = False
        logger.info('Using shared base model architecture:\n'
                    '  - Student model: base_model + LoRA (trainable)\n'
                    f'  - Teacher model: base_model + teacher adapter {adapter} (frozen)')


def check_skd_teacher(args) -> None:
    """``--gkd_skd_top_k`` needs a teacher other than the student (a --teacher_model, the student's base with the
    adapter off, or --teacher_adapters) and a text-only model. Run after ms-swift resolved a shared base."""
    k = getattr(args, 'gkd_skd_top_k', 0)
    shared_base = getattr(args, '_teacher_use_disable_adapter', False) or bool(args.teacher_adapters)
    if k and args.teacher_model is None and args.teacher_model_server is None and not shared_base:
        raise ValueError(f'--gkd_skd_top_k {k} needs a teacher to correct the student: pass --teacher_model (or '
                         '--teacher_adapters); without one the teacher is the student itself')
    meta = getattr(args, 'model_meta', None)
    if k and meta is not None and meta.is_multimodal:
        raise ValueError(f'--gkd_skd_top_k {k} supports text-only models yet (--model_type {args.model_type} is '
                         'multimodal): the teacher verifies token ids without the prompt\'s images, videos or audio. '
                         'Pass --gkd_skd_top_k 0')


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


def keep_teacher_messages_column() -> None:
    """ms-swift keeps only the dataset columns it knows (``teacher_prompt`` among them); GKD runs also keep
    ``teacher_messages``, the teacher's whole prompt conversation."""
    from swift.dataset.preprocessor.core import RowPreprocessor
    if 'teacher_messages' not in RowPreprocessor.standard_keys:
        RowPreprocessor.standard_keys.append('teacher_messages')


_GRPO_NUM_GENERATIONS = next(f.default for f in fields(RLHFArguments) if f.name == 'num_generations')


def check_reward_funcs(args) -> None:
    """Every ``--reward_funcs`` name is in ms-swift's reward registry (built-ins and ``--external_plugins``, which
    ms-swift has imported by now); rewards need the dataset's extra columns (e.g. ``solution``) kept."""
    if not args.reward_funcs:
        return
    from swift.rewards import orms
    unknown = [name for name in args.reward_funcs if name not in orms]
    if unknown:
        raise ValueError(f'--reward_funcs {unknown}: no such reward function. Known: {sorted(orms)}; register your '
                         'own in a file passed with --external_plugins (orms[\'my_reward\'] = MyReward)')
    args.remove_unused_columns = False
    args.training_args.remove_unused_columns = False


def check_fresh_samples_for_rl(args) -> None:
    """The policy-gradient term assumes the student that sampled is the one being updated (no importance ratio): each
    generation batch must be exactly one optimizer step."""
    train = args.training_args
    spg, ga = train.steps_per_generation, train.gradient_accumulation_steps
    if args.gkd_rl_coef > 0 and spg != ga:
        raise ValueError(f'--gkd_rl_coef > 0 needs each generation batch to be one optimizer step: steps_per_generation '
                         f'{spg} (generation_batch_size {train.generation_batch_size}) must equal '
                         f'--gradient_accumulation_steps {ga}; later steps would train on samples of an older policy, '
                         'which the policy-gradient term (no importance ratio) does not correct. Leave '
                         '--steps_per_generation and --generation_batch_size unset.')


@dataclass
class GKDPluginRLHFArguments(GKDPluginArgumentsMixin, RLHFArguments):
    """ms-swift's ``RLHFArguments`` plus the plugin's flags and checks; used to parse ``swift rlhf``."""
    # None = the pipeline's default: 1 for GKD (one completion per prompt, as ms-swift GKD), GRPO's own otherwise
    num_generations: Optional[int] = field(
        default=None,
        metadata={'help': 'Completions sampled per prompt (GRPO: its G, default 8; GKD: on on-policy and seq_kd '
                  'steps, default 1).'})

    def __post_init__(self):
        if self.num_generations is None:
            self.num_generations = 1 if self.rlhf_type == 'gkd' else _GRPO_NUM_GENERATIONS
        if self.rlhf_type == 'gkd':
            check_gkd_scalars(self)  # before ms-swift resolves models or connects to vLLM servers
            check_rl_flags(self)
            check_vllm_installed(self)
            if self.reward_funcs:
                self.remove_unused_columns = False  # reward functions read the dataset's extra columns
        super().__post_init__()

    def _check_gkd(self):
        if self.rlhf_type != 'gkd':
            check_no_plugin_flags_outside_gkd(self)
            return
        check_gkd_scalars(self)
        check_rl_flags(self)
        check_vllm_installed(self)  # again: with --external_plugins, __post_init__ above is ms-swift's own
        check_reward_funcs(self)
        check_fresh_samples_for_rl(self)
        logger.info(f'swift_gkd_plugin {swift_gkd_plugin.__version__}: GKD trainer active '
                    f'(lmbda={self.lmbda}, seq_kd={self.seq_kd}, beta={self.beta}, temperature={self.temperature}, '
                    f'sampling temperature={sampling_temperature(self)}, skd_top_k={self.gkd_skd_top_k})')
        from swift.utils import is_mp
        if is_mp() and self.use_vllm:
            raise ValueError('--use_vllm true is not compatible with device_map model parallelism: set '
                             'NPROC_PER_NODE to the number of processes.')
        if self.async_generate:
            raise ValueError('--async_generate true is not supported for GKD (allowed: false)')
        check_teacher_server_flags(self)
        if self.teacher_model_server is not None and (self.padding_free or self.packing):
            raise ValueError('--teacher_model_server does not support --padding_free / --packing yet')
        check_teacher_template(self)
        check_teacher(self)
        check_topk_within_vocab(self)
        check_teacher_adapters(self)
        check_skd_teacher(self)
        check_local_jsonl_datasets(self)
        keep_teacher_messages_column()
        init_gloo_for_cpu_zero3(self)
        if self.teacher_model is not None and self.teacher_model == self.model:
            # ms-swift only shares the base for LoRA students (it then clears teacher_model before we get here).
            logger.info(f'--teacher_model is --model with --tuner_type {self.tuner_type}: a separate frozen copy of '
                        'the teacher is loaded (only a LoRA student can share the base weights with its teacher)')


@dataclass
class GKDPluginConfig(GKDPluginArgumentsMixin, GKDConfig):
    """The trainer's configuration: ms-swift's ``GKDConfig`` plus the plugin's flags."""
    # forwarded from the command line so that the trainer can load a teacher adapter on the shared base
    teacher_adapters: List[str] = field(default_factory=list)
    # ms-swift's GRPO flags that GKD + RL reads (ms-swift's GKDConfig does not declare them). Declaring
    # num_generations also makes ms-swift's generation-batch check refuse a generation_batch_size it does not divide.
    num_generations: int = 1
    reward_funcs: List[str] = field(default_factory=list)
    reward_weights: Optional[List[float]] = None
    scale_rewards: Optional[Literal['group', 'batch', 'none']] = None
