"""The one labeller after the split into ``hf_distill.speech.labelling``: stores written before it resume
with the same rows, packing's default and refusals, the deprecated alias, and the audio thread."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from store_fixtures import DATA, FIXTURE_ROOT, PACKED, STORES, build_inputs, rebase_store

from hf_distill.speech.labelling import PseudoLabelConfig, pseudo_label
from hf_distill.speech.labelling.audio_thread import AudioThread
from hf_distill.store.writer import shard_files

TIMINGS = ("compute_seconds", "real_time_factor", "speed_x_real_time")


@pytest.fixture(scope="module")
def old_inputs(tmp_path_factory):
    return build_inputs(tmp_path_factory.mktemp("v1_inputs"))


def rows_of(store: Path) -> list[list[dict]]:
    return [pq.read_table(f).to_pylist() for f in shard_files(store)]


def summary_of(store: Path) -> dict:
    summary = json.loads((store / "summary.json").read_text())
    return {k: v for k, v in summary.items() if k not in TIMINGS}


@pytest.mark.parametrize("name", sorted(STORES))
def test_a_store_written_before_the_split_resumes_with_the_same_rows(old_inputs, tmp_path, name):
    """The store of an earlier release, its last two shards lost: the same options finish it, skipping the shard
    it has, and every row, the manifest and the summary are those the earlier release wrote."""
    complete = rebase_store(DATA / name, tmp_path / "complete", FIXTURE_ROOT, str(old_inputs))
    resumed = tmp_path / "resumed"
    shutil.copytree(complete, resumed)
    for lost in ("shard-00001.parquet", "shard-00002.parquet", "summary.json", "failures.jsonl"):
        (resumed / lost).unlink()
    options = dict(STORES[name])
    teacher = options.pop("teacher")
    result = pseudo_label(PseudoLabelConfig(input=str(old_inputs / "clips"), model=str(old_inputs / teacher),
                                            output_dir=str(resumed), progress=False, **options))
    assert (result["shards_skipped"], result["shards_computed"]) == (1, 2)
    assert result["packed"] == PACKED[name]  # with pack=None: the mode the store was started with
    assert rows_of(resumed) == rows_of(complete)
    assert (resumed / "manifest.json").read_text() == (complete / "manifest.json").read_text()
    assert summary_of(resumed) == summary_of(complete)
    assert (resumed / "failures.jsonl").read_text() == (complete / "failures.jsonl").read_text()
