"""Hidden-state terms on encoder-decoders: decoder states by default, encoder states by name (side: encoder)."""

import pytest
import torch

from hf_distill import DistillationTrainer, losses
from test_trainer_speech import args_for, tiny_whisper

FEATS = torch.randn(3, 8, 40, generator=torch.Generator().manual_seed(0))
LABELS = torch.tensor([[5, 6, 7, 2], [8, 9, 2, -100], [10, 2, -100, -100]])
DECODER_INPUTS = torch.tensor([[1, 5, 6, 7], [1, 8, 9, 2], [1, 10, 2, 0]])


def outputs(model):
    with torch.no_grad():
        return model(input_features=FEATS, decoder_input_ids=DECODER_INPUTS, output_hidden_states=True)


def test_default_triplet_cosine_reads_decoder_states(tmp_path):
    """DistilBERT's default terms (with hidden_cos on the last layer) work on Whisper: the decoder's states,
    over the positions that carry a label."""
    teacher, student = tiny_whisper(4, 0), tiny_whisper(2, 1)
    trainer = DistillationTrainer(model=student, teacher=teacher,
                                  args=args_for(tmp_path, cos_weight=1.0, kd_weight=0.0, task_weight=0.0))
    student.eval()
    loss = trainer.compute_loss(student, {"input_features": FEATS, "labels": LABELS})
    s, t = outputs(student), outputs(teacher)
    expected = losses.cosine_loss(s.decoder_hidden_states[-1], t.decoder_hidden_states[-1], mask=LABELS != -100)
    assert torch.allclose(loss, expected, rtol=1e-5)


def test_encoder_side_hidden_mse(tmp_path):
    teacher, student = tiny_whisper(4, 0), tiny_whisper(2, 1)
    terms = [{"loss": "hidden_mse", "side": "encoder", "layers": {1: 1, 2: 2}}]
    trainer = DistillationTrainer(model=student, teacher=teacher,
                                  args=args_for(tmp_path, distillation=terms, task_weight=0.0))
    student.eval()
    loss = trainer.compute_loss(student, {"input_features": FEATS, "labels": LABELS})
    s, t = outputs(student), outputs(teacher)
    expected = sum(losses.hidden_mse_loss(s.encoder_hidden_states[i], t.encoder_hidden_states[i]) for i in (1, 2)) / 2
    assert torch.allclose(loss, expected, rtol=1e-5)
    # Encoder layer indices are checked against the encoder's depth (2 layers: hidden_states 0..2).
    with pytest.raises(ValueError, match="out of range"):
        DistillationTrainer(model=student, teacher=teacher, args=args_for(
            tmp_path, distillation=[{"loss": "hidden_mse", "side": "encoder", "layers": {3: 1}}]))


def test_encoder_decoder_terms_train(tmp_path):
    teacher, student = tiny_whisper(4, 0), tiny_whisper(2, 1)
    terms = [{"loss": "kl"}, {"loss": "hidden_cos", "name": "cos_dec"},
             {"loss": "hidden_mse", "side": "encoder", "name": "mse_enc"}]
    from datasets import Dataset

    ds = Dataset.from_dict({"input_features": FEATS.repeat(4, 1, 1).tolist(), "labels": LABELS.repeat(4, 1).tolist()})
    trainer = DistillationTrainer(model=student, teacher=teacher, train_dataset=ds, eval_dataset=ds,
                                  args=args_for(tmp_path, distillation=terms, max_steps=25, learning_rate=3e-3,
                                                per_device_eval_batch_size=12))
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    for name in ("eval_loss", "eval_loss_cos_dec", "eval_loss_mse_enc"):
        assert after[name] < before[name], name


@pytest.mark.parametrize("term, message", [({"loss": "attention_mse"}, "encoder-decoder"),
                                           ({"loss": "attention_relation", "relation_heads": 2}, "encoder-decoder"),
                                           ({"loss": "hidden_mse", "side": "middle"}, "side must be")])
def test_unsupported_encoder_decoder_terms_are_refused_at_construction(tmp_path, term, message):
    teacher, student = tiny_whisper(4, 0), tiny_whisper(2, 1)
    with pytest.raises(ValueError, match=message):
        DistillationTrainer(model=student, teacher=teacher, args=args_for(tmp_path, distillation=[term]))


def test_side_is_only_for_encoder_decoders(tmp_path):
    from test_trainer import teacher_student
    from tiny import make_wordpiece_tokenizer

    teacher, student = teacher_student(make_wordpiece_tokenizer())
    with pytest.raises(ValueError, match="only for encoder-decoder"):
        DistillationTrainer(model=student, teacher=teacher,
                            args=args_for(tmp_path, distillation=[{"loss": "hidden_mse", "side": "encoder"}]))


def reference_cross_attention_kl(student_maps, teacher_maps, query_mask):
    """KL(teacher || student) over encoder positions, mean over heads, mean over labelled decoder positions."""
    t, s = teacher_maps.double(), student_maps.double()
    per_head = (t * (t.log() - s.log())).sum(-1)  # (B, H, Lq)
    per_position = per_head.mean(1)
    return per_position[query_mask].sum() / query_mask.sum()


def peaked_whisper(decoder_layers, seed):
    """A tiny Whisper whose cross-attention is far from uniform (random tiny models attend almost evenly)."""
    model = tiny_whisper(decoder_layers, seed)
    with torch.no_grad():
        for layer in model.model.decoder.layers:
            layer.encoder_attn.q_proj.weight.mul_(20.0)
            layer.encoder_attn.k_proj.weight.mul_(20.0)
    return model


