"""Response-based knowledge: losses on the teacher's and the student's output distributions.

All functions take logits of shape ``(..., C)`` (``C`` classes or vocabulary entries), an optional
boolean ``mask`` of shape ``(...)`` and an optional ``num_items`` normaliser; see
:mod:`hf_distill.losses._common` for the convention. Everything is computed in float32 (float64
inputs stay float64). Positions outside ``mask`` may hold anything (inf, nan, huge values): they
change neither the value nor the gradient.

Temperature: every divergence here softens both distributions, ``p = softmax(logits / T)``, and
multiplies the result by ``T**2`` so that gradient magnitudes do not shrink as ``T`` grows
(Hinton et al., 2015). With ``T = 1`` the factor is 1.

Directions (``p_S`` student, ``p_T`` teacher):

* :func:`kl_div_loss` — forward KL ``KL(p_T || p_S)`` (mean-seeking; the classic soft-target loss);
* :func:`reverse_kl_loss` — reverse KL ``KL(p_S || p_T)`` (mode-seeking);
* :func:`generalized_jsd_loss` — the generalized Jensen-Shannon divergence of the GKD paper
  (Agarwal et al., 2024), with both KLs as its endpoints;
* :func:`topk_kl_loss` — forward KL against a sparse (top-k) teacher, as stored soft labels give.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

from ._common import check_mask, kl_rows, masked_sum_and_count, normalise, upcast, zero_masked


def _check_logits(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> None:
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ; "
            "teacher and student must share the output space (same vocabulary / label set) and the same batch."
        )


def _check_temperature(temperature: float) -> float:
    t = float(temperature)
    if not t > 0 or math.isinf(t):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
    return t


def _log_probs(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Validated, upcast, padding-sanitised ``log softmax(logits / T)`` of both models, and the mask."""
    _check_logits(student_logits, teacher_logits)
    mask = check_mask(mask, student_logits.shape[:-1], "the logits (without the last dimension)")
    s = zero_masked(upcast(student_logits), mask)
    t = zero_masked(upcast(teacher_logits), mask)
    return F.log_softmax(s / temperature, dim=-1), F.log_softmax(t / temperature, dim=-1), mask


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
    t = _check_temperature(temperature)
    log_p_s, log_p_t, mask = _log_probs(student_logits, teacher_logits, t, mask)
    # xlogy-style: classes where p_T == 0 contribute 0 even if log p_S is -inf.
    per_position = kl_rows(log_p_t, log_p_s)
    total, count = masked_sum_and_count(per_position, mask)
    return normalise(total, count, num_items) * (t * t)


def reverse_kl_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    num_items: int | float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Reverse KL ``KL(p_S || p_T)`` at temperature ``T``, times ``T**2``.

    Per position: ``T^2 * sum_c p_S[c] * (log p_S[c] - log p_T[c])`` with ``p = softmax(logits / T)``.
    Mode-seeking: the student is penalised for putting mass where the teacher has little, not for
    missing some of the teacher's modes.
    """
    t = _check_temperature(temperature)
    log_p_s, log_p_t, mask = _log_probs(student_logits, teacher_logits, t, mask)
    per_position = kl_rows(log_p_s, log_p_t)
    total, count = masked_sum_and_count(per_position, mask)
    return normalise(total, count, num_items) * (t * t)


def jsd_rows(log_p_s: torch.Tensor, log_p_t: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-row generalized JSD (no temperature factor) from log-probabilities, ``0 < beta < 1``.

    ``log m = logsumexp([log p_S + log(1 - beta), log p_T + log beta])`` (the mixture formed in
    log space, never as ``beta * log p_T + (1 - beta) * log p_S``), then
    ``beta * KL(p_T || m) + (1 - beta) * KL(p_S || m)``.
    """
    # logaddexp is the two-term logsumexp, without stacking both tensors into a new one.
    log_m = torch.logaddexp(log_p_s + math.log1p(-beta), log_p_t + math.log(beta))
    return beta * kl_rows(log_p_t, log_m) + (1.0 - beta) * kl_rows(log_p_s, log_m)


