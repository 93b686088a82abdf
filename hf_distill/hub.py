"""Model cards that record how a student was distilled, and pushing students to the Hub.

Cards are ``huggingface_hub`` :class:`~huggingface_hub.ModelCard` objects: their metadata is a
:class:`~huggingface_hub.ModelCardData` (``base_model`` = the teacher, ``datasets``, ``library_name``,
``pipeline_tag``, tags, and the evaluation results as :class:`~huggingface_hub.EvalResult` entries, the
card's ``model-index``); the body says what was distilled from what, with every setting in a table.
``distillation.json`` next to it holds the same facts for programs.

``base_model`` and ``datasets`` name Hub repositories only: the Hub refuses a card whose ``base_model``
is not a model id. A teacher given as a local folder is recorded in the body and in
``distillation.json``; when that folder is a Hub cache snapshot (``.../models--org--name/snapshots/...``)
its repository id is used.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

from .modeling import count_parameters

__all__ = [
    "build_model_card",
    "count_parameters",
    "distillation_metadata",
    "eval_results_from_metrics",
    "hub_repo_id",
    "push_folder",
    "push_student",
    "write_model_card",
]

TAGS = ("distillation", "knowledge-distillation", "hf-distill")
# Never uploaded with a student: checkpoints, staging / set-aside folders, pickles, TensorBoard runs.
UPLOAD_IGNORE = ["checkpoint-*", "_*", "*.pt", "*.pth", "training_args.bin", "runs/*"]
_CACHE_SNAPSHOT = re.compile(r"(models|datasets)--(?P<id>[^/\\]+)[/\\]snapshots[/\\]")
_NOT_METRICS = ("runtime", "per_second", "epoch", "step")
_FILE_SUFFIXES = (".csv", ".tsv", ".json", ".jsonl", ".txt", ".parquet", ".arrow", ".wav", ".flac", ".mp3")


def hub_repo_id(spec: str | os.PathLike | None, kind: str = "model") -> str | None:
    """The Hub repository id that ``spec`` (a teacher or dataset as given) names, or None for local data.

    A Hub id (``bert-base-uncased``, ``org/name``) that is not also a local path is returned as is; a
    Hub cache snapshot folder (``.../models--org--name/snapshots/<rev>``) gives ``org/name``; a name ending in a
    data-file suffix (``.csv``, ``.jsonl``, ``.wav``, ...) is a local file."""
    if spec is None:
        return None
    text = str(spec)
    match = _CACHE_SNAPSHOT.search(text.replace("\\", "/") + "/")
    if match and match.group(1) == f"{kind}s":
        return match.group("id").replace("--", "/")
    if text.startswith("package:") or os.path.exists(text) or text.lower().endswith(_FILE_SUFFIXES):
        return None
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError:
        return None
    return text


def distillation_metadata(*, teacher: str, student_params: int, teacher_params: int | None = None,
                          dataset: str | None = None, args=None, layer_map: list[int] | None = None,
                          extra: dict | None = None) -> dict:
    """The facts a reader needs to reproduce a distillation run."""
    meta = {"teacher": teacher, "dataset": dataset, "student_parameters": student_params,
            "teacher_parameters": teacher_params, "teacher_layers_copied": layer_map}
    if args is not None:
        for name in ("temperature", "kd_weight", "task_weight", "cos_weight", "mse_weight", "hidden_mse_weight",
                     "hidden_layer_map", "distillation", "restrict_kd_to_mask", "learning_rate",
                     "per_device_train_batch_size", "gradient_accumulation_steps", "num_train_epochs", "max_steps",
                     "warmup_steps", "seed"):
            if getattr(args, name, None) is not None:
                meta[name] = getattr(args, name)
    meta.update(extra or {})
    return meta


def eval_results_from_metrics(metrics: Mapping[str, Any], *, task_type: str, dataset_type: str, dataset_name: str,
                              dataset_split: str | None = None, dataset_config: str | None = None,
                              names: Mapping[str, str] | None = None) -> list:
    """One :class:`~huggingface_hub.EvalResult` per numeric entry of ``metrics`` (``eval_`` prefixes dropped;
    runtimes, throughputs, epochs and steps left out); ``names``: display names by metric."""
    from huggingface_hub import EvalResult

    results = []
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or any(s in key for s in _NOT_METRICS):
            continue
        metric = key[len("eval_"):] if key.startswith("eval_") else key
        results.append(EvalResult(task_type=task_type, dataset_type=dataset_type, dataset_name=dataset_name,
                                  dataset_split=dataset_split, dataset_config=dataset_config, metric_type=metric,
                                  metric_value=float(value), metric_name=(names or {}).get(key)))
    return results


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10_000:
        return f"{value:,}"
    return str(value)


def build_model_card(meta: Mapping[str, Any], *, results: Mapping[str, Any] | None = None,
                     eval_results: list | None = None, pipeline_tag: str = "fill-mask",
                     base_model: str | None = None, datasets: Iterable[str] | None = None,
                     model_name: str | None = None, tags: Iterable[str] = (), language: str | list[str] | None = None,
                     license: str | None = None, dataset_split: str | None = None):
    """The student's :class:`~huggingface_hub.ModelCard`: metadata as ``ModelCardData`` and a body with the
    distillation settings and ``results`` (a table; its numbers become ``eval_results`` unless given).

    ``base_model`` defaults to the teacher's Hub id and ``datasets`` (Hub dataset ids) to ``meta["dataset"]``
    when that is one; pass ``datasets=[]`` for local data."""
    from huggingface_hub import ModelCard, ModelCardData

    teacher = meta.get("teacher")
    base_model = base_model or hub_repo_id(teacher)
    if datasets is None:
        found = hub_repo_id(meta.get("dataset"), kind="dataset")
        datasets = [found] if found else None
    datasets = list(datasets) if datasets else None
    model_name = model_name or f"distilled from {teacher}"
    if eval_results is None and results:
        eval_results = eval_results_from_metrics(
            results, task_type=pipeline_tag, dataset_type=(datasets or ["custom"])[0],
            dataset_name=str(meta.get("dataset") or "custom"), dataset_split=dataset_split)
    data = ModelCardData(base_model=base_model, datasets=datasets, library_name="transformers",
                         pipeline_tag=pipeline_tag, tags=list(dict.fromkeys([*TAGS, *tags])), language=language,
                         license=license, model_name=model_name, eval_results=eval_results or None)
    ratio = ""
    if meta.get("teacher_parameters"):
        ratio = f" ({meta['student_parameters'] / meta['teacher_parameters']:.0%} of the teacher's)"
    lines = [
        f"# Student distilled from {teacher}", "",
        f"Distilled with hf-distill from **{teacher}** on **{meta.get('dataset')}**.",
        f"Parameters: {meta['student_parameters']:,}{ratio}.", "",
        "## Distillation settings", "", "| setting | value |", "| --- | --- |",
    ]
    lines += [f"| {k} | {v} |" for k, v in meta.items() if k not in ("teacher", "dataset") and v is not None]
    if results:
        lines += ["", "## Results", "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in results.items()]
    lines += ["", "`distillation.json` in this folder holds the same facts as JSON."]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n")


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_model_card(output_dir: str | Path, meta: dict, *, results: dict | None = None,
                     pipeline_tag: str = "fill-mask", base_model: str | None = None, **card_options) -> Path:
    """Write ``README.md`` (:func:`build_model_card`; ``card_options`` are its keyword arguments) and
    ``distillation.json`` into ``output_dir``; returns the card's path."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    card = build_model_card(meta, results=results, pipeline_tag=pipeline_tag, base_model=base_model, **card_options)
    path = output_dir / "README.md"
    _write_atomically(path, str(card))
    _write_atomically(output_dir / "distillation.json",
                      json.dumps({**meta, "results": results}, indent=2, default=str) + "\n")
    return path


