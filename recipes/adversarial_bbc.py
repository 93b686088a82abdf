"""Adversarial and graph-based distillation of a small text classifier, against plain KD and cross-entropy.

    python recipes/adversarial_bbc.py --config recipes/configs/adversarial_bbc.yaml

Four students start from the same weights (``--student_layers`` of the encoder ``--student_init``, with a
new classification head) and take the same steps, data order, seed and schedule on the same
``--labelled_samples`` labelled training articles (a stratified, seeded subset of the training split):

* **CE only**: cross-entropy on the labels;
* **KD + CE**: the ``--distillation`` terms (soft-target KL on the teacher's cached logits + cross-entropy);
* **KD + CE + adversarial**: the same terms plus ``{loss: adversarial}`` (``--adversarial_*`` options): a
  discriminator learns to tell the teacher's output distributions from the student's, the student to
  fool it (:mod:`hf_distill.objectives.adversarial`; runs on the cached logits);
* **KD + CE + knn_graph**: the same terms plus ``{loss: knn_graph}`` (``--graph_*`` options): the student's
  sample graph matches the teacher's k-nearest-neighbour graph (live teacher: it reads hidden states).

The teacher (``--teacher``) is fine-tuned on the whole training split unless it already classifies these
labels (a folder from an earlier run, or ``output_dir/teacher``). Written to ``results.json`` /
``results.md``: accuracy [95% bootstrap CI], macro-F1, parameters, latency of every model on the test
split, and paired-bootstrap differences between the arms.
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

from efficient_student import prepare_teacher  # noqa: E402

from hf_distill.arguments import DistillationArguments  # noqa: E402
from hf_distill.config import parse_config_and_args  # noqa: E402
from hf_distill.objectives import parse_distillation_spec  # noqa: E402
from hf_distill.tasks.classification_data import stratified_split  # noqa: E402
from hf_distill.tasks.classification_recipe import (  # noqa: E402
    Stages,
    save_model,
    train_model,
)
from hf_distill.tasks.recipe_arguments import (  # noqa: E402
    ClassificationDataArguments,
    ClassificationEvaluationArguments,
)
from hf_distill.tasks.recipe_arms import (  # noqa: E402
    build_initial_student,
    check_teacher_and_student,
    evaluate_and_compare,
    interval_goals,
    load_teacher_data,
    write_recipe_results,
)
from hf_distill.teachers import cache_teacher_logits  # noqa: E402

logger = logging.getLogger("adversarial_bbc")

ARMS = ("CE only", "KD + CE", "KD + CE + adversarial", "KD + CE + knn_graph")


@dataclass
class AdversarialRecipeArguments(ClassificationDataArguments, ClassificationEvaluationArguments):
    teacher: str | None = field(default=None, metadata={"help": "Hub id, folder, or package:<module>."})
    student_init: str | None = field(default=None, metadata={"help": "Encoder whose layers start every student."})
    student_layers: str = field(default="0,5", metadata={"help": "Encoder layers copied into the students."})
    labelled_samples: int = field(default=200, metadata={
        "help": "Labelled training articles the students see (a stratified subset; per-class rounding may add a few)."})
    # ---- the adversarial term
    adversarial_weight: float = field(default=0.2)
    adversarial_on: str = field(default="logits", metadata={"choices": ("logits", "hidden")})
    adversarial_layer: int = field(default=-1, metadata={"help": "adversarial_on=hidden: hidden_states index."})
    adversarial_pooling: str = field(default="mean", metadata={"help": "adversarial_on=hidden: token, cls or mean."})
    discriminator_lr: float = field(default=5e-4)
    discriminator_hidden_size: int = field(default=128)
    steps_per_student_step: int = field(default=1)
    gan_loss: str = field(default="nonsaturating", metadata={"choices": ("nonsaturating", "least_squares")})
    # ---- the graph term
    graph_weight: float = field(default=1.0)
    graph_k: int = field(default=4)
    graph_tau: float = field(default=0.1)
    graph_pooling: str = field(default="mean")
    graph_layer: int = field(default=-1)
    # ---- teacher fine-tuning (when it has no head for these labels)
    teacher_epochs: float = field(default=1.0)
    teacher_learning_rate: float = field(default=1e-4)
    teacher_batch_size: int = field(default=16)
    teacher_warmup: float = field(default=0.1)


def arm_terms(recipe, args) -> dict[str, list[dict]]:
    """The distillation list of each distilled arm (the base list, plus the adversarial or the graph term)."""
    base = parse_distillation_spec(args.distillation)
    if base is None:
        raise ValueError("give the KD arm's terms with --distillation, e.g. [{loss: kl, weight: 0.5, temperature: 2.0}, "
                         "{loss: task, weight: 0.5}]")
    if any(t["loss"] in ("adversarial", "knn_graph") for t in base):
        raise ValueError("--distillation is the KD arm's list; the adversarial and knn_graph terms are added by the "
                         "recipe (--adversarial_* and --graph_* options): drop them from it")
    adversarial = {"loss": "adversarial", "on": recipe.adversarial_on, "weight": recipe.adversarial_weight,
                   "discriminator_lr": recipe.discriminator_lr, "hidden_size": recipe.discriminator_hidden_size,
                   "steps_per_student_step": recipe.steps_per_student_step, "gan_loss": recipe.gan_loss}
    if recipe.adversarial_on == "hidden":
        adversarial.update(layer=recipe.adversarial_layer, pooling=recipe.adversarial_pooling)
    graph = {"loss": "knn_graph", "weight": recipe.graph_weight, "k": recipe.graph_k, "tau": recipe.graph_tau,
             "pooling": recipe.graph_pooling, "layer": recipe.graph_layer}
    return {"KD + CE": base, "KD + CE + adversarial": [*base, adversarial], "KD + CE + knn_graph": [*base, graph]}


def folder_name(arm: str) -> str:
    return arm.replace(" + ", "_").replace(" ", "_").lower()


def main(argv: list[str] | None = None) -> dict:
    recipe, args = parse_config_and_args((AdversarialRecipeArguments, DistillationArguments), argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", force=True)
    check_teacher_and_student(recipe)
    if recipe.labelled_samples < 1:
        raise ValueError(f"--labelled_samples must be >= 1, got {recipe.labelled_samples}")
    terms = arm_terms(recipe, args)
    if recipe.num_threads:
        torch.set_num_threads(recipe.num_threads)
    out = Path(args.output_dir)
    stages = Stages(total=4 + len(ARMS))

    stages.start("data", "load and check the data, tokenize")
    prepared = load_teacher_data(recipe, out)
    data, teacher_path, tokenizer = prepared.data, prepared.teacher_path, prepared.tokenizer
    label2id, id2label, train_ds, test_ds = prepared.label2id, prepared.id2label, prepared.train_ds, prepared.test_ds
    collator = prepared.collator
    if recipe.labelled_samples >= len(train_ds):
        raise ValueError(f"--labelled_samples {recipe.labelled_samples} is not below the {len(train_ds)} training rows")
    _, labelled = stratified_split(train_ds, "labels", test_size=recipe.labelled_samples, seed=recipe.split_seed)
    stages.end()

    stages.start("teacher", "teacher with a classification head for these labels (on the whole training split)")
    teacher, teacher_dir, note = prepare_teacher(recipe, args, teacher_path, data, train_ds, collator, tokenizer,
                                                 label2id, out)
    teacher.eval()
    stages.end(note)

    stages.start("teacher logits", f"run the teacher once over the {len(labelled)} labelled articles")
    cached = cache_teacher_logits(teacher, labelled, collator, batch_size=recipe.eval_batch_size,
                                  desc="teacher logits (labelled)")
    initial = build_initial_student(recipe, tokenizer, label2id, id2label, args.seed)
    stages.end()

    models, folders, histories = {"teacher": teacher}, {"teacher": teacher_dir}, {}
    discriminator = {}
    for arm in ARMS:
        stages.start(arm, f"{arm}: train the initial student")
        student = copy.deepcopy(initial)
        arm_args = dataclasses.replace(args, output_dir=str(out / folder_name(arm) / "checkpoints"), push_to_hub=False)
        if arm == "CE only":
            trainer = train_model(student, arm_args, labelled, collator, tokenizer, distill=False)
        else:
            arm_args = dataclasses.replace(arm_args, distillation=terms[arm], task_weight=0.0)
            live = arm.endswith("knn_graph") or recipe.adversarial_on == "hidden" and arm.endswith("adversarial")
            trainer = train_model(student, arm_args, labelled if live else cached, collator, tokenizer,
                                  teacher=teacher if live else None,
                                  resume_settings={"labelled_samples": recipe.labelled_samples,
                                                   "student_init": recipe.student_init,
                                                   "student_layers": recipe.student_layers})
            if arm.endswith("adversarial"):
                logged = [h for h in trainer.state.log_history if "loss_adversarial" in h]
                term = next(t for t in trainer.objective.terms if t.loss_name == "adversarial")
                discriminator = {"updates": term.adversary.updates, "first_log": logged[0] if logged else None,
                                 "last_log": logged[-1] if logged else None}
        histories[arm] = trainer.state.log_history
        folders[arm] = out / folder_name(arm)
        models[arm] = save_model(student, tokenizer, folders[arm], trainer.state.log_history)
        steps = trainer.state.global_step
        del trainer
        stages.end(f"{steps} steps")

    stages.start("evaluation", "accuracy, macro-F1, size and latency of every model on the test split")
    pairs = [("KD + CE", "CE only"), ("KD + CE + adversarial", "KD + CE"), ("KD + CE + adversarial", "CE only"),
             ("KD + CE + knn_graph", "KD + CE"), ("KD + CE + knn_graph", "CE only")]
    rows, comparisons, latency = evaluate_and_compare(recipe, models, folders, test_ds, collator,
                                                      num_labels=len(label2id), pairs=pairs, seed=args.seed)
    stages.end()

    some = next(iter(latency.values()))
    results = {
        "teacher": recipe.teacher, "teacher_note": note, "student_init": recipe.student_init,
        "student_layers": recipe.student_layers,
        "data": {"source": data.source, "n_train": len(labelled), "n_teacher_train": len(train_ds),
                 "n_test": len(test_ds), "labels": data.labels, "max_length": recipe.max_length},
        "models": rows, "reference_model": "teacher",
        "latency": {k: some[k] for k in ("batch_size", "seq_len", "threads", "warmup", "repeats")},
        "comparisons": comparisons, "terms": terms, "discriminator": discriminator,
        "training": {"steps": steps, "epochs": args.num_train_epochs, "learning_rate": args.learning_rate,
                     "batch_size": args.per_device_train_batch_size, "seed": args.seed,
                     "torch_threads": torch.get_num_threads()},
        "stages": stages.times, "log_history": histories,
    }
    results["goals"] = interval_goals(pairs, comparisons)
    return write_recipe_results(results, out, _START, logger)


if __name__ == "__main__":
    from hf_distill.cli import run_with_one_line_errors

    sys.exit(run_with_one_line_errors(lambda argv: main(argv) and 0, sys.argv[1:], Path(__file__).name))
