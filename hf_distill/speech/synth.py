"""Labelled speech on demand: synthesize sentences with festival or flite.

For tests, examples and smoke runs that need audio whose transcript is known exactly. Two local
speech synthesizers are supported (Debian packages):

* ``"festival"``: ``festival`` + ``festvox-us-slt-hts`` (the HTS "slt" voice; about 0.3-0.6 s per
  sentence, 32 kHz, natural enough for Whisper tiny.en to reach a WER under 10%);
* ``"flite"``: ``flite`` (voices kal, kal16, awb, rms, slt; about 70 ms per sentence, 16 kHz,
  more robotic).

Public API::

    HARVARD_SENTENCES: tuple[str, ...]
    harvard_sentences(n=None) -> list[str]
    available_engines() -> list[str]
    synthesize(texts, out_dir, engine="festival", voice=None, sampling_rate=None, prefix="utt", start=0)
        -> list[tuple[Path, str]]
    write_manifest(clips, manifest) -> Path

Command line: ``hf-distill synthesize OUT_DIR [--sentences N | --text-file F] [--engine flite]``.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

__all__ = [
    "ENGINES",
    "FLITE_OPTIONS",
    "HARVARD_SENTENCES",
    "SynthesisError",
    "available_engines",
    "harvard_sentences",
    "split_voice",
    "synthesize",
    "write_manifest",
]

# The first four lists of the Harvard sentences (IEEE Recommended Practice for Speech Quality
# Measurements, 1969): phonetically balanced, public domain, the usual speech-test prompts.
HARVARD_SENTENCES: tuple[str, ...] = (
    # list 1
    "The birch canoe slid on the smooth planks.",
    "Glue the sheet to the dark blue background.",
    "It's easy to tell the depth of a well.",
    "These days a chicken leg is a rare dish.",
    "Rice is often served in round bowls.",
    "The juice of lemons makes fine punch.",
    "The box was thrown beside the parked truck.",
    "The hogs were fed chopped corn and garbage.",
    "Four hours of steady work faced us.",
    "A large size in stockings is hard to sell.",
    # list 2
    "The boy was there when the sun rose.",
    "A rod is used to catch pink salmon.",
    "The source of the huge river is the clear spring.",
    "Kick the ball straight and follow through.",
    "Help the woman get back to her feet.",
    "A pot of tea helps to pass the evening.",
    "Smoky fires lack flame and heat.",
    "The soft cushion broke the man's fall.",
    "The salt breeze came across from the sea.",
    "The girl at the booth sold fifty bonds.",
    # list 3
    "The small pup gnawed a hole in the sock.",
    "The fish twisted and turned on the bent hook.",
    "Press the pants and sew a button on the vest.",
    "The swan dive was far short of perfect.",
    "The beauty of the view stunned the young boy.",
    "Two blue fish swam in the tank.",
    "Her purse was full of useless trash.",
    "The colt reared and threw the tall rider.",
    "It snowed, rained, and hailed the same morning.",
    "Read verse out loud for pleasure.",
    # list 4
    "Hoist the load to your left shoulder.",
    "Take the winding path to reach the lake.",
    "Note closely the size of the gas tank.",
    "Wipe the grease off his dirty face.",
    "Mend the coat before you go out.",
    "The wrist was badly strained and hung limp.",
    "The stray cat gave birth to kittens.",
    "The young girl gave no clear response.",
    "The meal was cooked before the bell rang.",
    "What joy there is in living.",
)

#: engine -> (executable, default voice)
ENGINES: dict[str, tuple[str, str]] = {
    "festival": ("text2wave", "cmu_us_slt_arctic_hts"),
    "flite": ("flite", "slt"),
}


#: options a flite voice takes after its name (``flite:awb+stretch=1.15+f0=95``) -> flite's ``--setf`` feature
FLITE_OPTIONS: dict[str, str] = {
    "stretch": "duration_stretch",     # > 1 speaks slower
    "f0": "int_f0_target_mean",        # mean pitch, Hz
    "f0sd": "int_f0_target_stddev",    # pitch range, Hz
}


class SynthesisError(RuntimeError):
    """The synthesizer is missing or failed on a sentence."""


def split_voice(engine: str, voice: str) -> tuple[str, dict[str, float]]:
    """``("flite", "awb+stretch=1.15+f0=95")`` -> ``("awb", {"duration_stretch": 1.15, "int_f0_target_mean": 95.0})``:
    a voice name and the variant options after it (flite only: speaking rate and pitch, so that one voice
    gives several speakers). Raises ``ValueError`` for an unknown option, a value that is not a positive
    number, or options on festival."""
    name, *options = voice.split("+")
    if not name:
        raise ValueError(f"voice {voice!r} has no name before its options")
    settings: dict[str, float] = {}
    if options and engine != "flite":
        raise ValueError(f"voice {engine}:{voice}: only flite voices take options ({'/'.join(FLITE_OPTIONS)})")
    for option in options:
        key, _, value = option.partition("=")
        if key not in FLITE_OPTIONS:
            raise ValueError(f"voice {engine}:{voice}: unknown option {key!r}; write one of "
                             f"{', '.join(f'{k}=<number>' for k in FLITE_OPTIONS)}")
        try:
            number = float(value)
        except ValueError:
            number = -1.0
        if not (number > 0 and math.isfinite(number)):
            raise ValueError(f"voice {engine}:{voice}: {key} must be a positive number, got {value!r}")
        settings[FLITE_OPTIONS[key]] = number
    return name, settings


def harvard_sentences(n: int | None = None) -> list[str]:
    """The first ``n`` Harvard sentences (all 40 by default)."""
    if n is not None and not 0 <= n <= len(HARVARD_SENTENCES):
        raise ValueError(f"n must be between 0 and {len(HARVARD_SENTENCES)}, got {n}")
    return list(HARVARD_SENTENCES[:n])


def available_engines() -> list[str]:
    """The engines whose programs are installed (festival also needs its slt HTS voice)."""
    found = []
    for engine, (program, _) in ENGINES.items():
        if shutil.which(program) is None:
            continue
        if engine == "festival" and not _festival_voice_installed(ENGINES["festival"][1]):
            continue
        found.append(engine)
    return found


def _festival_voice_installed(voice: str) -> bool:
    roots = [Path("/usr/share/festival/voices"), Path("/usr/lib/festival/voices")]
    return any(root.is_dir() and any(root.glob(f"*/{voice}")) for root in roots)


def _install_hint(engine: str) -> str:
    packages = {"festival": "festival festvox-us-slt-hts", "flite": "flite"}[engine]
    return f"install it with: apt-get install {packages}"


def _run(cmd: list[str], text: str, engine: str, stdin: str | None = None) -> None:
    try:
        proc = subprocess.run(cmd, check=False, input=stdin, capture_output=True, text=True, timeout=120)
    except FileNotFoundError as err:
        raise SynthesisError(f"{engine} is not installed ({_install_hint(engine)})") from err
    except subprocess.TimeoutExpired as err:
        raise SynthesisError(f"{engine} timed out on {text!r}") from err
    if proc.returncode != 0:
        raise SynthesisError(f"{engine} failed on {text!r}: {proc.stderr.strip()[-500:]}")


def _synthesize_one(text: str, path: Path, engine: str, voice: str) -> None:
    if engine == "flite":
        name, settings = split_voice(engine, voice)
        features = [arg for key, value in settings.items() for arg in ("--setf", f"{key}={value:g}")]
        _run(["flite", "-voice", name, *features, "-t", text, "-o", str(path)], text, engine)
    else:
        # The text goes through a file so that no quoting of the sentence is ever needed.
        with tempfile.NamedTemporaryFile("w", suffix=".txt", encoding="utf-8", delete=False) as handle:
            handle.write(text + "\n")
            text_file = handle.name
        try:
            _run(["text2wave", "-eval", f"(voice_{voice})", "-o", str(path), text_file], text, engine)
        finally:
            os.unlink(text_file)
    if not path.is_file() or path.stat().st_size <= 44:
        raise SynthesisError(f"{engine} wrote no audio for {text!r}")


def _resample_file(path: Path, sampling_rate: int) -> None:
    import numpy as np
    import soundfile as sf
    import soxr

    audio, rate = sf.read(path, dtype="float32", always_2d=True)
    audio = audio.mean(axis=1)
    if rate != sampling_rate:
        audio = soxr.resample(audio, rate, sampling_rate)
    sf.write(path, np.clip(audio, -1.0, 1.0), sampling_rate, subtype="PCM_16")


def synthesize(
    texts: Sequence[str],
    out_dir: str | os.PathLike,
    engine: str = "festival",
    voice: str | None = None,
    sampling_rate: int | None = None,
    prefix: str = "utt",
    start: int = 0,
) -> list[tuple[Path, str]]:
    """Speak each text into ``out_dir/{prefix}{start + i:04d}.wav``; returns ``[(path, text), ...]`` in order.

    Args:
        texts: sentences to speak.
        out_dir: created if missing; existing files with the same names are replaced.
        engine: ``"festival"`` or ``"flite"``.
        voice: the engine's voice (default: slt for both: ``cmu_us_slt_arctic_hts`` / ``slt``).
        sampling_rate: if given, each file is downmixed to mono and resampled to this rate (16-bit PCM).
        prefix: file name prefix.
        start: number of the first file (to add sentences to a folder already filled).
    """
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of sentences, not one string")
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {sorted(ENGINES)}, got {engine!r}")
    program, default_voice = ENGINES[engine]
    if shutil.which(program) is None:
        raise SynthesisError(f"{engine} is not installed ({_install_hint(engine)})")
    voice = voice or default_voice
    split_voice(engine, voice)  # a bad option fails here, before any audio is made
    if engine == "festival" and not _festival_voice_installed(voice):
        raise SynthesisError(f"festival voice {voice} is not installed ({_install_hint(engine)})")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for i, text in enumerate(texts):
        if not text or not text.strip():
            raise ValueError(f"text {i} is empty")
        path = out_dir / f"{prefix}{start + i:04d}.wav"
        _synthesize_one(text, path, engine, voice)
        if sampling_rate is not None:
            _resample_file(path, sampling_rate)
        results.append((path, text))
    return results


def write_manifest(clips: Sequence[tuple[Path, str]], manifest: str | os.PathLike) -> Path:
    """A ``path,text`` CSV of ``clips`` (paths relative to the manifest's folder), written atomically."""
    import csv

    manifest = Path(manifest)
    manifest.parent.mkdir(parents=True, exist_ok=True)
    tmp = manifest.with_name(manifest.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "text"])
        for path, text in clips:
            writer.writerow([os.path.relpath(Path(path).resolve(), manifest.parent.resolve()), text])
    tmp.replace(manifest)
    return manifest


