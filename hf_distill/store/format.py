"""The store's columns: a teacher's distribution at one position as its top-k and the tail mass.

One position (a token, a frame, or the one prediction of a sequence classifier) is stored as the ``k``
most probable class indices, their probabilities at the store's temperature (float16, in decreasing
order) and the tail mass, the probability of every other class together (float16, computed exactly as a
log-sum-exp, so it keeps its precision when tiny). Indices are ``uint16`` when the vocabulary has at
most 65,536 entries (Whisper's 51,864, BERT's 30,522, ...), else ``int32``.

A row of a store holds one entry per position of its sequence in each column:

- ``topk_indices``: ``list<fixed_size_list<uint16 | int32, k>>``
- ``topk_probs``:   ``list<fixed_size_list<float16, k>>``
- ``topk_tail``:    ``list<float16>``
- ``hidden_<layer>`` (optional): ``list<fixed_size_list<float16, width>>``, a hidden state per position

which ``datasets`` loads as ``List(List(Value("uint16"), length=k))`` etc. Raw size per position:
``4 k + 2`` bytes with uint16 indices (``6 k + 2`` with int32), against ``2 V`` for a dense fp16 row;
in Parquet the float16 columns are written byte-stream-split and every column zstd-compressed.

The KL over the ``k`` stored classes plus one bucket for the tail (:func:`hf_distill.losses.topk_kl_loss`)
equals the dense ``KL(p_T || p_S)`` when ``k = V`` (up to the float16 rounding of the probabilities) and
otherwise never exceeds it: the difference is ``tail_T * KL(p_T(. | tail) || p_S(. | tail)) >= 0``. Store the
teacher at the distillation temperature: a top-k cannot be re-tempered exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = [
    "INDEX_TYPES",
    "TOPK_COLUMNS",
    "arrow_columns",
    "arrow_fields",
    "bytes_per_position",
    "hidden_column",
    "hidden_arrow_column",
    "hidden_field",
    "index_type_for",
    "pack_topk",
    "parquet_encodings",
    "topk_from_logits",
    "unpack_topk",
]

#: the three columns of a position's top-k
TOPK_COLUMNS = ("topk_indices", "topk_probs", "topk_tail")
#: index storage types and their bytes
INDEX_TYPES = {"uint16": 2, "int32": 4}


def index_type_for(vocab_size: int) -> str:
    """``uint16`` when every class index of a ``vocab_size`` vocabulary fits in it, else ``int32``."""
    vocab_size = int(vocab_size)
    if vocab_size < 1:
        raise ValueError(f"the vocabulary size must be >= 1, got {vocab_size}")
    if vocab_size - 1 > np.iinfo(np.int32).max:
        raise ValueError(f"a vocabulary of {vocab_size} entries does not fit int32 indices")
    return "uint16" if vocab_size <= 1 << 16 else "int32"


def _check_index_type(index_type: str) -> str:
    if index_type not in INDEX_TYPES:
        raise ValueError(f"index type must be one of {sorted(INDEX_TYPES)}, got {index_type!r}")
    return index_type


def bytes_per_position(k: int, index_type: str = "int32") -> int:
    """Raw (uncompressed) bytes per stored position: k indices, k fp16 probabilities, 1 fp16 tail."""
    return (INDEX_TYPES[_check_index_type(index_type)] + 2) * int(k) + 2


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


def _np(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def pack_topk(
    indices: torch.Tensor | np.ndarray, probs: torch.Tensor | np.ndarray, tail: torch.Tensor | np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """In-memory dtypes of a row's top-k: ``(int32 [n, k], float16 [n, k], float16 [n])`` numpy arrays (the
    indices take the store's index type when the table is built, :func:`arrow_columns`)."""
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
# Arrow / Parquet


def _arrow_index_type(index_type: str):
    import pyarrow as pa

    return pa.uint16() if _check_index_type(index_type) == "uint16" else pa.int32()


def arrow_fields(k: int, index_type: str = "int32"):
    """The three schema fields of a store holding top-``k`` distributions."""
    import pyarrow as pa

    return [
        pa.field("topk_indices", pa.list_(pa.list_(_arrow_index_type(index_type), k))),
        pa.field("topk_probs", pa.list_(pa.list_(pa.float16(), k))),
        pa.field("topk_tail", pa.list_(pa.float16())),
    ]


