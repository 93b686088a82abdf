"""recipes/quantized_student.py on tiny local data: fp32 student, PTQ int8 and QAT int8 students, the report."""

import csv
import importlib.util
import json
import random
import sys
from pathlib import Path

import pytest
import torch
from tiny import tiny_bert_config
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import BertModel, PreTrainedTokenizerFast

from hf_distill.cli import run_with_one_line_errors
from hf_distill.quantization import fake_quant_modules, load_int8, quantized_modules

ROOT = Path(__file__).resolve().parents[1]
TOPICS = {"sport": "team wins loses game player match goal score coach league".split(),
          "money": "bank share profit price market loss rises falls trade economy".split(),
          "tech": "phone computer software chip network data code internet device screen".split()}
FILLER = "the a on of in and to it was is".split()


def _recipe():
    spec = importlib.util.spec_from_file_location("quantized_student_recipe", ROOT / "recipes" / "quantized_student.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


recipe = _recipe()


def write_rows(path: Path, n: int, seed: int) -> Path:
    rng = random.Random(seed)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["text", "topic"])
        writer.writeheader()
        for i in range(n):
            label = list(TOPICS)[i % len(TOPICS)]
            words = [rng.choice(TOPICS[label]) for _ in range(rng.randint(3, 6))]
            words += [rng.choice(FILLER) for _ in range(rng.randint(2, 5))]
            rng.shuffle(words)
            writer.writerow({"text": " ".join(words) + " .", "topic": label})
    return path


def word_tokenizer() -> PreTrainedTokenizerFast:
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words = sorted({w for ws in TOPICS.values() for w in ws} | set(FILLER) | {"."})
    vocab = {t: i for i, t in enumerate(specials + words)}
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", model_max_length=128)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("quantized_recipe")
    tokenizer = word_tokenizer()
    torch.manual_seed(0)
    easy = dict(initializer_range=0.1, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    BertModel(tiny_bert_config(len(tokenizer), layers=4, hidden=32, **easy)).save_pretrained(root / "encoder")
    tokenizer.save_pretrained(root / "encoder")
    write_rows(root / "train.csv", 120, seed=1)
    write_rows(root / "test.csv", 45, seed=2)
    return root


def flags(assets, out, *extra):
    return ["--teacher", str(assets / "encoder"), "--train_file", str(assets / "train.csv"),
            "--test_file", str(assets / "test.csv"), "--label_column", "topic", "--output_dir", str(out),
            "--max_length", "24", "--student_layers", "2", "--teacher_epochs", "6", "--teacher_learning_rate", "3e-3",
            "--teacher_batch_size", "8", "--num_train_epochs", "4", "--learning_rate", "1e-3",
            "--per_device_train_batch_size", "8", "--kd_weight", "0.5", "--task_weight", "0.5", "--cos_weight", "0",
            "--qat_epochs", "1", "--qat_learning_rate", "3e-4", "--logging_steps", "5", "--save_strategy", "no",
            "--report_to", "none", "--seed", "0", "--disable_tqdm", "true", "--eval_batch_size", "16",
            "--latency_batch_size", "8", "--latency_warmup", "1", "--latency_repeats", "3",
            "--bootstrap_resamples", "200", *extra]


def test_recipe_builds_fp32_ptq_and_qat_students_and_reports(assets, tmp_path):
    out = tmp_path / "run"
    results = recipe.main(flags(assets, out))
    names = [r["name"] for r in results["models"]]
    assert names == ["fp32 teacher", "fp32 distilled student", "PTQ int8 student", "QAT int8 student"]
    rows = {r["name"]: r for r in results["models"]}
    assert rows["fp32 teacher"]["accuracy"] >= 0.8  # the fine-tuned tiny teacher learnt the topics
    assert rows["fp32 distilled student"]["accuracy"] >= 0.6
    for name in ("PTQ int8 student", "QAT int8 student"):
        assert rows[name]["size_bytes"] < rows["fp32 distilled student"]["size_bytes"]
        assert rows[name]["params"] == rows["fp32 distilled student"]["params"]
    q = results["qat_export"]
    assert q["fake_quant_modules_in_training"] == 13 * 3 + 1 and q["fake_quant_modules_after_export"] == 0
    assert q["argmax_agreement"] >= 0.95 and q["max_abs_logit_diff"] <= 0.15 * q["logit_range"]
    assert [g["status"] for g in results["goals"]] and all(
        g["status"] in ("met", "missed", "not shown") for g in results["goals"])
    for folder in ("student_ptq_int8", "student_qat_int8"):
        model = load_int8(out / folder)
        assert quantized_modules(model) and not fake_quant_modules(model)
        assert (out / folder / "tokenizer.json").is_file()
    assert json.loads((out / "results.json").read_text())["models"][3]["name"] == "QAT int8 student"
    report = (out / "results.md").read_text()
    assert "| QAT int8 student |" in report and "QAT int8 latency <= 0.5x" in report


@pytest.mark.parametrize("extra, message", [
    (["--qat_freeze_fraction", "2"], r"--qat_freeze_fraction must be within \[0, 1\]"),
    (["--qat_epochs", "0"], r"--qat_epochs must be > 0"),
    (["--backend", "nope"], r"quantization backend 'nope' is not available"),
    (["--use_peft", "true", "--merge_adapters", "false"], r"PTQ and QAT quantize the merged student: --use_peft "
                                                          r"needs --merge_adapters true"),
])
def test_bad_input_is_a_one_line_error_before_any_model_loads(assets, tmp_path, capsys, extra, message):
    out = tmp_path / "bad"
    code = run_with_one_line_errors(lambda argv: recipe.main(argv) and 0, flags(assets, out, *extra),
                                    "quantized_student.py")
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("quantized_student.py: error: ")
    import re

    assert re.search(message, err)
    assert not out.exists()  # nothing trained, nothing written


def test_lora_fp32_student_is_merged_then_quantized(assets, tmp_path):
    """--use_peft: the fp32 stage trains LoRA adapters (+ the head) only; PTQ and QAT start from the merged student."""
    import re

    from transformers import AutoModelForSequenceClassification

    from hf_distill.students import build_student
    from hf_distill.students.peft_students import ADAPTER_DIR

    out = tmp_path / "lora"
    results = recipe.main(flags(assets, out, "--use_peft", "true", "--lora_r", "4", "--lora_dropout", "0",
                                "--num_train_epochs", "2", "--qat_epochs", "0.5"))
    assert [r["name"] for r in results["models"]][2:] == ["PTQ int8 student", "QAT int8 student"]
    assert (out / "student_fp32" / ADAPTER_DIR / "adapter_model.safetensors").is_file()
    merged = AutoModelForSequenceClassification.from_pretrained(out / "student_fp32").state_dict()
    initial = build_student(AutoModelForSequenceClassification.from_pretrained(out / "teacher"), num_layers=2).state_dict()
    changed = {k for k in initial if not torch.equal(initial[k], merged[k])}
    assert any(".query.weight" in k for k in changed)
    assert all(re.search(r"\.(query|key|value)\.weight$|^classifier\.", k) for k in changed), changed
    assert quantized_modules(load_int8(out / "student_qat_int8"))
