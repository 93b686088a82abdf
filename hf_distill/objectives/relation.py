"""Relation-based terms: MiniLMv2 self-attention relations, and relations between the samples of a batch."""

from __future__ import annotations

import torch

from ..losses import feature as feature_losses
from ..losses import relation as relation_losses
from ..modeling import hidden_size, num_layers, task_kind
from .base import StepTensors, Term, integer, register_term
from .feature import layer_spec


@register_term("attention_relation")
class AttentionRelationTerm(Term):
    """MiniLMv2 self-attention relations (Q-Q, K-K, V-V) with ``relation_heads`` heads.

    ``layers``: ``{student_layer: teacher_layer}`` (0-based), default the last layers.
    """

    options = ("relation_heads", "layers")
    needs = frozenset({"qkv"})
    count_key = "hidden"

    def setup(self, student, teachers, args):
        super().setup(student, teachers, args)
        if not teachers:
            raise ValueError("attention_relation needs a live teacher")
        if task_kind(student) == "seq2seq_lm":
            raise ValueError("attention_relation reads the self-attention of encoder-only or decoder-only models; for "
                             "an encoder-decoder use hidden_mse / hidden_cos (with side: encoder or decoder)")
        teacher = teachers[self.teacher_index or 0]
        n_s, n_t = num_layers(student), num_layers(teacher)
        spec = layer_spec(self.config.get("layers", {-1: -1}))
        self.mapping = feature_losses.validate_layer_map(spec, n_s, n_t, kind="attentions")
        self.relation_heads = integer(self.config.get("relation_heads", 12), "attention_relation: relation_heads")
        if self.relation_heads < 1:
            raise ValueError(f"attention_relation: relation_heads must be >= 1, got {self.relation_heads}")
        for who, model in (("student", student), ("teacher", teacher)):
            width = hidden_size(model)
            if width % self.relation_heads:
                raise ValueError(f"attention_relation: relation_heads={self.relation_heads} does not divide the "
                                 f"{who}'s width {width}; choose a divisor of both widths")

    def qkv_layers(self):
        return list(self.mapping), list(self.mapping.values())

    def forward(self, step):
        teacher = step.teacher(self.teacher_index)
        total = 0.0
        for s, t in self.mapping.items():
            total = total + relation_losses.attention_relation_loss(
                step.student.qkv[s], tuple(x.to(step.student.qkv[s][0]) for x in teacher.qkv[t]),
                relation_heads=self.relation_heads, attention_mask=step.masks["hidden"],
                num_items=step.counts["hidden"])
        return total / len(self.mapping)


class SampleRelationTerm(Term):
    """Relations between the pooled representations of the samples in a batch.

    Such a loss is not a sum over items: it is computed within each micro-batch. Its value for an
    optimiser step is the mean over the step's micro-batches (all processes), weighted by their
    sample counts: each micro-batch contributes ``loss * local_samples / step_samples``. So batch
    8 x accumulation 2 and 2 processes x batch 8 give exactly the same loss and gradients, and a
    single batch of 16 (whose relations also span the two halves) the same scale.
    """

    options = ("pooling", "layer")
    needs = frozenset({"hidden_states"})
    count_key = "samples"

    def setup(self, student, teachers, args):
        super().setup(student, teachers, args)
        if not teachers:
            raise ValueError(f"term {self.loss_name!r} needs a live teacher")
        if self.config.get("pooling", "cls") not in ("cls", "mean"):
            raise ValueError(f"term {self.loss_name!r}: pooling must be 'cls' or 'mean', got "
                             f"{self.config.get('pooling')!r}")
        layer = integer(self.config.get("layer", -1), f"term {self.loss_name!r}: layer")
        teacher = teachers[self.teacher_index or 0]
        for who, model in (("student", student), ("teacher", teacher)):
            size = num_layers(model) + 1  # hidden_states: embeddings + every layer
            if not -size <= layer < size:
                raise ValueError(f"term {self.loss_name!r}: layer {layer} is out of range for the {who}, whose "
                                 f"hidden_states go from 0 (embeddings) to {size - 1} (or -{size}..-1 from the end)")
        self.layer = layer

    def pooled(self, hidden_states, mask) -> torch.Tensor:
        h = hidden_states[self.layer].float()
        if self.config.get("pooling", "cls") == "cls" or mask is None:
            return h[:, 0]
        m = mask.to(h.dtype).unsqueeze(-1)
        return (h * m).sum(1) / m.sum(1).clamp(min=1.0)

    def forward(self, step: StepTensors):
        mask = step.masks["hidden"]
        s = self.pooled(step.student.hidden_states, mask)
        t = self.pooled(step.teacher(self.teacher_index).hidden_states, mask).to(s)
        return self.loss_fn(s, t) * (s.shape[0] / step.counts["samples"])


@register_term("rkd_distance")
class RKDDistanceTerm(SampleRelationTerm):
    """Relational KD, distance-wise (Park et al. 2019), on pooled representations."""

    loss_fn = staticmethod(relation_losses.rkd_distance_loss)


@register_term("rkd_angle")
class RKDAngleTerm(SampleRelationTerm):
    """Relational KD, angle-wise (Park et al. 2019), on pooled representations."""

    loss_fn = staticmethod(relation_losses.rkd_angle_loss)


@register_term("similarity_preserving")
class SimilarityPreservingTerm(SampleRelationTerm):
    """Similarity-preserving KD (Tung & Mori 2019): batch Gram matrices of pooled representations."""

    loss_fn = staticmethod(relation_losses.similarity_preserving_loss)
