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
import torch
from store_fixtures import (
    DATA,
    FIXTURE_ROOT,
    PACKED,
    STORES,
    build_inputs,
    rebase_store,
)

from hf_distill.speech.labelling import PseudoLabelConfig, pseudo_label
from hf_distill.speech.labelling.audio_thread import AudioThread
from hf_distill.store.writer import shard_files

TIMINGS = ("compute_seconds", "real_time_factor", "speed_x_real_time")


@pytest.fixture(scope="module")
def old_inputs(tmp_path_factory):
    return build_inputs(tmp_path_factory.mktemp("v1_inputs"))


def rows_of(store: Path) -> list[list[dict]]:
    return [pq.read_table(f).to_pylist() for f in shard_files(store)]


def same_values(a, b, rel: float = 1e-6) -> bool:
    """``a == b`` with model-computed floats (log-probs, probabilities) equal to ``rel``: the last bits of a
    float32 forward differ between CPU kernels, everything else (ids, text, flags, ints) must be identical.
    Soft labels (``topk_*``) are stored as float16, where such a bit can move a value by one float16 step."""
    if isinstance(a, float) and isinstance(b, float):
        return a == pytest.approx(b, rel=rel, abs=1e-12)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(
            same_values(a[k], b[k], 2.0**-9 if str(k).startswith("topk_") else rel) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_values(x, y, rel) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


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
    assert same_values(rows_of(resumed), rows_of(complete))
    assert (resumed / "manifest.json").read_text() == (complete / "manifest.json").read_text()
    assert same_values(summary_of(resumed), summary_of(complete))
    assert (resumed / "failures.jsonl").read_text() == (complete / "failures.jsonl").read_text()


# ------------------------------------------------------------------------------------------------ packing's default


def test_packing_is_the_default_where_it_is_exact_and_refused_where_it_cannot_be(tmp_path):
    from hf_distill.speech.labelling.config import resolve_packing

    def config(**kw):
        return PseudoLabelConfig(input="in", model="m", output_dir="out", **kw)

    assert resolve_packing(config(), "whisper", None) is True
    assert resolve_packing(config(top_k=4), "whisper", None) is False  # soft labels: each clip alone
    assert resolve_packing(config(num_beams=2), "whisper", None) is False
    assert resolve_packing(config(), "ctc", None) is False
    assert resolve_packing(config(pack=False), "whisper", None) is False
    # an existing store keeps its mode, whatever the default
    assert resolve_packing(config(), "whisper", {"config": {}}) is False
    assert resolve_packing(config(), "whisper", {"config": {}, "packing": {}}) is True
    with pytest.raises(ValueError, match=r"packing gives no per-clip soft labels .*drop --pack to store --top_k"):
        config(pack=True, top_k=4)
    with pytest.raises(ValueError, match=r"packing decodes greedily: drop --pack for beam search"):
        config(pack=True, num_beams=2)
    with pytest.raises(ValueError, match=r"packing is for Whisper teachers .*: drop --pack"):
        resolve_packing(config(pack=True), "ctc", None)
    # the packing settings are hashed only when packing: an unpacked store's hash is the one it always had
    assert "pack_gap_s" not in config(pack=False).hashed_fields()
    assert config(pack=True).hashed_fields()["pack_gap_s"] == 1.0
    assert "pack" not in config(pack=True).hashed_fields()


def test_the_deprecated_command_warns_and_runs_pseudo_label_with_pack(old_inputs, tmp_path, capsys, caplog):
    """``pseudo-label-packed`` on a CTC teacher: the warning, then the refusal of ``--pack`` (one line, nothing
    written), as ``pseudo-label --pack`` gives it."""
    from speech_assets import one_line_error

    argv = [str(old_inputs / "clips"), "--model", str(old_inputs / "ctc"), "--output-dir", str(tmp_path / "o"),
            "--no-progress"]
    for command in (["pseudo-label-packed"], ["pseudo-label", "--pack"]):
        line = one_line_error(capsys, [*command, *argv])
        assert "packing is for Whisper teachers" in line and line.endswith("drop --pack"), line
        assert not (tmp_path / "o").exists()
    assert sum("pseudo-label-packed is deprecated" in r.getMessage() for r in caplog.records) == 1


# ------------------------------------------------------------------------------------------------ the audio thread


def test_the_audio_thread_builds_in_order_in_its_own_thread_and_answers_while_ahead():
    """Jobs come out in order, built by the one background thread; a job asked for ``build_now`` is built by that
    thread too, before the jobs ahead, even while the queue ahead is full; an error comes out where it is asked."""
    built_by = []

    def build(job):
        built_by.append((job, threading.get_ident()))
        if job == "bad":
            raise ValueError("cannot build bad")
        return job * 2

    with AudioThread([1, 2, 3, 4, 5], build, depth=1) as thread:
        assert thread.next() == (1, 2)
        deadline = time.time() + 10
        while len(built_by) < 3 and time.time() < deadline:  # 2 waits in the queue, 3 is built and held
            time.sleep(0.01)
        assert thread.build_now(10) == 20  # answered while the queue ahead is full
        with pytest.raises(ValueError, match="cannot build bad"):
            thread.build_now("bad")
        assert [thread.next() for _ in range(5)] == [(2, 4), (3, 6), (4, 8), (5, 10), None]
        assert thread.next() is None and thread.build_now(7) == 14  # served after the last job too
    assert {ident for _, ident in built_by} == {built_by[0][1]} != {threading.get_ident()}
    assert [job for job, _ in built_by][:3] == [1, 2, 3] and 10 in [job for job, _ in built_by]
    # an error while building ahead comes out of next(), in its place
    with AudioThread(["bad", 1], build) as thread:
        with pytest.raises(ValueError, match="cannot build bad"):
            thread.next()
        assert thread.next() == (1, 2)


def test_closing_the_audio_thread_stops_it_mid_list():
    started = []

    def build(job):
        started.append(job)
        return job

    thread = AudioThread(range(1000), build, depth=2)
    assert thread.next() == (0, 0)
    thread.close()
    assert not thread.running and len(started) < 10


# ------------------------------------------------------------------------------------------------ speculative decoding


def test_a_draft_model_labels_the_same_rows_and_reports_its_acceptance(old_inputs, tmp_path, capsys):
    """``--draft_model``: a one-layer student that shares the teacher's encoder (its encoder output is reused)
    proposes tokens; the store holds the rows plain greedy decoding writes (soft labels included)."""
    import copy

    from transformers import WhisperForConditionalGeneration

    from hf_distill.speech.labelling import cli_main

    teacher = WhisperForConditionalGeneration.from_pretrained(old_inputs / "whisper")
    cfg = copy.deepcopy(teacher.config)
    cfg.decoder_layers = 1
    student = WhisperForConditionalGeneration(cfg)
    student.model.encoder.load_state_dict(teacher.model.encoder.state_dict())
    student.model.decoder.load_state_dict(teacher.model.decoder.state_dict(), strict=False)  # its first layer
    student.generation_config = teacher.generation_config
    student.save_pretrained(tmp_path / "student")
    argv = [str(old_inputs / "clips"), "--model", str(old_inputs / "whisper"), "--max-new-tokens", "12",
            "--top-k", "3", "--batch-size", "3", "--no-progress"]
    assert cli_main([*argv, "--output-dir", str(tmp_path / "plain")]) == 0
    capsys.readouterr()
    assert cli_main([*argv, "--output-dir", str(tmp_path / "draft"), "--draft-model", str(tmp_path / "student"),
                     "--draft-tokens", "3"]) == 0
    assert "draft acceptance" in capsys.readouterr().out
    plain, drafted = rows_of(tmp_path / "plain"), rows_of(tmp_path / "draft")
    for a, b in zip(sum(plain, []), sum(drafted, [])):
        assert (a["id"], a["token_ids"], a["text"], a["topk_indices"]) == (b["id"], b["token_ids"], b["text"],
                                                                             b["topk_indices"])
        assert a["avg_logprob"] == pytest.approx(b["avg_logprob"], abs=1e-5)
    assert (tmp_path / "draft" / "manifest.json").read_text() == (tmp_path / "plain" / "manifest.json").read_text()
    result = pseudo_label(PseudoLabelConfig(input=str(old_inputs / "clips"), model=str(old_inputs / "whisper"),
                                            output_dir=str(tmp_path / "packed"), max_new_tokens=12,
                                            draft_model=str(tmp_path / "student"), progress=False))
    assert result["packed"] and 0 < result["speculative"]["acceptance_rate"] <= 1
    assert result["speculative"]["proposed"] > 0
    from hf_distill.speech.labelling import load_teacher

    shared = load_teacher(PseudoLabelConfig(input="-", model=str(old_inputs / "whisper"), output_dir="-",
                                            draft_model=str(tmp_path / "student")))
    assert shared.draft_shares_encoder and shared.draft_hidden(torch.zeros(1, 80, 3000)) is None
