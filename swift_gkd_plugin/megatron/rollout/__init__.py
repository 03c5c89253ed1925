"""Sampling in ``megatron rlhf`` without vLLM: prompts encoded, tokens generated across tensor and pipeline ranks, and
turned back into samples.

In: samples. Out: samples with responses.
"""
