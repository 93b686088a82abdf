"""Unlabeled transfer sets: text nobody labelled, labelled by the teacher (the original use of distillation).

* :func:`withhold_labels` keeps a stratified, seeded fraction of a labelled split and turns the
  rest into unlabeled text (an offline stand-in for a small labelled set plus a large unlabeled one);
* :func:`load_unlabeled_texts` reads unlabeled text from a local file (``.txt``: one text per line;
  CSV / TSV / JSON / JSONL / Parquet: a text column) or a Hub dataset / local dataset folder, and
  checks it before any model loads;
* :func:`tokenize_unlabeled` tokenizes it with ``labels = -100`` (no label: the task term and its
  count ignore these rows, the soft-target term counts every row);
* :func:`transfer_set` joins the labelled rows and the teacher-labelled rows (both with their
  ``teacher_logits``) into one training set.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING

from hf_distill.tasks.classification_data import DataError, load_data_file, load_dataset_dict, stratified_split

if TYPE_CHECKING:  # pragma: no cover
    import datasets

__all__ = ["NO_LABEL", "load_unlabeled_texts", "tokenize_unlabeled", "transfer_set", "withhold_labels"]

logger = logging.getLogger(__name__)

#: the label of a row without one (the ignore index of the task loss)
NO_LABEL = -100


def withhold_labels(train: datasets.Dataset, label_column: str, labelled_fraction: float, *, seed: int = 42,
                    text_columns: tuple[str, ...] = ("text",)) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Split ``train`` into (labelled, unlabeled): ``labelled_fraction`` of every class keeps its label
    (at least one row per class), the rest loses its label column. Stratified and reproducible for a ``seed``."""
    fraction = float(labelled_fraction)
    if not (0 < fraction < 1) or math.isnan(fraction):
        raise DataError(f"--labelled_fraction must be in (0, 1) (e.g. 0.1 keeps 10% of the training labels), "
                        f"got {labelled_fraction}")
    labelled, unlabeled = stratified_split(train, label_column, test_size=1 - fraction, seed=seed)
    keep = [c for c in text_columns if c]
    return labelled, unlabeled.select_columns(keep)


def _check_unlabeled(ds, origin: str, text_column: str, text_pair_column: str | None, flag: str):
    columns = list(ds.column_names)
    for column, what in ((text_column, "--unlabeled_text_column"), (text_pair_column, "--text_pair_column")):
        if column is not None and column not in columns:
            raise DataError(f"the unlabeled data {origin} has no text column {column!r}; its columns are {columns}. "
                            f"Set {what} to the column that holds the texts")
    if len(ds) == 0:
        raise DataError(f"the unlabeled data {origin} is empty; give it at least one text, or drop {flag}")
    for column in (text_column, text_pair_column):
        if column is None:
            continue
        bad = [(i, v) for i, v in enumerate(ds[column]) if not isinstance(v, str) or not v.strip()]
        if bad:
            shown = ", ".join(f"row {i}: {v!r}" for i, v in bad[:3])
            raise DataError(f"{len(bad)} rows of the unlabeled data {origin} have no text in column {column!r} "
                            f"({shown}); remove them or fix the file")


def _read_lines(path: Path):
    from datasets import Dataset

    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    return Dataset.from_dict({"text": [line.strip() for line in text.splitlines() if line.strip()]})


