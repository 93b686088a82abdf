"""Audio input: folder / manifest / dataset listing, decoding, downmix, resampling, failures, chunk plans."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import soundfile as sf

from hf_distill.speech.audio import (
    AudioError,
    AudioFailure,
    AudioItem,
    decode,
    list_audio,
    list_dataset,
    list_folder,
    list_manifest,
    probe,
    read_failures,
    resampled_length,
    write_failures,
)
from hf_distill.speech.windows import plan_chunks


def tone(seconds: float, sr: int, freq: float = 440.0, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(round(seconds * sr))) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def write(path, data, sr, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, data, sr, **kw)
    return path


def peak_hz(x: np.ndarray, sr: int) -> float:
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.argmax(spec) * sr / len(x))


def read_all(items, sr=16000):
    """Decode every item the way a job does: keep the good ones, record the failures."""
    good, failures = {}, []
    for it in items:
        try:
            probe(it)
            good[it.id] = decode(it, sr)
        except AudioError as exc:
            failures.append(AudioFailure(it.id, it.path, exc.reason))
    return good, failures


def make_bad_files(root):
    """Files that must be skipped, with the reason each one must give."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "empty.wav").write_bytes(b"")
    write(root / "zero_frames.wav", np.zeros(0, np.float32), 16000)
    (root / "not_audio.wav").write_text("this is a text file renamed to .wav\n" * 20)
    good = io.BytesIO()
    sf.write(good, tone(1.0, 16000), 16000, format="WAV")
    (root / "corrupt_header.wav").write_bytes(good.getvalue()[:30])
    ogg = io.BytesIO()
    sf.write(ogg, tone(1.0, 16000), 16000, format="OGG")
    (root / "truncated.ogg").write_bytes(ogg.getvalue()[: len(ogg.getvalue()) // 3])
    return {
        "empty.wav": "empty file (0 bytes)",
        "zero_frames.wav": "zero-length audio (0 frames)",
        "not_audio.wav": "not a readable audio file",
        "corrupt_header.wav": "not a readable audio file",
        "truncated.ogg": "not a readable audio file",
    }


def test_folder_listing_is_recursive_sorted_and_filters_extensions(tmp_path):
    write(tmp_path / "b.wav", tone(0.5, 16000), 16000)
    write(tmp_path / "a" / "x.flac", tone(0.5, 22050), 22050)
    write(tmp_path / "a" / "deep" / "y.ogg", tone(0.5, 8000), 8000)
    (tmp_path / "notes.txt").write_text("not listed")
    write(tmp_path / ".hidden.wav", tone(0.1, 16000), 16000)
    items = list_folder(tmp_path)
    assert [it.id for it in items] == ["a/deep/y.ogg", "a/x.flac", "b.wav"]
    assert all(it.reference is None and it.path.startswith(str(tmp_path)) for it in items)
    assert [it.id for it in list_audio(tmp_path)] == [it.id for it in items]  # dispatch
    good, failures = read_all(items)
    assert not failures
    assert {k: len(v) for k, v in good.items()} == {"a/deep/y.ogg": 8000, "a/x.flac": 8000, "b.wav": 8000}


@pytest.mark.parametrize("sr,seconds", [(44100, 1.0), (22050, 3.0), (8000, 0.5), (48000, 0.25713), (16000, 1.3)])
def test_resampling_gives_exact_length_and_keeps_pitch(tmp_path, sr, seconds):
    x = tone(seconds, sr, freq=440.0)
    path = write(tmp_path / "t.wav", x, sr, subtype="FLOAT")
    item = AudioItem(id="t.wav", path=str(path))
    info = probe(item)
    assert (info.frames, info.sampling_rate, info.channels) == (len(x), sr, 1)
    y = decode(item, 16000)
    assert y.dtype == np.float32 and y.ndim == 1
    assert len(y) == resampled_length(len(x), sr, 16000) == (len(x) * 16000 + sr // 2) // sr
    if sr == 44100:
        assert len(y) == 16000
    assert abs(peak_hz(y, 16000) - 440.0) < 16000 / len(y) + 1
    assert abs(float(np.sqrt(np.mean(y[200:-200] ** 2))) - 0.5 / np.sqrt(2)) < 0.01  # amplitude kept


def test_stereo_is_downmixed_to_the_channel_mean(tmp_path):
    left, right = tone(1.0, 16000, 300.0, 0.6), tone(1.0, 16000, 1000.0, 0.2)
    path = write(tmp_path / "st.wav", np.stack([left, right], axis=1), 16000, subtype="FLOAT")
    item = AudioItem(id="st.wav", path=str(path))
    assert probe(item).channels == 2
    np.testing.assert_allclose(decode(item, 16000), (left + right) / 2, atol=1e-6)
    # and through resampling: same as resampling the mean
    y8 = decode(item, 8000)
    assert len(y8) == 8000
    assert abs(peak_hz(y8, 8000) - 300.0) < 2


def test_corrupt_empty_and_non_audio_files_are_skipped_with_reasons(tmp_path):
    expected = make_bad_files(tmp_path)
    write(tmp_path / "good.wav", tone(1.0, 16000), 16000)
    items = list_folder(tmp_path)
    assert {it.id for it in items} == set(expected) | {"good.wav"}
    good, failures = read_all(items)
    assert list(good) == ["good.wav"] and len(good["good.wav"]) == 16000
    got = {f.id: f.reason for f in failures}
    assert set(got) == set(expected)
    for name, reason in expected.items():
        assert got[name].startswith(reason), (name, got[name])
    out = tmp_path / "failures.jsonl"
    write_failures(out, failures)
    assert read_failures(out) == failures
    assert all(set(json.loads(line)) == {"id", "path", "reason"} for line in out.read_text().splitlines())


@pytest.mark.parametrize("kind", ["csv", "jsonl", "tsv"])
def test_manifest_paths_relative_to_manifest_with_references(tmp_path, kind):
    audio = tmp_path / "data" / "clips"
    write(audio / "one.wav", tone(1.0, 16000), 16000)
    write(audio / "two.flac", tone(2.0, 8000), 8000)
    (audio / "three.wav").write_text("not audio")
    rows = [
        {"path": "clips/two.flac", "text": "second clip"},
        {"path": "clips/one.wav", "text": "first clip"},
        {"path": "clips/missing.wav", "text": "gone"},
        {"path": "clips/three.wav", "text": ""},
        {"path": "clips/one.wav", "text": "first clip again"},
    ]
    manifest = tmp_path / "data" / f"manifest.{kind}"
    if kind == "jsonl":
        manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        sep = "\t" if kind == "tsv" else ","
        manifest.write_text(f"path{sep}text\n" + "".join(f"{r['path']}{sep}{r['text']}\n" for r in rows))
    items = list_audio(manifest)
    assert [it.id for it in items] == [
        "clips/missing.wav",
        "clips/one.wav",
        "clips/one.wav#1",
        "clips/three.wav",
        "clips/two.flac",
    ]
    refs = {it.id: it.reference for it in items}
    assert refs["clips/one.wav"] == "first clip" and refs["clips/one.wav#1"] == "first clip again"
    assert refs["clips/two.flac"] == "second clip"
    good, failures = read_all(items)
    assert sorted(good) == ["clips/one.wav", "clips/one.wav#1", "clips/two.flac"]
    assert len(good["clips/two.flac"]) == 32000
    reasons = {f.id: f.reason for f in failures}
    assert reasons["clips/missing.wav"] == "file not found"
    assert reasons["clips/three.wav"].startswith("not a readable audio file")
    assert all(it.reference is None for it in list_manifest(manifest, text_column=""))
    with pytest.raises(ValueError, match="path column 'file'"):
        list_manifest(manifest, path_column="file")


def test_dataset_on_disk_and_in_memory_with_bytes_and_paths(tmp_path):
    import datasets

    buf = io.BytesIO()
    sf.write(buf, np.stack([tone(0.5, 8000), tone(0.5, 8000)], 1), 8000, format="FLAC")
    path = write(tmp_path / "files" / "p.wav", tone(1.5, 16000), 16000)
    ds = datasets.Dataset.from_dict(
        {
            "audio": [
                {"bytes": buf.getvalue(), "path": None},
                {"bytes": None, "path": str(path)},
                {"bytes": b"RIFF....garbage", "path": None},
            ],
            "sentence": ["from bytes", "from a path", None],
        }
    ).cast_column("audio", datasets.Audio())
    ds.save_to_disk(tmp_path / "saved")
    for source in (tmp_path / "saved", ds, datasets.DatasetDict({"train": ds})):
        items = list_audio(source) if not isinstance(source, datasets.Dataset) else list_dataset(source)
        assert [it.id for it in items] == ["0", "1", "2"]
        assert [it.reference for it in items] == ["from bytes", "from a path", None]
        good, failures = read_all(items)
        assert {k: len(v) for k, v in good.items()} == {"0": 8000, "1": 24000}
        assert [(f.id, f.reason.split(":")[0]) for f in failures] == [("2", "not a readable audio file")]


def test_chunk_plans_tile_the_recording():
    for n, chunk, overlap, hop in [
        (100, 100, 20, 1),
        (101, 100, 20, 1),
        (1_000_000, 480_000, 96_000, 1),
        (650_000, 480_000, 96_000, 1),
        (1_040_000, 480_000, 96_000, 320),
        (480_321, 480_000, 64_000, 320),
        (33_333, 10_000, 3_000, 7),
    ]:
        chunks = plan_chunks(n, chunk, overlap, hop)
        assert chunks[0].start == 0 and chunks[-1].end == n
        assert chunks[0].keep_start == 0 and chunks[-1].keep_end == n
        for c in chunks:
            assert 0 < c.end - c.start <= chunk
            assert c.start % hop == 0 and c.keep_start % hop == 0
            assert c.start <= c.keep_start <= c.keep_end <= c.end
        for a, b in zip(chunks, chunks[1:]):
            assert a.keep_end == b.keep_start  # owned ranges tile [0, n)
            assert a.end - b.start >= min(overlap, n - chunk) - hop  # windows overlap
    assert len(plan_chunks(480_000, 480_000, 96_000)) == 1
    with pytest.raises(ValueError):
        plan_chunks(1000, 100, 100)


# --------------------------------------------------------------------------------------------------
# long recordings read in blocks


def write_in_blocks(path, data, sr, **kw):
    """Write a file block by block (libsndfile's Vorbis encoder crashes on one large write)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    channels = 1 if data.ndim == 1 else data.shape[1]
    with sf.SoundFile(path, "w", sr, channels, **kw) as f:
        for i in range(0, len(data), 8192):
            f.write(data[i : i + 8192])
    return path


def speech_like(seconds: float, sr: int, channels: int = 1, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = int(round(seconds * sr))
    x = tone(seconds, sr, 220.0, 0.3)[:n] * (0.6 + 0.4 * np.sin(2 * np.pi * 0.7 * np.arange(n) / sr))
    x = (x + 0.03 * rng.standard_normal(n)).astype(np.float32)
    return x if channels == 1 else np.stack([x, 0.5 * x], axis=1)


@pytest.mark.parametrize("sr,channels,fmt,subtype", [
    (16000, 1, "WAV", "PCM_16"),   # the teacher's rate: no resampling
    (44100, 2, "FLAC", "PCM_24"),  # downmix and resampling
    (8000, 1, "WAV", "FLOAT"),     # upsampling
    (48000, 1, "OGG", "VORBIS"),   # lossy, decoded in pieces
])
def test_a_long_file_read_in_blocks_gives_the_samples_of_reading_it_whole(tmp_path, sr, channels, fmt, subtype):
    from hf_distill.speech.audio import decode_with_rate
    from hf_distill.speech.audio_stream import WindowReader, frame_energies, frame_energy, iter_blocks

    path = write_in_blocks(tmp_path / f"long.{fmt.lower()}", speech_like(23.3, sr, channels), sr, format=fmt,
                           subtype=subtype)
    item = AudioItem(id=path.name, path=str(path))
    info = probe(item)
    length = resampled_length(info.frames, info.sampling_rate, 16000)
    whole, _ = decode_with_rate(item, 16000)
    whole = whole[:length] if len(whole) >= length else np.pad(whole, (0, length - len(whole)))
    block = 5003  # frames of the file per read: many blocks, none aligned with the windows
    blocks = list(iter_blocks(item, 16000, length, block_frames=block))
    assert len(blocks) > 20 and sum(len(b) for b in blocks) == length
    np.testing.assert_array_equal(np.concatenate(blocks), whole)  # the same samples, not just close
    # windows of 4 s overlapping by 1 s, in order: each the slice of the whole recording
    window = 4 * 16000
    reader = WindowReader(item, 16000, length, block_frames=block)
    chunks = plan_chunks(length, window, 16000)
    assert len(chunks) >= 7
    for c in chunks:
        np.testing.assert_array_equal(reader.read(c.start, c.end), whole[c.start : c.end])
    # it never held more than a window and about one block (at the teacher's rate; soxr hands out up to a
    # block and its latency at once), whatever the length
    resampled_block = resampled_length(block, sr, 16000)
    assert window < reader.max_held <= window + 2 * resampled_block, reader.max_held
    assert reader.max_held < length / 4
    with pytest.raises(ValueError, match="in order of their start"):
        reader.read(0, 100)
    reader.close()
    # the frame energies that cutting at pauses needs: the same values from blocks as from the whole
    np.testing.assert_array_equal(frame_energies(item, 16000, length, 320, block_frames=block),
                                  frame_energy(whole, 320))


def test_a_length_beyond_the_decoded_audio_is_zero_padded_and_nan_fails_in_its_block(tmp_path):
    from hf_distill.speech.audio_stream import WindowReader, iter_blocks

    x = speech_like(3.0, 16000)
    path = write(tmp_path / "short.wav", x, 16000, subtype="FLOAT")
    item = AudioItem(id="short.wav", path=str(path))
    got = np.concatenate(list(iter_blocks(item, 16000, len(x) + 100, block_frames=4096)))
    np.testing.assert_array_equal(got, np.concatenate([x, np.zeros(100, np.float32)]))
    np.testing.assert_array_equal(np.concatenate(list(iter_blocks(item, 16000, 1000))), x[:1000])
    x[40000] = np.nan
    write(tmp_path / "nan.wav", x, 16000, subtype="FLOAT")
    reader = WindowReader(AudioItem(id="nan.wav", path=str(tmp_path / "nan.wav")), 16000, len(x), block_frames=4096)
    np.testing.assert_array_equal(reader.read(0, 16000), x[:16000])  # the blocks before the bad one read
    with pytest.raises(AudioError, match="NaN or infinite"):
        reader.read(16000, 48000)


def test_mp3_is_read_in_one_block(tmp_path):
    """libsndfile decodes a wrong signal when an MP3 file is read in pieces, so MP3 is read whole."""
    from hf_distill.speech.audio_stream import WindowReader

    path = write_in_blocks(tmp_path / "a.mp3", speech_like(12.0, 16000), 16000, format="MP3")
    item = AudioItem(id="a.mp3", path=str(path))
    length = probe(item).frames
    whole = decode(item, 16000)[:length]
    reader = WindowReader(item, 16000, length, block_frames=4096)
    np.testing.assert_allclose(reader.read(16000, 80000), whole[16000:80000], atol=1e-6)
    assert reader.max_held == length - 16000  # everything from the window's start on: one block
