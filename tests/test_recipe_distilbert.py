"""The DistilBERT recipe end to end, offline: a tiny BERT teacher made here and local text."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForMaskedLM, AutoTokenizer

from tiny import make_wordpiece_tokenizer, sample_texts, tiny_bert_mlm

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("distilbert_recipe")
    texts = sample_texts(400, seed=11, min_len=8, max_len=30)
    tokenizer = make_wordpiece_tokenizer(texts)
    teacher = tiny_bert_mlm(len(tokenizer), layers=4, hidden=32, seed=0)
    teacher.save_pretrained(root / "teacher")
    tokenizer.save_pretrained(root / "teacher")
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(texts) + "\n")
    return root


def recipe_flags(assets, out, *extra, teacher=None):
    return ["--config", str(ROOT / "recipes" / "configs" / "distilbert.yaml"),
            "--teacher", str(teacher or assets / "teacher"), "--train_files", str(assets / "corpus.txt"),
            "--student_layers", "0,3", "--output_dir", str(out), "--block_size", "32",
            "--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "2", "--max_steps", "4",
            "--save_steps", "2", "--eval_steps", "2", "--logging_steps", "1", "--eval_size", "16",
            "--use_cpu", "true", "--dataloader_num_workers", "0", "--disable_tqdm", "true", *extra]


def run_recipe(assets, out, *extra, expect=0):
    cmd = [sys.executable, str(ROOT / "recipes" / "distilbert.py"), *recipe_flags(assets, out, *extra)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == expect, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def first_run(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("distilbert_first") / "run"
    run_recipe(assets, out)
    return out


def test_recipe_end_to_end_and_resume(assets, first_run, tmp_path):
    out = first_run
    final = out / "final"
    student = AutoModelForMaskedLM.from_pretrained(final)
    assert type(student).__name__ == "DistilBertForMaskedLM" and student.config.n_layers == 2
    tokenizer = AutoTokenizer.from_pretrained(final)
    with torch.no_grad():
        logits = student(**tokenizer(["the cat sat on the mat ."], return_tensors="pt")).logits
    assert logits.shape[-1] == len(tokenizer) and torch.isfinite(logits).all()
    card = (final / "README.md").read_text()
    for needle in ("| temperature | 2.0 |", "| kd_weight | 5.0 |", "| cos_weight | 1.0 |", "[0, 3]",
                   "DistilBertForMaskedLM"):
        assert needle in card, needle
    history = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())["log_history"]
    assert {"loss_kd", "loss_mlm", "loss_cos"} <= set(history[0])
    assert any("eval_loss_kd" in h for h in history)

    # Interrupted after step 2 and restarted with the same command: the same student as one run.
    resumed = tmp_path / "resumed"
    run_recipe(assets, resumed)
    shutil.rmtree(resumed / "checkpoint-4")
    shutil.rmtree(resumed / "final")
    proc = run_recipe(assets, resumed)
    assert "resuming from" in proc.stderr + proc.stdout
    a = load_file(str(final / "model.safetensors"))
    b = load_file(str(resumed / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k


def test_rerun_with_other_settings_is_refused_until_start_fresh(assets, first_run, tmp_path, monkeypatch):
    out = tmp_path / "run"
    shutil.copytree(first_run, out)
    proc = run_recipe(assets, out, "--temperature", "4", "--student_layers", "0,2", expect=2)
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith("distilbert.py: error: cannot resume from") and "checkpoint-4" in error
    for difference in ("temperature: 2.0 in the checkpoint, 4.0 now",
                       'recipe.student_layers: "0,3" in the checkpoint, "0,2" now', "--start_fresh"):
        assert difference in error, difference
    assert "Traceback" not in proc.stderr
    old_final = load_file(str(out / "final" / "model.safetensors"))

    monkeypatch.syspath_prepend(str(ROOT / "recipes"))
    import distilbert

    distilbert.main(recipe_flags(assets, out, "--temperature", "4", "--student_layers", "0,2", "--start_fresh", "true"))
    aside = [p for p in out.iterdir() if p.name.startswith("_replaced-")]
    assert len(aside) == 1 and sorted(p.name for p in aside[0].iterdir()) == ["checkpoint-2", "checkpoint-4"]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    settings = json.loads((out / "checkpoint-4" / "distillation_settings.json").read_text())["compared"]
    assert settings["temperature"] == 4.0 and settings["recipe.student_layers"] == "0,2"
    assert "| temperature | 4.0 |" in (out / "final" / "README.md").read_text()
    new_final = load_file(str(out / "final" / "model.safetensors"))
    assert any(not torch.equal(old_final[k], new_final[k]) for k in old_final)


def test_model_card_metadata_and_push(assets, tmp_path, monkeypatch):
    """In process: the card's parsed metadata, and --push_to_hub through a stand-in for huggingface_hub.HfApi."""
    import huggingface_hub
    from huggingface_hub import ModelCard

    # A teacher folder laid out like the Hub cache: its repository id becomes the card's base_model.
    snapshot = tmp_path / "hub" / "models--tiny-org--bert-mlm" / "snapshots" / "0123abc"
    shutil.copytree(assets / "teacher", snapshot)
    calls = []

    class FakeApi:
        def __init__(self, token=None):
            calls.append(("token", token))

        def create_repo(self, repo_id, exist_ok, private):
            calls.append(("create_repo", repo_id, private))

        def upload_folder(self, folder_path, repo_id, commit_message, ignore_patterns):
            calls.append(("upload_folder", folder_path, repo_id, tuple(ignore_patterns),
                          sorted(p.name for p in Path(folder_path).iterdir())))
            return type("Info", (), {"commit_url": f"https://hub/{repo_id}/commit/1"})()

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.syspath_prepend(str(ROOT / "recipes"))
    import distilbert

    out = tmp_path / "run"
    final = distilbert.main(recipe_flags(assets, out, "--push_to_hub", "true", "--hub_model_id", "me/tiny-distil",
                                         "--hub_token", "secret", "--hub_private_repo", "true", teacher=snapshot))
    card = ModelCard.load(final / "README.md")
    data = card.data
    assert data.base_model == "tiny-org/bert-mlm" and data.library_name == "transformers"
    assert data.pipeline_tag == "fill-mask" and {"distillation", "hf-distill"} <= set(data.tags)
    assert data.model_name == "me/tiny-distil" and not data.datasets  # local text files: no Hub dataset
    evals = {r.metric_type: r for r in data.eval_results}
    assert {"loss", "loss_kd", "loss_mlm", "loss_cos"} <= set(evals)
    assert all(r.task_type == "fill-mask" and r.dataset_split == "held-out blocks" for r in evals.values())
    stored = json.loads((final / "distillation.json").read_text())
    assert abs(evals["loss"].metric_value - stored["results"]["eval_loss"]) < 1e-9
    assert stored["teacher"] == str(snapshot) and stored["teacher_layers_copied"] == [0, 3]
    assert "| temperature | 2.0 |" in card.text and str(snapshot) in card.text
    # The Trainer pushed nothing (no checkpoint uploads); the recipe uploaded the final folder once.
    assert [c[0] for c in calls] == ["token", "create_repo", "upload_folder"]
    assert calls[0] == ("token", "secret") and calls[1] == ("create_repo", "me/tiny-distil", True)
    _, folder, repo, ignore, files = calls[2]
    assert folder == str(final) and repo == "me/tiny-distil" and "checkpoint-*" in ignore and "_*" in ignore
    assert {"README.md", "distillation.json", "model.safetensors", "config.json"} <= set(files)


