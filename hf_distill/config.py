"""Argument parsing shared by the recipes: a YAML/JSON config file plus CLI flags that override it.

Every value of the file is checked against the type of its dataclass field before any dataclass is
built, and converted the way the same text after the command-line flag would be (``1e-4`` for a
float, ``"false"`` for a bool, ``2`` for a string field such as ``student_layers``). A value of the
wrong type or shape (``temperature: [1, 2]``, ``seed: 1.7``, ``temperature:`` with nothing) is one
``ValueError`` that names the file, the key, the value and the expected type; all such values of a
file are listed at once. NaN is refused for every float field, in the file and on the command line;
infinity too, except where it means "no limit" (:data:`INFINITY_MEANS_NO_LIMIT`, or a field whose
metadata has ``allow_infinite=True``).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import enum
import json
import math
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from transformers import HfArgumentParser
from transformers.hf_argparser import string_to_bool

__all__ = ["INFINITY_MEANS_NO_LIMIT", "STRUCTURED_STRING_FIELDS", "check_config_values", "load_config_file",
           "parse_config_and_args"]

#: float fields for which ``.inf`` / ``-.inf`` is a meaningful setting ("no limit"): gradient clipping that
#: only measures the norm, and the pseudo-label filters that keep everything at +-infinity
INFINITY_MEANS_NO_LIMIT = frozenset(
    {"max_grad_norm", "logprob_threshold", "compression_ratio_threshold", "no_speech_threshold", "wer_threshold"}
)

#: string fields that also take YAML structure, as the field's own parser reads it
STRUCTURED_STRING_FIELDS = {
    "distillation": ((list, dict), "a list of terms such as [{loss: kl, weight: 5.0}]"),
    "hidden_layer_map": ((dict,), "student:teacher pairs such as '3:6,6:12' (quoted) or a mapping {3: 6, 6: 12}"),
}


class _Mismatch(Exception):
    """A value does not fit a type; ``str(exc)`` is what was expected."""


# ----------------------------------------------------------------------------------------- reading files
def _duplicate_keys(pairs: list[tuple[str, int]]) -> list[str]:
    seen: dict[str, list[int]] = {}
    for key, line in pairs:
        seen.setdefault(key, []).append(line)
    return [f"{key} (lines {', '.join(map(str, lines))})" if lines[0] else key
            for key, lines in seen.items() if len(lines) > 1]


def _read_yaml(path: Path, text: str) -> tuple[Any, dict[str, str]]:
    """(data, raw text of each top-level plain scalar) of a YAML file; duplicate keys are an error."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ValueError(f"cannot read {path} as YAML: {problem}{where}; fix the file's syntax") from None
    raw: dict[str, str] = {}
    if isinstance(node, yaml.MappingNode):
        keys = []
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.value != "<<":
                keys.append((key_node.value, key_node.start_mark.line + 1))
                if isinstance(value_node, yaml.ScalarNode) and value_node.style is None:
                    raw[key_node.value] = value_node.value
        duplicates = _duplicate_keys(keys)
        if duplicates:
            raise ValueError(f"keys given more than once in {path}: {', '.join(duplicates)}; keep one of each")
    return data, raw


def _read_json(path: Path, text: str) -> Any:
    def no_duplicates(pairs):
        duplicates = _duplicate_keys([(k, 0) for k, _ in pairs])
        if duplicates:
            raise ValueError(f"keys given more than once in {path}: {', '.join(duplicates)}; keep one of each")
        return dict(pairs)

    try:
        return json.loads(text, object_pairs_hook=no_duplicates)
    except json.JSONDecodeError as err:
        raise ValueError(f"cannot read {path} as JSON: {err.msg} at line {err.lineno}, column {err.colno}; "
                         "fix the file's syntax") from None


def _read_config(path: str | Path) -> tuple[dict, dict[str, str]]:
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"config file {path} is a folder; give the path of a .yaml or .json file")
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} not found")
    text = path.read_text(encoding="utf-8")
    data, raw = (_read_json(path, text), {}) if path.suffix.lower() == ".json" else _read_yaml(path, text)
    if data is None:
        raise ValueError(f"config file {path} is empty; write one `name: value` line per argument "
                         "(e.g. `output_dir: out`)")
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping of argument names to values (`name: value` lines), "
                         f"got a {type(data).__name__}")
    return {str(k): v for k, v in data.items()}, raw


def load_config_file(path: str | Path) -> dict:
    """The mapping of argument names to values in a YAML or JSON file (values unchecked).

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` for a syntax error (with its
    line), an empty file, a file that is not a mapping, or a key given twice.
    """
    return _read_config(path)[0]


# ------------------------------------------------------------------------------------------ value checks
def _show(value: Any) -> str:
    if value is None:
        return "an empty value"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


