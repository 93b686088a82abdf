"""The fused option of the response terms: divergences and the data CE from last hidden states, chunk by chunk.

A causal LM's logits are ``F.linear(h, W, b)`` of its final hidden states ``h`` and its output
projection (``get_output_embeddings()``). With a 50k-256k vocabulary the ``(batch, seq, vocab)``
logits of the two models are most of a distillation step's memory. A term with ``fused: true``
reads ``h`` and ``(W, b)`` of both models instead and computes the divergence
(:func:`~hf_distill.losses.fused_linear_kl_loss`) or the cross-entropy on the data
(:func:`~hf_distill.losses.fused_ce.fused_linear_cross_entropy`) a few positions at a time; the
models run with ``logits_to_keep=1`` and ``output_hidden_states=[-1]``, so neither full logits
tensor ever exists. Value and gradients equal the dense path's (same temperature convention:
both logits divided by T, the divergence times T^2; same masks and global item counts).

``fused: auto`` (the default) takes the fused path when every model involved qualifies (a causal
LM with a plain ``torch.nn.Linear`` head, ``logits_to_keep`` in its forward, no logit soft-capping
or scaling), the vocabulary has at least ``fused_vocab_threshold`` entries, the teacher source
gives live hidden states, no term in the objective still needs the full logits, and the run is not
sharded (FSDP / DeepSpeed shard the projection). ``fused: true`` insists and says why when it
cannot; ``fused: false`` keeps the dense path. The first fused step checks, per model, that
``F.linear(h, W, b)`` reproduces the model's own logits at the one position it still computes.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn

from ..modeling import forward_parameters, output_size, task_kind, unwrap
from .base import ModelTensors, Term

__all__ = ["FusableTerm", "fused_model_refusal", "fused_output_flags", "settle_fused", "with_head"]

# Config attributes through which a model scales or caps its logits after the projection.
_LOGIT_TRANSFORMS = {"final_logit_softcapping": None, "logit_scale": 1.0, "logits_scaling": 1.0,
                     "output_logits_scale": 1.0}
_CHECKED: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()
_HEAD_COPIES: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


class FusableTerm(Term):
    """A term with the ``fused: auto | true | false`` option. ``fused`` is settled by the trainer
    (:func:`settle_fused`); until then, and outside it, the term computes densely."""

    fused = False

    def parse_fused(self) -> str:
        value = self.config.get("fused", "auto")
        text = str(value).strip().lower()
        if isinstance(value, bool) or text in ("true", "false", "auto"):
            return text
        raise ValueError(f"term {self.loss_name!r}: fused must be auto, true or false, got {value!r}")

    def setup(self, student, teachers, args):
        super().setup(student, teachers, args)
        self.fused_request = self.parse_fused()


def fused_model_refusal(model) -> str | None:
    """Why ``model``'s logits cannot be formed from its last hidden states by the fused losses (None: they can)."""
    kind = task_kind(model)
    if kind != "causal_lm":
        return f"it is a {kind} model, not a causal LM"
    base = unwrap(model)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if type(head) is not nn.Linear:
        return (f"its output projection is a {type(head).__name__}, not a plain torch.nn.Linear (adapters, "
                "quantized or custom heads are computed densely)")
    params = forward_parameters(model)
    if params is not None and "logits_to_keep" not in params:
        return f"{type(base).__name__}.forward takes no logits_to_keep, so it would compute the full logits anyway"
    config = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
    for attr, neutral in _LOGIT_TRANSFORMS.items():
        value = getattr(config, attr, neutral)
        if value is not None and value != neutral:
            return f"its logits are transformed after the projection ({attr}={value})"
    return None


def _term_refusal(term: FusableTerm, student, teachers: list, provides: set, args) -> str | None:
    """Why ``term`` cannot take the fused path in this run (None: it can)."""
    if getattr(args, "fsdp", None) or getattr(args, "deepspeed", None):
        return "FSDP / DeepSpeed shard the output projection, which the fused loss reads whole"
    if term.uses_teacher and getattr(args, "teacher_sharding", "none") == "fsdp" and getattr(args, "world_size", 1) > 1:
        return "the teacher is sharded across processes (teacher_sharding=fsdp), so its output projection is too"
    reason = fused_model_refusal(student)
    if reason:
        return f"the student cannot: {reason}"
    if not term.uses_teacher:
        return None
    if "last_hidden" not in provides or not teachers:
        return "the teacher source gives no live hidden states and output projection (stored outputs are logits)"
    if term.teacher_index is None and len(teachers) > 1:
        return "several teachers are averaged into one target, which needs their full logits"
    for teacher in teachers if term.teacher_index is None else [teachers[term.teacher_index]]:
        reason = fused_model_refusal(teacher)
        if reason:
            return f"the teacher cannot: {reason}"
    return None


