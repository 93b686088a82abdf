"""BERT -> DistilBERT students: parameters renamed, token type 0 folded into the position embeddings."""

from __future__ import annotations

import warnings
from typing import Any

import torch

from .copying import new_model
from .layers import resolve_layers
from .same import build_same

# BERT layer sub-module -> DistilBERT TransformerBlock sub-module.
_BERT_TO_DISTILBERT_LAYER = {
    "attention.self.query": "attention.q_lin",
    "attention.self.key": "attention.k_lin",
    "attention.self.value": "attention.v_lin",
    "attention.output.dense": "attention.out_lin",
    "attention.output.LayerNorm": "sa_layer_norm",
    "intermediate.dense": "ffn.lin1",
    "output.dense": "ffn.lin2",
    "output.LayerNorm": "output_layer_norm",
}

# BERT class -> DistilBERT class with the matching head.
_BERT_TO_DISTILBERT_CLASS = {
    "BertModel": "DistilBertModel",
    "BertForMaskedLM": "DistilBertForMaskedLM",
    "BertForPreTraining": "DistilBertForMaskedLM",
    "BertForSequenceClassification": "DistilBertForSequenceClassification",
    "BertForTokenClassification": "DistilBertForTokenClassification",
    "BertForQuestionAnswering": "DistilBertForQuestionAnswering",
}

# DistilBERT head parameter (without ".weight"/".bias") -> BERT head parameter, per student class.
_DISTILBERT_HEADS = {
    "DistilBertModel": {},
    "DistilBertForMaskedLM": {
        "vocab_transform": "cls.predictions.transform.dense",
        "vocab_layer_norm": "cls.predictions.transform.LayerNorm",
        "vocab_projector.weight": "cls.predictions.decoder.weight",
        "vocab_projector.bias": "cls.predictions.bias",
    },
    "DistilBertForSequenceClassification": {
        "pre_classifier": "{bert}pooler.dense",
        "classifier": "classifier",
    },
    "DistilBertForTokenClassification": {"classifier": "classifier"},
    "DistilBertForQuestionAnswering": {"qa_outputs": "qa_outputs"},
}


def _check_bert_for_distilbert(teacher) -> None:
    config = teacher.config
    name = type(teacher).__name__
    if getattr(config, "model_type", None) == "distilbert":
        return
    if getattr(config, "model_type", None) != "bert":
        raise ValueError(
            f"unsupported architecture: only BERT teachers convert to DistilBERT, got {name} "
            f"(model_type {getattr(config, 'model_type', None)!r}); use architecture='same' instead"
        )
    if name not in _BERT_TO_DISTILBERT_CLASS:
        raise ValueError(
            f"unsupported architecture: no DistilBERT class for {name}; supported: {', '.join(_BERT_TO_DISTILBERT_CLASS)} "
            "(or use architecture='same')"
        )
    pos = getattr(config, "position_embedding_type", "absolute")
    if pos not in (None, "absolute"):
        raise ValueError(
            f"DistilBERT only has absolute position embeddings; this BERT uses position_embedding_type={pos!r}: "
            "use architecture='same'"
        )
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        raise ValueError("DistilBERT is an encoder without cross-attention; this BERT is a decoder: use architecture='same'")
    act = config.hidden_act
    if act not in ("gelu", "relu"):
        raise ValueError(
            f"DistilBERT supports activation 'gelu' or 'relu'; this BERT uses hidden_act={act!r}: use architecture='same'"
        )
    if getattr(config, "embedding_size", config.hidden_size) != config.hidden_size:
        raise ValueError("DistilBERT needs embedding size == hidden size (dim); use architecture='same'")
    eps = getattr(config, "layer_norm_eps", 1e-12)
    if eps != 1e-12:
        warnings.warn(
            f"DistilBERT's layer norms use eps=1e-12, the teacher uses layer_norm_eps={eps}: "
            "the converted student will not reproduce the teacher's outputs exactly",
            stacklevel=3,
        )


