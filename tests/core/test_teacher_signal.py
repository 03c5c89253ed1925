"""The teacher-signal types: what the fused loss accepts, and the chunked top-k of full teacher logits."""
import pytest
import torch

from swift_gkd_plugin.core.fused.loss import fused_linear_jsd
from swift_gkd_plugin.core.teacher_signal import TeacherHead, TeacherLogits, TeacherTopK
from swift_gkd_plugin.core.topk import topk_of_logits

pytestmark = pytest.mark.quick  # core math: part of `pytest -m quick`


def test_the_fused_loss_takes_a_head_or_a_topk_and_says_what_else_it_got():
    hs, w = torch.randn(4, 3), torch.randn(9, 3)
    with pytest.raises(ValueError, match='teacher must be a TeacherHead or a TeacherTopK, got TeacherLogits'):
        fused_linear_jsd(hs, w, teacher=TeacherLogits(torch.randn(4, 9)))
    with pytest.raises(ValueError, match='TeacherHead without a weight'):
        fused_linear_jsd(hs, w, teacher=TeacherHead(torch.randn(4, 3)))


def test_the_students_head_stands_in_for_the_teachers_without_gradient():
    """Self-distillation: ``TeacherHead(hidden)`` resolved with the student's head equals passing that head."""
    g = torch.Generator().manual_seed(0)
    hs, ht, w = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g), torch.randn(9, 3, generator=g)
    w.requires_grad_()
    resolved = TeacherHead(ht).with_head(w, None)
    assert resolved.weight is not None and not resolved.weight.requires_grad
    got, _ = fused_linear_jsd(hs, w, teacher=resolved)
    want, _ = fused_linear_jsd(hs, w, teacher=TeacherHead(ht, w.detach().clone()))
    assert torch.equal(got, want)


def test_topk_of_logits_is_the_unchunked_topk_exactly():
    x = torch.randn(2500, 300, dtype=torch.bfloat16)
    lp, ids = torch.log_softmax(x.double(), -1).topk(7, dim=-1)
    got = topk_of_logits(x, 7, chunk_size=1000)
    whole = topk_of_logits(x, 7, chunk_size=4096)
    assert torch.equal(got.ids, whole.ids) and torch.equal(got.logprobs, whole.logprobs)  # chunking changes nothing
    assert torch.equal(got.ids, ids) and float((got.logprobs.double() - lp).abs().max()) <= 1e-6
    empty = topk_of_logits(x[:0], 7)
    assert empty.ids.shape == (0, 7) and empty.ids.dtype == torch.long
