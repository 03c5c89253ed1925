"""Moved: the teacher-score store's checks before loading are in :mod:`swift_gkd_plugin.options.teacher_scores`, for
both commands. This name stays for ``swift/teacher/store.py``'s import of :func:`mark_covered` (another stage's file:
it imports from ``options.teacher_scores`` once its owner moves it, and this module goes)."""
from swift_gkd_plugin.options.teacher_scores import mark_covered  # noqa: F401
