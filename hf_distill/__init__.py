"""hf_distill: knowledge distillation for Hugging Face Transformers (text and speech).

The public API. Heavy modules (the trainer pulls in transformers' Trainer) load on first use.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "DistillationArguments": "hf_distill.arguments",
    "DistillationTrainer": "hf_distill.trainer",
    "build_student": "hf_distill.students",
    "build_whisper_student": "hf_distill.students",
    "build_ctc_student": "hf_distill.students",
    "select_layers": "hf_distill.students",
    "DistilMLMCollator": "hf_distill.data.mlm",
    "count_tokens": "hf_distill.data.mlm",
    "load_text_dataset": "hf_distill.data.text",
    "tokenize_and_pack": "hf_distill.data.text",
    "split_train_eval": "hf_distill.data.text",
    "Term": "hf_distill.objectives",
    "register_term": "hf_distill.objectives",
    "build_objective": "hf_distill.objectives",
    "cache_teacher_logits": "hf_distill.teachers",
    "load_teacher": "hf_distill.teachers",
    "write_model_card": "hf_distill.hub",
    "PseudoLabelConfig": "hf_distill.speech.pseudo_label",
    "pseudo_label": "hf_distill.speech.pseudo_label",
    "load_pseudo_labels": "hf_distill.speech.pseudo_label",
    "convert_ct2_whisper": "hf_distill.speech.convert_ct2",
    "losses": "hf_distill.losses",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'hf_distill' has no attribute {name!r}")
    module = importlib.import_module(module_name)
    value = module if module_name.endswith("." + name) else getattr(module, name)
    globals()[name] = value
    return value
