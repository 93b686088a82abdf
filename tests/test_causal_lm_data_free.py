"""Data-free distillation of a causal LM (recipes/causal_lm.py --data_free true) on a tiny Llama teacher: the
third student trains on the teacher's own texts only (stored, reused by a rerun), with the real-data student's
loss, steps and tokens; wrong settings are refused before training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from lm_tiny import tiny_chat_tokenizer, tiny_llama
from test_recipe_causal_lm import assets, flags, recipe  # noqa: F401 - the tiny teacher and corpus (a fixture)
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from hf_distill import data_free
from hf_distill.lm.data import pack_text_blocks

# 16 steps x batch 4 read 64 of the 646 real blocks of 32 tokens: 112 texts of <= 24 tokens fill 64 blocks
DATA_FREE = ("--data_free", "true", "--data_free_texts", "112", "--data_free_max_new_tokens", "24",
             "--data_free_batch_size", "16", "--data_free_min_chars", "1")


def data_free_flags(assets, out, *extra):  # noqa: F811 - the fixture's value
    return flags(assets, out, *DATA_FREE, "--bootstrap_resamples", "100", *extra)


@pytest.fixture
def spy(monkeypatch):
    """What each student's training loop was given: output folder name -> its training rows."""
    seen = {}
    original = recipe.train_lm_student

    def recording(model, args, train_dataset, tokenizer, **kw):
        seen[Path(args.output_dir).name] = train_dataset
        return original(model, args, train_dataset, tokenizer, **kw)
    monkeypatch.setattr(recipe, "train_lm_student", recording)
    return seen


# ------------------------------------------------------------------------------------------- building blocks
def test_prompt_sets_and_empty_prompts(tmp_path):
    assert data_free.prompt_set("generic") == list(data_free.GENERIC_PROMPTS)
    assert data_free.prompt_set("empty") == [""]
    (tmp_path / "p.txt").write_text("write a letter\n\n  write a poem  \n")
    assert data_free.prompt_set(str(tmp_path / "p.txt")) == ["write a letter", "write a poem"]
    with pytest.raises(ValueError, match="generic, empty or a text file"):
        data_free.prompt_set(str(tmp_path / "missing.txt"))
    # An empty prompt samples after the start token alone; a blank one is a mistake and is refused.
    tok = tiny_chat_tokenizer()
    model = tiny_llama(len(tok), layers=1)
    texts = data_free.synthesize_texts(model, tok, [""], 4, folder=tmp_path / "s", max_new_tokens=5, batch_size=2,
                                       chat=False)
    assert texts["prompt"] == [""] * 4 and len(set(texts["text"])) > 1
    with pytest.raises(ValueError, match="non-empty strings"):
        data_free.synthesize_texts(model, tok, ["  "], 2, folder=tmp_path / "t", chat=False)
    tok.bos_token = None
    with pytest.raises(ValueError, match="encodes to no tokens"):
        data_free.synthesize_texts(model, tok, [""], 2, folder=tmp_path / "u", chat=False)


def test_more_texts_extend_the_stored_set_as_a_fresh_synthesis_would(tmp_path):
    tok = tiny_chat_tokenizer()
    model = tiny_llama(len(tok), layers=1)

    def synth(n, folder):
        return data_free.synthesize_texts(model, tok, ["a", "b"], n, folder=tmp_path / folder, max_new_tokens=5,
                                          batch_size=2, seed=1)
    synth(5, "grown")  # batches of 2, 2 and 1
    first = (tmp_path / "grown" / "partial.jsonl").read_text().splitlines()
    fresh, grown = synth(8, "fresh"), synth(8, "grown")  # the short third batch is sampled again at full size
    lines = (tmp_path / "grown" / "partial.jsonl").read_text().splitlines()
    assert grown[:] == fresh[:] and lines == (tmp_path / "fresh" / "partial.jsonl").read_text().splitlines()
    assert len(lines) == 8 and lines[:4] == first[:4]
    assert [json.loads(x)["seed"] for x in lines] == [1, 1, 2, 2, 3, 3, 4, 4]
    assert data_free.load_synthetic(tmp_path / "grown")[:] == fresh[:]
    with pytest.raises(ValueError, match=r"other settings \(num_texts: fewer asked\)"):
        synth(6, "grown")


