"""Arguments from YAML/JSON files and CLI flags (flags win), and the model card."""

import json
import math
from dataclasses import dataclass

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


# ------------------------------------------------------------------ values of the wrong type or shape
@dataclass
class RecipeArgs:
    student_layers: str = "2"
    train_files: list[str] | None = None
    max_train_samples: int | None = None
    baseline: bool = True
    wer_threshold: float = 0.1


def parse_yaml(tmp_path, text, *flags):
    cfg = tmp_path / "config.yaml"
    cfg.write_text("output_dir: out\n" + text + "\n")
    return parse_config_and_args((RecipeArgs, DistillationArguments), ["--config", str(cfg), *flags])


@pytest.mark.parametrize("line, message", [
    ("temperature: [1, 2]", r"temperature: expected a number, got \[1, 2\] in .*config.yaml"),
    ("learning_rate: [1, 2]", r"learning_rate: expected a number, got \[1, 2\]"),
    ("seed: 1.7", r"seed: expected an integer, got 1.7 in .*config.yaml"),
    ("seed: true", r"seed: expected an integer, got true"),
    ("num_train_epochs: abc", r"num_train_epochs: expected a number, got 'abc'"),
    ("temperature:", r"temperature: expected a number, got an empty value"),
    ("temperature: {a: 1}", r"temperature: expected a number, got \{'a': 1\}"),
    ("kd_weight: .nan", r"kd_weight: expected a finite number, got nan"),
    ("kd_weight: .inf", r"kd_weight: expected a finite number \(infinity means nothing here\), got inf"),
    ("adam_beta1: .nan", r"adam_beta1: expected a finite number"),
    ("baseline: maybe", r"baseline: expected true or false, got 'maybe'"),
    ("baseline: 2", r"baseline: expected true or false, got 2"),
    ("max_train_samples: 1.5", r"max_train_samples: expected an integer \(or empty\), got 1.5"),
    ("student_layers: [0, 2, 4]", r"student_layers: expected a string, got \[0, 2, 4\] \(write a list as one string: '0,2,4'\)"),
    ("teacher_weights: [1, 2]", r"teacher_weights: expected a string \(or empty\), got \[1, 2\]"),
    ("teacher_dtype: fp8", r"teacher_dtype: expected one of float32, bfloat16, float16, auto, got 'fp8'"),
    ("multi_teacher: avg", r"multi_teacher: expected one of average, separate, got 'avg'"),
    ("lr_scheduler_type: cosin", r"lr_scheduler_type: expected one of linear, cosine, .*got 'cosin'"),
    ("save_strategy: [epoch]", r"save_strategy: expected one of no, steps, epoch, best, got \['epoch'\]"),
    ("distillation: [kl, cos]", r"distillation: expected a list of terms such as \[\{loss: kl, weight: 5.0\}\], "
                                r"got \['kl', 'cos'\]"),
    ("hidden_layer_map: [1, 2]", r"hidden_layer_map: expected student:teacher pairs"),
    ("train_files: {a: 1}", r"train_files: expected a list of strings \(or empty\)"),
])
def test_config_value_of_the_wrong_type_is_named(tmp_path, line, message):
    with pytest.raises(ValueError, match=message):
        parse_yaml(tmp_path, line)


def test_every_wrong_value_of_a_file_in_one_message(tmp_path):
    with pytest.raises(ValueError, match=r"^seed: expected an integer, got 1.7; temperature: expected a number, "
                                         r"got \[1, 2\] in .*config.yaml$"):
        parse_yaml(tmp_path, "seed: 1.7\ntemperature: [1, 2]")


