"""DistillationTrainer on speech models: Whisper (teacher forcing from labels) and CTC (frame masks)."""

import pytest
import torch
import torch.nn.functional as F
from transformers import Wav2Vec2Config, Wav2Vec2ForCTC, WhisperConfig, WhisperForConditionalGeneration

from hf_distill import DistillationArguments, DistillationTrainer, losses


def args_for(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=1, report_to=[], use_cpu=True,
                disable_tqdm=True, cos_weight=0.0, save_strategy="no")
    base.update(kw)
    return DistillationArguments(**base)


def tiny_whisper(decoder_layers, seed):
    torch.manual_seed(seed)
    config = WhisperConfig(vocab_size=60, d_model=32, encoder_layers=2, decoder_layers=decoder_layers,
                           encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                           decoder_ffn_dim=64, num_mel_bins=8, max_source_positions=20, max_target_positions=32,
                           pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
                           dropout=0.0, attention_dropout=0.0)
    return WhisperForConditionalGeneration(config)


def test_whisper_kd_with_teacher_forcing(tmp_path):
    teacher, student = tiny_whisper(4, 0), tiny_whisper(2, 1)
    trainer = DistillationTrainer(model=student, teacher=teacher, args=args_for(tmp_path, task_weight=0.8,
                                                                                 kd_weight=1.0))
    feats = torch.randn(3, 8, 40)
    labels = torch.tensor([[5, 6, 7, 2], [8, 9, 2, -100], [10, 2, -100, -100]])
    student.eval()
    loss = trainer.compute_loss(student, {"input_features": feats, "labels": labels})
    decoder_inputs = torch.tensor([[1, 5, 6, 7], [1, 8, 9, 2], [1, 10, 2, 0]])
    with torch.no_grad():
        s = student(input_features=feats, decoder_input_ids=decoder_inputs).logits
        t = teacher(input_features=feats, decoder_input_ids=decoder_inputs).logits
        # The model's own teacher forcing gives the same logits.
        assert torch.allclose(s, student(input_features=feats, labels=labels).logits, atol=1e-6)
    mask = labels != -100
    expected = 1.0 * losses.kl_div_loss(s, t, temperature=2.0, mask=mask) + 0.8 * F.cross_entropy(
        s.reshape(-1, 60), labels.reshape(-1), ignore_index=-100)
    assert torch.allclose(loss, expected, rtol=1e-5)


def tiny_ctc(layers, seed):
    torch.manual_seed(seed)
    config = Wav2Vec2Config(vocab_size=12, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                            intermediate_size=64, conv_dim=(16, 16), conv_stride=(5, 4), conv_kernel=(10, 8),
                            num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=2, pad_token_id=0,
                            feat_extract_norm="layer", do_stable_layer_norm=True, hidden_dropout=0.0,
                            attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0,
                            final_dropout=0.0, layerdrop=0.0, mask_time_prob=0.0)
    return Wav2Vec2ForCTC(config)


def test_ctc_frame_masked_kd_and_ctc_loss(tmp_path):
    teacher, student = tiny_ctc(3, 0), tiny_ctc(1, 1)
    trainer = DistillationTrainer(model=student, teacher=teacher, args=args_for(tmp_path, task_weight=0.5,
                                                                                 kd_weight=1.0))
    values = torch.randn(2, 1600)
    attention = torch.ones(2, 1600, dtype=torch.long)
    attention[1, 900:] = 0
    labels = torch.tensor([[3, 4, 5], [6, 7, -100]])
    student.eval()
    inputs = {"input_values": values, "attention_mask": attention, "labels": labels}
    loss = trainer.compute_loss(student, inputs)
    with torch.no_grad():
        s = student(input_values=values, attention_mask=attention).logits
        t = teacher(input_values=values, attention_mask=attention).logits
    lengths = student._get_feat_extract_output_lengths(attention.sum(-1))
    frames = torch.arange(s.shape[1])[None] < lengths[:, None]
    assert frames[1].sum() < frames[0].sum()
    kd = losses.kl_div_loss(s, t, temperature=2.0, mask=frames)
    log_probs = F.log_softmax(s, -1).transpose(0, 1)
    ctc = F.ctc_loss(log_probs, torch.tensor([3, 4, 5, 6, 7]), lengths, torch.tensor([3, 2]), blank=0,
                     reduction="sum", zero_infinity=True) / 2
    assert torch.allclose(loss, kd + 0.5 * ctc, rtol=1e-5)
    # Padding frames never matter.
    values2 = values.clone()
    values2[1, 900:] = 100.0
    loss2 = trainer.compute_loss(student, {**inputs, "input_values": values2})
    assert torch.allclose(loss, loss2, rtol=1e-4)
