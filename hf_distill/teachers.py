"""Teachers: loading, placement (device, precision, frozen), and caching their outputs.

A teacher is never trained, never wrapped for data parallelism and never saved with the student.
"""

from __future__ import annotations

import argparse
import inspect
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

TASK_AUTO_CLASSES = {
    "masked_lm": AutoModelForMaskedLM,
    "causal_lm": AutoModelForCausalLM,
    "seq2seq_lm": AutoModelForSeq2SeqLM,
    "sequence_classification": AutoModelForSequenceClassification,
    "token_classification": AutoModelForTokenClassification,
    "ctc": AutoModelForCTC,
    "base": AutoModel,
}

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def unwrap(model):
    """The underlying transformers model of a PEFT / DDP / compiled wrapper."""
    while True:
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        elif hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def task_kind(model) -> str:
    """Which kind of head a model has: masked_lm, causal_lm, seq2seq_lm, sequence/token_classification, base."""
    name = type(unwrap(model)).__name__
    config = unwrap(model).config
    if name.endswith("ForMaskedLM"):
        return "masked_lm"
    if name.endswith("ForCausalLM") or name.endswith("LMHeadModel"):
        return "causal_lm"
    if getattr(config, "is_encoder_decoder", False) and name.endswith("ForConditionalGeneration"):
        return "seq2seq_lm"
    if name.endswith("ForSequenceClassification"):
        return "sequence_classification"
    if name.endswith("ForTokenClassification"):
        return "token_classification"
    if name.endswith("ForCTC"):
        return "ctc"
    return "base"


def output_size(model) -> int | None:
    """Size of the output space (vocabulary or label set) a model's logits range over."""
    kind = task_kind(model)
    config = unwrap(model).config
    if kind in ("sequence_classification", "token_classification"):
        return config.num_labels
    emb = unwrap(model).get_output_embeddings() if hasattr(unwrap(model), "get_output_embeddings") else None
    if emb is not None and hasattr(emb, "weight"):
        return emb.weight.shape[0]
    return getattr(config, "vocab_size", None)


def hidden_size(model) -> int | None:
    config = unwrap(model).config
    for attr in ("hidden_size", "d_model", "dim", "n_embd"):
        if getattr(config, attr, None):
            return getattr(config, attr)
    return None


def num_hidden_states(model) -> int | None:
    """Number of tensors in ``output_hidden_states`` (layers + embeddings)."""
    config = unwrap(model).config
    for attr in ("num_hidden_layers", "n_layers", "n_layer", "decoder_layers"):
        if getattr(config, attr, None):
            return getattr(config, attr) + 1
    return None


def forward_parameters(model) -> set[str] | None:
    """Named parameters of ``model.forward`` (None when it takes arbitrary keyword arguments only)."""
    params = inspect.signature(unwrap(model).forward).parameters
    names = {n for n, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    return names or None


def load_teacher(name_or_path: str | Path, *, task: str = "base", dtype: str = "float32", **kwargs) -> PreTrainedModel:
    """Load a teacher with the auto class of ``task`` (the student's kind of head)."""
    auto_cls = TASK_AUTO_CLASSES.get(task, AutoModel)
    load_kwargs = dict(kwargs)
    if dtype != "auto":
        load_kwargs["dtype"] = _DTYPES[dtype]
    else:
        load_kwargs["dtype"] = "auto"
    return auto_cls.from_pretrained(str(name_or_path), **load_kwargs)


def place_teacher(teacher: PreTrainedModel, device: torch.device | str, dtype: str = "float32") -> PreTrainedModel:
    """Move a teacher to ``device`` in ``dtype``, in eval mode, with every parameter frozen."""
    teacher = teacher.to(device)
    if dtype != "auto":
        teacher = teacher.to(_DTYPES[dtype])
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


def check_same_vocabulary(student_tokenizer, teacher_tokenizer) -> None:
    """Raise ValueError naming the differences when two tokenizers map tokens to different ids."""
    if student_tokenizer is None or teacher_tokenizer is None:
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
    """``hf-distill cache-teacher``: store a classification teacher's logits next to a tokenized dataset."""
    from datasets import load_from_disk
    from transformers import AutoTokenizer, DataCollatorWithPadding

    parser = argparse.ArgumentParser(prog="hf-distill cache-teacher", description=cli_main.__doc__)
    parser.add_argument("--teacher", required=True, help="teacher directory or Hub id")
    parser.add_argument("--dataset", required=True, help="tokenized dataset saved with save_to_disk")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--batch_size", type=int, default=32)
    args = parser.parse_args(argv)
    teacher = load_teacher(args.teacher, task="sequence_classification")
    tokenizer = AutoTokenizer.from_pretrained(args.teacher)
    dataset = load_from_disk(args.dataset)
    cached = cache_teacher_logits(teacher, dataset, DataCollatorWithPadding(tokenizer), batch_size=args.batch_size)
    cached.save_to_disk(args.output_dir)
    print(f"stored teacher logits for {len(cached)} examples in {args.output_dir}")
    return 0
