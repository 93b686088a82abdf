"""Student architecture search under a latency budget: depth x attention heads x FFN width, cut from the
teacher, chosen by successive halving of short distillation runs.

    python recipes/student_search.py --config recipes/configs/student_search_bbc.yaml

Every key of the YAML file is also a flag; flags override the file.

Stages:

1. **Data and teacher** (as ``recipes/efficient_student.py``): the teacher is used as it is when it
   classifies the data's labels, else fine-tuned once and saved to ``output_dir/teacher``. Its logits are
   cached once over the training split; ``--validation_size`` rows of it (stratified) are held out to
   score the candidates, so the test split decides nothing.
2. **Candidates.** Every combination of ``--search_layers`` x ``--search_heads`` x
   ``--search_intermediate``: the teacher's evenly spaced layers, then width pruning on
   ``--calibration_samples`` training texts (:mod:`hf_distill.students.pruning`; BERT: hidden = heads x
   head size). The teacher and all candidates are timed together, interleaved, on one batch of the test
   inputs (``--latency_batch_size``, ``--latency_threads``) on this machine.
3. **Budget.** A candidate is kept when its latency is within ``--latency_budget`` x the teacher's (or
   ``--max_latency_ms``) and its parameters within ``--max_parameters``.
4. **Successive halving** (:func:`hf_distill.students.search.successive_halving`): every kept candidate
   is distilled ``--min_steps`` steps (the configured loss on the cached logits, constant
   ``--search_learning_rate``, one AdamW state per candidate kept across rounds, every candidate seeing
   the same rows in the same order), scored by held-out accuracy (ties: lower held-out soft-target KL),
   and the best ``1 / --eta`` go on with ``--eta`` times the steps.
5. **Chosen student.** The winner is saved as it left the search (``chosen_student/``, loads with
   ``AutoModelForSequenceClassification``), then distilled ``--final_epochs`` more with the configured
   schedule (``searched_student/``) and evaluated with the teacher on the test split: accuracy [bootstrap
   CI], parameters, size, latency. ``results.json``, ``results.md`` (the search table, the Pareto front of
   held-out accuracy vs latency) and ``results.png``.

A candidate dropped in an early round was scored after fewer steps than the winner: the front compares
each candidate at the point where the search left it.
"""

from __future__ import annotations

import time

_START = time.perf_counter()

import dataclasses  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import AutoConfig, AutoTokenizer, DataCollatorWithPadding, set_seed  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the other recipes' steps
from efficient_student import prepare_teacher  # noqa: E402

from hf_distill.arguments import DistillationArguments  # noqa: E402
from hf_distill.config import parse_config_and_args  # noqa: E402
from hf_distill.students.search import (  # noqa: E402
    candidate_shapes,
    pareto_front,
    prepare_candidates,
    successive_halving,
    within_budget,
)
from hf_distill.tasks.classification import (  # noqa: E402
    DataError,
    load_classification_data,
    measure_latency,
    predict_logits,
    results_markdown,
    tokenize_for_classification,
)
from hf_distill.tasks.classification_data import stratified_split  # noqa: E402
from hf_distill.tasks.classification_recipe import (  # noqa: E402
    Stages,
    evaluate_models,
    head_label2id,
    resolve_model_path,
    save_model,
    train_model,
)
from hf_distill.tasks.recipe_arguments import (  # noqa: E402
    ClassificationDataArguments,
    ClassificationEvaluationArguments,
)
from hf_distill.teachers import cache_teacher_logits  # noqa: E402

logger = logging.getLogger("student_search")

CHOSEN_DIR, SEARCHED_DIR = "chosen_student", "searched_student"
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


