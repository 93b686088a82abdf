"""Deep-to-shallow self-distillation: early exits taught by the model's own final output.

    python recipes/early_exits.py --config recipes/configs/early_exits_bbc.yaml

Every key of the YAML file is also a flag, and flags override the file.

Stages:

1. **Model.** A classifier for the data's labels: ``--model`` when it already has a head for
   them, else the one a previous run saved in ``output_dir/model``, else ``--model`` fine-tuned
   with cross-entropy (``--finetune_*``) and saved there.
2. **Exits.** An ``exit_kl`` term per layer of ``--exit_layers`` (each logged on its own,
   ``loss_exit<L>``): a copy of the model's head on that layer's hidden state, trained on the
   model's own final soft targets at ``--temperature`` (x T^2), plus ``--exit_ce_weight`` x the
   cross-entropy on the labels. With ``--train_backbone false`` (the default) the model is frozen:
   only the heads train and its own output does not change. With ``true`` the model and its exits
   train together (``--task_weight`` keeps its own head on the labels). The model and its heads
   are saved to ``output_dir/model_with_exits`` (``exit_heads.safetensors`` + ``exit_heads.json``
   next to the model). With ``--use_peft true`` (and ``--train_backbone true``) the backbone trains as
   LoRA adapters (its own head frozen), saved in ``model_with_exits/adapter`` and merged into the saved
   model; ``--export_exit_layer L`` also writes ``output_dir/exit_<L>``, a plain
   transformers model of the first L layers with that exit as its head.
3. **Evaluation.** Reloaded from disk: accuracy [bootstrap interval], macro-F1, the accuracy
   difference to the full model (paired bootstrap) and the share of answers it agrees with, for
   every exit, from one pass over the test split; then the CPU latency of a batch exiting at each
   layer (only the layers below the exit run), measured in this run, interleaved, on
   ``--latency_threads`` threads. Written to ``results.json`` and ``results.md``.

Data: as ``recipes/text_classification.py`` (``--source bbc_news``, ``--dataset_name`` or
``--train_file`` / ``--test_file``).
"""

from __future__ import annotations

import time

_START = time.perf_counter()  # the run's wall time includes the imports below

import dataclasses  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
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
from hf_distill.config import parse_config_and_args  # noqa: E402
from hf_distill.tasks.recipe_arguments import (  # noqa: E402
    ClassificationDataArguments,
    ClassificationEvaluationArguments,
)
from hf_distill.early_exit import (  # noqa: E402
    EarlyExitModel,
    export_exit_model,
    predict_exit_logits,
    run_parameters,
    save_exit_heads,
)
from hf_distill.modeling import num_layers  # noqa: E402
from hf_distill.objectives.exits import HEAD_CHOICES, POOLINGS, exit_layers  # noqa: E402
from hf_distill.tasks.classification import (  # noqa: E402
    DataError,
    classification_metrics,
    label_counts,
    load_classification_data,
    measure_latency,
    paired_bootstrap_diff,
    size_on_disk,
    tokenize_for_classification,
)
from hf_distill.students.peft_students import PeftArguments, apply_peft  # noqa: E402
from hf_distill.tasks.classification_recipe import Stages, head_label2id, resolve_model_path  # noqa: E402
from hf_distill.teachers import load_teacher  # noqa: E402


logger = logging.getLogger("early_exits")

MODEL_DIR, EXITS_DIR = "model", "model_with_exits"


