"""The distillation objective: a list of weighted loss terms built from configuration.

A term is a small ``nn.Module`` that reads the tensors gathered once per step (student and teacher
logits, hidden states, attentions, Q/K/V projections, masks and item counts) and calls a pure loss
function from :mod:`hf_distill.losses`. Terms may own parameters (learned projections); those are
trained with the student and never saved in it.

Configuration (YAML, or JSON on the command line with ``--distillation``)::

    distillation:
      - {loss: kl, weight: 5.0, temperature: 2.0}
      - {loss: hidden_mse, layers: {1: 3, 2: 6}, projection: linear, weight: 1.0}
      - {loss: attention_relation, relation_heads: 12, weight: 1.0}

The task loss on hard labels is added with ``task_weight`` unless the list has a ``task`` term.
Add your own term by name::

    @register_term("my_term")
    class MyTerm(Term):
        def forward(self, step):
            return ((step.student.logits - step.teacher().logits) ** 2).mean()
"""

from __future__ import annotations

import abc
import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn

from . import losses
from .losses import feature as feature_losses
from .losses import relation as relation_losses
from .teachers import hidden_size, unwrap

TERM_REGISTRY: dict[str, type["Term"]] = {}

# Log names of the built-in terms: loss_kd, loss_cos, ... (the task term is named after the task).
DEFAULT_LOG_NAMES = {"kl": "kd", "hidden_cos": "cos", "logit_mse": "mse"}
TASK_LOG_NAMES = {"masked_lm": "mlm", "causal_lm": "clm", "ctc": "ctc"}


def register_term(name: str) -> Callable[[type["Term"]], type["Term"]]:
    """Class decorator: make a :class:`Term` subclass available under ``loss: name``."""

    def decorator(cls: type[Term]) -> type[Term]:
        if not (isinstance(cls, type) and issubclass(cls, Term)):
            raise TypeError(f"@register_term({name!r}) must decorate a subclass of hf_distill.objectives.Term")
        TERM_REGISTRY[name] = cls
        cls.loss_name = name
        return cls

    return decorator


@dataclass
class ModelTensors:
    """What one model produced for the batch (None where no term asked for it)."""

    logits: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    qkv: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=dict)


@dataclass
class StepTensors:
    """Everything a term may read for one micro-batch."""

    student: ModelTensors
    teachers: list[ModelTensors]
    teacher_weights: list[float]
    labels: torch.Tensor | None
    masks: dict[str, torch.Tensor | None]
    counts: dict[str, torch.Tensor]
    task: str
    batch: dict[str, Any] = field(default_factory=dict)

    def teacher(self, index: int | None = 0) -> ModelTensors:
        return self.teachers[0 if index is None else index]

    def combined_teacher_logits(self, temperature: float, index: int | None) -> torch.Tensor:
        """Teacher logits at ``temperature``: one teacher's, or the weighted average of the teachers'
        probabilities expressed as logits (``T * log sum_i w_i softmax(t_i / T)``, exact)."""
        if index is not None or len(self.teachers) == 1:
            return self.teacher(index).logits
        logps = [torch.log_softmax(t.logits.float() / temperature, dim=-1) + math.log(w)
                 for t, w in zip(self.teachers, self.teacher_weights)]
        return temperature * torch.logsumexp(torch.stack(logps), dim=0)


def _shifted(step: StepTensors, tensor: torch.Tensor) -> torch.Tensor:
    """Causal LMs predict the next token: drop the last position to align with shifted labels."""
    return tensor[..., :-1, :] if step.task == "causal_lm" else tensor


