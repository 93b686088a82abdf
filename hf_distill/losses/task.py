"""Task (hard-label) losses, normalised like every other loss in hf_distill."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import normalise

IGNORE_INDEX = -100


def cross_entropy_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    num_items: int | float | torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Cross-entropy summed over labelled positions (``labels != ignore_index``) / ``num_items``.

    Works for masked-LM (``logits (B, L, V)``, ``labels (B, L)``), sequence classification
    (``(B, C)``, ``(B,)``) and already-shifted causal-LM logits. With ``num_items=None`` it equals
    ``F.cross_entropy(..., ignore_index=-100)`` (mean over labelled positions).
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match labels {tuple(labels.shape)}")
    flat_logits = logits.float().reshape(-1, logits.shape[-1])
    flat_labels = labels.reshape(-1)
    total = F.cross_entropy(
        flat_logits, flat_labels, ignore_index=ignore_index, reduction="sum", label_smoothing=label_smoothing
    )
    count = (flat_labels != ignore_index).sum()
    return normalise(total, count, num_items)
