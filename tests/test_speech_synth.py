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
    with pytest.raises(SystemExit) as exc:
        cli(["synthesize", str(tmp_path / "bad"), "--sentences", "0"])
    assert exc.value.code == 2


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
