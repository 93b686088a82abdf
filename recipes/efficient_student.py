"""Distil a transformer text classifier into BiLSTM / CNN students (Tang et al. 2019) and compare them with
the same students trained on hard labels only, the teacher and a 2-layer transformer student.

    python recipes/efficient_student.py --config recipes/configs/efficient_student_bbc.yaml

Every key of the YAML file is also a flag; flags override the file.

Stages:

1. **Data** (``--source bbc_news``, or ``--train_file`` / ``--test_file``; the teacher's tokenizer).
2. **Teacher.** Used as is when it already classifies these labels, else fine-tuned once and saved to
   ``output_dir/teacher`` (a later run reuses it).
3. **Teacher logits.** The teacher runs once over the training split (and, with ``--augment_copies N``,
   over N augmented copies of it, Tang et al.'s transfer set: tokens masked with ``--augment_mask_prob``,
   and with probability ``--augment_span_prob`` a random contiguous span of at least half the text kept;
   those rows have no label, only the teacher's logits).
4. **Students.** For each of ``--students`` (``bilstm``, ``cnn``): one student built from the teacher
   (vocabulary, labels, embeddings copied / PCA-projected from the teacher's, see
   :mod:`hf_distill.students.efficient`), distilled with :class:`hf_distill.DistillationTrainer` from the
   cached logits only (the configured outputs terms: soft-target KL, logit MSE, cross-entropy); a copy of
   the same initial student trained with cross-entropy only on the labelled rows, same steps and seed (the
   baseline). With ``--transformer_student_layers`` a student of the teacher's own layers is distilled as well.
5. **Evaluation.** Accuracy [bootstrap CI], macro-F1, parameters, size on disk and CPU latency (one batch,
   ``--latency_threads``) of every model, all in this run: ``results.json``, ``results.md``, ``results.png``.

Hidden-state and attention terms cannot apply to a BiLSTM or CNN student: they are refused before training.
So is ``--use_peft`` for them (nothing pretrained to adapt); with ``--students none`` it trains the transformer
student as LoRA adapters (saved in ``transformer_distilled/adapter`` and merged).
"""

from __future__ import annotations

import time

_START = time.perf_counter()

import copy  # noqa: E402
import dataclasses  # noqa: E402
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
    TrainingArguments,
    set_seed,
)

from hf_distill.arguments import DistillationArguments  # noqa: E402
from hf_distill.config import parse_config_and_args  # noqa: E402
from hf_distill.tasks.recipe_arguments import (  # noqa: E402
    ClassificationDataArguments,
    ClassificationEvaluationArguments,
)
from hf_distill.objectives import TERM_REGISTRY, default_terms, parse_distillation_spec  # noqa: E402
from hf_distill.students import build_student  # noqa: E402
from hf_distill.students.efficient import EFFICIENT_ARCHITECTURES, build_efficient_student  # noqa: E402
from hf_distill.students.peft_students import PeftArguments, apply_peft  # noqa: E402
from hf_distill.tasks.classification import (  # noqa: E402
    DataError,
    load_classification_data,
    paired_bootstrap_diff,
    plot_results,
    results_markdown,
    tokenize_for_classification,
    write_results,
)
from hf_distill.tasks.classification_recipe import (  # noqa: E402
    TEACHER_DIR,
    Stages,
    evaluate_models,
    head_label2id,
    resolve_model_path,
    save_model,
    train_model,
)
from hf_distill.tasks.transfer_set import NO_LABEL, transfer_set  # noqa: E402
from hf_distill.teachers import cache_teacher_logits, load_teacher  # noqa: E402

logger = logging.getLogger("efficient_student")


@dataclass
class EfficientShapeArguments:
    """The BiLSTM / CNN students and their optimiser (shared with ``recipes/student_architectures.py``)."""

    students: str = field(default="bilstm,cnn", metadata={"help": "Comma-separated: bilstm, cnn."})
    embedding_dim: int = field(default=128)
    embedding_init: str = field(default="teacher", metadata={"help": "teacher (copied / PCA-projected) or random."})
    lstm_hidden_size: int = field(default=128)
    lstm_layers: int = field(default=1)
    pooling: str = field(default="max", metadata={"help": "BiLSTM pooling: max, mean or last."})
    kernel_sizes: str = field(default="3,4,5")
    num_filters: int = field(default=100)
    classifier_hidden_size: int = field(default=128)
    dropout: float = field(default=0.1)
    efficient_learning_rate: float = field(default=2e-3)
    efficient_epochs: float = field(default=8.0)
    efficient_batch_size: int = field(default=32)


