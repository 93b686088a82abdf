"""Sequence classification: data loading and checks, metrics, CPU latency, result reports.

Used by ``recipes/text_classification.py``; every piece also works on its own.

* Data (in :mod:`hf_distill.tasks.classification_data`, re-exported here):
  :func:`load_classification_data` reads a Hub dataset, local CSV / JSON / JSONL / Parquet files, or
  the built-in ``bbc_news`` corpus (:func:`load_bbc_news`); a source without a test split is split
  with :func:`stratified_split`. :func:`validate_classification_data` fails early, with a message
  that says what to change, on an empty split, a missing text / label column, missing values or
  empty texts, labels that are not classes, a single class, or a label set that differs between
  train and test.
* Metrics: accuracy with a percentile-bootstrap interval (:func:`bootstrap_ci`), macro-F1
  (:func:`macro_f1`), a paired bootstrap of the accuracy difference of two models on the same
  examples (:func:`paired_bootstrap_diff`).
* Speed: :func:`measure_latency` times several models on the same batch, interleaved, after a
  warm-up, with a fixed number of threads, and reports the median.
* Reports: :func:`write_results` writes ``results.json`` and ``results.md``
  (:func:`results_markdown`); :func:`plot_results` draws accuracy vs latency and the loss terms
  logged during training.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hf_distill.modeling import count_parameters  # noqa: F401 - part of this module's reporting API
from hf_distill.plots import plot_loss_terms, save_figure
from hf_distill.tasks.classification_data import (
    BBC_NEWS,
    FILE_FORMATS,
    ClassificationData,
    DataError,
    bbc_news_folder,
    load_bbc_news,
    load_classification_data,
    stratified_split,
    tokenize_for_classification,
    validate_classification_data,
)

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "BBC_NEWS",
    "ClassificationData",
    "DataError",
    "FILE_FORMATS",
    "bbc_news_folder",
    "bootstrap_ci",
    "classification_metrics",
    "count_parameters",
    "load_bbc_news",
    "label_counts",
    "load_classification_data",
    "macro_f1",
    "measure_latency",
    "paired_bootstrap_diff",
    "plot_results",
    "predict_logits",
    "results_markdown",
    "size_on_disk",
    "stratified_split",
    "tokenize_for_classification",
    "validate_classification_data",
    "write_results",
]


# ---------------------------------------------------------------------------------------------- metrics
def macro_f1(predictions: Sequence[int], references: Sequence[int], num_labels: int | None = None) -> float:
    """Unweighted mean of per-class F1 over classes present in the references or the predictions."""
    p, r = np.asarray(predictions), np.asarray(references)
    classes = np.union1d(np.unique(p), np.unique(r)) if num_labels is None else \
        [c for c in range(num_labels) if (p == c).any() or (r == c).any()]
    scores = []
    for c in classes:
        tp = float(np.sum((p == c) & (r == c)))
        fp = float(np.sum((p == c) & (r != c)))
        fn = float(np.sum((p != c) & (r == c)))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return float(np.mean(scores)) if scores else 0.0


def bootstrap_ci(values: Sequence[float], *, confidence: float = 0.95, n_resamples: int = 2000,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (e.g. 0/1 correctness per example)."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_resamples, x.size))].mean(axis=1)
    alpha = (1 - confidence) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def paired_bootstrap_diff(correct_a: Sequence[float], correct_b: Sequence[float], *, confidence: float = 0.95,
                          n_resamples: int = 2000, seed: int = 0) -> dict[str, float]:
    """Accuracy of A minus accuracy of B on the same examples, with a paired bootstrap interval.

    Returns ``diff``, ``low``, ``high`` and ``p_a_not_better`` (share of resamples where A <= B).
    """
    a, b = np.asarray(correct_a, dtype=float), np.asarray(correct_b, dtype=float)
    if a.shape != b.shape or a.size == 0:
        raise ValueError("paired_bootstrap_diff needs two equally long, non-empty sequences")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, a.size, size=(n_resamples, a.size))
    diffs = a[idx].mean(axis=1) - b[idx].mean(axis=1)
    alpha = (1 - confidence) / 2
    return {"diff": float(a.mean() - b.mean()), "low": float(np.quantile(diffs, alpha)),
            "high": float(np.quantile(diffs, 1 - alpha)), "p_a_not_better": float(np.mean(diffs <= 0))}


def classification_metrics(logits_or_predictions, references: Sequence[int], *, num_labels: int | None = None,
                           confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0) -> dict[str, Any]:
    """accuracy, its bootstrap interval, macro-F1 and the number of examples."""
    arr = np.asarray(logits_or_predictions)
    predictions = arr.argmax(-1) if arr.ndim == 2 else arr
    references = np.asarray(references)
    correct = (predictions == references).astype(float)
    low, high = bootstrap_ci(correct, confidence=confidence, n_resamples=n_resamples, seed=seed)
    return {"accuracy": float(correct.mean()), "accuracy_ci": [low, high], "confidence": confidence,
            "macro_f1": macro_f1(predictions, references, num_labels), "n": int(references.size),
            "predictions": predictions.tolist()}


# ---------------------------------------------------------------------------------------------- models
def size_on_disk(path: str | Path) -> int:
    """Bytes of the weight files (*.safetensors, *.bin) saved directly in a model folder (not in sub-folders)."""
    path = Path(path)
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file() and f.suffix in (".safetensors", ".bin"))


def predict_logits(model, dataset, data_collator, *, batch_size: int = 32, desc: str = "predict") -> np.ndarray:
    """Logits of ``model`` for every row of a tokenized ``dataset`` (in order), with a progress bar."""
    import torch
    from tqdm.auto import tqdm

    model.eval()
    device = next(model.parameters()).device
    inputs = [c for c in dataset.column_names if c in ("input_ids", "attention_mask", "token_type_ids")]
    out = []
    with torch.inference_mode():
        for start in tqdm(range(0, len(dataset), batch_size), desc=desc, unit="batch"):
            rows = dataset.select(range(start, min(start + batch_size, len(dataset))))
            batch = data_collator([{k: row[k] for k in inputs} for row in rows])
            batch = {k: v.to(device) for k, v in batch.items() if k in inputs}
            out.append(model(**batch).logits.float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)


def measure_latency(models: Mapping[str, Any], batch: Mapping[str, torch.Tensor], *, warmup: int = 3,
                    repeats: int = 15, threads: int = 1, desc: str = "latency") -> dict[str, dict[str, float]]:
    """Median CPU time of one forward pass per model on the same ``batch``.

    Models run interleaved (one pass of each per round) so that load from other processes affects
    them alike; ``warmup`` rounds are discarded. ``torch`` runs with ``threads`` threads during the
    measurement and its previous setting is restored afterwards.
    """
    import torch
    from tqdm.auto import tqdm

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    times: dict[str, list[float]] = {name: [] for name in models}
    try:
        for model in models.values():
            model.eval()
        with torch.inference_mode():
            for round_ in tqdm(range(warmup + repeats), desc=desc, unit="round"):
                for name, model in models.items():
                    start = time.perf_counter()
                    model(**batch)
                    elapsed = time.perf_counter() - start
                    if round_ >= warmup:
                        times[name].append(elapsed)
    finally:
        torch.set_num_threads(previous)
    shape = tuple(next(iter(batch.values())).shape)
    return {name: {"median_ms": 1000 * statistics.median(t), "min_ms": 1000 * min(t),
                   "q1_ms": 1000 * float(np.quantile(t, 0.25)), "q3_ms": 1000 * float(np.quantile(t, 0.75)),
                   "batch_size": shape[0], "seq_len": shape[1] if len(shape) > 1 else 1,
                   "threads": threads, "warmup": warmup, "repeats": repeats}
            for name, t in times.items()}


# ---------------------------------------------------------------------------------------------- reports
def _fmt_seconds(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"


def results_markdown(results: Mapping[str, Any]) -> str:
    """The results as Markdown: a table of models, then stage timings and goals when present."""
    rows = results["models"]
    conf = int(round(100 * rows[0].get("confidence", 0.95)))
    lat = results.get("latency", {})
    reference = results.get("reference_model", "teacher")
    lines = [
        f"| model | layers | params | size on disk | accuracy [{conf}% CI] | macro-F1 | latency / batch | vs {reference} |",
        "| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: |",
    ]
    for r in rows:
        lo, hi = r["accuracy_ci"]
        lines.append(
            f"| {r['name']} | {r['layers']} | {r['params'] / 1e6:.1f}M | {r['size_bytes'] / 2**20:.1f} MiB | "
            f"{100 * r['accuracy']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}] | {100 * r['macro_f1']:.1f} | "
            f"{r['latency_ms']:.1f} ms | {r['latency_ratio']:.2f}x |"
        )
    notes = []
    data = results.get("data")
    if data:
        notes.append(f"Data: {data['source']}, {data['n_train']} train / {data['n_test']} test examples, "
                     f"{len(data['labels'])} labels, max {data['max_length']} tokens.")
        if data.get("n_unlabeled"):
            notes.append(f"Transfer set: {data['n_labelled']} labelled + {data['n_unlabeled']} unlabeled texts "
                         f"({data.get('unlabeled_source', 'unlabeled')}), labelled by the teacher's cached logits. The "
                         "teacher was fine-tuned on the labelled part only (unless it came ready); the baseline "
                         "trained on the labelled part only, for the same number of steps.")
    if lat:
        notes.append(f"Latency: median of {lat['repeats']} forward passes after {lat['warmup']} warm-up, "
                     f"one batch of {lat['batch_size']} x {lat['seq_len']} tokens, {lat['threads']} CPU "
                     f"thread{'s' if lat['threads'] != 1 else ''}, the models interleaved, measured in this run.")
    comp = results.get("comparisons", {}).get("distilled_minus_baseline")
    if comp:
        notes.append(f"Distilled minus baseline accuracy: {100 * comp['diff']:+.1f} points "
                     f"[{100 * comp['low']:+.1f}, {100 * comp['high']:+.1f}] (paired bootstrap, {conf}%).")
    for key, other in results.get("comparisons", {}).items():  # a recipe's own comparisons, e.g. "a minus b"
        if " minus " in key:
            notes.append(f"Accuracy of {key}: {100 * other['diff']:+.1f} points "
                         f"[{100 * other['low']:+.1f}, {100 * other['high']:+.1f}] (paired bootstrap, {conf}%).")
    text = "\n".join(lines) + "\n"
    if notes:
        text += "\n" + "\n".join(notes) + "\n"
    stages = results.get("stages")
    if stages:
        text += "\n| stage | wall time |\n| --- | ---: |\n"
        for name, info in stages.items():
            seconds = info.get("seconds") if isinstance(info, Mapping) else info
            note = f" ({info['note']})" if isinstance(info, Mapping) and info.get("note") else ""
            text += f"| {name}{note} | {_fmt_seconds(seconds)} |\n"
    goals = results.get("goals")
    if goals:  # a goal's status: met (shown by its measurement), not shown (the interval allows both), missed
        labels = {"met": "met", "not shown": "not shown", "missed": "MISSED"}
        text += "\n" + "\n".join(
            f"- {labels.get(g.get('status'), 'met' if g.get('met') else 'MISSED')}: {g['goal']} "
            f"(measured: {g['measured']})" for g in goals) + "\n"
    return text


def _jsonable(value):
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def write_results(results: Mapping[str, Any], output_dir: str | Path) -> dict[str, Path]:
    """Write ``results.json`` and ``results.md`` into ``output_dir``; return their paths."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": output_dir / "results.json", "markdown": output_dir / "results.md"}
    paths["json"].write_text(json.dumps(_jsonable(results), indent=2) + "\n")
    paths["markdown"].write_text(results_markdown(results))
    return paths


