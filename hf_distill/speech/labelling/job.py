"""The resumable labelling job: this process's shards, each labelled and written atomically, then the summary.

Pipeline, for one process::

    list inputs (sorted by id)  ->  fixed shards of ``shard_size`` items  ->  for each shard this rank owns:
        probe durations -> plan windows -> read them in the audio thread -> teacher -> rows
        -> ``shard-NNNNN.parquet`` written to a temporary name, then renamed

Exactness: each shard's items and windows are a pure function of the configuration, so a run killed at any
moment (even with SIGKILL) and restarted with the same command finishes with the same rows as an
uninterrupted run; finished shards are verified and kept, unfinished ones recomputed. With several processes
(``RANK``/``WORLD_SIZE`` as set by ``accelerate launch`` or ``torchrun``), rank ``r`` takes shards
``r, r + W, r + 2W, ...``; ``summary.json`` is written by whichever process finishes the last shard.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

from hf_distill.speech.audio import list_audio, supported_extensions
from hf_distill.speech.input_checks import (
    check_listing,
    check_output_dir,
    check_speech_teacher,
)
from hf_distill.speech.labelling.config import (
    FAILPOINT_ENV,
    FORMAT,
    FORMAT_VERSION,
    PseudoLabelConfig,
    items_hash,
    resolve_packing,
)
from hf_distill.speech.labelling.decoding import ShardLabeller
from hf_distill.speech.labelling.store import (
    check_or_write_manifest,
    finalize,
    make_manifest,
    rows_to_table,
    shard_done,
    shard_schema,
    store_index_type,
)
from hf_distill.speech.labelling.teachers import load_teacher
from hf_distill.speech.labelling.text import load_normalizer
from hf_distill.store.manifest import atomic_write_text
from hf_distill.store.writer import (
    SHARD_PATTERN,
    rank_and_world,
    remove_partial_shard,
    write_shard,
)

logger = logging.getLogger(__name__)

__all__ = ["pseudo_label"]


class _Progress:
    def __init__(self, total_items: int, enabled: bool):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total_items, unit="file", desc="pseudo-label", disable=not enabled, dynamic_ncols=True)
        self.audio = 0.0
        self.t0 = time.perf_counter()

    def update(self, n_items: int, audio_seconds: float) -> None:
        self.audio += audio_seconds
        rtf = (time.perf_counter() - self.t0) / self.audio if self.audio > 0 else float("nan")
        self.bar.set_postfix_str(
            f"audio {self.audio / 3600:.3f} h, RTF {rtf:.4f} ({1 / rtf if rtf > 0 else 0:.1f}x)", refresh=False)
        self.bar.update(n_items)


def _existing_manifest(out: Path) -> dict[str, Any] | None:
    try:
        return json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def pseudo_label(config: PseudoLabelConfig) -> dict[str, Any]:
    """Run (or resume) a labelling job for this process's shards; see the module docstring.

    Returns a dict with ``output_dir``, ``num_shards``, ``shards_skipped`` (already finished and verified),
    ``shards_computed``, ``rows``, ``failures`` (this call), ``packed`` (whether the run packs clips, see
    :mod:`~hf_distill.speech.labelling.config`), ``summary`` (when the store is complete after this call, the
    dict written to ``summary.json``; else None); packed, ``packing``: the counters (windows, packed windows,
    rejected windows, clips labelled packed / alone) of the shards computed in this call; with a ``draft_model``,
    ``speculative``: draft tokens proposed and accepted, teacher passes, tokens and the acceptance rate.
    """
    # Wrong paths and empty inputs end the job here, before the teacher is loaded or anything is written.
    out = check_output_dir(config.output_dir)
    check_speech_teacher(config.model)
    rank, world = rank_and_world(config.rank, config.world_size)
    items = list_audio(config.input, path_column=config.path_column, text_column=config.text_column,
                       id_column=config.id_column, audio_column=config.audio_column, split=config.split,
                       config_name=config.dataset_config)
    check_listing(items, config.input, supported_extensions())
    teacher = load_teacher(config)
    config = dataclasses.replace(config, pack=resolve_packing(config, teacher.kind, _existing_manifest(out)))
    labeller = ShardLabeller(config, teacher, load_normalizer(config.normalizer), packed=config.pack)
    out.mkdir(parents=True, exist_ok=True)
    manifest = make_manifest(config, items, teacher.describe())
    index_type = store_index_type(check_or_write_manifest(out, manifest))
    config_hash, n_shards, S = manifest["config_hash"], manifest["num_shards"], config.shard_size
    pending = []
    for i in range(rank, n_shards, world):
        remove_partial_shard(out, i)  # a previous run died while writing this shard
        if not shard_done(out / SHARD_PATTERN.format(i), config_hash, i, items[i * S: (i + 1) * S]):
            pending.append(i)
    skipped = len(range(rank, n_shards, world)) - len(pending)
    logger.info("rank %d/%d: %d items in %d shards; %d of mine already done, %d to label%s", rank, world, len(items),
                n_shards, skipped, len(pending), " (packed)" if config.pack else "")
    progress = _Progress(sum(len(items[i * S: (i + 1) * S]) for i in pending), config.progress)
    labeller.on_batch = progress.update
    schema = shard_schema(config, teacher.kind, index_type)
    stats_name = labeller.stats_name
    for folder in ["stats"] + ([stats_name] if stats_name else []):
        (out / folder).mkdir(exist_ok=True)
    n_rows = n_fail = 0
    try:
        for i in pending:
            shard_items = items[i * S: (i + 1) * S]
            t0 = time.perf_counter()
            before = dict(labeller.stats)
            rows, failures, _ = labeller.run(shard_items)
            table = rows_to_table(rows, schema, config.top_k)
            meta = {"format": FORMAT, "version": FORMAT_VERSION, "shard": i, "num_shards": n_shards,
                    "config_hash": config_hash, "items_hash": items_hash(shard_items), "num_items": len(shard_items),
                    "num_rows": len(rows), "failures": [f.to_dict() for f in failures]}
            stats = {"shard": i, "audio_seconds": sum(r["duration"] for r in rows),
                     "compute_seconds": time.perf_counter() - t0}
            atomic_write_text(out / "stats" / f"shard-{i:05d}.json", json.dumps(stats, sort_keys=True) + "\n")
            if stats_name:
                counts = {k: labeller.stats[k] - before.get(k, 0) for k in labeller.stats}
                atomic_write_text(out / stats_name / f"shard-{i:05d}.json", json.dumps(counts, sort_keys=True) + "\n")
            write_shard(out / SHARD_PATTERN.format(i), table, meta, i, failpoint_env=FAILPOINT_ENV)
            n_rows += len(rows)
            n_fail += len(failures)
    finally:
        progress.bar.close()
    summary = None
    if all(shard_done(out / SHARD_PATTERN.format(i), config_hash, i, items[i * S: (i + 1) * S])
           for i in range(n_shards)):
        summary = finalize(out)
    elif world > 1:
        logger.info("rank %d done; summary.json is written by the process that finishes the last shard", rank)
    result = {"output_dir": str(out), "num_shards": n_shards, "shards_skipped": skipped,
              "shards_computed": len(pending), "rows": n_rows, "failures": n_fail, "packed": bool(config.pack),
              "summary": summary}
    if stats_name:
        result[stats_name] = dict(labeller.stats)
    if getattr(teacher, "draft", None) is not None:  # speculative decoding: how much of the draft was kept
        spec = teacher.greedy
        result["speculative"] = {**spec.stats, "acceptance_rate": spec.acceptance_rate}
        logger.info("speculative decoding: %d of %d draft tokens accepted (%.1f%%), %.2f tokens per teacher pass",
                    spec.stats["accepted"], spec.stats["proposed"], 100 * (spec.acceptance_rate or 0.0),
                    spec.stats["tokens"] / max(1, spec.stats["teacher_passes"]))
    return result
