"""The causal-LM recipe (recipes/causal_lm.py) end to end on a tiny Llama teacher trained here, and its checks.

The real offline run (SmolLM2-135M-Instruct -> 6 layers on BBC News, ~20 minutes) is marked ``slow``.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from lm_tiny import tiny_chat_tokenizer, tiny_llama
from tiny import sample_texts
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parents[1]
SMOLLM2_CONFIG = ROOT / "recipes" / "configs" / "causal_lm_smollm2.yaml"


def _recipe():
    spec = importlib.util.spec_from_file_location("causal_lm_recipe", ROOT / "recipes" / "causal_lm.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


recipe = _recipe()


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny Llama teacher that has learnt the toy corpus (120 steps), its tokenizer, and the corpus."""
    root = tmp_path_factory.mktemp("causal_lm")
    texts = sample_texts(400, seed=3)
    tok = tiny_chat_tokenizer()
    teacher = tiny_llama(len(tok), layers=4).train()
    ids = [torch.tensor(tok(t)["input_ids"][:24]) for t in texts]
    opt = torch.optim.AdamW(teacher.parameters(), lr=1e-2)
    torch.manual_seed(0)
    for step in range(120):
        batch = torch.nn.utils.rnn.pad_sequence([ids[i] for i in torch.randint(0, len(ids), (16,))],
                                                batch_first=True, padding_value=-100)
        loss = teacher(input_ids=batch.clamp(min=0), labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    teacher.eval().save_pretrained(root / "teacher")
    tok.save_pretrained(root / "teacher")
    (root / "docs.txt").write_text("\n".join(texts) + "\n")
    return root


def flags(assets, out, *extra):
    return ["--teacher", str(assets / "teacher"), "--train_file", str(assets / "docs.txt"), "--eval_size", "40",
            "--block_size", "32", "--student_layers", "2", "--max_steps", "16", "--per_device_train_batch_size", "4",
            "--learning_rate", "3e-3", "--warmup_steps", "2", "--logging_steps", "4", "--save_strategy", "no",
            "--report_to", "none", "--use_cpu", "true", "--disable_tqdm", "true", "--temperature", "1",
            "--kd_weight", "1", "--task_weight", "0", "--bootstrap_resamples", "200", "--speed_warmup", "0",
            "--speed_repeats", "1", "--output_dir", str(out), *extra]


def test_recipe_end_to_end_on_a_tiny_llama(assets, tmp_path):
    out = tmp_path / "run"
    results = recipe.main(flags(assets, out))
    rows = {r["name"]: r for r in results["models"]}
    assert set(rows) == {"teacher", "distilled student", "baseline student"}
    assert rows["teacher"]["layers"] == 4 and rows["distilled student"]["layers"] == 2
    for row in rows.values():
        lo, hi = row["perplexity_ci"]
        assert lo <= row["perplexity"] <= hi and row["tokens_per_second"] > 0
        assert 0 < row["bits_per_byte"] and row["n_units"] == 40
    assert results["training"]["teacher_outputs"] == "store" and results["training"]["steps"] == 16
    assert (out / "teacher_store" / "summary.json").is_file()
    comp = results["comparisons"]["distilled_minus_baseline"]
    assert comp["diff"] == pytest.approx(rows["distilled student"]["perplexity"] - rows["baseline student"]["perplexity"])
    assert math.isfinite(results["comparisons"]["gap_closed"]["log_space"])
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["models"] == json.loads(json.dumps(results["models"]))
    assert "held-out perplexity" in (out / "results.md").read_text() and (out / "results.png").stat().st_size > 0
    # the losses were logged per step, and the distilled student trained on the divergence only
    logged = [h for h in results["log_history"]["distilled"] if "loss_kd" in h]
    assert [h["step"] for h in logged] == [4, 8, 12, 16] and logged[-1]["loss_kd"] < logged[0]["loss_kd"]
    # the saved student loads, gives the reported held-out perplexity, and improved on its initial weights
    from hf_distill.config import parse_config_and_args
    from hf_distill.lm.arguments import CausalLMDistillationArguments
    from hf_distill.lm.evaluation import score_units
    from hf_distill.lm.recipe_steps import load_lm_documents, tokenize_lm_data
    from hf_distill.students import build_student

    settings, _ = parse_config_and_args((recipe.CausalLMRecipeArguments, CausalLMDistillationArguments),
                                        flags(assets, out))
    tok = AutoTokenizer.from_pretrained(out / "student_distilled")
    _, windows = tokenize_lm_data(load_lm_documents(settings), tok, settings)
    saved = AutoModelForCausalLM.from_pretrained(out / "student_distilled").eval()
    ppl = score_units(saved, windows, pad_token_id=tok.pad_token_id).perplexity
    assert ppl == pytest.approx(rows["distilled student"]["perplexity"], rel=1e-5)
    initial = build_student(AutoModelForCausalLM.from_pretrained(assets / "teacher"), num_layers=2)
    assert ppl < 0.8 * score_units(initial, windows, pad_token_id=tok.pad_token_id).perplexity
    card = (out / "student_distilled" / "README.md").read_text()
    assert "held-out perplexity" in card and "text-generation" in card
    assert results["pushed_to"] is None


def test_jsd_runs_with_the_live_teacher_and_pushes_the_student_with_its_card(assets, tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub import ModelCard

    calls = []

    class FakeApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, exist_ok, private):
            calls.append(("create_repo", repo_id))

        def upload_folder(self, folder_path, repo_id, commit_message, ignore_patterns):
            calls.append(("upload_folder", folder_path, repo_id))
            return type("Info", (), {"commit_url": f"https://hub/{repo_id}/commit/1"})()

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    out = tmp_path / "jsd"
    results = recipe.main(flags(assets, out, "--divergence", "jsd", "--beta", "0.5", "--max_steps", "4",
                                "--baseline", "false", "--plot", "false", "--logging_steps", "2",
                                "--push_to_hub", "true", "--hub_model_id", "me/tiny-lm"))
    assert calls == [("create_repo", "me/tiny-lm"), ("upload_folder", str(out / "student_distilled"), "me/tiny-lm")]
    assert results["pushed_to"] == "https://hub/me/tiny-lm/commit/1"
    card = ModelCard.load(out / "student_distilled" / "README.md")
    assert card.data.pipeline_tag == "text-generation" and card.data.model_name == "me/tiny-lm"
    evals = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert evals["perplexity"] == pytest.approx(results["models"][1]["perplexity"])
    assert results["training"]["teacher_outputs"] == "live" and results["training"]["beta"] == 0.5
    assert results["training"]["distillation"] == [{"loss": "jsd", "weight": 1.0, "beta": 0.5}]
    assert any("loss_jsd" in h for h in results["log_history"]["distilled"])
    assert "distilled_minus_baseline" not in results["comparisons"]


def test_prompt_completion_data_on_policy(assets, tmp_path):
    """Prompt-completion rows: only completion tokens are evaluated, and --lmbda 1 trains on the student's own
    samples (the on-policy trainer logs its generation time)."""
    rows = [{"prompt": " ".join(t.split()[:3]), "completion": " " + " ".join(t.split()[3:])}
            for t in sample_texts(60, seed=5)]
    data = tmp_path / "pc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    extra = ("--train_file", str(data), "--eval_size", "10", "--divergence", "reverse_kl", "--lmbda", "1",
             "--max_new_tokens", "6", "--max_steps", "2", "--logging_steps", "1", "--baseline", "false",
             "--plot", "false")
    args = flags(assets, tmp_path / "pc", *extra)
    args[args.index("--train_file") + 1] = str(data)  # the last --train_file / --eval_size win
    results = recipe.main(args)
    assert results["data"]["format"] == "prompt_completion" and results["training"]["teacher_outputs"] == "live"
    from hf_distill.config import parse_config_and_args
    from hf_distill.lm.arguments import CausalLMDistillationArguments
    from hf_distill.lm.recipe_steps import load_lm_documents

    settings, _ = parse_config_and_args((recipe.CausalLMRecipeArguments, CausalLMDistillationArguments), args)
    held = load_lm_documents(settings).eval
    teacher = {r["name"]: r for r in results["models"]}["teacher"]
    assert teacher["n_units"] == 10  # one unit per held-out row; its bytes are the completions' only
    assert teacher["n_bytes"] == sum(len(c.encode()) for c in held["completion"])
    logged = [h for h in results["log_history"]["distilled"] if "loss_reverse_kl" in h]
    assert len(logged) == 2 and all(h["generation_seconds"] > 0 for h in logged)


