"""The flags that ms-swift's parsers of ``swift rlhf`` and ``megatron rlhf`` accept, read without importing ms-swift's
arguments: the launchers refuse an unknown flag in ~2 s instead of after the route's process imported ms-swift's
pipeline (~8-17 s).

:mod:`swift_gkd_plugin.options._ms_swift_flags` holds each option string of ms-swift's own argument dataclasses
(``RLHFArguments``, ``MegatronRLHFArguments``) with the number of values it takes, generated from the installed
ms-swift and keyed by its version; the plugin's flags are added from its own dataclasses (:func:`plugin_options`, as
transformers' ``HfArgumentParser`` declares them). :func:`unknown_flags` parses a command line with that table as
argparse would (abbreviations, ``--flag=value``, the values after an unknown flag) and answers None wherever it cannot
be sure: another ms-swift version (the process refuses then, as before), ``RAY_SWIFT_ARGS``,
``--ignore_args_error``, a command line argparse itself refuses. For the fields a launcher's checks read
(:data:`TYPED_FIELDS`) the table also holds their type and default, per command: ``megatron rlhf``'s launcher parses
its command line with them (:func:`typed_parser`), ms-swift's defaults included, rather than with a copy of them.
``tests/test_flag_table.py`` compares the table with ms-swift's own parsers and classes. Regenerate it after an ms-swift upgrade (Megatron's arguments import transformer-engine: on a
machine without it, through the tests' stand-in)::

    PYTHONPATH=tests/megatron/cpu_site python -m swift_gkd_plugin.options.ms_swift_flag_table
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import os
import typing
from typing import Dict, List, Optional, Sequence, Tuple

COMMANDS = ('swift rlhf', 'megatron rlhf')
#: the fields of ms-swift's argument classes whose type and default the table records, by command: those that the
#: launchers' checks read before ms-swift's arguments are built (:func:`swift_gkd_plugin.megatron.setup.checks.
#: parse_megatron_command_line`, the path flags of ``swift``'s early launcher checks). A check that reads another field
#: adds it here and regenerates the table.
TYPED_FIELDS = {
    'swift rlhf': ('model', 'teacher_model', 'resume_from_checkpoint', 'output_dir', 'adapters', 'dataset',
                   'val_dataset', 'external_plugins', 'custom_register_path'),
    'megatron rlhf': (
        'rlhf_type', 'model', 'model_type', 'teacher_model_type', 'custom_register_path', 'external_plugins',
        'template', 'beta', 'lmbda', 'temperature', 'sft_alpha', 'max_completion_length', 'max_length',
        'vllm_max_model_len', 'seq_kd', 'gkd_logits_topk', 'top_k', 'top_p', 'teacher_model', 'teacher_model_server',
        'offload_teacher_model', 'tuner_type', 'adapters', 'mcore_adapter', 'tensor_model_parallel_size',
        'context_parallel_size', 'pipeline_model_parallel_size', 'expert_model_parallel_size',
        'virtual_pipeline_model_parallel_size', 'expert_tensor_parallel_size', 'decoder_first_pipeline_num_layers',
        'decoder_last_pipeline_num_layers', 'account_for_embedding_in_pipeline_split',
        'account_for_loss_in_pipeline_split', 'pipeline_model_parallel_layout', 'sequence_parallel', 'dataset',
        'cached_dataset', 'columns', 'use_hf', 'use_ray', 'use_vllm', 'moe_grouped_gemm', 'bridge_backend',
        'vllm_mode', 'async_generate', 'reward_funcs', 'reward_weights', 'num_generations',
        'rollout_importance_sampling_mode', 'log_rollout_offpolicy_metrics', 'multi_turn_scheduler', 'max_turns'),
}
#: a field as the table types it: ``(type, default)``, the type one of 'bool', 'int', 'float', 'str' or 'list[T]'
Typed = Dict[str, Tuple[str, object]]
#: what a flag takes, as stored: argparse's ``nargs`` (None: one value), or 0 for a flag that takes none
#: (``--no_<flag>``, ``--help``)
Options = List[Tuple[Tuple[str, ...], object]]


def installed_ms_swift() -> Optional[str]:
    """The installed ms-swift's version (its distribution's metadata: no import of ``swift``)."""
    from importlib import metadata
    try:
        return metadata.version('ms-swift')
    except metadata.PackageNotFoundError:
        return None


def table(command: str) -> Optional[Options]:
    """ms-swift's options of ``command`` from the generated table, or None where the installed ms-swift is not the
    table's version."""
    from swift_gkd_plugin.options import _ms_swift_flags
    if installed_ms_swift() != _ms_swift_flags.MS_SWIFT_VERSION:
        return None
    return [(option_strings(name), nargs) for nargs, names in _ms_swift_flags.OPTIONS[command].items()
            for name in names]


def option_strings(name: str) -> Tuple[str, ...]:
    """The option strings ``HfArgumentParser`` gives field ``name``: ``--name`` and ``--name-with-dashes`` (the table
    stores the name alone; argparse's ``--help`` is ``-h`` too)."""
    if name == 'help':
        return '-h', '--help'
    return (f'--{name}',) + ((f'--{name.replace("_", "-")}',) if '_' in name else ())


