"""Puts the plugin's arguments and trainer in place inside ms-swift. The one module that patches ms-swift.

Two ways in, same effect:

* automatic (default): ``swift_gkd_plugin.pth`` installs import hooks (:mod:`swift_gkd_plugin.entry.bootstrap`) that
  call the ``on_*_imported`` functions below as soon as ms-swift's modules are imported, in every process,
  torchrun ranks included. The plugin's arguments class is then used to parse the command line, so its flags
  are accepted like ms-swift's own.
* explicit: ``--external_plugins "$(swift-gkd plugin-path)"`` (for users who set ``SWIFT_GKD_PLUGIN=0``).
  ms-swift imports that file after parsing, so :func:`activate_from_external_plugin` patches the already-created
  arguments' checks and the trainer factory instead (see its docstring for plugin flags in this mode).

Nothing here runs for ``swift sft`` or other pipelines; other rlhf types keep ms-swift's trainers.
"""
from __future__ import annotations

import dataclasses
import inspect
import os
import sys

from swift_gkd_plugin.runtime.ms_swift_state import remember_grpo_num_generations
from swift_gkd_plugin.runtime.process_exit import LAUNCHER_PID_ENV, refusal_file

TRAINER_PATH = 'swift_gkd_plugin.swift.trainer.GKDPluginTrainer'
CONFIG_PATH = 'swift_gkd_plugin.swift.setup.arguments.GKDPluginConfig'

_state = {'rlhf_pipeline': False}  # True once this process parses swift rlhf with the plugin's arguments


def on_rlhf_arguments_imported(module) -> None:
    """ms-swift's ``RLHFArguments`` gives ``num_generations`` GRPO's default (8) whatever the rlhf type, where GKD's
    is 1 (the plugin's command line). Its default becomes None, resolved per rlhf type at the start of
    ``__post_init__`` (:func:`swift_gkd_plugin.options.flags.resolve_num_generations`), so that arguments built in Python
    (``rlhf_main(RLHFArguments(...))``) get the command line's default; other rlhf types keep GRPO's."""
    cls = module.RLHFArguments
    if getattr(cls.__post_init__, '_swift_gkd_plugin', False):
        return
    from swift_gkd_plugin.options.flags import GKDPluginArgumentsMixin, resolve_num_generations
    # arguments built in Python from ms-swift's class get the plugin's checks too, its flags at their defaults
    for f in dataclasses.fields(GKDPluginArgumentsMixin):
        if f.name not in cls.__dataclass_fields__:
            setattr(cls, f.name, f.default)
    cls._check_gkd = _check_gkd
    cls._check_sequence_parallel = _sequence_parallel_check(cls._check_sequence_parallel)
    field = cls.__dataclass_fields__['num_generations']
    grpo_default = remember_grpo_num_generations(field.default)
    field.default = None  # what argument parsers (HfArgumentParser) read
    _set_init_default(cls, 'num_generations', None)  # what RLHFArguments(...) uses
    original = cls.__post_init__

    def __post_init__(self):
        resolve_num_generations(self, grpo_default)
        original(self)

    __post_init__._swift_gkd_plugin = True
    cls.__post_init__ = __post_init__


def _check_gkd(args) -> None:
    """The plugin's GKD checks, for an ms-swift ``RLHFArguments`` (imported when called: ms-swift's arguments
    package is still being imported when :func:`on_rlhf_arguments_imported` runs)."""
    from swift_gkd_plugin.swift.setup.arguments import GKDPluginRLHFArguments
    GKDPluginRLHFArguments._check_gkd(args)


def _sequence_parallel_check(original):
    """ms-swift refuses ``--sequence_parallel_size > 1`` outside GRPO and DPO; the plugin's GKD trainer runs it
    (its own checks refuse what it does not run: :mod:`swift_gkd_plugin.swift.setup.sequence_parallel`)."""
    def _check_sequence_parallel(self):
        if self.rlhf_type != 'gkd':
            original(self)
    return _check_sequence_parallel


def _set_init_default(cls, name: str, value) -> None:
    """The default of parameter ``name`` of the dataclass ``cls``'s generated ``__init__``."""
    init = cls.__init__
    positional = [p.name for p in inspect.signature(init).parameters.values() if p.kind is p.POSITIONAL_OR_KEYWORD]
    defaults = list(init.__defaults__ or ())
    if name in positional[len(positional) - len(defaults):]:
        defaults[positional.index(name) - (len(positional) - len(defaults))] = value
        init.__defaults__ = tuple(defaults)
    elif init.__kwdefaults__ and name in init.__kwdefaults__:
        init.__kwdefaults__[name] = value


