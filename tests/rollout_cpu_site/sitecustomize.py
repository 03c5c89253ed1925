"""TEST-ONLY: on ``PYTHONPATH`` (the server-mode tests put it there for the ``swift rollout`` servers and the trainers
they start), this lets ``swift rollout`` run on vLLM's CPU build and ms-swift's weight sync go over gloo:
:mod:`swift_gkd_plugin.testing.rollout_cpu`. Nothing else loads it."""
from swift_gkd_plugin.testing import rollout_cpu

rollout_cpu.install()
