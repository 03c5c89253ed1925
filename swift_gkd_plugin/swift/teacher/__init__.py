"""The models the student is compared with: where the teacher lives (a separate model, the student's base, a server,
another tokenizer) and its forward; the reference of the anchor.

In: a micro-batch. Out: the teacher's signal for the loss.
"""
