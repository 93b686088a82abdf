"""Deep-to-shallow self-distillation: the model's own final output teaches exits at earlier layers.

``exit_kl`` attaches an auxiliary classifier (an *exit head*) to each chosen layer and trains it
on the soft targets of the model's own final logits (detached) at temperature ``T`` (x ``T**2``),
optionally plus the hard labels. The heads belong to the objective: the trainer's optimiser trains
and clips them with the student, checkpoints hold them so that a resume is exact, and
``trainer.save_model`` never writes them into the student. :mod:`hf_distill.early_exit` saves
them next to a saved student and runs the student up to a chosen exit only (Teerapittayanon et
al. 2016, BranchyNet; Zhang et al. 2019, "Be Your Own Teacher"; Liu et al. 2020, FastBERT)::

    distillation:
      - {loss: exit_kl, layers: [1, 2, 3], temperature: 2.0, ce_weight: 0.5}

Options: ``layers`` (``hidden_states`` indices that get an exit, 1 .. number of layers; default
every layer below the last), ``temperature`` (default ``--temperature``), ``ce_weight`` (weight of
the hard-label cross-entropy of each exit, default 0: the final output alone teaches),
``head`` (``auto``: a copy of the model's own head where its structure is known, else
``linear``; ``copy``; ``linear``: a new linear layer on the pooled state), ``pooling`` (sequence
classifiers: ``cls``, the first token as the model's own head reads it, or ``mean``, the mean over
real tokens, which a copied head reads in place of the first token; shallow layers of models
trained with mean pooling, such as sentence-transformers, carry little in their first token) and
``detach`` (true: the exits' losses do not reach the backbone, so the model itself trains exactly
as without the term).

Copied heads (``head: copy``), per model family:

* BERT-style sequence classifiers (``<base>.pooler`` + ``classifier``): pooler + dropout + classifier;
* DistilBERT sequence classifiers: ``pre_classifier`` + ReLU + dropout + ``classifier`` on the first token;
* sequence classifiers whose ``classifier`` reads the whole sequence (RoBERTa, XLM-R, ELECTRA,
  CamemBERT): that module;
* token classifiers: dropout + ``classifier`` per token;
* masked LMs: BERT's ``cls``, RoBERTa's ``lm_head``, DistilBERT's transform + norm + projector
  (the vocabulary projection is copied, not tied).

Each copied head starts as the final head, so an exit at the last layer reproduces the model's
own logits. Not supported: causal LMs, CTC, encoder-decoders, regression and multi-label heads. The value is the mean over exits of each exit's loss, normalised by the optimiser
step's global count (samples for sequence classification, real tokens otherwise), so gradient
accumulation and several processes give the same gradients. Each exit's own value of the last
micro-batch is in :attr:`ExitTerm.parts` (by layer).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from .. import losses
from ..modeling import hidden_size, num_layers, output_size, parse_layer_list, task_kind, unwrap
from .base import StepTensors, Term, finite_number, register_term

EXIT_TASKS = ("sequence_classification", "token_classification", "masked_lm")
HEAD_CHOICES = ("auto", "copy", "linear")
POOLINGS = ("cls", "mean")
# Styles of copied heads (how the parts are applied), and the linear head.
COPY_STYLES = ("pooler_classifier", "first_token_mlp", "sequence_module", "token_linear", "token_module",
               "distilbert_mlm")
STYLES = COPY_STYLES + ("linear",)


def pool(hidden: torch.Tensor, mask: torch.Tensor | None, pooling: str) -> torch.Tensor:
    """The first token (``cls``) or the mean over real tokens (``mean``) of ``hidden`` (batch, positions, width)."""
    if pooling == "cls" or mask is None:
        return hidden[:, 0]
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)


class ExitHead(nn.Module):
    """Maps one layer's hidden states (batch, positions, width) to logits: (batch, classes) for a sequence
    classifier, (batch, positions, classes) per token.

    ``parts`` are the modules it applies (copies of the model's, or a new ``classifier``); ``sources`` name
    the model's modules each part was copied from (what an export writes them back into).
    """

    def __init__(self, style: str, parts: dict[str, nn.Module], *, per_token: bool, dropout: float = 0.0,
                 pooling: str = "cls", sources: dict[str, str] | None = None):
        super().__init__()
        if style not in STYLES:
            raise ValueError(f"unknown exit head style {style!r}; known: {', '.join(STYLES)}")
        self.style, self.per_token, self.pooling = style, per_token, pooling
        self.sources = dict(sources or {})
        self.parts = nn.ModuleDict(parts)
        self.dropout = nn.Dropout(dropout)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        p = self.parts
        if self.pooling == "mean" and not self.per_token and self.style != "linear":
            # A copied head reads the first position: give it a one-position sequence holding the mean.
            hidden = pool(hidden, attention_mask, "mean").unsqueeze(1)
        if self.style == "pooler_classifier":
            return p["classifier"](self.dropout(p["pooler"](hidden)))
        if self.style == "first_token_mlp":
            return p["classifier"](self.dropout(torch.relu(p["pre_classifier"](hidden[:, 0]))))
        if self.style in ("sequence_module", "token_module"):
            return p["head"](hidden)
        if self.style == "token_linear":
            return p["classifier"](self.dropout(hidden))
        if self.style == "distilbert_mlm":
            return p["projector"](p["layer_norm"](p["activation"](p["transform"](hidden))))
        features = hidden if self.per_token else pool(hidden, attention_mask, self.pooling)
        return p["classifier"](self.dropout(features))

    def describe(self) -> dict[str, Any]:
        return {"style": self.style, "per_token": self.per_token, "pooling": self.pooling,
                "dropout": self.dropout.p, "sources": self.sources}


def _dropout(config, *names: str) -> float:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return 0.0


def copy_style(model) -> str | None:
    """How the model's own head can be copied onto an earlier layer (a style of :data:`COPY_STYLES`), or None."""
    base = unwrap(model)
    kind = task_kind(base)
    inner = getattr(base, getattr(base, "base_model_prefix", ""), None)
    classifier = getattr(base, "classifier", None)
    if kind == "sequence_classification":
        if isinstance(classifier, nn.Linear) and getattr(inner, "pooler", None) is not None:
            return "pooler_classifier"
        if isinstance(classifier, nn.Linear) and isinstance(getattr(base, "pre_classifier", None), nn.Linear):
            return "first_token_mlp"
        if isinstance(classifier, nn.Module) and hasattr(classifier, "out_proj"):
            return "sequence_module"
        return None
    if kind == "token_classification":
        return "token_linear" if isinstance(classifier, nn.Linear) else None
    if kind == "masked_lm":
        if all(isinstance(getattr(base, n, None), nn.Module) for n in ("vocab_transform", "vocab_layer_norm",
                                                                      "vocab_projector", "activation")):
            return "distilbert_mlm"
        if isinstance(getattr(base, "cls", None), nn.Module) or isinstance(getattr(base, "lm_head", None), nn.Module):
            return "token_module"
    return None


def _copied(module: nn.Module) -> nn.Module:
    out = copy.deepcopy(module).float()
    out.requires_grad_(True)
    return out


def build_exit_head(model, head: str = "auto", pooling: str | None = None) -> ExitHead:
    """A new exit head for ``model``: a float32 copy of its own head (``copy``; ``auto`` when its structure is
    known) or a linear layer on the pooled hidden state (``linear``, initialised like the model's weights)."""
    base = unwrap(model)
    kind = task_kind(base)
    if kind not in EXIT_TASKS:
        raise ValueError(f"exit heads attach to sequence-classification, token-classification or masked-LM models; "
                         f"this model ({type(base).__name__}) is a {kind} model")
    if head not in HEAD_CHOICES:
        raise ValueError(f"head must be one of {', '.join(HEAD_CHOICES)}, got {head!r}")
    if pooling is not None and pooling not in POOLINGS:
        raise ValueError(f"pooling must be 'cls' or 'mean', got {pooling!r}")
    config = base.config
    per_token = kind != "sequence_classification"
    style = copy_style(base) if head in ("auto", "copy") else None
    if head == "copy" and style is None:
        raise ValueError(f"cannot copy the head of {type(base).__name__} (its structure is not one hf_distill "
                         "knows); use head: linear")
    if per_token and pooling is not None:
        raise ValueError(f"pooling is for sequence classifiers; a {kind} model's exits classify every token")
    drop = _dropout(config, "classifier_dropout", "seq_classif_dropout", "hidden_dropout_prob", "dropout")
    prefix = getattr(base, "base_model_prefix", "")
    if style == "pooler_classifier":
        parts = {"pooler": getattr(base, prefix).pooler, "classifier": base.classifier}
        sources = {"pooler": f"{prefix}.pooler", "classifier": "classifier"}
    elif style == "first_token_mlp":
        parts = {"pre_classifier": base.pre_classifier, "classifier": base.classifier}
        sources = {"pre_classifier": "pre_classifier", "classifier": "classifier"}
        drop = _dropout(config, "seq_classif_dropout", "dropout")
    elif style == "sequence_module":
        parts, sources = {"head": base.classifier}, {"head": "classifier"}
    elif style == "token_linear":
        parts, sources = {"classifier": base.classifier}, {"classifier": "classifier"}
        drop = float(getattr(getattr(base, "dropout", None), "p", drop))
    elif style == "token_module":
        name = "cls" if isinstance(getattr(base, "cls", None), nn.Module) else "lm_head"
        parts, sources = {"head": getattr(base, name)}, {"head": name}
    elif style == "distilbert_mlm":
        parts = {"transform": base.vocab_transform, "activation": base.activation,
                 "layer_norm": base.vocab_layer_norm, "projector": base.vocab_projector}
        sources = {"transform": "vocab_transform", "activation": "activation", "layer_norm": "vocab_layer_norm",
                   "projector": "vocab_projector"}
    else:
        width, classes = hidden_size(base), output_size(base)
        linear = nn.Linear(width, classes)
        std = float(getattr(config, "initializer_range", 0.02) or 0.02)
        with torch.no_grad():
            linear.weight.normal_(0.0, std)
            linear.bias.zero_()
        return ExitHead("linear", {"classifier": linear}, per_token=per_token, dropout=drop,
                        pooling=pooling or "cls")
    return ExitHead(style, {k: _copied(m) for k, m in parts.items()}, per_token=per_token,
                    dropout=0.0 if style in ("sequence_module", "token_module", "distilbert_mlm") else drop,
                    pooling=pooling or "cls", sources=sources)


def exit_layers(spec: Any, n_layers: int, what: str = "layers") -> list[int]:
    """``layers`` as sorted ``hidden_states`` indices in 1..``n_layers`` (negative ones count from the end)."""
    if spec is None:
        if n_layers < 2:
            raise ValueError(f"a model with {n_layers} layer has no earlier layer to exit at")
        return list(range(1, n_layers))
    values = [spec] if isinstance(spec, int) and not isinstance(spec, bool) else parse_layer_list(spec, what)
    if not values:
        raise ValueError(f"{what} is empty; name at least one layer, e.g. [1, 2]")
    out = []
    for v in values:
        layer = v + n_layers + 1 if v < 0 else v
        if not 1 <= layer <= n_layers:
            raise ValueError(f"{what}: layer {v} is out of range; exits go after layers 1..{n_layers} (hidden_states "
                             "indices; 0 is the embeddings, which get no exit) or -1..-" f"{n_layers} from the end")
        out.append(layer)
    if len(set(out)) != len(out):
        raise ValueError(f"{what} {values} names a layer twice")
    return sorted(out)


@register_term("exit_kl")
class ExitTerm(Term):
    """Exit heads at earlier layers taught by the model's own final logits (see the module's docstring)."""

    options = ("layers", "temperature", "ce_weight", "head", "pooling", "detach")
    needs = frozenset({"logits", "hidden_states"})
    uses_teacher = False
    count_key = "samples"

    @property
    def log_name(self) -> str:
        if self.name:
            return "loss_" + self.name
        layers = getattr(self, "layers", None) or self.config.get("layers")
        if isinstance(layers, int) and not isinstance(layers, bool):
            layers = [layers]
        single = isinstance(layers, (list, tuple)) and len(layers) == 1
        return f"loss_exit{layers[0]}" if single else "loss_exits"

    def setup(self, student, teachers, args):
        super().setup(student, teachers, args)
        what = f"term {self.loss_name!r}"
        base = unwrap(student)
        kind = task_kind(base)
        if kind not in EXIT_TASKS:
            raise ValueError(f"{what} attaches exits to sequence-classification, token-classification or masked-LM "
                             f"students; this student is a {kind} model")
        config = base.config
        if kind == "sequence_classification":
            problem = getattr(config, "problem_type", None)
            if problem in ("regression", "multi_label_classification") or output_size(base) < 2:
                raise ValueError(f"{what} needs a single-label classifier (softmax over >= 2 classes); this student "
                                 f"has num_labels={output_size(base)}, problem_type={problem!r}")
        self.per_token = kind != "sequence_classification"
        self.count_key = "kd" if self.per_token else "samples"
        self.layers = exit_layers(self.config.get("layers"), num_layers(base), f"{what}: layers")
        self.temperature = finite_number(self.config.get("temperature", getattr(args, "temperature", 1.0)),
                                         f"{what}: temperature", minimum=0.0, strict=True)
        self.ce_weight = finite_number(self.config.get("ce_weight", 0.0), f"{what}: ce_weight", minimum=0.0)
        self.detach = self.config.get("detach", False)
        if not isinstance(self.detach, bool):
            raise ValueError(f"{what}: detach must be true or false, got {self.detach!r}")
        head = self.config.get("head", "auto")
        try:
            self.heads = nn.ModuleDict({str(layer): build_exit_head(base, head, self.config.get("pooling"))
                                        for layer in self.layers})
        except ValueError as exc:
            raise ValueError(f"{what}: {exc}") from None
        self.parts: dict[str, torch.Tensor] = {}

    def exit_loss(self, step: StepTensors, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        mask = step.masks.get("kd") if self.per_token else None
        value = losses.kl_div_loss(logits, targets, temperature=self.temperature, mask=mask,
                                   num_items=step.counts[self.count_key])
        if self.ce_weight > 0:
            if step.labels is None:
                raise ValueError(f"term {self.loss_name!r} has ce_weight {self.ce_weight:g} but the batch has no "
                                 "labels; add labels or set ce_weight: 0")
            value = value + self.ce_weight * losses.cross_entropy_loss(logits, step.labels,
                                                                       num_items=step.counts["task"])
        return value

    def forward(self, step: StepTensors) -> torch.Tensor:
        states = step.student.hidden_states
        if states is None or step.student.logits is None:
            raise ValueError(f"term {self.loss_name!r} needs the student's logits and hidden states "
                             "(output_hidden_states=True had no effect for this model)")
        targets = step.student.logits.detach()
        parts, total = {}, None
        for layer, head in self.heads.items():
            hidden = states[int(layer)]
            if self.detach:
                hidden = hidden.detach()
            logits = head(hidden.to(next(head.parameters()).dtype), step.masks.get("hidden"))
            value = self.exit_loss(step, logits, targets)
            parts[layer] = value.detach()
            total = value if total is None else total + value
        self.parts = parts
        return total / len(self.heads)


def exit_terms(objective) -> list[ExitTerm]:
    """The ``exit_kl`` terms of an objective (or of a trainer's objective)."""
    objective = getattr(objective, "objective", objective)
    return [t for t in getattr(objective, "terms", []) if isinstance(t, ExitTerm)]


def collect_exit_heads(objective) -> dict[int, ExitHead]:
    """Every exit head of an objective's ``exit_kl`` terms, by layer (a layer with two heads is an error)."""
    heads: dict[int, ExitHead] = {}
    for term in exit_terms(objective):
        for layer, head in term.heads.items():
            if int(layer) in heads:
                raise ValueError(f"two exit_kl terms put an exit after layer {layer}; give each layer one exit")
            heads[int(layer)] = head
    return dict(sorted(heads.items()))
