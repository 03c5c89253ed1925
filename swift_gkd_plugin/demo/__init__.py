"""Offline fixtures the demo (``swift-gkd demo``) and the examples run: tiny Qwen3-style models, tokenizer and a
synthetic chat task (see :mod:`.tiny`), the sorting task (:mod:`.quality_task`) and the calculator tool task with its
ms-swift scheduler (:mod:`.tool_task`, :mod:`.tool_scheduler`). The test suite's own harness is in ``tests/harness/``
(not installed).
"""
