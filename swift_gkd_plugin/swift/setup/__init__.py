"""What is checked and set before any model loads: the command line, the arguments, the paths, the local datasets, a
resume's checkpoint and what vLLM needs.

In: the command line. Out: arguments that hold together, or one error line naming the flag.
"""
