"""Cross-modal distillation (text teacher -> speech student): the student's batches carry audio features and
teacher outputs only, the teacher reads text only, the student learns the teacher's distribution from audio, and
the BBC recipe runs end to end on tiny models with committed-style clips (no synthesizer)."""

import csv
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F
from transformers import (BertForSequenceClassification, WhisperConfig, WhisperFeatureExtractor,
                          WhisperForConditionalGeneration)

from hf_distill import DistillationArguments, losses
from hf_distill.speech.audio_classification import PooledStatesCollator, pooled_whisper_states, whisper_audio_classifier
from hf_distill.speech.corpus import parse_voices, speak_clips
from hf_distill.speech.cross_modal import (CrossModalTrainer, audio_rows, predict_pooled, spoken_text,
                                           standardize_projector, teacher_outputs)
from tiny import make_wordpiece_tokenizer, tiny_bert_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))

RATE = 16000
TEXT_KEYS = {"text", "input_ids", "attention_mask", "token_type_ids", "inputs_embeds"}
AUDIO_KEYS = {"input_features", "input_values", "encoder_outputs", "pooled_states"}


def tiny_asr(seed=0, d_model=32):
    torch.manual_seed(seed)
    return WhisperForConditionalGeneration(WhisperConfig(
        vocab_size=40, d_model=d_model, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=8, max_source_positions=50,
        max_target_positions=16, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0))


def text_teacher(tokenizer, labels=3, seed=0):
    torch.manual_seed(seed)
    return BertForSequenceClassification(tiny_bert_config(len(tokenizer), layers=1, hidden=16, num_labels=labels,
                                                          initializer_range=0.5)).eval()


def tones(n_per_class, classes=3, seed=0):
    """Clips whose pitch depends on the class: what the student can hear."""
    rng = np.random.default_rng(seed)
    audio, y = [], []
    for i in range(n_per_class * classes):
        c = i % classes
        n = int(rng.integers(6000, 15000))
        audio.append((0.4 * np.sin(2 * np.pi * 300 * (c + 1) * np.arange(n) / RATE)
                      + 0.02 * rng.standard_normal(n)).astype(np.float32))
        y.append(c)
    return audio, np.array(y)


def test_spoken_text_is_title_and_first_sentence():
    article = "Ad sales boost Time Warner profit\n\nQuarterly profits at US media giant TimeWarner jumped 76% to " \
              "$1.13bn. The firm benefited from sales.\n\nMore text."
    assert spoken_text(article) == ("Ad sales boost Time Warner profit. Quarterly profits at US media giant TimeWarner "
                                    "jumped 76% to $1.13bn.")
    assert spoken_text(article, max_words=4) == "Ad sales boost Time"
    with pytest.raises(ValueError, match="empty article"):
        spoken_text("  \n ")


def test_parse_voices():
    assert parse_voices("festival:cmu_us_slt_arctic_hts, flite:awb") == [("festival", "cmu_us_slt_arctic_hts"),
                                                                        ("flite", "awb")]
    with pytest.raises(ValueError, match="write engine:voice"):
        parse_voices("espeak:en")
    with pytest.raises(ValueError, match="no voices"):
        parse_voices(" , ")


def test_teacher_reads_text_only_and_gives_logits_and_mean_pooled_embedding():
    tokenizer = make_wordpiece_tokenizer()
    teacher = text_teacher(tokenizer)
    seen = []
    teacher.register_forward_pre_hook(lambda m, a, kw: seen.append(set(kw)), with_kwargs=True)
    texts = ["the cat sat on the mat", "a dog", "the bank raised rates again today"]
    logits, emb = teacher_outputs(teacher, tokenizer, texts, batch_size=2)
    assert logits.shape == (3, 3) and emb.shape == (3, 16)
    assert seen and all(keys <= {"input_ids", "attention_mask", "token_type_ids", "output_hidden_states"}
                        for keys in seen)
    assert not any(keys & AUDIO_KEYS for keys in seen)
    enc = tokenizer(texts[1:2], return_tensors="pt")
    with torch.no_grad():
        out = teacher(**enc, output_hidden_states=True)
    assert np.allclose(logits[1], out.logits[0].numpy(), atol=1e-5)
    assert np.allclose(emb[1], out.hidden_states[-1][0].mean(0).numpy(), atol=1e-5)  # no padding in a batch of 1


