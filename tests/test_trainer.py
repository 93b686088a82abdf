"""DistillationTrainer: loss composition, normalisation under accumulation, frozen teacher, errors."""

import math

import pytest
import torch
from datasets import Dataset
from transformers import BertForSequenceClassification, default_data_collator

from hf_distill import DistillationArguments, DistillationTrainer, losses
from tiny import make_wordpiece_tokenizer, sample_texts, tiny_bert_config, tiny_bert_mlm

NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


@pytest.fixture(scope="module")
def tokenizer():
    return make_wordpiece_tokenizer()


def masked_dataset(tokenizer, n=32, length=16, seed=0):
    """Pre-masked MLM examples of varied real length and varied numbers of masked tokens."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i, text in enumerate(sample_texts(n, seed=seed, min_len=3, max_len=14)):
        enc = tokenizer(text, truncation=True, max_length=length, padding="max_length")
        ids = torch.tensor(enc["input_ids"])
        attn = torch.tensor(enc["attention_mask"])
        labels = torch.full_like(ids, -100)
        real = torch.nonzero(attn).flatten()[1:-1]
        k = 1 + (i % 4)
        chosen = real[torch.randperm(len(real), generator=g)[:k]]
        labels[chosen] = ids[chosen]
        ids[chosen] = tokenizer.mask_token_id
        rows.append({"input_ids": ids.tolist(), "attention_mask": attn.tolist(), "labels": labels.tolist()})
    return Dataset.from_list(rows)


def make_args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, learning_rate=1e-3,
                max_steps=1, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0,
                dataloader_num_workers=0, disable_tqdm=True, max_grad_norm=1e9)
    base.update(kw)
    return DistillationArguments(**base)


def teacher_student(tokenizer, teacher_layers=4, student_layers=2, student_hidden=32):
    # A large init range gives the random teacher peaked, informative soft targets.
    teacher = tiny_bert_mlm(len(tokenizer), layers=teacher_layers, seed=1, initializer_range=0.3, **NO_DROPOUT)
    student = tiny_bert_mlm(len(tokenizer), layers=student_layers, hidden=student_hidden, seed=2, **NO_DROPOUT)
    return teacher, student


def test_loss_equals_hand_composed_terms(tokenizer, tmp_path):
    teacher, student = teacher_student(tokenizer)
    ds = masked_dataset(tokenizer, n=8)
    args = make_args(tmp_path, mse_weight=0.5, hidden_mse_weight=0.25, hidden_layer_map="-1:-1,1:2")
    trainer = DistillationTrainer(model=student, teacher=teacher, args=args, train_dataset=ds,
                                  data_collator=default_data_collator)
    batch = default_data_collator([ds[i] for i in range(8)])
    student.eval()
    loss, _ = trainer.compute_loss(student, batch, return_outputs=True)
    with torch.no_grad():
        s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    attn = batch["attention_mask"].bool()
    kd = losses.kl_div_loss(s.logits, t.logits, temperature=2.0, mask=attn)
    mlm = torch.nn.functional.cross_entropy(s.logits.reshape(-1, s.logits.shape[-1]), batch["labels"].reshape(-1))
    cos = (losses.cosine_loss(s.hidden_states[-1], t.hidden_states[-1], mask=attn)
           + losses.cosine_loss(s.hidden_states[1], t.hidden_states[2], mask=attn)) / 2
    hmse = (losses.hidden_mse_loss(s.hidden_states[-1], t.hidden_states[-1], mask=attn)
            + losses.hidden_mse_loss(s.hidden_states[1], t.hidden_states[2], mask=attn)) / 2
    mse = losses.logit_mse_loss(s.logits, t.logits, mask=attn)
    expected = 5.0 * kd + 2.0 * mlm + 1.0 * cos + 0.5 * mse + 0.25 * hmse
    assert torch.allclose(loss.detach(), expected, rtol=1e-5)


def _one_step(tokenizer, tmp_path, name, **kw):
    teacher, student = teacher_student(tokenizer)
    ds = masked_dataset(tokenizer, n=16)
    trainer = DistillationTrainer(model=student, teacher=teacher, args=make_args(tmp_path / name, **kw),
                                  train_dataset=ds, data_collator=default_data_collator)
    trainer.train()
    log = trainer.state.log_history[0]
    return log, student


def test_accumulation_equals_large_batch(tokenizer, tmp_path):
    # plain SGD at lr 1: the step is the gradient itself, so equal parameters mean equal gradients (Adam's first
    # step, lr * g / (|g| + eps), turns float noise in a near-zero gradient into a step of up to lr)
    sgd = {"optim": "sgd", "learning_rate": 1.0, "lr_scheduler_type": "constant"}
    big, s_big = _one_step(tokenizer, tmp_path, "big", per_device_train_batch_size=16, **sgd)
    acc, s_acc = _one_step(tokenizer, tmp_path, "acc", per_device_train_batch_size=8, gradient_accumulation_steps=2,
                           **sgd)
    for key in ("loss", "grad_norm", "loss_kd", "loss_mlm", "loss_cos"):
        assert acc[key] == pytest.approx(big[key], rel=1e-4), key
    _, initial = teacher_student(tokenizer)
    moved = 0.0
    for (n, p_big), p_acc, p_0 in zip(s_big.named_parameters(), s_acc.parameters(), initial.parameters()):
        assert torch.allclose(p_big, p_acc, atol=1e-6), n
        moved = max(moved, float((p_big - p_0).detach().abs().max()))
    assert moved > 1e-3  # the step really changed the student


def test_every_term_logged_in_training_and_evaluation(tokenizer, tmp_path):
    teacher, student = teacher_student(tokenizer)
    ds = masked_dataset(tokenizer, n=16)
    trainer = DistillationTrainer(model=student, teacher=teacher, args=make_args(tmp_path, max_steps=2),
                                  train_dataset=ds, eval_dataset=ds, data_collator=default_data_collator)
    trainer.train()
    log = trainer.state.log_history[0]
    assert {"loss_kd", "loss_mlm", "loss_cos"} <= set(log)
    assert log["loss"] == pytest.approx(5 * log["loss_kd"] + 2 * log["loss_mlm"] + log["loss_cos"], rel=1e-4)
    metrics = trainer.evaluate()
    assert {"eval_loss_kd", "eval_loss_mlm", "eval_loss_cos"} <= set(metrics)
    assert metrics["eval_loss"] == pytest.approx(
        5 * metrics["eval_loss_kd"] + 2 * metrics["eval_loss_mlm"] + metrics["eval_loss_cos"], rel=1e-4)


def test_teacher_frozen_and_student_improves(tokenizer, tmp_path):
    teacher, student = teacher_student(tokenizer)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    ds = masked_dataset(tokenizer, n=32)
    args = make_args(tmp_path, max_steps=40, learning_rate=3e-3, save_strategy="steps", save_steps=40,
                     per_device_eval_batch_size=32)
    trainer = DistillationTrainer(model=student, teacher=teacher, args=args, train_dataset=ds, eval_dataset=ds,
                                  data_collator=default_data_collator)
    start = trainer.evaluate()
    trainer.train()
    end = trainer.evaluate()
    assert end["eval_loss"] < 0.8 * start["eval_loss"]
    assert end["eval_loss_kd"] < 0.7 * start["eval_loss_kd"]
    assert end["eval_loss_cos"] < 0.7 * start["eval_loss_cos"]
    after = teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    # The checkpoint holds the student only.
    ckpt = tmp_path / "out" / "checkpoint-40"
    from safetensors.torch import load_file
    saved = load_file(str(ckpt / "model.safetensors"))
    assert set(saved) <= set(student.state_dict()) and len(saved) > 0
    assert not any("teacher" in k for k in saved)


def test_mismatched_vocabulary_rejected(tokenizer, tmp_path):
    teacher = tiny_bert_mlm(len(tokenizer) + 5, layers=2)
    student = tiny_bert_mlm(len(tokenizer), layers=1)
    with pytest.raises(ValueError, match="output space"):
        DistillationTrainer(model=student, teacher=teacher, args=make_args(tmp_path))


def test_mismatched_tokens_rejected(tokenizer, tmp_path):
    other = make_wordpiece_tokenizer(sample_texts(200, seed=7) + ["zebra zebra quantum"], vocab_size=len(tokenizer))
    teacher, student = teacher_student(tokenizer)
    if other.get_vocab() == tokenizer.get_vocab():  # the retrained vocabulary must really differ
        pytest.fail("test setup: tokenizers identical")
    with pytest.raises(ValueError, match="tokenizers differ"):
        DistillationTrainer(model=student, teacher=teacher, args=make_args(tmp_path), processing_class=tokenizer,
                            teacher_processing_class=other)


def test_hidden_size_mismatch_rejected_with_advice(tokenizer, tmp_path):
    teacher, student = teacher_student(tokenizer, student_hidden=16)
    with pytest.raises(ValueError, match="--cos_weight 0"):
        DistillationTrainer(model=student, teacher=teacher, args=make_args(tmp_path))
    # Without the hidden-state terms the pair is fine.
    DistillationTrainer(model=student, teacher=teacher, args=make_args(tmp_path, cos_weight=0.0))


def test_bad_layer_index_rejected(tokenizer, tmp_path):
    teacher, student = teacher_student(tokenizer)
    with pytest.raises(ValueError, match="out of range"):
        DistillationTrainer(model=student, teacher=teacher, args=make_args(tmp_path, hidden_layer_map="7:2"))


def test_classification_with_cached_teacher_logits(tokenizer, tmp_path):
    torch.manual_seed(0)
    teacher = BertForSequenceClassification(tiny_bert_config(len(tokenizer), layers=2, num_labels=3))
    student = BertForSequenceClassification(tiny_bert_config(len(tokenizer), layers=1, num_labels=3))
    texts = sample_texts(16, seed=3)
    enc = tokenizer(texts, padding="max_length", max_length=24, truncation=True)
    ds = Dataset.from_dict({**enc, "labels": [i % 3 for i in range(16)]})
    from hf_distill.teachers import cache_teacher_logits
    from transformers import DataCollatorWithPadding
    cached = cache_teacher_logits(teacher, ds, DataCollatorWithPadding(tokenizer), batch_size=5)
    teacher.eval()
    with torch.no_grad():
        live = teacher(input_ids=torch.tensor(ds["input_ids"]), attention_mask=torch.tensor(ds["attention_mask"])).logits
    assert torch.allclose(torch.tensor(cached["teacher_logits"]), live, atol=1e-5)
    args = make_args(tmp_path, cos_weight=0.0, task_weight=1.0, kd_weight=1.0, max_steps=2)
    trainer = DistillationTrainer(model=student, teacher=None, args=args, train_dataset=cached,
                                  data_collator=default_data_collator)
    trainer.train()
    log = trainer.state.log_history[0]
    assert {"loss_kd", "loss_ce"} <= set(log) and math.isfinite(log["loss"])


def test_plain_training_arguments_rejected(tokenizer, tmp_path):
    from transformers import TrainingArguments
    teacher, student = teacher_student(tokenizer)
    with pytest.raises(TypeError, match="DistillationArguments"):
        DistillationTrainer(model=student, teacher=teacher, args=TrainingArguments(output_dir=str(tmp_path)))


def test_cached_logits_with_live_hidden_terms(tokenizer, tmp_path):
    """Cached logits in the batch and a term that needs the live teacher's hidden states."""
    torch.manual_seed(0)
    teacher = BertForSequenceClassification(tiny_bert_config(len(tokenizer), layers=2, num_labels=3))
    student = BertForSequenceClassification(tiny_bert_config(len(tokenizer), layers=1, num_labels=3))
    enc = tokenizer(sample_texts(16, seed=3), padding="max_length", max_length=24, truncation=True)
    ds = Dataset.from_dict({**enc, "labels": [i % 3 for i in range(16)]})
    from hf_distill.teachers import cache_teacher_logits
    from transformers import DataCollatorWithPadding
    teacher.train()
    cached = cache_teacher_logits(teacher, ds, DataCollatorWithPadding(tokenizer), batch_size=8)
    assert teacher.training and all(p.requires_grad for p in teacher.parameters())  # caller's model untouched
    args = make_args(tmp_path, cos_weight=1.0, task_weight=1.0, kd_weight=1.0, max_steps=2)
    trainer = DistillationTrainer(model=student, teacher=teacher, args=args, train_dataset=cached,
                                  data_collator=default_data_collator)
    trainer.train()
    assert {"loss_kd", "loss_ce", "loss_cos"} <= set(trainer.state.log_history[0])
