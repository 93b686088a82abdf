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
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .modeling import count_parameters, find_layer_list, parse_layer_list
from .modeling import num_layers as count_layers
from .teachers import load_teacher

__all__ = [
    "select_layers",
    "build_student",
    "build_whisper_student",
    "build_ctc_student",
    "cli_main",
    "INIT_INFO_FILE",
]

INIT_INFO_FILE = "distillation_init.json"

ARCHITECTURES = ("same", "distilbert")

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

_TASK_CLASSES = {"mlm": "masked_lm", "sequence-classification": "sequence_classification"}


# --------------------------------------------------------------------------------------------
# Layer choice
# --------------------------------------------------------------------------------------------


def _check_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    return value


def select_layers(num_teacher_layers: int, num_student_layers: int) -> list[int]:
    """Teacher layer indices for a student with ``num_student_layers`` layers.

    Evenly spaced from the first to the last teacher layer inclusive:
    ``round(linspace(0, L - 1, n))``, de-duplicated. The last layer is always included, and a
    one-layer student gets the last teacher layer. ``select_layers(12, 6)`` is
    ``[0, 2, 4, 7, 9, 11]``, the layers DistilBERT was initialised from.
    """
    total = _check_int("num_teacher_layers", num_teacher_layers)
    n = _check_int("num_student_layers", num_student_layers)
    if total < 1:
        raise ValueError(f"the teacher must have at least one layer, got num_teacher_layers={total}")
    if n < 1:
        raise ValueError(f"a student needs at least one layer, got num_student_layers={n}; ask for 1 to {total}")
    if n > total:
        raise ValueError(
            f"cannot build a student with {n} layers from a teacher with {total}: "
            f"ask for at most {total} layers (num_layers <= {total})"
        )
    if n == 1:
        return [total - 1]
    chosen: list[int] = []
    for i in range(n):
        index = round(i * (total - 1) / (n - 1))
        if index not in chosen:
            chosen.append(index)
    chosen[-1] = total - 1
    return chosen