@dataclass
class EarlyExitArguments(ClassificationDataArguments, ClassificationEvaluationArguments):
    model: str | None = field(
        default=None,
        metadata={"help": "The classifier to add exits to: a folder, Hub id or package:<module>. Without a head for "
                          "the data's labels it is fine-tuned first (saved to output_dir/model)."},
    )
    # ---- data
    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset name (or a local dataset folder)."})
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration."})
    train_split: str = field(default="train")
    test_split: str = field(default="test")
    text_pair_column: str | None = field(default=None)
    # ---- stage 1: fine-tuning (only when the model has no head for these labels)
    finetune_epochs: float = field(default=1.0)
    finetune_learning_rate: float = field(default=1e-4)
    finetune_batch_size: int = field(default=16)
    finetune_warmup: float = field(default=0.1, metadata={"help": "Warm-up: a fraction of the steps (< 1) or a count."})
    finetune_weight_decay: float = field(default=0.01)
    retrain_model: bool = field(default=False, metadata={"help": "Fine-tune again even if output_dir/model exists."})
    # ---- stage 2: exits
    exit_layers: str | None = field(
        default=None, metadata={"help": "Layers that get an exit, e.g. '1,2,3' (default: every layer below the last)."})
    exit_head: str = field(default="auto", metadata={"help": "auto / copy (the model's own head) / linear."})
    exit_pooling: str | None = field(
        default=None, metadata={"help": "What the heads read: cls (the first token, default) or mean (over tokens)."})
    exit_ce_weight: float = field(default=0.0, metadata={"help": "Weight of each exit's cross-entropy on the labels."})
    train_backbone: bool = field(
        default=False, metadata={"help": "Train the model with its exits (else it is frozen and only the heads learn)."})
    export_exit_layer: int | None = field(
        default=None, metadata={"help": "Also save a plain transformers model of the first L layers + exit L."})
    # ---- evaluation


# ---------------------------------------------------------------------------------------------- stages
def finetune(recipe: EarlyExitArguments, args, model_path: str, label2id: dict, train_ds, collator, tokenizer,
             folder: Path):
    """Fine-tune ``model_path`` with a new head for ``label2id`` on cross-entropy; save it to ``folder``."""
    set_seed(args.seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        model_path, num_labels=len(label2id), id2label={i: n for n, i in label2id.items()}, label2id=label2id,
        ignore_mismatched_sizes=True)
    warmup = recipe.finetune_warmup
    targs = TrainingArguments(
        output_dir=str(folder.parent / "finetune_checkpoints"), learning_rate=recipe.finetune_learning_rate,
        num_train_epochs=recipe.finetune_epochs, per_device_train_batch_size=recipe.finetune_batch_size,
        warmup_steps=warmup if warmup < 1 else int(warmup), weight_decay=recipe.finetune_weight_decay,
        lr_scheduler_type=args.lr_scheduler_type, logging_steps=args.logging_steps, save_strategy="no",
        seed=args.seed, report_to="none", use_cpu=args.use_cpu, disable_tqdm=args.disable_tqdm,
        dataloader_num_workers=args.dataloader_num_workers)
    trainer = Trainer(model=model, args=targs, train_dataset=train_ds, data_collator=collator,
                      processing_class=tokenizer)
    trainer.train()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    (folder / "training_log.json").write_text(json.dumps(trainer.state.log_history, indent=1) + "\n")
    try:
        (folder.parent / "finetune_checkpoints").rmdir()  # only if the Trainer left nothing in it
    except OSError:
        pass
    return model, trainer.state.log_history


def exit_terms(recipe: EarlyExitArguments, args, layers: list[int]) -> list[dict]:
    """One ``exit_kl`` term per layer, so that each exit's loss is logged on its own."""
    terms = []
    for layer in layers:
        term = {"loss": "exit_kl", "layers": [layer], "temperature": args.temperature,
                "ce_weight": recipe.exit_ce_weight, "head": recipe.exit_head, "detach": not recipe.train_backbone}
        if recipe.exit_pooling:
            term["pooling"] = recipe.exit_pooling
        terms.append(term)
    return terms


def train_exits(recipe, args, model, layers, train_ds, collator, tokenizer, folder: Path):
    """Train the exits; save the model (a LoRA model: its adapters in ``adapter/``, merged) and its heads.
    Returns the log and the model ``folder`` holds."""
    from hf_distill.students.peft_students import save_student
    from hf_distill.trainer import DistillationTrainer

    exit_args = dataclasses.replace(
        args, output_dir=str(folder), teacher_name_or_path=None, push_to_hub=False,
        distillation=json.dumps(exit_terms(recipe, args, layers)),
        task_weight=args.task_weight if recipe.train_backbone else 0.0)
    if not recipe.train_backbone:
        model.requires_grad_(False)  # no graph through the frozen backbone: only the heads learn
    set_seed(args.seed)
    trainer = DistillationTrainer(model=model, args=exit_args, train_dataset=train_ds, data_collator=collator,
                                  processing_class=tokenizer)
    trainer.train()
    if hasattr(model, "merge_and_unload"):  # LoRA: adapters in adapter/, the merged model next to them
        model = save_student(model, folder)
    else:
        model.requires_grad_(True)
        trainer.save_model(str(folder))  # the model alone ...
    save_exit_heads(trainer, folder, model)  # ... and, asked for, its exit heads next to it
    return trainer.state.log_history, model


