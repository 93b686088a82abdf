"""Quantized distillation of a text classifier: a fp32 distilled student, its post-training dynamic int8
(PTQ) version, and an int8 student trained with quantization-aware training (QAT) on the distillation loss.

    python recipes/quantized_student.py --config recipes/configs/quantized_student_bbc.yaml

Every key of the YAML file is also a flag, and flags override the file.

Stages:

1. **Data and teacher.** As in ``recipes/text_classification.py``: a teacher with a head for the data's
   labels is used as it is; otherwise it is fine-tuned once and saved to ``output_dir/teacher``.
2. **fp32 student.** ``--student_layers`` of the teacher's layers, distilled on the teacher's cached
   logits (soft-target KL at ``--temperature`` + cross-entropy). With ``--use_peft true`` only LoRA
   adapters (and the classifier head) train; they are saved in ``student_fp32/adapter`` and merged, and
   PTQ / QAT start from the merged student (QAT trains all of its weights: fake quantization moves the
   weights themselves onto the int8 grid, which adapters over frozen weights cannot do).
3. **PTQ int8.** ``quantize_dynamic_int8``: int8 weights, activations quantized per batch at run time.
4. **QAT int8.** A copy of the fp32 student is fake-quantized (``prepare_qat_student``: int8 weights and
   activations on every Linear of the encoder, int8 word embedding) and trained further with the same
   distillation loss for ``--qat_epochs`` at ``--qat_learning_rate``; the observers freeze for the last
   ``--qat_freeze_fraction`` of its steps; then ``export_int8`` makes the real int8 model.
5. **Evaluation.** The four models on the test split (the int8 ones loaded back from their safetensors
   folders): accuracy [bootstrap CI], macro-F1, size on disk, CPU latency of one batch (interleaved, one
   thread); the goals (QAT int8 vs fp32 student: accuracy within ``--goal_accuracy_drop``, latency and size
   ratios) are "met" only when the measurement shows it. ``results.json`` and ``results.md``.
"""

from __future__ import annotations

import time

_START = time.perf_counter()

import copy  # noqa: E402
import dataclasses  # noqa: E402
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
    TrainerCallback,
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
from hf_distill.quantization import (  # noqa: E402
    export_int8,
    fake_quant_modules,
    freeze_qat_observers,
    load_int8,
    prepare_qat_student,
    quantize_dynamic_int8,
    save_int8,
)
from hf_distill.students import build_student  # noqa: E402
from hf_distill.students.peft_students import PeftArguments, apply_peft  # noqa: E402
from hf_distill.tasks.classification import (  # noqa: E402
    DataError,
    load_classification_data,
    paired_bootstrap_diff,
    predict_logits,
    tokenize_for_classification,
)
from hf_distill.tasks.classification_recipe import (  # noqa: E402
    TEACHER_DIR,
    Stages,
    evaluate_models,
    head_label2id,
    parse_layers,
    resolve_model_path,
    save_model,
    train_model,
)
from hf_distill.teachers import cache_teacher_logits, load_teacher  # noqa: E402

logger = logging.getLogger("quantized_student")

FP32_DIR, PTQ_DIR, QAT_DIR = "student_fp32", "student_ptq_int8", "student_qat_int8"
NAMES = {"teacher": "fp32 teacher", "fp32": "fp32 distilled student", "ptq": "PTQ int8 student",
         "qat": "QAT int8 student"}


@dataclass
class QuantizationArguments:
    """PTQ / QAT settings (shared with ``recipes/student_architectures.py``)."""

    backend: str = field(default="x86", metadata={"help": "torch quantized engine: x86 (fbgemm), fbgemm, qnnpack."})
    qat_epochs: float = field(default=1.0, metadata={"help": "QAT epochs after the fp32 distillation."})
    qat_learning_rate: float = field(default=2e-5)
    qat_freeze_fraction: float = field(default=0.25, metadata={"help": "Freeze the observers for this last "
                                                                       "fraction of the QAT steps."})


