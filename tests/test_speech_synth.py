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


# voice variants: one flite voice at another speaking rate and pitch, a further training speaker


def test_split_voice_reads_flite_rate_and_pitch_options():
    from hf_distill.speech.synth import split_voice

    assert split_voice("flite", "awb") == ("awb", {})
    assert split_voice("flite", "awb+stretch=1.15+f0=95") == ("awb", {"duration_stretch": 1.15,
                                                                       "int_f0_target_mean": 95.0})
    assert split_voice("flite", "slt+f0sd=30") == ("slt", {"int_f0_target_stddev": 30.0})
    for voice, expected in [("awb+speed=2", r"unknown option 'speed'; write one of stretch=<number>, f0=<number>"),
                            ("awb+stretch=fast", r"stretch must be a positive number, got 'fast'"),
                            ("awb+f0=-5", r"f0 must be a positive number, got '-5'"),
                            ("awb+f0=inf", r"f0 must be a positive number"),
                            ("+f0=100", r"has no name before its options")]:
        with pytest.raises(ValueError, match=expected):
            split_voice("flite", voice)
    with pytest.raises(ValueError, match=r"only flite voices take options"):
        split_voice("festival", "cmu_us_slt_arctic_hts+f0=100")


def test_a_flite_variant_becomes_setf_features_on_the_command_line(tmp_path, monkeypatch):
    import subprocess

    from hf_distill.speech import synth

    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        out = cmd[cmd.index("-o") + 1]
        sf.write(out, [0.1] * 1600, 16000, subtype="PCM_16")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(synth.shutil, "which", lambda program: "/bin/" + program)
    monkeypatch.setattr(synth.subprocess, "run", fake_run)
    synth.synthesize(["Hello there."], tmp_path, engine="flite", voice="awb+stretch=1.15+f0=95")
    assert calls == [["flite", "-voice", "awb", "--setf", "duration_stretch=1.15", "--setf",
                      "int_f0_target_mean=95", "-t", "Hello there.", "-o", str(tmp_path / "utt0000.wav")]]
    with pytest.raises(ValueError, match="unknown option 'pitch'"):
        synth.synthesize(["Hello there."], tmp_path, engine="flite", voice="awb+pitch=95")
    assert len(calls) == 1


def test_parse_voices_checks_variants_and_a_held_out_voice_has_no_trained_variant(tmp_path):
    from hf_distill.speech.corpus import bbc_spoken_corpus, parse_voices

    assert parse_voices("flite:awb, flite:awb+stretch=1.2+f0=90") == [("flite", "awb"),
                                                                       ("flite", "awb+stretch=1.2+f0=90")]
    with pytest.raises(ValueError, match="unknown option 'rate'"):
        parse_voices("flite:awb+rate=2")
    with pytest.raises(ValueError, match=r"held-out voices \['flite:rms'\] are also training voices \(counting their "
                                         r"rate and pitch variants\)"):
        bbc_spoken_corpus(tmp_path, train_sentences=4, voices=parse_voices("flite:awb,flite:rms+f0=150"),
                          eval_sentences=2, eval_voices=parse_voices("flite:rms"))
    assert not any(tmp_path.iterdir())


@pytest.mark.synth
def test_a_flite_variant_speaks_slower_and_lower(tmp_path):
    import numpy as np

    from hf_distill.speech.synth import synthesize

    text = ["The committee will publish its report on the railway next week."]
    (plain, _), = synthesize(text, tmp_path / "a", engine="flite", voice="awb", sampling_rate=16000)
    (slow, _), = synthesize(text, tmp_path / "b", engine="flite", voice="awb+stretch=1.3", sampling_rate=16000)
    a, b = sf.read(plain)[0], sf.read(slow)[0]
    assert 1.2 < len(b) / len(a) < 1.4

    def mean_pitch(x, rate=16000):  # autocorrelation peak over 60..400 Hz, voiced 40 ms frames
        lags = np.arange(rate // 400, rate // 60)
        pitches = []
        for start in range(0, len(x) - 640, 640):
            frame = x[start:start + 640] - x[start:start + 640].mean()
            if np.sqrt((frame ** 2).mean()) < 0.02:
                continue
            ac = np.array([np.dot(frame[:-lag], frame[lag:]) for lag in lags])
            pitches.append(rate / lags[ac.argmax()])
        return float(np.median(pitches))

    (low, _), = synthesize(text, tmp_path / "c", engine="flite", voice="awb+f0=80", sampling_rate=16000)
    assert mean_pitch(sf.read(low)[0]) < 0.85 * mean_pitch(a)
