"""Read a CTranslate2 Whisper ``model.bin`` (format version 6) into tensors.

``model.bin`` may come split in parts (``model.bin.part1``, ``model.bin.part2``, ... as some
packages ship it); the parts are read as one stream without joining them on disk.

Public API::

    read_ct2_model(paths) -> CT2Model
    ct2_model_bin_paths(src_dir) -> list[Path]
    CT2FormatError
"""

from __future__ import annotations

import math
import os
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

__all__ = [
    "CT2_DTYPES",
    "CT2FormatError",
    "CT2Model",
    "SUPPORTED_FORMAT_VERSION",
    "ct2_model_bin_paths",
    "read_ct2_model",
]

#: The only ``model.bin`` layout this reader understands.
SUPPORTED_FORMAT_VERSION = 6

#: dtype ids of the format, in order: float32, int8, int16, int32, float16, bfloat16.
CT2_DTYPES: dict[int, torch.dtype] = {
    0: torch.float32,
    1: torch.int8,
    2: torch.int16,
    3: torch.int32,
    4: torch.float16,
    5: torch.bfloat16,
}

_PART_RE = re.compile(r"^model\.bin\.part(\d+)$")


class CT2FormatError(ValueError):
    """The file is not a CTranslate2 Whisper ``model.bin`` this converter can read."""


@dataclass
class CT2Model:
    """The content of a CTranslate2 ``model.bin``: spec name, revision, variables and aliases."""

    name: str
    revision: int
    variables: dict[str, torch.Tensor]
    aliases: dict[str, str] = field(default_factory=dict)
    version: int = SUPPORTED_FORMAT_VERSION

    def resolve(self, name: str) -> str:
        seen = set()
        while name in self.aliases:
            if name in seen:
                raise CT2FormatError(f"alias cycle at {name!r}")
            seen.add(name)
            name = self.aliases[name]
        return name

    def __contains__(self, name: str) -> bool:
        return self.resolve(name) in self.variables

    def get(self, name: str) -> torch.Tensor:
        """A variable by name (aliases followed); raises :class:`CT2FormatError` if absent."""
        target = self.resolve(name)
        if target not in self.variables:
            raise CT2FormatError(f"model.bin has no variable {name!r}")
        return self.variables[target]

    def scalar(self, name: str, default=None):
        if name not in self:
            return default
        value = self.get(name)
        if value.numel() != 1:
            raise CT2FormatError(f"{name!r} should be a scalar, has shape {tuple(value.shape)}")
        return value.reshape(()).item()

    def names(self) -> list[str]:
        return sorted(set(self.variables) | set(self.aliases))


# --------------------------------------------------------------------------------------------
# model.bin reader


class _ChainedReader:
    """Reads several files one after the other as if they were one (for split model.bin files)."""

    def __init__(self, paths: Sequence[Path]):
        self.paths = [Path(p) for p in paths]
        self._index = 0
        self._handle = None
        self.offset = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def read(self, n: int) -> bytes:
        chunks = []
        remaining = n
        while remaining > 0 and self._index < len(self.paths):
            if self._handle is None:
                self._handle = open(self.paths[self._index], "rb")
            chunk = self._handle.read(remaining)
            if chunk:
                chunks.append(chunk)
                remaining -= len(chunk)
            if remaining > 0:
                self._handle.close()
                self._handle = None
                self._index += 1
        data = b"".join(chunks)
        self.offset += len(data)
        return data

    def read_into(self, buf: bytearray) -> int:
        view = memoryview(buf)
        filled = 0
        while filled < len(buf) and self._index < len(self.paths):
            if self._handle is None:
                self._handle = open(self.paths[self._index], "rb")
            got = self._handle.readinto(view[filled:])
            if got:
                filled += got
            else:
                self._handle.close()
                self._handle = None
                self._index += 1
        self.offset += filled
        return filled


class _Parser:
    def __init__(self, reader: _ChainedReader, label: str):
        self.reader = reader
        self.label = label

    def _fail(self, what: str, want: int, got: int):
        raise CT2FormatError(
            f"{self.label}: truncated while reading {what} at byte {self.reader.offset - got} "
            f"(needed {want} bytes, got {got})"
            + (
                "; the model is split in parts: pass every part, in order"
                if any(_PART_RE.match(p.name) for p in self.reader.paths)
                else ""
            )
        )

    def exact(self, n: int, what: str) -> bytes:
        data = self.reader.read(n)
        if len(data) != n:
            self._fail(what, n, len(data))
        return data

    def u8(self, what: str) -> int:
        return self.exact(1, what)[0]

    def u16(self, what: str) -> int:
        return struct.unpack("<H", self.exact(2, what))[0]

    def u32(self, what: str) -> int:
        return struct.unpack("<I", self.exact(4, what))[0]

    def string(self, what: str) -> str:
        length = self.u16(f"length of {what}")
        if length == 0:
            raise CT2FormatError(f"{self.label}: empty string for {what} at byte {self.reader.offset}")
        raw = self.exact(length, what)
        if raw[-1] != 0:
            raise CT2FormatError(f"{self.label}: {what} is not NUL-terminated (not a CTranslate2 model.bin?)")
        try:
            return raw[:-1].decode("utf-8")
        except UnicodeDecodeError as err:
            raise CT2FormatError(f"{self.label}: {what} is not UTF-8 (not a CTranslate2 model.bin?)") from err


