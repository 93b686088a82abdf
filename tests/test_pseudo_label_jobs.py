"""Pseudo-labelling jobs: resume after SIGKILL, ranks, refused restarts, long recordings read a window at a time,
and wrong input on the command line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from speech_assets import one_line_error
from test_pseudo_label import (  # noqa: F401 - ctc_dir, whisper_dir: the tiny teachers (fixtures)
    REPO,
    ctc_dir,
    read_rows,
    whisper_dir,
    write_clips,
)

from hf_distill.speech.labelling import (
    FAILPOINT_ENV,
    ConfigMismatchError,
    PseudoLabelConfig,
    cli_main,
    load_pseudo_labels,
    pseudo_label,
)
from hf_distill.store.writer import shard_files


# ------------------------------------------------------------------------------------------------
# resume, refusal, ranks


@pytest.fixture(scope="module")
def resume_setup(ctc_dir, tmp_path_factory):
    """Twelve clips in six shards of two, and the store of one uninterrupted run."""
    root = tmp_path_factory.mktemp("resume")
    clips = write_clips(root / "clips", [4.0 + 0.5 * i for i in range(11)], seed=7)  # + broken.wav = 12 items
    argv = [
        str(clips),
        "--model",
        str(ctc_dir),
        "--top-k",
        "3",
        "--batch-size",
        "2",
        "--shard-size",
        "2",
        "--chunk-length-s",
        "4",
        "--chunk-overlap-s",
        "1",
        "--no-progress",
    ]
    reference = root / "reference"
    assert cli_main(argv + ["--output-dir", str(reference)]) == 0
    assert len(shard_files(reference)) == 6
    return argv, reference, root


def run_cli_subprocess(argv, env_extra=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **(env_extra or {})}
    return subprocess.Popen(
        [sys.executable, "-m", "hf_distill.cli", "pseudo-label", *argv],
        env=env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def assert_same_store(a: Path, b: Path):
    files_a, files_b = shard_files(a), shard_files(b)
    assert [Path(f).name for f in files_a] == [Path(f).name for f in files_b]
    for fa, fb in zip(files_a, files_b):
        assert Path(fa).read_bytes() == Path(fb).read_bytes(), Path(fa).name
    assert (a / "manifest.json").read_bytes() == (b / "manifest.json").read_bytes()
    assert (a / "failures.jsonl").read_bytes() == (b / "failures.jsonl").read_bytes()
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    for s in (sa, sb):
        for key in ("compute_seconds", "real_time_factor", "speed_x_real_time"):
            s.pop(key)
    assert sa == sb


def test_sigkill_after_first_shard_then_resume_is_identical(resume_setup):
    argv, reference, root = resume_setup
    out = root / "killed"
    proc = run_cli_subprocess(argv + ["--output-dir", str(out)])
    first = out / "shard-00000.parquet"
    deadline = time.time() + 120
    while not first.exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    done_at_kill = {Path(f).name: os.stat(f).st_mtime_ns for f in shard_files(out)}
    assert 1 <= len(done_at_kill) < 6, "the job finished before it could be killed"
    assert not (out / "summary.json").exists()
    assert cli_main(argv + ["--output-dir", str(out)]) == 0
    for name, mtime in done_at_kill.items():  # finished shards were verified and kept, not recomputed
        assert os.stat(out / name).st_mtime_ns == mtime
    assert_same_store(reference, out)


def test_killed_while_writing_a_shard_leaves_a_temp_file_that_is_ignored(resume_setup):
    argv, reference, root = resume_setup
    out = root / "killed_mid_write"
    proc = run_cli_subprocess(argv + ["--output-dir", str(out)], {FAILPOINT_ENV: "kill-before-rename:1"})
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL, err.decode()
    leftovers = list(out.glob("shard-00001.parquet.tmp-*"))
    assert len(leftovers) == 1 and leftovers[0].stat().st_size > 0
    assert [Path(f).name for f in shard_files(out)] == ["shard-00000.parquet"]
    ds = load_pseudo_labels(out, cache_dir=str(root / "hf_cache_partial"))  # readable while incomplete
    assert ds["id"] == ["clip01.wav"]  # shard 0 = [broken.wav (a failure), clip01.wav]
    result = pseudo_label(PseudoLabelConfig(**{**_config_from_argv(argv), "output_dir": str(out)}))
    assert (result["shards_skipped"], result["shards_computed"]) == (1, 5)
    assert not list(out.glob("*.tmp-*"))
    assert_same_store(reference, out)


def _config_from_argv(argv):
    return dict(
        input=argv[0],
        model=argv[2],
        top_k=3,
        batch_size=2,
        shard_size=2,
        chunk_length_s=4.0,
        chunk_overlap_s=1.0,
        progress=False,
        output_dir="",
    )


def test_two_ranks_split_the_shards_without_overlap(resume_setup, monkeypatch):
    argv, reference, root = resume_setup
    out = root / "ranks"
    base = {**_config_from_argv(argv), "output_dir": str(out)}
    monkeypatch.setenv("RANK", "0")  # as set by torchrun / accelerate launch
    monkeypatch.setenv("WORLD_SIZE", "2")
    r0 = pseudo_label(PseudoLabelConfig(**base))
    assert r0["summary"] is None and r0["shards_computed"] == 3
    assert [Path(f).name for f in shard_files(out)] == [f"shard-0000{i}.parquet" for i in (0, 2, 4)]
    r1 = pseudo_label(PseudoLabelConfig(**base, rank=1, world_size=2))
    assert r1["shards_computed"] == 3 and r1["summary"] is not None  # the last finisher writes the summary
    ids = [r["id"] for r in read_rows(out)]
    ref_ids = [r["id"] for r in read_rows(reference)]
    assert len(ids) == len(set(ids)) == 11 and ids == ref_ids
    assert_same_store(reference, out)
    (out / "summary.json").unlink()
    assert cli_main(["--finalize", "--output-dir", str(out)]) == 0
    assert json.loads((out / "summary.json").read_text())["rows"] == 11


def test_a_store_started_with_int32_indices_resumes_with_them_and_loads(resume_setup):
    """Stores written before uint16 indices (no index type in the manifest, int32 shards) still resume: the
    missing shards are written with int32 indices too, so the store has one schema, loads, and holds the values
    of a new store."""
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    from hf_distill.store.writer import read_shard_metadata, write_shard

    argv, reference, root = resume_setup
    out = root / "old_format"
    out.mkdir()
    manifest = json.loads((reference / "manifest.json").read_text())
    assert manifest["soft_labels"]["index_type"] == "uint16"
    del manifest["soft_labels"]["index_type"]
    manifest["soft_labels"]["raw_bytes_per_position"] = 6 * 3 + 2
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    old_type = pa.list_(pa.list_(pa.int32(), 3))
    for i in range(3):
        name = f"shard-{i:05d}.parquet"
        table = pq.read_table(reference / name)
        table = table.set_column(table.schema.get_field_index("topk_indices"), "topk_indices",
                                 table["topk_indices"].cast(old_type))
        write_shard(out / name, table, read_shard_metadata(reference / name), i)
    shutil.copytree(reference / "stats", out / "stats")
    result = pseudo_label(PseudoLabelConfig(**{**_config_from_argv(argv), "output_dir": str(out)}))
    assert (result["shards_skipped"], result["shards_computed"]) == (3, 3)
    stored = [pq.read_schema(f).field("topk_indices").type.value_type.value_type for f in shard_files(out)]
    assert len(stored) == 6 and all(pa.types.is_int32(t) for t in stored)
    ds = load_pseudo_labels(out, cache_dir=str(root / "hf_cache_old_format"))
    assert ds.features["topk_indices"].feature.feature.dtype == "int32"
    assert read_rows(out) == read_rows(reference)  # the same values, whatever the index type


def test_restart_with_another_configuration_or_input_is_refused(resume_setup, capsys):
    argv, reference, _ = resume_setup
    with pytest.raises(ConfigMismatchError, match=r"top_k: 3 -> 5"):
        pseudo_label(PseudoLabelConfig(**{**_config_from_argv(argv), "output_dir": str(reference), "top_k": 5}))
    line = one_line_error(capsys, ["pseudo-label", *argv, "--output-dir", str(reference), "--batch-size", "4"])
    assert "different configuration (batch_size: 2 -> 4)" in line
    # same options, but the input folder gained a file
    clips = Path(argv[0])
    extra = clips / "zz_new.wav"
    sf.write(extra, np.zeros(1600, np.float32), 16000)
    try:
        with pytest.raises(ConfigMismatchError, match="different input listing"):
            pseudo_label(PseudoLabelConfig(**{**_config_from_argv(argv), "output_dir": str(reference)}))
    finally:
        extra.unlink()
    # an identical restart of a finished store recomputes nothing
    result = pseudo_label(PseudoLabelConfig(**{**_config_from_argv(argv), "output_dir": str(reference)}))
    assert (result["shards_skipped"], result["shards_computed"]) == (6, 0)


# ------------------------------------------------------------------------------------------------
# long recordings: read a window at a time


def pausing_signal(seconds: float, sr: int = 16000, seed: int = 7) -> np.ndarray:
    """A tone that pauses for a second every four, over a little noise (the packed labeller cuts at pauses)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    x = 0.3 * np.sin(2 * np.pi * 300 * t) * (np.sin(2 * np.pi * 0.25 * t) > -0.7) + 0.02 * rng.standard_normal(len(t))
    return x.astype(np.float32)


