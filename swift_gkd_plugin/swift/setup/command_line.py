"""``swift rlhf``'s command line as the plugin parses it: a refused flag is one ``error:`` line and exit code 2 (no
traceback), as in the ``megatron`` launcher (:func:`swift_gkd_plugin.entry.activation.on_megatron_cli_imported`); an
unknown flag is named with the closest flags of ms-swift and the plugin, before any argument is resolved. Under
torchrun the ``swift`` launcher runs the first of these checks before any rank starts
(:func:`check_launcher_command_line`)."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from types import SimpleNamespace
from typing import List, Optional

from swift_gkd_plugin.options import model_types, ms_swift_flag_table
from swift_gkd_plugin.options.flags import FlagError
from swift_gkd_plugin.runtime.process_exit import refuse

PROG = 'swift rlhf'


def _parser(args_class):
    """ms-swift's parser of ``args_class`` (built as its ``swift.utils.parse_args`` builds it), whose errors (a value
    of the wrong type, a choice not allowed) are one line."""
    from swift.utils import utils as swift_utils
    from transformers import HfArgumentParser
    patch = getattr(swift_utils, '_patch_get_type_hints', contextlib.nullcontext)  # ms-swift's dict/str fix
    with patch():
        parser = HfArgumentParser([args_class])
    parser.prog = PROG
    parser.error = lambda message: refuse(PROG, message)  # one line, not the usage of every flag first
    return parser


def unknown_flags_message(parser, remaining: List[str]) -> str:
    """``remaining`` (what the parser did not recognise) with the closest known flag of each unknown one."""
    return ms_swift_flag_table.unknown_flags_message(parser, remaining, PROG)


def check_unknown_flags(args_class, argv: Optional[List[str]]) -> argparse.Namespace:
    """Refuse flags that neither ms-swift nor the plugin declares, before the arguments are built (ms-swift builds them
    first, resolving the models, and then raises ``remaining_argv: [...]`` in a traceback). Returns the flags parsed
    (``args_class``'s fields as the command line sets them, not resolved)."""
    if os.environ.get('RAY_SWIFT_ARGS'):
        argv = json.loads(os.environ['RAY_SWIFT_ARGS'])  # what ms-swift parses then
    elif argv is None:
        argv = sys.argv[1:]
    parser = _parser(args_class)
    namespace, remaining = parser.parse_known_args(list(argv))
    if remaining and not getattr(namespace, 'ignore_args_error', False):  # ms-swift only warns then
        refuse(PROG, unknown_flags_message(parser, remaining))
    return namespace


def parse_command_line(pipeline, original_parse, args):
    """ms-swift's ``SwiftPipeline._parse_args`` for a command line (``args`` None or a list of strings), with the
    plugin's refusals (:class:`~swift_gkd_plugin.options.flags.FlagError`) printed as one line, exit code 2."""
    given = check_unknown_flags(pipeline.args_class, args)
    try:
        return original_parse(pipeline, args)
    except FlagError as exc:
        refuse(PROG, exc)
    except ValueError as exc:
        message = undetected_type_message(str(exc), given) or unregistered_type_message(str(exc), given)
        if message is None or getattr(given, 'rlhf_type', None) != 'gkd':
            raise
        refuse(PROG, message)


def undetected_type_message(error: str, given) -> Optional[str]:
    """One line for ms-swift's traceback when a local model folder fits several model types or templates
    (:func:`~swift_gkd_plugin.options.model_types.undetected_type_message`), naming the teacher's flags for the
    ``--teacher_model`` folder."""
    def flags_of(folder):
        is_teacher = bool(given.teacher_model) and os.path.abspath(os.path.expanduser(given.teacher_model)) == \
            os.path.abspath(folder)
        return ('--teacher_model', '--teacher_model_type') if is_teacher else ('--model', '--model_type')
    return model_types.undetected_type_message(error, flags_of)


def unregistered_type_message(error: str, given) -> Optional[str]:
    """One line for ms-swift's ``model_type: '...' not in [every type]`` traceback, which a model type that
    ``--custom_register_path`` / ``--external_plugins`` did not register still ends in (the plugin checks the model
    types before ms-swift only without them: :func:`~swift_gkd_plugin.swift.setup.arguments.check_model_types`)."""
    if not model_types.UNREGISTERED_MODEL_TYPE.search(error):
        return None
    from swift.model.model_meta import MODEL_MAPPING
    return model_types.unknown_model_type_message(given, MODEL_MAPPING)


def torchrun_world_size() -> Optional[int]:
    """The processes torchrun starts for ms-swift's launcher: ``NPROC_PER_NODE`` x ``NNODES`` (torchrun's default 1
    each); None where either is not a number (``gpu``, ``auto``, an elastic ``1:4``)."""
    try:
        return int(os.environ.get('NPROC_PER_NODE') or 1) * int(os.environ.get('NNODES') or 1)
    except ValueError:
        return None


@contextlib.contextmanager
def _rank_zero_environment(world_size: int):
    """The variables torchrun gives rank 0 that the checks read (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``)."""
    rank_env = {'WORLD_SIZE': str(world_size), 'RANK': '0', 'LOCAL_RANK': '0',
                'LOCAL_WORLD_SIZE': os.environ.get('NPROC_PER_NODE') or '1'}
    saved = {name: os.environ.get(name) for name in rank_env}
    os.environ.update(rank_env)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


#: the path flags checked in the launcher, with ms-swift's defaults (its list-valued ones as lists), from the table
_PATH_FLAGS = {name: default for name, (_, default) in ms_swift_flag_table.typed_fields(PROG).items()}


def given_values(argv: List[str]) -> dict:
    """Each ``--flag`` of a command line -> the values given to it (``--flag=value``, or the tokens up to the next
    ``--flag``); the last occurrence wins, as in argparse."""
    given = {}
    for i, token in enumerate(argv):
        if token.startswith('--'):
            name, eq, value = token[2:].partition('=')
            if eq:
                given[name] = [value]
                continue
            end = next((j for j in range(i + 1, len(argv)) if argv[j].startswith('--')), len(argv))
            given[name] = argv[i + 1:end]
    return given


def _check_declared_value(name: str, rule, raw: str) -> None:
    """``raw`` against a declared :class:`~swift_gkd_plugin.options.flags.Range` or string choices; a value that does not
    parse, or choices of another type, are left to the parser in the process."""
    from swift_gkd_plugin.options.flags import Range, check_declared, choices_of
    if isinstance(rule, Range):
        try:
            value = int(raw) if rule.integer else float(raw)
        except ValueError:
            return
        rule.check(name, value)
        return
    choices = choices_of(rule)
    if choices and all(isinstance(choice, str) for choice in choices):
        check_declared(SimpleNamespace(**{name: None if raw == 'None' else raw}), [name])


def check_launcher_early(argv: List[str]) -> None:
    """The checks that need no ms-swift import, in ``swift``'s launcher before it starts the route's process (or
    torchrun's ranks), which import ms-swift's pipeline first: a refusal in ~2 s instead of ~10 (the launcher has
    imported torch, not ms-swift's arguments). Flags that neither ms-swift nor the plugin declares, the declared
    range or choices of each flag given that the process checks unconditionally
    (:data:`~swift_gkd_plugin.options.flags.SCALAR_FLAGS`), and the local paths (:mod:`swift_gkd_plugin.swift.setup.paths`:
    models, adapters, datasets, plugins, the checkpoint, the output folder). Unknown flags first, from the table of ms-swift's flags (:mod:`swift_gkd_plugin.options.ms_swift_flag_table`;
    under another ms-swift version than the table's they are refused in the process, as before: 8-17 s). Every check
    runs in the process again, after the arguments are resolved."""
    from swift_gkd_plugin.options.flags import SCALAR_FLAGS, GKDPluginArgumentsMixin, declared_ranges
    from swift_gkd_plugin.swift.setup.paths import check_early_paths
    unknown = ms_swift_flag_table.unknown_flags(PROG, argv, GKDPluginArgumentsMixin)
    if unknown is not None:
        refuse(PROG, unknown)
    given, declared = given_values(argv), declared_ranges()
    paths = SimpleNamespace(**{name: list(given.get(name, ())) if isinstance(default, list) else
                               (given[name][0] if len(given.get(name, ())) == 1 else default)
                               for name, default in _PATH_FLAGS.items()})
    try:
        for name, values in given.items():
            if name in SCALAR_FLAGS and len(values) == 1:
                _check_declared_value(name, declared[name], values[0])
        _check_ms_swift_values(given)
        check_early_paths(paths)
    except FlagError as exc:
        refuse(PROG, exc)


def _check_ms_swift_values(given: dict) -> None:
    """The checks of ms-swift flags' values that need nothing else (``--max_length``, ``--predict_with_generate``),
    on the values given; one that does not parse is left to the parser in the process."""
    from swift_gkd_plugin.options.flag_checks import check_ms_swift_values
    values = {name: given[name][0] for name in ('max_length', 'predict_with_generate') if len(given.get(name, ())) == 1}
    try:
        max_length = int(values['max_length']) if 'max_length' in values else None
    except ValueError:
        max_length = None
    generate = values.get('predict_with_generate', '').lower() in ('true', '1', 'yes', 'y', 't', 'on')
    check_ms_swift_values(SimpleNamespace(max_length=max_length, predict_with_generate=generate))


def check_launcher_command_line(argv: List[str]) -> None:
    """In ``swift``'s launcher, before torchrun starts any rank: the checks every rank runs first on a ``swift rlhf
    --rlhf_type gkd`` command line (unknown flags, then the phases 'command line' and 'launcher' of
    :data:`~swift_gkd_plugin.swift.setup.arguments.SWIFT_RLHF_PHASES`: the flags and local paths), in the
    environment torchrun gives rank 0. A refusal is one line, exit code 2, before N ranks import torch and ms-swift
    to refuse it; the cost is the import of ms-swift's arguments in the launcher."""
    world_size = torchrun_world_size()
    if world_size is None:
        return  # the ranks check it, knowing their number
    from swift_gkd_plugin.options.flags import resolve_num_generations
    from swift_gkd_plugin.swift.setup.arguments import GKDPluginRLHFArguments, run_phase
    check_launcher_early(argv)
    args = check_unknown_flags(GKDPluginRLHFArguments, argv)
    resolve_num_generations(args)
    with _rank_zero_environment(world_size):
        try:  # the phases 'command line' and 'launcher' of SWIFT_RLHF_PHASES
            run_phase('command line', args)
            run_phase('launcher', args)
        except FlagError as exc:
            refuse(PROG, exc)