def plot_results(results: Mapping[str, Any], histories: Mapping[str, Sequence[Mapping[str, Any]]],
                 path: str | Path) -> Path:
    """PNG with accuracy (and its interval) against latency, and the loss terms logged in training.

    ``histories`` maps a run name to its ``trainer.state.log_history``; every ``loss*`` key of the
    training logs is drawn against the epoch.
    """
    os.environ.setdefault("MPLBACKEND", "Agg")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(12, 4.8))
    markers = ["o", "s", "^", "D", "v"]
    for i, r in enumerate(results["models"]):
        lo, hi = r["accuracy_ci"]
        acc = 100 * r["accuracy"]
        ax_acc.errorbar(r["latency_ms"], acc, yerr=[[acc - 100 * lo], [100 * hi - acc]], fmt=markers[i % len(markers)],
                        markersize=max(9 - 2 * i, 4), capsize=4, color=f"C{i}",
                        label=f"{r['name']} ({r['layers']} layers): {acc:.1f}%")
        ax_acc.annotate(r["name"], (r["latency_ms"], acc), textcoords="offset points", xytext=(8, 10 - 12 * i),
                        color=f"C{i}", fontsize=8)
    lat = results.get("latency", {})
    ax_acc.set_xlabel(f"CPU latency per batch of {lat.get('batch_size', '?')} (ms, {lat.get('threads', '?')} thread)")
    ax_acc.set_ylabel("test accuracy (%), 95% bootstrap interval")
    ax_acc.set_xlim(left=0)
    ax_acc.set_title("accuracy vs latency")
    ax_acc.grid(alpha=0.3)
    ax_acc.legend(loc="lower right", fontsize=8)

    plot_loss_terms(ax_loss, histories, x="epoch", first_color=0)
    return save_figure(fig, path)


def label_counts(dataset, label_column: str) -> dict[str, int]:
    """Examples per label value (as text), sorted by label."""
    return dict(sorted(Counter(map(str, dataset[label_column])).items()))
