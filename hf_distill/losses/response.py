"""Response-based knowledge: losses on the teacher's and the student's output logits.

All functions take logits of shape ``(..., C)`` (``C`` classes or vocabulary entries), an optional
boolean ``mask`` of shape ``(...)`` and an optional ``num_items`` normaliser; see
:mod:`hf_distill.losses._common` for the convention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import masked_sum_and_count, normalise


def _check_logits(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> None:
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ; "
            "teacher and student must share the output space (same vocabulary / label set) and the same batch."
        )


def kl_div_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    num_items: int | float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Soft-target KL divergence ``KL(p_T || p_S)`` at temperature ``T``, times ``T**2``.

    ``p = softmax(logits / T)``. Per position:
    ``T^2 * sum_c p_T[c] * (log p_T[c] - log p_S[c])``. With ``num_items=None`` this equals
    DistilBERT's ``KLDivLoss(reduction="batchmean")(log_softmax(s/T), softmax(t/T)) * T**2`` over
    the selected rows.
    """
    _check_logits(student_logits, teacher_logits)
    t = float(temperature)
    log_p_s = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float() / t, dim=-1)
    # xlogy-style: positions where p_T == 0 contribute 0 even if log p_S is -inf.
    per_position = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)
    total, count = masked_sum_and_count(per_position, mask)
    return normalise(total, count, num_items) * (t * t)


def logit_mse_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    num_items: int | float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Squared error between raw logits, summed over classes, averaged over selected positions.

    Equals DistilBERT's ``MSELoss(reduction="sum")(s, t) / n_rows``.
    """
    _check_logits(student_logits, teacher_logits)
    per_position = (student_logits.float() - teacher_logits.float()).pow(2).sum(-1)
    total, count = masked_sum_and_count(per_position, mask)
    return normalise(total, count, num_items)
