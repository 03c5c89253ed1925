"""The training step: samples encoded into micro-batches, the loss of each and its metrics, rewards and advantages.

In: samples. Out: the loss value, its gradient and the logged metrics.
"""
