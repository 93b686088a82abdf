"""Pseudo-labelling: tiny Whisper and CTC teachers end to end, soft labels, filters, stitching, long recordings
(resume, ranks, long recordings, command-line errors: ``test_pseudo_label_jobs.py``)."""

from __future__ import annotations

import json
import math
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from hf_distill.losses import topk_kl_loss
from hf_distill.speech.labelling import (
    PseudoLabelConfig,
    compression_ratio,
    load_pseudo_labels,
    merge_overlapping_texts,
    pseudo_label,
)
from hf_distill.speech.soft_labels import (
    bytes_per_position,
    pack_topk,
    topk_from_logits,
    unpack_topk,
)
from hf_distill.store.writer import shard_files

REPO = Path(__file__).resolve().parents[1]
WORDS = "the a cat dog sat on mat ran fast slow red blue green house tree river stone light dark music".split()


# ------------------------------------------------------------------------------------------------
# tiny teachers


def build_tiny_whisper(path: Path) -> Path:
    """A random Whisper (d_model 32) with a byte-level BPE tokenizer, Whisper's special tokens and a
    multilingual generation config; timestamps and specials are suppressed so it emits words."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import (
        AutoTokenizer,
        GenerationConfig,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperProcessor,
        WhisperTokenizer,
    )

    transformers.logging.set_verbosity_error()
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(300)]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<|endoftext|>"]
    )
    bpe.train_from_iterator(texts, trainer)
    spec = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in spec["merges"]]
    tok = WhisperTokenizer(vocab=spec["vocab"], merges=merges)
    specials = [
        "<|startoftranscript|>",
        "<|en|>",
        "<|de|>",
        "<|translate|>",
        "<|transcribe|>",
        "<|startoflm|>",
        "<|startofprev|>",
        "<|nospeech|>",
        "<|notimestamps|>",
    ]
    tok.add_tokens(specials, special_tokens=True)
    tok.add_tokens([f"<|{i * 0.02:.2f}|>" for i in range(1501)])
    tok.save_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    ids = dict(zip(specials, tok.convert_tokens_to_ids(specials)))
    first_special, vocab_size = ids["<|startoftranscript|>"], len(tok)
    processor = WhisperProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=80), tokenizer=tok)
    cfg = WhisperConfig(
        vocab_size=vocab_size,
        d_model=32,
        encoder_layers=1,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        num_mel_bins=80,
        max_source_positions=1500,
        max_target_positions=64,
        decoder_start_token_id=first_special,
        eos_token_id=0,
        pad_token_id=0,
        bos_token_id=0,
    )
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(cfg)
    model.generation_config = GenerationConfig(
        decoder_start_token_id=first_special,
        eos_token_id=0,
        pad_token_id=0,
        bos_token_id=0,
        no_timestamps_token_id=ids["<|notimestamps|>"],
        lang_to_id={"<|en|>": ids["<|en|>"], "<|de|>": ids["<|de|>"]},
        task_to_id={"translate": ids["<|translate|>"], "transcribe": ids["<|transcribe|>"]},
        is_multilingual=True,
        max_length=48,
        begin_suppress_tokens=[0],
        suppress_tokens=list(range(first_special, vocab_size)),
        max_initial_timestamp_index=50,
    )
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def build_tiny_ctc(path: Path, layers: int = 1, **config) -> Path:
    """A random Wav2Vec2ForCTC (hidden 32, 320-sample frames, ``layers`` transformer layers) with a
    character vocabulary; ``config``: further ``Wav2Vec2Config`` fields."""
    import transformers
    from transformers import (
        Wav2Vec2Config,
        Wav2Vec2CTCTokenizer,
        Wav2Vec2FeatureExtractor,
        Wav2Vec2ForCTC,
        Wav2Vec2Processor,
    )

    transformers.logging.set_verbosity_error()
    path.mkdir(parents=True, exist_ok=True)
    vocab = {"<pad>": 0, "<unk>": 1, "|": 2, **{c: i + 3 for i, c in enumerate("abcdefghijklmnopqrstuvwxyz'")}}
    (path / "vocab.json").write_text(json.dumps(vocab))
    tok = Wav2Vec2CTCTokenizer(str(path / "vocab.json"), unk_token="<unk>", pad_token="<pad>", word_delimiter_token="|")
    fe = Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True, return_attention_mask=True
    )
    cfg = Wav2Vec2Config(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=64,
        conv_dim=(8,) * 7,
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4,
        feat_extract_norm="layer",
        do_stable_layer_norm=True,
        pad_token_id=0,
        **config,
    )
    torch.manual_seed(0)
    Wav2Vec2ForCTC(cfg).save_pretrained(path)
    Wav2Vec2Processor(feature_extractor=fe, tokenizer=tok).save_pretrained(path)
    return path


def write_clips(folder: Path, durations, seed=0, bad=True) -> Path:
    """Noise-and-tone clips at mixed rates and channel counts (plus one non-audio .wav)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i, d in enumerate(durations):
        sr = (16000, 22050, 8000)[i % 3]
        n = int(d * sr)
        x = 0.05 * rng.standard_normal(n) + 0.3 * np.sin(2 * np.pi * rng.uniform(100, 900) * np.arange(n) / sr)
        if i % 4 == 1:
            x = np.stack([x, 0.5 * x], 1)
        sub = "" if i % 2 else "sub/"
        (folder / sub).mkdir(exist_ok=True)
        sf.write(folder / f"{sub}clip{i:02d}.{'wav' if i % 3 else 'flac'}", x.astype(np.float32), sr)
    if bad:
        (folder / "broken.wav").write_text("a text file, not audio")
    return folder