@dataclass
class SearchArguments:
    """The search space, the budget and the short runs (shared with ``recipes/student_architectures.py``)."""

    search_layers: str = field(default="1,2,3", metadata={"help": "Comma-separated layer counts."})
    search_heads: str = field(default="4,6,8", metadata={"help": "Comma-separated attention head counts."})
    search_intermediate: str = field(default="384,768,1536", metadata={"help": "Comma-separated FFN widths."})
    latency_budget: float | None = field(
        default=0.2, metadata={"help": "Keep candidates within this fraction of the teacher's latency (this run)."})
    max_latency_ms: float | None = field(default=None, metadata={"help": "Or an absolute latency budget (ms)."})
    max_parameters: int | None = field(default=None, metadata={"help": "And/or a parameter budget."})
    calibration_samples: int = field(default=64, metadata={"help": "Training texts that rank heads and neurons."})
    validation_size: int = field(default=200, metadata={"help": "Training rows held out to score the candidates."})
    min_steps: int = field(default=16, metadata={"help": "Steps of the first round."})
    eta: int = field(default=2, metadata={"help": "Keep the best 1/eta each round, train them eta x longer."})
    search_rounds: int | None = field(default=None, metadata={"help": "Rounds (default: until one is left)."})
    search_learning_rate: float = field(default=1e-4, metadata={"help": "Constant learning rate of the short runs."})
    final_epochs: float = field(default=1.0, metadata={"help": "Distil the winner this many epochs more (0: skip)."})


@dataclass
class StudentSearchArguments(SearchArguments, ClassificationDataArguments, ClassificationEvaluationArguments):
    teacher: str | None = field(default=None, metadata={"help": "Hub id, folder, or package:<module>."})
    teacher_epochs: float = field(default=1.0)
    teacher_learning_rate: float = field(default=1e-4)
    teacher_batch_size: int = field(default=16)
    teacher_warmup: float = field(default=0.1)
    plot: bool = field(default=True)


def int_list(text: str, flag: str) -> list[int]:
    try:
        values = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or any(v < 1 for v in values):
        raise ValueError(f"{flag} must be comma-separated positive integers like '1,2,3', got {text!r}")
    return values


def check_search_arguments(recipe) -> dict[str, list[int]]:
    """The parsed search space; every bad setting is refused before any model loads."""
    space = {"layers": int_list(recipe.search_layers, "--search_layers"),
             "heads": int_list(recipe.search_heads, "--search_heads"),
             "intermediate": int_list(recipe.search_intermediate, "--search_intermediate")}
    if recipe.latency_budget is None and recipe.max_latency_ms is None and recipe.max_parameters is None:
        raise ValueError("give a budget: --latency_budget (a fraction of the teacher's latency), --max_latency_ms "
                         "or --max_parameters")
    if recipe.latency_budget is not None and recipe.max_latency_ms is not None:
        raise ValueError("give one latency budget: --latency_budget (relative to the teacher) or --max_latency_ms")
    if recipe.latency_budget is not None and not recipe.latency_budget > 0:
        raise ValueError(f"--latency_budget must be above 0 (a fraction of the teacher's latency), got "
                         f"{recipe.latency_budget}")
    if recipe.eta < 2 or recipe.min_steps < 1:
        raise ValueError(f"successive halving needs --eta >= 2 and --min_steps >= 1, got {recipe.eta} and "
                         f"{recipe.min_steps}")
    if recipe.calibration_samples < 1 or recipe.validation_size < 2:
        raise ValueError("--calibration_samples must be >= 1 and --validation_size >= 2")
    if recipe.final_epochs < 0:
        raise ValueError(f"--final_epochs must be >= 0, got {recipe.final_epochs}")
    return space


def model_batches(rows, collator, batch_size: int = 16):
    """Collated model inputs of ``rows`` (no labels, no cached logits), in order."""
    names = [c for c in MODEL_INPUTS if c in rows.column_names]
    for start in range(0, len(rows), batch_size):
        chunk = rows.select(range(start, min(start + batch_size, len(rows))))
        yield dict(collator([{k: r[k] for k in names} for r in chunk]))


