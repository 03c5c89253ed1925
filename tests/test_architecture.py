"""The package's layering, read from the source (every import statement, those inside functions included):
core/ imports no ms-swift and no adapter; megatron/ and swift/ import core/, never each other; no two modules import
each other, directly or round a circle (entry/activation.py, which patches ms-swift, is imported only by the start-up
hooks); ms-swift's dataset columns are patched in one module."""
import ast
import re
import os

import pytest

import swift_gkd_plugin

PACKAGE = os.path.dirname(swift_gkd_plugin.__file__)


def _modules(subpackage):
    """The modules of ``subpackage``, its subfolders' included."""
    root = os.path.join(PACKAGE, subpackage)
    return sorted(os.path.join(folder, name) for folder, _, names in os.walk(root) for name in names
                  if name.endswith('.py'))


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


def package_modules():
    """Every module of the package by dotted name (``swift_gkd_plugin.swift.trainer``) -> its file."""
    found = {}
    for root, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith('.py'):
                path = os.path.join(root, name)
                dotted = os.path.relpath(path, os.path.dirname(PACKAGE))[:-3].replace(os.sep, '.')
                found[dotted[:-len('.__init__')] if dotted.endswith('.__init__') else dotted] = path
    return found


def import_graph():
    """Module -> the package's modules it imports (``from pkg import module`` names the module itself)."""
    modules = package_modules()
    graph = {}
    for name, path in modules.items():
        targets = set()
        for imported in imported_modules(path):
            while imported and imported not in modules:  # ``pkg.module.Name`` -> ``pkg.module``
                imported = imported.rpartition('.')[0]
            if imported and imported != name:
                targets.add(imported)
        graph[name] = targets
    return graph


