"""Feature-based knowledge: losses between student and teacher hidden states and attention maps.

Hidden states have shape ``(..., H)``; ``mask`` has shape ``(...)`` (usually ``(batch, seq)``,
true on real tokens). See :mod:`hf_distill.losses._common` for normalisation. Positions outside the
mask may hold anything: they change neither the value nor the gradient.

Layer indices follow Hugging Face's ``output_hidden_states`` tuple: index 0 is the embedding output
and index ``i`` (1..L) the output of transformer layer ``i``. Attention maps follow the
``output_attentions`` tuple: index ``j`` (0..L-1) is layer ``j + 1``'s attention.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._common import check_mask, kl_rows, masked_sum_and_count, normalise, upcast, zero_masked


def _check_hidden(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor) -> None:
    if student_hidden.shape != teacher_hidden.shape:
        raise ValueError(
            f"student hidden states {tuple(student_hidden.shape)} and teacher hidden states "
            f"{tuple(teacher_hidden.shape)} differ; for different widths add a learned projection."
        )


def _sanitised_pair(
    student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    mask = check_mask(mask, student.shape[:-1], "the hidden states (without the last dimension)")
    return zero_masked(upcast(student), mask), zero_masked(upcast(teacher), mask), mask


def cosine_loss(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    num_items: int | float | torch.Tensor | None = None,
    eps: float = 1e-8,
) -> torch.Tensor:
    """``1 - cos(h_S, h_T)`` per position, averaged over selected positions.

    Equals DistilBERT's ``CosineEmbeddingLoss()(h_S, h_T, target=ones)`` on the non-pad tokens.
    """
    _check_hidden(student_hidden, teacher_hidden)
    s, t, mask = _sanitised_pair(student_hidden, teacher_hidden, mask)
    cos = F.cosine_similarity(s, t, dim=-1, eps=eps)
    total, count = masked_sum_and_count(1.0 - cos, mask)
    return normalise(total, count, num_items)


def hidden_mse_loss(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    num_items: int | float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean squared error over the hidden dimension, averaged over selected positions.

    With every position selected this equals ``F.mse_loss(h_S, h_T)`` (TinyBERT's hidden loss).
    """
    _check_hidden(student_hidden, teacher_hidden)
    s, t, mask = _sanitised_pair(student_hidden, teacher_hidden, mask)
    per_position = (s - t).pow(2).mean(-1)
    total, count = masked_sum_and_count(per_position, mask)
    return normalise(total, count, num_items)


# --------------------------------------------------------------------------------------------
# Learned projection between widths
# --------------------------------------------------------------------------------------------


class LinearProjection(nn.Linear):
    """``h_S @ W.T + b`` mapping student width to teacher width (TinyBERT's ``fit_dense``).

    A plain :class:`torch.nn.Linear` (``weight`` is ``(teacher_dim, student_dim)``) whose
    initialisation is chosen explicitly by ``init``:

    * ``"xavier_uniform"`` (default): ``W ~ U(-a, a)``, ``a = sqrt(6 / (student_dim + teacher_dim))``
      (Glorot & Bengio, 2010), bias 0 — keeps the variance of the projected features close to the
      student's, in both directions, whatever the two widths;
    * ``"identity"``: ``W = I`` (rectangular when the widths differ: the first ``min`` coordinates
      are copied, the rest are 0), bias 0 — starts as a no-op when the widths are equal;
    * ``"normal"``: ``W ~ N(0, 0.02^2)``, bias 0 — BERT's initialiser (what TinyBERT's ``fit_dense`` got).

    The projection is trained with the student but belongs to the loss, not to the saved student.
    """

    INITS = ("xavier_uniform", "identity", "normal")

    def __init__(
        self,
        student_dim: int,
        teacher_dim: int,
        *,
        bias: bool = True,
        init: Literal["xavier_uniform", "identity", "normal"] = "xavier_uniform",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if init not in self.INITS:
            raise ValueError(f"unknown projection init {init!r}; choose one of {self.INITS}")
        if student_dim < 1 or teacher_dim < 1:
            raise ValueError(f"projection widths must be positive, got {student_dim} -> {teacher_dim}")
        self._init_method = init  # read by reset_parameters(), which nn.Linear.__init__ calls
        super().__init__(student_dim, teacher_dim, bias=bias, device=device, dtype=dtype)

    @property
    def student_dim(self) -> int:
        return self.in_features

    @property
    def teacher_dim(self) -> int:
        return self.out_features

    def reset_parameters(self) -> None:
        method = getattr(self, "_init_method", "xavier_uniform")
        with torch.no_grad():
            if method == "xavier_uniform":
                nn.init.xavier_uniform_(self.weight)
            elif method == "identity":
                nn.init.eye_(self.weight)
            else:
                nn.init.normal_(self.weight, mean=0.0, std=0.02)
            if self.bias is not None:
                self.bias.zero_()

    def extra_repr(self) -> str:
        return super().extra_repr() + f", init={self._init_method}"


def make_projection(
    student_dim: int,
    teacher_dim: int,
    *,
    bias: bool = True,
    init: Literal["xavier_uniform", "identity", "normal"] = "xavier_uniform",
) -> LinearProjection:
    """A :class:`LinearProjection` from ``student_dim`` to ``teacher_dim`` (see there for ``init``)."""
    return LinearProjection(student_dim, teacher_dim, bias=bias, init=init)


def make_projections(
    layer_pairs: Mapping[int, int], student_dim: int, teacher_dim: int, **kwargs
) -> nn.ModuleDict:
    """One projection per mapped student layer, keyed by the student index as a string."""
    return nn.ModuleDict({str(s): make_projection(student_dim, teacher_dim, **kwargs) for s in layer_pairs})


# --------------------------------------------------------------------------------------------
# Layer maps
# --------------------------------------------------------------------------------------------


def _check_depths(num_student_layers: int, num_teacher_layers: int) -> None:
    for name, n in (("num_student_layers", num_student_layers), ("num_teacher_layers", num_teacher_layers)):
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"{name} must be a positive integer, got {n!r}")


