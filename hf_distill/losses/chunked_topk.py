"""KL against a teacher stored as top-k + tail mass, a few positions at a time, its gradient formed in the same pass.

:func:`chunked_topk_kl_loss` gives the value and the gradient of
:func:`~hf_distill.losses.response.topk_kl_loss` (``teacher_values="logprobs"``) while only ever holding a
``(chunk_size, V)`` buffer besides one student-sized gradient tensor: the dense version builds about ten
full ``(positions, V)`` temporaries (scaled logits, their masked copy, the scatter for the student's tail,
exponentials, and their gradients). Per position, with ``K`` the stored indices, ``s = logits / T``::

    loss = T^2 * [ sum_K p_T (log p_T - log p_S) + p_T,m (log p_T,m - log p_S,m) ]
    d loss / d logits_j = T * ( P p_S,j - p_T,j [j in K] - p_T,m [j not in K] p_S,j / p_S,m )

where ``P = sum_K p_T + p_T,m`` and ``p_S,m = sum_{j not in K} p_S,j`` comes from a log-sum-exp over the
positions outside ``K`` (no cancellation when the top-k holds almost all the mass); ``p_S,j / p_S,m`` is
formed as ``exp(log p_S,j - log p_S,m)``, exact however small the tail.
"""

from __future__ import annotations

import math

import torch

from ._common import check_mask, compute_dtype

__all__ = ["chunked_topk_kl_loss"]


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    x = x.clamp(max=0.0)
    near = torch.log(-torch.expm1(x.clamp(min=-math.log(2.0))))
    far = torch.log1p(-torch.exp(x.clamp(max=-math.log(2.0))))
    return torch.where(x > -math.log(2.0), near, far)


def _xlogy_diff(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """``sum p (log p - log q)`` over the last dimension with ``0 log 0 = 0``."""
    p = log_p.exp()
    return (p * torch.where(p == 0, torch.zeros((), dtype=log_p.dtype, device=log_p.device), log_p - log_q)).sum(-1)


class _ChunkedTopKKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_logits, log_p_t, indices, log_tail_t, rows, denominator, chunk_size, temperature):
        vocab, k = student_logits.shape[-1], indices.shape[-1]
        dtype = compute_dtype(student_logits)
        s_flat = student_logits.reshape(-1, vocab)
        lp_flat, idx_flat = log_p_t.reshape(-1, k), indices.reshape(-1, k)
        tail_flat = None if log_tail_t is None else log_tail_t.reshape(-1)
        need_grad = ctx.needs_input_grad[0]
        grad_flat = torch.zeros_like(s_flat) if need_grad else None
        total = torch.zeros((), dtype=dtype, device=student_logits.device)
        n_rows = s_flat.shape[0] if rows is None else rows.numel()
        buffer = torch.empty(min(chunk_size, max(n_rows, 1)), vocab, dtype=dtype, device=student_logits.device)
        scale = (temperature / denominator).to(dtype)
        for start in range(0, n_rows, chunk_size):
            stop = min(start + chunk_size, n_rows)
            sel = slice(start, stop) if rows is None else rows[start:stop]
            take = (lambda t: t[sel]) if rows is None else (lambda t: t.index_select(0, sel))  # noqa: E731
            n = stop - start
            s = buffer[:n].copy_(take(s_flat)).div_(temperature)
            s.sub_(torch.logsumexp(s, dim=-1, keepdim=True))  # log p_S
            idx = take(idx_flat).long()
            lp = take(lp_flat).to(dtype)
            log_ps_k = s.gather(-1, idx)
            loss = _xlogy_diff(lp, log_ps_k)
            p_t = lp.exp()
            if tail_flat is not None:
                log_tail_t_rows = take(tail_flat).to(dtype)
                s.scatter_(-1, idx, float("-inf"))
                log_tail_s = torch.logsumexp(s, dim=-1)
                loss = loss + _xlogy_diff(log_tail_t_rows[:, None], log_tail_s[:, None])
            total += loss.sum()
            if not need_grad:
                continue
            if tail_flat is not None:
                tail_t = log_tail_t_rows.exp()
                mass = p_t.sum(-1) + tail_t
                finite = torch.isfinite(log_tail_s)
                shift = torch.where(finite, log_tail_s, torch.zeros_like(log_tail_s))
                s.sub_(shift[:, None]).exp_()  # p_S,j / p_S,m outside K, 0 at K
                s.mul_(torch.where(finite, mass * log_tail_s.exp() - tail_t, torch.zeros_like(mass))[:, None])
            else:
                mass = p_t.sum(-1)
                s.exp_()  # p_S
                s.mul_(mass[:, None])
            s.scatter_(-1, idx, mass[:, None] * log_ps_k.exp() - p_t)
            s.mul_(scale)
            if rows is None:
                grad_flat[sel] = s.to(grad_flat.dtype)
            else:
                grad_flat.index_copy_(0, sel, s.to(grad_flat.dtype))
        if need_grad:
            ctx.save_for_backward(grad_flat.view(student_logits.shape))
        return total * (temperature * temperature) / denominator

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        if not torch.equal(grad_output, torch.ones_like(grad_output)):
            grad = grad * grad_output.to(grad.dtype)
        return grad, None, None, None, None, None, None, None


