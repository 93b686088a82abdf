"""Pseudo-labelling audio with a speech teacher (Whisper or CTC), resumably, into Parquet shards.

One labeller, ``hf-distill pseudo-label`` (:func:`pseudo_label` with a :class:`PseudoLabelConfig`); packing
several short clips into one Whisper window is an option of it, on by default where it is exact
(:mod:`~hf_distill.speech.labelling.config` says when). Modules:

- :mod:`~hf_distill.speech.labelling.config`: the configuration, its hash, when packing applies.
- :mod:`~hf_distill.speech.labelling.teachers`: Whisper and CTC teachers.
- :mod:`~hf_distill.speech.labelling.planning`: which windows each shard's teacher reads, in which order.
- :mod:`~hf_distill.speech.labelling.packing`: packed windows: packing, cutting at pauses, splitting transcripts.
- :mod:`~hf_distill.speech.labelling.audio_thread`: reading the windows in a background thread.
- :mod:`~hf_distill.speech.labelling.decoding`: labelling one shard.
- :mod:`~hf_distill.speech.labelling.rows`: a store row from a recording's results; filters.
- :mod:`~hf_distill.speech.labelling.text`: stitching transcripts, compression ratio, WER.
- :mod:`~hf_distill.speech.labelling.store`: the store format, the manifest, the summary, loading.
- :mod:`~hf_distill.speech.labelling.job`: the resumable job; :mod:`~hf_distill.speech.labelling.cli`: the command.
"""

from __future__ import annotations

from hf_distill._lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "hf_distill.speech.labelling.config": ("PseudoLabelConfig", "ConfigMismatchError", "FAILPOINT_ENV"),
    "hf_distill.speech.labelling.job": ("pseudo_label",),
    "hf_distill.speech.labelling.store": ("finalize", "load_pseudo_labels"),
    "hf_distill.speech.labelling.teachers": ("load_teacher",),
    "hf_distill.speech.labelling.text": ("compression_ratio", "load_normalizer", "merge_overlapping_texts",
                                         "word_error_rate"),
    "hf_distill.speech.labelling.cli": ("cli_main",),
})
