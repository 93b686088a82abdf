"""Steps the speech distillation recipes share (``recipes/distil_whisper.py``, ``recipes/ctc_soft_targets.py``).

- :class:`SpeechRecipeArguments`: the flags both recipes take (where the audio is, how to label it,
  which rows to train on, evaluation batch size, threads); each recipe adds its own.
- :func:`start_run`: logging, quiet transformers, torch threads and the output folder.
- :func:`label_store`: pseudo-label ``--audio`` into a store (each process its shards, resumable) and
  finalize it once.
- :func:`stored_soft_label_temperature`: the temperature to distil at on a store's top-k soft labels.
- :func:`cap_training_rows`: ``--max_train_samples``, the row counts in the log, an error when no row is left.
- :func:`train_resuming`: train, resuming the last complete checkpoint when the run's settings (the trainer's
  and the recipe's data, labelling and student flags) are the checkpoint's; other settings are refused
  with the list of differences unless ``--start_fresh true``.
- :func:`save_student`: the student folder with its model card, the optional upload and ``results.json``.

Heavy libraries are imported inside the functions: importing this module (for the arguments) is cheap.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

__all__ = [
    "SpeechRecipeArguments",
    "cap_training_rows",
    "harvard_demo_audio",
    "label_store",
    "save_student",
    "spoken_bbc_recordings",
    "start_run",
    "stored_soft_label_temperature",
    "train_resuming",
]

# Shared flags that decide which rows a student trains on (a resume must keep them).
SPEECH_RESUME_FIELDS = ("audio", "pseudo_labels", "path_column", "text_column", "id_column", "audio_column", "split",
                        "dataset_config", "wer_threshold", "keep_only", "max_train_samples")


@dataclass
class SpeechRecipeArguments:
    """Flags shared by the speech recipes: the audio and its listing options, labelling, row selection, run."""

    audio: str | None = field(default=None, metadata={"help": "Audio to pseudo-label: folder, manifest or dataset."})
    pseudo_labels: str | None = field(default=None, metadata={"help": "Use this existing pseudo-label store."})
    path_column: str = field(default="path")
    text_column: str | None = field(default=None, metadata={"help": "Reference column (default: text/sentence/...)."})
    id_column: str | None = field(default=None)
    audio_column: str = field(default="audio")
    split: str | None = field(default=None)
    dataset_config: str | None = field(default=None)
    label_batch_size: int = field(default=16, metadata={"help": "Windows per teacher batch while labelling."})
    label_device: str | None = field(default=None, metadata={"help": "Device for labelling (default: cuda if any)."})
    label_shard_size: int = field(default=256, metadata={"help": "Files per store shard (the unit of resuming and "
                                                                 "of the split between processes)."})
    wer_threshold: float = field(default=0.1, metadata={"help": "Keep pseudo-labels under this WER vs the reference."})
    keep_only: bool = field(default=True, metadata={"help": "Train only on rows whose keep flag is set."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use at most this many training rows."})
    eval_batch_size: int = field(default=8)
    num_threads: int | None = field(default=None, metadata={"help": "torch threads (CPU)."})


def start_run(output_dir: str | Path, num_threads: int | None = None):
    """Log at INFO, silence transformers' warnings, set torch's threads; create ``output_dir``.
    Returns (accelerate ``PartialState``, output folder)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", force=True)
    import torch
    import transformers
    from accelerate import PartialState

    transformers.logging.set_verbosity_error()
    if num_threads:
        torch.set_num_threads(num_threads)
    state = PartialState()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    return state, out


