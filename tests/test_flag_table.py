"""The launchers' table of ms-swift's flags (:mod:`swift_gkd_plugin.options.ms_swift_flag_table`) against ms-swift's own
parsers of ``swift rlhf`` and ``megatron rlhf``: the same flags, each taking as many values, and the same refusal of
an unknown flag; under another ms-swift version the table gives way to the process's parser."""
import json
import os
import subprocess
import sys

import pytest
from conftest import OFFLINE_ENV

from swift_gkd_plugin.options import _ms_swift_flags, ms_swift_flag_table
from swift_gkd_plugin.options.flags import GKDPluginArgumentsMixin

REGENERATE = 'regenerate it: PYTHONPATH=tests/megatron/cpu_site python -m swift_gkd_plugin.options.ms_swift_flag_table'
CPU_SITE = os.path.join(os.path.dirname(__file__), 'megatron', 'cpu_site')


def _options(options):
    return sorted((tuple(strings), nargs) for strings, nargs in options)


def test_the_table_is_the_installed_ms_swifts():
    assert _ms_swift_flags.MS_SWIFT_VERSION == ms_swift_flag_table.installed_ms_swift(), REGENERATE


def test_swift_rlhf_table_is_ms_swifts_parser():
    """ms-swift's ``RLHFArguments`` parser, and the plugin's (``GKDPluginRLHFArguments``, what the process parses
    with) against the table plus the plugin's flags as the launcher builds them."""
    from swift_gkd_plugin.swift.setup.arguments import GKDPluginRLHFArguments
    from swift.arguments import RLHFArguments
    assert _options(ms_swift_flag_table.table('swift rlhf')) == _options(
        ms_swift_flag_table.live_options(RLHFArguments)), REGENERATE
    # the types and defaults of the path flags that swift's launcher reads before ms-swift's arguments are built
    assert ms_swift_flag_table.typed_fields('swift rlhf') == ms_swift_flag_table.class_fields(
        RLHFArguments, ms_swift_flag_table.TYPED_FIELDS['swift rlhf']), REGENERATE
    launcher = {(strings, nargs) for strings, nargs in ms_swift_flag_table.table('swift rlhf')
                + ms_swift_flag_table.plugin_options(GKDPluginArgumentsMixin)}
    assert sorted(launcher) == _options(ms_swift_flag_table.live_options(GKDPluginRLHFArguments))


def write_megatron_options(rank: int, path: str) -> None:
    """In a process with the tests' stand-in for transformer-engine: the live options of ``MegatronRLHFArguments`` and
    of the plugin's ``GKDPluginMegatronRLHFArguments``, and the types and defaults of ``MegatronRLHFArguments``'s
    fields that the table types, as JSON to ``path``."""
    from swift.megatron.arguments import MegatronRLHFArguments

    from swift_gkd_plugin.megatron.setup.arguments import GKDPluginMegatronRLHFArguments
    with open(path, 'w') as f:
        json.dump([ms_swift_flag_table.live_options(MegatronRLHFArguments),
                   ms_swift_flag_table.live_options(GKDPluginMegatronRLHFArguments),
                   ms_swift_flag_table.class_fields(MegatronRLHFArguments,
                                                    ms_swift_flag_table.TYPED_FIELDS['megatron rlhf'])], f)


def test_megatron_rlhf_table_is_ms_swifts_parser(tmp_path):
    """The same for ``megatron rlhf`` (``MegatronRLHFArguments``; the plugin's ``GKDPluginMegatronRLHFArguments``),
    read in a process with the tests' stand-in for transformer-engine: a rank forked from the test worker's Megatron
    zygote (``megatron_runs.spawn_ranks``; it imported them), else a fresh process (~20 s of imports)."""
    import torch
    path = str(tmp_path / 'options.json')
    if torch.cuda.is_available() or os.environ.get('GKD_TESTS_FRESH_PROCESSES') == '1':
        script = (f'import sys\nsys.path.insert(0, {os.path.dirname(__file__)!r})\nimport test_flag_table\n'
                  f'test_flag_table.write_megatron_options(0, {path!r})\n')
        env = dict(os.environ, **OFFLINE_ENV, PYTHONPATH=CPU_SITE)
        proc = subprocess.run([sys.executable, '-c', script], env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    else:
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), 'megatron'))
        from megatron_runs import spawn_ranks
        spawn_ranks(write_megatron_options, (path,), nprocs=1)
    with open(path) as f:
        *rows, typed = json.load(f)
    ms_swift, plugin = ([(tuple(strings), nargs) for strings, nargs in options] for options in rows)
    assert _options(ms_swift_flag_table.table('megatron rlhf')) == _options(ms_swift), REGENERATE
    # the launcher's parser: ms-swift's types and defaults (JSON has lists for tuples)
    assert {name: list(field) for name, field in ms_swift_flag_table.typed_fields('megatron rlhf').items()} == typed, \
        REGENERATE
    from swift_gkd_plugin.megatron.setup.checks import MegatronGKDFlagsMixin
    launcher = {(strings, nargs) for strings, nargs in ms_swift_flag_table.table('megatron rlhf')
                + ms_swift_flag_table.plugin_options(MegatronGKDFlagsMixin)}
    assert sorted(launcher) == _options(plugin)


