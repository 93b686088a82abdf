"""Held-out evaluation of causal language models: perplexity and bits per byte with bootstrap intervals,
paired differences between two models, the share of the teacher gap a student closes, and tokens/s.

Units. Every statistic is a ratio of sums over *units* (documents by default, or rows): a unit's summed
negative log-likelihood (nats), its number of predicted tokens and the UTF-8 bytes of their text. The
95% interval resamples units with replacement (percentile bootstrap) and recomputes the ratio, so long
documents weigh by their length, as in the point estimate, and the tokens of one document are never
treated as independent draws. Paired comparisons resample the same units for both models.

* ``perplexity = exp(sum nll / sum tokens)``;
* ``bits per byte = sum nll / (ln 2 * sum bytes)``: independent of the tokenizer when both models
  predict the same text (compare models with different tokenizers with it, not with perplexity);
* :func:`gap_closed`: ``(log ppl_base - log ppl_student) / (log ppl_base - log ppl_teacher)``, i.e. the
  share of the per-token cross-entropy gap closed (``space="log"``, the default), or the same ratio of
  the perplexities themselves (``space="ppl"``).

Held-out text is cut into windows with :func:`text_windows`: each document's tokens in pieces of at
most ``window - 1`` tokens, each behind a start token (BOS, else EOS), so that every token of the text is
predicted exactly once and the bytes of a document's windows add up to the document's bytes.

Public API::

    text_windows(texts, tokenizer, *, window, max_tokens_per_document=None, start_token_id=None) -> list[dict]
    completion_units(rows, tokenizer) -> list[dict]
    score_units(model, rows, *, batch_size=8, pad_token_id=0, desc=None) -> UnitScores
    perplexity_interval(scores, *, confidence=0.95, n_resamples=2000, seed=0) -> dict
    paired_difference(a, b, *, confidence=0.95, n_resamples=2000, seed=0) -> dict
    gap_closed(teacher_ppl, student_ppl, baseline_ppl, *, space="log") -> float
    bits_per_byte(nll_nats, n_bytes) -> float
    measure_tokens_per_second(models, batch, *, warmup=1, repeats=3, threads=1) -> dict
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = ["UnitScores", "bits_per_byte", "completion_units", "gap_closed", "measure_tokens_per_second",
           "paired_difference", "perplexity_interval", "score_units", "text_windows"]

LN2 = math.log(2.0)


@dataclass
class UnitScores:
    """Per-unit sums of one model on one evaluation set (aligned across models: same units, same order)."""

    nll: np.ndarray  # summed negative log-likelihood, nats
    tokens: np.ndarray  # predicted tokens
    bytes: np.ndarray  # UTF-8 bytes of the predicted tokens' text
    seconds: float = 0.0  # wall time of the scoring pass

    @property
    def perplexity(self) -> float:
        return float(math.exp(self.nll.sum() / self.tokens.sum()))

    @property
    def bits_per_byte(self) -> float:
        return bits_per_byte(float(self.nll.sum()), float(self.bytes.sum()))


def bits_per_byte(nll_nats: float, n_bytes: float) -> float:
    """Summed negative log-likelihood in nats -> bits per UTF-8 byte of the predicted text."""
    if n_bytes <= 0:
        raise ValueError(f"bits per byte needs a positive byte count, got {n_bytes}")
    return float(nll_nats) / (LN2 * float(n_bytes))


# --------------------------------------------------------------------------------------- evaluation rows
def _start_token(tokenizer, start_token_id: int | None) -> int:
    for candidate in (start_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    raise ValueError("the tokenizer has neither a BOS nor an EOS token to start each evaluation window with; "
                     "pass start_token_id")


def text_windows(texts: Iterable[str], tokenizer, *, window: int, max_tokens_per_document: int | None = None,
                 start_token_id: int | None = None) -> list[dict]:
    """Evaluation rows for plain documents: ``[start] + up to window - 1 tokens`` each, every token predicted once.

    Each row has ``input_ids``, ``labels`` (= ``input_ids``; the start token is never predicted), ``unit``
    (the document's index) and ``n_bytes``: the UTF-8 bytes of the text its tokens cover, split at token
    starts, so a document's rows add up to its bytes (to the truncation point with
    ``max_tokens_per_document``). Needs a fast tokenizer (character offsets).
    """
    if int(window) < 2:
        raise ValueError(f"window must be at least 2 (a start token and one predicted token), got {window}")
    if max_tokens_per_document is not None and int(max_tokens_per_document) < 1:
        raise ValueError(f"max_tokens_per_document must be >= 1 or None, got {max_tokens_per_document}")
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("text_windows needs a fast tokenizer (character offsets); load it with use_fast=True")
    start = _start_token(tokenizer, start_token_id)
    rows, step = [], int(window) - 1
    for unit, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"document {unit} is a {type(text).__name__}, not a string")
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        if not ids:
            continue
        keep = len(ids) if max_tokens_per_document is None else min(len(ids), int(max_tokens_per_document))
        for a in range(0, keep, step):
            b = min(a + step, keep)
            lo = 0 if a == 0 else offsets[a][0]
            hi = len(text) if b == len(ids) else offsets[b][0]
            piece = [start, *ids[a:b]]
            rows.append({"input_ids": piece, "labels": piece, "unit": unit,
                         "n_bytes": len(text[lo:hi].encode("utf-8"))})
    if not rows:
        raise ValueError("no evaluation text: every document is empty after tokenisation")
    return rows


def completion_units(rows: Iterable[Mapping[str, Any]], tokenizer) -> list[dict]:
    """Prompt-completion / chat rows (``input_ids``, ``labels`` with -100 on what does not count) as
    evaluation rows, one unit each; ``n_bytes`` are the UTF-8 bytes of the counted tokens' text (special tokens
    such as EOS count as predicted tokens, with no bytes)."""
    out = []
    for unit, row in enumerate(rows):
        ids, labels = list(row["input_ids"]), list(row["labels"])
        counted = [t for t, lab in zip(ids[1:], labels[1:]) if lab != -100]
        if not counted:
            continue
        # special tokens (an end-of-turn / EOS) are predicted and count as tokens, but are no text: 0 bytes
        text = tokenizer.decode(counted, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        out.append({"input_ids": ids, "labels": labels, "unit": unit, "n_bytes": len(text.encode("utf-8"))})
    if not out:
        raise ValueError("no evaluation row has a counted (completion) token")
    return out


# --------------------------------------------------------------------------------------------- scoring
@torch.inference_mode()
def score_units(model, rows: Sequence[Mapping[str, Any]], *, batch_size: int = 8, pad_token_id: int = 0,
                desc: str | None = None) -> UnitScores:
    """Summed NLL, predicted tokens and bytes per unit of ``model`` on ``rows`` (:func:`text_windows` /
    :func:`completion_units`); rows are right-padded per batch, padding never counts. Float32 log-softmax."""
    from tqdm.auto import tqdm

    if not rows:
        raise ValueError("score_units needs at least one row")
    units = sorted({int(r["unit"]) for r in rows})
    index = {u: i for i, u in enumerate(units)}
    nll, tokens, nbytes = np.zeros(len(units)), np.zeros(len(units)), np.zeros(len(units))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    start = time.perf_counter()
    try:
        for a in tqdm(range(0, len(rows), batch_size), desc=desc or "perplexity", unit="batch",
                      disable=desc is None):
            batch = rows[a:a + batch_size]
            width = max(len(r["input_ids"]) for r in batch)
            ids = torch.full((len(batch), width), int(pad_token_id), dtype=torch.long)
            labels = torch.full((len(batch), width), -100, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for i, r in enumerate(batch):
                n = len(r["input_ids"])
                ids[i, :n] = torch.as_tensor(r["input_ids"])
                labels[i, :n] = torch.as_tensor(r["labels"])
                mask[i, :n] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, :-1].float()
            target = labels[:, 1:].to(device)
            per_token = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100,
                                                          reduction="none")
            row_nll = per_token.sum(-1).double().cpu().numpy()
            row_tokens = (target != -100).sum(-1).cpu().numpy()
            for i, r in enumerate(batch):
                j = index[int(r["unit"])]
                nll[j] += row_nll[i]
                tokens[j] += row_tokens[i]
                nbytes[j] += r["n_bytes"]
    finally:
        model.train(was_training)
    return UnitScores(nll=nll, tokens=tokens, bytes=nbytes, seconds=time.perf_counter() - start)


# ------------------------------------------------------------------------------------------- intervals
def _resample(n: int, n_resamples: int, seed: int) -> np.ndarray:
    if n < 1:
        raise ValueError("a bootstrap needs at least one unit")
    return np.random.default_rng(seed).integers(0, n, size=(n_resamples, n))


def _quantiles(values: np.ndarray, confidence: float) -> tuple[float, float]:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    alpha = (1 - confidence) / 2
    return float(np.quantile(values, alpha)), float(np.quantile(values, 1 - alpha))


def perplexity_interval(scores: UnitScores, *, confidence: float = 0.95, n_resamples: int = 2000,
                        seed: int = 0) -> dict:
    """Perplexity, per-token NLL and bits per byte with percentile-bootstrap intervals over units."""
    idx = _resample(len(scores.nll), n_resamples, seed)
    nll, tok, byt = scores.nll[idx].sum(1), scores.tokens[idx].sum(1), scores.bytes[idx].sum(1)
    total_tokens = float(scores.tokens.sum())
    if total_tokens <= 0:
        raise ValueError("no predicted token in the evaluation set")
    out = {"perplexity": scores.perplexity, "perplexity_ci": list(_quantiles(np.exp(nll / tok), confidence)),
           "nll_per_token": float(scores.nll.sum() / total_tokens),
           "n_units": len(scores.nll), "n_tokens": int(total_tokens), "confidence": confidence}
    if scores.bytes.sum() > 0:
        out["bits_per_byte"] = scores.bits_per_byte
        out["bits_per_byte_ci"] = list(_quantiles(nll / (LN2 * byt), confidence))
        out["n_bytes"] = int(scores.bytes.sum())
    return out


def paired_difference(a: UnitScores, b: UnitScores, *, confidence: float = 0.95, n_resamples: int = 2000,
                      seed: int = 0) -> dict:
    """Perplexity of A minus that of B on the same units, with a paired bootstrap interval (the same
    resampled units for both), and the same for the per-token NLL (``log ppl``) difference.
    ``p_a_not_better``: the share of resamples in which A's perplexity is not below B's."""
    if a.nll.shape != b.nll.shape or not np.array_equal(a.tokens, b.tokens):
        raise ValueError("paired_difference needs the two models' scores on the same units (same tokens per unit); "
                         "score both with the same rows")
    idx = _resample(len(a.nll), n_resamples, seed)
    tok = a.tokens[idx].sum(1)
    log_a, log_b = a.nll[idx].sum(1) / tok, b.nll[idx].sum(1) / tok
    diff = np.exp(log_a) - np.exp(log_b)
    return {"diff": a.perplexity - b.perplexity, "low": _quantiles(diff, confidence)[0],
            "high": _quantiles(diff, confidence)[1],
            "nll_diff": float((a.nll.sum() - b.nll.sum()) / a.tokens.sum()),
            "nll_diff_ci": list(_quantiles(log_a - log_b, confidence)),
            "p_a_not_better": float(np.mean(diff >= 0)), "confidence": confidence, "n_units": len(a.nll)}


def gap_closed(teacher_ppl: float, student_ppl: float, baseline_ppl: float, *, space: str = "log") -> float:
    """Share of the baseline-to-teacher gap the student closes: 1 = as good as the teacher, 0 = no better than
    the baseline. ``space="log"``: on per-token cross-entropy (log perplexity); ``"ppl"``: on perplexity."""
    if space not in ("log", "ppl"):
        raise ValueError(f"space must be 'log' or 'ppl', got {space!r}")
    f = math.log if space == "log" else float
    gap = f(baseline_ppl) - f(teacher_ppl)
    if gap == 0:
        raise ValueError("the baseline is exactly as good as the teacher: there is no gap to close")
    return (f(baseline_ppl) - f(student_ppl)) / gap


# --------------------------------------------------------------------------------------------- speed
def measure_tokens_per_second(models: Mapping[str, Any], batch: Mapping[str, torch.Tensor], *, warmup: int = 1,
                              repeats: int = 3, threads: int = 1) -> dict[str, dict[str, float]]:
    """Forward tokens per second of each model on the same batch, with ``threads`` CPU threads.

    Models run interleaved (one forward of each per round), so load from other processes hits them alike;
    the median over ``repeats`` timed rounds (after ``warmup``) is reported, with the quartile range."""
    from hf_distill.tasks.classification import measure_latency

    latency = measure_latency(models, batch, warmup=warmup, repeats=repeats, threads=threads, desc="tokens/s")
    n_tokens = int(batch["attention_mask"].sum()) if "attention_mask" in batch else int(batch["input_ids"].numel())
    out = {}
    for name, t in latency.items():
        out[name] = {"tokens_per_second": 1000.0 * n_tokens / t["median_ms"],
                     "tokens_per_second_iqr": [1000.0 * n_tokens / t["q3_ms"], 1000.0 * n_tokens / t["q1_ms"]],
                     "median_ms": t["median_ms"], "batch_size": t["batch_size"], "seq_len": t["seq_len"],
                     "threads": threads, "warmup": warmup, "repeats": repeats}
    return out