def push_folder(output_dir: str | Path, repo_id: str, *, token: str | None = None, private: bool | None = None,
                commit_message: str = "Upload distilled student") -> str:
    """Create ``repo_id`` if needed and upload the student folder (weights, tokenizer, model card), never its
    checkpoints, staging folders or pickles. Returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, exist_ok=True, private=private)
    info = api.upload_folder(folder_path=str(output_dir), repo_id=repo_id, commit_message=commit_message,
                             ignore_patterns=list(UPLOAD_IGNORE))
    return str(getattr(info, "commit_url", info))


def push_student(folder: str | Path, args, *, default_repo: str | None = None) -> str | None:
    """``--push_to_hub``: upload ``folder`` to ``args.hub_model_id`` (default: ``default_repo`` or the folder's
    name) with ``args.hub_token`` / ``args.hub_private_repo``. Returns the commit URL, None without the flag."""
    if not getattr(args, "push_to_hub", False):
        return None
    repo = getattr(args, "hub_model_id", None) or default_repo or Path(folder).name
    if not (Path(folder) / "README.md").is_file():
        raise FileNotFoundError(f"{folder} has no README.md: write its model card (write_model_card) before pushing")
    return push_folder(folder, repo, token=getattr(args, "hub_token", None),
                       private=getattr(args, "hub_private_repo", None))
