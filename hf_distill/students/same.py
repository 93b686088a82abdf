"""Same-architecture students: the teacher's class and config with fewer layers."""

from __future__ import annotations

import copy
from typing import Any

from ..modeling import find_layer_list
from ..modeling import num_layers as count_layers
from .copying import copy_state, new_model, subset_per_layer_config
from .layers import resolve_layers


def build_same(teacher, layers: list[int] | None, num_layers: int | None) -> tuple[Any, dict]:
    config = teacher.config
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            f"unsupported architecture {type(teacher).__name__}: encoder-decoder models need their own recipe; "
            "use build_whisper_student for Whisper"
        )
    total = count_layers(config)
    layer_path = find_layer_list(teacher, total)
    chosen = resolve_layers(total, num_layers, layers)
    student_config = copy.deepcopy(config)
    student_config.num_hidden_layers = len(chosen)
    subset_per_layer_config(student_config, total, chosen)
    student = new_model(type(teacher), student_config, teacher)
    copy_state(teacher, student, {layer_path: chosen})
    if getattr(teacher, "generation_config", None) is not None and student.can_generate():
        student.generation_config = copy.deepcopy(teacher.generation_config)  # eos ids, sampling defaults
    info = {
        "architecture": "same",
        "teacher_layers": chosen,
        "teacher_num_layers": total,
        "layer_module": layer_path,
    }
    return student, info
