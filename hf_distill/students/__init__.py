"""Students: build a shallower model from a teacher by copying a subset of its layers.

A good starting point for a distilled student is the teacher itself with layers taken out: the
embeddings, the output head and an evenly spaced subset of the transformer layers are copied
exactly, so the student starts close to the teacher instead of from random weights.

Supported:

* **same architecture** (``architecture="same"``): the student has the teacher's class and config,
  with fewer layers. Works for BERT, RoBERTa, DistilBERT and other models whose layers sit in one
  ``nn.ModuleList`` (``model.base_model.encoder.layer`` and the like), with any head (masked LM,
  sequence/token classification, ...). Encoder-decoder models other than Whisper are refused.
* **BERT -> DistilBERT** (``architecture="distilbert"``): BERT parameters renamed to DistilBERT's.
  DistilBERT has no token type embeddings. BERT adds ``token_type_embeddings[0]`` to every token
  when no ``token_type_ids`` are given, so that row is *folded into the position embeddings*:
  ``position_embeddings[p] + token_type_embeddings[0]``. The DistilBERT student then computes
  exactly what the BERT student with the same layers computes for single-segment inputs (the
  original DistilBERT extraction dropped token types without folding them in). Inputs that use
  token type 1 (sentence pairs) lose that signal. For sequence classification, DistilBERT's
  ``pre_classifier`` gets BERT's pooler dense layer and ``classifier`` BERT's classifier; the
  heads differ in their activation (DistilBERT: ReLU, BERT's pooler: tanh), so classification
  logits are a starting point, not a copy.
* **Whisper** (:func:`build_whisper_student`): Distil-Whisper style, whole encoder (or a subset of
  its layers) and a few decoder layers, first and last included.
* **wav2vec2-style CTC** (:func:`build_ctc_student`): feature encoder, projection, positional
  convolution, chosen transformer layers and the CTC head.

``hf-distill init-student`` (:func:`cli_main`) does the same from the command line and saves the
student with its tokenizer/processor and a ``distillation_init.json`` describing where each layer
came from.

Modules: ``layers`` (which layers), ``copying`` (loading, tensor copies), ``same``, ``distilbert``,
``speech`` (the builders), ``saving``, ``build`` (the entry point and the command line).
"""

from ..modeling import find_layer_list
from .build import ARCHITECTURES, build_student, cli_main
from .efficient import (
    BiLSTMClassifierConfig,
    BiLSTMForSequenceClassification,
    CNNClassifierConfig,
    CNNForSequenceClassification,
    build_efficient_student,
)
from .freezing import freeze_embeddings
from .layers import select_layers
from .saving import INIT_INFO_FILE
from .speech import build_ctc_student, build_whisper_student, freeze_whisper_embeddings

__all__ = [
    "ARCHITECTURES",
    "BiLSTMClassifierConfig",
    "BiLSTMForSequenceClassification",
    "CNNClassifierConfig",
    "CNNForSequenceClassification",
    "build_efficient_student",
    "INIT_INFO_FILE",
    "build_ctc_student",
    "build_student",
    "build_whisper_student",
    "freeze_embeddings",
    "freeze_whisper_embeddings",
    "cli_main",
    "find_layer_list",
    "select_layers",
]
