"""Graph-based term: the student's sample graph matches the teacher's k-nearest-neighbour graph."""

from __future__ import annotations

from ..losses import graph as graph_losses
from .base import finite_number, integer, register_term
from .relation import SampleRelationTerm


@register_term("knn_graph")
class KnnGraphTerm(SampleRelationTerm):
    """Teacher k-NN graph distillation over the samples of a batch (:func:`hf_distill.losses.graph.knn_graph_loss`).

    Options: ``k`` (neighbours per sample, default 4), ``tau`` (softmax temperature of the edge
    weights, default 0.1), and those of every sample-relation term (``pooling``, ``layer``).
    """

    options = (*SampleRelationTerm.options, "k", "tau")

    def setup(self, student, teachers, args):
        super().setup(student, teachers, args)
        self.k = integer(self.config.get("k", 4), "knn_graph: k")
        if self.k < 1:
            raise ValueError(f"knn_graph: k must be >= 1 (neighbours per sample), got {self.k}")
        self.tau = finite_number(self.config.get("tau", 0.1), "knn_graph: tau", minimum=0.0, strict=True)

    def loss_fn(self, student, teacher):
        return graph_losses.knn_graph_loss(student, teacher, k=self.k, tau=self.tau)
