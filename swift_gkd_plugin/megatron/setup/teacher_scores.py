"""Moved: the teacher-score store's checks before loading are in :mod:`swift_gkd_plugin.options.teacher_scores`, for
both commands. This name stays for ``megatron/trainer.py``'s import of :func:`check_loaded_teacher` (another stage's
file: it imports from ``options.teacher_scores`` once its owner moves it, and this module goes)."""
from swift_gkd_plugin.options.teacher_scores import check_loaded_teacher  # noqa: F401
