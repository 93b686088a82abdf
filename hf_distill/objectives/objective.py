"""The objective: the configured list of weighted terms as one callable that owns their masks and counts."""

from __future__ import annotations

import json
from typing import Any

import torch
import torch.nn as nn

from ..modeling import task_kind
from .base import DEFAULT_LOG_NAMES, KNOWN_NEEDS, TERM_REGISTRY, StepTensors, Term
from .layout import BatchLayout
from .response import ResponseTerm


def parse_distillation_spec(spec) -> list[dict] | None:
    """Accept the list of term dicts from YAML, or a JSON/YAML string from the command line."""
    if spec is None or spec == "" or spec == []:
        return None
    if isinstance(spec, str):
        import yaml

        try:
            spec = json.loads(spec)
        except json.JSONDecodeError:
            try:
                spec = yaml.safe_load(spec)
            except yaml.YAMLError as exc:
                raise ValueError(f"cannot read the distillation list {spec!r}: {exc}") from None
    if isinstance(spec, dict):
        spec = [spec]
    if not isinstance(spec, list) or not all(isinstance(t, dict) for t in spec):
        raise ValueError(f"distillation must be a list of terms like [{{loss: kl, weight: 5.0}}, ...], got {spec!r}")
    for t in spec:
        if "loss" not in t:
            raise ValueError(f"distillation term {t} has no 'loss' key; name one of: {', '.join(sorted(TERM_REGISTRY))}")
        if not isinstance(t["loss"], str):
            raise ValueError(f"distillation term {t}: loss must be a term name, one of {', '.join(sorted(TERM_REGISTRY))}")
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
    """The weighted sum of the configured terms; owns their parameters, masks and item counts."""

    def __init__(self, terms: list[Term], layout: BatchLayout | None = None):
        super().__init__()
        self.terms = nn.ModuleList(terms)
        self.layout = layout
        names = [t.log_name for t in terms]
        dupes = {n for n in names if names.count(n) > 1}
        if dupes:
            raise ValueError(f"two terms would be logged as {sorted(dupes)}; give them distinct `name:` values")
        for term in terms:
            unknown = set(term.needs) - KNOWN_NEEDS
            if unknown:
                raise ValueError(f"term {term.loss_name!r} needs {sorted(unknown)}, which nothing collects; "
                                 f"needs must be a subset of {sorted(KNOWN_NEEDS)}")

    @property
    def active_terms(self) -> list[Term]:
        return [t for t in self.terms if t.weight > 0]

    @property
    def needs(self) -> set[str]:
        """What the models must return for the weighted terms."""
        return set().union(*(t.needs for t in self.active_terms))

    @property
    def teacher_needs(self) -> set[str]:
        """What a teacher must provide: empty when no weighted term reads a teacher."""
        return set().union(*(t.needs for t in self.active_terms if t.uses_teacher))

    def qkv_layers(self) -> tuple[set[int], set[int]]:
        s, t = set(), set()
        for term in self.active_terms:
            a, b = term.qkv_layers()
            s.update(a)
            t.update(b)
        return s, t

    def describe(self) -> list[dict[str, Any]]:
        """The terms as configuration (name, weight, options): what a checkpoint records and a model card shows."""
        out = []
        for t in self.terms:
            entry = {"loss": t.loss_name, "weight": t.weight, "log_name": t.log_name, **t.config}
            if t.teacher_index is not None:
                entry["teacher"] = t.teacher_index
            for attr in ("temperature", "beta", "mapping", "side", "layer", "relation_heads"):
                if hasattr(t, attr) and attr not in entry:
                    value = getattr(t, attr)
                    entry[attr] = {str(k): v for k, v in value.items()} if isinstance(value, dict) else value
            out.append(json.loads(json.dumps(entry, default=str)))
        return out

    # ---------------------------------------------------------------- masks and counts
    def masks(self, inputs: dict, labels: torch.Tensor | None) -> dict[str, torch.Tensor | None]:
        return self.layout.masks(inputs, labels)

    def item_counts(self, inputs: dict) -> dict[str, torch.Tensor]:
        return self.layout.item_counts(inputs)

    def forward(self, step: StepTensors) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        values: dict[str, torch.Tensor] = {}
        total = None
        for term in self.active_terms:
            value = term(step)
            values[term.log_name] = value
            for part, part_value in getattr(term, "parts", {}).items():  # e.g. one value per early exit
                values[f"{term.log_name}_{part}"] = part_value
            total = term.weight * value if total is None else total + term.weight * value
        if total is None:
            raise ValueError("every distillation term has weight 0; nothing to train")
        return total, values


def build_objective(args, student, teachers: list, *, multi_teacher: str = "average",
                    teacher_weights: list[float] | None = None) -> Objective:
    """Build (and validate) the objective described by ``args.distillation`` or the weight flags."""
    spec = parse_distillation_spec(getattr(args, "distillation", None))
    specs = spec if spec is not None else default_terms(args)
    if spec is not None and not any(t["loss"] == "task" for t in specs):
        specs = specs + [{"loss": "task", "weight": args.task_weight}]
    if multi_teacher == "separate" and len(teachers) > 1:
        from ..teachers import teacher_mixture_weights

        weights = teacher_weights or teacher_mixture_weights(getattr(args, "teacher_weight_list", None), len(teachers))
        expanded = []
        for t in specs:
            cls = TERM_REGISTRY.get(t["loss"])
            if cls is not None and issubclass(cls, ResponseTerm) and "teacher" not in t:
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
    layout = BatchLayout(student, task_kind(student), restrict_kd_to_mask=getattr(args, "restrict_kd_to_mask", False))
    return Objective(terms, layout)
