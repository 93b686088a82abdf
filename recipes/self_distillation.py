"""Online and self-distillation of a small text classifier, each against the same model trained alone.

    python recipes/self_distillation.py --config recipes/configs/self_distillation_mutual_bbc.yaml
    python recipes/self_distillation.py --config recipes/configs/self_distillation_ema_bbc.yaml

``--scheme`` chooses the teacher source (``hf_distill.sources``):

* ``mutual``: deep mutual learning (``--teacher_source peer --peer_mode mutual``): a student built from
  the encoder's layers ``--student_layers`` and a peer built from ``--peer_layers`` train together,
  each distilling from the other's detached outputs. Compared with each of them trained alone.
* ``ema``: the student distils from an exponential moving average of itself (``--ema_decay``), updated
  after each optimiser step. Compared with the same student trained with cross-entropy only; the EMA
  model is evaluated too.
* ``snapshot``: born-again networks, one generation per epoch (the student of the previous epoch
  teaches the next; needs at least 2 epochs). Compared with the same student trained alone.

Every student starts from the encoder's layers (``--init_from``: a Hub id, folder or
``package:<module>``) with a new classification head; the models trained alone start from the same
weights and take the same steps, seed and learning-rate schedule, with cross-entropy only. Written to
``results.json`` / ``results.md``: accuracy [95% bootstrap CI], macro-F1, parameters, latency, and the
paired difference of each distilled model vs its model trained alone [95% CI].

With ``--use_peft true`` every model (student, peer and the models trained alone) trains as LoRA adapters
with the same initial adapters (and its classifier in full); each is saved as ``adapter/`` and merged.
The EMA teacher and the snapshots follow the trainable weights, i.e. the adapters and the classifier.
"""

from __future__ import annotations

import time

_START = time.perf_counter()  # the run's wall time includes the imports below

import copy  # noqa: E402
import dataclasses  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, set_seed  # noqa: E402

from hf_distill.arguments import DistillationArguments  # noqa: E402
from hf_distill.config import parse_config_and_args  # noqa: E402
from hf_distill.tasks.recipe_arguments import (  # noqa: E402
    ClassificationDataArguments,
    ClassificationEvaluationArguments,
)
from hf_distill.modeling import unwrap  # noqa: E402
from hf_distill.students import build_student  # noqa: E402
from hf_distill.students.peft_students import PeftArguments, apply_peft  # noqa: E402
from hf_distill.tasks.classification import (  # noqa: E402
    DataError,
    load_classification_data,
    paired_bootstrap_diff,
    tokenize_for_classification,
)
from hf_distill.tasks.classification_recipe import (  # noqa: E402
    Stages,
    evaluate_models,
    parse_layers,
    resolve_model_path,
    save_model,
    train_model,
)
from hf_distill.tasks.recipe_arms import interval_goals, write_recipe_results  # noqa: E402

logger = logging.getLogger("self_distillation")

SCHEMES = ("mutual", "ema", "snapshot")
SCHEME_SOURCES = {"mutual": "peer", "ema": "ema", "snapshot": "snapshot"}
DISTILLED_NAMES = {"mutual": ("student (mutual)", "peer (mutual)"), "ema": ("student (EMA teacher)",),
                   "snapshot": ("student (born-again)",)}


@dataclass
class SelfDistillationArguments(ClassificationDataArguments, ClassificationEvaluationArguments):
    scheme: str = field(default="mutual", metadata={"help": "mutual (peer), ema or snapshot.", "choices": SCHEMES})
    init_from: str | None = field(
        default=None, metadata={"help": "Encoder whose layers start the students: Hub id, folder or package:<module>."})
    student_layers: str = field(default="0,5", metadata={"help": "Encoder layers copied into the student."})
    peer_layers: str = field(default="1,4", metadata={"help": "scheme=mutual: encoder layers copied into the peer."})
    # ---- data (as recipes/text_classification.py)
    dataset_name: str | None = field(default=None)
    dataset_config: str | None = field(default=None)
    text_pair_column: str | None = field(default=None)
    # ---- evaluation


