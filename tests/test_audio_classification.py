"""Audio classification students (Whisper-encoder and wav2vec2-style classifiers) through DistillationTrainer:
kinds, frame masks over real audio, hand-computed losses, a short run where the KL falls, unsupported pairs."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import (BertConfig, BertForSequenceClassification, Wav2Vec2Config, Wav2Vec2FeatureExtractor,
                          Wav2Vec2ForSequenceClassification, WhisperConfig, WhisperFeatureExtractor,
                          WhisperForConditionalGeneration)

from hf_distill import DistillationArguments, DistillationTrainer, losses
from hf_distill.modeling import num_attention_heads, num_layers, output_size, task_kind
from hf_distill.speech.audio_classification import (AudioClassificationCollator, PooledStatesCollator,
                                                    pooled_whisper_states, whisper_audio_classifier)

RATE = 16000


def args_for(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=1, report_to=[], use_cpu=True,
                disable_tqdm=True, save_strategy="no", seed=0, task_weight=0.5)
    base.update(kw)
    return DistillationArguments(**base)


def whisper_config(encoder_layers=2, decoder_layers=1, d_model=32, positions=50, heads=2):
    # 1 s window: 100 log-mel frames -> 50 encoder frames (Whisper proper: 3000 -> 1500 for 30 s).
    return WhisperConfig(vocab_size=40, d_model=d_model, encoder_layers=encoder_layers, decoder_layers=decoder_layers,
                         encoder_attention_heads=heads, decoder_attention_heads=2, encoder_ffn_dim=64,
                         decoder_ffn_dim=64, num_mel_bins=8, max_source_positions=positions, max_target_positions=16,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1, dropout=0.0,
                         attention_dropout=0.0, activation_dropout=0.0)


def whisper_classifier(seed, labels=3, **kw):
    torch.manual_seed(seed)
    asr = WhisperForConditionalGeneration(whisper_config(**kw))
    return whisper_audio_classifier(asr, labels, classifier_proj_size=16, seed=seed), asr


def whisper_fe(seconds=1):
    return WhisperFeatureExtractor(feature_size=8, sampling_rate=RATE, chunk_length=seconds)


def wav2vec2_classifier(layers, seed, labels=3, hidden=32):
    torch.manual_seed(seed)
    config = Wav2Vec2Config(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=64,
                            conv_dim=(16, 16), conv_stride=(5, 4), conv_kernel=(10, 8), num_conv_pos_embeddings=8,
                            num_conv_pos_embedding_groups=2, feat_extract_norm="layer", do_stable_layer_norm=True,
                            hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0,
                            final_dropout=0.0, layerdrop=0.0, mask_time_prob=0.0, num_labels=labels,
                            classifier_proj_size=16)
    return Wav2Vec2ForSequenceClassification(config)


def clips(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [(0.3 * rng.standard_normal(n)).astype(np.float32) for n in lengths]


def test_audio_classifiers_are_clip_classifiers_with_encoder_sizes():
    whisper, asr = whisper_classifier(0, labels=5, encoder_layers=3, decoder_layers=1, heads=4)
    w2v = wav2vec2_classifier(2, 0, labels=4)
    assert task_kind(whisper) == task_kind(w2v) == "sequence_classification"
    assert output_size(whisper) == 5 and output_size(w2v) == 4
    # A Whisper classifier runs the encoder only: its layers and heads are the encoder's, not the decoder's.
    assert num_layers(whisper) == 3 and num_attention_heads(whisper) == 4
    assert num_layers(asr) == 1  # the ASR model itself still counts decoder layers by default
    assert len(whisper(input_features=torch.randn(2, 8, 100), output_hidden_states=True).hidden_states) == 4
    # The encoder is the ASR model's, copied.
    assert torch.equal(whisper.encoder.layers[0].fc1.weight, asr.model.encoder.layers[0].fc1.weight)
    short = whisper_audio_classifier(asr, 5, max_source_positions=20)  # a 0.4 s window: 40 mel frames
    assert short.config.max_source_positions == 20
    assert torch.equal(short.encoder.embed_positions.weight, asr.model.encoder.embed_positions.weight[:20])
    assert short(input_features=torch.randn(1, 8, 40)).logits.shape == (1, 5)
    frozen = whisper_audio_classifier(asr, 5, freeze_encoder=True)
    trainable = {n for n, p in frozen.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("projector", "classifier")) for n in trainable)


def test_whisper_pair_kd_and_hidden_loss_count_real_frames_only(tmp_path):
    student, _ = whisper_classifier(1, encoder_layers=1)
    teacher, _ = whisper_classifier(2, encoder_layers=2)
    batch = AudioClassificationCollator(whisper_fe())(
        [{"audio": a, "label": y} for a, y in zip(clips([9600, 4800, 16000]), [0, 2, 1])])
    assert batch["input_features"].shape == (3, 8, 100)
    assert batch["attention_mask"].sum(-1).tolist() == [60, 30, 100]  # log-mel frames of real audio (hop 160)
    spec = [{"loss": "kl", "weight": 1.0}, {"loss": "hidden_mse", "layers": "1:2", "weight": 0.5}]
    trainer = DistillationTrainer(model=student, teacher=teacher, args=args_for(tmp_path, distillation=spec))
    masks = trainer.objective.masks(batch, batch["labels"])
    frames = torch.arange(50)[None] < torch.tensor([30, 15, 50])[:, None]  # (mel - 1) // 2 + 1 encoder frames
    assert masks["kd"] is None and torch.equal(masks["hidden"], frames)
    student.eval()
    loss = trainer.compute_loss(student, dict(batch))
    with torch.no_grad():
        s = student(input_features=batch["input_features"], output_hidden_states=True)
        t = teacher(input_features=batch["input_features"], output_hidden_states=True)
    kd = losses.kl_div_loss(s.logits, t.logits, temperature=2.0)
    diff = (s.hidden_states[1] - t.hidden_states[2]).pow(2).mean(-1)
    hidden = diff[frames].sum() / frames.sum()
    assert not torch.isclose(hidden, diff.mean())  # padding frames would change the value
    ce = F.cross_entropy(s.logits, batch["labels"])  # the task term (task_weight 0.5) joins the configured terms
    assert torch.allclose(loss, kd + 0.5 * hidden + 0.5 * ce, rtol=1e-5)


def test_wav2vec2_pair_hidden_mask_maps_samples_to_frames(tmp_path):
    teacher, student = wav2vec2_classifier(3, 0, hidden=48), wav2vec2_classifier(1, 1)
    fe = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=RATE, do_normalize=True)
    batch = AudioClassificationCollator(fe)([{"audio": a, "label": i} for i, a in enumerate(clips([1600, 900]))])
    assert batch["attention_mask"].sum(-1).tolist() == [1600, 900]
    spec = [{"loss": "kl"}, {"loss": "hidden_mse", "layers": "1:3", "projection": "linear", "weight": 2.0}]
    trainer = DistillationTrainer(model=student, teacher=teacher, args=args_for(tmp_path, distillation=spec))
    masks = trainer.objective.masks(batch, batch["labels"])
    lengths = student._get_feat_extract_output_lengths(torch.tensor([1600, 900]))
    frames = torch.arange(int(lengths[0]))[None] < lengths[:, None]
    # conv (kernel 10, stride 5) then (8, 4): 1600 -> 319 -> 78, 900 -> 179 -> 43 frames
    assert frames.sum(-1).tolist() == [78, 43] and torch.equal(masks["hidden"], frames)
    student.eval()
    loss = trainer.compute_loss(student, dict(batch))
    inputs = {"input_values": batch["input_values"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        s, t = student(**inputs, output_hidden_states=True), teacher(**inputs, output_hidden_states=True)
        projected = trainer.objective.terms[1].projections["1"](s.hidden_states[1])
    diff = (projected - t.hidden_states[3]).pow(2).mean(-1)
    expected = (losses.kl_div_loss(s.logits, t.logits, temperature=2.0) + 2.0 * diff[frames].sum() / frames.sum()
                + 0.5 * F.cross_entropy(s.logits, batch["labels"]))
    assert torch.allclose(loss, expected, rtol=1e-5)


def test_whisper_student_kl_decreases_over_a_short_run(tmp_path):
    teacher, _ = whisper_classifier(3, labels=4, encoder_layers=2)
    with torch.no_grad():  # a confident teacher: sharp, input-dependent distributions
        teacher.classifier.weight.mul_(200.0)
    student, _ = whisper_classifier(4, labels=4, encoder_layers=1)
    rng = np.random.default_rng(0)
    # Four "classes" of clips: tones of different pitch, random length; the teacher's logits are its own.
    examples = []
    for i in range(32):
        n = int(rng.integers(4000, 16000))
        pitch = 200 * (1 + i % 4)
        examples.append({"audio": (0.5 * np.sin(2 * np.pi * pitch * np.arange(n) / RATE)
                                   + 0.05 * rng.standard_normal(n)).astype(np.float32)})
    collator = AudioClassificationCollator(whisper_fe())
    args = args_for(tmp_path, distillation=[{"loss": "kl"}], task_weight=0.0, max_steps=40, learning_rate=3e-3,
                    per_device_train_batch_size=8, remove_unused_columns=False, lr_scheduler_type="constant",
                    logging_steps=10)
    trainer = DistillationTrainer(model=student, teacher=teacher, args=args, train_dataset=examples,
                                  data_collator=collator)
    batch = collator(examples)

    def kl():
        student.eval()
        with torch.no_grad():
            s = student(input_features=batch["input_features"]).logits
            t = teacher(input_features=batch["input_features"]).logits
        return float(losses.kl_div_loss(s, t, temperature=1.0))

    before = kl()
    assert before > 0.05
    trainer.train()
    after = kl()
    assert after < 0.5 * before, (before, after)
    logged = [h["loss_kd"] for h in trainer.state.log_history if "loss_kd" in h]
    assert logged and logged[-1] < logged[0]


def test_pooled_frozen_encoder_states_give_the_full_forward_logits():
    student, asr = whisper_classifier(5, labels=3)
    fe = whisper_fe()
    audio = clips([8000, 16000, 3000], seed=1)
    pooled = pooled_whisper_states(asr, fe, audio, batch_size=2)
    assert pooled.shape == (3, 32)
    batch = PooledStatesCollator()([{"pooled_states": p, "label": 1} for p in pooled])
    full = AudioClassificationCollator(fe)([{"audio": a} for a in audio])
    student.eval()
    with torch.no_grad():
        expected = student(input_features=full["input_features"]).logits
        got = student(encoder_outputs=batch["encoder_outputs"]).logits
    assert torch.allclose(got, expected, atol=1e-5)


def tiny_text_classifier(labels=3):
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                                    num_attention_heads=2, intermediate_size=32, num_labels=labels))


def test_unsupported_pairs_and_inputs_have_clear_errors(tmp_path):
    whisper, _ = whisper_classifier(0)
    with pytest.raises(ValueError, match="reads input_features but the teacher .* reads input_ids.*teacher_logits"):
        DistillationTrainer(model=whisper, teacher=tiny_text_classifier(), args=args_for(tmp_path))
    with pytest.raises(ValueError, match="reads input_features but the teacher .* reads input_values"):
        DistillationTrainer(model=whisper, teacher=wav2vec2_classifier(1, 0), args=args_for(tmp_path))
    other_window, _ = whisper_classifier(1, positions=25)
    with pytest.raises(ValueError, match="'hidden_mse' compares encoder frames.*50 and the teacher 25"):
        DistillationTrainer(model=whisper, teacher=other_window, args=args_for(
            tmp_path, distillation=[{"loss": "hidden_mse"}]))
    DistillationTrainer(model=whisper, teacher=other_window, args=args_for(tmp_path, distillation=[{"loss": "kl"}]))
    with pytest.raises(ValueError, match="label"):
        DistillationTrainer(model=whisper, teacher=whisper_classifier(1, labels=4)[0], args=args_for(tmp_path))
    collator = AudioClassificationCollator(whisper_fe())
    with pytest.raises(ValueError, match=r"carries text columns \['text'\]"):
        collator([{"audio": np.zeros(100, np.float32), "text": "hello"}])
    with pytest.raises(ValueError, match="needs an 'audio' column"):
        collator([{"label": 1}])
    with pytest.raises(ValueError, match="30 s at most"):
        AudioClassificationCollator(whisper_fe(30))([{"audio": np.zeros(31 * RATE, np.float32)}])
    with pytest.raises(ValueError, match="max_source_positions must be between 1 and the encoder's 50"):
        whisper_audio_classifier(whisper_config(), 3, max_source_positions=60)
    with pytest.raises(ValueError, match="copies a Whisper encoder"):
        whisper_audio_classifier(tiny_text_classifier(), 3)


def test_audio_teachers_given_as_paths_load_with_their_audio_heads(tmp_path):
    from transformers import WhisperForAudioClassification, WhisperForConditionalGeneration

    from hf_distill.teachers import load_teacher

    classifier, _ = whisper_classifier(seed=1)
    classifier.save_pretrained(tmp_path / "classifier")
    trainer = DistillationTrainer(model=whisper_classifier(seed=2)[0], teacher=str(tmp_path / "classifier"),
                                  args=args_for(tmp_path))
    loaded = trainer.teacher
    assert isinstance(loaded, WhisperForAudioClassification)
    for a, b in zip(loaded.state_dict().values(), classifier.state_dict().values()):
        assert torch.equal(a, b)

    torch.manual_seed(0)
    seq2seq = WhisperForConditionalGeneration(whisper_config(decoder_layers=2)).eval()
    seq2seq.save_pretrained(tmp_path / "whisper")
    assert isinstance(load_teacher(tmp_path / "whisper", task="seq2seq_lm"), WhisperForConditionalGeneration)
    student = WhisperForConditionalGeneration(whisper_config(decoder_layers=1))
    trainer = DistillationTrainer(model=student, teacher=str(tmp_path / "whisper"), args=args_for(tmp_path))
    assert isinstance(trainer.teacher, WhisperForConditionalGeneration)
    # a speech-to-text checkpoint is not an audio classifier: its classifier head would be random
    with pytest.raises(ValueError, match="randomly initialised"):
        load_teacher(tmp_path / "whisper", task="sequence_classification")
