"""The run's lifecycle: guards that keep exit code 0 for runs that learnt, and a clean exit.

In: the trainer. Out: a run that ends with its cause named.
"""
