"""One run, one table: the student forms of a transformer text classifier side by side, distilled from the
same teacher's cached logits on the same rows and measured on the same test split and CPU.

    python recipes/student_architectures.py --config recipes/configs/student_architectures_bbc.yaml

Every key of the YAML file is also a flag; flags override the file. The steps are the other recipes':

1. **Data and teacher** (``recipes/student_search.py``): the teacher's logits cached once over the training
   split; ``--validation_size`` rows held out to score the search. Every student trains on the other rows.
2. **Shallow**: ``--shallow_layers`` of the teacher's layers, distilled ``--num_train_epochs``.
3. **PTQ int8 / QAT int8** of the shallow student (``recipes/quantized_student.py``): post-training dynamic
   int8, and quantization-aware training with the distillation loss exported to real int8.
4. **Narrow**: every teacher layer, width-pruned to ``--narrow_heads`` heads (hidden = heads x head size)
   and ``--narrow_intermediate`` FFN neurons on ``--calibration_samples`` training texts; evaluated as
   pruned (before distillation) and after ``--num_train_epochs`` of distillation (the recovery).
5. **BiLSTM / CNN** (``recipes/efficient_student.py``): built from the teacher's vocabulary and embeddings,
   distilled from its logits only.
6. **Searched** (``recipes/student_search.py``): the latency-budgeted search, its winner distilled
   ``--final_epochs`` more.
7. **Evaluation**: every model on the test split (int8 ones loaded back from disk): accuracy [bootstrap
   CI], parameters, size on disk, latency of one batch interleaved with the teacher on
   ``--latency_threads`` threads; paired differences (narrow after minus before distillation, QAT int8
   minus its fp32 student, searched minus shallow). ``results.json``, ``results.md``, ``results.png``.
"""

from __future__ import annotations

import time

_START = time.perf_counter()

import dataclasses  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from transformers import set_seed  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the other recipes' steps
from efficient_student import (  # noqa: E402
    EfficientShapeArguments,
    check_outputs_only,
    distil_efficient_student,
    efficient_students,
    efficient_training_args,
)
from quantized_student import (  # noqa: E402
    QuantizationArguments,
    check_quantization_arguments,
    train_qat_int8,
)
from student_search import (  # noqa: E402
    StudentSearchArguments,
    check_search_arguments,
    distil_winner,
    load_task,
    model_batches,
    plot_search,
    search,
    search_markdown,
)

from hf_distill.arguments import DistillationArguments  # noqa: E402
from hf_distill.checkpoints import weights_fingerprint  # noqa: E402
from hf_distill.config import parse_config_and_args  # noqa: E402
from hf_distill.quantization import load_int8, quantize_dynamic_int8, save_int8  # noqa: E402
from hf_distill.students import build_student  # noqa: E402
from hf_distill.students.pruning import prune_width  # noqa: E402
from hf_distill.tasks.classification import paired_bootstrap_diff, results_markdown  # noqa: E402
from hf_distill.tasks.classification_recipe import (  # noqa: E402
    Stages,
    evaluate_models,
    parse_layers,
    save_model,
    train_model,
)

logger = logging.getLogger("student_architectures")


@dataclass
class StudentArchitecturesArguments(StudentSearchArguments, QuantizationArguments, EfficientShapeArguments):
    shallow_layers: str = field(default="2", metadata={"help": "The shallow student: a count ('2') or indices ('0,5')."})
    narrow_heads: int = field(default=6, metadata={"help": "The narrow student's attention heads (all layers kept)."})
    narrow_intermediate: int = field(default=768, metadata={"help": "The narrow student's FFN neurons per layer."})


def distil(model, args, folder: Path, rows, collator, tokenizer, settings: dict):
    """Distil ``model`` on the cached rows, save it to ``folder``; returns its log."""
    trainer = train_model(model, dataclasses.replace(args, output_dir=str(folder), teacher_name_or_path=None,
                                                     push_to_hub=False), rows, collator, tokenizer,
                          resume_settings=settings)
    history = trainer.state.log_history
    save_model(model, tokenizer, folder, history)
    return history


