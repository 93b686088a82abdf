"""The pseudo-label store: shard schema, manifest (checked on resume), shard verification, summary, loading.

Outputs in ``output_dir``:

- ``manifest.json``: the configuration, its hash, the teacher and the number of items and shards. A run into a
  folder started with another configuration (or whose input changed) is refused.
- ``shard-00000.parquet`` ...: one row per labelled item; the shard's failures (items that could not be read,
  with the reason) are in the file's metadata. Load the store with :func:`load_pseudo_labels` or
  ``datasets.load_dataset("parquet", data_files=".../shard-*.parquet")``.
- ``stats/shard-00000.json``: audio seconds and compute seconds of each shard (for the summary); packed stores
  also ``packing/shard-00000.json`` (windows, packed and rejected windows, clips labelled packed or alone).
- ``summary.json`` and ``failures.jsonl``: written when the last shard is done (by whichever process finishes
  it), or by :func:`finalize` / ``hf-distill pseudo-label --finalize``.

Row columns: ``id``, ``path``, ``duration`` (seconds), ``reference`` (or null), ``text``, ``token_ids`` (Whisper:
the tokens generated after the decoder prompt, end-of-text included; CTC: the collapsed label sequence),
``prompt_ids`` (Whisper's decoder prompt, e.g. start-of-transcript, language, task, no-timestamps),
``avg_logprob`` (Whisper: mean log-probability of ``token_ids``; with greedy decoding under the decoding rules,
suppressed tokens out of the normaliser, as Whisper's own ``avg_logprob`` that the -1.0 threshold was made for;
with beam search, of the teacher-forced distribution), ``no_speech_prob`` (Whisper: probability of the
no-speech token at the first decoding step; for a chunked recording the lowest over its chunks),
``compression_ratio`` (UTF-8 bytes / zlib-compressed bytes of ``text``), ``mean_max_posterior`` (CTC: mean over
frames of the top frame posterior), ``wer`` (against the reference, both normalised), ``n_chunks``, one boolean
per filter (``pass_wer``, ``pass_avg_logprob``, ``pass_no_speech``, ``pass_compression_ratio``,
``pass_mean_max_posterior``; null where a filter does not apply) and ``keep``: with a reference, the WER filter
decides; without one, every confidence filter that applies must pass. With ``--timestamps``: ``segments``
(start, end, text). With ``--top_k K``: ``topk_indices`` / ``topk_probs`` / ``topk_tail`` (see
:mod:`hf_distill.speech.soft_labels`), one entry per token of ``token_ids`` (Whisper: the teacher's raw
distribution at the step that produced that token, no decoding rule applied) or per output frame (CTC). Packed
rows differ where :mod:`~hf_distill.speech.labelling.rows` says.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from hf_distill.speech.audio import AudioFailure, write_failures
from hf_distill.speech.labelling.config import (
    FORMAT,
    FORMAT_VERSION,
    ConfigMismatchError,
    items_hash,
    packing_settings,
)
from hf_distill.speech.labelling.rows import FILTER_COLUMNS
from hf_distill.store.format import (
    arrow_columns,
    arrow_fields,
    bytes_per_position,
    index_type_for,
)
from hf_distill.store.manifest import (
    atomic_write_text,
    create_once,
    sha256_json,
    teacher_fingerprint,
)
from hf_distill.store.writer import SHARD_PATTERN, read_shard_metadata, shard_files

__all__ = ["check_or_write_manifest", "finalize", "load_pseudo_labels", "make_manifest", "rows_to_table",
           "shard_done", "shard_schema", "store_index_type"]


def shard_schema(config, teacher_kind: str, index_type: str = "int32"):
    """The shard schema; ``index_type`` is the store's (``uint16`` for new stores whose vocabulary fits, ``int32``
    for stores started before uint16 indices, which keep it so that every shard of a store has one schema)."""
    import pyarrow as pa

    types = {"string": pa.string(), "float64": pa.float64(), "int32": pa.int32(), "bool": pa.bool_(),
             "ids": pa.list_(pa.int32())}
    columns = [("id", "string"), ("path", "string"), ("duration", "float64"), ("reference", "string"),
               ("text", "string"), ("token_ids", "ids"), ("prompt_ids", "ids"), ("avg_logprob", "float64"),
               ("no_speech_prob", "float64"), ("compression_ratio", "float64"), ("mean_max_posterior", "float64"),
               ("wer", "float64"), ("n_chunks", "int32"), *[(c, "bool") for c in FILTER_COLUMNS], ("keep", "bool")]
    fields = [pa.field(name, types[kind]) for name, kind in columns]
    if config.return_timestamps and teacher_kind == "whisper":
        segment = pa.struct([("start", pa.float64()), ("end", pa.float64()), ("text", pa.string())])
        fields.append(pa.field("segments", pa.list_(segment)))
    if config.top_k:
        fields.extend(arrow_fields(config.top_k, index_type))
    return pa.schema(fields)


def rows_to_table(rows: list[dict], schema, top_k: int | None):
    import pyarrow as pa

    cols = {f.name: pa.array([r.get(f.name) for r in rows], type=f.type) for f in schema
            if not f.name.startswith("topk_")}
    if top_k:
        stored = schema.field("topk_indices").type.value_type.value_type
        index_type = "uint16" if pa.types.is_uint16(stored) else "int32"
        cols.update(arrow_columns([r["soft"] for r in rows], top_k, index_type))
    return pa.Table.from_pydict({f.name: cols[f.name] for f in schema}, schema=schema)


def make_manifest(config, items: list, teacher_info: dict[str, Any]) -> dict[str, Any]:
    cfg = config.hashed_fields()
    fingerprint = teacher_fingerprint(config.model)
    config_hash = sha256_json({"format": FORMAT, "version": FORMAT_VERSION, "config": cfg, "teacher": fingerprint})
    n_shards = max(1, math.ceil(len(items) / config.shard_size)) if items else 0
    manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "config": cfg,
        "config_hash": config_hash,
        "teacher": {**teacher_info, "fingerprint": fingerprint},
        "num_items": len(items),
        "items_hash": items_hash(items),
        "shard_size": config.shard_size,
        "num_shards": n_shards,
        "columns": [f.name for f in shard_schema(config, teacher_info["type"])],
    }
    if config.top_k:
        # The index type is recorded, not hashed: a store started with int32 indices resumes with them.
        index_type = index_type_for(teacher_info["vocab_size"])
        manifest["columns"] = [f.name for f in shard_schema(config, teacher_info["type"], index_type)]
        manifest["soft_labels"] = {
            "k": config.top_k,
            "temperature": config.soft_label_temperature,
            "positions": "tokens of token_ids" if teacher_info["type"] == "whisper" else "output frames",
            "index_type": index_type,
            "raw_bytes_per_position": bytes_per_position(config.top_k, index_type),
        }
    if config.pack:
        manifest["packing"] = packing_settings(config)
    return manifest


def store_index_type(manifest: dict[str, Any]) -> str:
    """The soft labels' index type of a store: recorded since uint16 indices; ``int32`` in older stores."""
    return (manifest.get("soft_labels") or {}).get("index_type", "int32")


