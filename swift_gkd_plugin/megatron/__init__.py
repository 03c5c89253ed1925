"""Megatron-side helpers of the GKD trainer (``megatron rlhf --rlhf_type gkd``).

The modules of this package are framework-free where they can be (:mod:`.rollout.generation` imports only ``torch`` and the
standard library), so that they run and are tested without Megatron-core, CUDA or transformer-engine. This file
imports nothing: import the submodules explicitly.
"""