def check_quantization_arguments(recipe) -> None:
    """Refuse bad QAT settings and an unavailable backend before any model loads."""
    from hf_distill.quantization import set_backend

    if not 0 <= recipe.qat_freeze_fraction <= 1:
        raise ValueError(f"--qat_freeze_fraction must be within [0, 1], got {recipe.qat_freeze_fraction}")
    if recipe.qat_epochs <= 0:
        raise ValueError(f"--qat_epochs must be > 0, got {recipe.qat_epochs}")
    set_backend(recipe.backend)


@dataclass
class QuantizedStudentArguments(QuantizationArguments, ClassificationDataArguments, ClassificationEvaluationArguments):
    teacher: str | None = field(default=None, metadata={"help": "Teacher: Hub id, folder, or package:<module>."})
    dataset_name: str | None = field(default=None)
    dataset_config: str | None = field(default=None)
    student_layers: str = field(default="2", metadata={"help": "A count ('2') or teacher layer indices ('0,5')."})
    teacher_epochs: float = field(default=1.0)
    teacher_learning_rate: float = field(default=1e-4)
    teacher_batch_size: int = field(default=16)
    # ---- evaluation
    goal_accuracy_drop: float = field(default=0.005, metadata={"help": "QAT int8 within this of the fp32 student."})
    goal_latency_ratio: float = field(default=0.5)
    goal_size_ratio: float = field(default=0.3)


class FreezeObservers(TrainerCallback):
    """Freeze the QAT observers (ranges fixed, fake quantization on) from step ``at`` on."""

    def __init__(self, model, at: int):
        self.model, self.at, self.done = model, at, False

    def on_step_begin(self, args, state, control, **kwargs):
        if not self.done and state.global_step >= self.at:
            freeze_qat_observers(self.model)
            self.done = True


def load_or_finetune_teacher(recipe, args, teacher_path, label2id, train_ds, collator, tokenizer, out):
    if head_label2id(AutoConfig.from_pretrained(teacher_path), list(label2id)) is not None:
        return load_teacher(teacher_path, task="sequence_classification"), Path(teacher_path)
    saved = out / TEACHER_DIR
    if (saved / "config.json").is_file() and head_label2id(AutoConfig.from_pretrained(saved), list(label2id)):
        return load_teacher(saved, task="sequence_classification"), saved
    set_seed(args.seed)
    teacher = AutoModelForSequenceClassification.from_pretrained(
        teacher_path, num_labels=len(label2id), label2id=label2id, id2label={i: n for n, i in label2id.items()},
        ignore_mismatched_sizes=True)
    targs = TrainingArguments(output_dir=str(out / "teacher_checkpoints"), learning_rate=recipe.teacher_learning_rate,
                              num_train_epochs=recipe.teacher_epochs, warmup_steps=0.1,
                              per_device_train_batch_size=recipe.teacher_batch_size, save_strategy="no",
                              seed=args.seed, report_to="none", use_cpu=args.use_cpu, disable_tqdm=args.disable_tqdm,
                              logging_steps=args.logging_steps)
    trainer = train_model(teacher, targs, train_ds, collator, tokenizer, distill=False)
    save_model(teacher, tokenizer, saved, trainer.state.log_history)
    return teacher, saved


