"""Memory-bounded KL / generalized JSD for large vocabularies.

The dense losses in :mod:`hf_distill.losses.response` build several full ``(tokens, vocab)``
float32 tensors (log-probabilities of both models, teacher probabilities, their products) and keep
some of them alive for the backward pass. At 4096 tokens and a 128k vocabulary each of those is
2 GiB. The functions here give the same value and the same gradient while only ever holding
``chunk_size`` rows of them:

* :func:`chunked_kl_loss` / :func:`chunked_generalized_jsd_loss` take the two logits tensors and
  walk over the selected positions ``chunk_size`` rows at a time. They are a custom
  :class:`torch.autograd.Function` that computes the gradient with respect to the student's logits
  chunk by chunk *during the forward pass* and stores it (one tensor the size of the student's
  logits, in their dtype); backward only rescales it. Nothing else of full size is kept.
* :func:`fused_linear_kl_loss` takes the final hidden states and output projections ("LM heads")
  of both models and forms both logits per chunk only, so neither full logits tensor ever exists.
  The gradient goes to the student's hidden states, projection weight and bias, accumulated chunk
  by chunk; the teacher gets none.

Conventions are those of the dense losses: computed in float32 (float64 stays float64), boolean
``mask`` over positions (padding rows are skipped entirely, whatever they hold), result = sum over
selected positions / ``num_items`` (default: their count), every divergence times ``T**2``.
``beta`` follows :func:`~hf_distill.losses.response.generalized_jsd_loss`: 0 is the forward KL
``KL(p_T || p_S)``, 1 the reverse KL ``KL(p_S || p_T)``, in between the generalized JSD with the
mixture ``m = beta * p_T + (1 - beta) * p_S`` formed in log space.

The teacher is a constant target: no gradient is returned for the teacher's inputs.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from ._common import check_mask, compute_dtype

__all__ = [
    "LinearGrads",
    "Workspace",
    "chunked_generalized_jsd_loss",
    "chunked_kl_loss",
    "divergence_chunk",
    "fused_linear_kl_loss",
    "gather_rows_into",
    "linear_into",
    "prepare_rows",
    "put_rows",
    "row_chunks",
    "scale_saved_grads",
    "take_rows",
]


class Workspace:
    """Reusable ``(rows, V)`` buffers for :func:`divergence_chunk`, allocated once per loss call.

    Reusing them across chunks matters for speed as much as for memory: a fresh multi-megabyte
    allocation per chunk and per temporary is page-faulted in by the OS every time.
    """

    def __init__(self, rows: int, vocab: int, dtype: torch.dtype, device: torch.device, beta: float) -> None:
        n_work = 2 if beta in (0.0, 1.0) else 3
        self.student = torch.empty(rows, vocab, dtype=dtype, device=device)
        self.teacher = torch.empty(rows, vocab, dtype=dtype, device=device)
        self.work = [torch.empty(rows, vocab, dtype=dtype, device=device) for _ in range(n_work)]
        self.flags = torch.empty(rows, vocab, dtype=torch.bool, device=device)


def _log_softmax_(x: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """``x <- log_softmax(x)`` in place, using ``scratch`` (same shape) instead of a new buffer."""
    row_max = x.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    torch.sub(x, row_max, out=scratch).exp_()
    log_z = scratch.sum(dim=-1, keepdim=True).log_().add_(row_max)
    return x.sub_(log_z)


def divergence_chunk(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    beta: float,
    temperature: float,
    need_grad: bool,
    workspace: Workspace | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row divergence of a chunk, and its gradient with respect to the student's logits.

    ``student_logits`` and ``teacher_logits`` are ``(rows, V)`` tensors in the compute dtype that
    the caller owns: they are overwritten, and the returned gradient *is* ``student_logits`` (no new
    full-size tensor). ``workspace`` provides the scratch buffers (else they are allocated).
    Returns ``(loss (rows,), grad (rows, V) | None)`` with ``loss = T^2 * D`` per row and
    ``grad = d loss / d student_logits = T * dD/ds`` for ``s = student_logits / T``:

    * forward KL (``beta == 0``): ``dD/ds = p_S - p_T``;
    * reverse KL (``beta == 1``): ``dD/ds = p_S * (log p_S - log p_T - D)``;
    * JSD: ``dD/ds = (1 - beta) * p_S * (log p_S - log m - KL(p_S || m))``.

    Classes with zero probability contribute exactly 0 (``0 * log 0 = 0``), as in the dense losses.
    """
    s, t = student_logits, teacher_logits
    rows = s.shape[0]
    if workspace is None:
        workspace = Workspace(rows, s.shape[1], s.dtype, s.device, beta)
    w1, w2 = workspace.work[0][:rows], workspace.work[1][:rows]
    flags = workspace.flags[:rows]
    if temperature != 1.0:
        s.mul_(1.0 / temperature)
        t.mul_(1.0 / temperature)
    log_p = _log_softmax_(s, w1)  # log p_S, in place
    log_q = _log_softmax_(t, w1)  # log p_T, in place
    grad = None
    if beta == 0.0:
        q = torch.exp(log_q, out=w1)
        terms = torch.sub(log_q, log_p, out=w2).mul_(q).masked_fill_(torch.eq(q, 0, out=flags), 0.0)
        loss = terms.sum(-1)
        if need_grad:
            grad = log_p.exp_().sub_(q)
    elif beta == 1.0:
        p = torch.exp(log_p, out=w1)
        diff = log_p.sub_(log_q)  # log p_S - log p_T, in place
        zero_p = torch.eq(p, 0, out=flags)
        loss = torch.mul(diff, p, out=w2).masked_fill_(zero_p, 0.0).sum(-1)
        if need_grad:
            grad = diff.sub_(loss[:, None]).mul_(p).masked_fill_(zero_p, 0.0)
    else:
        w3 = workspace.work[2][:rows]
        # log m = logaddexp(log p_S + log(1-beta), log p_T + log beta)
        #       = log p_T + log beta + softplus(log p_S - log p_T + log(1-beta) - log beta)
        log_m = torch.sub(log_p, log_q, out=w3).add_(math.log1p(-beta) - math.log(beta))
        log_m = torch.logaddexp(log_m, torch.zeros((), dtype=log_m.dtype, device=log_m.device), out=log_m)
        log_m.add_(log_q).add_(math.log(beta))
        q = torch.exp(log_q, out=w2)
        diff_q = log_q.sub_(log_m)  # log p_T - log m, in place
        kl_q = diff_q.mul_(q).masked_fill_(torch.eq(q, 0, out=flags), 0.0).sum(-1)
        p = torch.exp(log_p, out=w1)
        diff_p = log_p.sub_(log_m)  # log p_S - log m, in place
        zero_p = torch.eq(p, 0, out=flags)
        kl_p = torch.mul(diff_p, p, out=w3).masked_fill_(zero_p, 0.0).sum(-1)
        loss = beta * kl_q + (1.0 - beta) * kl_p
        if need_grad:
            grad = diff_p.sub_(kl_p[:, None]).mul_(p).mul_(1.0 - beta).masked_fill_(zero_p, 0.0)
    loss = loss * (temperature * temperature)
    if grad is not None:
        grad.mul_(temperature)
    return loss, grad


