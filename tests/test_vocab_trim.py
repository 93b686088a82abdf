"""Vocabulary trimming of Whisper students (hf_distill.speech.vocab_trim): tokenizer, model, trainer, recipe."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, WhisperForConditionalGeneration, WhisperProcessor
from transformers.modeling_outputs import BaseModelOutput

from hf_distill.speech.training import IGNORE_INDEX, WhisperDistillationTrainer, WhisperPseudoLabelDataset
from hf_distill.speech.vocab_trim import VocabularyMap, trim_whisper_vocabulary, whisper_kept_token_ids
from test_pseudo_label import whisper_dir, write_clips  # noqa: F401 - whisper_dir: a fixture

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "recipes"))

import distil_whisper  # noqa: E402

TEXTS = ["the cat sat on the mat", "a red dog ran fast", "music in the dark house"]


def _teacher(path):
    torch.manual_seed(0)
    return WhisperForConditionalGeneration.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def _bpe_parents(tokenizer) -> dict[str, tuple[str, str]]:
    spec = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in spec["merges"]]
    return {a + b: (a, b) for a, b in merges}


def test_kept_ids_hold_specials_bytes_text_tokens_and_their_merge_pieces(whisper_dir):
    _, tok = _teacher(whisper_dir)
    kept = set(whisper_kept_token_ids(tok, texts=TEXTS[:1]))
    vocab = tok.get_vocab()
    assert all(tok.convert_tokens_to_ids(t) in kept for t in ("<|startoftranscript|>", "<|notimestamps|>",
                                                               "<|0.00|>", "<|30.00|>", "<|endoftext|>"))
    assert all(i in kept for t, i in vocab.items() if len(t) == 1)
    assert set(tok.encode(TEXTS[0], add_special_tokens=False)) <= kept
    by_id = {i: t for t, i in vocab.items()}
    parents = _bpe_parents(tok)
    for i in kept:
        for piece in parents.get(by_id[i], ()):
            assert vocab[piece] in kept  # closure: every kept token can be built by the kept merges
    fewer = set(whisper_kept_token_ids(tok))
    assert fewer < kept and len(kept) < len(tok)
    with pytest.raises(ValueError, match="outside"):
        whisper_kept_token_ids(tok, token_ids=[[len(tok) + 3]])


def test_trimmed_tokenizer_encodes_kept_texts_with_the_same_pieces(whisper_dir):
    teacher, tok = _teacher(whisper_dir)
    kept = whisper_kept_token_ids(tok, texts=TEXTS)
    _, small, vmap = trim_whisper_vocabulary(copy.deepcopy(teacher), tok, kept)
    assert len(small) == vmap.size == len(kept) < len(tok)
    for text in TEXTS + [" " + t for t in TEXTS]:
        ids = tok.encode(text, add_special_tokens=False)
        assert small.encode(text, add_special_tokens=False) == vmap.to_student(ids)
        assert small.decode(vmap.to_student(ids)) == text
    unseen = "zzq xylophone"  # pieces outside the kept set: written with smaller pieces, still exact
    assert small.decode(small.encode(unseen, add_special_tokens=False)) == unseen
    for name in ("<|startoftranscript|>", "<|notimestamps|>", "<|1.00|>"):
        assert small.convert_ids_to_tokens(vmap.to_student([tok.convert_tokens_to_ids(name)]))[0] == name
    with pytest.raises(ValueError, match="dropped"):
        vmap.to_student([i for i in range(len(tok)) if i not in set(kept)][:1])


def test_trimmed_model_scores_equal_the_teachers_kept_rows_and_configs_are_renumbered(whisper_dir):
    teacher, tok = _teacher(whisper_dir)
    kept = whisper_kept_token_ids(tok, texts=TEXTS)
    student, small, vmap = trim_whisper_vocabulary(copy.deepcopy(teacher), tok, kept)
    assert student.config.vocab_size == vmap.size
    assert student.get_output_embeddings().weight is student.get_input_embeddings().weight  # still tied
    tg, sg = teacher.generation_config, student.generation_config
    assert small.convert_ids_to_tokens(sg.decoder_start_token_id) == tok.convert_ids_to_tokens(tg.decoder_start_token_id)
    assert small.convert_ids_to_tokens(sg.no_timestamps_token_id + 1) == "<|0.00|>"  # timestamps follow, in order
    assert sorted(small.convert_ids_to_tokens(sg.suppress_tokens)) == sorted(
        t for t in tok.convert_ids_to_tokens(tg.suppress_tokens) if tok.convert_tokens_to_ids(t) in set(kept))
    feats = torch.randn(2, 80, 3000)
    ids = torch.tensor([tok.encode(" the cat sat", add_special_tokens=False)] * 2)
    with torch.no_grad():
        hidden = teacher.get_encoder()(feats).last_hidden_state
        full = teacher(encoder_outputs=(hidden,), decoder_input_ids=ids).logits
        small_logits = student(encoder_outputs=(hidden,),
                               decoder_input_ids=torch.as_tensor(vmap.lookup[ids.numpy()])).logits
    torch.testing.assert_close(small_logits, full[..., torch.as_tensor(vmap.kept)], rtol=1e-5, atol=1e-5)


def test_trimmed_student_generates_the_teachers_text_and_loads_as_a_plain_whisper(whisper_dir, tmp_path):
    from transformers import pipeline

    teacher, tok = _teacher(whisper_dir)
    processor = WhisperProcessor.from_pretrained(whisper_dir)
    torch.manual_seed(1)
    feats = torch.randn(3, 80, 3000)
    with torch.no_grad():
        hidden = teacher.get_encoder()(feats).last_hidden_state
        out = teacher.generate(encoder_outputs=BaseModelOutput(last_hidden_state=hidden), max_new_tokens=12)
    expected = tok.batch_decode(out, skip_special_tokens=True)
    assert any(t.strip() for t in expected)
    # every token the teacher emitted is kept, so each greedy argmax over the kept rows is the teacher's
    student, small, vmap = trim_whisper_vocabulary(copy.deepcopy(teacher), tok,
                                                   whisper_kept_token_ids(tok, token_ids=out.tolist()))
    student.save_pretrained(tmp_path / "s")
    WhisperProcessor(feature_extractor=processor.feature_extractor, tokenizer=small).save_pretrained(tmp_path / "s")
    loaded = WhisperForConditionalGeneration.from_pretrained(tmp_path / "s").eval()
    reloaded = WhisperProcessor.from_pretrained(tmp_path / "s").tokenizer
    assert loaded.config.vocab_size == vmap.size < teacher.config.vocab_size
    with torch.no_grad():
        got = loaded.generate(encoder_outputs=BaseModelOutput(last_hidden_state=hidden), max_new_tokens=12)
    assert reloaded.batch_decode(got, skip_special_tokens=True) == expected
    asr = pipeline("automatic-speech-recognition", model=str(tmp_path / "s"), device="cpu")
    assert isinstance(asr(np.zeros(16000, np.float32), generate_kwargs={"max_new_tokens": 4})["text"], str)


def test_vocabulary_map_validates_and_round_trips():
    vmap = VocabularyMap(np.array([0, 3, 7]), 10)
    assert vmap.lookup.tolist() == [0, -1, -1, 1, -1, -1, -1, 2, -1, -1]
    assert VocabularyMap.from_dict(vmap.to_dict()).kept.tolist() == [0, 3, 7]
    for bad in ([3, 3], [5, 2], [], [0, 10]):
        with pytest.raises(ValueError):
            VocabularyMap(np.array(bad, dtype=np.int64), 10)


def test_dataset_renumbers_labels_and_refuses_dropped_tokens_and_stored_soft_labels(whisper_dir):
    _, tok = _teacher(whisper_dir)
    fe = WhisperProcessor.from_pretrained(whisper_dir).feature_extractor
    prompt = [tok.convert_tokens_to_ids(t) for t in ("<|startoftranscript|>", "<|notimestamps|>")]
    tokens = tok.encode(" the cat", add_special_tokens=False) + [tok.eos_token_id]
    kept = whisper_kept_token_ids(tok, token_ids=[prompt, tokens])
    vmap = VocabularyMap(np.asarray(kept), len(tok))
    row = {"id": "a", "prompt_ids": prompt, "token_ids": tokens}
    example = WhisperPseudoLabelDataset([row], fe, vocabulary=vmap).example(row)
    assert example["decoder_input_ids"] == vmap.to_student(prompt + tokens[:-1])
    assert example["labels"] == [IGNORE_INDEX] + vmap.to_student(tokens)
    dropped = next(i for i in range(len(tok)) if i not in set(kept))
    bad = {"id": "b", "prompt_ids": prompt, "token_ids": [dropped]}
    with pytest.raises(ValueError, match="row 'b'.*dropped"):
        WhisperPseudoLabelDataset([bad], fe, vocabulary=vmap).example(bad)
    with pytest.raises(ValueError, match="soft_labels live"):
        WhisperPseudoLabelDataset([row], fe, vocabulary=vmap, soft_labels=True)


@pytest.mark.parametrize("shared", [True, False])
def test_live_teacher_scores_the_kept_rows_of_its_own_vocabulary(whisper_dir, tmp_path, shared):
    from hf_distill import DistillationArguments
    from hf_distill.students import build_whisper_student

    teacher, tok = _teacher(whisper_dir)
    kept = whisper_kept_token_ids(tok, texts=TEXTS)
    student = build_whisper_student(teacher, 1, freeze_encoder=True)
    student, _, vmap = trim_whisper_vocabulary(student, tok, kept)
    args = DistillationArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, disable_tqdm=True,
                                 save_strategy="no", cos_weight=0.0, kd_weight=1.0, task_weight=0.0, temperature=2.0)
    trainer = WhisperDistillationTrainer(model=student, teacher=teacher, args=args, vocabulary=vmap,
                                         share_encoder=None if shared else False)
    assert trainer.encoder_shared is shared
    feats = torch.randn(2, 80, 3000)
    teacher_ids = torch.tensor([tok.encode(" the cat sat on", add_special_tokens=False)] * 2)
    student_ids = torch.as_tensor(vmap.lookup[teacher_ids.numpy()])
    with torch.no_grad():
        full = teacher(input_features=feats, decoder_input_ids=teacher_ids).logits[..., torch.as_tensor(vmap.kept)]
        hidden = teacher.get_encoder()(feats).last_hidden_state
    inputs = ({"encoder_outputs": (hidden,), "decoder_input_ids": student_ids} if shared
              else {"input_features": feats, "decoder_input_ids": student_ids})
    torch.testing.assert_close(trainer.teacher_forward(0, inputs).logits, full, rtol=1e-5, atol=1e-5)
    # the KL of a training step reads those rows: its gradient reaches the trimmed output layer
    labels = torch.cat([student_ids[:, 1:], torch.full((2, 1), IGNORE_INDEX)], dim=1)
    loss = trainer.compute_loss(trainer.model, {**inputs, "labels": labels})
    loss.backward()
    assert torch.isfinite(loss) and student.get_output_embeddings().weight.grad.abs().sum() > 0
    fe = WhisperProcessor.from_pretrained(whisper_dir).feature_extractor
    with pytest.raises(ValueError, match="not renumbered"):  # a dataset left in the teacher's ids
        WhisperDistillationTrainer(model=student, teacher=teacher, args=args, vocabulary=vmap,
                                   train_dataset=WhisperPseudoLabelDataset([], fe))
    WhisperDistillationTrainer(model=student, teacher=teacher, args=args, vocabulary=vmap,
                               train_dataset=WhisperPseudoLabelDataset([], fe, vocabulary=vmap))
    wrong = VocabularyMap(vmap.kept, vmap.teacher_size + 1)
    with pytest.raises(ValueError, match="but the vocabulary map keeps"):
        WhisperDistillationTrainer(model=student, teacher=teacher, args=args, vocabulary=wrong)


def test_distil_whisper_recipe_trains_a_trimmed_student(whisper_dir, tmp_path):
    from transformers import pipeline

    clips = write_clips(tmp_path / "clips", [1.0, 2.0, 1.5, 3.0, 0.8, 2.5], bad=False)
    manifest = tmp_path / "eval.csv"
    manifest.write_text("path,text\n" + "".join(f"{p},the cat sat on the mat\n" for p in sorted(clips.rglob("*.*"))[:2]))
    out = tmp_path / "run"
    flags = ["--teacher", str(whisper_dir), "--audio", str(clips), "--output_dir", str(out), "--eval_audio", str(manifest),
             "--freeze_encoder", "true", "--num_decoder_layers", "1", "--keep_only", "false", "--max_steps", "8",
             "--learning_rate", "3e-3", "--logging_steps", "2", "--per_device_train_batch_size", "4",
             "--save_strategy", "no", "--report_to", "none", "--use_cpu", "true", "--disable_tqdm", "true"]
    with pytest.raises(ValueError, match="trim_vocabulary needs --soft_labels live"):
        distil_whisper.main(flags + ["--trim_vocabulary", "true", "--soft_labels", "stored"])
    results = distil_whisper.main(flags + ["--trim_vocabulary", "true", "--cache_encoder_outputs", "true",
                                           "--cross_attention_weight", "0.5"])
    losses = [h["loss"] for h in results["loss"]["history"]]
    assert len(losses) >= 3 and losses[-1] < losses[0]
    # the teacher's cross-attention reaches the term through the trimmed output layer's path too
    assert all(h["loss_cross_attention_kl"] > 0 for h in results["loss"]["history"])
    teacher_vocab = WhisperForConditionalGeneration.from_pretrained(whisper_dir).config.vocab_size
    assert results["student"]["vocabulary"] < teacher_vocab
    saved = WhisperForConditionalGeneration.from_pretrained(out / "student")
    assert saved.config.vocab_size == results["student"]["vocabulary"]
    assert len(WhisperProcessor.from_pretrained(out / "student").tokenizer) == saved.config.vocab_size
    assert np.isfinite(results["eval"]["student"]["wer"]) and results["eval"]["student"]["n"] == 2
    asr = pipeline("automatic-speech-recognition", model=str(out / "student"), device="cpu")
    assert isinstance(asr(np.zeros(16000, np.float32), generate_kwargs={"max_new_tokens": 4})["text"], str)
    # the labeller takes the trimmed student as its model, packed and not, with top-k soft labels in its ids
    from hf_distill.speech.labelling import PseudoLabelConfig, load_pseudo_labels, pseudo_label

    common = dict(input=str(clips), model=str(out / "student"), batch_size=4, progress=False)
    pseudo_label(PseudoLabelConfig(output_dir=str(tmp_path / "packed"), **common))
    pseudo_label(PseudoLabelConfig(output_dir=str(tmp_path / "plain"), pack=False, top_k=3, **common))
    for name in ("packed", "plain"):
        labelled = load_pseudo_labels(tmp_path / name)
        assert len(labelled) == 6
        assert all(0 <= i < saved.config.vocab_size for row in labelled for i in row["token_ids"])
    assert all(0 <= i < saved.config.vocab_size for row in load_pseudo_labels(tmp_path / "plain")
               for pos in row["topk_indices"] for i in pos)


def test_trim_vocabulary_texts_add_their_tokens_and_wrong_flags_are_refused(whisper_dir, tmp_path):
    clips = write_clips(tmp_path / "clips", [1.0, 2.0, 1.5, 0.8], bad=False)
    out = tmp_path / "run"
    flags = ["--teacher", str(whisper_dir), "--audio", str(clips), "--output_dir", str(out), "--eval_size", "0",
             "--freeze_encoder", "true", "--num_decoder_layers", "1", "--keep_only", "false", "--max_steps", "1",
             "--per_device_train_batch_size", "4", "--save_strategy", "no", "--report_to", "none", "--use_cpu", "true",
             "--disable_tqdm", "true"]
    with pytest.raises(ValueError, match="only with --trim_vocabulary true"):
        distil_whisper.main(flags + ["--trim_vocabulary_texts", "corpus"])
    with pytest.raises(FileNotFoundError, match="no such file"):
        distil_whisper.main(flags + ["--trim_vocabulary", "true", "--trim_vocabulary_texts", str(tmp_path / "none")])
    with pytest.raises(ValueError, match="needs --corpus bbc_news"):
        distil_whisper.main(flags + ["--trim_vocabulary", "true", "--trim_vocabulary_texts", "corpus"])
    plain = distil_whisper.main(flags + ["--trim_vocabulary", "true"])["student"]["vocabulary"]
    text = tmp_path / "texts.txt"
    text.write_text("green house tree river\nstone light dark music\n", encoding="utf-8")
    wider = distil_whisper.main(flags + ["--output_dir", str(tmp_path / "run2"), "--trim_vocabulary", "true",
                                         "--trim_vocabulary_texts", str(text)])["student"]["vocabulary"]
    tok = AutoTokenizer.from_pretrained(whisper_dir)
    extra = set(whisper_kept_token_ids(tok, texts=text.read_text().splitlines())) - set(
        whisper_kept_token_ids(tok))
    assert plain <= wider <= plain + len(extra) and wider > plain - 1


def test_bbc_training_sentences_are_the_training_articles_and_held_out_sentences_avoid_them(tmp_path, monkeypatch):
    from hf_distill.speech import corpus
    from hf_distill.tasks.classification_data import load_bbc_news

    articles = load_bbc_news()["text"]
    train_idx, _ = corpus.article_split(articles, 0.15, seed=0)
    sentences = corpus.bbc_training_sentences(seed=0)
    assert len(sentences) > 10_000
    assert set(corpus.plain_sentences([articles[i] for i in train_idx])) <= set(sentences)
    spoken = {}

    def fake_speak(texts, out_dir, voices, *, prefix="clip", **kw):  # record the texts instead of speaking them
        spoken[prefix] = list(texts)
        return [(Path(out_dir) / f"{prefix}{i:05d}.wav", "v") for i in range(len(texts))]

    monkeypatch.setattr(corpus, "speak_clips", fake_speak)
    corpus.bbc_spoken_corpus(tmp_path, train_sentences=50, voices=[("flite", "kal")], eval_sentences=400,
                             eval_voices=[("flite", "rms")], seed=0, progress=False)
    # the BBC set repeats stories across articles: no held-out sentence occurs in a training article
    assert len(spoken["eval"]) == 400 and not set(spoken["eval"]) & set(sentences)
