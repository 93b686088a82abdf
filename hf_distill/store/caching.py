"""The caching job: run a teacher once over a tokenized dataset and store its outputs, resumably.

For every row the store holds, per position, the teacher's top-k probabilities at the store's temperature,
their indices and the tail mass (see :mod:`hf_distill.store.format`), and optionally chosen hidden states:

* sequence classification: one position per row (``k`` is clipped to the number of labels);
* masked LM, token classification: every position of the row's ``input_ids``;
* causal LM: every position of ``input_ids`` (position ``i`` holds the prediction of token ``i + 1``, the
  layout of the logits; the training terms shift it as they shift the logits).

Masked LM: the teacher reads the **unmasked** rows. The store does not freeze one masking pattern: the
student keeps its own dynamic masking, and the KL at every position compares the student on the masked
input with the teacher on the original one (a live teacher would see the masked input instead).

Rows are split into fixed shards of ``shard_size`` rows; each shard's batches are a pure function of the
configuration, so a job killed at any moment and started again with the same command ends with the same
bytes as an uninterrupted one. ``rank`` / ``world_size`` (default: ``torch.distributed`` or ``RANK`` /
``WORLD_SIZE``) split the shards over processes without overlap.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from ..modeling import forward_parameters, output_size, task_kind, unwrap
from .format import (
    arrow_columns,
    arrow_fields,
    hidden_arrow_column,
    hidden_field,
    index_type_for,
    pack_topk,
    topk_from_logits,
)
from .manifest import (
    MANIFEST_NAME,
    StoreMismatchError,
    atomic_write_text,
    config_differences,
    create_once,
    data_fingerprint,
    sha256_json,
    teacher_fingerprint,
    tokenizer_hash,
)
from .reader import store_summary
from .writer import (
    FORMAT,
    rank_and_world,
    remove_partial_shard,
    shard_matches,
    shard_path,
    shards_of_rank,
    write_shard,
)

__all__ = ["FAILPOINT_ENV", "FORMAT", "FORMAT_VERSION", "HEADS", "cache_teacher"]

FORMAT_VERSION = 1
#: kinds of teacher head the job stores, and what a position is for each
HEADS = {
    "sequence_classification": "sequence",
    "masked_lm": "token",
    "token_classification": "token",
    "causal_lm": "token",
}
#: columns of the tokenized dataset that the teacher reads (those present are fingerprinted)
TEACHER_INPUT_COLUMNS = ("input_ids", "attention_mask", "token_type_ids")
# Test hook: "kill-before-rename:<shard>" kills the process after writing that shard's temporary file.
FAILPOINT_ENV = "HF_DISTILL_CACHE_TEACHER_FAILPOINT"


def _check_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _check_dataset(dataset) -> None:
    if isinstance(dataset, dict) or isinstance(getattr(dataset, "column_names", None), dict):
        raise ValueError(f"the dataset is a DatasetDict with splits {list(dataset.keys())}; give one split")
    if not hasattr(dataset, "column_names") or not hasattr(dataset, "with_format"):
        raise TypeError(f"the dataset must be a datasets.Dataset, got {type(dataset).__name__}")
    if "input_ids" not in dataset.column_names:
        raise ValueError(f"the dataset has no input_ids column (columns: {dataset.column_names}); tokenize it with "
                         "the teacher's tokenizer first")
    if len(dataset) == 0:
        raise ValueError("the dataset has no rows")


def _lengths_and_max_id(dataset) -> tuple[list[int], int]:
    import pyarrow as pa
    import pyarrow.compute as pc

    col = dataset.with_format("arrow")[:]["input_ids"]
    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if not (pa.types.is_list(col.type) or pa.types.is_large_list(col.type)):
        raise ValueError("input_ids must hold one sequence of token ids per row (a list column), got "
                         f"{col.type}")
    if col.null_count:
        raise ValueError(f"{col.null_count} rows have no input_ids (null); drop them or tokenize them")
    lengths = pc.list_value_length(col).to_pylist()
    values = pc.list_flatten(col)
    if len(values) == 0:
        raise ValueError("every row's input_ids is empty; nothing to run the teacher on")
    low, high = pc.min_max(values).values()
    if low.as_py() < 0:
        raise ValueError(f"input_ids hold a negative id ({low.as_py()}); tokenize the data again")
    return lengths, int(high.as_py())


def _teacher_record(teacher, name: str | None) -> dict[str, Any]:
    base = unwrap(teacher)
    name = name or getattr(base, "name_or_path", "") or type(base).__name__
    record: dict[str, Any] = {"name": str(name), "class": type(base).__name__,
                              "dtype": str(next(base.parameters()).dtype).replace("torch.", "")}
    revision = getattr(base.config, "_commit_hash", None)
    if revision:
        record["revision"] = revision
    if os.path.isdir(str(name)):
        record["fingerprint"] = teacher_fingerprint(name)
    elif revision:  # a Hub model: its commit names its weights
        record["fingerprint"] = {"revision": revision}
    else:  # a model built in memory: its weights themselves
        h = hashlib.sha256()
        for key, tensor in sorted(base.state_dict().items()):
            h.update(key.encode())
            h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        record["fingerprint"] = {"weights_sha256": h.hexdigest()}
    return record


def _check_hidden_layers(teacher, hidden_layers) -> tuple[list[int], int | None]:
    layers = sorted({int(layer) for layer in hidden_layers or ()})
    if not layers:
        return [], None
    config = unwrap(teacher).config
    total = getattr(config, "num_hidden_layers", None)
    width = getattr(config, "hidden_size", None)
    if total is None or width is None:
        raise ValueError(f"cannot store hidden states of a {type(unwrap(teacher)).__name__}: its config names no "
                         "num_hidden_layers / hidden_size")
    bad = [layer for layer in layers if not 0 <= layer <= total]
    if bad:
        raise ValueError(f"hidden layer(s) {bad} are out of range: the teacher has hidden states 0 (embeddings) to "
                         f"{total} (last layer)")
    return layers, int(width)


def _build_config(teacher, dataset, *, tokenizer, k, temperature, hidden_layers, shard_size, teacher_name):
    head = task_kind(teacher)
    if head not in HEADS:
        raise ValueError(f"cache-teacher stores the outputs of sequence-classification, masked-LM, "
                         f"token-classification and causal-LM teachers; got a {type(unwrap(teacher)).__name__} "
                         f"({head}). For speech teachers use hf-distill pseudo-label --top_k")
    vocab = output_size(teacher)
    lengths, max_id = _lengths_and_max_id(dataset)
    embeddings = unwrap(teacher).get_input_embeddings() if hasattr(unwrap(teacher), "get_input_embeddings") else None
    n_embed = getattr(embeddings, "num_embeddings", None)
    if n_embed is not None and max_id >= n_embed:
        raise ValueError(f"input_ids hold token id {max_id} but the teacher embeds only {n_embed} ids; the data was "
                         "tokenized with another tokenizer than the teacher's")
    layers, width = _check_hidden_layers(teacher, hidden_layers)
    accepted = forward_parameters(teacher)
    columns = [c for c in TEACHER_INPUT_COLUMNS if c in dataset.column_names and (accepted is None or c in accepted)]
    config = {
        "head": head,
        "positions": HEADS[head],
        "teacher_input": "unmasked" if head == "masked_lm" else "as stored",
        "teacher": _teacher_record(teacher, teacher_name),
        "tokenizer_hash": tokenizer_hash(tokenizer),
        "vocab_size": int(vocab),
        "index_type": index_type_for(vocab),
        "k": min(int(k), int(vocab)),
        "temperature": float(temperature),
        "hidden_layers": layers,
        "hidden_size": width,
        "max_length": max(lengths),
        "data": {"num_rows": len(dataset), "columns": columns,
                 "fingerprint": data_fingerprint(dataset, columns), "positions": sum(lengths)},
        "shard_size": shard_size,
    }
    return config, lengths


def _schema(config: dict[str, Any]):
    import pyarrow as pa

    fields = [pa.field("row", pa.int64()), *arrow_fields(config["k"], config["index_type"])]
    fields += [hidden_field(layer, config["hidden_size"]) for layer in config["hidden_layers"]]
    return pa.schema(fields)


def _collate(chunk: dict[str, list], accepted, pad_id: int) -> tuple[dict[str, torch.Tensor], list[int]]:
    """Right-padded teacher inputs of a few rows (``{column: [row values]}``), and each row's length."""
    lengths = [len(ids) for ids in chunk["input_ids"]]
    width = max(lengths)
    batch = {}
    for name, values in chunk.items():
        t = torch.full((len(lengths), width), pad_id if name == "input_ids" else 0, dtype=torch.long)
        for i, row in enumerate(values):
            t[i, : lengths[i]] = torch.as_tensor(row, dtype=torch.long)
        batch[name] = t
    if "attention_mask" not in batch and (accepted is None or "attention_mask" in accepted):
        batch["attention_mask"] = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()
    return batch, lengths