def layer_map(num_student_layers: int, num_teacher_layers: int, include_embeddings: bool = True) -> dict[int, int]:
    """Uniform student -> teacher map over ``hidden_states`` indices: ``teacher = i * k``.

    ``k = num_teacher_layers / num_student_layers``; student layer ``i`` (1..S) reads teacher
    layer ``floor(i * T / S)``, which is exactly ``i * k`` when ``S`` divides ``T`` (TinyBERT's
    ``g(m) = m * k``) and always maps the last student layer to the last teacher layer. Index 0 is
    the embedding output; ``include_embeddings=True`` adds ``0 -> 0``.

    >>> layer_map(4, 12)
    {0: 0, 1: 3, 2: 6, 3: 9, 4: 12}
    """
    _check_depths(num_student_layers, num_teacher_layers)
    mapping = {0: 0} if include_embeddings else {}
    for i in range(1, num_student_layers + 1):
        mapping[i] = i * num_teacher_layers // num_student_layers
    return mapping


def attention_layer_map(num_student_layers: int, num_teacher_layers: int) -> dict[int, int]:
    """Uniform map over ``attentions`` indices (0-based): student ``j`` -> teacher ``(j+1)*k - 1``.

    The same layers as :func:`layer_map` (student layer ``j + 1`` reads teacher layer
    ``(j + 1) * k``), expressed as 0-based positions in the ``attentions`` tuple, which has no
    embedding entry. With 4 student and 12 teacher layers: ``{0: 2, 1: 5, 2: 8, 3: 11}``.
    """
    hidden = layer_map(num_student_layers, num_teacher_layers, include_embeddings=False)
    return {i - 1: t - 1 for i, t in hidden.items()}


def validate_layer_map(
    mapping: Mapping[int, int] | Iterable[Sequence[int]],
    num_student_layers: int,
    num_teacher_layers: int,
    *,
    kind: Literal["hidden_states", "attentions"] = "hidden_states",
) -> dict[int, int]:
    """Check an explicit student -> teacher layer map and return it as ``{int: int}``.

    ``mapping`` is a dict or a list of ``(student, teacher)`` pairs. For ``kind="hidden_states"``
    valid indices are ``0..num_layers`` (0 = embeddings), for ``kind="attentions"``
    ``0..num_layers-1``. Negative indices count from the end (``-1`` is the last layer). Keys may
    be strings of integers (as YAML/JSON give). Raises ``ValueError`` naming the offending pair and
    the valid range.
    """
    _check_depths(num_student_layers, num_teacher_layers)
    if kind not in ("hidden_states", "attentions"):
        raise ValueError(f"kind must be 'hidden_states' or 'attentions', got {kind!r}")
    pairs = list(mapping.items()) if isinstance(mapping, Mapping) else [tuple(p) for p in mapping]
    if not pairs:
        raise ValueError("the layer map is empty; give at least one student -> teacher pair")
    offset = 1 if kind == "hidden_states" else 0  # hidden_states has one extra entry (embeddings)

    def resolve(value, n_layers: int, who: str, pair) -> int:
        try:
            index = int(value)
        except (TypeError, ValueError):
            raise ValueError(f"layer map pair {pair}: {who} index {value!r} is not an integer") from None
        if isinstance(value, float) and value != index:
            raise ValueError(f"layer map pair {pair}: {who} index {value!r} is not an integer")
        size = n_layers + offset
        if not -size <= index < size:
            low = "0 (embeddings)" if kind == "hidden_states" else "0"
            raise ValueError(
                f"layer map pair {pair}: {who} layer {index} is out of range; the {who} has {n_layers} layers, "
                f"so its {kind} indices go from {low} to {size - 1} (or -{size}..-1 from the end)"
            )
        return index % size

    result: dict[int, int] = {}
    for pair in pairs:
        if len(pair) != 2:
            raise ValueError(f"layer map entry {pair!r} is not a (student, teacher) pair")
        s = resolve(pair[0], num_student_layers, "student", tuple(pair))
        t = resolve(pair[1], num_teacher_layers, "teacher", tuple(pair))
        if s in result and result[s] != t:
            raise ValueError(f"student layer {s} is mapped twice (to teacher layers {result[s]} and {t})")
        result[s] = t
    return result