@pytest.fixture(scope="module")
def whisper_dir(tmp_path_factory):
    return build_tiny_whisper(tmp_path_factory.mktemp("tiny_whisper"))


@pytest.fixture(scope="module")
def ctc_dir(tmp_path_factory):
    return build_tiny_ctc(tmp_path_factory.mktemp("tiny_ctc"))


def read_rows(out: Path):
    import pyarrow.parquet as pq

    return [row for f in shard_files(out) for row in pq.read_table(f).to_pylist()]


# ------------------------------------------------------------------------------------------------
# soft labels


def dense_kl(t_logits, s_logits):
    p = torch.softmax(t_logits.double(), -1)
    return (p * (torch.log_softmax(t_logits.double(), -1) - torch.log_softmax(s_logits.double(), -1))).sum(-1)


def test_topk_pack_round_trip_and_kl_bounds():
    torch.manual_seed(0)
    V, n = 50, 64
    t_logits, s_logits = 3 * torch.randn(n, V), 3 * torch.randn(n, V)
    for temperature in (1.0, 2.0):
        for k in (V, 10, 3):
            idx, probs, tail = topk_from_logits(t_logits, k, temperature)
            p_dense = torch.softmax(t_logits.double() / temperature, -1)
            assert torch.equal(idx, p_dense.topk(k, -1).indices)
            torch.testing.assert_close(probs.double(), p_dense.gather(-1, idx), rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(tail.double(), 1 - p_dense.gather(-1, idx).sum(-1), rtol=1e-4, atol=1e-7)
            packed = pack_topk(idx, probs, tail)
            assert [a.dtype for a in packed] == [np.int32, np.float16, np.float16]
            assert sum(a.nbytes for a in packed) == n * bytes_per_position(k)
            ui, up, ut = unpack_topk(
                [r.tolist() for r in packed[0]], [r.tolist() for r in packed[1]], packed[2].tolist()
            )
            assert torch.equal(ui, idx) and up.dtype == torch.float32
            assert (up - probs).abs().max() <= probs.abs().max() * 2**-11 + 1e-7  # fp16 rounding only
            dense = dense_kl(t_logits / temperature, s_logits / temperature)  # per position, float64
            sparse = torch.stack(
                [
                    topk_kl_loss(
                        s_logits[i : i + 1],
                        up[i : i + 1],
                        ui[i : i + 1],
                        teacher_values="probs",
                        teacher_tail_mass=ut[i : i + 1],
                        temperature=temperature,
                    )
                    / temperature**2
                    for i in range(n)
                ]
            ).double()
            rel_fp16 = 2e-3 * dense.abs() + 1e-4  # the stated bound for storage rounding
            if k == V:  # exact up to fp16 rounding of the stored probabilities
                assert torch.all((sparse - dense).abs() <= rel_fp16)
            else:
                # sparse = dense - tail_T * KL(p_T(.|tail) || p_S(.|tail)): never above dense, and the gap is
                # bounded by tail_T * max over tail classes of log(p_T(i|tail) / p_S(i|tail))
                assert torch.all(sparse <= dense + rel_fp16)
                log_p = torch.log_softmax(t_logits.double() / temperature, -1)
                log_q = torch.log_softmax(s_logits.double() / temperature, -1)
                in_top = torch.zeros_like(log_p, dtype=torch.bool).scatter(-1, idx, True)
                cond_p = log_p.masked_fill(in_top, -math.inf)
                cond_p = cond_p - torch.logsumexp(cond_p, -1, keepdim=True)
                cond_q = log_q.masked_fill(in_top, -math.inf)
                cond_q = cond_q - torch.logsumexp(cond_q, -1, keepdim=True)
                max_ratio = (cond_p - cond_q).masked_fill(in_top, -math.inf).max(-1).values.clamp_min(0)
                gap_bound = tail.double() * max_ratio
                assert torch.all(dense - sparse <= gap_bound + rel_fp16)


# ------------------------------------------------------------------------------------------------
# stitching


def test_merge_overlapping_texts_loses_and_repeats_nothing():
    rng = random.Random(1)
    vocab = WORDS + ["house.", "River,", "Light"]
    words = [rng.choice(vocab) for _ in range(120)]
    # windows of 30 words every 22 words (8-word overlaps), as a chunked transcription would see them
    spans = [(s, min(s + 30, len(words))) for s in range(0, len(words) - 8, 22)]
    assert spans[-1][1] == len(words)
    clean = [words[a:b] for a, b in spans]
    assert merge_overlapping_texts([" ".join(c) for c in clean], 12) == " ".join(words)
    # the words at each window's edges are unreliable: cut in half, capitalised, punctuated differently
    noisy = []
    for i, c in enumerate(clean):
        c = list(c)
        if i > 0:
            c[0] = c[0][: max(1, len(c[0]) // 2)]  # the window starts in the middle of a word
            c[1] = c[1].capitalize() + ","
        if i < len(clean) - 1:
            c[-1] = c[-1][:2] + "-"  # the window ends in the middle of a word
            c[-2] = c[-2].upper()
        noisy.append(" ".join(c))
    merged = merge_overlapping_texts(noisy, 12).split()
    assert len(merged) == len(words)
    norm = [w.strip(".,-").lower() for w in merged]
    assert norm == [w.strip(".,").lower() for w in words]
    # a deleted word inside one overlap is absorbed; total count stays right
    a = "one two three four five six seven eight nine"
    b = "six eight nine ten eleven twelve"  # the second chunk missed "seven"
    assert merge_overlapping_texts([a, b]) in {
        "one two three four five six seven eight nine ten eleven twelve",
        "one two three four five six eight nine ten eleven twelve",
    }
    # silent overlap: nothing in common, nothing dropped
    assert merge_overlapping_texts(["hello there", "general kenobi"], 5) == "hello there general kenobi"
    assert merge_overlapping_texts(["", "only the second"]) == "only the second"
    # repeated words do not confuse the alignment
    rep = "the the the cat the the the dog the the the".split()
    assert merge_overlapping_texts([" ".join(rep[:8]), " ".join(rep[4:])], 6) == " ".join(rep)


def test_compression_ratio_flags_repetition():
    assert compression_ratio("") == 0.0
    assert compression_ratio("the cat sat on the mat") < 1.5
    assert compression_ratio("thank you " * 40) > 2.4


# ------------------------------------------------------------------------------------------------
# end to end


def teacher_forced(whisper_dir, audio_path, prompt_ids, token_ids):
    """Dense logits of the teacher on one file, teacher-forced on the stored tokens."""
    from transformers import AutoProcessor, WhisperForConditionalGeneration

    from hf_distill.speech.audio import AudioItem, decode

    proc = AutoProcessor.from_pretrained(whisper_dir)
    model = WhisperForConditionalGeneration.from_pretrained(whisper_dir).eval()
    audio = decode(AudioItem(id="x", path=audio_path), 16000)
    feats = proc.feature_extractor([audio], sampling_rate=16000, return_tensors="pt").input_features
    dec = torch.tensor([list(prompt_ids) + list(token_ids)[:-1]])
    with torch.no_grad():
        return model(input_features=feats, decoder_input_ids=dec).logits[0]


def generated_logprobs(whisper_dir, audio_path, **gen_kwargs):
    """``model.generate`` on one file, greedy: its tokens and each one's log-probability under the decoding
    rules (the processed scores), as Whisper's own ``avg_logprob`` counts them."""
    from transformers import AutoProcessor, WhisperForConditionalGeneration

    from hf_distill.speech.audio import AudioItem, decode

    proc = AutoProcessor.from_pretrained(whisper_dir)
    model = WhisperForConditionalGeneration.from_pretrained(whisper_dir).eval()
    audio = decode(AudioItem(id="x", path=audio_path), 16000)
    feats = proc.feature_extractor([audio], sampling_rate=16000, return_tensors="pt").input_features
    with torch.no_grad():
        out = model.generate(input_features=feats, return_dict_in_generate=True, output_scores=True, **gen_kwargs)
    tokens = out.sequences[0, out.sequences.shape[1] - len(out.scores) :].tolist()
    logprobs = [float(torch.log_softmax(s[0].double(), -1)[t]) for s, t in zip(out.scores, tokens)]
    return tokens, logprobs


def test_whisper_teacher_end_to_end(whisper_dir, tmp_path):
    clips = write_clips(tmp_path / "clips", [1.0, 2.5, 0.7, 4.0, 41.0, 3.2])
    out = tmp_path / "out"
    cfg = PseudoLabelConfig(
        input=str(clips),
        model=str(whisper_dir),
        output_dir=str(out),
        language="en",
        task="transcribe",
        max_new_tokens=6,
        top_k=8,
        batch_size=4,
        shard_size=4,
        progress=False,
    )
    result = pseudo_label(cfg)
    assert (result["num_shards"], result["shards_computed"], result["rows"], result["failures"]) == (2, 2, 6, 1)
    summary = json.loads((out / "summary.json").read_text())
    assert summary == result["summary"]
    assert (summary["items"], summary["rows"], summary["failures"]) == (7, 6, 1)
    assert summary["failure_reasons"] == {"not a readable audio file": 1}
    assert [json.loads(line)["id"] for line in (out / "failures.jsonl").read_text().splitlines()] == ["broken.wav"]
    assert summary["audio_hours"] == pytest.approx((1.0 + 2.5 + 0.7 + 4.0 + 41.0 + 3.2) / 3600, rel=1e-3)
    assert summary["soft_labels"]["raw_bytes_per_position"] == 4 * 8 + 2  # uint16 indices, fp16 probabilities + tail
    assert 0 < summary["soft_labels"]["stored_bytes_per_position"] < 200
    for name in ("avg_logprob", "no_speech", "compression_ratio"):
        assert summary["filters"][name]["applies"] == 6
    assert summary["filters"]["wer"]["applies"] == 0 and summary["filters"]["mean_max_posterior"]["applies"] == 0

    ds = load_pseudo_labels(out, cache_dir=str(tmp_path / "hf_cache"))
    assert ds.num_rows == 6 and ds["id"] == sorted(ds["id"])
    meta = json.loads((out / "manifest.json").read_text())
    rows = {r["id"]: r for r in ds}
    long_row = rows["sub/clip04.wav"]
    assert long_row["n_chunks"] == 2 and long_row["topk_indices"] is None
    assert long_row["token_ids"][-1] == 0 and long_row["text"]
    for rid, row in rows.items():
        assert row["text"] and len(row["prompt_ids"]) == 4  # sot, <|en|>, <|transcribe|>, <|notimestamps|>
        assert row["keep"] == (row["pass_avg_logprob"] and row["pass_no_speech"] and row["pass_compression_ratio"])
        if rid == "sub/clip04.wav":
            continue
        n = len(row["token_ids"])
        assert 1 <= n <= 6 and len(row["topk_tail"]) == n and np.asarray(row["topk_indices"]).shape == (n, 8)
    # stored signals and soft labels equal what the teacher computes densely on the same tokens
    row = rows["clip01.wav"]
    logits = teacher_forced(whisper_dir, row["path"], row["prompt_ids"], row["token_ids"] + [0])
    p = len(row["prompt_ids"])
    steps = logits[p - 1 : p - 1 + len(row["token_ids"])]
    # avg_logprob: under the decoding rules (suppressed tokens out of the normaliser), as generate scores them
    tokens, logprobs = generated_logprobs(whisper_dir, row["path"], language="en", task="transcribe", max_new_tokens=6)
    assert tokens == row["token_ids"]
    assert row["avg_logprob"] == pytest.approx(float(np.mean(logprobs)), abs=1e-4)
    raw = torch.log_softmax(steps.double(), -1).gather(-1, torch.tensor(row["token_ids"])[:, None]).mean().item()
    assert row["avg_logprob"] >= raw - 1e-6  # the rules only take probability away from other tokens
    nospeech = meta["teacher"]["no_speech_token_id"]
    assert row["no_speech_prob"] == pytest.approx(torch.softmax(logits[0].double(), -1)[nospeech].item(), abs=1e-5)
    idx, probs, tail = unpack_topk(row["topk_indices"], row["topk_probs"], row["topk_tail"])
    assert torch.equal(idx, steps.topk(8, -1).indices)
    torch.testing.assert_close(probs, torch.softmax(steps, -1).topk(8, -1).values, rtol=2e-3, atol=1e-6)
    # the store is the training target: sparse KL of a student vs the dense KL, within the stated bound
    student = torch.randn_like(steps)
    sparse = topk_kl_loss(student, probs, idx, teacher_values="probs", teacher_tail_mass=tail)
    assert 0 <= sparse.item() <= dense_kl(steps, student).mean().item() * (1 + 2e-3) + 1e-4


def test_ctc_teacher_end_to_end_with_full_soft_labels(ctc_dir, tmp_path):
    durations = [1.0, 2.0, 0.5, 37.3]
    clips = write_clips(tmp_path / "clips", durations, seed=3)
    sf.write(clips / "tiny.wav", np.full(160, 0.1, np.float32), 16000)  # 10 ms: less than one 25 ms frame
    out = tmp_path / "out"
    V = 30
    result = pseudo_label(
        PseudoLabelConfig(
            input=str(clips),
            model=str(ctc_dir),
            output_dir=str(out),
            top_k=V,
            batch_size=3,
            shard_size=8,
            chunk_length_s=10.0,
            chunk_overlap_s=2.0,
            progress=False,
        )
    )
    assert (result["rows"], result["failures"]) == (4, 2)
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert [(f["id"], f["reason"]) for f in failures] == [
        ("broken.wav", "not a readable audio file: Format not recognised."),
        ("tiny.wav", "too short for the teacher (160 samples at 16000 Hz)"),
    ]
    ds = load_pseudo_labels(out, cache_dir=str(tmp_path / "hf_cache"))
    from transformers import AutoModelForCTC, AutoProcessor

    proc = AutoProcessor.from_pretrained(ctc_dir)
    model = AutoModelForCTC.from_pretrained(ctc_dir).eval()
    for row, d in zip(
        ds, [durations[i] for i in (1, 3, 0, 2)]
    ):  # rows sorted by id: clip01, clip03, sub/clip00, sub/clip02
        n = int(d * 16000)
        frames = (n - 400) // 320 + 1
        assert len(row["topk_tail"]) == frames, row["id"]  # chunked long-form keeps every frame exactly once
        assert row["n_chunks"] == (5 if d > 10 else 1)
        assert 0 < row["mean_max_posterior"] <= 1 and row["keep"] == (row["mean_max_posterior"] >= 0.5)
        assert row["avg_logprob"] is None and row["pass_avg_logprob"] is None and row["prompt_ids"] is None
        idx, probs, tail = unpack_topk(row["topk_indices"], row["topk_probs"], row["topk_tail"])
        assert torch.all(tail == 0) and probs.sum(-1).sub(1).abs().max() < 5e-3
        frame_ids = idx[:, 0]
        assert row["text"] == proc.decode(frame_ids.tolist())
        collapsed = torch.unique_consecutive(frame_ids)
        assert row["token_ids"] == collapsed[collapsed != 0].tolist()
        if d <= 10:  # one window: the stored k=V labels are the dense posteriors; KL round trip is exact
            from hf_distill.speech.audio import AudioItem, decode

            audio = decode(AudioItem(id="x", path=row["path"]), 16000)
            inputs = proc(audio, sampling_rate=16000, return_tensors="pt")
            with torch.no_grad():
                dense_logits = model(**inputs).logits[0]
            assert torch.equal(idx[:, 0], dense_logits.argmax(-1))
            student = torch.randn_like(dense_logits)
            sparse = topk_kl_loss(student, probs, idx, teacher_values="probs", teacher_tail_mass=tail)
            dense = dense_kl(dense_logits, student).mean()
            assert abs(sparse.item() - dense.item()) <= 2e-3 * dense.item()
    summary = result["summary"]
    assert summary["soft_labels"]["raw_bytes_per_position"] == 4 * V + 2  # uint16 indices
    assert summary["filters"]["mean_max_posterior"]["applies"] == 4


def test_reference_column_drives_the_wer_filter(ctc_dir, tmp_path):
    clips = write_clips(tmp_path / "clips", [1.0, 1.5, 0.8, 1.2], seed=5, bad=False)
    first = tmp_path / "first"
    pseudo_label(PseudoLabelConfig(input=str(clips), model=str(ctc_dir), output_dir=str(first), progress=False))
    texts = {r["id"]: r["text"] for r in read_rows(first)}
    manifest = tmp_path / "manifest.jsonl"
    refs = {
        "sub/clip00.flac": texts["sub/clip00.flac"],
        "clip01.wav": texts["clip01.wav"].upper() + ".",
        "sub/clip02.wav": "something else entirely",
        "clip03.flac": None,
    }
    manifest.write_text("".join(json.dumps({"path": f"clips/{k}", "text": v}) + "\n" for k, v in refs.items()))
    out = tmp_path / "out"
    result = pseudo_label(
        PseudoLabelConfig(
            input=str(manifest), model=str(ctc_dir), output_dir=str(out), progress=False, min_mean_max_posterior=0.0
        )
    )
    rows = {r["id"].removeprefix("clips/"): r for r in read_rows(out)}
    assert rows["sub/clip00.flac"]["wer"] == 0 and rows["sub/clip00.flac"]["pass_wer"] is True
    assert rows["clip01.wav"]["wer"] == 0  # normalised: case and punctuation ignored
    assert rows["sub/clip02.wav"]["wer"] >= 1 and rows["sub/clip02.wav"]["pass_wer"] is False
    assert rows["clip03.flac"]["wer"] is None and rows["clip03.flac"]["pass_wer"] is None
    assert [rows[k]["keep"] for k in ("sub/clip00.flac", "clip01.wav", "sub/clip02.wav", "clip03.flac")] == [
        True,
        True,
        False,
        True,
    ]
    assert result["summary"]["filters"]["wer"] == {"applies": 3, "passed": 2, "wer_below": 0.1}
    assert result["summary"]["kept"] == 3


# ------------------------------------------------------------------------------------------------
# a real teacher on real (synthesized) speech


@pytest.mark.slow
def test_real_whisper_long_form_stitching_loses_and_repeats_nothing(tmp_path_factory):
    """Whisper tiny.en on 20 spoken Harvard sentences, once one by one and once joined into a ~60 s
    recording (three 30 s windows): the stitched transcript must be as good as the pieces."""
    sys.path.insert(0, str(Path(__file__).parent))
    from speech_assets import harvard_clips, tiny_en_teacher_dir

    from hf_distill.speech.labelling import load_normalizer, word_error_rate

    teacher = tiny_en_teacher_dir(tmp_path_factory)
    clips = harvard_clips(20)
    folder = tmp_path_factory.mktemp("long_form")
    pieces = []
    for i, (path, _) in enumerate(clips):
        audio, sr = sf.read(path, dtype="float32")
        assert sr == 16000
        sf.write(folder / f"piece{i:02d}.wav", audio, sr)
        pieces += [audio, np.zeros(int(0.25 * sr), np.float32)]
    joined = np.concatenate(pieces)
    assert len(joined) / 16000 > 45
    sf.write(folder / "joined.wav", joined, 16000)
    out = folder / "out"
    result = pseudo_label(PseudoLabelConfig(input=str(folder), model=str(teacher), output_dir=str(out), batch_size=8,
                                            progress=False, pack=False))
    assert result["rows"] == 21 and result["failures"] == 0
    rows = {r["id"]: r for r in read_rows(out)}
    norm = load_normalizer("english")
    truth = " ".join(text for _, text in clips)
    piece_texts = " ".join(rows[f"piece{i:02d}.wav"]["text"] for i in range(20))
    long_row = rows["joined.wav"]
    assert long_row["n_chunks"] >= 2
    wer_pieces = word_error_rate(truth, piece_texts, norm)
    wer_long = word_error_rate(truth, long_row["text"], norm)
    print(
        f"WER pieces {wer_pieces:.3f}, stitched {wer_long:.3f}, stitched vs pieces "
        f"{word_error_rate(piece_texts, long_row['text'], norm):.3f}"
    )
    assert wer_pieces <= 0.15
    assert wer_long <= wer_pieces + 0.03
    # nothing lost or repeated at the joins: same number of words as the truth, give or take the
    # teacher's own insertions/deletions on the pieces
    n_truth, n_long = len(norm(truth).split()), len(norm(long_row["text"]).split())
    assert abs(n_long - n_truth) <= 3
    for _, text in clips:  # every sentence's ending is heard exactly once
        tail = " ".join(norm(text).split()[-3:])
        assert norm(long_row["text"]).count(tail) <= 1
    # timestamps and beam search on a few pieces: segments cover the transcript
    out2 = folder / "out_timestamps"
    few = folder / "few.jsonl"
    few.write_text("".join(json.dumps({"path": f"piece{i:02d}.wav", "text": clips[i][1]}) + "\n" for i in range(3)))
    pseudo_label(
        PseudoLabelConfig(
            input=str(few),
            model=str(teacher),
            output_dir=str(out2),
            return_timestamps=True,
            num_beams=2,
            top_k=4,
            progress=False,
        )
    )
    for row in read_rows(out2):
        assert row["segments"] and all(s["start"] < s["end"] for s in row["segments"])
        assert " ".join(s["text"] for s in row["segments"]) == row["text"]
        assert len(row["topk_tail"]) == len(row["token_ids"]) and row["wer"] is not None
