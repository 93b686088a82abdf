"""recipes/self_distillation.py: mutual learning, EMA and born-again self-distillation of a small text
classifier, each against the same initial model trained alone (tiny local models; the real runs are slow)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from test_text_classification import assets  # noqa: F401 - the tiny encoder and topic CSVs (a fixture)

ROOT = Path(__file__).resolve().parents[1]


def _recipe():
    spec = importlib.util.spec_from_file_location("self_distillation_recipe", ROOT / "recipes" / "self_distillation.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


recipe = _recipe()


def flags(assets, out, scheme, *extra):  # noqa: F811
    return ["--scheme", scheme, "--init_from", str(assets / "encoder"), "--train_file", str(assets / "train.csv"),
            "--test_file", str(assets / "test.csv"), "--label_column", "topic", "--output_dir", str(out),
            "--max_length", "24", "--student_layers", "0,3", "--peer_layers", "1,2", "--num_train_epochs", "4",
            "--learning_rate", "3e-3", "--per_device_train_batch_size", "8", "--kd_weight", "0.5",
            "--task_weight", "0.5", "--cos_weight", "0", "--temperature", "2", "--logging_steps", "5",
            "--save_strategy", "no", "--report_to", "none", "--seed", "0", "--disable_tqdm", "true",
            "--eval_batch_size", "16", "--latency_batch_size", "8", "--latency_warmup", "1", "--latency_repeats", "2",
            "--bootstrap_resamples", "200", *extra]


def check_common(results, out, names):
    rows = {r["name"]: r for r in results["models"]}
    assert list(rows) == names
    for name, row in rows.items():
        lo, hi = row["accuracy_ci"]
        assert 0 <= lo <= row["accuracy"] <= hi <= 1 and row["n"] == 45 and row["layers"] == 2
    hist = results["log_history"]
    steps = results["training"]["steps"]
    assert steps == 4 * 15  # 4 epochs of 120 rows in batches of 8
    assert all(hist[n][-1]["step"] == steps for n in hist)  # every model took the same optimiser steps
    stored = json.loads((out / "results.json").read_text())
    assert stored["comparisons"] == results["comparisons"]
    md = (out / "results.md").read_text()
    assert "vs student alone" in md and "minus student alone" in md
    return rows


def test_mutual_learning_trains_both_peers_and_compares_each_with_itself_alone(assets, tmp_path):  # noqa: F811
    out = tmp_path / "mutual"
    results = recipe.main(flags(assets, out, "mutual"))
    rows = check_common(results, out, ["student (mutual)", "peer (mutual)", "student alone", "peer alone"])
    assert results["teacher_source"] == "peer" and results["layers"] == {"student": "0,3", "peer": "1,2"}
    assert set(results["comparisons"]) == {"student (mutual) minus student alone", "peer (mutual) minus peer alone"}
    assert rows["student (mutual)"]["accuracy"] > 0.6 and rows["peer (mutual)"]["accuracy"] > 0.6  # chance: 1/3
    assert any("loss_kd" in h for h in results["log_history"]["distilled"])
    assert not any("loss_kd" in h for h in results["log_history"]["peer alone"])
    assert [g["goal"] for g in results["goals"]] == ["student (mutual) beats student alone",
                                                     "peer (mutual) beats peer alone"]
    assert (out / "peer_mutual" / "config.json").is_file() and (out / "peer_alone" / "config.json").is_file()


def test_ema_self_distillation_reports_the_student_and_the_ema_model(assets, tmp_path):  # noqa: F811
    out = tmp_path / "ema"
    results = recipe.main(flags(assets, out, "ema", "--ema_decay", "0.9"))
    rows = check_common(results, out, ["student (EMA teacher)", "EMA model", "student alone"])
    assert results["training"]["ema_decay"] == 0.9
    assert rows["student (EMA teacher)"]["accuracy"] > 0.6
    assert set(results["comparisons"]) == {"student (EMA teacher) minus student alone", "EMA model minus student alone"}


def test_born_again_snapshots(assets, tmp_path):  # noqa: F811
    out = tmp_path / "snapshot"
    results = recipe.main(flags(assets, out, "snapshot"))
    check_common(results, out, ["student (born-again)", "student alone"])
    assert results["teacher_source"] == "snapshot"


@pytest.mark.parametrize("scheme, names", [
    ("mutual", ["student (mutual)", "peer (mutual)", "student alone", "peer alone"]),
    ("ema", ["student (EMA teacher)", "EMA model", "student alone"]),
])
def test_lora_students_in_each_scheme(assets, tmp_path, scheme, names):  # noqa: F811
    """--use_peft: every model trains LoRA adapters (+ classifier) from the same initial adapters, saved merged."""
    import re

    import torch
    from transformers import AutoModelForSequenceClassification

    from hf_distill.students.peft_students import ADAPTER_DIR

    out = tmp_path / scheme
    results = recipe.main(flags(assets, out, scheme, "--use_peft", "true", "--lora_r", "4", "--lora_dropout", "0",
                                "--num_train_epochs", "2", "--ema_decay", "0.9"))
    rows = {r["name"]: r for r in results["models"]}
    assert list(rows) == names and any("loss_kd" in h for h in results["log_history"]["distilled"])
    folders = {"student alone": "student_alone", names[0]: names[0].replace(" ", "_").replace("(", "").replace(")", "")}
    weights = {}
    for name, folder in folders.items():
        assert (out / folder / ADAPTER_DIR / "adapter_model.safetensors").is_file()
        weights[name] = AutoModelForSequenceClassification.from_pretrained(out / folder).state_dict()
    ema_or_peer = AutoModelForSequenceClassification.from_pretrained(out / names[1].replace(" ", "_").replace(
        "(", "").replace(")", "")).state_dict()
    assert set(ema_or_peer) == set(weights["student alone"])  # a merged, plain model
    a, b = weights[names[0]], weights["student alone"]
    differ = {k for k in a if not torch.equal(a[k], b[k])}  # same start, same frozen base: only adapted weights move
    assert differ and all(re.search(r"\.(query|key|value)\.weight$|^classifier\.", k) for k in differ), differ


@pytest.mark.parametrize("extra, message", [
    (["--scheme", "snapshot", "--num_train_epochs", "1"], r"--scheme snapshot needs at least 2 epochs"),
    (["--teacher_source", "frozen"], r"--scheme mutual uses --teacher_source peer; drop --teacher_source frozen"),
    (["--kd_weight", "0"], r"--kd_weight must be above 0"),
    (["--init_from", ""], r"no encoder to start from: set --init_from"),
])
def test_bad_settings_exit_2_before_loading(assets, tmp_path, capsys, extra, message):  # noqa: F811
    import re

    from hf_distill.cli import run_with_one_line_errors

    out = tmp_path / "run"
    code = run_with_one_line_errors(lambda argv: recipe.main(argv) and 0, flags(assets, out, "mutual", *extra),
                                    "self_distillation.py")
    assert code == 2 and re.search(message, capsys.readouterr().err)
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["mutual", "ema"])
def test_offline_examples_on_bbc_news(scheme, tmp_path):
    """The README's examples: MiniLM layers -> 2-layer students on BBC News, each vs itself trained alone."""
    config = ROOT / "recipes" / "configs" / f"self_distillation_{scheme}_bbc.yaml"
    results = recipe.main(["--config", str(config), "--output_dir", str(tmp_path / scheme)])
    rows = {r["name"]: r for r in results["models"]}
    assert results["data"]["n_test"] == 444
    assert all(r["layers"] == 2 and r["accuracy"] > 0.8 for r in rows.values())  # chance: ~0.23
    hist = results["log_history"]
    assert all(h[-1]["step"] == results["training"]["steps"] for h in hist.values())
    assert len(results["comparisons"]) == 2 and len(results["goals"]) == 2
    for name in ("results.json", "results.md"):
        assert (tmp_path / scheme / name).stat().st_size > 0