def row_chunks(n_rows: int, rows: torch.Tensor | None, chunk_size: int) -> Iterator[slice | torch.Tensor]:
    """Chunks of the selected rows: slices when every row counts, index tensors otherwise."""
    if rows is None:
        for start in range(0, n_rows, chunk_size):
            yield slice(start, min(start + chunk_size, n_rows))
    else:
        for start in range(0, rows.numel(), chunk_size):
            yield rows[start : start + chunk_size]


def take_rows(flat: torch.Tensor, sel: slice | torch.Tensor) -> torch.Tensor:
    return flat[sel] if isinstance(sel, slice) else flat.index_select(0, sel)


def gather_rows_into(buffer: torch.Tensor, flat: torch.Tensor, sel: slice | torch.Tensor) -> torch.Tensor:
    """Copy the selected rows of ``flat`` into ``buffer`` (converting the dtype); return ``buffer``."""
    if isinstance(sel, slice):
        return buffer.copy_(flat[sel])
    if flat.dtype == buffer.dtype:
        return torch.index_select(flat, 0, sel, out=buffer)
    return buffer.copy_(flat.index_select(0, sel))


def put_rows(flat: torch.Tensor, sel: slice | torch.Tensor, value: torch.Tensor) -> None:
    value = value.to(flat.dtype)
    if isinstance(sel, slice):
        flat[sel] = value
    else:
        flat.index_copy_(0, sel, value)