def _field_type(hint):
    """``Optional[X]`` -> ``X`` (transformers' ``HfArgumentParser``: a union with None declares its other type)."""
    if typing.get_origin(hint) is typing.Union:
        others = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(others) == 1:
            return others[0]
        if str in others:
            return str
    return hint


def plugin_options(mixin) -> Options:
    """The options that ``HfArgumentParser`` declares for the fields of the plugin's flags class ``mixin``:
    ``--name`` and ``--name-with-dashes``; a bool takes 0 or 1 value, and one defaulting to True also has
    ``--no_name``; a list takes 1 or more."""
    hints = typing.get_type_hints(mixin)
    options = []
    for f in dataclasses.fields(mixin):
        strings = option_strings(f.name)
        kind = _field_type(hints[f.name])
        origin = typing.get_origin(kind) or kind
        if kind is bool:
            options.append((strings, '?'))
            if f.default is True:
                options.append((option_strings(f'no_{f.name}'), 0))
        elif isinstance(origin, type) and issubclass(origin, list):
            options.append((strings, '+'))
        else:
            options.append((strings, None))
    return options


def type_name(hint) -> str:
    """A field's annotation as the table types it (as ``HfArgumentParser`` reads it): ``Optional[X]`` as ``X``, a
    ``Literal`` as the type of its values, ``List[X]`` as ``'list[X]'``; any other type as 'str'."""
    kind = _field_type(hint)
    origin = typing.get_origin(kind)
    if origin is typing.Literal:
        kinds = {type(value) for value in typing.get_args(kind)}
        return type_name(kinds.pop()) if len(kinds) == 1 else 'str'
    if isinstance(origin, type) and issubclass(origin, list):
        items = typing.get_args(kind)
        return f'list[{type_name(items[0]) if items else "str"}]'
    return kind.__name__ if kind in (bool, int, float) else 'str'


def _default(f: dataclasses.Field):
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def class_fields(args_class, names: Optional[Sequence[str]] = None) -> Typed:
    """The fields of a dataclass (``names`` of them, in that order; all by default) typed as the table types them."""
    hints = typing.get_type_hints(args_class)
    by_name = {f.name: f for f in dataclasses.fields(args_class)}
    return {name: (type_name(hints[name]), _default(by_name[name])) for name in (names or by_name)}


def typed_fields(command: str) -> Typed:
    """The table's types and defaults of ``command``'s :data:`TYPED_FIELDS` (those of the table's ms-swift version,
    whatever version is installed: under another one the ranks' parser has the last word)."""
    import copy

    from swift_gkd_plugin.options import _ms_swift_flags
    return copy.deepcopy(_ms_swift_flags.FIELDS[command])  # (a caller's list default is its own)


def parse_bool(value: str) -> bool:
    """A boolean flag's value, as ``HfArgumentParser`` reads it (``true``/``false``, ``yes``/``no``, ``1``/``0``)."""
    low = str(value).strip().lower()
    if low in ('true', '1', 'yes', 'y', 't'):
        return True
    if low in ('false', '0', 'no', 'n', 'f'):
        return False
    raise argparse.ArgumentTypeError(f'expected true or false, got {value!r}')


_CONVERT = {'bool': parse_bool, 'int': int, 'float': float, 'str': None}