def read_ct2_model(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> CT2Model:
    """Read a CTranslate2 ``model.bin`` (one path, or the paths of its parts in order).

    Raises :class:`CT2FormatError` for anything that is not a complete format-version-6 file.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = [Path(p) for p in paths]
    if not paths:
        raise ValueError("no model.bin path given")
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"{p} does not exist")
    label = str(paths[0]) if len(paths) == 1 else f"{paths[0]} (+{len(paths) - 1} more parts)"
    with _ChainedReader(paths) as reader:
        parser = _Parser(reader, label)
        version = parser.u32("format version")
        if version != SUPPORTED_FORMAT_VERSION:
            if version > 1000:
                raise CT2FormatError(
                    f"{label} is not a CTranslate2 model.bin (first 4 bytes read as format version {version})"
                )
            raise CT2FormatError(
                f"{label}: CTranslate2 model.bin format version {version} is not supported "
                f"(this converter reads version {SUPPORTED_FORMAT_VERSION}; re-convert the model with a "
                "recent CTranslate2)"
            )
        name = parser.string("spec name")
        revision = parser.u32("spec revision")
        n_vars = parser.u32("variable count")
        variables: dict[str, torch.Tensor] = {}
        for i in range(n_vars):
            var_name = parser.string(f"name of variable {i}")
            rank = parser.u8(f"rank of {var_name}")
            if rank > 8:
                raise CT2FormatError(f"{label}: variable {var_name!r} has rank {rank}")
            shape = tuple(struct.unpack(f"<{rank}I", parser.exact(4 * rank, f"shape of {var_name}")))
            dtype_id = parser.u8(f"dtype of {var_name}")
            if dtype_id not in CT2_DTYPES:
                raise CT2FormatError(f"{label}: variable {var_name!r} has unknown dtype id {dtype_id}")
            dtype = CT2_DTYPES[dtype_id]
            n_bytes = parser.u32(f"byte count of {var_name}")
            expected = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            if n_bytes != expected:
                raise CT2FormatError(
                    f"{label}: variable {var_name!r} of shape {shape} and {dtype} should have "
                    f"{expected} bytes, header says {n_bytes}"
                )
            buf = bytearray(n_bytes)
            got = reader.read_into(buf)
            if got != n_bytes:
                parser._fail(f"data of {var_name}", n_bytes, got)
            if n_bytes:
                tensor = torch.frombuffer(buf, dtype=dtype).reshape(shape)
            else:
                tensor = torch.empty(shape, dtype=dtype)
            variables[var_name] = tensor
        n_aliases = parser.u32("alias count")
        aliases = {}
        for i in range(n_aliases):
            alias = parser.string(f"alias {i}")
            aliases[alias] = parser.string(f"target of alias {alias}")
        trailing = reader.read(1)
        if trailing:
            raise CT2FormatError(f"{label}: unexpected data after the last alias (byte {reader.offset - 1})")
    model = CT2Model(name=name, revision=revision, variables=variables, aliases=aliases, version=version)
    for alias, target in aliases.items():
        if model.resolve(alias) not in variables:
            raise CT2FormatError(f"{label}: alias {alias!r} points to missing variable {target!r}")
    return model


def ct2_model_bin_paths(src_dir: str | os.PathLike) -> list[Path]:
    """``[src_dir/model.bin]``, or the ``model.bin.partN`` files in ``src_dir`` in numeric order."""
    src_dir = Path(src_dir)
    single = src_dir / "model.bin"
    if single.is_file():
        return [single]
    parts = []
    if src_dir.is_dir():
        for p in src_dir.iterdir():
            m = _PART_RE.match(p.name)
            if m and p.is_file():
                parts.append((int(m.group(1)), p))
    if not parts:
        raise FileNotFoundError(f"{src_dir} has no model.bin (nor model.bin.part1, ...)")
    return [p for _, p in sorted(parts)]
