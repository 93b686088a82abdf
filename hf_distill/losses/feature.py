"""Feature-based knowledge: losses between student and teacher hidden states.

Hidden states have shape ``(..., H)``; ``mask`` has shape ``(...)`` (usually ``(batch, seq)``,
true on real tokens). See :mod:`hf_distill.losses._common` for normalisation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import masked_sum_and_count, normalise


def _check_hidden(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor) -> None:
    if student_hidden.shape != teacher_hidden.shape:
        raise ValueError(
            f"student hidden states {tuple(student_hidden.shape)} and teacher hidden states "
            f"{tuple(teacher_hidden.shape)} differ; for different widths add a learned projection."
        )


def cosine_loss(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    num_items: int | float | torch.Tensor | None = None,
    eps: float = 1e-8,
) -> torch.Tensor:
    """``1 - cos(h_S, h_T)`` per position, averaged over selected positions.

    Equals DistilBERT's ``CosineEmbeddingLoss()(h_S, h_T, target=ones)`` on the non-pad tokens.
    """
    _check_hidden(student_hidden, teacher_hidden)
    cos = F.cosine_similarity(student_hidden.float(), teacher_hidden.float(), dim=-1, eps=eps)
    total, count = masked_sum_and_count(1.0 - cos, mask)
    return normalise(total, count, num_items)


def hidden_mse_loss(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    num_items: int | float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean squared error over the hidden dimension, averaged over selected positions.

    With every position selected this equals ``F.mse_loss(h_S, h_T)`` (TinyBERT's hidden loss).
    """
    _check_hidden(student_hidden, teacher_hidden)
    per_position = (student_hidden.float() - teacher_hidden.float()).pow(2).mean(-1)
    total, count = masked_sum_and_count(per_position, mask)
    return normalise(total, count, num_items)
