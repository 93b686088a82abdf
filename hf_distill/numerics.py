"""Guards against non-finite numbers: a run stops (or skips the batch) instead of training on NaN.

Three places are watched, each at the cost of one device-to-host read:

* every training micro-batch's loss (if any term is NaN or inf, so is the weighted sum);
* every optimiser step's gradient norm (a finite loss can still overflow in the backward pass);
* every save of the student: a model with a non-finite weight is never written.

On a non-finite loss, :func:`describe_nonfinite` names the terms and the tensors (teacher or
student, logits or hidden states) that hold non-finite values, so the message says where the
problem came from.
"""

from __future__ import annotations

from typing import Iterable

import torch


class NonFiniteError(RuntimeError):
    """Training met a NaN or inf (loss term, teacher output, gradient or weight) and stopped."""


def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """Whether every value of every tensor is finite, with one device-to-host read."""
    flags = [torch.isfinite(t).all() for t in tensors if torch.is_tensor(t) and t.is_floating_point()]
    if not flags:
        return True
    return bool(torch.stack(flags).all())


def count_nonfinite(tensor: torch.Tensor) -> int:
    return int((~torch.isfinite(tensor)).sum()) if tensor.is_floating_point() else 0


def describe_nonfinite(terms: dict[str, torch.Tensor], student, teachers: list, batch: dict) -> str:
    """Which terms are non-finite, which model tensors hold non-finite values, and what the batch was."""
    values = ", ".join(f"{name} = {float(v.detach()):.4g}" for name, v in sorted(terms.items()))
    sources = []
    for label, tensors in [("student", student)] + [(f"teacher {i}" if len(teachers) > 1 else "teacher", t)
                                                     for i, t in enumerate(teachers)]:
        for name, tensor in tensors.named_tensors().items():
            bad = count_nonfinite(tensor)
            if bad:
                sources.append(f"{label} {name} ({bad} of {tensor.numel()} values)")
    for name, tensor in batch.items():
        if torch.is_tensor(tensor) and tensor.is_floating_point():
            bad = count_nonfinite(tensor)
            if bad:
                sources.append(f"batch column {name} ({bad} of {tensor.numel()} values)")
    where = "; non-finite values in: " + ", ".join(sources[:6]) if sources else ""
    if len(sources) > 6:
        where += f" and {len(sources) - 6} more"
    shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in batch.items() if torch.is_tensor(v))
    ids = batch.get("input_ids")
    first = f"; first row input_ids[:12] = {ids[0, :12].tolist()}" if torch.is_tensor(ids) and ids.dim() == 2 else ""
    cause = ""
    if any(s.startswith("student") for s in sources) and not any(s.startswith("teacher") for s in sources):
        cause = " (only the student's outputs are non-finite: its weights or activations diverged; lower the " \
                "learning rate or enable max_grad_norm)"
    elif any(s.startswith("teacher") for s in sources):
        cause = " (the teacher's outputs are non-finite: check the teacher's weights and teacher_dtype; float16 " \
                "overflows where bfloat16 does not)"
    return f"terms: {values}{where}{cause}; batch: {shapes}{first}"


def nonfinite_parameters(model: torch.nn.Module, limit: int = 5) -> list[str]:
    """Names of (up to ``limit``) parameters holding a NaN or inf; empty when the model is finite."""
    params = [(n, p) for n, p in model.named_parameters() if p.is_floating_point()]
    if all_finite(p for _, p in params):
        return []
    return [n for n, p in params if not bool(torch.isfinite(p).all())][:limit]
