"""Held-out evaluation of causal LMs (hf_distill.lm.evaluation): windows, scores, intervals, gap, tokens/s."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from lm_tiny import tiny_chat_tokenizer, tiny_llama

from hf_distill.lm.evaluation import (
    UnitScores,
    bits_per_byte,
    completion_units,
    gap_closed,
    measure_tokens_per_second,
    paired_difference,
    perplexity_interval,
    score_units,
    text_windows,
)

DOCS = ["the cat sat on the mat and the dog ran fast to the red house .",
        "minister wins vote — prices rise in the city market, café shares fall .",
        "film star plays music"]


@pytest.fixture(scope="module")
def tok():
    return tiny_chat_tokenizer()


# ------------------------------------------------------------------------------------------ windows
def test_text_windows_predict_every_token_once_and_cover_every_byte(tok):
    rows = text_windows(DOCS, tok, window=6)
    for unit, doc in enumerate(DOCS):
        ids = tok(doc, add_special_tokens=False)["input_ids"]
        mine = [r for r in rows if r["unit"] == unit]
        assert all(r["input_ids"][0] == tok.bos_token_id and len(r["input_ids"]) <= 6 for r in mine)
        assert [t for r in mine for t in r["input_ids"][1:]] == ids  # every token predicted once, in order
        assert sum(r["n_bytes"] for r in mine) == len(doc.encode("utf-8"))  # multi-byte characters included


def test_text_windows_truncate_each_document(tok):
    rows = text_windows(DOCS, tok, window=4, max_tokens_per_document=5)
    for unit, doc in enumerate(DOCS):
        ids = tok(doc, add_special_tokens=False, return_offsets_mapping=True)
        mine = [r for r in rows if r["unit"] == unit]
        assert [t for r in mine for t in r["input_ids"][1:]] == ids["input_ids"][:5]
        assert sum(r["n_bytes"] for r in mine) == len(doc[:ids["offset_mapping"][5][0]].encode("utf-8"))


def test_text_windows_refuse_bad_settings(tok):
    with pytest.raises(ValueError, match="window must be at least 2"):
        text_windows(DOCS, tok, window=1)
    with pytest.raises(ValueError, match="max_tokens_per_document must be >= 1"):
        text_windows(DOCS, tok, window=8, max_tokens_per_document=0)
    with pytest.raises(ValueError, match="no evaluation text"):
        text_windows(["", ""], tok, window=8)


def test_completion_units_count_only_completion_bytes(tok):
    prompt, completion = tok("film star", add_special_tokens=False)["input_ids"], tok(
        " plays music", add_special_tokens=False)["input_ids"]
    completion = completion + [tok.eos_token_id]  # predicted, but no text
    row = {"input_ids": prompt + completion, "labels": [-100] * len(prompt) + completion}
    (unit,) = completion_units([row, {"input_ids": prompt, "labels": [-100] * len(prompt)}], tok)
    assert unit["n_bytes"] == len(b" plays music") and unit["unit"] == 0


# ------------------------------------------------------------------------------------------ scoring
def test_score_units_match_a_hand_computed_nll_and_ignore_padding(tok):
    model = tiny_llama(len(tok))
    rows = text_windows(DOCS, tok, window=7)
    scores = score_units(model, rows, batch_size=4, pad_token_id=tok.pad_token_id)
    one_by_one = score_units(model, rows, batch_size=1, pad_token_id=tok.pad_token_id)
    expected_nll, expected_tokens = np.zeros(len(DOCS)), np.zeros(len(DOCS))
    with torch.no_grad():
        for r in rows:
            ids = torch.tensor([r["input_ids"]])
            logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
            expected_nll[r["unit"]] -= logp[torch.arange(ids.shape[1] - 1), ids[0, 1:]].sum().item()
            expected_tokens[r["unit"]] += ids.shape[1] - 1
    np.testing.assert_allclose(scores.nll, expected_nll, rtol=1e-5)
    np.testing.assert_allclose(one_by_one.nll, expected_nll, rtol=1e-5)
    np.testing.assert_array_equal(scores.tokens, expected_tokens)
    assert scores.bytes.sum() == sum(len(d.encode()) for d in DOCS)
    assert scores.perplexity == pytest.approx(math.exp(expected_nll.sum() / expected_tokens.sum()), rel=1e-6)


# ------------------------------------------------------------------------------------------ intervals
def test_perplexity_interval_and_bits_per_byte_by_hand():
    scores = UnitScores(nll=np.array([2.0, 4.0, 3.0]), tokens=np.array([1.0, 1.0, 2.0]),
                        bytes=np.array([4.0, 4.0, 8.0]))
    out = perplexity_interval(scores, n_resamples=4000, seed=1)
    assert out["perplexity"] == pytest.approx(math.exp(9 / 4))
    assert out["bits_per_byte"] == pytest.approx(9 / (math.log(2) * 16))
    assert bits_per_byte(9, 16) == pytest.approx(out["bits_per_byte"])
    lo, hi = out["perplexity_ci"]
    assert math.exp(1.5) - 1e-9 <= lo < out["perplexity"] < hi <= math.exp(4.0) + 1e-9  # extreme per-token means
    assert out["n_units"] == 3 and out["n_tokens"] == 4 and out["n_bytes"] == 16
    with pytest.raises(ValueError, match="positive byte count"):
        bits_per_byte(1.0, 0)


def test_paired_difference_of_a_constant_per_token_shift_is_exact():
    rng = np.random.default_rng(0)
    tokens = rng.integers(5, 50, size=40).astype(float)
    b = UnitScores(nll=tokens * rng.uniform(2, 4, size=40), tokens=tokens, bytes=tokens * 4)
    a = UnitScores(nll=b.nll - 0.25 * tokens, tokens=tokens, bytes=b.bytes)  # A: 0.25 nats better per token
    out = paired_difference(a, b, n_resamples=1000)
    assert out["nll_diff"] == pytest.approx(-0.25)
    assert out["nll_diff_ci"] == pytest.approx([-0.25, -0.25])  # the same shift in every resample
    assert out["diff"] == pytest.approx(a.perplexity - b.perplexity)
    assert out["high"] < 0 and out["p_a_not_better"] == 0.0
    with pytest.raises(ValueError, match="same units"):
        paired_difference(a, UnitScores(nll=b.nll[:5], tokens=tokens[:5], bytes=b.bytes[:5]))


def test_gap_closed_by_hand():
    assert gap_closed(10.0, 20.0, 40.0) == pytest.approx(0.5)  # log 40 - log 20 = half of log 40 - log 10
    assert gap_closed(10.0, 20.0, 40.0, space="ppl") == pytest.approx(2 / 3)
    assert gap_closed(10.0, 40.0, 40.0) == 0.0 and gap_closed(10.0, 10.0, 40.0) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="no gap"):
        gap_closed(10.0, 5.0, 10.0)
    with pytest.raises(ValueError, match="space must be"):
        gap_closed(10.0, 5.0, 20.0, space="linear")


# ------------------------------------------------------------------------------------------ speed
def test_tokens_per_second_counts_real_tokens():
    small, big = tiny_llama(64, layers=1), tiny_llama(64, layers=2)
    batch = {"input_ids": torch.randint(0, 64, (2, 16)), "attention_mask": torch.ones(2, 16, dtype=torch.long)}
    batch["attention_mask"][1, 10:] = 0
    out = measure_tokens_per_second({"small": small, "big": big}, batch, warmup=1, repeats=3)
    for row in out.values():
        assert row["tokens_per_second"] * row["median_ms"] / 1000 == pytest.approx(26)  # 16 + 10 real tokens
        lo, hi = row["tokens_per_second_iqr"]
        assert 0 < lo <= row["tokens_per_second"] <= hi
        assert row["threads"] == 1 and row["repeats"] == 3