@torch.no_grad()
def _run_shard(teacher, dataset, start: int, stop: int, config, *, batch_size: int, device, pad_id: int,
               on_rows=None):
    import pyarrow as pa

    accepted = forward_parameters(teacher)
    columns = config["data"]["columns"] or ["input_ids"]
    per_sequence = config["positions"] == "sequence"
    layers = config["hidden_layers"]
    soft, hidden = [], {layer: [] for layer in layers}
    view = dataset.select_columns(columns).with_format(None)
    for a in range(start, stop, batch_size):
        b = min(a + batch_size, stop)
        batch, lengths = _collate(view[a:b], accepted, pad_id)
        out = teacher(**{k: v.to(device) for k, v in batch.items()}, output_hidden_states=bool(layers))
        logits = out.logits.float()
        idx, probs, tail = topk_from_logits(logits, config["k"], config["temperature"])
        for i, n in enumerate(lengths):
            if per_sequence:
                soft.append(pack_topk(idx[i : i + 1], probs[i : i + 1], tail[i : i + 1]))
            else:
                soft.append(pack_topk(idx[i, :n], probs[i, :n], tail[i, :n]))
            for layer in layers:
                hidden[layer].append(out.hidden_states[layer][i, :n].float().cpu().numpy())
        if on_rows is not None:
            on_rows(b - a)
    cols = {"row": pa.array(range(start, stop), pa.int64()), **arrow_columns(soft, config["k"], config["index_type"])}
    for layer in layers:
        cols[f"hidden_{layer}"] = hidden_arrow_column(hidden[layer], layer, config["hidden_size"])
    schema = _schema(config)
    return pa.Table.from_pydict({f.name: cols[f.name] for f in schema}, schema=schema)


