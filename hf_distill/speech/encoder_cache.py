"""Encoder outputs of a frozen Whisper encoder, computed once per clip and reused by every epoch.

A Distil-Whisper student that keeps the teacher's encoder frozen spends most of a training step running
that encoder on 30-s windows, and gets the same output every epoch. :func:`build_encoder_cache` runs it
once per clip and stores ``last_hidden_state`` (``(frames, d_model)``, float16 by default) in shards of
``.npy`` files, each written atomically, so an interrupted build resumes at the first missing shard.
``cache.json`` records a fingerprint of the encoder's weights, the feature extractor's settings and the
audio (ids, files' sizes and modification times); a cache made with anything else is refused with the
reason, never reused silently. :class:`EncoderOutputCache` reads rows by clip id (memory-mapped).

:class:`CachedEncoderDataset` gives training examples whose ``encoder_outputs`` come from the cache (no
``input_features``); :class:`~hf_distill.speech.training.WhisperDistillationCollator` batches them and
:class:`~hf_distill.speech.training.WhisperDistillationTrainer` feeds the same states to the live teacher.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hf_distill.speech.audio import AudioItem, decode
from hf_distill.speech.training import WhisperPseudoLabelDataset

__all__ = ["CachedEncoderDataset", "EncoderOutputCache", "build_encoder_cache", "encoder_fingerprint"]

DTYPES = {"float16": np.float16, "float32": np.float32}


def encoder_fingerprint(encoder: torch.nn.Module, feature_extractor) -> str:
    """sha256 of the encoder's weights (names, shapes, dtypes, values) and the feature extractor's settings."""
    digest = hashlib.sha256()
    for name, tensor in sorted(encoder.state_dict().items()):
        value = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(value.shape)}:{value.dtype}".encode())
        digest.update(value.view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    settings = {k: v for k, v in feature_extractor.to_dict().items() if not k.startswith("_") and k != "mel_filters"}
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def audio_fingerprint(items: Sequence[AudioItem]) -> str:
    """sha256 of the clips' ids and paths, and of each file's size and modification time."""
    digest = hashlib.sha256()
    for item in items:
        src = item.source if isinstance(item.source, (str, os.PathLike)) else item.path
        try:
            stat = os.stat(src)
            stamp = f"{stat.st_size}:{stat.st_mtime_ns}"
        except (OSError, TypeError):
            stamp = "-"
        digest.update(f"{item.id}\t{item.path}\t{stamp}\n".encode())
    return digest.hexdigest()


class EncoderOutputCache:
    """Read access to a finished cache: ``cache[clip_id]`` is a float32 ``(frames, d_model)`` array."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        meta_path = self.folder / "cache.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{self.folder} holds no encoder cache (no cache.json); build it first")
        self.meta = json.loads(meta_path.read_text())
        self.index: dict[str, tuple[int, int]] = {}
        for s, ids in enumerate(self.meta["shards"]):
            if not self.shard_path(s).is_file():
                raise FileNotFoundError(f"encoder cache {self.folder} is incomplete: {self.shard_path(s).name} "
                                        "is missing; build it again to finish it")
            for j, clip in enumerate(ids):
                self.index[clip] = (s, j)
        self._open: dict[int, np.ndarray] = {}

    def shard_path(self, s: int) -> Path:
        return self.folder / f"shard-{s:05d}.npy"

    @property
    def fingerprint(self) -> str:
        return self.meta["encoder"]

    def __len__(self) -> int:
        return len(self.index)

    def __contains__(self, clip: str) -> bool:
        return clip in self.index

    def __getitem__(self, clip: str) -> np.ndarray:
        if clip not in self.index:
            raise KeyError(f"clip {clip!r} is not in the encoder cache {self.folder}")
        s, j = self.index[clip]
        if s not in self._open:
            self._open[s] = np.load(self.shard_path(s), mmap_mode="r")
        return np.asarray(self._open[s][j], dtype=np.float32)


