"""Relation-based knowledge: match relations between tokens, heads or samples, not raw features.

Because only relations (similarities) are compared, student and teacher widths and head counts
may differ without any learned projection.

* :func:`attention_relation_loss` — MiniLMv2 (Wang et al., 2021) self-attention relations between
  queries, keys and values, with a chosen number of relation heads;
* :func:`rkd_distance_loss`, :func:`rkd_angle_loss` — Relational Knowledge Distillation (Park et
  al., 2019) on pooled sample representations;
* :func:`similarity_preserving_loss` — Similarity-Preserving KD (Tung & Mori, 2019): batch Gram
  matrices.

The sample-relation losses compare the samples of one (micro-)batch with each other, so they have
no per-item normaliser: they return a mean over pairs / triplets / Gram entries of the batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ._common import check_mask, kl_rows, masked_sum_and_count, normalise, upcast, zero_masked


# --------------------------------------------------------------------------------------------
# MiniLMv2 self-attention relations
# --------------------------------------------------------------------------------------------


def _as_sequence_major(x: torch.Tensor, who: str) -> torch.Tensor:
    """(B, L, H) as is; (B, heads, L, d_head) -> (B, L, heads * d_head)."""
    if x.dim() == 3:
        return x
    if x.dim() == 4:
        b, h, length, d = x.shape
        return x.transpose(1, 2).reshape(b, length, h * d)
    raise ValueError(f"{who} must be (batch, seq, hidden) or (batch, heads, seq, head_dim), got {tuple(x.shape)}")


def relation_log_probs(
    x: torch.Tensor, relation_heads: int, key_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """``log softmax(X_r X_r^T / sqrt(d_r))`` over keys for each relation head: ``(B, R, L, L)``.

    ``x`` is ``(B, L, H)`` with ``H`` divisible by ``relation_heads``; ``X_r`` is the ``r``-th slice of
    width ``d_r = H / relation_heads``. Padding keys (``key_mask`` false) get probability 0; a row
    whose sample has no valid key at all is uniform (it must be masked out by the caller).
    """
    b, length, hidden = x.shape
    if hidden % relation_heads:
        raise ValueError(
            f"hidden size {hidden} is not divisible by relation_heads={relation_heads}; choose a number of "
            "relation heads that divides both the student's and the teacher's widths"
        )
    d_r = hidden // relation_heads
    xh = x.reshape(b, length, relation_heads, d_r).transpose(1, 2)  # (B, R, L, d_r)
    scores = torch.matmul(xh, xh.transpose(-1, -2)) / math.sqrt(d_r)
    if key_mask is not None:
        key_ok = key_mask[:, None, None, :]
        has_key = key_mask.any(-1)[:, None, None, None]
        fill = torch.full((), float("-inf"), dtype=scores.dtype, device=scores.device)
        scores = torch.where(key_ok, scores, fill)
        scores = torch.where(has_key, scores, torch.zeros((), dtype=scores.dtype, device=scores.device))
    return F.log_softmax(scores, dim=-1)


def attention_relation_loss(
    student_qkv: Sequence[torch.Tensor],
    teacher_qkv: Sequence[torch.Tensor],
    *,
    relation_heads: int,
    attention_mask: torch.Tensor | None = None,
    num_items: int | float | torch.Tensor | None = None,
) -> torch.Tensor:
    """MiniLMv2 self-attention relation distillation.

    ``student_qkv`` and ``teacher_qkv`` are sequences of the same length, usually ``(Q, K, V)`` of
    one student layer and one teacher layer, each ``(B, L, H)`` (``H`` may differ between student
    and teacher) or ``(B, heads, L, d_head)`` (merged to ``(B, L, heads * d_head)``). For each
    projection ``X``: split into ``relation_heads`` slices of width ``d_r = H / relation_heads``,
    ``R = softmax(X_r X_r^T / sqrt(d_r))`` over the keys (padding keys masked), and::

        loss = sum over X in (Q, K, V) of  mean over relation heads r of  KL(R_T[r, q, :] || R_S[r, q, :])

    per valid query position ``q``, summed over valid positions and divided by ``num_items``
    (default: their count) — the paper's ``1 / (A_r |x|)`` normalisation. ``attention_mask``
    ``(B, L)``: 1/True on real tokens.
    """
    if not isinstance(relation_heads, int) or isinstance(relation_heads, bool) or relation_heads < 1:
        raise ValueError(f"relation_heads must be a positive integer, got {relation_heads!r}")
    if len(student_qkv) != len(teacher_qkv) or len(student_qkv) == 0:
        raise ValueError(
            f"got {len(student_qkv)} student and {len(teacher_qkv)} teacher projections; pass the same "
            "non-empty sequence for both, e.g. (Q, K, V)"
        )
    mask = None
    total_per_position = None
    for index, (x_s, x_t) in enumerate(zip(student_qkv, teacher_qkv)):
        x_s = _as_sequence_major(x_s, f"student projection {index}")
        x_t = _as_sequence_major(x_t, f"teacher projection {index}")
        if x_s.shape[:2] != x_t.shape[:2]:
            raise ValueError(
                f"projection {index}: student {tuple(x_s.shape)} and teacher {tuple(x_t.shape)} must share "
                "batch and sequence length"
            )
        if mask is None and attention_mask is not None:
            mask = check_mask(attention_mask, x_s.shape[:2], "the projections (batch, seq)")
        for who, x in (("student", x_s), ("teacher", x_t)):
            if x.shape[-1] % relation_heads:
                raise ValueError(
                    f"projection {index}: the {who}'s width {x.shape[-1]} is not divisible by relation_heads="
                    f"{relation_heads}; choose a number that divides both widths ({x_s.shape[-1]} and {x_t.shape[-1]})"
                )
        log_r_s = relation_log_probs(zero_masked(upcast(x_s), mask), relation_heads, mask)
        log_r_t = relation_log_probs(zero_masked(upcast(x_t), mask), relation_heads, mask)
        per_position = kl_rows(log_r_t, log_r_s).mean(1)  # (B, L): mean over relation heads
        total_per_position = per_position if total_per_position is None else total_per_position + per_position
    total, count = masked_sum_and_count(total_per_position, mask)
    return normalise(total, count, num_items)


# --------------------------------------------------------------------------------------------
# Sample relations on pooled representations
# --------------------------------------------------------------------------------------------


def _pooled_pair(
    student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    if student.dim() < 2 or teacher.dim() < 2:
        raise ValueError(
            f"expected pooled representations (batch, features...), got student {tuple(student.shape)} and "
            f"teacher {tuple(teacher.shape)}"
        )
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(f"student batch {student.shape[0]} and teacher batch {teacher.shape[0]} differ")
    s = upcast(student).reshape(student.shape[0], -1)
    t = upcast(teacher).reshape(teacher.shape[0], -1)
    mask = check_mask(mask, student.shape[:1], "the samples (batch,)")
    if mask is not None:
        s, t = s[mask], t[mask]
    return s, t


def _pair_distances(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Euclidean distances of the pairs ``i < j`` (row-major), ``sqrt(max(||x_i - x_j||^2, eps))``."""
    i, j = torch.triu_indices(x.shape[0], x.shape[0], offset=1, device=x.device)
    return (x[i] - x[j]).pow(2).sum(-1).clamp(min=eps).sqrt()