@dataclass
class EfficientStudentArguments(EfficientShapeArguments, ClassificationDataArguments,
                                ClassificationEvaluationArguments):
    teacher: str | None = field(default=None, metadata={"help": "Hub id, folder, or package:<module>."})
    baseline: bool = field(default=True, metadata={"help": "Also train each student with cross-entropy only."})
    # ---- Tang et al.'s transfer set
    augment_copies: int = field(default=0, metadata={"help": "Augmented copies of the train split, teacher-labelled."})
    augment_mask_prob: float = field(default=0.1)
    augment_span_prob: float = field(default=0.25)
    # ---- a transformer student for comparison ("" skips it)
    transformer_student_layers: str = field(default="2", metadata={"help": "Teacher layers kept ('' to skip)."})
    # ---- teacher fine-tuning (when it has no head for these labels)
    teacher_epochs: float = field(default=1.0)
    teacher_learning_rate: float = field(default=1e-4)
    teacher_batch_size: int = field(default=16)
    teacher_warmup: float = field(default=0.1)
    # ---- evaluation
    plot: bool = field(default=True)


def check_outputs_only(args) -> None:
    """Refuse, before anything loads, terms that read hidden states / attention maps (a BiLSTM or CNN has none)."""
    spec = parse_distillation_spec(args.distillation)
    terms = spec if spec is not None else default_terms(args)
    for term in terms:
        cls = TERM_REGISTRY.get(term["loss"])
        if cls is None:
            raise ValueError(f"unknown distillation loss {term['loss']!r}; known: {', '.join(sorted(TERM_REGISTRY))}")
        if float(term.get("weight", 1.0)) > 0 and set(cls.needs) - {"logits"}:
            raise ValueError(f"term {term['loss']!r} reads {', '.join(sorted(set(cls.needs) - {'logits'}))}: "
                             + EFFICIENT_ARCHITECTURES["bilstm"][1].feature_distillation_refusal)