def on_trainer_factory_imported(module) -> None:
    """Route ``rlhf_type='gkd'`` to the plugin's trainer and training-arguments classes (dotted paths, lazy)."""
    factory = module.TrainerFactory
    factory.TRAINER_MAPPING['gkd'] = TRAINER_PATH
    factory.TRAINING_ARGS_MAPPING['gkd'] = CONFIG_PATH


def on_rlhf_pipeline_imported(module) -> None:
    """Parse ``swift rlhf`` command lines with the plugin's arguments class (ms-swift's plus the plugin's flags), and
    load ``--gkd_ref_kl_coef``'s reference beside the models ms-swift loads for GKD."""
    from swift_gkd_plugin.swift.setup.arguments import GKDPluginRLHFArguments
    pipeline = module.SwiftRLHF
    if pipeline.args_class is GKDPluginRLHFArguments:
        return
    original_parse, original_models = pipeline._parse_args, pipeline._prepare_model_tokenizer
    base_cls = pipeline.args_class

    def _prepare_model_tokenizer(self):
        original_models(self)
        from swift_gkd_plugin.swift.teacher.reference import load_reference_copy
        load_reference_copy(self)  # ms-swift loads no reference for GKD

    def _parse_args(self, args=None):
        # An RLHFArguments object built by the caller is used as is (it simply lacks the plugin's flags).
        if isinstance(args, base_cls):
            return args
        from swift_gkd_plugin.swift.setup.command_line import parse_command_line  # refusals: one line, exit code 2
        return parse_command_line(self, original_parse, args)

    pipeline.args_class = GKDPluginRLHFArguments
    pipeline._parse_args = _parse_args
    pipeline._prepare_model_tokenizer = _prepare_model_tokenizer
    module.RLHFArguments = GKDPluginRLHFArguments
    _state['rlhf_pipeline'] = True


def on_megatron_cli_imported(module) -> None:
    """The ``megatron`` launcher: refuse a bad ``megatron rlhf --rlhf_type gkd`` command line before any rank starts
    (and so before CUDA, transformer-engine or a model is touched); a run the ranks stop is one line and its exit
    code, without torchrun's report (:func:`swift_gkd_plugin.runtime.process_exit.refusal_file`)."""
    original = module.cli_main
    if getattr(original, '_swift_gkd_plugin', False):
        return

    def cli_main():
        argv = sys.argv[1:]
        if not argv or argv[0] != 'rlhf':
            return original()
        from swift_gkd_plugin.megatron.setup.checks import check_megatron_command_line
        try:
            check_megatron_command_line(argv[1:])
        except ValueError as exc:
            sys.stderr.write(f'megatron rlhf: error: {exc}\n')
            sys.exit(2)
        with refusal_file():
            return original()

    cli_main._swift_gkd_plugin = True
    module.cli_main = cli_main


def on_swift_cli_imported(module) -> None:
    """ms-swift's launcher (``swift``, and ``megatron`` through it) tells the child it starts its own pid, so that
    the child exits with it (:func:`swift_gkd_plugin.runtime.process_exit.exit_with_launcher`).

    ``swift rlhf --rlhf_type gkd`` in one process: the declared values and the local paths are checked here first
    (:func:`swift_gkd_plugin.swift.setup.command_line.check_launcher_early`). Under torchrun (``NPROC_PER_NODE`` /
    ``NNODES`` set): the command line is checked here first, before any rank starts (the ranks' own checks of the
    flags and local paths, :func:`swift_gkd_plugin.swift.setup.command_line.check_launcher_command_line`), and a
    refusal in the ranks is one line and exit code 2, without torchrun's report
    (:func:`swift_gkd_plugin.runtime.process_exit.refusal_file`)."""
    original = module.cli_main
    if getattr(original, '_swift_gkd_plugin', False):
        return

    def cli_main(*args, **kwargs):
        os.environ[LAUNCHER_PID_ENV] = str(os.getpid())
        route_mapping = args[0] if args else kwargs.get('route_mapping')
        if route_mapping not in (None, module.ROUTE_MAPPING) or sys.argv[1:2] != ['rlhf']:
            return original(*args, **kwargs)
        argv = sys.argv[2:]
        module.parse_yaml_args(argv)  # a config file's flags and ENV (which may set NPROC_PER_NODE), read once
        sys.argv[2:] = argv
        if not module.use_torchrun():
            if _rlhf_type(argv) == 'gkd':
                from swift_gkd_plugin.swift.setup.command_line import check_launcher_early
                check_launcher_early(argv)
            return original(*args, **kwargs)
        if _rlhf_type(argv) == 'gkd':
            from swift_gkd_plugin.swift.setup.command_line import check_launcher_command_line
            check_launcher_command_line(argv)
        with refusal_file():
            return original(*args, **kwargs)

    cli_main._swift_gkd_plugin = True
    module.cli_main = cli_main