@torch.inference_mode()
def build_encoder_cache(model, feature_extractor, items: Sequence[AudioItem], folder: str | Path, *,
                        batch_size: int = 8, dtype: str = "float16", shard_size: int = 64,
                        progress: bool = True) -> EncoderOutputCache:
    """Run ``model``'s encoder (a Whisper model or its encoder) once on every clip of ``items`` into ``folder``.

    Resumes a build of the same encoder, settings and audio; any other cache in ``folder`` is refused (its
    fingerprint differs): delete the folder or choose another. Returns the finished cache.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if batch_size < 1 or shard_size < 1:
        raise ValueError(f"batch_size and shard_size must be >= 1, got {batch_size} and {shard_size}")
    ids = [it.id for it in items]
    if len(set(ids)) != len(ids):
        raise ValueError("clip ids must be unique to cache their encoder outputs")
    encoder = model.get_encoder() if hasattr(model, "get_encoder") else model
    folder = Path(folder)
    meta = {"encoder": encoder_fingerprint(encoder, feature_extractor), "audio": audio_fingerprint(items),
            "dtype": dtype, "shards": [ids[i : i + shard_size] for i in range(0, len(ids), shard_size)]}
    meta_path = folder / "cache.json"
    if meta_path.is_file():
        old = json.loads(meta_path.read_text())
        changed = [what for key, what in (("encoder", "the encoder's weights or the feature extractor"),
                                          ("audio", "the audio files"), ("dtype", "the stored dtype"),
                                          ("shards", "the clips or their order"))
                   if old.get(key) != meta[key]]
        if changed:
            raise ValueError(f"the encoder cache in {folder} was made with other {', '.join(changed)}; delete "
                             "the folder or give another one")
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "cache.json.tmp"
    tmp.write_text(json.dumps(meta))
    tmp.replace(meta_path)
    param = next(encoder.parameters())
    rate = int(feature_extractor.sampling_rate)
    by_id = dict(zip(ids, items))
    todo = [s for s in range(len(meta["shards"])) if not (folder / f"shard-{s:05d}.npy").is_file()]
    bar = None
    if progress and todo:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(len(meta["shards"][s]) for s in todo), desc="encoder outputs", unit="clip")
    for s in todo:
        shard = meta["shards"][s]
        parts = []
        for i in range(0, len(shard), batch_size):
            audios = [decode(by_id[c], rate) for c in shard[i : i + batch_size]]
            feats = feature_extractor(audios, sampling_rate=rate, return_tensors="pt").input_features
            hidden = encoder(input_features=feats.to(param.device, param.dtype)).last_hidden_state
            parts.append(hidden.float().cpu().numpy().astype(DTYPES[dtype]))
            if bar is not None:
                bar.update(len(audios))
        part = folder / f".shard-{s:05d}.npy"
        with open(part, "wb") as f:
            np.save(f, np.concatenate(parts))
            f.flush()
            os.fsync(f.fileno())
        part.replace(folder / f"shard-{s:05d}.npy")
    if bar is not None:
        bar.close()
    return EncoderOutputCache(folder)


class CachedEncoderDataset(WhisperPseudoLabelDataset):
    """:class:`~hf_distill.speech.training.WhisperPseudoLabelDataset` whose examples carry the cached
    ``encoder_outputs`` of their clip instead of ``input_features``."""

    def __init__(self, rows, feature_extractor, cache: EncoderOutputCache, *,
                 items: Mapping[str, AudioItem] | None = None, soft_labels: bool = False, max_label_length: int = 448,
                 vocabulary=None):
        super().__init__(rows, feature_extractor, items=items, soft_labels=soft_labels,
                         max_label_length=max_label_length, vocabulary=vocabulary)
        self.cache = cache
        ids = rows["id"] if hasattr(rows, "column_names") else [row["id"] for row in rows]
        missing = [clip for clip in ids if clip not in cache]
        if missing:
            raise ValueError(f"{len(missing)} training clips are not in the encoder cache {cache.folder} "
                             f"(e.g. {missing[:3]}); build the cache over the training clips")

    def __getitem__(self, i: int) -> dict[str, Any]:
        row = self.rows[int(i)]
        return {"encoder_outputs": self.cache[row["id"]], **self.example(row)}
