"""The package's layering, read from the source (every import statement, those inside functions included):
core/ imports no ms-swift and no adapter; megatron/ and swift/ import core/, never each other; ms-swift's classes are
patched in activation.py only."""
import ast
import os

import pytest

import swift_gkd_plugin

PACKAGE = os.path.dirname(swift_gkd_plugin.__file__)


def _modules(subpackage):
    root = os.path.join(PACKAGE, subpackage)
    return sorted(os.path.join(root, name) for name in os.listdir(root) if name.endswith('.py'))


def imported_modules(path):
    """Every module an ``import`` / ``from ... import`` in the file names, relative imports resolved."""
    package = os.path.relpath(os.path.dirname(path), os.path.dirname(PACKAGE)).replace(os.sep, '.')
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ''
            if node.level:
                parts = package.split('.')
                base = '.'.join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            names += [base] + [f'{base}.{alias.name}' for alias in node.names]
    return names


def _offending(subpackage, forbidden):
    found = {}
    for path in _modules(subpackage):
        bad = sorted({name for name in imported_modules(path)
                      if any(name == f or name.startswith(f + '.') for f in forbidden)})
        if bad:
            found[os.path.relpath(path, PACKAGE)] = bad
    return found


@pytest.mark.parametrize('subpackage,forbidden', [
    ('core', ['swift', 'megatron', 'swift_gkd_plugin.swift', 'swift_gkd_plugin.megatron', 'swift_gkd_plugin.server']),
    ('megatron', ['swift_gkd_plugin.swift']),
    ('swift', ['swift_gkd_plugin.megatron']),
])
def test_layers_import_only_downwards(subpackage, forbidden):
    assert _offending(subpackage, forbidden) == {}


def test_the_import_reader_sees_imports_inside_functions_and_relative_ones(tmp_path):
    """The check above is not vacuous: an import inside a function, and a relative one, are read."""
    path = os.path.join(PACKAGE, 'megatron', 'trainer.py')
    names = imported_modules(path)
    assert 'swift_gkd_plugin.core.views' in names and 'swift.rlhf_trainers.gkd_loss' in names
    names = imported_modules(os.path.join(PACKAGE, 'core', 'fused_loss.py'))
    assert 'swift_gkd_plugin.core.constants' in names  # ``from .constants import ...``
    names = imported_modules(os.path.join(PACKAGE, 'swift', 'arguments.py'))
    assert 'swift.template' in names  # imported inside check_teacher_template


def test_ms_swift_row_columns_are_patched_in_activation_only():
    """``RowPreprocessor.standard_keys`` (ms-swift's dataset columns) is mutated in activation.py and nowhere else."""
    users = []
    for sub in ('', 'core', 'swift', 'megatron', 'server'):
        for path in _modules(sub) if sub else sorted(os.path.join(PACKAGE, n) for n in os.listdir(PACKAGE)
                                                     if n.endswith('.py')):
            with open(path) as f:
                if 'standard_keys' in f.read():
                    users.append(os.path.relpath(path, PACKAGE))
    assert users == ['activation.py']


def test_the_literal_ignore_index_is_defined_once():
    """-100 (the ignore label) is ``core.constants.IGNORE_INDEX``: no other module of the package spells it out."""
    spelled = set()
    for sub in ('core', 'swift', 'megatron', 'server'):
        for path in _modules(sub):
            with open(path) as f:
                tree = ast.parse(f.read())
            if any(isinstance(n, ast.UnaryOp) and isinstance(n.op, ast.USub) and isinstance(n.operand, ast.Constant)
                   and n.operand.value == 100 for n in ast.walk(tree)):
                spelled.add(os.path.relpath(path, PACKAGE))
    assert spelled == {'core/constants.py'}