def train_qat_int8(recipe, args, student, rows, collator, tokenizer, folder: Path, settings: dict, test_ds):
    """QAT of a copy of ``student`` (``--qat_epochs`` at ``--qat_learning_rate``, observers frozen for the last
    ``--qat_freeze_fraction``), exported to a real int8 model saved in ``folder``. Returns its training log and
    how far the int8 export's test logits are from the fake-quantized model's."""
    from hf_distill.trainer import DistillationTrainer

    qat = prepare_qat_student(copy.deepcopy(student), backend=recipe.backend)
    qat_args = dataclasses.replace(args, output_dir=str(folder.parent / "qat_checkpoints"),
                                   num_train_epochs=recipe.qat_epochs, learning_rate=recipe.qat_learning_rate,
                                   teacher_name_or_path=None, push_to_hub=False)
    steps = int(np.ceil(len(rows) / (args.per_device_train_batch_size * args.gradient_accumulation_steps))
                * recipe.qat_epochs)
    set_seed(args.seed)
    trainer = DistillationTrainer(model=qat, args=qat_args, train_dataset=rows, data_collator=collator,
                                  processing_class=tokenizer,
                                  callbacks=[FreezeObservers(qat, int(steps * (1 - recipe.qat_freeze_fraction)))])
    trainer.add_resume_settings(**settings, qat_backend=recipe.backend, qat_freeze_fraction=recipe.qat_freeze_fraction)
    trainer.train(resume_from_checkpoint=True)
    history = trainer.state.log_history
    del trainer
    qat.eval()
    freeze_qat_observers(qat)
    n_fake_quant = len(fake_quant_modules(qat))
    int8 = export_int8(qat)
    save_int8(int8, folder, tokenizer)
    (folder / "training_log.json").write_text(json.dumps(history, indent=1) + "\n")
    fake_logits = predict_logits(qat, test_ds, collator, batch_size=recipe.eval_batch_size, desc="test: fake-quant")
    int8_logits = predict_logits(int8, test_ds, collator, batch_size=recipe.eval_batch_size, desc="test: int8")
    return history, {"fake_quant_modules_in_training": n_fake_quant,
                     "fake_quant_modules_after_export": len(fake_quant_modules(int8)),
                     "max_abs_logit_diff": float(np.abs(fake_logits - int8_logits).max()),
                     "logit_range": float(fake_logits.max() - fake_logits.min()),
                     "argmax_agreement": float((fake_logits.argmax(-1) == int8_logits.argmax(-1)).mean())}


def interval_status(low: float, high: float, threshold: float) -> str:
    return "met" if low > threshold else "missed" if high < threshold else "not shown"


def quantization_goals(recipe, rows: dict, latency: dict, correct: dict) -> tuple[list[dict], dict]:
    fp32, qat = NAMES["fp32"], NAMES["qat"]
    comp = paired_bootstrap_diff(correct[qat], correct[fp32], n_resamples=recipe.bootstrap_resamples)
    drop = recipe.goal_accuracy_drop
    goals = [{"goal": f"QAT int8 accuracy within {100 * drop:.1f} points of the fp32 student",
              "status": interval_status(comp["low"], comp["high"], -drop),
              "measured": f"{100 * comp['diff']:+.1f} points [{100 * comp['low']:+.1f}, {100 * comp['high']:+.1f}] "
                          "(paired bootstrap, 95%)"}]
    lq, lf = latency[qat], latency[fp32]
    best, worst = lq["q1_ms"] / lf["q3_ms"], lq["q3_ms"] / lf["q1_ms"]
    limit = recipe.goal_latency_ratio
    goals.append({"goal": f"QAT int8 latency <= {limit}x the fp32 student's",
                  "status": "met" if worst <= limit else "missed" if best > limit else "not shown",
                  "measured": f"{lq['median_ms'] / lf['median_ms']:.2f}x (quartile bounds {best:.2f}x-{worst:.2f}x)"})
    size = rows[qat]["size_bytes"] / rows[fp32]["size_bytes"]
    goals.append({"goal": f"QAT int8 size on disk <= {recipe.goal_size_ratio}x the fp32 student's",
                  "status": "met" if size <= recipe.goal_size_ratio else "missed", "measured": f"{size:.3f}x"})
    return goals, comp