def on_pipeline_base_imported_while_off(module) -> None:
    """With ``SWIFT_GKD_PLUGIN=0``: a command line holding one of the plugin's flags (and no ``--external_plugins``,
    which activates it explicitly) is refused in one line naming the variable, before ms-swift parses it; any other
    command line is ms-swift's alone."""
    pipeline = module.SwiftPipeline
    original = pipeline._parse_args
    if getattr(original, '_swift_gkd_plugin', False):
        return

    def _parse_args(self, args=None):
        argv = sys.argv[1:] if args is None else args
        if isinstance(argv, (list, tuple)) and not any(str(t).split('=', 1)[0] == '--external_plugins' for t in argv):
            from swift_gkd_plugin.options.flags import plugin_flags_in
            flags = plugin_flags_in([str(t) for t in argv])
            if flags:
                from swift_gkd_plugin.swift.setup.command_line import refuse
                route = os.path.splitext(os.path.basename(sys.argv[0]))[0]
                prog = f'{"megatron" if "_megatron" in sys.argv[0] else "swift"} {route}'
                from swift_gkd_plugin.runtime.process_exit import PLUGIN_FLAGS_OFF
                refuse(prog, f'{", ".join(flags)}: {PLUGIN_FLAGS_OFF}{os.environ.get("SWIFT_GKD_PLUGIN")} turned off: '
                             'unset SWIFT_GKD_PLUGIN (or set it to 1), or drop the flag(s)')
        return original(self, args)

    _parse_args._swift_gkd_plugin = True
    pipeline._parse_args = _parse_args


def on_megatron_rlhf_pipeline_imported(module) -> None:
    """Parse ``megatron rlhf`` with the plugin's arguments class and build the plugin's trainer for 'gkd'."""
    from swift_gkd_plugin.megatron.setup.arguments import GKDPluginMegatronRLHFArguments
    pipeline = module.MegatronRLHF
    if pipeline.args_class is GKDPluginMegatronRLHFArguments:
        return
    original_parse, original_prepare = pipeline._parse_args, pipeline.prepare_trainer
    base_cls = pipeline.args_class

    def _parse_args(self, args=None):
        if isinstance(args, base_cls):  # built by the caller: used as is
            return args
        return original_parse(self, args)

    def prepare_trainer(self):
        if self.args.rlhf_type != 'gkd':
            return original_prepare(self)
        from swift_gkd_plugin.megatron.trainer import GKDPluginMegatronTrainer
        return GKDPluginMegatronTrainer(self.args, self.template, vllm_client=self._prepare_vllm_client())

    pipeline.args_class = GKDPluginMegatronRLHFArguments
    pipeline._parse_args = _parse_args
    pipeline.prepare_trainer = prepare_trainer
    module.MegatronRLHFArguments = GKDPluginMegatronRLHFArguments


def on_rollout_server_imported(module) -> None:
    """``swift rollout`` (the student's vLLM server in ``--vllm_mode server``): each weight sync loads through vLLM's
    layerwise reload where vLLM repacked its weights, and a sync that failed in a worker is answered with an error
    instead of 200 (:mod:`swift_gkd_plugin.swift.rollout.rollout_server`)."""
    from swift_gkd_plugin.swift.rollout.rollout_server import patch_rollout_server
    patch_rollout_server(module)


