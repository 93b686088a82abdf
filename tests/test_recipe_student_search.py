"""recipes/student_search.py on tiny local data: candidates cut from the teacher, the latency budget, successive
halving of short distillation runs, the front, the chosen student saved and distilled, the report."""

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest
import torch
from test_recipe_quantized import word_tokenizer, write_rows
from tiny import tiny_bert_config
from transformers import AutoModelForSequenceClassification, BertModel

from hf_distill.cli import run_with_one_line_errors

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "recipes" / "configs" / "student_search_bbc.yaml"


def _recipe():
    spec = importlib.util.spec_from_file_location("student_search_recipe", ROOT / "recipes" / "student_search.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


recipe = _recipe()


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("search_recipe")
    tokenizer = word_tokenizer()
    torch.manual_seed(0)
    easy = {"initializer_range": 0.1, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    BertModel(tiny_bert_config(len(tokenizer), layers=3, hidden=32, heads=4, **easy)).save_pretrained(root / "encoder")
    tokenizer.save_pretrained(root / "encoder")
    write_rows(root / "train.csv", 120, seed=1)
    write_rows(root / "test.csv", 45, seed=2)
    return root


def flags(assets, out, *extra):
    return ["--teacher", str(assets / "encoder"), "--train_file", str(assets / "train.csv"),
            "--test_file", str(assets / "test.csv"), "--label_column", "topic", "--output_dir", str(out),
            "--max_length", "24", "--teacher_epochs", "5", "--teacher_learning_rate", "3e-3", "--teacher_batch_size", "8",
            "--search_layers", "1,3", "--search_heads", "2,4", "--search_intermediate", "16,64",
            "--latency_budget", "1.5", "--calibration_samples", "16", "--validation_size", "30",
            "--min_steps", "3", "--eta", "2", "--search_learning_rate", "3e-3", "--final_epochs", "1",
            "--num_train_epochs", "1", "--learning_rate", "3e-3", "--per_device_train_batch_size", "8",
            "--kd_weight", "0.5", "--task_weight", "0.5", "--cos_weight", "0", "--logging_steps", "5",
            "--save_strategy", "no", "--report_to", "none", "--seed", "0", "--disable_tqdm", "true",
            "--eval_batch_size", "16", "--latency_batch_size", "8", "--latency_warmup", "1", "--latency_repeats", "3",
            "--bootstrap_resamples", "200", *extra]


def test_search_end_to_end(assets, tmp_path):
    out = tmp_path / "run"
    results = recipe.main(flags(assets, out))
    search = results["search"]
    cands = {c["name"]: c for c in search["candidates"]}
    assert len(cands) == 8 and set(search["space"]) == {"layers", "heads", "intermediate"}
    assert all(c["hidden"] == 8 * c["heads"] for c in cands.values())  # BERT: hidden = heads x head size (8)
    budget = search["budget"]["max_latency_ms"]
    assert budget == pytest.approx(1.5 * search["budget"]["teacher_latency_ms"])
    kept = [c for c in cands.values() if c["within_budget"]]
    assert all(c["latency_ms"] <= budget for c in kept) and all(
        c["latency_ms"] > budget for c in cands.values() if not c["within_budget"])
    assert search["front"] and all(cands[n]["within_budget"] for n in search["front"])
    # successive halving: 3 steps for all, then 6 for the best half, ...; the winner went furthest
    winner = results["winner"]
    assert winner["rounds"] == max(c["rounds"] for c in kept) and winner["steps"] == 3 * 2 ** (winner["rounds"] - 1)
    def first_score(c):  # held-out accuracy after round 1, ties broken by lower KL
        return c["trace"][0]["accuracy"], -c["trace"][0]["kl"]

    dropped, went_on = [c for c in kept if c["rounds"] == 1], [c for c in kept if c["rounds"] >= 2]
    assert len(went_on) == len(kept) // 2 and all(c["trace"][0]["steps"] == 3 for c in kept)
    assert min(map(first_score, went_on)) >= max(map(first_score, dropped))
    # the chosen student: saved as the search left it and after the final distillation, loads with Auto classes
    for folder in ("chosen_student", "searched_student"):
        model = AutoModelForSequenceClassification.from_pretrained(out / folder)
        assert (model.config.num_hidden_layers, model.config.num_attention_heads, model.config.intermediate_size) == (
            winner["layers"], winner["heads"], winner["intermediate"])
    assert json.loads((out / "chosen_student" / "search_choice.json").read_text())["search_steps"] == winner["steps"]
    rows = {r["name"]: r for r in results["models"]}
    searched = rows[f"searched {winner['name']}"]
    assert rows["teacher"]["accuracy"] >= 0.8 and searched["accuracy"] >= 0.6
    assert searched["params"] < rows["teacher"]["params"] or winner["name"] == "L3-H4-F64-D32"
    report = (out / "results.md").read_text()
    assert f"| {winner['name']} |" in report and "Pareto front" in report
    assert (out / "results.png").stat().st_size > 0


@pytest.mark.parametrize("extra, message", [
    (["--search_heads", "two"], r"--search_heads must be comma-separated positive integers"),
    (["--latency_budget", "0"], r"--latency_budget must be above 0"),
    (["--max_latency_ms", "5"], r"give one latency budget"),
    (["--eta", "1"], r"--eta >= 2"),
])
def test_bad_search_settings_are_refused_before_any_model_loads(assets, tmp_path, capsys, extra, message):
    out = tmp_path / "bad"
    code = run_with_one_line_errors(lambda argv: recipe.main(argv) and 0, flags(assets, out, *extra),
                                    "student_search.py")
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("student_search.py: error: ") and re.search(message, err)
    assert not out.exists()


def test_a_budget_nothing_meets_says_what_to_change(assets, tmp_path):
    with pytest.raises(ValueError, match="no candidate is within the budget.*widen the budget"):
        recipe.main(flags(assets, tmp_path / "tight", "--latency_budget", "0.0001", "--search_layers", "1",
                          "--search_heads", "2", "--search_intermediate", "16"))


@pytest.mark.slow
def test_offline_search_on_bbc_news(tmp_path):
    """The real config: MiniLM teacher on BBC News, a latency budget on this CPU, under 30 minutes."""
    results = recipe.main(["--config", str(CONFIG), "--output_dir", str(tmp_path / "search")])
    budget = results["search"]["budget"]["max_latency_ms"]
    cands = {c["name"]: c for c in results["search"]["candidates"]}
    assert all(cands[n]["latency_ms"] <= budget for n in results["search"]["front"])
    rows = {r["name"]: r for r in results["models"]}
    searched = next(r for n, r in rows.items() if n.startswith("searched"))
    assert searched["accuracy"] > 0.85 and searched["latency_ratio"] < 0.5
    assert results["stages"]["total (incl. imports)"]["seconds"] < 30 * 60