def architectures_markdown(results: dict) -> str:
    """The table (what each student is, then the measurements) and the paired differences."""
    what = results["forms"]
    lines = ["| student form | model | params | size on disk | accuracy [95% CI] | latency / batch | vs teacher |",
             "| --- | --- | ---: | ---: | --- | ---: | ---: |"]
    for r in results["models"]:
        lo, hi = r["accuracy_ci"]
        lines.append(f"| {what.get(r['name'], '')} | {r['name']} | {r['params'] / 1e6:.1f}M | "
                     f"{r['size_bytes'] / 2 ** 20:.1f} MiB | {100 * r['accuracy']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}] "
                     f"| {r['latency_ms']:.1f} ms | {r['latency_ratio']:.2f}x |")
    text = "\n".join(lines) + "\n\n"
    for key, c in results["comparisons"].items():
        text += f"- {key}: {100 * c['diff']:+.1f} points [{100 * c['low']:+.1f}, {100 * c['high']:+.1f}] (paired bootstrap, 95%)\n"
    return text


def main(argv: list[str] | None = None) -> dict:
    recipe, args = parse_config_and_args((StudentArchitecturesArguments, DistillationArguments), argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", force=True)
    space = check_search_arguments(recipe)
    check_quantization_arguments(recipe)
    check_outputs_only(args)
    kinds, configs = efficient_students(recipe, allow_none=True)
    shallow_spec = parse_layers(recipe.shallow_layers)
    if recipe.num_threads:
        torch.set_num_threads(recipe.num_threads)
    out = Path(args.output_dir)
    stages = Stages(total=8 + len(kinds))
    task = load_task(recipe, args, out, stages)
    teacher, tokenizer, collator = task["teacher"], task["tokenizer"], task["collator"]
    rows, test_ds = task["search_rows"], task["test"]
    settings = {"max_length": recipe.max_length, "split_seed": recipe.split_seed,
                "validation_size": recipe.validation_size, "teacher_weights": weights_fingerprint(teacher)}
    models, forms, histories = {"teacher": (teacher, task["teacher_dir"])}, {"teacher": "the teacher (fp32)"}, {}

    stages.start("shallow", f"distil teacher layers {recipe.shallow_layers} (all neurons kept)")
    set_seed(args.seed)
    shallow = build_student(teacher, tokenizer=tokenizer, **shallow_spec)
    shallow_name = f"shallow ({shallow.config.num_hidden_layers} layers)"
    histories["shallow"] = distil(shallow, args, out / "shallow", rows, collator, tokenizer,
                                  {**settings, "student_layers": recipe.shallow_layers})
    models[shallow_name], forms[shallow_name] = (shallow, out / "shallow"), "fewer layers"
    stages.end()

    stages.start("quantized", "PTQ dynamic int8 and QAT int8 of the shallow student")
    save_int8(quantize_dynamic_int8(shallow, backend=recipe.backend), out / "ptq_int8", tokenizer)
    histories["qat"], qat_export = train_qat_int8(recipe, args, shallow, rows, collator, tokenizer, out / "qat_int8",
                                                  {**settings, "student_layers": recipe.shallow_layers}, test_ds)
    models["PTQ int8 (shallow)"] = (load_int8(out / "ptq_int8"), out / "ptq_int8")
    models["QAT int8 (shallow)"] = (load_int8(out / "qat_int8"), out / "qat_int8")
    forms["PTQ int8 (shallow)"] = "quantized: post-training dynamic int8"
    forms["QAT int8 (shallow)"] = "quantized: QAT with the distillation loss, int8"
    stages.end()

    stages.start("narrow", f"prune every layer to {recipe.narrow_heads} heads / {recipe.narrow_intermediate} FFN "
                 "neurons, then distil")
    calibration = list(model_batches(rows.select(range(min(recipe.calibration_samples, len(rows)))), collator))
    narrow, info = prune_width(teacher, calibration, heads=recipe.narrow_heads, intermediate=recipe.narrow_intermediate)
    save_model(narrow, tokenizer, out / "narrow_pruned", [])
    (out / "narrow_pruned" / "width_pruning.json").write_text(json.dumps(info, indent=1) + "\n")
    pruned = type(narrow).from_pretrained(out / "narrow_pruned").eval()  # before distillation
    counts = info["width_pruning"]
    narrow_name = f"narrow ({counts['heads']} heads, FFN {counts['intermediate']}, hidden {counts['hidden']})"
    set_seed(args.seed)
    histories["narrow"] = distil(narrow, args, out / "narrow", rows, collator, tokenizer,
                                 {**settings, "narrow_heads": recipe.narrow_heads,
                                  "narrow_intermediate": recipe.narrow_intermediate})
    models["narrow, pruned only"], forms["narrow, pruned only"] = (pruned, out / "narrow_pruned"), \
        "fewer neurons: pruned, before distillation"
    models[narrow_name], forms[narrow_name] = (narrow, out / "narrow"), "fewer neurons: pruned, then distilled"
    stages.end()

    efficient_args = efficient_training_args(recipe, args)
    for kind in kinds:
        stages.start(kind, f"distil the teacher into a {kind} student")
        student, _, state = distil_efficient_student(efficient_args, kind, configs[kind], teacher, tokenizer, rows,
                                                     collator, out / kind, embedding_init=recipe.embedding_init)
        name = f"{'BiLSTM' if kind == 'bilstm' else 'CNN'} ({kind})"
        models[name], forms[name], histories[kind] = (student, out / kind), "efficient operations", state.log_history
        stages.end()

    found = search(recipe, args, teacher, space, rows, task["validation"], task["latency_batch"], collator,
                   tokenizer, out, stages)
    winner = found["winner"]
    stages.start("searched", f"distil the search's winner {winner.name} {recipe.final_epochs:g} epoch(s) more")
    searched, histories["searched"] = distil_winner(recipe, args, winner, rows, collator, tokenizer, out)
    searched_name = f"searched {winner.name}"
    folder = out / ("searched_student" if recipe.final_epochs else "chosen_student")
    models[searched_name], forms[searched_name] = (searched, folder), "searched under the latency budget"
    stages.end()

    stages.start("evaluation", "every model on the test split, latency interleaved on this CPU")
    rows_out, correct, latency = evaluate_models(
        models, test_ds, collator, num_labels=len(task["label2id"]), eval_batch_size=recipe.eval_batch_size,
        n_resamples=recipe.bootstrap_resamples, seed=args.seed, latency_batch_size=recipe.latency_batch_size,
        latency_warmup=recipe.latency_warmup, latency_repeats=recipe.latency_repeats,
        latency_threads=recipe.latency_threads, reference="teacher")
    shallow_params = next(r["params"] for r in rows_out if r["name"] == shallow_name)
    for r in rows_out:  # int8 modules hold no nn.Parameter: count the fp32 student's architecture
        if "int8" in r["name"]:
            r["params"] = shallow_params
    pairs = {f"{narrow_name} minus narrow, pruned only": (narrow_name, "narrow, pruned only"),
             f"QAT int8 (shallow) minus {shallow_name}": ("QAT int8 (shallow)", shallow_name),
             f"{searched_name} minus {shallow_name}": (searched_name, shallow_name)}
    comparisons = {key: paired_bootstrap_diff(correct[a], correct[b], n_resamples=recipe.bootstrap_resamples,
                                              seed=args.seed) for key, (a, b) in pairs.items()}
    stages.end()

    data, some = task["data"], next(iter(latency.values()))
    results = {"data": {"source": data.source, "n_train": len(data.train), "n_test": len(data.test),
                        "labels": data.labels, "max_length": recipe.max_length, "student_rows": len(rows),
                        "validation_rows": len(task["validation"])},
               "teacher": task["teacher_spec"], "teacher_note": task["teacher_note"], "models": rows_out,
               "forms": forms, "comparisons": comparisons, "qat_export": qat_export,
               "narrow": info["width_pruning"] | {"kept_hidden": None, "kept_heads": None, "kept_neurons": None},
               "latency": {k: some[k] for k in ("batch_size", "seq_len", "threads", "warmup", "repeats")},
               "search": {k: v for k, v in found.items() if k not in ("winner", "ranked", "histories")},
               "winner": winner.row(),
               "training": {"temperature": args.temperature, "kd_weight": args.kd_weight, "task_weight": args.task_weight,
                            "epochs": args.num_train_epochs, "learning_rate": args.learning_rate,
                            "qat_epochs": recipe.qat_epochs, "efficient_epochs": recipe.efficient_epochs,
                            "final_epochs": recipe.final_epochs, "batch_size": args.per_device_train_batch_size,
                            "seed": args.seed, "torch_threads": torch.get_num_threads()},
               "stages": stages.times, "log_history": histories}
    results["stages"]["total (incl. imports)"] = {"seconds": round(time.perf_counter() - _START, 1)}
    text = (architectures_markdown(results) + "\n" + results_markdown({**results, "comparisons": {}})
            + "\n## Search\n\n" + search_markdown(found))
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    (out / "results.md").write_text(text)
    if recipe.plot:
        tested = {r["name"]: (r["latency_ms"], r["accuracy"]) for r in rows_out if r["name"] != "teacher"}
        plot_search(found, out / "results.png", tested)
    print("\n" + text)
    return results


if __name__ == "__main__":
    from hf_distill.cli import run_with_one_line_errors

    sys.exit(run_with_one_line_errors(lambda argv: main(argv) and 0, sys.argv[1:], Path(__file__).name))