def circles(graph):
    """The strongly connected components of more than one module (Tarjan's algorithm), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while not component or component[-1] != node:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_import_graph_has_no_circle():
    """No module imports, directly or through others, a module that imports it: each layer uses only those below."""
    assert circles(import_graph()) == []


def script_graph(folder):
    """A folder of scripts (benchmarks/, tests/): file stem -> the sibling stems it imports, by an import statement
    or by ``__import__`` / ``importlib.import_module`` of a literal name."""
    stems = {name[:-3] for name in os.listdir(folder) if name.endswith('.py')}
    graph = {}
    for stem in stems:
        path = os.path.join(folder, stem + '.py')
        named = {name.split('.')[0] for name in imported_modules(path)}
        with open(path) as f:
            for node in ast.walk(ast.parse(f.read(), path)):
                if (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
                        and getattr(node.func, 'id', getattr(node.func, 'attr', None)) in ('__import__',
                                                                                           'import_module')):
                    named.add(str(node.args[0].value).split('.')[0])
        graph[stem] = (named & stems) - {stem}
    return graph


@pytest.mark.parametrize('folder', ['benchmarks', 'tests', 'tests/megatron', 'tests/server', 'tests/gpu',
                                    'tests/gpu/experiments/triton2', 'tests/harness'])
def test_no_script_folder_has_an_import_circle(folder):
    """The benchmarks and the test harness too: no two scripts import each other, directly or round a circle."""
    assert circles(script_graph(os.path.join(REPO, folder))) == []


def test_the_script_reader_sees_a_dynamic_import(tmp_path):
    (tmp_path / 'a.py').write_text("import b\n")
    (tmp_path / 'b.py').write_text("main = __import__('a').main\n")
    assert circles(script_graph(str(tmp_path))) == [['a', 'b']]


def test_activation_is_the_top():
    """activation.py imports the adapters; only the start-up hook and the ``--external_plugins`` file import it."""
    graph = import_graph()
    importers = sorted(name for name, targets in graph.items() if 'swift_gkd_plugin.entry.activation' in targets)
    assert importers == ['swift_gkd_plugin.entry.bootstrap', 'swift_gkd_plugin.plugin.activate_swift_gkd']
    assert {'swift_gkd_plugin.swift.setup.arguments', 'swift_gkd_plugin.megatron.setup.arguments'} <= graph[
        'swift_gkd_plugin.entry.activation']


def test_the_circle_finder_sees_a_circle():
    """The check above is not vacuous: a circle of three modules beside an acyclic part is found."""
    graph = {'a': {'b'}, 'b': {'c'}, 'c': {'a', 'd'}, 'd': set(), 'e': {'d'}}
    assert circles(graph) == [['a', 'b', 'c']]
    assert circles({'a': {'b'}, 'b': set()}) == []


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


def test_the_import_reader_sees_imports_inside_functions_and_relative_ones(tmp_path, monkeypatch):
    """The check above is not vacuous: an import inside a function, and a relative one, are read."""
    path = os.path.join(PACKAGE, 'megatron', 'trainer.py')
    names = imported_modules(path)
    assert 'swift_gkd_plugin.core.views' in names and 'swift.rlhf_trainers.gkd_loss' in names
    fake = tmp_path / 'swift_gkd_plugin' / 'core' / 'fused'
    fake.mkdir(parents=True)
    (fake / 'loss.py').write_text('from .plan import X\nfrom ..constants import Y\n')
    monkeypatch.setattr(__import__(__name__), 'PACKAGE', str(tmp_path / 'swift_gkd_plugin'))
    names = imported_modules(str(fake / 'loss.py'))
    assert {'swift_gkd_plugin.core.fused.plan', 'swift_gkd_plugin.core.constants'} <= set(names)
    monkeypatch.undo()
    names = imported_modules(os.path.join(PACKAGE, 'swift', 'setup', 'arguments.py'))
    assert 'swift.template' in names  # imported inside check_teacher_template


# The house: each folder of the package is a room; a module at the package's top is a room of its own. A folder of
# swift/ or megatron/ is a stage a batch passes; the stages import one way only (the trainer, at the top, composes
# them), and no room imports one above it.
STAGES = {  # stage -> the stages it may import (its own modules aside)
    'swift.setup': set(),
    'swift.run': {'swift.setup'},
    'swift.step': {'swift.run', 'swift.setup'},
    'swift.teacher': {'swift.step', 'swift.run', 'swift.setup'},
    'swift.rollout': {'swift.step', 'swift.run', 'swift.setup'},
    'megatron.setup': set(),
    'megatron.step': set(),
    'megatron.rollout': set(),
}
BELOW_THE_ADAPTERS = ['core', 'server', 'demo', 'runtime', 'options', 'data', 'rollout']
# the rooms at the package's top below the adapters, bottom first: a room imports only rooms before it in this list
TOP_ROOMS_BOTTOM_UP = ['runtime', 'options', 'data', 'rollout']


def room(module: str) -> str:
    """``swift_gkd_plugin.swift.step.loss`` -> ``swift.step``; a module at the package's top is its own room."""
    parts = module.split('.')[1:]
    if os.path.isdir(os.path.join(PACKAGE, *parts)):  # a package: its face (__init__) stands for the folder
        return '.'.join(parts)
    return '.'.join(parts[:-1]) if len(parts) > 1 else parts[0]


def room_arrows():
    """room -> the other rooms its modules import (a package's face re-exporting its own modules aside)."""
    arrows = {}
    for name, targets in import_graph().items():
        for target in targets:
            a, b = room(name), room(target)
            if a != b and not b.startswith(a + '.'):
                arrows.setdefault(a, set()).add(b)
    return arrows


def test_the_stages_import_one_way():
    """A stage of swift/ (megatron/) imports only the stages below it: setup, run, step, then teacher and rollout."""
    arrows = room_arrows()
    found = {stage: {b for b in arrows.get(stage, ()) if b.split('.')[0] == stage.split('.')[0] and b in STAGES}
             for stage in STAGES}
    assert {stage: sorted(found[stage] - STAGES[stage]) for stage in STAGES} == {stage: [] for stage in STAGES}
    every = {r for targets in arrows.values() for r in targets} | set(arrows)
    assert circles({r: arrows.get(r, set()) for r in every}) == []