def hidden_states_loss(
    student_hidden_states: Sequence[torch.Tensor],
    teacher_hidden_states: Sequence[torch.Tensor],
    mapping: Mapping[int, int],
    *,
    loss: Literal["mse", "cosine"] = "mse",
    projections: Mapping[str, nn.Module] | nn.Module | None = None,
    mask: torch.Tensor | None = None,
    num_items: int | float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Sum over mapped layer pairs of :func:`hidden_mse_loss` or :func:`cosine_loss`.

    ``mapping`` is a validated ``{student_index: teacher_index}`` over the ``hidden_states`` tuples.
    ``projections`` maps student widths to teacher widths: one module for every layer, or a
    mapping keyed by ``str(student_index)`` (as :func:`make_projections` builds).
    """
    fn = {"mse": hidden_mse_loss, "cosine": cosine_loss}.get(loss)
    if fn is None:
        raise ValueError(f"unknown hidden-state loss {loss!r}; choose 'mse' or 'cosine'")
    total = None
    for s_index, t_index in mapping.items():
        h_s = student_hidden_states[s_index]
        if projections is not None:
            proj = projections if isinstance(projections, nn.Module) and not isinstance(projections, nn.ModuleDict) \
                else projections[str(s_index)]
            h_s = proj(h_s)
        term = fn(h_s, teacher_hidden_states[t_index], mask=mask, num_items=num_items)
        total = term if total is None else total + term
    if total is None:
        raise ValueError("the layer map is empty")
    return total


# --------------------------------------------------------------------------------------------
# Attention maps (TinyBERT)
# --------------------------------------------------------------------------------------------


def _check_attention(student_attn: torch.Tensor, teacher_attn: torch.Tensor) -> None:
    if student_attn.dim() != 4 or teacher_attn.dim() != 4:
        raise ValueError(
            f"attention maps must be (batch, heads, query_len, key_len); got student {tuple(student_attn.shape)} "
            f"and teacher {tuple(teacher_attn.shape)}"
        )
    if student_attn.shape[1] != teacher_attn.shape[1]:
        raise ValueError(
            f"attention head counts differ (student {student_attn.shape[1]}, teacher {teacher_attn.shape[1]}); "
            "attention-map transfer compares head by head and needs equal head counts. Use "
            "attention_relation_loss (MiniLMv2 relations), which works with any head counts."
        )
    if student_attn.shape != teacher_attn.shape:
        raise ValueError(
            f"student attention {tuple(student_attn.shape)} and teacher attention {tuple(teacher_attn.shape)} differ"
        )


def _attention_masks(
    attention_mask: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None, shape: torch.Size, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(query_mask (B, Lq), key_mask (B, Lk)) as bool, from a (B, L) mask or an explicit pair."""
    batch, _, lq, lk = shape
    if attention_mask is None:
        return (torch.ones(batch, lq, dtype=torch.bool, device=device),
                torch.ones(batch, lk, dtype=torch.bool, device=device))
    if isinstance(attention_mask, (tuple, list)):
        query_mask, key_mask = attention_mask
    else:
        if lq != lk:
            raise ValueError(
                f"query and key lengths differ ({lq} vs {lk}): pass attention_mask=(query_mask, key_mask)"
            )
        query_mask = key_mask = attention_mask
    if tuple(query_mask.shape) != (batch, lq) or tuple(key_mask.shape) != (batch, lk):
        raise ValueError(
            f"attention masks {tuple(query_mask.shape)} / {tuple(key_mask.shape)} do not match the attention maps "
            f"{tuple(shape)}: expected (batch, query_len) = {(batch, lq)} and (batch, key_len) = {(batch, lk)}"
        )
    return query_mask.to(device=device, dtype=torch.bool), key_mask.to(device=device, dtype=torch.bool)


def attention_mse_loss(
    student_attn: torch.Tensor,
    teacher_attn: torch.Tensor,
    *,
    attention_mask: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None,
    num_items: int | float | torch.Tensor | None = None,
    masked_score_threshold: float | None = -1e2,
) -> torch.Tensor:
    """TinyBERT's attention transfer: MSE between attention maps ``(B, heads, Lq, Lk)``.

    Works on raw scores (pre-softmax) or on probabilities. Per valid query position ``q``::

        mean over heads and valid keys k of (A_S[h, q, k] - A_T[h, q, k])^2

    summed over valid query positions and divided by ``num_items`` (default: their count). With
    no padding this is ``F.mse_loss(A_S, A_T)``. ``attention_mask`` is a ``(B, L)`` padding mask
    (1/True = real token) applied to both the query and the key axis, or a pair
    ``(query_mask (B, Lq), key_mask (B, Lk))`` for cross-attention.

    Masked scores: like TinyBERT, entries ``<= masked_score_threshold`` (default ``-100``, which
    catches ``-inf``, ``-1e4`` and ``finfo.min`` additive masks, e.g. causal ones inside the valid
    region) are replaced by 0 in each map before the difference. ``None`` keeps the values (only
    ``-inf`` is still replaced). Head counts must match.
    """
    _check_attention(student_attn, teacher_attn)
    query_mask, key_mask = _attention_masks(attention_mask, student_attn.shape, student_attn.device)
    s, t = upcast(student_attn), upcast(teacher_attn)
    valid = (query_mask[:, None, :, None] & key_mask[:, None, None, :])  # (B, 1, Lq, Lk)
    zero = torch.zeros((), dtype=s.dtype, device=s.device)
    threshold = float("-inf") if masked_score_threshold is None else float(masked_score_threshold)
    s = torch.where(valid & (s > threshold), s, zero)
    t = torch.where(valid & (t > threshold), t, zero)
    heads = s.shape[1]
    n_keys = key_mask.sum(-1).clamp(min=1).to(s.dtype)  # (B,)
    per_position = (s - t).pow(2).sum(dim=(1, 3)) / (heads * n_keys[:, None])  # (B, Lq)
    total, count = masked_sum_and_count(per_position, query_mask)
    return normalise(total, count, num_items)


def attention_kl_loss(
    student_attn: torch.Tensor,
    teacher_attn: torch.Tensor,
    *,
    attention_mask: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None,
    num_items: int | float | torch.Tensor | None = None,
    inputs: Literal["probs", "scores"] = "probs",
) -> torch.Tensor:
    """KL between attention distributions, ``KL(A_T[h, q, :] || A_S[h, q, :])`` over the keys.

    ``student_attn`` and ``teacher_attn`` are ``(B, heads, Lq, Lk)``: attention probabilities
    (``inputs="probs"``, what ``output_attentions=True`` returns) or raw scores
    (``inputs="scores"``, softmaxed here over the valid keys, which is more accurate). Per valid
    query position: the KL summed over valid keys, averaged over heads; then summed over valid
    query positions and divided by ``num_items``. Padding keys are excluded from the sum (a
    properly masked model gives them probability 0 anyway); rows of a probability map should sum
    to 1 over the valid keys. Head counts must match.
    """
    if inputs not in ("probs", "scores"):
        raise ValueError(f"inputs must be 'probs' or 'scores', got {inputs!r}")
    _check_attention(student_attn, teacher_attn)
    query_mask, key_mask = _attention_masks(attention_mask, student_attn.shape, student_attn.device)
    s, t = upcast(student_attn), upcast(teacher_attn)
    valid = (query_mask[:, None, :, None] & key_mask[:, None, None, :])  # (B, 1, Lq, Lk)
    if inputs == "scores":
        # Padding keys (and padded query rows, entirely) get -inf before the softmax; fully masked
        # rows are replaced by zeros so that they stay finite (they are masked out below).
        neg_inf = torch.full((), float("-inf"), dtype=s.dtype, device=s.device)
        row_ok = query_mask[:, None, :, None]
        key_ok = key_mask[:, None, None, :]
        s = torch.where(row_ok, torch.where(key_ok, s, neg_inf), torch.zeros((), dtype=s.dtype, device=s.device))
        t = torch.where(row_ok, torch.where(key_ok, t, neg_inf), torch.zeros((), dtype=t.dtype, device=t.device))
        log_s, log_t = F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1)
    else:
        one = torch.ones((), dtype=s.dtype, device=s.device)
        zero = torch.zeros((), dtype=s.dtype, device=s.device)
        # Teacher 0 outside the valid region (contributes nothing); student 1 there (log 1 = 0,
        # finite), so garbage in padding never reaches the arithmetic.
        t = torch.where(valid, t, zero).clamp(min=0.0)
        s = torch.where(valid & (t > 0), s, one).clamp(min=0.0)
        log_s, log_t = torch.log(s), torch.log(t)
    per_row = kl_rows(log_t, log_s)  # (B, heads, Lq)
    per_position = per_row.mean(1)
    total, count = masked_sum_and_count(per_position, query_mask)
    return normalise(total, count, num_items)