def _check_beta(beta: float) -> float:
    b = float(beta)
    if not 0.0 <= b <= 1.0:
        raise ValueError(f"beta must lie in [0, 1] (0: forward KL, 1: reverse KL), got {beta!r}")
    return b


def generalized_jsd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    num_items: int | float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Generalized Jensen-Shannon divergence ``JSD_beta(p_T || p_S)`` at temperature ``T``, times ``T**2``.

    For ``0 < beta < 1``, per position::

        m   = beta * p_T + (1 - beta) * p_S          (formed in log space with logsumexp)
        JSD = beta * KL(p_T || m) + (1 - beta) * KL(p_S || m)

    ``beta`` is the weight of the **teacher**: in the mixture, and on the ``KL(p_T || m)`` term.
    This is the convention of the GKD paper's Eq. (1) with ``P = p_T``, ``Q = p_S`` and of TRL's
    ``GKDTrainer.generalized_jsd_loss`` (same mixture, same weights, same endpoints). Two
    differences from TRL: we multiply by ``T**2`` (TRL divides the logits by ``T`` but does not
    rescale), and we normalise by ``num_items`` (TRL's ``batchmean`` divides by the local count
    of labelled tokens). ``beta = 0.5`` is the symmetric Jensen-Shannon divergence. (Early TRL
    versions formed the "mixture" as ``beta * log p_T + (1 - beta) * log p_S``, a normalisation-free
    geometric blend that can make the loss negative; the mixture here is the arithmetic one.)

    Endpoints are special-cased to the two KLs, exactly:

    * ``beta == 0`` returns the forward KL ``KL(p_T || p_S)`` (= :func:`kl_div_loss`);
    * ``beta == 1`` returns the reverse KL ``KL(p_S || p_T)`` (= :func:`reverse_kl_loss`).

    Note the formula itself tends to 0 at both ends (``JSD_beta ~ beta * KL(p_T || p_S)`` for small
    ``beta``); the endpoints are the limits of ``JSD_beta / beta`` and ``JSD_beta / (1 - beta)``, so
    the value jumps at ``beta`` = 0 and 1. Inside ``(0, 1)`` the value is bounded:
    ``0 <= JSD_beta <= T^2 * h(beta)`` with ``h(beta) = -beta log beta - (1-beta) log(1-beta) <= log 2``.
    """
    b = _check_beta(beta)
    if b == 0.0:
        return kl_div_loss(student_logits, teacher_logits, temperature=temperature, mask=mask, num_items=num_items)
    if b == 1.0:
        return reverse_kl_loss(student_logits, teacher_logits, temperature=temperature, mask=mask, num_items=num_items)
    t = _check_temperature(temperature)
    log_p_s, log_p_t, mask = _log_probs(student_logits, teacher_logits, t, mask)
    per_position = jsd_rows(log_p_s, log_p_t, b)
    total, count = masked_sum_and_count(per_position, mask)
    return normalise(total, count, num_items) * (t * t)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x <= 0``, accurate near 0 and for very negative ``x``."""
    x = x.clamp(max=0.0)
    # The two branches are each accurate on their side of -log 2 (Maechler, 2012).
    near = torch.log(-torch.expm1(x.clamp(min=-math.log(2.0))))
    far = torch.log1p(-torch.exp(x.clamp(max=-math.log(2.0))))
    return torch.where(x > -math.log(2.0), near, far)


