"""The k-NN graph term: a hand-computed value, zero for identical graphs, gradients and errors."""

from __future__ import annotations

import math

import pytest
import torch

from hf_distill.losses.graph import knn_graph, knn_graph_loss
from hf_distill.losses.relation import rkd_distance_loss, similarity_preserving_loss


def cos(a, b):
    dot = sum(x * y for x, y in zip(a, b))
    return dot / math.sqrt(sum(x * x for x in a)) / math.sqrt(sum(y * y for y in b))


def reference(student, teacher, k, tau):
    """Plain-Python graph loss: teacher neighbours by cosine, softmax weights on those edges, KL per node."""
    n, total = len(teacher), 0.0
    for i in range(n):
        others = [j for j in range(n) if j != i]
        nbrs = sorted(others, key=lambda j: (-cos(teacher[i], teacher[j]), j))[:k]
        zt = sum(math.exp(cos(teacher[i], teacher[j]) / tau) for j in nbrs)
        zs = sum(math.exp(cos(student[i], student[j]) / tau) for j in nbrs)
        for j in nbrs:
            wt = math.exp(cos(teacher[i], teacher[j]) / tau) / zt
            ws = math.exp(cos(student[i], student[j]) / tau) / zs
            total += wt * math.log(wt / ws)
    return total / n


TEACHER = [[1.0, 0.0, 0.2], [0.9, 0.1, 0.0], [0.0, 1.0, 0.3], [0.1, 0.8, -0.2], [-1.0, 0.2, 0.5]]
STUDENT = [[0.5, 0.5], [1.0, -0.2], [0.3, 0.9], [-0.4, 1.0], [0.7, 0.7]]


@pytest.mark.parametrize("k,tau", [(1, 1.0), (2, 0.5), (4, 0.1)])
def test_knn_graph_loss_matches_a_hand_computation(k, tau):
    got = knn_graph_loss(torch.tensor(STUDENT, dtype=torch.float64), torch.tensor(TEACHER, dtype=torch.float64),
                         k=k, tau=tau)
    assert got.item() == pytest.approx(reference(STUDENT, TEACHER, k, tau), rel=1e-10)


def test_graph_has_k_edges_per_node_and_none_to_itself():
    sims = torch.tensor(TEACHER) @ torch.tensor(TEACHER).T
    edges = knn_graph(sims, 2)
    assert edges.sum(-1).tolist() == [2] * 5 and not edges.diagonal().any()
    assert knn_graph(sims, 10).sum(-1).tolist() == [4] * 5  # capped at n - 1


def test_zero_for_identical_embeddings_and_for_a_rescaled_student():
    t = torch.randn(8, 16, dtype=torch.float64)
    assert knn_graph_loss(t.clone(), t, k=3).item() == pytest.approx(0.0, abs=1e-12)
    # Cosine similarity ignores each sample's norm and any rotation of the space: the graph is unchanged.
    rotation, _ = torch.linalg.qr(torch.randn(16, 16, dtype=torch.float64))
    student = (t @ rotation) * torch.rand(8, 1, dtype=torch.float64).add(0.5)
    assert knn_graph_loss(student, t, k=3).item() == pytest.approx(0.0, abs=1e-12)


def test_differs_in_substance_from_dense_relation_losses():
    """Moving a pair the teacher sees as unrelated changes RKD / SP but not the k-NN graph loss."""
    torch.manual_seed(0)
    centres = torch.randn(2, 8, dtype=torch.float64) * 4
    t = torch.cat([centres[0] + 0.1 * torch.randn(4, 8, dtype=torch.float64),
                   centres[1] + 0.1 * torch.randn(4, 8, dtype=torch.float64)])
    s = t.clone()
    s[4:] = s[4:] @ torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64))[0]  # the far cluster turns as a block
    assert knn_graph_loss(s, t, k=3).item() == pytest.approx(0.0, abs=1e-10)  # within-cluster neighbours kept
    assert rkd_distance_loss(s, t).item() > 1e-3 or similarity_preserving_loss(s, t).item() > 1e-3


def test_gradient_reaches_the_student_only_and_lowers_the_loss():
    torch.manual_seed(1)
    t = torch.randn(6, 10, requires_grad=True)
    s = torch.randn(6, 4, requires_grad=True)
    loss = knn_graph_loss(s, t, k=2, tau=0.5)
    loss.backward()
    assert t.grad is None or torch.count_nonzero(t.grad) == 0
    assert s.grad is not None and s.grad.abs().sum() > 0
    with torch.no_grad():
        stepped = s - 0.1 * s.grad
    assert knn_graph_loss(stepped, t.detach(), k=2, tau=0.5) < loss


def test_mask_selects_nodes_and_tiny_batches_give_zero():
    t, s = torch.tensor(TEACHER, dtype=torch.float64), torch.tensor(STUDENT, dtype=torch.float64)
    mask = torch.tensor([True, True, False, True, True])
    keep = [0, 1, 3, 4]
    want = reference([STUDENT[i] for i in keep], [TEACHER[i] for i in keep], 2, 0.5)
    assert knn_graph_loss(s, t, k=2, tau=0.5, mask=mask).item() == pytest.approx(want, rel=1e-10)
    assert knn_graph_loss(s[:1], t[:1]).item() == 0.0


@pytest.mark.parametrize("kwargs,match", [({"k": 0}, "k must be >= 1"), ({"tau": 0.0}, "tau must be > 0")])
def test_bad_options_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        knn_graph_loss(torch.randn(4, 3), torch.randn(4, 3), **kwargs)


@pytest.mark.parametrize("spec,match", [({"k": 0}, "knn_graph: k must be >= 1"), ({"tau": -1}, "knn_graph: tau must be > 0"),
                                        ({"neighbours": 3}, "has no option")])
def test_term_options_are_checked_when_the_trainer_is_built(tmp_path, spec, match):
    from hf_distill import DistillationArguments, DistillationTrainer
    from test_trainer import teacher_student
    from tiny import make_wordpiece_tokenizer

    teacher, student = teacher_student(make_wordpiece_tokenizer())
    args = DistillationArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True,
                                 distillation=[{"loss": "knn_graph", **spec}])
    with pytest.raises(ValueError, match=match):
        DistillationTrainer(model=student, teacher=teacher, args=args)