def prepare_rows(
    leading_shape: torch.Size,
    mask: torch.Tensor | None,
    num_items: int | float | torch.Tensor | None,
    chunk_size: int,
    temperature: float,
    beta: float,
    device: torch.device,
    dtype: torch.dtype,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Validate the options; return (selected flat row indices or None, denominator tensor)."""
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    if not float(temperature) > 0 or math.isinf(float(temperature)):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
    if not 0.0 <= float(beta) <= 1.0:
        raise ValueError(f"beta must lie in [0, 1] (0: forward KL, 1: reverse KL), got {beta!r}")
    mask = check_mask(mask, leading_shape, "the positions (all dimensions but the last)")
    n_rows = math.prod(leading_shape)
    if mask is None:
        rows, count = None, n_rows
    else:
        rows = mask.to(device).reshape(-1).nonzero().squeeze(1)
        count = rows.numel()
    denominator = count if num_items is None else num_items
    if not torch.is_tensor(denominator):
        denominator = torch.tensor(float(denominator))
    denominator = denominator.detach().to(device=device, dtype=dtype).clamp(min=1.0)
    return rows, denominator


def scale_saved_grads(grad_output: torch.Tensor, grads: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """Multiply the stored gradients by the incoming scalar gradient (skipped when it is 1)."""
    if torch.equal(grad_output, torch.ones_like(grad_output)):
        return grads
    return [None if g is None else g * grad_output.to(g.dtype) for g in grads]


class _ChunkedDivergence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_logits, teacher_logits, rows, denominator, chunk_size, temperature, beta):
        vocab = student_logits.shape[-1]
        s_flat = student_logits.reshape(-1, vocab)
        t_flat = teacher_logits.reshape(-1, vocab)
        dtype = compute_dtype(student_logits)
        need_grad = ctx.needs_input_grad[0]
        grad_flat = torch.zeros_like(s_flat) if need_grad else None
        total = torch.zeros((), dtype=dtype, device=student_logits.device)
        n_selected = s_flat.shape[0] if rows is None else rows.numel()
        workspace = Workspace(min(chunk_size, max(n_selected, 1)), vocab, dtype, student_logits.device, beta)
        scale = (1.0 / denominator).to(dtype)
        for sel in row_chunks(s_flat.shape[0], rows, chunk_size):
            n = sel.stop - sel.start if isinstance(sel, slice) else sel.numel()
            # Copies into the workspace: the chunk is overwritten in place, never the caller's logits.
            s = gather_rows_into(workspace.student[:n], s_flat, sel)
            t = gather_rows_into(workspace.teacher[:n], t_flat, sel)
            loss, grad = divergence_chunk(
                s, t, beta=beta, temperature=temperature, need_grad=need_grad, workspace=workspace
            )
            total += loss.sum()
            if need_grad:
                put_rows(grad_flat, sel, grad.mul_(scale))
        if need_grad:
            ctx.save_for_backward(grad_flat.view(student_logits.shape))
        return total / denominator

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = scale_saved_grads(grad_output, list(ctx.saved_tensors))
        return grad, None, None, None, None, None, None


def chunked_generalized_jsd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    beta: float = 0.5,
    chunk_size: int = 1024,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    num_items: int | float | torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`~hf_distill.losses.response.generalized_jsd_loss`, ``chunk_size`` positions at a time.

    Same value and gradient (with respect to ``student_logits``) as the dense loss; peak extra
    memory is one student-sized gradient buffer plus a few ``(chunk_size, V)`` buffers.
    ``beta=0`` is the forward KL, ``beta=1`` the reverse KL.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ"
        )
    dtype = compute_dtype(student_logits)
    rows, denominator = prepare_rows(
        student_logits.shape[:-1], mask, num_items, chunk_size, temperature, beta, student_logits.device, dtype
    )
    if not torch.is_grad_enabled():  # evaluation: no gradient buffer (needs_input_grad ignores no_grad)
        student_logits = student_logits.detach()
    return _ChunkedDivergence.apply(
        student_logits, teacher_logits.detach(), rows, denominator, chunk_size, float(temperature), float(beta)
    )


def chunked_kl_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    chunk_size: int = 1024,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    num_items: int | float | torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`~hf_distill.losses.response.kl_div_loss` (forward KL ``KL(p_T || p_S) * T^2``), chunked."""
    return chunked_generalized_jsd_loss(
        student_logits, teacher_logits, beta=0.0, chunk_size=chunk_size, temperature=temperature, mask=mask,
        num_items=num_items,
    )


def linear_into(buffer: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``buffer <- h @ weight.T + bias`` (the GEMM writes straight into the workspace when dtypes allow)."""
    if h.dtype == buffer.dtype and weight.dtype == buffer.dtype and (bias is None or bias.dtype == buffer.dtype):
        if bias is None:
            return torch.mm(h, weight.T, out=buffer)
        return torch.addmm(bias, h, weight.T, out=buffer)
    return buffer.copy_(F.linear(h, weight, bias))  # low precision: logits in their dtype, then upcast


class LinearGrads:
    """Gradients of a chunked loss with respect to the input ``h``, ``weight`` and ``bias`` of ``h @ weight.T + bias``.

    ``needs`` is ``(h, weight, bias)`` from ``ctx.needs_input_grad``. :meth:`add` takes a chunk's rows
    ``sel``, their inputs ``h`` and the gradient with respect to their logits (already divided by the
    item count) and accumulates; :meth:`saved` returns the three gradients for ``ctx.save_for_backward``.
    The weight and bias gradients accumulate in float32 (float64 for float64 weights).
    """

    def __init__(self, h_flat: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, needs) -> None:
        self.weight, self.bias = weight, bias
        self.need_h, self.need_w = bool(needs[0]), bool(needs[1])
        self.need_b = bias is not None and bool(needs[2])
        self.acc_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
        self.h = torch.zeros_like(h_flat) if self.need_h else None
        self.w = torch.zeros(weight.shape, dtype=self.acc_dtype, device=weight.device) if self.need_w else None
        self.b = torch.zeros(bias.shape, dtype=self.acc_dtype, device=bias.device) if self.need_b else None

    @property
    def any(self) -> bool:
        return self.need_h or self.need_w or self.need_b

    def add(self, sel: slice | torch.Tensor, h: torch.Tensor, grad_logits: torch.Tensor) -> None:
        w = self.weight
        if self.need_b:
            self.b += grad_logits.sum(0).to(self.acc_dtype)
        grad_mm = grad_logits.to(h.dtype)  # the dtype autograd would use for the matmuls
        if self.need_h:
            if isinstance(sel, slice) and self.h.dtype == grad_mm.dtype == w.dtype:
                torch.mm(grad_mm, w, out=self.h[sel])
            else:
                put_rows(self.h, sel, grad_mm @ w)
        if self.need_w:
            if self.w.dtype == grad_mm.dtype == h.dtype:
                self.w.addmm_(grad_mm.T, h)
            else:
                self.w += (grad_mm.T @ h).to(self.acc_dtype)

    def saved(self, h_shape: torch.Size) -> tuple[torch.Tensor | None, ...]:
        return (self.h.view(h_shape) if self.need_h else None,
                self.w.to(self.weight.dtype) if self.need_w else None,
                self.b.to(self.bias.dtype) if self.need_b else None)


class _FusedLinearDivergence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_s, w_s, b_s, h_t, w_t, b_t, rows, denominator, chunk_size, temperature, beta):
        hs_flat = h_s.reshape(-1, h_s.shape[-1])
        ht_flat = h_t.reshape(-1, h_t.shape[-1])
        grads = LinearGrads(hs_flat, w_s, b_s, ctx.needs_input_grad[:3])
        dtype = compute_dtype(h_s)
        total = torch.zeros((), dtype=dtype, device=h_s.device)
        n_selected = hs_flat.shape[0] if rows is None else rows.numel()
        workspace = Workspace(min(chunk_size, max(n_selected, 1)), w_s.shape[0], dtype, h_s.device, beta)
        scale = (1.0 / denominator).to(dtype)
        for sel in row_chunks(hs_flat.shape[0], rows, chunk_size):
            hs = take_rows(hs_flat, sel)
            n = hs.shape[0]
            s = linear_into(workspace.student[:n], hs, w_s, b_s)
            t = linear_into(workspace.teacher[:n], take_rows(ht_flat, sel), w_t, b_t)
            loss, grad = divergence_chunk(
                s, t, beta=beta, temperature=temperature, need_grad=grads.any, workspace=workspace
            )
            total += loss.sum()
            if grads.any:
                grads.add(sel, hs, grad.mul_(scale))
        ctx.save_for_backward(*grads.saved(h_s.shape))
        return total / denominator

    @staticmethod
    def backward(ctx, grad_output):
        grad_h, grad_w, grad_b = scale_saved_grads(grad_output, list(ctx.saved_tensors))
        return grad_h, grad_w, grad_b, None, None, None, None, None, None, None, None


def fused_linear_kl_loss(
    student_hidden: torch.Tensor,
    student_lm_head_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_lm_head_weight: torch.Tensor,
    *,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    chunk_size: int = 1024,
    temperature: float = 1.0,
    beta: float | None = None,
    mask: torch.Tensor | None = None,
    num_items: int | float | torch.Tensor | None = None,
) -> torch.Tensor:
    """KL (or generalized JSD) of ``h_S W_S^T + b_S`` against ``h_T W_T^T + b_T``, logits per chunk only.

    ``student_hidden`` ``(..., H_s)`` and ``teacher_hidden`` ``(..., H_t)`` are the final hidden states
    at the same positions; ``student_lm_head_weight`` ``(V, H_s)`` and ``teacher_lm_head_weight``
    ``(V, H_t)`` the output projections (``model.get_output_embeddings().weight``), with optional
    biases ``(V,)``. The value equals ``kl_div_loss(F.linear(h_S, W_S, b_S), F.linear(h_T, W_T, b_T),
    temperature=T, mask=mask, num_items=num_items)`` — or ``generalized_jsd_loss(..., beta=beta)`` when
    ``beta`` is given (0: forward KL, 1: reverse KL) — and so do the gradients with respect to
    ``student_hidden``, ``student_lm_head_weight`` and ``student_bias``. Neither full logits tensor
    is ever built: per chunk of ``chunk_size`` selected positions both logits are formed, the
    divergence and its gradient computed, and the gradients of the hidden states and of the
    projection accumulated. The teacher's inputs receive no gradient. Logits are formed in the
    hidden states' dtype and upcast to float32 for the divergence, as the dense path does.
    """
    if student_hidden.shape[:-1] != teacher_hidden.shape[:-1]:
        raise ValueError(
            f"student hidden states {tuple(student_hidden.shape)} and teacher hidden states "
            f"{tuple(teacher_hidden.shape)} must cover the same positions"
        )
    for who, h, w, b in (
        ("student", student_hidden, student_lm_head_weight, student_bias),
        ("teacher", teacher_hidden, teacher_lm_head_weight, teacher_bias),
    ):
        if w.dim() != 2 or w.shape[1] != h.shape[-1]:
            raise ValueError(
                f"{who} projection weight {tuple(w.shape)} does not match its hidden states {tuple(h.shape)}: "
                "expected (vocab, hidden)"
            )
        if b is not None and tuple(b.shape) != (w.shape[0],):
            raise ValueError(f"{who} bias {tuple(b.shape)} does not match the vocabulary size {w.shape[0]}")
    if student_lm_head_weight.shape[0] != teacher_lm_head_weight.shape[0]:
        raise ValueError(
            f"student vocabulary ({student_lm_head_weight.shape[0]}) and teacher vocabulary "
            f"({teacher_lm_head_weight.shape[0]}) differ; both models must share the output space"
        )
    beta_value = 0.0 if beta is None else float(beta)
    dtype = compute_dtype(student_hidden)
    rows, denominator = prepare_rows(
        student_hidden.shape[:-1], mask, num_items, chunk_size, temperature, beta_value, student_hidden.device, dtype
    )
    if not torch.is_grad_enabled():  # evaluation: no gradient buffers for the hidden states and the projection
        student_hidden, student_lm_head_weight = student_hidden.detach(), student_lm_head_weight.detach()
        student_bias = None if student_bias is None else student_bias.detach()
    return _FusedLinearDivergence.apply(
        student_hidden,
        student_lm_head_weight,
        student_bias,
        teacher_hidden.detach(),
        teacher_lm_head_weight.detach(),
        None if teacher_bias is None else teacher_bias.detach(),
        rows,
        denominator,
        chunk_size,
        float(temperature),
        beta_value,
    )
