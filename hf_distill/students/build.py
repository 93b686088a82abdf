"""Building a student from a teacher: the public entry point and ``hf-distill init-student``."""

from __future__ import annotations

import argparse
import sys
import os

from ..modeling import parse_layer_list
from .copying import TASK_NAMES, as_model, load_teacher_checkpoint
from .distilbert import build_distilbert
from .same import build_same
from .saving import finish_student
from .speech import build_whisper

ARCHITECTURES = ("same", "distilbert")


def build_student_with_info(
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
    model, name = as_model(teacher, task)
    model_type = getattr(model.config, "model_type", None)
    if model_type == "whisper":
        if architecture != "same":
            raise ValueError(
                "unsupported architecture: a Whisper teacher only gives a Whisper student (architecture='same')"
            )
        return build_whisper(
            model, name, num_layers, decoder_layers=layers, num_encoder_layers=num_encoder_layers,
            output_dir=output_dir, processor=tokenizer,
        )
    if num_encoder_layers is not None:
        raise ValueError("num_encoder_layers only applies to Whisper teachers; use num_layers")
    if architecture == "distilbert":
        student, info = build_distilbert(model, layers, num_layers)
    else:
        student, info = build_same(model, layers, num_layers)
    speech = type(model).__name__.endswith("ForCTC")
    return finish_student(student, model, name, info, output_dir, tokenizer, speech)


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
    student, _ = build_student_with_info(
        teacher, num_layers=num_layers, layers=layers, architecture=architecture, output_dir=output_dir, tokenizer=tokenizer
    )
    return student


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
        choices=("auto", *TASK_NAMES),
        default="auto",
        help="head to load the teacher with (default: auto, the class saved in its config)",
    )
    parser.add_argument(
        "--num_encoder_layers",
        type=int,
        help="Whisper only: encoder layers to keep (default: all); --num_layers/--layers then count decoder layers",
    )
    width = parser.add_argument_group("width pruning (BERT-style encoders, Llama-style decoders)")
    width.add_argument("--heads", type=int, help="attention heads per layer to keep (most important first)")
    width.add_argument("--intermediate", type=int, help="FFN neurons per layer to keep")
    width.add_argument("--hidden", type=int, help="hidden channels to keep (BERT: heads x head size, the default when only --heads is given)")
    width.add_argument("--calibration_file", help="text file, one sample per line, to rank the units on")
    width.add_argument("--calibration_samples", type=int, default=256, help="lines of it to use (default 256)")
    width.add_argument("--calibration_max_length", type=int, default=128, help="tokens per sample (default 128)")
    args = parser.parse_args(argv)

    try:
        layers = parse_layer_list(args.layers) if args.layers is not None else None
        prune = any(v is not None for v in (args.heads, args.intermediate, args.hidden))
        calibration = read_calibration_lines(args.calibration_file, args.calibration_samples) if prune else None
        teacher = load_teacher_checkpoint(args.teacher, args.task)
        if prune:
            info = build_pruned_student(teacher, args, layers, calibration)
        else:
            _, info = build_student_with_info(
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
    if "width_pruning" in info:
        w = info["width_pruning"]
        print(f"width: {w['heads']} heads, {w['intermediate']} FFN neurons, {w['hidden']} hidden channels "
              f"({w['criterion']})")
    return 0


def read_calibration_lines(path: str | None, limit: int) -> list[str]:
    """The first ``limit`` non-empty lines of a calibration text file."""
    if not path:
        raise ValueError("width pruning ranks heads, neurons and channels on calibration text: give "
                         "--calibration_file (a text file, one sample per line)")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--calibration_file {path!r} does not exist")
    if limit < 1:
        raise ValueError(f"--calibration_samples must be >= 1, got {limit}")
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = [line.strip() for line in f if line.strip()][:limit]
    if not lines:
        raise ValueError(f"--calibration_file {path!r} holds no non-empty line")
    return lines


def build_pruned_student(teacher, args, layers, calibration: list[str]) -> dict:
    """``init-student`` with width options: fewer layers first (when asked), then width pruning; saved."""
    from ..teachers import find_teacher_tokenizer
    from .pruning import calibration_batches, prune_width

    model, name = as_model(teacher, args.task)
    if args.architecture != "same":
        raise ValueError("width pruning keeps the teacher's architecture: drop --architecture")
    tokenizer = find_teacher_tokenizer(args.teacher)
    if tokenizer is None:
        raise ValueError(f"width pruning needs the teacher's tokenizer for the calibration text; {args.teacher!r} "
                         "has none")
    if layers is not None or args.num_layers is not None:
        student, info = build_student_with_info(model, num_layers=args.num_layers, layers=layers)
        info = {k: v for k, v in info.items() if k in ("architecture", "teacher_layers", "teacher_num_layers",
                                                       "layer_module", "notes")}
    else:
        from ..modeling import num_layers as count_layers

        student, total = model, count_layers(model)
        info = {"architecture": "same", "teacher_layers": list(range(total)), "teacher_num_layers": total}
    batches = calibration_batches(tokenizer, calibration, max_length=args.calibration_max_length)
    pruned, width_info = prune_width(student, batches, heads=args.heads, intermediate=args.intermediate,
                                     hidden=args.hidden)
    _, info = finish_student(pruned, model, name, {**info, **width_info}, args.output_dir, tokenizer)
    return info