def build_distilbert(teacher, layers: list[int] | None, num_layers: int | None) -> tuple[Any, dict]:
    import transformers
    from transformers import DistilBertConfig

    _check_bert_for_distilbert(teacher)
    if teacher.config.model_type == "distilbert":
        student, info = build_same(teacher, layers, num_layers)
        info["architecture"] = "distilbert"
        return student, info

    config = teacher.config
    total = config.num_hidden_layers
    chosen = resolve_layers(total, num_layers, layers)
    student_class_name = _BERT_TO_DISTILBERT_CLASS[type(teacher).__name__]
    classifier_dropout = getattr(config, "classifier_dropout", None)
    extra: dict[str, Any] = {}
    if student_class_name in ("DistilBertForSequenceClassification", "DistilBertForTokenClassification"):
        extra.update(num_labels=config.num_labels, id2label=dict(config.id2label), label2id=dict(config.label2id))
        if getattr(config, "problem_type", None) is not None:
            extra["problem_type"] = config.problem_type
    student_config = DistilBertConfig(
        vocab_size=config.vocab_size,
        max_position_embeddings=config.max_position_embeddings,
        sinusoidal_pos_embds=False,
        n_layers=len(chosen),
        n_heads=config.num_attention_heads,
        dim=config.hidden_size,
        hidden_dim=config.intermediate_size,
        dropout=config.hidden_dropout_prob,
        attention_dropout=config.attention_probs_dropout_prob,
        activation=config.hidden_act,
        initializer_range=config.initializer_range,
        qa_dropout=config.hidden_dropout_prob,
        seq_classif_dropout=classifier_dropout if classifier_dropout is not None else config.hidden_dropout_prob,
        pad_token_id=config.pad_token_id,
        bos_token_id=getattr(config, "bos_token_id", None),
        eos_token_id=getattr(config, "eos_token_id", None),
        tie_word_embeddings=getattr(config, "tie_word_embeddings", True),
        **extra,
    )
    student = new_model(getattr(transformers, student_class_name), student_config, teacher)

    source = teacher.state_dict()
    t = "bert." if type(teacher).__name__ != "BertModel" else ""
    s = "distilbert." if student_class_name != "DistilBertModel" else ""
    mapping: dict[str, str] = {
        f"{s}embeddings.word_embeddings.weight": f"{t}embeddings.word_embeddings.weight",
        f"{s}embeddings.LayerNorm.weight": f"{t}embeddings.LayerNorm.weight",
        f"{s}embeddings.LayerNorm.bias": f"{t}embeddings.LayerNorm.bias",
    }
    for i, j in enumerate(chosen):
        for bert_name, distil_name in _BERT_TO_DISTILBERT_LAYER.items():
            for kind in ("weight", "bias"):
                mapping[f"{s}transformer.layer.{i}.{distil_name}.{kind}"] = f"{t}encoder.layer.{j}.{bert_name}.{kind}"
    for distil_name, bert_name in _DISTILBERT_HEADS[student_class_name].items():
        bert_name = bert_name.format(bert=t)
        if distil_name.endswith((".weight", ".bias")):
            mapping[distil_name] = bert_name
        else:
            for kind in ("weight", "bias"):
                mapping[f"{distil_name}.{kind}"] = f"{bert_name}.{kind}"

    target: dict[str, torch.Tensor] = {}
    for key, src in mapping.items():
        if src not in source:
            raise ValueError(f"cannot convert to DistilBERT: the teacher has no {src!r} (for {key!r})")
        target[key] = source[src]
    # DistilBERT has no token type embeddings: fold type 0 into every position so that
    # word + position (DistilBERT) == word + position + token_type[0] (BERT without token_type_ids).
    positions = source[f"{t}embeddings.position_embeddings.weight"]
    token_type0 = source[f"{t}embeddings.token_type_embeddings.weight"][0]
    target[f"{s}embeddings.position_embeddings.weight"] = positions + token_type0

    expected = set(student.state_dict())
    missing = expected - set(target)
    if missing:
        raise ValueError(f"cannot convert to DistilBERT: no source for {sorted(missing)}")
    with torch.no_grad():
        student.load_state_dict(target, strict=True)
    info = {
        "architecture": "distilbert",
        "teacher_layers": chosen,
        "teacher_num_layers": total,
        "notes": [
            "token_type_embeddings[0] folded into position_embeddings (DistilBERT has no token types); "
            "outputs match the BERT teacher's layers for inputs without token type 1",
        ],
    }
    if student_class_name == "DistilBertForSequenceClassification":
        info["notes"].append(
            "pre_classifier <- BERT pooler dense, classifier <- BERT classifier; "
            "DistilBERT applies ReLU where BERT's pooler applies tanh"
        )
    return student, info