def hidden_column(layer: int) -> str:
    """The store column of hidden-state layer ``layer`` (0: the embeddings' output, as in ``hidden_states``)."""
    return f"hidden_{int(layer)}"


def hidden_field(layer: int, width: int):
    import pyarrow as pa

    return pa.field(hidden_column(layer), pa.list_(pa.list_(pa.float16(), int(width))))


def _offsets_and_mask(lengths: Sequence[int | None]):
    import pyarrow as pa

    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([n or 0 for n in lengths])
    if offsets[-1] > np.iinfo(np.int32).max:
        raise ValueError("a shard holds more than 2^31 positions; use a smaller shard_size")
    mask = pa.array([n is None for n in lengths], type=pa.bool_())
    return pa.array(offsets.astype(np.int32), type=pa.int32()), mask


def _cat(parts, dtype) -> np.ndarray:
    return np.concatenate([p.reshape(-1) for p in parts]).astype(dtype, copy=False) if parts else np.zeros(0, dtype)


def arrow_columns(rows: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray] | None], k: int, index_type: str = "int32"):
    """The three columns from per-row packed arrays (``None`` for a row without a distribution)."""
    import pyarrow as pa

    lengths, idx_parts, prob_parts, tail_parts = [], [], [], []
    for row in rows:
        if row is None:
            lengths.append(None)
            continue
        idx, prob, tail = row
        n = len(tail)
        if idx.shape != (n, k) or prob.shape != (n, k):
            raise ValueError(f"soft labels must be [n, {k}], got {idx.shape} / {prob.shape} for {n} positions")
        lengths.append(n)
        idx_parts.append(idx)
        prob_parts.append(prob)
        tail_parts.append(tail)
    flat_idx = _cat(idx_parts, np.int64)
    if index_type == "uint16" and flat_idx.size and flat_idx.max() > np.iinfo(np.uint16).max:
        raise ValueError(f"class index {int(flat_idx.max())} does not fit the store's uint16 indices")
    off, mask = _offsets_and_mask(lengths)
    fields = arrow_fields(k, index_type)
    itype = _arrow_index_type(index_type)
    flat = {
        "topk_indices": pa.FixedSizeListArray.from_arrays(pa.array(flat_idx.astype(itype.to_pandas_dtype()), itype), k),
        "topk_probs": pa.FixedSizeListArray.from_arrays(pa.array(_cat(prob_parts, np.float16), pa.float16()), k),
        "topk_tail": pa.array(_cat(tail_parts, np.float16), pa.float16()),
    }
    return {f.name: pa.ListArray.from_arrays(off, flat[f.name], mask=mask).cast(f.type) for f in fields}


def hidden_arrow_column(rows: Sequence[np.ndarray | None], layer: int, width: int):
    """One hidden-state column from per-row ``[n, width]`` arrays (stored as float16)."""
    import pyarrow as pa

    lengths, parts = [], []
    for row in rows:
        if row is None:
            lengths.append(None)
            continue
        if row.ndim != 2 or row.shape[1] != width:
            raise ValueError(f"hidden states of layer {layer} must be [n, {width}], got {row.shape}")
        lengths.append(row.shape[0])
        parts.append(row)
    off, mask = _offsets_and_mask(lengths)
    values = pa.FixedSizeListArray.from_arrays(pa.array(_cat(parts, np.float16), pa.float16()), int(width))
    return pa.ListArray.from_arrays(off, values, mask=mask).cast(hidden_field(layer, width).type)


def parquet_encodings(schema) -> dict[str, str]:
    """Column encodings for ``pyarrow.parquet.ParquetWriter(column_encoding=...)``: float16 leaves (probabilities,
    tails, hidden states) byte-stream-split, which lets zstd compress their exponent bytes (about 20% smaller
    at k = 64 on Whisper's distributions than plain)."""
    import pyarrow as pa

    out = {}
    for f in schema:
        path, t = [f.name], f.type
        while pa.types.is_list(t) or pa.types.is_fixed_size_list(t):
            path.append("list.element")
            t = t.value_type
        if pa.types.is_float16(t):
            out[".".join(path)] = "BYTE_STREAM_SPLIT"
    return out
