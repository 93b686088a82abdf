"""Online distillation: peers trained in the same run (deep mutual learning, trainable teacher)."""

import pytest
import torch
from datasets import Dataset
from transformers import BertForSequenceClassification, default_data_collator

from hf_distill import DistillationTrainer
from hf_distill.sources import PeerTeacher
from test_trainer import NO_DROPOUT, make_args
from tiny import make_wordpiece_tokenizer, sample_texts, tiny_bert_config


@pytest.fixture(scope="module")
def tokenizer():
    return make_wordpiece_tokenizer()


def classifier(tokenizer, seed, layers=2):
    torch.manual_seed(seed)
    return BertForSequenceClassification(tiny_bert_config(len(tokenizer), layers=layers, num_labels=2, **NO_DROPOUT))


def task(tokenizer, n=64, seed=0):
    """Label 1 when the sentence mentions an animal: learnable by a tiny model in a few dozen steps."""
    texts = sample_texts(n, seed=seed)
    enc = tokenizer(texts, truncation=True, max_length=24, padding="max_length")
    labels = [int(any(w in t.split() for w in ("cat", "dog"))) for t in texts]
    return Dataset.from_dict({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                              "labels": labels})


def peer_trainer(tokenizer, tmp_path, mode="mutual", **kw):
    student, peer = classifier(tokenizer, 1), classifier(tokenizer, 2)
    args = make_args(tmp_path, teacher_source="peer", peer_mode=mode, cos_weight=0.0, kd_weight=1.0, task_weight=1.0,
                     per_device_eval_batch_size=64, **{"max_steps": 40, "learning_rate": 3e-3, **kw})
    trainer = DistillationTrainer(model=student, teacher=peer, args=args, train_dataset=task(tokenizer),
                                  eval_dataset=task(tokenizer, seed=1), data_collator=default_data_collator)
    return trainer, student, peer


def eval_loss(model, ds):
    batch = default_data_collator([ds[i] for i in range(len(ds))])
    with torch.no_grad():
        return float(model(**batch).loss)


def test_mutual_learning_improves_every_peer(tokenizer, tmp_path):
    trainer, student, peer = peer_trainer(tokenizer, tmp_path, max_steps=80)
    held_out = task(tokenizer, seed=1)
    before = eval_loss(student.eval(), held_out), eval_loss(peer.eval(), held_out)
    peer_before = [p.detach().clone() for p in peer.parameters()]
    trainer.train()
    after = eval_loss(student.eval(), held_out), eval_loss(peer.eval(), held_out)
    assert after[0] < 0.85 * before[0] and after[1] < 0.85 * before[1], (before, after)
    assert all(not torch.equal(a, b) for a, b in zip(peer_before, peer.parameters()))
    log = trainer.state.log_history[0]
    assert {"loss_kd", "loss_ce", "peer0_loss_kd", "peer0_loss_ce"} <= set(log)
    assert isinstance(trainer.teacher_source, PeerTeacher)


def test_trainable_teacher_learns_from_the_task_only(tokenizer, tmp_path):
    trainer, student, peer = peer_trainer(tokenizer, tmp_path, mode="trainable", max_steps=3)
    trainer.train()
    log = trainer.state.log_history[0]
    assert "peer0_loss_ce" in log and "peer0_loss_kd" not in log and "loss_kd" in log


def test_peers_are_saved_and_resume_exactly(tokenizer, tmp_path):
    """An interrupted run resumed from its checkpoint ends with the same student and peer as an uninterrupted one."""
    full, s_full, p_full = peer_trainer(tokenizer, tmp_path / "full", max_steps=6)
    full.train()
    first, _, _ = peer_trainer(tokenizer, tmp_path / "cut", max_steps=6, save_strategy="steps", save_steps=3)
    first.train()  # writes checkpoint-3 and checkpoint-6
    import shutil

    shutil.rmtree(tmp_path / "cut" / "out" / "checkpoint-6")
    resumed, s_res, p_res = peer_trainer(tokenizer, tmp_path / "cut", max_steps=6, save_strategy="steps", save_steps=3)
    resumed.train(resume_from_checkpoint=True)
    for a, b in zip(s_full.parameters(), s_res.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    for a, b in zip(p_full.parameters(), p_res.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    paths = resumed.teacher_source.save_models(tmp_path / "peers")
    reloaded = BertForSequenceClassification.from_pretrained(paths[0])
    assert all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), p_res.state_dict().values()))
