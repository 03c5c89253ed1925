"""The fused ``lm_head`` + divergence loss: the chunk loop, its PyTorch and Triton chunk backends and the kernels.

In: hidden states, the head and the teacher's signal. Out: the loss and its gradient, never the ``N x V`` logits.
"""
