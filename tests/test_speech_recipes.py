"""Speech recipes end to end (Distil-Whisper, CTC soft targets), their training helpers, and packed labelling.

Fast tests use tiny random models and synthetic audio; the ``slow`` ones use the converted Whisper tiny.en
and synthesized speech.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import WhisperForConditionalGeneration

from hf_distill.speech.greedy_decoding import GreedyWhisperDecoder
from hf_distill.speech.labelling import PseudoLabelConfig, load_pseudo_labels, pseudo_label
from hf_distill.speech.labelling.cli import packed_cli_main
from hf_distill.speech.labelling.packing import (
    Segment,
    assign_segments,
    pack_units,
    parse_timestamped,
    split_at_pauses,
    uncovered_seconds,
    voiced_frames,
)
from hf_distill.speech.training import (
    IGNORE_INDEX,
    WhisperDistillationCollator,
    WhisperDistillationTrainer,
    WhisperPseudoLabelDataset,
    can_share_encoder,
    held_out_ids,
)
from speech_assets import harvard_clips, tiny_en_teacher  # noqa: F401  (session fixtures)
from test_pseudo_label import build_tiny_ctc, whisper_dir, write_clips  # noqa: F401 - whisper_dir: a fixture

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "recipes"))

import ctc_soft_targets  # noqa: E402
import distil_whisper  # noqa: E402

TRAIN_FLAGS = ["--per_device_train_batch_size", "4", "--save_strategy", "no", "--report_to", "none",
               "--use_cpu", "true", "--disable_tqdm", "true", "--seed", "0"]


# ------------------------------------------------------------------------------------------------ fixtures
def build_layer_sensitive_ctc(path: Path, layers: int = 3) -> Path:
    """A random tiny Wav2Vec2ForCTC whose layers matter: initialised with a large range so that dropping
    layers changes its posteriors; no dropout, no masking."""
    return build_tiny_ctc(path, layers, initializer_range=0.2, hidden_dropout=0.0, attention_dropout=0.0,
                          activation_dropout=0.0, feat_proj_dropout=0.0, final_dropout=0.0, layerdrop=0.0,
                          mask_time_prob=0.0)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    return write_clips(tmp_path_factory.mktemp("clips"), [1.0, 2.0, 1.5, 3.0, 0.8, 2.5, 1.2, 2.2], bad=False)


@pytest.fixture(scope="module")
def eval_manifest(clips, tmp_path_factory):
    path = tmp_path_factory.mktemp("eval") / "eval.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "text"])
        for p in sorted(clips.rglob("*.*"))[:3]:
            writer.writerow([str(p), "the cat sat on the mat"])
    return path


# ------------------------------------------------------------------------------------------------ Whisper data
def test_whisper_example_aligns_labels_decoder_inputs_and_soft_labels():
    from transformers import WhisperFeatureExtractor

    ds = WhisperPseudoLabelDataset([], WhisperFeatureExtractor(feature_size=80), soft_labels=True)
    k = 3
    row = {"id": "a", "prompt_ids": [50, 51, 52], "token_ids": [7, 8, 9, 2],
           "topk_indices": [[7, 1, 2], [8, 1, 2], [9, 1, 2], [2, 1, 0]],
           "topk_probs": [[0.5, 0.25, 0.0], [0.9, 0.05, 0.01], [0.6, 0.2, 0.1], [0.99, 0.0, 0.0]],
           "topk_tail": [0.25, 0.04, 0.1, 0.01]}
    ex = ds.example(row)
    # teacher forcing: the prompt, then the tokens but the last; labels: -100 under the prompt, then the tokens
    assert ex["decoder_input_ids"] == [50, 51, 52, 7, 8, 9]
    assert ex["labels"] == [IGNORE_INDEX, IGNORE_INDEX, 7, 8, 9, 2]
    # the soft labels of token j sit at the label position of token j
    assert ex["teacher_topk_indices"].shape == (6, k)
    assert ex["teacher_topk_indices"][2:].tolist() == row["topk_indices"]
    np.testing.assert_allclose(np.exp(ex["teacher_topk_logprobs"][3]), row["topk_probs"][1], rtol=1e-6)
    assert np.isneginf(ex["teacher_topk_logprobs"][2, 2])  # a zero probability stays exactly zero
    np.testing.assert_allclose(ex["teacher_tail_mass"][2:], row["topk_tail"], rtol=1e-6)

    short = ds.example({**row, "token_ids": [7, 2], "topk_indices": row["topk_indices"][:2],
                        "topk_probs": row["topk_probs"][:2], "topk_tail": row["topk_tail"][:2]})
    feats = np.zeros((80, 3000), np.float32)
    batch = WhisperDistillationCollator(pad_token_id=0)([{"input_features": feats, **ex},
                                                        {"input_features": feats, **short}])
    assert batch["decoder_input_ids"].tolist()[1] == [50, 51, 52, 7, 0, 0]
    assert batch["labels"].tolist()[1] == [IGNORE_INDEX, IGNORE_INDEX, 7, 2, IGNORE_INDEX, IGNORE_INDEX]
    assert batch["teacher_topk_logprobs"].shape == (2, 6, k)
    valid = batch["labels"] != IGNORE_INDEX
    assert torch.isfinite(batch["teacher_topk_logprobs"][~valid]).all()  # placeholders the loss masks out


def test_held_out_ids_are_deterministic_and_leave_training_rows():
    from hf_distill.speech.audio import AudioItem

    items = [AudioItem(id=f"u{i}", path=f"u{i}.wav", reference="x" if i % 2 else None) for i in range(20)]
    a = held_out_ids(items, 0.3, seed=1)
    assert a == held_out_ids(list(reversed(items)), 0.3, seed=1)
    assert len(a) == 3 and all(int(i[1:]) % 2 for i in a)  # only referenced items, 30% of 10
    assert len(held_out_ids(items, 100, require_reference=False)) == 19


# ------------------------------------------------------------------------------------------------ shared encoder
def _tiny_pair(freeze: bool):
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    from hf_distill.students import build_whisper_student

    torch.manual_seed(0)
    config = WhisperConfig(vocab_size=60, d_model=32, encoder_layers=2, decoder_layers=3, encoder_attention_heads=2,
                           decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=8,
                           max_source_positions=20, max_target_positions=32, pad_token_id=0, bos_token_id=1,
                           eos_token_id=2, decoder_start_token_id=1, dropout=0.0, attention_dropout=0.0)
    teacher = WhisperForConditionalGeneration(config).eval()
    student = build_whisper_student(teacher, 1, freeze_encoder=freeze)
    return teacher, student


def test_teacher_reuses_the_frozen_student_encoder_exactly(tmp_path):
    from hf_distill import DistillationArguments, DistillationTrainer

    teacher, student = _tiny_pair(freeze=True)
    assert can_share_encoder(student, teacher) == (True, "")
    args = DistillationArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, disable_tqdm=True,
                                 save_strategy="no", cos_weight=0.0, kd_weight=1.0, task_weight=0.8, temperature=2.0)
    shared = WhisperDistillationTrainer(model=student, teacher=teacher, args=args)
    plain = DistillationTrainer(model=student, teacher=teacher, args=args)
    assert shared.encoder_shared
    calls = []
    hook = teacher.get_encoder().register_forward_hook(lambda *a: calls.append(1))
    batch = {"input_features": torch.randn(3, 8, 40), "decoder_input_ids": torch.tensor([[1, 5, 6, 7]] * 3),
             "labels": torch.tensor([[5, 6, 7, 2], [8, 9, 2, -100], [10, 2, -100, -100]])}
    student.eval()
    loss_shared = shared.compute_loss(student, dict(batch))
    assert calls == []  # the teacher's encoder did not run
    loss_plain = plain.compute_loss(student, dict(batch))
    assert calls == [1]
    hook.remove()
    torch.testing.assert_close(loss_shared, loss_plain, rtol=1e-6, atol=1e-7)

    teacher2, trained_encoder = _tiny_pair(freeze=False)
    ok, reason = can_share_encoder(trained_encoder, teacher2)
    assert not ok and "trained" in reason
    with pytest.raises(ValueError, match="cannot share"):
        WhisperDistillationTrainer(model=trained_encoder, teacher=teacher2, args=args, share_encoder=True)
    assert not WhisperDistillationTrainer(model=trained_encoder, teacher=teacher2, args=args).encoder_shared


# ------------------------------------------------------------------------------------------------ recipes
def _losses(results) -> list[float]:
    history = results["loss"]["history"] if isinstance(results["loss"], dict) else results["loss"]
    return [h["loss"] for h in history]


def _check_whisper_run(out: Path, results: dict):
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    losses = _losses(results)
    assert len(losses) >= 4 and losses[-1] < losses[0]
    saved = json.loads((out / "results.json").read_text())
    for name in ("teacher", "student"):
        assert np.isfinite(saved["eval"][name]["wer"]) and saved["eval"][name]["n"] == 3
    student = WhisperForConditionalGeneration.from_pretrained(out / "student")
    assert student.config.decoder_layers == 1 and student.config.encoder_layers == 1
    WhisperProcessor.from_pretrained(out / "student")
    card = (out / "student" / "README.md").read_text()
    assert "automatic-speech-recognition" in card and "held-out WER, student" in card
    return saved


def test_distil_whisper_on_stored_soft_labels(whisper_dir, clips, eval_manifest, tmp_path):
    out = tmp_path / "run"
    results = distil_whisper.main([
        "--teacher", str(whisper_dir), "--audio", str(clips), "--eval_audio", str(eval_manifest),
        "--output_dir", str(out), "--soft_labels", "stored", "--top_k", "4", "--num_decoder_layers", "1",
        "--keep_only", "false", "--max_steps", "12", "--learning_rate", "3e-3", "--logging_steps", "2",
        "--label_batch_size", "8", *TRAIN_FLAGS])
    saved = _check_whisper_run(out, results)
    assert saved["distillation"]["soft_labels"] == "stored" and saved["distillation"]["top_k"] == 4
    assert all("loss_topk_kl" in h for h in saved["loss"]["history"])
    store = load_pseudo_labels(out / "pseudo_labels")
    assert store[0]["topk_tail"] is not None and len(store[0]["topk_tail"]) == len(store[0]["token_ids"])
    assert json.loads((out / "pseudo_labels" / "manifest.json").read_text())["soft_labels"]["temperature"] == 2.0
    assert saved["rows"]["training_rows"] == 8  # eval audio given separately: nothing held out


def test_distil_whisper_live_teacher_with_a_shared_frozen_encoder(whisper_dir, clips, eval_manifest, tmp_path):
    out = tmp_path / "run"
    results = distil_whisper.main([
        "--teacher", str(whisper_dir), "--audio", str(clips), "--eval_audio", str(eval_manifest),
        "--output_dir", str(out), "--soft_labels", "live", "--freeze_encoder", "true", "--num_decoder_layers", "1",
        "--keep_only", "false", "--max_steps", "12", "--learning_rate", "3e-3", "--logging_steps", "2",
        "--labeller", "packed", "--freeze_embeddings", "true", *TRAIN_FLAGS])
    saved = _check_whisper_run(out, results)
    assert saved["distillation"]["encoder_shared"] is True and saved["student"]["embeddings_frozen"] is True
    teacher = WhisperForConditionalGeneration.from_pretrained(whisper_dir)
    student = WhisperForConditionalGeneration.from_pretrained(out / "student")
    for name in ("embed_tokens", "embed_positions"):  # frozen: still the teacher's after 12 steps
        assert torch.equal(getattr(student.model.decoder, name).weight, getattr(teacher.model.decoder, name).weight)
    trained = student.model.decoder.layers[0].fc1.weight  # trained: no longer any teacher layer's
    assert not any(torch.equal(trained, layer.fc1.weight) for layer in teacher.model.decoder.layers)
    assert all("loss_kd" in h and "loss_ce" in h for h in saved["loss"]["history"])
    assert "packing" in saved["pseudo_labels"]["summary"]


def test_ctc_soft_targets_reduce_the_held_out_kl(clips, tmp_path):
    from transformers import AutoModelForCTC, AutoProcessor

    teacher = build_layer_sensitive_ctc(tmp_path / "ctc_teacher", layers=3)
    more = write_clips(tmp_path / "more", [1.7, 1.1, 2.8, 0.9], seed=3, bad=False)
    audio = tmp_path / "audio"
    audio.mkdir()
    for i, p in enumerate(sorted(list(clips.rglob("*.*")) + list(more.rglob("*.*")))):
        (audio / f"c{i:02d}{p.suffix}").write_bytes(p.read_bytes())
    out = tmp_path / "run"
    results = ctc_soft_targets.main([
        "--teacher", str(teacher), "--audio", str(audio), "--output_dir", str(out), "--top_k", "4",
        "--keep_only", "false", "--num_layers", "1", "--eval_size", "3", "--temperature", "1.0",
        "--max_steps", "40", "--learning_rate", "3e-3", "--logging_steps", "10", *TRAIN_FLAGS])
    ev = results["eval"]
    assert ev["rows"] == 3 and results["rows"]["training_rows"] == 9 and results["rows"]["frame_count_mismatch"] == 0
    assert ev["after"]["kl"] < 0.5 * ev["before"]["kl"]
    assert all("loss_topk_kl" in h and "loss_ctc" not in h for h in results["loss"])
    student = AutoModelForCTC.from_pretrained(out / "student")
    assert student.config.num_hidden_layers == 1
    AutoProcessor.from_pretrained(out / "student")
    saved = json.loads((out / "results.json").read_text())
    assert saved["eval"]["after"]["kl"] == pytest.approx(ev["after"]["kl"])
    assert "held-out soft-target KL, after" in (out / "student" / "README.md").read_text()

    # the same store again, now with the CTC loss on the pseudo-transcripts as well
    again = ctc_soft_targets.main([
        "--teacher", str(teacher), "--pseudo_labels", str(out / "pseudo_labels"), "--output_dir",
        str(tmp_path / "run2"), "--keep_only", "false", "--num_layers", "1", "--eval_size", "3",
        "--temperature", "1.0", "--ctc_weight", "0.5", "--max_steps", "4", "--logging_steps", "2", *TRAIN_FLAGS])
    assert all(h["loss_ctc"] > 0 and "loss_topk_kl" in h for h in again["loss"])

    # a LoRA student on the same store: adapters saved, merged into a plain CTC model
    ctc_soft_targets.main([
        "--teacher", str(teacher), "--pseudo_labels", str(out / "pseudo_labels"), "--output_dir",
        str(tmp_path / "run3"), "--keep_only", "false", "--num_layers", "1", "--eval_size", "3",
        "--temperature", "1.0", "--max_steps", "2", "--use_peft", "true", "--lora_r", "2", *TRAIN_FLAGS])
    assert (tmp_path / "run3" / "student" / "adapter" / "adapter_model.safetensors").exists()
    merged = AutoModelForCTC.from_pretrained(tmp_path / "run3" / "student")
    assert not any("lora" in name for name in merged.state_dict())
    assert again["rows"]["training_rows"] == 9 and "shards_computed" not in again["pseudo_labels"]


# ------------------------------------------------------------------------------------------------ packing
def test_split_at_pauses_cuts_inside_silences():
    sr = 1000
    rng = np.random.default_rng(0)
    parts, pauses = [], []
    t = 0
    for n in (4000, 5000, 3000, 6000, 4500, 5500, 2000):  # bursts of "speech" separated by 600 ms pauses
        parts.append(rng.standard_normal(n).astype(np.float32))
        t += n
        parts.append(np.zeros(600, np.float32))
        pauses.append((t, t + 600))
        t += 600
    audio = np.concatenate(parts)
    pieces = split_at_pauses(audio, sr, max_samples=15000, search_samples=8000)
    assert len(pieces) == 3
    assert pieces[0][0] == 0 and pieces[-1][1] == len(audio)
    assert all(a[1] == b[0] for a, b in zip(pieces, pieces[1:]))  # they tile the recording
    assert all(e - s <= 15000 for s, e in pieces)
    for _, cut in pieces[:-1]:
        assert any(a <= cut <= b for a, b in pauses), cut
    assert split_at_pauses(audio[:3000], sr, 15000, 8000) == [(0, 3000)]


def test_pack_units_first_fit_decreasing():
    lengths = [10, 3, 8, 2, 30, 7]
    bins = pack_units(lengths, capacity=30, gap=1)
    assert sorted(i for b in bins for i in b) == list(range(6))
    for b in bins:
        assert sum(lengths[i] for i in b) + (len(b) - 1) <= 30
    assert bins == [[4], [0, 2, 5, 3], [1]]
    with pytest.raises(ValueError):
        pack_units([31], capacity=30, gap=1)


def test_parse_timestamped_segments():
    tb, eos = 100, 50  # timestamps from id 100 (0.02 s each), end-of-text 50, specials from 60
    toks = [tb + 0, 1, 2, tb + 50, tb + 60, 3, tb + 90, 4, 5, eos, 6]
    segs = parse_timestamped(toks, [-0.1] * len(toks), timestamp_begin=tb, eos_id=eos, special_begin=60)
    assert [(s.start, s.end, s.tokens) for s in segs] == [(0.0, 1.0, [1, 2]), (1.2, 1.8, [3]), (1.8, None, [4, 5])]
    assert parse_timestamped([tb, 61, 1, tb + 5], [0.0] * 4, timestamp_begin=tb, eos_id=eos,
                             special_begin=60)[0].tokens == [1]


def _seg(s, e, toks=(1,)):
    return Segment(s, e, list(toks), [0.0] * len(toks))


def test_assign_segments_accepts_clean_splits_and_rejects_doubtful_ones():
    spans = [(0.2, 2.4), (3.4, 5.6), (6.6, 7.2)]
    clean = [_seg(0.0, 2.5), _seg(3.4, 4.5, (2,)), _seg(4.5, 5.7, (3,)), _seg(6.5, 7.3, (4,))]
    split, reason = assign_segments(clean, spans, 0.3, 7.3)
    assert reason == "" and [[s.tokens[0] for s in part] for part in split] == [[1], [2, 3], [4]]
    merged = [_seg(0.0, 2.5), _seg(3.4, 7.2, (2,))]  # the last two clips in one segment
    assert assign_segments(merged, spans, 0.3, 7.3)[0] is None
    skipped = [_seg(0.0, 2.5), _seg(3.4, 5.6, (2,))]  # the last clip got no text
    assert "no text" in assign_segments(skipped, spans, 0.3, 7.3)[1]
    # speech the transcript skipped: the clip's voiced frames lie outside its only segment
    voiced = [np.arange(0.2, 2.4, 0.02), np.arange(3.4, 5.6, 0.02), np.arange(6.6, 7.2, 0.02)]
    partial = [_seg(0.0, 2.5), _seg(3.4, 4.0, (2,)), _seg(6.5, 7.3, (4,))]
    assert uncovered_seconds(voiced[1], partial[1:2], 7.3, 0.5) == pytest.approx(1.1, abs=0.05)
    assert "outside its segments" in assign_segments(partial, spans, 0.3, 7.3, voiced, 1.0, 0.5)[1]
    assert assign_segments(clean, spans, 0.3, 7.3, voiced, 1.0, 0.5)[0] is not None
    audio = np.concatenate([np.zeros(1600), np.ones(3200), np.zeros(1600)]).astype(np.float32)
    times = voiced_frames(audio, 16000)
    assert times.min() == pytest.approx(0.11) and times.max() == pytest.approx(0.29)


def test_packed_labelling_writes_the_same_store_as_pseudo_label(whisper_dir, tmp_path):
    folder = write_clips(tmp_path / "audio", [1.0, 2.0, 1.5, 3.0, 0.8, 2.5, 35.0], bad=True)
    common = dict(input=str(folder), model=str(whisper_dir), batch_size=4, progress=False)
    result = pseudo_label(PseudoLabelConfig(output_dir=str(tmp_path / "packed"), **common))
    assert result["packed"]  # the default for a Whisper teacher decoding greedily without soft labels
    pseudo_label(PseudoLabelConfig(output_dir=str(tmp_path / "plain"), pack=False, **common))
    packed = {r["id"]: r for r in load_pseudo_labels(tmp_path / "packed")}
    plain = {r["id"]: r for r in load_pseudo_labels(tmp_path / "plain")}
    assert packed.keys() == plain.keys() and len(packed) == 7  # the non-audio file is a recorded failure
    assert result["failures"] == 1
    summary = json.loads((tmp_path / "packed" / "summary.json").read_text())
    assert summary["failures"] == 1 and summary["rows"] == 7
    stats = summary["packing"]
    assert stats["units"] == 8 and stats["windows"] >= 2  # the 35-s clip is cut into two pieces
    # This random teacher cannot emit timestamps, so every packed window is rejected and its clips are
    # labelled alone: exactly what pseudo_label gives for clips that fit one window.
    assert stats["rejected_windows"] == stats["packed_windows"] > 0
    for key, row in packed.items():
        assert row["prompt_ids"] == plain[key]["prompt_ids"]
        if row["duration"] < 30:
            assert row["token_ids"] == plain[key]["token_ids"] and row["text"] == plain[key]["text"]
        else:
            assert row["n_chunks"] == 2
    # resuming a finished store recomputes nothing
    again = pseudo_label(PseudoLabelConfig(output_dir=str(tmp_path / "packed"), pack=True, **common))
    assert again["shards_computed"] == 0 and again["shards_skipped"] == 1
    # the deprecated command: every pseudo-label flag plus the packing settings, recorded in the manifest
    assert packed_cli_main([str(folder), "--model", str(whisper_dir), "--output-dir", str(tmp_path / "cli"),
                            "--batch-size", "4", "--no-progress", "--pack-gap-s", "0.5"]) == 0
    manifest = json.loads((tmp_path / "cli" / "manifest.json").read_text())
    assert manifest["config"]["pack_gap_s"] == 0.5 and manifest["packing"]["pack_gap_s"] == 0.5
    assert len(load_pseudo_labels(tmp_path / "cli")) == 7


# ------------------------------------------------------------------------------------------------ real teacher
@pytest.mark.slow
def test_distil_whisper_with_the_real_tiny_en_teacher(tiny_en_teacher, tmp_path_factory, tmp_path):
    clips = harvard_clips(16)
    audio = tmp_path / "audio"  # fixed relative paths: the ids (and so the held-out choice) do not vary
    audio.mkdir()
    manifest = audio / "speech.csv"
    with open(manifest, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "text"])
        for i, (path, text) in enumerate(clips):
            (audio / f"h{i:02d}{path.suffix}").write_bytes(Path(path).read_bytes())
            writer.writerow([f"h{i:02d}{path.suffix}", text])
    out = tmp_path / "run"
    distil_whisper.main([
        "--teacher", str(tiny_en_teacher), "--audio", str(manifest), "--output_dir", str(out), "--eval_size", "6",
        "--num_decoder_layers", "2", "--freeze_encoder", "true", "--max_steps", "4", "--learning_rate", "1e-4",
        "--logging_steps", "1", "--label_batch_size", "8", "--num_threads", "1", *TRAIN_FLAGS])
    results = json.loads((out / "results.json").read_text())
    assert results["eval"]["teacher"]["n"] == 6
    assert results["eval"]["teacher"]["wer"] <= 0.15
    assert np.isfinite(results["eval"]["student"]["wer"])
    assert results["distillation"]["encoder_shared"] is True
    rows = results["rows"]  # the WER filter (10% against the reference) leaves out some pseudo-labels
    assert rows["held_out"] == 6 and rows["training_rows"] == 16 - 6 - rows["filtered_out"] >= 1
    assert (out / "student" / "model.safetensors").is_file()


@pytest.mark.slow
def test_packed_labelling_keeps_the_wer_of_unpacked_labelling(tiny_en_teacher, tmp_path_factory, tmp_path):
    import soundfile as sf

    from hf_distill.speech.text_normalizer import wer

    clips = harvard_clips(20)
    folder = tmp_path / "audio"
    folder.mkdir()
    rows = []
    for i, (path, text) in enumerate(clips[:14]):  # 14 single sentences
        rows.append((folder / f"s{i:02d}{path.suffix}", text))
        (folder / f"s{i:02d}{path.suffix}").write_bytes(Path(path).read_bytes())
    pause = np.zeros(8000, np.float32)  # and one 40-s recording of sentences joined by 0.5-s pauses
    parts, texts = [], []
    for path, text in clips * 3:
        parts += [sf.read(str(path), dtype="float32")[0], pause]
        texts.append(text)
        if sum(len(p) for p in parts) > 40 * 16000:
            break
    sf.write(folder / "long.wav", np.concatenate(parts), 16000)
    rows.append((folder / "long.wav", " ".join(texts)))
    manifest = tmp_path / "m.csv"
    with open(manifest, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "text"])
        writer.writerows([str(p), t] for p, t in rows)
    common = dict(input=str(manifest), model=str(tiny_en_teacher), batch_size=8, progress=False)
    result = pseudo_label(PseudoLabelConfig(output_dir=str(tmp_path / "packed"), pack=True, **common))
    pseudo_label(PseudoLabelConfig(output_dir=str(tmp_path / "plain"), pack=False, **common))
    refs = [t for _, t in rows]
    by_path = {}
    for name in ("packed", "plain"):
        store = {r["path"]: r["text"] for r in load_pseudo_labels(tmp_path / name)}
        by_path[name] = wer(refs, [store[str(p)] for p, _ in rows])
    stats = result["packing"]
    encoded = stats["windows"] + stats["relabelled_units"]
    assert encoded < 14 + 2  # fewer 30-s windows through the encoder than one per clip (+ 2 for the long one)
    assert by_path["packed"] <= by_path["plain"] + 0.02, by_path


@pytest.mark.parametrize("timestamps", [False, True])
def test_greedy_decoder_matches_generate(whisper_dir, timestamps):
    from transformers import WhisperForConditionalGeneration
    from transformers.modeling_outputs import BaseModelOutput

    model = WhisperForConditionalGeneration.from_pretrained(whisper_dir).eval()
    gen = model.generation_config
    if timestamps:  # let this random model emit timestamps: suppress the other special tokens only
        gen.suppress_tokens = list(range(gen.decoder_start_token_id, gen.no_timestamps_token_id))
    torch.manual_seed(1)
    with torch.inference_mode():
        hidden = model.get_encoder()(torch.randn(3, 80, 3000)).last_hidden_state
        kwargs = dict(return_timestamps=True, force_unique_generate_call=True) if timestamps else {}
        out = model.generate(encoder_outputs=BaseModelOutput(last_hidden_state=hidden), return_dict_in_generate=True,
                             output_scores=True, **kwargs)
        prompt_len = out.sequences.shape[1] - len(out.scores)
        tokens, logprobs, _ = GreedyWhisperDecoder(model, timestamps=timestamps).decode(
            hidden, out.sequences[:, :prompt_len].tolist())
    n_ts = 0
    for b in range(3):
        expected = out.sequences[b, prompt_len:].tolist()
        if gen.eos_token_id in expected:
            expected = expected[: expected.index(gen.eos_token_id) + 1]
        assert tokens[b] == expected
        want = [float(torch.log_softmax(out.scores[i][b].float(), -1)[t]) for i, t in enumerate(expected)]
        np.testing.assert_allclose(logprobs[b], want, rtol=1e-4, atol=1e-4)
        n_ts += sum(t > gen.no_timestamps_token_id for t in expected)
    assert (n_ts > 0) == timestamps
