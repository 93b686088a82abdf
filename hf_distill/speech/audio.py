"""Audio input for speech jobs: list audio from a folder, a manifest or a ``datasets`` dataset, then decode it.

Listing is cheap and never opens a file: it yields :class:`AudioItem` records with a stable id (the path
relative to the folder or manifest, or the dataset row index). Opening happens later, item by item:
:func:`probe` reads only the header (duration, rate, channels) and :func:`decode` returns mono float32
samples at the requested rate (soundfile to decode, soxr to resample). Both raise :class:`AudioError`
with a human-readable reason for unreadable, empty, zero-length or non-audio input, so a job can record
the failure (:class:`AudioFailure`, :func:`write_failures`) and go on.

Sources understood by :func:`list_audio`:

- a folder: every file below it (recursively) whose extension is an audio format soundfile can read;
- a manifest, ``.csv`` / ``.tsv`` / ``.jsonl`` / ``.json`` (JSON lines): one row per file, a path column
  (relative paths are relative to the manifest's folder), optionally an id column and a reference text
  column;
- a ``datasets`` dataset saved with ``save_to_disk`` (a folder), or a Hub dataset name: its audio column
  is read with ``Audio(decode=False)`` and the stored bytes (or path) are decoded here. A column of plain
  strings is taken as file paths.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# Columns tried, in this order, when no reference text column is named.
REFERENCE_COLUMNS = ("text", "sentence", "transcript", "transcription", "reference", "normalized_text")

_EXTENSION_FORMATS = {
    ".wav": "WAV",
    ".wave": "WAV",
    ".flac": "FLAC",
    ".ogg": "OGG",
    ".oga": "OGG",
    ".opus": "OGG",
    ".mp3": "MP3",
    ".aif": "AIFF",
    ".aiff": "AIFF",
    ".au": "AU",
    ".snd": "AU",
    ".w64": "W64",
    ".rf64": "RF64",
    ".caf": "CAF",
}


def supported_extensions() -> tuple[str, ...]:
    """Audio file extensions the installed soundfile/libsndfile can decode (mp3 needs libsndfile >= 1.1)."""
    import soundfile as sf

    formats = set(sf.available_formats())
    return tuple(sorted(ext for ext, fmt in _EXTENSION_FORMATS.items() if fmt in formats))


class AudioError(Exception):
    """An item that cannot be used as audio; ``reason`` says why (it goes to the failures file)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class AudioInfo:
    frames: int
    sampling_rate: int
    channels: int

    @property
    def duration(self) -> float:
        return self.frames / self.sampling_rate


@dataclass(frozen=True)
class AudioFailure:
    id: str
    path: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"id": self.id, "path": self.path, "reason": self.reason}


class _DatasetAudio:
    """Random access to one audio column of a ``datasets.Dataset`` (undecoded)."""

    def __init__(self, dataset, column: str, base_dir: str | None = None):
        self.dataset = dataset.select_columns([column])
        self.column = column
        self.base_dir = base_dir

    def get(self, index: int) -> bytes | str | None:
        value = self.dataset[index][self.column]
        if value is None:
            return None
        if isinstance(value, str):
            return self._resolve(value)
        if isinstance(value, dict):
            if value.get("bytes"):
                return bytes(value["bytes"])
            if value.get("path"):
                return self._resolve(value["path"])
            return None
        raise AudioError(f"audio column {self.column!r} holds {type(value).__name__}, expected bytes or a path")

    def _resolve(self, path: str) -> str:
        if self.base_dir and not os.path.isabs(path):
            return os.path.join(self.base_dir, path)
        return path


@dataclass(frozen=True)
class AudioItem:
    """One input recording. ``id`` is stable across runs; ``path`` is what reports show."""

    id: str
    path: str
    reference: str | None = None
    # A filesystem path, or (a _DatasetAudio, row index) for dataset rows.
    source: Any = field(default=None, repr=False, compare=False)

    def open(self) -> str | io.BytesIO:
        """A path or an in-memory file for soundfile; raises AudioError if there is nothing to read."""
        src = self.source if self.source is not None else self.path
        if isinstance(src, tuple):
            data = src[0].get(src[1])
            if data is None:
                raise AudioError("no audio in this row (neither bytes nor path)")
            if isinstance(data, bytes):
                if not data:
                    raise AudioError("empty file (0 bytes)")
                return io.BytesIO(data)
            src = data
        src = os.fspath(src)
        if not src:
            raise AudioError("no path given")
        if not os.path.exists(src):
            raise AudioError("file not found")
        if os.path.isdir(src):
            raise AudioError("is a directory, not an audio file")
        if os.path.getsize(src) == 0:
            raise AudioError("empty file (0 bytes)")
        return src