def test_student_rows_and_batches_carry_audio_and_teacher_outputs_only():
    pooled = np.random.default_rng(0).standard_normal((4, 32)).astype(np.float32)
    logits = np.random.default_rng(1).standard_normal((4, 3)).astype(np.float32)
    rows = audio_rows(pooled, teacher_logits=logits, teacher_embedding=np.ones((4, 32), np.float32))
    assert all(set(r) == {"pooled_states", "teacher_logits", "teacher_embedding"} for r in rows)
    batch = PooledStatesCollator()(rows)
    assert set(batch) == {"encoder_outputs", "teacher_logits", "teacher_embedding"}
    assert not set(batch) & TEXT_KEYS
    assert torch.equal(batch["encoder_outputs"][0][:, 0], torch.as_tensor(pooled))
    hard = audio_rows(pooled, labels=[0, 1, 2, 0])
    assert set(PooledStatesCollator()(hard)) == {"encoder_outputs", "labels"}
    with pytest.raises(ValueError, match=r"carries text columns \['text'\]"):
        PooledStatesCollator()([{**rows[0], "text": "the transcript"}])
    with pytest.raises(ValueError, match=r"carries text columns \['input_ids'\]"):
        PooledStatesCollator()([{**rows[0], "input_ids": [1, 2]}])
    with pytest.raises(ValueError, match="needs teacher_logits .* or labels"):
        audio_rows(pooled)
    with pytest.raises(ValueError, match="teacher_logits has 3 rows but there are 4 clips"):
        audio_rows(pooled, teacher_logits=logits[:3])


def test_standardize_projector_z_scores_the_training_states():
    student = whisper_audio_classifier(tiny_asr(), 3, classifier_proj_size=32, freeze_encoder=True)
    x = np.random.default_rng(0).normal(5.0, 3.0, (50, 32)).astype(np.float32)
    standardize_projector(student, x)
    with torch.no_grad():
        z = student.projector(torch.as_tensor(x))
    assert torch.allclose(z.mean(0), torch.zeros(32), atol=1e-4)
    assert torch.allclose(z.std(0), torch.ones(32), atol=1e-4)
    with pytest.raises(ValueError, match="square projector"):
        standardize_projector(whisper_audio_classifier(tiny_asr(), 3, classifier_proj_size=16), x)


def args_for(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=1, report_to=[], use_cpu=True,
                disable_tqdm=True, save_strategy="no", seed=0, distillation=[{"loss": "kl"}], task_weight=0.0,
                remove_unused_columns=False, learning_rate=1e-2, lr_scheduler_type="constant", logging_steps=10)
    base.update(kw)
    return DistillationArguments(**base)


