"""Checkpoints: visible only when complete (a real SIGKILL in the middle of a save), resumes refused when the
settings differ (and accepted with start_fresh), finished runs not trained further, safe loading."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hf_distill import DistillationArguments, DistillationTrainer
from hf_distill.checkpoints import (
    LEGACY_OBJECTIVE_STATE,
    OBJECTIVE_STATE,
    SETTINGS_NAME,
    last_complete_checkpoint,
    settings_differences,
)
from tiny import make_wordpiece_tokenizer, sample_texts, tiny_bert_mlm

TESTS = Path(__file__).resolve().parent
NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def tiny_run(output_dir, *, kill_at: int | None = None, teacher_seed: int = 0, student_layers: int = 1,
             student_hidden: int = 32, resume=True, with_eval: bool = False, trainer_class=DistillationTrainer,
             **overrides) -> DistillationTrainer:
    """Distil a 2-layer tiny BERT into a smaller one for a few steps (saving every 2), resuming by default.
    ``kill_at``: SIGKILL this process in the middle of the save of that step (weights written, the optimizer,
    RNG and trainer states not yet)."""
    torch.set_num_threads(1)
    tok = make_wordpiece_tokenizer()
    teacher = tiny_bert_mlm(len(tok), layers=2, hidden=32, seed=teacher_seed, **NO_DROPOUT)
    student = tiny_bert_mlm(len(tok), layers=student_layers, hidden=student_hidden, seed=1, **NO_DROPOUT)
    enc = tok(sample_texts(48, seed=3), truncation=True, max_length=16, padding="max_length", return_tensors="pt")
    data = [{"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i],
             "labels": enc["input_ids"][i]} for i in range(48)]
    settings = dict(output_dir=str(output_dir), max_steps=6, save_steps=2, per_device_train_batch_size=4,
                    learning_rate=1e-3, use_cpu=True, report_to="none", disable_tqdm=True, logging_steps=1,
                    dataloader_num_workers=0, seed=0)
    settings.update(overrides)
    trainer = trainer_class(model=student, teacher=teacher, args=DistillationArguments(**settings),
                            train_dataset=data, eval_dataset=data[:8] if with_eval else None, processing_class=tok,
                            teacher_processing_class=tok)
    if kill_at is not None:
        from transformers import Trainer

        original = Trainer._save_optimizer_and_scheduler

        def save_then_die(self, folder):
            if self.state.global_step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            original(self, folder)

        Trainer._save_optimizer_and_scheduler = save_then_die
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def student_weights(trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def assert_same(a: dict, b: dict, atol=1e-6):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=atol), k


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    return out, student_weights(tiny_run(out))


# ---------------------------------------------------------------------------------------------- item 3: kills
def test_sigkill_during_a_save_leaves_no_checkpoint_and_the_rerun_resumes_the_last_complete_one(
        uninterrupted, tmp_path, caplog):
    out = tmp_path / "run"
    code = f"import sys; sys.path.insert(0, {str(TESTS)!r}); import test_checkpoints as t; " \
           f"t.tiny_run({str(out)!r}, kill_at=4)"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(TESTS.parent)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    # Killed with the weights of step 4 written but not its trainer state: no checkpoint-4 exists.
    assert sorted(p.name for p in out.iterdir()) == ["_saving-checkpoint-4", "checkpoint-2"]
    assert (out / "_saving-checkpoint-4" / "checkpoint-4" / "model.safetensors").is_file()
    assert last_complete_checkpoint(out) == str(out / "checkpoint-2")

    with caplog.at_level(logging.INFO, logger="hf_distill.checkpoints"):
        resumed = tiny_run(out)
    assert f"resuming from {out / 'checkpoint-2'}" in caplog.text
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    assert resumed.state.global_step == 6
    assert_same(student_weights(resumed), uninterrupted[1])  # the same student as a run never killed


def test_an_incomplete_checkpoint_folder_is_skipped_with_a_warning(uninterrupted, tmp_path, caplog):
    """A checkpoint-N without trainer_state.json (what a kill left before: plain Trainer, older versions)."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(uninterrupted[0], out)
    (out / "checkpoint-6" / "trainer_state.json").unlink()
    with caplog.at_level(logging.INFO, logger="hf_distill.checkpoints"):
        resumed = tiny_run(out)
    assert "skipping" in caplog.text and "checkpoint-6" in caplog.text and "trainer_state.json" in caplog.text
    assert f"resuming from {out / 'checkpoint-4'}" in caplog.text
    assert (out / "_incomplete-checkpoint-6" / "model.safetensors").is_file()  # moved aside, not deleted
    assert json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())["global_step"] == 6
    assert_same(student_weights(resumed), uninterrupted[1])


