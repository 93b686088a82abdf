"""Non-finite numbers stop a run at the step they appear (or skip the batch); a NaN student is never saved."""

import math

import pytest
import torch
from transformers import default_data_collator

from hf_distill import DistillationArguments, DistillationTrainer
from hf_distill.numerics import NonFiniteError
from test_trainer import make_args, masked_dataset, teacher_student
from tiny import make_wordpiece_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return make_wordpiece_tokenizer()


def poison(module, at_call: int, what: str = "logits", only_once: bool = False):
    """Make ``module``'s output ``what`` NaN from its ``at_call``-th forward on (or at that call only)."""
    calls = {"n": 0}

    def hook(mod, args, out):
        calls["n"] += 1
        if calls["n"] == at_call or (calls["n"] > at_call and not only_once):
            if what == "logits":
                out.logits[0, 1] = float("nan")
            else:
                out.hidden_states[-1][1, 2, 0] = float("inf")
        return out

    return module.register_forward_hook(hook)


def trainer_for(tokenizer, tmp_path, **kw):
    teacher, student = teacher_student(tokenizer)
    ds = masked_dataset(tokenizer, n=32)
    args = make_args(tmp_path, **{"max_steps": 5, **kw})
    return DistillationTrainer(model=student, teacher=teacher, args=args, train_dataset=ds,
                               data_collator=default_data_collator), teacher, student


@pytest.mark.parametrize("at_call", [1, 3])
def test_nan_teacher_logits_stop_the_run_at_that_step(tokenizer, tmp_path, at_call):
    trainer, teacher, student = trainer_for(tokenizer, tmp_path, save_strategy="steps", save_steps=1)
    poison(teacher, at_call)
    with pytest.raises(NonFiniteError) as err:
        trainer.train()
    message = str(err.value)
    assert f"step {at_call} " in message and "micro-batch 1" in message
    assert "loss_kd = nan" in message and "input_ids" in message
    assert f"teacher logits ({len(tokenizer)} of" in message  # one position's row of the vocabulary
    assert "on_nonfinite='skip'" in message
    # The checkpoints written before the step are complete and finite; none after it.
    saved = sorted(p.name for p in (tmp_path / "out").glob("checkpoint-*"))
    assert saved == [f"checkpoint-{i}" for i in range(1, at_call)]
    assert all(torch.isfinite(p).all() for p in student.parameters())


def test_inf_teacher_hidden_states_are_named(tokenizer, tmp_path):
    trainer, teacher, _ = trainer_for(tokenizer, tmp_path)
    poison(teacher, 2, what="hidden")
    with pytest.raises(NonFiniteError, match=r"step 2 .*loss_cos = (nan|inf).*teacher hidden_states\[4\] \(1 of"):
        trainer.train()


def test_skip_mode_skips_counts_and_logs(tokenizer, tmp_path):
    trainer, teacher, student = trainer_for(tokenizer, tmp_path, on_nonfinite="skip", logging_steps=5)
    poison(teacher, 2, only_once=True)
    trainer.train()
    assert trainer.nonfinite_skipped == 1
    log = trainer.state.log_history[0]
    assert log["nonfinite_skipped"] == 1 and math.isfinite(log["loss"]) and math.isfinite(log["grad_norm"])
    assert all(torch.isfinite(p).all() for p in student.parameters())


def test_a_skipped_batch_changes_no_weight(tokenizer, tmp_path):
    """With one micro-batch per step, a skipped batch leaves the student exactly as it was."""
    trainer, teacher, student = trainer_for(tokenizer, tmp_path, on_nonfinite="skip", max_steps=1,
                                            learning_rate=1e-2, optim="sgd")
    before = [p.detach().clone() for p in student.parameters()]
    poison(teacher, 1)
    trainer.train()
    assert trainer.nonfinite_skipped == 1
    assert all(torch.equal(a, b) for a, b in zip(before, student.parameters()))


def test_overflowing_gradients_stop_before_the_update(tokenizer, tmp_path):
    trainer, _, student = trainer_for(tokenizer, tmp_path, max_grad_norm=1.0)
    weight = student.bert.embeddings.word_embeddings.weight
    calls = {"n": 0}

    def blow_up(grad):
        calls["n"] += 1
        return grad * float("inf") if calls["n"] == 2 else grad

    weight.register_hook(blow_up)
    with pytest.raises(NonFiniteError, match="step 2: the gradient norm is (nan|inf) although every loss term"):
        trainer.train()
    assert all(torch.isfinite(p).all() for p in student.parameters())


def test_diverging_learning_rate_stops_and_saves_nothing(tokenizer, tmp_path):
    trainer, _, student = trainer_for(tokenizer, tmp_path, max_steps=50, learning_rate=1e8, optim="sgd",
                                      save_strategy="steps", save_steps=1)
    with pytest.raises(NonFiniteError):
        trainer.train()
    for folder in (tmp_path / "out").glob("checkpoint-*"):
        from safetensors.torch import load_file

        assert all(torch.isfinite(t).all() for t in load_file(str(folder / "model.safetensors")).values())


def test_a_nan_student_is_never_saved(tokenizer, tmp_path):
    trainer, _, student = trainer_for(tokenizer, tmp_path)
    with torch.no_grad():
        student.cls.predictions.transform.dense.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"refusing to save the student.*cls\.predictions\.transform\.dense"):
        trainer.save_model(str(tmp_path / "final"))
    assert not (tmp_path / "final" / "model.safetensors").exists()


@pytest.mark.parametrize("field, value", [("kd_weight", float("nan")), ("temperature", float("nan")),
                                          ("temperature", float("inf")), ("learning_rate", float("nan")),
                                          ("cos_weight", float("inf")), ("max_grad_norm", float("nan"))])
def test_nonfinite_arguments_are_refused_when_parsed(field, value):
    with pytest.raises(ValueError, match=f"{field} is (NaN|inf)"):
        DistillationArguments(output_dir="x", **{field: value})


@pytest.mark.parametrize("term", [{"loss": "kl", "weight": float("nan")}, {"loss": "kl", "temperature": float("inf")},
                                  {"loss": "jsd", "beta": float("nan")}, {"loss": "jsd", "beta": 1.5},
                                  {"loss": "kl", "weight": "heavy"}, {"loss": "task", "label_smoothing": 1.0}])
def test_nonfinite_term_settings_are_refused_at_construction(tokenizer, tmp_path, term):
    teacher, student = teacher_student(tokenizer)
    with pytest.raises(ValueError, match="finite|between 0 and 1|number|below 1"):
        DistillationTrainer(model=student, teacher=teacher, args=make_args(tmp_path, distillation=[term]))
