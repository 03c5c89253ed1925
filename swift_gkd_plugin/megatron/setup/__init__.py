"""``megatron rlhf``: the arguments and the checks before any rank loads a model.

In: the command line. Out: arguments that hold together, or one error line.
"""
