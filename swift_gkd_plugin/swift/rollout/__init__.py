"""Sampling: each generation batch's mode and its samples (the student's, the teacher's, SKD's, multi-turn), on
transformers or vLLM.

In: dataset rows. Out: samples with their prompts, responses and sampler log-probabilities.
"""
