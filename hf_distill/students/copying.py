"""Loading a teacher checkpoint and copying its tensors into a student of the same family."""

from __future__ import annotations

import os

import torch

from ..teachers import load_teacher

TASK_NAMES = {"mlm": "masked_lm", "sequence-classification": "sequence_classification"}


def load_teacher_checkpoint(path: str | os.PathLike, task: str = "auto"):
    """Load a teacher checkpoint, keeping the class it was saved with (``task="auto"``)."""
    if task not in ("auto", *TASK_NAMES):
        raise ValueError(f"unknown task {task!r}: choose one of auto, {', '.join(TASK_NAMES)}")
    return load_teacher(path, task=TASK_NAMES.get(task, "auto"), dtype="auto")


def as_model(teacher, task: str = "auto"):
    from transformers import PreTrainedModel

    if isinstance(teacher, (str, os.PathLike)):
        return load_teacher_checkpoint(teacher, task), str(teacher)
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


def new_model(cls, config, teacher):
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


def copy_state(teacher, student, layer_maps: dict[str, list[int]]) -> None:
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


def subset_per_layer_config(config, total: int, layers: list[int]) -> None:
    """Shrink per-layer config lists (such as ``layer_types``) to the chosen layers."""
    for attr in ("layer_types", "no_rope_layers", "activation_sparsity_pattern"):
        value = getattr(config, attr, None)
        if isinstance(value, (list, tuple)) and len(value) == total:
            setattr(config, attr, [value[i] for i in layers])
