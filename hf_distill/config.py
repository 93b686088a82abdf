"""Argument parsing shared by the recipes: a YAML/JSON config file plus CLI flags that override it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml
from transformers import HfArgumentParser


def load_config_file(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} not found")
    text = path.read_text()
    data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping of argument names to values, got {type(data).__name__}")
    return data


def parse_config_and_args(dataclass_types, argv: list[str] | None = None):
    """Parse ``dataclass_types`` from ``--config FILE`` (YAML or JSON) and CLI flags; flags win.

    Unknown keys in the file are an error that names them, so a typo never passes silently.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(dataclass_types)
    config_path = None
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise ValueError("--config needs a file path")
        config_path = argv[i + 1]
        argv = argv[:i] + argv[i + 2 :]
    else:
        for i, a in enumerate(argv):
            if a.startswith("--config="):
                config_path = a.split("=", 1)[1]
                argv = argv[:i] + argv[i + 1 :]
                break
    if config_path is not None:
        values = load_config_file(config_path)
        known = {action.dest for action in parser._actions}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown keys in {config_path}: {', '.join(unknown)}")
        # Lists/dicts from YAML become defaults as they are; argparse leaves defaults unconverted.
        parser.set_defaults(**values)
        for action in parser._actions:
            if action.dest in values:
                action.required = False
    return parser.parse_args_into_dataclasses(args=argv)
