"""Adapters that plug the core into ms-swift's transformers/DeepSpeed pipeline.

``trainer.py`` composes one mixin per stage a batch passes: ``setup/`` (checked before any model loads), ``rollout/``
(modes, samples, micro-batches), ``teacher/`` (the teacher's signal), ``step/`` (the loss and its metrics); ``run/``
guards the run. A stage imports only the stages below it (docs_en/architecture.md)."""
