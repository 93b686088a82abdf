"""Distil a CTC speech teacher (wav2vec2, HuBERT, ...) into a smaller CTC student on frame-level soft targets.

    python recipes/ctc_soft_targets.py --config recipes/configs/ctc_soft_targets.yaml
    accelerate launch recipes/ctc_soft_targets.py --config recipes/configs/ctc_soft_targets.yaml

Every key of the YAML file is also a flag, and flags override the file.

Stages:

1. **Soft targets.** The teacher (``--teacher``: a ``*ForCTC`` folder with its processor, or
   ``package:<module>``) labels ``--audio`` (folder, manifest or ``datasets`` dataset): per output frame its
   top-``--top_k`` posteriors at ``--temperature`` plus the tail mass, and the greedy pseudo-transcript
   (``output_dir/pseudo_labels``, resumable; or ``--pseudo_labels DIR``, a store made with ``top_k``).
2. **Student.** ``build_ctc_student``: the teacher's feature encoder, ``--num_layers`` transformer layers
   (or ``--layers``) and its CTC head; same frame rate, so every stored frame has a student frame.
3. **Distillation.** ``kl_weight * T^2 * [KL over the top-k + one tail bucket]`` per real (unpadded) frame,
   plus ``ctc_weight * CTC(pseudo-transcript)`` when ``--ctc_weight`` > 0. No teacher forward during
   training.
4. **Report.** On held-out rows (``--eval_size`` of the store, left out of training): the soft-target KL of
   the student before and after training, the WER of its greedy transcripts against the teacher's
   pseudo-transcripts (before / after), and, where the audio has reference text, the WER of teacher and
   student against it. ``output_dir/student`` (model, processor, model card) and ``results.json``.
"""

from __future__ import annotations

import time

_START = time.perf_counter()

import dataclasses  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

from transformers import AutoProcessor, set_seed  # noqa: E402

from hf_distill.arguments import DistillationArguments  # noqa: E402
from hf_distill.config import parse_config_and_args  # noqa: E402
from hf_distill.speech.recipe_steps import (  # noqa: E402
    SpeechRecipeArguments,
    cap_training_rows,
    label_store,
    save_student,
    start_run,
    stored_soft_label_temperature,
    train_resuming,
)

logger = logging.getLogger("ctc_soft_targets")

# Recipe flags a resume must keep, besides the shared speech ones and the trainer's own settings.
RESUME_FIELDS = ("eval_size", "top_k", "min_mean_max_posterior", "num_layers", "layers", "kl_weight", "ctc_weight")


@dataclass
class CTCSoftTargetArguments(SpeechRecipeArguments):
    """The shared speech-recipe flags (audio, labelling, rows, run) and these."""

    teacher: str | None = field(default=None, metadata={"help": "CTC teacher folder (or package:<module>)."})
    eval_size: float = field(default=0.1, metadata={"help": "Held-out fraction (< 1) or count of the store's rows."})
    top_k: int = field(default=8, metadata={"help": "Soft targets kept per frame."})
    min_mean_max_posterior: float = field(default=0.5, metadata={"help": "No reference: keep rows whose mean top "
                                                                        "frame posterior is at least this."})
    num_layers: int | None = field(default=None, metadata={"help": "Student transformer layers (default: half)."})
    layers: str | None = field(default=None, metadata={"help": "Explicit teacher layers, e.g. '0,5,11'."})
    kl_weight: float = field(default=1.0, metadata={"help": "Weight of the top-k + tail KL (x T^2)."})
    ctc_weight: float = field(default=0.0, metadata={"help": "Weight of the CTC loss on the pseudo-transcripts."})


def resolve_teacher(spec: str) -> Path:
    if spec.startswith("package:"):
        module = importlib.import_module(spec.split(":", 1)[1])
        return Path(module.get_model_path())
    path = Path(spec)
    if path.is_dir() and not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json: give a CTC model folder with its processor")
    return path  # a folder, or a Hub id (downloaded by transformers when online)


