"""The training back-ends' settings, checked before ms-swift reads them in its arguments' ``__post_init__``:
``--deepspeed`` / ``--teacher_deepspeed`` (ms-swift loads the file, or parses the text as JSON; DeepSpeed and
transformers check its values only once the models are loaded) and the flash attention that ``--packing`` /
``--padding_free`` need (ms-swift's refusal was a traceback)."""
from __future__ import annotations

import importlib.util
import json
import os
from typing import Optional

from swift_gkd_plugin.options.flag_checks import FlagError, check_deepspeed_launch

__all__ = ['DEEPSPEED_PRESETS', 'FLASH_ATTN_IMPLS', 'check_deepspeed', 'check_deepspeed_config',
           'check_packing_attention', 'config_dtype', 'cpu_fp16_supported', 'deepspeed_fp16_problem',
           'check_deepspeed_fp16_on_cpu', 'check_not_ray', 'check_vllm_sampler', 'check_teacher_client',
           'MEGATRON_MODULES', 'importable', 'check_megatron_installed']

#: the ``--attn_impl`` values ms-swift takes for ``--packing`` / ``--padding_free`` (``SftArguments._check_padding_free``)
FLASH_ATTN_IMPLS = ('flash_attn', 'flash_attention_2', 'flash_attention_3', 'flash_attention_4')


def check_deepspeed(args) -> None:
    """The DeepSpeed configuration (:func:`check_deepspeed_config`), then how the process was started
    (:func:`~swift_gkd_plugin.options.flag_checks.check_deepspeed_launch`): a wrong file is wrong however it starts."""
    check_deepspeed_config(args)
    check_deepspeed_launch(args)


def check_packing_attention(args) -> None:
    """``--packing`` / ``--padding_free`` need a flash attention ``--attn_impl`` (ms-swift raised a ValueError with a
    traceback), and flash attention a CUDA GPU (transformers' ImportError came after ms-swift resolved the model)."""
    if not (getattr(args, 'packing', False) or getattr(args, 'padding_free', False)):
        return
    flag = '--packing' if getattr(args, 'packing', False) else '--padding_free'
    impl = getattr(args, 'attn_impl', None)
    import torch
    gpu = torch.cuda.is_available()
    if impl not in FLASH_ATTN_IMPLS:
        where = '' if gpu else ', which runs on CUDA GPUs only (this machine has none)'
        raise FlagError(f'{flag} true packs rows into one sequence, which needs a flash attention implementation'
                        f'{where}: --attn_impl is {impl or "unset"}; pass --attn_impl one of '
                        f'{", ".join(FLASH_ATTN_IMPLS)}{"" if gpu else " on a GPU machine"}, or {flag} false')
    if not gpu:
        raise FlagError(f'{flag} true with --attn_impl {impl}: flash attention runs on CUDA GPUs only and this '
                        f'machine has none; pass {flag} false to train here')


#: ms-swift's own --deepspeed configurations (swift/config/<name>.json)
DEEPSPEED_PRESETS = ('zero0', 'zero1', 'zero2', 'zero3', 'zero2_offload', 'zero3_offload')


def check_deepspeed_config(args) -> None:
    """``--deepspeed`` / ``--teacher_deepspeed`` (a file, or JSON text) read as ms-swift reads it, before it does: a
    missing file (ms-swift parsed the path as JSON text, "repaired" it, and failed later with a traceback), a cut file,
    a ``zero_optimization.stage`` other than 0-3, a ``train_micro_batch_size_per_gpu`` other than
    ``--per_device_train_batch_size`` (or ``gradient_accumulation_steps`` other than its flag; transformers refused
    both after loading) and an NVMe offload without ``nvme_path``."""
    for flag in ('deepspeed', 'teacher_deepspeed'):
        value = getattr(args, flag, None)
        if not value or (isinstance(value, str) and value in DEEPSPEED_PRESETS):
            continue
        config = value if isinstance(value, dict) else _deepspeed_json(f'--{flag}', value)
        problem = _deepspeed_problem(config, args, flag == 'deepspeed')
        if problem:
            raise FlagError(f'--{flag} {value if isinstance(value, str) else "(a dict)"}: {problem}')