def label_store(recipe: SpeechRecipeArguments, teacher_dir: str | Path, store: Path, *, teacher_type: str,
                packed: bool = False, **options: Any) -> dict[str, Any]:
    """Pseudo-label ``recipe.audio`` with the teacher into ``store`` (resuming it; every process takes its
    shards), then finalize the store once. ``options``: further ``PseudoLabelConfig`` fields (thresholds,
    soft labels); ``packed``: clips packed into shared Whisper windows (``pack``), else each in its own.

    Returns ``seconds``, ``shards_computed``, ``shards_skipped`` and the store's ``summary``."""
    from accelerate import PartialState

    from hf_distill.speech.labelling import PseudoLabelConfig, finalize, pseudo_label

    config = dict(
        input=recipe.audio, model=str(teacher_dir), output_dir=str(store), teacher_type=teacher_type,
        path_column=recipe.path_column, text_column=recipe.text_column, id_column=recipe.id_column,
        audio_column=recipe.audio_column, split=recipe.split, dataset_config=recipe.dataset_config,
        batch_size=recipe.label_batch_size, wer_threshold=recipe.wer_threshold, device=recipe.label_device,
        shard_size=recipe.label_shard_size, pack=packed, **options,
    )
    state = PartialState()
    t0 = time.perf_counter()
    result = pseudo_label(PseudoLabelConfig(**config))
    state.wait_for_everyone()
    summary_path = store / "summary.json"
    if state.is_main_process and not summary_path.is_file():
        finalize(store)
    state.wait_for_everyone()
    summary = json.loads(summary_path.read_text())
    return {"seconds": time.perf_counter() - t0, "shards_computed": result["shards_computed"],
            "shards_skipped": result["shards_skipped"], "summary": summary}


def stored_soft_label_temperature(store: Path, temperature: float, missing: str) -> float:
    """The temperature to distil at on the store's top-k soft labels: theirs (a top-k cannot be
    re-tempered), with a warning when it is not ``temperature``. ``missing``: what to do when the store
    has no soft labels (the ValueError's advice)."""
    from hf_distill.speech.training import store_soft_label_temperature

    stored_t = store_soft_label_temperature(store)
    if stored_t is None:
        raise ValueError(f"{store} holds no soft labels; {missing}")
    if abs(stored_t - temperature) > 1e-6:
        logger.warning("the store's soft labels are at T=%g, not --temperature %g: distilling at T=%g (a top-k "
                       "cannot be re-tempered)", stored_t, temperature, stored_t)
        return stored_t
    return temperature


def cap_training_rows(rows, counts: dict[str, int], max_train_samples: int | None):
    """The first ``max_train_samples`` rows (all with None); sets ``counts["training_rows"]`` and logs
    the counts. ValueError when no training row is left."""
    if max_train_samples is not None and len(rows) > max_train_samples:
        rows = rows.select(range(max_train_samples))
    counts["training_rows"] = len(rows)
    logger.info("training rows: %s", counts)
    if len(rows) == 0:
        raise ValueError(f"no training rows left ({counts}); relax the filters (--keep_only false, thresholds)")
    return rows


def train_resuming(trainer, recipe, fields: tuple[str, ...], teacher=None):
    """``trainer.train(resume_from_checkpoint=True)`` after adding the recipe's ``fields`` (with the shared
    :data:`SPEECH_RESUME_FIELDS`) and ``teacher``'s weight fingerprint (its soft labels may come from a store,
    with no teacher in the trainer) to the settings a resume must match. Returns the ``TrainOutput``."""
    from hf_distill.checkpoints import weights_fingerprint

    settings = {name: getattr(recipe, name) for name in (*SPEECH_RESUME_FIELDS, *fields)}
    if teacher is not None:
        settings["teacher_weights"] = weights_fingerprint(teacher)
    trainer.add_resume_settings(**settings)
    return trainer.train(resume_from_checkpoint=True)


