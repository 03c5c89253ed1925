"""The loss of ``megatron rlhf`` on logit shards, and the teacher's top-k where ``--teacher_scores`` holds it.

In: micro-batches, logit shards and the teacher-score store. Out: the stored top-k of each micro-batch's rows, the
loss and its metrics.
"""
