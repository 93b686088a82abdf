"""Speech: audio input, long-form chunking, pseudo-labelling with Whisper or CTC teachers, soft labels.

Submodules load on first use (``import hf_distill.speech`` stays cheap):

- :mod:`~hf_distill.speech.audio`: list audio from a folder, a manifest or a ``datasets`` dataset; decode,
  downmix and resample; plan long-form chunks.
- :mod:`~hf_distill.speech.pseudo_label`: ``PseudoLabelConfig``, ``pseudo_label``, ``finalize``,
  ``load_pseudo_labels`` and the ``hf-distill pseudo-label`` command.
- :mod:`~hf_distill.speech.soft_labels`: compact top-k soft labels (pack/unpack, top-k of logits).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "AudioItem": "hf_distill.speech.audio",
    "AudioFailure": "hf_distill.speech.audio",
    "AudioError": "hf_distill.speech.audio",
    "list_audio": "hf_distill.speech.audio",
    "list_folder": "hf_distill.speech.audio",
    "list_manifest": "hf_distill.speech.audio",
    "list_dataset": "hf_distill.speech.audio",
    "probe": "hf_distill.speech.audio",
    "decode": "hf_distill.speech.audio",
    "resample": "hf_distill.speech.audio",
    "plan_chunks": "hf_distill.speech.audio",
    "PseudoLabelConfig": "hf_distill.speech.pseudo_label",
    "pseudo_label": "hf_distill.speech.pseudo_label",
    "finalize": "hf_distill.speech.pseudo_label",
    "load_pseudo_labels": "hf_distill.speech.pseudo_label",
    "merge_overlapping_texts": "hf_distill.speech.pseudo_label",
    "topk_from_logits": "hf_distill.speech.soft_labels",
    "pack_topk": "hf_distill.speech.soft_labels",
    "unpack_topk": "hf_distill.speech.soft_labels",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'hf_distill.speech' has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value