def _resolve_layers(total: int, num_layers: int | None, layers: list[int] | None, what: str = "layers") -> list[int]:
    """Validate an explicit layer list, or choose ``num_layers`` evenly (default: half the teacher)."""
    if layers is None:
        if num_layers is None:
            num_layers = max(1, total // 2)
        return select_layers(total, num_layers)
    if isinstance(layers, str):
        layers = parse_layer_list(layers)
    layers = [_check_int(f"each entry of {what}", i) for i in layers]
    if not layers:
        raise ValueError(f"{what} is empty: give at least one teacher layer index (0 to {total - 1})")
    bad = [i for i in layers if not 0 <= i < total]
    if bad:
        raise ValueError(
            f"teacher layer index {bad[0]} in {what}={layers} is out of range: "
            f"the teacher has {total} layers, so indices must be between 0 and {total - 1}"
        )
    if len(set(layers)) != len(layers):
        raise ValueError(f"{what}={layers} repeats a teacher layer: give each index once")
    if num_layers is not None and num_layers != len(layers):
        raise ValueError(
            f"num_layers={num_layers} does not match {what}={layers} ({len(layers)} layers): "
            "give one of them, or make them agree"
        )
    return list(layers)


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _load_teacher(path: str | os.PathLike, task: str = "auto"):
    """Load a teacher checkpoint, keeping the class it was saved with (``task="auto"``)."""
    if task not in ("auto", *_TASK_CLASSES):
        raise ValueError(f"unknown task {task!r}: choose one of auto, {', '.join(_TASK_CLASSES)}")
    return load_teacher(path, task=_TASK_CLASSES.get(task, "auto"), dtype="auto")


def _as_model(teacher, task: str = "auto"):
    from transformers import PreTrainedModel

    if isinstance(teacher, (str, os.PathLike)):
        return _load_teacher(teacher, task), str(teacher)
    if not isinstance(teacher, PreTrainedModel):
        raise TypeError(
            f"teacher must be a transformers PreTrainedModel or a checkpoint path, got {type(teacher).__name__} "
            "(unwrap PEFT / DDP / compiled models first)"
        )
    return teacher, getattr(teacher, "name_or_path", "") or type(teacher).__name__


def _teacher_device_dtype(teacher) -> tuple[torch.device, torch.dtype]:
    for p in teacher.parameters():
        if p.is_floating_point():
            return p.device, p.dtype
    return torch.device("cpu"), torch.float32


def _new_model(cls, config, teacher):
    device, dtype = _teacher_device_dtype(teacher)
    model = cls(config)
    return model.to(device=device, dtype=dtype)


def _source_key(key: str, layer_maps: dict[str, list[int]]) -> str:
    """Teacher state-dict key for a student key, renumbering layers under each layer-list prefix."""
    for prefix, layers in layer_maps.items():
        start = prefix + "."
        if key.startswith(start):
            index, _, rest = key[len(start) :].partition(".")
            return f"{start}{layers[int(index)]}.{rest}"
    return key


def _copy_state(teacher, student, layer_maps: dict[str, list[int]]) -> None:
    """Fill every student tensor from the teacher (strict: a missing source is an error)."""
    source = teacher.state_dict()
    target = {}
    for key, value in student.state_dict().items():
        src = _source_key(key, layer_maps)
        if src not in source:
            raise ValueError(f"cannot initialise student tensor {key!r}: the teacher has no {src!r}")
        if source[src].shape != value.shape:
            raise ValueError(f"shape mismatch for {key!r}: teacher {tuple(source[src].shape)}, student {tuple(value.shape)}")
        target[key] = source[src]
    with torch.no_grad():
        student.load_state_dict(target, strict=True)


def _subset_per_layer_config(config, total: int, layers: list[int]) -> None:
    """Shrink per-layer config lists (such as ``layer_types``) to the chosen layers."""
    for attr in ("layer_types",):
        value = getattr(config, attr, None)
        if isinstance(value, (list, tuple)) and len(value) == total:
            setattr(config, attr, [value[i] for i in layers])


# --------------------------------------------------------------------------------------------
# Same architecture
# --------------------------------------------------------------------------------------------


def _build_same(teacher, layers: list[int] | None, num_layers: int | None) -> tuple[Any, dict]:
    config = teacher.config
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            f"unsupported architecture {type(teacher).__name__}: encoder-decoder models need their own recipe; "
            "use build_whisper_student for Whisper"
        )
    total = count_layers(config)
    layer_path = find_layer_list(teacher, total)
    chosen = _resolve_layers(total, num_layers, layers)
    student_config = copy.deepcopy(config)
    student_config.num_hidden_layers = len(chosen)
    _subset_per_layer_config(student_config, total, chosen)
    student = _new_model(type(teacher), student_config, teacher)
    _copy_state(teacher, student, {layer_path: chosen})
    info = {
        "architecture": "same",
        "teacher_layers": chosen,
        "teacher_num_layers": total,
        "layer_module": layer_path,
    }
    return student, info


# --------------------------------------------------------------------------------------------
# BERT -> DistilBERT
# --------------------------------------------------------------------------------------------


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


def _build_distilbert(teacher, layers: list[int] | None, num_layers: int | None) -> tuple[Any, dict]:
    import transformers
    from transformers import DistilBertConfig

    _check_bert_for_distilbert(teacher)
    if teacher.config.model_type == "distilbert":
        student, info = _build_same(teacher, layers, num_layers)
        info["architecture"] = "distilbert"
        return student, info

    config = teacher.config
    total = config.num_hidden_layers
    chosen = _resolve_layers(total, num_layers, layers)
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
    student = _new_model(getattr(transformers, student_class_name), student_config, teacher)

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


# --------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------


def _load_preprocessor(source: str | None, speech: bool):
    """Tokenizer (text) or processor (speech) saved next to a teacher checkpoint, if any."""
    if not source or not os.path.isdir(source):
        return None
    from transformers import AutoProcessor, AutoTokenizer

    loaders = (AutoProcessor, AutoTokenizer) if speech else (AutoTokenizer,)
    for loader in loaders:
        try:
            return loader.from_pretrained(source)
        except Exception:  # noqa: BLE001 - no tokenizer/processor files is a normal case
            continue
    return None


