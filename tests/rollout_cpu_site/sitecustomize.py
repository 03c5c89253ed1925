"""TEST-ONLY: on ``PYTHONPATH`` (the server-mode tests put it there for the ``swift rollout`` servers and the trainers
they start), this lets ``swift rollout`` run on vLLM's CPU build and ms-swift's weight sync go over gloo:
:mod:`harness.rollout_cpu` (``tests/harness/``, not installed: this file puts ``tests/`` on ``sys.path``). Nothing
else loads it."""
import os
import sys

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if TESTS not in sys.path:
    sys.path.append(TESTS)

from harness import rollout_cpu  # noqa: E402

rollout_cpu.install()
