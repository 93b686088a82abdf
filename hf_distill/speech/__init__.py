"""Speech: audio input, long-form chunking, pseudo-labelling with Whisper or CTC teachers, soft labels.

Submodules load on first use (``import hf_distill.speech`` stays cheap):

- :mod:`~hf_distill.speech.audio`: list audio from a folder, a manifest or a ``datasets`` dataset; decode,
  downmix and resample; plan long-form chunks.
- :mod:`~hf_distill.speech.audio_stream`: long recordings read in blocks, a window at a time (bounded memory).
- :mod:`~hf_distill.speech.labelling`: ``PseudoLabelConfig``, ``pseudo_label``, ``finalize``,
  ``load_pseudo_labels`` and the ``hf-distill pseudo-label`` command (window packing included).
- :mod:`~hf_distill.speech.soft_labels`: compact top-k soft labels (pack/unpack, top-k of logits).
"""

from __future__ import annotations

from hf_distill._lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "hf_distill.speech.audio": ("AudioItem", "AudioFailure", "AudioError", "list_audio", "list_folder",
                                "list_manifest", "list_dataset", "probe", "decode", "resample"),
    "hf_distill.speech.windows": ("Chunk", "plan_chunks"),
    "hf_distill.speech.audio_stream": ("WindowReader", "iter_blocks"),
    "hf_distill.speech.labelling": ("PseudoLabelConfig", "pseudo_label", "finalize", "load_pseudo_labels",
                                    "merge_overlapping_texts"),
    "hf_distill.speech.soft_labels": ("topk_from_logits", "pack_topk", "unpack_topk"),
})
