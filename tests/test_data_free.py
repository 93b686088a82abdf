"""Data-free distillation: synthesised transfer sets (stored, reloadable, resumable), a classifier student that
learns the teacher's distribution from them alone, prompt-only rows for sequence-level KD, and the BBC recipe."""

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import BertForSequenceClassification, DataCollatorWithPadding, LlamaConfig, LlamaForCausalLM

from hf_distill import data_free
from hf_distill.lm import CompletionCollator
from hf_distill.lm.trainer import CausalLMDistillationTrainer
from hf_distill.tasks.classification_recipe import train_model
from hf_distill.teachers import cache_teacher_logits
from lm_tiny import tiny_chat_tokenizer
from test_on_policy import on_policy_divergence, tiny_llama
from test_on_policy import make_args as lm_args
from test_on_policy import word_tokenizer as lm_word_tokenizer
from test_text_classification import assets  # noqa: F401 - the tiny encoder and topic CSVs (a fixture)
from test_text_classification import word_tokenizer
from test_trainer import NO_DROPOUT, make_args
from tiny import tiny_bert_config

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["write a short news article", "write a short story"]


def generator_for(tokenizer, seed=0):
    """A tiny Llama over ``tokenizer``'s vocabulary (a wide init: varied, peaked next-token choices)."""
    torch.manual_seed(seed)
    pad = tokenizer.pad_token_id
    return LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                        max_position_embeddings=128, pad_token_id=pad, eos_token_id=None,
                                        bos_token_id=None, initializer_range=0.3))


@pytest.fixture(scope="module")
def chat():
    tokenizer = tiny_chat_tokenizer()
    return generator_for(tokenizer), tokenizer


# ---------------------------------------------------------------------------------------------- synthesis
def test_texts_are_stored_reloaded_and_reused(chat, tmp_path):
    model, tokenizer = chat
    ds = data_free.synthesize_texts(model, tokenizer, PROMPTS, 5, folder=tmp_path, max_new_tokens=6, batch_size=2,
                                    seed=3)
    assert ds.column_names == ["prompt", "text", "seed"] and len(ds) == 5
    assert ds["prompt"] == [PROMPTS[i % 2] for i in range(5)] and ds["seed"] == [3, 3, 4, 4, 5]
    assert all(t for t in ds["text"]) and len(set(ds["text"])) > 1
    assert data_free.load_synthetic(tmp_path)[:] == ds[:]
    assert json.loads((tmp_path / "settings.json").read_text())["num_texts"] == 5

    class NoGeneration(torch.nn.Module):
        training = False

        def generate(self, **_):
            raise AssertionError("a finished set must be reused, not synthesised again")
    again = data_free.synthesize_texts(NoGeneration(), tokenizer, PROMPTS, 5, folder=tmp_path, max_new_tokens=6,
                                       batch_size=2, seed=3)
    assert again[:] == ds[:]
    with pytest.raises(ValueError, match=r"other settings \(max_new_tokens\).*delete that folder"):
        data_free.synthesize_texts(model, tokenizer, PROMPTS, 5, folder=tmp_path, max_new_tokens=7, batch_size=2,
                                   seed=3)


def test_an_interrupted_synthesis_resumes_after_its_last_complete_batch(chat, tmp_path):
    model, tokenizer = chat
    full = data_free.synthesize_texts(model, tokenizer, PROMPTS, 6, folder=tmp_path / "a", max_new_tokens=6,
                                      batch_size=2, seed=0)
    # Interrupt: one complete batch, then half a row of the next (a write cut short), no dataset yet.
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "dataset")
    lines = (tmp_path / "b" / "partial.jsonl").read_text().splitlines()
    (tmp_path / "b" / "partial.jsonl").write_text("\n".join(lines[:3]) + "\n" + lines[3][:10])
    calls = []
    original = model.generate

    def counting(**kw):
        calls.append(kw["input_ids"].shape[0])
        return original(**kw)
    model.generate = counting
    try:
        resumed = data_free.synthesize_texts(model, tokenizer, PROMPTS, 6, folder=tmp_path / "b", max_new_tokens=6,
                                             batch_size=2, seed=0)
    finally:
        del model.generate
    assert calls == [2, 2]  # batch 0 kept; batch 1 (cut short) and batch 2 sampled again
    assert resumed[:] == full[:]  # each batch's seed is its own: the same texts as the uninterrupted run


