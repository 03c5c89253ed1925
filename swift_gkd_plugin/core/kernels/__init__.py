"""Triton kernels of the fused loss (``core/fused_loss.py``), one file per stage; triton is imported only when a
kernel runs, so CPU users without triton are unaffected.

* :mod:`.topk_rows`: a chunk against a top-k teacher (with or without the tail bucket), the ``[C, V]`` student side.
"""