def chunked_topk_kl_loss(
    student_logits: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    teacher_topk_indices: torch.Tensor,
    *,
    teacher_tail_mass: torch.Tensor | None = None,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    num_items: int | float | torch.Tensor | None = None,
    chunk_size: int = 32,
) -> torch.Tensor:
    """:func:`~hf_distill.losses.response.topk_kl_loss` (teacher log-probabilities), ``chunk_size`` positions at a
    time: the same value and gradient with respect to ``student_logits``; masked positions are skipped."""
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    if not float(temperature) > 0 or math.isinf(float(temperature)):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
    if teacher_topk_logprobs.shape != teacher_topk_indices.shape:
        raise ValueError(f"teacher top-k values {tuple(teacher_topk_logprobs.shape)} and indices "
                         f"{tuple(teacher_topk_indices.shape)} must have the same shape")
    if teacher_topk_indices.shape[:-1] != student_logits.shape[:-1]:
        raise ValueError(f"teacher top-k indices {tuple(teacher_topk_indices.shape)} do not match the student logits "
                         f"{tuple(student_logits.shape)} (all dimensions but the last must be equal)")
    vocab, k = student_logits.shape[-1], teacher_topk_indices.shape[-1]
    if k > vocab:
        raise ValueError(f"top-k of size {k} is larger than the student's vocabulary ({vocab})")
    device, dtype = student_logits.device, compute_dtype(student_logits)
    mask = check_mask(mask, student_logits.shape[:-1], "the logits (without the last dimension)")
    rows = None if mask is None else mask.to(device).reshape(-1).nonzero().squeeze(1)
    count = math.prod(student_logits.shape[:-1]) if rows is None else rows.numel()
    denominator = count if num_items is None else num_items
    if not torch.is_tensor(denominator):
        denominator = torch.tensor(float(denominator))
    denominator = denominator.detach().to(device=device, dtype=dtype).clamp(min=1.0)
    log_p_t = teacher_topk_logprobs.detach().to(device)
    log_tail_t = None
    if k < vocab:
        if teacher_tail_mass is None:
            log_tail_t = _log1mexp(torch.logsumexp(log_p_t.to(dtype), dim=-1))
        else:
            if teacher_tail_mass.shape != student_logits.shape[:-1]:
                raise ValueError(f"teacher_tail_mass has shape {tuple(teacher_tail_mass.shape)}, expected "
                                 f"{tuple(student_logits.shape[:-1])} (one mass per position)")
            log_tail_t = torch.log(teacher_tail_mass.detach().to(device, dtype).clamp(0.0, 1.0))
    if not torch.is_grad_enabled():
        student_logits = student_logits.detach()
    return _ChunkedTopKKL.apply(student_logits, log_p_t, teacher_topk_indices.detach().to(device), log_tail_t, rows,
                                denominator, chunk_size, float(temperature))
