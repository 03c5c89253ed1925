"""Distillation across tokenizers: aligning two tokenizations and the losses between two vocabularies.

In: two tokenizations of one text and their logits. Out: the loss.
"""