def check_or_write_manifest(out: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Create the manifest (once: concurrent ranks agree on one) or check the existing one; returns it."""
    old = create_once(out / "manifest.json", manifest)
    if old.get("config_hash") != manifest["config_hash"]:
        diffs = []
        old_cfg = old.get("config", {})
        for key in sorted(set(old_cfg) | set(manifest["config"])):
            if old_cfg.get(key) != manifest["config"].get(key):
                diffs.append(f"{key}: {old_cfg.get(key)!r} -> {manifest['config'].get(key)!r}")
        if not diffs and old.get("teacher", {}).get("fingerprint") != manifest["teacher"]["fingerprint"]:
            diffs.append("the teacher's files changed")
        raise ConfigMismatchError(
            f"{out} holds pseudo-labels made with a different configuration "
            f"({'; '.join(diffs) or 'format version'}). Resuming into it would mix incompatible outputs: "
            "rerun with the original options, or choose a new output_dir."
        )
    if old.get("items_hash") != manifest["items_hash"]:
        raise ConfigMismatchError(
            f"{out} was started on a different input listing ({old.get('num_items')} items then, "
            f"{manifest['num_items']} now, or the same count with other ids/paths/references). "
            "Restore the input or choose a new output_dir."
        )
    return old


def shard_done(path: Path, config_hash: str, shard: int, shard_items: list) -> bool:
    """Whether ``path`` is shard ``shard`` of this configuration, finished, for these items."""
    meta = read_shard_metadata(path) or {}
    return (meta.get("config_hash"), meta.get("shard"), meta.get("items_hash")) == (
        config_hash, shard, items_hash(shard_items))


def _shard_stats(out: Path, folder: str, shard: int) -> dict[str, Any] | None:
    """A shard's statistics (``stats/``, ``packing/``), or None when missing or unreadable."""
    try:
        return json.loads((out / folder / f"shard-{shard:05d}.json").read_text())
    except (OSError, ValueError):
        return None


def finalize(output_dir: str | os.PathLike) -> dict[str, Any]:
    """Check every shard is present, then write ``summary.json`` and ``failures.jsonl``; returns the summary."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    out = Path(output_dir)
    if not (out / "manifest.json").is_file():
        raise FileNotFoundError(f"{out} is not a pseudo-label store (no manifest.json); give the --output-dir of a "
                                "labelling job")
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    n_shards = manifest["num_shards"]
    missing = [i for i in range(n_shards)
               if (read_shard_metadata(out / SHARD_PATTERN.format(i)) or {}).get("config_hash") != manifest["config_hash"]]
    if missing:
        raise RuntimeError(f"{len(missing)} of {n_shards} shards are not finished yet (first: {missing[:5]}); "
                           "rerun the job to complete them")
    failures: list[AudioFailure] = []
    reasons: dict[str, int] = {}
    rows = kept = positions = topk_bytes = 0
    audio = audio_kept = compute = 0.0
    filters = {c: {"applies": 0, "passed": 0} for c in FILTER_COLUMNS}
    compute_complete = True
    for i in range(n_shards):
        path = out / SHARD_PATTERN.format(i)
        meta = read_shard_metadata(path)
        for f in meta["failures"]:
            failures.append(AudioFailure(**f))
            key = f["reason"].split(":")[0]
            reasons[key] = reasons.get(key, 0) + 1
        cols = ["duration", "keep", *FILTER_COLUMNS]
        pf = pq.ParquetFile(path)
        has_topk = "topk_tail" in pf.schema_arrow.names
        table = pf.read(columns=cols + (["topk_tail"] if has_topk else []))
        rows += table.num_rows
        if table.num_rows:
            keep = table["keep"]
            dur = table["duration"]
            kept += int(pc.sum(pc.cast(keep, "int64")).as_py() or 0)
            audio += float(pc.sum(dur).as_py() or 0.0)
            audio_kept += float(pc.sum(pc.filter(dur, keep)).as_py() or 0.0)
            for c in FILTER_COLUMNS:
                col = table[c]
                filters[c]["applies"] += table.num_rows - col.null_count
                filters[c]["passed"] += int(pc.sum(pc.cast(col, "int64")).as_py() or 0)
            if has_topk:
                positions += int(pc.sum(pc.list_value_length(table["topk_tail"])).as_py() or 0)
        if has_topk:
            md = pf.metadata
            for rg in range(md.num_row_groups):
                for ci in range(md.num_columns):
                    col = md.row_group(rg).column(ci)
                    if col.path_in_schema.startswith("topk_"):
                        topk_bytes += col.total_compressed_size
        try:
            compute += float(_shard_stats(out, "stats", i)["compute_seconds"])
        except (TypeError, KeyError):
            compute_complete = False
    cfg = manifest["config"]
    thresholds = {
        "pass_wer": {"wer_below": cfg["wer_threshold"]},
        "pass_avg_logprob": {"avg_logprob_at_least": cfg["logprob_threshold"]},
        "pass_no_speech": {"no_speech_prob_at_most": cfg["no_speech_threshold"]},
        "pass_compression_ratio": {"compression_ratio_at_most": cfg["compression_ratio_threshold"]},
        "pass_mean_max_posterior": {"mean_max_posterior_at_least": cfg["min_mean_max_posterior"]},
    }
    summary: dict[str, Any] = {
        "teacher": manifest["teacher"]["type"],
        "items": manifest["num_items"],
        "rows": rows,
        "kept": kept,
        "failures": len(failures),
        "failure_reasons": dict(sorted(reasons.items())),
        "audio_hours": audio / 3600,
        "audio_hours_kept": audio_kept / 3600,
        "filters": {c.removeprefix("pass_"): {**filters[c], **thresholds[c]} for c in FILTER_COLUMNS},
        "compute_seconds": compute,
        "real_time_factor": compute / audio if audio > 0 else None,
        "speed_x_real_time": audio / compute if compute > 0 else None,
        "timing_complete": compute_complete,
        "num_shards": n_shards,
    }
    if manifest.get("soft_labels"):
        sl = manifest["soft_labels"]
        summary["soft_labels"] = {"k": sl["k"], "temperature": sl["temperature"], "positions": positions,
                                  "raw_bytes_per_position": sl["raw_bytes_per_position"],
                                  "stored_bytes_per_position": topk_bytes / positions if positions else None}
    if "packing" in manifest:  # the packing counters of every shard, summed
        totals: dict[str, int] = {}
        for i in range(n_shards):
            for k, v in (_shard_stats(out, "packing", i) or {}).items():
                totals[k] = totals.get(k, 0) + int(v)
        summary["packing"] = totals
    write_failures(out / "failures.jsonl", failures)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return summary


def load_pseudo_labels(output_dir: str | os.PathLike, keep_only: bool = False, **load_kwargs):
    """The store as a ``datasets.Dataset`` (rows in shard order, i.e. sorted by id). ``keep_only`` drops
    rows whose ``keep`` flag is false."""
    import datasets

    files = shard_files(output_dir)
    if not files:
        raise FileNotFoundError(f"no shard-*.parquet files in {output_dir}")
    ds = datasets.load_dataset("parquet", data_files=files, split="train", **load_kwargs)
    if keep_only:
        ds = ds.filter(lambda k: k, input_columns=["keep"])
    return ds
