"""TEST-ONLY: on ``PYTHONPATH`` (the launcher tests put it there), what the launcher starts exits at once: torchrun
(``python -m torch.distributed.run``, ~4 s of importing torch before it would start the ranks), a rank (it has
``LOCAL_RANK``) and the one process the launcher starts itself without torchrun (ms-swift's ``cli/_megatron`` route
file). Those tests check what ``megatron rlhf``'s launcher does before it starts the ranks (its ``run sh:`` line);
what the ranks do is the end-to-end tests' business (``test_megatron_rlhf.py``)."""
import os
import sys

if 'LOCAL_RANK' in os.environ or os.path.basename(os.path.dirname(sys.argv[0] if sys.argv else '')) == '_megatron' \
        or getattr(sys, 'orig_argv', [])[1:3] == ['-m', 'torch.distributed.run']:
    os._exit(0)
