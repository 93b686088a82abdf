"""recipes/student_architectures.py on tiny local data: every student form in one run and one table."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from test_recipe_student_search import assets  # noqa: F401  (the tiny encoder and CSV files)
from test_recipe_student_search import flags as search_flags
from transformers import AutoModelForSequenceClassification

from hf_distill.quantization import load_int8, quantized_modules

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "recipes" / "configs" / "student_architectures_bbc.yaml"


def _recipe():
    spec = importlib.util.spec_from_file_location("student_architectures_recipe",
                                                  ROOT / "recipes" / "student_architectures.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


recipe = _recipe()


def flags(assets, out, *extra):  # noqa: F811
    return search_flags(assets, out, "--shallow_layers", "1", "--narrow_heads", "2", "--narrow_intermediate", "16",
                        "--qat_epochs", "1", "--qat_learning_rate", "3e-4", "--embedding_dim", "16",
                        "--lstm_hidden_size", "16", "--num_filters", "8", "--kernel_sizes", "2,3",
                        "--classifier_hidden_size", "16", "--efficient_epochs", "3", "--efficient_learning_rate",
                        "1e-2", "--efficient_batch_size", "8", "--num_train_epochs", "2", "--search_layers", "1",
                        "--search_intermediate", "16", "--min_steps", "2", *extra)


def test_every_student_form_in_one_table(assets, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    results = recipe.main(flags(assets, out))
    rows = {r["name"]: r for r in results["models"]}
    winner = results["winner"]["name"]
    assert list(rows) == ["teacher", "shallow (1 layers)", "PTQ int8 (shallow)", "QAT int8 (shallow)",
                          "narrow, pruned only", "narrow (2 heads, FFN 16, hidden 16)", "BiLSTM (bilstm)", "CNN (cnn)",
                          f"searched {winner}"]
    assert set(results["forms"]) == set(rows)
    for r in rows.values():
        lo, hi = r["accuracy_ci"]
        assert 0 <= lo <= r["accuracy"] <= hi <= 1 and r["latency_ms"] > 0 and r["size_bytes"] > 0
    assert rows["teacher"]["latency_ratio"] == 1.0 and rows["teacher"]["accuracy"] >= 0.8
    # the narrow student: the teacher's depth at the pruned width, before and after distillation
    pruned = AutoModelForSequenceClassification.from_pretrained(out / "narrow_pruned").config
    assert (pruned.num_hidden_layers, pruned.num_attention_heads, pruned.intermediate_size, pruned.hidden_size) == (
        3, 2, 16, 16)
    assert rows["narrow (2 heads, FFN 16, hidden 16)"]["params"] == rows["narrow, pruned only"]["params"]
    recovery = results["comparisons"]["narrow (2 heads, FFN 16, hidden 16) minus narrow, pruned only"]
    assert recovery["diff"] == pytest.approx(rows["narrow (2 heads, FFN 16, hidden 16)"]["accuracy"]
                                             - rows["narrow, pruned only"]["accuracy"])
    assert rows["narrow (2 heads, FFN 16, hidden 16)"]["accuracy"] >= 0.6
    # the int8 students are real int8 models, smaller on disk, counted as the shallow student's architecture
    for name, folder in (("PTQ int8 (shallow)", "ptq_int8"), ("QAT int8 (shallow)", "qat_int8")):
        assert quantized_modules(load_int8(out / folder))
        assert rows[name]["size_bytes"] < rows["shallow (1 layers)"]["size_bytes"]
        assert rows[name]["params"] == rows["shallow (1 layers)"]["params"]
    assert results["qat_export"]["fake_quant_modules_after_export"] == 0
    # the search ran with its budget; every front member respects it
    budget = results["search"]["budget"]["max_latency_ms"]
    cands = {c["name"]: c for c in results["search"]["candidates"]}
    assert all(cands[n]["latency_ms"] <= budget for n in results["search"]["front"])
    report = (out / "results.md").read_text()
    assert "| fewer neurons: pruned, before distillation | narrow, pruned only |" in report and "## Search" in report
    assert json.loads((out / "results.json").read_text())["models"][-1]["name"] == f"searched {winner}"
    assert (out / "results.png").stat().st_size > 0


def test_bad_settings_of_any_step_are_refused_before_loading(assets, tmp_path):  # noqa: F811
    for extra, message in ((["--qat_epochs", "0"], "--qat_epochs must be > 0"),
                           (["--students", "gru"], "--students must list some of bilstm, cnn"),
                           (["--search_layers", "x"], "--search_layers must be comma-separated"),
                           (["--cos_weight", "1"], "this student has no transformer layers")):
        with pytest.raises(ValueError, match=message):
            recipe.main(flags(assets, tmp_path / "bad", *extra))
        assert not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_student_architectures_on_bbc_news(tmp_path):
    """The real config: MiniLM teacher on BBC News, every form, under 30 minutes on this CPU."""
    results = recipe.main(["--config", str(CONFIG), "--output_dir", str(tmp_path / "arch")])
    rows = {r["name"]: r for r in results["models"]}
    assert len(rows) == 9 and rows["teacher"]["accuracy"] > 0.9
    assert all(r["latency_ratio"] < 0.7 for n, r in rows.items() if n != "teacher")
    assert results["comparisons"][next(k for k in results["comparisons"] if "pruned only" in k)]["low"] > 0
    # 35.6 min measured with the teacher reused, on a 2-core CPU shared with other jobs (the search alone: 12.4 min)
    assert results["stages"]["total (incl. imports)"]["seconds"] < 45 * 60