def test_synthetic_blocks_pack_like_documents_and_say_when_too_few():
    tok = tiny_chat_tokenizer()
    from datasets import Dataset

    texts = Dataset.from_dict({"prompt": ["p"] * 6, "text": ["hello world, hello tiny llama"] * 3
                               + ["the quick brown fox jumps over the lazy dog"] * 3, "seed": list(range(6))})
    packed = pack_text_blocks(texts["text"], tok, 8)  # documents with EOS after each, one stream cut into blocks
    blocks = data_free.synthetic_blocks(texts, tok, 8, 3)
    assert list(blocks["input_ids"]) == list(packed["input_ids"])[:3] == list(blocks["labels"])
    stream = [i for t in texts["text"] for i in tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
    assert [i for row in blocks["input_ids"] for i in row] == stream[:24]
    assert len(stream) // 8 == len(packed)
    with pytest.raises(ValueError, match=rf"fill {len(packed)} blocks of 8 tokens, fewer than the 99 .*about "
                                         rf"{-(-99 * 8 * 6 // len(stream))}\)"):
        data_free.synthetic_blocks(texts, tok, 8, 99)


# ---------------------------------------------------------------------------------------------- the recipe
def test_data_free_student_trains_on_the_teachers_texts_only(assets, tmp_path, spy):  # noqa: F811
    out = tmp_path / "run"
    results = recipe.main(data_free_flags(assets, out))
    rows = {r["name"]: r for r in results["models"]}
    assert list(rows) == ["teacher", "distilled student", "data-free student", "baseline student"]

    # The synthesised texts are stored (prompts, texts, seeds) and summarised in the results.
    stored = data_free.load_synthetic(out / "synthetic")
    assert len(stored) == results["synthesis"]["n_kept"] and set(stored["prompt"]) <= set(data_free.GENERIC_PROMPTS)
    assert results["synthesis"]["examples"][0] == {"prompt": stored["prompt"][0], "text": stored["text"][0][:300]}

    # The data-free loop got the blocks those texts pack into, as many as the real-data loop, none of them real.
    tok = AutoTokenizer.from_pretrained(assets / "teacher")
    real, free = spy["student_distilled"], spy["student_data_free"]
    assert len(real) == len(spy["student_baseline"]) == results["data"]["n_train_rows"] == 646
    assert len(free) == 16 * 4 == results["synthesis"]["n_blocks"]  # the rows 16 steps of 4 read, as the real loop
    assert list(free["input_ids"]) == list(pack_text_blocks(list(stored["text"]), tok, 32)["input_ids"])[:64]
    assert not {tuple(r) for r in free["input_ids"]} & {tuple(r) for r in real["input_ids"]}
    assert (out / "teacher_store_data_free" / "summary.json").is_file()  # its own stored teacher outputs
    steps = [h[-1]["step"] for h in results["log_history"].values()]
    assert steps == [16, 16, 16] and any("loss_kd" in h for h in results["log_history"]["data-free"])

    # Paired differences on the same held-out units, and the teacher gap the data-free student closes.
    comp = results["comparisons"]
    d = comp["data_free_minus_distilled"]
    assert d["diff"] == pytest.approx(rows["data-free student"]["perplexity"] - rows["distilled student"]["perplexity"])
    assert d["low"] <= d["diff"] <= d["high"] and d["n_units"] == rows["teacher"]["n_units"]
    assert comp["data_free_minus_baseline"]["diff"] == pytest.approx(
        rows["data-free student"]["perplexity"] - rows["baseline student"]["perplexity"])
    assert "log_space" in comp["gap_closed_data_free"]
    text = (out / "results.md").read_text()
    assert "| data-free student |" in text and "Data-free minus distilled (real data) perplexity" in text
    assert any(g["goal"].startswith("data-free student has a lower") for g in results["goals"])
    card = (out / "student_data_free" / "README.md").read_text()
    assert "held-out perplexity" in card and "own generations" in card

    # The saved data-free student gives the reported perplexity and learnt from the teacher's texts alone.
    from hf_distill.lm.evaluation import score_units
    from hf_distill.students import build_student

    windows = _eval_windows(assets, out)
    saved = AutoModelForCausalLM.from_pretrained(out / "student_data_free").eval()
    ppl = score_units(saved, windows, pad_token_id=tok.pad_token_id).perplexity
    assert ppl == pytest.approx(rows["data-free student"]["perplexity"], rel=1e-5)
    initial = build_student(AutoModelForCausalLM.from_pretrained(assets / "teacher"), num_layers=2)
    assert ppl < 0.8 * score_units(initial, windows, pad_token_id=tok.pad_token_id).perplexity


def _eval_windows(assets, out):  # noqa: F811
    from hf_distill.config import parse_config_and_args
    from hf_distill.lm.arguments import CausalLMDistillationArguments
    from hf_distill.lm.recipe_steps import load_lm_documents, tokenize_lm_data

    settings, _ = parse_config_and_args((recipe.CausalLMRecipeArguments, CausalLMDistillationArguments),
                                        data_free_flags(assets, out))
    tok = AutoTokenizer.from_pretrained(assets / "teacher")
    return tokenize_lm_data(load_lm_documents(settings), tok, settings)[1]


def test_a_rerun_reuses_the_stored_texts_and_other_settings_are_refused(assets, tmp_path, monkeypatch,  # noqa: F811
                                                                        spy):
    out = tmp_path / "rerun"
    quick = ("--baseline", "false", "--plot", "false", "--max_steps", "4", "--data_free_prompts", "empty",
             "--data_free_chat", "false")
    first = recipe.main(data_free_flags(assets, out, *quick))
    partial = (out / "synthetic" / "partial.jsonl").read_text()
    assert [json.loads(line)["prompt"] for line in partial.splitlines()] == [""] * 112
    first_rows = list(spy["student_data_free"]["input_ids"])

    def no_sampling(self, *a, **kw):
        raise AssertionError("a rerun must reuse the stored texts, not sample again")
    monkeypatch.setattr(LlamaForCausalLM, "generate", no_sampling)
    again = recipe.main(data_free_flags(assets, out, *quick))
    assert list(spy["student_data_free"]["input_ids"]) == first_rows
    assert (out / "synthetic" / "partial.jsonl").read_text() == partial
    assert again["synthesis"] == first["synthesis"]
    with pytest.raises(ValueError, match=r"other settings \(max_new_tokens\).*delete that folder"):
        recipe.main(data_free_flags(assets, out, *quick, "--data_free_max_new_tokens", "12"))


@pytest.mark.parametrize("extra, message", [
    (("--data_free_texts", "8", "--data_free_chat", "false"),
     r"--data_free_chat, --data_free_texts set without --data_free true"),
    (DATA_FREE + ("--data_free_temperature", "0"), r"--data_free_temperature must be > 0"),
    (DATA_FREE + ("--data_free_prompts", "no_such_prompts.txt"), r"generic, empty or a text file"),
    (DATA_FREE + ("--data_free_batch_size", "0"), r"must be >= 1"),
    # 16 texts of <= 8 tokens cannot fill the 64 blocks the real-data student reads: found after sampling them
    (DATA_FREE + ("--data_free_texts", "16", "--data_free_max_new_tokens", "8"),
     r"the 16 synthesised texts fill [0-4] blocks of 32 tokens, fewer than the 64 the comparison needs"),
])
def test_wrong_data_free_settings_are_refused_before_training(assets, tmp_path, extra, message):  # noqa: F811
    with pytest.raises(Exception, match=message):
        recipe.main(flags(assets, tmp_path / "bad", *extra))
    assert not list((tmp_path / "bad").glob("student_*"))


def test_data_free_needs_plain_text_and_config_keys_are_checked(assets, tmp_path):  # noqa: F811
    rows = [{"prompt": "a b", "completion": " c d"}] * 50
    (tmp_path / "pc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = data_free_flags(assets, tmp_path / "pc", "--train_file", str(tmp_path / "pc.jsonl"), "--eval_size", "5")
    with pytest.raises(Exception, match="packs the teacher's generations into blocks like plain documents.*"
                                        "prompt_completion rows"):
        recipe.main(args)
    config = tmp_path / "c.yaml"
    config.write_text(Path(recipe.__file__).with_name("configs").joinpath("causal_lm_smollm2_data_free.yaml")
                      .read_text() + "data_free_prompt: empty\n")
    with pytest.raises(ValueError, match="data_free_prompt.*did you mean data_free_prompts"):
        recipe.main(["--config", str(config)])


@pytest.mark.slow
def test_smollm2_data_free_student_on_bbc_news(tmp_path):
    """The README's data-free result (~33 minutes): SmolLM2-135M-Instruct's own texts from the generic prompts
    train a 6-layer student that is worse on held-out BBC News than the real-data students."""
    config = Path(recipe.__file__).with_name("configs") / "causal_lm_smollm2_data_free.yaml"
    results = recipe.main(["--config", str(config), "--output_dir", str(tmp_path / "run")])
    rows = {r["name"]: r for r in results["models"]}
    assert results["synthesis"]["n_blocks"] == results["data"]["n_train_rows"] == 240
    assert all(h[-1]["step"] == 120 for h in results["log_history"].values())
    assert rows["teacher"]["perplexity"] < rows["data-free student"]["perplexity"]
    comp = results["comparisons"]
    assert comp["distilled_minus_baseline"]["high"] < 0  # real-data KD beats cross-entropy
    assert comp["data_free_minus_distilled"]["low"] > 0 and comp["data_free_minus_baseline"]["low"] > 0
