"""Deep-to-shallow self-distillation: exit heads taught by the model's own final output.

The exit term is imported inside the fixtures (not at collection), so the registry-wide scaling
test sees the built-in terms only; its accumulation case is checked here.
"""

from __future__ import annotations

import json

import pytest
import torch
from datasets import Dataset
from safetensors import safe_open
from tiny import make_wordpiece_tokenizer, sample_texts, tiny_bert_config
from transformers import (
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    BertForMaskedLM,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertLMHeadModel,
    DistilBertConfig,
    DistilBertForMaskedLM,
    DistilBertForSequenceClassification,
    ElectraConfig,
    ElectraForSequenceClassification,
    RobertaConfig,
    RobertaForMaskedLM,
    RobertaForSequenceClassification,
    default_data_collator,
)

from hf_distill import DistillationArguments, DistillationTrainer
from hf_distill.modeling import layer_list, num_layers

NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


@pytest.fixture(scope="module")
def exits():
    import hf_distill.objectives.exits as module

    return module


@pytest.fixture(scope="module")
def early():
    import hf_distill.early_exit as module

    return module


@pytest.fixture(scope="module")
def tokenizer():
    return make_wordpiece_tokenizer()


def build(family: str, vocab: int, layers: int = 4, seed: int = 0, **kw):
    """A tiny random model of ``family`` (no dropout unless asked)."""
    torch.manual_seed(seed)
    small = dict(hidden_size=32, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=64,
                 max_position_embeddings=130, **NO_DROPOUT)
    if family == "bert_cls":
        return BertForSequenceClassification(tiny_bert_config(vocab, layers=layers, num_labels=3, **NO_DROPOUT, **kw))
    if family == "bert_token":
        return BertForTokenClassification(tiny_bert_config(vocab, layers=layers, num_labels=5, **NO_DROPOUT, **kw))
    if family == "bert_mlm":
        return BertForMaskedLM(tiny_bert_config(vocab, layers=layers, **NO_DROPOUT, **kw))
    if family in ("distilbert_cls", "distilbert_mlm"):
        config = DistilBertConfig(vocab_size=vocab, dim=32, n_layers=layers, n_heads=2, hidden_dim=64, dropout=0.0,
                                  attention_dropout=0.0, seq_classif_dropout=0.0, num_labels=3, **kw)
        return (DistilBertForSequenceClassification if family == "distilbert_cls" else DistilBertForMaskedLM)(config)
    if family in ("roberta_cls", "roberta_mlm"):
        config = RobertaConfig(vocab_size=vocab, num_labels=3, pad_token_id=0, **small, **kw)
        return (RobertaForSequenceClassification if family == "roberta_cls" else RobertaForMaskedLM)(config)
    if family == "electra_cls":
        return ElectraForSequenceClassification(ElectraConfig(vocab_size=vocab, embedding_size=16, num_labels=3,
                                                              **small, **kw))
    raise KeyError(family)


def batch_for(tokenizer, n: int = 8, length: int = 16, seed: int = 0, labels: str = "sequence") -> dict:
    texts = sample_texts(n, seed=seed, min_len=3, max_len=12)
    enc = tokenizer(texts, truncation=True, max_length=length, padding="max_length", return_tensors="pt")
    batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    if labels == "sequence":
        batch["labels"] = torch.tensor([len(t.split()) % 3 for t in texts])
    elif labels == "token":
        batch["labels"] = torch.where(enc["attention_mask"].bool(), enc["input_ids"] % 5, -100)
    return batch


def classification_dataset(tokenizer, n: int = 16, length: int = 16) -> Dataset:
    batch = batch_for(tokenizer, n=n, length=length)
    return Dataset.from_dict({k: v.tolist() for k, v in batch.items()})


def make_args(tmp_path, terms, **kw):
    base = {"output_dir": str(tmp_path / "out"), "per_device_train_batch_size": 8, "learning_rate": 1e-2, "max_steps": 1,
                "logging_steps": 1, "save_strategy": "no", "report_to": [], "use_cpu": True, "seed": 0, "disable_tqdm": True,
                "max_grad_norm": 1e9, "task_weight": 0.0, "distillation": terms}
    base.update(kw)
    return DistillationArguments(**base)


