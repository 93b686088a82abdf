"""Chunked top-k KL: the value and the gradient of the dense top-k KL, without its full-size temporaries."""

import pytest
import torch

from hf_distill.losses import topk_kl_loss
from hf_distill.losses.chunked_topk import chunked_topk_kl_loss


@pytest.mark.parametrize("k", [1, 5, 40])
@pytest.mark.parametrize("tail", [True, False])
@pytest.mark.parametrize("masked", [True, False])
def test_chunked_topk_kl_equals_the_dense_one(k, tail, masked):
    torch.manual_seed(k)
    vocab, temperature = 40, 2.0
    student = (torch.randn(3, 7, vocab, dtype=torch.float64) * 3).requires_grad_()
    teacher = torch.log_softmax(torch.randn(3, 7, vocab, dtype=torch.float64) * 4 / temperature, -1)
    values, indices = teacher.topk(k, -1)
    tail_mass = (1 - values.exp().sum(-1)).clamp(min=0) if tail else None
    mask = torch.rand(3, 7) > 0.3 if masked else None
    kw = dict(teacher_tail_mass=tail_mass, temperature=temperature, mask=mask, num_items=11.0)
    dense = topk_kl_loss(student, values, indices, **kw)
    (g_dense,) = torch.autograd.grad(dense * 3.0, student)
    chunked = chunked_topk_kl_loss(student, values, indices, chunk_size=4, **kw)
    (g_chunked,) = torch.autograd.grad(chunked * 3.0, student)
    torch.testing.assert_close(chunked, dense, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_chunked, g_dense, rtol=1e-8, atol=1e-12)


def test_a_tiny_student_tail_keeps_its_precision():
    """The top-k holds all but 1e-30 of the student's mass: the tail term stays finite and exact."""
    student = torch.full((1, 50), -80.0, dtype=torch.float64)
    student[0, :3] = 0.0
    student.requires_grad_()
    values = torch.log(torch.tensor([[0.5, 0.3, 0.1]], dtype=torch.float64))
    indices = torch.tensor([[0, 1, 2]])
    tail = torch.tensor([0.1], dtype=torch.float64)
    dense = topk_kl_loss(student, values, indices, teacher_tail_mass=tail)
    chunked = chunked_topk_kl_loss(student, values, indices, teacher_tail_mass=tail)
    (g_dense,) = torch.autograd.grad(dense, student)
    (g_chunked,) = torch.autograd.grad(chunked, student)
    assert torch.isfinite(chunked) and chunked.item() == pytest.approx(dense.item(), rel=1e-12)
    torch.testing.assert_close(g_chunked, g_dense, rtol=1e-8, atol=1e-14)