def test_rerun_resumes_and_other_settings_are_refused(assets, tmp_path):
    out = tmp_path / "resume"
    quick = ("--baseline", "false", "--plot", "false", "--save_strategy", "steps", "--save_steps", "4",
             "--max_steps", "8", "--bootstrap_resamples", "50")
    first = recipe.main(flags(assets, out, *quick))
    assert (out / "student_distilled" / "checkpoint-8").is_dir()
    again = recipe.main(flags(assets, out, *quick))  # same settings: the finished run is resumed, nothing trains
    assert again["log_history"]["distilled"][-1]["step"] == 8 and not (out / "student_distilled" / "checkpoint-9").exists()
    assert again["models"][1]["perplexity"] == pytest.approx(first["models"][1]["perplexity"], rel=1e-6)
    with pytest.raises(ValueError, match=r"max_length: 32 -> 24.*--start_fresh true"):  # the store's own check
        recipe.main(flags(assets, out, *quick, "--block_size", "24"))
    fresh = recipe.main(flags(assets, out, *quick, "--block_size", "24", "--start_fresh", "true"))
    assert fresh["data"]["block_size"] == 24 and fresh["log_history"]["distilled"][-1]["step"] == 8
    assert len(list(out.glob("_replaced-teacher_store-*"))) == 1  # the old store and checkpoints are set aside
    assert list((out / "student_distilled").glob("_replaced-*/checkpoint-8"))


