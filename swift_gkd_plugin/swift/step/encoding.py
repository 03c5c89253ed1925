"""A sample's two views as token rows: the student's and the teacher's (its privileged messages and images, if any).

One place for both readers: the trainer's micro-batches (:mod:`swift.rollout.batches`) and the producer's requests to
a served teacher ahead of the step (:mod:`swift.teacher.ahead`), so a row asked ahead is the row the loss reads.
"""
from __future__ import annotations

import copy

from swift.rlhf_trainers.utils import encode_sample


def encode_views(samples, template):
    """``(student rows, teacher rows, any privileged view)``: ms-swift's ``encode_gkd_samples``, except that a
    privileged teacher view is encoded like the student's (:func:`encode_sample` on the teacher's messages and images),
    so it keeps the sample's ``response_loss_mask`` (ms-swift's drops it: the teacher would score tokens a multi-turn
    scheduler masked), and a sample without a view of its own keeps the student's messages."""
    has_view = _any_view(samples)
    students = [_encoded(sample, template) for sample in samples]
    teachers = ([_encoded(_teacher_view(sample), template) for sample in samples] if has_view else
                [student.copy() for student in students])
    return students, teachers, has_view


def encode_teacher_views(samples, template):
    """The teacher rows of :func:`encode_views` alone (the student's are not encoded where a view differs)."""
    has_view = _any_view(samples)
    return [_encoded(_teacher_view(sample) if has_view else sample, template) for sample in samples]


def _any_view(samples) -> bool:
    return any([sample.build_teacher_view() for sample in samples])  # a list: every sample builds its view


def _teacher_view(sample):
    view = copy.copy(sample)
    view.messages = sample.teacher_messages or sample.messages
    if sample.teacher_images is not None:
        view.images = sample.teacher_images
    return view


def _encoded(sample, template) -> dict:
    row = encode_sample(sample, template)
    row.pop('_extra_kwargs', None)
    return row