def trainer_for(tmp_path, student, tokenizer, terms, **kw):
    return DistillationTrainer(model=student, args=make_args(tmp_path, terms, **kw),
                               train_dataset=classification_dataset(tokenizer), data_collator=default_data_collator)


FAMILIES = ["bert_cls", "distilbert_cls", "roberta_cls", "electra_cls", "bert_token", "bert_mlm", "distilbert_mlm",
            "roberta_mlm"]


# ---------------------------------------------------------------------------------------------- heads
@pytest.mark.parametrize("family", FAMILIES)
def test_exit_at_the_last_layer_reproduces_the_models_logits(exits, tokenizer, family):
    model = build(family, len(tokenizer)).eval()
    head = exits.build_exit_head(model)
    assert head.style != "linear", family  # a copy of the model's own head
    batch = batch_for(tokenizer, labels="none")
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
        logits = head(out.hidden_states[-1], batch["attention_mask"])
    torch.testing.assert_close(logits, out.logits, rtol=0, atol=1e-6)
    # A copy: training the exit leaves the model's own head alone.
    assert all(p.data_ptr() != q.data_ptr() for p in head.parameters() for q in model.parameters())


def test_linear_head_pools_and_classifies(exits, tokenizer):
    model = build("bert_cls", len(tokenizer))
    head = exits.build_exit_head(model, "linear", "mean")
    batch = batch_for(tokenizer, labels="none")
    hidden = torch.randn(8, 16, 32)
    m = batch["attention_mask"].float().unsqueeze(-1)
    expected = head.parts["classifier"]((hidden * m).sum(1) / m.sum(1))
    torch.testing.assert_close(head(hidden, batch["attention_mask"]), expected)
    assert head(hidden, batch["attention_mask"]).shape == (8, 3)


def test_copied_head_can_read_the_mean_over_tokens(exits, early, tokenizer, tmp_path):
    model = build("bert_cls", len(tokenizer)).eval()
    head = exits.build_exit_head(model, "copy", "mean")
    assert head.style == "pooler_classifier" and head.pooling == "mean"
    batch = batch_for(tokenizer, labels="none")
    hidden = torch.randn(8, 16, 32)
    m = batch["attention_mask"].float().unsqueeze(-1)
    mean = ((hidden * m).sum(1) / m.sum(1)).unsqueeze(1)
    with torch.no_grad():
        torch.testing.assert_close(head(hidden, batch["attention_mask"]), model.classifier(model.bert.pooler(mean)))
    early.save_exit_heads({2: head}, tmp_path, model)
    loaded = early.load_exit_heads(tmp_path, model)[2]
    assert loaded.pooling == "mean"
    with torch.no_grad():
        torch.testing.assert_close(loaded(hidden, batch["attention_mask"]), head(hidden, batch["attention_mask"]),
                                   rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"reads the mean over tokens, but BertForSequenceClassification's own head "
                                         r"reads the first token; run it with .*EarlyExitModel"):
        early.export_exit_model(model, {2: head}, 2)
    with pytest.raises(ValueError, match=r"pooling is for sequence classifiers; a masked_lm model's exits classify "
                                         r"every token"):
        exits.build_exit_head(build("bert_mlm", len(tokenizer)), "auto", "mean")


