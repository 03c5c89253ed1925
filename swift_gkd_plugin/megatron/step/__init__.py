"""The loss of ``megatron rlhf`` on logit shards.

In: micro-batches and logit shards. Out: the loss and its metrics.
"""
