"""Freezing the weights a student copied from its teacher, so that a small training set cannot move them."""

from __future__ import annotations

from torch import nn

__all__ = ["freeze_embeddings"]


def freeze_embeddings(model: nn.Module, *, positions: bool = False) -> int:
    """Freeze ``model``'s token embeddings (and an output head tied to them; an untied head keeps training).

    Copied from the teacher, they stay its own. ``positions``: also the learned position embeddings of its
    decoder (``embed_positions``, e.g. Whisper's). Returns the number of parameters this call froze (0 for
    those already frozen). ``requires_grad`` is not saved: freeze again after reloading or after replacing
    an embedding table.
    """
    modules = [model.get_input_embeddings()]
    if positions:
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
        table = getattr(decoder, "embed_positions", None)
        if not isinstance(table, nn.Module):
            raise ValueError(f"{type(model).__name__} has no learned decoder position embeddings (embed_positions) "
                             "to freeze; call freeze_embeddings without positions")
        modules.append(table)
    frozen = 0
    for param in (p for module in modules for p in module.parameters()):
        if param.requires_grad:
            param.requires_grad_(False)
            frozen += param.numel()
    return frozen
