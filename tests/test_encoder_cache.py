"""Encoder outputs computed once per clip (hf_distill.speech.encoder_cache) and the spoken-corpus helpers
that need no synthesizer (hf_distill.speech.corpus); the Distil-Whisper recipe on cached encoder outputs."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from hf_distill.speech.audio import decode, list_audio
from hf_distill.speech.corpus import article_split, pack_windows, plain_sentences, split_sentences
from hf_distill.speech.encoder_cache import (
    CachedEncoderDataset,
    EncoderOutputCache,
    build_encoder_cache,
)
from hf_distill.speech.training import WhisperDistillationCollator, WhisperDistillationTrainer
from test_speech_recipes import (  # noqa: F401 - clips, eval_manifest, whisper_dir: the tiny teacher and audio (fixtures)
    TRAIN_FLAGS,
    clips,
    distil_whisper,
    eval_manifest,
    whisper_dir,
)


def _load(whisper_dir):
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    return WhisperForConditionalGeneration.from_pretrained(whisper_dir).eval(), WhisperProcessor.from_pretrained(whisper_dir)


def _encoder_output(model, processor, item):
    from hf_distill.speech.audio import decode

    fe = processor.feature_extractor
    feats = fe([decode(item, 16000)], sampling_rate=16000, return_tensors="pt").input_features
    with torch.no_grad():
        return model.get_encoder()(input_features=feats).last_hidden_state[0].numpy()


# ------------------------------------------------------------------------------------------------ the cache
def test_cache_holds_the_encoder_outputs_resumes_and_refuses_other_inputs(whisper_dir, clips, tmp_path):
    model, processor = _load(whisper_dir)
    items = list_audio(str(clips))
    folder = tmp_path / "cache"
    cache = build_encoder_cache(model, processor.feature_extractor, items, folder, batch_size=3, dtype="float32",
                                shard_size=3, progress=False)
    assert len(cache) == len(items) and sorted(p.name for p in folder.glob("shard-*.npy")) == [
        "shard-00000.npy", "shard-00001.npy", "shard-00002.npy"]
    for item in items:  # batched with other clips, the same values as the clip alone
        np.testing.assert_allclose(cache[item.id], _encoder_output(model, processor, item), rtol=1e-4, atol=1e-5)

    # an interrupted build (a shard missing, a partial file left) computes only what is missing
    (folder / "shard-00001.npy").unlink()
    (folder / ".shard-00001.npy").write_bytes(b"partial")
    with pytest.raises(FileNotFoundError, match="incomplete"):
        EncoderOutputCache(folder)
    calls = []
    hook = model.get_encoder().register_forward_hook(lambda module, args, out: calls.append(args))
    build_encoder_cache(model, processor.feature_extractor, items, folder, batch_size=3, dtype="float32",
                        shard_size=3, progress=False)
    assert len(calls) == 1  # one batch: the 3 clips of the missing shard
    build_encoder_cache(model, processor.feature_extractor, items, folder, batch_size=3, dtype="float32",
                        shard_size=3, progress=False)
    assert len(calls) == 1  # complete: nothing runs
    hook.remove()

    # another dtype, other weights, other audio: refused with the reason, never reused
    with pytest.raises(ValueError, match="stored dtype"):
        build_encoder_cache(model, processor.feature_extractor, items, folder, dtype="float16", shard_size=3)
    with torch.no_grad():
        model.get_encoder().layers[0].fc1.weight[0, 0] += 1e-3
    with pytest.raises(ValueError, match="encoder's weights"):
        build_encoder_cache(model, processor.feature_extractor, items, folder, dtype="float32", shard_size=3)
    with torch.no_grad():
        model.get_encoder().layers[0].fc1.weight[0, 0] -= 1e-3
    path = Path(items[0].path)
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    with pytest.raises(ValueError, match="audio files"):
        build_encoder_cache(model, processor.feature_extractor, list_audio(str(clips)), folder, dtype="float32",
                            shard_size=3)

    half = build_encoder_cache(model, processor.feature_extractor, items[:2], tmp_path / "half", progress=False)
    np.testing.assert_allclose(half[items[0].id], cache[items[0].id], rtol=2e-3, atol=2e-3)
    assert np.load(tmp_path / "half" / "shard-00000.npy").dtype == np.float16


def test_cached_batches_give_the_loss_of_audio_batches_without_running_any_encoder(whisper_dir, clips, tmp_path):
    from hf_distill import DistillationArguments
    from hf_distill.speech.training import WhisperPseudoLabelDataset
    from hf_distill.students import build_whisper_student

    teacher, processor = _load(whisper_dir)
    student = build_whisper_student(teacher, 1, freeze_encoder=True)
    items = {it.id: it for it in list_audio(str(clips))}
    rows = [{"id": i, "prompt_ids": [int(teacher.config.decoder_start_token_id)], "token_ids": [40 + j, 41, 42, 2]}
            for j, i in enumerate(sorted(items))]
    cache = build_encoder_cache(student, processor.feature_extractor, [items[r["id"]] for r in rows],
                                tmp_path / "cache", dtype="float32", progress=False)
    collate = WhisperDistillationCollator(pad_token_id=0)
    cached = collate([CachedEncoderDataset(rows, processor.feature_extractor, cache, items=items)[i] for i in range(4)])
    audio = collate([WhisperPseudoLabelDataset(rows, processor.feature_extractor, items=items)[i] for i in range(4)])
    assert "input_features" not in cached and cached["encoder_outputs"][0].shape[0] == 4
    args = DistillationArguments(output_dir=str(tmp_path / "t"), report_to=[], use_cpu=True, disable_tqdm=True,
                                 save_strategy="no", cos_weight=0.0, kd_weight=1.0, task_weight=0.8, temperature=2.0)
    trainer = WhisperDistillationTrainer(model=student, teacher=teacher, args=args)
    assert trainer.encoder_shared
    student.eval()
    calls = []
    hooks = [m.get_encoder().register_forward_hook(lambda *a: calls.append(1)) for m in (teacher, student)]
    loss_cached = trainer.compute_loss(student, dict(cached))
    assert calls == []  # neither encoder ran
    loss_audio = trainer.compute_loss(student, dict(audio))
    assert calls == [1]  # the student's encoder, once; the teacher reused its output
    for h in hooks:
        h.remove()
    torch.testing.assert_close(loss_cached, loss_audio, rtol=1e-5, atol=1e-6)
    # decoder inputs made from the labels, rows counted inside encoder_outputs (evaluation mode)
    only_states = {k: v for k, v in cached.items() if k != "decoder_input_ids"}
    assert torch.isfinite(trainer.compute_loss(student, only_states))

    trained = build_whisper_student(teacher, 1, freeze_encoder=False)
    plain = WhisperDistillationTrainer(model=trained, teacher=teacher, args=args)
    with pytest.raises(ValueError, match="shares the student's encoder"):
        plain.compute_loss(trained, dict(cached))
    with pytest.raises(ValueError, match="not in the encoder cache"):
        CachedEncoderDataset(rows + [{"id": "other", "prompt_ids": [1], "token_ids": [2]}],
                             processor.feature_extractor, cache, items=items)


def test_distil_whisper_recipe_on_cached_encoder_outputs(whisper_dir, clips, eval_manifest, tmp_path):
    out = tmp_path / "run"
    results = distil_whisper.main([
        "--teacher", str(whisper_dir), "--audio", str(clips), "--eval_audio", str(eval_manifest), "--output_dir", str(out),
        "--freeze_encoder", "true", "--cache_encoder_outputs", "true", "--num_decoder_layers", "1",
        "--keep_only", "false", "--max_steps", "12", "--learning_rate", "3e-3", "--logging_steps", "2",
        "--speed_clips", "2", "--cross_attention_weight", "1.0", "--eval_temperature_fallback", "true", *TRAIN_FLAGS])
    history = results["loss"]["history"]
    losses = [h["loss"] for h in history]
    assert len(losses) >= 4 and losses[-1] < losses[0]
    # the cross-attention term, logged apart, on the cached states both models read
    assert all(h["loss_cross_attention_kl"] > 0 and h["loss_kd"] > 0 for h in history)
    assert results["distillation"]["cross_attention_weight"] == 1.0
    assert results["distillation"]["encoder_shared"] is True
    assert len(EncoderOutputCache(out / "encoder_cache")) == results["rows"]["training_rows"] == 8
    for key, n in (("teacher", 3), ("student", 3), ("teacher_batch_1", 2), ("student_batch_1", 2)):
        ev = results["eval"][key]
        assert ev["n"] == n and ev["timings"]["decoder"] > 0 and "compression_ratio_outliers" in ev
    assert results["eval"]["student_decoder_speedup"] > 0
    for key in ("teacher_fallback", "student_fallback"):
        assert results["eval"][key]["n"] == 3 and len(results["eval"][key]["errors"]) == 3
    assert set(results["eval"]["student_minus_teacher_wer_fallback"]) == {"diff", "low", "high"}
    from transformers import WhisperForConditionalGeneration

    assert WhisperForConditionalGeneration.from_pretrained(out / "student").config.decoder_layers == 1
    with pytest.raises(ValueError, match="cross_attention_weight needs --soft_labels live"):
        distil_whisper.main(["--teacher", str(whisper_dir), "--audio", str(clips), "--output_dir", str(tmp_path / "y"),
                             "--soft_labels", "stored", "--cross_attention_weight", "1", *TRAIN_FLAGS])
    with pytest.raises(ValueError, match="needs --freeze_encoder"):
        distil_whisper.main(["--teacher", str(whisper_dir), "--audio", str(clips), "--output_dir", str(tmp_path / "x"),
                             "--cache_encoder_outputs", "true", *TRAIN_FLAGS])


# ------------------------------------------------------------------------------------------------ the corpus
def test_plain_sentences_keep_what_a_synthesizer_reads_as_written():
    article = ("Title line that is skipped entirely.\n"
               "Shares in the firm rose sharply on Monday, traders said. Profits hit 3.5bn last year. "
               "The BBC reported it first. \"We are pleased,\" he said. Too short. "
               "Is this the end of the road for the old model? Shares in the firm rose sharply on Monday, traders said.")
    assert split_sentences("One two.\nThree four? Five!")[:2] == ["One two.", "Three four?"]
    assert plain_sentences([article], min_words=4) == [
        "Shares in the firm rose sharply on Monday, traders said.",  # once: duplicates dropped
        "Is this the end of the road for the old model?"]  # digits, acronyms, quotes and short ones left out
    with pytest.raises(ValueError, match="min_words"):
        plain_sentences([article], min_words=5, max_words=4)


def test_article_split_is_seeded_stable_and_disjoint():
    texts = [f"article {i}" for i in range(400)]
    train, held = article_split(texts, 0.2, seed=3)
    assert sorted(train + held) == list(range(400)) and 50 < len(held) < 110
    assert article_split(texts, 0.2, seed=3) == (train, held)
    moved_train, moved_held = article_split(texts[::-1], 0.2, seed=3)  # an article's group does not depend on order
    assert {texts[::-1][i] for i in moved_held} == {texts[i] for i in held}
    with pytest.raises(ValueError, match="held_out_fraction"):
        article_split(texts, 1.0)


def test_pack_windows_joins_clips_of_one_voice_in_order_within_the_limit(tmp_path):
    rng = np.random.default_rng(0)
    made = []
    for i in range(23):
        path = tmp_path / "clips" / f"c{i:02d}.wav"
        path.parent.mkdir(exist_ok=True)
        sf.write(path, (0.1 * rng.standard_normal(int(16000 * rng.uniform(1.0, 4.0)))).astype(np.float32), 16000)
        made.append((path, "flite:a" if i % 2 else "flite:b", f"sentence {i}."))
    manifest = pack_windows(made, tmp_path / "win", max_seconds=9.0, max_clips=3, seed=1)
    with open(manifest, newline="") as f:
        rows = list(csv.DictReader(f))
    used = [m for r in rows for m in r["clips"].split("|")]
    assert sorted(used) == sorted(p.name for p, _, _ in made)  # every clip exactly once
    by_name = {p.name: (v, t) for p, v, t in made}
    sizes = set()
    for r in rows:
        members = r["clips"].split("|")
        sizes.add(len(members))
        assert len(members) <= 3 and {by_name[m][0] for m in members} == {r["voice"]}
        assert r["text"] == " ".join(by_name[m][1] for m in members)
        audio, rate = sf.read(tmp_path / "win" / r["path"])
        parts = sum(sf.info(tmp_path / "clips" / m).frames for m in members)
        assert rate == 16000 and parts <= len(audio) <= 9.0 * rate  # the clips plus the silences between them
    assert len(sizes) > 1  # windows of different lengths
    stamp = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "win").glob("*.wav")}
    pack_windows(made, tmp_path / "win", max_seconds=9.0, max_clips=3, seed=1)
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "win").glob("*.wav")} == stamp  # made once
    with pytest.raises(ValueError, match="over max_seconds"):
        pack_windows(made, tmp_path / "w2", max_seconds=0.5)


# ------------------------------------------------------------------------------------------------ WER intervals
def test_wer_per_utterance_intervals_and_paired_differences():
    from hf_distill.speech.text_normalizer import paired_wer_difference, utterance_errors, wer, wer_interval

    refs = ["the cat sat on the mat", "a dog barked", "hello world"]
    hyps = ["the cat sat on a mat", "a dog barked loudly", "hello world"]
    errors, words = utterance_errors(refs, hyps)
    assert errors == [1, 1, 0] and words == [6, 3, 2]
    assert sum(errors) / sum(words) == pytest.approx(wer(refs, hyps)) == pytest.approx(2 / 11)
    low, high = wer_interval(errors, words, n_resamples=500)
    assert 0.0 <= low <= 2 / 11 <= high <= 0.5
    assert wer_interval([2, 2], [4, 4]) == (0.5, 0.5)  # every resample has the same rate
    same = paired_wer_difference(errors, errors, words)
    assert same == {"diff": 0.0, "low": 0.0, "high": 0.0}
    worse = paired_wer_difference([3, 1, 1], errors, words, n_resamples=500)
    assert worse["diff"] == pytest.approx(3 / 11) and 0 <= worse["low"] <= worse["diff"] <= worse["high"]
    with pytest.raises(ValueError, match="equally long"):
        paired_wer_difference([1], [1, 2], [3, 4])


def test_evaluate_wer_reports_loops_by_compression_and_by_normalised_length(tmp_path):
    from hf_distill.speech.audio import AudioItem
    from hf_distill.speech.evaluation import evaluate_wer

    items = []
    for i, ref in enumerate(["best rap song for jesus walks", "the tories were hitting home", "hello world"]):
        path = tmp_path / f"{i}.wav"
        sf.write(path, np.zeros(1600, dtype=np.float32), 16000)
        items.append(AudioItem(id=f"u{i}", path=str(path), reference=ref))
    items.append(AudioItem(id="no_ref", path=str(tmp_path / "0.wav")))  # no reference: not evaluated
    hyps = [
        "Best RAP song for Jesus and Best RAP-DAP-DAP-Damp-Emp-Emp-Son",  # varied pieces: the ratio misses it
        "the tories were " + "a " * 60,  # a plain loop: both tests see it
        "hello world",
    ]
    seen = []

    def transcribe(audios):
        seen.append(len(audios))
        return hyps

    ev = evaluate_wer(transcribe, items, 16000)
    assert seen == [3] and ev["n"] == 3
    assert ev["compression_ratio_outliers"] == ["u1"]
    assert ev["over_twice_the_reference_length"] == ["u0", "u1"]
    assert ev["errors"][2] == 0 and ev["words"] == [6, 5, 2]


def test_temperature_fallback_transcribes_as_greedy_until_a_threshold_fires_and_is_seeded(whisper_dir, clips):
    from hf_distill.speech.evaluation import FALLBACK, transcribe_whisper

    model, processor = _load(whisper_dir)
    audios = [decode(it, 16000) for it in list_audio(str(clips))[:4]]
    greedy = transcribe_whisper(model, processor, audios, batch_size=2, max_new_tokens=12)
    never = dict(FALLBACK, compression_ratio_threshold=1e9, logprob_threshold=-1e9)
    timings = {}
    assert transcribe_whisper(model, processor, audios, batch_size=2, max_new_tokens=12, timings=timings,
                              **never) == greedy
    assert timings["encoder"] > 0 and timings["decoder"] > 0  # the fallback re-decodes the same encoder states
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        runs.append(transcribe_whisper(model, processor, audios, batch_size=2, max_new_tokens=12, **FALLBACK))
    assert runs[0] == runs[1] and len(runs[0]) == 4  # sampled fallbacks repeat under one seed
    # a random tiny model's transcripts have a mean log-probability far below -1: every one is re-decoded
    assert runs[0] != greedy


def _mean_logprobs(model, processor, audios, max_new_tokens=12):
    """Each clip's mean log-probability of its greedy tokens, end token included, from a teacher-forced
    forward pass (the suppressed tokens renormalised away, as generate's logits processors leave them)."""
    from transformers.modeling_outputs import BaseModelOutput

    feats = processor.feature_extractor(audios, sampling_rate=16000, return_tensors="pt").input_features
    config = model.generation_config
    with torch.no_grad():
        hidden = BaseModelOutput(last_hidden_state=model.get_encoder()(input_features=feats).last_hidden_state)
        out = model.generate(encoder_outputs=hidden, max_new_tokens=max_new_tokens, return_dict_in_generate=True,
                             output_scores=True)
        seqs = out.sequences
        logits = model(encoder_outputs=hidden, decoder_input_ids=seqs[:, :-1]).logits.float()
    prompt = seqs.shape[1] - len(out.scores)
    means = []
    for row in range(seqs.shape[0]):
        total, count = 0.0, 0
        for step in range(len(out.scores)):
            token = int(seqs[row, prompt + step])
            step_logits = logits[row, prompt + step - 1].clone()
            ban = list(config.suppress_tokens or []) + (list(config.begin_suppress_tokens or []) if step == 0 else [])
            step_logits[ban] = float("-inf")
            total += float(torch.log_softmax(step_logits, -1)[token])
            count += 1
            if token == config.eos_token_id:
                break
        means.append(total / count)
    return means


def _recording(model):
    """Wrap ``model.generate`` to record (temperature, rows, top_k) of each call."""
    calls = []
    generate = model.generate

    def recording_generate(*args, **kwargs):
        calls.append((kwargs.get("temperature"), kwargs["encoder_outputs"].last_hidden_state.shape[0],
                      kwargs.get("top_k")))
        return generate(*args, **kwargs)

    model.generate = recording_generate
    return calls


def test_fallback_redecodes_only_the_rows_over_a_threshold_and_keeps_the_last_temperature(whisper_dir, clips):
    """openai-whisper's schedule: each row is decoded again at the next temperature only while its transcript
    fails a test, sampled from the whole distribution (no top-k); the last temperature's transcript is kept."""
    from hf_distill.speech.evaluation import FALLBACK, transcribe_whisper

    model, processor = _load(whisper_dir)
    audios = [decode(it, 16000) for it in list_audio(str(clips))[:4]]
    greedy = transcribe_whisper(model, processor, audios, batch_size=4, max_new_tokens=12)
    means = _mean_logprobs(model, processor, audios)
    line = float(np.median(means))
    below = sum(m < line for m in means)
    assert 0 < below < 4, means
    calls = _recording(model)
    every = dict(FALLBACK, compression_ratio_threshold=0.0, logprob_threshold=None)  # every row fails every time
    torch.manual_seed(0)
    last = transcribe_whisper(model, processor, audios, batch_size=4, max_new_tokens=12, **every)
    assert calls == [(None, 4, None)] + [(t, 4, 0) for t in FALLBACK["temperature"][1:]]
    assert last != greedy
    calls.clear()
    some = dict(FALLBACK, temperature=(0.0, 0.7), compression_ratio_threshold=None, logprob_threshold=line)
    torch.manual_seed(0)
    mixed = transcribe_whisper(model, processor, audios, batch_size=4, max_new_tokens=12, **some)
    assert calls == [(None, 4, None), (0.7, below, 0)]  # only the rows below the line are decoded again
    assert [m for m, g, lp in zip(mixed, greedy, means) if lp >= line] == [
        g for g, lp in zip(greedy, means) if lp >= line]


def test_fallback_tests_the_text_compression_ratio_and_the_mean_log_probability_at_their_boundaries(
        whisper_dir, clips):
    """The compression test reads the transcript's text (UTF-8 over zlib, as openai-whisper does; not the
    token ids, whose compression lets loops of text through), and the log-probability test each row's mean
    log-probability of the tokens it generated, end token included: a threshold just past either number
    re-decodes the row, just short of it keeps it."""
    from hf_distill.speech.evaluation import transcribe_whisper
    from hf_distill.speech.labelling.text import compression_ratio

    model, processor = _load(whisper_dir)
    audios = [decode(it, 16000) for it in list_audio(str(clips))[:3]]
    means = _mean_logprobs(model, processor, audios)
    texts = transcribe_whisper(model, processor, audios, batch_size=1, max_new_tokens=12)
    for row in range(3):
        ratio = compression_ratio(texts[row])
        cases = [({"compression_ratio_threshold": ratio - 1e-3, "logprob_threshold": None}, True),
                 ({"compression_ratio_threshold": ratio + 1e-3, "logprob_threshold": None}, False),
                 ({"compression_ratio_threshold": None, "logprob_threshold": means[row] + 1e-3}, True),
                 ({"compression_ratio_threshold": None, "logprob_threshold": means[row] - 1e-3}, False)]
        for limits, redecoded in cases:
            calls = _recording(model)
            transcribe_whisper(model, processor, [audios[row]], batch_size=1, max_new_tokens=12,
                               temperature=(0.0, 0.5), **limits)
            del model.generate
            assert [c[0] for c in calls] == ([None, 0.5] if redecoded else [None]), (row, limits)
