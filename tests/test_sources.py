"""Teacher sources: the objective sees teacher tensors, never where they came from."""

import pytest
import torch
from transformers import default_data_collator

from hf_distill import DistillationTrainer
from hf_distill.sources import EmaTeacher, StoredTeacher
from term_cases import with_stored_topk
from test_trainer import make_args, masked_dataset, teacher_student
from tiny import make_wordpiece_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return make_wordpiece_tokenizer()


def test_stored_full_topk_equals_the_live_teacher(tokenizer, tmp_path):
    """Top-k = the whole vocabulary stored ahead of time gives the live teacher's loss curve."""
    teacher, _ = teacher_student(tokenizer)
    ds = masked_dataset(tokenizer, n=16)
    stored = with_stored_topk(ds, teacher, k=len(tokenizer), temperature=2.0)
    curves = {}
    for name, kwargs in (("live", {"teacher": teacher}), ("stored", {"teacher_source": "stored"})):
        _, student = teacher_student(tokenizer)
        trainer = DistillationTrainer(model=student, args=make_args(tmp_path / name, max_steps=6, cos_weight=0.0),
                                      train_dataset=stored if name == "stored" else ds,
                                      data_collator=default_data_collator, **kwargs)
        trainer.train()
        curves[name] = [(h["loss_kd"], h["loss_mlm"]) for h in trainer.state.log_history if "loss_kd" in h]
    assert isinstance(trainer.teacher_source, StoredTeacher) and trainer.teachers == []
    assert len(curves["live"]) == 6
    for (kd_a, mlm_a), (kd_b, mlm_b) in zip(curves["live"], curves["stored"]):
        assert kd_b == pytest.approx(kd_a, rel=1e-4) and mlm_b == pytest.approx(mlm_a, rel=1e-4)


def test_stored_source_cannot_feed_feature_terms(tokenizer, tmp_path):
    _, student = teacher_student(tokenizer)
    with pytest.raises(ValueError, match="needs a live teacher's hidden states"):
        DistillationTrainer(model=student, args=make_args(tmp_path, teacher_source="stored"))  # default: + hidden_cos


def test_self_sources_take_no_teacher(tokenizer, tmp_path):
    teacher, student = teacher_student(tokenizer)
    with pytest.raises(ValueError, match="takes no teacher model"):
        DistillationTrainer(model=student, teacher=teacher, args=make_args(tmp_path, teacher_source="ema"))
    with pytest.raises(ValueError, match="needs a teacher"):
        DistillationTrainer(model=student, args=make_args(tmp_path, teacher_source="frozen"))


def test_ema_teacher_is_the_closed_form_average(tokenizer, tmp_path):
    """After n optimiser steps the EMA teacher equals decay^n w_0 + sum_i (1 - decay) decay^(n-i) w_i,
    and gradients never touch it."""
    _, student = teacher_student(tokenizer)
    decay = 0.8
    trainer = DistillationTrainer(model=student, args=make_args(tmp_path, teacher_source="ema", ema_decay=decay,
                                                                max_steps=4, learning_rate=1e-2),
                                  train_dataset=masked_dataset(tokenizer, n=32), data_collator=default_data_collator)
    source = trainer.teacher_source
    assert isinstance(source, EmaTeacher) and not any(p.requires_grad for p in source.teachers[0].parameters())
    history = [[p.detach().clone() for p in student.parameters()]]

    from transformers import TrainerCallback

    class Record(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            history.append([p.detach().clone() for p in student.parameters()])

    trainer.add_callback(Record())
    trainer.train()
    n = len(history) - 1
    assert n == 4 and source.updates == 4
    for j, ema in enumerate(source.teachers[0].parameters()):
        expected = decay ** n * history[0][j]
        for i in range(1, n + 1):
            expected = expected + (1 - decay) * decay ** (n - i) * history[i][j]
        assert torch.allclose(ema, expected, atol=1e-6), j
        assert ema.grad is None
    log = trainer.state.log_history[0]
    assert log["loss_kd"] >= 0 and log["loss_cos"] >= 0


def test_snapshot_teacher_starts_silent_and_follows_epochs(tokenizer, tmp_path):
    _, student = teacher_student(tokenizer)
    ds = masked_dataset(tokenizer, n=16)
    trainer = DistillationTrainer(model=student, args=make_args(tmp_path, teacher_source="snapshot", max_steps=-1,
                                                                num_train_epochs=3, logging_steps=1),
                                  train_dataset=ds, data_collator=default_data_collator)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss_kd" in h]
    assert len(logs) == 6  # 2 steps per epoch
    # Epoch 1: the teacher is the student itself, so KL and cosine are zero. Each later epoch starts from a
    # snapshot equal to the student (zero at its first step), then distils towards it.
    assert all(h["loss_kd"] == 0 and h["loss_cos"] == pytest.approx(0, abs=1e-6) for h in logs[:3])
    assert logs[3]["loss_kd"] > 0 and logs[4]["loss_kd"] == 0 and logs[5]["loss_kd"] > 0
    assert trainer.teacher_source.generation == 3
    for t, s in zip(trainer.teacher_source.teachers[0].parameters(), student.parameters()):
        assert torch.equal(t, s)  # the snapshot of the last epoch end


@pytest.mark.parametrize("source", ["frozen", "stored", "peer", "ema", "snapshot"])
def test_the_same_terms_run_on_every_source(tokenizer, tmp_path, source):
    teacher, student = teacher_student(tokenizer)
    ds = masked_dataset(tokenizer, n=16)
    terms = [{"loss": "kl", "weight": 1.0}, {"loss": "hidden_cos", "layers": "-1:-1", "weight": 1.0}]
    if source == "stored":
        terms = terms[:1]  # stored outputs carry no hidden states (refused at construction: see above)
    kwargs = {"teacher": teacher} if source in ("frozen", "peer") else {}
    if source == "stored":
        ds = with_stored_topk(ds, teacher, k=16, temperature=2.0)
    trainer = DistillationTrainer(model=student, args=make_args(tmp_path, teacher_source=source, distillation=terms,
                                                                max_steps=2), train_dataset=ds,
                                  data_collator=default_data_collator, **kwargs)
    trainer.train()
    assert trainer.teacher_source.kind == source
    assert {"loss_kd", "loss_mlm"} <= set(trainer.state.log_history[0])
