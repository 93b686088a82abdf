"""``hf-distill synthesize``: WAV files and a manifest that the labellers read, text for text.

The tests that run festival or flite are marked ``synth`` (``python -m pytest -q -m synth``, after
``apt-get install festival festvox-us-slt-hts flite``); the default run needs neither."""

from __future__ import annotations

import csv

import pytest
import soundfile as sf

from hf_distill.cli import main as cli
from hf_distill.speech.audio import list_audio
from hf_distill.speech.synth import harvard_sentences


@pytest.mark.synth
def test_synthesize_writes_wavs_and_a_manifest_the_labellers_read(tmp_path):
    out = tmp_path / "speech"
    assert cli(["synthesize", str(out), "--sentences", "2", "--engine", "flite"]) == 0
    with open(out / "manifest.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["text"] for r in rows] == harvard_sentences(2)
    for r in rows:
        audio, rate = sf.read(out / r["path"])
        assert rate == 16000 and audio.ndim == 1 and len(audio) > 8000 and abs(audio).max() > 0.01
    items = list_audio(str(out / "manifest.csv"))
    assert [it.reference for it in items] == harvard_sentences(2)
    lines = tmp_path / "lines.txt"
    lines.write_text("Hello world.\n\nGood morning.\n")
    assert cli(["synthesize", str(tmp_path / "own"), "--text-file", str(lines), "--engine", "flite"]) == 0
    assert len(list((tmp_path / "own").glob("*.wav"))) == 2


@pytest.mark.synth
def test_festival_still_speaks_the_committed_clips(tmp_path):
    """The committed test speech is what festival gives today, sample for sample (FLAC is lossless)."""
    import numpy as np
    from speech_assets import harvard_clips, write_committed_clips

    fresh = write_committed_clips(tmp_path / "clips", n=3)
    with open(fresh / "manifest.csv") as f:
        made = [(fresh / r["path"], r["text"]) for r in csv.DictReader(f)]
    committed = harvard_clips(3)
    assert [t for _, t in made] == [t for _, t in committed] == harvard_sentences(3)
    for (new, _), (old, _) in zip(made, committed):
        assert new.name == old.name
        np.testing.assert_array_equal(sf.read(new, dtype="int16")[0], sf.read(old, dtype="int16")[0])


# wrong input: one line, exit code 2, before the synthesizer runs (none of these needs festival or flite)


@pytest.mark.parametrize("case,expected", [
    ("missing text file", r"--text-file .*nowhere.txt not found; give a text file with one sentence per line"),
    ("text file is a folder", r"--text-file .* is a folder; give a text file"),
    ("blank text file", r"--text-file .*blank.txt has no sentences \(every line is empty\)"),
    ("output is a file", r"OUTPUT_DIR .*a_file is a file; give a folder \(it is created if missing\)"),
    ("output under a file", r"OUTPUT_DIR .*a_file/speech cannot be created: .*a_file is a file, not a folder"),
    ("no sentences", r"--sentences must be between 1 and 40, got 0"),
    ("engine missing", r"flite is not installed \(install it with: apt-get install flite\)"),
])
def test_synthesize_wrong_input_is_one_line_before_synthesis(tmp_path, capsys, monkeypatch, case, expected):
    import re

    from speech_assets import one_line_error

    from hf_distill.speech import synth

    def no_synthesis(*args, **kwargs):
        raise AssertionError("the synthesizer ran before the input was checked")

    if case == "engine missing":  # whatever this machine has installed
        monkeypatch.setattr(synth.shutil, "which", lambda program: None)
    else:
        monkeypatch.setattr(synth, "_synthesize_one", no_synthesis)
    (tmp_path / "blank.txt").write_text("\n   \n\n")
    (tmp_path / "a_file").write_text("x")
    out = str(tmp_path / "speech")
    args = {
        "missing text file": [out, "--text-file", str(tmp_path / "nowhere.txt")],
        "text file is a folder": [out, "--text-file", str(tmp_path)],
        "blank text file": [out, "--text-file", str(tmp_path / "blank.txt")],
        "output is a file": [str(tmp_path / "a_file"), "--sentences", "2"],
        "output under a file": [str(tmp_path / "a_file" / "speech"), "--sentences", "2"],
        "no sentences": [out, "--sentences", "0"],
        "engine missing": [out, "--sentences", "2", "--engine", "flite"],
    }[case]
    line = one_line_error(capsys, ["synthesize", *args])
    assert re.search(expected, line), line
    assert not (tmp_path / "speech").exists()
