"""Text classification data: every wrong input is a DataError (or FileNotFoundError) that names the
split, the column and a few offending rows, raised while loading, before any model is touched."""

from __future__ import annotations

import json

import datasets
import pytest
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

from hf_distill.tasks.classification import DataError, load_classification_data, validate_classification_data
from hf_distill.tasks.classification_data import tokenize_for_classification
from tiny import make_wordpiece_tokenizer


def write_jsonl(path, labels, texts=None):
    texts = texts or [f"text number {i}" for i in range(len(labels))]
    path.write_text("".join(json.dumps({"text": t, "label": v}) + "\n" for t, v in zip(texts, labels)))
    return str(path)


def class_label_split(labels, names=("neg", "pos")):
    features = Features({"text": Value("string"), "label": ClassLabel(names=list(names))})
    return Dataset.from_dict({"text": [f"t {i}" for i in range(len(labels))], "label": labels}, features=features)


# ------------------------------------------------------------------------------------ labels
def test_test_labels_outside_the_training_labels_name_the_rows(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [0, 1, 0, 1])
    test = write_jsonl(tmp_path / "test.jsonl", [0, 1, 2, 7, 1])
    with pytest.raises(DataError, match=r"only in train none, only in test \[2, 7\] \(test row 2: 2, row 3: 7\)\. "
                                        r"Every label must occur in both"):
        load_classification_data(train_file=train, test_file=test)


@pytest.mark.parametrize("labels, shown", [
    ([0, 1.5, 0, 1.5, 0, 1.5], r"row 1: 1.5, row 3: 1.5, row 5: 1.5"),
    ([1, 2, 0.25, 1, 2, 1], r"row 2: 0.25"),
])
def test_non_integer_float_labels_are_refused(tmp_path, labels, shown):
    path = write_jsonl(tmp_path / "all.jsonl", labels)
    with pytest.raises(DataError, match=rf"column 'label' of the train data holds numbers that are not class ids "
                                        rf"\({shown}\); .*regression targets are not supported"):
        load_classification_data(train_file=path)


def test_integral_float_labels_are_the_integer_classes(tmp_path):
    # pandas writes integer ids as 1.0 once a column has a float in it; JSON mixes 1.0 and 2
    train = write_jsonl(tmp_path / "train.jsonl", [1.0, 2, 1.0, 2, 1.0, 2])
    test = write_jsonl(tmp_path / "test.jsonl", [1, 2])
    data = load_classification_data(train_file=train, test_file=test)
    assert data.labels == ["1", "2"] and data.label2id == {"1": 0, "2": 1}
    train_ds, test_ds = tokenize_for_classification(data, make_wordpiece_tokenizer(), max_length=8)
    assert train_ds["labels"][:] == [0, 1, 0, 1, 0, 1] and test_ds["labels"][:] == [0, 1]


def test_list_labels_are_refused(tmp_path):
    path = write_jsonl(tmp_path / "multi.jsonl", [[0, 1], [1], [0], [1]])
    with pytest.raises(DataError, match=r"holds lists, not one class per example \(row 0: \[0, 1\], .*"
                                        r"multi-label data is not supported: set --label_column"):
        load_classification_data(train_file=path)


def test_unlabelled_hub_test_split_is_named():
    train, test = class_label_split([0, 1, 0, 1]), class_label_split([-1, -1, -1])
    with pytest.raises(DataError, match=r"3 test rows of column 'label' hold ids outside its 2 label names "
                                        r"\['neg', 'pos'\] \(row 0: -1, row 1: -1, row 2: -1\); -1 marks an "
                                        r"unlabelled example .*--test_split validation"):
        validate_classification_data(train, test)


def test_hub_test_split_without_labels_found_through_load_dataset(monkeypatch):
    loaded = DatasetDict({"train": class_label_split([0, 1, 0, 1]), "test": class_label_split([-1, -1])})
    monkeypatch.setattr(datasets, "load_dataset", lambda name, config=None, **kw: loaded)
    with pytest.raises(DataError, match=r"2 test rows .*-1 marks an unlabelled example"):
        load_classification_data(dataset_name="glue", dataset_config="sst2")
    with pytest.raises(DataError, match=r"glue has no split 'validaton' \(it has \['train', 'test'\]\); "
                                        r"set --test_split"):
        load_classification_data(dataset_name="glue", dataset_config="sst2", test_split="validaton")


# ------------------------------------------------------------------------------------ empty data
@pytest.mark.parametrize("name, needs", [("train.csv", "a header and at least one example"),
                                         ("train.jsonl", "at least one example"),
                                         ("train.parquet", "at least one example")])