def _save(student, teacher, info: dict, output_dir, tokenizer, teacher_source: str | None, speech: bool) -> None:
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    student.save_pretrained(output_dir)
    if tokenizer is None:
        tokenizer = _load_preprocessor(teacher_source, speech)
        if tokenizer is None and teacher_source != getattr(teacher, "name_or_path", None):
            tokenizer = _load_preprocessor(getattr(teacher, "name_or_path", None), speech)
    if tokenizer is not None:
        tokenizer.save_pretrained(output_dir)
    info = dict(info, preprocessor_saved=type(tokenizer).__name__ if tokenizer is not None else None)
    (output_dir / INIT_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")


def _finish(student, teacher, teacher_name: str, info: dict, output_dir, tokenizer, speech: bool = False):
    teacher_params = count_parameters(teacher)
    student_params = count_parameters(student)
    info = {
        "teacher": teacher_name,
        "teacher_class": type(teacher).__name__,
        "student_class": type(student).__name__,
        **info,
        "teacher_parameters": teacher_params,
        "student_parameters": student_params,
    }
    if output_dir is not None:
        source = teacher_name if os.path.isdir(teacher_name) else None
        _save(student, teacher, info, output_dir, tokenizer, source, speech)
    # Plain attributes (not saved): which teacher layers the student came from, and the full record.
    student.distillation_teacher_layers = copy.deepcopy(info["teacher_layers"])
    student.distillation_init_info = copy.deepcopy(info)
    return student, info


# --------------------------------------------------------------------------------------------
# Public builders
# --------------------------------------------------------------------------------------------


def _build_student_with_info(
    teacher,
    *,
    num_layers: int | None = None,
    layers: list[int] | None = None,
    architecture: str = "same",
    output_dir=None,
    tokenizer=None,
    task: str = "auto",
    num_encoder_layers: int | None = None,
):
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unsupported architecture {architecture!r}: choose one of {', '.join(ARCHITECTURES)}")
    model, name = _as_model(teacher, task)
    model_type = getattr(model.config, "model_type", None)
    if model_type == "whisper":
        if architecture != "same":
            raise ValueError(
                "unsupported architecture: a Whisper teacher only gives a Whisper student (architecture='same')"
            )
        return _build_whisper(
            model, name, num_layers, decoder_layers=layers, num_encoder_layers=num_encoder_layers,
            output_dir=output_dir, processor=tokenizer,
        )
    if num_encoder_layers is not None:
        raise ValueError("num_encoder_layers only applies to Whisper teachers; use num_layers")
    if architecture == "distilbert":
        student, info = _build_distilbert(model, layers, num_layers)
    else:
        student, info = _build_same(model, layers, num_layers)
    speech = type(model).__name__.endswith("ForCTC")
    return _finish(student, model, name, info, output_dir, tokenizer, speech)


def build_student(
    teacher,
    *,
    num_layers: int | None = None,
    layers: list[int] | None = None,
    architecture: str = "same",
    output_dir: str | os.PathLike | None = None,
    tokenizer=None,
):
    """A student with fewer layers, initialised from ``teacher``'s weights.

    Args:
        teacher: a ``PreTrainedModel`` or a checkpoint path (loaded with the class it was saved
            as, e.g. ``BertForMaskedLM``; ``AutoModelForMaskedLM`` when the config names none).
        num_layers: how many layers the student gets, chosen with :func:`select_layers`.
            Default: half the teacher's layers.
        layers: explicit teacher layer indices, student layer ``i`` <- teacher layer ``layers[i]``
            (e.g. ``[0, 2, 4, 7, 9, 11]``). Overrides the even choice.
        architecture: ``"same"`` (the teacher's class and config with fewer layers) or
            ``"distilbert"`` (a BERT teacher converted to the matching DistilBERT class; see the
            module docstring for how token type embeddings are folded in).
        output_dir: if given, save the student (safetensors), the tokenizer (``tokenizer`` or the
            one next to the teacher checkpoint) and ``distillation_init.json``.
        tokenizer: tokenizer or processor to save with the student.

    Whisper teachers are handed to :func:`build_whisper_student` (``num_layers``/``layers`` then
    mean decoder layers).

    The returned student carries two plain (unsaved) attributes: ``distillation_teacher_layers``
    (student layer ``i`` <- teacher layer ``distillation_teacher_layers[i]``) and
    ``distillation_init_info`` (what ``distillation_init.json`` records).

    Raises:
        ValueError: more student layers than the teacher has, a layer index out of range, or an
            architecture/config that cannot be converted (the message says what to change).
    """
    student, _ = _build_student_with_info(
        teacher, num_layers=num_layers, layers=layers, architecture=architecture, output_dir=output_dir, tokenizer=tokenizer
    )
    return student


def _remap_alignment_heads(generation_config, decoder_layers: list[int]) -> None:
    heads = getattr(generation_config, "alignment_heads", None)
    if heads is None:
        return
    new_index = {teacher: student for student, teacher in enumerate(decoder_layers)}
    kept = [[new_index[layer], head] for layer, head in heads if layer in new_index]
    if kept:
        generation_config.alignment_heads = kept
    else:
        del generation_config.alignment_heads


def _module_name(model: nn.Module, target: nn.Module) -> str:
    for name, module in model.named_modules():
        if module is target:
            return name
    raise ValueError(f"cannot locate {type(target).__name__} inside {type(model).__name__}")


def _build_whisper(
    teacher,
    teacher_name: str,
    num_decoder_layers: int | None,
    *,
    decoder_layers: list[int] | None = None,
    num_encoder_layers: int | None = None,
    encoder_layers: list[int] | None = None,
    freeze_encoder: bool = False,
    output_dir=None,
    processor=None,
):
    config = teacher.config
    if getattr(config, "model_type", None) != "whisper":
        raise ValueError(
            f"unsupported architecture: build_whisper_student needs a Whisper teacher, got {type(teacher).__name__}; "
            "use build_student for encoder models"
        )
    if num_decoder_layers is None and decoder_layers is None:
        raise ValueError("give num_decoder_layers (e.g. 2) or decoder_layers (e.g. [0, 31])")
    dec_total, enc_total = config.decoder_layers, config.encoder_layers
    dec_chosen = _resolve_layers(dec_total, num_decoder_layers, decoder_layers, "decoder_layers")
    if num_encoder_layers is None and encoder_layers is None:
        enc_chosen = list(range(enc_total))
    else:
        enc_chosen = _resolve_layers(enc_total, num_encoder_layers, encoder_layers, "encoder_layers")

    enc_path = _module_name(teacher, teacher.get_encoder()) + ".layers"
    dec_path = _module_name(teacher, teacher.get_decoder()) + ".layers"
    enc_path, dec_path = enc_path.lstrip("."), dec_path.lstrip(".")

    student_config = copy.deepcopy(config)
    student_config.encoder_layers = len(enc_chosen)
    student_config.decoder_layers = len(dec_chosen)
    student = _new_model(type(teacher), student_config, teacher)
    _copy_state(teacher, student, {enc_path: enc_chosen, dec_path: dec_chosen})
    if getattr(teacher, "generation_config", None) is not None and hasattr(student, "generation_config"):
        student.generation_config = copy.deepcopy(teacher.generation_config)
        _remap_alignment_heads(student.generation_config, dec_chosen)
    if freeze_encoder:
        student.get_encoder().requires_grad_(False)
    info = {
        "architecture": "whisper",
        "teacher_layers": {"encoder": enc_chosen, "decoder": dec_chosen},
        "teacher_num_layers": {"encoder": enc_total, "decoder": dec_total},
        "encoder_frozen": bool(freeze_encoder),
    }
    return _finish(student, teacher, teacher_name, info, output_dir, processor, speech=True)


def build_whisper_student(
    teacher,
    num_decoder_layers: int | None = None,
    *,
    decoder_layers: list[int] | None = None,
    num_encoder_layers: int | None = None,
    encoder_layers: list[int] | None = None,
    freeze_encoder: bool = False,
    output_dir: str | os.PathLike | None = None,
    processor=None,
):
    """A Distil-Whisper style student: the teacher's encoder and a few of its decoder layers.

    The whole encoder is copied (or ``num_encoder_layers`` evenly chosen / explicit
    ``encoder_layers``); the decoder keeps ``select_layers(L, num_decoder_layers)`` (first and last
    layer included) or the explicit ``decoder_layers``. Token and position embeddings, the
    convolutional front end, layer norms and ``proj_out`` (tied to the token embeddings) are
    copied exactly; the generation config is copied with its ``alignment_heads`` renumbered to
    the layers kept. ``freeze_encoder`` sets ``requires_grad=False`` on every encoder parameter
    (this is not saved: freeze again after reloading). ``output_dir`` saves the student, the
    ``processor`` (or the one next to the teacher checkpoint) and ``distillation_init.json``.
    """
    model, name = _as_model(teacher)
    student, _ = _build_whisper(
        model,
        name,
        num_decoder_layers,
        decoder_layers=decoder_layers,
        num_encoder_layers=num_encoder_layers,
        encoder_layers=encoder_layers,
        freeze_encoder=freeze_encoder,
        output_dir=output_dir,
        processor=processor,
    )
    return student


def build_ctc_student(
    teacher,
    num_layers: int | None = None,
    layers: list[int] | None = None,
    *,
    output_dir: str | os.PathLike | None = None,
    processor=None,
):
    """A CTC student (``Wav2Vec2ForCTC`` and similar) with fewer transformer layers.

    Copies the convolutional feature encoder, the feature projection, the positional
    convolution, the encoder layer norm, the chosen transformer layers (by teacher index) and the
    CTC ``lm_head`` exactly; the config is the teacher's with ``num_hidden_layers`` reduced.
    """
    model, name = _as_model(teacher)
    if not type(model).__name__.endswith("ForCTC"):
        raise ValueError(
            f"unsupported architecture: build_ctc_student needs a *ForCTC teacher (such as Wav2Vec2ForCTC), "
            f"got {type(model).__name__}"
        )
    student, info = _build_same(model, layers, num_layers)
    info["architecture"] = "ctc"
    student, _ = _finish(student, model, name, info, output_dir, processor, speech=True)
    return student


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _layer_map_lines(info: dict) -> list[str]:
    layers = info["teacher_layers"]
    groups = layers.items() if isinstance(layers, dict) else [("", layers)]
    lines = []
    for part, chosen in groups:
        label = f"{part} " if part else ""
        for i, j in enumerate(chosen):
            lines.append(f"  {label}student layer {i:>2} <- teacher layer {j}")
    return lines


def cli_main(argv: list[str] | None = None) -> int:
    """``hf-distill init-student``: build a student from a teacher checkpoint and save it."""
    parser = argparse.ArgumentParser(
        prog="hf-distill init-student",
        description="Build a smaller student from a teacher's layers (embeddings, chosen layers and head copied exactly).",
    )
    parser.add_argument("--teacher", required=True, help="teacher checkpoint directory")
    parser.add_argument("--output_dir", required=True, help="where to save the student")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--num_layers", type=int, help="student layers, chosen evenly (default: half the teacher's)")
    group.add_argument("--layers", help="teacher layer indices to copy, comma-separated, e.g. 0,2,4,7,9,11")
    parser.add_argument("--architecture", choices=ARCHITECTURES, default="same", help="student architecture (default: same)")
    parser.add_argument(
        "--task",
        choices=("auto", *_TASK_CLASSES),
        default="auto",
        help="head to load the teacher with (default: auto, the class saved in its config)",
    )
    parser.add_argument(
        "--num_encoder_layers",
        type=int,
        help="Whisper only: encoder layers to keep (default: all); --num_layers/--layers then count decoder layers",
    )
    args = parser.parse_args(argv)

    try:
        layers = parse_layer_list(args.layers) if args.layers is not None else None
        teacher = _load_teacher(args.teacher, args.task)
        _, info = _build_student_with_info(
            teacher,
            num_layers=args.num_layers,
            layers=layers,
            architecture=args.architecture,
            output_dir=args.output_dir,
            num_encoder_layers=args.num_encoder_layers,
        )
    except (ValueError, OSError) as err:
        print(f"hf-distill init-student: error: {err}", file=sys.stderr)
        return 2

    print(f"teacher {info['teacher_class']} ({args.teacher}) -> student {info['student_class']} ({args.output_dir})")
    print("layer map:")
    for line in _layer_map_lines(info):
        print(line)
    t, s = info["teacher_parameters"], info["student_parameters"]
    print(f"parameters: teacher {t:,}, student {s:,} ({100.0 * s / t:.1f}% of the teacher)")
    for note in info.get("notes", []):
        print(f"note: {note}")
    return 0
