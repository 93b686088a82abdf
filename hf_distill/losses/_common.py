"""Shared helpers for loss functions: masking and explicit normalisation.

Every loss in :mod:`hf_distill.losses` follows one convention:

* inputs are computed on in float32, whatever dtype they arrive in;
* ``mask`` (bool, same leading shape as the per-position loss) selects the positions that count;
* the result is ``sum(per-position loss over selected positions) / num_items``.

``num_items`` defaults to the number of selected positions (a plain masked mean). The trainer
passes the number of valid positions in the whole optimiser step (all gradient-accumulation
micro-batches, all processes) so that accumulation and data parallelism give exactly the same
loss and gradients as one large batch.
"""

from __future__ import annotations

import torch


def masked_sum_and_count(per_position: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum ``per_position`` over positions where ``mask`` is true; return (sum, count)."""
    if mask is None:
        return per_position.sum(), torch.tensor(per_position.numel(), device=per_position.device)
    mask = mask.to(torch.bool)
    if mask.shape != per_position.shape:
        raise ValueError(
            f"mask has shape {tuple(mask.shape)} but the per-position loss has shape {tuple(per_position.shape)}; "
            "pass a mask covering every position except the last (class / feature) dimension."
        )
    # where() rather than multiplication: a masked position holding inf/nan must not leak in.
    total = torch.where(mask, per_position, torch.zeros((), dtype=per_position.dtype, device=per_position.device)).sum()
    return total, mask.sum()


def normalise(total: torch.Tensor, count: torch.Tensor, num_items: int | float | torch.Tensor | None) -> torch.Tensor:
    """Divide ``total`` by ``num_items`` (or by ``count`` when ``num_items`` is None); 0 when nothing counts."""
    denominator = count if num_items is None else num_items
    if not torch.is_tensor(denominator):
        denominator = torch.tensor(float(denominator), device=total.device)
    denominator = denominator.to(device=total.device, dtype=total.dtype)
    return total / denominator.clamp(min=1.0)
