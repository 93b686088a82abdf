"""hf_distill: knowledge distillation for Hugging Face Transformers (text and speech).

The public API. Heavy modules (the trainer pulls in transformers' Trainer) load on first use.
"""

from __future__ import annotations

from hf_distill._lazy import lazy_exports

__version__ = "0.1.0"

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "hf_distill.arguments": ("DistillationArguments",),
    "hf_distill.trainer": ("DistillationTrainer",),
    "hf_distill.students": ("build_student", "build_whisper_student", "build_ctc_student", "select_layers"),
    "hf_distill.data.mlm": ("DistilMLMCollator", "count_tokens"),
    "hf_distill.data.text": ("load_text_dataset", "tokenize_and_pack", "split_train_eval"),
    "hf_distill.objectives": ("Term", "register_term", "build_objective"),
    "hf_distill.teachers": ("cache_teacher_logits", "load_teacher"),
    "hf_distill.hub": ("write_model_card",),
    "hf_distill.quantization": ("prepare_qat_student", "export_int8", "quantize_dynamic_int8", "save_int8",
                                "load_int8"),
    "hf_distill.early_exit": ("EarlyExitModel", "save_exit_heads", "load_exit_heads", "export_exit_model"),
    "hf_distill.sources": ("TeacherSource", "FrozenTeacher", "StoredTeacher", "PeerTeacher", "EmaTeacher",
                           "SnapshotTeacher"),
    "hf_distill.speech.labelling": ("PseudoLabelConfig", "pseudo_label", "load_pseudo_labels"),
    "hf_distill.speech.convert_ct2": ("convert_ct2_whisper",),
}, submodules=("losses",))
__all__ = sorted([*__all__, "losses"]) + ["__version__"]