def test_speech_student_learns_the_text_teachers_distribution_from_audio(tmp_path):
    tokenizer = make_wordpiece_tokenizer()
    teacher = text_teacher(tokenizer)
    topic_texts = ["the bank raised rates", "the team won the match", "the band played a new song"]
    audio, y = tones(8)
    t_logits, t_emb = teacher_outputs(teacher, tokenizer, [topic_texts[c] for c in y])  # text only
    asr = tiny_asr()
    fe = WhisperFeatureExtractor(feature_size=8, sampling_rate=RATE, chunk_length=1)
    student = whisper_audio_classifier(asr, 3, classifier_proj_size=16, freeze_encoder=True, seed=1)
    pooled = pooled_whisper_states(student, fe, audio)
    rows = audio_rows(pooled, teacher_logits=t_logits, teacher_embedding=t_emb)
    seen = []
    student.register_forward_pre_hook(lambda m, a, kw: seen.append(set(kw)), with_kwargs=True)
    with pytest.raises(ValueError, match="width 16 but the teacher.s 8; build the student with classifier_proj_size=8"):
        trainer = CrossModalTrainer(model=student, args=args_for(tmp_path), train_dataset=rows,
                                    data_collator=PooledStatesCollator(), teacher_source="stored", embedding_weight=1.0)
        trainer.compute_loss(student, PooledStatesCollator()(
            audio_rows(pooled[:2], teacher_logits=t_logits[:2], teacher_embedding=np.ones((2, 8), np.float32))))
    trainer = CrossModalTrainer(model=student, args=args_for(tmp_path, max_steps=60), train_dataset=rows,
                                data_collator=PooledStatesCollator(), teacher_source="stored", embedding_weight=0.5)
    assert trainer.teachers == []  # no teacher model runs: the teacher's outputs are columns of the batch

    def kl_and_cos():
        logits = torch.as_tensor(predict_pooled(student, pooled))
        with torch.no_grad():
            e = student.projector(torch.as_tensor(pooled))
        return (float(losses.kl_div_loss(logits, torch.as_tensor(t_logits), temperature=1.0)),
                float((1 - F.cosine_similarity(e, torch.as_tensor(t_emb), dim=-1)).mean()))

    batch = PooledStatesCollator()(rows[:8])
    student.train()  # no dropout in this model: the training-mode loss, as the trainer computes it
    with_align = trainer.compute_loss(student, dict(batch))
    trainer.embedding_weight = 0.0
    without = trainer.compute_loss(student, dict(batch))
    trainer.embedding_weight = 0.5
    with torch.no_grad():
        e = student.projector(batch["encoder_outputs"][0]).mean(1)
    cos = (1 - F.cosine_similarity(e, batch["teacher_embedding"], dim=-1)).mean()
    assert torch.allclose(with_align - without, 0.5 * cos, atol=1e-5)

    (kl0, cos0), seen[:] = kl_and_cos(), []
    trainer.train()
    kl1, cos1 = kl_and_cos()
    assert kl1 < 0.5 * kl0 and cos1 < cos0, (kl0, kl1, cos0, cos1)
    assert seen and all(keys & TEXT_KEYS == set() and "encoder_outputs" in keys for keys in seen)
    logged = [h for h in trainer.state.log_history if "embedding_cos" in h]
    assert logged and logged[-1]["loss_kd"] < logged[0]["loss_kd"]


