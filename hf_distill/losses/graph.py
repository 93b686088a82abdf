"""Graph-based knowledge: the teacher's k-nearest-neighbour graph over the samples of a batch.

Nodes are the samples of a (micro-)batch; the teacher draws an edge from each sample ``i`` to
its ``k`` nearest other samples by cosine similarity of its pooled representations, weighted by
a softmax of those similarities at temperature ``tau``:

    W_T(i, j) = exp(cos_T(i, j) / tau) / sum_{l in N_k(i)} exp(cos_T(i, l) / tau),  j in N_k(i)

The student's graph has the same edges (the teacher's neighbourhoods ``N_k(i)``) weighted by its
own similarities, ``W_S(i, j)`` (the same softmax of ``cos_S``), and the loss is the mean over
nodes of ``KL(W_T(i, .) || W_S(i, .))``.

How this differs from the other sample-relation losses of :mod:`hf_distill.losses.relation`:

* RKD distance / angle and similarity-preserving KD regress *every* pair's (normalised) distance,
  angle or Gram entry with equal weight: a dense, metric target where far-apart pairs count as
  much as neighbours. Here only the ``k`` edges the teacher considers neighbours exist; pairs the
  teacher sees as unrelated exert no pull at all (the local structure, as in neighbourhood
  embeddings such as SNE).
* The target is a distribution over each node's neighbours (a softmax of similarities): it is
  invariant to any shift of one node's similarities and compares *rankings and proportions* of
  neighbours, not magnitudes; the student is free to place the whole graph anywhere in its space.
* ``tau`` sets how peaked a neighbourhood is (small ``tau``: the nearest neighbour dominates).

Identical student and teacher representations (or any student whose similarities equal the
teacher's up to a per-node shift on the edges) give exactly 0. Fewer than 2 selected samples give
0; ``k`` is capped at ``samples - 1``. Widths may differ: only similarities are compared.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import check_mask, upcast

__all__ = ["cosine_similarities", "knn_graph", "knn_graph_loss"]


def cosine_similarities(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``(n, n)`` cosine similarities of the rows of ``x`` ``(n, d)``."""
    unit = F.normalize(x, p=2.0, dim=-1, eps=eps)
    return unit @ unit.T


def knn_graph(similarities: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean ``(n, n)`` adjacency: row ``i`` marks its ``k`` most similar other nodes (never itself).

    Ties are broken by the lower index, so the graph is deterministic.
    """
    n = similarities.shape[0]
    k = min(int(k), n - 1)
    if k < 1:
        return torch.zeros(n, n, dtype=torch.bool, device=similarities.device)
    eye = torch.eye(n, dtype=torch.bool, device=similarities.device)
    # Stable tie-breaking: a tiny decreasing offset by index, far below any float32 similarity gap that matters.
    order = torch.arange(n, device=similarities.device, dtype=similarities.dtype)
    scores = similarities.detach().masked_fill(eye, float("-inf")) - order * torch.finfo(similarities.dtype).eps
    idx = scores.topk(k, dim=-1).indices
    adjacency = torch.zeros(n, n, dtype=torch.bool, device=similarities.device)
    adjacency.scatter_(1, idx, True)
    return adjacency


def knn_graph_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    *,
    k: int = 4,
    tau: float = 0.1,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean over nodes of ``KL(W_T(i, .) || W_S(i, .))`` on the teacher's k-NN graph (see the module doc).

    ``student`` ``(B, D_s)`` and ``teacher`` ``(B, D_t)`` are pooled representations (extra feature
    dimensions are flattened); ``mask`` ``(B,)`` selects the samples (nodes) that count.
    """
    if int(k) < 1:
        raise ValueError(f"knn_graph_loss: k must be >= 1, got {k}")
    if not tau > 0:
        raise ValueError(f"knn_graph_loss: tau must be > 0, got {tau}")
    if student.dim() < 2 or teacher.dim() < 2 or student.shape[0] != teacher.shape[0]:
        raise ValueError(f"expected pooled representations with the same batch size, got student "
                         f"{tuple(student.shape)} and teacher {tuple(teacher.shape)}")
    s = upcast(student).reshape(student.shape[0], -1)
    t = upcast(teacher).reshape(teacher.shape[0], -1).to(s.dtype)
    mask = check_mask(mask, student.shape[:1], "the samples (batch,)")
    if mask is not None:
        s, t = s[mask], t[mask]
    if s.shape[0] < 2:
        return s.sum() * 0.0
    sim_t = cosine_similarities(t.detach())
    sim_s = cosine_similarities(s)
    edges = knn_graph(sim_t, k)
    log_w_t = torch.log_softmax((sim_t / tau).masked_fill(~edges, float("-inf")), dim=-1)
    log_w_s = torch.log_softmax((sim_s / tau).masked_fill(~edges, float("-inf")), dim=-1)
    per_edge = torch.where(edges, log_w_t.exp() * (log_w_t - log_w_s), torch.zeros((), dtype=s.dtype, device=s.device))
    return per_edge.sum(-1).mean()
