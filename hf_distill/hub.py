"""Model cards that record how a student was distilled, and pushing students to the Hub."""

from __future__ import annotations

import json
from pathlib import Path

import yaml


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def distillation_metadata(*, teacher: str, student_params: int, teacher_params: int | None = None,
                          dataset: str | None = None, args=None, layer_map: list[int] | None = None,
                          extra: dict | None = None) -> dict:
    """The facts a reader needs to reproduce a distillation run."""
    meta = {"teacher": teacher, "dataset": dataset, "student_parameters": student_params,
            "teacher_parameters": teacher_params, "teacher_layers_copied": layer_map}
    if args is not None:
        for name in ("temperature", "kd_weight", "task_weight", "cos_weight", "mse_weight", "hidden_mse_weight",
                     "hidden_layer_map", "restrict_kd_to_mask", "learning_rate", "per_device_train_batch_size",
                     "gradient_accumulation_steps", "num_train_epochs", "max_steps", "warmup_steps", "seed"):
            if hasattr(args, name):
                meta[name] = getattr(args, name)
    meta.update(extra or {})
    return meta


def write_model_card(output_dir: str | Path, meta: dict, *, results: dict | None = None,
                     pipeline_tag: str = "fill-mask", base_model: str | None = None) -> Path:
    """Write ``README.md`` (a Hub model card with YAML metadata) and ``distillation.json``."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    header = {"library_name": "transformers", "pipeline_tag": pipeline_tag, "tags": ["distillation", "hf-distill"]}
    if base_model or meta.get("teacher"):
        header["base_model"] = base_model or meta["teacher"]
    if meta.get("dataset"):
        header["datasets"] = [meta["dataset"]]
    ratio = ""
    if meta.get("teacher_parameters"):
        ratio = f" ({meta['student_parameters'] / meta['teacher_parameters']:.0%} of the teacher's)"
    lines = [
        "---", yaml.safe_dump(header, sort_keys=False).strip(), "---", "",
        f"# Student distilled from {meta.get('teacher')}", "",
        f"Distilled with hf-distill from **{meta.get('teacher')}** on **{meta.get('dataset')}**.",
        f"Parameters: {meta['student_parameters']:,}{ratio}.", "",
        "## Distillation settings", "", "| setting | value |", "| --- | --- |",
    ]
    for key, value in meta.items():
        if key not in ("teacher", "dataset") and value is not None:
            lines.append(f"| {key} | {value} |")
    if results:
        lines += ["", "## Results", "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {v} |" for k, v in results.items()]
    card = output_dir / "README.md"
    card.write_text("\n".join(lines) + "\n")
    (output_dir / "distillation.json").write_text(json.dumps({**meta, "results": results}, indent=2, default=str))
    return card


def push_folder(output_dir: str | Path, repo_id: str, *, token: str | None = None, private: bool | None = None,
                commit_message: str = "Upload distilled student") -> str:
    """Create ``repo_id`` if needed and upload the student folder (weights, tokenizer, model card)."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, exist_ok=True, private=private)
    info = api.upload_folder(folder_path=str(output_dir), repo_id=repo_id, commit_message=commit_message,
                             ignore_patterns=["checkpoint-*", "*.pt", "runs/*"])
    return str(getattr(info, "commit_url", info))
