"""Reading a teacher-output store: checked complete, checked against the data and tokenizer, joined to the rows.

:func:`join_store` returns the tokenized dataset with the teacher's columns next to its own:
``teacher_topk_indices``, ``teacher_topk_probs``, ``teacher_tail_mass`` (and ``teacher_hidden_<layer>``),
one entry per position. It refuses a store whose rows, token ids, tokenizer or layout are not those of the
dataset, naming what differs. :class:`~hf_distill.store.collator.StoreCollator` pads those columns to the
batch and turns the probabilities into the ``teacher_topk_logprobs`` the trainer reads.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .manifest import StoreMismatchError, data_fingerprint, read_manifest, tokenizer_hash
from .writer import FORMAT, read_shard_metadata, shard_files, shard_path

__all__ = ["BATCH_COLUMNS", "check_complete", "check_store_fits", "join_store", "load_store", "store_summary"]

#: store column -> the batch column the trainer reads
BATCH_COLUMNS = {"topk_indices": "teacher_topk_indices", "topk_probs": "teacher_topk_probs",
                 "topk_tail": "teacher_tail_mass"}


def check_complete(store_dir: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a finished store; an error naming the unfinished shards otherwise."""
    store_dir = Path(store_dir)
    if not store_dir.is_dir():
        raise FileNotFoundError(f"the teacher store {os.fspath(store_dir)!r} does not exist; write it with "
                                "hf-distill cache-teacher")
    manifest = read_manifest(store_dir)
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{store_dir} is a {manifest.get('format')!r} store, not a teacher-output store written by "
                         "hf-distill cache-teacher (speech pseudo-label stores load with hf_distill.speech)")
    missing = []
    for i in range(int(manifest["num_shards"])):
        meta = read_shard_metadata(shard_path(store_dir, i)) or {}
        if meta.get("config_hash") != manifest["config_hash"] or meta.get("shard") != i:
            missing.append(i)
    if missing:
        raise ValueError(f"the teacher store {store_dir} is not finished: {len(missing)} of {manifest['num_shards']} "
                         f"shards missing (first: {missing[:5]}); run the same hf-distill cache-teacher command again "
                         "to complete it")
    return manifest


def load_store(store_dir: str | os.PathLike, **load_kwargs):
    """The finished store as a ``datasets.Dataset`` (one row per dataset row, in order; columns ``row``,
    ``topk_indices``, ``topk_probs``, ``topk_tail``, ``hidden_<layer>``)."""
    import datasets

    check_complete(store_dir)
    return datasets.load_dataset("parquet", data_files=shard_files(store_dir), split="train", **load_kwargs)


def check_store_fits(manifest: dict[str, Any], *, tokenizer=None, task: str | None = None,
                     vocab_size: int | None = None, temperature: float | None = None,
                     where: str = "the teacher store") -> None:
    """Raise :class:`StoreMismatchError` listing every way the store does not fit: another tokenizer, a student
    with another kind of head or output size, another distillation temperature."""
    cfg = manifest["config"]
    problems = []
    if tokenizer is not None and cfg.get("tokenizer_hash"):
        got = tokenizer_hash(tokenizer)
        if got is not None and got != cfg["tokenizer_hash"]:
            problems.append("it was made with another tokenizer (another token -> id map), so its class indices "
                            "name other tokens")
    if task is not None and task != cfg["head"] and "base" not in (task,):
        problems.append(f"it holds a {cfg['head']} teacher's outputs ({cfg['positions']} positions) but the student is "
                        f"a {task} model")
    if vocab_size is not None and int(vocab_size) != int(cfg["vocab_size"]):
        problems.append(f"its distributions range over {cfg['vocab_size']} classes but the student's logits over "
                        f"{vocab_size}")
    if temperature is not None and abs(float(temperature) - float(cfg["temperature"])) > 1e-9:
        problems.append(f"it holds the teacher at temperature {cfg['temperature']:g} but the distillation runs at "
                        f"{float(temperature):g} (a top-k cannot be re-tempered: cache at {float(temperature):g}, or "
                        f"distil at {cfg['temperature']:g})")
    if problems:
        raise StoreMismatchError(f"{where} does not fit this run: " + "; ".join(problems))