def topk_kl_loss(
    student_logits: torch.Tensor,
    teacher_topk_values: torch.Tensor,
    teacher_topk_indices: torch.Tensor,
    *,
    teacher_values: Literal["logprobs", "probs"] = "logprobs",
    teacher_tail_mass: torch.Tensor | None = None,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    num_items: int | float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Forward KL against a sparse teacher that only kept its top-k entries (stored soft labels).

    ``teacher_topk_values`` ``(..., k)`` holds the teacher's log-probabilities (``teacher_values=
    "logprobs"``, the default) or probabilities (``"probs"``) of the vocabulary entries
    ``teacher_topk_indices`` ``(..., k)``; ``student_logits`` is ``(..., V)``. Per position::

        T^2 * [ sum_{i in topk} p_T[i] * (log p_T[i] - log p_S[i])
                + p_T,miss * (log p_T,miss - log p_S,miss) ]

    where ``p_S = softmax(student_logits / T)``, ``p_T,miss`` is the teacher mass outside the top-k
    (``teacher_tail_mass`` when given, else ``1 - sum_topk p_T``, clamped at 0) and
    ``p_S,miss = 1 - sum_topk p_S`` is computed stably as ``exp(logsumexp(non-top-k logits / T) -
    logsumexp(logits / T))`` (no cancellation when the top-k holds almost all the mass). The tail
    term treats everything outside the top-k as one extra class; it is exact when the teacher's
    tail is empty and makes the loss a proper divergence (0 iff the student matches the teacher on
    the top-k and on the tail mass) otherwise. With ``k = V`` this equals :func:`kl_div_loss`.

    Temperature: the stored values must describe the teacher **at the distillation temperature**,
    i.e. the top-k of ``softmax(teacher_logits / T)``; the student is softened by the same ``T``.
    (A top-k of a ``T = 1`` distribution cannot be re-tempered exactly: the tail is unknown.)
    """
    t = _check_temperature(temperature)
    if teacher_values not in ("logprobs", "probs"):
        raise ValueError(f"teacher_values must be 'logprobs' or 'probs', got {teacher_values!r}")
    if teacher_topk_values.shape != teacher_topk_indices.shape:
        raise ValueError(
            f"teacher top-k values {tuple(teacher_topk_values.shape)} and indices "
            f"{tuple(teacher_topk_indices.shape)} must have the same shape"
        )
    if teacher_topk_indices.shape[:-1] != student_logits.shape[:-1]:
        raise ValueError(
            f"teacher top-k indices {tuple(teacher_topk_indices.shape)} do not match the student logits "
            f"{tuple(student_logits.shape)} (all dimensions but the last must be equal)"
        )
    vocab, k = student_logits.shape[-1], teacher_topk_indices.shape[-1]
    if k > vocab:
        raise ValueError(f"top-k of size {k} is larger than the student's vocabulary ({vocab})")
    mask = check_mask(mask, student_logits.shape[:-1], "the logits (without the last dimension)")

    s = zero_masked(upcast(student_logits), mask) / t
    dtype = s.dtype
    indices = teacher_topk_indices.long()
    if mask is not None:  # padding rows may hold invalid indices: replace them by 0..k-1
        indices = torch.where(mask[..., None], indices, torch.arange(k, device=indices.device))
    values = zero_masked(teacher_topk_values.to(dtype), mask)
    if teacher_values == "logprobs":
        log_p_t = values
    else:
        log_p_t = torch.log(values.clamp(min=0.0))

    log_z_s = torch.logsumexp(s, dim=-1)
    log_p_s_topk = s.gather(-1, indices) - log_z_s[..., None]
    per_position = kl_rows(log_p_t, log_p_s_topk)

    if k < vocab:
        if teacher_tail_mass is None:
            log_tail_t = _log1mexp(torch.logsumexp(log_p_t, dim=-1))
        else:
            if teacher_tail_mass.shape != student_logits.shape[:-1]:
                raise ValueError(
                    f"teacher_tail_mass has shape {tuple(teacher_tail_mass.shape)}, expected "
                    f"{tuple(student_logits.shape[:-1])} (one mass per position)"
                )
            tail = zero_masked(teacher_tail_mass.to(dtype), mask).clamp(0.0, 1.0)
            log_tail_t = torch.log(tail)
        # log p_S,miss: logsumexp over the entries outside the top-k, minus the full log-normaliser.
        outside = s.scatter(-1, indices, float("-inf"))
        log_tail_s = torch.logsumexp(outside, dim=-1) - log_z_s
        per_position = per_position + kl_rows(log_tail_t[..., None], log_tail_s[..., None])
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
    mask = check_mask(mask, student_logits.shape[:-1], "the logits (without the last dimension)")
    s = zero_masked(upcast(student_logits), mask)
    t = zero_masked(upcast(teacher_logits), mask)
    per_position = (s - t).pow(2).sum(-1)
    total, count = masked_sum_and_count(per_position, mask)
    return normalise(total, count, num_items)