# --------------------------------------------------------------------------------------------------
# decoding


def soundfile_error_reason(exc: Exception) -> str:
    """soundfile's message for an exception, without the path it prefixes (the failure record has it)."""
    message = str(exc)
    if ": " in message and message.startswith("Error opening"):
        message = message.split(": ", 1)[1]
    return message.strip() or type(exc).__name__


def probe(item: AudioItem) -> AudioInfo:
    """Header-only read: frames, rate and channels. Raises AudioError for unusable input."""
    import soundfile as sf

    src = item.open()
    try:
        info = sf.info(src)
    except Exception as exc:  # soundfile raises LibsndfileError / RuntimeError / TypeError
        raise AudioError(f"not a readable audio file: {soundfile_error_reason(exc)}") from None
    if info.samplerate <= 0:
        raise AudioError(f"invalid sampling rate {info.samplerate}")
    if info.frames <= 0:
        raise AudioError("zero-length audio (0 frames)")
    return AudioInfo(frames=int(info.frames), sampling_rate=int(info.samplerate), channels=int(info.channels))


def resampled_length(num_samples: int, orig_sr: int, target_sr: int) -> int:
    """Number of samples after resampling (rounded half up): the exact length :func:`resample` returns."""
    if orig_sr == target_sr:
        return int(num_samples)
    return (int(num_samples) * int(target_sr) + int(orig_sr) // 2) // int(orig_sr)


def to_mono(samples: np.ndarray) -> np.ndarray:
    """Average the channels of a ``(frames, channels)`` array (a 1-D array is returned as is)."""
    samples = np.asarray(samples)
    if samples.ndim == 1:
        return samples
    if samples.shape[1] == 1:
        return samples[:, 0]
    return samples.mean(axis=1, dtype=np.float64).astype(samples.dtype, copy=False)


def resample(samples: np.ndarray, orig_sr: int, target_sr: int, quality: str = "HQ") -> np.ndarray:
    """soxr resampling to ``target_sr``; the result has exactly :func:`resampled_length` samples."""
    samples = np.ascontiguousarray(samples, dtype=np.float32)
    if orig_sr == target_sr:
        return samples
    import soxr

    out = soxr.resample(samples, orig_sr, target_sr, quality=quality).astype(np.float32, copy=False)
    want = resampled_length(len(samples), orig_sr, target_sr)
    if len(out) > want:
        out = out[:want]
    elif len(out) < want:
        out = np.pad(out, (0, want - len(out)))
    return out


def decode(item: AudioItem, sampling_rate: int | None = None) -> np.ndarray:
    """Mono float32 samples of ``item``, resampled to ``sampling_rate`` (kept as is when None).

    Raises AudioError for unreadable, empty, zero-length, non-audio or non-finite input.
    """
    array, _ = decode_with_rate(item, sampling_rate)
    return array


def decode_with_rate(item: AudioItem, sampling_rate: int | None = None) -> tuple[np.ndarray, int]:
    import soundfile as sf

    src = item.open()
    try:
        data, sr = sf.read(src, dtype="float32", always_2d=True)
    except Exception as exc:
        raise AudioError(f"not a readable audio file: {soundfile_error_reason(exc)}") from None
    if data.shape[0] == 0:
        raise AudioError("zero-length audio (0 frames)")
    mono = to_mono(data)
    if not np.isfinite(mono).all():
        raise AudioError("audio contains NaN or infinite samples")
    if sampling_rate is not None and sr != sampling_rate:
        mono = resample(mono, sr, sampling_rate)
        sr = sampling_rate
    return np.ascontiguousarray(mono, dtype=np.float32), int(sr)


# --------------------------------------------------------------------------------------------------
# listing


def list_folder(root: str | os.PathLike, extensions: Iterable[str] | None = None) -> list[AudioItem]:
    """Every audio file below ``root`` (recursive, symlinked folders not followed), sorted by relative path."""
    root = Path(root).absolute()
    if not root.is_dir():
        raise FileNotFoundError(f"audio folder not found: {root}")
    exts = {e.lower() if e.startswith(".") else "." + e.lower() for e in (extensions or supported_extensions())}
    items = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if name.startswith(".") or os.path.splitext(name)[1].lower() not in exts:
                continue
            full = os.path.join(dirpath, name)
            rel = Path(os.path.relpath(full, root)).as_posix()
            items.append(AudioItem(id=rel, path=full, source=full))
    items.sort(key=lambda it: it.id)
    return items


def _read_manifest_rows(path: Path) -> list[dict[str, Any]]:
    suffix = path.suffix.lower()
    if suffix in {".csv", ".tsv"}:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
            return [dict(row) for row in reader]
    if suffix in {".jsonl", ".json", ".ndjson"}:
        rows = []
        with open(path, encoding="utf-8") as f:
            text = f.read()
        stripped = text.lstrip()
        if stripped.startswith("["):
            rows = json.loads(stripped)
        else:
            for lineno, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise ValueError(f"{path}:{lineno}: invalid JSON line ({exc})") from None
        if not all(isinstance(r, dict) for r in rows):
            raise ValueError(f"{path}: every JSON line must be an object")
        return rows
    raise ValueError(f"unsupported manifest type {suffix!r}; use .csv, .tsv, .jsonl or .json")


def _pick_reference_column(columns: Sequence[str], text_column: str | None) -> str | None:
    if text_column == "":
        return None
    if text_column is not None:
        if text_column not in columns:
            raise ValueError(f"reference text column {text_column!r} not found; columns: {list(columns)}")
        return text_column
    return next((c for c in REFERENCE_COLUMNS if c in columns), None)


def _unique_ids(ids: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for i in ids:
        n = seen.get(i, 0)
        seen[i] = n + 1
        out.append(i if n == 0 else f"{i}#{n}")
    return out


def _reference(value: Any) -> str | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return str(value)


def list_manifest(
    manifest: str | os.PathLike,
    path_column: str = "path",
    text_column: str | None = None,
    id_column: str | None = None,
) -> list[AudioItem]:
    """Rows of a CSV/TSV/JSONL manifest, sorted by id (the id column, else the path as written).

    ``text_column=None`` picks the first of :data:`REFERENCE_COLUMNS` present; ``""`` means no reference.
    """
    manifest = Path(manifest)
    rows = _read_manifest_rows(manifest)
    columns = list(rows[0].keys()) if rows else [path_column]
    if rows and path_column not in columns:
        raise ValueError(f"{manifest}: path column {path_column!r} not found; columns: {columns}")
    ref_col = _pick_reference_column(columns, text_column) if rows else None
    if id_column is not None and rows and id_column not in columns:
        raise ValueError(f"{manifest}: id column {id_column!r} not found; columns: {columns}")
    base = manifest.absolute().parent
    raw_ids, items = [], []
    for row in rows:
        rel = str(row.get(path_column) or "")
        raw_ids.append(str(row[id_column]) if id_column else rel)
    for row, item_id in zip(rows, _unique_ids(raw_ids)):
        rel = str(row.get(path_column) or "")
        full = rel if os.path.isabs(rel) else str(base / rel)
        items.append(
            AudioItem(
                id=item_id,
                path=full if rel else "",
                reference=_reference(row.get(ref_col)) if ref_col else None,
                source=full if rel else "",
            )
        )
    items.sort(key=lambda it: it.id)
    return items


def is_saved_dataset(path: Path) -> bool:
    """Whether ``path`` is a folder written by ``datasets``' ``save_to_disk``."""
    return path.is_dir() and any((path / n).exists() for n in ("dataset_info.json", "state.json", "dataset_dict.json"))


def list_dataset(
    dataset: Any,
    audio_column: str = "audio",
    text_column: str | None = None,
    split: str | None = None,
    config_name: str | None = None,
    id_column: str | None = None,
) -> list[AudioItem]:
    """Rows of a ``datasets`` dataset, in row order; ids are row indices (or ``id_column``).

    ``dataset`` is a ``datasets.Dataset`` / ``DatasetDict``, a folder written by ``save_to_disk``, or a Hub
    dataset name (loaded with ``datasets.load_dataset(dataset, config_name, split=split)``). The audio
    column is cast to ``Audio(decode=False)``: the stored bytes are decoded by :func:`decode`, not by
    ``datasets``.
    """
    import datasets

    base_dir = None
    name = None
    if isinstance(dataset, (str, os.PathLike)):
        name = os.fspath(dataset)
        if is_saved_dataset(Path(name)):
            base_dir = name
            dataset = datasets.load_from_disk(name)
        else:
            try:
                dataset = datasets.load_dataset(name, config_name, split=split)
            except Exception as exc:  # not found, offline, no audio builder...: one line, not a traceback
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise FileNotFoundError(
                    f"{name!r} is not a local file or folder, and loading it as a Hub dataset failed: {first} "
                    "(give an audio folder, a manifest .csv/.tsv/.jsonl, or a folder written by save_to_disk)"
                ) from exc
    if isinstance(dataset, datasets.DatasetDict):
        if split is None:
            if len(dataset) != 1:
                raise ValueError(f"the dataset has splits {list(dataset)}; choose one with split=")
            split = next(iter(dataset))
        dataset = dataset[split]
    if not isinstance(dataset, datasets.Dataset):
        raise TypeError(f"expected a datasets.Dataset, got {type(dataset).__name__} (streaming is not supported)")
    if audio_column not in dataset.column_names:
        raise ValueError(f"audio column {audio_column!r} not found; columns: {dataset.column_names}")
    if isinstance(dataset.features[audio_column], datasets.Audio):
        dataset = dataset.cast_column(audio_column, datasets.Audio(decode=False))
    ref_col = _pick_reference_column(dataset.column_names, text_column)
    if id_column is not None and id_column not in dataset.column_names:
        raise ValueError(f"id column {id_column!r} not found; columns: {dataset.column_names}")
    refs = dataset[ref_col] if ref_col else [None] * len(dataset)
    ids = _unique_ids([str(x) for x in dataset[id_column]]) if id_column else [str(i) for i in range(len(dataset))]
    access = _DatasetAudio(dataset, audio_column, base_dir=base_dir)
    label = name or "dataset"
    items = [
        AudioItem(id=ids[i], path=f"{label}[{i}]", reference=_reference(refs[i]), source=(access, i))
        for i in range(len(dataset))
    ]
    if id_column:
        items.sort(key=lambda it: it.id)
    return items


def list_audio(
    source: Any,
    *,
    path_column: str = "path",
    text_column: str | None = None,
    id_column: str | None = None,
    audio_column: str = "audio",
    split: str | None = None,
    config_name: str | None = None,
) -> list[AudioItem]:
    """Dispatch on the kind of ``source``: folder, manifest file, saved dataset, ``Dataset`` or Hub name."""
    if not isinstance(source, (str, os.PathLike)):
        return list_dataset(source, audio_column, text_column, split, config_name, id_column)
    path = Path(source)
    if is_saved_dataset(path):
        return list_dataset(path, audio_column, text_column, split, config_name, id_column)
    if path.is_dir():
        return list_folder(path)
    if path.is_file():
        return list_manifest(path, path_column=path_column, text_column=text_column, id_column=id_column)
    text = os.fspath(source)
    looks_local = (
        text.startswith(("/", ".", "~"))
        or text.count("/") > 1
        or path.suffix.lower() in {".csv", ".tsv", ".json", ".jsonl", ".ndjson"}
    )
    if looks_local:
        raise FileNotFoundError(f"input not found: {source} (give an audio folder, a manifest .csv/.tsv/.jsonl, a "
                                "folder written by save_to_disk, or a Hub dataset name)")
    # Not a local file or folder: a Hub dataset name ("name" or "org/name").
    return list_dataset(text, audio_column, text_column, split, config_name, id_column)


def write_failures(path: str | os.PathLike, failures: Iterable[AudioFailure]) -> None:
    """JSON lines ``{"id", "path", "reason"}``, written atomically."""
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        for failure in failures:
            f.write(json.dumps(failure.to_dict(), ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def read_failures(path: str | os.PathLike) -> list[AudioFailure]:
    with open(path, encoding="utf-8") as f:
        return [AudioFailure(**json.loads(line)) for line in f if line.strip()]