def markdown(results: dict) -> str:
    fp32 = next(r for r in results["models"] if r["name"] == NAMES["fp32"])
    lines = ["| model | accuracy [95% CI] | macro-F1 | size on disk | vs fp32 student | latency / batch [IQR] | "
             "vs fp32 student |", "| --- | --- | ---: | ---: | ---: | --- | ---: |"]
    for r in results["models"]:
        lo, hi = r["accuracy_ci"]
        lines.append(f"| {r['name']} | {100 * r['accuracy']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}] | "
                     f"{100 * r['macro_f1']:.1f} | {r['size_bytes'] / 1e6:.1f} MB | "
                     f"{r['size_bytes'] / fp32['size_bytes']:.2f}x | {r['latency_ms']:.1f} ms "
                     f"[{r['latency_iqr_ms'][0]:.1f}, {r['latency_iqr_ms'][1]:.1f}] | "
                     f"{r['latency_ms'] / fp32['latency_ms']:.2f}x |")
    lat, q = results["latency"], results["qat_export"]
    lines += ["", f"Latency: median of {lat['repeats']} interleaved forward passes after {lat['warmup']} warm-up, one "
              f"batch of {lat['batch_size']} x {lat['seq_len']} tokens, {lat['threads']} CPU thread(s), this run. "
              f"Size: weight files in each folder (safetensors).",
              f"QAT export: max |int8 - fake-quant| logit on the test split {q['max_abs_logit_diff']:.4f} "
              f"(logit range {q['logit_range']:.2f}); argmax agreement {100 * q['argmax_agreement']:.1f}%.", "",
              "| goal | status | measured |", "| --- | --- | --- |"]
    lines += [f"| {g['goal']} | {g['status']} | {g['measured']} |" for g in results["goals"]]
    stages = results["stages"]
    lines += ["", "| stage | wall time |", "| --- | ---: |"] + [f"| {k} | {v['seconds']:.0f} s |" for k, v in stages.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    recipe, args, peft_args = parse_config_and_args((QuantizedStudentArguments, DistillationArguments, PeftArguments),
                                                    argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", force=True)
    if recipe.num_threads:
        torch.set_num_threads(recipe.num_threads)
    out = Path(args.output_dir)
    stages = Stages(total=6)
    layer_spec = parse_layers(recipe.student_layers)
    if peft_args.use_peft and not peft_args.merge_adapters:
        raise ValueError("PTQ and QAT quantize the merged student: --use_peft needs --merge_adapters true here (the "
                         "adapters are saved in student_fp32/adapter either way)")
    check_quantization_arguments(recipe)

    stages.start("data and teacher", "load the data and the teacher (fine-tuned once when it has no head)")
    teacher_spec = recipe.teacher or args.teacher_name_or_path
    if not teacher_spec:
        raise DataError("no teacher given: set --teacher (a Hub id, a folder, or package:<module>)")
    data = load_classification_data(
        source=recipe.source, dataset_name=recipe.dataset_name, dataset_config=recipe.dataset_config,
        train_file=recipe.train_file, test_file=recipe.test_file, text_column=recipe.text_column,
        label_column=recipe.label_column, test_size=recipe.test_size, seed=recipe.split_seed,
        max_train_samples=recipe.max_train_samples, max_test_samples=recipe.max_test_samples)
    teacher_path = resolve_model_path(teacher_spec)
    tokenizer = AutoTokenizer.from_pretrained(teacher_path)
    label2id = head_label2id(AutoConfig.from_pretrained(teacher_path), data.labels) or data.label2id
    train_ds, test_ds = tokenize_for_classification(data, tokenizer, max_length=recipe.max_length, label2id=label2id)
    collator = DataCollatorWithPadding(tokenizer)
    teacher, teacher_dir = load_or_finetune_teacher(recipe, args, teacher_path, label2id, train_ds, collator,
                                                    tokenizer, out)
    teacher.eval()
    cached = cache_teacher_logits(teacher, train_ds, collator, batch_size=recipe.eval_batch_size,
                                  desc="teacher logits (train)")
    stages.end()

    stages.start("fp32 student", f"distil teacher layers {recipe.student_layers} into a fp32 student")
    set_seed(args.seed)
    student = build_student(teacher, architecture="same", tokenizer=tokenizer, **layer_spec)
    student = apply_peft(student, peft_args)  # LoRA adapters when --use_peft (merged before quantization)
    settings = {"student_layers": recipe.student_layers, "max_length": recipe.max_length,
                "split_seed": recipe.split_seed, "teacher_weights": weights_fingerprint(teacher),
                **{f"peft.{k}": v for k, v in dataclasses.asdict(peft_args).items()}}
    fp32_args = dataclasses.replace(args, output_dir=str(out / FP32_DIR), teacher_name_or_path=None, push_to_hub=False)
    trainer = train_model(student, fp32_args, cached, collator, tokenizer, resume_settings=settings)
    fp32_history = trainer.state.log_history
    student = save_model(student, tokenizer, out / FP32_DIR, fp32_history)  # a LoRA student: merged
    del trainer
    stages.end()

    stages.start("PTQ int8", "post-training dynamic int8 of the fp32 student")
    save_int8(quantize_dynamic_int8(student, backend=recipe.backend), out / PTQ_DIR, tokenizer)
    stages.end()

    stages.start("QAT int8", f"fake-quantized training with the distillation loss ({recipe.qat_epochs:g} epoch(s))")
    qat_history, qat_export = train_qat_int8(recipe, fp32_args, student, cached, collator, tokenizer, out / QAT_DIR,
                                             settings, test_ds)
    stages.end()

    stages.start("evaluation", "accuracy, size and latency of the four models (int8 ones loaded from disk)")
    models = {NAMES["teacher"]: (teacher, teacher_dir), NAMES["fp32"]: (student, out / FP32_DIR),
              NAMES["ptq"]: (load_int8(out / PTQ_DIR), out / PTQ_DIR),
              NAMES["qat"]: (load_int8(out / QAT_DIR), out / QAT_DIR)}
    rows, correct, latency = evaluate_models(
        models, test_ds, collator, num_labels=len(label2id), eval_batch_size=recipe.eval_batch_size,
        n_resamples=recipe.bootstrap_resamples, seed=args.seed, latency_batch_size=recipe.latency_batch_size,
        latency_warmup=recipe.latency_warmup, latency_repeats=recipe.latency_repeats,
        latency_threads=recipe.latency_threads, reference=NAMES["fp32"])
    for row in rows:  # int8 modules hold no nn.Parameter: count the fp32 student's architecture
        if "int8" in row["name"]:
            row["params"] = next(r["params"] for r in rows if r["name"] == NAMES["fp32"])
    stages.end()

    stages.start("report", "results.json, results.md")
    by_name = {r["name"]: r for r in rows}
    goals, comparison = quantization_goals(recipe, by_name, latency, correct)
    some = next(iter(latency.values()))
    results = {"data": {"source": data.source, "n_train": len(data.train), "n_test": len(data.test),
                        "labels": data.labels, "max_length": recipe.max_length},
               "teacher": teacher_spec, "student_layers": getattr(student, "distillation_teacher_layers", None)
               or recipe.student_layers, "backend": recipe.backend, "models": rows,
               "latency": {k: some[k] for k in ("batch_size", "seq_len", "threads", "warmup", "repeats")},
               "qat_export": qat_export, "comparisons": {"qat_int8_minus_fp32_student": comparison}, "goals": goals,
               "training": {"temperature": args.temperature, "kd_weight": args.kd_weight, "task_weight": args.task_weight,
                            "epochs": args.num_train_epochs, "learning_rate": args.learning_rate,
                            "qat_epochs": recipe.qat_epochs, "qat_learning_rate": recipe.qat_learning_rate,
                            "qat_freeze_fraction": recipe.qat_freeze_fraction,
                            "batch_size": args.per_device_train_batch_size, "seed": args.seed},
               "stages": stages.times, "log_history": {"fp32": fp32_history, "qat": qat_history}}
    stages.end()
    results["stages"]["total (incl. imports)"] = {"seconds": round(time.perf_counter() - _START, 1)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    (out / "results.md").write_text(markdown(results))
    print("\n" + markdown(results))
    return results


if __name__ == "__main__":
    from hf_distill.cli import run_with_one_line_errors

    sys.exit(run_with_one_line_errors(lambda argv: main(argv) and 0, sys.argv[1:], Path(__file__).name))
