"""Argument groups that every classification recipe shares: where the labelled data comes from, and how
the models are evaluated. A recipe's own dataclass inherits them, so the flags and YAML keys are the same
in every recipe and are described once."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["ClassificationDataArguments", "ClassificationEvaluationArguments"]


@dataclass
class ClassificationDataArguments:
    """The labelled data (a built-in corpus, local files or a Hub dataset) and how it is split and cut."""

    source: str | None = field(default=None, metadata={"help": "Built-in data: bbc_news."})
    train_file: str | None = field(default=None, metadata={"help": "Local .csv/.tsv/.json/.jsonl/.parquet file."})
    test_file: str | None = field(default=None, metadata={"help": "Local test file (else: stratified split of train)."})
    text_column: str = field(default="text")
    label_column: str = field(default="label")
    test_size: float = field(default=0.2, metadata={"help": "Test fraction (or row count) when there is no test split."})
    split_seed: int = field(default=42, metadata={"help": "Seed of the stratified train/test split."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep a random subset of the train split."})
    max_test_samples: int | None = field(default=None, metadata={"help": "Keep a random subset of the test split."})
    max_length: int = field(default=128, metadata={"help": "Tokens per example (longer texts are truncated)."})


@dataclass
class ClassificationEvaluationArguments:
    """Accuracy intervals and the latency measurement of every model a recipe compares."""

    eval_batch_size: int = field(default=32)
    bootstrap_resamples: int = field(default=2000)
    latency_batch_size: int = field(default=16, metadata={"help": "Rows of the test split in the timed batch."})
    latency_threads: int = field(default=1, metadata={"help": "CPU threads during the latency measurement."})
    latency_warmup: int = field(default=3)
    latency_repeats: int = field(default=15)
    num_threads: int | None = field(default=None, metadata={"help": "torch threads for training and prediction."})