def evaluate_exits(recipe, args, folder: Path, test_ds, collator, n_labels: int) -> tuple[list[dict], dict]:
    """Accuracy and latency of every exit of the model saved in ``folder`` (reloaded from disk)."""
    exiting = EarlyExitModel.from_pretrained(folder)
    model, heads = exiting.model, {int(k): v for k, v in exiting.heads.items()}
    total = num_layers(model)
    references = np.asarray(test_ds["labels"])
    logits = predict_exit_logits(model, heads, test_ds, collator, batch_size=recipe.eval_batch_size,
                                 desc="test: every exit")
    final_pred = logits[total].argmax(-1)
    final_correct = (final_pred == references).astype(float)
    rows = []
    for layer, values in logits.items():
        metrics = classification_metrics(values, references, num_labels=n_labels,
                                         n_resamples=recipe.bootstrap_resamples, seed=args.seed)
        predictions = np.asarray(metrics.pop("predictions"))
        correct = (predictions == references).astype(float)
        row = {"name": f"exit {layer}" if layer < total else f"full model ({total} layers)", "exit_layer": layer,
               "layers_run": layer, "params_run": run_parameters(model, heads, layer), **metrics,
               "agreement_with_full": float(np.mean(predictions == final_pred))}
        if layer < total:
            row["minus_full"] = paired_bootstrap_diff(correct, final_correct, n_resamples=recipe.bootstrap_resamples,
                                                      seed=args.seed)
        rows.append(row)
    n = min(recipe.latency_batch_size, len(test_ds))
    names = [c for c in ("input_ids", "attention_mask", "token_type_ids") if c in test_ds.column_names]
    batch = dict(collator([{k: test_ds[i][k] for k in names} for i in range(n)]))
    runners = {row["name"]: EarlyExitModel(model, heads, exit_layer=row["exit_layer"]).eval() for row in rows}
    latency = measure_latency(runners, batch, warmup=recipe.latency_warmup, repeats=recipe.latency_repeats,
                              threads=recipe.latency_threads, desc="latency per exit")
    full = latency[rows[-1]["name"]]["median_ms"]
    for row in rows:
        lat = latency[row["name"]]
        row.update(latency_ms=lat["median_ms"], latency_iqr_ms=[lat["q1_ms"], lat["q3_ms"]],
                   latency_ratio=lat["median_ms"] / full)
    some = next(iter(latency.values()))
    return rows, {k: some[k] for k in ("batch_size", "seq_len", "threads", "warmup", "repeats")}


