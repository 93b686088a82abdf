"""benchmarks/pseudo_label_throughput.py: how it compares systems, its defaults, and faster-whisper (optional)."""

from __future__ import annotations

import builtins
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import pseudo_label_throughput as bench
from speech_assets import harvard_clips, tiny_en_ct2_dir


def systems(**speeds_and_wers):
    return {name: {"audio_seconds_per_second": s, "wer": w} for name, (s, w) in speeds_and_wers.items()}


def test_ratio_is_against_the_fastest_system_and_checks_its_wer():
    results = systems(hf_distill=(30.0, 0.05), fw_int8=(12.0, 0.06), fw_float32=(10.0, 0.04))
    ratio, against, wer_ok = bench.ratio_against(results, "hf_distill", ["fw_int8", "fw_float32"])
    assert against == "fw_int8" and ratio == pytest.approx(2.5) and wer_ok  # 0.05 <= 0.06
    ratio, against, wer_ok = bench.ratio_against(results, "hf_distill", ["fw_float32"])
    assert against == "fw_float32" and ratio == pytest.approx(3.0) and not wer_ok  # 0.05 > 0.04
    equal = systems(hf_distill=(20.0, 0.0575), pipeline=(5.0, 0.0575))
    assert bench.ratio_against(equal, "hf_distill", ["pipeline"]) == (pytest.approx(4.0), "pipeline", True)


def test_without_faster_whisper_the_other_systems_still_run_and_it_says_how_to_install(monkeypatch):
    real_import = builtins.__import__

    def no_faster_whisper(name, *args, **kwargs):
        if name.split(".")[0] == "faster_whisper":
            raise ImportError("No module named 'faster_whisper'")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "faster_whisper", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_faster_whisper)
    assert bench.import_systems(True) is False
    assert "hf_distill.speech.labelling" in sys.modules and "transformers.pipelines" in sys.modules
    assert "pip install faster-whisper" in bench.FASTER_WHISPER_MISSING
    assert bench.import_systems(False) is False  # left out on purpose: not even tried


def test_defaults_are_the_measured_command(monkeypatch):
    args = bench.parse_args([])
    assert (args.batch_size, args.num_files, args.threads, args.device) == (16, 20, 1, "cpu")
    assert args.encoder_dtype == "auto" and args.draft_model is None and not args.skip_faster_whisper
    # auto: bfloat16 where the hardware computes in bf16 (a GPU, a CPU with AVX512-BF16 / AMX), else float32
    import torch

    assert bench.auto_encoder_dtype("cuda:0") == "bfloat16"
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    assert bench.auto_encoder_dtype("cpu") == "bfloat16"
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    assert bench.auto_encoder_dtype("cpu") == "float32"
    # the labeller's --encoder-dtype auto: resolved when configured, so the store's settings hold the real dtype
    from hf_distill.speech.labelling import PseudoLabelConfig

    config = PseudoLabelConfig(input="x", model="m", output_dir="o", device="cpu", encoder_dtype="auto")
    assert config.encoder_dtype == "float32"
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    assert PseudoLabelConfig(input="x", model="m", output_dir="o", device="cpu",
                             encoder_dtype="auto").encoder_dtype == "bfloat16"


def test_log_spaced_file_lengths():
    lengths = bench.log_spaced(3, 1.0, 100.0)
    assert lengths == pytest.approx([1.0, 10.0, 100.0])
    assert bench.log_spaced(1, 2.0, 60.0) == [2.0]


@pytest.mark.slow
def test_faster_whisper_system_transcribes_harvard_sentences():
    from hf_distill.speech.text_normalizer import wer

    clips = harvard_clips(4)  # faster-whisper: installed by the bench extra
    rows = [{"path": str(p), "text": t} for p, t in clips]
    for compute_type in ("int8", "float32"):
        seconds, hyps = bench.run_faster_whisper(str(tiny_en_ct2_dir()), "cpu", rows, 4, compute_type, 1)
        assert seconds > 0 and len(hyps) == 4
        assert wer([t for _, t in clips], hyps) <= 0.15
