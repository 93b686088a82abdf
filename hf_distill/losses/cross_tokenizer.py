"""Losses between a student and a teacher whose tokenizers (and vocabularies) differ.

Token-level divergences compare ``p_S[c]`` with ``p_T[c]`` for the same token ``c``; across two
tokenizers the same index means different strings, so they are meaningless there. The losses here
take rows that were already aligned (row ``i`` of the student and of the teacher predict the same
piece of text, see :mod:`hf_distill.lm.cross_tokenizer`) and compare them without a shared
vocabulary:

* :func:`uld_loss` — the Universal Logit Distillation loss (Boizard et al., 2024, "Towards
  Cross-Tokenizer Distillation: the Universal Logit Distillation Loss"): the Wasserstein distance
  between the two next-token distributions under a uniform transport cost, whose closed form is
  the L1 distance between the probability vectors sorted in decreasing order, the shorter one
  padded with zeros: ``sum_k |sort(p_S)[k] - sort(p_T)[k]|`` (the paper's and TRL's convention:
  no factor 1/2, so the value lies in [0, 2]);
* :func:`shared_vocabulary_kl_loss` — forward KL between the two next-token distributions
  restricted to the tokens both vocabularies contain (same text) and renormalised there:
  ``KL(q_T || q_S)`` with ``q = softmax(logits[shared] / T)``, times ``T**2`` like every KL of
  :mod:`hf_distill.losses`.

Temperature: both models' probabilities are ``softmax(logits / T)``. ULD is a distance between
probabilities, not a KL, and is not multiplied by ``T**2``.

Both losses sum over the rows and divide by ``num_items`` (default: the number of rows), as every
loss of :mod:`hf_distill.losses` does; rows are in float32 (float64 stays float64).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._common import kl_rows, normalise, upcast

#: rows sorted at a time by :func:`sorted_l1_distance` (bounds the sort's temporaries)
SORT_CHUNK_ROWS = 64


def _check_rows(student: torch.Tensor, teacher: torch.Tensor, what: str) -> None:
    if student.dim() != 2 or teacher.dim() != 2:
        raise ValueError(f"{what} takes aligned rows of shape (rows, vocabulary); got student "
                         f"{tuple(student.shape)} and teacher {tuple(teacher.shape)}")
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(f"{what}: the student has {student.shape[0]} aligned rows but the teacher "
                         f"{teacher.shape[0]}; align the two sequences first (one row per aligned span)")


def _check_temperature(temperature: float) -> float:
    t = float(temperature)
    if not t > 0 or math.isinf(t):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
    return t


def sorted_l1_distance(student_probs: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
    """Per row, ``sum_k |sort(p_S)[k] - sort(p_T)[k]|`` (decreasing order, the shorter row padded with zeros).

    The ranks past the shorter vocabulary ``V`` compare the longer row with zeros, so only its ``V``
    largest entries are sorted: its remaining mass ``1 - sum(top V)`` is added as it is (exact, and
    about 5x less sorting for a 262k-entry teacher against a 49k-entry student). Rows are processed
    :data:`SORT_CHUNK_ROWS` at a time.
    """
    _check_rows(student_probs, teacher_probs, "sorted_l1_distance")
    v = min(student_probs.shape[-1], teacher_probs.shape[-1])
    out = []
    for start in range(0, student_probs.shape[0], SORT_CHUNK_ROWS):
        s = student_probs[start:start + SORT_CHUNK_ROWS]
        t = teacher_probs[start:start + SORT_CHUNK_ROWS]
        s_top, s_rest = _top(s, v)
        t_top, t_rest = _top(t, v)
        out.append((s_top - t_top).abs().sum(-1) + s_rest + t_rest)
    if not out:
        return student_probs.new_zeros((0,))
    return torch.cat(out)


def _top(probs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest entries of each row in decreasing order, and the sum of the others."""
    if probs.shape[-1] == k:
        return probs.sort(dim=-1, descending=True).values, probs.new_zeros(probs.shape[:-1])
    top = probs.topk(k, dim=-1, sorted=True).values
    return top, (probs.sum(-1) - top.sum(-1)).clamp(min=0.0)


def uld_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    student_log_scale: torch.Tensor | None = None,
    teacher_log_scale: torch.Tensor | None = None,
    num_items: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Universal Logit Distillation: ``sum_rows sum_k |sort(p_S)[k] - sort(p_T)[k]| / num_items``.

    ``student_logits`` (rows, V_S) and ``teacher_logits`` (rows, V_T) are aligned rows (V_S and V_T may
    differ); ``p = softmax(logits / T)``. ``*_log_scale`` (rows,) multiplies each row's probabilities by
    ``exp(log_scale)`` before sorting: a text span that takes several tokens is compared as its first
    token's distribution times the probability of its remaining tokens (chain rule), as TRL's GOLD does.
    Identical sorted distributions give exactly 0, whatever the tokens.
    """
    _check_rows(student_logits, teacher_logits, "uld_loss")
    t = _check_temperature(temperature)
    p_s = F.softmax(upcast(student_logits) / t, dim=-1)
    with torch.no_grad():
        p_t = F.softmax(upcast(teacher_logits) / t, dim=-1)
    if student_log_scale is not None:
        p_s = p_s * upcast(student_log_scale).exp()[:, None]
    if teacher_log_scale is not None:
        p_t = p_t * upcast(teacher_log_scale).exp()[:, None].to(p_t.device)
    per_row = sorted_l1_distance(p_s, p_t.to(p_s.device, p_s.dtype))
    return normalise(per_row.sum(), torch.tensor(per_row.shape[0], device=per_row.device), num_items)


def shared_vocabulary_kl_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    student_ids: torch.Tensor,
    teacher_ids: torch.Tensor,
    *,
    temperature: float = 1.0,
    num_items: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """``T^2 * KL(q_T || q_S)`` per aligned row, summed and divided by ``num_items``.

    ``student_ids[k]`` and ``teacher_ids[k]`` are the ids of the same token text in the two
    vocabularies; ``q = softmax(logits[..., ids] / T)`` is the model's next-token distribution given that
    the next token is one of the shared ones (the restriction of ``softmax(logits / T)``, renormalised).
    """
    _check_rows(student_logits, teacher_logits, "shared_vocabulary_kl_loss")
    if student_ids.shape != teacher_ids.shape or student_ids.dim() != 1 or student_ids.numel() == 0:
        raise ValueError(f"student_ids {tuple(student_ids.shape)} and teacher_ids {tuple(teacher_ids.shape)} must be "
                         "two non-empty 1-d lists of the same length (the shared tokens' ids in each vocabulary)")
    t = _check_temperature(temperature)
    s = upcast(student_logits).index_select(-1, student_ids.to(student_logits.device))
    with torch.no_grad():
        tl = upcast(teacher_logits).index_select(-1, teacher_ids.to(teacher_logits.device)).to(s.device, s.dtype)
        log_q_t = F.log_softmax(tl / t, dim=-1)
    log_q_s = F.log_softmax(s / t, dim=-1)
    per_row = kl_rows(log_q_t, log_q_s)
    return normalise(per_row.sum(), torch.tensor(per_row.shape[0], device=per_row.device), num_items) * (t * t)
