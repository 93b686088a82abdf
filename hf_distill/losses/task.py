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
    flat_logits = logits.reshape(-1, logits.shape[-1])
    flat_labels = labels.reshape(-1)
    valid = flat_labels != ignore_index
    count = valid.sum()
    if flat_labels.device.type == "cpu":
        # Only labelled rows reach the softmax (15% of the positions for masked LM), a fraction of the
        # work; on the CPU reading the count costs nothing.
        if int(count) < flat_labels.numel():
            flat_logits, flat_labels = flat_logits[valid], flat_labels[valid]
    # On an accelerator every row goes in and ignore_index leaves the unlabelled ones out (same value and
    # gradient): reading the count, or selecting rows with a boolean mask (which reads it too), would make
    # the host wait for the device on every step.
    total = F.cross_entropy(flat_logits.float(), flat_labels, ignore_index=ignore_index, reduction="sum",
                            label_smoothing=label_smoothing)
    return normalise(total, count, num_items)


def ctc_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    input_lengths: torch.Tensor,
    *,
    blank: int = 0,
    num_items: int | float | torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    zero_infinity: bool = True,
) -> torch.Tensor:
    """CTC loss of frame logits ``(B, T, V)`` against padded ``labels`` ``(B, S)`` (``ignore_index`` pads).

    Summed over sequences and divided by ``num_items`` (default: the number of sequences).
    """
    log_probs = F.log_softmax(logits.float(), dim=-1).transpose(0, 1)
    valid = labels != ignore_index
    targets = labels.masked_select(valid)
    total = F.ctc_loss(log_probs, targets, input_lengths.long(), valid.sum(-1), blank=blank, reduction="sum",
                       zero_infinity=zero_infinity)
    return normalise(total, torch.tensor(labels.shape[0], device=total.device), num_items)