def test_a_teacher_without_its_mlm_head_is_refused(assets, tmp_path, monkeypatch):
    from transformers import BertModel

    from tiny import tiny_bert_config

    tokenizer = AutoTokenizer.from_pretrained(assets / "teacher")
    bare = tmp_path / "bert_model"
    BertModel(tiny_bert_config(len(tokenizer), layers=4)).save_pretrained(bare)  # an encoder, no MLM head
    tokenizer.save_pretrained(bare)
    monkeypatch.syspath_prepend(str(ROOT / "recipes"))
    import distilbert

    with pytest.raises(ValueError, match="cls.predictions"):
        distilbert.main(recipe_flags(assets, tmp_path / "run", teacher=bare))
    assert not (tmp_path / "run").exists()  # refused before anything was trained or written


def test_recipe_with_a_lora_student_saves_adapters_and_a_merged_student(assets, tmp_path, monkeypatch):
    from transformers import AutoModelForMaskedLM

    monkeypatch.syspath_prepend(str(ROOT / "recipes"))
    import distilbert

    out = tmp_path / "lora"
    final = distilbert.main(recipe_flags(assets, out, "--use_peft", "true", "--lora_r", "4", "--max_steps", "2"))
    assert (final / "adapter" / "adapter_model.safetensors").exists()
    merged = AutoModelForMaskedLM.from_pretrained(final)
    assert merged.config.num_hidden_layers == 2 and "lora" not in " ".join(merged.state_dict())