def _count(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e3 else str(n)


def results_markdown(results: dict) -> str:
    """The per-exit table, then the settings of the measurement."""
    conf = int(round(100 * results["exits"][0].get("confidence", 0.95)))
    lines = [f"| exit after layer | params run | accuracy [{conf}% CI] | macro-F1 | minus full model [{conf}% CI] | "
             "agrees with full | latency / batch | vs full |",
             "| ---: | ---: | --- | ---: | --- | ---: | ---: | ---: |"]
    for r in results["exits"]:
        lo, hi = r["accuracy_ci"]
        diff = r.get("minus_full")
        diff_text = (f"{100 * diff['diff']:+.1f} [{100 * diff['low']:+.1f}, {100 * diff['high']:+.1f}]"
                     if diff else "-")
        lines.append(f"| {r['exit_layer']}{'' if diff else ' (full)'} | {_count(r['params_run'])} | "
                     f"{100 * r['accuracy']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}] | {100 * r['macro_f1']:.1f} | "
                     f"{diff_text} | {100 * r['agreement_with_full']:.1f}% | {r['latency_ms']:.1f} ms | "
                     f"{r['latency_ratio']:.2f}x |")
    data, lat, training = results["data"], results["latency"], results["training"]
    text = "\n".join(lines) + "\n\n"
    text += (f"Data: {data['source']}, {data['n_train']} train / {data['n_test']} test examples, "
             f"{len(data['labels'])} labels, max {data['max_length']} tokens. Model: {results['model']}.\n")
    text += (f"Exits: {training['exit_head']} heads trained {training['epochs']:g} epoch(s) on the model's own soft "
             f"targets at T = {training['temperature']:g} (+ {training['exit_ce_weight']:g} x cross-entropy), "
             f"backbone {'trained with them' if training['train_backbone'] else 'frozen'}.\n")
    text += (f"Latency: median of {lat['repeats']} forward passes after {lat['warmup']} warm-up, one batch of "
             f"{lat['batch_size']} x {lat['seq_len']} tokens, {lat['threads']} CPU thread"
             f"{'s' if lat['threads'] != 1 else ''}, the exits interleaved, measured in this run; an exit runs only "
             "the layers below it.\n")
    text += "\n| stage | wall time |\n| --- | ---: |\n"
    for name, info in results["stages"].items():
        note = f" ({info['note']})" if info.get("note") else ""
        text += f"| {name}{note} | {info['seconds']:.0f} s |\n"
    return text


def write_results(results: dict, out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "markdown": out / "results.md"}
    paths["json"].write_text(json.dumps(results, indent=2, default=str) + "\n")
    paths["markdown"].write_text(results_markdown(results))
    return paths


# ---------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict:
    recipe, args, peft_args = parse_config_and_args((EarlyExitArguments, DistillationArguments, PeftArguments), argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", force=True)
    if recipe.num_threads:
        torch.set_num_threads(recipe.num_threads)
    out = Path(args.output_dir)
    stages = Stages(total=5)

    # ------------------------------------------------------------------ data and every check before training
    stages.start("data", "load and check the data, tokenize")
    spec = recipe.model or args.teacher_name_or_path
    if not spec:
        raise DataError("no model given: set --model (a folder, a Hub id, or package:<module>)")
    if recipe.exit_head not in HEAD_CHOICES:
        raise ValueError(f"--exit_head must be one of {', '.join(HEAD_CHOICES)}, got {recipe.exit_head!r}")
    if recipe.exit_pooling not in (None, *POOLINGS):
        raise ValueError(f"--exit_pooling must be 'cls' or 'mean', got {recipe.exit_pooling!r}")
    if peft_args.use_peft and not recipe.train_backbone:
        raise ValueError("--use_peft trains LoRA adapters on the backbone, but with --train_backbone false the backbone "
                         "is frozen and only the exit heads learn: add --train_backbone true, or drop --use_peft")
    if peft_args.use_peft and not peft_args.merge_adapters:
        raise ValueError("the exits are evaluated on the merged model: --use_peft needs --merge_adapters true here "
                         "(the adapters are saved in model_with_exits/adapter either way)")
    if not recipe.exit_ce_weight >= 0:
        raise ValueError(f"--exit_ce_weight must be >= 0, got {recipe.exit_ce_weight}")
    if recipe.export_exit_layer is not None and recipe.exit_head == "linear":
        raise ValueError("--export_exit_layer needs copied heads (--exit_head auto or copy): a linear exit head has "
                         "no place in the model's own classes")
    if recipe.export_exit_layer is not None and recipe.exit_pooling == "mean":
        raise ValueError("--export_exit_layer needs --exit_pooling cls: the model's own head reads the first token, "
                         "not the mean over tokens")
    data = load_classification_data(
        source=recipe.source, dataset_name=recipe.dataset_name, dataset_config=recipe.dataset_config,
        train_file=recipe.train_file, test_file=recipe.test_file, train_split=recipe.train_split,
        test_split=recipe.test_split, text_column=recipe.text_column, text_pair_column=recipe.text_pair_column,
        label_column=recipe.label_column, test_size=recipe.test_size, seed=recipe.split_seed,
        max_train_samples=recipe.max_train_samples, max_test_samples=recipe.max_test_samples)
    logger.info("data %s: %d train, %d test, labels %s", data.source, len(data.train), len(data.test),
                label_counts(data.train, data.label_column))
    model_path = resolve_model_path(spec)
    config = AutoConfig.from_pretrained(model_path)
    layers = exit_layers(recipe.exit_layers, num_layers(config), "--exit_layers")
    if recipe.export_exit_layer is not None and recipe.export_exit_layer not in layers:
        raise ValueError(f"--export_exit_layer {recipe.export_exit_layer} has no exit; choose one of --exit_layers "
                         f"{layers}")
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    label2id = head_label2id(config, data.labels)
    saved = out / MODEL_DIR
    ready = label2id is not None and not recipe.retrain_model
    if not ready and not recipe.retrain_model and (saved / "config.json").is_file():
        label2id = head_label2id(AutoConfig.from_pretrained(saved), data.labels)
        ready_saved = label2id is not None
    else:
        ready_saved = False
    label2id = label2id or data.label2id
    train_ds, test_ds = tokenize_for_classification(data, tokenizer, max_length=recipe.max_length, label2id=label2id)
    collator = DataCollatorWithPadding(tokenizer)
    stages.end()

    # ------------------------------------------------------------------ stage 1: a classifier for these labels
    stages.start("model", "a classifier for these labels")
    history: dict[str, list] = {}
    if ready:
        model, note = load_teacher(model_path, task="sequence_classification"), "reused: it classifies these labels"
    elif ready_saved:
        model, note = load_teacher(saved, task="sequence_classification"), f"reused: found the classifier in {saved}"
    else:
        model, history["fine-tuning"] = finetune(recipe, args, model_path, label2id, train_ds, collator, tokenizer,
                                                 saved)
        note = None
    stages.end(note)

    # ------------------------------------------------------------------ stage 2: exits
    stages.start("exits", f"exits after layers {layers}, taught by the model's own output")
    if peft_args.use_peft:  # the backbone adapts through LoRA; its own head stays as it is (the exits copy it)
        set_seed(args.seed)
        model = apply_peft(model, peft_args, train_heads=False)
    history["exits"], model = train_exits(recipe, args, model, layers, train_ds, collator, tokenizer, out / EXITS_DIR)
    tokenizer.save_pretrained(str(out / EXITS_DIR))
    exported = None
    if recipe.export_exit_layer is not None:
        heads = EarlyExitModel.from_pretrained(out / EXITS_DIR).heads
        exported = out / f"exit_{recipe.export_exit_layer}"
        export_exit_model(model, {int(k): v for k, v in heads.items()}, recipe.export_exit_layer, exported,
                          tokenizer=tokenizer)
    stages.end()

    # ------------------------------------------------------------------ stage 3: evaluation
    stages.start("evaluation", "accuracy of every exit, latency of exiting at each layer")
    rows, latency = evaluate_exits(recipe, args, out / EXITS_DIR, test_ds, collator, len(label2id))
    stages.end()

    stages.start("report", "results.json, results.md")
    results = {
        "data": {"source": data.source, "n_train": len(data.train), "n_test": len(data.test), "labels": data.labels,
                 "max_length": recipe.max_length},
        "model": spec,
        "exits": rows,
        "latency": latency,
        "saved": {"model_with_exits": str(out / EXITS_DIR), "size_bytes": size_on_disk(out / EXITS_DIR),
                  **({"exported": str(exported), "exported_size_bytes": size_on_disk(exported)} if exported else {})},
        "training": {"exit_layers": layers, "exit_head": recipe.exit_head, "exit_ce_weight": recipe.exit_ce_weight,
                     "temperature": args.temperature, "train_backbone": recipe.train_backbone,
                     "task_weight": args.task_weight if recipe.train_backbone else 0.0,
                     "epochs": args.num_train_epochs, "learning_rate": args.learning_rate,
                     "batch_size": args.per_device_train_batch_size, "seed": args.seed,
                     "torch_threads": torch.get_num_threads()},
        "stages": stages.times,
        "log_history": history,
    }
    stages.end()
    results["stages"]["total (incl. imports)"] = {"seconds": round(time.perf_counter() - _START, 1)}
    paths = write_results(results, out)
    print("\n" + results_markdown(results))
    logger.info("wrote %s, %s", paths["json"], paths["markdown"])
    return results


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as exc:
        if os.environ.get("HF_DISTILL_TRACEBACK"):
            raise
        print(f"{Path(__file__).name}: error: {exc}", file=sys.stderr)  # bad input: one line, what to change
        sys.exit(2)
