"""A store's manifest: what made it (teacher, tokenizer, data, settings), written once, checked on every resume.

``manifest.json`` holds a ``config`` (every setting that decides the store's content) and its hash. The
first process to start a store creates it atomically (several ranks agree on one manifest); a later run
into the same folder with another configuration is refused with the list of differences.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any

__all__ = [
    "MANIFEST_NAME",
    "StoreMismatchError",
    "atomic_write_text",
    "config_differences",
    "create_once",
    "data_fingerprint",
    "fsync_dir",
    "read_manifest",
    "sha256_json",
    "teacher_fingerprint",
    "tokenizer_hash",
]

MANIFEST_NAME = "manifest.json"


class StoreMismatchError(ValueError):
    """A store does not belong to this configuration, tokenizer or data (the message lists the differences)."""


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file, fsynced and renamed: readers see the old or the new."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def create_once(path: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Create ``path`` with ``manifest`` unless it exists (atomic create-if-absent: concurrent processes agree on
    one file); return the manifest the file holds."""
    path = Path(path)
    if not path.exists():
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
        fsync_dir(path.parent)
    return read_manifest(path.parent, name=path.name)


def read_manifest(folder: str | os.PathLike, name: str = MANIFEST_NAME) -> dict[str, Any]:
    path = Path(folder) / name
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a teacher-output store (no {name}); write one with "
                                "hf-distill cache-teacher")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); the store is damaged, write it again") from None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def config_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``key: old -> new`` for every key whose value differs (nested dicts by dotted key)."""
    diffs = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += [f"{key}.{d}" for d in config_differences(a, b)]
        elif a != b:
            diffs.append(f"{key}: {_short(a)} -> {_short(b)}")
    return diffs


# --------------------------------------------------------------------------------------------------
# fingerprints


def teacher_fingerprint(model: str | os.PathLike) -> dict[str, Any]:
    """Identify a local teacher by its JSON files' content and its weight files' names and sizes; a Hub id by its
    name."""
    path = Path(model)
    if not path.is_dir():
        return {"name": os.fspath(model)}
    files = {}
    for f in sorted(path.iterdir()):
        if not f.is_file():
            continue
        if f.suffix == ".json":
            files[f.name] = hashlib.sha256(f.read_bytes()).hexdigest()
        elif f.suffix in {".safetensors", ".bin", ".pt", ".pth", ".model", ".txt"}:
            files[f.name] = f.stat().st_size
    return {"files": files}


def tokenizer_hash(tokenizer) -> str | None:
    """A hash of the token -> id map (what the stored class indices refer to); None without a tokenizer."""
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # processors hold one
    if tokenizer is None or not hasattr(tokenizer, "get_vocab"):
        return None
    return sha256_json(sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]))


def data_fingerprint(dataset, columns: list[str], start: int = 0, stop: int | None = None,
                     chunk_rows: int = 8192) -> str:
    """A content hash of rows ``[start, stop)`` of ``columns`` (integer sequences such as ``input_ids``): the same
    for the same token ids, whatever the dataset's integer types, file layout or history."""
    import pyarrow as pa
    import pyarrow.compute as pc

    stop = len(dataset) if stop is None else stop
    h = hashlib.sha256(json.dumps(sorted(columns)).encode())
    view = dataset.with_format("arrow")
    for a in range(start, stop, chunk_rows):
        table = view[a:min(a + chunk_rows, stop)]
        for name in sorted(columns):
            col = table.column(name)
            col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
            if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
                lengths = pc.fill_null(pc.list_value_length(col), -1)
                h.update(lengths.cast(pa.int64()).to_numpy(zero_copy_only=False).tobytes())
                values = pc.list_flatten(col)
            else:
                values = col
            h.update(values.cast(pa.int64()).to_numpy(zero_copy_only=False).tobytes())
    return h.hexdigest()