class ShortRuns:
    """``train(candidate, steps)`` and ``score(candidate)`` for :func:`successive_halving`: distillation from the
    cached logits with a persistent optimizer per candidate; every candidate reads the same stream of rows."""

    def __init__(self, recipe, args, rows, validation, collator, tokenizer, out: Path):
        self.args, self.collator, self.tokenizer, self.out = args, collator, tokenizer, out
        self.rows, self.validation = rows, validation
        self.batch = args.per_device_train_batch_size * args.gradient_accumulation_steps
        self.learning_rate = recipe.search_learning_rate
        rng = np.random.default_rng(args.seed)
        self.order = np.concatenate([rng.permutation(len(rows)) for _ in range(4)])
        self.optimizers, self.histories, self.metrics = {}, {}, {}

    def _stream(self, start: int, count: int) -> list[int]:
        while len(self.order) < start + count:
            self.order = np.concatenate([self.order, np.random.default_rng(len(self.order)).permutation(len(self.rows))])
        return self.order[start:start + count].tolist()

    def train(self, c, steps: int) -> None:
        if steps <= 0:
            return
        from hf_distill.trainer import DistillationTrainer

        if c.name not in self.optimizers:
            self.optimizers[c.name] = torch.optim.AdamW(c.model.parameters(), lr=self.learning_rate,
                                                        weight_decay=self.args.weight_decay)
        rows = self.rows.select(self._stream(c.steps * self.batch, steps * self.batch))
        run_args = dataclasses.replace(
            self.args, output_dir=str(self.out / "search" / c.name), max_steps=steps, num_train_epochs=1,
            learning_rate=self.learning_rate, lr_scheduler_type="constant", warmup_steps=0, save_strategy="no",
            logging_steps=max(1, steps), teacher_name_or_path=None, push_to_hub=False, report_to="none")
        set_seed(self.args.seed)
        trainer = DistillationTrainer(model=c.model, args=run_args, train_dataset=rows, data_collator=self.collator,
                                      processing_class=self.tokenizer, optimizers=(self.optimizers[c.name], None))
        trainer.train()
        self.histories.setdefault(c.name, []).extend(
            {**h, "step": c.steps + h.get("step", 0)} for h in trainer.state.log_history if "loss" in h)

    def score(self, c) -> float:
        logits = predict_logits(c.model, self.validation, self.collator, batch_size=32, desc=f"validation {c.name}")
        labels = np.asarray(self.validation["labels"])
        teacher = np.asarray(self.validation["teacher_logits"], dtype=np.float64)
        t = self.args.temperature
        log_p = torch.log_softmax(torch.tensor(teacher) / t, -1)
        log_q = torch.log_softmax(torch.tensor(logits, dtype=torch.float64) / t, -1)
        kl = float((log_p.exp() * (log_p - log_q)).sum(-1).mean() * t * t)
        accuracy = float((logits.argmax(-1) == labels).mean())
        trace = self.metrics.get(c.name, {}).get("trace", []) + [{"steps": c.steps, "accuracy": accuracy, "kl": kl}]
        self.metrics[c.name] = {"validation_accuracy": accuracy, "validation_kl": kl, "trace": trace}
        return accuracy

    def tiebreak(self, c) -> float:
        return -self.metrics[c.name]["validation_kl"]


