"""Saving a built student with its tokenizer / processor and the record of where each layer came from."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

from ..modeling import count_parameters

INIT_INFO_FILE = "distillation_init.json"


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


def finish_student(student, teacher, teacher_name: str, info: dict, output_dir, tokenizer, speech: bool = False):
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
