"""The adapter for Megatron-SWIFT (``megatron rlhf --rlhf_type gkd``): ``trainer.py`` over the stages ``setup/``
(arguments, launcher checks), ``rollout/`` (sampling without vLLM) and ``step/`` (the loss on logit shards).

The modules are framework-free where they can be (:mod:`.rollout.generation` imports only ``torch`` and the standard
library), so that they run and are tested without Megatron-core, CUDA or transformer-engine. This file imports
nothing: import the submodules explicitly.
"""
