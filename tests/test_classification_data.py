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