def load_unlabeled_texts(*, unlabeled_file: str | None = None, unlabeled_dataset: str | None = None,
                         unlabeled_config: str | None = None, unlabeled_split: str = "train",
                         text_column: str = "text", text_pair_column: str | None = None,
                         max_samples: int | None = None, exclude_texts=(), seed: int = 42) -> datasets.Dataset:
    """Unlabeled texts (only their text columns) from one file or dataset, checked before any model loads.

    A ``.txt`` file holds one text per line (column ``text``). Texts also in ``exclude_texts`` (the
    test split) are dropped with a warning: the teacher must not label the texts the students are
    tested on. ``max_samples`` keeps a seeded random subset.
    """
    given = [s for s in (unlabeled_file, unlabeled_dataset) if s]
    if len(given) != 1:
        raise DataError(f"give one of --unlabeled_file FILE or --unlabeled_dataset NAME, got {given or 'none'}")
    if max_samples is not None and max_samples < 1:
        raise DataError(f"--max_unlabeled_samples must be at least 1 (or left out for all texts), got {max_samples}")
    if unlabeled_file:
        path, flag = Path(unlabeled_file), "--unlabeled_file"
        if path.is_dir():
            raise DataError(f"unlabeled file {path} is a folder; give a .txt (one text per line), .csv, .tsv, .json, "
                            ".jsonl or .parquet file, or a dataset folder with --unlabeled_dataset")
        if not path.is_file():
            raise DataError(f"unlabeled file {path} does not exist; check --unlabeled_file")
        if path.suffix.lower() == ".txt":
            ds, text_column, text_pair_column = _read_lines(path), "text", None
        else:
            ds = load_data_file(str(path))
        origin = str(path)
    else:
        flag = "--unlabeled_dataset"
        loaded = load_dataset_dict(unlabeled_dataset, unlabeled_config, flag=flag)
        if unlabeled_split not in loaded:
            raise DataError(f"{unlabeled_dataset} has no split {unlabeled_split!r} (it has {list(loaded)}); "
                            "set --unlabeled_split")
        ds, origin = loaded[unlabeled_split], f"{unlabeled_dataset}[{unlabeled_split}]"
    _check_unlabeled(ds, origin, text_column, text_pair_column, flag)
    columns = [c for c in (text_column, text_pair_column) if c]
    ds = ds.select_columns(columns)
    if text_column != "text":
        ds = ds.rename_column(text_column, "text")
    excluded = set(exclude_texts)
    if excluded:
        keep = [i for i, t in enumerate(ds["text"]) if t not in excluded]
        if len(keep) < len(ds):
            logger.warning("dropped %d unlabeled texts that are also in the test split", len(ds) - len(keep))
            if not keep:
                raise DataError(f"every text of the unlabeled data {origin} is also in the test split; give other texts")
            ds = ds.select(keep)
    if max_samples is not None and len(ds) > max_samples:
        ds = ds.shuffle(seed=seed).select(range(max_samples))
    return ds


def tokenize_unlabeled(texts: datasets.Dataset, tokenizer, *, max_length: int, text_column: str = "text",
                       text_pair_column: str | None = None, desc: str = "tokenize unlabeled"):
    """Tokenize unlabeled texts like the labelled ones, with ``labels = -100`` (no label)."""
    def encode(batch):
        pairs = batch[text_pair_column] if text_pair_column else None
        out = tokenizer(batch[text_column], pairs, truncation=True, max_length=max_length)
        out["labels"] = [NO_LABEL] * len(batch[text_column])
        return out

    return texts.map(encode, batched=True, remove_columns=texts.column_names, desc=desc)


def transfer_set(labelled: datasets.Dataset, teacher_labelled: datasets.Dataset, *, seed: int = 42):
    """The labelled rows and the teacher-labelled rows (``labels = -100``) in one shuffled dataset; both
    must carry the same columns (``teacher_logits`` included)."""
    from datasets import concatenate_datasets

    if set(labelled.column_names) != set(teacher_labelled.column_names):
        raise ValueError(f"labelled columns {sorted(labelled.column_names)} differ from the teacher-labelled "
                         f"columns {sorted(teacher_labelled.column_names)}")
    if any(v != NO_LABEL for v in teacher_labelled["labels"]):
        raise ValueError("teacher-labelled rows must have labels = -100 (they have no label)")
    teacher_labelled = teacher_labelled.cast(labelled.features)
    return concatenate_datasets([labelled, teacher_labelled]).shuffle(seed=seed).flatten_indices()
