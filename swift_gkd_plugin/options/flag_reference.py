"""The flag reference, ``docs_en/flags.md`` and ``docs_zh/flags.md``, generated from the flag declarations of
:mod:`swift_gkd_plugin.options.flags`: each plugin flag's type, default, allowed values (its declared range or
choices), the launchers that take it and its help text; then ms-swift's own flags whose values GKD checks. The zh page
is the same tables under translated headings and introduction (the help text stays English).
``tests/test_flag_reference.py`` regenerates both and compares them with the files. After changing a flag::

    python -m swift_gkd_plugin.options.flag_reference
"""
from __future__ import annotations

import os
import sys
import typing
from dataclasses import MISSING, fields
from typing import Dict, List

from swift_gkd_plugin.options.flags import (FLAG_DECLARATIONS, MS_SWIFT_FLAGS, NO_EFFECT_IN_MEGATRON, SWIFT_RLHF_ONLY,
                                            VLLM_FLAGS, GKDPluginArgumentsMixin, MegatronGKDFlagsMixin, Range,
                                            choices_of)
from swift_gkd_plugin.options.ms_swift_flag_table import type_name

#: the checkout's root when the package runs from one (an editable install); the generator is a developer's tool that
#: writes into a checkout: ``python -m swift_gkd_plugin.options.flag_reference [CHECKOUT]``
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PAGES = {'en': os.path.join('docs_en', 'flags.md'), 'zh': os.path.join('docs_zh', 'flags.md')}
BOTH, SWIFT, MEGATRON = 'swift rlhf, megatron rlhf', 'swift rlhf', 'megatron rlhf'

#: the hand-written text of each page: title, introduction, the headings and columns of its two tables
TEXT = {
    'en': {
        'title': '# Flag reference',
        'intro': (
            'Every flag the plugin adds to `swift rlhf --rlhf_type gkd` and `megatron rlhf --rlhf_type gkd`, '
            'generated from their declarations (`swift_gkd_plugin/options/flags.py`) by `python -m '
            'swift_gkd_plugin.options.flag_reference`; `tests/test_flag_reference.py` keeps this page equal to the '
            'code. *Allowed* is what the plugin checks before any model loads (a value outside is refused in one '
            'line naming the flag). *Launchers*: the commands that act on the flag; the other refuses it away from '
            'its default, naming the flag, except {no_effect}, which `megatron rlhf` takes without '
            'effect. Every plugin flag applies to `--rlhf_type gkd` only (another type refuses '
            'it).'),
        'plugin': '## The plugin\'s flags',
        'plugin_columns': ('flag', 'type', 'default', 'allowed', 'launchers', 'what it does'),
        'ms_swift': '## ms-swift\'s flags that GKD checks',
        'ms_swift_intro': ('ms-swift\'s own flags keep ms-swift\'s meaning (its documentation describes them); under '
                           '`--rlhf_type gkd` the plugin refuses these values before any model loads. The `--vllm_*` '
                           'ones are checked with `--use_vllm true`, against vLLM\'s own bounds.'),
        'ms_swift_columns': ('flag', 'allowed', 'why'),
    },
    'zh': {
        'title': '# 参数参考',
        'intro': (
            '插件为 `swift rlhf --rlhf_type gkd` 与 `megatron rlhf --rlhf_type gkd` 增加的全部参数，由 `python -m '
            'swift_gkd_plugin.options.flag_reference` 从参数声明（`swift_gkd_plugin/options/flags.py`）生成；'
            '`tests/test_flag_reference.py` 保证本页与代码一致。*允许的取值* 是插件在加载任何模型之前检查的取值范围（超出范围的值'
            '以一行报错拒绝，并指出参数名）。*启动器*：会使用该参数的命令；另一个命令在该参数偏离默认值时拒绝它并指出参数名，'
            '只有 {no_effect} 例外：`megatron rlhf` 接受它们但不起作用。插件的参数只适用于 '
            '`--rlhf_type gkd`（其他类型会拒绝它们）。表中的说明文字（help）保留英文原文。'),
        'plugin': '## 插件的参数',
        'plugin_columns': ('参数', '类型', '默认值', '允许的取值', '启动器', '作用'),
        'ms_swift': '## GKD 检查的 ms-swift 参数',
        'ms_swift_intro': ('ms-swift 自己的参数保持 ms-swift 的含义（见其文档）；在 `--rlhf_type gkd` 下，插件在加载任何模型之前'
                           '拒绝下列范围之外的取值。`--vllm_*` 参数在 `--use_vllm true` 时按 vLLM 自身的范围检查。'),
        'ms_swift_columns': ('参数', '允许的取值', '原因'),
    },
}


