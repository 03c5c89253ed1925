"""Adapters that plug the core into ms-swift's transformers/DeepSpeed pipeline."""