def check_scheme(recipe, args) -> None:
    """Refuse settings the scheme cannot use, before anything loads."""
    if recipe.scheme not in SCHEMES:
        raise ValueError(f"--scheme must be one of {', '.join(SCHEMES)}, got {recipe.scheme!r}")
    if not recipe.init_from:
        raise DataError("no encoder to start from: set --init_from (a Hub id, a folder, or package:<module>)")
    if args.teacher_source not in ("auto", SCHEME_SOURCES[recipe.scheme]):
        raise ValueError(f"--scheme {recipe.scheme} uses --teacher_source {SCHEME_SOURCES[recipe.scheme]}; "
                         f"drop --teacher_source {args.teacher_source}")
    if args.teacher_name_or_path:
        raise ValueError("this recipe trains its own teachers (peers, EMA, snapshots); drop --teacher_name_or_path")
    if args.kd_weight <= 0:
        raise ValueError(f"--kd_weight must be above 0 (it weighs the distillation term), got {args.kd_weight}")
    if recipe.scheme == "snapshot" and (args.max_steps > 0 or args.num_train_epochs < 2):
        raise ValueError("--scheme snapshot needs at least 2 epochs (--num_train_epochs 2, no --max_steps): the "
                         "first epoch has no earlier generation to learn from")


def new_student(encoder, layers: str, tokenizer):
    return build_student(encoder, tokenizer=tokenizer, **parse_layers(layers))