def on_mcore_bridge_rope_imported(module) -> None:
    """mcore-bridge 1.6 (``model/rope.py`` ~101/115) writes its own ``'default'`` RoPE initialisation into
    transformers' global ``ROPE_INIT_FUNCTIONS`` whenever it builds a model. It reads ``config.rope_theta``, which a
    transformers-5 config keeps in ``config.rope_parameters``, and transformers 5's ``_init_weights`` prefers that
    table's entry to the model's own default: after a Megatron model was built, instantiating any default-RoPE
    transformers model (Qwen3, Llama, ...) in the same process failed with ``AttributeError: 'Qwen3Config' object has
    no attribute 'rope_theta'``. The entry reads the theta (and the partial rotary factor) from ``rope_parameters``
    when the config has no attribute of that name; configs that have one are passed unchanged."""
    compute = module._compute_default_rope_parameters
    if getattr(compute, '_swift_gkd_plugin', False):
        return

    def _compute_default_rope_parameters(config=None, *args, **kwargs):
        if config is not None and not hasattr(config, 'rope_theta'):
            config = _RopeParameters(config)
        return compute(config, *args, **kwargs)

    _compute_default_rope_parameters._swift_gkd_plugin = True
    module._compute_default_rope_parameters = _compute_default_rope_parameters
    extended = getattr(module, 'EXTENDED_ROPE_INIT_FUNCTIONS', {})
    if extended.get('default') is compute:
        extended['default'] = _compute_default_rope_parameters


class _RopeParameters:
    """A config whose ``rope_theta`` / ``partial_rotary_factor`` come from its ``rope_parameters`` (transformers 5)."""

    def __init__(self, config):
        self._config = config

    def __getattr__(self, name):
        parameters = getattr(self._config, 'rope_parameters', None) or {}
        if name in ('rope_theta', 'partial_rotary_factor') and name in parameters:
            return parameters[name]
        return getattr(self._config, name)


def activate_from_external_plugin() -> None:
    """Activation through ``--external_plugins``, which ms-swift imports inside ``BaseArguments.__post_init__``.

    Parsing is over by then, so the arguments object is ms-swift's own class. The plugin's validation replaces
    ``RLHFArguments._check_gkd`` (which runs later in the same ``__post_init__``) and the trainer factory is
    rerouted. Plugin-only flags on the command line cannot be parsed any more in this process, and ms-swift's parser
    gave ``--num_generations`` its GRPO default (8, the plugin's is 1): a ``swift rlhf --rlhf_type gkd`` child process
    therefore re-executes itself once with the plugin enabled, so that the command line is parsed like ms-swift's own
    flags; elsewhere plugin flags get a clear error saying what to do.
    """
    if _state['rlhf_pipeline']:
        return  # auto-activation already parsed this command line with the plugin's arguments (or a re-exec did)
    from swift.arguments import RLHFArguments
    from swift.trainers import trainer_factory

    from swift_gkd_plugin.options.flags import plugin_flags_in
    from swift_gkd_plugin.swift.setup.arguments import GKDPluginRLHFArguments
    flags = plugin_flags_in(sys.argv[1:])
    # ms-swift's parser also gave GKD its GRPO default --num_generations 8, where the plugin's default is 1
    gkd = _rlhf_type(sys.argv[1:]) == 'gkd'
    if flags or gkd:
        entry = os.path.basename(sys.argv[0])
        if entry == 'rlhf.py' and os.environ.get('SWIFT_GKD_PLUGIN_REEXEC') != '1':
            env = dict(os.environ, SWIFT_GKD_PLUGIN='1', SWIFT_GKD_PLUGIN_REEXEC='1')
            sys.stdout.flush()
            sys.stderr.flush()
            os.execve(sys.executable, [sys.executable] + sys.argv, env)
    if flags:
        raise ValueError(f'swift_gkd_plugin flags {flags} need the plugin active while the command line is parsed: '
                         'unset SWIFT_GKD_PLUGIN (or set it to 1) instead of using --external_plugins.')
    on_rlhf_arguments_imported(sys.modules[RLHFArguments.__module__])  # for arguments built after this one
    RLHFArguments._check_gkd = GKDPluginRLHFArguments._check_gkd
    on_trainer_factory_imported(trainer_factory)


def _rlhf_type(argv):
    """The value of ``--rlhf_type`` in a command line (``--rlhf_type gkd`` or ``--rlhf_type=gkd``), else None."""
    for i, token in enumerate(argv):
        if token == '--rlhf_type' and i + 1 < len(argv):
            return argv[i + 1]
        if token.startswith('--rlhf_type='):
            return token.split('=', 1)[1]
    return None