def test_zero_byte_file(tmp_path, name, needs):
    path = tmp_path / name
    path.write_bytes(b"")
    with pytest.raises(DataError, match=rf"data file .*{name} is empty \(no examples\), 0 bytes; it needs {needs}"):
        load_classification_data(train_file=str(path))


def test_empty_texts_are_named_with_their_rows(tmp_path):
    path = write_jsonl(tmp_path / "all.jsonl", [0, 1, 0, 1, 0, 1], texts=["good", "  ", "bad", "", "fine", "ok"])
    with pytest.raises(DataError, match=r"2 train rows have an empty text in column 'text' \(first rows: \[1, 3\]\); "
                                        r"fill them in or remove those rows"):
        load_classification_data(train_file=path)
    train = Dataset.from_dict({"text": ["a b", "c d"], "label": [0, 1]})
    test = Dataset.from_dict({"text": ["a b", " ", "c d"], "label": [0, 1, 1]})
    with pytest.raises(DataError, match=r"1 test rows have an empty text in column 'text' \(first rows: \[1\]\)"):
        validate_classification_data(train, test)


def test_sample_limits_below_one(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [0, 1, 0, 1])
    with pytest.raises(DataError, match=r"--max_train_samples must be at least 1 .*got 0"):
        load_classification_data(train_file=train, max_train_samples=0)
    with pytest.raises(DataError, match=r"--max_test_samples must be at least 1 .*got -3"):
        load_classification_data(train_file=train, max_test_samples=-3)


# ------------------------------------------------------------------------------------ paths
def test_train_file_that_is_a_folder(tmp_path):
    with pytest.raises(DataError, match=r"data file .* is a folder; give a .csv"):
        load_classification_data(train_file=str(tmp_path))


@pytest.mark.parametrize("name", ["./data/sst2", "data/sst2/train", "/no/such/folder"])
def test_missing_local_dataset_folder_is_not_sent_to_the_hub(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "sst-2").mkdir()

    def no_hub(*args, **kwargs):
        raise AssertionError("a missing local path went to the Hub")

    monkeypatch.setattr(datasets, "load_dataset", no_hub)
    with pytest.raises(FileNotFoundError, match=rf"dataset '{name}' does not exist \(read as a local path\); "
                                                r".* holds .*; set --dataset_name"):
        load_classification_data(dataset_name=name)


def test_hub_dataset_that_cannot_be_loaded_is_one_line(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'imdb' on the Hub (OfflineModeIsEnabled)\nmore detail")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match=r"^could not load 'imdb' as a Hub dataset or local dataset folder: "
                                        r"Couldn't reach 'imdb' on the Hub \(OfflineModeIsEnabled\)\. Check "
                                        r"--dataset_name / --dataset_config, or give local files") as err:
        load_classification_data(dataset_name="imdb")
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------------ unlabeled transfer sets
from collections import Counter  # noqa: E402

from hf_distill.tasks.transfer_set import (  # noqa: E402
    NO_LABEL,
    load_unlabeled_texts,
    tokenize_unlabeled,
    transfer_set,
    withhold_labels,
)


def labelled_split(counts: dict[str, int]) -> Dataset:
    labels = [name for name, n in counts.items() for _ in range(n)]
    return Dataset.from_dict({"text": [f"text {i} about {v}" for i, v in enumerate(labels)], "label": labels})


def test_withhold_labels_is_stratified_seeded_and_drops_the_labels():
    train = labelled_split({"a": 50, "b": 30, "c": 20})
    labelled, unlabeled = withhold_labels(train, "label", 0.1, seed=3)
    assert Counter(labelled["label"]) == {"a": 5, "b": 3, "c": 2}
    assert len(unlabeled) == 90 and unlabeled.column_names == ["text"]
    assert set(labelled["text"]).isdisjoint(unlabeled["text"])
    assert set(labelled["text"]) | set(unlabeled["text"]) == set(train["text"])
    again, _ = withhold_labels(train, "label", 0.1, seed=3)
    other, _ = withhold_labels(train, "label", 0.1, seed=4)
    assert again["text"] == labelled["text"] and other["text"] != labelled["text"]
    tiny, _ = withhold_labels(labelled_split({"a": 50, "b": 3}), "label", 0.01)
    assert Counter(tiny["label"]) == {"a": 1, "b": 1}  # every class keeps a labelled row


