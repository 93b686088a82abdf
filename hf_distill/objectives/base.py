"""What every loss term shares: the tensors of a step, the :class:`Term` base class and the registry."""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn

from ..modeling import unwrap

TERM_REGISTRY: dict[str, type["Term"]] = {}

# Log names of the built-in terms: loss_kd, loss_cos, ... (the task term is named after the task).
DEFAULT_LOG_NAMES = {"kl": "kd", "hidden_cos": "cos", "logit_mse": "mse"}
TASK_LOG_NAMES = {"masked_lm": "mlm", "causal_lm": "clm", "ctc": "ctc"}

# What a term may ask the trainer to collect from the models (``Term.needs``). ``last_hidden``: the final hidden
# states and the output projection they feed, instead of the full logits (the fused losses).
KNOWN_NEEDS = frozenset({"logits", "hidden_states", "attentions", "qkv", "last_hidden"})


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
    """What one model produced for the batch (None where no term asked for it).

    For encoder-decoders, ``hidden_states`` / ``attentions`` are the decoder's,
    ``encoder_hidden_states`` / ``encoder_attentions`` the encoder's and ``cross_attentions`` the
    decoder's attention over the encoder output. A teacher whose outputs were
    stored sparsely gives ``topk_logprobs`` / ``topk_indices`` (its top-k log-probabilities at the
    distillation temperature) and ``tail_mass`` (the probability outside them) instead of logits.
    For the fused losses, ``last_hidden_state`` holds the final hidden states and ``head`` the output
    projection ``(weight, bias)`` they feed (the logits are ``F.linear(last_hidden_state, *head)``).
    """

    logits: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    qkv: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    encoder_hidden_states: tuple[torch.Tensor, ...] | None = None
    encoder_attentions: tuple[torch.Tensor, ...] | None = None
    cross_attentions: tuple[torch.Tensor, ...] | None = None
    topk_logprobs: torch.Tensor | None = None
    topk_indices: torch.Tensor | None = None
    tail_mass: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None
    head: tuple[torch.Tensor, torch.Tensor | None] | None = None

    @classmethod
    def from_output(cls, out, qkv=None) -> "ModelTensors":
        """Collect the tensors of a transformers model output (seq2seq outputs name them by side)."""
        get = lambda name: getattr(out, name, None)  # noqa: E731
        return cls(logits=get("logits"),
                   hidden_states=get("hidden_states") if get("hidden_states") is not None
                   else get("decoder_hidden_states"),
                   attentions=get("attentions") if get("attentions") is not None else get("decoder_attentions"),
                   qkv=qkv or {}, encoder_hidden_states=get("encoder_hidden_states"),
                   encoder_attentions=get("encoder_attentions"), cross_attentions=get("cross_attentions"))

    @classmethod
    def from_stored(cls, batch: dict) -> "ModelTensors | None":
        """The teacher outputs a batch carries as columns (``teacher_logits``, or ``teacher_topk_logprobs`` +
        ``teacher_topk_indices`` + optional ``teacher_tail_mass``), or None when it carries none."""
        logits, topk = batch.get("teacher_logits"), batch.get("teacher_topk_logprobs")
        if logits is None and topk is None:
            return None
        if topk is not None and batch.get("teacher_topk_indices") is None:
            raise ValueError("the batch has teacher_topk_logprobs but no teacher_topk_indices column; store both")
        return cls(logits=logits, topk_logprobs=topk, topk_indices=batch.get("teacher_topk_indices"),
                   tail_mass=batch.get("teacher_tail_mass"))

    def detached(self) -> "ModelTensors":
        """The same tensors cut from the autograd graph (a model's outputs used as another's targets)."""
        def cut(value):
            if torch.is_tensor(value):
                return value.detach()
            if isinstance(value, tuple):
                return tuple(cut(v) for v in value)
            if isinstance(value, dict):
                return {k: cut(v) for k, v in value.items()}
            return value

        return ModelTensors(**{k: cut(v) for k, v in vars(self).items()})

    def named_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor, by a readable name (``logits``, ``hidden_states[2]``, ...), for diagnostics."""
        out: dict[str, torch.Tensor] = {}
        for name in ("logits", "topk_logprobs", "tail_mass", "last_hidden_state"):
            if torch.is_tensor(getattr(self, name)):
                out[name] = getattr(self, name)
        for name in ("hidden_states", "attentions", "encoder_hidden_states", "encoder_attentions", "cross_attentions"):
            for i, t in enumerate(getattr(self, name) or ()):
                if torch.is_tensor(t):
                    out[f"{name}[{i}]"] = t
        for i, qkv in self.qkv.items():
            if i >= 0:
                for role, t in zip("qkv", qkv):
                    out[f"{role}[{i}]"] = t
        return out


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


def shifted(step: StepTensors, tensor: torch.Tensor) -> torch.Tensor:
    """Causal LMs predict the next token: drop the last position to align with shifted labels."""
    return tensor[..., :-1, :] if step.task == "causal_lm" else tensor


def finite_number(value: Any, what: str, *, minimum: float | None = None, strict: bool = False) -> float:
    """``value`` as a finite float (and ``>= minimum``, or ``> minimum`` when ``strict``), else a ValueError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{what} must be a number, got {value!r}") from None
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number, got {value}")
    if minimum is not None and (value <= minimum if strict else value < minimum):
        raise ValueError(f"{what} must be {'>' if strict else '>='} {minimum:g}, got {value:g}")
    return value


