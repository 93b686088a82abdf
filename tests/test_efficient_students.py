"""Efficient-operation students (BiLSTM, CNN): Auto round trips, padding, embedding initialisation from the
teacher, and distillation from the teacher's cached logits with DistillationTrainer."""

from __future__ import annotations

import random

import pytest
import torch
from datasets import Dataset
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    BertForSequenceClassification,
    DataCollatorWithPadding,
)

from hf_distill import DistillationArguments, DistillationTrainer
from hf_distill.modeling import output_size, task_kind
from hf_distill.students.efficient import (
    BiLSTMClassifierConfig,
    BiLSTMForSequenceClassification,
    CNNClassifierConfig,
    CNNForSequenceClassification,
    build_efficient_student,
    init_embeddings_from_teacher,
)
from hf_distill.teachers import cache_teacher_logits
from tiny import make_wordpiece_tokenizer, sample_texts, tiny_bert_config

LABELS = ["money", "sport", "tech"]
SMALL = {"bilstm": dict(embedding_dim=16, lstm_hidden_size=12, classifier_hidden_size=8),
         "cnn": dict(embedding_dim=16, num_filters=6, kernel_sizes=[2, 3])}
CLASSES = {"bilstm": (BiLSTMClassifierConfig, BiLSTMForSequenceClassification),
           "cnn": (CNNClassifierConfig, CNNForSequenceClassification)}


@pytest.fixture(scope="module")
def tokenizer():
    return make_wordpiece_tokenizer()


@pytest.fixture(scope="module")
def teacher(tokenizer):
    torch.manual_seed(0)
    config = tiny_bert_config(len(tokenizer), layers=2, hidden=32, num_labels=3, id2label=dict(enumerate(LABELS)),
                              label2id={n: i for i, n in enumerate(LABELS)})
    return BertForSequenceClassification(config).eval()


def student_for(teacher, tokenizer, arch, **kw):
    return build_efficient_student(teacher, arch, tokenizer=tokenizer, seed=0, **{**SMALL[arch], **kw}).eval()


@pytest.mark.parametrize("arch", ["bilstm", "cnn"])
def test_round_trip_through_save_load_and_auto_classes(teacher, tokenizer, arch, tmp_path):
    student = student_for(teacher, tokenizer, arch)
    batch = tokenizer(["the cat sat on the mat .", "bank profit"], padding=True, return_tensors="pt")
    with torch.no_grad():
        before = student(**batch).logits
    student.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)

    config = AutoConfig.from_pretrained(tmp_path)
    assert type(config) is CLASSES[arch][0] and config.model_type == f"hf_distill_{arch}"
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert type(loaded) is CLASSES[arch][1]
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, before)
    assert loaded.config.id2label == dict(enumerate(LABELS)) and loaded.config.num_labels == 3
    assert "principal components" in loaded.config.embedding_init
    # The trainer sees a sequence classifier over the teacher's label space.
    assert task_kind(loaded) == "sequence_classification" and output_size(loaded) == 3
    # A loss when labels are given (Trainer convention), logits only otherwise.
    out = loaded(**batch, labels=torch.tensor([0, 2]))
    assert out.loss is not None and out.loss.ndim == 0 and out.logits.shape == (2, 3)


@pytest.mark.parametrize("arch,pooling", [("bilstm", "max"), ("bilstm", "mean"), ("bilstm", "last"), ("cnn", None)])
def test_padding_and_attention_mask_do_not_change_the_logits(teacher, tokenizer, arch, pooling):
    student = student_for(teacher, tokenizer, arch, **({"pooling": pooling} if pooling else {}))
    ids = tokenizer("the red car ran fast on the road .")["input_ids"]
    pad = tokenizer.pad_token_id
    n, extra = len(ids), 7
    alone = torch.tensor([ids])
    right = torch.tensor([ids + [pad] * extra])
    left = torch.tensor([[pad] * extra + ids])
    garbage = torch.tensor([ids + [5] * extra])  # real tokens behind the mask must be ignored as well
    with torch.no_grad():
        reference = student(input_ids=alone, attention_mask=torch.ones(1, n, dtype=torch.long)).logits
        for inputs, mask in ((right, [1] * n + [0] * extra), (left, [0] * extra + [1] * n),
                             (garbage, [1] * n + [0] * extra)):
            logits = student(input_ids=inputs, attention_mask=torch.tensor([mask])).logits
            torch.testing.assert_close(logits, reference, atol=1e-5, rtol=1e-5)
        unmasked = student(input_ids=garbage, attention_mask=torch.ones_like(garbage)).logits
    assert not torch.allclose(unmasked, reference, atol=1e-4)  # the mask is what kept those tokens out


