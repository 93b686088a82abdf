"""Speech students: Distil-Whisper (encoder kept, a few decoder layers) and wav2vec2-style CTC."""

from __future__ import annotations

import copy
import os

from torch import nn

from .copying import as_model, copy_state, new_model
from . import freezing
from .layers import resolve_layers
from .same import build_same
from .saving import finish_student


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


def freeze_whisper_embeddings(student) -> int:
    """Freeze a Whisper decoder's token and position embeddings (and so ``proj_out``, tied to the tokens).

    With little data, most of a small decoder's weights are its vocabulary rows (tiny.en with 2 decoder
    layers: 20.1M of the decoder's 24.8M), and the rows of words the labels never use only ever get
    pushed down; frozen, they stay the teacher's. Returns the number of parameters frozen
    (:func:`~hf_distill.students.freezing.freeze_embeddings` with ``positions=True``).
    """
    return freezing.freeze_embeddings(student, positions=True)


def build_whisper(
    teacher,
    teacher_name: str,
    num_decoder_layers: int | None,
    *,
    decoder_layers: list[int] | None = None,
    num_encoder_layers: int | None = None,
    encoder_layers: list[int] | None = None,
    freeze_encoder: bool = False,
    freeze_embeddings: bool = False,
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
    dec_chosen = resolve_layers(dec_total, num_decoder_layers, decoder_layers, "decoder_layers")
    if num_encoder_layers is None and encoder_layers is None:
        enc_chosen = list(range(enc_total))
    else:
        enc_chosen = resolve_layers(enc_total, num_encoder_layers, encoder_layers, "encoder_layers")

    enc_path = _module_name(teacher, teacher.get_encoder()) + ".layers"
    dec_path = _module_name(teacher, teacher.get_decoder()) + ".layers"
    enc_path, dec_path = enc_path.lstrip("."), dec_path.lstrip(".")

    student_config = copy.deepcopy(config)
    student_config.encoder_layers = len(enc_chosen)
    student_config.decoder_layers = len(dec_chosen)
    student = new_model(type(teacher), student_config, teacher)
    copy_state(teacher, student, {enc_path: enc_chosen, dec_path: dec_chosen})
    if getattr(teacher, "generation_config", None) is not None and hasattr(student, "generation_config"):
        student.generation_config = copy.deepcopy(teacher.generation_config)
        _remap_alignment_heads(student.generation_config, dec_chosen)
    if freeze_encoder:
        student.get_encoder().requires_grad_(False)
    if freeze_embeddings:
        freeze_whisper_embeddings(student)
    info = {
        "architecture": "whisper",
        "teacher_layers": {"encoder": enc_chosen, "decoder": dec_chosen},
        "teacher_num_layers": {"encoder": enc_total, "decoder": dec_total},
        "encoder_frozen": bool(freeze_encoder),
        "embeddings_frozen": bool(freeze_embeddings),
    }
    return finish_student(student, teacher, teacher_name, info, output_dir, processor, speech=True)


def build_whisper_student(
    teacher,
    num_decoder_layers: int | None = None,
    *,
    decoder_layers: list[int] | None = None,
    num_encoder_layers: int | None = None,
    encoder_layers: list[int] | None = None,
    freeze_encoder: bool = False,
    freeze_embeddings: bool = False,
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
    (this is not saved: freeze again after reloading); ``freeze_embeddings`` does the same for the
    decoder's token and position embeddings (``freeze_whisper_embeddings``). ``output_dir`` saves the
    student, the ``processor`` (or the one next to the teacher checkpoint) and ``distillation_init.json``.
    """
    model, name = as_model(teacher)
    student, _ = build_whisper(
        model,
        name,
        num_decoder_layers,
        decoder_layers=decoder_layers,
        num_encoder_layers=num_encoder_layers,
        encoder_layers=encoder_layers,
        freeze_encoder=freeze_encoder,
        freeze_embeddings=freeze_embeddings,
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
    model, name = as_model(teacher)
    if not type(model).__name__.endswith("ForCTC"):
        raise ValueError(
            f"unsupported architecture: build_ctc_student needs a *ForCTC teacher (such as Wav2Vec2ForCTC), "
            f"got {type(model).__name__}"
        )
    student, info = build_same(model, layers, num_layers)
    info["architecture"] = "ctc"
    student, _ = finish_student(student, model, name, info, output_dir, processor, speech=True)
    return student