def test_config_values_converted_as_the_command_line_would(tmp_path):
    recipe, args = parse_yaml(tmp_path, "\n".join([
        "learning_rate: 1e-4",          # PyYAML reads this as a string; the flag would accept it
        "temperature: 3",               # an int for a float field
        "seed: 7.0",                    # an integral float for an int field
        "restrict_kd_to_mask: 'true'",  # a quoted bool, read as --restrict_kd_to_mask true
        "baseline: 'no'",
        "save_strategy: no",            # YAML's boolean false, written for the string 'no'
        "hidden_layer_map: 6:12",       # YAML 1.1 would read 6*60+12 = 372
        "student_layers: 2",            # a number for a string field: as written
        "train_files: a.txt",           # one value for a list field, as after --train_files
        "max_grad_norm: .inf",          # no clipping: infinity means something here
        "wer_threshold: .inf",
        "max_train_samples:",           # empty value for an Optional field: None
        "distillation: [{loss: kl, weight: 5}]",
    ]))
    assert args.learning_rate == 1e-4 and isinstance(args.learning_rate, float)
    assert args.temperature == 3.0 and isinstance(args.temperature, float)
    assert args.seed == 7 and isinstance(args.seed, int)
    assert args.restrict_kd_to_mask is True and recipe.baseline is False
    assert args.save_strategy == "no" and args.layer_pairs == [(6, 12)]
    assert recipe.student_layers == "2" and recipe.train_files == ["a.txt"]
    assert args.max_grad_norm == math.inf and recipe.wer_threshold == math.inf and recipe.max_train_samples is None
    assert args.distillation == [{"loss": "kl", "weight": 5}]


def test_flags_win_over_the_file_even_when_they_repeat_the_default(tmp_path):
    recipe, args = parse_yaml(tmp_path, "kd_weight: 3\nbaseline: false", "--kd_weight", "5.0", "--baseline")
    assert args.kd_weight == 5.0 and recipe.baseline is True
    recipe, args = parse_yaml(tmp_path, "kd_weight: 3\nbaseline: true", "--no_baseline")
    assert args.kd_weight == 3.0 and recipe.baseline is False


def test_non_finite_flag_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_config_and_args((DistillationArguments,), ["--output_dir", str(tmp_path), "--kd_weight", "nan"])
    assert exit_info.value.code == 2
    assert "argument --kd_weight/--kd-weight: expected a finite number, got 'nan'" in capsys.readouterr().err
    (args,) = parse_config_and_args((DistillationArguments,), ["--output_dir", str(tmp_path), "--max_grad_norm", "inf"])
    assert args.max_grad_norm == math.inf


def test_unknown_flag_is_one_error(tmp_path):
    with pytest.raises(ValueError, match=r"unrecognised arguments: --temprature 3"):
        parse_config_and_args((DistillationArguments,), ["--output_dir", str(tmp_path), "--temprature", "3"])


@pytest.mark.parametrize("text, error, message", [
    ("", ValueError, r"config file .*config.yaml is empty; write one `name: value` line"),
    ("# only a comment\n", ValueError, r"is empty"),
    ("- output_dir\n", ValueError, r"must hold a mapping of argument names to values .*got a list"),
    ("output_dir: o\ntemperature: 2\ntemperature: 3\n", ValueError,
     r"keys given more than once in .*config.yaml: temperature \(lines 2, 3\); keep one of each"),
    ("output_dir: o\ntemperature: [1, 2\n", ValueError, r"cannot read .*config.yaml as YAML: .* at line 3, column 1"),
])
def test_config_file_that_cannot_be_read(tmp_path, text, error, message):
    cfg = tmp_path / "config.yaml"
    cfg.write_text(text)
    with pytest.raises(error, match=message):
        parse_config_and_args((DistillationArguments,), ["--config", str(cfg)])


def test_json_config_checked_the_same_way(tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text('{"output_dir": "o", "seed": 1.7}')
    with pytest.raises(ValueError, match=r"seed: expected an integer, got 1.7 in .*c.json"):
        parse_config_and_args((DistillationArguments,), ["--config", str(cfg)])
    cfg.write_text('{"output_dir": "o", "seed": 1, "seed": 2}')
    with pytest.raises(ValueError, match=r"keys given more than once in .*c.json: seed"):
        parse_config_and_args((DistillationArguments,), ["--config", str(cfg)])
    cfg.write_text('{"output_dir": "o",}')
    with pytest.raises(ValueError, match=r"cannot read .*c.json as JSON: .* at line 1"):
        parse_config_and_args((DistillationArguments,), ["--config", str(cfg)])
    with pytest.raises(IsADirectoryError, match="is a folder"):
        parse_config_and_args((DistillationArguments,), ["--config", str(tmp_path)])
    with pytest.raises(ValueError, match=r"unknown keys in .*: temprature \(did you mean temperature\?\)"):
        cfg.write_text('{"output_dir": "o", "temprature": 1}')
        parse_config_and_args((DistillationArguments,), ["--config", str(cfg)])
