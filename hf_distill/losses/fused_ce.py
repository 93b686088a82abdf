"""Cross-entropy on hard labels from the last hidden states and the output projection, chunk by chunk.

:func:`fused_linear_cross_entropy` is the hard-label twin of
:func:`~hf_distill.losses.chunked.fused_linear_kl_loss`: the logits ``h @ W.T + b`` of ``chunk_size``
labelled positions at a time are formed, their cross-entropy and its gradient computed, and the
gradients of the hidden states, the projection weight and its bias accumulated, so the full
``(positions, vocab)`` logits tensor never exists. Conventions are those of
:func:`~hf_distill.losses.task.cross_entropy_loss`: float32 (float64 stays float64), positions whose
label is ``ignore_index`` skipped, result = summed loss / ``num_items`` (default: the labelled
positions), ``label_smoothing`` as in :func:`torch.nn.functional.cross_entropy`.
"""

from __future__ import annotations

import torch

from ._common import compute_dtype
from .chunked import LinearGrads, linear_into, prepare_rows, row_chunks, scale_saved_grads, take_rows
from .task import IGNORE_INDEX

__all__ = ["fused_linear_cross_entropy"]


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, labels, rows, denominator, chunk_size, label_smoothing):
        h_flat = h.reshape(-1, h.shape[-1])
        labels_flat = labels.reshape(-1)
        grads = LinearGrads(h_flat, weight, bias, ctx.needs_input_grad[:3])
        dtype = compute_dtype(h)
        vocab = weight.shape[0]
        n_selected = h_flat.shape[0] if rows is None else rows.numel()
        n_buf = min(chunk_size, max(n_selected, 1))
        logits_buf = torch.empty(n_buf, vocab, dtype=dtype, device=h.device)
        scratch = torch.empty(n_buf, vocab, dtype=dtype, device=h.device)
        total = torch.zeros((), dtype=dtype, device=h.device)
        scale = (1.0 / denominator).to(dtype)
        eps = float(label_smoothing)
        for sel in row_chunks(h_flat.shape[0], rows, chunk_size):
            hs = take_rows(h_flat, sel)
            n = hs.shape[0]
            y = take_rows(labels_flat, sel).unsqueeze(1)
            z = linear_into(logits_buf[:n], hs, weight, bias)
            row_max = z.amax(dim=-1, keepdim=True)
            p = torch.sub(z, row_max, out=scratch[:n]).exp_()
            log_z = p.sum(dim=-1, keepdim=True).log_().add_(row_max)  # logsumexp per row
            nll = log_z - z.gather(1, y)
            loss = nll if eps == 0.0 else (1.0 - eps) * nll + eps * (log_z - z.mean(dim=-1, keepdim=True))
            total += loss.sum()
            if grads.any:
                # d loss / d z = softmax(z) - (1 - eps) * onehot(y) - eps / V
                grad = p.div_(p.sum(dim=-1, keepdim=True))
                if eps:
                    grad.sub_(eps / vocab)
                grad.scatter_add_(1, y, torch.full_like(y, -(1.0 - eps), dtype=grad.dtype))
                grads.add(sel, hs, grad.mul_(scale))
        ctx.save_for_backward(*grads.saved(h.shape))
        return total / denominator

    @staticmethod
    def backward(ctx, grad_output):
        grad_h, grad_w, grad_b = scale_saved_grads(grad_output, list(ctx.saved_tensors))
        return grad_h, grad_w, grad_b, None, None, None, None, None


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    chunk_size: int = 1024,
    num_items: int | float | torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """``cross_entropy_loss(F.linear(hidden, lm_head_weight, bias), labels, ...)`` without the full logits.

    ``hidden`` ``(..., H)`` are the final hidden states at the labelled positions' inputs (for a causal
    LM: already shifted, like the logits), ``lm_head_weight`` ``(V, H)`` the output projection,
    ``labels`` ``(...)`` the target ids (``ignore_index``: not counted). Value and gradients (with
    respect to ``hidden``, ``lm_head_weight`` and ``bias``) equal the dense loss's; peak extra memory
    is two ``(chunk_size, V)`` buffers plus the gradients themselves.
    """
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"hidden states {tuple(hidden.shape)} do not match labels {tuple(labels.shape)}")
    if lm_head_weight.dim() != 2 or lm_head_weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"projection weight {tuple(lm_head_weight.shape)} does not match the hidden states "
                         f"{tuple(hidden.shape)}: expected (vocab, hidden)")
    if bias is not None and tuple(bias.shape) != (lm_head_weight.shape[0],):
        raise ValueError(f"bias {tuple(bias.shape)} does not match the vocabulary size {lm_head_weight.shape[0]}")
    if not 0.0 <= float(label_smoothing) < 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1), got {label_smoothing!r}")
    valid = labels != ignore_index
    vocab = lm_head_weight.shape[0]
    if bool(((labels < 0) | (labels >= vocab))[valid].any()):
        raise ValueError(f"labels must be token ids in [0, {vocab}) or {ignore_index} (ignored)")
    dtype = compute_dtype(hidden)
    rows, denominator = prepare_rows(hidden.shape[:-1], valid, num_items, chunk_size, 1.0, 0.0, hidden.device, dtype)
    if not torch.is_grad_enabled():  # evaluation: no gradient buffers
        hidden, lm_head_weight = hidden.detach(), lm_head_weight.detach()
        bias = None if bias is None else bias.detach()
    return _FusedLinearCrossEntropy.apply(hidden, lm_head_weight, bias, labels.to(hidden.device), rows, denominator,
                                          chunk_size, float(label_smoothing))
