"""TEST-ONLY: ``python rank_main.py MODULE FUNCTION ARGS_JSON`` as a torchrun rank runs ``FUNCTION(RANK, *ARGS)`` of
the test module ``MODULE`` (a file of this folder): what ``torch.multiprocessing.spawn`` runs in each process it
starts. ``megatron_runs.spawn_ranks`` forks these ranks from the test worker's Megatron zygote."""
import importlib
import json
import os
import sys

if __name__ == '__main__':
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:0] = [here, os.path.dirname(here)]  # this folder's modules, and tests/ (conftest), as pytest has them
    module, function, args = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    getattr(importlib.import_module(module), function)(int(os.environ['RANK']), *args)