def _check_rows(dataset, manifest: dict[str, Any], where: str) -> None:
    cfg = manifest["config"]
    data = cfg["data"]
    if len(dataset) != data["num_rows"]:
        raise StoreMismatchError(f"{where} holds {data['num_rows']} rows but the dataset has {len(dataset)}; join it "
                                 "to the dataset it was cached from (before shuffling, filtering or splitting)")
    missing = [c for c in data["columns"] if c not in dataset.column_names]
    if missing:
        raise StoreMismatchError(f"{where} was cached from a dataset with columns {data['columns']}, this one lacks "
                                 f"{missing}")
    if data_fingerprint(dataset, data["columns"]) != data["fingerprint"]:
        raise StoreMismatchError(f"{where} was cached from other data: the dataset's {data['columns']} differ from "
                                 "those the teacher read (another tokenization, max length, order or rows); join the "
                                 "dataset it was made from, or cache this one")


def join_store(dataset, store_dir: str | os.PathLike, *, tokenizer=None, **load_kwargs):
    """``dataset`` with the store's columns (``teacher_topk_indices``, ``teacher_topk_probs``, ``teacher_tail_mass``,
    ``teacher_hidden_<layer>``) added, after checking the store is finished and was made from these rows (same
    count, same token ids: a content fingerprint) and, when given, with this ``tokenizer``."""
    import datasets
    import pyarrow.compute as pc

    where = f"the teacher store {os.fspath(store_dir)}"
    manifest = check_complete(store_dir)
    check_store_fits(manifest, tokenizer=tokenizer, where=where)
    _check_rows(dataset, manifest, where)
    store = load_store(store_dir, **load_kwargs)
    table = store.with_format("arrow")[:]
    if table.column("row").to_pylist() != list(range(len(dataset))):
        raise StoreMismatchError(f"{where} has its rows out of order or duplicated; write it again")
    if manifest["config"]["positions"] == "token":
        stored = pc.list_value_length(table.column("topk_tail")).to_pylist()
        ids = pc.list_value_length(dataset.with_format("arrow")[:]["input_ids"]).to_pylist()
        if stored != ids:
            bad = next(i for i, (a, b) in enumerate(zip(stored, ids)) if a != b)
            raise StoreMismatchError(f"{where}: row {bad} has {stored[bad]} stored positions for {ids[bad]} tokens")
    renames = dict(BATCH_COLUMNS)
    renames.update({f"hidden_{layer}": f"teacher_hidden_{layer}" for layer in manifest["config"]["hidden_layers"]})
    clash = [new for new in renames.values() if new in dataset.column_names]
    if clash:
        raise ValueError(f"the dataset already has teacher columns {clash}; join the store to the dataset without them")
    store = store.remove_columns(["row"]).rename_columns(renames)
    if getattr(dataset, "_indices", None) is not None:
        dataset = dataset.flatten_indices()
    return datasets.concatenate_datasets([dataset, store], axis=1)


def store_summary(store_dir: str | os.PathLike) -> dict[str, Any]:
    """Rows, positions and bytes of a store: ``stored_bytes_per_position`` counts the compressed top-k columns
    (indices, probabilities, tail), ``file_bytes_per_position`` whole files (hidden states included)."""
    import pyarrow.parquet as pq

    manifest = read_manifest(store_dir)
    topk_bytes = file_bytes = positions = rows = 0
    files = shard_files(store_dir)
    for path in files:
        md = pq.ParquetFile(path).metadata
        rows += md.num_rows
        for rg in range(md.num_row_groups):
            for ci in range(md.num_columns):
                col = md.row_group(rg).column(ci)
                if col.path_in_schema.startswith("topk_"):
                    topk_bytes += col.total_compressed_size
                if col.path_in_schema.startswith("topk_tail"):
                    positions += col.num_values
        file_bytes += os.path.getsize(path)
    cfg = manifest["config"]
    return {"rows": rows, "positions": positions, "k": cfg["k"], "temperature": cfg["temperature"],
            "index_type": cfg["index_type"], "num_shards": len(files),
            "stored_bytes_per_position": topk_bytes / positions if positions else None,
            "file_bytes_per_position": file_bytes / positions if positions else None}
