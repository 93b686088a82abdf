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

import torch  # noqa: E402
from transformers import AutoModelForCTC, AutoProcessor, set_seed  # noqa: E402

from hf_distill.arguments import DistillationArguments  # noqa: E402
from hf_distill.config import parse_config_and_args  # noqa: E402

logger = logging.getLogger("ctc_soft_targets")


@dataclass
class CTCSoftTargetArguments:
    teacher: str | None = field(default=None, metadata={"help": "CTC teacher folder (or package:<module>)."})
    audio: str | None = field(default=None, metadata={"help": "Audio to label: folder, manifest or dataset."})
    pseudo_labels: str | None = field(default=None, metadata={"help": "Use this existing store (made with top_k)."})
    eval_size: float = field(default=0.1, metadata={"help": "Held-out fraction (< 1) or count of the store's rows."})
    path_column: str = field(default="path")
    text_column: str | None = field(default=None, metadata={"help": "Reference column (default: text/sentence/...)."})
    id_column: str | None = field(default=None)
    audio_column: str = field(default="audio")
    split: str | None = field(default=None)
    dataset_config: str | None = field(default=None)
    label_batch_size: int = field(default=16)
    label_device: str | None = field(default=None)
    label_shard_size: int = field(default=256, metadata={"help": "Files per store shard (resuming, processes)."})
    top_k: int = field(default=8, metadata={"help": "Soft targets kept per frame."})
    wer_threshold: float = field(default=0.1, metadata={"help": "Keep pseudo-labels under this WER vs the reference."})
    min_mean_max_posterior: float = field(default=0.5, metadata={"help": "No reference: keep rows whose mean top "
                                                                        "frame posterior is at least this."})
    keep_only: bool = field(default=True, metadata={"help": "Train only on rows whose keep flag is set."})
    max_train_samples: int | None = field(default=None)
    num_layers: int | None = field(default=None, metadata={"help": "Student transformer layers (default: half)."})
    layers: str | None = field(default=None, metadata={"help": "Explicit teacher layers, e.g. '0,5,11'."})
    kl_weight: float = field(default=1.0, metadata={"help": "Weight of the top-k + tail KL (x T^2)."})
    ctc_weight: float = field(default=0.0, metadata={"help": "Weight of the CTC loss on the pseudo-transcripts."})
    eval_batch_size: int = field(default=8)
    num_threads: int | None = field(default=None)


def resolve_teacher(spec: str) -> Path:
    if spec.startswith("package:"):
        module = importlib.import_module(spec.split(":", 1)[1])
        return Path(module.get_model_path())
    path = Path(spec)
    if path.is_dir() and not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json: give a CTC model folder with its processor")
    return path  # a folder, or a Hub id (downloaded by transformers when online)