def test_short_texts_and_empty_rows_give_finite_logits(teacher, tokenizer):
    cnn = student_for(teacher, tokenizer, "cnn", kernel_sizes=[3, 5])
    lstm = student_for(teacher, tokenizer, "bilstm")
    ids = torch.tensor([[7, 0, 0], [7, 8, 0]])
    mask = torch.tensor([[0, 0, 0], [1, 1, 0]])  # an all-padding row and a text shorter than every kernel
    with torch.no_grad():
        for model in (cnn, lstm):
            assert torch.isfinite(model(input_ids=ids, attention_mask=mask).logits).all()


def test_embeddings_are_copied_when_widths_match_and_projected_when_narrower(teacher, tokenizer):
    source = teacher.get_input_embeddings().weight.detach()
    same = build_efficient_student(teacher, "bilstm", tokenizer=tokenizer, embedding_dim=32)
    copied = same.get_input_embeddings().weight.detach()
    scale = source.pow(2).mean().sqrt()
    torch.testing.assert_close(copied, source / scale)
    assert same.config.embedding_init.startswith("copied")

    narrow = build_efficient_student(teacher, "cnn", tokenizer=tokenizer, embedding_dim=8)
    projected = narrow.get_input_embeddings().weight.detach()
    assert projected.shape == (source.shape[0], 8)
    # Principal-component coordinates: uncorrelated columns, variance in decreasing order.
    cov = projected.T @ projected
    off_diagonal = cov - torch.diag(torch.diag(cov))
    assert off_diagonal.abs().max() < 1e-3 * cov.diag().max()
    assert torch.all(cov.diag()[:-1] >= cov.diag()[1:] - 1e-4)
    # The first component carries more of the rows' spread than any single teacher coordinate would.
    centred = source - source.mean(0)
    assert projected[:, 0].var() / projected.var(0).sum() > centred.var(0).max() / centred.var(0).sum()

    with pytest.raises(ValueError, match="wider than the teacher's embeddings"):
        build_efficient_student(teacher, "bilstm", tokenizer=tokenizer, embedding_dim=64)
    random_init = build_efficient_student(teacher, "bilstm", tokenizer=tokenizer, embedding_dim=64,
                                          embedding_init="random")
    assert random_init.config.embedding_init == "random"


def test_bad_inputs_are_refused_with_what_to_change(teacher, tokenizer):
    with pytest.raises(ValueError, match="unknown efficient student 'gru'; choose bilstm, cnn"):
        build_efficient_student(teacher, "gru")
    with pytest.raises(ValueError, match="pooling must be one of max, mean, last"):
        BiLSTMClassifierConfig(pooling="attention")
    with pytest.raises(ValueError, match="kernel_sizes must be a non-empty list"):
        CNNClassifierConfig(kernel_sizes=[])
    small_teacher = BertForSequenceClassification(tiny_bert_config(len(tokenizer) - 10, layers=1, hidden=32,
                                                                   num_labels=3))
    with pytest.raises(ValueError, match=f"the tokenizer has {len(tokenizer)} tokens but the teacher embeds "
                                         f"{len(tokenizer) - 10}; use the teacher's own tokenizer"):
        build_efficient_student(small_teacher, "cnn", tokenizer=tokenizer)
    student = student_for(teacher, tokenizer, "bilstm")
    other = BiLSTMForSequenceClassification(BiLSTMClassifierConfig(vocab_size=50, embedding_dim=16, num_labels=3))
    with pytest.raises(ValueError, match="build the student with the teacher's vocabulary"):
        init_embeddings_from_teacher(other, teacher)
    with pytest.raises(ValueError, match="no transformer layers.*terms kl, logit_mse and task"):
        student(**tokenizer(["a cat"], return_tensors="pt"), output_hidden_states=True)
    with pytest.raises(ValueError, match="sequence-classification teacher"):
        build_efficient_student(teacher.bert, "bilstm")


def topic_dataset(tokenizer, n=48, seed=0):
    words = {"money": "bank share profit price market", "sport": "team wins game player",
             "tech": "phone computer software chip network"}
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 3
        text = " ".join(rng.choice(words[LABELS[label]].split()) for _ in range(rng.randint(3, 7)))
        rows.append({**tokenizer(text + " " + sample_texts(1, seed=i, max_len=6)[0]), "labels": label})
    return Dataset.from_list(rows)