def typed_parser(typed: Typed) -> argparse.ArgumentParser:
    """A parser of the ``typed`` fields only (other flags are left over; no abbreviations): a bool takes 0 or 1 value
    (a bare ``--flag`` is true), a list 0 or more, as their type converts them; no choices (the checks word those)."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for name, (kind, default) in typed.items():
        if kind.startswith('list['):
            parser.add_argument(f'--{name}', nargs='*', type=_CONVERT[kind[5:-1]], default=default)
        elif kind == 'bool':
            parser.add_argument(f'--{name}', nargs='?', const=True, type=parse_bool, default=default)
        else:
            parser.add_argument(f'--{name}', type=_CONVERT[kind], default=default)
    return parser


class _Refused(Exception):
    pass


def parser_of(options: Options, prog: str) -> argparse.ArgumentParser:
    """An argparse parser with ``options`` (no types, no choices: it reads which token is which, not the values)."""
    parser = argparse.ArgumentParser(prog=prog, add_help=False)
    seen = set()
    for strings, nargs in options:
        strings = tuple(s for s in strings if s not in seen)  # the plugin's field replacing ms-swift's
        if not strings:
            continue
        seen.update(strings)
        if nargs == 0:
            parser.add_argument(*strings, action='store_const', const=True)
        else:
            parser.add_argument(*strings, nargs=nargs)

    def error(message):
        raise _Refused(message)

    parser.error = error
    return parser


def unknown_flags_message(parser: argparse.ArgumentParser, remaining: List[str], prog: str) -> str:
    """``remaining`` (what the parser did not recognise) with the closest known flag of each unknown one."""
    known = [s for action in parser._actions for s in action.option_strings
             if s.startswith('--') and '-' not in s[2:]]  # not transformers' --dashed-aliases
    hints = []
    for token in remaining:
        if not token.startswith('--'):
            continue
        name = token.split('=', 1)[0]
        close = difflib.get_close_matches(name, known, n=1)
        if close:
            hints.append(f'{name}: did you mean {close[0]}?')
    hint = f' ({"; ".join(hints)})' if hints else f' (`{prog} --help` lists the flags)'
    return f'unrecognized arguments: {" ".join(remaining)}{hint}'


_FALSE = {'false', 'no', 'n', '0', 'f'}


def unknown_flags(command: str, argv: Sequence[str], mixin) -> Optional[str]:
    """The refusal of ``argv``'s unknown flags as ms-swift's parser of ``command`` plus the plugin's flags class
    ``mixin`` would give it (:func:`unknown_flags_message`), or None: none unknown, or the table cannot tell (another
    ms-swift version, ``RAY_SWIFT_ARGS``, ``--ignore_args_error`` given, a command line argparse itself refuses, a
    token that is no flag): the process decides then."""
    options = table(command)
    if options is None or os.environ.get('RAY_SWIFT_ARGS'):
        return None
    parser = parser_of(options + plugin_options(mixin), command)
    try:
        namespace, remaining = parser.parse_known_args([str(token) for token in argv])
    except _Refused:
        return None
    ignore = getattr(namespace, 'ignore_args_error', None)
    if ignore is not None and str(ignore).lower() not in _FALSE:
        return None  # ms-swift only warns then
    if not remaining or not remaining[0].startswith('--'):
        return None  # a stray value: the process's parser words it
    return unknown_flags_message(parser, remaining, command)


# --- generating the table (needs ms-swift's arguments: not in the launcher) ---

def live_options(args_class) -> Options:
    """The options of ms-swift's parser of ``args_class`` (built as ``swift.utils.parse_args`` builds it)."""
    import contextlib

    from swift.utils import utils as swift_utils
    from transformers import HfArgumentParser
    with getattr(swift_utils, '_patch_get_type_hints', contextlib.nullcontext)():
        parser = HfArgumentParser([args_class])
    return [(tuple(action.option_strings), 0 if action.nargs == 0 else action.nargs) for action in parser._actions]


def ms_swift_classes() -> Dict[str, type]:
    """ms-swift's own argument classes of each command (before the plugin's subclasses)."""
    from swift.arguments import RLHFArguments
    from swift.megatron.arguments import MegatronRLHFArguments
    return {'swift rlhf': RLHFArguments, 'megatron rlhf': MegatronRLHFArguments}


def pipeline_classes() -> Dict[str, type]:
    """The argument classes each command's pipeline parses with (the plugin's, once it is active)."""
    from swift.megatron.pipelines.train.rlhf import MegatronRLHF
    from swift.pipelines.train.rlhf import SwiftRLHF
    return {'swift rlhf': SwiftRLHF.args_class, 'megatron rlhf': MegatronRLHF.args_class}


_HEADER = ('"""GENERATED by ``python -m swift_gkd_plugin.options.ms_swift_flag_table`` from the installed ms-swift\n'
           '(:mod:`swift_gkd_plugin.options.ms_swift_flag_table`). OPTIONS[command][nargs]: the names of the fields of its\n'
           'argument dataclasses that take nargs values (argparse\'s nargs; 0: a flag without a value). FIELDS[command]:\n'
           'the type and default of each field of TYPED_FIELDS[command]."""\n')


def write_table(path: Optional[str] = None) -> str:
    """Write :mod:`swift_gkd_plugin.options._ms_swift_flags` from the installed ms-swift; returns its path."""
    import pprint
    path = path or os.path.join(os.path.dirname(os.path.abspath(__file__)), '_ms_swift_flags.py')
    options = {}
    for command, cls in ms_swift_classes().items():
        live = live_options(cls)
        names = {}  # nargs -> the fields' names
        for strings, nargs in live:
            names.setdefault(nargs, []).append('help' if strings == ('-h', '--help') else strings[0][2:])
        options[command] = names
        derived = [(option_strings(name), nargs) for nargs, group in names.items() for name in group]
        if sorted(derived, key=str) != sorted(live, key=str):  # a field with aliases of its own
            raise ValueError(f'{command}: options other than HfArgumentParser\'s --name/--name-with-dashes: '
                             f'{sorted(set(live) - set(derived))}')
    typed = {command: class_fields(cls, TYPED_FIELDS[command]) for command, cls in ms_swift_classes().items()
             if command in TYPED_FIELDS}
    for command, values in typed.items():
        for name, (_, default) in values.items():
            if ast.literal_eval(repr(default)) != default:
                raise ValueError(f'{command}: the default of {name} is not a literal: {default!r}')
    with open(path, 'w') as f:
        f.write(_HEADER)
        f.write(f'MS_SWIFT_VERSION = {installed_ms_swift()!r}\n')
        f.write(f'OPTIONS = {pprint.pformat(options, width=110, compact=True, sort_dicts=False)}\n')
        f.write(f'FIELDS = {pprint.pformat(typed, width=110, compact=True, sort_dicts=False)}\n')
    return path


if __name__ == '__main__':
    print(write_table())