def test_no_room_below_the_adapters_imports_one_above():
    """core/, server/, demo/ and the small modules at the bottom never import swift/, megatron/ or the top."""
    above = ('swift', 'megatron', 'entry', 'plugin')
    bad = {a: sorted(b for b in targets if b.split('.')[0] in above)
           for a, targets in room_arrows().items() if a.split('.')[0] in BELOW_THE_ADAPTERS}
    assert {a: b for a, b in bad.items() if b} == {}


def test_the_room_checks_see_a_wrong_arrow():
    """The checks above are not vacuous: the rooms of modules, and an arrow up, are read as such."""
    assert room('swift_gkd_plugin.swift.step.loss') == 'swift.step'
    assert room('swift_gkd_plugin.swift.step') == 'swift.step'
    assert room('swift_gkd_plugin.options.flags') == 'options'
    assert room('swift_gkd_plugin.core.fused.kernels.full_rows') == 'core.fused.kernels'
    assert 'swift.setup' in room_arrows()['swift.rollout']  # rollout -> setup (eager_sampling) is down, allowed
    assert circles({'swift.setup': {'swift.teacher'}, 'swift.teacher': {'swift.setup'}}) == [
        ['swift.setup', 'swift.teacher']]


def test_every_folder_says_what_enters_and_what_leaves():
    """Each stage folder's first docstring says what it takes in and what it gives out (``In: ... Out: ...``)."""
    missing = []
    for stage in list(STAGES) + ['core.fused', 'core.cross_tokenizer', 'core.weights']:
        with open(os.path.join(PACKAGE, *stage.split('.'), '__init__.py')) as f:
            doc = ast.get_docstring(ast.parse(f.read())) or ''
        if 'In: ' not in doc or 'Out: ' not in doc:
            missing.append(stage)
    assert missing == []


def test_ms_swift_row_columns_are_patched_in_one_module():
    """``RowPreprocessor.standard_keys`` (ms-swift's dataset columns) is mutated in ms_swift_state.py (which both
    argument adapters call) and nowhere else."""
    users = []
    for path in package_modules().values():
        with open(path) as f:
            if 'standard_keys' in f.read():
                users.append(os.path.relpath(path, PACKAGE).replace(os.sep, '/'))
    assert users == ['runtime/ms_swift_state.py']


def test_the_top_level_is_rooms():
    """The package's top holds no module but its ``__init__``: every module lives in a room, and each room's
    ``__init__`` docstring says what belongs there."""
    loose = sorted(n for n in os.listdir(PACKAGE) if n.endswith('.py') and n != '__init__.py')
    assert loose == []
    rooms = sorted(n for n in os.listdir(PACKAGE) if os.path.isfile(os.path.join(PACKAGE, n, '__init__.py')))
    undocumented = []
    for name in rooms:
        with open(os.path.join(PACKAGE, name, '__init__.py')) as f:
            if len(ast.get_docstring(ast.parse(f.read())) or '') < 80:
                undocumented.append(name)
    assert undocumented == []
    assert set(TOP_ROOMS_BOTTOM_UP + ['entry']) <= set(rooms)


def test_the_top_rooms_import_downwards():
    """runtime/ <- options/ <- data/, rollout/: a top room imports only rooms below it (and core/); entry/ is above
    the adapters (checked by test_no_room_below_the_adapters_imports_one_above)."""
    arrows = room_arrows()
    wrong = {}
    for i, name in enumerate(TOP_ROOMS_BOTTOM_UP):
        allowed = set(TOP_ROOMS_BOTTOM_UP[:i])
        bad = sorted(b for b in arrows.get(name, ()) if b.split('.')[0] not in allowed | {'core'})
        if bad:
            wrong[name] = bad
    assert wrong == {}


#: the checkout's module that defines the old names (CI imports the installed copy, so not swift_gkd_plugin.__file__)
ALIASES_MODULE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'swift_gkd_plugin',
                              '__init__.py')


