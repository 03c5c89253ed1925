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
    launcher = {(strings, nargs) for strings, nargs in ms_swift_flag_table.table('swift rlhf')
                + ms_swift_flag_table.plugin_options(GKDPluginArgumentsMixin)}
    assert sorted(launcher) == _options(ms_swift_flag_table.live_options(GKDPluginRLHFArguments))


def test_megatron_rlhf_table_is_ms_swifts_parser():
    """The same for ``megatron rlhf`` (``MegatronRLHFArguments``; the plugin's ``GKDPluginMegatronRLHFArguments``),
    read in a process with the tests' stand-in for transformer-engine."""
    script = ('import json\nfrom swift_gkd_plugin.options import ms_swift_flag_table as t\n'
              'from swift.megatron.arguments import MegatronRLHFArguments\n'
              'from swift_gkd_plugin.megatron.setup.arguments import GKDPluginMegatronRLHFArguments\n'
              'print("OPTIONS", json.dumps([t.live_options(MegatronRLHFArguments), '
              't.live_options(GKDPluginMegatronRLHFArguments)]))\n')
    env = dict(os.environ, **OFFLINE_ENV, PYTHONPATH=CPU_SITE)
    proc = subprocess.run([sys.executable, '-c', script], env=env, capture_output=True, text=True, timeout=300)
    line = [row for row in proc.stdout.splitlines() if row.startswith('OPTIONS ')]
    assert proc.returncode == 0 and line, proc.stdout[-2000:] + proc.stderr[-3000:]
    ms_swift, plugin = ([(tuple(strings), nargs) for strings, nargs in rows] for rows in json.loads(line[0][8:]))
    assert _options(ms_swift_flag_table.table('megatron rlhf')) == _options(ms_swift), REGENERATE
    from swift_gkd_plugin.megatron.setup.checks import MegatronGKDFlagsMixin
    launcher = {(strings, nargs) for strings, nargs in ms_swift_flag_table.table('megatron rlhf')
                + ms_swift_flag_table.plugin_options(MegatronGKDFlagsMixin)}
    assert sorted(launcher) == _options(plugin)


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
