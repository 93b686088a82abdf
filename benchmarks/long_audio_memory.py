"""Peak memory of labelling one long recording vs short clips, each run in a fresh process.

Builds a tiny random Whisper teacher (d_model 32: the teacher is not what is measured), a long 16 kHz
mono WAV made by repeating the committed test clips (``tests/data/harvard_festival``, 20 Harvard
sentences, 50 s) with 0.5-s pauses, and runs ``hf-distill pseudo-label --no-pack`` and ``hf-distill
pseudo-label --pack`` on it, on the 20 short clips, and on as many short clips as the long file has 30-s windows (the
manifest repeats the 20 files: the same work for the teacher). Each run is a fresh ``python -m hf_distill.cli``
process; its peak resident memory is the ``ru_maxrss`` the kernel reports for that child alone.

    OMP_NUM_THREADS=1 python benchmarks/long_audio_memory.py --hours 3 --work_dir /tmp/long_audio

``--pythonpath DIR`` runs the labellers from another checkout of the package (to compare versions).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CLIPS = REPO / "tests" / "data" / "harvard_festival"


def tiny_teacher(work: Path) -> Path:
    path = work / "tiny_whisper"
    if not (path / "config.json").is_file():
        sys.path.insert(0, str(REPO / "tests"))
        from test_pseudo_label import build_tiny_whisper  # the tests' tiny teacher

        build_tiny_whisper(path)
    return path


def long_recording(work: Path, hours: float) -> Path:
    """A folder holding one file, ``hours`` of 16 kHz speech: the committed clips over and over, written a
    clip at a time."""
    import soundfile as sf

    folder = work / f"long_{hours:g}h"
    path = folder / "long.wav"
    if path.is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    with open(CLIPS / "manifest.csv", newline="") as f:
        clips = [sf.read(str(CLIPS / row["path"]), dtype="int16")[0] for row in csv.DictReader(f)]
    pause = np.zeros(8000, dtype=np.int16)
    want, written = int(hours * 3600 * 16000), 0
    tmp = path.with_suffix(".tmp.wav")
    with sf.SoundFile(str(tmp), "w", 16000, 1, format="WAV", subtype="PCM_16") as out:
        while written < want:
            for clip in clips:
                piece = np.concatenate([clip, pause])[: want - written]
                out.write(piece)
                written += len(piece)
                if written >= want:
                    break
    tmp.replace(path)
    return folder


def many_short_clips(work: Path, count: int) -> Path:
    """A manifest listing the committed clips over and over: ``count`` rows (each its own id)."""
    with open(CLIPS / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    path = work / f"short_{count}.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "text"])
        writer.writerows([str(CLIPS / rows[i % len(rows)]["path"]), rows[i % len(rows)]["text"]] for i in range(count))
    return path


def peak_rss(cmd: list[str], env: dict[str, str], cwd: Path) -> tuple[float, float, int]:
    """``(peak RSS in MiB, wall seconds, exit code)`` of ``cmd`` run as a fresh child process in ``cwd``."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read()
    proc.stderr.close()
    if proc.returncode:
        print(err[-2000:], file=sys.stderr)
    return usage.ru_maxrss / 1024, time.perf_counter() - start, proc.returncode


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hours", type=float, default=3.0, help="length of the long recording")
    p.add_argument("--work_dir", default=None, help="teacher, audio and outputs (default: a temporary folder)")
    p.add_argument("--labellers", default="pseudo-label --no-pack,pseudo-label --pack",
                   help="comma-separated commands with their flags")
    p.add_argument("--max_new_tokens", type=int, default=4)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--pythonpath", default=None, help="import hf_distill from this folder instead")
    p.add_argument("--json_out", default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    import tempfile

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="long_audio_memory_"))
    work.mkdir(parents=True, exist_ok=True)
    teacher = tiny_teacher(work)
    from hf_distill.speech.windows import plan_chunks

    # as many 30-s windows of short clips as the long file has (6-s overlaps): the same work for the teacher
    windows = len(plan_chunks(int(args.hours * 3600 * 16000), 30 * 16000, 6 * 16000))
    inputs = {"20 short clips (50 s)": str(CLIPS / "manifest.csv"),
              f"{windows} short clips": str(many_short_clips(work, windows)),
              f"one {args.hours:g}-hour file": str(long_recording(work, args.hours))}
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    if args.pythonpath:
        env["PYTHONPATH"] = args.pythonpath
    results = []
    for labeller in args.labellers.split(","):
        for name, source in inputs.items():
            out = work / "out" / f"{labeller.replace(' ', '')}-{len(results)}"
            shutil.rmtree(out, ignore_errors=True)
            cmd = [sys.executable, "-m", "hf_distill.cli", *labeller.split(), source, "--model", str(teacher), "--output-dir",
                   str(out), "--max-new-tokens", str(args.max_new_tokens), "--batch-size", str(args.batch_size),
                   "--no-progress"]
            rss, wall, code = peak_rss(cmd, env, work)  # not the repository: python -m puts the cwd first
            results.append({"labeller": labeller, "input": name, "peak_rss_mib": round(rss, 1),
                            "wall_s": round(wall, 1), "exit_code": code})
            print(f"{labeller:20s} {name:22s} peak RSS {rss:8.1f} MiB  {wall:7.1f} s  exit {code}", flush=True)
    report = {"hours": args.hours, "windows": windows, "threads": env["OMP_NUM_THREADS"], "results": results}
    print(json.dumps(report, indent=2))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2) + "\n")
    return 0 if all(r["exit_code"] == 0 for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