def test_no_code_imports_a_moved_module_by_its_old_name():
    """The old top-level names (``swift_gkd_plugin.flags``) are aliases for users for one release; the package, its
    tests, benchmarks and examples name the rooms."""
    old = '|'.join(re.escape(name) for name in swift_gkd_plugin.MOVED_MODULES)
    pattern = re.compile(rf'\bswift_gkd_plugin\.({old})\b|from swift_gkd_plugin import [^\n]*\b({old})\b')
    offenders = []
    for top in ('swift_gkd_plugin', 'tests', 'benchmarks', 'examples'):
        for folder, _, names in os.walk(os.path.join(REPO, top)):
            for name in names:
                path = os.path.join(folder, name)
                if name.endswith(('.py', '.sh')) and path not in (ALIASES_MODULE, __file__.replace('.pyc', '.py')):
                    with open(path, encoding='utf-8') as f:
                        offenders += [f'{os.path.relpath(path, REPO)}:{i}' for i, line in enumerate(f, 1)
                                      if pattern.search(line) and 'test_module_aliases' not in path]
    assert offenders == []


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


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize('page', ['docs_en/architecture.md', 'docs_zh/architecture.md'])
def test_the_architecture_page_matches_the_tree(page):
    """The page names every folder of the package, and every ``name.py`` it names exists in the checkout."""
    with open(os.path.join(REPO, page)) as f:
        text = f.read()
    source = os.path.join(REPO, 'swift_gkd_plugin')
    folders, files = set(), set()
    for folder, dirs, names in os.walk(REPO):
        dirs[:] = [d for d in dirs if not d.startswith('.') and d != '__pycache__']
        files.update(n for n in names if n.endswith('.py'))
        if folder.startswith(source + os.sep):
            folders.add(os.path.relpath(folder, source).replace(os.sep, '/'))
    assert sorted(f for f in folders if f'{f}/' not in text) == []
    named = set(re.findall(r'([A-Za-z_][\w]*\.py)\b', text))
    assert sorted(named - files) == []


UNDEFINED = ('undefined name', 'undefined local variable', 'used before assignment')


def _undefined_names(paths):
    from pyflakes import api, reporter
    import io
    out = io.StringIO()
    api.checkRecursive(paths, reporter.Reporter(out, out))
    return [line for line in out.getvalue().splitlines() if any(kind in line for kind in UNDEFINED)]


def test_no_undefined_name_in_code_a_cpu_run_never_reaches():
    """The CUDA-only branches (stream hand-over, float32-output matmuls, the kit's GPU parts, the benchmarks'
    device memory) run on no CPU test: a name missing there is found by reading, not running. (One was: bench_loss's
    ``_memory_baseline`` called ``torch.cuda`` without importing torch, an error in every CUDA worker of kit part b.)"""
    root = os.path.dirname(PACKAGE)
    paths = [os.path.join(root, p) for p in ('swift_gkd_plugin', 'benchmarks', 'tests/gpu/checks', 'examples')]
    assert _undefined_names([p for p in paths if os.path.exists(p)]) == []


def test_the_undefined_name_reader_sees_one(tmp_path):
    (tmp_path / 'gpu_only.py').write_text('def baseline(cuda):\n    if cuda:\n        torch.cuda.synchronize()\n')
    found = _undefined_names([str(tmp_path)])
    assert len(found) == 1 and "undefined name 'torch'" in found[0], found


#: Cross-file ``self.method()`` calls inside ``swift/`` (:func:`cross_file_self_calls`): a stage reaching another
#: stage's methods through the trainer. A ratchet (56 before issue 95 item 3 handed the stages what they use as
#: collaborator objects: the samplers, the teacher, the score store, the answers asked ahead, the prefetch, the
#: reference); it may only go down.
MOST_CROSS_FILE_SELF_CALLS = 4


def _module_nodes(root: str):
    """``(module path relative to root, node)`` of every AST node of ``root``'s modules."""
    for folder, _, names in os.walk(root):
        for name in sorted(n for n in names if n.endswith('.py')):
            path = os.path.join(folder, name)
            with open(path) as f:
                tree = ast.parse(f.read(), path)
            for node in ast.walk(tree):
                yield os.path.relpath(path, root), node