def settle_fused(objective, student, teachers: list, provides, args) -> None:
    """Decide, once per run, which fusable terms of ``objective`` take the fused path (see the module docs).

    Raises ValueError for a term with ``fused: true`` that cannot, naming the reason.
    """
    terms = [t for t in objective.active_terms if isinstance(t, FusableTerm)]
    if not terms:
        return
    threshold = int(getattr(args, "fused_vocab_threshold", 32768))
    vocab = output_size(student) or 0
    chosen = []
    for term in terms:
        request = getattr(term, "fused_request", "auto")
        if request == "false":
            continue
        reason = _term_refusal(term, student, teachers, set(provides), args)
        if request == "true" and reason:
            raise ValueError(f"term {term.loss_name!r} has fused: true, but {reason}; set fused: auto or false")
        if request == "true" or (reason is None and vocab >= threshold):
            chosen.append(term)
    forced = [t for t in chosen if t.fused_request == "true"]
    # `auto` only pays off when no other term makes the models compute their full logits anyway.
    dense_readers = [t for t in objective.active_terms if t not in chosen and "logits" in t.needs]
    for term in chosen if not dense_readers else forced:
        term.fused = True
        term.needs = frozenset({"last_hidden"})


def fused_output_flags(needs: set) -> dict:
    """Keyword arguments that make a causal LM return its last hidden states instead of its full logits."""
    if "last_hidden" not in needs:
        return {}
    flags = {"output_hidden_states": True if "hidden_states" in needs else [-1]}
    if "logits" not in needs:
        flags["logits_to_keep"] = 1  # one position of logits: (batch, 1, vocab)
    return flags


def _check_head(model, hidden: torch.Tensor, weight, bias, logits: torch.Tensor | None) -> None:
    """Once per model: the projection of the last position's hidden state equals the model's own logits there."""
    if model in _CHECKED or logits is None:
        return
    with torch.no_grad():
        mine = F.linear(hidden[:, -1:].to(weight.dtype), weight, bias).float()
        theirs = logits[:, -1:].float()
        low = torch.float32 not in (hidden.dtype, weight.dtype, logits.dtype)
        tol = (2e-2 if low else 1e-4) * (1.0 + float(theirs.abs().max()))
        if mine.shape != theirs.shape or float((mine - theirs).abs().max()) > tol:
            raise ValueError(f"{type(unwrap(model)).__name__}: its logits are not the output projection of its last "
                             "hidden states (logit scaling or soft-capping?), so the fused loss would compute "
                             "something else; set fused: false on the response terms and the task term")
    _CHECKED.add(model)


def _head_on(model, weight: torch.Tensor, bias, device: torch.device):
    """The projection on ``device``: the parameters themselves, or a copy kept until they change (a frozen teacher
    on another device copies its head once, not at every step)."""
    if weight.device == device:
        return weight, bias
    cached = _HEAD_COPIES.get(model)
    version = (weight._version, None if bias is None else bias._version, device)
    if cached is None or cached[0] != version:
        cached = (version, weight.detach().to(device), None if bias is None else bias.detach().to(device))
        _HEAD_COPIES[model] = cached
    return cached[1], cached[2]


def with_head(tensors: ModelTensors, model, device: torch.device | None = None) -> ModelTensors:
    """``tensors`` with ``last_hidden_state`` and ``head`` filled in from ``model`` (run with
    :func:`fused_output_flags`); on ``device`` when given."""
    if not tensors.hidden_states or tensors.hidden_states[-1] is None:
        raise ValueError(f"{type(unwrap(model)).__name__} returned no hidden states; the fused loss needs its last "
                         "hidden states (output_hidden_states)")
    head = unwrap(model).get_output_embeddings()
    hidden = tensors.hidden_states[-1]
    _check_head(model, hidden, head.weight, head.bias, tensors.logits)
    device = hidden.device if device is None else device
    tensors.last_hidden_state = hidden.to(device)
    tensors.head = _head_on(model, head.weight, head.bias, device)
    return tensors
