"""Compact top-k soft labels: the teacher's distribution at one output position (a token or a frame).

A position is stored as the ``k`` most probable class indices (int32), their probabilities (float16) and
the tail mass, the probability of every other class together (float16): ``6 k + 2`` bytes before
compression, against ``2 V`` or ``4 V`` for a dense row (V = 51,865 for Whisper: 104 kB in fp16).

In a pseudo-label store a row holds three columns, one entry per position of the row:

- ``topk_indices``: ``list<fixed_size_list<int32, k>>``
- ``topk_probs``:   ``list<fixed_size_list<float16, k>>``
- ``topk_tail``:    ``list<float16>``

which ``datasets`` loads as ``List(List(Value("int32"), length=k))`` etc. (``with_format("torch")`` gives
``[n, k]`` tensors). :func:`unpack_topk` turns them back into float32/int64 tensors.

Train against them with :func:`hf_distill.losses.topk_kl_loss` (``teacher_values="probs"``,
``teacher_tail_mass=tail``): the KL over the ``k`` stored classes plus one bucket for the tail. It equals
the dense ``KL(p_T || p_S)`` when ``k = V`` (up to the float16 rounding of the stored probabilities) and
otherwise never exceeds it: the difference is ``tail_T * KL(p_T(. | tail) || p_S(. | tail)) >= 0``, the
divergence inside the tail weighted by the tail mass. Store the labels at the distillation temperature
(``soft_label_temperature``): a top-k cannot be re-tempered exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = [
    "arrow_columns",
    "arrow_fields",
    "bytes_per_position",
    "pack_topk",
    "topk_from_logits",
    "unpack_topk",
]


def bytes_per_position(k: int) -> int:
    """Raw (uncompressed) bytes per stored position: k int32 indices, k fp16 probabilities, 1 fp16 tail."""
    return 6 * int(k) + 2


@torch.no_grad()
def topk_from_logits(
    logits: torch.Tensor, k: int, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k of ``softmax(logits / temperature)`` over the last dimension, computed in float32.

    Returns ``(indices int64 [..., k], probs float32 [..., k], tail float32 [...])``, probabilities in
    decreasing order; ``tail`` is the exact remaining mass (a log-sum-exp over the other classes, not
    ``1 - sum(probs)``, so it keeps its precision when it is tiny). ``k`` larger than the vocabulary is
    clipped to it.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    x = logits.float() / float(temperature)
    vocab = x.shape[-1]
    k = min(int(k), vocab)
    log_z = torch.logsumexp(x, dim=-1)
    values, indices = torch.topk(x, k, dim=-1, largest=True, sorted=True)
    probs = (values - log_z.unsqueeze(-1)).exp()
    if k == vocab:
        tail = torch.zeros_like(log_z)
    else:
        rest = x.scatter(-1, indices, float("-inf"))
        tail = (torch.logsumexp(rest, dim=-1) - log_z).exp()
    return indices, probs, tail


def pack_topk(
    indices: torch.Tensor | np.ndarray, probs: torch.Tensor | np.ndarray, tail: torch.Tensor | np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Storage dtypes: ``(int32 [n, k], float16 [n, k], float16 [n])`` numpy arrays."""

    def _np(x):
        return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)

    idx = _np(indices)
    if idx.size and (idx.min() < 0 or idx.max() > np.iinfo(np.int32).max):
        raise ValueError("class indices do not fit in int32")
    return (
        np.ascontiguousarray(idx, dtype=np.int32),
        np.ascontiguousarray(_np(probs), dtype=np.float16),
        np.ascontiguousarray(_np(tail), dtype=np.float16),
    )


def unpack_topk(
    indices: Sequence | np.ndarray | torch.Tensor,
    probs: Sequence | np.ndarray | torch.Tensor,
    tail: Sequence | np.ndarray | torch.Tensor,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stored columns of one row (lists, numpy or tensors) -> ``(int64 [n, k], float32 [n, k], float32 [n])``."""

    def _t(x, dtype):
        if isinstance(x, torch.Tensor):
            return x.to(device=device, dtype=dtype)
        arr = np.asarray(x, dtype=np.float64 if dtype.is_floating_point else np.int64)
        return torch.as_tensor(arr, device=device).to(dtype)

    idx = _t(indices, torch.int64)
    p = _t(probs, torch.float32)
    t = _t(tail, torch.float32)
    if idx.dim() == 1 and idx.numel() == 0:
        idx = idx.reshape(0, 0)
        p = p.reshape(0, 0)
    if idx.shape != p.shape or idx.shape[:1] != t.shape:
        raise ValueError(
            f"inconsistent soft-label shapes: indices {tuple(idx.shape)}, probs {tuple(p.shape)}, tail {tuple(t.shape)}"
        )
    return idx, p, t


# --------------------------------------------------------------------------------------------------
# Arrow/Parquet columns


def arrow_fields(k: int):
    """The three schema fields of a store holding top-``k`` soft labels."""
    import pyarrow as pa

    return [
        pa.field("topk_indices", pa.list_(pa.list_(pa.int32(), k))),
        pa.field("topk_probs", pa.list_(pa.list_(pa.float16(), k))),
        pa.field("topk_tail", pa.list_(pa.float16())),
    ]


def arrow_columns(rows: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray] | None], k: int):
    """Build the three columns from per-row packed arrays (``None`` for a row without soft labels)."""
    import pyarrow as pa

    offsets = [0]
    valid = []
    idx_parts, prob_parts, tail_parts = [], [], []
    for row in rows:
        if row is None:
            valid.append(False)
            offsets.append(offsets[-1])
            continue
        idx, prob, tail = row
        n = len(tail)
        if idx.shape != (n, k) or prob.shape != (n, k):
            raise ValueError(f"soft labels must be [n, {k}], got {idx.shape} / {prob.shape} for {n} positions")
        valid.append(True)
        offsets.append(offsets[-1] + n)
        idx_parts.append(idx.reshape(-1))
        prob_parts.append(prob.reshape(-1))
        tail_parts.append(tail)

    def _cat(parts, dtype):
        return np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype=dtype)

    flat_idx = pa.array(_cat(idx_parts, np.int32), type=pa.int32())
    flat_prob = pa.array(_cat(prob_parts, np.float16), type=pa.float16())
    flat_tail = pa.array(_cat(tail_parts, np.float16), type=pa.float16())
    off = pa.array(np.asarray(offsets, dtype=np.int32), type=pa.int32())
    mask = pa.array([not v for v in valid], type=pa.bool_())
    fields = arrow_fields(k)
    return {
        "topk_indices": pa.ListArray.from_arrays(off, pa.FixedSizeListArray.from_arrays(flat_idx, k), mask=mask).cast(
            fields[0].type
        ),
        "topk_probs": pa.ListArray.from_arrays(off, pa.FixedSizeListArray.from_arrays(flat_prob, k), mask=mask).cast(
            fields[1].type
        ),
        "topk_tail": pa.ListArray.from_arrays(off, flat_tail, mask=mask).cast(fields[2].type),
    }
