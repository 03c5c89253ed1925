"""TEST-ONLY: on ``PYTHONPATH``, this process cannot import ``vllm`` (as on a machine where it is not installed; this
one has its CPU build), and every rank process exits at once, as with ``stop_site``. Only the package is hidden:
the plugin, ms-swift and the launcher run as they are."""
import os
import sys

if 'LOCAL_RANK' in os.environ or os.path.basename(os.path.dirname(sys.argv[0] if sys.argv else '')) == '_megatron':
    os._exit(0)


class _NoVllm:
    """A finder ahead of all others that answers ``vllm`` and its submodules as not installed."""

    def find_spec(self, name, path=None, target=None):
        if name == 'vllm' or name.startswith('vllm.'):
            raise ModuleNotFoundError(f'No module named {name!r}', name=name)
        return None


sys.meta_path.insert(0, _NoVllm())
