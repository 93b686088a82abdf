"""Loading text corpora from every supported source and packing them into exact blocks."""

from __future__ import annotations

import csv
import gzip
import json

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import PreTrainedTokenizerFast

from hf_distill.data import DistilMLMCollator, load_text_dataset, split_train_eval, tokenize_and_pack
from tiny import make_wordpiece_tokenizer, sample_texts

DOCS = sample_texts(60, seed=2)


@pytest.fixture(scope="module")
def tok():
    return make_wordpiece_tokenizer()


def write_txt(path, docs, blank_every=5):
    lines = []
    for i, d in enumerate(docs):
        lines.append(d)
        if i % blank_every == 0:
            lines.extend(["", "   "])  # blank and whitespace-only lines are not documents
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


@pytest.mark.parametrize("suffix", [".txt", ".txt.gz", ".json", ".jsonl", ".csv", ".tsv", ".parquet"])
def test_each_file_format_loads(tmp_path, suffix):
    path = str(tmp_path / f"corpus{suffix}")
    records = [{"id": i, "text": d} for i, d in enumerate(DOCS)]
    if suffix == ".txt":
        write_txt(path, DOCS)
    elif suffix == ".txt.gz":
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write("\n".join(DOCS[:30] + ["", ""] + DOCS[30:]) + "\n")
    elif suffix == ".json":
        with open(path, "w") as f:
            json.dump(records, f)
    elif suffix == ".jsonl":
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records + [{"id": 99, "text": ""}])
    elif suffix in (".csv", ".tsv"):
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["id", "text"], delimiter="\t" if suffix == ".tsv" else ",")
            writer.writeheader()
            writer.writerows(records)
    else:
        pq.write_table(pa.Table.from_pylist(records), path)
    ds = load_text_dataset(path, cache_dir=str(tmp_path / "cache"))
    assert isinstance(ds, datasets.Dataset)
    assert ds["text"][:] == DOCS  # every document, in order, blanks dropped
    if suffix not in (".txt", ".txt.gz"):
        assert ds["id"][:] == list(range(len(DOCS)))


def test_list_of_files_glob_and_streaming(tmp_path):
    a, b = str(tmp_path / "a.txt"), str(tmp_path / "b.txt")
    write_txt(a, DOCS[:25])
    write_txt(b, DOCS[25:])
    cache = str(tmp_path / "cache")
    assert load_text_dataset([a, b], cache_dir=cache)["text"][:] == DOCS
    assert sorted(load_text_dataset(str(tmp_path / "*.txt"), cache_dir=cache)["text"][:]) == sorted(DOCS)
    # split slices count raw rows: blank lines are dropped after slicing
    head = load_text_dataset(a, split="train[:10]", cache_dir=cache)
    assert head["text"][:] == DOCS[:6]  # lines: d0, blank, blank, d1..d5, blank, blank
    streamed = load_text_dataset(a, streaming=True, cache_dir=cache)
    assert isinstance(streamed, datasets.IterableDataset)
    assert [r["text"] for r in streamed] == DOCS[:25]
    with pytest.raises(ValueError, match="same format"):
        json_path = str(tmp_path / "c.jsonl")
        with open(json_path, "w") as f:
            f.write(json.dumps({"text": "x"}) + "\n")
        load_text_dataset([a, json_path], cache_dir=cache)
    with pytest.raises(ValueError, match="single 'train' split"):
        load_text_dataset(a, split="validation", cache_dir=cache)


