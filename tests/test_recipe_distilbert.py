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


def run_recipe(assets, out, *extra):
    cmd = [sys.executable, str(ROOT / "recipes" / "distilbert.py"), "--config",
           str(ROOT / "recipes" / "configs" / "distilbert.yaml"),
           "--teacher", str(assets / "teacher"), "--train_files", str(assets / "corpus.txt"),
           "--student_layers", "0,3", "--output_dir", str(out), "--block_size", "32",
           "--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "2", "--max_steps", "4",
           "--save_steps", "2", "--eval_steps", "2", "--logging_steps", "1", "--eval_size", "16",
           "--use_cpu", "true", "--dataloader_num_workers", "0", "--disable_tqdm", "true", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def test_recipe_end_to_end_and_resume(assets, tmp_path):
    out = tmp_path / "run"
    run_recipe(assets, out)
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