def test_extending_a_run_is_a_resume(tmp_path, caplog):
    out = tmp_path / "run"
    tiny_run(out, max_steps=4, logging_steps=2, save_steps=4)
    with caplog.at_level(logging.INFO, logger="hf_distill.checkpoints"):
        longer = tiny_run(out, max_steps=6, logging_steps=1, save_steps=2, eval_strategy="no")
    assert f"resuming from {out / 'checkpoint-4'}" in caplog.text and longer.state.global_step == 6


def test_rotation_and_best_checkpoint_name_the_final_folders(tmp_path):
    out = tmp_path / "run"
    trainer = tiny_run(out, save_total_limit=1, eval_strategy="steps", eval_steps=2, load_best_model_at_end=True,
                       metric_for_best_model="loss", with_eval=True)
    best = trainer.state.best_model_checkpoint
    assert best is not None and "_saving" not in best and Path(best).parent == out and Path(best).is_dir()
    kept = sorted(p.name for p in out.iterdir())
    assert "checkpoint-6" in kept and len(kept) <= 2 and all(p.startswith("checkpoint-") for p in kept)


def test_hub_pushes_of_checkpoints_start_once_the_checkpoint_is_in_place(tmp_path, monkeypatch):
    from transformers import Trainer

    pushed = []

    def record(self, folder):
        pushed.append((folder, (Path(folder) / "trainer_state.json").is_file(), Path(folder).parent == tmp_path / "run"))

    monkeypatch.setattr(Trainer, "init_hf_repo", lambda self, *a, **k: None)
    monkeypatch.setattr(Trainer, "_push_from_checkpoint", record)
    monkeypatch.setattr(Trainer, "_finish_current_push", lambda self: None)
    tiny_run(tmp_path / "run", max_steps=4, push_to_hub=True, hub_model_id="me/x")
    assert pushed == [(str(tmp_path / "run" / f"checkpoint-{n}"), True, True) for n in (2, 4)]


def test_resuming_a_finished_run_trains_no_further(uninterrupted, caplog):
    out, weights = uninterrupted
    with caplog.at_level(logging.INFO, logger="hf_distill.checkpoints"):
        again = tiny_run(out)
    assert "nothing left to train" in caplog.text
    assert again.state.global_step == 6 and not (out / "checkpoint-7").exists()  # plain Trainer: one step more
    assert_same(student_weights(again), weights)


# ---------------------------------------------------------------------------------------------- item 4: settings
@pytest.mark.parametrize("change, difference", [
    (dict(temperature=4.0), "temperature: 2.0 in the checkpoint, 4.0 now"),
    (dict(kd_weight=1.0), "kd_weight: 5.0 in the checkpoint, 1.0 now"),
    (dict(distillation='[{"loss": "kl", "weight": 2}]'), "objective[0].weight: 5.0 in the checkpoint, 2.0 now"),
    (dict(student_layers=2), "student.num_hidden_layers: 1 in the checkpoint, 2 now"),
    (dict(teacher_seed=5), "teacher[0].weights: other weights in the checkpoint than now"),
    (dict(learning_rate=5e-4), "learning_rate: 0.001 in the checkpoint, 0.0005 now"),
    (dict(gradient_accumulation_steps=2), "gradient_accumulation_steps: 1 in the checkpoint, 2 now"),
    (dict(teacher_dtype="bfloat16"), 'teacher_dtype: "float32" in the checkpoint, "bfloat16" now'),
])
def test_a_resume_with_other_settings_is_refused_before_any_step(uninterrupted, tmp_path, change, difference):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(uninterrupted[0], out)
    steps = []

    class Spy(DistillationTrainer):
        def training_step(self, *args, **kwargs):
            steps.append(1)
            return super().training_step(*args, **kwargs)

    with pytest.raises(ValueError) as err:
        tiny_run(out, max_steps=8, trainer_class=Spy, **change)
    message = str(err.value)
    assert difference in message and "--start_fresh" in message and "checkpoint-6" in message
    assert "\n" not in message  # one line for the command line
    assert steps == [] and not (out / "checkpoint-8").exists()