# ---------------------------------------------------------------------------------------------- running
def test_early_exit_runs_only_the_first_layers(exits, early, tokenizer):
    model = build("bert_cls", len(tokenizer)).eval()
    heads = {layer: exits.build_exit_head(model) for layer in (1, 2)}
    calls = [0] * 4
    for i, layer in enumerate(model.bert.encoder.layer):
        layer.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    batch = batch_for(tokenizer, labels="none")
    wrapped = early.EarlyExitModel(model, heads, exit_layer=2).eval()
    with torch.no_grad():
        logits = wrapped(**batch).logits
    assert calls == [1, 1, 0, 0]  # layers 3 and 4 never ran
    assert len(model.bert.encoder.layer) == 4  # and the model is whole again
    with torch.no_grad():
        full = model(**batch, output_hidden_states=True)
    torch.testing.assert_close(logits, heads[2](full.hidden_states[2], batch["attention_mask"]), rtol=0, atol=1e-6)
    all_exits = early.exit_logits(model, heads, **batch)
    assert sorted(all_exits) == [1, 2, 4]
    torch.testing.assert_close(all_exits[2], logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(wrapped(**batch, exit_layer=4).logits, full.logits)  # the last exit: the model itself
    with pytest.raises(ValueError, match=r"no exit after layer 3; this model exits after layers \[1, 2, 4\]"):
        wrapped(**batch, exit_layer=3)


@pytest.mark.parametrize("family", ["bert_cls", "distilbert_cls", "roberta_cls", "bert_token"])
def test_exported_exit_model_is_a_plain_transformers_model(exits, early, tokenizer, family, tmp_path):
    model = build(family, len(tokenizer)).eval()
    heads = {2: exits.build_exit_head(model)}
    with torch.no_grad():
        for p in heads[2].parameters():
            p.add_(0.01 * torch.randn_like(p))  # differs from the model's own head
    early.export_exit_model(model, heads, 2, tmp_path / "exit2", tokenizer=tokenizer)
    auto = AutoModelForTokenClassification if family == "bert_token" else AutoModelForSequenceClassification
    loaded = auto.from_pretrained(tmp_path / "exit2").eval()
    assert len(layer_list(loaded)) == 2 and num_layers(loaded) == 2
    assert loaded.config.early_exit == {"exit_layer": 2, "of_layers": 4, "head": heads[2].style}
    assert len(layer_list(model)) == 4  # the model itself is unchanged
    batch = batch_for(tokenizer, labels="none")
    if family.startswith("roberta"):
        batch["input_ids"] = batch["input_ids"].clamp(min=2)  # position ids skip the padding id
    with torch.no_grad():
        expected = early.EarlyExitModel(model, heads, exit_layer=2)(**batch).logits
        torch.testing.assert_close(loaded(**batch).logits, expected, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------- the term
def test_exit_term_value_is_the_self_distillation_loss(exits, tokenizer, tmp_path):
    student = build("bert_cls", len(tokenizer))
    trainer = trainer_for(tmp_path, student, tokenizer, [{"loss": "exit_kl", "layers": [1, 3], "temperature": 3.0,
                                                          "ce_weight": 0.5}])
    term = trainer.objective.terms[0]
    assert term.log_name == "loss_exits" and sorted(term.heads) == ["1", "3"]
    batch = batch_for(tokenizer)
    student.eval()
    loss, _ = trainer.compute_loss(student, dict(batch), return_outputs=True)
    with torch.no_grad():
        out = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    by_layer = {}
    for layer in (1, 3):
        with torch.no_grad():
            logits = term.heads[str(layer)](out.hidden_states[layer], batch["attention_mask"])
        kl = torch.nn.functional.kl_div(torch.log_softmax(logits / 3, -1), torch.softmax(out.logits / 3, -1),
                                        reduction="batchmean") * 9
        by_layer[str(layer)] = kl + 0.5 * torch.nn.functional.cross_entropy(logits, batch["labels"])
    assert float(loss) == pytest.approx(float(sum(by_layer.values()) / 2), rel=1e-5)
    for layer, value in by_layer.items():  # each exit's own value, for logging
        assert float(term.parts[layer]) == pytest.approx(float(value), rel=1e-5)


def test_exit_heads_receive_gradients_and_are_trained(exits, tokenizer, tmp_path):
    student = build("bert_cls", len(tokenizer))
    trainer = trainer_for(tmp_path, student, tokenizer, [{"loss": "exit_kl", "layers": [1, 2]}], task_weight=1.0,
                          max_steps=3)
    heads = trainer.objective.terms[0].heads
    before = {k: v.clone() for k, v in heads.state_dict().items()}
    loss = trainer.compute_loss(student, dict(batch_for(tokenizer)))
    loss.backward()
    for name, p in heads.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert student.bert.encoder.layer[0].attention.self.query.weight.grad.abs().sum() > 0
    student.zero_grad()
    for p in heads.parameters():
        p.grad = None
    trainer.train()
    after = heads.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert set(changed) == set(before)  # every head tensor moved: the optimiser trains them with the student
    assert all(p.grad is None for p in heads.parameters())  # cleared after each step, like the projections
    assert {"loss_exits", "loss_ce"} <= set(trainer.state.log_history[0])


def test_detached_exits_leave_the_backbone_untouched(exits, tokenizer, tmp_path):
    student = build("bert_cls", len(tokenizer))
    trainer = trainer_for(tmp_path, student, tokenizer, [{"loss": "exit_kl", "layers": [2], "detach": True}])
    assert trainer.objective.terms[0].log_name == "loss_exit2"
    loss = trainer.compute_loss(student, dict(batch_for(tokenizer)))
    loss.backward()
    assert all(p.grad is None for p in student.parameters())
    assert all(p.grad is not None for p in trainer.objective.parameters())


def test_saved_student_holds_no_exit_heads_unless_asked(exits, early, tokenizer, tmp_path):
    student = build("bert_cls", len(tokenizer))
    plain_keys = set(student.state_dict())
    trainer = trainer_for(tmp_path, student, tokenizer, [{"loss": "exit_kl", "layers": [1, 2]}], max_steps=2)
    trainer.train()
    folder = tmp_path / "saved"
    trainer.save_model(str(folder))
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        saved = set(f.keys())
    assert saved <= plain_keys and not any("exit" in k or "heads" in k for k in saved)
    assert not (folder / early.HEADS_FILE).exists() and not (folder / early.CONFIG_FILE).exists()
    # Asked for: the heads go next to the student, and come back exactly.
    early.save_exit_heads(trainer, folder)
    config = json.loads((folder / early.CONFIG_FILE).read_text())
    assert config["layers"] == [1, 2] and config["model"]["num_layers"] == 4
    assert config["heads"]["1"]["style"] == "pooler_classifier"
    model = early.EarlyExitModel.from_pretrained(folder, exit_layer=1)
    trained = trainer.objective.terms[0].heads
    for layer in ("1", "2"):
        mine, theirs = model.heads[layer].state_dict(), trained[layer].state_dict()
        assert mine.keys() == theirs.keys()
        assert all(torch.equal(mine[k], theirs[k].cpu()) for k in mine)
    batch = batch_for(tokenizer, labels="none")
    student.eval()
    with torch.no_grad():
        hidden = student(**batch, output_hidden_states=True).hidden_states[1]
        torch.testing.assert_close(model(**batch).logits, trained["1"](hidden, batch["attention_mask"]),
                                   rtol=0, atol=1e-6)


def test_checkpoints_hold_the_exit_heads(exits, tokenizer, tmp_path):
    student = build("bert_cls", len(tokenizer))
    trainer = trainer_for(tmp_path, student, tokenizer, [{"loss": "exit_kl", "layers": [1]}], max_steps=1,
                          save_strategy="steps", save_steps=1)
    trainer.train()
    checkpoint = tmp_path / "out" / "checkpoint-1"
    with safe_open(str(checkpoint / "distillation_objective.safetensors"), "pt") as f:
        keys = set(f.keys())
    head = trainer.objective.terms[0].heads["1"]
    assert {k for k in keys if ".heads.1." in k} and len([k for k in keys if ".heads.1." in k]) == len(
        head.state_dict())
    with safe_open(str(checkpoint / "model.safetensors"), "pt") as f:
        assert not any("heads" in k for k in f.keys())  # noqa: SIM118 (safe_open is not iterable)


def test_exit_kl_scales_with_accumulation(exits, tokenizer, tmp_path, monkeypatch):
    """Batch 16 == batch 8 x accumulation 2 for the per-token (masked LM) path of the term."""
    import term_cases

    monkeypatch.setitem(term_cases.CASES, "exit_kl", [{"loss": "exit_kl", "layers": [1], "ce_weight": 0.5}])
    big = term_cases.one_step(tokenizer, "exit_kl", str(tmp_path / "big"), batch=16)
    acc = term_cases.one_step(tokenizer, "exit_kl", str(tmp_path / "acc"), batch=8, accumulation=2)
    for key in ("loss", "loss_exit1", "grad_norm"):
        assert acc[key] == pytest.approx(big[key], rel=1e-4), key
    assert big["loss_exit1"] > 0


# ---------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("options, message", [
    ({"layers": [0]}, r"layer 0 is out of range; exits go after layers 1..4 .*0 is the embeddings"),
    ({"layers": [5]}, r"layer 5 is out of range; exits go after layers 1..4"),
    ({"layers": [1, -4]}, r"names a layer twice"),
    ({"layers": []}, r"layers is empty"),
    ({"layers": "1,x"}, r"cannot read term 'exit_kl': layers '1,x'"),
    ({"layers": [2], "head": "linear", "pooling": "mean", "detach": 1}, r"detach must be true or false, got 1"),
    ({"pooling": "max", "head": "linear"}, r"pooling must be 'cls' or 'mean', got 'max'"),
    ({"head": "mlp"}, r"head must be one of auto, copy, linear, got 'mlp'"),
    ({"ce_weight": -1}, r"ce_weight must be >= 0"),
    ({"temperature": 0}, r"temperature must be > 0"),
    ({"detach": "yes"}, r"detach must be true or false, got 'yes'"),
    ({"layer": 2}, r"term 'exit_kl' has no option\(s\) \['layer'\]"),
])
def test_bad_exit_options_are_refused_at_construction(exits, tokenizer, tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        trainer_for(tmp_path, build("bert_cls", len(tokenizer)), tokenizer, [{"loss": "exit_kl", **options}])


def test_students_without_a_classifier_to_copy_are_refused(exits, tokenizer, tmp_path):
    causal = BertLMHeadModel(tiny_bert_config(len(tokenizer), layers=2, is_decoder=True))
    with pytest.raises(ValueError, match=r"attaches exits to sequence-classification, token-classification or "
                                         r"masked-LM students; this student is a causal_lm model"):
        trainer_for(tmp_path, causal, tokenizer, [{"loss": "exit_kl"}])
    regression = BertForSequenceClassification(tiny_bert_config(len(tokenizer), layers=2, num_labels=1))
    with pytest.raises(ValueError, match=r"needs a single-label classifier .* num_labels=1"):
        trainer_for(tmp_path, regression, tokenizer, [{"loss": "exit_kl"}])
    one_layer = build("bert_cls", len(tokenizer), layers=1)
    with pytest.raises(ValueError, match=r"a model with 1 layer has no earlier layer to exit at"):
        trainer_for(tmp_path, one_layer, tokenizer, [{"loss": "exit_kl"}])
    no_labels = trainer_for(tmp_path, build("bert_cls", len(tokenizer)), tokenizer,
                            [{"loss": "exit_kl", "ce_weight": 1.0}])
    batch = batch_for(tokenizer, labels="none")
    with pytest.raises(ValueError, match=r"ce_weight 1 but the batch has no labels"):
        no_labels.compute_loss(no_labels.model, batch)


def test_loading_exit_heads_checks_the_model(exits, early, tokenizer, tmp_path):
    model = build("bert_cls", len(tokenizer))
    early.save_exit_heads({1: exits.build_exit_head(model)}, tmp_path / "heads", model)
    with pytest.raises(ValueError, match=r"trained on another model \(num_layers: 4 in exit_heads.json, 2 now\)"):
        early.load_exit_heads(tmp_path / "heads", build("bert_cls", len(tokenizer), layers=2))
    with pytest.raises(FileNotFoundError, match=r"holds no exit_heads.json: it has no exit heads"):
        early.load_exit_heads(tmp_path, model)
    with pytest.raises(FileNotFoundError, match=r"is not a folder"):
        early.load_exit_heads(tmp_path / "missing", model)
    with pytest.raises(ValueError, match=r"no exit heads to save: the objective has no exit_kl term"):
        early.save_exit_heads(trainer_for(tmp_path, model, tokenizer, [{"loss": "task"}]), tmp_path / "none")
    mlm = build("bert_mlm", len(tokenizer))
    with pytest.raises(ValueError, match=r"has no place in BertForMaskedLM; run it with .*EarlyExitModel"):
        early.export_exit_model(mlm, {1: exits.build_exit_head(mlm)}, 1)
