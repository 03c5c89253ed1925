"""TEST-ONLY: on ``PYTHONPATH`` (the Megatron end-to-end tests put it there for the processes they start), this makes
``megatron rlhf`` run on CPU through :mod:`harness.megatron_cpu` (``tests/harness/``, not installed: this file puts
``tests/`` on ``sys.path``). Nothing else loads it."""
import os
import sys

TESTS = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if TESTS not in sys.path:
    sys.path.append(TESTS)

from harness import megatron_cpu  # noqa: E402

megatron_cpu.install(site_folder=os.path.dirname(os.path.abspath(__file__)))