@pytest.mark.parametrize("packed", [False, True], ids=["unpacked", "packed"])
def test_a_long_recording_is_labelled_a_window_at_a_time(whisper_dir, tmp_path, monkeypatch, packed):
    """A 100-s recording: its reader never holds more than a window and a block (memory does not grow with
    the file), and the rows are those of reading the file in one block."""
    import hf_distill.speech.labelling.audio_thread as audio_thread
    from hf_distill.speech.audio_stream import WindowReader

    folder = tmp_path / "audio"
    folder.mkdir()
    x = pausing_signal(100.0)
    sf.write(folder / "long.flac", x, 16000)
    sf.write(folder / "short.wav", x[: 2 * 16000], 16000)
    readers = []

    def label(block: int, out: Path) -> dict:
        class RecordingReader(WindowReader):
            def __init__(self, item, sampling_rate, length, block_frames=block):
                super().__init__(item, sampling_rate, length, block_frames=block)
                readers.append((item.id, self))

        monkeypatch.setattr(audio_thread, "WindowReader", RecordingReader)
        pseudo_label(PseudoLabelConfig(input=str(folder), model=str(whisper_dir), output_dir=str(out), max_new_tokens=4,
                                       batch_size=2, progress=False, pack=packed))
        return {r["id"]: r for r in read_rows(out)}

    in_blocks = label(4096, tmp_path / "blocks")
    long_readers = [r for rid, r in readers if rid == "long.flac"]
    assert len(long_readers) == 1  # one pass over the file, from start to end
    assert 16000 * 20 < long_readers[0].max_held <= 30 * 16000 + 2 * 4096
    whole = label(10**9, tmp_path / "whole")  # the same file in one block
    assert max(r.max_held for rid, r in readers if rid == "long.flac") > 99 * 16000
    assert set(in_blocks) == set(whole) == {"long.flac", "short.wav"}
    assert in_blocks["long.flac"]["n_chunks"] >= 4
    for rid, row in in_blocks.items():
        assert (row["text"], row["token_ids"], row["n_chunks"]) == (
            whole[rid]["text"], whole[rid]["token_ids"], whole[rid]["n_chunks"])