def test_bad_inputs_get_clear_errors(chat, tmp_path):
    model, tokenizer = chat
    with pytest.raises(ValueError, match="no prompts given"):
        data_free.synthesize_texts(model, tokenizer, [], 2, folder=tmp_path)
    with pytest.raises(ValueError, match="non-empty strings"):
        data_free.synthesize_texts(model, tokenizer, ["  "], 2, folder=tmp_path)
    with pytest.raises(ValueError, match="num_texts must be >= 1"):
        data_free.synthesize_texts(model, tokenizer, PROMPTS, 0, folder=tmp_path)
    with pytest.raises(ValueError, match="chat=True needs a tokenizer with a chat template"):
        data_free.synthesize_texts(model, tiny_chat_tokenizer(chat_template=None), PROMPTS, 2, folder=tmp_path / "c")
    with pytest.raises(ValueError, match="shorter than min_chars=10000"):
        data_free.synthesize_texts(model, tokenizer, PROMPTS, 2, folder=tmp_path / "d", max_new_tokens=2,
                                   min_chars=10000)
    with pytest.raises(FileNotFoundError, match="run synthesize_texts first"):
        data_free.load_synthetic(tmp_path / "nothing")
    with pytest.raises(ValueError, match="encodes to no tokens"):
        data_free.prompt_rows([""], lm_word_tokenizer(), chat=False)


# ---------------------------------------------------------------------------------------------- classifiers
def mean_kl(teacher, student, dataset, collator) -> float:
    batch = {k: v for k, v in collator([{k: r[k] for k in ("input_ids", "attention_mask")} for r in dataset]).items()}
    with torch.no_grad():
        t = F.log_softmax(teacher(**batch).logits, -1)
        s = F.log_softmax(student.eval()(**batch).logits, -1)
    return float(F.kl_div(s, t, log_target=True, reduction="batchmean"))


def test_student_learns_the_teachers_distribution_from_synthetic_texts_only(assets, tmp_path):  # noqa: F811
    tokenizer = word_tokenizer()
    generator = generator_for(tokenizer, seed=1)
    teacher = BertForSequenceClassification.from_pretrained(assets / "classifier").eval()
    torch.manual_seed(5)
    student = BertForSequenceClassification(tiny_bert_config(len(tokenizer), layers=1, hidden=32, num_labels=3,
                                                             initializer_range=0.1, **NO_DROPOUT))
    collator = DataCollatorWithPadding(tokenizer)

    def rows(folder, n, seed):
        texts = data_free.synthesize_texts(generator, tokenizer, PROMPTS, n, folder=tmp_path / folder,
                                           max_new_tokens=10, batch_size=16, seed=seed, chat=False)
        return texts.map(lambda b: tokenizer(b["text"], truncation=True, max_length=24), batched=True,
                         remove_columns=texts.column_names)
    train = cache_teacher_logits(teacher, rows("train", 64, 0), collator, batch_size=32)
    held_out = rows("held_out", 32, 100)
    import csv
    with open(assets / "test.csv") as f:
        real = [tokenizer(r["text"], truncation=True, max_length=24) for r in csv.DictReader(f)]
    before = mean_kl(teacher, student, held_out, collator), mean_kl(teacher, student, real, collator)
    args = make_args(tmp_path, distillation='[{"loss": "kl", "weight": 1.0, "temperature": 1.0}]', task_weight=0.0,
                     max_steps=40, learning_rate=3e-3)
    trainer = train_model(student, args, train, collator, tokenizer)
    assert trainer.train_dataset is train and "labels" not in train.column_names  # the synthetic rows, no labels
    after = mean_kl(teacher, student, held_out, collator), mean_kl(teacher, student, real, collator)
    assert after[0] < 0.5 * before[0], (before, after)  # held-out synthetic texts
    assert after[1] < before[1], (before, after)  # the real test texts, never seen


# ---------------------------------------------------------------------------------------------- causal LMs
def test_prompt_rows_let_seq_kd_train_on_the_teachers_generations(tmp_path):
    tokenizer = lm_word_tokenizer()
    rows = data_free.prompt_rows(["the", "a small"], tokenizer, chat=False, repeats=8)
    assert len(rows) == 16 and rows[1]["input_ids"] == tokenizer("a small", add_special_tokens=False)["input_ids"]
    assert all(set(r["labels"]) == {-100} and r["prompt_length"] == len(r["input_ids"]) for r in rows)
    batch = CompletionCollator(tokenizer)(list(rows)[:2])
    assert batch["prompt_input_ids"].shape[0] == 2
    chat_rows = data_free.prompt_rows(["hello"], tiny_chat_tokenizer())
    assert chat_rows[0]["prompt_length"] > 1  # the chat template around the prompt

    teacher, student = tiny_llama(len(tokenizer), 2, seed=1, init=0.05), tiny_llama(len(tokenizer), 1, seed=2)
    prompts = (batch["prompt_input_ids"].repeat(8, 1), batch["prompt_attention_mask"].repeat(8, 1))
    before = on_policy_divergence(student, teacher, prompts)
    trainer = CausalLMDistillationTrainer(
        model=student, teacher=teacher, train_dataset=rows, data_collator=CompletionCollator(tokenizer),
        processing_class=tokenizer, args=lm_args(tmp_path, lmbda=0.0, seq_kd=True, per_device_train_batch_size=8,
                                                 max_steps=30, learning_rate=1e-2, logging_steps=10,
                                                 generation_temperature=1.0, remove_unused_columns=False))
    trainer.train()
    assert trainer.state.log_history[0]["seq_kd_fraction"] == 1.0
    assert trainer.state.log_history[0]["generated_tokens"] > 0
    after = on_policy_divergence(student, teacher, prompts)
    assert after < 0.7 * before, (before, after)


