"""recipes/efficient_student.py end to end on a tiny local teacher and CSV files, and its early refusals."""

from __future__ import annotations

import csv
import importlib.util
import json
import random
import re
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, BertForSequenceClassification, BertModel

from hf_distill.cli import run_with_one_line_errors
from hf_distill.students.efficient import BiLSTMForSequenceClassification, CNNForSequenceClassification
from tiny import make_wordpiece_tokenizer, tiny_bert_config

ROOT = Path(__file__).resolve().parents[1]
TOPICS = {"money": "bank share profit price market loss rises falls".split(),
          "sport": "team wins game player loses star".split(),
          "tech": "phone computer software chip network".split()}
FILLER = "the a on of in and to it was is".split()


def _recipe():
    spec = importlib.util.spec_from_file_location("efficient_student_recipe", ROOT / "recipes" / "efficient_student.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


recipe = _recipe()


def write_rows(path: Path, n: int, seed: int) -> Path:
    rng = random.Random(seed)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["text", "topic"])
        writer.writeheader()
        for i in range(n):
            label = list(TOPICS)[i % 3]
            words = [rng.choice(TOPICS[label]) for _ in range(rng.randint(3, 6))]
            words += [rng.choice(FILLER) for _ in range(rng.randint(2, 5))]
            rng.shuffle(words)
            writer.writerow({"text": " ".join(words) + " .", "topic": label})
    return path


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("efficient")
    texts = [" ".join(ws) for ws in TOPICS.values()] + [" ".join(FILLER)]
    tokenizer = make_wordpiece_tokenizer(texts * 20, vocab_size=120)
    labels = sorted(TOPICS)
    torch.manual_seed(0)
    config = tiny_bert_config(len(tokenizer), layers=2, hidden=32, num_labels=3, id2label=dict(enumerate(labels)),
                              label2id={n: i for i, n in enumerate(labels)}, initializer_range=0.1,
                              hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    BertForSequenceClassification(config).save_pretrained(root / "classifier")
    tokenizer.save_pretrained(root / "classifier")
    torch.manual_seed(0)
    BertModel(tiny_bert_config(len(tokenizer), layers=2, hidden=32)).save_pretrained(root / "encoder")
    tokenizer.save_pretrained(root / "encoder")
    write_rows(root / "train.csv", 90, seed=1)
    write_rows(root / "test.csv", 30, seed=2)
    return root


def flags(assets, out, teacher="classifier", *extra):
    return ["--teacher", str(assets / teacher), "--train_file", str(assets / "train.csv"),
            "--test_file", str(assets / "test.csv"), "--label_column", "topic", "--output_dir", str(out),
            "--max_length", "24", "--embedding_dim", "16", "--lstm_hidden_size", "16", "--num_filters", "8",
            "--kernel_sizes", "2,3", "--classifier_hidden_size", "16", "--efficient_epochs", "3",
            "--efficient_learning_rate", "1e-2", "--efficient_batch_size", "8", "--transformer_student_layers", "1",
            "--num_train_epochs", "1", "--learning_rate", "1e-3", "--per_device_train_batch_size", "8",
            "--teacher_epochs", "2", "--teacher_learning_rate", "3e-3", "--teacher_batch_size", "8",
            "--kd_weight", "0.5", "--task_weight", "0.5", "--cos_weight", "0", "--temperature", "2",
            "--logging_steps", "4", "--save_strategy", "no", "--report_to", "none", "--seed", "0",
            "--disable_tqdm", "true", "--eval_batch_size", "16", "--latency_batch_size", "8",
            "--latency_warmup", "1", "--latency_repeats", "2", "--bootstrap_resamples", "100", "--plot", "false",
            *extra]


def test_recipe_distils_bilstm_and_cnn_next_to_baselines_teacher_and_a_transformer(assets, tmp_path):
    out = tmp_path / "run"
    results = recipe.main(flags(assets, out, "classifier", "--augment_copies", "1"))
    rows = {r["name"]: r for r in results["models"]}
    assert list(rows) == ["teacher", "bilstm distilled", "bilstm hard labels", "cnn distilled", "cnn hard labels",
                          "transformer 1-layer distilled"]
    assert results["teacher_note"] == "ready-made"
    for row in rows.values():
        lo, hi = row["accuracy_ci"]
        assert 0 <= lo <= row["accuracy"] <= hi <= 1 and row["latency_ms"] > 0 and row["size_bytes"] > 0
        assert row["n"] == 30
    assert rows["bilstm distilled"]["params"] == rows["bilstm hard labels"]["params"]
    # 90 labelled rows + 90 augmented, teacher-labelled rows.
    assert results["training"]["distill_rows"] == 180
    assert set(results["comparisons"]) == {"bilstm_distilled_minus_hard_labels", "cnn_distilled_minus_hard_labels"}
    hist = results["log_history"]
    for kind in ("bilstm", "cnn"):
        assert any("loss_kd" in h and "loss_ce" in h for h in hist[f"{kind} distilled"])
        assert not any("loss_kd" in h for h in hist[f"{kind} hard labels"])
        assert hist[f"{kind} distilled"][-1]["step"] == hist[f"{kind} hard labels"][-1]["step"]
    assert "principal components" in results["students"]["bilstm"]["embedding_init"]
    # The saved students load with the Auto class and predict what was evaluated.
    assert type(AutoModelForSequenceClassification.from_pretrained(out / "bilstm_distilled")) is \
        BiLSTMForSequenceClassification
    assert type(AutoModelForSequenceClassification.from_pretrained(out / "cnn_baseline")) is \
        CNNForSequenceClassification
    stored = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in stored["models"]] == list(rows)
    md = (out / "results.md").read_text()
    assert "| bilstm distilled | 1 |" in md and "bilstm distilled minus hard labels:" in md


