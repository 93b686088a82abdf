"""The teacher-output store: a teacher run once, its outputs read by every epoch and every student after.

One format for text and speech (:mod:`~hf_distill.store.format`: per position the top-k probabilities in
float16, their indices in uint16 when the vocabulary fits, else int32, and the tail mass; optionally
hidden states), one writer (:mod:`~hf_distill.store.writer`: Parquet shards written atomically, resumable
shard by shard, split over processes), one manifest (:mod:`~hf_distill.store.manifest`: teacher, revision,
tokenizer hash, max length, k, temperature, data fingerprint; a resume with other settings is refused
with the differences).

* :func:`cache_teacher` / ``hf-distill cache-teacher``: store a sequence-classification, masked-LM,
  token-classification or causal-LM teacher's outputs over a tokenized dataset;
* :func:`join_store`: the dataset with the teacher's columns, checked against the store;
* :class:`StoreCollator`: pads them per batch for :class:`~hf_distill.trainer.DistillationTrainer`
  (``teacher_source="stored"``, or :class:`~hf_distill.sources.StoredTeacher` with ``store=``);
* the speech labeller (``hf-distill pseudo-label --top_k``) writes its soft labels in the same format.
"""

from .caching import FORMAT, HEADS, cache_teacher
from .collator import StoreCollator
from .format import (
    TOPK_COLUMNS,
    bytes_per_position,
    index_type_for,
    pack_topk,
    topk_from_logits,
    unpack_topk,
)
from .manifest import StoreMismatchError, read_manifest
from .reader import BATCH_COLUMNS, check_complete, check_store_fits, join_store, load_store, store_summary

__all__ = [
    "BATCH_COLUMNS",
    "FORMAT",
    "HEADS",
    "TOPK_COLUMNS",
    "StoreCollator",
    "StoreMismatchError",
    "bytes_per_position",
    "cache_teacher",
    "check_complete",
    "check_store_fits",
    "index_type_for",
    "join_store",
    "load_store",
    "pack_topk",
    "read_manifest",
    "store_summary",
    "topk_from_logits",
    "unpack_topk",
]