# ---------------------------------------------------------------------------------------------- the recipe
def _recipe():
    sys.path.insert(0, str(ROOT / "recipes"))  # the recipe imports its sibling efficient_student
    spec = importlib.util.spec_from_file_location("data_free_bbc_recipe", ROOT / "recipes" / "data_free_bbc.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def test_recipe_trains_the_data_free_student_on_synthetic_rows_only(assets, tmp_path, monkeypatch):  # noqa: F811
    recipe = _recipe()
    tokenizer = word_tokenizer()
    generator_for(tokenizer).save_pretrained(tmp_path / "generator")
    tokenizer.save_pretrained(tmp_path / "generator")
    seen = {}
    original = recipe.train_model

    def recording(student, args, train_dataset, *a, **kw):
        seen[Path(args.output_dir).parent.name] = train_dataset
        return original(student, args, train_dataset, *a, **kw)
    monkeypatch.setattr(recipe, "train_model", recording)
    out = tmp_path / "run"
    flags = ["--teacher", str(assets / "classifier"), "--student_init", str(assets / "encoder"),
             "--student_layers", "0,3", "--train_file", str(assets / "train.csv"), "--test_file",
             str(assets / "test.csv"), "--label_column", "topic", "--output_dir", str(out), "--max_length", "24",
             "--generator", str(tmp_path / "generator"), "--chat", "false", "--synthetic_texts", "24",
             "--max_new_tokens", "8", "--generation_batch_size", "8", "--min_chars", "1",
             "--distillation", '[{"loss": "kl", "weight": 1.0, "temperature": 2.0}]', "--num_train_epochs", "2",
             "--learning_rate", "1e-3", "--per_device_train_batch_size", "8", "--logging_steps", "2",
             "--save_strategy", "no", "--report_to", "none", "--seed", "0", "--disable_tqdm", "true",
             "--eval_batch_size", "16", "--latency_batch_size", "8", "--latency_warmup", "1",
             "--latency_repeats", "1", "--bootstrap_resamples", "100"]
    results = recipe.main(flags)
    assert [r["name"] for r in results["models"]] == ["teacher", recipe.FLOOR, *recipe.ARMS]
    stored = recipe.data_free.load_synthetic(out / "synthetic")
    assert len(stored) == 24 and results["data"]["n_synthetic"] == 24 and results["data"]["n_real"] == 24
    # The data-free arm's training loop got the synthesised texts (teacher logits, no labels) and nothing else.
    data_free_rows = seen["data_free_kd"]
    assert sorted(data_free_rows.column_names) == ["attention_mask", "input_ids", "teacher_logits"]
    assert data_free_rows["input_ids"] == [tokenizer(t, truncation=True, max_length=24)["input_ids"]
                                           for t in stored["text"]]
    import csv
    with open(assets / "train.csv") as f:
        train_ids = {tuple(tokenizer(r["text"], truncation=True, max_length=24)["input_ids"]) for r in csv.DictReader(f)}
    assert not train_ids & {tuple(r) for r in data_free_rows["input_ids"]}
    assert {tuple(r) for r in seen["real_data_kd"]["input_ids"]} <= train_ids
    steps = results["training"]["steps"]
    assert steps == 2 * 3 and all(h[-1]["step"] == steps for h in results["log_history"].values())
    assert sum(results["synthesis"]["teacher_labels"].values()) == 24
    assert set(results["comparisons"]) == {"data-free KD minus real-data KD", "data-free KD minus initial student",
                                           "data-free KD minus teacher"}
    assert (out / "results.md").is_file()
    with pytest.raises(ValueError, match=r"drop \{loss: task\}"):
        recipe.main(flags + ["--distillation", '[{"loss": "task"}]'])
