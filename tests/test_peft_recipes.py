"""PEFT students through the library's helpers: only adapters (and a classifier head) train, the merged model
equals the adapter model, the trainer's checks and per-term logs are unchanged."""

import pytest
import torch
from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification, BertForSequenceClassification, \
    default_data_collator

from hf_distill import DistillationTrainer
from hf_distill.students.peft_students import ADAPTER_DIR, PeftArguments, apply_peft, default_lora_targets, \
    save_student
from test_trainer import NO_DROPOUT, make_args, masked_dataset, teacher_student
from tiny import make_wordpiece_tokenizer, sample_texts, tiny_bert_config


@pytest.fixture(scope="module")
def tokenizer():
    return make_wordpiece_tokenizer()


def test_lora_student_trains_only_adapters_and_merges_exactly(tokenizer, tmp_path):
    teacher, base = teacher_student(tokenizer)
    assert default_lora_targets(base) == ["key", "query", "value"]
    student = apply_peft(base, PeftArguments(use_peft=True, lora_r=4, lora_alpha=8, lora_dropout=0.0))
    frozen = {n: p.detach().clone() for n, p in student.named_parameters() if not p.requires_grad}
    ds = masked_dataset(tokenizer, n=16)
    trainer = DistillationTrainer(model=student, teacher=teacher, args=make_args(tmp_path, max_steps=5,
                                                                                learning_rate=1e-2),
                                  train_dataset=ds, data_collator=default_data_collator, processing_class=tokenizer)
    trainer.train()
    assert {"loss_kd", "loss_mlm", "loss_cos"} <= set(trainer.state.log_history[0])
    changed = [n for n, p in student.named_parameters() if p.requires_grad]
    assert changed and all("lora_" in n for n in changed)
    assert all(torch.equal(p, frozen[n]) for n, p in student.named_parameters() if not p.requires_grad)
    merged = save_student(student, tmp_path / "final")
    assert (tmp_path / "final" / ADAPTER_DIR / "adapter_model.safetensors").exists()
    reloaded = AutoModelForMaskedLM.from_pretrained(tmp_path / "final").eval()
    batch = default_data_collator([ds[i] for i in range(4)])
    batch.pop("labels")
    with torch.no_grad():
        assert torch.allclose(reloaded(**batch).logits, student.eval()(**batch).logits, atol=1e-5)
        assert torch.allclose(merged(**batch).logits, reloaded(**batch).logits, atol=1e-6)


def test_classifier_heads_train_in_full(tokenizer, tmp_path):
    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_bert_config(len(tokenizer), layers=2, num_labels=3, **NO_DROPOUT))
    student = apply_peft(model, PeftArguments(use_peft=True))
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    assert any("classifier" in n for n in trainable) and any("lora_" in n for n in trainable)
    save_student(student, tmp_path / "cls")
    assert AutoModelForSequenceClassification.from_pretrained(tmp_path / "cls").config.num_labels == 3


@pytest.mark.parametrize("kwargs, message", [({"lora_target_modules": "nope"}, "not modules of"),
                                             ({"use_qlora": True}, "QLoRA")])
def test_wrong_peft_settings_are_refused(tokenizer, kwargs, message):
    _, base = teacher_student(tokenizer)
    with pytest.raises(ValueError, match=message):
        apply_peft(base, PeftArguments(use_peft=True, **kwargs))
    with pytest.raises(ValueError, match="lora_r"):
        PeftArguments(lora_r=0)


def test_without_peft_the_student_is_unchanged(tokenizer, tmp_path):
    _, base = teacher_student(tokenizer)
    assert apply_peft(base, PeftArguments()) is base
    save_student(base, tmp_path / "plain")
    assert not (tmp_path / "plain" / ADAPTER_DIR).exists()


def test_without_heads_the_classifier_stays_frozen_and_unwrapped(tokenizer, tmp_path):
    """train_heads=False (early exits copy the model's own head): only adapters train; the head is a plain Linear."""
    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_bert_config(len(tokenizer), layers=2, num_labels=3, **NO_DROPOUT))
    student = apply_peft(model, PeftArguments(use_peft=True), train_heads=False)
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert type(student.get_base_model().classifier) is torch.nn.Linear
    save_student(student, tmp_path / "merged")
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    assert torch.equal(reloaded.classifier.weight, model.classifier.weight)