class Term(nn.Module, abc.ABC):
    """One weighted loss term. Subclasses set ``needs`` and implement :meth:`forward`.

    ``needs`` is a subset of ``{"logits", "hidden_states", "attentions", "qkv"}``; ``count_key``
    names the item count the term is normalised by: ``kd`` (positions whose soft targets count),
    ``task`` (labelled positions), ``hidden`` (real tokens) or ``samples`` (sequences).
    """

    loss_name = "term"
    needs: frozenset[str] = frozenset({"logits"})
    count_key = "kd"
    options: tuple[str, ...] = ()

    def __init__(self, weight: float = 1.0, name: str | None = None, teacher: int | None = None, **options):
        super().__init__()
        unknown = set(options) - set(self.options)
        if unknown:
            allowed = ", ".join(("weight", "name", "teacher") + self.options)
            raise ValueError(f"term {self.loss_name!r} has no option(s) {sorted(unknown)}; its options are: {allowed}")
        if weight < 0:
            raise ValueError(f"term {self.loss_name!r}: weight must be >= 0, got {weight}")
        self.weight = float(weight)
        self.name = name
        self.teacher_index = teacher
        self.config = options

    @property
    def log_name(self) -> str:
        return "loss_" + (self.name or DEFAULT_LOG_NAMES.get(self.loss_name, self.loss_name))

    def setup(self, student, teachers: list, args) -> None:
        """Validate against the models (raise ValueError saying what to change); create parameters."""
        if self.teacher_index is not None and not 0 <= self.teacher_index < max(len(teachers), 1):
            raise ValueError(f"term {self.loss_name!r} reads teacher {self.teacher_index} but there are "
                             f"{len(teachers)} teachers (indices 0..{len(teachers) - 1})")

    def qkv_layers(self) -> tuple[list[int], list[int]]:
        """Student and teacher layer indices whose Q/K/V projections this term reads."""
        return [], []

    @abc.abstractmethod
    def forward(self, step: StepTensors) -> torch.Tensor:
        """The term's value for this micro-batch (normalised by ``step.counts[self.count_key]``)."""


# ---------------------------------------------------------------------- response-based
class _ResponseTerm(Term):
    options = ("temperature",)

    def setup(self, student, teachers, args):
        super().setup(student, teachers, args)
        self.temperature = float(self.config.get("temperature", args.temperature))
        if self.temperature <= 0:
            raise ValueError(f"term {self.loss_name!r}: temperature must be > 0")

    def pair(self, step: StepTensors) -> tuple[torch.Tensor, torch.Tensor]:
        teacher = step.combined_teacher_logits(self.temperature, self.teacher_index)
        return _shifted(step, step.student.logits), _shifted(step, teacher.to(step.student.logits.device))


