"""Arguments from YAML/JSON files and CLI flags (flags win), and the model card."""

import json

import pytest
from transformers import HfArgumentParser

from hf_distill import DistillationArguments
from hf_distill.arguments import parse_layer_map
from hf_distill.config import parse_config_and_args
from hf_distill.hub import distillation_metadata, push_folder, write_model_card


def test_yaml_then_flags_override(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("output_dir: out\ntemperature: 4.0\nkd_weight: 1.5\nlearning_rate: 5.0e-4\nrestrict_kd_to_mask: true\n")
    (args,) = parse_config_and_args((DistillationArguments,), ["--config", str(cfg), "--kd_weight", "3.0"])
    assert args.temperature == 4.0 and args.kd_weight == 3.0 and args.learning_rate == 5e-4
    assert args.restrict_kd_to_mask is True and args.output_dir == "out"
    assert args.cos_weight == 1.0 and args.task_weight == 2.0  # DistilBERT defaults


def test_json_config_and_unknown_key(tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"output_dir": "o", "temprature": 3}))
    with pytest.raises(ValueError, match="temprature"):
        parse_config_and_args((DistillationArguments,), [f"--config={cfg}"])


def test_hf_argument_parser_cli_and_yaml(tmp_path):
    parser = HfArgumentParser(DistillationArguments)
    (args,) = parser.parse_args_into_dataclasses(["--output_dir", "x", "--teacher_dtype", "bfloat16",
                                                  "--hidden_layer_map", "3:6,6:12"])
    assert args.teacher_dtype == "bfloat16" and args.layer_pairs == [(3, 6), (6, 12)]
    cfg = tmp_path / "a.yaml"
    cfg.write_text("output_dir: y\ntemperature: 1.0\n")
    (args,) = parser.parse_yaml_file(str(cfg))
    assert args.temperature == 1.0


def test_argument_validation():
    with pytest.raises(ValueError, match="temperature"):
        DistillationArguments(output_dir="x", temperature=0)
    with pytest.raises(ValueError, match="student:teacher"):
        parse_layer_map("3-6")


def test_model_card_records_distillation(tmp_path):
    args = DistillationArguments(output_dir=str(tmp_path))
    meta = distillation_metadata(teacher="bert-base-uncased", dataset="wikitext", student_params=66_000_000,
                                 teacher_params=110_000_000, args=args, layer_map=[0, 2, 4, 7, 9, 11])
    card = write_model_card(tmp_path / "student", meta, results={"eval_loss": 1.23}).read_text()
    assert card.startswith("---") and "base_model: bert-base-uncased" in card
    for needle in ("| temperature | 2.0 |", "| kd_weight | 5.0 |", "[0, 2, 4, 7, 9, 11]", "66,000,000", "60%",
                   "| eval_loss | 1.23 |"):
        assert needle in card, needle
    saved = json.loads((tmp_path / "student" / "distillation.json").read_text())
    assert saved["teacher_layers_copied"] == [0, 2, 4, 7, 9, 11]


def test_push_folder_uploads_the_student(tmp_path, monkeypatch):
    calls = {}

    class FakeApi:
        def __init__(self, token=None):
            calls["token"] = token

        def create_repo(self, repo_id, exist_ok, private):
            calls["repo"] = repo_id

        def upload_folder(self, folder_path, repo_id, commit_message, ignore_patterns):
            calls["folder"] = folder_path
            return type("Info", (), {"commit_url": f"https://hub/{repo_id}/commit/1"})()

    import huggingface_hub
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    url = push_folder(tmp_path, "me/student", token="t")
    assert calls == {"token": "t", "repo": "me/student", "folder": str(tmp_path)} and url.endswith("/commit/1")