def test_a_recording_that_fails_in_a_later_window_is_one_failure_and_the_rest_is_labelled(ctc_dir, tmp_path):
    """The audio thread finds the NaN in the third window; it hands the failure over with its batch."""
    folder = tmp_path / "audio"
    folder.mkdir()
    x = pausing_signal(70.0)
    x[50 * 16000] = np.nan
    sf.write(folder / "bad_late.wav", x, 16000, subtype="FLOAT")
    sf.write(folder / "good.wav", x[:32000], 16000, subtype="FLOAT")
    out = tmp_path / "out"
    result = pseudo_label(PseudoLabelConfig(input=str(folder), model=str(ctc_dir), output_dir=str(out), batch_size=1,
                                            progress=False))
    assert (result["rows"], result["failures"]) == (1, 1)
    assert [r["id"] for r in read_rows(out)] == ["good.wav"]
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert [(f["id"], f["reason"]) for f in failures] == [("bad_late.wav", "audio contains NaN or infinite samples")]


# ------------------------------------------------------------------------------------------------
# wrong input on the command line: one line, exit code 2, before the teacher is loaded


@pytest.fixture
def bad_paths(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty.csv").write_text("path,text\n")
    (tmp_path / "not_a_model").mkdir()
    (tmp_path / "not_a_model" / "README.md").write_text("notes, no model")
    (tmp_path / "a_file").write_text("x")
    write_clips(tmp_path / "clips", [1.0], bad=False)
    return tmp_path


@pytest.mark.parametrize("command", ["pseudo-label", "pseudo-label-packed"])
@pytest.mark.parametrize("case,expected", [
    ("missing input", r"input not found: .*missing_folder \(give an audio folder"),
    ("missing model", r"--model .*no_model does not exist; give the teacher's folder"),
    ("not a model", r"--model .*not_a_model is not a saved speech teacher: no config.json, no weights"),
    ("output is a file", r"--output-dir .*a_file is a file; give a folder"),
    ("empty folder", r"no audio files in .*empty \(looked, in every subfolder, for .*\.flac.*\.wav"),
    ("empty manifest", r"the manifest .*empty.csv has no rows"),
])
def test_wrong_paths_and_empty_inputs_fail_in_one_line_before_the_teacher_loads(
        whisper_dir, bad_paths, capsys, monkeypatch, command, case, expected):
    import re

    import hf_distill.speech.labelling.job as job

    def never(*args, **kwargs):
        raise AssertionError("the teacher was loaded before the input was checked")

    monkeypatch.setattr(job, "load_teacher", never)
    d = bad_paths
    source, model, out = str(d / "clips"), str(whisper_dir), str(d / "out")
    if case == "missing input":
        source = str(d / "missing_folder")
    elif case == "missing model":
        model = str(d / "no_model")
    elif case == "not a model":
        model = str(d / "not_a_model")
    elif case == "output is a file":
        out = str(d / "a_file")
    elif case == "empty folder":
        source = str(d / "empty")
    elif case == "empty manifest":
        source = str(d / "empty.csv")
    line = one_line_error(capsys, [command, source, "--model", model, "--output-dir", out, "--no-progress"])
    assert re.search(expected, line), line
    assert not (d / "out").exists()  # nothing written


@pytest.mark.parametrize("command", ["pseudo-label", "pseudo-label-packed"])
def test_a_run_where_every_file_failed_is_an_error(whisper_dir, tmp_path, capsys, command):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "a.wav").write_text("a text file, not audio")
    (folder / "b.flac").write_bytes(b"")
    out = tmp_path / "out"
    line = one_line_error(capsys, [command, str(folder), "--model", str(whisper_dir), "--output-dir", str(out),
                                   "--no-progress"])
    assert "every input file failed (2 of 2); nothing was labelled. First: " in line
    assert f"all reasons are in {out / 'failures.jsonl'}" in line
    assert len((out / "failures.jsonl").read_text().splitlines()) == 2  # the store says why