def chunk_rows(vocab_size: int, device: torch.device | None = None) -> int:
    """Rows per chunk for the chunked divergences.

    CPU: about 2^20 elements per chunk, which stays in cache. GPU: about 2^26 (256 MiB in fp32):
    few, large kernels, and still bounded memory for long sequences and large vocabularies.
    """
    budget = 1 << 26 if device is not None and device.type == "cuda" else 1 << 20
    return max(8, budget // max(vocab_size, 1))


def divergence(step: StepTensors, s: torch.Tensor, t: torch.Tensor, *, beta: float, temperature: float) -> torch.Tensor:
    """Forward KL (beta 0), reverse KL (beta 1) or generalized JSD, via the chunked implementation.

    Same value and gradient as the dense losses, but computed a few rows at a time with the gradient
    formed in the same pass: about 4x faster on a CPU at a 30k vocabulary, and no full-size
    temporaries beyond one gradient buffer.
    """
    from .losses.chunked import chunked_generalized_jsd_loss

    return chunked_generalized_jsd_loss(s, t, beta=beta, temperature=temperature, mask=step.masks["kd"],
                                        num_items=step.counts["kd"], chunk_size=chunk_rows(s.shape[-1], s.device))


@register_term("kl")
class KLTerm(_ResponseTerm):
    """Soft-target KL(p_T || p_S) at temperature T, x T^2 (DistilBERT, Hinton et al.)."""

    def forward(self, step):
        s, t = self.pair(step)
        return divergence(step, s, t, beta=0.0, temperature=self.temperature)


@register_term("reverse_kl")
class ReverseKLTerm(_ResponseTerm):
    """KL(p_S || p_T) x T^2: mode-seeking."""

    def forward(self, step):
        s, t = self.pair(step)
        return divergence(step, s, t, beta=1.0, temperature=self.temperature)


@register_term("jsd")
class JSDTerm(_ResponseTerm):
    """Generalized Jensen-Shannon divergence with mixture weight ``beta`` (0: forward KL, 1: reverse KL)."""

    options = ("temperature", "beta")

    def forward(self, step):
        s, t = self.pair(step)
        return divergence(step, s, t, beta=float(self.config.get("beta", 0.5)), temperature=self.temperature)


@register_term("logit_mse")
class LogitMSETerm(_ResponseTerm):
    """Squared error between raw logits, summed over classes (DistilBERT's alpha_mse term)."""

    options = ()

    def setup(self, student, teachers, args):
        Term.setup(self, student, teachers, args)
        self.temperature = 1.0

    def forward(self, step):
        s, t = self.pair(step)
        return losses.logit_mse_loss(s, t, mask=step.masks["kd"], num_items=step.counts["kd"])


@register_term("topk_kl")
class TopKKLTerm(Term):
    """KL against stored top-k teacher log-probabilities (+ tail mass): batch columns
    ``teacher_topk_logprobs``, ``teacher_topk_indices`` and optionally ``teacher_tail_mass``."""

    options = ("temperature",)

    def setup(self, student, teachers, args):
        super().setup(student, teachers, args)
        self.temperature = float(self.config.get("temperature", 1.0))

    def forward(self, step):
        b = step.batch
        if "teacher_topk_logprobs" not in b or "teacher_topk_indices" not in b:
            raise ValueError("topk_kl needs batch columns teacher_topk_logprobs and teacher_topk_indices")
        return losses.topk_kl_loss(_shifted(step, step.student.logits), b["teacher_topk_logprobs"],
                                   b["teacher_topk_indices"].long(), teacher_tail_mass=b.get("teacher_tail_mass"),
                                   temperature=self.temperature, mask=step.masks["kd"], num_items=step.counts["kd"])


@register_term("task")
class TaskTerm(Term):
    """Cross-entropy on the hard labels (masked-LM, causal-LM or classification)."""

    count_key = "task"
    options = ("label_smoothing",)

    @property
    def log_name(self) -> str:
        return "loss_" + (self.name or self._task_name)

    def setup(self, student, teachers, args):
        from .teachers import task_kind

        self._task_name = TASK_LOG_NAMES.get(task_kind(student), "ce")
        # CTC's blank is the pad token in transformers' CTC heads.
        self._blank = getattr(unwrap(student).config, "pad_token_id", 0) or 0

    def forward(self, step):
        if step.labels is None:
            return step.student.logits.sum() * 0.0
        if step.task == "ctc":
            from .losses.task import ctc_loss

            blank = getattr(self, "_blank", 0)
            return ctc_loss(step.student.logits, step.labels, step.batch["frame_lengths"], blank=blank,
                            num_items=step.counts["task"])
        labels = step.labels[..., 1:] if step.task == "causal_lm" else step.labels
        return losses.cross_entropy_loss(_shifted(step, step.student.logits), labels, num_items=step.counts["task"],
                                         label_smoothing=float(self.config.get("label_smoothing", 0.0)))


# ---------------------------------------------------------------------- feature-based
def _num_layers(model) -> int:
    config = unwrap(model).config
    for attr in ("num_hidden_layers", "n_layers", "n_layer", "encoder_layers"):
        if getattr(config, attr, None):
            return int(getattr(config, attr))
    raise ValueError(f"cannot tell how many layers {type(unwrap(model)).__name__} has")


def _parse_map(value) -> Any:
    if isinstance(value, str) and value not in ("uniform",):
        from .arguments import parse_layer_map

        return parse_layer_map(value)
    return value


class _HiddenTerm(Term):
    options = ("layers", "projection", "projection_init")
    needs = frozenset({"hidden_states"})
    count_key = "hidden"
    kind = "mse"

    def setup(self, student, teachers, args):
        super().setup(student, teachers, args)
        if not teachers:
            raise ValueError(f"term {self.loss_name!r} needs a live teacher's hidden states")
        teacher = teachers[self.teacher_index or 0]
        n_s, n_t = _num_layers(student), _num_layers(teacher)
        spec = _parse_map(self.config.get("layers", args.layer_pairs if self.kind == "cosine" else "uniform"))
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

    def forward(self, step):
        teacher = step.teacher(self.teacher_index)
        return feature_losses.hidden_states_loss(
            step.student.hidden_states, teacher.hidden_states, self.mapping, loss=self.kind,
            projections=self.projections, mask=step.masks["hidden"], num_items=step.counts["hidden"],
        ) / len(self.mapping)


@register_term("hidden_mse")
class HiddenMSETerm(_HiddenTerm):
    """MSE between mapped hidden states (TinyBERT), mean over layer pairs; embeddings are layer 0."""

    kind = "mse"


@register_term("hidden_cos")
class HiddenCosineTerm(_HiddenTerm):
    """1 - cosine between mapped hidden states (DistilBERT's L_cos), mean over layer pairs."""

    kind = "cosine"


class _AttentionTerm(Term):
    options = ("layers",)
    needs = frozenset({"attentions"})
    count_key = "hidden"

    def setup(self, student, teachers, args):
        super().setup(student, teachers, args)
        if not teachers:
            raise ValueError(f"term {self.loss_name!r} needs a live teacher's attention maps")
        teacher = teachers[self.teacher_index or 0]
        n_s, n_t = _num_layers(student), _num_layers(teacher)
        spec = _parse_map(self.config.get("layers", "uniform"))
        if spec == "uniform":
            self.mapping = feature_losses.attention_layer_map(n_s, n_t)
        else:
            self.mapping = feature_losses.validate_layer_map(spec, n_s, n_t, kind="attentions")
        h_s = getattr(unwrap(student).config, "num_attention_heads", None) or unwrap(student).config.n_heads
        h_t = getattr(unwrap(teacher).config, "num_attention_heads", None) or unwrap(teacher).config.n_heads
        if h_s != h_t:
            raise ValueError(
                f"term {self.loss_name!r} compares attention maps head by head, but the student has {h_s} heads and "
                f"the teacher {h_t}; use `attention_relation` (MiniLMv2), which works with any head counts")

    def forward(self, step):
        teacher = step.teacher(self.teacher_index)
        attn = step.masks["hidden"]
        total = 0.0
        for s, t in self.mapping.items():
            total = total + self.loss_fn(step.student.attentions[s], teacher.attentions[t].to(step.student.attentions[s]),
                                         attention_mask=attn, num_items=step.counts["hidden"])
        return total / len(self.mapping)


@register_term("attention_mse")
class AttentionMSETerm(_AttentionTerm):
    """MSE between attention probability maps of mapped layers (TinyBERT), padding masked."""

    loss_fn = staticmethod(feature_losses.attention_mse_loss)


@register_term("attention_kl")
class AttentionKLTerm(_AttentionTerm):
    """KL between attention distributions of mapped layers, per query over keys, padding masked."""

    loss_fn = staticmethod(feature_losses.attention_kl_loss)


# ---------------------------------------------------------------------- relation-based
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
        teacher = teachers[self.teacher_index or 0]
        n_s, n_t = _num_layers(student), _num_layers(teacher)
        spec = _parse_map(self.config.get("layers", {-1: -1}))
        self.mapping = feature_losses.validate_layer_map(spec, n_s, n_t, kind="attentions")
        self.relation_heads = int(self.config.get("relation_heads", 12))
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


class _SampleRelationTerm(Term):
    """Relations between the pooled representations of the samples in a batch."""

    options = ("pooling", "layer")
    needs = frozenset({"hidden_states"})
    count_key = "samples"

    def setup(self, student, teachers, args):
        super().setup(student, teachers, args)
        if not teachers:
            raise ValueError(f"term {self.loss_name!r} needs a live teacher")
        if self.config.get("pooling", "cls") not in ("cls", "mean"):
            raise ValueError(f"term {self.loss_name!r}: pooling must be 'cls' or 'mean'")

    def pooled(self, hidden_states, mask) -> torch.Tensor:
        h = hidden_states[int(self.config.get("layer", -1))].float()
        if self.config.get("pooling", "cls") == "cls" or mask is None:
            return h[:, 0]
        m = mask.to(h.dtype).unsqueeze(-1)
        return (h * m).sum(1) / m.sum(1).clamp(min=1.0)

    def forward(self, step):
        mask = step.masks["hidden"]
        s = self.pooled(step.student.hidden_states, mask)
        t = self.pooled(step.teacher(self.teacher_index).hidden_states, mask).to(s)
        return self.loss_fn(s, t)


@register_term("rkd_distance")
class RKDDistanceTerm(_SampleRelationTerm):
    """Relational KD, distance-wise (Park et al. 2019), on pooled representations."""

    loss_fn = staticmethod(relation_losses.rkd_distance_loss)


@register_term("rkd_angle")
class RKDAngleTerm(_SampleRelationTerm):
    """Relational KD, angle-wise (Park et al. 2019), on pooled representations."""

    loss_fn = staticmethod(relation_losses.rkd_angle_loss)


@register_term("similarity_preserving")
class SimilarityPreservingTerm(_SampleRelationTerm):
    """Similarity-preserving KD (Tung & Mori 2019): batch Gram matrices of pooled representations."""

    loss_fn = staticmethod(relation_losses.similarity_preserving_loss)


# ---------------------------------------------------------------------- the objective
def parse_distillation_spec(spec) -> list[dict] | None:
    """Accept the list of term dicts from YAML, or a JSON/YAML string from the command line."""
    if spec is None or spec == "" or spec == []:
        return None
    if isinstance(spec, str):
        import yaml

        try:
            spec = json.loads(spec)
        except json.JSONDecodeError:
            spec = yaml.safe_load(spec)
    if isinstance(spec, dict):
        spec = [spec]
    if not isinstance(spec, list) or not all(isinstance(t, dict) for t in spec):
        raise ValueError("distillation must be a list of terms like [{loss: kl, weight: 5.0}, ...]")
    for t in spec:
        if "loss" not in t:
            raise ValueError(f"distillation term {t} has no 'loss' key; name one of: {', '.join(sorted(TERM_REGISTRY))}")
    return [dict(t) for t in spec]


def default_terms(args) -> list[dict]:
    """DistilBERT's triplet (+ optional MSE terms) from the flat weight arguments."""
    terms = [{"loss": "kl", "weight": args.kd_weight}, {"loss": "task", "weight": args.task_weight}]
    if args.cos_weight > 0:
        terms.append({"loss": "hidden_cos", "weight": args.cos_weight, "layers": args.layer_pairs})
    if args.mse_weight > 0:
        terms.append({"loss": "logit_mse", "weight": args.mse_weight})
    if args.hidden_mse_weight > 0:
        terms.append({"loss": "hidden_mse", "weight": args.hidden_mse_weight, "layers": args.layer_pairs,
                      "name": "hidden_mse"})
    return terms


class Objective(nn.Module):
    """The weighted sum of the configured terms; owns their parameters."""

    def __init__(self, terms: list[Term]):
        super().__init__()
        self.terms = nn.ModuleList(terms)
        names = [t.log_name for t in terms]
        dupes = {n for n in names if names.count(n) > 1}
        if dupes:
            raise ValueError(f"two terms would be logged as {sorted(dupes)}; give them distinct `name:` values")

    @property
    def needs(self) -> set[str]:
        return set().union(*(t.needs for t in self.terms if t.weight > 0)) if len(self.terms) else set()

    def qkv_layers(self) -> tuple[set[int], set[int]]:
        s, t = set(), set()
        for term in self.terms:
            a, b = term.qkv_layers()
            s.update(a)
            t.update(b)
        return s, t

    def forward(self, step: StepTensors) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        values: dict[str, torch.Tensor] = {}
        total = None
        for term in self.terms:
            if term.weight == 0:
                continue
            value = term(step)
            values[term.log_name] = value
            total = term.weight * value if total is None else total + term.weight * value
        if total is None:
            raise ValueError("every distillation term has weight 0; nothing to train")
        return total, values


def build_objective(args, student, teachers: list, *, multi_teacher: str = "average") -> Objective:
    """Build (and validate) the objective described by ``args.distillation`` or the weight flags."""
    spec = parse_distillation_spec(getattr(args, "distillation", None))
    specs = spec if spec is not None else default_terms(args)
    if spec is not None and not any(t["loss"] == "task" for t in specs):
        specs = specs + [{"loss": "task", "weight": args.task_weight}]
    if multi_teacher == "separate" and len(teachers) > 1:
        expanded = []
        weights = getattr(args, "teacher_weight_list", None) or [1.0 / len(teachers)] * len(teachers)
        for t in specs:
            cls = TERM_REGISTRY.get(t["loss"])
            if cls is not None and issubclass(cls, _ResponseTerm) and "teacher" not in t:
                for i, w in enumerate(weights):
                    base = t.get("name") or DEFAULT_LOG_NAMES.get(t["loss"], t["loss"])
                    expanded.append({**t, "teacher": i, "weight": t.get("weight", 1.0) * w, "name": f"{base}_t{i}"})
            else:
                expanded.append(t)
        specs = expanded
    terms = []
    for t in specs:
        options = dict(t)
        loss = options.pop("loss")
        cls = TERM_REGISTRY.get(loss)
        if cls is None:
            raise ValueError(f"unknown distillation loss {loss!r}; known: {', '.join(sorted(TERM_REGISTRY))} "
                             "(register your own with hf_distill.objectives.register_term)")
        term = cls(**options)
        term.setup(student, teachers, args)
        terms.append(term)
    return Objective(terms)
