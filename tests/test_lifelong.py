"""Learning without Forgetting: growing heads, the old head's outputs recorded on new-task rows only, the LwF
term against a hand-computed value, the old task kept where plain fine-tuning forgets it, and the refusals."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from tiny import make_wordpiece_tokenizer, tiny_bert_config
from transformers import BertForSequenceClassification, DataCollatorWithPadding

from hf_distill.arguments import DistillationArguments
from hf_distill.lifelong import (
    LifelongError,
    grow_classifier,
    head_predictions,
    learn_task,
    lifelong_arguments,
    task_heads,
    warm_up_new_head,
    with_heads,
)
from hf_distill.objectives import build_objective
from hf_distill.objectives.base import ModelTensors, StepTensors
from hf_distill.trainer import DistillationTrainer

OLD, NEW = ["cat", "dog", "tree"], ["phone", "bank"]
FILLER = "the a sat on mat ran fast slow red blue green house river stone light dark".split()


def texts_of(keyword: str, n: int, rng: random.Random) -> list[str]:
    return [" ".join(rng.sample(FILLER + [keyword] * 4, 8)) for _ in range(n)]


@pytest.fixture(scope="module")
def setup():
    rng = random.Random(0)
    rows = {label: texts_of(label, 40, rng) for label in OLD + NEW}
    tokenizer = make_wordpiece_tokenizer([t for v in rows.values() for t in v], vocab_size=120)
    label2id = {label: i for i, label in enumerate(OLD + NEW)}

    def dataset(labels, part):
        texts = [t for label in labels for t in (rows[label][:30] if part == "train" else rows[label][30:])]
        ids = [label2id[label] for label in labels for _ in range(30 if part == "train" else 10)]
        enc = tokenizer(texts, truncation=True, max_length=16)
        return Dataset.from_dict({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                                  "labels": ids})

    return {"tokenizer": tokenizer, "collator": DataCollatorWithPadding(tokenizer),
            "old_train": dataset(OLD, "train"), "new_train": dataset(NEW, "train"), "old_test": dataset(OLD, "test")}


def arguments(tmp_path, **kw) -> DistillationArguments:
    base = {"output_dir": str(tmp_path), "per_device_train_batch_size": 10, "learning_rate": 3e-3,
            "num_train_epochs": 1, "save_strategy": "no", "report_to": "none", "logging_steps": 5, "seed": 0,
            "use_cpu": True, "temperature": 2.0, "weight_decay": 0.0}
    return DistillationArguments(**{**base, **kw})


def old_model(setup, tmp_path):
    """A tiny BERT trained on the old task (cat / dog / tree)."""
    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_bert_config(len(setup["tokenizer"]), layers=2, num_labels=3))
    with_heads(model, [OLD])
    trainer = DistillationTrainer(model=model, args=lifelong_arguments(arguments(tmp_path, num_train_epochs=10),
                                                                       kd_weight=0.0),
                                  train_dataset=setup["old_train"], data_collator=setup["collator"])
    trainer.train()
    return model


@pytest.fixture(scope="module")
def previous(setup, tmp_path_factory):
    return old_model(setup, tmp_path_factory.mktemp("old"))


def old_accuracy(model, setup) -> float:
    ds = setup["old_test"]
    batch = setup["collator"]([{k: ds[i][k] for k in ("input_ids", "attention_mask")} for i in range(len(ds))])
    model.eval()
    with torch.no_grad():
        logits = model(**batch).logits.numpy()
    return float((head_predictions(logits, ds["labels"], task_heads(model)) == np.asarray(ds["labels"])).mean())


def test_grow_classifier_keeps_the_old_rows_and_records_the_heads(previous):
    grown = grow_classifier(previous, NEW, seed=1)
    assert task_heads(grown) == [OLD, NEW]
    assert grown.config.num_labels == 5 and grown.config.id2label[3] == "phone"
    assert torch.equal(grown.classifier.weight[:3], previous.classifier.weight)
    assert torch.equal(grown.classifier.bias[:3], previous.classifier.bias)
    assert torch.equal(grown.classifier.bias[3:], torch.zeros(2))
    assert previous.config.num_labels == 3 and previous.classifier.out_features == 3  # the previous model is untouched
    x = torch.randn(4, previous.config.hidden_size)
    assert torch.allclose(grown.classifier(x)[:, :3], previous.classifier(x))


def test_lwf_term_equals_hand_computed_value(previous, tmp_path):
    grown = grow_classifier(previous, NEW)
    args = lifelong_arguments(arguments(tmp_path), kd_weight=0.7, temperature=2.0)
    objective = build_objective(args, grown, [])
    student = torch.tensor([[1.0, -0.5, 2.0, 0.3, -1.0], [0.2, 0.1, -0.3, 2.0, 0.5]], requires_grad=True)
    recorded = torch.tensor([[0.5, 0.0, 1.5], [-1.0, 2.0, 0.0]])
    labels = torch.tensor([3, 4])
    step = StepTensors(student=ModelTensors(logits=student), teachers=[ModelTensors(logits=recorded)],
                       teacher_weights=[1.0], labels=labels, masks=objective.masks({}, labels),
                       counts=objective.item_counts({"labels": labels}), task="sequence_classification")
    loss, terms = objective(step)
    T = 2.0
    p_prev = F.softmax(recorded / T, -1)
    kd = (p_prev * (p_prev.log() - F.log_softmax(student[:, :3] / T, -1))).sum(-1).mean() * T * T
    ce = F.cross_entropy(student[:, 3:], labels - 3)
    assert torch.allclose(terms["loss_lwf_kd"], kd.detach(), atol=1e-6)
    assert torch.allclose(terms["loss_head_ce"], ce.detach(), atol=1e-6)
    assert torch.allclose(loss, ce + 0.7 * kd, atol=1e-6)
    loss.backward()
    ref = student.detach().clone().requires_grad_(True)
    ref_kd = (p_prev * (p_prev.log() - F.log_softmax(ref[:, :3] / T, -1))).sum(-1).mean() * T * T
    (F.cross_entropy(ref[:, 3:], labels - 3) + 0.7 * ref_kd).backward()
    assert torch.allclose(student.grad, ref.grad, atol=1e-6)


class Recording:
    """A collator that records the input ids of every row it collates."""

    def __init__(self, collator):
        self.collator, self.seen = collator, []

    def __call__(self, features):
        self.seen.extend(tuple(f["input_ids"]) for f in features)
        return self.collator(features)


def test_lwf_reads_new_task_rows_only_and_keeps_the_old_task(setup, previous, tmp_path):
    new_rows = {tuple(x) for x in setup["new_train"]["input_ids"]}
    old_rows = {tuple(x) for x in setup["old_train"]["input_ids"]} | {tuple(x) for x in setup["old_test"]["input_ids"]}
    assert not new_rows & old_rows
    before = old_accuracy(previous, setup)
    assert before >= 0.9  # the old task was learnt
    grown = grow_classifier(previous, NEW, seed=0)
    results = {}
    for name, kd_weight in (("fine-tuning", 0.0), ("lwf", 1.0)):
        collator = Recording(setup["collator"])
        args = arguments(tmp_path / name, learning_rate=3e-3, num_train_epochs=10)
        model, trainer = learn_task(previous, setup["new_train"], args, collator, model=copy_of(grown),
                                    kd_weight=kd_weight)
        steps = trainer.state.global_step
        assert steps == 60
        # every row the second stage read (the recorded outputs and each training batch) is a new-task row
        assert set(collator.seen) <= new_rows and not set(collator.seen) & old_rows
        recorded = len(setup["new_train"]) if kd_weight > 0 else 0
        assert len(collator.seen) == recorded + steps * 10
        results[name] = old_accuracy(model, setup)
    assert results["lwf"] >= before - 0.1, results
    assert results["lwf"] >= results["fine-tuning"] + 0.2, results


def copy_of(model):
    import copy

    return copy.deepcopy(model)


def test_warm_up_trains_the_new_head_only(setup, previous, tmp_path):
    grown = grow_classifier(previous, NEW, seed=0)
    before = {name: p.detach().clone() for name, p in grown.named_parameters()}
    flags = {name: p.requires_grad for name, p in grown.named_parameters()}
    ds = setup["new_train"]
    batch = setup["collator"]([{k: ds[i][k] for k in ("input_ids", "attention_mask")} for i in range(len(ds))])

    def new_head_ce():
        grown.eval()
        with torch.no_grad():
            return float(F.cross_entropy(grown(**batch).logits[:, 3:], torch.tensor(ds["labels"]) - 3))

    ce = new_head_ce()
    warm_up_new_head(grown, ds, arguments(tmp_path, learning_rate=1e-2, weight_decay=0.1), setup["collator"], steps=12)
    after = dict(grown.named_parameters())
    for name, p in after.items():
        if name.startswith("classifier."):
            assert torch.equal(p[:3], before[name][:3]), name  # the old head's rows: no gradient, no weight decay
            assert not torch.equal(p[3:], before[name][3:]), name
        else:
            assert torch.equal(p, before[name]), name  # the backbone is frozen
    assert {name: p.requires_grad for name, p in after.items()} == flags  # unfrozen again
    assert new_head_ce() < ce - 0.05
    with pytest.raises(LifelongError, match="grow it first"):
        warm_up_new_head(previous, ds, arguments(tmp_path), setup["collator"], steps=1)


def test_bad_inputs_get_clear_errors(setup, previous, tmp_path):
    with pytest.raises(LifelongError, match=r"labels \['dog'\] are already in the previous model's heads"):
        grow_classifier(previous, ["dog", "bank"])
    with pytest.raises(LifelongError, match="labels repeat"):
        grow_classifier(previous, ["bank", "bank"])
    with pytest.raises(LifelongError, match="no previous model"):
        grow_classifier(None, NEW)
    with pytest.raises(LifelongError, match="no previous model"):
        learn_task(None, setup["new_train"], arguments(tmp_path), setup["collator"], new_labels=NEW)
    with pytest.raises(LifelongError, match=r"carry labels \['cat', 'dog', 'tree'\] outside its head"):
        learn_task(previous, setup["old_train"], arguments(tmp_path), setup["collator"], new_labels=NEW)
    with pytest.raises(LifelongError, match="single head"):
        build_objective(lifelong_arguments(arguments(tmp_path), kd_weight=1.0), previous, [])
    with pytest.raises(LifelongError, match="grown by one head"):
        learn_task(previous, setup["new_train"], arguments(tmp_path), setup["collator"], model=previous)


def test_recipe_runs_end_to_end_on_a_tiny_model(setup, tmp_path):
    import csv
    import importlib.util
    import sys
    from pathlib import Path

    from transformers import BertModel

    tokenizer = setup["tokenizer"]
    BertModel(tiny_bert_config(len(tokenizer), layers=2)).save_pretrained(tmp_path / "backbone")
    tokenizer.save_pretrained(tmp_path / "backbone")
    rng = random.Random(1)
    with open(tmp_path / "data.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for label in OLD + NEW:
            for text in texts_of(label, 20, rng):
                writer.writerow([text, label])
    spec = importlib.util.spec_from_file_location("lifelong_recipe", Path(__file__).parents[1] / "recipes" /
                                                  "lifelong_bbc.py")
    recipe = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = recipe  # its dataclasses resolve their annotations through it
    spec.loader.exec_module(recipe)
    results = recipe.main(["--model", str(tmp_path / "backbone"), "--train_file", str(tmp_path / "data.csv"),
                           "--old_topics", ",".join(OLD), "--new_topics", ",".join(NEW), "--first_task_steps", "3",
                           "--second_task_steps", "2", "--new_head_warmup_steps", "2", "--max_length", "16",
                           "--output_dir", str(tmp_path / "out"),
                           "--per_device_train_batch_size", "8", "--report_to", "none", "--save_strategy", "no",
                           "--use_cpu", "true", "--bootstrap_resamples", "200"])
    assert set(results["models"]) == {"old-task model (before the new task)", "fine-tuning", "LwF",
                                      "joint (old + new data; upper bound)"}
    assert results["steps"] == {"first_task": 3, "second_task": 2, "new_head_warmup": 2}
    assert results["train_rows"] == {"old_task": 48, "new_task": 32}  # 80% of 60 and 40 rows
    lwf = results["models"]["LwF"]
    assert lwf["old_task"]["n"] == 12 and lwf["new_task"]["n"] == 8
    assert 0 <= lwf["old_task"]["ci"][0] <= lwf["old_task"]["accuracy"] <= lwf["old_task"]["ci"][1] <= 1
    d = results["comparisons"]["old task: LwF - fine-tuning"]
    assert d["low"] <= d["diff"] <= d["high"]
    assert (tmp_path / "out" / "results.md").read_text().count("| LwF |") == 1
    with pytest.raises(recipe.DataError, match="must split the data's labels"):
        recipe.main(["--model", str(tmp_path / "backbone"), "--train_file", str(tmp_path / "data.csv"),
                     "--old_topics", "cat,dog", "--new_topics", "dog,phone,bank,tree",
                     "--output_dir", str(tmp_path / "bad"), "--report_to", "none"])


def test_accumulation_equals_one_large_batch(setup, previous, tmp_path):
    """head_ce and lwf_kd scale like every other term: batch 8 == batch 4 x accumulation 2 (their own case; the
    same-model cases of tests/term_cases.py have no task heads)."""
    new = setup["new_train"].select(range(0, 60, 6))  # 10 rows of both new labels
    results = []
    for batch, accumulation in ((8, 1), (4, 2)):
        args = arguments(tmp_path / f"b{batch}", per_device_train_batch_size=batch, max_steps=1, logging_steps=1,
                         gradient_accumulation_steps=accumulation, max_grad_norm=1e9, dataloader_drop_last=True)
        grown = grow_classifier(previous, NEW, seed=0)
        for module in grown.modules():  # dropout draws differ between one batch of 8 and two of 4
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        model, trainer = learn_task(previous, new, args, setup["collator"], model=grown, kd_weight=0.7)
        logged = next(e for e in trainer.state.log_history if "loss_lwf_kd" in e)
        results.append((logged, torch.cat([p.detach().flatten() for p in model.parameters()])))
    (big, w_big), (acc, w_acc) = results
    for key in ("loss", "loss_head_ce", "loss_lwf_kd", "grad_norm"):
        assert acc[key] == pytest.approx(big[key], rel=1e-4, abs=1e-7), key
    # AdamW's first update is lr * g / (|g| + eps): weights whose gradient is ~0 amplify float noise, so compare the
    # updates with a tolerance well below one learning-rate step (3e-3).
    assert (w_big - w_acc).abs().max() < 3e-4
