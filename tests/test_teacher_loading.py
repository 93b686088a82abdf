"""Teachers given as paths: loaded with the student's head, checked for random heads and tokenizers."""

import pytest
import torch
from datasets import Dataset
from transformers import BertForSequenceClassification, BertModel, default_data_collator

from hf_distill import DistillationArguments, DistillationTrainer
from hf_distill.cli import main as cli
from hf_distill.teachers import check_model_path, find_teacher_tokenizer, load_teacher
from test_trainer import NO_DROPOUT, make_args, masked_dataset, teacher_student
from tiny import make_wordpiece_tokenizer, sample_texts, tiny_bert_config, tiny_bert_mlm


@pytest.fixture(scope="module")
def tokenizer():
    return make_wordpiece_tokenizer()


@pytest.fixture(scope="module")
def teacher_dir(tokenizer, tmp_path_factory):
    """A masked-LM teacher saved with its tokenizer, as save_pretrained writes it."""
    folder = tmp_path_factory.mktemp("teacher")
    teacher, _ = teacher_student(tokenizer)
    teacher.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_teacher_given_as_a_path_is_loaded_and_matches_the_model(tokenizer, teacher_dir, tmp_path):
    teacher, student = teacher_student(tokenizer)
    ds = masked_dataset(tokenizer, n=8)
    from_path = DistillationTrainer(model=student, teacher=str(teacher_dir), args=make_args(tmp_path),
                                    train_dataset=ds, data_collator=default_data_collator)
    loaded = from_path.teacher
    assert type(loaded).__name__ == "BertForMaskedLM"
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    for (name, a), b in zip(teacher.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    # --teacher_name_or_path does the same, in the requested precision.
    args = make_args(tmp_path, teacher_name_or_path=str(teacher_dir), teacher_dtype="bfloat16")
    by_flag = DistillationTrainer(model=student, args=args, train_dataset=ds, data_collator=default_data_collator)
    assert next(by_flag.teacher.parameters()).dtype == torch.bfloat16
    by_flag.train()
    assert by_flag.state.log_history[0]["loss_kd"] > 0


def test_teacher_path_errors_are_early_and_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        check_model_path(str(tmp_path / "missing" / "dir"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        check_model_path(str(tmp_path))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(NotADirectoryError, match="is a file"):
        check_model_path(str(tmp_path / "weights.bin"))
    with pytest.raises(ValueError, match="empty"):
        check_model_path("")
    assert check_model_path("org/name") == "org/name"  # a Hub id passes to the Hub client


def test_random_head_is_an_error(tokenizer, tmp_path):
    """A BertModel checkpoint loaded as a masked-LM teacher would get a freshly initialised MLM head."""
    torch.manual_seed(0)
    BertModel(tiny_bert_config(len(tokenizer))).save_pretrained(tmp_path / "encoder")
    with pytest.raises(ValueError, match=r"cls\.predictions.*randomly initialised"):
        load_teacher(tmp_path / "encoder", task="masked_lm")
    _, student = teacher_student(tokenizer)
    with pytest.raises(ValueError, match="random head"):
        DistillationTrainer(model=student, teacher=str(tmp_path / "encoder"), args=make_args(tmp_path))
    # A checkpoint with a head of another size (num_labels) is refused too.
    BertForSequenceClassification(tiny_bert_config(len(tokenizer), num_labels=3)).save_pretrained(tmp_path / "cls3")
    with pytest.raises(ValueError, match="randomly initialised"):
        load_teacher(tmp_path / "cls3", task="sequence_classification", num_labels=5)
    # The class it was saved with loads cleanly.
    assert type(load_teacher(tmp_path / "encoder")).__name__ == "BertModel"


def test_remote_code_stays_off_unless_asked(tokenizer, teacher_dir, monkeypatch):
    from transformers import AutoModelForMaskedLM

    seen = {}
    original = AutoModelForMaskedLM.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        seen.update(kwargs)
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(AutoModelForMaskedLM, "from_pretrained", classmethod(spy))
    load_teacher(teacher_dir, task="masked_lm")
    assert seen["trust_remote_code"] is False
    assert DistillationArguments(output_dir="x").trust_remote_code is False


def test_vocabulary_checked_against_the_teachers_own_tokenizer(tokenizer, teacher_dir, tmp_path):
    """The usual call passes only processing_class: the teacher's tokenizer is found next to its weights."""
    other = make_wordpiece_tokenizer(sample_texts(200, seed=7) + ["zebra quartz"], vocab_size=len(tokenizer))
    assert len(other) == len(tokenizer) and other.get_vocab() != tokenizer.get_vocab()
    _, student = teacher_student(tokenizer)
    teacher = load_teacher(teacher_dir, task="masked_lm")
    assert find_teacher_tokenizer(teacher).get_vocab() == tokenizer.get_vocab()
    for given in (teacher, str(teacher_dir)):
        with pytest.raises(ValueError, match="tokenizers differ"):
            DistillationTrainer(model=student, teacher=given, args=make_args(tmp_path), processing_class=other)
    # The same tokenizer passes; a teacher without tokenizer files skips the check.
    DistillationTrainer(model=student, teacher=teacher, args=make_args(tmp_path), processing_class=tokenizer)
    in_memory, _ = teacher_student(tokenizer)
    assert find_teacher_tokenizer(in_memory) is None


def _classifier_dataset(tokenizer, n=12):
    texts = sample_texts(n, seed=3)
    enc = tokenizer(texts, truncation=True, max_length=16, padding="max_length")
    return Dataset.from_dict({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                              "labels": [i % 3 for i in range(n)]})


def error_lines(capsys) -> list[str]:
    """The command's own error lines (progress bars of loading are not errors)."""
    return [line for line in capsys.readouterr().err.replace("\r", "\n").splitlines() if "error" in line.lower()]


def test_cache_teacher_refuses_a_teacher_without_a_head_and_wrong_paths(tokenizer, teacher_dir, tmp_path, capsys):
    """A bare encoder has no outputs to store (before: a classification head initialised at random); missing
    paths are one line each, before any model runs. (The store itself: tests/test_cache_teacher.py.)"""
    data = tmp_path / "data"
    _classifier_dataset(tokenizer).save_to_disk(str(data))
    torch.manual_seed(0)
    BertModel(tiny_bert_config(len(tokenizer))).save_pretrained(tmp_path / "encoder")
    tokenizer.save_pretrained(tmp_path / "encoder")
    capsys.readouterr()
    assert cli(["cache-teacher", "--teacher", str(tmp_path / "encoder"), "--dataset", str(data),
                "--output_dir", str(tmp_path / "o1")]) == 2
    (err,) = error_lines(capsys)
    assert err.startswith("hf-distill cache-teacher: error:") and "BertModel" in err
    assert not (tmp_path / "o1").exists()
    for argv, message in (
        (["--teacher", str(tmp_path / "nope"), "--dataset", str(data)], "does not exist"),
        (["--teacher", str(teacher_dir), "--dataset", str(tmp_path / "nodata")], "nodata"),
    ):
        assert cli(["cache-teacher", *argv, "--output_dir", str(tmp_path / "o2")]) == 2
        (err,) = error_lines(capsys)
        assert message in err, err


def test_init_student_errors(tmp_path, capsys):
    assert cli(["init-student", "--teacher", str(tmp_path / "missing"), "--output_dir", str(tmp_path / "s")]) == 2
    (err,) = error_lines(capsys)
    assert "does not exist" in err


def test_mlm_student_from_a_tiny_teacher_path_trains(tokenizer, teacher_dir, tmp_path):
    """End to end from a folder: the student improves on the teacher's soft targets."""
    _, student = teacher_student(tokenizer)
    ds = masked_dataset(tokenizer, n=32)
    args = make_args(tmp_path, max_steps=30, learning_rate=3e-3, per_device_eval_batch_size=32)
    trainer = DistillationTrainer(model=student, teacher=str(teacher_dir), args=args, train_dataset=ds,
                                  eval_dataset=ds, data_collator=default_data_collator, processing_class=tokenizer)
    before = trainer.evaluate()["eval_loss_kd"]
    trainer.train()
    assert trainer.evaluate()["eval_loss_kd"] < 0.8 * before