def search(recipe, args, teacher, space: dict, rows, validation, latency_batch: dict, collator, tokenizer,
           out: Path, stages: Stages) -> dict:
    """Candidates, budget, successive halving, front. Returns the record (``winner`` holds the trained model)."""
    stages.start("candidates", f"cut {math.prod(len(v) for v in space.values())} candidates from the teacher and "
                 "time them with it")
    candidates = candidate_shapes(teacher, **space)
    calibration = list(model_batches(rows.select(range(min(recipe.calibration_samples, len(rows)))), collator))
    set_seed(args.seed)
    prepare_candidates(teacher, candidates, calibration, None)
    timed = measure_latency({"teacher": teacher, **{c.name: c.model for c in candidates}}, latency_batch,
                            warmup=max(1, recipe.latency_warmup), repeats=recipe.latency_repeats,
                            threads=recipe.latency_threads, desc="latency of the candidates")
    for c in candidates:
        c.latency_ms = timed[c.name]["median_ms"]
    teacher_ms = timed["teacher"]["median_ms"]
    budget_ms = recipe.max_latency_ms if recipe.latency_budget is None else recipe.latency_budget * teacher_ms
    kept = within_budget(candidates, max_latency_ms=budget_ms, max_parameters=recipe.max_parameters)
    for c in candidates:
        if c not in kept:
            c.model = None  # out of the budget: free it
    stages.end(f"{len(kept)} of {len(candidates)} within the budget")

    stages.start("successive halving", f"{len(kept)} candidates, {recipe.min_steps} steps first, eta {recipe.eta}")
    runs = ShortRuns(recipe, args, rows, validation, collator, tokenizer, out)
    ranked = successive_halving(kept, runs.train, runs.score, min_steps=recipe.min_steps, eta=recipe.eta,
                                rounds=recipe.search_rounds, log=logger.info, tiebreak=runs.tiebreak)
    front = pareto_front(ranked)
    winner = ranked[0]
    stages.end(f"winner {winner.name} after {winner.steps} steps")
    names = {c.name for c in kept}
    table = []
    for c in sorted(candidates, key=lambda c: c.latency_ms):
        row = {**c.row(), "within_budget": c.name in names, "on_front": c in front, **runs.metrics.get(c.name, {})}
        table.append(row)
    return {"candidates": table, "front": [c.name for c in front], "winner": winner, "ranked": ranked,
            "budget": {"latency_budget": recipe.latency_budget, "max_latency_ms": budget_ms,
                       "max_parameters": recipe.max_parameters, "teacher_latency_ms": teacher_ms,
                       "latency": {k: timed["teacher"][k] for k in ("batch_size", "seq_len", "threads", "warmup",
                                                                     "repeats")}},
            "space": space, "histories": runs.histories,
            "settings": {"min_steps": recipe.min_steps, "eta": recipe.eta, "rounds": recipe.search_rounds,
                         "learning_rate": recipe.search_learning_rate, "batch_size": runs.batch,
                         "calibration_samples": min(recipe.calibration_samples, len(rows)),
                         "validation_rows": len(validation), "score": "held-out accuracy (ties: lower held-out KL)"}}


def search_markdown(found: dict) -> str:
    """The search table (every candidate) with the budget and the front."""
    budget = found["budget"]
    lines = [("| candidate | params | latency (ms) | vs teacher | within budget | held-out accuracy | held-out KL | "
              "steps | on the front |"), "| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | --- |"]
    for r in found["candidates"]:
        acc = f"{100 * r['validation_accuracy']:.1f}%" if "validation_accuracy" in r else "-"
        kl = f"{r['validation_kl']:.3f}" if "validation_kl" in r else "-"
        lines.append(f"| {r['name']} | {r['parameters'] / 1e6:.2f}M | {r['latency_ms']:.1f} | "
                     f"{r['latency_ms'] / budget['teacher_latency_ms']:.2f}x | {'yes' if r['within_budget'] else 'no'} "
                     f"| {acc} | {kl} | {r['steps']} | {'yes' if r['on_front'] else ''} |")
    lat = budget["latency"]
    rule = (f"{budget['latency_budget']:g} x the teacher's {budget['teacher_latency_ms']:.0f} ms = "
            if budget["latency_budget"] is not None else "")
    lines += ["", f"Budget: latency <= {rule}{budget['max_latency_ms']:.1f} ms"
              + (f", parameters <= {budget['max_parameters']:,}" if budget["max_parameters"] else "")
              + f" (one batch of {lat['batch_size']} x {lat['seq_len']} tokens, {lat['threads']} CPU thread, median of "
              f"{lat['repeats']} interleaved passes, this machine, this run). Candidates are named "
              "L<layers>-H<heads>-F<FFN width>-D<hidden size>.",
              f"Winner: {found['winner'].name}. Pareto front (held-out accuracy vs latency): "
              + ", ".join(found["front"]) + "."]
    return "\n".join(lines) + "\n"


