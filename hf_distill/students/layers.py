"""Which teacher layers a student keeps: evenly spaced choices and checks of explicit lists."""

from __future__ import annotations

from typing import Any

from ..modeling import parse_layer_list


def check_int(name: str, value: Any) -> int:
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
    total = check_int("num_teacher_layers", num_teacher_layers)
    n = check_int("num_student_layers", num_student_layers)
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


def resolve_layers(total: int, num_layers: int | None, layers: list[int] | None, what: str = "layers") -> list[int]:
    """Validate an explicit layer list, or choose ``num_layers`` evenly (default: half the teacher)."""
    if layers is None:
        if num_layers is None:
            num_layers = max(1, total // 2)
        return select_layers(total, num_layers)
    if isinstance(layers, str):
        layers = parse_layer_list(layers)
    layers = [check_int(f"each entry of {what}", i) for i in layers]
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