def cross_file_self_calls(root: str) -> list:
    """``(file, line, method)`` of every ``self.m(...)`` call in ``root``'s modules whose method ``m`` is defined in a
    class of another module of ``root`` and not in the calling one."""
    defined, calls = {}, []
    for rel, node in _module_nodes(root):
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    defined.setdefault(item.name, set()).add(rel)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and isinstance(node.func.value, ast.Name) and node.func.value.id == 'self'):
            calls.append((rel, node.lineno, node.func.attr))
    return [(rel, line, m) for rel, line, m in calls if m in defined and rel not in defined[m]]


def test_the_swift_stages_reach_each_other_through_self_no_more_than_the_ratchet():
    found = cross_file_self_calls(os.path.join(PACKAGE, 'swift'))
    assert len(found) <= MOST_CROSS_FILE_SELF_CALLS, found


def test_the_self_call_counter_sees_a_cross_file_call(tmp_path):
    (tmp_path / 'a.py').write_text('class A:\n    def run(self):\n        return self.helper()\n')
    (tmp_path / 'b.py').write_text('class B:\n    def helper(self):\n        return self.own()\n\n    def own(self):\n'
                                   '        return 1\n')
    assert cross_file_self_calls(str(tmp_path)) == [('a.py', 3, 'helper')]


#: Private attributes (``self._x``) set in one module of ``swift/`` and read in another
#: (:func:`cross_file_private_reads`): state one stage leaves on the trainer for another. A ratchet; it may only go
#: down.
MOST_CROSS_FILE_PRIVATE_READS = 14


def cross_file_private_reads(root: str) -> list:
    """``(file, line, attribute)`` of every read of ``self._x`` in ``root``'s modules whose attribute ``_x`` is
    assigned (``self._x = ...``) in another module of ``root`` and not in the reading one."""
    assigned, reads = {}, []
    for rel, node in _module_nodes(root):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == 'self'
                and node.attr.startswith('_') and not node.attr.startswith('__')):
            if isinstance(node.ctx, ast.Store):
                assigned.setdefault(node.attr, set()).add(rel)
            else:
                reads.append((rel, node.lineno, node.attr))
    return [(rel, line, a) for rel, line, a in reads if a in assigned and rel not in assigned[a]]


def test_the_swift_stages_read_each_others_private_state_no_more_than_the_ratchet():
    found = cross_file_private_reads(os.path.join(PACKAGE, 'swift'))
    assert len(found) <= MOST_CROSS_FILE_PRIVATE_READS, found


def test_the_private_state_counter_sees_a_cross_file_read(tmp_path):
    (tmp_path / 'a.py').write_text('class A:\n    def setup(self):\n        self._mode = 1\n'
                                   '        return self._mode\n')
    (tmp_path / 'b.py').write_text('class B:\n    def run(self):\n        self._own = 2\n'
                                   '        return self._mode + self._own + self.__dict__\n')
    assert cross_file_private_reads(str(tmp_path)) == [('b.py', 4, '_mode')]


#: Issue 95 item 4: a function's body (its docstring aside) longer than this says why in its docstring, with the
#: words "long because".
MOST_FUNCTION_BODY_LINES = 100


def long_functions(root: str, most: int = MOST_FUNCTION_BODY_LINES) -> list:
    """``(file, name, lines)`` of each function in ``root`` whose body, its docstring aside, is longer than ``most``
    lines and whose docstring does not say ``long because``."""
    found = []
    for rel, node in _module_nodes(root):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        docstring = ast.get_docstring(node) or ''
        body = node.body[1:] if docstring and len(node.body) > 1 else node.body
        lines = node.end_lineno - body[0].lineno + 1
        if lines > most and 'long because' not in docstring.lower():
            found.append((rel, node.name, lines))
    return found


def test_no_function_is_longer_than_the_limit_without_saying_why():
    assert long_functions(PACKAGE) == []


def test_the_length_check_sees_a_long_body_and_reads_the_reason(tmp_path):
    body = ''.join(f'    x{i} = {i}\n' for i in range(5))
    (tmp_path / 'a.py').write_text(f'def short():\n    """Doc."""\n{body}\n\ndef why():\n    """Long because a table.'
                                   f'"""\n{body}\n\ndef bare():\n{body}')
    assert long_functions(str(tmp_path), most=4) == [('a.py', 'short', 5), ('a.py', 'bare', 5)]
