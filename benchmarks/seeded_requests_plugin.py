"""Benchmark-only plugin (``--external_plugins``): every vLLM colocate request seeded, as the plugin did before issue 47
(request ``i`` of a call gets ``hash(seed, step, rank, turn) + i``), so that ``bench_rollout.py`` can time per-request
seeds against the unseeded requests the plugin now sends with one rank per engine."""
from copy import copy

from swift_gkd_plugin.core.modes import sampling_seed
from swift_gkd_plugin.swift.rollout import samplers


def seeded_request_config(config, *, seed, step, process_index, tensor_parallel_size, vllm_mode, turn=0):
    if vllm_mode != 'colocate':
        return config
    config = copy(config)
    stream = 'sampling' if not turn else f'sampling-turn{int(turn)}'
    config.seed = sampling_seed(seed, step, process_index // max(int(tensor_parallel_size), 1), stream) >> 1
    return config


samplers.seeded_request_config = seeded_request_config
