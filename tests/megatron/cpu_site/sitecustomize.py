"""TEST-ONLY: on ``PYTHONPATH`` (the Megatron end-to-end tests put it there for the processes they start), this makes
``megatron rlhf`` run on CPU through :mod:`swift_gkd_plugin.testing.megatron_cpu`. Nothing else loads it."""
import os

from swift_gkd_plugin.testing import megatron_cpu

megatron_cpu.install(site_folder=os.path.dirname(os.path.abspath(__file__)))
