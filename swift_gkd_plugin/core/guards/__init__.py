"""What a run that must stop names, for ``swift rlhf`` and ``megatron rlhf`` alike: the first NaN or infinity in the
parts of a loss, and a teacher whose weights are the student's.

In: tensors (models' outputs, parameters). Out: a position or a verdict, and the message that names it.
"""
