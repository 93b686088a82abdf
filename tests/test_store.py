"""The teacher-output store's format, manifest, fingerprints and shard writer."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from datasets import Dataset, Features, List, Value

from hf_distill.store import (
    bytes_per_position,
    check_complete,
    index_type_for,
    load_store,
    pack_topk,
    topk_from_logits,
    unpack_topk,
)
from hf_distill.store.format import arrow_columns, hidden_arrow_column
from hf_distill.store.manifest import config_differences, create_once, data_fingerprint
from hf_distill.store.writer import rank_and_world, read_shard_metadata, shard_matches, write_shard


def test_index_type_is_uint16_when_the_vocabulary_fits():
    assert index_type_for(51_864) == "uint16" and index_type_for(65_536) == "uint16"
    assert index_type_for(65_537) == "int32" and index_type_for(128_256) == "int32"
    assert bytes_per_position(64, "uint16") == 258 and bytes_per_position(64, "int32") == 386
    with pytest.raises(ValueError, match="must be >= 1"):
        index_type_for(0)


@pytest.mark.parametrize("vocab", [300, 70_000])
def test_columns_round_trip_through_parquet_and_datasets(tmp_path, vocab):
    """Rows of different lengths (and a row without labels) come back as written: indices exactly, probabilities
    and tails as their float16 values, hidden states too; float16 columns are byte-stream-split."""
    torch.manual_seed(0)
    index_type = index_type_for(vocab)
    rows, hidden = [], []
    for n in (3, 0, 5):
        logits = torch.randn(n, vocab) * 4
        rows.append(pack_topk(*topk_from_logits(logits, 8, temperature=2.0)))
        hidden.append(np.random.default_rng(n).normal(size=(n, 4)).astype(np.float32))
    rows.insert(1, None)
    hidden.insert(1, None)
    table = pa.table({"row": pa.array([0, 1, 2, 3], pa.int64()), **arrow_columns(rows, 8, index_type),
                      "hidden_1": hidden_arrow_column(hidden, 1, 4)})
    path = tmp_path / "shard-00000.parquet"
    write_shard(path, table, {"shard": 0, "config_hash": "abc"}, 0)
    assert read_shard_metadata(path) == {"shard": 0, "config_hash": "abc"}
    assert shard_matches(path, {"shard": 0}) and not shard_matches(path, {"shard": 1})
    md = pq.ParquetFile(path).metadata.row_group(0)
    encodings = {md.column(i).path_in_schema: md.column(i).encodings for i in range(md.num_columns)}
    assert "BYTE_STREAM_SPLIT" in encodings["topk_probs.list.element.list.element"]
    assert "BYTE_STREAM_SPLIT" in encodings["hidden_1.list.element.list.element"]
    ds = Dataset.from_parquet(str(path))
    assert ds.features["topk_indices"].feature.feature.dtype == index_type
    assert ds[1]["topk_indices"] is None and ds[2]["topk_tail"] == []
    for i in (0, 3):  # row 2 has no positions
        packed = rows[i]
        idx, probs, tail = unpack_topk(ds[i]["topk_indices"], ds[i]["topk_probs"], ds[i]["topk_tail"])
        assert np.array_equal(idx.numpy(), packed[0]) and idx.dtype == torch.int64
        assert np.array_equal(probs.numpy(), packed[1].astype(np.float32))
        assert np.array_equal(tail.numpy(), packed[2].astype(np.float32))
        assert np.array_equal(np.asarray(ds[i]["hidden_1"], np.float32).reshape(-1, 4),
                              hidden[i].astype(np.float16).astype(np.float32))


def test_uint16_columns_refuse_an_index_that_does_not_fit():
    row = (np.array([[70_000]], np.int32), np.ones((1, 1), np.float16), np.zeros(1, np.float16))
    with pytest.raises(ValueError, match="does not fit the store's uint16 indices"):
        arrow_columns([row], 1, "uint16")


def fingerprint(rows, *span) -> str:
    data = rows if isinstance(rows, Dataset) else Dataset.from_dict({"input_ids": rows})
    return data_fingerprint(data, ["input_ids"], *span)


def test_data_fingerprint_is_the_token_ids_content():
    ids = [[1, 2, 3], [4, 5], [6]]
    a = Dataset.from_dict({"input_ids": ids})
    b = Dataset.from_dict({"input_ids": ids}, features=Features({"input_ids": List(Value("int64"))}))
    assert fingerprint(a) == fingerprint(b)  # another integer type
    assert fingerprint(a) != fingerprint([[1, 2], [3, 4, 5], [6]])  # the same ids in other rows
    assert fingerprint(a) != fingerprint([[1, 2, 3], [4, 5], [7]])
    assert fingerprint(a.select([2, 0])) == fingerprint([[6], [1, 2, 3]])  # an indices mapping: the rows shown
    assert fingerprint(a, 1, 3) == fingerprint(ids[1:])


def test_manifest_is_created_once_and_differences_are_listed(tmp_path):
    path = tmp_path / "manifest.json"
    first = create_once(path, {"config": {"k": 8, "data": {"fingerprint": "a"}}})
    second = create_once(path, {"config": {"k": 16, "data": {"fingerprint": "b"}}})
    assert first == second == json.loads(path.read_text())
    assert config_differences(first["config"], {"k": 16, "data": {"fingerprint": "b"}, "new": 1}) == [
        "data.fingerprint: 'a' -> 'b'", "k: 8 -> 16", "new: None -> 1"]


def test_rank_and_world_from_arguments_or_environment(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert rank_and_world() == (1, 3) and rank_and_world(0, 2) == (0, 2)
    with pytest.raises(ValueError, match="invalid rank 3 for world size 3"):
        rank_and_world(3, None)


def test_a_folder_that_is_no_teacher_store_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_store(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        check_complete(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "hf_distill.pseudo_labels"}))
    with pytest.raises(ValueError, match="speech pseudo-label stores load with hf_distill.speech"):
        check_complete(tmp_path)