def test_recipe_fine_tunes_a_teacher_without_a_head(assets, tmp_path):
    out = tmp_path / "run"
    results = recipe.main(flags(assets, out, "encoder", "--students", "cnn", "--baseline", "false",
                                "--transformer_student_layers", ""))
    assert results["teacher_note"] == "fine-tuned in this run"
    assert [r["name"] for r in results["models"]] == ["teacher", "cnn distilled"]
    assert (out / "teacher" / "config.json").is_file()


@pytest.mark.parametrize("extra,message", [
    (["--cos_weight", "1"], r"term 'hidden_cos' reads hidden_states: this student has no transformer layers"),
    (["--distillation", "[{loss: attention_mse}]"], r"term .attention_mse. reads attentions.*terms kl, logit_mse and task"),
    (["--students", "bilstm,gru"], r"--students must list some of bilstm, cnn"),
    (["--pooling", "attention"], r"pooling must be one of max, mean, last"),
    (["--kernel_sizes", "3,x"], r"--kernel_sizes must be comma-separated widths"),
    (["--augment_copies", "-1"], r"--augment_copies must be >= 0"),
    (["--use_peft", "true"], r"--use_peft trains LoRA adapters on the transformer student only; the bilstm student "
                             r"cannot take them: LoRA adapts the frozen weights.*--students none"),
])
def test_bad_input_exits_2_before_anything_loads(assets, tmp_path, capsys, extra, message):
    out = tmp_path / "run"
    code = run_with_one_line_errors(lambda argv: recipe.main(argv) and 0, flags(assets, out, "encoder", *extra),
                                    "efficient_student.py")
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("efficient_student.py: error: ") and re.search(message, err), err
    assert not out.exists()


def test_lora_transformer_student_trains_only_adapters_and_the_head(assets, tmp_path):
    """--students none --use_peft: only the transformer student, as LoRA adapters on q/k/v (+ its head), merged."""
    from hf_distill.students import build_student
    from hf_distill.students.peft_students import ADAPTER_DIR

    out = tmp_path / "lora"
    results = recipe.main(flags(assets, out, "classifier", "--students", "none", "--use_peft", "true",
                                "--lora_r", "4", "--lora_dropout", "0", "--learning_rate", "1e-2"))
    assert [r["name"] for r in results["models"]] == ["teacher", "transformer 1-layer distilled"]
    folder = out / "transformer_distilled"
    assert (folder / ADAPTER_DIR / "adapter_model.safetensors").is_file()
    merged = AutoModelForSequenceClassification.from_pretrained(folder).state_dict()
    teacher = AutoModelForSequenceClassification.from_pretrained(assets / "classifier")
    initial = build_student(teacher, num_layers=1).state_dict()
    changed = {k for k in initial if not torch.equal(initial[k], merged[k])}
    assert changed and all(re.search(r"\.(query|key|value)\.weight$|^classifier\.", k) for k in changed), changed
    assert any(".query.weight" in k for k in changed) and any(k.startswith("classifier.") for k in changed)