def main(argv: list[str] | None = None) -> dict:
    recipe, args, peft_args = parse_config_and_args((SelfDistillationArguments, DistillationArguments, PeftArguments),
                                                    argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", force=True)
    check_scheme(recipe, args)
    if recipe.num_threads:
        torch.set_num_threads(recipe.num_threads)
    out, scheme = Path(args.output_dir), recipe.scheme
    stages = Stages(total=4)

    stages.start("data", "load and check the data, tokenize")
    data = load_classification_data(
        source=recipe.source, dataset_name=recipe.dataset_name, dataset_config=recipe.dataset_config,
        train_file=recipe.train_file, test_file=recipe.test_file, text_column=recipe.text_column,
        text_pair_column=recipe.text_pair_column, label_column=recipe.label_column, test_size=recipe.test_size,
        seed=recipe.split_seed, max_train_samples=recipe.max_train_samples, max_test_samples=recipe.max_test_samples)
    layer_specs = {"student": parse_layers(recipe.student_layers)}
    if scheme == "mutual":
        layer_specs["peer"] = parse_layers(recipe.peer_layers)
    init_path = resolve_model_path(recipe.init_from)
    tokenizer = AutoTokenizer.from_pretrained(init_path)
    train_ds, test_ds = tokenize_for_classification(data, tokenizer, max_length=recipe.max_length)
    collator = DataCollatorWithPadding(tokenizer)
    set_seed(args.seed)
    encoder = AutoModelForSequenceClassification.from_pretrained(
        init_path, num_labels=len(data.labels), id2label=data.id2label, label2id=data.label2id,
        ignore_mismatched_sizes=True)
    student = new_student(encoder, recipe.student_layers, tokenizer)
    peer = new_student(encoder, recipe.peer_layers, tokenizer) if scheme == "mutual" else None
    del encoder
    if peft_args.use_peft:  # LoRA students; each model alone gets the same initial adapters as its distilled twin
        set_seed(args.seed)
        student = apply_peft(student, peft_args)
        if peer is not None:
            peer = apply_peft(peer, peft_args)
    alone = {"student alone": copy.deepcopy(student)}
    if peer is not None:
        alone["peer alone"] = copy.deepcopy(peer)
    stages.end()

    stages.start("distillation", f"{scheme}: train with teacher source {SCHEME_SOURCES[scheme]}")
    distill_args = dataclasses.replace(args, output_dir=str(out / "distilled"), teacher_source=SCHEME_SOURCES[scheme],
                                       peer_mode="mutual", push_to_hub=False)
    trainer = train_model(student, distill_args, train_ds, collator, tokenizer,
                          teacher=[peer] if peer is not None else None)
    source = trainer.teacher_source
    models = {DISTILLED_NAMES[scheme][0]: student}
    if scheme == "mutual":
        models[DISTILLED_NAMES[scheme][1]] = source.peers[0]
    elif scheme == "ema":
        models["EMA model"] = source.teachers[0]
        if peft_args.use_peft:  # the average holds the LoRA layers: put it back in a PeftModel, to save it merged
            ema = copy.deepcopy(student)
            unwrap(ema).load_state_dict(source.teachers[0].state_dict())
            models["EMA model"] = ema
    histories = {"distilled": trainer.state.log_history}
    steps = trainer.state.global_step
    folders = {}
    for name, model in models.items():
        folders[name] = out / name.replace(" ", "_").replace("(", "").replace(")", "")
        models[name] = save_model(model, tokenizer, folders[name], trainer.state.log_history,
                                  merge_adapters=peft_args.merge_adapters)
    del trainer
    stages.end()

    stages.start("alone", "the same initial models with cross-entropy only, same steps and seed")
    alone_args = dataclasses.replace(args, output_dir=str(out / "alone"), push_to_hub=False, max_steps=steps)
    for name, model in alone.items():
        trainer = train_model(model, alone_args, train_ds, collator, tokenizer, distill=False)
        histories[name] = trainer.state.log_history
        folders[name] = out / name.replace(" ", "_")
        models[name] = save_model(model, tokenizer, folders[name], trainer.state.log_history,
                                  merge_adapters=peft_args.merge_adapters)
        del trainer
    stages.end()

    stages.start("evaluation", "accuracy, macro-F1, size and latency of every model")
    reference = "student alone"
    rows, correct, latency = evaluate_models(
        {name: (models[name], folders[name]) for name in models}, test_ds, collator, num_labels=len(data.labels),
        eval_batch_size=recipe.eval_batch_size, n_resamples=recipe.bootstrap_resamples, seed=args.seed,
        latency_batch_size=recipe.latency_batch_size, latency_warmup=recipe.latency_warmup,
        latency_repeats=recipe.latency_repeats, latency_threads=recipe.latency_threads, reference=reference)
    pairs = {DISTILLED_NAMES[scheme][0]: "student alone"}
    if scheme == "mutual":
        pairs[DISTILLED_NAMES[scheme][1]] = "peer alone"
    if scheme == "ema":
        pairs["EMA model"] = "student alone"
    comparisons = {f"{a} minus {b}": paired_bootstrap_diff(correct[a], correct[b], n_resamples=recipe.bootstrap_resamples,
                                                           seed=args.seed) for a, b in pairs.items()}
    stages.end()

    some = next(iter(latency.values()))
    results = {
        "scheme": scheme, "teacher_source": SCHEME_SOURCES[scheme], "init_from": recipe.init_from,
        "data": {"source": data.source, "n_train": len(data.train), "n_test": len(data.test), "labels": data.labels,
                 "max_length": recipe.max_length},
        "layers": {"student": recipe.student_layers, **({"peer": recipe.peer_layers} if peer is not None else {})},
        "models": rows, "reference_model": reference,
        "latency": {k: some[k] for k in ("batch_size", "seq_len", "threads", "warmup", "repeats")},
        "comparisons": comparisons,
        "training": {"steps": steps, "epochs": args.num_train_epochs, "learning_rate": args.learning_rate,
                     "batch_size": args.per_device_train_batch_size, "seed": args.seed, "kd_weight": args.kd_weight,
                     "task_weight": args.task_weight, "temperature": args.temperature,
                     **({"ema_decay": args.ema_decay} if scheme == "ema" else {}),
                     "torch_threads": torch.get_num_threads()},
        "stages": stages.times, "log_history": histories,
    }
    results["goals"] = interval_goals(pairs.items(), comparisons)
    return write_recipe_results(results, out, _START, logger)


if __name__ == "__main__":
    from hf_distill.cli import run_with_one_line_errors

    sys.exit(run_with_one_line_errors(lambda argv: main(argv) and 0, sys.argv[1:], Path(__file__).name))
