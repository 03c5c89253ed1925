"""TEST-ONLY: on ``PYTHONPATH`` (:func:`test_activation_and_bad_input.launch_only`), what the ``swift`` launcher starts
exits at once with code 0: ms-swift's route file (``swift/cli/<command>.py``), torchrun and a rank. Those tests
read what the launcher accepted and the command it started (its ``run sh:`` line); the run itself is the same command
through ``run_swift``."""
import os
import sys

_argv0 = sys.argv[0] if sys.argv else ''
if 'LOCAL_RANK' in os.environ or getattr(sys, 'orig_argv', [])[1:3] == ['-m', 'torch.distributed.run'] or (
        os.path.basename(os.path.dirname(_argv0)) == 'cli'
        and os.path.basename(os.path.dirname(os.path.dirname(_argv0))) == 'swift'):
    os._exit(0)