def main(argv: list[str] | None = None) -> dict:
    from hf_distill.students.peft_students import PeftArguments, apply_peft

    recipe, args, peft_args = parse_config_and_args((CTCSoftTargetArguments, DistillationArguments, PeftArguments), argv)
    state, out = start_run(args.output_dir, recipe.num_threads)
    from hf_distill.hub import count_parameters, distillation_metadata
    from hf_distill.speech.labelling import load_pseudo_labels
    from hf_distill.speech.text_normalizer import wer
    from hf_distill.speech.ctc_training import (
        CTCDistillationCollator,
        CTCPseudoLabelDataset,
        ctc_rows_matching_frames,
        topk_kl,
        transcribe_ctc,
    )
    from hf_distill.speech.training import (
        held_out_ids,
        select_rows,
        store_items,
    )
    from hf_distill.students import build_ctc_student
    from hf_distill.trainer import DistillationTrainer

    timings: dict[str, float] = {}
    if not recipe.teacher:
        raise ValueError("no teacher: set --teacher (a *ForCTC model folder with its processor)")
    teacher_dir = resolve_teacher(recipe.teacher)
    processor = AutoProcessor.from_pretrained(teacher_dir)
    fe = getattr(processor, "feature_extractor", processor)
    from hf_distill.teachers import load_teacher

    teacher = load_teacher(teacher_dir, task="ctc").eval()  # refuses a model without its CTC head
    temperature = float(args.temperature)

    # ------------------------------------------------------------------ 1. soft targets
    labelling = None
    if recipe.pseudo_labels:
        store = Path(recipe.pseudo_labels)
    else:
        if not recipe.audio:
            raise ValueError("nothing to train on: give --audio (to label) or --pseudo_labels (a store)")
        store = out / "pseudo_labels"
        labelled = label_store(recipe, teacher_dir, store, teacher_type="ctc", top_k=recipe.top_k,
                               soft_label_temperature=temperature,
                               min_mean_max_posterior=recipe.min_mean_max_posterior)
        labelling = {"shards_computed": labelled["shards_computed"], "summary": labelled["summary"]}
        timings["pseudo_labelling"] = labelled["seconds"]
    temperature = stored_soft_label_temperature(store, temperature, "label with top_k")

    items = store_items(store)
    held_out = held_out_ids(list(items.values()), recipe.eval_size, seed=args.seed, require_reference=False)
    all_rows = load_pseudo_labels(store)
    rows, counts = select_rows(all_rows, keep_only=recipe.keep_only, exclude_ids=held_out, max_chunks=None,
                               need_soft_labels=True)
    frame_lengths = teacher._get_feat_extract_output_lengths
    rate = int(fe.sampling_rate)
    keep, mismatched = ctc_rows_matching_frames(rows, items, frame_lengths, rate)
    rows = rows.select(keep)
    counts["frame_count_mismatch"] = mismatched
    eval_rows = all_rows.select([i for i, r in enumerate(all_rows.select_columns(["id", "topk_tail"]))
                                 if r["id"] in held_out and r["topk_tail"] is not None])
    keep, _ = ctc_rows_matching_frames(eval_rows, items, frame_lengths, rate)
    eval_rows = eval_rows.select(keep)
    counts["eval_rows"] = len(eval_rows)
    rows = cap_training_rows(rows, counts, recipe.max_train_samples)

    # ------------------------------------------------------------------ 2. student, before
    set_seed(args.seed)
    layers = [int(x) for x in recipe.layers.split(",")] if recipe.layers else None
    student = build_ctc_student(teacher, None if layers else recipe.num_layers, layers)
    student = apply_peft(student, peft_args)  # LoRA adapters when --use_peft
    collator = CTCDistillationCollator(fe, student._get_feat_extract_output_lengths)
    train_ds = CTCPseudoLabelDataset(rows, fe, items=items)
    eval_ds = CTCPseudoLabelDataset(eval_rows, fe, items=items)
    from hf_distill.speech.audio import decode

    eval_audio = [decode(items[r["id"]], rate) for r in eval_rows.select_columns(["id"])]
    pseudo_texts = list(eval_rows["text"])
    references = list(eval_rows["reference"])

    def measure(model) -> dict:
        hyps = transcribe_ctc(model, processor, eval_audio, batch_size=recipe.eval_batch_size) if eval_audio else []
        res = {"kl": topk_kl(model, eval_ds, collator, temperature=temperature, batch_size=recipe.eval_batch_size)
               if len(eval_ds) else None,
               "wer_vs_pseudo_labels": wer(pseudo_texts, hyps) if hyps else None}
        refd = [(r, h) for r, h in zip(references, hyps) if r]
        if refd:
            res["wer_vs_references"] = wer([r for r, _ in refd], [h for _, h in refd])
        return res

    before = measure(student)

    # ------------------------------------------------------------------ 3. distillation
    train_args = dataclasses.replace(
        args, output_dir=str(out / "training"),
        distillation=json.dumps([{"loss": "topk_kl", "weight": recipe.kl_weight, "temperature": temperature}]),
        task_weight=recipe.ctc_weight, kd_weight=recipe.kl_weight, temperature=temperature, cos_weight=0.0,
        mse_weight=0.0, hidden_mse_weight=0.0, remove_unused_columns=False, push_to_hub=False, label_names=["labels"])
    t0 = time.perf_counter()
    trainer = DistillationTrainer(model=student, args=train_args, train_dataset=train_ds, data_collator=collator)
    trainer.add_resume_settings(**{f"peft.{k}": v for k, v in dataclasses.asdict(peft_args).items()})
    train_output = train_resuming(trainer, recipe, RESUME_FIELDS, teacher=teacher)
    timings["training"] = time.perf_counter() - t0
    history = trainer.state.log_history
    student = trainer.model
    del trainer
    after = measure(student)

    teacher_wer = None
    refd = [(r, t) for r, t in zip(references, pseudo_texts) if r]
    if refd:
        teacher_wer = wer([r for r, _ in refd], [t for _, t in refd])
    results = {
        "teacher": recipe.teacher, "pseudo_labels": {"store": str(store), **(labelling or {})}, "rows": counts,
        "student": {"teacher_layers": student.distillation_teacher_layers
                    if hasattr(student, "distillation_teacher_layers") else layers,
                    "parameters": count_parameters(student), "teacher_parameters": count_parameters(teacher)},
        "distillation": {"kl_weight": recipe.kl_weight, "ctc_weight": recipe.ctc_weight, "temperature": temperature,
                         "top_k": json.loads((store / "manifest.json").read_text())["soft_labels"]["k"],
                         "steps": train_output.global_step},
        "eval": {"rows": len(eval_rows), "before": before, "after": after, "teacher_wer_vs_references": teacher_wer},
        "loss": [{k: h[k] for k in h if k in ("step", "loss", "loss_topk_kl", "loss_ctc")} for h in history
                 if "loss" in h],
    }
    if state.is_main_process:
        card = {}
        if after["kl"] is not None:
            card = {"held-out soft-target KL, before": round(before["kl"], 4),
                    "held-out soft-target KL, after": round(after["kl"], 4)}
            if after["wer_vs_pseudo_labels"] is not None:
                card["held-out WER vs teacher transcripts"] = round(after["wer_vs_pseudo_labels"], 4)
        if after.get("wer_vs_references") is not None:
            card["held-out WER vs references"] = round(after["wer_vs_references"], 4)
        meta = distillation_metadata(
            teacher=recipe.teacher, student_params=count_parameters(student), teacher_params=count_parameters(teacher),
            dataset=recipe.audio or str(store), args=train_args, layer_map=results["student"]["teacher_layers"],
            extra={"recipe": "ctc_soft_targets", "kl_weight": recipe.kl_weight, "ctc_weight": recipe.ctc_weight,
                   "top_k": results["distillation"]["top_k"]})
        metric = "wer" if after.get("wer_vs_references") is not None else "wer_vs_teacher_transcripts"
        save_student(out, student, processor, metadata=meta, card_results=card, results=results, timings=timings,
                     started=_START, args=args, dataset=recipe.audio or str(store),
                     merge_adapters=peft_args.merge_adapters,
                     eval_metrics={metric: after.get("wer_vs_references", after["wer_vs_pseudo_labels"])},
                     metric_names={"wer": "held-out WER vs references",
                                   "wer_vs_teacher_transcripts": "held-out WER vs the teacher's transcripts"})
        logger.info("held-out KL %s -> %s; WER vs teacher transcripts %s -> %s; results in %s", before["kl"],
                    after["kl"], before["wer_vs_pseudo_labels"], after["wer_vs_pseudo_labels"], out / "results.json")
    state.wait_for_everyone()
    return results


if __name__ == "__main__":
    from hf_distill.cli import run_with_one_line_errors

    sys.exit(run_with_one_line_errors(lambda argv: main(argv) and 0, sys.argv[1:], Path(__file__).name))