def write_clips(folder: Path, prefix: str, texts: list[str], voices: list[str], seconds: float, seed: int):
    """Clips as the recipe's synthesis step leaves them (wav files + manifest), so that it synthesizes nothing."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, text in enumerate(texts):
        name = f"{prefix}{i:05d}.wav"
        n = int(seconds * RATE * rng.uniform(0.5, 0.9))
        sf.write(folder / name, (0.1 * rng.standard_normal(n)).astype(np.float32), RATE, subtype="PCM_16")
        rows.append((name, voices[i % len(voices)], text))
    with open(folder / f"{prefix}_manifest.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "voice", "text"])
        writer.writerows(rows)


def test_recipe_end_to_end_on_tiny_models(tmp_path, monkeypatch):
    import cross_modal_bbc
    from hf_distill.speech import synth
    from hf_distill.tasks.classification_data import load_classification_data, stratified_split

    data = load_classification_data(source="bbc_news", test_size=0.2, seed=42)
    tokenizer = make_wordpiece_tokenizer()
    torch.manual_seed(0)
    teacher = BertForSequenceClassification(tiny_bert_config(
        len(tokenizer), layers=1, hidden=32, num_labels=5, id2label=dict(enumerate(data.labels)),
        label2id={n: i for i, n in enumerate(data.labels)}))
    teacher.save_pretrained(tmp_path / "teacher")
    tokenizer.save_pretrained(tmp_path / "teacher")
    tiny_asr().save_pretrained(tmp_path / "whisper")
    WhisperFeatureExtractor(feature_size=8, sampling_rate=RATE).save_pretrained(tmp_path / "whisper")
    voices = "flite:kal16,flite:awb"
    for prefix, split, n in (("train", data.train, 10), ("eval", data.test, 10)):
        texts = [spoken_text(t, 32) for t in stratified_split(split, "label", test_size=n, seed=42)[1]["text"]]
        write_clips(tmp_path / "clips", prefix, texts, voices.split(","), seconds=1.0, seed=len(prefix))
    monkeypatch.setattr(synth, "synthesize", lambda *a, **k: pytest.fail("the clips are cached: nothing to speak"))
    out = tmp_path / "out"
    results = cross_modal_bbc.main([
        "--config", str(Path(__file__).resolve().parents[1] / "recipes/configs/cross_modal_bbc.yaml"),
        "--teacher", str(tmp_path / "teacher"), "--whisper", str(tmp_path / "whisper"), "--train_clips", "10",
        "--eval_clips", "10", "--voices", voices, "--clips_dir", str(tmp_path / "clips"), "--window_seconds", "1",
        "--classifier_proj_size", "32", "--output_dir", str(out), "--num_train_epochs", "2", "--bootstrap_resamples",
        "200"])
    names = [m["name"] for m in results["models"]]
    assert names == ["text teacher", "speech student, hard labels", "speech student, distilled",
                     "speech student, distilled + embedding"]
    assert all(m["n"] == 10 and 0 <= m["accuracy_ci"][0] <= m["accuracy"] <= m["accuracy_ci"][1] <= 1
               for m in results["models"])
    assert set(results["comparisons"]) >= {"distilled minus hard labels", "text teacher minus distilled"}
    assert results["training"]["steps"] == 2 and (out / "results.md").is_file()
    from transformers import AutoModelForAudioClassification

    student = AutoModelForAudioClassification.from_pretrained(out / "distilled")  # a plain classifier folder
    assert type(student).__name__ == "WhisperForAudioClassification" and student.config.max_source_positions == 50
    # A rerun reuses the cached encoder features.
    features = out / "features_train.npy"
    stamp = features.stat().st_mtime_ns
    cross_modal_bbc.main(["--config", str(Path(__file__).resolve().parents[1] / "recipes/configs/cross_modal_bbc.yaml"),
                          "--teacher", str(tmp_path / "teacher"), "--whisper", str(tmp_path / "whisper"),
                          "--train_clips", "10", "--eval_clips", "10", "--voices", voices, "--clips_dir",
                          str(tmp_path / "clips"), "--window_seconds", "1", "--classifier_proj_size", "32",
                          "--output_dir", str(out), "--num_train_epochs", "1", "--bootstrap_resamples", "200"])
    assert features.stat().st_mtime_ns == stamp


@pytest.mark.synth
def test_speak_clips_uses_several_voices_and_caches(tmp_path):
    texts = ["Ad sales boost Time Warner profit.", "Dollar gains on Greenspan speech.", "Yukos unit buyer faces loan claim."]
    clips = speak_clips(texts, tmp_path, [("flite", "kal16"), ("flite", "awb")], prefix="train")
    assert [v for _, v in clips] == ["flite:kal16", "flite:awb", "flite:kal16"]
    for path, _ in clips:
        info = sf.info(str(path))
        assert info.samplerate == RATE and info.channels == 1 and info.duration > 0.5
    stamps = [p.stat().st_mtime_ns for p, _ in clips]
    again = speak_clips(texts, tmp_path, [("flite", "kal16"), ("flite", "awb")], prefix="train")
    assert [p.stat().st_mtime_ns for p, _ in again] == stamps  # cached
    changed = speak_clips(texts[:1] + ["Another text."] + texts[2:], tmp_path, [("flite", "kal16"), ("flite", "awb")],
                          prefix="train")
    assert [p.stat().st_mtime_ns == s for (p, _), s in zip(changed, stamps)] == [True, False, True]