def test_saved_dataset_and_script_less_folder(tmp_path):
    full = datasets.Dataset.from_dict({"text": DOCS + [""], "n": list(range(len(DOCS) + 1))})
    full.save_to_disk(str(tmp_path / "saved"))
    ds = load_text_dataset(str(tmp_path / "saved"))
    assert ds["text"][:] == DOCS  # the empty document is dropped
    assert load_text_dataset(str(tmp_path / "saved"), split="train[:10]")["text"][:] == DOCS[:10]

    dd = datasets.DatasetDict({"train": full.select(range(40)), "validation": full.select(range(40, 50))})
    dd.save_to_disk(str(tmp_path / "saved_dict"))
    assert load_text_dataset(str(tmp_path / "saved_dict"), split="validation")["text"][:] == DOCS[40:50]
    with pytest.raises(ValueError, match=r"available splits: \['train', 'validation'\]"):
        load_text_dataset(str(tmp_path / "saved_dict"), split="test")

    folder = tmp_path / "folder"
    folder.mkdir()
    for split, docs in (("train", DOCS[:45]), ("test", DOCS[45:])):
        with open(folder / f"{split}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["body", "source"])
            writer.writerows([d, "web"] for d in docs)
    cache = str(tmp_path / "cache")
    assert load_text_dataset(str(folder), text_column="body", cache_dir=cache)["body"][:] == DOCS[:45]
    assert load_text_dataset(str(folder), split="test", text_column="body", cache_dir=cache)["body"][:] == DOCS[45:]


def test_column_and_empty_errors(tmp_path):
    path = str(tmp_path / "c.csv")
    with open(path, "w") as f:
        f.write("body,label\nthe cat sat,1\n")
    cache = str(tmp_path / "cache")
    with pytest.raises(ValueError) as err:
        load_text_dataset(path, cache_dir=cache)
    message = str(err.value)
    assert "'text'" in message and "['body', 'label']" in message and "--text_column" in message
    with pytest.raises(ValueError, match="must hold strings"):
        load_text_dataset(path, text_column="label", cache_dir=cache)

    blank = str(tmp_path / "blank.txt")
    with open(blank, "w") as f:
        f.write("\n\n   \n")
    with pytest.raises(ValueError, match="no non-empty document"):
        load_text_dataset(blank, cache_dir=cache)
    header_only = str(tmp_path / "h.csv")
    with open(header_only, "w") as f:
        f.write("text\n")
    with pytest.raises(ValueError, match="(empty|no non-empty document)"):
        load_text_dataset(header_only, cache_dir=cache)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_text_dataset(str(tmp_path / "missing.jsonl"))
    with pytest.raises(FileNotFoundError):
        load_text_dataset([str(tmp_path / "missing.txt")])


def test_hub_name_goes_to_load_dataset(monkeypatch):
    seen = {}

    def fake_load_dataset(path, name=None, **kwargs):
        seen.update(path=path, name=name, **kwargs)
        return datasets.Dataset.from_dict({"text": ["a b", "", "c"], "title": ["x", "y", "z"]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    ds = load_text_dataset("someone/corpus", config_name="en", split="train[:3]")
    assert seen["path"] == "someone/corpus" and seen["name"] == "en" and seen["split"] == "train[:3]"
    assert ds["text"][:] == ["a b", "c"]

    def failing(*args, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", failing)
    with pytest.raises(ValueError, match="as a Hub dataset"):
        load_text_dataset("someone/corpus")


def content_stream(tok, docs, separator=()):
    ids = tok(docs, add_special_tokens=False)["input_ids"]
    return [t for x in ids for t in list(x) + list(separator)]


@pytest.mark.parametrize("batch_size", [1000, 7])
def test_packing_bert_style(tok, batch_size):
    ds = datasets.Dataset.from_dict({"text": DOCS, "meta": ["m"] * len(DOCS), "n": list(range(len(DOCS)))})
    block = 16
    packed = tokenize_and_pack(ds, tok, block_size=block, batch_size=batch_size)
    assert packed.column_names == ["input_ids", "attention_mask"]  # text and every other column gone
    stream = content_stream(tok, DOCS)
    content = block - 2
    assert len(packed) == len(stream) // content
    rows = packed["input_ids"][:]
    assert all(len(r) == block for r in rows)
    assert all(r[0] == tok.cls_token_id and r[-1] == tok.sep_token_id for r in rows)
    assert all(m == [1] * block for m in packed["attention_mask"][:])
    inner = [t for r in rows for t in r[1:-1]]
    # nothing lost or reordered except the final incomplete remainder
    assert inner == stream[: len(inner)]
    assert len(stream) - len(inner) == len(stream) % content < content
    assert not any(t in (tok.cls_token_id, tok.sep_token_id) for t in inner)


def test_packing_is_global_across_batches_and_processes(tok):
    ds = datasets.Dataset.from_dict({"text": DOCS})
    reference = tokenize_and_pack(ds, tok, block_size=32)["input_ids"][:]
    small = tokenize_and_pack(ds, tok, block_size=32, batch_size=3)["input_ids"][:]
    parallel = tokenize_and_pack(ds, tok, block_size=32, batch_size=5, num_proc=2)["input_ids"][:]
    assert reference == small == parallel


def test_plain_packing_without_cls_sep(tok):
    ds = datasets.Dataset.from_dict({"text": DOCS})
    no_specials = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, pad_token="[PAD]")
    packed = tokenize_and_pack(ds, no_specials, block_size=10)
    stream = content_stream(tok, DOCS)
    flat = [t for r in packed["input_ids"][:] for t in r]
    assert len(packed) == len(stream) // 10 and flat == stream[: len(flat)]
    # with an EOS token, documents are separated by it
    with_eos = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, pad_token="[PAD]", eos_token="[SEP]")
    packed_eos = tokenize_and_pack(ds, with_eos, block_size=10)
    stream_eos = content_stream(tok, DOCS, separator=(with_eos.eos_token_id,))
    flat_eos = [t for r in packed_eos["input_ids"][:] for t in r]
    assert len(packed_eos) == len(stream_eos) // 10 and flat_eos == stream_eos[: len(flat_eos)]
    # add_special_tokens=False on a BERT tokenizer: plain packing as well
    plain = tokenize_and_pack(ds, tok, block_size=10, add_special_tokens=False)
    assert plain["input_ids"][:] == packed["input_ids"][:]


def test_packing_errors_streaming_and_dict(tok, tmp_path):
    ds = datasets.Dataset.from_dict({"text": DOCS[:2]})
    with pytest.raises(ValueError, match="fewer than one block"):
        tokenize_and_pack(ds, tok, block_size=128)
    with pytest.raises(ValueError, match=r"available columns: \['text'\]"):
        tokenize_and_pack(ds, tok, text_column="body")

    full = datasets.Dataset.from_dict({"text": DOCS})
    eager = tokenize_and_pack(full, tok, block_size=16)["input_ids"][:]
    lazy = tokenize_and_pack(full.to_iterable_dataset(), tok, block_size=16, batch_size=4)
    assert [r["input_ids"] for r in lazy] == eager

    dd = datasets.DatasetDict({"train": full.select(range(40)), "validation": full.select(range(40, 60))})
    packed = tokenize_and_pack(dd, tok, block_size=16)
    assert set(packed) == {"train", "validation"}
    assert all(len(r) == 16 for split in packed.values() for r in split["input_ids"][:])


def test_on_disk_pipeline_is_cached_and_feeds_the_collator(tok, tmp_path):
    path = str(tmp_path / "corpus.txt")
    write_txt(path, DOCS)
    cache = str(tmp_path / "cache")
    packed = tokenize_and_pack(load_text_dataset(path, cache_dir=cache), tok, block_size=24)
    again = tokenize_and_pack(load_text_dataset(path, cache_dir=cache), tok, block_size=24)
    assert packed._fingerprint == again._fingerprint
    assert packed.cache_files and packed.cache_files == again.cache_files  # second run reads the cache
    loader = torch.utils.data.DataLoader(packed, batch_size=8, collate_fn=DistilMLMCollator(tok, seed=0))
    batch = next(iter(loader))
    assert batch["input_ids"].shape == (8, 24) and batch["input_ids"].dtype == torch.long
    assert int((batch["labels"] != -100).sum()) == 29  # ceil(0.15 * 192)


def test_split_train_eval(tok):
    ds = datasets.Dataset.from_dict({"text": DOCS, "i": list(range(len(DOCS)))})
    train, ev = split_train_eval(ds, 12, seed=0)
    assert len(train) == 48 and len(ev) == 12
    assert sorted(train["i"][:] + ev["i"][:]) == list(range(60))
    train2, ev2 = split_train_eval(ds, 12, seed=0)
    assert ev2["i"][:] == ev["i"][:]
    assert split_train_eval(ds, 12, seed=1)[1]["i"][:] != ev["i"][:]
    _, frac = split_train_eval(ds, 0.25, seed=0)
    assert len(frac) == 15
    for bad in (0, 60, 1.0, 0.0):
        with pytest.raises(ValueError):
            split_train_eval(ds, bad, seed=0)


# ------------------------------------------------------------------ wrong inputs: early, named errors
@pytest.mark.parametrize("name", ["empty.txt", "empty.jsonl", "empty.csv", "empty.txt.gz"])
def test_zero_byte_file_is_named(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"")
    with pytest.raises(ValueError, match=rf"'{path}' is empty \(0 bytes\)"):
        load_text_dataset(str(path), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match=rf"'{path}' is empty \(0 bytes\)"):
        load_text_dataset([str(path)], cache_dir=str(tmp_path / "cache"))


def test_only_empty_documents_counts_the_rows(tmp_path):
    path = tmp_path / "blank.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["", "  ", "\n"]))
    with pytest.raises(ValueError, match=r"no non-empty document in column 'text': all 3 rows are empty or "
                                         r"whitespace; .*--text_column"):
        load_text_dataset(str(path), cache_dir=str(tmp_path / "cache"))


def test_unreadable_file_is_named(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"text": "fine"}\n{not json\n')
    with pytest.raises(ValueError, match=rf"cannot read '{path}' as json: .*fix the file"):
        load_text_dataset(str(path), cache_dir=str(tmp_path / "cache"))


def test_folder_without_data_files(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"folder .*empty' holds no files: no text data file"):
        load_text_dataset(str(empty))
    pdfs = tmp_path / "pdfs"
    pdfs.mkdir()
    (pdfs / "paper.pdf").write_bytes(b"%PDF-1.4")
    with pytest.raises(FileNotFoundError, match=r"holds only paper.pdf: no text data file \(.csv, .json"):
        load_text_dataset(str(pdfs))


@pytest.mark.parametrize("name", ["corpus/trian.txt", "corpus/trian", "corpus/sub/train", "./missing", "missing.jsonl"])
def test_missing_local_path_is_not_sent_to_the_hub(tmp_path, monkeypatch, name):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "train.txt").write_text("the cat sat\n")
    monkeypatch.chdir(tmp_path)

    def no_hub(*args, **kwargs):
        raise AssertionError("a missing local path went to the Hub")

    monkeypatch.setattr(datasets, "load_dataset", no_hub)
    with pytest.raises(FileNotFoundError, match=rf"text data '{name}' does not exist \(read as a local path\); "
                                                r".* holds .*; set --train_files"):
        load_text_dataset(name)


def test_missing_path_lists_the_closest_names_first(tmp_path, monkeypatch):
    (tmp_path / "corpus").mkdir()
    for n in ("a.txt", "b.txt", "train.txt"):
        (tmp_path / "corpus" / n).write_text("x\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"corpus holds train.txt, a.txt, b.txt;"):
        load_text_dataset("corpus/trian.txt")


def test_too_few_blocks_for_the_eval_split(tok):
    one_block = tokenize_and_pack(datasets.Dataset.from_dict({"text": [" ".join(DOCS[:3])]}), tok, block_size=8)
    one = one_block.select(range(1))
    with pytest.raises(ValueError, match=r"the dataset has 1 row: too few to hold out an evaluation set .*"
                                         r"smaller --block_size"):
        split_train_eval(one, 0.1)
    three = one_block.select(range(3))
    with pytest.raises(ValueError, match=r"eval_size=3 rows must be between 1 and 2 .*; lower --eval_size"):
        split_train_eval(three, 3)
    with pytest.raises(ValueError, match=r"a fractional eval_size must be in \(0, 1\), got nan"):
        split_train_eval(three, float("nan"))
