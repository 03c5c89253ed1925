"""Sampling pieces both adapters use: the weight sync to a colocated vLLM engine (``colocated_vllm.py``) and the
statistics of sampled completions (``completion_stats.py``). Imports core/ and options/; a piece of sampling only
one adapter needs lives in that adapter's rollout/ stage instead."""
