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