def _describe(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + ", ".join(str(m.value) for m in tp)
    if origin is Literal:
        return "one of " + ", ".join(_show(a) if isinstance(a, bool) else str(a) for a in args)
    if origin is list or tp is list:
        item = _describe(args[0]) if args else ""
        if item.startswith(("a ", "an ")):
            return f"a list of {item.split(' ', 1)[1]}s"
        return f"a list of values, each {item}" if item else "a list"
    if origin is dict or tp is dict:
        return "a mapping"
    if origin is Union or origin is types.UnionType:
        members = _union_members(tp)
        text = " or ".join(_describe(m) for m in members)
        return text + (" (or empty)" if type(None) in args else "")
    return getattr(tp, "__name__", str(tp))


def _union_members(tp: Any) -> list:
    """Non-None members of a union; ``Enum | str`` means one of the enum's values, as on the command line."""
    members = [m for m in typing.get_args(tp) if m is not type(None)]
    if str in members and any(isinstance(m, type) and issubclass(m, enum.Enum) for m in members):
        members.remove(str)
    return members


def _is_already(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in typing.get_args(tp))
    cls = origin or tp
    return isinstance(cls, type) and isinstance(value, cls) and not (cls is int and isinstance(value, bool))


def _as_text(value: Any, raw: str | None) -> str:
    """A string field's value: a string, or a plain YAML scalar as written (``2``, ``6:12``, ``no``)."""
    if isinstance(value, str):
        return value
    if raw is not None:
        return raw
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # a JSON number
    raise _Mismatch(_describe(str))


def _convert(value: Any, tp: Any, raw: str | None) -> Any:
    """``value`` as type ``tp``, converted as the command line would; raises :class:`_Mismatch`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any or tp is typing.Any:
        return value
    if origin is Union or origin is types.UnionType:
        if value is None:
            if type(None) in args:
                return None
            raise _Mismatch(_describe(tp))
        # a member the value already is comes first (a YAML false for ``str | bool`` stays false)
        members = sorted(_union_members(tp), key=lambda m: 0 if _is_already(value, m) else 1)
        for member in members:
            try:
                return _convert(value, member, raw)
            except _Mismatch:
                continue
        raise _Mismatch(_describe(tp))
    if value is None:
        raise _Mismatch(_describe(tp))
    if tp is bool:
        if isinstance(value, bool):
            return value
        text = value if isinstance(value, str) else raw
        if text is None:
            raise _Mismatch(_describe(tp))
        try:
            return string_to_bool(text)
        except argparse.ArgumentTypeError:
            raise _Mismatch(_describe(tp)) from None
    if tp is int:
        if isinstance(value, bool):
            raise _Mismatch(_describe(tp))
        if isinstance(value, int):
            return value
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                raise _Mismatch(_describe(tp)) from None
        raise _Mismatch(_describe(tp))
    if tp is float:
        if isinstance(value, bool):
            raise _Mismatch(_describe(tp))
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                raise _Mismatch(_describe(tp)) from None
        raise _Mismatch(_describe(tp))
    if tp is str:
        return _as_text(value, raw)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        if isinstance(value, tp):
            return value
        try:
            text = _as_text(value, raw)
        except _Mismatch:
            text = None
        if text not in {str(m.value) for m in tp}:
            raise _Mismatch(_describe(tp))
        return text
    if origin is Literal:
        if _is_already(value, tp):
            return value
        if raw is not None and raw in args:
            return raw
        raise _Mismatch(_describe(tp))
    if origin is list or tp is list:
        item_type = args[0] if args else Any
        if isinstance(value, dict):
            raise _Mismatch(_describe(tp))
        if not isinstance(value, (list, tuple)):  # one value, as after the command-line flag
            return [_convert(value, item_type, raw)]
        return [_convert(item, item_type, None) for item in value]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise _Mismatch(_describe(tp))
        if len(args) == 2 and args[1] is not Any:
            return {k: _convert(v, args[1], None) for k, v in value.items()}
        return value
    return value  # a type the command line cannot build either (e.g. a config object): passed through


def _check_value(name: str, value: Any, tp: Any, raw: str | None, metadata: typing.Mapping) -> Any:
    """The converted value of field ``name``, or ValueError text (without the file name)."""
    if name in STRUCTURED_STRING_FIELDS:
        kinds, wanted = STRUCTURED_STRING_FIELDS[name]
        if isinstance(value, kinds):
            if isinstance(value, list) and not all(isinstance(item, dict) for item in value):
                raise ValueError(f"{name}: expected {wanted}, got {_show(value)}")
            return value
        if isinstance(value, (list, dict)):
            raise ValueError(f"{name}: expected {wanted}, got {_show(value)}")
    try:
        converted = _convert(value, tp, raw)
    except _Mismatch as expected:
        hint = ""
        if isinstance(value, list) and all(not isinstance(v, (list, dict)) for v in value) and \
                _convert_or_none(",".join(map(str, value)), tp) is not None:
            hint = f" (write a list as one string: {','.join(map(str, value))!r})"
        raise ValueError(f"{name}: expected {expected}, got {_show(value)}{hint}") from None
    choices = metadata.get("choices")
    if choices is not None and converted is not None and converted not in choices:
        raise ValueError(f"{name}: expected one of {', '.join(map(str, choices))}, got {_show(value)}")
    for number in _floats_in(converted):
        if math.isnan(number) or (math.isinf(number) and not _allows_infinity(name, metadata)):
            allowed = "a finite number" + ("" if math.isnan(number) else " (infinity means nothing here)")
            raise ValueError(f"{name}: expected {allowed}, got {_show(value)}")
    return converted


def _convert_or_none(value: Any, tp: Any) -> Any:
    try:
        return _convert(value, tp, None)
    except _Mismatch:
        return None


def _floats_in(value: Any) -> list[float]:
    if isinstance(value, float):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, float)]
    return []


def _allows_infinity(name: str, metadata: typing.Mapping) -> bool:
    return bool(metadata.get("allow_infinite")) or name in INFINITY_MEANS_NO_LIMIT


def _field_types(dataclass_types) -> dict[str, tuple[Any, typing.Mapping]]:
    """name -> (annotated type, metadata) of every init field (from the annotations: HfArgumentParser
    rewrites ``field.type`` in place)."""
    out = {}
    for dtype in dataclass_types:
        hints = typing.get_type_hints(dtype)
        for f in dataclasses.fields(dtype):
            if f.init:
                out[f.name] = (hints[f.name], f.metadata)
    return out


def check_config_values(values: dict, raw: dict[str, str], dataclass_types, source: str) -> dict:
    """``values`` converted to their fields' types; one ValueError lists every bad value of ``source``."""
    fields = _field_types(dataclass_types)
    converted, problems = {}, []
    for name, value in values.items():
        tp, metadata = fields[name]
        try:
            converted[name] = _check_value(name, value, tp, raw.get(name), metadata)
        except ValueError as err:
            problems.append(str(err))
    if problems:
        raise ValueError(f"{'; '.join(problems)} in {source}")
    return converted


# ------------------------------------------------------------------------------------------ command line
def _finite_float(name: str, metadata: typing.Mapping):
    def convert(text: str) -> float:
        number = float(text)
        if math.isnan(number) or (math.isinf(number) and not _allows_infinity(name, metadata)):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        return number

    convert.__name__ = "float"
    return convert


def _split_config_flag(argv: list[str]) -> tuple[str | None, list[str]]:
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
            raise ValueError("--config needs a file path (a .yaml or .json file)")
        return argv[i + 1], argv[:i] + argv[i + 2:]
    for i, a in enumerate(argv):
        if a.startswith("--config="):
            return a.split("=", 1)[1], argv[:i] + argv[i + 1:]
    return None, argv


def _flags_given(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """Destinations set on the command line itself (not by a default)."""
    actions = parser._actions
    saved = [a.default for a in actions]
    try:
        for a in actions:
            a.default = argparse.SUPPRESS
        namespace, _ = parser.parse_known_args(argv)
    finally:
        for a, default in zip(actions, saved):
            a.default = default
    return set(vars(namespace))


def parse_config_and_args(dataclass_types, argv: list[str] | None = None):
    """Parse ``dataclass_types`` from ``--config FILE`` (YAML or JSON) and CLI flags; flags win.

    Unknown keys in the file are an error that names them, so a typo never passes silently; so is a
    value whose type or shape does not fit its field (see the module docstring).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    dataclass_types = list(dataclass_types) if isinstance(dataclass_types, (list, tuple)) else [dataclass_types]
    parser = HfArgumentParser(dataclass_types)
    fields = _field_types(dataclass_types)
    for action in parser._actions:
        if action.type is float and action.dest in fields:
            action.type = _finite_float(action.dest, fields[action.dest][1])
    config_path, argv = _split_config_flag(argv)
    file_values: dict = {}
    if config_path is not None:
        values, raw = _read_config(config_path)
        unknown = sorted(set(values) - set(fields))
        if unknown:
            guesses = [f"{k} (did you mean {m[0]}?)" if (m := difflib.get_close_matches(k, fields, n=1)) else k
                       for k in unknown]
            raise ValueError(f"unknown keys in {config_path}: {', '.join(guesses)}")
        file_values = check_config_values(values, raw, dataclass_types, config_path)
        for action in parser._actions:
            if action.dest in file_values:
                action.required = False
    namespace, remaining = parser.parse_known_args(argv)
    if remaining:
        raise ValueError(f"unrecognised arguments: {' '.join(remaining)} (see --help for the flags)")
    given = _flags_given(parser, argv)
    for name, value in file_values.items():
        if name not in given:
            setattr(namespace, name, value)
    outputs = []
    for dtype in dataclass_types:
        inputs = {f.name: getattr(namespace, f.name) for f in dataclasses.fields(dtype) if f.init}
        outputs.append(dtype(**inputs))
    return tuple(outputs)