@pytest.mark.parametrize("extra, message", [
    (("--divergence", "reverse_kl", "--teacher_outputs", "store"), "needs the full distribution"),
    (("--lmbda", "0.5"), "plain text has none"),
    (("--eval_size", "400"), "leaves rows on both sides"),
    (("--source", "bbc_news"), "exactly one data source"),
])
def test_wrong_settings_are_refused_before_training(assets, tmp_path, extra, message):
    with pytest.raises(Exception, match=message):
        recipe.main(flags(assets, tmp_path / "bad", *extra))
    assert not (tmp_path / "bad" / "student_distilled").exists()


def test_unknown_config_key_is_refused(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(SMOLLM2_CONFIG.read_text() + "temprature: 2\n")
    with pytest.raises(ValueError, match="temprature.*did you mean temperature"):
        recipe.main(["--config", str(config)])


@pytest.mark.slow
def test_smollm2_distilled_student_beats_the_baseline_on_bbc_news(tmp_path):
    """The README's language-model result: SmolLM2-135M-Instruct -> 6 layers on BBC News, nothing from the Hub."""
    results = recipe.main(["--config", str(SMOLLM2_CONFIG), "--output_dir", str(tmp_path / "smollm2")])
    rows = {r["name"]: r for r in results["models"]}
    comp = results["comparisons"]["distilled_minus_baseline"]
    assert comp["high"] < 0  # the distilled student's perplexity is lower, outside the paired 95% interval
    assert rows["teacher"]["perplexity"] < rows["distilled student"]["perplexity"]
    assert rows["distilled student"]["tokens_per_second"] > 1.5 * rows["teacher"]["tokens_per_second"]
    for name in ("results.json", "results.md", "results.png"):
        assert (tmp_path / "smollm2" / name).stat().st_size > 0
