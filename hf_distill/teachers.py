"""Teachers: loading, placement (device, precision, frozen), and caching their outputs.

A teacher is never trained, never wrapped for data parallelism and never saved with the student.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForCTC,
    AutoModelForMaskedLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    PreTrainedModel,
)

from .data.paths import check_local_path
from .modeling import forward_parameters, task_kind, unwrap

__all__ = [
    "cache_teacher_logits",
    "check_model_path",
    "check_same_vocabulary",
    "find_teacher_tokenizer",
    "load_teacher",
    "place_teacher",
    "teacher_mixture_weights",
]

TASK_AUTO_CLASSES = {
    "masked_lm": AutoModelForMaskedLM,
    "causal_lm": AutoModelForCausalLM,
    "seq2seq_lm": AutoModelForSeq2SeqLM,
    "sequence_classification": AutoModelForSequenceClassification,
    "token_classification": AutoModelForTokenClassification,
    "ctc": AutoModelForCTC,
    "base": AutoModel,
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model")


def check_model_path(name_or_path: str | Path, what: str = "teacher") -> str:
    """Fail early, with a message, on a model path that cannot be a model: a missing local folder, a file,
    or a folder without ``config.json``. Hub ids (``org/name``) pass through."""
    name = os.fspath(name_or_path)
    if not name.strip():
        raise ValueError(f"the {what} path is empty; give a model directory or a Hub id such as org/name")
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise NotADirectoryError(f"{what} {name!r} is a file, not a model directory (a folder with config.json "
                                     "and weights, as written by save_pretrained)")
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{what} directory {name!r} has no config.json: it is not a saved transformers "
                                    "model (save one with model.save_pretrained(dir))")
        return str(path)
    check_local_path(name, what=what)  # a name that can only be a local path, and nothing there
    return name


def load_teacher(name_or_path: str | Path, *, task: str = "auto", dtype: str = "float32",
                 trust_remote_code: bool = False, **kwargs) -> PreTrainedModel:
    """Load a teacher from a directory or Hub id with the auto class of ``task``.

    ``task`` is the student's kind of head (``masked_lm``, ``sequence_classification``, ...), or
    ``auto`` for the class the checkpoint was saved with. Weights load from safetensors where the
    checkpoint has them; ``trust_remote_code`` stays off unless asked. A teacher whose output head
    (or any other weight) would be newly initialised because the checkpoint lacks it is an error:
    a random head gives random soft targets.
    """
    import transformers
    from transformers import AutoConfig

    name = check_model_path(name_or_path)
    if dtype not in (*DTYPES, "auto"):
        raise ValueError(f"teacher dtype must be one of {sorted(DTYPES)} or 'auto', got {dtype!r}")
    if task != "auto" and task not in TASK_AUTO_CLASSES:
        raise ValueError(f"unknown teacher task {task!r}; choose auto or one of {', '.join(TASK_AUTO_CLASSES)}")
    load_kwargs = {"dtype": DTYPES.get(dtype, "auto"), "trust_remote_code": trust_remote_code, **kwargs}
    try:
        if task == "auto":
            config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
            classes = [getattr(transformers, a, None) for a in getattr(config, "architectures", None) or []]
            auto_cls = next((c for c in classes if c is not None), AutoModel)
        else:
            auto_cls = audio_auto_class(name, task, trust_remote_code) or TASK_AUTO_CLASSES[task]
        model, info = auto_cls.from_pretrained(name, output_loading_info=True, **load_kwargs)
    except RuntimeError as exc:
        if "mismatched" not in str(exc):
            raise
        raise ValueError(f"the teacher {name!r} has weights of other shapes than {task!r} asks for (e.g. another "
                         "number of labels); their replacements would be randomly initialised. Load it with its own "
                         "configuration, or fine-tune it for this head first") from None
    except OSError as exc:
        raise FileNotFoundError(f"cannot load the teacher {name!r}: {str(exc).splitlines()[0]} (give a local "
                                "directory with config.json and weights, or a Hub id that is in the local cache "
                                "when offline)") from exc
    new = sorted(set(info.get("missing_keys") or ()) | {k[0] if isinstance(k, tuple) else k
                                                        for k in info.get("mismatched_keys") or ()})
    if new:
        raise ValueError(
            f"the teacher {name!r} has no trained weights for {len(new)} tensor(s) of {type(model).__name__} "
            f"(e.g. {new[:4]}): they would be randomly initialised, and a teacher with a random head gives random "
            f"soft targets. Give a checkpoint saved with this head (task {task!r}), or fine-tune the teacher first")
    return model


def audio_auto_class(name: str, task: str, trust_remote_code: bool = False):
    """The audio auto class for a speech checkpoint whose head is of kind ``task`` (a Whisper teacher of a
    ``seq2seq_lm`` student is an ``AutoModelForSpeechSeq2Seq``, an audio classifier an
    ``AutoModelForAudioClassification``), or None for a text checkpoint."""
    from transformers import AutoConfig, AutoModelForAudioClassification, AutoModelForSpeechSeq2Seq
    from transformers.models.auto import modeling_auto as auto

    audio = {"seq2seq_lm": (auto.MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES,
                            auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES, AutoModelForSpeechSeq2Seq),
             "sequence_classification": (auto.MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES,
                                         auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
                                         AutoModelForAudioClassification)}
    if task not in audio:
        return None
    speech_names, text_names, auto_cls = audio[task]
    model_type = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code).model_type
    return auto_cls if model_type in speech_names and model_type not in text_names else None


def find_teacher_tokenizer(teacher):
    """The tokenizer saved with a teacher (a path, or a model loaded from a local folder or the Hub cache), or None."""
    from transformers import AutoTokenizer

    source = teacher if isinstance(teacher, (str, os.PathLike)) else getattr(unwrap(teacher), "name_or_path", None)
    if not source:
        return None
    source = os.fspath(source)
    if os.path.isdir(source) and not any((Path(source) / f).exists() for f in TOKENIZER_FILES):
        return None
    try:
        return AutoTokenizer.from_pretrained(source, local_files_only=True)
    except Exception:  # noqa: BLE001 - a teacher without tokenizer files is normal; the check is then skipped
        return None


def teacher_mixture_weights(weights: list[float] | None, count: int) -> list[float]:
    """Normalised weights of ``count`` teachers (equal when none are given)."""
    if not weights:
        return [1.0 / max(count, 1)] * max(count, 1)
    if count and len(weights) != count:
        raise ValueError(f"teacher_weights has {len(weights)} entries but there are {count} teachers; give one "
                         "weight per teacher")
    total = sum(weights)
    return [w / total for w in weights]


def place_teacher(teacher: PreTrainedModel, device: torch.device | str, dtype: str = "float32") -> PreTrainedModel:
    """Move a teacher to ``device`` in ``dtype``, in eval mode, with every parameter frozen."""
    teacher = teacher.to(device)
    if dtype != "auto":
        teacher = teacher.to(DTYPES[dtype])
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


def check_same_vocabulary(student_tokenizer, teacher_tokenizer) -> None:
    """Raise ValueError naming the differences when two tokenizers map tokens to different ids."""
    student_tokenizer = getattr(student_tokenizer, "tokenizer", student_tokenizer)  # processors hold one
    teacher_tokenizer = getattr(teacher_tokenizer, "tokenizer", teacher_tokenizer)
    if not hasattr(student_tokenizer, "get_vocab") or not hasattr(teacher_tokenizer, "get_vocab"):
        return
    sv, tv = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    if sv == tv:
        return
    only_s = sorted(set(sv) - set(tv))
    only_t = sorted(set(tv) - set(sv))
    moved = sorted(t for t in set(sv) & set(tv) if sv[t] != tv[t])
    raise ValueError(
        "student and teacher tokenizers differ, so token-level soft targets would be compared across different "
        f"tokens: {len(sv)} vs {len(tv)} tokens; {len(only_s)} only in the student (e.g. {only_s[:5]}), "
        f"{len(only_t)} only in the teacher (e.g. {only_t[:5]}), {len(moved)} with different ids (e.g. {moved[:5]}). "
        "Build the student with the teacher's tokenizer (hf-distill init-student does this)."
    )


@torch.no_grad()
def cache_teacher_logits(
    teacher: PreTrainedModel,
    dataset,
    data_collator,
    *,
    batch_size: int = 32,
    column: str = "teacher_logits",
    device: str | torch.device | None = None,
    desc: str = "teacher logits",
):
    """Run ``teacher`` once over ``dataset`` and return it with a ``column`` of per-example logits.

    Meant for sequence classification (a few floats per example): training then never runs the
    teacher. Rows keep their order; padding in the collated batch does not reach the stored values.
    """
    if task_kind(teacher) != "sequence_classification":
        raise ValueError(
            "cache_teacher_logits stores one logit vector per example and supports sequence-classification "
            f"teachers; got a {task_kind(teacher)} model"
        )
    device = device or next(teacher.parameters()).device
    was_training = teacher.training
    grad_flags = [p.requires_grad for p in teacher.parameters()]
    teacher.to(device).eval()
    accepted = forward_parameters(teacher)
    drop = [c for c in dataset.column_names if c == column]
    base = dataset.remove_columns(drop) if drop else dataset
    model_columns = [c for c in base.column_names if accepted is None or c in accepted]
    rows = []
    for start in tqdm(range(0, len(base), batch_size), desc=desc, unit="batch"):
        chunk = base.select(range(start, min(start + batch_size, len(base))))
        features = [{k: ex[k] for k in model_columns if k not in ("labels", "label")} for ex in chunk]
        batch = {k: v.to(device) for k, v in data_collator(features).items() if torch.is_tensor(v)}
        batch = {k: v for k, v in batch.items() if accepted is None or k in accepted}
        rows.extend(teacher(**batch).logits.float().cpu().tolist())
    teacher.train(was_training)  # leave the caller's model as it was
    for p, flag in zip(teacher.parameters(), grad_flags):
        p.requires_grad_(flag)
    return base.add_column(column, rows)


def cli_main(argv: list[str]) -> int:
    """``hf-distill cache-teacher``: the teacher-output store's command (:mod:`hf_distill.store.cli`)."""
    from .store.cli import cli_main as store_cli_main

    return store_cli_main(argv)