def _deepspeed_json(flag: str, value: str) -> dict:
    """The configuration of a ``--deepspeed`` file or JSON text, or a FlagError naming why it cannot be one."""
    from swift_gkd_plugin.options.local_paths import near_names
    path = os.path.expanduser(value)
    if os.path.isfile(path):
        try:
            with open(path, encoding='utf-8') as f:
                config = json.load(f)
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise FlagError(f'{flag} {value}: the file is not a JSON object ({type(exc).__name__}: {exc}); a cut or '
                            'damaged file?') from None
        where = 'the file'
    elif value.lstrip().startswith('{'):
        try:
            config = json.loads(value)
        except ValueError as exc:
            raise FlagError(f'{flag}: the JSON text does not parse ({exc})') from None
        where = 'the JSON text'
    else:
        folder = '' if os.path.isabs(path) else f' (relative to {os.getcwd()})'
        raise FlagError(f'{flag} {value}: no such file {path!r}{folder}{near_names(path)}; give a DeepSpeed JSON file, '
                        f'JSON text, or one of ms-swift\'s {", ".join(DEEPSPEED_PRESETS)}')
    if not isinstance(config, dict):
        raise FlagError(f'{flag} {value}: {where} holds a JSON {type(config).__name__}, not a DeepSpeed configuration '
                        'object')
    return config


def _deepspeed_problem(config: dict, args, student: bool) -> Optional[str]:
    """What in a DeepSpeed configuration DeepSpeed or transformers would refuse only once the models are loaded."""
    zero = config.get('zero_optimization') or {}
    if not isinstance(zero, dict):
        return f'"zero_optimization" is {type(zero).__name__}, not an object'
    stage = zero.get('stage', 0)
    if stage not in (0, 1, 2, 3) or isinstance(stage, bool):
        return f'"zero_optimization": {{"stage": {json.dumps(stage)}}} is not a ZeRO stage (0, 1, 2 or 3)'
    for key in ('offload_param', 'offload_optimizer'):
        offload = zero.get(key)
        if isinstance(offload, dict) and offload.get('device') == 'nvme' and not offload.get('nvme_path'):
            return (f'"zero_optimization": {{"{key}": {{"device": "nvme"}}}} without "nvme_path": DeepSpeed needs the '
                    'folder of the NVMe drive to offload to (or use "device": "cpu")')
    if not student:
        return None
    for key, flag in (('train_micro_batch_size_per_gpu', 'per_device_train_batch_size'),
                      ('gradient_accumulation_steps', 'gradient_accumulation_steps')):
        given, ours = config.get(key), getattr(args, flag, None)
        if isinstance(given, int) and not isinstance(given, bool) and isinstance(ours, int) and given != ours:
            return (f'"{key}": {given} disagrees with --{flag} {ours} (transformers refused it after loading the '
                    f'models): set it to "auto" (filled in from --{flag}) or to {ours}')
    return None


def config_dtype(model_dir: str) -> Optional[str]:
    """The dtype of a local model folder's ``config.json`` (``dtype``, or ``torch_dtype``, of it or of its text config):
    what ms-swift resolves an unset ``--torch_dtype`` to; None when unreadable or absent."""
    try:
        with open(os.path.join(model_dir, 'config.json'), encoding='utf-8') as f:
            config = json.load(f)
    except (OSError, ValueError):
        return None
    for node in (config, config.get('text_config')):
        if isinstance(node, dict):
            value = node.get('dtype') or node.get('torch_dtype')
            if isinstance(value, str):
                return value.replace('torch.', '')
    return None


def cpu_fp16_supported() -> bool:
    """Whether DeepSpeed's CPU accelerator takes fp16 (its ``is_fp16_supported``: oneDNN's fp16 kernels, on CPUs with
    AVX512-FP16 or AMX-FP16)."""
    import torch
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except Exception:  # (DeepSpeed's answer then: not supported)
        return False


def deepspeed_fp16_problem(args, model_dtype: Optional[str], cpu_fp16: bool) -> Optional[str]:
    """Why DeepSpeed would refuse this run's fp16 on the CPU, or None: ``--deepspeed`` with fp16 mixed precision, given
    or ms-swift's default for a float16 / float32 model (``--torch_dtype``, else ``model_dtype``, the local
    ``--model``'s config; ms-swift sets ``--fp16 true`` unless ``--fp16`` is given), on a CPU whose DeepSpeed
    accelerator does not take fp16 (``cpu_fp16`` False). DeepSpeed raised it in every rank after both models loaded
    ("Type fp16 is not supported on your device")."""
    if not getattr(args, 'deepspeed', None) or args.fp16 is False or cpu_fp16:
        return None
    dtype = str(args.torch_dtype).replace('torch.', '') if args.torch_dtype is not None else model_dtype
    if not (args.fp16 or dtype in ('float16', 'float32', 'fp16', 'fp32')):
        return None
    given = '--fp16 true' if args.fp16 else (f'--torch_dtype {dtype}' + (
        '' if args.torch_dtype is not None else " (not given: --model's config.json)"))
    why = '' if args.fp16 else ' (ms-swift trains a float16 or float32 model in fp16 mixed precision unless --fp16 is given)'
    return (f'{given} with --deepspeed {args.deepspeed}{why}: DeepSpeed does not take fp16 on this CPU (no oneDNN fp16 '
            'kernels: they need AVX512-FP16 or AMX-FP16) and refused it in every rank after both models loaded. Pass '
            '--fp16 false (train in float32), or --torch_dtype bfloat16')


