"""Data-free distillation of a text classifier: the student never sees a training article.

    python recipes/data_free_bbc.py --config recipes/configs/data_free_bbc.yaml

A causal LM (``--generator``, default SmolLM2-135M-Instruct, offline) writes ``--synthetic_texts`` short texts
from generic prompts (:data:`hf_distill.data_free.GENERIC_PROMPTS`, or ``--prompts_file``, one a line); they
are stored with their prompts in ``output_dir/synthetic`` (a ``datasets`` dataset; an interrupted synthesis
resumes, a finished one is reused). The classifier teacher labels them (cached logits, soft targets) and
two students that start from the same weights take the same steps, seed and soft-target loss:

* **data-free KD**: on the synthetic texts only (the training split is never read by its training loop);
* **real-data KD**: on as many real training articles (a stratified, seeded subset), the teacher's logits
  on them -- the reference for what the synthetic inputs lose.

The untrained initial student is evaluated too (the floor). Written to ``results.json`` / ``results.md``:
accuracy [95% bootstrap CI], macro-F1, latency on the test split, paired-bootstrap differences, the
teacher's label histogram on the synthetic texts and a few of them.
"""

from __future__ import annotations

import time

_START = time.perf_counter()  # the run's wall time includes the imports below

import collections  # noqa: E402
import copy  # noqa: E402
import dataclasses  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from efficient_student import prepare_teacher  # noqa: E402

from hf_distill import data_free  # noqa: E402
from hf_distill.arguments import DistillationArguments  # noqa: E402
from hf_distill.config import parse_config_and_args  # noqa: E402
from hf_distill.objectives import parse_distillation_spec  # noqa: E402
from hf_distill.tasks.classification import (  # noqa: E402
    DataError,
)
from hf_distill.tasks.classification_data import stratified_split  # noqa: E402
from hf_distill.tasks.classification_recipe import (  # noqa: E402
    Stages,
    resolve_model_path,
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
    load_teacher_data,
    write_recipe_results,
)
from hf_distill.teachers import cache_teacher_logits  # noqa: E402

logger = logging.getLogger("data_free_bbc")

ARMS = ("data-free KD", "real-data KD")
FLOOR = "initial student"


@dataclass
class DataFreeRecipeArguments(ClassificationDataArguments, ClassificationEvaluationArguments):
    teacher: str | None = field(default=None, metadata={"help": "Hub id, folder, or package:<module>."})
    student_init: str | None = field(default=None, metadata={"help": "Encoder whose layers start every student."})
    student_layers: str = field(default="0,5", metadata={"help": "Encoder layers copied into the students."})
    generator: str = field(default="smollm2", metadata={
        "help": "Causal LM that writes the synthetic texts: smollm2 (offline), or a folder / Hub id."})
    prompts_file: str | None = field(default=None, metadata={
        "help": "Generation prompts, one a line (default: hf_distill.data_free.GENERIC_PROMPTS)."})
    synthetic_texts: int = field(default=320, metadata={"help": "Texts to synthesise (= real articles of the reference arm)."})
    max_new_tokens: int = field(default=80)
    generation_temperature: float = field(default=1.0)
    generation_top_p: float = field(default=0.95)
    generation_batch_size: int = field(default=16)
    chat: bool = field(default=True, metadata={"help": "Wrap each prompt in the generator's chat template."})
    min_chars: int = field(default=20, metadata={"help": "Shorter synthetic texts are dropped."})
    # ---- teacher fine-tuning (when it has no head for these labels)
    teacher_epochs: float = field(default=1.0)
    teacher_learning_rate: float = field(default=1e-4)
    teacher_batch_size: int = field(default=16)
    teacher_warmup: float = field(default=0.1)


def load_prompts(recipe) -> list[str]:
    if not recipe.prompts_file:
        return list(data_free.GENERIC_PROMPTS)
    path = Path(recipe.prompts_file)
    if not path.is_file():
        raise DataError(f"--prompts_file {path} does not exist")
    return data_free.check_prompts([line.strip() for line in path.read_text().splitlines() if line.strip()])