def test_missing_arguments_and_finalize_of_a_folder_that_is_no_store(tmp_path, capsys):
    line = one_line_error(capsys, ["pseudo-label", str(tmp_path), "--output-dir", str(tmp_path / "o")])
    assert line.endswith("INPUT and --model are required (unless --finalize)")
    line = one_line_error(capsys, ["pseudo-label", "--finalize", "--output-dir", str(tmp_path)])
    assert "is not a pseudo-label store (no manifest.json)" in line


@pytest.mark.slow
def test_peak_memory_of_a_one_hour_file_is_that_of_short_clips(tmp_path):
    """benchmarks/long_audio_memory.py in fresh processes: labelling one 1-hour file takes no more memory
    than labelling as many short clips as it has windows (before: +230 MiB for 1 hour, +640 MiB for 3)."""
    out = tmp_path / "memory.json"
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "long_audio_memory.py"), "--hours", "1", "--work_dir",
                    str(tmp_path / "work"), "--json_out", str(out)], check=True, stdout=subprocess.DEVNULL,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    report = json.loads(out.read_text())
    peaks = {(r["labeller"], r["input"].split(" ")[0]): r["peak_rss_mib"] for r in report["results"]}
    assert all(r["exit_code"] == 0 for r in report["results"])
    windows = str(report["windows"])
    for labeller in ("pseudo-label --no-pack", "pseudo-label --pack"):
        assert peaks[(labeller, "one")] <= peaks[(labeller, windows)] + 100, peaks