def plot_search(found: dict, path: Path, tested: dict | None = None) -> Path:
    """Held-out accuracy against latency of every scored candidate, the front joined, the budget as a line."""
    import os

    os.environ.setdefault("MPLBACKEND", "Agg")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5))
    scored = [r for r in found["candidates"] if "validation_accuracy" in r]
    for r in scored:
        ax.scatter(r["latency_ms"], 100 * r["validation_accuracy"], s=20 + 8 * r["rounds"],
                   color="C0" if r["on_front"] else "0.6", zorder=3)
        ax.annotate(f"{r['name']} ({r['steps']} st.)", (r["latency_ms"], 100 * r["validation_accuracy"]),
                    textcoords="offset points", xytext=(4, 4), fontsize=6)
    front = sorted((r for r in scored if r["on_front"]), key=lambda r: r["latency_ms"])
    ax.plot([r["latency_ms"] for r in front], [100 * r["validation_accuracy"] for r in front], "-", color="C0",
            label="Pareto front (held-out accuracy)")
    ax.axvline(found["budget"]["max_latency_ms"], color="C3", linestyle="--", label="latency budget")
    for i, (name, (latency, accuracy)) in enumerate((tested or {}).items()):
        ax.scatter(latency, 100 * accuracy, marker="*", s=140, color=f"C{i + 1}", zorder=4, label=f"{name} (test)")
    ax.set_xlabel(f"CPU latency per batch of {found['budget']['latency']['batch_size']} (ms, one thread)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("student search: accuracy vs latency")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))  # outside: no point hidden
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def distil_winner(recipe, args, winner, rows, collator, tokenizer, out: Path) -> tuple[object, list]:
    """Save the winner as the search left it, then distil it ``--final_epochs`` more (``searched_student/``)."""
    info = {"search_shape": {"layers": winner.layers, "heads": winner.heads, "intermediate": winner.intermediate,
                             "hidden": winner.hidden}, "search_steps": winner.steps}
    save_model(winner.model, tokenizer, out / CHOSEN_DIR, [])
    (out / CHOSEN_DIR / "search_choice.json").write_text(json.dumps(info, indent=1) + "\n")
    if not recipe.final_epochs:
        return winner.model, []
    final_args = dataclasses.replace(args, output_dir=str(out / SEARCHED_DIR), num_train_epochs=recipe.final_epochs,
                                     teacher_name_or_path=None, push_to_hub=False)
    trainer = train_model(winner.model, final_args, rows, collator, tokenizer,
                          resume_settings={"search_shape": winner.name, "search_steps": winner.steps})
    history = trainer.state.log_history
    save_model(winner.model, tokenizer, out / SEARCHED_DIR, history)
    return winner.model, history


def load_task(recipe, args, out: Path, stages: Stages):
    """Data, tokenizer, teacher (ready-made or fine-tuned once), cached teacher logits, the held-out rows.

    Returns a dict: data, tokenizer, collator, label2id, teacher, teacher_dir, teacher_note, train (cached),
    search_rows / validation (the split of it), test, latency_batch."""
    stages.start("data and teacher", "load the data and the teacher, cache its logits on the training split")
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
    saved = out / "teacher"
    if label2id is None and (saved / "config.json").is_file():
        label2id = head_label2id(AutoConfig.from_pretrained(saved), data.labels)
    label2id = label2id or data.label2id
    train_ds, test_ds = tokenize_for_classification(data, tokenizer, max_length=recipe.max_length, label2id=label2id)
    if not 2 <= recipe.validation_size < len(train_ds) - 1:
        raise DataError(f"--validation_size {recipe.validation_size} must leave training rows: the training split "
                        f"has {len(train_ds)}")
    collator = DataCollatorWithPadding(tokenizer)
    teacher, teacher_dir, note = prepare_teacher(recipe, args, teacher_path, data, train_ds, collator, tokenizer,
                                                 label2id, out)
    teacher.eval()
    train_cached = cache_teacher_logits(teacher, train_ds, collator, batch_size=recipe.eval_batch_size,
                                        desc="teacher logits (train)")
    search_rows, validation = stratified_split(train_cached, "labels", recipe.validation_size, seed=args.seed)
    n = min(recipe.latency_batch_size, len(test_ds))
    latency_batch = dict(collator([{k: test_ds[i][k] for k in MODEL_INPUTS if k in test_ds.column_names}
                                   for i in range(n)]))
    stages.end(note)
    return {"data": data, "tokenizer": tokenizer, "collator": collator, "label2id": label2id, "teacher": teacher,
            "teacher_dir": teacher_dir, "teacher_note": note, "teacher_spec": teacher_spec, "train": train_cached,
            "search_rows": search_rows, "validation": validation, "test": test_ds, "latency_batch": latency_batch}


def main(argv: list[str] | None = None) -> dict:
    recipe, args = parse_config_and_args((StudentSearchArguments, DistillationArguments), argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", force=True)
    space = check_search_arguments(recipe)
    if recipe.num_threads:
        torch.set_num_threads(recipe.num_threads)
    out = Path(args.output_dir)
    stages = Stages(total=6)
    task = load_task(recipe, args, out, stages)
    found = search(recipe, args, task["teacher"], space, task["search_rows"], task["validation"],
                   task["latency_batch"], task["collator"], task["tokenizer"], out, stages)
    winner = found["winner"]

    stages.start("chosen student", f"save {winner.name}, distil it {recipe.final_epochs:g} epoch(s) more")
    model, history = distil_winner(recipe, args, winner, task["search_rows"], task["collator"], task["tokenizer"], out)
    stages.end()

    stages.start("evaluation", "the teacher and the searched student on the test split")
    name = f"searched {winner.name}"
    folder = out / (SEARCHED_DIR if recipe.final_epochs else CHOSEN_DIR)
    rows, _, latency = evaluate_models(
        {"teacher": (task["teacher"], task["teacher_dir"]), name: (model, folder)}, task["test"], task["collator"],
        num_labels=len(task["label2id"]), eval_batch_size=recipe.eval_batch_size,
        n_resamples=recipe.bootstrap_resamples, seed=args.seed, latency_batch_size=recipe.latency_batch_size,
        latency_warmup=recipe.latency_warmup, latency_repeats=recipe.latency_repeats,
        latency_threads=recipe.latency_threads)
    stages.end()

    data = task["data"]
    some = next(iter(latency.values()))
    results = {"data": {"source": data.source, "n_train": len(data.train), "n_test": len(data.test),
                        "labels": data.labels, "max_length": recipe.max_length,
                        "search_rows": len(task["search_rows"]), "validation_rows": len(task["validation"])},
               "teacher": task["teacher_spec"], "teacher_note": task["teacher_note"], "models": rows,
               "latency": {k: some[k] for k in ("batch_size", "seq_len", "threads", "warmup", "repeats")},
               "search": {k: v for k, v in found.items() if k not in ("winner", "ranked", "histories")},
               "winner": winner.row(),
               "training": {"temperature": args.temperature, "kd_weight": args.kd_weight, "task_weight": args.task_weight,
                            "final_epochs": recipe.final_epochs, "learning_rate": args.learning_rate,
                            "batch_size": args.per_device_train_batch_size, "seed": args.seed,
                            "torch_threads": torch.get_num_threads()},
               "stages": stages.times, "log_history": {"search": found["histories"], "final": history}}
    results["stages"]["total (incl. imports)"] = {"seconds": round(time.perf_counter() - _START, 1)}
    text = search_markdown(found) + "\n" + results_markdown(results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    (out / "results.md").write_text(text)
    if recipe.plot:
        tested = {r["name"]: (r["latency_ms"], r["accuracy"]) for r in rows if r["name"] != "teacher"}
        plot_search(found, out / "results.png", tested)
    print("\n" + text)
    return results


if __name__ == "__main__":
    from hf_distill.cli import run_with_one_line_errors

    sys.exit(run_with_one_line_errors(lambda argv: main(argv) and 0, sys.argv[1:], Path(__file__).name))