@pytest.mark.parametrize("fraction", [0, 1, 1.5, -0.2, float("nan")])
def test_withhold_labels_refuses_fractions_outside_0_1(fraction):
    with pytest.raises(DataError, match=r"--labelled_fraction must be in \(0, 1\)"):
        withhold_labels(labelled_split({"a": 5, "b": 5}), "label", fraction)


def test_unlabeled_texts_from_txt_csv_and_a_dataset_folder(tmp_path):
    txt = tmp_path / "u.txt"
    txt.write_text("first text\n\n  second text  \nthird text\n")
    assert load_unlabeled_texts(unlabeled_file=str(txt))["text"] == ["first text", "second text", "third text"]
    csv_path = tmp_path / "u.csv"
    csv_path.write_text("id,body\n1,hello there\n2,general news\n")
    ds = load_unlabeled_texts(unlabeled_file=str(csv_path), text_column="body")
    assert ds.column_names == ["text"] and ds["text"] == ["hello there", "general news"]
    jsonl = tmp_path / "hub"  # a local dataset folder, read as load_dataset reads a Hub dataset
    jsonl.mkdir()
    (jsonl / "train.jsonl").write_text("".join(json.dumps({"text": f"u {i}"}) + "\n" for i in range(6)))
    ds = load_unlabeled_texts(unlabeled_dataset=str(jsonl), max_samples=4, seed=1)
    assert len(ds) == 4 and set(ds["text"]) <= {f"u {i}" for i in range(6)}
    # texts of the test split are never labelled by the teacher
    kept = load_unlabeled_texts(unlabeled_file=str(txt), exclude_texts=["second text"])
    assert kept["text"] == ["first text", "third text"]


def test_unlabeled_input_errors_say_what_to_change(tmp_path):
    csv_path = tmp_path / "u.csv"
    csv_path.write_text("id,body\n1,hello\n2,\n3, \n")
    with pytest.raises(DataError, match=r"has no text column 'text'; its columns are \['id', 'body'\]\. "
                                        r"Set --unlabeled_text_column"):
        load_unlabeled_texts(unlabeled_file=str(csv_path))
    with pytest.raises(DataError, match=r"2 rows of the unlabeled data .*u.csv have no text in column 'body' "
                                        r"\(row 1: None, row 2: ' '\)"):
        load_unlabeled_texts(unlabeled_file=str(csv_path), text_column="body")
    with pytest.raises(DataError, match=r"unlabeled file .*missing.txt does not exist; check --unlabeled_file"):
        load_unlabeled_texts(unlabeled_file=str(tmp_path / "missing.txt"))
    with pytest.raises(DataError, match=r"is a folder; give a .txt"):
        load_unlabeled_texts(unlabeled_file=str(tmp_path))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match=r"is empty; give it at least one text, or drop --unlabeled_file"):
        load_unlabeled_texts(unlabeled_file=str(empty))
    with pytest.raises(DataError, match=r"give one of --unlabeled_file FILE or --unlabeled_dataset NAME"):
        load_unlabeled_texts(unlabeled_file=str(empty), unlabeled_dataset="x")
    one = tmp_path / "one.txt"
    one.write_text("same\n")
    with pytest.raises(DataError, match=r"every text of the unlabeled data .* is also in the test split"):
        load_unlabeled_texts(unlabeled_file=str(one), exclude_texts=["same"])


def test_transfer_set_joins_labelled_and_teacher_labelled_rows():
    tokenizer = make_wordpiece_tokenizer()
    texts = Dataset.from_dict({"text": ["a b c", "d e", "f"]})
    unlabeled = tokenize_unlabeled(texts, tokenizer, max_length=8)
    assert unlabeled["labels"] == [NO_LABEL] * 3 and "input_ids" in unlabeled.column_names
    labelled = Dataset.from_dict({"input_ids": [[2, 5, 3], [2, 6, 3]], "labels": [0, 1],
                                  "teacher_logits": [[1.0, 0.0], [0.0, 1.0]]})
    unl = Dataset.from_dict({"input_ids": [[2, 7, 3]] * 3, "labels": [NO_LABEL] * 3,
                             "teacher_logits": [[0.5, 0.5]] * 3})
    mixed = transfer_set(labelled, unl, seed=0)
    assert len(mixed) == 5 and sorted(mixed["labels"]) == [NO_LABEL] * 3 + [0, 1]
    with pytest.raises(ValueError, match="must have labels = -100"):
        transfer_set(labelled, labelled)
    with pytest.raises(ValueError, match="differ from the teacher-labelled columns"):
        transfer_set(labelled, unl.remove_columns("teacher_logits"))