@pytest.mark.parametrize("arch", ["bilstm", "cnn"])
def test_distils_from_cached_teacher_logits_and_checkpoints_reload(teacher, tokenizer, arch, tmp_path):
    collator = DataCollatorWithPadding(tokenizer)
    train = cache_teacher_logits(teacher, topic_dataset(tokenizer), collator, batch_size=16)
    student = student_for(teacher, tokenizer, arch).train()

    def kl_to_teacher(model):
        model.eval()
        batch = collator([{k: r[k] for k in ("input_ids", "attention_mask")} for r in train])
        with torch.no_grad():
            s = torch.log_softmax(model(**batch).logits / 2.0, -1)
        t = torch.log_softmax(torch.tensor(train["teacher_logits"]) / 2.0, -1)
        return float((t.exp() * (t - s)).sum(-1).mean())

    before = kl_to_teacher(student)
    args = DistillationArguments(
        output_dir=str(tmp_path), max_steps=40, learning_rate=1e-2, per_device_train_batch_size=8, temperature=2.0,
        distillation='[{loss: kl, weight: 1.0}, {loss: logit_mse, weight: 0.1}, {loss: task, weight: 0.2}]',
        logging_steps=10, save_strategy="steps", save_steps=40, report_to="none", seed=0, use_cpu=True,
        disable_tqdm=True)
    # No teacher model: every batch carries the teacher's cached logits; the tokenizer check passes.
    trainer = DistillationTrainer(model=student, args=args, train_dataset=train, data_collator=collator,
                                  processing_class=tokenizer)
    assert trainer.task == "sequence_classification" and trainer.objective.needs == {"logits"}
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss_kd" in h]
    assert logs and all(k in logs[-1] for k in ("loss_kd", "loss_mse", "loss_ce"))
    after = kl_to_teacher(student)
    assert after < 0.5 * before, (before, after)

    # The Trainer's checkpoint loads back with the Auto class, same weights.
    checkpoint = tmp_path / "checkpoint-40"
    reloaded = AutoModelForSequenceClassification.from_pretrained(checkpoint)
    assert type(reloaded) is CLASSES[arch][1]
    for (name, p), q in zip(student.state_dict().items(), reloaded.state_dict().values()):
        assert torch.equal(p, q), name


def test_live_teacher_with_the_default_hidden_term_is_refused_before_training(teacher, tokenizer, tmp_path):
    collator = DataCollatorWithPadding(tokenizer)
    student = student_for(teacher, tokenizer, "bilstm")
    args = DistillationArguments(output_dir=str(tmp_path), max_steps=1, report_to="none", use_cpu=True)
    assert args.cos_weight > 0  # DistilBERT's default triplet includes the hidden-state cosine term
    with pytest.raises(ValueError, match=r"hidden_cos.*--cos_weight 0 --hidden_mse_weight 0"):
        DistillationTrainer(model=student, teacher=teacher, args=args, train_dataset=topic_dataset(tokenizer, 8),
                            data_collator=collator, processing_class=tokenizer, teacher_processing_class=tokenizer)
    # With outputs-only terms the live teacher works too (its tokenizer is the student's).
    args = DistillationArguments(output_dir=str(tmp_path), max_steps=2, cos_weight=0.0, report_to="none",
                                 use_cpu=True, per_device_train_batch_size=4, save_strategy="no", disable_tqdm=True)
    trainer = DistillationTrainer(model=student, teacher=teacher, args=args, train_dataset=topic_dataset(tokenizer, 8),
                                  data_collator=collator, processing_class=tokenizer,
                                  teacher_processing_class=tokenizer)
    trainer.train()
    assert trainer.state.global_step == 2


@pytest.mark.parametrize("term", [{"loss": "hidden_mse", "projection": "linear"},
                                  {"loss": "attention_relation", "relation_heads": 2}, {"loss": "attention_mse"}])
def test_feature_terms_are_refused_for_students_without_transformer_layers(term, tmp_path):
    from hf_distill import DistillationArguments, DistillationTrainer
    from hf_distill.students import build_efficient_student
    from tiny import make_wordpiece_tokenizer, tiny_bert_config
    from transformers import BertForSequenceClassification

    tok = make_wordpiece_tokenizer()
    teacher = BertForSequenceClassification(tiny_bert_config(len(tok), layers=2, num_labels=3))
    student = build_efficient_student(teacher, "bilstm", tokenizer=tok, embedding_init="random")
    args = DistillationArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, distillation=[term])
    with pytest.raises(ValueError, match="no transformer layers"):
        DistillationTrainer(model=student, teacher=teacher, args=args)
