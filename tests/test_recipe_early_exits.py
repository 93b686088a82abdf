"""recipes/early_exits.py: fast runs on a tiny local BERT; the real BBC News run is marked ``slow``."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_text_classification import topic_rows, word_tokenizer, write_csv
from tiny import tiny_bert_config
from transformers import AutoModelForSequenceClassification, BertModel

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "early_exits.py"
BBC_CONFIG = ROOT / "recipes" / "configs" / "early_exits_bbc.yaml"


@pytest.fixture(scope="module")
def recipe():
    spec = importlib.util.spec_from_file_location("early_exits_recipe", RECIPE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny 4-layer BERT encoder without a classification head, and topic CSV files."""
    root = tmp_path_factory.mktemp("early_exits")
    tokenizer = word_tokenizer()
    easy = {"initializer_range": 0.1, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    torch.manual_seed(0)
    BertModel(tiny_bert_config(len(tokenizer), layers=4, hidden=32, **easy)).save_pretrained(root / "encoder")
    tokenizer.save_pretrained(root / "encoder")
    write_csv(root / "train.csv", topic_rows(120, seed=1))
    write_csv(root / "test.csv", topic_rows(45, seed=2))
    return root


def fast_flags(assets, out, *extra):
    return ["--model", str(assets / "encoder"), "--train_file", str(assets / "train.csv"),
            "--test_file", str(assets / "test.csv"), "--label_column", "topic", "--output_dir", str(out),
            "--max_length", "24", "--finetune_epochs", "6", "--finetune_learning_rate", "3e-3",
            "--finetune_batch_size", "8", "--exit_layers", "1,2,3", "--exit_ce_weight", "0.5",
            "--num_train_epochs", "4", "--learning_rate", "3e-3", "--per_device_train_batch_size", "8",
            "--temperature", "2", "--logging_steps", "5", "--save_strategy", "no", "--report_to", "none",
            "--seed", "0", "--disable_tqdm", "true", "--eval_batch_size", "16", "--latency_batch_size", "8",
            "--latency_warmup", "1", "--latency_repeats", "3", "--bootstrap_resamples", "200", *extra]


def test_recipe_trains_exits_and_reports_accuracy_and_latency_per_exit(recipe, assets, tmp_path):
    out = tmp_path / "run"
    results = recipe.main(fast_flags(assets, out, "--export_exit_layer", "2"))
    rows = {r["exit_layer"]: r for r in results["exits"]}
    assert sorted(rows) == [1, 2, 3, 4]
    full = rows[4]
    assert full["name"] == "full model (4 layers)" and full["accuracy"] > 0.8  # 3 topics: chance is 1/3
    assert rows[3]["accuracy"] > 0.6 and rows[3]["agreement_with_full"] > 0.6
    for layer in (1, 2, 3):
        row = rows[layer]
        assert 0 <= row["accuracy_ci"][0] <= row["accuracy"] <= row["accuracy_ci"][1] <= 1
        assert row["minus_full"]["low"] <= row["minus_full"]["diff"] <= row["minus_full"]["high"]
        assert row["params_run"] < rows[layer + 1]["params_run"]  # fewer layers run
        assert row["latency_ms"] > 0
    assert results["latency"]["threads"] == 1
    # Each exit was logged on its own; the frozen backbone gave the full model's answers unchanged.
    logged = {k for h in results["log_history"]["exits"] for k in h}
    assert {"loss_exit1", "loss_exit2", "loss_exit3"} <= logged
    finetuned = AutoModelForSequenceClassification.from_pretrained(out / "model")
    with_exits = AutoModelForSequenceClassification.from_pretrained(out / "model_with_exits")
    assert all(torch.equal(a, b) for a, b in zip(finetuned.state_dict().values(), with_exits.state_dict().values()))
    assert (out / "model_with_exits" / "exit_heads.safetensors").is_file()
    assert json.loads((out / "model_with_exits" / "exit_heads.json").read_text())["layers"] == [1, 2, 3]
    exported = AutoModelForSequenceClassification.from_pretrained(out / "exit_2")
    assert exported.config.num_hidden_layers == 2
    report = (out / "results.md").read_text()
    assert "| exit after layer |" in report and "| 4 (full) |" in report
    assert json.loads((out / "results.json").read_text())["exits"][0]["exit_layer"] == 1
    # A second run reuses the fine-tuned classifier and trains the backbone with its exits.
    again = recipe.main(fast_flags(assets, out, "--train_backbone", "true", "--task_weight", "1.0"))
    assert again["stages"]["model"]["note"].startswith("reused: found the classifier in")
    assert again["training"]["train_backbone"] is True
    retrained = AutoModelForSequenceClassification.from_pretrained(out / "model_with_exits")
    assert not all(torch.equal(a, b) for a, b in zip(finetuned.state_dict().values(),
                                                     retrained.state_dict().values()))


@pytest.mark.parametrize("flags, message", [
    (("--exit_layers", "0,2"), r"--exit_layers: layer 0 is out of range; exits go after layers 1..4"),
    (("--exit_layers", "2,9"), r"--exit_layers: layer 9 is out of range"),
    (("--export_exit_layer", "1", "--exit_layers", "2"), r"--export_exit_layer 1 has no exit; choose one of"),
    (("--export_exit_layer", "2", "--exit_head", "linear"), r"--export_exit_layer needs copied heads"),
    (("--export_exit_layer", "2", "--exit_pooling", "mean"), r"--export_exit_layer needs --exit_pooling cls"),
    (("--exit_pooling", "max"), r"--exit_pooling must be 'cls' or 'mean', got 'max'"),
    (("--exit_head", "mlp"), r"--exit_head must be one of auto, copy, linear, got 'mlp'"),
    (("--exit_ce_weight", "-1"), r"--exit_ce_weight must be >= 0"),
    (("--use_peft", "true"), r"--use_peft trains LoRA adapters on the backbone, but with --train_backbone false"),
    (("--use_peft", "true", "--train_backbone", "true", "--merge_adapters", "false"),
     r"--use_peft needs --merge_adapters true here"),
])
def test_bad_exit_settings_stop_before_training(recipe, assets, tmp_path, flags, message):
    with pytest.raises(ValueError, match=message):
        recipe.main(fast_flags(assets, tmp_path / "bad", *flags))
    assert not (tmp_path / "bad" / "model").exists()  # nothing was fine-tuned


def test_lora_backbone_trains_with_its_exits(recipe, assets, tmp_path):
    """--use_peft --train_backbone: LoRA adapters on q/k/v and the exit heads train; the model's own head and every
    other backbone weight stay as fine-tuned; the saved model is the merged one, and exits load and run on it."""
    import re

    from hf_distill.students.peft_students import ADAPTER_DIR

    out = tmp_path / "lora"
    results = recipe.main(fast_flags(assets, out, "--train_backbone", "true", "--task_weight", "1.0", "--use_peft",
                                     "true", "--lora_r", "4", "--lora_dropout", "0", "--export_exit_layer", "2"))
    assert (out / "model_with_exits" / ADAPTER_DIR / "adapter_model.safetensors").is_file()
    finetuned = AutoModelForSequenceClassification.from_pretrained(out / "model").state_dict()
    merged = AutoModelForSequenceClassification.from_pretrained(out / "model_with_exits").state_dict()
    changed = {k for k in finetuned if not torch.equal(finetuned[k], merged[k])}
    assert changed and all(re.search(r"\.(query|key|value)\.weight$", k) for k in changed), changed
    assert {"loss_exit1", "loss_exit2", "loss_exit3"} <= {k for h in results["log_history"]["exits"] for k in h}
    assert sorted(r["exit_layer"] for r in results["exits"]) == [1, 2, 3, 4]
    assert AutoModelForSequenceClassification.from_pretrained(out / "exit_2").config.num_hidden_layers == 2


def test_recipe_command_line_error_is_one_line_with_exit_code_2(assets, tmp_path):
    proc = subprocess.run([sys.executable, str(RECIPE), *fast_flags(assets, tmp_path / "cli", "--exit_layers", "7")],
                          check=False, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("early_exits.py: error: --exit_layers: layer 7 is out of range")


@pytest.mark.slow
def test_early_exits_on_minilm_and_bbc_news(recipe, tmp_path):
    """The README's deep-to-shallow example: MiniLM fine-tuned on BBC News, exits after layers 1-5."""
    results = recipe.main(["--config", str(BBC_CONFIG), "--output_dir", str(tmp_path / "bbc")])
    rows = {r["exit_layer"]: r for r in results["exits"]}
    assert sorted(rows) == [1, 2, 3, 4, 5, 6] and results["data"]["n_test"] == 444
    assert rows[6]["accuracy"] > 0.85  # chance is ~0.23 (the largest class)
    assert rows[5]["accuracy"] > 0.85 and rows[3]["accuracy"] > 0.8
    assert rows[1]["latency_ms"] < 0.5 * rows[6]["latency_ms"]  # one layer of six runs
    assert rows[3]["latency_ms"] < rows[6]["latency_ms"]
    for name in ("results.json", "results.md"):
        assert (tmp_path / "bbc" / name).stat().st_size > 0