def synthesize(recipe, seed: int, folder: Path):
    from transformers import AutoModelForCausalLM

    from hf_distill.lm.recipe_steps import resolve_lm_teacher

    path = resolve_lm_teacher(recipe.generator) if recipe.generator == "smollm2" else resolve_model_path(recipe.generator)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    texts = data_free.synthesize_texts(
        model, tokenizer, load_prompts(recipe), recipe.synthetic_texts, folder=folder,
        max_new_tokens=recipe.max_new_tokens, temperature=recipe.generation_temperature, top_p=recipe.generation_top_p,
        batch_size=recipe.generation_batch_size, seed=seed, chat=recipe.chat, min_chars=recipe.min_chars,
        generator_name=recipe.generator)
    del model
    return texts


def main(argv: list[str] | None = None) -> dict:
    recipe, args = parse_config_and_args((DataFreeRecipeArguments, DistillationArguments), argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", force=True)
    check_teacher_and_student(recipe)
    if recipe.synthetic_texts < 2:
        raise ValueError(f"--synthetic_texts must be >= 2, got {recipe.synthetic_texts}")
    terms = parse_distillation_spec(args.distillation)
    if terms is None or any(t["loss"] == "task" for t in terms):
        raise ValueError("give soft-target terms only with --distillation, e.g. [{loss: kl, weight: 1.0, "
                         "temperature: 2.0}]: the synthetic texts have no labels (drop {loss: task})")
    if recipe.num_threads:
        torch.set_num_threads(recipe.num_threads)
    out = Path(args.output_dir)
    stages = Stages(total=5 + len(ARMS))

    stages.start("data", "load and check the data, tokenize")
    prepared = load_teacher_data(recipe, out)
    data, teacher_path, tokenizer = prepared.data, prepared.teacher_path, prepared.tokenizer
    label2id, id2label, train_ds, test_ds = prepared.label2id, prepared.id2label, prepared.train_ds, prepared.test_ds
    collator = prepared.collator
    stages.end()

    stages.start("teacher", "teacher with a classification head for these labels")
    teacher, teacher_dir, note = prepare_teacher(recipe, args, teacher_path, data, train_ds, collator, tokenizer,
                                                 label2id, out)
    teacher.eval()
    stages.end(note)

    stages.start("synthesis", f"{recipe.generator} writes {recipe.synthetic_texts} texts from generic prompts")
    texts = synthesize(recipe, args.seed, out / "synthetic")
    n = len(texts)
    if n >= len(train_ds):
        raise ValueError(f"{n} synthetic texts is not below the {len(train_ds)} training rows: the real-data arm "
                         "needs as many real articles; lower --synthetic_texts")
    stages.end(f"{n} texts kept")

    stages.start("teacher logits", f"the teacher labels the {n} synthetic texts and {n} real articles")
    synthetic = texts.map(lambda b: tokenizer(b["text"], truncation=True, max_length=recipe.max_length), batched=True,
                          remove_columns=texts.column_names, desc="tokenize synthetic")
    synthetic = cache_teacher_logits(teacher, synthetic, collator, batch_size=recipe.eval_batch_size,
                                     desc="teacher logits (synthetic)")
    _, real = stratified_split(train_ds, "labels", test_size=n, seed=recipe.split_seed)
    real = cache_teacher_logits(teacher, real.select(range(min(n, len(real)))), collator,
                                batch_size=recipe.eval_batch_size, desc="teacher logits (real)").remove_columns("labels")
    votes = collections.Counter(id2label[int(torch.tensor(r).argmax())] for r in synthetic["teacher_logits"])
    initial = build_initial_student(recipe, tokenizer, label2id, id2label, args.seed)
    stages.end(", ".join(f"{k}: {v}" for k, v in sorted(votes.items())))

    models, folders, histories = {"teacher": teacher, FLOOR: initial}, {"teacher": teacher_dir}, {}
    folders[FLOOR] = out / "initial_student"
    save_model(initial, tokenizer, folders[FLOOR], [])
    transfer = {"data-free KD": synthetic, "real-data KD": real}
    for arm in ARMS:
        stages.start(arm, f"{arm}: train the initial student on {len(transfer[arm])} rows")
        student = copy.deepcopy(initial)
        folder = arm.replace(" ", "_").replace("-", "_").lower()
        arm_args = dataclasses.replace(args, output_dir=str(out / folder / "checkpoints"), push_to_hub=False,
                                       distillation=terms, task_weight=0.0)
        trainer = train_model(student, arm_args, transfer[arm], collator, tokenizer,
                              resume_settings={"arm": arm, "synthetic_texts": n, "student_init": recipe.student_init,
                                               "student_layers": recipe.student_layers})
        histories[arm] = trainer.state.log_history
        folders[arm] = out / folder
        models[arm] = save_model(student, tokenizer, folders[arm], trainer.state.log_history)
        steps = trainer.state.global_step
        del trainer
        stages.end(f"{steps} steps")

    stages.start("evaluation", "accuracy, macro-F1, size and latency of every model on the test split")
    pairs = [("data-free KD", "real-data KD"), ("data-free KD", FLOOR), ("data-free KD", "teacher")]
    rows, comparisons, latency = evaluate_and_compare(recipe, models, folders, test_ds, collator,
                                                      num_labels=len(label2id), pairs=pairs, seed=args.seed)
    stages.end()

    some = next(iter(latency.values()))
    results = {
        "teacher": recipe.teacher, "teacher_note": note, "student_init": recipe.student_init,
        "student_layers": recipe.student_layers, "generator": recipe.generator,
        "data": {"source": data.source, "n_train": n, "n_synthetic": n, "n_real": len(real), "n_test": len(test_ds),
                 "labels": data.labels, "max_length": recipe.max_length},
        "synthesis": {"folder": str(out / "synthetic"), "prompts": load_prompts(recipe),
                      "max_new_tokens": recipe.max_new_tokens, "temperature": recipe.generation_temperature,
                      "top_p": recipe.generation_top_p, "teacher_labels": dict(sorted(votes.items())),
                      "examples": [{"prompt": p, "text": t} for p, t in zip(texts["prompt"][:5], texts["text"][:5])]},
        "models": rows, "reference_model": "teacher",
        "latency": {k: some[k] for k in ("batch_size", "seq_len", "threads", "warmup", "repeats")},
        "comparisons": comparisons, "terms": terms,
        "training": {"steps": steps, "epochs": args.num_train_epochs, "max_steps": args.max_steps,
                     "learning_rate": args.learning_rate, "batch_size": args.per_device_train_batch_size,
                     "seed": args.seed, "torch_threads": torch.get_num_threads()},
        "stages": stages.times, "log_history": histories,
    }
    results["goals"] = [
        {"goal": f"{a} beats {b}" if b != "real-data KD" else f"{a} within 5 points of {b}", "status": status,
         "met": status == "met",
         "measured": f"{100 * c['diff']:+.1f} points [{100 * c['low']:+.1f}, {100 * c['high']:+.1f}] (paired bootstrap)"}
        for (a, b), c in zip(pairs[:2], list(comparisons.values())[:2])
        for status in [("met" if c["low"] > -0.05 else "missed" if c["high"] < -0.05 else "not shown")
                       if b == "real-data KD" else ("met" if c["low"] > 0 else "missed" if c["high"] < 0 else "not shown")]]
    return write_recipe_results(results, out, _START, logger)


if __name__ == "__main__":
    from hf_distill.cli import run_with_one_line_errors

    sys.exit(run_with_one_line_errors(lambda argv: main(argv) and 0, sys.argv[1:], Path(__file__).name))