def cli_main(argv: list[str] | None = None) -> int:
    """``hf-distill synthesize``: speak Harvard sentences (or lines of a text file) into a folder of WAV files
    with a ``manifest.csv`` (path, text) that ``pseudo-label`` and the speech recipes read."""
    import argparse

    from hf_distill.cli import CommandError
    from hf_distill.speech.input_checks import check_output_dir

    p = argparse.ArgumentParser(prog="hf-distill synthesize", description=cli_main.__doc__.split("\n\n")[0])
    p.add_argument("output_dir", help="folder for the WAV files and manifest.csv")
    p.add_argument("--sentences", type=int, default=len(HARVARD_SENTENCES),
                   help=f"the first N Harvard sentences (at most {len(HARVARD_SENTENCES)})")
    p.add_argument("--text-file", "--text_file", dest="text_file", default=None,
                   help="speak these lines instead (one sentence per line)")
    p.add_argument("--engine", default="festival", choices=sorted(ENGINES))
    p.add_argument("--voice", default=None)
    p.add_argument("--sampling-rate", "--sampling_rate", dest="sampling_rate", type=int, default=16000)
    args = p.parse_args(argv)
    # every wrong input is reported before the synthesizer runs
    out_dir = check_output_dir(args.output_dir, "OUTPUT_DIR")
    if args.sampling_rate <= 0:
        raise ValueError(f"--sampling-rate must be a positive number of Hz, got {args.sampling_rate}")
    if args.text_file:
        text_file = Path(args.text_file)
        if not text_file.exists():
            raise FileNotFoundError(f"--text-file {args.text_file} not found; give a text file with one sentence "
                                    "per line")
        if text_file.is_dir():
            raise IsADirectoryError(f"--text-file {args.text_file} is a folder; give a text file with one sentence "
                                    "per line")
        texts = [line.strip() for line in text_file.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not texts:
            raise ValueError(f"--text-file {args.text_file} has no sentences (every line is empty)")
    else:
        if not 1 <= args.sentences <= len(HARVARD_SENTENCES):
            raise ValueError(f"--sentences must be between 1 and {len(HARVARD_SENTENCES)}, got {args.sentences}")
        texts = harvard_sentences(args.sentences)
    try:
        clips = synthesize(texts, out_dir, engine=args.engine, voice=args.voice,
                           sampling_rate=args.sampling_rate, prefix="utt")
    except SynthesisError as exc:
        raise CommandError(str(exc)) from None
    manifest = write_manifest(clips, out_dir / "manifest.csv")
    print(f"{len(clips)} clips in {args.output_dir}; manifest {manifest}")
    return 0
