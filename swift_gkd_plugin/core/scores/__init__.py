"""The teacher paid for once: its scores stored, and the math of reading them.

In: a teacher's answers per row (top-k ids and log-probabilities at temperature 1, tail mass, the log-prob of each
next token), keyed by the row's token ids and scored positions. Out: a folder of safetensors shards and a manifest
(:mod:`.store`) that later epochs, runs and students read instead of running the teacher.
"""
