"""Steps shared by the classification recipes that train several students from one teacher
(``recipes/adversarial_bbc.py``, ``recipes/data_free_bbc.py``, ``recipes/self_distillation.py``): the
teacher's tokenizer and label map with the tokenized data, the initial student, the paired-bootstrap goals
and writing the results."""

from __future__ import annotations

import time
from pathlib import Path

from hf_distill.tasks.classification import (
    DataError,
    load_classification_data,
    results_markdown,
    tokenize_for_classification,
    write_results,
)
from hf_distill.tasks.classification_recipe import TEACHER_DIR, head_label2id, parse_layers, resolve_model_path

__all__ = ["TeacherData", "build_initial_student", "check_teacher_and_student", "evaluate_and_compare",
           "interval_goals", "load_teacher_data", "write_recipe_results"]


def check_teacher_and_student(recipe) -> None:
    """Both ``--teacher`` and ``--student_init`` are given."""
    if not recipe.teacher:
        raise DataError("no teacher given: set --teacher (a Hub id, a folder, or package:<module>)")
    if not recipe.student_init:
        raise DataError("no encoder to start the students from: set --student_init (Hub id, folder, package:<module>)")


class TeacherData:
    """The data, tokenized with the teacher's tokenizer under the label map of its head (or of the
    fine-tuned teacher in ``out/teacher``, else the data's own)."""

    def __init__(self, recipe, out: Path):
        from transformers import AutoConfig, AutoTokenizer, DataCollatorWithPadding

        self.data = load_classification_data(
            source=recipe.source, train_file=recipe.train_file, test_file=recipe.test_file,
            text_column=recipe.text_column, label_column=recipe.label_column, test_size=recipe.test_size,
            seed=recipe.split_seed, max_train_samples=recipe.max_train_samples,
            max_test_samples=recipe.max_test_samples)
        self.teacher_path = resolve_model_path(recipe.teacher)
        self.tokenizer = AutoTokenizer.from_pretrained(self.teacher_path)
        label2id = head_label2id(AutoConfig.from_pretrained(self.teacher_path), self.data.labels)
        if label2id is None and (out / TEACHER_DIR / "config.json").is_file():
            label2id = head_label2id(AutoConfig.from_pretrained(out / TEACHER_DIR), self.data.labels)
        self.label2id = label2id or self.data.label2id
        self.id2label = {i: name for name, i in self.label2id.items()}
        self.train_ds, self.test_ds = tokenize_for_classification(
            self.data, self.tokenizer, max_length=recipe.max_length, label2id=self.label2id)
        self.collator = DataCollatorWithPadding(self.tokenizer)


def load_teacher_data(recipe, out: Path) -> TeacherData:
    return TeacherData(recipe, out)


def build_initial_student(recipe, tokenizer, label2id: dict, id2label: dict, seed: int):
    """The student every arm starts from: layers ``--student_layers`` of ``--student_init`` with a new head."""
    from transformers import AutoModelForSequenceClassification, set_seed

    from hf_distill.students import build_student

    set_seed(seed)
    encoder = AutoModelForSequenceClassification.from_pretrained(
        resolve_model_path(recipe.student_init), num_labels=len(label2id), id2label=id2label, label2id=label2id,
        ignore_mismatched_sizes=True)
    initial = build_student(encoder, tokenizer=tokenizer, **parse_layers(recipe.student_layers))
    del encoder
    return initial


def interval_goals(pairs, comparisons: dict) -> list[dict]:
    """"a beats b" for each pair: met when its paired-bootstrap interval is above 0, missed when below."""
    return [
        {"goal": f"{a} beats {b}", "status": status, "met": status == "met",
         "measured": f"{100 * c['diff']:+.1f} points [{100 * c['low']:+.1f}, {100 * c['high']:+.1f}] (paired bootstrap)"}
        for (a, b), c in zip(pairs, comparisons.values())
        for status in ["met" if c["low"] > 0 else "missed" if c["high"] < 0 else "not shown"]]


def write_recipe_results(results: dict, out: Path, start: float, logger) -> dict:
    """Add the run's total wall time (since ``start``), write ``results.json`` / ``results.md`` and print the table."""
    results["stages"]["total (incl. imports)"] = {"seconds": round(time.perf_counter() - start, 1)}
    paths = write_results(results, out)
    print("\n" + results_markdown(results))
    logger.info("wrote %s, %s", paths["json"], paths["markdown"])
    return results


def evaluate_and_compare(recipe, models: dict, folders: dict, test_ds, collator, *, num_labels: int, pairs,
                         seed: int):
    """Evaluate every model (the teacher the reference) on the test split and the paired-bootstrap difference
    of each pair ``(a, b)``. Returns ``(rows, comparisons, latency)``; ``comparisons`` is keyed "a minus b"."""
    from hf_distill.tasks.classification import paired_bootstrap_diff
    from hf_distill.tasks.classification_recipe import evaluate_models

    rows, correct, latency = evaluate_models(
        {name: (models[name], folders[name]) for name in models}, test_ds, collator, num_labels=num_labels,
        eval_batch_size=recipe.eval_batch_size, n_resamples=recipe.bootstrap_resamples, seed=seed,
        latency_batch_size=recipe.latency_batch_size, latency_warmup=recipe.latency_warmup,
        latency_repeats=recipe.latency_repeats, latency_threads=recipe.latency_threads, reference="teacher")
    comparisons = {f"{a} minus {b}": paired_bootstrap_diff(correct[a], correct[b], n_resamples=recipe.bootstrap_resamples,
                                                           seed=seed) for a, b in pairs}
    return rows, comparisons, latency
