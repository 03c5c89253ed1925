"""TEST-ONLY: on ``PYTHONPATH`` (the launcher tests put it there), every rank process exits at once: those torchrun
starts (they have ``LOCAL_RANK``) and the one process the launcher starts itself without torchrun (ms-swift's
``cli/_megatron`` route file). Those tests check what ``megatron rlhf``'s launcher does before it starts the ranks;
what the ranks do is the end-to-end tests' business (``test_megatron_rlhf.py``)."""
import os
import sys

if 'LOCAL_RANK' in os.environ or os.path.basename(os.path.dirname(sys.argv[0] if sys.argv else '')) == '_megatron':
    os._exit(0)
