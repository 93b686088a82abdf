"""Feature-based terms: hidden states (with learned projections) and attention maps."""

from __future__ import annotations

from typing import Any

import torch

from ..losses import feature as feature_losses
from ..modeling import (check_same_frames, encoder_only, hidden_size, num_attention_heads, num_layers,
                        parse_layer_map, task_kind)
from .base import StepTensors, Term, register_term

SIDES = ("decoder", "encoder")


def layer_spec(value: Any) -> Any:
    """A term's ``layers`` option: ``"uniform"``, a ``"s:t,..."`` string, a mapping or a list of pairs."""
    if isinstance(value, str) and value != "uniform":
        return parse_layer_map(value)
    return value


def model_side(term: Term, student) -> str | None:
    """For encoder-decoders, which stack a feature term reads (``side: decoder`` by default, or ``encoder``)."""
    side = term.config.get("side")
    if task_kind(student) != "seq2seq_lm" and not getattr(getattr(student, "config", None), "is_encoder_decoder",
                                                          False) or encoder_only(student):
        if side is not None:
            raise ValueError(f"term {term.loss_name!r}: side={side!r} is only for encoder-decoder models; drop it")
        return None
    side = side or "decoder"
    if side not in SIDES:
        raise ValueError(f"term {term.loss_name!r}: side must be 'decoder' or 'encoder', got {side!r}")
    return side


class HiddenTerm(Term):
    """Hidden states of mapped layers; ``side: encoder|decoder`` chooses the stack of an encoder-decoder."""

    options = ("layers", "projection", "projection_init", "side")
    needs = frozenset({"hidden_states"})
    count_key = "hidden"
    kind = "mse"

    def setup(self, student, teachers, args):
        super().setup(student, teachers, args)
        if not teachers:
            raise ValueError(f"term {self.loss_name!r} needs a live teacher's hidden states")
        teacher = teachers[self.teacher_index or 0]
        check_same_frames(student, teacher, self.loss_name)
        self.side = model_side(self, student)
        if self.side == "encoder":
            self.count_key = "encoder_hidden"
        n_s, n_t = num_layers(student, self.side), num_layers(teacher, self.side)
        default = getattr(args, "layer_pairs", None) if self.kind == "cosine" else "uniform"
        spec = layer_spec(self.config.get("layers", default or "uniform"))
        if spec == "uniform":
            self.mapping = feature_losses.layer_map(n_s, n_t, include_embeddings=True)
        else:
            self.mapping = feature_losses.validate_layer_map(spec, n_s, n_t, kind="hidden_states")
        d_s, d_t = hidden_size(student), hidden_size(teacher)
        projection = self.config.get("projection")
        if projection not in (None, "linear", "none"):
            raise ValueError(f"term {self.loss_name!r}: projection must be 'linear' or omitted, got {projection!r}")
        if d_s != d_t and projection != "linear":
            raise ValueError(
                f"term {self.loss_name!r} compares hidden states of width {d_s} (student) and {d_t} (teacher); "
                "add `projection: linear` to the term (in --distillation) to learn a map between them, or drop the "
                "term (for DistilBERT's default terms: --cos_weight 0 --hidden_mse_weight 0)")
        self.projections = (feature_losses.make_projections(self.mapping, d_s, d_t,
                                                            init=self.config.get("projection_init", "xavier_uniform"))
                            if projection == "linear" else None)

    def states(self, tensors) -> tuple[torch.Tensor, ...]:
        states = tensors.encoder_hidden_states if self.side == "encoder" else tensors.hidden_states
        if states is None:
            raise ValueError(f"term {self.loss_name!r}: the model returned no {self.side or ''} hidden states "
                             "(output_hidden_states=True had no effect for this model)".replace("  ", " "))
        return states

    def forward(self, step):
        teacher = step.teacher(self.teacher_index)
        student_states, teacher_states = self.states(step.student), self.states(teacher)
        mask, count = step.masks.get(self.count_key), step.counts[self.count_key]
        if mask is None and self.side == "encoder":
            count = count * student_states[0].shape[1]  # every encoder position of every sample counts
        return feature_losses.hidden_states_loss(
            student_states, teacher_states, self.mapping, loss=self.kind, projections=self.projections, mask=mask,
            num_items=count,
        ) / len(self.mapping)


@register_term("hidden_mse")
class HiddenMSETerm(HiddenTerm):
    """MSE between mapped hidden states (TinyBERT), mean over layer pairs; embeddings are layer 0."""

    kind = "mse"


@register_term("hidden_cos")
class HiddenCosineTerm(HiddenTerm):
    """1 - cosine between mapped hidden states (DistilBERT's L_cos), mean over layer pairs."""

    kind = "cosine"


