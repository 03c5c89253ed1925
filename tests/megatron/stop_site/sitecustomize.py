"""TEST-ONLY: on ``PYTHONPATH`` (the launcher tests put it there), every rank process torchrun starts (it has
``LOCAL_RANK``) exits at once. Those tests check what ``megatron rlhf``'s launcher does before it starts the ranks;
what the ranks do is the end-to-end tests' business (``test_megatron_rlhf.py``)."""
import os

if 'LOCAL_RANK' in os.environ:
    os._exit(0)