def test_start_fresh_sets_the_old_checkpoints_aside_and_trains_from_scratch(uninterrupted, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(uninterrupted[0], out)
    fresh = tiny_run(out, temperature=4.0, start_fresh=True)
    clean = tiny_run(tmp_path / "clean", temperature=4.0)
    assert_same(student_weights(fresh), student_weights(clean))  # nothing of the old run was resumed
    aside = [p for p in out.iterdir() if p.name.startswith("_replaced-")]
    assert sorted(p.name for p in out.iterdir() if p not in aside) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    assert len(aside) == 1 and sorted(p.name for p in aside[0].iterdir()) == ["checkpoint-2", "checkpoint-4",
                                                                              "checkpoint-6"]
    record = json.loads((out / "checkpoint-6" / SETTINGS_NAME).read_text())
    assert record["compared"]["temperature"] == 4.0 and record["step"] == 6
    with pytest.raises(ValueError, match="start_fresh is set but resume_from_checkpoint"):
        tiny_run(out, temperature=4.0, start_fresh=True, resume=str(out / "checkpoint-2"))


def test_settings_differences_compare_fingerprints_with_a_tolerance():
    saved = {"temperature": 2.0, "teacher[0].weights": [10.0, 1.0, 2.0], "objective[0].options": {"beta": 0.5}}
    same = {"temperature": 2.0, "teacher[0].weights": [10.0, 1.0 + 1e-9, 2.0], "objective[0].options": {"beta": 0.5}}
    assert settings_differences(saved, same) == []
    other = {"temperature": 2.0, "teacher[0].weights": [10.0, 1.1, 2.0], "extra": 1}
    assert settings_differences(saved, other) == [
        "extra: <absent> in the checkpoint, 1 now",
        'objective[0].options: {"beta": 0.5} in the checkpoint, <absent> now',
        "teacher[0].weights: other weights in the checkpoint than now"]


# ---------------------------------------------------------------------------------------------- item 11: safe loading
PROJECTED = dict(distillation='[{"loss": "hidden_mse", "weight": 1, "projection": "linear", "layers": {"-1": "-1"}}]')


def test_learned_projections_are_saved_as_safetensors_and_resumed(tmp_path):
    import shutil

    straight = tiny_run(tmp_path / "straight", student_hidden=16, **PROJECTED)
    files = {p.name for p in (tmp_path / "straight" / "checkpoint-4").iterdir()}
    assert OBJECTIVE_STATE in files and LEGACY_OBJECTIVE_STATE not in files
    saved = load_file(str(tmp_path / "straight" / "checkpoint-6" / OBJECTIVE_STATE))
    assert saved.keys() == straight.objective.state_dict().keys() and saved
    assert_same(saved, dict(straight.objective.state_dict()))
    out = tmp_path / "run"
    shutil.copytree(tmp_path / "straight", out)
    shutil.rmtree(out / "checkpoint-6")
    resumed = tiny_run(out, student_hidden=16, **PROJECTED)  # from checkpoint-4, projections included
    assert_same(dict(resumed.objective.state_dict()), dict(straight.objective.state_dict()))
    assert_same(student_weights(resumed), student_weights(straight))


class _Payload:
    def __reduce__(self):
        return (Path.touch, (Path(os.environ.get("HF_DISTILL_TEST_MARKER", "/nonexistent/marker")),))


def test_an_old_pickled_objective_state_is_read_as_tensors_only(tmp_path, monkeypatch):
    out = tmp_path / "run"
    first = tiny_run(out, max_steps=4, student_hidden=16, **PROJECTED)
    ckpt = out / "checkpoint-4"
    (ckpt / OBJECTIVE_STATE).unlink()
    torch.save(first.objective.state_dict(), ckpt / LEGACY_OBJECTIVE_STATE)  # what older versions wrote
    resumed = tiny_run(out, max_steps=4, student_hidden=16, **PROJECTED)  # finished: loads, trains nothing
    assert_same(dict(resumed.objective.state_dict()), dict(first.objective.state_dict()))

    marker = tmp_path / "code-ran"
    monkeypatch.setenv("HF_DISTILL_TEST_MARKER", str(marker))
    torch.save({"projection": _Payload()}, ckpt / LEGACY_OBJECTIVE_STATE)
    with pytest.raises(ValueError, match="weights_only"):
        tiny_run(out, max_steps=4, student_hidden=16, **PROJECTED)
    assert not marker.exists()  # the pickled call never ran


# ---------------------------------------------------------------------------------------------- speech recipes
SPEECH_FLAGS = ["--per_device_train_batch_size", "4", "--save_strategy", "steps", "--save_steps", "2",
                "--max_steps", "4", "--report_to", "none", "--use_cpu", "true", "--disable_tqdm", "true",
                "--seed", "0", "--keep_only", "false", "--logging_steps", "2"]


@pytest.fixture(scope="module")
def speech_recipes():
    sys.path.insert(0, str(TESTS.parent / "recipes"))
    import ctc_soft_targets
    import distil_whisper

    return distil_whisper, ctc_soft_targets


def test_distil_whisper_rerun_with_another_student_is_refused_until_start_fresh(speech_recipes, tmp_path):
    from huggingface_hub import ModelCard

    from test_pseudo_label import build_tiny_whisper, write_clips

    distil_whisper, _ = speech_recipes
    teacher = build_tiny_whisper(tmp_path / "teacher")
    clips = write_clips(tmp_path / "clips", [1.0, 2.0, 1.5, 0.8, 1.2], bad=False)
    out = tmp_path / "run"
    flags = ["--teacher", str(teacher), "--audio", str(clips), "--output_dir", str(out), "--soft_labels", "live",
             "--num_decoder_layers", "1", "--label_batch_size", "8", *SPEECH_FLAGS]
    distil_whisper.main(flags)
    assert (out / "training" / "checkpoint-4" / SETTINGS_NAME).is_file()
    card = ModelCard.load(out / "student" / "README.md")
    assert card.data.pipeline_tag == "automatic-speech-recognition" and card.data.library_name == "transformers"
    with pytest.raises(ValueError) as err:
        distil_whisper.main([*flags, "--num_decoder_layers", "2"])
    for difference in ("student.decoder_layers: 1 in the checkpoint, 2 now",
                       "recipe.num_decoder_layers: 1 in the checkpoint, 2 now", "--start_fresh"):
        assert difference in str(err.value), difference
    results = distil_whisper.main([*flags, "--num_decoder_layers", "2", "--start_fresh", "true"])
    assert results["distillation"]["steps"] == 4 and len(results["student"]["decoder_layers_from_teacher"]) == 2


def test_ctc_soft_targets_rerun_with_another_weight_is_refused(speech_recipes, tmp_path):
    from test_pseudo_label import build_tiny_ctc, write_clips

    _, ctc_soft_targets = speech_recipes
    teacher = build_tiny_ctc(tmp_path / "teacher", 2)
    clips = write_clips(tmp_path / "clips", [1.0, 2.0, 1.5, 0.8, 1.2, 1.7], bad=False)
    out = tmp_path / "run"
    flags = ["--teacher", str(teacher), "--audio", str(clips), "--output_dir", str(out), "--top_k", "4",
             "--num_layers", "1", "--eval_size", "2", *SPEECH_FLAGS]
    ctc_soft_targets.main(flags)
    again = ctc_soft_targets.main(flags)  # the same settings: the finished run is resumed, nothing is trained
    assert again["distillation"]["steps"] == 4 and not (out / "training" / "checkpoint-5").exists()
    with pytest.raises(ValueError, match=r"kd_weight: 1.0 in the checkpoint, 0.5 now.*--start_fresh"):
        ctc_soft_targets.main([*flags, "--kl_weight", "0.5"])
