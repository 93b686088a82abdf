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


def compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The dtype a loss computes in: float64 stays float64, everything else becomes float32."""
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def upcast(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in :func:`compute_dtype` (a no-op for float32 and float64 tensors)."""
    return tensor.to(compute_dtype(tensor))


def check_mask(
    mask: torch.Tensor | None, shape: torch.Size | tuple[int, ...], what: str = "the positions"
) -> torch.Tensor | None:
    """Validate a boolean position mask against ``shape``; return it as ``torch.bool`` (or None)."""
    if mask is None:
        return None
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"mask has shape {tuple(mask.shape)} but {what} have shape {tuple(shape)}")
    return mask.to(torch.bool)


def zero_masked(tensor: torch.Tensor, mask: torch.Tensor | None, value: float = 0.0) -> torch.Tensor:
    """Replace the entries of ``tensor`` at positions where ``mask`` is false by ``value``.

    ``mask`` covers the leading dimensions of ``tensor``. Losses call this on their inputs so that
    garbage at padding positions (inf, nan, huge values) can change neither the loss nor the
    gradient of the selected positions: ``where`` sends a zero gradient to the replaced entries and
    no inf/nan ever enters the arithmetic.
    """
    if mask is None:
        return tensor
    while mask.dim() < tensor.dim():
        mask = mask.unsqueeze(-1)
    return torch.where(mask, tensor, torch.full((), value, dtype=tensor.dtype, device=tensor.device))


def kl_rows(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """``sum_c p[c] * (log p[c] - log q[c])`` over the last dimension, with ``0 * log 0 = 0``.

    Entries where ``p == 0`` contribute exactly 0 even when ``log q`` is ``-inf`` there (for
    example a vocabulary entry both models mask out), and their gradient is 0 rather than nan:
    the difference is replaced by 0 before the product, so the product's backward never sees inf.
    """
    p = log_p.exp()
    diff = torch.where(p == 0, torch.zeros((), dtype=log_p.dtype, device=log_p.device), log_p - log_q)
    return (p * diff).sum(-1)