def integer(value: Any, what: str) -> int:
    """``value`` as an int (an integral float such as 2.0 is accepted), else a ValueError naming ``what``."""
    if isinstance(value, bool):
        raise ValueError(f"{what} must be an integer, got {value!r}")
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    raise ValueError(f"{what} must be an integer, got {value!r}")


class Term(nn.Module, abc.ABC):
    """One weighted loss term. Subclasses set ``needs``, ``count_key`` and implement :meth:`forward`.

    ``needs`` is a subset of ``{"logits", "hidden_states", "attentions", "qkv"}``: what the trainer
    collects from the models for the term. ``uses_teacher`` says whether it reads a teacher's
    tensors (the task loss and terms on stored teacher outputs do not). ``count_key`` names the
    item count the term is normalised by: ``kd`` (positions whose soft targets count), ``task``
    (labelled positions), ``hidden`` (real tokens) or ``samples`` (sequences).
    """

    loss_name = "term"
    needs: frozenset[str] = frozenset({"logits"})
    uses_teacher = True
    count_key = "kd"
    options: tuple[str, ...] = ()

    def __init__(self, weight: float = 1.0, name: str | None = None, teacher: int | None = None, **options):
        super().__init__()
        unknown = set(options) - set(self.options)
        if unknown:
            allowed = ", ".join(("weight", "name", "teacher") + self.options)
            raise ValueError(f"term {self.loss_name!r} has no option(s) {sorted(unknown)}; its options are: {allowed}")
        self.weight = finite_number(weight, f"term {self.loss_name!r}: weight", minimum=0.0)
        if name is not None and not isinstance(name, str):
            raise ValueError(f"term {self.loss_name!r}: name must be a string, got {name!r}")
        self.name = name
        self.teacher_index = None if teacher is None else integer(teacher, f"term {self.loss_name!r}: teacher")
        self.config = options

    @property
    def log_name(self) -> str:
        return "loss_" + (self.name or DEFAULT_LOG_NAMES.get(self.loss_name, self.loss_name))

    def setup(self, student, teachers: list, args) -> None:
        """Validate against the models (raise ValueError saying what to change); create parameters."""
        if self.teacher_index is not None and not 0 <= self.teacher_index < max(len(teachers), 1):
            raise ValueError(f"term {self.loss_name!r} reads teacher {self.teacher_index} but there are "
                             f"{len(teachers)} teachers (indices 0..{len(teachers) - 1})")
        features = set(self.needs) - {"logits"}
        refusal = getattr(unwrap(student), "feature_distillation_refusal", None)
        if features and refusal and self.weight > 0:  # e.g. a BiLSTM student has no transformer layers
            raise ValueError(f"term {self.loss_name!r} reads the student's {', '.join(sorted(features))}: {refusal}")

    def qkv_layers(self) -> tuple[list[int], list[int]]:
        """Student and teacher layer indices whose Q/K/V projections this term reads."""
        return [], []

    @abc.abstractmethod
    def forward(self, step: StepTensors) -> torch.Tensor:
        """The term's value for this micro-batch (normalised by ``step.counts[self.count_key]``)."""