def augment_rows(dataset, tokenizer, *, copies: int, mask_prob: float, span_prob: float, seed: int):
    """``copies`` noisy versions of every row (token masking, random spans), with labels = -100."""
    if not 0 <= mask_prob < 1 or not 0 <= span_prob <= 1:
        raise ValueError("--augment_mask_prob must be in [0, 1) and --augment_span_prob in [0, 1]")
    if tokenizer.mask_token_id is None:
        raise ValueError("--augment_copies masks tokens, but the teacher's tokenizer has no mask token")
    rng = np.random.default_rng(seed)
    special = set(tokenizer.all_special_ids)
    rows = []
    for _ in range(copies):
        for ids in dataset["input_ids"]:
            ids = list(ids)
            body = [i for i, t in enumerate(ids) if t not in special]
            if body and rng.random() < span_prob:
                keep = int(rng.integers(max(1, len(body) // 2), len(body) + 1))
                start = int(rng.integers(0, len(body) - keep + 1))
                kept = set(body[start:start + keep])
                ids = [t for i, t in enumerate(ids) if t in special or i in kept]
            ids = [tokenizer.mask_token_id if t not in special and rng.random() < mask_prob else t for t in ids]
            rows.append({"input_ids": ids, "token_type_ids": [0] * len(ids), "attention_mask": [1] * len(ids),
                         "labels": NO_LABEL})
    from datasets import Dataset

    columns = [c for c in ("input_ids", "token_type_ids", "attention_mask", "labels") if c in dataset.column_names]
    return Dataset.from_list([{c: r[c] for c in columns} for r in rows])


def efficient_config(recipe, kind: str) -> dict:
    common = dict(embedding_dim=recipe.embedding_dim, classifier_hidden_size=recipe.classifier_hidden_size,
                  dropout=recipe.dropout)
    if kind == "bilstm":
        return {**common, "lstm_hidden_size": recipe.lstm_hidden_size, "num_hidden_layers": recipe.lstm_layers,
                "pooling": recipe.pooling}
    try:
        kernels = [int(k) for k in str(recipe.kernel_sizes).split(",") if k.strip()]
    except ValueError:
        raise ValueError(f"--kernel_sizes must be comma-separated widths like '3,4,5', got {recipe.kernel_sizes!r}") from None
    return {**common, "kernel_sizes": kernels, "num_filters": recipe.num_filters}


def efficient_students(recipe, *, allow_none: bool = False) -> tuple[list[str], dict[str, dict]]:
    """The ``--students`` kinds and their configs; a bad kind, size or pooling fails here, before any model loads."""
    kinds = [k.strip() for k in recipe.students.split(",") if k.strip() and k.strip() != "none"]
    unknown = [k for k in kinds if k not in EFFICIENT_ARCHITECTURES]
    if unknown or not (kinds or allow_none):
        raise ValueError(f"--students must list some of {', '.join(EFFICIENT_ARCHITECTURES)}"
                         + (" (or be 'none' with --transformer_student_layers)" if allow_none else "")
                         + f", got {recipe.students!r}")
    configs = {kind: efficient_config(recipe, kind) for kind in kinds}
    for kind, cfg in configs.items():
        EFFICIENT_ARCHITECTURES[kind][0](num_labels=2, **cfg)
    return kinds, configs


def efficient_training_args(recipe, args):
    """The efficient students' optimiser settings (their own learning rate, epochs and batch size)."""
    return dataclasses.replace(args, learning_rate=recipe.efficient_learning_rate, num_train_epochs=recipe.efficient_epochs,
                               per_device_train_batch_size=recipe.efficient_batch_size, teacher_name_or_path=None,
                               push_to_hub=False)


def distil_efficient_student(efficient_args, kind: str, config: dict, teacher, tokenizer, rows, collator, folder: Path,
                             *, embedding_init: str = "teacher", keep_initial: bool = False):
    """Build a ``kind`` student from the teacher, distil it on ``rows`` (cached logits) and save it to ``folder``.
    Returns ``(student, a copy of its initial weights or None, the trainer's final state)``."""
    student = build_efficient_student(teacher, kind, tokenizer=tokenizer, embedding_init=embedding_init,
                                      seed=efficient_args.seed, **config)
    initial = copy.deepcopy(student) if keep_initial else None
    trainer = train_model(student, dataclasses.replace(efficient_args, output_dir=str(folder)), rows, collator, tokenizer)
    save_model(student, tokenizer, folder, trainer.state.log_history)
    return student, initial, trainer.state


def prepare_teacher(recipe, args, teacher_path, data, train_ds, collator, tokenizer, label2id, out: Path):
    """(teacher, its folder, note): ready-made, reused from ``out/teacher``, or fine-tuned now."""
    if head_label2id(AutoConfig.from_pretrained(teacher_path), data.labels) is not None:
        return load_teacher(teacher_path, task="sequence_classification"), Path(teacher_path), "ready-made"
    saved = out / TEACHER_DIR
    if (saved / "config.json").is_file() and head_label2id(AutoConfig.from_pretrained(saved), data.labels):
        return load_teacher(saved, task="sequence_classification"), saved, f"reused from {saved}"
    set_seed(args.seed)
    teacher = AutoModelForSequenceClassification.from_pretrained(
        teacher_path, num_labels=len(label2id), id2label={i: n for n, i in label2id.items()}, label2id=label2id,
        ignore_mismatched_sizes=True)
    warmup = recipe.teacher_warmup
    targs = TrainingArguments(
        output_dir=str(out / "teacher_checkpoints"), learning_rate=recipe.teacher_learning_rate,
        num_train_epochs=recipe.teacher_epochs, per_device_train_batch_size=recipe.teacher_batch_size,
        warmup_steps=warmup if warmup < 1 else int(warmup), weight_decay=0.01, logging_steps=args.logging_steps,
        save_strategy="no", seed=args.seed, report_to="none", use_cpu=args.use_cpu, disable_tqdm=args.disable_tqdm)
    trainer = train_model(teacher, targs, train_ds, collator, tokenizer, distill=False)
    save_model(teacher, tokenizer, saved, trainer.state.log_history)
    return teacher.eval(), saved, "fine-tuned in this run"


def main(argv: list[str] | None = None) -> dict:
    recipe, args, peft_args = parse_config_and_args((EfficientStudentArguments, DistillationArguments, PeftArguments),
                                                    argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", force=True)
    if recipe.num_threads:
        torch.set_num_threads(recipe.num_threads)
    out = Path(args.output_dir)
    kinds, configs = efficient_students(recipe, allow_none=bool(recipe.transformer_student_layers))
    if peft_args.use_peft and kinds:
        raise ValueError(f"--use_peft trains LoRA adapters on the transformer student only; the {kinds[0]} student "
                         f"cannot take them: {EFFICIENT_ARCHITECTURES[kinds[0]][1].peft_refusal}, or give --students "
                         "none to train only the LoRA transformer student")
    if recipe.augment_copies < 0:
        raise ValueError(f"--augment_copies must be >= 0, got {recipe.augment_copies}")
    check_outputs_only(args)
    stages = Stages(total=4 + len(kinds) + bool(recipe.transformer_student_layers))

    stages.start("data", "load and check the data, tokenize")
    teacher_spec = recipe.teacher or args.teacher_name_or_path
    if not teacher_spec:
        raise DataError("no teacher given: set --teacher (a Hub id, a folder, or package:<module>)")
    data = load_classification_data(
        source=recipe.source, train_file=recipe.train_file, test_file=recipe.test_file,
        text_column=recipe.text_column, label_column=recipe.label_column, test_size=recipe.test_size,
        seed=recipe.split_seed, max_train_samples=recipe.max_train_samples, max_test_samples=recipe.max_test_samples)
    teacher_path = resolve_model_path(teacher_spec)
    tokenizer = AutoTokenizer.from_pretrained(teacher_path)
    label2id = head_label2id(AutoConfig.from_pretrained(teacher_path), data.labels)
    saved = out / TEACHER_DIR
    if label2id is None and (saved / "config.json").is_file():
        label2id = head_label2id(AutoConfig.from_pretrained(saved), data.labels)
    label2id = label2id or data.label2id
    train_ds, test_ds = tokenize_for_classification(data, tokenizer, max_length=recipe.max_length, label2id=label2id)
    collator = DataCollatorWithPadding(tokenizer)
    stages.end()

    stages.start("teacher", "teacher with a classification head for these labels")
    teacher, teacher_dir, note = prepare_teacher(recipe, args, teacher_path, data, train_ds, collator, tokenizer,
                                                 label2id, out)
    stages.end(note)

    stages.start("teacher logits", "run the teacher once over the training split (and its augmented copies)")
    train_cached = cache_teacher_logits(teacher, train_ds, collator, batch_size=recipe.eval_batch_size,
                                        desc="teacher logits (train)")
    distill_rows = train_cached
    if recipe.augment_copies:
        augmented = augment_rows(train_ds, tokenizer, copies=recipe.augment_copies, mask_prob=recipe.augment_mask_prob,
                                 span_prob=recipe.augment_span_prob, seed=args.seed)
        augmented = cache_teacher_logits(teacher, augmented, collator, batch_size=recipe.eval_batch_size,
                                         desc="teacher logits (augmented)")
        distill_rows = transfer_set(train_cached, augmented, seed=args.seed)
    stages.end()

    models = {"teacher": (teacher, teacher_dir)}
    histories, comparisons_of = {}, {}
    efficient_args = efficient_training_args(recipe, args)
    for kind in kinds:
        stages.start(kind, f"distil the teacher into a {kind} student"
                     + (" and train its cross-entropy baseline" if recipe.baseline else ""))
        student, baseline, state = distil_efficient_student(efficient_args, kind, configs[kind], teacher, tokenizer,
                                                            distill_rows, collator, out / f"{kind}_distilled",
                                                            embedding_init=recipe.embedding_init,
                                                            keep_initial=recipe.baseline)
        histories[f"{kind} distilled"] = state.log_history
        models[f"{kind} distilled"] = (student, out / f"{kind}_distilled")
        if baseline is not None:
            base_args = dataclasses.replace(
                efficient_args, output_dir=str(out / f"{kind}_baseline"), distillation=None, kd_weight=0.0,
                mse_weight=0.0, cos_weight=0.0, hidden_mse_weight=0.0, task_weight=1.0, max_steps=state.global_step)
            trainer = train_model(baseline, base_args, train_cached, collator, tokenizer)
            histories[f"{kind} hard labels"] = trainer.state.log_history
            save_model(baseline, tokenizer, out / f"{kind}_baseline", trainer.state.log_history)
            models[f"{kind} hard labels"] = (baseline, out / f"{kind}_baseline")
            comparisons_of[kind] = (f"{kind} distilled", f"{kind} hard labels")
            del trainer
        stages.end()

    if recipe.transformer_student_layers:
        layers = str(recipe.transformer_student_layers)
        stages.start("transformer student", f"distil into a student of the teacher's layers ({layers})")
        spec = {"layers": [int(x) for x in layers.split(",")]} if "," in layers else {"num_layers": int(layers)}
        set_seed(args.seed)
        student = apply_peft(build_student(teacher, tokenizer=tokenizer, **spec), peft_args)  # LoRA with --use_peft
        targs = dataclasses.replace(args, output_dir=str(out / "transformer_distilled"), teacher_name_or_path=None,
                                    push_to_hub=False)
        trainer = train_model(student, targs, train_cached, collator, tokenizer)
        histories["transformer distilled"] = trainer.state.log_history
        student = save_model(student, tokenizer, out / "transformer_distilled", trainer.state.log_history,
                             merge_adapters=peft_args.merge_adapters)
        models[f"transformer {student.config.num_hidden_layers}-layer distilled"] = (student, out / "transformer_distilled")
        del trainer
        stages.end()

    stages.start("evaluation", "accuracy, macro-F1, size and latency of every model")
    rows, correct, latency = evaluate_models(
        models, test_ds, collator, num_labels=len(label2id), eval_batch_size=recipe.eval_batch_size,
        n_resamples=recipe.bootstrap_resamples, seed=args.seed, latency_batch_size=recipe.latency_batch_size,
        latency_warmup=recipe.latency_warmup, latency_repeats=recipe.latency_repeats,
        latency_threads=recipe.latency_threads)
    comparisons = {f"{kind}_distilled_minus_hard_labels": paired_bootstrap_diff(
        correct[a], correct[b], n_resamples=recipe.bootstrap_resamples, seed=args.seed)
        for kind, (a, b) in comparisons_of.items()}
    stages.end()

    some = next(iter(latency.values()))
    results = {
        "data": {"source": data.source, "n_train": len(data.train), "n_test": len(data.test), "labels": data.labels,
                 "max_length": recipe.max_length},
        "teacher": teacher_spec, "teacher_note": note, "models": rows,
        "latency": {k: some[k] for k in ("batch_size", "seq_len", "threads", "warmup", "repeats")},
        "comparisons": comparisons,
        "students": {kind: {**configs[kind], "embedding_init": models[f"{kind} distilled"][0].config.embedding_init}
                     for kind in kinds},
        "training": {"objective": args.distillation or {"kd_weight": args.kd_weight, "task_weight": args.task_weight,
                                                        "mse_weight": args.mse_weight},
                     "temperature": args.temperature, "teacher_logits": "cached",
                     "distill_rows": len(distill_rows), "augment_copies": recipe.augment_copies,
                     "efficient": {"learning_rate": recipe.efficient_learning_rate, "epochs": recipe.efficient_epochs,
                                   "batch_size": recipe.efficient_batch_size},
                     "transformer": {"learning_rate": args.learning_rate, "epochs": args.num_train_epochs,
                                     "batch_size": args.per_device_train_batch_size},
                     "seed": args.seed, "torch_threads": torch.get_num_threads()},
        "stages": stages.times, "log_history": histories,
    }
    if recipe.plot:
        plot_results(results, histories, out / "results.png")
    results["stages"]["total (incl. imports)"] = {"seconds": round(time.perf_counter() - _START, 1)}
    paths = write_results(results, out)
    text = results_markdown(results)
    for kind, comp in comparisons.items():
        line = (f"{kind.split('_')[0]} distilled minus hard labels: {100 * comp['diff']:+.1f} points "
                f"[{100 * comp['low']:+.1f}, {100 * comp['high']:+.1f}] (paired bootstrap, 95%).")
        text += "\n" + line
    paths["markdown"].write_text(text + "\n")
    print("\n" + text)
    logger.info("wrote %s, %s", paths["json"], paths["markdown"])
    return results


if __name__ == "__main__":
    from hf_distill.cli import run_with_one_line_errors

    sys.exit(run_with_one_line_errors(lambda argv: main(argv) and 0, sys.argv[1:], Path(__file__).name))
