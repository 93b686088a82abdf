"""Data utilities: text corpora loading and packing, DistilBERT-style masking, local path checks.

Names load on first use, so importing the collator does not import ``datasets``.
"""

from __future__ import annotations

from hf_distill._lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "hf_distill.data.mlm": ("DistilMLMCollator", "count_tokens", "token_sampling_weights"),
    "hf_distill.data.text": ("load_text_dataset", "tokenize_and_pack", "split_train_eval"),
    "hf_distill.data.paths": ("check_local_path",),
})