def _cell(text) -> str:
    """A table cell: pipes escaped, on one line."""
    return ' '.join(str(text).split()).replace('|', '\\|')


def _row(cells) -> str:
    return '| ' + ' | '.join(_cell(c) for c in cells) + ' |'


def _table(columns, rows) -> List[str]:
    return [_row(columns), '| ' + ' | '.join('---' for _ in columns) + ' |'] + [_row(r) for r in rows]


def allowed(rule) -> str:
    """A declaration as the reference writes it: a :class:`Range`'s bounds (with its unit; "or unset" where None is
    allowed), or a choice's values."""
    if isinstance(rule, Range):
        unit = f' {rule.unit}' if rule.unit else ''
        return f'{rule.allowed()}{unit}' + (', or unset' if rule.optional else '')
    values = ', '.join(f'`{v}`' for v in choices_of(rule))
    return values + (', or unset' if type(None) in typing.get_args(rule) else '')


def launchers(name: str) -> str:
    if name not in {f.name for f in fields(GKDPluginArgumentsMixin)}:
        return MEGATRON
    return SWIFT if name in SWIFT_RLHF_ONLY else BOTH


def plugin_rows() -> List[tuple]:
    """One row per field of the plugin's flag classes (``megatron rlhf``'s includes ``swift rlhf``'s)."""
    hints = typing.get_type_hints(MegatronGKDFlagsMixin)
    rows = []
    for f in fields(MegatronGKDFlagsMixin):
        rule = FLAG_DECLARATIONS.get(f.name)
        if rule is None and choices_of(hints[f.name]):
            rule = hints[f.name]
        default = f.default if f.default is not MISSING else f.default_factory()
        shown = 'unset' if default is None else f'`{str(default).lower() if isinstance(default, bool) else default}`'
        rows.append((f'`--{f.name}`', type_name(hints[f.name]), shown,
                     allowed(rule) if rule is not None else '', launchers(f.name), f.metadata['help']))
    return rows


def ms_swift_rows() -> List[tuple]:
    rows = []
    for name, rule in {**MS_SWIFT_FLAGS, **VLLM_FLAGS}.items():
        rows.append((f'`--{name}`', allowed(rule), rule.why if isinstance(rule, Range) else ''))
    return rows


def page(language: str) -> str:
    """The text of the reference in ``language`` ('en' or 'zh')."""
    text = TEXT[language]
    no_effect = (' and ' if language == 'en' else ' 与 ').join(f'`--{name}`' for name in NO_EFFECT_IN_MEGATRON)
    lines = [text['title'], '', text['intro'].format(no_effect=no_effect), '', text['plugin'], '']
    lines += _table(text['plugin_columns'], plugin_rows())
    lines += ['', text['ms_swift'], '', text['ms_swift_intro'], '']
    lines += _table(text['ms_swift_columns'], ms_swift_rows())
    return '\n'.join(lines) + '\n'


def write_pages(root: str = ROOT) -> Dict[str, str]:
    """Write both pages under ``root``; returns their paths."""
    paths = {}
    for language, relative in PAGES.items():
        paths[language] = os.path.join(root, relative)
        with open(paths[language], 'w', encoding='utf-8') as f:
            f.write(page(language))
    return paths


if __name__ == '__main__':
    for path in write_pages(sys.argv[1] if len(sys.argv) > 1 else ROOT).values():
        print(path)