def rkd_distance_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    eps: float = 1e-12,
) -> torch.Tensor:
    """RKD distance loss (Park et al., 2019) on pooled representations ``(B, D_s)`` / ``(B, D_t)``.

    ``psi_D(i, j) = ||x_i - x_j||_2 / mu`` with ``mu`` the mean distance over the pairs of the batch;
    ``loss = mean over pairs i != j of Huber(psi_D^S(i, j) - psi_D^T(i, j))`` with the Huber (smooth
    L1) threshold 1, as in the paper. (The authors' code averages over all ``B^2`` entries including
    the zero diagonal, i.e. ``(B-1)/B`` times this value.) ``mask`` ``(B,)`` selects samples;
    fewer than 2 selected samples give 0. Extra feature dimensions are flattened.
    """
    s, t = _pooled_pair(student, teacher, mask)
    if s.shape[0] < 2:
        return s.sum() * 0.0
    d_s, d_t = _pair_distances(s, eps), _pair_distances(t, eps)
    d_s = d_s / d_s.mean()
    d_t = d_t / d_t.mean()
    return F.smooth_l1_loss(d_s, d_t, reduction="mean", beta=1.0)


def _angles(x: torch.Tensor, eps: float) -> torch.Tensor:
    """``cos`` of the angle at apex ``j`` between ``x_i`` and ``x_k``: ``(n, n, n)`` indexed ``[j, i, k]``."""
    n = x.shape[0]
    diff = x[None, :, :] - x[:, None, :]  # diff[j, i] = x_i - x_j
    # The diagonal (i == j) is a zero vector: give it a unit displacement so that normalising it
    # has a finite gradient; those entries are excluded from the loss anyway.
    eye = torch.eye(n, dtype=torch.bool, device=x.device)[..., None]
    diff = torch.where(eye, torch.ones((), dtype=x.dtype, device=x.device), diff)
    unit = diff / diff.pow(2).sum(-1, keepdim=True).clamp(min=eps).sqrt()
    return torch.matmul(unit, unit.transpose(1, 2))


def rkd_angle_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    eps: float = 1e-12,
) -> torch.Tensor:
    """RKD angle loss (Park et al., 2019) on pooled representations ``(B, D_s)`` / ``(B, D_t)``.

    ``psi_A(i, j, k) = <e_ij, e_kj>`` with ``e_ij = (x_i - x_j) / ||x_i - x_j||`` (the cosine of the
    angle at ``x_j``); ``loss = mean over triplets of distinct i, j, k of Huber(psi_A^S - psi_A^T)``
    with threshold 1, as in the paper. (The authors' code averages over all ``B^3`` triplets,
    including degenerate ones.) ``mask`` ``(B,)`` selects samples; fewer than 3 give 0.
    """
    s, t = _pooled_pair(student, teacher, mask)
    n = s.shape[0]
    if n < 3:
        return s.sum() * 0.0
    idx = torch.arange(n, device=s.device)
    j, i, k = idx[:, None, None], idx[None, :, None], idx[None, None, :]
    distinct = (i != j) & (k != j) & (i != k)
    a_s, a_t = _angles(s, eps)[distinct], _angles(t, eps)[distinct]
    return F.smooth_l1_loss(a_s, a_t, reduction="mean", beta=1.0)


def similarity_preserving_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    eps: float = 1e-12,
) -> torch.Tensor:
    """Similarity-preserving loss (Tung & Mori, 2019) on ``(B, ...)`` representations.

    ``G = A A^T`` (``A`` flattened to ``(b, -1)``), each row L2-normalised:
    ``G~[i] = G[i] / ||G[i]||_2``; ``loss = ||G~_S - G~_T||_F^2 / b^2``. Widths may differ.
    ``mask`` ``(B,)`` selects the ``b`` samples that count.
    """
    s, t = _pooled_pair(student, teacher, mask)
    b = s.shape[0]
    if b == 0:
        return s.sum() * 0.0
    g_s = F.normalize(s @ s.T, p=2.0, dim=1, eps=eps)
    g_t = F.normalize(t @ t.T, p=2.0, dim=1, eps=eps)
    return (g_s - g_t).pow(2).sum() / (b * b)