def save_student(out: Path, student, processor, *, metadata: dict, card_results: dict, results: dict,
                 timings: dict[str, float], started: float, args, eval_metrics: dict[str, float] | None = None,
                 metric_names: dict[str, str] | None = None, dataset: str | None = None,
                 merge_adapters: bool = True) -> Path:
    """Save ``student`` and ``processor`` into ``out/student`` (written aside, then renamed into place) with a
    model card (``metadata``; ``card_results`` as its results table; ``eval_metrics``, e.g. ``{"wer": 0.12}`` on
    the held-out audio, as its metadata's evaluation results, named by ``metric_names``; ``dataset``: the audio
    as given, a Hub dataset id or local); push the folder when ``args.push_to_hub``; write ``out/results.json``
    (``results`` plus the student folder, the upload and ``timings``, rounded, the total counted from
    ``started``). A LoRA student is saved as its adapters in ``adapter/`` and, with ``merge_adapters``, merged."""
    import shutil

    from hf_distill.students.peft_students import save_student as save_model_folder

    from hf_distill.checkpoints import publish_folder
    from hf_distill.hub import eval_results_from_metrics, hub_repo_id, push_student, write_model_card

    student_dir, staging = out / "student", out / "_saving-student"  # the student appears complete, or not at all
    shutil.rmtree(staging, ignore_errors=True)
    save_model_folder(student, staging, merge=merge_adapters)
    processor.save_pretrained(staging)
    hub_dataset = hub_repo_id(dataset, kind="dataset")
    evals = eval_results_from_metrics(
        {k: v for k, v in (eval_metrics or {}).items() if v is not None}, task_type="automatic-speech-recognition",
        dataset_type=hub_dataset or "custom", dataset_name=str(dataset or metadata.get("dataset")),
        dataset_split="held-out", names=metric_names)
    write_model_card(staging, metadata, results=card_results, eval_results=evals,
                     pipeline_tag="automatic-speech-recognition", datasets=[hub_dataset] if hub_dataset else [],
                     model_name=getattr(args, "hub_model_id", None) or f"{out.name}-student")
    publish_folder(staging, student_dir)
    results["student_dir"] = str(student_dir)
    timings["total (incl. imports)"] = time.perf_counter() - started
    results["timings"] = {k: round(v, 1) for k, v in timings.items()}
    pushed = push_student(student_dir, args, default_repo=out.name)
    if pushed:
        results["pushed_to"] = pushed
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    return student_dir


def harvard_demo_audio(n: int, engine: str, out: Path) -> Path:
    """Speak the first ``n`` Harvard sentences into ``out/audio`` (once); returns its manifest (path, text)."""
    import csv

    from accelerate import PartialState

    from hf_distill.speech.synth import harvard_sentences, synthesize

    folder = out / "audio"
    manifest = folder / "manifest.csv"
    with PartialState().main_process_first():
        if not manifest.is_file():
            clips = synthesize(harvard_sentences(n), folder, engine=engine, sampling_rate=16000, prefix="harvard")
            tmp = manifest.with_suffix(".tmp")
            with open(tmp, "w", newline="") as f:
                csv.writer(f).writerows([["path", "text"], *([path.name, text] for path, text in clips)])
            tmp.replace(manifest)
    return manifest


def spoken_bbc_recordings(recipe, out: Path) -> tuple[Path, Path]:
    """``--corpus bbc_news`` made once under ``out/corpus`` from ``recipe``'s corpus flags (``corpus_sentences``,
    ``corpus_voices``, ``eval_sentences``, ``eval_voices``, ``window_max_seconds``, ``window_max_clips``,
    ``corpus_seed``): (training recordings' manifest, held-out manifest)."""
    from accelerate import PartialState

    from hf_distill.speech.corpus import bbc_spoken_corpus, pack_windows, parse_voices

    folder = out / "corpus"
    with PartialState().main_process_first():
        clips, eval_manifest = bbc_spoken_corpus(
            folder, train_sentences=recipe.corpus_sentences, voices=parse_voices(recipe.corpus_voices),
            eval_sentences=recipe.eval_sentences, eval_voices=parse_voices(recipe.eval_voices), seed=recipe.corpus_seed)
        manifest = pack_windows(clips, folder / "windows", max_seconds=recipe.window_max_seconds,
                                max_clips=recipe.window_max_clips, seed=recipe.corpus_seed)
    return manifest, eval_manifest
