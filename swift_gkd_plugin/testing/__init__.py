"""Offline test fixtures: tiny Qwen3-style models, tokenizer and a synthetic chat task (see :mod:`.tiny`)."""
