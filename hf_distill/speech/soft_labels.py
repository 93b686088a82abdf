"""Compact top-k soft labels of the speech labeller: the teacher-output store's format, re-exported.

The speech pseudo-label store and ``hf-distill cache-teacher`` write one format, defined in
:mod:`hf_distill.store.format`: per position the ``k`` most probable class indices (``uint16`` when the
vocabulary fits, as Whisper's 51,864 tokens do; stores started before that keep ``int32``), their
probabilities (float16) and the tail mass (float16). Columns ``topk_indices`` / ``topk_probs`` /
``topk_tail``, one entry per position of the row (Whisper: per token of ``token_ids``; CTC: per output
frame). :func:`unpack_topk` turns a row back into ``int64`` / ``float32`` tensors, whatever its index type.

Train against them with :func:`hf_distill.losses.topk_kl_loss` (``teacher_values="probs"``,
``teacher_tail_mass=tail``): the KL over the ``k`` stored classes plus one bucket for the tail, equal to the
dense KL when ``k = V`` (up to float16 rounding) and never above it otherwise. Store the labels at the
distillation temperature (``soft_label_temperature``): a top-k cannot be re-tempered exactly.
"""

from __future__ import annotations

from hf_distill.store.format import (
    arrow_columns,
    arrow_fields,
    bytes_per_position,
    index_type_for,
    pack_topk,
    topk_from_logits,
    unpack_topk,
)

__all__ = [
    "arrow_columns",
    "arrow_fields",
    "bytes_per_position",
    "index_type_for",
    "pack_topk",
    "topk_from_logits",
    "unpack_topk",
]