def main(argv: list[str] | None = None) -> dict:
    recipe, args = parse_config_and_args((CTCSoftTargetArguments, DistillationArguments), argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", force=True)
    import transformers

    transformers.logging.set_verbosity_error()
    if recipe.num_threads:
        torch.set_num_threads(recipe.num_threads)
    from accelerate import PartialState

    from hf_distill.hub import count_parameters, distillation_metadata, push_folder, write_model_card
    from hf_distill.speech.pseudo_label import PseudoLabelConfig, finalize, load_pseudo_labels, pseudo_label
    from hf_distill.speech.text_normalizer import wer
    from hf_distill.speech.training import (
        CTCDistillationCollator,
        CTCPseudoLabelDataset,
        ctc_rows_matching_frames,
        held_out_ids,
        select_rows,
        store_items,
        store_soft_label_temperature,
        topk_kl,
        transcribe_ctc,
    )
    from hf_distill.students import build_ctc_student
    from hf_distill.trainer import DistillationTrainer

    state = PartialState()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    if not recipe.teacher:
        raise ValueError("no teacher: set --teacher (a *ForCTC model folder with its processor)")
    teacher_dir = resolve_teacher(recipe.teacher)
    processor = AutoProcessor.from_pretrained(teacher_dir)
    fe = getattr(processor, "feature_extractor", processor)
    teacher = AutoModelForCTC.from_pretrained(teacher_dir).eval()
    temperature = float(args.temperature)

    # ------------------------------------------------------------------ 1. soft targets
    labelling = None
    if recipe.pseudo_labels:
        store = Path(recipe.pseudo_labels)
    else:
        if not recipe.audio:
            raise ValueError("nothing to train on: give --audio (to label) or --pseudo_labels (a store)")
        store = out / "pseudo_labels"
        t0 = time.perf_counter()
        result = pseudo_label(PseudoLabelConfig(
            input=recipe.audio, model=str(teacher_dir), output_dir=str(store), teacher_type="ctc",
            path_column=recipe.path_column, text_column=recipe.text_column, id_column=recipe.id_column,
            audio_column=recipe.audio_column, split=recipe.split, dataset_config=recipe.dataset_config,
            batch_size=recipe.label_batch_size, top_k=recipe.top_k, soft_label_temperature=temperature,
            wer_threshold=recipe.wer_threshold, min_mean_max_posterior=recipe.min_mean_max_posterior,
            device=recipe.label_device, shard_size=recipe.label_shard_size))
        state.wait_for_everyone()
        if state.is_main_process and not (store / "summary.json").is_file():
            finalize(store)
        state.wait_for_everyone()
        labelling = {"shards_computed": result["shards_computed"],
                     "summary": json.loads((store / "summary.json").read_text())}
        timings["pseudo_labelling"] = time.perf_counter() - t0
    stored_t = store_soft_label_temperature(store)
    if stored_t is None:
        raise ValueError(f"{store} holds no soft labels: label with top_k")
    if abs(stored_t - temperature) > 1e-6:
        logger.warning("the store's soft labels are at T=%g, not --temperature %g: distilling at T=%g",
                       stored_t, temperature, stored_t)
        temperature = stored_t

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
    if recipe.max_train_samples is not None and len(rows) > recipe.max_train_samples:
        rows = rows.select(range(recipe.max_train_samples))
    counts["training_rows"] = len(rows)
    eval_rows = all_rows.select([i for i, r in enumerate(all_rows.select_columns(["id", "topk_tail"]))
                                 if r["id"] in held_out and r["topk_tail"] is not None])
    keep, _ = ctc_rows_matching_frames(eval_rows, items, frame_lengths, rate)
    eval_rows = eval_rows.select(keep)
    counts["eval_rows"] = len(eval_rows)
    logger.info("rows: %s", counts)
    if len(rows) == 0:
        raise ValueError(f"no training rows left ({counts}); relax the filters (--keep_only false, thresholds)")

    # ------------------------------------------------------------------ 2. student, before
    set_seed(args.seed)
    layers = [int(x) for x in recipe.layers.split(",")] if recipe.layers else None
    student = build_ctc_student(teacher, None if layers else recipe.num_layers, layers)
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
    push = bool(args.push_to_hub)
    train_args = dataclasses.replace(
        args, output_dir=str(out / "training"),
        distillation=json.dumps([{"loss": "topk_kl", "weight": recipe.kl_weight, "temperature": temperature}]),
        task_weight=recipe.ctc_weight, kd_weight=recipe.kl_weight, temperature=temperature, cos_weight=0.0,
        mse_weight=0.0, hidden_mse_weight=0.0, remove_unused_columns=False, push_to_hub=False, label_names=["labels"])
    t0 = time.perf_counter()
    trainer = DistillationTrainer(model=student, args=train_args, train_dataset=train_ds, data_collator=collator)
    train_output = trainer.train()
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
        student_dir = out / "student"
        student.save_pretrained(student_dir)
        processor.save_pretrained(student_dir)
        card = {}
        if after["kl"] is not None:
            card = {"held-out soft-target KL, before": f"{before['kl']:.4f}",
                    "held-out soft-target KL, after": f"{after['kl']:.4f}",
                    "held-out WER vs teacher transcripts": f"{after['wer_vs_pseudo_labels']:.4f}"}
        meta = distillation_metadata(
            teacher=recipe.teacher, student_params=count_parameters(student), teacher_params=count_parameters(teacher),
            dataset=recipe.audio or str(store), args=train_args, layer_map=results["student"]["teacher_layers"],
            extra={"recipe": "ctc_soft_targets", "kl_weight": recipe.kl_weight, "ctc_weight": recipe.ctc_weight,
                   "top_k": results["distillation"]["top_k"]})
        write_model_card(student_dir, meta, results=card, pipeline_tag="automatic-speech-recognition")
        results["student_dir"] = str(student_dir)
        timings["total (incl. imports)"] = time.perf_counter() - _START
        results["timings"] = {k: round(v, 1) for k, v in timings.items()}
        if push:
            results["pushed_to"] = push_folder(student_dir, args.hub_model_id or out.name, token=args.hub_token,
                                               private=args.hub_private_repo)
        (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
        logger.info("held-out KL %s -> %s; WER vs teacher transcripts %s -> %s; results in %s", before["kl"],
                    after["kl"], before["wer_vs_pseudo_labels"], after["wer_vs_pseudo_labels"], out / "results.json")
    state.wait_for_everyone()
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