def check_deepspeed_fp16_on_cpu(args) -> None:
    """:func:`deepspeed_fp16_problem` on this machine: no accelerator (DeepSpeed then picks its CPU one)."""
    if not getattr(args, 'deepspeed', None) or args.fp16 is False:
        return
    import torch
    if torch.accelerator.is_available():
        return
    model = os.path.expanduser(args.model) if isinstance(args.model, str) else None
    problem = deepspeed_fp16_problem(args, config_dtype(model) if model and os.path.isdir(model) else None,
                                     cpu_fp16_supported())
    if problem:
        raise FlagError(problem)


# --- megatron rlhf: ms-swift's Ray pipeline, vLLM as its sampler and its teacher client, the megatron extra ---

def check_not_ray(args) -> None:
    """``--use_ray true`` starts ms-swift's own Ray pipeline (``swift/ray/megatron/``), whose GKD trainer and loss are
    not the plugin's: refused, rather than run without the plugin's modes, loss and checks."""
    if args.use_ray:
        raise FlagError('--use_ray true is not supported with the plugin: it runs ms-swift\'s own Ray GKD trainer '
                         '(swift/ray/megatron), not this plugin\'s. Run megatron rlhf --rlhf_type gkd without --use_ray '
                         '(torchrun ranks; NNODES, NODE_RANK and MASTER_ADDR for several nodes), or set '
                         'SWIFT_GKD_PLUGIN=0 to run ms-swift\'s own GKD on Ray')


def check_vllm_sampler(args, vllm_installed: bool) -> None:
    """ms-swift's Megatron default is ``--use_vllm true``: where vLLM is installed, on-policy steps need its mode
    (without vLLM the plugin samples from the training model instead, see
    :func:`swift_gkd_plugin.megatron.setup.checks.resolve_sampler`)."""
    if args.use_vllm and vllm_installed and args.lmbda > 0 and args.vllm_mode not in ('colocate', 'server'):
        raise FlagError(f'--use_vllm true needs --vllm_mode colocate or server (got {args.vllm_mode!r}); or pass '
                         '--use_vllm false to sample from the training model (megatron rlhf defaults to --use_vllm '
                         'true, and vLLM is installed here)')


def check_teacher_client(args, vllm_installed: bool) -> None:
    """ms-swift's teacher-server client (``VLLMInferClient``, built by its Megatron GKD trainer) refuses to start
    without vLLM, although it only speaks HTTP: named here, before any rank starts, with the fix."""
    if args.teacher_model_server is not None and not vllm_installed:
        raise FlagError(f'--teacher_model_server {args.teacher_model_server} needs vLLM installed on this machine, the '
                         "trainer's: megatron rlhf asks the server through ms-swift's teacher client, which refuses to "
                         'start without it (pip install vllm; the server may run elsewhere). swift rlhf --rlhf_type gkd '
                         "asks it through the plugin's own client, without vLLM")


#: the modules of the plugin's ``megatron`` extra (setup.py), which Megatron-SWIFT imports in every rank
MEGATRON_MODULES = {'megatron.core': 'megatron-core', 'mcore_bridge': 'mcore-bridge'}


def importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # the parent package is missing
        return False


def check_megatron_installed(args=None) -> None:
    """The ``megatron`` extra is installed: without it every rank stops at its first import, in a traceback."""
    missing = [package for module, package in MEGATRON_MODULES.items() if not importable(module)]
    if missing:
        raise FlagError(f'megatron rlhf --rlhf_type gkd needs {" and ".join(missing)}, not installed here: install '
                        'the plugin\'s megatron extra (pip install ".[megatron]" in the plugin\'s checkout), then '
                        'transformer-engine built for your CUDA toolkit as Megatron-SWIFT\'s install guide says (see '
                        'the Megatron page of the plugin\'s docs)')