class AttentionTerm(Term):
    """Attention maps of mapped layers, head by head."""

    options = ("layers",)
    needs = frozenset({"attentions"})
    count_key = "hidden"

    def setup(self, student, teachers, args):
        super().setup(student, teachers, args)
        if not teachers:
            raise ValueError(f"term {self.loss_name!r} needs a live teacher's attention maps")
        if task_kind(student) == "seq2seq_lm":
            raise ValueError(f"term {self.loss_name!r} compares self-attention maps of encoder-only or decoder-only "
                             "models; for an encoder-decoder use hidden_mse / hidden_cos (with side: encoder or "
                             "decoder) or cross_attention_kl")
        teacher = teachers[self.teacher_index or 0]
        n_s, n_t = num_layers(student), num_layers(teacher)
        spec = layer_spec(self.config.get("layers", "uniform"))
        if spec == "uniform":
            self.mapping = feature_losses.attention_layer_map(n_s, n_t)
        else:
            self.mapping = feature_losses.validate_layer_map(spec, n_s, n_t, kind="attentions")
        h_s, h_t = num_attention_heads(student), num_attention_heads(teacher)
        if h_s != h_t:
            raise ValueError(
                f"term {self.loss_name!r} compares attention maps head by head, but the student has {h_s} heads and "
                f"the teacher {h_t}; use `attention_relation` (MiniLMv2), which works with any head counts")

    def forward(self, step: StepTensors):
        teacher = step.teacher(self.teacher_index)
        attn = step.masks["hidden"]
        total = 0.0
        for s, t in self.mapping.items():
            student_map = step.student.attentions[s]
            total = total + self.loss_fn(student_map, teacher.attentions[t].to(student_map),
                                         attention_mask=attn, num_items=step.counts["hidden"])
        return total / len(self.mapping)


@register_term("attention_mse")
class AttentionMSETerm(AttentionTerm):
    """MSE between attention probability maps of mapped layers (TinyBERT), padding masked."""

    loss_fn = staticmethod(feature_losses.attention_mse_loss)


@register_term("attention_kl")
class AttentionKLTerm(AttentionTerm):
    """KL between attention distributions of mapped layers, per query over keys, padding masked."""

    loss_fn = staticmethod(feature_losses.attention_kl_loss)


@register_term("cross_attention_kl")
class CrossAttentionKLTerm(Term):
    """An encoder-decoder's cross-attention (where each decoder position looks in the encoder output), mapped
    decoder layer by layer and head by head: ``KL(teacher || student)`` over the encoder positions, per labelled
    decoder position, averaged over heads and layer pairs. It teaches a shallow decoder the teacher's alignment
    (Whisper: which audio frames each token reads), which a cut decoder otherwise relearns from its labels alone.
    ``layers``: ``"uniform"`` or ``"s:t,..."`` over decoder layers (0-based)."""

    options = ("layers",)
    needs = frozenset({"attentions"})
    count_key = "hidden"

    def setup(self, student, teachers, args):
        super().setup(student, teachers, args)
        if not teachers:
            raise ValueError(f"term {self.loss_name!r} needs a live teacher's cross-attention")
        if task_kind(student) != "seq2seq_lm":
            raise ValueError(f"term {self.loss_name!r} reads an encoder-decoder's cross-attention; for encoder-only "
                             "or decoder-only models use attention_kl")
        teacher = teachers[self.teacher_index or 0]
        n_s, n_t = num_layers(student, "decoder"), num_layers(teacher, "decoder")
        spec = layer_spec(self.config.get("layers", "uniform"))
        if spec == "uniform":
            self.mapping = feature_losses.attention_layer_map(n_s, n_t)
        else:
            self.mapping = feature_losses.validate_layer_map(spec, n_s, n_t, kind="attentions")
        h_s, h_t = num_attention_heads(student, "decoder"), num_attention_heads(teacher, "decoder")
        if h_s != h_t:
            raise ValueError(f"term {self.loss_name!r} compares cross-attention head by head, but the student's "
                             f"decoder has {h_s} heads and the teacher's {h_t}; give the student the teacher's head "
                             "count")

    @staticmethod
    def maps(tensors, who: str) -> tuple[torch.Tensor, ...]:
        if tensors.cross_attentions is None or any(a is None for a in tensors.cross_attentions):
            raise ValueError(f"the {who} returned no cross-attention maps (output_attentions=True had no effect: its "
                             "attention implementation must be 'eager')")
        return tensors.cross_attentions

    def forward(self, step: StepTensors):
        student_maps = self.maps(step.student, "student")
        teacher_maps = self.maps(step.teacher(self.teacher_index), "teacher")
        first = student_maps[0]
        queries = step.masks.get("hidden")
        if queries is None:
            queries = torch.ones(first.shape[0], first.shape[2], dtype=torch.bool, device=first.device)
        keys = step.masks.get("encoder_hidden")
        if keys is None:
            keys = torch.ones(first.shape[0], first.shape[3], dtype=torch.bool, device=first.device)
        total = 0.0
        for s, t in self.mapping.items():
            total = total + feature_losses.attention_kl_loss(
                student_maps[s], teacher_maps[t].to(student_maps[s]), attention_mask=(queries, keys),
                num_items=step.counts["hidden"])
        return total / len(self.mapping)