def _check_or_create_manifest(out: Path, manifest: dict[str, Any]) -> None:
    existing = create_once(out / MANIFEST_NAME, manifest)
    if existing.get("format") != FORMAT:
        raise StoreMismatchError(f"{out} holds a {existing.get('format')!r} store, not teacher outputs; choose a new "
                                 "output folder")
    if existing.get("config_hash") != manifest["config_hash"]:
        diffs = config_differences(existing.get("config", {}), manifest["config"])
        raise StoreMismatchError(
            f"{out} holds teacher outputs made with another configuration ({'; '.join(diffs) or 'format version'}); "
            "resuming would mix them. Run with the original settings, or choose a new output folder")


def cache_teacher(teacher, dataset, output_dir: str | os.PathLike, *, tokenizer=None, k: int = 64,
                  temperature: float = 1.0, hidden_layers=(), batch_size: int = 32, shard_size: int = 1024,
                  rank: int | None = None, world_size: int | None = None, teacher_name: str | None = None,
                  device: str | torch.device | None = None, progress: bool = True) -> dict[str, Any]:
    """Run ``teacher`` over the tokenized ``dataset`` and write (or resume) a teacher-output store in ``output_dir``.

    Every wrong input (a DatasetDict, no ``input_ids``, ids the teacher cannot embed, an unsupported head, a
    hidden layer out of range, a folder started with other settings) is a ``ValueError`` before the teacher
    runs. Returns ``output_dir``, ``num_shards``, ``shards_skipped`` (finished and verified), ``shards_computed``,
    ``rows`` and ``compute_seconds`` (of this call) and ``summary`` (once every shard is finished:
    :func:`~hf_distill.store.reader.store_summary`).
    """
    k = _check_int("k", k)
    batch_size, shard_size = _check_int("batch_size", batch_size), _check_int("shard_size", shard_size)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature) \
            or temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}; store the temperature you "
                         "will distil at")
    _check_dataset(dataset)
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"the output {os.fspath(output_dir)!r} is a file; give a folder for the store")
    rank, world = rank_and_world(rank, world_size)
    config, _ = _build_config(teacher, dataset, tokenizer=tokenizer, k=k, temperature=temperature,
                              hidden_layers=hidden_layers, shard_size=shard_size, teacher_name=teacher_name)
    n_rows = len(dataset)
    n_shards = math.ceil(n_rows / shard_size)
    manifest = {"format": FORMAT, "version": FORMAT_VERSION, "config": config,
                "config_hash": sha256_json({"format": FORMAT, "version": FORMAT_VERSION, "config": config}),
                "num_shards": n_shards, "columns": [f.name for f in _schema(config)]}
    out.mkdir(parents=True, exist_ok=True)
    _check_or_create_manifest(out, manifest)
    columns = config["data"]["columns"]

    def expected(i: int) -> dict[str, Any]:
        a, b = i * shard_size, min((i + 1) * shard_size, n_rows)
        return {"config_hash": manifest["config_hash"], "shard": i, "rows": [a, b],
                "rows_hash": data_fingerprint(dataset, columns, a, b)}

    pending, skipped = [], 0
    for i in shards_of_rank(n_shards, rank, world):
        remove_partial_shard(out, i)
        want = expected(i)
        if shard_matches(shard_path(out, i), want):
            skipped += 1
        else:
            pending.append(want)
    base = unwrap(teacher)
    device = torch.device(device) if device is not None else next(base.parameters()).device
    pad_id = getattr(getattr(tokenizer, "tokenizer", tokenizer), "pad_token_id", None)
    pad_id = pad_id if pad_id is not None else getattr(base.config, "pad_token_id", None) or 0
    was_training = base.training
    base.to(device).eval()
    from tqdm.auto import tqdm

    bar = tqdm(total=sum(w["rows"][1] - w["rows"][0] for w in pending), unit="row", desc="cache-teacher",
               disable=not progress, dynamic_ncols=True)
    computed_rows, compute = 0, 0.0
    try:
        for want in pending:
            a, b = want["rows"]
            t0 = time.perf_counter()
            table = _run_shard(base, dataset, a, b, config, batch_size=batch_size, device=device, pad_id=pad_id,
                               on_rows=bar.update)
            compute += time.perf_counter() - t0
            # No times in the shard: a resumed job writes the same bytes as an uninterrupted one.
            meta = {"format": FORMAT, "version": FORMAT_VERSION, "num_shards": n_shards, **want}
            write_shard(shard_path(out, want["shard"]), table, meta, want["shard"], failpoint_env=FAILPOINT_ENV)
            computed_rows += b - a
    finally:
        bar.close()
        base.train(was_training)
    summary = None
    if all(shard_matches(shard_path(out, i), {"config_hash": manifest["config_hash"], "shard": i})
           for i in range(n_shards)):
        summary = store_summary(out)
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return {"output_dir": str(out), "num_shards": n_shards, "shards_skipped": skipped,
            "shards_computed": len(pending), "rows": computed_rows, "compute_seconds": compute, "summary": summary}
