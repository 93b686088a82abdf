"""Data utilities: text corpora loading and packing, DistilBERT-style masking.

Names load on first use, so importing the collator does not import ``datasets``.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "DistilMLMCollator": "hf_distill.data.mlm",
    "count_tokens": "hf_distill.data.mlm",
    "token_sampling_weights": "hf_distill.data.mlm",
    "load_text_dataset": "hf_distill.data.text",
    "tokenize_and_pack": "hf_distill.data.text",
    "split_train_eval": "hf_distill.data.text",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'hf_distill.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