def test_megatron_launcher_parses_with_the_tables_types_and_defaults():
    """``megatron rlhf``'s launcher reads its command line with the table's fields (ms-swift's types and defaults),
    its own readings (each one the table does not have, or whose default it changes) and the plugin's flags."""
    from swift_gkd_plugin.megatron.setup.checks import (LAUNCHER_FIELDS, MegatronGKDFlagsMixin,
                                                        parse_megatron_command_line)
    table = ms_swift_flag_table.typed_fields('megatron rlhf')
    assert set(table) == set(ms_swift_flag_table.TYPED_FIELDS['megatron rlhf'])
    for name, (kind, default) in LAUNCHER_FIELDS.items():
        assert name not in table or table[name] != (kind, default), name
    typed = {**table, **LAUNCHER_FIELDS, **ms_swift_flag_table.class_fields(MegatronGKDFlagsMixin)}
    assert vars(parse_megatron_command_line([])) == {name: default for name, (_, default) in typed.items()}
    assert table['lmbda'] == ('float', 0.5) and table['use_vllm'] == ('bool', True)  # ms-swift 4.6's Megatron ones
    ns = parse_megatron_command_line(['--seq_kd', '--use_vllm', 'false', '--reward_weights', '1', '2', '--lmbda',
                                      '0.25', '--dataset', 'a.jsonl', 'b.jsonl', '--gkd_topk_tail', '--bogus', '3'])
    # a bare boolean is true, as in ms-swift's parser; unknown flags are left over
    assert (ns.seq_kd, ns.use_vllm, ns.gkd_topk_tail) == (True, False, True)
    assert (ns.reward_weights, ns.lmbda, ns.dataset) == ([1.0, 2.0], 0.25, ['a.jsonl', 'b.jsonl'])


COMMAND_LINES = {
    'unknown': ['--gkd_lmbda', '0.5'],
    'unknown_equals': ['--gkd_lmbda=0.5', '--beta', '0.5'],
    'unknown_among_lists': ['--dataset', 'a.jsonl', 'b.jsonl', '--bogus_flag', '1', '2', '--beta', '0.5'],
    'two_unknown': ['--lmbdaa', '0.5', '--max_step', '3', '--tempreature', '1'],
    'abbreviation': ['--lmbd', '0.5'],  # argparse takes a unique prefix: ms-swift accepts it
    'dashed_alias': ['--per-device-train-batch-size', '2', '--no_check_model'],
    'bool_without_value': ['--seq_kd', '--gkd_topk_tail', '--lmbda', '1'],
    'plugin_flags': ['--gkd_loss_impl', 'dense', '--gkd_logits_topk', '8', '--gkd_skd_top_k', '2'],
    'ignored_errors': ['--ignore_args_error', 'true', '--gkd_lmbda', '0.5'],
    'stray_value': ['--beta', '0.5', 'stray'],
    'none': ['--beta', '0.5', '--model', 'x'],
}


@pytest.mark.parametrize('case', list(COMMAND_LINES))
def test_the_launchers_refusal_is_the_processes(case):
    """The launcher's answer from the table (None: let the process decide) against the process's: the same
    ``unrecognized arguments`` line (with its hints) wherever the launcher answers, and no refusal where ms-swift's
    parser takes the command line."""
    from swift_gkd_plugin.swift.setup.arguments import GKDPluginRLHFArguments
    from swift_gkd_plugin.swift.setup.command_line import _parser, unknown_flags_message
    argv = ['--rlhf_type', 'gkd'] + COMMAND_LINES[case]
    parser = _parser(GKDPluginRLHFArguments)
    namespace, remaining = parser.parse_known_args(argv)
    process = unknown_flags_message(parser, remaining) if remaining and not namespace.ignore_args_error else None
    launcher = ms_swift_flag_table.unknown_flags('swift rlhf', argv, GKDPluginArgumentsMixin)
    assert launcher in (None, process)
    assert (launcher is None) == (case in ('abbreviation', 'dashed_alias', 'bool_without_value', 'plugin_flags',
                                           'ignored_errors', 'stray_value', 'none'))
    assert (process is None) == (case in ('abbreviation', 'dashed_alias', 'bool_without_value', 'plugin_flags',
                                          'ignored_errors', 'none'))


def test_another_ms_swift_version_leaves_unknown_flags_to_the_process(monkeypatch):
    """A table of another ms-swift version could refuse a flag that version added: the launcher does not answer, and
    the process's parser refuses (8-17 s later, as before the table)."""
    argv = ['--rlhf_type', 'gkd', '--gkd_lmbda', '0.5']
    assert ms_swift_flag_table.unknown_flags('swift rlhf', argv, GKDPluginArgumentsMixin) is not None
    monkeypatch.setattr(_ms_swift_flags, 'MS_SWIFT_VERSION', '0.0.1')
    assert ms_swift_flag_table.unknown_flags('swift rlhf', argv, GKDPluginArgumentsMixin) is None