def test_cross_attention_kl_against_a_hand_computed_reference(tmp_path):
    teacher, student = peaked_whisper(4, 0), tiny_whisper(2, 1)
    terms = [{"loss": "cross_attention_kl", "layers": "0:0,1:3"}]
    trainer = DistillationTrainer(model=student, teacher=teacher,
                                  args=args_for(tmp_path, distillation=terms, task_weight=0.0))
    assert student.config._attn_implementation == "eager"  # fused attention kernels return no maps
    student.eval()
    loss = trainer.compute_loss(student, {"input_features": FEATS, "labels": LABELS})
    with torch.no_grad():
        s = student(input_features=FEATS, decoder_input_ids=DECODER_INPUTS, output_attentions=True).cross_attentions
        t = teacher(input_features=FEATS, decoder_input_ids=DECODER_INPUTS, output_attentions=True).cross_attentions
    assert s[0].shape == (3, 2, 4, 20)  # (batch, heads, decoder positions, encoder positions)
    labelled = LABELS != -100
    expected = (reference_cross_attention_kl(s[0], t[0], labelled)
                + reference_cross_attention_kl(s[1], t[3], labelled)) / 2
    assert loss.item() > 0.1
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-7)
    # Padded decoder positions do not count: changing what the padding reads changes nothing.
    padded = LABELS.clone()
    padded[2, 1] = -100
    other = trainer.compute_loss(student, {"input_features": FEATS, "labels": padded})
    partial = labelled & (padded != -100)
    expected_partial = (reference_cross_attention_kl(s[0], t[0], partial)
                        + reference_cross_attention_kl(s[1], t[3], partial)) / 2
    torch.testing.assert_close(other.double(), expected_partial, rtol=1e-5, atol=1e-7)
    # Gradients reach the cross-attention of every mapped student layer.
    student.zero_grad()
    trainer.compute_loss(student, {"input_features": FEATS, "labels": LABELS}).backward()
    for layer in student.model.decoder.layers:
        assert layer.encoder_attn.q_proj.weight.grad.abs().sum() > 0


def test_cross_attention_kl_is_zero_for_the_teacher_itself_and_trains(tmp_path):
    import copy

    from datasets import Dataset

    teacher = peaked_whisper(4, 0)
    same = copy.deepcopy(teacher)
    trainer = DistillationTrainer(model=same, teacher=teacher, args=args_for(
        tmp_path, distillation=[{"loss": "cross_attention_kl"}], task_weight=0.0))
    same.eval()
    assert trainer.compute_loss(same, {"input_features": FEATS, "labels": LABELS}).abs().item() < 1e-6

    student = tiny_whisper(2, 1)
    ds = Dataset.from_dict({"input_features": FEATS.repeat(4, 1, 1).tolist(), "labels": LABELS.repeat(4, 1).tolist()})
    terms = [{"loss": "kl"}, {"loss": "cross_attention_kl", "name": "xattn"}]
    trainer = DistillationTrainer(model=student, teacher=teacher, train_dataset=ds, eval_dataset=ds,
                                  args=args_for(tmp_path, distillation=terms, max_steps=25, learning_rate=3e-3,
                                                per_device_eval_batch_size=12, task_weight=0.0))
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    assert after["eval_loss_xattn"] < 0.7 * before["eval_loss_xattn"]


def test_cross_attention_kl_refuses_what_it_cannot_compare(tmp_path):
    from test_trainer import teacher_student
    from tiny import make_wordpiece_tokenizer
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    bert_teacher, bert_student = teacher_student(make_wordpiece_tokenizer())
    term = [{"loss": "cross_attention_kl"}]
    with pytest.raises(ValueError, match="encoder-decoder's cross-attention"):
        DistillationTrainer(model=bert_student, teacher=bert_teacher, args=args_for(tmp_path, distillation=term))
    teacher = tiny_whisper(4, 0)
    config = WhisperConfig(**{**teacher.config.to_dict(), "decoder_attention_heads": 4, "decoder_layers": 2})
    with pytest.raises(ValueError, match="4 heads and the teacher's 2"):
        DistillationTrainer(model=WhisperForConditionalGeneration(config), teacher=teacher,
                            args=args_for(tmp_path, distillation=term))
    with pytest.raises(ValueError, match="out of range"):
        DistillationTrainer(model=tiny_whisper(2, 1), teacher=teacher,
                            args=args_for(tmp_path, distillation=[{"loss": "cross_attention_kl", "layers": "2:3"}]))


def test_cross_attention_kl_accumulation_equals_one_large_batch(tmp_path):
    """Batch 16 == batch 8 x accumulation 2 (labels of different lengths): the term is a sum over labelled
    decoder positions divided by the optimiser step's count."""
    from datasets import Dataset

    g = torch.Generator().manual_seed(1)
    feats = torch.randn(16, 8, 40, generator=g)
    labels = torch.randint(3, 60, (16, 6), generator=g)
    for i in range(16):
        labels[i, 2 + i % 4:] = -100
    ds = Dataset.from_dict({"input_features": feats.tolist(), "labels": labels.tolist()})
    logs = []
    for batch, accumulation in ((16, 1), (8, 2)):
        teacher, student = peaked_whisper(4, 0), tiny_whisper(2, 1)
        trainer = DistillationTrainer(model=student, teacher=teacher, train_dataset=ds, args=args_for(
            tmp_path / f"b{batch}", per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
            distillation=[{"loss": "cross_attention_kl", "layers": "0:0,1:3"}], task_weight=0.0, logging_steps=1,
            max_grad_norm=1e9, learning_rate=1e-3, seed=0))
        trainer.train()
        logs.append({k: v for k, v in trainer.state.log_history[0].items() if k == "grad_norm" or k.startswith("loss")})
    assert set(logs[0]) == {"loss", "loss_cross_attention_kl", "grad_norm"}
    for key, value in logs[0].items():
        assert logs[1][key] == pytest.approx(value, rel=1e-4), key
